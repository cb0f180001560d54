// CPU backward of lpqld::segment_bn_loss (segment_bn_loss_bwd) and of its fused eval-mode BN variant
// (segment_bn_loss_bwd_bn_eval, registered in bn_eval_cpu.cpp), one elementwise pass:
// grad = scale * ((x - mean_hi) - mean_lo) + alpha, per (segment, channel) coefficients; mean is split into
// hi + lo parts of the compute type so x - mean stays accurate for large means.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu/segment_bn_loss_cpu.h"

namespace lpqld::sbl_cpu {

// Rows r < rows of L values: g = sc[r] * ((x - hi[r]) - lo[r]) + al[r] in acc_t; a 16-bit x is converted a
// chunk at a time into tmp (kChunk acc_t).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void grad_rows(const scalar_t* xr, scalar_t* gr, int64_t L, int64_t rows, const acc_t* sc, const acc_t* al,
                      const acc_t* hi, const acc_t* lo, acc_t* tmp) {
  if constexpr (kDirect<scalar_t>) {
    (void)tmp;
    affine_rows(xr, gr, L, rows, sc, al, hi, lo);
  } else {
    for (int64_t r = 0; r < rows; ++r, xr += L, gr += L) {
      for (int64_t start = 0; start < L; start += kChunk) {
        const int64_t n = std::min(kChunk, L - start);
        const acc_t* src = chunk_as_acc<scalar_t, acc_t>(xr, start, n, tmp);
        affine_rows(src, tmp, n, 1, sc + r, al + r, hi + r, lo + r);  // in place in tmp
        for (int64_t k = 0; k < n; ++k) gr[start + k] = static_cast<scalar_t>(tmp[k]);
      }
    }
  }
}

// One channels-last row of the gradient (C channels of one position).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void nlc_grad_row(const scalar_t* xr, scalar_t* gr, int64_t C, const acc_t* sc, const acc_t* al,
                         const acc_t* hi, const acc_t* lo) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    nlc_affine_f32(xr, gr, C, sc, al, hi, lo);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    nlc_affine_bf16(reinterpret_cast<const uint16_t*>(xr), reinterpret_cast<uint16_t*>(gr), C, sc, al, hi, lo);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      gr[c] = static_cast<scalar_t>(affine_one(static_cast<acc_t>(xr[c]), sc[c], al[c], hi[c], lo[c]));
    }
  }
}

// One channels-last row of the loss gradient plus the BN (+ ReLU) path's gradient gy * gs (gs = s, or s / 4
// under a 2x2 average pool), masked where fma(x, s, b) <= 0 under ReLU.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void nlc_grad_bn_row(const scalar_t* xr, const scalar_t* gyr, scalar_t* gr, int64_t C, const acc_t* sc,
                            const acc_t* al, const acc_t* hi, const acc_t* lo, const acc_t* s, const acc_t* b,
                            const acc_t* gs, bool relu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (relu ? nlc_affine_bn_relu_f32 : nlc_affine_bn_id_f32)(xr, gyr, gr, C, sc, al, hi, lo, s, b, gs);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    (relu ? nlc_affine_bn_relu_bf16 : nlc_affine_bn_id_bf16)(
        reinterpret_cast<const uint16_t*>(xr), reinterpret_cast<const uint16_t*>(gyr), reinterpret_cast<uint16_t*>(gr),
        C, sc, al, hi, lo, s, b, gs);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t xv = static_cast<acc_t>(xr[c]);
      const acc_t up = static_cast<acc_t>(gyr[c]) * gs[c];
      gr[c] = static_cast<scalar_t>(affine_one(xv, sc[c], al[c], hi[c], lo[c]) +
                                    ((!relu || std::fma(xv, s[c], b[c]) > acc_t(0)) ? up : acc_t(0)));
    }
  }
}

