// CUDA kernel of the fused soft-label KL loss (schema in csrc/soft_label_kl.cpp).
//
// One block per row. Each thread keeps an online (max, sum-exp) pair over its
// strided columns; pairs merge with warp shuffles and a shared-memory step.
// Then: decode statistics over the k stored entries (block reductions), one
// pass writing grad_j = coef * (S * q_j - p_bg), a barrier, and the k fix-ups
// grad[idx_i] = coef * (S * q_i - p_i) with the loss terms (background terms
// in closed form, as in the CPU kernel). No dense teacher is materialised.
// Values are read through a dtype code (float/half/bf16/double/int8 with
// per-row scale and offset) and indices likewise (int64/int32/int16/uint8),
// so only the logits' dtype is a template parameter.
// Index range, duplicates and finiteness are validated in Python; an index
// outside [0, C) is skipped here rather than written out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "common/label_modes.h"
#include "common/op_math.h"

namespace lpqld::slkl_cuda {

enum ValueCode : int { kVFloat = 0, kVHalf = 1, kVBFloat16 = 2, kVDouble = 3, kVInt8 = 4 };
enum IndexCode : int { kILong = 0, kIInt = 1, kIShort = 2, kIByte = 3 };

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T dev_exp(T x);
template <>
__device__ __forceinline__ float dev_exp<float>(float x) {
  return expf(x);
}
template <>
__device__ __forceinline__ double dev_exp<double>(double x) {
  return exp(x);
}
template <typename T>
__device__ __forceinline__ T dev_log(T x);
template <>
__device__ __forceinline__ float dev_log<float>(float x) {
  return logf(x);
}
template <>
__device__ __forceinline__ double dev_log<double>(double x) {
  return log(x);
}

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename acc_t>
__device__ __forceinline__ acc_t load_value(const void* row, int64_t i, int code, float scale, float offset) {
  switch (code) {
    case kVFloat: return static_cast<acc_t>(static_cast<const float*>(row)[i]);
    case kVHalf: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(row)[i]));
    case kVBFloat16: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(row)[i]));
    case kVDouble: return static_cast<acc_t>(static_cast<const double*>(row)[i]);
    default: return static_cast<acc_t>(static_cast<float>(static_cast<const int8_t*>(row)[i]) * scale + offset);
  }
}

__device__ __forceinline__ int64_t load_index(const void* row, int64_t i, int code) {
  switch (code) {
    case kILong: return static_cast<const int64_t*>(row)[i];
    case kIInt: return static_cast<const int32_t*>(row)[i];
    case kIShort: return static_cast<const int16_t*>(row)[i];
    default: return static_cast<const uint8_t*>(row)[i];
  }
}

