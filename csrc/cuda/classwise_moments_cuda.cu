// CUDA kernel of lpqld::classwise_moments_accumulate_.
//
// Phase 1 (row_moments_kernel): G lanes (4..32, by row length) per (sample,
// channel) row. Every row is shifted by its first value, so the float32
// arithmetic (float64 for float64 input) works on deviations, not on a
// possibly large mean; each lane reads groups of 8 values (coalesced across
// lanes), takes the group's (mean, M2) by two passes in registers and
// Chan-merges it into its running state; lanes are Chan-merged in double by
// shuffles. x is read once; out: row mean/M2 [N*C] in double.
// Phase 2: samples are stable-sorted by label (at::sort), so each class is
// one segment of positions. Segments are cut into pieces of at most P rows
// (P ~ sqrt(N)); piece_kernel merges each piece per channel, segment_kernel
// merges the pieces of a segment per channel and then Chan-merges the batch
// moments into mean/m2 of the class (one read-modify-write per class and
// channel, no atomics, no races: different segments are different classes);
// count_kernel adds the segment sizes to count afterwards. The serial work of
// a thread is at most P + N/P merges, whatever the class distribution.
// L == 1 skips phase 1 (piece_kernel reads x directly).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/op_math.h"

namespace lpqld {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 8;  // values per lane per step in phase 1

// Running (n, mean, M2) with Chan's merge.
template <typename T>
struct Moments {
  T n, mean, m2;
  __device__ __forceinline__ void merge(T nb, T mean_b, T m2_b) {
    if (nb == T(0)) return;
    const T tot = n + nb;
    const T delta = mean_b - mean;
    const T wb = nb / tot;
    mean += delta * wb;
    m2 += m2_b + delta * delta * n * wb;
    n = tot;
  }
};

template <typename scalar_t>
using acc_t = opmath_t<scalar_t>;

// Rows are taken kRowsPerBlock at a time by the whole block so that every
// lane of a warp reaches the shuffles (rows past the end just carry n = 0).
template <typename scalar_t, int G>
__global__ void __launch_bounds__(kThreads)
    row_moments_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t length, double* __restrict__ rm,
                       double* __restrict__ rm2) {
  using T = acc_t<scalar_t>;
  constexpr int kRowsPerBlock = kThreads / G;
  const int lane = threadIdx.x % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; row0 < rows; row0 += row_step) {
    const int64_t row = row0 + threadIdx.x / G;
    const bool active = row < rows;
    const int64_t len = active ? length : 0;
    const scalar_t* __restrict__ p = x + (active ? row : 0) * length;
    const T shift = active ? static_cast<T>(p[0]) : T(0);
    Moments<T> st{T(0), T(0), T(0)};
    for (int64_t base = 0; base < len; base += static_cast<int64_t>(G) * kGroup) {
      T v[kGroup];
      int m = 0;
      T s = T(0);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const int64_t idx = base + static_cast<int64_t>(j) * G + lane;
        const bool ok = idx < len;
        v[j] = ok ? static_cast<T>(p[idx]) - shift : T(0);
        m += ok ? 1 : 0;
        s += v[j];
      }
      if (m == 0) continue;
      const T gm = s / static_cast<T>(m);
      T q = T(0);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const T d = v[j] - gm;
        q += base + static_cast<int64_t>(j) * G + lane < len ? d * d : T(0);
      }
      st.merge(static_cast<T>(m), gm, q);
    }
    Moments<double> acc{static_cast<double>(st.n), static_cast<double>(st.mean), static_cast<double>(st.m2)};
#pragma unroll
    for (int off = G / 2; off > 0; off /= 2) {
      const double nb = __shfl_xor_sync(0xffffffffu, acc.n, off, G);
      const double mb = __shfl_xor_sync(0xffffffffu, acc.mean, off, G);
      const double qb = __shfl_xor_sync(0xffffffffu, acc.m2, off, G);
      acc.merge(nb, mb, qb);
    }
    if (active && lane == 0) {
      rm[row] = static_cast<double>(shift) + acc.mean;
      rm2[row] = acc.m2 > 0.0 ? acc.m2 : 0.0;
    }
  }
}

