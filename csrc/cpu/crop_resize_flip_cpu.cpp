// CPU kernels of lpqld::crop_resize_flip and its backward.
//
// Per sample, the source rows and columns of every output row/column and
// their bilinear weights are computed once (PyTorch's rules for
// align_corners=False without a scale factor: scale = in / out,
// src = max(scale * (d + 0.5) - 0.5, 0), i0 = min(floor(src), in - 1),
// l1 = clamp(src - i0, 0, 1), i1 = i0 + (i0 < in - 1); in == out copies).
// The horizontal flip is folded into the column table (reversed). Then
// at::parallel_for runs over (sample, channel) planes; x is read through its
// strides (no copy for non-contiguous input), uint8 directly. Both directions
// are separable: a horizontal pass per referenced source row, then a
// contiguous (vectorisable) vertical blend; the backward is its adjoint and
// adds grad * weight into the crop window of each plane (planes are disjoint:
// no atomics).
// The forward's float row kernels and their per-ISA variants are in crop_resize_flip_rows.{h,cpp}.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/op_math.h"
#include "cpu/output_pool.h"

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/crop_resize_flip_rows.h"

namespace {

using lpqld::OpMath;
using lpqld::OutType;
using namespace lpqld::crf_cpu;

template <typename acc_t>
struct Tap {
  int64_t off0;  // offset (in elements, times the stride) of the first source pixel
  int64_t off1;
  acc_t w0;
  acc_t w1;
};

// Taps along one axis for a crop [start, start + len) resized to `out`,
// offsets multiplied by `stride`; reversed when `reverse` (the flip).
template <typename acc_t>
void axis_taps(int64_t start, int64_t len, int64_t out, int64_t stride, bool reverse, Tap<acc_t>* taps) {
  if (len == out) {
    for (int64_t d = 0; d < out; ++d) {
      taps[d] = {(start + d) * stride, (start + d) * stride, acc_t(1), acc_t(0)};
    }
  } else {
    const acc_t scale = static_cast<acc_t>(len) / static_cast<acc_t>(out);
    for (int64_t d = 0; d < out; ++d) {
      // Fused multiply-add, as PyTorch's own (FMA-enabled) CPU and CUDA builds
      // compute it: every backend then finds the same source index and weight.
      acc_t src = std::fma(scale, static_cast<acc_t>(d) + acc_t(0.5), acc_t(-0.5));
      if (src < acc_t(0)) src = acc_t(0);
      const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), len - 1);
      const acc_t l1 = std::min(std::max(src - static_cast<acc_t>(i0), acc_t(0)), acc_t(1));
      const int64_t i1 = i0 + (i0 < len - 1 ? 1 : 0);
      taps[d] = {(start + i0) * stride, (start + i1) * stride, acc_t(1) - l1, l1};
    }
  }
  if (reverse) std::reverse(taps, taps + out);
}