// Merge online softmax pairs (m, s) of x * inv: s relative to exp(m * inv).
template <typename T>
__device__ __forceinline__ void merge_pair(T& m, T& s, T m2, T s2, T inv) {
  const T mn = fmax(m, m2);
  if (mn == neg_inf<T>()) return;  // both empty
  const T a = (m == neg_inf<T>()) ? T(0) : s * dev_exp<T>((m - mn) * inv);
  const T b = (m2 == neg_inf<T>()) ? T(0) : s2 * dev_exp<T>((m2 - mn) * inv);
  m = mn;
  s = a + b;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide reductions; every thread gets the result. sh holds >= 32 values.
template <typename T>
__device__ T block_sum(T v, T* sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = (threadIdx.x < nwarps) ? sh[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  const T r = sh[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ T block_max(T v, T* sh) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = (blockDim.x + kWarp - 1) / kWarp;
  v = warp_max(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = (threadIdx.x < nwarps) ? sh[threadIdx.x] : neg_inf<T>();
  if (warp == 0) v = warp_max(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  const T r = sh[0];
  __syncthreads();
  return r;
}

template <typename T>
__device__ void block_online(T& m, T& s, T inv, T* shm, T* shs) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = (blockDim.x + kWarp - 1) / kWarp;
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, o);
    merge_pair(m, s, m2, s2, inv);
  }
  if (lane == 0) {
    shm[warp] = m;
    shs[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = (lane < nwarps) ? shm[lane] : neg_inf<T>();
    s = (lane < nwarps) ? shs[lane] : T(0);
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const T m2 = __shfl_xor_sync(0xffffffffu, m, o);
      const T s2 = __shfl_xor_sync(0xffffffffu, s, o);
      merge_pair(m, s, m2, s2, inv);
    }
    if (lane == 0) {
      shm[0] = m;
      shs[0] = s;
    }
  }
  __syncthreads();
  m = shm[0];
  s = shs[0];
  __syncthreads();
}

struct Params {
  const void* values;
  int64_t values_row;  // elements per values row
  int vcode;
  const void* indices;
  int64_t indices_row;
  int icode;
  const float* fill;
  const float* scale;
  const float* offset;
  int64_t C, K, lstride;
  int mode;
  double inv_s, inv_t, coef, grad_scale;
};

template <typename scalar_t, typename acc_t>
__global__ void soft_label_kl_fwd_kernel(const scalar_t* __restrict__ logits, scalar_t* __restrict__ grad,
                                         acc_t* __restrict__ loss_rows, Params P) {
  __shared__ acc_t sh_a[kWarp];
  __shared__ acc_t sh_b[kWarp];
  const int64_t row = blockIdx.x;
  const int64_t C = P.C, K = P.K;
  const scalar_t* z = logits + row * P.lstride;
  scalar_t* g = grad + row * C;
  const acc_t inv_s = static_cast<acc_t>(P.inv_s), inv_t = static_cast<acc_t>(P.inv_t);
  const acc_t coef = static_cast<acc_t>(P.coef);
  const float qs = P.scale ? P.scale[row] : 1.0f;
  const float qo = P.offset ? P.offset[row] : 0.0f;
  const char* vrow = static_cast<const char*>(P.values);
  const int64_t vbytes = P.vcode == kVFloat ? 4 : P.vcode == kVDouble ? 8 : P.vcode == kVInt8 ? 1 : 2;
  const void* v = vrow + row * P.values_row * vbytes;

  // student statistics: online max / sum-exp of z / t_s
  acc_t zm = neg_inf<acc_t>(), zs = 0;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const acc_t x = static_cast<acc_t>(z[j]);
    if (x > zm) {
      zs = (zm == neg_inf<acc_t>() ? acc_t(0) : zs * dev_exp<acc_t>((zm - x) * inv_s)) + acc_t(1);
      zm = x;
    } else {
      zs += dev_exp<acc_t>((x - zm) * inv_s);
    }
  }
  block_online(zm, zs, inv_s, sh_a, sh_b);
  const acc_t log_zs = dev_log<acc_t>(zs);
  acc_t loss = 0;

  if (P.mode == kDense) {
    acc_t um = neg_inf<acc_t>(), us = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t x = load_value<acc_t>(v, j, P.vcode, qs, qo);
      if (x > um) {
        us = (um == neg_inf<acc_t>() ? acc_t(0) : us * dev_exp<acc_t>((um - x) * inv_t)) + acc_t(1);
        um = x;
      } else {
        us += dev_exp<acc_t>((x - um) * inv_t);
      }
    }
    block_online(um, us, inv_t, sh_a, sh_b);
    const acc_t log_zt = dev_log<acc_t>(us);
    const acc_t inv_zs = acc_t(1) / zs, inv_zt = acc_t(1) / us;
    acc_t part = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t dz = (static_cast<acc_t>(z[j]) - zm) * inv_s;
      const acc_t du = (load_value<acc_t>(v, j, P.vcode, qs, qo) - um) * inv_t;
      const acc_t q = dev_exp<acc_t>(dz) * inv_zs;
      const acc_t p = dev_exp<acc_t>(du) * inv_zt;
      g[j] = static_cast<scalar_t>(coef * (q - p));
      if (p > acc_t(0)) part += p * ((du - log_zt) - (dz - log_zs));
    }
    loss = block_sum(part, sh_a);
  } else {
    const acc_t rest = static_cast<acc_t>(C - K);
    const int64_t ibytes = P.icode == kILong ? 8 : P.icode == kIInt ? 4 : P.icode == kIShort ? 2 : 1;
    const void* irow = static_cast<const char*>(P.indices) + row * P.indices_row * ibytes;
    acc_t tm = 0, log_zt = 0, p_bg = 0, logp_bg = 0, S = 0;
    // 1. decode statistics over the k stored entries
    if (P.mode == kMR || P.mode == kMRS) {
      acc_t part = neg_inf<acc_t>();
      for (int64_t i = threadIdx.x; i < K; i += blockDim.x)
        part = fmax(part, load_value<acc_t>(v, i, P.vcode, qs, qo) * inv_t);
      tm = block_max(part, sh_a);
      const acc_t uf = P.mode == kMRS ? static_cast<acc_t>(P.fill[row]) * inv_t : acc_t(0);
      const bool has_bg = P.mode == kMRS && C > K;
      if (has_bg) tm = fmax(tm, uf);
      acc_t zpart = 0;
      for (int64_t i = threadIdx.x; i < K; i += blockDim.x)
        zpart += dev_exp<acc_t>(load_value<acc_t>(v, i, P.vcode, qs, qo) * inv_t - tm);
      acc_t zt = block_sum(zpart, sh_a);
      if (has_bg) zt += rest * dev_exp<acc_t>(uf - tm);
      log_zt = dev_log<acc_t>(zt);
      if (has_bg) {
        logp_bg = uf - tm - log_zt;
        p_bg = dev_exp<acc_t>(logp_bg);
      }
      S = 1;
    } else {
      acc_t part = 0;
      for (int64_t i = threadIdx.x; i < K; i += blockDim.x)
        part += fmax(load_value<acc_t>(v, i, P.vcode, qs, qo), acc_t(0));
      const acc_t stored = block_sum(part, sh_a);
      if (P.mode == kMS && C > K) {
        p_bg = fmax(acc_t(1) - stored, acc_t(0)) / rest;
        logp_bg = p_bg > acc_t(0) ? dev_log<acc_t>(p_bg) : acc_t(0);
      }
      S = stored + rest * p_bg;
    }
    // 2./3. gradient pass over all C columns
    const acc_t qscale = coef * S / zs, bg = coef * p_bg;
    acc_t dpart = 0;
    for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
      const acc_t d = static_cast<acc_t>(z[j]) - zm;
      g[j] = static_cast<scalar_t>(qscale * dev_exp<acc_t>(d * inv_s) - bg);
      dpart += d;
    }
    const acc_t dsum = block_sum(dpart, sh_a);  // its barriers also order the writes above before the fix-ups
    // 4. stored entries
    acc_t lpart = 0, lqpart = 0;
    for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
      const int64_t j = load_index(irow, i, P.icode);
      if (j < 0 || j >= C) continue;
      const acc_t val = load_value<acc_t>(v, i, P.vcode, qs, qo);
      acc_t p, lp;
      if (P.mode == kMR || P.mode == kMRS) {
        lp = val * inv_t - tm - log_zt;
        p = dev_exp<acc_t>(lp);
      } else {
        p = fmax(val, acc_t(0));
        lp = p > acc_t(0) ? dev_log<acc_t>(p) : acc_t(0);
      }
      const acc_t lq = (static_cast<acc_t>(z[j]) - zm) * inv_s - log_zs;
      g[j] = static_cast<scalar_t>(coef * (S * dev_exp<acc_t>(lq) - p));
      if (p > acc_t(0)) lpart += p * (lp - lq);
      lqpart += lq;
    }
    loss = block_sum(lpart, sh_a);
    const acc_t sum_lq = block_sum(lqpart, sh_b);
    if (p_bg > acc_t(0)) {
      const acc_t all_lq = inv_s * dsum - static_cast<acc_t>(C) * log_zs;
      loss += rest * p_bg * logp_bg - p_bg * (all_lq - sum_lq);
    }
  }
  if (threadIdx.x == 0) loss_rows[row] = static_cast<acc_t>(P.grad_scale) * loss;
}