__device__ __forceinline__ bool segment_start(const int64_t* __restrict__ sl, int64_t p) {
  return p == 0 || sl[p] != sl[p - 1];
}

// Thread (position p, channel c): if p starts a piece (a segment start or a
// multiple of P), merge the rows of the piece and store its (mean, M2) at
// [p, c]; the c == 0 thread stores the piece length in pn[p].
template <typename scalar_t, bool kDirect>
__global__ void __launch_bounds__(kThreads)
    piece_kernel(const scalar_t* __restrict__ x, const double* __restrict__ rm, const double* __restrict__ rm2,
                 const int64_t* __restrict__ sl, const int64_t* __restrict__ perm, int64_t n, int64_t channels,
                 int64_t piece, double length, double* __restrict__ pm, double* __restrict__ pm2,
                 int64_t* __restrict__ pn) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < n;
       p += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    if (!(segment_start(sl, p) || p % piece == 0)) continue;
    const int64_t k = sl[p];
    int64_t end = (p / piece + 1) * piece;
    if (end > n) end = n;
    int64_t q = p + 1;
    while (q < end && sl[q] == k) ++q;
    end = q;
    if (c == 0) pn[p] = end - p;
    if (c >= channels) continue;
    Moments<double> acc{0.0, 0.0, 0.0};
    for (q = p; q < end; ++q) {
      const int64_t idx = perm[q] * channels + c;
      if constexpr (kDirect) {
        acc.merge(1.0, static_cast<double>(x[idx]), 0.0);
      } else {
        acc.merge(length, rm[idx], rm2[idx]);
      }
    }
    pm[p * channels + c] = acc.mean;
    pm2[p * channels + c] = acc.m2;
  }
}

// Thread (position p, channel c): if p starts a segment (class k), merge its
// pieces and then merge the batch moments into mean/m2[k, c].
__global__ void __launch_bounds__(kThreads)
    segment_kernel(const int64_t* __restrict__ sl, const int64_t* __restrict__ pn, const double* __restrict__ pm,
                   const double* __restrict__ pm2, int64_t n, int64_t channels, int64_t num_classes, double length,
                   const double* __restrict__ count, double* __restrict__ mean, double* __restrict__ m2) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  for (int64_t p = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; p < n;
       p += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    if (!segment_start(sl, p)) continue;
    const int64_t k = sl[p];
    if (k < 0 || k >= num_classes) continue;  // validated by the caller; never write out of bounds
    Moments<double> acc{0.0, 0.0, 0.0};
    for (int64_t q = p; q < n && sl[q] == k; q += pn[q]) {
      acc.merge(static_cast<double>(pn[q]) * length, pm[q * channels + c], pm2[q * channels + c]);
    }
    const int64_t s = k * channels + c;
    Moments<double> state{count[k], mean[s], m2[s]};
    state.merge(acc.n, acc.mean, acc.m2);
    mean[s] = state.mean;
    m2[s] = state.m2;
  }
}

__global__ void count_kernel(const int64_t* __restrict__ sl, const int64_t* __restrict__ pn, int64_t n,
                             int64_t num_classes, double length, double* __restrict__ count) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!segment_start(sl, p)) continue;
    const int64_t k = sl[p];
    if (k < 0 || k >= num_classes) continue;
    int64_t rows = 0;
    for (int64_t q = p; q < n && sl[q] == k; q += pn[q]) rows += pn[q];
    count[k] += static_cast<double>(rows) * length;
  }
}

int64_t blocks_for(int64_t work, int64_t per_block, int64_t cap) {
  const int64_t b = (work + per_block - 1) / per_block;
  return b < 1 ? 1 : (b > cap ? cap : b);
}

