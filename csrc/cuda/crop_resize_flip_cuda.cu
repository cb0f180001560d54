// CUDA kernels of lpqld::crop_resize_flip and its backward.
//
// One thread per output element (sample, channel, oy, ox). Each thread
// computes its source rows/columns and bilinear weights from the sample's
// pixel box with PyTorch's rules (align_corners=False, no scale factor:
// scale = in / out, src = max(fma(scale, d + 0.5, -0.5), 0),
// i0 = min(floor(src), in - 1), l1 = clamp(src - i0, 0, 1),
// i1 = i0 + (i0 < in - 1); in == out copies), mirrors the output column
// where the sample is flipped, and gathers four source pixels through x's
// strides (uint8 read directly; float math, double for double input).
// Backward: the same threads atomicAdd grad * weight into a zero buffer
// (float for half/bfloat16 gradients, cast at the end; the gradient's own
// dtype for float/double).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "common/op_math.h"

namespace {

using lpqld::OpMath;
using lpqld::OutType;

__device__ __forceinline__ float fma_op(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_op(double a, double b, double c) { return __fma_rn(a, b, c); }

template <typename acc_t>
__device__ __forceinline__ void tap(int64_t d, int64_t start, int64_t len, int64_t out, int64_t& i0, int64_t& i1,
                                    acc_t& w0, acc_t& w1) {
  if (len == out) {
    i0 = d;
    i1 = d;
    w0 = acc_t(1);
    w1 = acc_t(0);
  } else {
    const acc_t scale = static_cast<acc_t>(len) / static_cast<acc_t>(out);
    acc_t src = fma_op(scale, static_cast<acc_t>(d) + acc_t(0.5), acc_t(-0.5));
    if (src < acc_t(0)) src = acc_t(0);
    int64_t f = static_cast<int64_t>(floor(src));
    i0 = f < len - 1 ? f : len - 1;
    acc_t l1 = src - static_cast<acc_t>(i0);
    l1 = l1 < acc_t(0) ? acc_t(0) : (l1 > acc_t(1) ? acc_t(1) : l1);
    i1 = i0 + (i0 < len - 1 ? 1 : 0);
    w1 = l1;
    w0 = acc_t(1) - l1;
  }
  i0 += start;
  i1 += start;
}

// Defensive clamp of a box into an h_img x w_img image (the Python layer
// already validates; a bad direct call must not read out of bounds).
__device__ __forceinline__ void load_box(const int64_t* boxes, int64_t k, int64_t h_img, int64_t w_img, int64_t& bi,
                                         int64_t& bj, int64_t& bh, int64_t& bw) {
  bh = boxes[4 * k + 2];
  bw = boxes[4 * k + 3];
  bh = bh < 1 ? 1 : (bh > h_img ? h_img : bh);
  bw = bw < 1 ? 1 : (bw > w_img ? w_img : bw);
  bi = boxes[4 * k + 0];
  bj = boxes[4 * k + 1];
  bi = bi < 0 ? 0 : (bi > h_img - bh ? h_img - bh : bi);
  bj = bj < 0 ? 0 : (bj > w_img - bw ? w_img - bw : bj);
}

// Normalised float boxes (i/H, j/W, h/H, w/W) -> int64 pixel boxes, one thread per box, with the rules of
// lpqld_fast.ops.reference.pixel_boxes (float32 product, round half to even, h, w >= 1, clamped inside): one
// launch instead of the ~16 small tensor ops of the Python conversion. Values are not checked here (the Python
// layer checks them unless validate=False); a NaN still lands inside the image through the clamps.
template <typename box_t>
__global__ void pixel_boxes_kernel(const box_t* __restrict__ boxes, int64_t* __restrict__ pix, int64_t n,
                                   int64_t h_img, int64_t w_img) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k >= n) return;
  const box_t* r = boxes + 4 * k;
  const auto px = [](box_t v, int64_t size) -> int64_t {
    const float p = rintf(__fmul_rn(static_cast<float>(v), static_cast<float>(size)));
    return p != p ? 0 : static_cast<int64_t>(fminf(fmaxf(p, -1.0f), static_cast<float>(size) + 1.0f));
  };
  int64_t h = px(r[2], h_img), w = px(r[3], w_img);
  h = h < 1 ? 1 : (h > h_img ? h_img : h);
  w = w < 1 ? 1 : (w > w_img ? w_img : w);
  int64_t i = px(r[0], h_img), j = px(r[1], w_img);
  i = i < 0 ? 0 : (i > h_img - h ? h_img - h : i);
  j = j < 0 ? 0 : (j > w_img - w ? w_img - w : j);
  pix[4 * k + 0] = i;
  pix[4 * k + 1] = j;
  pix[4 * k + 2] = h;
  pix[4 * k + 3] = w;
}