int value_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kVFloat;
    case at::kHalf: return kVHalf;
    case at::kBFloat16: return kVBFloat16;
    case at::kDouble: return kVDouble;
    default: return kVInt8;
  }
}

int index_code(at::ScalarType t) {
  switch (t) {
    case at::kLong: return kILong;
    case at::kInt: return kIInt;
    case at::kShort: return kIShort;
    default: return kIByte;
  }
}

std::tuple<at::Tensor, at::Tensor> soft_label_kl_fwd_cuda(const at::Tensor& logits_in, const at::Tensor& values_in,
                                                          const std::optional<at::Tensor>& indices_in,
                                                          const std::optional<at::Tensor>& fill_in,
                                                          const std::optional<at::Tensor>& scale_in,
                                                          const std::optional<at::Tensor>& offset_in, int64_t mode,
                                                          double T, double t_s, double grad_scale) {
  soft_label_kl_check_args(logits_in, values_in, indices_in, fill_in, scale_in, offset_in, mode, T, t_s);
  TORCH_CHECK(logits_in.is_cuda(), "soft_label_kl_fwd (CUDA): logits must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor indices, fill, scale, offset;
  if (indices_in.has_value()) indices = indices_in->contiguous();
  if (fill_in.has_value()) fill = fill_in->contiguous();
  if (scale_in.has_value()) scale = scale_in->contiguous();
  if (offset_in.has_value()) offset = offset_in->contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss_rows = at::zeros({B}, logits.options().dtype(acc_dtype));
  at::Tensor grad = at::empty({B, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return {loss_rows, grad};
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "soft_label_kl_fwd (CUDA): too many rows");

  Params P;
  P.values = values.const_data_ptr();
  P.values_row = values.size(1);
  P.vcode = value_code(values.scalar_type());
  P.indices = indices.defined() ? indices.const_data_ptr() : nullptr;
  P.indices_row = indices.defined() ? indices.size(1) : 0;
  P.icode = indices.defined() ? index_code(indices.scalar_type()) : kILong;
  P.fill = fill.defined() ? fill.const_data_ptr<float>() : nullptr;
  P.scale = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  P.offset = offset.defined() ? offset.const_data_ptr<float>() : nullptr;
  P.C = C;
  P.K = values.size(1);
  P.lstride = logits.stride(0);
  P.mode = static_cast<int>(mode);
  P.inv_s = 1.0 / t_s;
  P.inv_t = 1.0 / T;
  P.coef = grad_scale / (static_cast<double>(B) * t_s);
  P.grad_scale = grad_scale;

  // ~8 columns per thread, 32..1024 threads.
  int threads = kWarp;
  while (threads < 1024 && static_cast<int64_t>(threads) * 8 < C) threads *= 2;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_label_kl_fwd_cuda", [&] {
    using acc_t = lpqld::opmath_t<scalar_t>;
    soft_label_kl_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B), threads, 0, stream.stream()>>>(
        logits.const_data_ptr<scalar_t>(), grad.mutable_data_ptr<scalar_t>(), loss_rows.mutable_data_ptr<acc_t>(), P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss_rows, grad};
}

}  // namespace lpqld::slkl_cuda

TORCH_LIBRARY_IMPL(lpqld, CUDA, m) { m.impl("soft_label_kl_fwd", &lpqld::slkl_cuda::soft_label_kl_fwd_cuda); }