// A double as Python's repr writes it (shortest round trip, "1.0" not "1"), so the C++ message reads as the
// Python layer's. Python switches to an exponent below 1e-4 and from 1e16 on; to_chars picks the shorter form,
// which may differ there (only in how a refused value is printed).
std::string py_float(double v) {
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof(buf), v);
  std::string s(buf, res.ptr);
  if (std::isfinite(v) && s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// Normalised boxes (i/H, j/W, h/H, w/W) -> int64 pixel boxes (i, j, h, w), exactly as
// lpqld_fast.ops.reference.pixel_boxes computes them: the float32 product with the image size, rounded half to
// even, h, w >= 1, then clamped inside the image. Done here rather than by ~16 small tensor ops in Python (they
// and the value checks were more than half of a 28x28 replay call). Values outside [0, 1] (NaN included) are
// refused with the Python layer's message; int64 boxes are already pixel boxes and pass through.
at::Tensor pixel_boxes_cpu(const at::Tensor& boxes_in, int64_t h_img, int64_t w_img) {
  if (boxes_in.scalar_type() == at::kLong) return boxes_in.contiguous();
  TORCH_CHECK(boxes_in.dim() == 2 && boxes_in.size(1) == 4, "crop_resize_flip: boxes must be [N, 4], got ",
              boxes_in.sizes());
  TORCH_CHECK(boxes_in.device().is_cpu(), "crop_resize_flip: all tensors must be on the CPU");
  TORCH_CHECK_TYPE(boxes_in.scalar_type() == at::kFloat || boxes_in.scalar_type() == at::kDouble,
                   "crop_resize_flip: boxes must be int64 pixel boxes or float32/float64 normalised boxes, got ",
                   boxes_in.scalar_type());
  const int64_t n = boxes_in.size(0);
  at::Tensor pix = at::empty({n, 4}, boxes_in.options().dtype(at::kLong));
  int64_t* out = pix.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(boxes_in.scalar_type(), "pixel_boxes_cpu", [&] {
    const at::Tensor b = boxes_in.contiguous();
    const scalar_t* v = b.data_ptr<scalar_t>();
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t* r = v + 4 * k;
      bool ok = true;
      for (int c = 0; c < 4; ++c) ok = ok && r[c] >= scalar_t(0) && r[c] <= scalar_t(1);  // false for NaN
      TORCH_CHECK_VALUE(ok, "boxes must hold finite normalised (i/H, j/W, h/H, w/W) values in [0, 1], got row ", k,
                        ": [", py_float(r[0]), ", ", py_float(r[1]), ", ", py_float(r[2]), ", ",
                        py_float(r[3]), "]");
      // float32 products, as the reference's float32 tensor times a Python int
      const auto px = [](scalar_t value, int64_t size) {
        return static_cast<int64_t>(std::nearbyint(static_cast<float>(value) * static_cast<float>(size)));
      };
      const int64_t h = std::min(std::max(px(r[2], h_img), int64_t{1}), h_img);
      const int64_t w = std::min(std::max(px(r[3], w_img), int64_t{1}), w_img);
      out[4 * k + 0] = std::min(std::max(px(r[0], h_img), int64_t{0}), h_img - h);
      out[4 * k + 1] = std::min(std::max(px(r[1], w_img), int64_t{0}), w_img - w);
      out[4 * k + 2] = h;
      out[4 * k + 3] = w;
    }
  });
  return pix;
}

// bool flips pass through; integer flips must hold 0/1 (the Python layer's rule) and become bool.
at::Tensor bool_flips_cpu(const at::Tensor& flips) {
  if (flips.scalar_type() == at::kBool) return flips.contiguous();
  TORCH_CHECK_TYPE(at::isIntegralType(flips.scalar_type(), /*includeBool=*/false),
                   "crop_resize_flip: flips must be bool or 0/1 integers, got ", flips.scalar_type());
  TORCH_CHECK(flips.device().is_cpu(), "crop_resize_flip: all tensors must be on the CPU");
  const at::Tensor f = flips.to(at::kLong).contiguous();
  const int64_t* v = f.data_ptr<int64_t>();
  for (int64_t k = 0; k < f.numel(); ++k) {
    TORCH_CHECK_VALUE(v[k] == 0 || v[k] == 1, "flips must hold 0/1 (or bool) values");
  }
  return f.to(at::kBool);
}

void check_common(const at::Tensor& t, const char* tname, const at::Tensor& boxes, const at::Tensor& flips,
                  int64_t h_img, int64_t w_img) {
  lpqld::check_crop_resize_flip_args(t, tname, boxes, flips);
  const int64_t n = t.size(0);
  TORCH_CHECK(boxes.device().is_cpu() && flips.device().is_cpu() && t.device().is_cpu(),
              "crop_resize_flip: all tensors must be on the CPU");
  TORCH_CHECK(h_img >= 1 && w_img >= 1, "crop_resize_flip: image size must be positive, got ", h_img, "x", w_img);
  auto b = boxes.accessor<int64_t, 2>();
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = b[k][0], j = b[k][1], h = b[k][2], w = b[k][3];
    TORCH_CHECK(h >= 1 && w >= 1 && i >= 0 && j >= 0 && i + h <= h_img && j + w <= w_img,
                "crop_resize_flip: boxes[", k, "] = (", i, ", ", j, ", ", h, ", ", w,
                ") is not a non-empty box inside the ", h_img, "x", w_img, " image");
  }
}

