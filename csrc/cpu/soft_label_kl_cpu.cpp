// CPU kernel of the fused soft-label KL loss (schema in csrc/soft_label_kl.cpp).
//
// Rows run in parallel (at::parallel_for). Per row b, with z the student
// logits, s = t_s and a top-k mode:
//   1. decode the k stored entries (type switch once per row; fp16 and int8
//      dequantised in SIMD; teacher softmax over k with one vector exp pass, or
//      the marginal-smoothing mass) -> p_i, log p_i, background p_bg, S = sum p
//   2. one pass over z, in blocks of kBlock columns that stay in L1: block max
//      m_b, e_j = exp((z_j - m_b) / s) written into grad, sums of e_j and of
//      (z_j - m_b) per block. One exp per logit; the blocks are put on the row
//      max m afterwards by one factor each.
//   3. the k stored slots: save e_j, mark the slot (finds a class stored twice),
//      and the loss from the k stored terms plus the background terms in closed form:
//      KL = sum_i p_i (log p_i - log q_i) + (C - k) p_bg log p_bg
//           - p_bg * (sum_all log q - sum_i log q_i)
//   4. one in-cache pass grad_j = coef * (S * q_j - p_bg) = e_j * a_b - coef p_bg
//   5. k fix-ups in double from the saved e_j: grad[idx_i] = coef * (S * q_i - p_i)
// Dense mode: online max/sum of student and teacher, then one pass computing
// both softmaxes, the gradient and the loss.
// While reading the rows the kernel also checks the data (index range, a class
// stored twice in a row, non-finite values/scale/offset/fill) and raises
// IndexError/ValueError after the parallel region, so the Python op needs no
// extra pass or sort for the cpp backend.
//
// Vectorisation: at::vec only vectorises inside ATen's per-capability builds
// (an extension compiled with portable flags gets its scalar fallback), and
// GCC's auto-vectoriser left these loops scalar outside AVX-512 targets. The
// float loops are therefore written with GCC vector types (the register width
// of each target: 4, 8 or 16 lanes) around a
// branch-free polynomial exp, compiled for baseline x86-64, AVX2+FMA and
// AVX-512F, and one variant is picked at load time from the CPU's features
// (lpqld::_soft_label_kl_cpu_isa queries or switches it). Float64 inputs take
// a scalar path with std::exp (used by gradcheck).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace lpqld {
void soft_label_kl_check_args(const at::Tensor& logits, const at::Tensor& values,
                              const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& fill,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                              int64_t mode, double T, double t_s);
}

namespace lpqld::slkl_cpu {

#define LPQLD_INLINE inline __attribute__((always_inline))
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only live inside always-inline code

enum Mode : int64_t { kDense = 0, kMR = 1, kMRS = 2, kMS = 3, kTopK = 4 };

// ----------------------------------------------------------------------------- exp
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
#include <immintrin.h>
// GCC 12's own AVX-512 headers trip this warning (their __Y = __Y idiom), not our code.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
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

// ----------------------------------------------------------------------------- float rows, SIMD
// GCC vector types of the target's register width (4 lanes SSE2, 8 AVX2,
// 16 AVX-512); each ISA variant below instantiates these templates with its
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

// Blocked online softmax statistics of x * inv_t: m = max x and
// s = sum exp((x - m) * inv_t), one pass over memory.
template <typename V, typename U>
LPQLD_INLINE void stats_simd(const float* x, int64_t n, float inv_t, float& m_out, float& s_out) {
  constexpr int64_t L = lanes<V>();
  float m = kNegInf;
  double s = 0;
  bool nan = false;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    V bm = V{} + kNegInf;
    int64_t j = b0;
    for (; j + L <= b1; j += L) {
      const V v = vload<V>(x + j);
      bm = v > bm ? v : bm;
    }
    if (j < b1) {
      const V v = vload_pad<V>(x + j, b1 - j, kNegInf);
      bm = v > bm ? v : bm;
    }
    const float blk_max = hmax(bm);
    if (blk_max > m) {
      s *= static_cast<double>(exp_acc((m - blk_max) * inv_t));
      m = blk_max;
    }
    V acc = V{};
    j = b0;
    for (; j + L <= b1; j += L) acc += exp_poly<V, U>((vload<V>(x + j) - m) * inv_t);
    if (j < b1) acc += exp_poly<V, U>((vload_pad<V>(x + j, b1 - j, kNegInf) - m) * inv_t);
    const double bs = hsum(acc);
    nan = nan || std::isnan(bs);
    s += bs;
  }
  m_out = nan ? std::numeric_limits<float>::quiet_NaN() : m;  // a NaN logit makes the whole row NaN
  s_out = static_cast<float>(s);
}

// Dense teacher: g_j = coef (q_j - p_j); returns sum_j p_j (log p_j - log q_j).
template <typename V, typename U>
LPQLD_INLINE double dense_simd(const float* z, const float* u, int64_t n, float zm, float inv_s, float zs, float um,
                               float inv_t, float zt, float coef, float* g, bool& u_nonfinite) {
  constexpr int64_t L = lanes<V>();
  const float inv_zs = 1.0f / zs, inv_zt = 1.0f / zt;
  const float log_zs = static_cast<float>(std::log(static_cast<double>(zs)));
  const float log_zt = static_cast<float>(std::log(static_cast<double>(zt)));
  double loss = 0;
  for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    V lacc = V{}, fin = V{};  // fin turns NaN if a teacher logit is NaN or +-inf
    int64_t j = b0;
    for (; j + L <= b1; j += L) {
      const V dz = (vload<V>(z + j) - zm) * inv_s;
      const V du = (vload<V>(u + j) - um) * inv_t;
      fin += du * 0.0f;
      const V q = exp_poly<V, U>(dz) * inv_zs;
      const V p = exp_poly<V, U>(du) * inv_zt;
      vstore<V>(g + j, coef * (q - p));
      const V term = p * ((du - log_zt) - (dz - log_zs));
      lacc += p > 0.0f ? term : V{};
    }
    double tail = 0;
    float tfin = 0.0f;
    for (; j < b1; ++j) {
      const float dz = (z[j] - zm) * inv_s, du = (u[j] - um) * inv_t;
      const float q = exp_acc(dz) * inv_zs, p = exp_acc(du) * inv_zt;
      g[j] = coef * (q - p);
      tfin += du * 0.0f;
      if (p > 0.0f) tail += static_cast<double>(p * ((du - log_zt) - (dz - log_zs)));
    }
    loss += hsum(lacc) + tail;
    u_nonfinite = u_nonfinite || std::isnan(hsum(fin) + static_cast<double>(tfin));
  }
  return loss;
}