template <typename scalar_t>
__global__ void crf_forward_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ boxes,
                                   const bool* __restrict__ flips, typename OutType<scalar_t>::type* __restrict__ out,
                                   int64_t total, int64_t c, int64_t h_img, int64_t w_img, int64_t oh, int64_t ow,
                                   int64_t sN, int64_t sC, int64_t sH, int64_t sW) {
  using acc_t = typename OpMath<scalar_t>::type;
  using out_t = typename OutType<scalar_t>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ox = e % ow;
    const int64_t oy = (e / ow) % oh;
    const int64_t p = e / (ow * oh);
    const int64_t k = p / c, ch = p % c;
    int64_t bi, bj, bh, bw;
    load_box(boxes, k, h_img, w_img, bi, bj, bh, bw);
    const int64_t sx = flips[k] ? ow - 1 - ox : ox;
    int64_t y0, y1, x0, x1;
    acc_t wy0, wy1, wx0, wx1;
    tap<acc_t>(oy, bi, bh, oh, y0, y1, wy0, wy1);
    tap<acc_t>(sx, bj, bw, ow, x0, x1, wx0, wx1);
    const scalar_t* base = x + k * sN + ch * sC;
    const scalar_t* r0 = base + y0 * sH;
    const scalar_t* r1 = base + y1 * sH;
    const acc_t top = static_cast<acc_t>(r0[x0 * sW]) * wx0 + static_cast<acc_t>(r0[x1 * sW]) * wx1;
    const acc_t bot = static_cast<acc_t>(r1[x0 * sW]) * wx0 + static_cast<acc_t>(r1[x1 * sW]) * wx1;
    out[e] = static_cast<out_t>(top * wy0 + bot * wy1);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void crf_backward_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ boxes,
                                    const bool* __restrict__ flips, acc_t* __restrict__ gx, int64_t total, int64_t c,
                                    int64_t h_img, int64_t w_img, int64_t oh, int64_t ow) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t ox = e % ow;
    const int64_t oy = (e / ow) % oh;
    const int64_t p = e / (ow * oh);
    const int64_t k = p / c;
    int64_t bi, bj, bh, bw;
    load_box(boxes, k, h_img, w_img, bi, bj, bh, bw);
    const int64_t sx = flips[k] ? ow - 1 - ox : ox;
    int64_t y0, y1, x0, x1;
    acc_t wy0, wy1, wx0, wx1;
    tap<acc_t>(oy, bi, bh, oh, y0, y1, wy0, wy1);
    tap<acc_t>(sx, bj, bw, ow, x0, x1, wx0, wx1);
    const acc_t v = static_cast<acc_t>(g[e]);
    acc_t* plane = gx + p * h_img * w_img;
    atomicAdd(plane + y0 * w_img + x0, (wy0 * wx0) * v);
    atomicAdd(plane + y0 * w_img + x1, (wy0 * wx1) * v);
    atomicAdd(plane + y1 * w_img + x0, (wy1 * wx0) * v);
    atomicAdd(plane + y1 * w_img + x1, (wy1 * wx1) * v);
  }
}

constexpr int kThreads = 256;

inline int grid_for(int64_t total) {
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride loop covers the rest
}

