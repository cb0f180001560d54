// GCC vector types of float / double and the helpers the SIMD row kernels share: whole and partial
// loads / stores and horizontal max / sum. CPU only (x86 intrinsics); included by the soft-label KL
// kernels, whose per-ISA variants instantiate these templates with their own vector width.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
// GCC 12's own AVX-512 headers trip this warning (their __Y = __Y idiom), not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define LPQLD_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only live inside always-inline code

namespace lpqld::slkl_cpu {

// GCC vector types of the target's register width (4 lanes SSE2, 8 AVX2,
// 16 AVX-512); each ISA variant (soft_label_kl_variants.cpp) instantiates these templates with its
// own width. (at::vec is not used: outside ATen's per-capability builds it
// compiles to its scalar fallback.)
typedef float vf4 __attribute__((vector_size(16)));
typedef uint32_t vu4 __attribute__((vector_size(16)));
typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef float vf16 __attribute__((vector_size(64)));
typedef uint32_t vu16 __attribute__((vector_size(64)));
constexpr int64_t kBlock = 512;  // columns per online-softmax block (a block stays in L1)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <typename V>
constexpr int64_t lanes() {
  return static_cast<int64_t>(sizeof(V) / sizeof(float));
}
template <typename V>
LPQLD_INLINE V vload(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
LPQLD_INLINE void vstore(float* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V>
LPQLD_INLINE V lane_ids() {  // {0, 1, 2, ...}
  alignas(64) static constexpr float kIds[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return vload<V>(kIds);
}
// Partial loads/stores of the first n < lanes elements. They run a few times per row (row and block
// tails, the k stored values), so for small C they are a large part of a row: AVX-512 and AVX2 use
// masked loads/stores (no element loop through a stack buffer, no memcpy call); the baseline build keeps
// the buffer.
#if defined(__GNUC__) && defined(__x86_64__)
inline __attribute__((target("avx512f"))) vf16 load_pad_avx512(const float* p, int64_t n, float pad) {
  return (vf16)_mm512_mask_loadu_ps(_mm512_set1_ps(pad), static_cast<__mmask16>((1u << n) - 1u), p);
}
inline __attribute__((target("avx512f"))) void store_part_avx512(float* p, vf16 v, int64_t n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1u), (__m512)v);
}
inline __attribute__((target("avx2"))) __m256i lane_mask_avx2(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __attribute__((target("avx2"))) vf8 load_pad_avx2(const float* p, int64_t n, float pad) {
  const __m256i m = lane_mask_avx2(n);
  return (vf8)_mm256_blendv_ps(_mm256_set1_ps(pad), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
inline __attribute__((target("avx2"))) void store_part_avx2(float* p, vf8 v, int64_t n) {
  _mm256_maskstore_ps(p, lane_mask_avx2(n), (__m256)v);
}
#endif
template <typename V>
LPQLD_INLINE V vload_pad(const float* p, int64_t n, float pad) {  // n < lanes valid elements
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (sizeof(V) == 64) return load_pad_avx512(p, n, pad);
  if constexpr (sizeof(V) == 32) return load_pad_avx2(p, n, pad);
#endif
  alignas(64) float buf[16];
  for (int64_t i = 0; i < lanes<V>(); ++i) buf[i] = i < n ? p[i] : pad;
  return vload<V>(buf);
}
template <typename V>
LPQLD_INLINE void vstore_part(float* p, V v, int64_t n) {  // the first n < lanes elements
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (sizeof(V) == 64) return store_part_avx512(p, v, n);
  if constexpr (sizeof(V) == 32) return store_part_avx2(p, v, n);
#endif
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}
// Horizontal max / sum as trees in registers (halving the vector; the same pairing as
// b[i] op b[i + w] for w = lanes / 2, ..., 1). These run a few times per row, which
// matters for small C. The sum is taken in double.
typedef float vf2 __attribute__((vector_size(8)));
typedef double vd2 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));
typedef double vd8 __attribute__((vector_size(64)));
template <typename H, typename W>
LPQLD_INLINE void split_halves(const W& w, H& lo, H& hi) {
  static_assert(2 * sizeof(H) == sizeof(W));
  std::memcpy(&lo, &w, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const char*>(&w) + sizeof(H), sizeof(H));
}
template <typename V>
LPQLD_INLINE float hmax(V v) {
  if constexpr (sizeof(V) == 64) {
    vf8 lo, hi;
    split_halves(v, lo, hi);
    return hmax(hi > lo ? hi : lo);
  } else if constexpr (sizeof(V) == 32) {
    vf4 lo, hi;
    split_halves(v, lo, hi);
    return hmax(hi > lo ? hi : lo);
  } else {
    const float a = v[2] > v[0] ? v[2] : v[0];
    const float b = v[3] > v[1] ? v[3] : v[1];
    return b > a ? b : a;
  }
}
template <typename D>  // double vectors of 2, 4 or 8 lanes
LPQLD_INLINE double hsum_d(D d) {
  if constexpr (sizeof(D) == 64) {
    vd4 lo, hi;
    split_halves(d, lo, hi);
    return hsum_d(lo + hi);
  } else if constexpr (sizeof(D) == 32) {
    vd2 lo, hi;
    split_halves(d, lo, hi);
    return hsum_d(lo + hi);
  } else {
    return d[0] + d[1];
  }
}
template <typename V>
LPQLD_INLINE double hsum(V v) {
  if constexpr (sizeof(V) == 64) {
    vf8 lo, hi;
    split_halves(v, lo, hi);
    return hsum_d(__builtin_convertvector(lo, vd8) + __builtin_convertvector(hi, vd8));
  } else if constexpr (sizeof(V) == 32) {
    vf4 lo, hi;
    split_halves(v, lo, hi);
    return hsum_d(__builtin_convertvector(lo, vd4) + __builtin_convertvector(hi, vd4));
  } else {
    vf2 lo, hi;
    split_halves(v, lo, hi);
    return hsum_d(__builtin_convertvector(lo, vd2) + __builtin_convertvector(hi, vd2));
  }
}

template <typename VD>
LPQLD_INLINE VD vload_d(const double* p) {
  VD v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

}  // namespace lpqld::slkl_cpu