// Top-k modes, student side, pass 1: per block of kBlock columns (a block
// stays in L1 between its max and its exp loop) its max m_b (NaN ignored),
// e_j = exp((x_j - m_b) * inv_s) written to e, and the block's sums of e_j and of
// (x_j - m_b). The caller rescales the blocks to the row max afterwards, so every
// logit costs one exp (pass 2 only multiplies). A block of -inf only gets m_b = -inf
// and e = 0 (its x - m_b would be NaN).
template <typename V, typename U>
LPQLD_INLINE void expblk_simd(const float* x, int64_t n, float inv_s, float* e, float* bm, double* bs, double* bd) {
  constexpr int64_t L = lanes<V>();
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    const int64_t tail = (b1 - b0) % L;  // the last columns of the block, done with one padded vector
    const int64_t bv = b1 - tail;
    V vm = V{} + kNegInf;
    for (int64_t j = b0; j < bv; j += L) {
      const V v = vload<V>(x + j);
      vm = v > vm ? v : vm;
    }
    const V vt = tail ? vload_pad<V>(x + bv, tail, kNegInf) : V{} + kNegInf;
    vm = vt > vm ? vt : vm;
    const float blk_max = hmax(vm);
    bm[bi] = blk_max;
    if (blk_max == kNegInf) {
      std::memset(e + b0, 0, static_cast<size_t>(b1 - b0) * sizeof(float));
      bs[bi] = 0.0;
      bd[bi] = -std::numeric_limits<double>::infinity();
      continue;
    }
    V acc = V{}, dacc = V{};
    for (int64_t j = b0; j < bv; j += L) {
      const V d = vload<V>(x + j) - blk_max;
      const V ev = exp_poly<V, U>(d * inv_s);
      vstore<V>(e + j, ev);
      acc += ev;
      dacc += d;
    }
    if (tail) {  // padding lanes are -inf: e = 0 there, and their d is masked out
      const V d = vt - blk_max;
      const V ev = exp_poly<V, U>(d * inv_s);
      vstore_part<V>(e + bv, ev, tail);
      acc += ev;
      dacc += lane_ids<V>() < static_cast<float>(tail) ? d : V{};
    }
    bs[bi] = hsum(acc);
    bd[bi] = hsum(dacc);
  }
}

// Pass 2: g_j = e_j * a_b - bg, a_b per block.
template <typename V>
LPQLD_INLINE void scaleblk_simd(float* g, int64_t n, const float* a, float bg) {
  constexpr int64_t L = lanes<V>();
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    const float ab = a[bi];
    int64_t j = b0;
    for (; j + L <= b1; j += L) vstore<V>(g + j, vload<V>(g + j) * ab - bg);
    for (; j < b1; ++j) g[j] = g[j] * ab - bg;
  }
}

// x_i <- exp(x_i) (the teacher's k stored logits); returns sum x_i.
template <typename V, typename U>
LPQLD_INLINE double expk_simd(float* x, int64_t n) {
  constexpr int64_t L = lanes<V>();
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V ev = exp_poly<V, U>(vload<V>(x + i));
    vstore<V>(x + i, ev);
    acc += ev;
  }
  if (i < n) {  // padding lanes are -inf: exp 0
    const V ev = exp_poly<V, U>(vload_pad<V>(x + i, n - i, kNegInf));
    vstore_part<V>(x + i, ev, n - i);
    acc += ev;
  }
  return hsum(acc);
}

// Max of the k decoded values; false when one of them is NaN or +-inf.
template <typename V>
LPQLD_INLINE bool kmax_simd(const float* x, int64_t n, float& m_out) {
  constexpr int64_t L = lanes<V>();
  V vm = V{} + kNegInf, fin = V{};  // fin turns NaN when a value is not finite
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    const V v = vload<V>(x + i);
    vm = v > vm ? v : vm;
    fin += v * 0.0f;
  }
  if (i < n) {  // padding lanes: -inf for the max, 0 for the finiteness sum
    const V v = vload_pad<V>(x + i, n - i, kNegInf);
    vm = v > vm ? v : vm;
    fin += (lane_ids<V>() < static_cast<float>(n - i) ? v : V{}) * 0.0f;
  }
  m_out = hmax(vm);
  return !std::isnan(hsum(fin));
}

