// CUDA kernels of lpqld::segment_bn_loss_fwd / _bwd (schemas in csrc/segment_bn_loss.cpp).
//
// Forward (one pass over x):
//   row_moments_kernel      one warp per (sample, channel) row: per-lane Welford on
//                           x - x[row, 0] (shifted, so large means do not cancel),
//                           Chan merge across the warp; row mean / M2 in float64
//   count_kernel + argsort  rows ordered by segment (ATen argsort, stable) and
//                           per-segment counts / offsets
//   segment_combine_kernel  block per (segment, 32 channels): mean_s = average of the
//                           row means, M2_s = sum M2 + L * sum (row mean - mean_s)^2
//   loss_kernel             block per segment: the two norms over C
// Backward:
//   coeff_kernel            block per segment: norms, then per channel
//                           scale, alpha and the mean split into hi + lo
//   grad_kernel             tiles of 1024 elements (ROWS x BL, BL a power of two):
//                           grad = scale * ((x - hi) - lo) + alpha
// Segment ids are validated by the Python op (lpqld_fast.ops.segment_bn_loss);
// here rows with an id outside [0, S) are ignored (not counted, zero gradient),
// so a bad id never causes an out-of-bounds access and no host sync is needed.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/op_math.h"

namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kRowThreads = 256;  // row_moments_kernel: 8 rows (warps) per block
constexpr int kTile = 1024;       // grad_kernel: elements per block
constexpr int kGradThreads = 256;

template <typename scalar_t>
using AccType = lpqld::OpMath<scalar_t>;

template <typename scalar_t, typename acc_t>
__global__ void row_moments_kernel(const scalar_t* __restrict__ x, double* __restrict__ rmean,
                                   double* __restrict__ rm2, int64_t R, int64_t L) {
  const int lane = threadIdx.x & (kWarp - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kRowThreads / kWarp) + (threadIdx.x / kWarp);
  if (row >= R) return;  // the whole warp shares the row
  const scalar_t* p = x + row * L;
  const acc_t shift = static_cast<acc_t>(p[0]);
  acc_t n = 0, mean = 0, m2 = 0;
  for (int64_t i = lane; i < L; i += kWarp) {
    const acc_t d = static_cast<acc_t>(p[i]) - shift;
    n += acc_t(1);
    const acc_t delta = d - mean;
    mean += delta / n;
    m2 += delta * (d - mean);
  }
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const acc_t nb = __shfl_down_sync(0xffffffffu, n, off);
    const acc_t mb = __shfl_down_sync(0xffffffffu, mean, off);
    const acc_t m2b = __shfl_down_sync(0xffffffffu, m2, off);
    if (nb > acc_t(0)) {
      const acc_t nt = n + nb;
      const acc_t delta = mb - mean;
      mean += delta * (nb / nt);
      m2 += m2b + delta * delta * (n * nb / nt);
      n = nt;
    }
  }
  if (lane == 0) {
    rmean[row] = static_cast<double>(shift) + static_cast<double>(mean);
    rm2[row] = static_cast<double>(m2);
  }
}

__global__ void count_kernel(const int64_t* __restrict__ seg, int64_t N, int64_t S,
                             unsigned long long* __restrict__ count) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int64_t s = seg[n];
  if (s >= 0 && s < S) atomicAdd(count + s, 1ull);
}