// Tables for all samples: y taps [N, oh] (offsets * sH), x taps [N, ow] (offsets * sW).
template <typename acc_t>
void build_tables(const at::Tensor& boxes, const at::Tensor& flips, int64_t oh, int64_t ow, int64_t sH, int64_t sW,
                  std::vector<Tap<acc_t>>& ytab, std::vector<Tap<acc_t>>& xtab) {
  const int64_t n = boxes.size(0);
  ytab.resize(static_cast<size_t>(n * oh));
  xtab.resize(static_cast<size_t>(n * ow));
  const int64_t* b = boxes.data_ptr<int64_t>();
  const bool* f = flips.data_ptr<bool>();
  for (int64_t k = 0; k < n; ++k) {
    axis_taps<acc_t>(b[4 * k + 0], b[4 * k + 2], oh, sH, false, ytab.data() + k * oh);
    axis_taps<acc_t>(b[4 * k + 1], b[4 * k + 3], ow, sW, f[k], xtab.data() + k * ow);
  }
}

// Horizontal pass of one source row into `dst` [ow]: dst[ox] = row[x0] * wx0 + row[x1] * wx1.
template <typename scalar_t, typename acc_t>
inline void interp_row(const scalar_t* row, const Tap<acc_t>* xt, int64_t ow, acc_t* dst) {
  for (int64_t ox = 0; ox < ow; ++ox) {
    const Tap<acc_t>& t = xt[ox];
    dst[ox] = static_cast<acc_t>(row[t.off0]) * t.w0 + static_cast<acc_t>(row[t.off1]) * t.w1;
  }
}