// IEEE half bits -> float, branch-free: move exponent and mantissa into place and
// rebias by a multiplication with 2^112 (exact, subnormal halves included);
// inf/NaN keep their bits. Used for fp16 stored values.
template <typename V, typename U>
LPQLD_INLINE void half_to_float_simd(const uint16_t* h, int64_t n, float* out) {
  constexpr int64_t L = lanes<V>();
  typedef uint16_t H __attribute__((vector_size(sizeof(V) / 2)));
  for (int64_t i = 0; i < n; i += L) {
    const int64_t m = std::min(L, n - i);
    H hv{};
    if (m == L) {
      std::memcpy(&hv, h + i, sizeof(hv));
    } else {  // the tail lane by lane (a variable-length memcpy would be a libc call per row)
      alignas(64) uint16_t buf[16];
      for (int64_t t = 0; t < L; ++t) buf[t] = t < m ? h[i + t] : uint16_t(0);
      std::memcpy(&hv, buf, sizeof(hv));
    }
    const U w = __builtin_convertvector(hv, U);
    const U em = w & 0x7fffu;
    const U bits = em << 13;
    V f;
    std::memcpy(&f, &bits, sizeof(f));
    f = f * 0x1p112f;
    U fb;
    std::memcpy(&fb, &f, sizeof(fb));
    fb = em >= 0x7c00u ? (bits | 0x7f800000u) : fb;
    fb |= (w & 0x8000u) << 16;
    std::memcpy(&f, &fb, sizeof(f));
    if (m == L) {
      vstore<V>(out + i, f);
    } else {
      vstore_part<V>(out + i, f, m);
    }
  }
}

// The float kernels compiled for three instruction sets, chosen at load time. The
// top-k modes run a whole row inside one variant (topk_row), so that the k loops
// and the per-row steps are compiled for its vector width and nothing is called
// through a pointer per step.
template <typename acc_t>
struct TopkRow;
struct FloatKernels {
  const char* isa;
  void (*stats)(const float*, int64_t, float, float&, float&);
  double (*dense)(const float*, const float*, int64_t, float, float, float, float, float, float, float, float*, bool&);
  void (*half_to_float)(const uint16_t*, int64_t, float*);
  uint32_t (*topk_row)(TopkRow<float>&);
};
std::atomic<const FloatKernels*>& active_kernels();

// ----------------------------------------------------------------------------- double rows (gradcheck)

template <typename T>
void stats_scalar(const T* x, int64_t n, T inv_t, T& m_out, T& s_out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  T s = 0;
  for (int64_t j = 0; j < n; ++j) s += std::exp((x[j] - m) * inv_t);
  m_out = std::isnan(s) ? s : m;
  s_out = s;
}

template <typename T>
double dense_scalar(const T* z, const T* u, int64_t n, T zm, T inv_s, T zs, T um, T inv_t, T zt, T coef, T* g,
                    bool& u_nonfinite) {
  const T log_zs = std::log(zs), log_zt = std::log(zt);
  double loss = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T dz = (z[j] - zm) * inv_s, du = (u[j] - um) * inv_t;
    const T q = std::exp(dz) / zs, p = std::exp(du) / zt;
    g[j] = coef * (q - p);
    if (!std::isfinite(u[j])) u_nonfinite = true;
    if (p > T(0)) loss += static_cast<double>(p * ((du - log_zt) - (dz - log_zs)));
  }
  return loss;
}

// Scalar twins of expblk/scaleblk/expk for float64 rows (same blocking, std::exp).
template <typename T>
void expblk_scalar(const T* x, int64_t n, T inv_s, T* e, T* bm, double* bs, double* bd) {
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    T blk_max = -std::numeric_limits<T>::infinity();
    for (int64_t j = b0; j < b1; ++j) blk_max = x[j] > blk_max ? x[j] : blk_max;
    bm[bi] = blk_max;
    double s = 0, d = 0;
    for (int64_t j = b0; j < b1; ++j) {
      if (blk_max == -std::numeric_limits<T>::infinity()) {
        e[j] = T(0);
        continue;
      }
      e[j] = std::exp((x[j] - blk_max) * inv_s);
      s += static_cast<double>(e[j]);
      d += static_cast<double>(x[j] - blk_max);
    }
    bs[bi] = s;
    bd[bi] = blk_max == -std::numeric_limits<T>::infinity() ? -std::numeric_limits<double>::infinity() : d;
  }
}

template <typename T>
void scaleblk_scalar(T* g, int64_t n, const T* a, T bg) {
  for (int64_t b0 = 0, bi = 0; b0 < n; b0 += kBlock, ++bi) {
    const int64_t b1 = std::min(n, b0 + kBlock);
    for (int64_t j = b0; j < b1; ++j) g[j] = g[j] * a[bi] - bg;
  }
}

inline double expk_scalar(double* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i]);
    s += x[i];
  }
  return s;
}

inline bool row_kmax(const double* x, int64_t n, double& m) {
  m = -std::numeric_limits<double>::infinity();
  bool finite = true;
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    finite = finite && std::isfinite(x[i]);
  }
  return finite;
}

// The k stored values of a row as acc_t: int8 dequantised as v * scale + offset
// (in float, like the reference's float32 dequantisation), fp16 by the SIMD
// converter; one type switch per row, not per value.
template <typename acc_t>
void decode_values(const void* row, int64_t k, at::ScalarType dt, float scale, float offset, acc_t* out) {
  switch (dt) {
    case at::kHalf:
      if constexpr (std::is_same_v<acc_t, float>) {
        active_kernels().load(std::memory_order_relaxed)->half_to_float(static_cast<const uint16_t*>(row), k, out);
      } else {
        const at::Half* h = static_cast<const at::Half*>(row);
        for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(static_cast<float>(h[i]));
      }
      return;
    case at::kFloat: {
      const float* f = static_cast<const float*>(row);
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(f[i]);
      return;
    }
    case at::kDouble: {
      const double* f = static_cast<const double*>(row);
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(f[i]);
      return;
    }
    case at::kBFloat16: {
      const at::BFloat16* f = static_cast<const at::BFloat16*>(row);
      for (int64_t i = 0; i < k; ++i) out[i] = static_cast<acc_t>(static_cast<float>(f[i]));
      return;
    }
    case at::kChar: {
      const int8_t* q = static_cast<const int8_t*>(row);
      if constexpr (std::is_same_v<acc_t, double>) {
        for (int64_t i = 0; i < k; ++i)
          out[i] = static_cast<double>(q[i]) * static_cast<double>(scale) + static_cast<double>(offset);
      } else {
        for (int64_t i = 0; i < k; ++i) out[i] = static_cast<float>(q[i]) * scale + offset;
      }
      return;
    }
    default:
      for (int64_t i = 0; i < k; ++i) out[i] = acc_t(0);
  }
}