// grid (S, ceil(C / 32)), block (32, 8)
__global__ void segment_combine_kernel(const double* __restrict__ rmean, const double* __restrict__ rm2,
                                       const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                       double* __restrict__ mean, double* __restrict__ var, int64_t C, int64_t L) {
  __shared__ double sh[8][kWarp + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t s = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kWarp + tx;
  const int64_t lo = offsets[s], hi = offsets[s + 1];
  const double k = static_cast<double>(hi - lo);
  double acc = 0.0;
  if (c < C) {
    for (int64_t j = lo + ty; j < hi; j += 8) acc += rmean[order[j] * C + c];
  }
  sh[ty][tx] = acc;
  __syncthreads();
  double mu = 0.0;
  for (int i = 0; i < 8; ++i) mu += sh[i][tx];
  mu = k > 0.0 ? mu / k : 0.0;
  __syncthreads();
  const double dl = static_cast<double>(L);
  double acc2 = 0.0;
  if (c < C) {
    for (int64_t j = lo + ty; j < hi; j += 8) {
      const int64_t off = order[j] * C + c;
      const double d = rmean[off] - mu;
      acc2 += rm2[off] + dl * d * d;
    }
  }
  sh[ty][tx] = acc2;
  __syncthreads();
  if (ty == 0 && c < C) {
    double m2 = 0.0;
    for (int i = 0; i < 8; ++i) m2 += sh[i][tx];
    mean[s * C + c] = mu;
    var[s * C + c] = k > 0.0 ? m2 / (k * dl) : 0.0;
  }
}

// Sums a and b over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ inline void block_sum2(double& a, double& b) {
  __shared__ double sa[kWarp], sb[kWarp];
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  const int lane = threadIdx.x & (kWarp - 1), warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
  if (lane == 0) {
    sa[warp] = a;
    sb[warp] = b;
  }
  __syncthreads();
  a = 0.0;
  b = 0.0;
  for (int w = 0; w < nwarps; ++w) {
    a += sa[w];
    b += sb[w];
  }
  __syncthreads();
}

// Squared norms ||mean - tm||^2, ||var - tv||^2 of segment s (block-wide).
__device__ inline void segment_sq_norms(const double* mean, const double* var, const double* tm, const double* tv,
                                        int64_t s, int64_t C, double& sm, double& sv) {
  sm = 0.0;
  sv = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const double em = mean[s * C + c] - tm[s * C + c];
    const double ev = var[s * C + c] - tv[s * C + c];
    sm += em * em;
    sv += ev * ev;
  }
  block_sum2(sm, sv);
}

__global__ void loss_kernel(const double* __restrict__ mean, const double* __restrict__ var,
                            const double* __restrict__ tm, const double* __restrict__ tv,
                            const int64_t* __restrict__ offsets, double* __restrict__ loss, int64_t C) {
  const int64_t s = blockIdx.x;
  double sm, sv;
  segment_sq_norms(mean, var, tm, tv, s, C, sm, sv);
  if (threadIdx.x == 0) loss[s] = offsets[s + 1] > offsets[s] ? sqrt(sm) + sqrt(sv) : 0.0;
}

template <typename acc_t>
__global__ void coeff_kernel(const double* __restrict__ g, const double* __restrict__ mean,
                             const double* __restrict__ var, const double* __restrict__ tm,
                             const double* __restrict__ tv, const int64_t* __restrict__ count,
                             acc_t* __restrict__ scale, acc_t* __restrict__ alpha, acc_t* __restrict__ mhi,
                             acc_t* __restrict__ mlo, int64_t C, int64_t L) {
  const int64_t s = blockIdx.x;
  double sm, sv;
  segment_sq_norms(mean, var, tm, tv, s, C, sm, sv);
  const double nm = sqrt(sm), nv = sqrt(sv);
  const int64_t k = count[s];
  const double gs = k > 0 ? g[s] / (static_cast<double>(k) * static_cast<double>(L)) : 0.0;
  const double fa = nm > 0.0 ? gs / nm : 0.0;
  const double fb = nv > 0.0 ? 2.0 * gs / nv : 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const int64_t i = s * C + c;
    const double mu = mean[i];
    const acc_t hi = static_cast<acc_t>(mu);
    mhi[i] = hi;
    mlo[i] = static_cast<acc_t>(mu - static_cast<double>(hi));
    alpha[i] = static_cast<acc_t>(fa * (mu - tm[i]));
    scale[i] = static_cast<acc_t>(fb * (var[i] - tv[i]));
  }
}