template <typename scalar_t>
void launch_row_moments(const scalar_t* x, int64_t rows, int64_t length, double* rm, double* rm2,
                        cudaStream_t stream) {
  const int64_t cap = 1 << 20;
  if (length <= 4 * kGroup) {
    row_moments_kernel<scalar_t, 4>
        <<<blocks_for(rows, kThreads / 4, cap), kThreads, 0, stream>>>(x, rows, length, rm, rm2);
  } else if (length <= 8 * kGroup) {
    row_moments_kernel<scalar_t, 8>
        <<<blocks_for(rows, kThreads / 8, cap), kThreads, 0, stream>>>(x, rows, length, rm, rm2);
  } else if (length <= 16 * kGroup) {
    row_moments_kernel<scalar_t, 16>
        <<<blocks_for(rows, kThreads / 16, cap), kThreads, 0, stream>>>(x, rows, length, rm, rm2);
  } else {
    row_moments_kernel<scalar_t, 32>
        <<<blocks_for(rows, kThreads / 32, cap), kThreads, 0, stream>>>(x, rows, length, rm, rm2);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void classwise_moments_accumulate_cuda(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& count,
                                       const at::Tensor& mean, const at::Tensor& m2) {
  check_classwise_moments_args(x, labels, count, mean, m2);
  TORCH_CHECK_VALUE(x.is_cuda(), "classwise_moments_accumulate_ (CUDA): x must be a CUDA tensor, got ", x.device());
  const int64_t n = x.size(0), channels = x.size(1), length = x.size(2), num_classes = count.size(0);
  if (n == 0 || length == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const auto sorted = at::sort(labels, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sl = std::get<0>(sorted).contiguous();
  const at::Tensor perm = std::get<1>(sorted).contiguous();
  const int64_t* slp = sl.const_data_ptr<int64_t>();
  const int64_t* permp = perm.const_data_ptr<int64_t>();
  at::Tensor pn = at::empty({n}, labels.options());
  const int64_t piece = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(n)))));
  const double len_d = static_cast<double>(length);

  if (channels > 0) {
    const auto dopts = x.options().dtype(at::kDouble);
    at::Tensor pm = at::empty({n, channels}, dopts);
    at::Tensor pm2 = at::empty({n, channels}, dopts);
    const dim3 block(32, kThreads / 32);
    const dim3 grid(static_cast<unsigned>((channels + 31) / 32),
                    static_cast<unsigned>(blocks_for(n, kThreads / 32, 65535)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "classwise_moments_accumulate_cuda", [&] {
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      if (length == 1) {
        piece_kernel<scalar_t, true><<<grid, block, 0, stream>>>(xp, nullptr, nullptr, slp, permp, n, channels, piece,
                                                                 len_d, pm.mutable_data_ptr<double>(),
                                                                 pm2.mutable_data_ptr<double>(),
                                                                 pn.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor rm = at::empty({n, channels}, dopts);
        at::Tensor rm2 = at::empty({n, channels}, dopts);
        launch_row_moments<scalar_t>(xp, n * channels, length, rm.mutable_data_ptr<double>(),
                                     rm2.mutable_data_ptr<double>(), stream);
        piece_kernel<scalar_t, false><<<grid, block, 0, stream>>>(
            xp, rm.const_data_ptr<double>(), rm2.const_data_ptr<double>(), slp, permp, n, channels, piece, len_d,
            pm.mutable_data_ptr<double>(), pm2.mutable_data_ptr<double>(), pn.mutable_data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
    segment_kernel<<<grid, block, 0, stream>>>(slp, pn.const_data_ptr<int64_t>(), pm.const_data_ptr<double>(),
                                               pm2.const_data_ptr<double>(), n, channels, num_classes, len_d,
                                               count.const_data_ptr<double>(), mean.mutable_data_ptr<double>(),
                                               m2.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // No channels: only the counts move; every position is its own piece.
    pn.fill_(1);
  }
  count_kernel<<<blocks_for(n, kThreads, 65535), kThreads, 0, stream>>>(slp, pn.const_data_ptr<int64_t>(), n,
                                                                         num_classes, len_d,
                                                                         count.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace lpqld

TORCH_LIBRARY_IMPL(lpqld, CUDA, m) {
  m.impl("classwise_moments_accumulate_", &lpqld::classwise_moments_accumulate_cuda);
}