inline void row_stats(const float* x, int64_t n, float inv_t, float& m, float& s) {
  active_kernels().load(std::memory_order_relaxed)->stats(x, n, inv_t, m, s);
}
inline void row_stats(const double* x, int64_t n, double inv_t, double& m, double& s) {
  stats_scalar<double>(x, n, inv_t, m, s);
}
inline double row_dense(const float* z, const float* u, int64_t n, float zm, float inv_s, float zs, float um,
                        float inv_t, float zt, float coef, float* g, bool& bad) {
  return active_kernels().load(std::memory_order_relaxed)->dense(z, u, n, zm, inv_s, zs, um, inv_t, zt, coef, g, bad);
}
inline double row_dense(const double* z, const double* u, int64_t n, double zm, double inv_s, double zs, double um,
                        double inv_t, double zt, double coef, double* g, bool& bad) {
  return dense_scalar<double>(z, u, n, zm, inv_s, zs, um, inv_t, zt, coef, g, bad);
}

// Marks a gradient slot as "written by a stored entry" during the duplicate
// check: a signalling NaN, which arithmetic never produces (it returns quiet
// NaNs), so no value of the gradient pass can be mistaken for it.
template <typename T>
struct Marker;
template <>
struct Marker<float> {
  using bits = uint32_t;
  static constexpr bits kBits = 0x7fa5a5a5u;
};
template <>
struct Marker<double> {
  using bits = uint64_t;
  static constexpr bits kBits = 0x7ff5a5a5a5a5a5a5ull;
};
template <typename T>
LPQLD_INLINE bool is_marked(const T* p) {
  typename Marker<T>::bits b;
  std::memcpy(&b, p, sizeof(b));
  return b == Marker<T>::kBits;
}
template <typename T>
LPQLD_INLINE void mark(T* p) {
  const typename Marker<T>::bits b = Marker<T>::kBits;
  std::memcpy(p, &b, sizeof(b));
}

// Data problems found by the kernel (bits), reported after the parallel region
// in a fixed order, whatever the thread that saw them first.
enum DataError : uint32_t {
  kErrIndex = 1,
  kErrDuplicate = 2,
  kErrValues = 4,
  kErrScale = 8,
  kErrOffset = 16,
  kErrFill = 32
};

struct Problem {
  int64_t B, C, k, mode;
  double T, t_s, grad_scale;
  const void* values;
  int64_t values_row_bytes;
  at::ScalarType vdt;
  const void* indices;
  int64_t indices_row_bytes;
  at::ScalarType idt;
  const float* fill;
  const float* scale;
  const float* offset;
};

// ----------------------------------------------------------------------------- one top-k row

// The steps of a top-k row for one accumulation type and vector width: the float SIMD
// variants (instantiated inside each ISA's target function) and float64 (scalar).
template <typename V, typename U>
struct SimdOps {
  using acc_t = float;
  using VD = std::conditional_t<sizeof(V) == 64, vd8, std::conditional_t<sizeof(V) == 32, vd4, vd2>>;
  static LPQLD_INLINE void expblk(const float* x, int64_t n, float inv_s, float* e, float* bm, double* bs,
                                  double* bd) {
    expblk_simd<V, U>(x, n, inv_s, e, bm, bs, bd);
  }
  static LPQLD_INLINE void scaleblk(float* g, int64_t n, const float* a, float bg) { scaleblk_simd<V>(g, n, a, bg); }
  static LPQLD_INLINE double expk(float* x, int64_t n) { return expk_simd<V, U>(x, n); }
  static LPQLD_INLINE bool kmax(const float* x, int64_t n, float& m) { return kmax_simd<V>(x, n, m); }
  static LPQLD_INLINE void half_to_acc(const void* row, int64_t n, float* out) {
    half_to_float_simd<V, U>(static_cast<const uint16_t*>(row), n, out);
  }
};
struct ScalarOps64 {
  using acc_t = double;
  using VD = vd2;
  static void expblk(const double* x, int64_t n, double inv_s, double* e, double* bm, double* bs, double* bd) {
    expblk_scalar<double>(x, n, inv_s, e, bm, bs, bd);
  }
  static void scaleblk(double* g, int64_t n, const double* a, double bg) { scaleblk_scalar<double>(g, n, a, bg); }
  static double expk(double* x, int64_t n) { return expk_scalar(x, n); }
  static bool kmax(const double* x, int64_t n, double& m) { return row_kmax(x, n, m); }
  static void half_to_acc(const void* row, int64_t n, double* out) {
    const at::Half* h = static_cast<const at::Half*>(row);
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<double>(static_cast<float>(h[i]));
  }
};

// The k stored values of a row as acc_t: int8 dequantised as v * scale + offset (in
// float, like the reference's float32 dequantisation); one type switch per row.
template <typename Ops, typename acc_t>
LPQLD_INLINE void decode_values_ops(const void* row, int64_t k, at::ScalarType dt, float scale, float offset,
                                    acc_t* __restrict out) {
  switch (dt) {
    case at::kHalf: Ops::half_to_acc(row, k, out); return;
    default: decode_values<acc_t>(row, k, dt, scale, offset, out);  // int8 and the rest: plain loops
  }
}