// grid (ceil(R / rows), ceil(L / bl)); a block covers rows x bl elements, bl = 1 << log_bl, rows * bl = kTile.
template <typename scalar_t, typename acc_t>
__global__ void grad_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ gx, const int64_t* __restrict__ seg,
                            const acc_t* __restrict__ scale, const acc_t* __restrict__ alpha,
                            const acc_t* __restrict__ mhi, const acc_t* __restrict__ mlo, int64_t R, int64_t C,
                            int64_t L, int64_t S, int log_bl) {
  const int bl = 1 << log_bl;
  const int rows = kTile >> log_bl;
  __shared__ acc_t sc[kTile], al[kTile], hi[kTile], lo[kTile];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows;
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t row = row0 + r;
    acc_t a = 0, b = 0, h = 0, l = 0;
    if (row < R) {
      const int64_t n = row / C;
      const int64_t s = seg[n];
      if (s >= 0 && s < S) {
        const int64_t i = s * C + (row - n * C);
        a = scale[i];
        b = alpha[i];
        h = mhi[i];
        l = mlo[i];
      }
    }
    sc[r] = a;
    al[r] = b;
    hi[r] = h;
    lo[r] = l;
  }
  __syncthreads();
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * bl;
#pragma unroll
  for (int k = 0; k < kTile / kGradThreads; ++k) {
    const int e = threadIdx.x + k * kGradThreads;
    const int r = e >> log_bl;
    const int64_t row = row0 + r;
    const int64_t col = col0 + (e & (bl - 1));
    if (row < R && col < L) {
      const int64_t off = row * L + col;
      const acc_t v = static_cast<acc_t>(x[off]);
      gx[off] = static_cast<scalar_t>(sc[r] * ((v - hi[r]) - lo[r]) + al[r]);
    }
  }
}

using Layout = lpqld::SegmentBNLayout;

// x a contiguous CUDA [N, C, L] tensor, then the checks shared with the CPU kernel (csrc/segment_bn_loss.cpp).
Layout check_common(const Tensor& x, const Tensor& seg, const Tensor& tm, const Tensor& tv) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(),
              "segment_bn_loss: x must be a contiguous CUDA [N, C, L] tensor");
  const Layout d = lpqld::check_segment_bn_loss_args(x, seg, tm, tv);
  TORCH_CHECK(tm.size(0) < (int64_t{1} << 31), "segment_bn_loss: too many segments for one launch");
  return d;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> segment_bn_loss_fwd_cuda(const Tensor& x, const Tensor& segment_ids,
                                                                     const Tensor& target_mean,
                                                                     const Tensor& target_var) {
  const Layout d = check_common(x, segment_ids, target_mean, target_var);
  const int64_t N = d.N, C = d.C, L = d.L, S = d.S;
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f64 = x.options().dtype(at::kDouble);
  const int64_t R = N * C;
  Tensor rmean = at::empty({R}, f64);
  Tensor rm2 = at::empty({R}, f64);
  if (R > 0) {
    const int64_t blocks = (R + kRowThreads / kWarp - 1) / (kRowThreads / kWarp);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_bn_loss_fwd_cuda", [&] {
      using acc_t = typename AccType<scalar_t>::type;
      row_moments_kernel<scalar_t, acc_t><<<blocks, kRowThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), rmean.data_ptr<double>(), rm2.data_ptr<double>(), R, L);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  Tensor count = at::zeros({S}, x.options().dtype(at::kLong));
  if (N > 0) {
    auto* count_ptr = reinterpret_cast<unsigned long long*>(count.data_ptr<int64_t>());
    count_kernel<<<(N + 255) / 256, 256, 0, stream>>>(segment_ids.const_data_ptr<int64_t>(), N, S, count_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Rows with a valid id, sorted by segment, come first; invalid ids (key S) last.
  const Tensor key = at::where(segment_ids.ge(0).logical_and(segment_ids.lt(S)), segment_ids,
                               at::full({}, S, segment_ids.options()));
  const Tensor order = at::argsort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false).contiguous();
  Tensor offsets = at::zeros({S + 1}, count.options());
  offsets.slice(0, 1).copy_(at::cumsum(count, 0));

  Tensor mean = at::empty({S, C}, f64);
  Tensor var = at::empty({S, C}, f64);
  Tensor loss = at::empty({S}, f64);
  const dim3 cgrid(static_cast<unsigned>(S), static_cast<unsigned>((C + kWarp - 1) / kWarp));
  TORCH_CHECK((C + kWarp - 1) / kWarp <= 65535, "segment_bn_loss: too many channels");
  segment_combine_kernel<<<cgrid, dim3(kWarp, 8), 0, stream>>>(
      rmean.const_data_ptr<double>(), rm2.const_data_ptr<double>(), order.const_data_ptr<int64_t>(),
      offsets.const_data_ptr<int64_t>(), mean.data_ptr<double>(), var.data_ptr<double>(), C, L);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  loss_kernel<<<static_cast<unsigned>(S), 256, 0, stream>>>(
      mean.const_data_ptr<double>(), var.const_data_ptr<double>(), target_mean.const_data_ptr<double>(),
      target_var.const_data_ptr<double>(), offsets.const_data_ptr<int64_t>(), loss.data_ptr<double>(), C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, mean, var, count};
}