Tensor bwd_impl(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids, const Tensor& target_mean,
                const Tensor& target_var, const Tensor& mean, const Tensor& var, const Tensor& count,
                const BnPath* bn) {
  const Layout d = check_common(x, segment_ids, target_mean, target_var);
  const int64_t N = d.N, C = d.C, L = d.L, S = d.S;
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == S && grad_loss.scalar_type() == at::kDouble &&
                  grad_loss.is_contiguous(),
              "segment_bn_loss_bwd: grad_loss must be a contiguous float64 [S] tensor");
  TORCH_CHECK(mean.sizes() == target_mean.sizes() && var.sizes() == target_mean.sizes() &&
                  mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble && mean.is_contiguous() &&
                  var.is_contiguous(),
              "segment_bn_loss_bwd: mean and var must be contiguous float64 [S, C] tensors");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == S && count.scalar_type() == at::kLong && count.is_contiguous(),
              "segment_bn_loss_bwd: count must be a contiguous int64 [S] tensor");
  int64_t OH = 0, OW = 0;  // pooled size
  if (bn != nullptr) {
    const Tensor& gy = *bn->grad_y;
    TORCH_CHECK(bn->pool == 1 || bn->pool == 2, "segment_bn_loss_bwd_bn_eval: pool must be 1 or 2, got ", bn->pool);
    if (bn->pool == 1) {
      TORCH_CHECK(same_layout(gy, x),
                  "segment_bn_loss_bwd_bn_eval: grad_y must have x's shape and strides, got ", gy.sizes(), " / ",
                  gy.strides());
    } else {
      TORCH_CHECK(bn->width >= 2 && L % bn->width == 0 && L / bn->width >= 2 && (is_channels_last_ncl(x) || C == 1),
                  "segment_bn_loss_bwd_bn_eval: pool 2 needs a channels-last x [N, C, H * W] with H, W >= 2 "
                  "(W = ", bn->width, ", L = ", L, ")");
      OH = (L / bn->width) / 2;
      OW = bn->width / 2;
      TORCH_CHECK(gy.dim() == 3 && gy.size(0) == N && gy.size(1) == C && gy.size(2) == OH * OW &&
                      (gy.stride(1) == 1 || C == 1) && (gy.stride(2) == C || OH * OW == 1) &&
                      (gy.stride(0) == C * OH * OW || N <= 1),
                  "segment_bn_loss_bwd_bn_eval: grad_y must be channels-last [N, C, (H / 2) * (W / 2)], got ",
                  gy.sizes(), " / ", gy.strides());
    }
    TORCH_CHECK(gy.scalar_type() == x.scalar_type() && gy.device() == x.device(),
                "segment_bn_loss_bwd_bn_eval: grad_y must have x's dtype and device, got ", gy.scalar_type());
    check_bn_affine("segment_bn_loss_bwd_bn_eval", x, *bn->scale, *bn->shift);
  }
  Tensor grad_x = at::empty_like(x);  // keeps a channels-last x's strides
  if (N == 0) return grad_x;
  const int64_t* seg = segment_ids.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK_INDEX(seg[n] >= 0 && seg[n] < S, "segment_bn_loss: segment_ids holds ", seg[n], " outside [0, ", S,
                      ")");
  }
  const double* g = grad_loss.const_data_ptr<double>();
  const double* pm = mean.const_data_ptr<double>();
  const double* pv = var.const_data_ptr<double>();
  const double* ptm = target_mean.const_data_ptr<double>();
  const double* ptv = target_var.const_data_ptr<double>();
  const int64_t* cnt = count.const_data_ptr<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_bn_loss_bwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    // per (segment, channel): grad = scale * ((x - mhi) - mlo) + alpha
    std::vector<acc_t> scale(S * C), alpha(S * C), mhi(S * C), mlo(S * C);
    at::parallel_for(0, S, std::max<int64_t>(1, 4096 / C), [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        double nm = 0.0, nv = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double em = pm[s * C + c] - ptm[s * C + c];
          const double ev = pv[s * C + c] - ptv[s * C + c];
          nm += em * em;
          nv += ev * ev;
        }
        nm = std::sqrt(nm);
        nv = std::sqrt(nv);
        const double ns = static_cast<double>(cnt[s]) * static_cast<double>(L);
        const double gs = (cnt[s] > 0) ? g[s] / ns : 0.0;
        const double fa = nm > 0.0 ? gs / nm : 0.0;
        const double fb = nv > 0.0 ? 2.0 * gs / nv : 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t i = s * C + c;
          const acc_t hi = static_cast<acc_t>(pm[i]);
          mhi[i] = hi;
          mlo[i] = static_cast<acc_t>(pm[i] - static_cast<double>(hi));
          alpha[i] = static_cast<acc_t>(fa * (pm[i] - ptm[i]));
          scale[i] = static_cast<acc_t>(fb * (pv[i] - ptv[i]));
        }
      }
    });
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* pg = grad_x.data_ptr<scalar_t>();
    const scalar_t* pgy = bn ? bn->grad_y->const_data_ptr<scalar_t>() : nullptr;
    const acc_t* bs = bn ? bn->scale->const_data_ptr<acc_t>() : nullptr;
    const acc_t* bb = bn ? bn->shift->const_data_ptr<acc_t>() : nullptr;
    const bool relu = bn && bn->relu;
    const int64_t pool = bn ? bn->pool : 1;
    std::vector<acc_t> gscale;  // the BN path's gradient factor: scale, or scale / 4 under the 2x2 average
    if (bn != nullptr) {
      gscale.assign(bs, bs + C);
      if (pool == 2) {
        for (auto& v : gscale) v *= acc_t(0.25);
      }
    }
    if (is_channels_last_ncl(x) || (pool == 2 && C == 1)) {  // rows of C channels, coefficients in lanes
      const int64_t W = bn ? bn->width : 1;
      at::parallel_for(0, N * L, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / L;
          const int64_t i0 = seg[n] * C;
          const acc_t *sc = scale.data() + i0, *al = alpha.data() + i0, *hi = mhi.data() + i0, *lo = mlo.data() + i0;
          const scalar_t* xr = px + r * C;
          scalar_t* gr = pg + r * C;
          const scalar_t* gyr = pgy == nullptr ? nullptr : pgy + r * C;
          if (pool == 2) {  // the pooled position this row feeds, if any (floor mode drops an odd last row/column)
            const int64_t h = (r % L) / W, w = (r % L) % W;
            gyr = (h / 2 < OH && w / 2 < OW) ? pgy + ((n * OH + h / 2) * OW + w / 2) * C : nullptr;
          }
          if (gyr != nullptr) {
            nlc_grad_bn_row<scalar_t>(xr, gyr, gr, C, sc, al, hi, lo, bs, bb, gscale.data(), relu);
          } else {
            nlc_grad_row<scalar_t>(xr, gr, C, sc, al, hi, lo);
          }
        }
      });
      return;
    }
    const int64_t grain = std::max<int64_t>(1, 32768 / L);
    at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tmp(kDirect<scalar_t> ? 0 : kChunk);
      for (int64_t r = begin; r < end;) {
        const int64_t n = r / C, c0 = r % C;
        const int64_t run = std::min(end, (n + 1) * C) - r;  // rows (n, c0 ..) in this task
        const int64_t i0 = seg[n] * C + c0;                   // their coefficients
        const scalar_t* xr = px + r * L;
        scalar_t* gr = pg + r * L;
        if (pgy != nullptr) {  // the BN path (not recover's hot layout: plain loop)
          for (int64_t k = 0; k < run; ++k) {
            const int64_t i = i0 + k, c = c0 + k, o = k * L;
            const acc_t sc = scale[i], al = alpha[i], hi = mhi[i], lo = mlo[i], s = bs[c], b = bb[c];
            for (int64_t e = 0; e < L; ++e) {
              const acc_t xv = static_cast<acc_t>(xr[o + e]);
              gr[o + e] = static_cast<scalar_t>(affine_one(xv, sc, al, hi, lo) +
                                                bn_grad_one(xv, static_cast<acc_t>(pgy[r * L + o + e]), s, b, relu));
            }
          }
        } else {
          grad_rows<scalar_t>(xr, gr, L, run, scale.data() + i0, alpha.data() + i0, mhi.data() + i0, mlo.data() + i0,
                              tmp.data());
        }
        r += run;
      }
    });
  });
  return grad_x;
}

}  // namespace lpqld::sbl_cpu