// The k class ids of a row as int32 (C < 2^31 is checked up front); false if one is
// outside [0, C), with the first such id in bad.
template <typename I>
LPQLD_INLINE bool decode_indices32_as(const I* __restrict row, int64_t k, int64_t C, int32_t* __restrict out,
                                      int64_t& bad) {
  uint64_t oob = 0;  // negative ids wrap to huge values as unsigned
  for (int64_t i = 0; i < k; ++i) {
    const int64_t v = static_cast<int64_t>(row[i]);
    oob |= static_cast<uint64_t>(static_cast<uint64_t>(v) >= static_cast<uint64_t>(C));
    out[i] = static_cast<int32_t>(v);
  }
  if (oob == 0) return true;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t v = static_cast<int64_t>(row[i]);
    if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(C)) {
      bad = v;
      break;
    }
  }
  return false;
}
LPQLD_INLINE bool decode_indices32(const void* row, int64_t k, at::ScalarType dt, int64_t C, int32_t* out,
                                   int64_t& bad) {
  switch (dt) {
    case at::kLong: return decode_indices32_as(static_cast<const int64_t*>(row), k, C, out, bad);
    case at::kInt: return decode_indices32_as(static_cast<const int32_t*>(row), k, C, out, bad);
    case at::kShort: return decode_indices32_as(static_cast<const int16_t*>(row), k, C, out, bad);
    case at::kByte: return decode_indices32_as(static_cast<const uint8_t*>(row), k, C, out, bad);
    default: bad = -1; return false;
  }
}