Tensor segment_bn_loss_bwd_cuda(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids,
                                const Tensor& target_mean, const Tensor& target_var, const Tensor& mean,
                                const Tensor& var, const Tensor& count) {
  const Layout d = check_common(x, segment_ids, target_mean, target_var);
  const int64_t N = d.N, C = d.C, L = d.L, S = d.S;
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == S && grad_loss.scalar_type() == at::kDouble &&
                  grad_loss.is_contiguous() && grad_loss.device() == x.device(),
              "segment_bn_loss_bwd: grad_loss must be a contiguous float64 [S] tensor on x's device");
  TORCH_CHECK(mean.sizes() == target_mean.sizes() && var.sizes() == target_mean.sizes() &&
                  mean.scalar_type() == at::kDouble && var.scalar_type() == at::kDouble && mean.is_contiguous() &&
                  var.is_contiguous() && mean.device() == x.device() && var.device() == x.device(),
              "segment_bn_loss_bwd: mean and var must be contiguous float64 [S, C] tensors on x's device");
  TORCH_CHECK(count.dim() == 1 && count.size(0) == S && count.scalar_type() == at::kLong && count.is_contiguous() &&
                  count.device() == x.device(),
              "segment_bn_loss_bwd: count must be a contiguous int64 [S] tensor on x's device");
  c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor grad_x = at::empty_like(x);
  const int64_t R = N * C;
  if (R == 0) return grad_x;
  int log_bl = 0;
  while ((int64_t{1} << log_bl) < L && (1 << log_bl) < kTile) ++log_bl;
  const int64_t bl = int64_t{1} << log_bl;
  const int64_t rows = kTile / bl;
  const int64_t gy = (L + bl - 1) / bl;
  TORCH_CHECK(gy <= 65535, "segment_bn_loss: spatial size too large");
  TORCH_CHECK((R + rows - 1) / rows < (int64_t{1} << 31), "segment_bn_loss: too many (sample, channel) rows");
  const dim3 ggrid(static_cast<unsigned>((R + rows - 1) / rows), static_cast<unsigned>(gy));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_bn_loss_bwd_cuda", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    Tensor scale = at::empty({S, C}, opts), alpha = at::empty({S, C}, opts);
    Tensor mhi = at::empty({S, C}, opts), mlo = at::empty({S, C}, opts);
    coeff_kernel<acc_t><<<static_cast<unsigned>(S), 256, 0, stream>>>(
        grad_loss.const_data_ptr<double>(), mean.const_data_ptr<double>(), var.const_data_ptr<double>(),
        target_mean.const_data_ptr<double>(), target_var.const_data_ptr<double>(), count.const_data_ptr<int64_t>(),
        scale.data_ptr<acc_t>(), alpha.data_ptr<acc_t>(), mhi.data_ptr<acc_t>(), mlo.data_ptr<acc_t>(), C, L);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_kernel<scalar_t, acc_t><<<ggrid, kGradThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(), segment_ids.const_data_ptr<int64_t>(),
        scale.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>(), mhi.const_data_ptr<acc_t>(),
        mlo.const_data_ptr<acc_t>(), R, C, L, S, log_bl);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(lpqld, CUDA, m) {
  m.impl("segment_bn_loss_fwd", &segment_bn_loss_fwd_cuda);
  m.impl("segment_bn_loss_bwd", &segment_bn_loss_bwd_cuda);
}