// The forward on float rows (crop_resize_flip_rows.h): x is uint8 or float32 with x.stride(3) == 1.
// Column taps become int32 indices into the converted crop window [j, j + w)
// (uint8) or into the source row itself (float32); the two-slot row cache is the
// same as forward_impl's.
template <typename scalar_t>
void forward_rows(const at::Tensor& x, const at::Tensor& boxes, const at::Tensor& flips, at::Tensor& out) {
  constexpr bool is_u8 = std::is_same_v<scalar_t, uint8_t>;
  const RowKernels& K = *active_row_kernels().load();
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t oh = out.size(2), ow = out.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2);
  std::vector<Tap<float>> ytab, xtab;
  build_tables<float>(boxes, flips, oh, ow, sH, 1, ytab, xtab);
  const int64_t* bx = boxes.data_ptr<int64_t>();
  const size_t cols = static_cast<size_t>(n * ow);
  std::vector<int32_t> xi0(cols), xi1(cols);
  std::vector<float> xw0(cols), xw1(cols);
  const int64_t nwin = ow / 16;  // full 16-output windows per sample (the tail is scalar)
  std::vector<int32_t> win_lo(K.windows ? static_cast<size_t>(n * nwin) : 0);
  std::vector<int32_t> win_span(win_lo.size());
  std::vector<int32_t> xr0(K.windows ? cols : 0), xr1(xr0.size());
  int64_t max_w = 1;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t base_col = is_u8 ? bx[4 * k + 1] : 0;
    max_w = std::max(max_w, bx[4 * k + 3]);
    for (int64_t ox = 0; ox < ow; ++ox) {
      const Tap<float>& t = xtab[static_cast<size_t>(k * ow + ox)];
      xi0[static_cast<size_t>(k * ow + ox)] = static_cast<int32_t>(t.off0 - base_col);
      xi1[static_cast<size_t>(k * ow + ox)] = static_cast<int32_t>(t.off1 - base_col);
      xw0[static_cast<size_t>(k * ow + ox)] = t.w0;
      xw1[static_cast<size_t>(k * ow + ox)] = t.w1;
    }
    for (int64_t wi = 0; K.windows && wi < nwin; ++wi) {
      const size_t a = static_cast<size_t>(k * ow + 16 * wi);
      int32_t lo = xi0[a], hi = xi0[a];
      for (size_t e = a; e < a + 16; ++e) {
        lo = std::min({lo, xi0[e], xi1[e]});
        hi = std::max({hi, xi0[e], xi1[e]});
      }
      const bool fits = hi - lo + 1 <= 32;
      win_lo[static_cast<size_t>(k * nwin + wi)] = fits ? lo : -1;
      win_span[static_cast<size_t>(k * nwin + wi)] = hi - lo + 1;
      for (size_t e = a; e < a + 16; ++e) {
        xr0[e] = fits ? xi0[e] - lo : 0;
        xr1[e] = fits ? xi1[e] - lo : 0;
      }
    }
  }
  auto plan_of = [&](int64_t k) {
    const size_t o = static_cast<size_t>(k * ow), w = static_cast<size_t>(k * nwin);
    return ColumnPlan{xi0.data() + o, xi1.data() + o, xw0.data() + o, xw1.data() + o,
                      K.windows ? win_lo.data() + w : nullptr, K.windows ? win_span.data() + w : nullptr,
                      K.windows ? xr0.data() + o : nullptr, K.windows ? xr1.data() + o : nullptr};
  };
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  float* op = out.data_ptr<float>();
  const int64_t plane = oh * ow;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1));
  at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> slots(static_cast<size_t>(2 * ow));
    std::vector<float> rowf(is_u8 ? static_cast<size_t>(max_w) : 0);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = p / c, ch = p % c;
      const scalar_t* base = xp + k * sN + ch * sC;
      const int64_t j = bx[4 * k + 1], w = bx[4 * k + 3];
      const Tap<float>* yt = ytab.data() + k * oh;
      const ColumnPlan plan = plan_of(k);
      float* dst = op + p * plane;
      float* buf[2] = {slots.data(), slots.data() + ow};
      int64_t tag[2] = {-1, -1};
      auto hrow = [&](int64_t r, float* into) {
        if constexpr (is_u8) {
          if (K.hpass_u8 != nullptr) {
            K.hpass_u8(base + r + j, plan, ow, into);
          } else {
            K.u8_to_float(base + r + j, w, rowf.data());
            K.hpass(rowf.data(), plan, ow, into);
          }
        } else {
          K.hpass(base + r, plan, ow, into);
        }
      };
      for (int64_t oy = 0; oy < oh; ++oy) {
        const int64_t r0 = yt[oy].off0, r1 = yt[oy].off1;
        int s0 = tag[0] == r0 ? 0 : (tag[1] == r0 ? 1 : -1);
        if (s0 < 0) {
          s0 = tag[0] == r1 ? 1 : 0;
          hrow(r0, buf[s0]);
          tag[s0] = r0;
        }
        int s1 = s0;
        if (r1 != r0) {
          s1 = 1 - s0;
          if (tag[s1] != r1) {
            hrow(r1, buf[s1]);
            tag[s1] = r1;
          }
        }
        K.vblend(buf[s0], buf[s1], yt[oy].w0, yt[oy].w1, ow, dst + oy * ow);
      }
    }
  });
}

// Separable forward: each output row blends two horizontally interpolated
// source rows, out = top * wy0 + bot * wy1 (the same arithmetic, in the same
// order, as the direct 2-D formula). Source rows are monotone in the output
// row, so a two-slot cache computes every referenced source row once per
// plane (upscaling reuses each row for several output rows).
template <typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& boxes, const at::Tensor& flips, at::Tensor& out) {
  using acc_t = typename OpMath<scalar_t>::type;
  using out_t = typename OutType<scalar_t>::type;
  const int64_t n = x.size(0), c = x.size(1);
  const int64_t oh = out.size(2), ow = out.size(3);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  std::vector<Tap<acc_t>> ytab, xtab;
  build_tables<acc_t>(boxes, flips, oh, ow, sH, sW, ytab, xtab);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  out_t* op = out.data_ptr<out_t>();
  const int64_t plane = oh * ow;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(plane, 1));
  at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> slots(static_cast<size_t>(2 * ow));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = p / c, ch = p % c;
      const scalar_t* base = xp + k * sN + ch * sC;
      const Tap<acc_t>* yt = ytab.data() + k * oh;
      const Tap<acc_t>* xt = xtab.data() + k * ow;
      out_t* dst = op + p * plane;
      acc_t* buf[2] = {slots.data(), slots.data() + ow};
      int64_t tag[2] = {-1, -1};  // source row offset held by each slot
      for (int64_t oy = 0; oy < oh; ++oy) {
        const int64_t r0 = yt[oy].off0, r1 = yt[oy].off1;
        int s0 = tag[0] == r0 ? 0 : (tag[1] == r0 ? 1 : -1);
        if (s0 < 0) {
          s0 = tag[0] == r1 ? 1 : 0;  // keep the slot that already holds r1
          interp_row<scalar_t, acc_t>(base + r0, xt, ow, buf[s0]);
          tag[s0] = r0;
        }
        int s1 = s0;
        if (r1 != r0) {
          s1 = 1 - s0;
          if (tag[s1] != r1) {
            interp_row<scalar_t, acc_t>(base + r1, xt, ow, buf[s1]);
            tag[s1] = r1;
          }
        }
        const acc_t* top = buf[s0];
        const acc_t* bot = buf[s1];
        const acc_t wy0 = yt[oy].w0, wy1 = yt[oy].w1;
        out_t* drow = dst + oy * ow;
        for (int64_t ox = 0; ox < ow; ++ox) {
          drow[ox] = static_cast<out_t>(top[ox] * wy0 + bot[ox] * wy1);
        }
      }
    }
  });
}