template <typename VD>
LPQLD_INLINE VD vload_d(const double* p) {
  VD v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Per-thread scratch of the top-k rows; the k-long arrays are padded to kPadK lanes,
// the pads hold zeros so that the double-vector loops over them add nothing.
constexpr int64_t kPadK = 16;
template <typename acc_t>
struct TopkScratch {
  std::vector<int32_t> ik;
  std::vector<acc_t> xk, gk, bm, fa;
  std::vector<double> pk, lpk, zk, tk, bs, bd, fd;
  TopkScratch(int64_t k, int64_t nblk) {
    const size_t kp = static_cast<size_t>((k + kPadK - 1) / kPadK * kPadK);
    ik.assign(kp, 0);
    xk.assign(kp, acc_t(0));
    gk.assign(kp, acc_t(0));
    pk.assign(kp, 0.0);
    lpk.assign(kp, 0.0);
    zk.assign(kp, 0.0);
    tk.assign(kp, 0.0);
    bm.assign(static_cast<size_t>(nblk), acc_t(0));
    fa.assign(static_cast<size_t>(nblk), acc_t(0));
    bs.assign(static_cast<size_t>(nblk), 0.0);
    bd.assign(static_cast<size_t>(nblk), 0.0);
    fd.assign(static_cast<size_t>(nblk), 0.0);
  }
};

// One row of a top-k mode: its inputs, its scratch, and the results (loss, or the first
// out-of-range class id).
template <typename acc_t>
struct TopkRow {
  const Problem* P;
  int64_t b;
  const acc_t* z;
  acc_t* g;
  float row_scale, row_offset;
  TopkScratch<acc_t>* S;
  double loss;
  int64_t bad_index;
};

// Steps 1-5 of the header comment for row R.b; returns its DataError bits (0: loss and
// gradient written).
template <typename Ops>
LPQLD_INLINE uint32_t topk_row(TopkRow<typename Ops::acc_t>& R) {
  using acc_t = typename Ops::acc_t;
  using VD = typename Ops::VD;
  constexpr int64_t DL = static_cast<int64_t>(sizeof(VD) / sizeof(double));
  constexpr acc_t kNegInfA = -std::numeric_limits<acc_t>::infinity();
  const Problem& P = *R.P;
  const int64_t b = R.b, C = P.C, k = P.k, mode = P.mode;
  const int64_t kp = (k + DL - 1) / DL * DL;  // the double-vector loops run to kp (zero pads)
  TopkScratch<acc_t>& S = *R.S;
  const acc_t* __restrict z = R.z;
  acc_t* g = R.g;
  int32_t* __restrict ik = S.ik.data();
  acc_t* __restrict xk = S.xk.data();
  acc_t* __restrict gk = S.gk.data();
  double* __restrict pk = S.pk.data();
  double* __restrict lpk = S.lpk.data();
  double* __restrict zk = S.zk.data();
  double* __restrict tk = S.tk.data();
  acc_t* __restrict bm = S.bm.data();
  acc_t* __restrict fa = S.fa.data();
  double* __restrict bs = S.bs.data();
  double* __restrict bd = S.bd.data();
  double* __restrict fd = S.fd.data();
  const int64_t nblk = (C + kBlock - 1) / kBlock;
  const acc_t inv_s = static_cast<acc_t>(1.0 / P.t_s);
  const double coef_d = P.grad_scale / (static_cast<double>(P.B) * P.t_s);

  // 1. decode the k stored entries (and check them: index range, finiteness)
  uint32_t err = 0;
  const void* irow = static_cast<const char*>(P.indices) + b * P.indices_row_bytes;
  const void* vrow = static_cast<const char*>(P.values) + b * P.values_row_bytes;
  if (!decode_indices32(irow, k, P.idt, C, ik, R.bad_index)) err |= kErrIndex;
  decode_values_ops<Ops>(vrow, k, P.vdt, R.row_scale, R.row_offset, xk);
  acc_t vmax;
  if (!Ops::kmax(xk, k, vmax)) err |= kErrValues;
  if (err) return err;
  const int64_t rest = C - k;
  double p_bg = 0.0, logp_bg = 0.0, S_mass = 0.0;
  if (mode == kMR || mode == kMRS) {
    const double it = 1.0 / P.T;
    double tm = static_cast<double>(vmax) * it;  // = max_i x_i * it (it > 0, rounding is monotone)
    const double uf = mode == kMRS ? static_cast<double>(P.fill[b]) * it : 0.0;
    if (mode == kMRS && rest > 0) tm = std::max(tm, uf);
    // one exp per stored entry in acc_t; the log-probabilities stay in double
    for (int64_t i = 0; i < k; ++i) {
      const double l = static_cast<double>(xk[i]) * it - tm;
      lpk[i] = l;
      xk[i] = static_cast<acc_t>(l);
    }
    double zt = Ops::expk(xk, k);
    if (mode == kMRS && rest > 0) zt += static_cast<double>(rest) * std::exp(uf - tm);
    const double log_zt = std::log(zt), inv_zt = 1.0 / zt;
    for (int64_t i = 0; i < k; ++i) {
      lpk[i] -= log_zt;
      pk[i] = static_cast<double>(xk[i]) * inv_zt;
    }
    if (mode == kMRS && rest > 0) {
      logp_bg = uf - tm - log_zt;
      p_bg = std::exp(logp_bg);
    }
    S_mass = 1.0;
  } else {  // probabilities: ms, topk_norenorm
    double stored = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      pk[i] = std::max(static_cast<double>(xk[i]), 0.0);
      lpk[i] = pk[i] > 0.0 ? std::log(pk[i]) : 0.0;
      stored += pk[i];
    }
    if (mode == kMS && rest > 0) {
      p_bg = std::max(1.0 - stored, 0.0) / static_cast<double>(rest);
      logp_bg = p_bg > 0.0 ? std::log(p_bg) : 0.0;
    }
    S_mass = stored + static_cast<double>(rest) * p_bg;
  }
  // 2. student: per-block max and exp into g (one exp per logit), then the
  // row max m, Z = sum_j exp((z_j - m) / s) and sum_j (z_j - m) from the blocks
  Ops::expblk(z, C, inv_s, g, bm, bs, bd);
  acc_t zm = kNegInfA;
  for (int64_t bi = 0; bi < nblk; ++bi) zm = bm[bi] > zm ? bm[bi] : zm;
  double zs = 0.0, dsum = 0.0;
  for (int64_t bi = 0; bi < nblk; ++bi) {
    const int64_t nb = std::min(kBlock, C - bi * kBlock);
    if (bm[bi] == kNegInfA) {  // a block of -inf logits: q = 0 there
      fa[bi] = zm == bm[bi] ? std::numeric_limits<acc_t>::quiet_NaN() : acc_t(0);
      dsum += bd[bi];
      continue;
    }
    const acc_t f = exp_acc(static_cast<acc_t>((bm[bi] - zm) * inv_s));
    fa[bi] = f;
    zs += bs[bi] * static_cast<double>(f);
    dsum += bd[bi] + static_cast<double>(nb) * static_cast<double>(bm[bi] - zm);
  }
  const double log_zs = std::log(zs);
  // 3. stored entries: save their e_j and z_j - m, and mark the slots (which finds a
  // class stored twice); a scalar loop, as it stores into g. Their gradient is written
  // below in double from e_j, so that S q_j - p_i cancels exactly where it should
  // (e.g. C = k).
  const double zmd = static_cast<double>(zm);
  bool dup = false;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t j = ik[i];
    acc_t* slot = g + j;
    dup = dup || is_marked(slot);
    tk[i] = static_cast<double>(*slot);
    zk[i] = static_cast<double>(z[j]) - zmd;
    mark(slot);
  }
  if (dup) return kErrDuplicate;
  // Their loss terms, with log q_i = (z_i - m) / s - log Z, in double vectors:
  //   sum_i p_i (log p_i - log q_i) = sum p lp - (sum p (z - m)) / s + log Z sum p
  // (p_i = 0 adds nothing: p lp is 0 then, and p (z - m) is masked for z = -inf).
  VD vplp{}, vpd{}, vps{}, vdk{};
  for (int64_t i = 0; i < kp; i += DL) {
    const VD p = vload_d<VD>(pk + i), d = vload_d<VD>(zk + i);
    vdk += d;
    vplp += p * vload_d<VD>(lpk + i);
    const VD pd = p * d;
    vpd += p > 0.0 ? pd : VD{};
    vps += p;
  }
  const double plp = hsum_d(vplp), pd = hsum_d(vpd), ps = hsum_d(vps), dk = hsum_d(vdk);
  const double isd = static_cast<double>(inv_s);
  double loss = plp - isd * pd + log_zs * ps;
  if (p_bg > 0.0) {  // background classes: p_bg (log p_bg - log q_j) summed over the C - k of them
    const double bg_lq = isd * (dsum - dk) - static_cast<double>(rest) * log_zs;
    loss += static_cast<double>(rest) * p_bg * logp_bg - p_bg * bg_lq;
  }
  // 4. g_j = coef (S q_j - p_bg) for every column: scale each block (NaN logits
  // make zs NaN: the whole row NaN); the marked slots are overwritten below
  const double qscale = coef_d * S_mass / zs;
  for (int64_t bi = 0; bi < nblk; ++bi) {
    fd[bi] = qscale * static_cast<double>(fa[bi]);
    fa[bi] = static_cast<acc_t>(fd[bi]);
  }
  Ops::scaleblk(g, C, fa, static_cast<acc_t>(coef_d * p_bg));
  // 5. the stored slots' gradient, coef (S q_i - p_i), from the saved e_j: computed
  // in double vectors (one block: one factor), then scattered
  const double cf = coef_d;
  if (nblk == 1) {
    const double f0 = fd[0];
    for (int64_t i = 0; i < kp; ++i) gk[i] = static_cast<acc_t>(tk[i] * f0 - cf * pk[i]);
  } else {
    for (int64_t i = 0; i < k; ++i)
      gk[i] = static_cast<acc_t>(tk[i] * fd[static_cast<uint32_t>(ik[i]) / kBlock] - cf * pk[i]);
  }
  for (int64_t i = 0; i < k; ++i) g[ik[i]] = gk[i];
  R.loss = loss;
  return 0;
}