// int64 boxes are pixel boxes already; float32/float64 boxes are the normalised ones of the Python API.
at::Tensor pixel_boxes_cuda(const at::Tensor& boxes, int64_t h_img, int64_t w_img) {
  if (boxes.scalar_type() == at::kLong) return boxes.contiguous();
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4, "crop_resize_flip: boxes must be [N, 4], got ", boxes.sizes());
  TORCH_CHECK(boxes.is_cuda(), "crop_resize_flip: all tensors must be on the same CUDA device");
  TORCH_CHECK_TYPE(boxes.scalar_type() == at::kFloat || boxes.scalar_type() == at::kDouble,
                   "crop_resize_flip: boxes must be int64 pixel boxes or float32/float64 normalised boxes, got ",
                   boxes.scalar_type());
  c10::cuda::CUDAGuard guard(boxes.device());
  const at::Tensor b = boxes.contiguous();
  const int64_t n = b.size(0);
  at::Tensor pix = at::empty({n, 4}, b.options().dtype(at::kLong));
  if (n == 0) return pix;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(b.scalar_type(), "pixel_boxes_cuda", [&] {
    pixel_boxes_kernel<scalar_t><<<static_cast<int>((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        b.const_data_ptr<scalar_t>(), pix.data_ptr<int64_t>(), n, h_img, w_img);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return pix;
}

void check_args(const at::Tensor& t, const char* tname, const at::Tensor& boxes, const at::Tensor& flips) {
  lpqld::check_crop_resize_flip_args(t, tname, boxes, flips);
  TORCH_CHECK(t.is_cuda() && boxes.device() == t.device() && flips.device() == t.device(),
              "crop_resize_flip: all tensors must be on the same CUDA device");
}

at::Tensor crop_resize_flip_cuda(const at::Tensor& x, const at::Tensor& boxes_in, const at::Tensor& flips_in,
                                 int64_t out_h, int64_t out_w) {
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "crop_resize_flip: out_h and out_w must be positive, got ", out_h, ", ",
              out_w);
  TORCH_CHECK(x.dim() == 4, "crop_resize_flip: x must be [N, C, H, W], got ", x.sizes());
  const at::Tensor boxes = pixel_boxes_cuda(boxes_in, x.size(2), x.size(3));
  check_args(x, "x", boxes, flips_in);
  TORCH_CHECK(x.size(2) >= 1 && x.size(3) >= 1, "crop_resize_flip: x must have a non-empty image");
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16 || st == at::kByte,
              "crop_resize_flip: x must be float16/bfloat16/float32/float64 or uint8, got ", st);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor flips = flips_in.contiguous();
  const auto out_dtype = st == at::kByte ? at::kFloat : st;
  at::Tensor out = at::empty({x.size(0), x.size(1), out_h, out_w}, x.options().dtype(out_dtype));
  const int64_t total = out.numel();
  if (total == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, st, "crop_resize_flip_cuda", [&] {
    using out_t = typename OutType<scalar_t>::type;
    crf_forward_kernel<scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), boxes.const_data_ptr<int64_t>(), flips.const_data_ptr<bool>(),
        out.data_ptr<out_t>(), total, x.size(1), x.size(2), x.size(3), out_h, out_w, x.stride(0), x.stride(1),
        x.stride(2), x.stride(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor crop_resize_flip_backward_cuda(const at::Tensor& grad_out, const at::Tensor& boxes_in,
                                          const at::Tensor& flips_in, int64_t in_h, int64_t in_w) {
  TORCH_CHECK(in_h >= 1 && in_w >= 1, "crop_resize_flip_backward: image size must be positive, got ", in_h, "x",
              in_w);
  const at::Tensor boxes = pixel_boxes_cuda(boxes_in, in_h, in_w);
  check_args(grad_out, "grad_out", boxes, flips_in);
  const auto st = grad_out.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "crop_resize_flip_backward: grad_out must be floating point, got ", st);
  c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor flips = flips_in.contiguous();
  const at::Tensor g = grad_out.contiguous();
  const auto acc_dtype = st == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor acc = at::zeros({g.size(0), g.size(1), in_h, in_w}, g.options().dtype(acc_dtype));
  const int64_t total = g.numel();
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "crop_resize_flip_backward_cuda", [&] {
      using acc_t = typename OpMath<scalar_t>::type;
      crf_backward_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), boxes.const_data_ptr<int64_t>(), flips.const_data_ptr<bool>(),
          acc.data_ptr<acc_t>(), total, g.size(1), in_h, in_w, g.size(2), g.size(3));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return acc.scalar_type() == st ? acc : acc.to(st);
}

}  // namespace

TORCH_LIBRARY_IMPL(lpqld, CUDA, m) {
  m.impl("crop_resize_flip", &crop_resize_flip_cuda);
  m.impl("crop_resize_flip_backward", &crop_resize_flip_backward_cuda);
}
