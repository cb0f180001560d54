// exp in float for the SIMD row kernels: a branch-free polynomial exp for scalars and GCC vectors
// (AVX-512: vscalefps), and the more accurate scalar exp_acc of the per-block factors. CPU only.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/simd_float.h"

namespace lpqld::slkl_cpu {

// exp(x) in float, branch-free: n = round(x log2 e), r = x - n ln2 (two-constant
// split; n * kLn2Hi is exact), exp(r) by a degree-5 polynomial on |r| <= ln2 / 2
// (kExpC*, below; 1.7e-7 relative), times 2^n built in the exponent
// bits. Results below exp(-87) flush to 0; NaN propagates. Written once for a
// scalar or a GCC vector type V (F: its float element or vector type).
constexpr float kExpHi = 88.0f, kExpLo = -87.0f;
// The vector exps (one per logit, the bulk of a row) use a degree-5 polynomial with p(0) = 1,
// fitted to exp on |r| <= ln2 / 2 for least relative error (weighted least squares, our own
// fit): max relative error 1.7e-7 evaluated in float, against 6e-8 for the degree-7 Taylor
// polynomial it replaces (the tests' gradient tolerance is 1e-4 relative), two FMAs fewer.
// The scalar exp_acc (block factors) keeps the Taylor polynomial.
constexpr float kExpC1 = 0.9999997019767761f, kExpC2 = 0.4999915063381195f, kExpC3 = 0.1666763573884964f,
                kExpC4 = 0.041897933930158615f, kExpC5 = 0.008290315978229046f;

#if defined(__GNUC__) && defined(__x86_64__)
typedef float vf16x __attribute__((vector_size(64)));
// The AVX-512 exp: the same reduction and polynomial, but n rounded by vrndscaleps and 2^n applied by
// vscalefps, which also saturates to inf for large x, so no clamps or exponent-bit arithmetic
// (12 vector ops instead of ~21). Lanes below exp(-87) are zeroed by a mask (no denormal results,
// like the portable version); NaN compares "not less than" and propagates.
inline __attribute__((target("avx512f,fma"))) vf16x exp_avx512(vf16x xv) {
  const __m512 x = (__m512)xv;
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(kExpC5);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC1));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  return (vf16x)_mm512_maskz_scalef_ps(keep, p, n);
}
#endif

template <typename V, typename U>
inline V exp_poly(V x) {
#if defined(__GNUC__) && defined(__x86_64__)
  if constexpr (sizeof(V) == 64) return exp_avx512(x);  // only the AVX-512 variant has 16-float vectors
#endif
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: t = y + kShift rounds y to an integer in t's low bits
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  V xc = x > kExpHi ? V{} + kExpHi : x;
  xc = xc < kExpLo ? V{} + kExpLo : xc;
  const V t = xc * kLog2e + kShift;
  const V n = t - kShift;
  V r = xc - n * kLn2Hi;
  r = r - n * kLn2Lo;
  V p = V{} + kExpC5;
  p = p * r + kExpC4;
  p = p * r + kExpC3;
  p = p * r + kExpC2;
  p = p * r + kExpC1;
  p = p * r + 1.0f;
  U tbits;
  std::memcpy(&tbits, &t, sizeof(tbits));
  // t's mantissa holds 0x400000 + n (n in [-126, 127]); build the float 2^n.
  const U ebits = (tbits - 0x4B400000u + 127u) << 23;
  V two_n;
  std::memcpy(&two_n, &ebits, sizeof(two_n));
  const V y = p * two_n;
  return x < kExpLo ? V{} : y;
}

LPQLD_INLINE float exp_acc(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kShift = 12582912.0f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  if (x < kExpLo) return 0.0f;
  if (!(x <= kExpHi)) return x > kExpHi ? exp_acc(kExpHi) : x;  // NaN stays NaN
  const float t = x * kLog2e + kShift;
  const float n = t - kShift;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = 1.98412698e-4f;
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t tbits;
  std::memcpy(&tbits, &t, sizeof(tbits));
  const uint32_t ebits = (tbits - 0x4B400000u + 127u) << 23;
  float two_n;
  std::memcpy(&two_n, &ebits, sizeof(two_n));
  return p * two_n;
}

LPQLD_INLINE double exp_acc(double x) { return std::exp(x); }

}  // namespace lpqld::slkl_cpu