#define LPQLD_FLOAT_VARIANT(SUFFIX, ATTR, V, U)                                                                  \
  ATTR void stats_##SUFFIX(const float* x, int64_t n, float inv_t, float& m, float& s) {                         \
    stats_simd<V, U>(x, n, inv_t, m, s);                                                                         \
  }                                                                                                              \
  ATTR double dense_##SUFFIX(const float* z, const float* u, int64_t n, float zm, float inv_s, float zs,         \
                             float um, float inv_t, float zt, float coef, float* g, bool& bad) {                 \
    return dense_simd<V, U>(z, u, n, zm, inv_s, zs, um, inv_t, zt, coef, g, bad);                                \
  }                                                                                                              \
  ATTR void half_to_float_##SUFFIX(const uint16_t* h, int64_t n, float* out) {                                   \
    half_to_float_simd<V, U>(h, n, out);                                                                         \
  }                                                                                                              \
  ATTR uint32_t topk_row_##SUFFIX(TopkRow<float>& R) { return topk_row<SimdOps<V, U>>(R); }                      \
  constexpr FloatKernels kKernels_##SUFFIX{#SUFFIX, &stats_##SUFFIX, &dense_##SUFFIX, &half_to_float_##SUFFIX,    \
                                           &topk_row_##SUFFIX};

LPQLD_FLOAT_VARIANT(base, __attribute__((flatten)), vf4, vu4)
#if defined(__GNUC__) && defined(__x86_64__)
#define LPQLD_X86_VARIANTS 1
LPQLD_FLOAT_VARIANT(avx2, __attribute__((target("avx2,fma"), flatten)), vf8, vu8)
LPQLD_FLOAT_VARIANT(avx512, __attribute__((target("avx512f,avx2,fma"), flatten)), vf16, vu16)
#endif

const FloatKernels* variant(const std::string& isa) {
  if (isa == "base") return &kKernels_base;
#ifdef LPQLD_X86_VARIANTS
  __builtin_cpu_init();
  if (isa == "avx2" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &kKernels_avx2;
  if (isa == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma"))
    return &kKernels_avx512;
#endif
  return nullptr;
}

std::atomic<const FloatKernels*>& active_kernels() {
  static std::atomic<const FloatKernels*> active{[] {
    for (const char* isa : {"avx512", "avx2"})
      if (const FloatKernels* k = variant(isa)) return k;
    return &kKernels_base;
  }()};
  return active;
}

// Which float variant runs; a non-empty isa ("base", "avx2", "avx512") switches
// to it (for tests and benchmarks). Returns the active one.
std::string soft_label_kl_cpu_isa(c10::string_view isa) {
  if (!isa.empty()) {
    const FloatKernels* k = variant(std::string(isa));
    TORCH_CHECK(k != nullptr, "_soft_label_kl_cpu_isa: ", std::string(isa),
                " is not available on this CPU/build (base, avx2, avx512)");
    active_kernels().store(k);
  }
  return active_kernels().load()->isa;
}


template <typename scalar_t>
void run(const Problem& P, const at::Tensor& logits, at::Tensor& grad, at::Tensor& loss_rows) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  constexpr bool kDirect = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = P.B, C = P.C, k = P.k;
  const scalar_t* logits_ptr = logits.const_data_ptr<scalar_t>();
  const int64_t lstride = logits.stride(0);
  scalar_t* grad_ptr = grad.mutable_data_ptr<scalar_t>();
  acc_t* loss_ptr = loss_rows.mutable_data_ptr<acc_t>();
  const acc_t inv_s = static_cast<acc_t>(1.0 / P.t_s);
  const acc_t inv_t = static_cast<acc_t>(1.0 / P.T);
  const double coef_d = P.grad_scale / (static_cast<double>(B) * P.t_s);
  const acc_t coef = static_cast<acc_t>(coef_d);
  const bool dense_values_direct = std::is_same_v<acc_t, float> ? P.vdt == at::kFloat : P.vdt == at::kDouble;
  // the variant is read once per call (not per row or step)
  const FloatKernels* kern = active_kernels().load(std::memory_order_relaxed);
  std::atomic<int64_t> bad_index{-1};
  std::atomic<uint32_t> errors{0};

  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, B, grain, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> zbuf(kDirect ? 0 : C), gbuf(kDirect ? 0 : C);
    std::vector<acc_t> ubuf((P.mode == kDense && !dense_values_direct) ? C : 0);
    std::optional<TopkScratch<acc_t>> scratch;
    if (P.mode != kDense) scratch.emplace(k, (C + kBlock - 1) / kBlock);
    for (int64_t b = r0; b < r1; ++b) {
      const scalar_t* zrow = logits_ptr + b * lstride;
      scalar_t* grow = grad_ptr + b * C;
      const acc_t* z;
      acc_t* g;
      if constexpr (kDirect) {
        z = zrow;
        g = grow;
      } else {
        for (int64_t j = 0; j < C; ++j) zbuf[j] = static_cast<acc_t>(zrow[j]);
        z = zbuf.data();
        g = gbuf.data();
      }
      const float row_scale = P.scale ? P.scale[b] : 1.0f;
      const float row_offset = P.offset ? P.offset[b] : 0.0f;
      uint32_t row_err = 0;
      if (!std::isfinite(row_scale)) row_err |= kErrScale;
      if (!std::isfinite(row_offset)) row_err |= kErrOffset;
      if (P.mode == kMRS && !std::isfinite(P.fill[b])) row_err |= kErrFill;
      if (row_err) {
        errors.fetch_or(row_err);
        continue;
      }

      double loss = 0.0;

      if (P.mode == kDense) {
        const void* vrow = static_cast<const char*>(P.values) + b * P.values_row_bytes;
        acc_t zm, zs;
        row_stats(z, C, inv_s, zm, zs);
        const acc_t* u;
        if (dense_values_direct) {
          u = static_cast<const acc_t*>(vrow);
        } else {
          decode_values<acc_t>(vrow, C, P.vdt, row_scale, row_offset, ubuf.data());
          u = ubuf.data();
        }
        acc_t um, us;
        row_stats(u, C, inv_t, um, us);
        bool u_bad = false;
        loss = row_dense(z, u, C, zm, inv_s, zs, um, inv_t, us, coef, g, u_bad);
        if (u_bad) errors.fetch_or(kErrValues);
      } else {
        TopkRow<acc_t> R{&P, b, z, g, row_scale, row_offset, &*scratch, 0.0, 0};
        if constexpr (std::is_same_v<acc_t, float>) {
          row_err = kern->topk_row(R);
        } else {
          row_err = topk_row<ScalarOps64>(R);
        }
        if (row_err) {
          if (row_err & kErrIndex) bad_index.store(R.bad_index);
          errors.fetch_or(row_err);
          continue;
        }
        loss = R.loss;
      }
      if constexpr (!kDirect) {
        for (int64_t j = 0; j < C; ++j) grow[j] = static_cast<scalar_t>(gbuf[j]);
      }
      loss_ptr[b] = static_cast<acc_t>(P.grad_scale * loss);
    }
  });
  const uint32_t err = errors.load();
  TORCH_CHECK_INDEX(!(err & kErrIndex), "soft_label_kl_fwd: indices holds class id ", bad_index.load(),
                    " outside [0, ", C, ")");
  TORCH_CHECK_VALUE(!(err & kErrDuplicate), "soft_label_kl_fwd: indices repeats a class id within a row; the top-k "
                    "modes need distinct classes");
  TORCH_CHECK_VALUE(!(err & kErrValues), "soft_label_kl_fwd: values contains NaN or inf");
  TORCH_CHECK_VALUE(!(err & kErrScale), "soft_label_kl_fwd: scale contains NaN or inf");
  TORCH_CHECK_VALUE(!(err & kErrOffset), "soft_label_kl_fwd: offset contains NaN or inf");
  TORCH_CHECK_VALUE(!(err & kErrFill), "soft_label_kl_fwd: fill contains NaN or inf");
}