at::Tensor crop_resize_flip_cpu(const at::Tensor& x, const at::Tensor& boxes_in, const at::Tensor& flips_in,
                                int64_t out_h, int64_t out_w) {
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "crop_resize_flip: out_h and out_w must be positive, got ", out_h, ", ",
              out_w);
  TORCH_CHECK(x.dim() == 4, "crop_resize_flip: x must be [N, C, H, W], got ", x.sizes());
  const at::Tensor boxes = pixel_boxes_cpu(boxes_in, x.size(2), x.size(3));
  const at::Tensor flips = bool_flips_cpu(flips_in);
  check_common(x, "x", boxes, flips, x.size(2), x.size(3));
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16 || st == at::kByte,
              "crop_resize_flip: x must be float16/bfloat16/float32/float64 or uint8, got ", st);
  const auto out_dtype = st == at::kByte ? at::kFloat : st;
  // Pooled: a replay loop reuses the previous batch's pages instead of faulting in fresh ones.
  at::Tensor out = lpqld::pooled_empty({x.size(0), x.size(1), out_h, out_w}, out_dtype);
  if (out.numel() == 0) return out;
  // Int32 column indices hold any real image width; the float-row path needs unit column stride.
  if (x.stride(3) == 1 && x.size(3) < (int64_t{1} << 30)) {
    if (st == at::kByte) {
      forward_rows<uint8_t>(x, boxes, flips, out);
      return out;
    }
    if (st == at::kFloat) {
      forward_rows<float>(x, boxes, flips, out);
      return out;
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, st, "crop_resize_flip_cpu",
                                  [&] { forward_impl<scalar_t>(x, boxes, flips, out); });
  return out;
}