std::tuple<at::Tensor, at::Tensor> soft_label_kl_fwd_cpu(const at::Tensor& logits_in, const at::Tensor& values_in,
                                                         const std::optional<at::Tensor>& indices_in,
                                                         const std::optional<at::Tensor>& fill_in,
                                                         const std::optional<at::Tensor>& scale_in,
                                                         const std::optional<at::Tensor>& offset_in, int64_t mode,
                                                         double T, double t_s, double grad_scale) {
  soft_label_kl_check_args(logits_in, values_in, indices_in, fill_in, scale_in, offset_in, mode, T, t_s);
  TORCH_CHECK(logits_in.device().is_cpu(), "soft_label_kl_fwd (CPU): logits must be a CPU tensor");
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor indices, fill, scale, offset;
  if (indices_in.has_value()) indices = indices_in->contiguous();
  if (fill_in.has_value()) fill = fill_in->contiguous();
  if (scale_in.has_value()) scale = scale_in->contiguous();
  if (offset_in.has_value()) offset = offset_in->contiguous();
  const int64_t B = logits.size(0), C = logits.size(1);
  TORCH_CHECK(mode == kDense || C <= std::numeric_limits<int32_t>::max(),
              "soft_label_kl_fwd (CPU): the top-k modes take at most 2^31 - 1 classes, got C = ", C);
  const auto acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss_rows = at::zeros({B}, logits.options().dtype(acc_dtype));
  at::Tensor grad = at::empty({B, C}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0) return {loss_rows, grad};

  Problem P;
  P.B = B;
  P.C = C;
  P.k = values.size(1);
  P.mode = mode;
  P.T = T;
  P.t_s = t_s;
  P.grad_scale = grad_scale;
  P.values = values.const_data_ptr();
  P.values_row_bytes = values.size(1) * static_cast<int64_t>(values.element_size());
  P.vdt = values.scalar_type();
  P.indices = indices.defined() ? indices.const_data_ptr() : nullptr;
  P.indices_row_bytes = indices.defined() ? indices.size(1) * static_cast<int64_t>(indices.element_size()) : 0;
  P.idt = indices.defined() ? indices.scalar_type() : at::kLong;
  P.fill = fill.defined() ? fill.const_data_ptr<float>() : nullptr;
  P.scale = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  P.offset = offset.defined() ? offset.const_data_ptr<float>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "soft_label_kl_fwd_cpu",
                                  [&] { run<scalar_t>(P, logits, grad, loss_rows); });
  return {loss_rows, grad};
}

}  // namespace lpqld::slkl_cpu

TORCH_LIBRARY_IMPL(lpqld, CPU, m) { m.impl("soft_label_kl_fwd", &lpqld::slkl_cpu::soft_label_kl_fwd_cpu); }

// Not a tensor op: selects/query the SIMD variant of the CPU kernel (tests, benchmarks).
TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.def("_soft_label_kl_cpu_isa(str isa=\"\") -> str", &lpqld::slkl_cpu::soft_label_kl_cpu_isa);
}