// Separable backward (the adjoint of the forward above): per output row, the
// grad row is scattered horizontally into a crop-width buffer (tmp[x0] +=
// wx0 * g, tmp[x1] += wx1 * g), which is then added into the two source rows
// with weights wy0, wy1. Planes are disjoint, so no atomics.
template <typename scalar_t>
void backward_impl(const at::Tensor& g, const at::Tensor& boxes, const at::Tensor& flips, at::Tensor& gx) {
  using acc_t = typename OpMath<scalar_t>::type;
  constexpr bool direct = std::is_same_v<acc_t, scalar_t>;
  const int64_t n = g.size(0), c = g.size(1), oh = g.size(2), ow = g.size(3);
  const int64_t hi = gx.size(2), wi = gx.size(3);
  const int64_t in_plane = hi * wi, out_plane = oh * ow;
  // Row offsets index a contiguous [H, W] plane; column offsets are relative to the crop's first column.
  std::vector<Tap<acc_t>> ytab, xtab;
  build_tables<acc_t>(boxes, flips, oh, ow, wi, 1, ytab, xtab);
  const int64_t* bx = boxes.data_ptr<int64_t>();
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  scalar_t* gxp = gx.data_ptr<scalar_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(std::max(out_plane, in_plane), 1));
  at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(direct ? 0 : static_cast<size_t>(in_plane));
    std::vector<acc_t> tmp(static_cast<size_t>(wi));
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = p / c;
      const int64_t j = bx[4 * k + 1], w = bx[4 * k + 3];
      const Tap<acc_t>* yt = ytab.data() + k * oh;
      const Tap<acc_t>* xt = xtab.data() + k * ow;
      const scalar_t* src = gp + p * out_plane;
      acc_t* acc;
      if constexpr (direct) {
        acc = reinterpret_cast<acc_t*>(gxp + p * in_plane);  // zero-initialised by the caller
      } else {
        std::fill(scratch.begin(), scratch.end(), acc_t(0));
        acc = scratch.data();
      }
      acc_t* trow = tmp.data() - j;  // trow[col] for col in [j, j + w)
      for (int64_t oy = 0; oy < oh; ++oy) {
        std::fill(tmp.begin(), tmp.begin() + w, acc_t(0));
        const scalar_t* grow = src + oy * ow;
        // Runs of output columns share a source column (an upscaled crop: several in a row; the table is
        // monotone, reversed when flipped): sum each run in a register and add it once, instead of a
        // read-modify-write per output column on the entry the previous column just wrote (a store-to-load
        // chain that bounded this loop).
        int64_t c0 = xt[0].off0, c1 = xt[0].off1;
        acc_t a0 = 0, a1 = 0;
        for (int64_t ox = 0; ox < ow; ++ox) {
          const Tap<acc_t>& t = xt[ox];
          const acc_t v = static_cast<acc_t>(grow[ox]);
          if (t.off0 != c0) {
            trow[c0] += a0;
            c0 = t.off0;
            a0 = 0;
          }
          if (t.off1 != c1) {
            trow[c1] += a1;
            c1 = t.off1;
            a1 = 0;
          }
          a0 += t.w0 * v;
          a1 += t.w1 * v;
        }
        trow[c0] += a0;
        trow[c1] += a1;
        acc_t* r0 = acc + yt[oy].off0 + j;
        acc_t* r1 = acc + yt[oy].off1 + j;
        const acc_t wy0 = yt[oy].w0, wy1 = yt[oy].w1;
        for (int64_t col = 0; col < w; ++col) r0[col] += wy0 * tmp[col];
        for (int64_t col = 0; col < w; ++col) r1[col] += wy1 * tmp[col];
      }
      if constexpr (!direct) {
        scalar_t* dst = gxp + p * in_plane;
        for (int64_t e = 0; e < in_plane; ++e) dst[e] = static_cast<scalar_t>(scratch[e]);
      }
    }
  });
}

at::Tensor crop_resize_flip_backward_cpu(const at::Tensor& grad_out, const at::Tensor& boxes_in,
                                         const at::Tensor& flips_in, int64_t in_h, int64_t in_w) {
  TORCH_CHECK(grad_out.dim() == 4, "crop_resize_flip_backward: grad_out must be [N, C, oh, ow], got ",
              grad_out.sizes());
  TORCH_CHECK(in_h >= 1 && in_w >= 1, "crop_resize_flip: image size must be positive, got ", in_h, "x", in_w);
  const at::Tensor boxes = pixel_boxes_cpu(boxes_in, in_h, in_w);
  const at::Tensor flips = bool_flips_cpu(flips_in);
  check_common(grad_out, "grad_out", boxes, flips, in_h, in_w);
  const auto st = grad_out.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "crop_resize_flip_backward: grad_out must be floating point, got ", st);
  const at::Tensor g = grad_out.contiguous();
  at::Tensor gx = lpqld::pooled_empty({g.size(0), g.size(1), in_h, in_w}, st).zero_();
  if (g.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "crop_resize_flip_backward_cpu",
                                  [&] { backward_impl<scalar_t>(g, boxes, flips, gx); });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(lpqld, CPU, m) {
  m.impl("crop_resize_flip", &crop_resize_flip_cpu);
  m.impl("crop_resize_flip_backward", &crop_resize_flip_backward_cpu);
}
