// CPU kernels of lpqld::segment_bn_loss_fwd / _bwd (schemas in csrc/segment_bn_loss.cpp).
//
// Forward, one pass over x from memory, no per-row buffer:
//   tasks (segment, 16 channels) in parallel; each walks the segment's rows
//   (counting sort by segment id) and reduces row (n, c) to its exact mean and
//   M2 with two sweeps while it sits in cache (sums of x - shift in SIMD lanes
//   of float (double for float64 x), folded into double every kChunk elements;
//   the first sweep shifts by the row's first value, a second sweep by the
//   first sweep's mean runs only when the shift was far from the mean), then
//   merges it into the float64 state of (s, c) with Chan's formula, so large
//   means do not cancel. Then per segment the variance and the loss.
// Backward, one elementwise pass: grad = scale * ((x - mean_hi) - mean_lo) + alpha,
// per (segment, channel) coefficients; mean is split into hi + lo parts of the
// compute type so x - mean stays accurate for large means.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

constexpr int64_t kChunk = 256;  // elements per float partial sum, then folded into double: bounds the
                                // float rounding even where the compiler does not split the sum into lanes (-O1)
constexpr int64_t kChannelBlock = 16;  // channels per forward task
constexpr int64_t kShortRow = 64;      // rows up to this length take the inline path

template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
constexpr bool kDirect = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// p[start, start + n) as acc_t: the data itself for float/double, else converted into tmp.
template <typename scalar_t, typename acc_t>
inline const acc_t* chunk_as_acc(const scalar_t* p, int64_t start, int64_t n, acc_t* tmp) {
  if constexpr (kDirect<scalar_t>) {
    (void)n;
    (void)tmp;
    return p + start;
  } else {
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(p[start + i]);
    return tmp;
  }
}

// The two hot loops, vectorised with `omp simd` and compiled per ISA level
// (function multiversioning: AVX-512 / AVX2+FMA / baseline, picked at load
// time), since the extension itself is built with portable flags.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define LPQLD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LPQLD_CLONES
#endif

// s1 += sum (p[i] - shift), s2 += sum (p[i] - shift)^2 over n <= kChunk values
// (partial sums in kSumLanes lanes of T, folded into double once per chunk).
// The lanes are explicit, so the summation order, and with it the rounding, is
// the same whether the compiler vectorises (-O3 clones) or not (-O1, the
// sanitizer build): an implicit `omp simd` reduction summed 256 values in one
// scalar accumulator at -O1, 16x the rounding error, which showed with
// |mean| >> std (test_large_means).
constexpr int64_t kSumLanes = 16;
#define LPQLD_SHIFTED_SUMS(T, NAME)                                      \
  LPQLD_CLONES void NAME(const T* p, int64_t n, T shift, double& s1, double& s2) { \
    T a1[kSumLanes] = {}, a2[kSumLanes] = {};                            \
    int64_t i = 0;                                                       \
    for (; i + kSumLanes <= n; i += kSumLanes) {                         \
      _Pragma("omp simd") for (int64_t l = 0; l < kSumLanes; ++l) {      \
        const T d = p[i + l] - shift;                                    \
        a1[l] += d;                                                      \
        a2[l] += d * d;                                                  \
      }                                                                  \
    }                                                                    \
    for (int64_t l = 0; i < n; ++i, ++l) {                               \
      const T d = p[i] - shift;                                          \
      a1[l] += d;                                                        \
      a2[l] += d * d;                                                    \
    }                                                                    \
    double b1 = 0.0, b2 = 0.0;                                           \
    for (int64_t l = 0; l < kSumLanes; ++l) {                            \
      b1 += static_cast<double>(a1[l]);                                  \
      b2 += static_cast<double>(a2[l]);                                  \
    }                                                                    \
    s1 += b1;                                                            \
    s2 += b2;                                                            \
  }
LPQLD_SHIFTED_SUMS(float, shifted_sums_f32)
LPQLD_SHIFTED_SUMS(double, shifted_sums_f64)

// g[i] = sc * ((x[i] - hi) - lo) + al. For float the product and the sum are
// taken in double: a product of two floats is exact in double, so the result is
// rounded once (like an FMA) whether or not the compiler contracts (it does at
// -O3 in the AVX2/AVX-512 clones, not at -O1 or in the baseline clone). With
// |mean| >> std, al nearly cancels sc * d and a float product's rounding showed.
inline float affine_one(float x, float sc, float al, float hi, float lo) {
  return static_cast<float>(static_cast<double>(sc) * static_cast<double>((x - hi) - lo) + static_cast<double>(al));
}
inline double affine_one(double x, double sc, double al, double hi, double lo) { return sc * ((x - hi) - lo) + al; }
#define LPQLD_AFFINE(T, NAME)                                                      \
  LPQLD_CLONES void NAME(const T* x, T* g, int64_t n, T sc, T al, T hi, T lo) {      \
    _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) g[i] = affine_one(x[i], sc, al, hi, lo); \
  }
LPQLD_AFFINE(float, affine_f32)
LPQLD_AFFINE(double, affine_f64)

inline void shifted_sums(const float* p, int64_t n, float shift, double& s1, double& s2) {
  shifted_sums_f32(p, n, shift, s1, s2);
}
inline void shifted_sums(const double* p, int64_t n, double shift, double& s1, double& s2) {
  shifted_sums_f64(p, n, shift, s1, s2);
}
inline void affine(const float* x, float* g, int64_t n, float sc, float al, float hi, float lo) {
  affine_f32(x, g, n, sc, al, hi, lo);
}
inline void affine(const double* x, double* g, int64_t n, double sc, double al, double hi, double lo) {
  affine_f64(x, g, n, sc, al, hi, lo);
}

// Channels-last loops (channels in SIMD lanes), compiled per ISA like the two above, for float and bfloat16
// (what recover's NHWC teacher produces); other types take the generic templates further down. bfloat16 is
// read as its bits (<< 16 is the exact float) and written with c10's round-to-nearest-even (NaN -> 0x7FC0),
// so the gradient has the bits of the contiguous path's static_cast.
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t rne = static_cast<uint16_t>((u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16);
  return f != f ? uint16_t{0x7FC0} : rne;
}
inline float load_as_float(float v) { return v; }
inline float load_as_float(uint16_t v) { return bf16_bits_to_float(v); }
inline void store_from_float(float* p, float v) { *p = v; }
inline void store_from_float(uint16_t* p, float v) { *p = float_to_bf16_bits(v); }
// a1[c] += sum_l (p[l * ldc + c] - shift[c]), a2[c] += its squares, l < nl, c < nc.
#define LPQLD_NLC_SUMS(T, NAME)                                                                               \
  LPQLD_CLONES void NAME(const T* p, int64_t ldc, int64_t nl, int64_t nc, const float* shift, float* a1,      \
                         float* a2) {                                                                         \
    for (int64_t l = 0; l < nl; ++l) {                                                                        \
      const T* row = p + l * ldc;                                                                             \
      _Pragma("omp simd") for (int64_t c = 0; c < nc; ++c) {                                                  \
        const float d = load_as_float(row[c]) - shift[c];                                                     \
        a1[c] += d;                                                                                           \
        a2[c] += d * d;                                                                                       \
      }                                                                                                       \
    }                                                                                                         \
  }
// g[c] = sc[c] * ((x[c] - hi[c]) - lo[c]) + al[c] over one row of n channels.
#define LPQLD_NLC_AFFINE(T, NAME)                                                                             \
  LPQLD_CLONES void NAME(const T* x, T* g, int64_t n, const float* sc, const float* al, const float* hi,       \
                         const float* lo) {                                                                   \
    _Pragma("omp simd") for (int64_t c = 0; c < n; ++c) {                                                     \
      store_from_float(g + c, affine_one(load_as_float(x[c]), sc[c], al[c], hi[c], lo[c]));                   \
    }                                                                                                         \
  }
// The same for a full block of 64 channels: the partial sums live in registers across the rows (the
// variable-width loop above loads and stores them per row, ~3x slower on recover's 128-channel maps).
#define LPQLD_NLC_SUMS64(T, NAME)                                                                             \
  LPQLD_CLONES void NAME(const T* p, int64_t ldc, int64_t nl, const float* shift, float* a1, float* a2) {     \
    float b1[64] = {}, b2[64] = {}, sh[64];                                                                   \
    for (int c = 0; c < 64; ++c) sh[c] = shift[c];                                                            \
    for (int64_t l = 0; l < nl; ++l) {                                                                        \
      const T* row = p + l * ldc;                                                                             \
      _Pragma("omp simd") for (int c = 0; c < 64; ++c) {                                                      \
        const float d = load_as_float(row[c]) - sh[c];                                                        \
        b1[c] += d;                                                                                           \
        b2[c] += d * d;                                                                                       \
      }                                                                                                       \
    }                                                                                                         \
    for (int c = 0; c < 64; ++c) {                                                                            \
      a1[c] += b1[c];                                                                                         \
      a2[c] += b2[c];                                                                                         \
    }                                                                                                         \
  }
LPQLD_NLC_SUMS(float, nlc_sums_f32)
LPQLD_NLC_SUMS(uint16_t, nlc_sums_bf16)
LPQLD_NLC_SUMS64(float, nlc_sums64_f32)
LPQLD_NLC_SUMS64(uint16_t, nlc_sums64_bf16)
LPQLD_NLC_AFFINE(float, nlc_affine_f32)
LPQLD_NLC_AFFINE(uint16_t, nlc_affine_bf16)

// Eval-mode BN (+ ReLU) fused with the loss (lpqld::bn_eval_act / segment_bn_loss_bwd_bn_eval, recover's
// supervised BN layers): y = act(fma(x, s, b)) per channel, and the backward adds the BN path's gradient
// gy * s (masked where fma(x, s, b) <= 0 under ReLU, relu's own rule) to the loss gradient in the same pass,
// so the BN backward, the ReLU backward and autograd's sum of the two gradients are one read of x and gy.
#define LPQLD_NLC_BN_ACT(T, NAME, RELU)                                                                      \
  LPQLD_CLONES void NAME(const T* x, T* y, int64_t n, const float* s, const float* b) {                      \
    _Pragma("omp simd") for (int64_t c = 0; c < n; ++c) {                                                     \
      const float v = std::fma(load_as_float(x[c]), s[c], b[c]);                                              \
      store_from_float(y + c, (RELU) ? (v > 0.0f ? v : (v == v ? 0.0f : v)) : v);                             \
    }                                                                                                         \
  }
#define LPQLD_NLC_AFFINE_BN(T, NAME, RELU)                                                                   \
  LPQLD_CLONES void NAME(const T* x, const T* gy, T* g, int64_t n, const float* sc, const float* al,         \
                         const float* hi, const float* lo, const float* s, const float* b, const float* gs) { \
    _Pragma("omp simd") for (int64_t c = 0; c < n; ++c) {                                                     \
      const float xv = load_as_float(x[c]);                                                                   \
      const float up = load_as_float(gy[c]) * gs[c];                                                          \
      const float bn = (RELU) ? (std::fma(xv, s[c], b[c]) > 0.0f ? up : 0.0f) : up;                           \
      store_from_float(g + c, affine_one(xv, sc[c], al[c], hi[c], lo[c]) + bn);                               \
    }                                                                                                         \
  }
// y = (act(x00) + act(x01) + act(x10) + act(x11)) / 4 over the 2x2 window of one pooled position (C lanes),
// summed in that order in float like torch's avg_pool2d.
#define LPQLD_NLC_BN_ACT_POOL2(T, NAME, RELU)                                                                \
  LPQLD_CLONES void NAME(const T* x00, const T* x01, const T* x10, const T* x11, T* y, int64_t n,            \
                         const float* s, const float* b) {                                                    \
    _Pragma("omp simd") for (int64_t c = 0; c < n; ++c) {                                                     \
      float v0 = std::fma(load_as_float(x00[c]), s[c], b[c]), v1 = std::fma(load_as_float(x01[c]), s[c], b[c]); \
      float v2 = std::fma(load_as_float(x10[c]), s[c], b[c]), v3 = std::fma(load_as_float(x11[c]), s[c], b[c]); \
      if (RELU) {                                                                                             \
        v0 = v0 > 0.0f ? v0 : (v0 == v0 ? 0.0f : v0);                                                         \
        v1 = v1 > 0.0f ? v1 : (v1 == v1 ? 0.0f : v1);                                                         \
        v2 = v2 > 0.0f ? v2 : (v2 == v2 ? 0.0f : v2);                                                         \
        v3 = v3 > 0.0f ? v3 : (v3 == v3 ? 0.0f : v3);                                                         \
      }                                                                                                       \
      store_from_float(y + c, (((v0 + v1) + v2) + v3) * 0.25f);                                               \
    }                                                                                                         \
  }
LPQLD_NLC_BN_ACT(float, nlc_bn_id_f32, false)
LPQLD_NLC_BN_ACT(float, nlc_bn_relu_f32, true)
LPQLD_NLC_BN_ACT(uint16_t, nlc_bn_id_bf16, false)
LPQLD_NLC_BN_ACT(uint16_t, nlc_bn_relu_bf16, true)
LPQLD_NLC_AFFINE_BN(float, nlc_affine_bn_id_f32, false)
LPQLD_NLC_AFFINE_BN(float, nlc_affine_bn_relu_f32, true)
LPQLD_NLC_AFFINE_BN(uint16_t, nlc_affine_bn_id_bf16, false)
LPQLD_NLC_AFFINE_BN(uint16_t, nlc_affine_bn_relu_bf16, true)
LPQLD_NLC_BN_ACT_POOL2(float, nlc_bn_pool2_id_f32, false)
LPQLD_NLC_BN_ACT_POOL2(float, nlc_bn_pool2_relu_f32, true)
LPQLD_NLC_BN_ACT_POOL2(uint16_t, nlc_bn_pool2_id_bf16, false)
LPQLD_NLC_BN_ACT_POOL2(uint16_t, nlc_bn_pool2_relu_bf16, true)

// Exact mean and M2 (sum of squared deviations) of the row p[0, L), L >= 1.
template <typename scalar_t>
inline void row_moments(const scalar_t* p, int64_t L, typename AccType<scalar_t>::type* tmp, double& mean,
                        double& m2) {
  using acc_t = typename AccType<scalar_t>::type;
  if (L == 1) {
    mean = static_cast<double>(p[0]);
    m2 = 0.0;
    return;
  }
  if (L <= kShortRow) {
    // short rows (e.g. 7x7, 8x8 maps): exact two-pass in registers, inline. Values are
    // shifted by p[0] first, so the float sums see deviations, not the (large) mean.
    acc_t d[kShortRow];
    const acc_t p0 = static_cast<acc_t>(p[0]);
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < L; ++i) {
      d[i] = static_cast<acc_t>(p[i]) - p0;
      s += d[i];
    }
    const acc_t m = s / static_cast<acc_t>(L);
    acc_t e = 0, q = 0;
#pragma omp simd reduction(+ : e, q)
    for (int64_t i = 0; i < L; ++i) {
      const acc_t t = d[i] - m;
      e += t;
      q += t * t;
    }
    const double de = static_cast<double>(e);
    mean = static_cast<double>(p0) + static_cast<double>(m) + de / static_cast<double>(L);
    m2 = std::max(static_cast<double>(q) - de * de / static_cast<double>(L), 0.0);
    return;
  }
  const double inv_l = 1.0 / static_cast<double>(L);
  double shift = static_cast<double>(static_cast<acc_t>(p[0]));
  double s1 = 0.0, s2 = 0.0;
  for (int sweep = 0; sweep < 2; ++sweep) {
    s1 = 0.0;
    s2 = 0.0;
    const acc_t sh = static_cast<acc_t>(shift);
    shift = static_cast<double>(sh);
    for (int64_t start = 0; start < L; start += kChunk) {
      const int64_t n = std::min(kChunk, L - start);
      shifted_sums(chunk_as_acc<scalar_t, acc_t>(p, start, n, tmp), n, sh, s1, s2);
    }
    if (sweep == 0) {
      const double m1 = shift + s1 * inv_l;
      // The first sweep is exact enough when the shift lies within ~1.5 std of the mean.
      const double m2_1 = s2 - s1 * s1 * inv_l;
      if ((s1 * inv_l) * (s1 * inv_l) <= 2.0 * std::max(m2_1, 0.0) * inv_l) break;
      shift = m1;
    }
  }
  mean = shift + s1 * inv_l;
  m2 = std::max(s2 - s1 * s1 * inv_l, 0.0);
}

// g[0, L) = sc * ((x - hi) - lo) + al, computed in acc_t.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void grad_row(const scalar_t* xr, scalar_t* gr, int64_t L, acc_t sc, acc_t al, acc_t hi, acc_t lo, acc_t* tmp) {
  if constexpr (kDirect<scalar_t>) {
    (void)tmp;
    affine(xr, gr, L, sc, al, hi, lo);
  } else {
    for (int64_t start = 0; start < L; start += kChunk) {
      const int64_t n = std::min(kChunk, L - start);
      const acc_t* src = chunk_as_acc<scalar_t, acc_t>(xr, start, n, tmp);
      affine(src, tmp, n, sc, al, hi, lo);  // in place in tmp
      for (int64_t k = 0; k < n; ++k) gr[start + k] = static_cast<scalar_t>(tmp[k]);
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

template <typename acc_t>
inline acc_t bn_act_one(acc_t x, acc_t s, acc_t b, bool relu) {
  const acc_t v = std::fma(x, s, b);
  return relu ? (v > acc_t(0) ? v : (v == v ? acc_t(0) : v)) : v;  // relu keeps NaN, like torch.relu
}
template <typename acc_t>
inline acc_t bn_grad_one(acc_t x, acc_t gy, acc_t s, acc_t b, bool relu) {
  const acc_t up = gy * s;
  return (!relu || std::fma(x, s, b) > acc_t(0)) ? up : acc_t(0);
}

// One channels-last row of y = act(fma(x, s, b)) (C channels of one position).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void nlc_bn_row(const scalar_t* xr, scalar_t* yr, int64_t C, const acc_t* s, const acc_t* b, bool relu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (relu ? nlc_bn_relu_f32 : nlc_bn_id_f32)(xr, yr, C, s, b);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    (relu ? nlc_bn_relu_bf16 : nlc_bn_id_bf16)(reinterpret_cast<const uint16_t*>(xr), reinterpret_cast<uint16_t*>(yr),
                                               C, s, b);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      yr[c] = static_cast<scalar_t>(bn_act_one(static_cast<acc_t>(xr[c]), s[c], b[c], relu));
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

// One pooled channels-last position: y = mean of act(fma(x, s, b)) over the 2x2 window at x00 (rows ldw apart,
// columns C apart).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void nlc_bn_pool2_row(const scalar_t* x00, int64_t ldw, scalar_t* yr, int64_t C, const acc_t* s,
                             const acc_t* b, bool relu) {
  const scalar_t *x01 = x00 + C, *x10 = x00 + ldw, *x11 = x10 + C;
  if constexpr (std::is_same_v<scalar_t, float>) {
    (relu ? nlc_bn_pool2_relu_f32 : nlc_bn_pool2_id_f32)(x00, x01, x10, x11, yr, C, s, b);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    auto u = [](const scalar_t* p) { return reinterpret_cast<const uint16_t*>(p); };
    (relu ? nlc_bn_pool2_relu_bf16 : nlc_bn_pool2_id_bf16)(u(x00), u(x01), u(x10), u(x11),
                                                           reinterpret_cast<uint16_t*>(yr), C, s, b);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = ((bn_act_one(static_cast<acc_t>(x00[c]), s[c], b[c], relu) +
                        bn_act_one(static_cast<acc_t>(x01[c]), s[c], b[c], relu)) +
                       bn_act_one(static_cast<acc_t>(x10[c]), s[c], b[c], relu)) +
                      bn_act_one(static_cast<acc_t>(x11[c]), s[c], b[c], relu);
      yr[c] = static_cast<scalar_t>(v * acc_t(0.25));
    }
  }
}

struct Layout {
  int64_t N, C, L, S;
};

// x [N, C, L] stored as [N, L, C] (a channels_last activation viewed as [N, C, H * W]): the CPU kernels
// read it in place instead of taking a transposing copy (recover's NHWC teacher: two ~10 ms copies of
// every 128 x 28 x 28 BN input per iteration, profiled).
bool is_nlc(const Tensor& x) {
  if (x.dim() != 3) return false;
  const int64_t C = x.size(1), L = x.size(2);
  return (C == 1 || x.stride(1) == 1) && (L == 1 || x.stride(2) == C) && (x.size(0) <= 1 || x.stride(0) == C * L) &&
         !x.is_contiguous();
}

// Channels-last forward: per-(sample, channel) exact mean / M2 of the [L, nc] tile p (row stride ldc), the
// channels in SIMD lanes. Sums of x - shift[c] in float (double for float64 x) over at most kNlcFold rows,
// then folded into double; like row_moments, the first sweep shifts by `guess` (else the tile's first row) and
// a second sweep by the first sweep's mean runs when that shift was far from the mean of any channel.
constexpr int64_t kNlcBlock = 64;  // channels per channels-last task (the register-resident sums below)
constexpr int64_t kNlcFold = 16;   // rows per float partial sum

template <typename scalar_t>
void nlc_tile_moments(const scalar_t* p, int64_t ldc, int64_t L, int64_t nc, const double* guess, double* mean,
                      double* m2) {
  using acc_t = typename AccType<scalar_t>::type;
  acc_t shift[kNlcBlock];
  double s1[kNlcBlock], s2[kNlcBlock];
  for (int64_t c = 0; c < nc; ++c) shift[c] = guess ? static_cast<acc_t>(guess[c]) : static_cast<acc_t>(p[c]);
  const double inv_l = 1.0 / static_cast<double>(L);
  for (int sweep = 0; sweep < 2; ++sweep) {
    for (int64_t c = 0; c < nc; ++c) s1[c] = s2[c] = 0.0;
    for (int64_t l0 = 0; l0 < L; l0 += kNlcFold) {
      acc_t a1[kNlcBlock] = {}, a2[kNlcBlock] = {};
      const int64_t l1 = std::min(L, l0 + kNlcFold);
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (nc == 64) {
          nlc_sums64_f32(p + l0 * ldc, ldc, l1 - l0, shift, a1, a2);
        } else {
          nlc_sums_f32(p + l0 * ldc, ldc, l1 - l0, nc, shift, a1, a2);
        }
      } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
        const uint16_t* q = reinterpret_cast<const uint16_t*>(p) + l0 * ldc;
        if (nc == 64) {
          nlc_sums64_bf16(q, ldc, l1 - l0, shift, a1, a2);
        } else {
          nlc_sums_bf16(q, ldc, l1 - l0, nc, shift, a1, a2);
        }
      } else {
        for (int64_t l = l0; l < l1; ++l) {
          const scalar_t* row = p + l * ldc;
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t d = static_cast<acc_t>(row[c]) - shift[c];
            a1[c] += d;
            a2[c] += d * d;
          }
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        s1[c] += static_cast<double>(a1[c]);
        s2[c] += static_cast<double>(a2[c]);
      }
    }
    bool again = false;
    for (int64_t c = 0; c < nc; ++c) {
      const double d1 = s1[c] * inv_l;
      mean[c] = static_cast<double>(shift[c]) + d1;
      m2[c] = std::max(s2[c] - s1[c] * d1, 0.0);
      again = again || d1 * d1 > 2.0 * m2[c] * inv_l;  // shift beyond ~1.5 std of the mean
    }
    if (sweep == 1 || !again) break;
    for (int64_t c = 0; c < nc; ++c) shift[c] = static_cast<acc_t>(mean[c]);
  }
}

Layout check_common(const Tensor& x, const Tensor& seg, const Tensor& tm, const Tensor& tv) {
  TORCH_CHECK(x.dim() == 3, "segment_bn_loss: x must be [N, C, L], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous() || is_nlc(x),
              "segment_bn_loss: x must be contiguous [N, C, L] or channels-last (strides (C*L, 1, C))");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "segment_bn_loss: x must be float32/float64/float16/bfloat16, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  TORCH_CHECK(C >= 1 && L >= 1, "segment_bn_loss: x must have C >= 1 and L >= 1, got ", x.sizes());
  TORCH_CHECK(seg.dim() == 1 && seg.size(0) == N && seg.scalar_type() == at::kLong && seg.is_contiguous(),
              "segment_bn_loss: segment_ids must be a contiguous int64 [N] tensor");
  TORCH_CHECK(tm.dim() == 2 && tm.size(1) == C && tm.size(0) >= 1 && tm.scalar_type() == at::kDouble &&
                  tm.is_contiguous(),
              "segment_bn_loss: target_mean must be a contiguous float64 [S, C] tensor, got ", tm.sizes());
  TORCH_CHECK(tv.sizes() == tm.sizes() && tv.scalar_type() == at::kDouble && tv.is_contiguous(),
              "segment_bn_loss: target_var must be a contiguous float64 tensor shaped like target_mean");
  for (const Tensor* t : {&seg, &tm, &tv}) {
    TORCH_CHECK(t->device() == x.device(), "segment_bn_loss: all inputs must be on ", x.device());
  }
  return {N, C, L, tm.size(0)};
}

// Counting sort of the rows by segment: offsets [S + 1], order [N]; checks the range.
void sort_by_segment(const int64_t* seg, int64_t N, int64_t S, std::vector<int64_t>& offsets,
                     std::vector<int64_t>& order) {
  offsets.assign(S + 1, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t s = seg[n];
    TORCH_CHECK_INDEX(s >= 0 && s < S, "segment_bn_loss: segment_ids holds ", s, " outside [0, ", S, ")");
    ++offsets[s + 1];
  }
  for (int64_t s = 0; s < S; ++s) offsets[s + 1] += offsets[s];
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  order.resize(N);
  for (int64_t n = 0; n < N; ++n) order[fill[seg[n]]++] = n;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> segment_bn_loss_fwd_cpu(const Tensor& x, const Tensor& segment_ids,
                                                                    const Tensor& target_mean,
                                                                    const Tensor& target_var) {
  const Layout d = check_common(x, segment_ids, target_mean, target_var);
  const int64_t N = d.N, C = d.C, L = d.L, S = d.S;
  const auto f64 = x.options().dtype(at::kDouble);
  Tensor loss = at::zeros({S}, f64);
  Tensor mean = at::zeros({S, C}, f64);
  Tensor var = at::zeros({S, C}, f64);
  Tensor count = at::zeros({S}, x.options().dtype(at::kLong));

  std::vector<int64_t> offsets, order;
  sort_by_segment(segment_ids.data_ptr<int64_t>(), N, S, offsets, order);
  int64_t* cnt = count.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) cnt[s] = offsets[s + 1] - offsets[s];
  if (N == 0) return {loss, mean, var, count};

  // 1. moments: tasks = (segment, block of kChannelBlock channels); a task walks the
  //    segment's rows, reduces each row (n, c) to (mean, M2) while it is in cache and
  //    merges it into the running float64 state of (s, c) with Chan's formula (all
  //    rows hold L elements, so row i of the segment merges with weight 1 / (i + 1)).
  //    No per-row buffer: x is read once, the state is the output.
  double* pm = mean.data_ptr<double>();
  double* pv = var.data_ptr<double>();
  const int64_t n_cb = (C + kChannelBlock - 1) / kChannelBlock;
  const double dl = static_cast<double>(L);
  const int64_t work_per_task = std::max<int64_t>(1, (N / S) * std::min(C, kChannelBlock) * L);
  const bool nlc = is_nlc(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_bn_loss_fwd_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    if (nlc) {
      const int64_t n_blk = (C + kNlcBlock - 1) / kNlcBlock;
      const int64_t work = std::max<int64_t>(1, (N / S) * std::min(C, kNlcBlock) * L);
      at::parallel_for(0, S * n_blk, std::max<int64_t>(1, 32768 / work), [&](int64_t begin, int64_t end) {
        double rm[kNlcBlock], r2[kNlcBlock];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t s = t / n_blk;
          const int64_t c0 = (t % n_blk) * kNlcBlock, nc = std::min(C, c0 + kNlcBlock) - c0;
          double* ms = pm + s * C + c0;
          double* vs = pv + s * C + c0;  // M2 until finalised below
          for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) {
            const double i = static_cast<double>(j - offsets[s]);
            const double w_new = 1.0 / (i + 1.0), w_cross = dl * i * w_new;
            // Shifted by the segment's running mean once there is one: closer to this sample's mean than its
            // first row usually is, which saves the second sweep.
            nlc_tile_moments<scalar_t>(px + order[j] * C * L + c0, C, L, nc, j > offsets[s] ? ms : nullptr, rm, r2);
            for (int64_t c = 0; c < nc; ++c) {  // Chan's merge, as below
              const double delta = rm[c] - ms[c];
              ms[c] += delta * w_new;
              vs[c] += r2[c] + delta * delta * w_cross;
            }
          }
        }
      });
      return;
    }
    at::parallel_for(0, S * n_cb, std::max<int64_t>(1, 32768 / work_per_task), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> tmp(kDirect<scalar_t> ? 0 : kChunk);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t s = t / n_cb;
        const int64_t c0 = (t % n_cb) * kChannelBlock, c1 = std::min(C, c0 + kChannelBlock);
        double* ms = pm + s * C;
        double* vs = pv + s * C;  // M2 until finalised below
        for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) {
          const double i = static_cast<double>(j - offsets[s]);  // rows merged so far
          const double w_new = 1.0 / (i + 1.0), w_cross = dl * i * w_new;
          const scalar_t* xr = px + (order[j] * C + c0) * L;
          for (int64_t c = c0; c < c1; ++c, xr += L) {
            double rm, r2;
            row_moments<scalar_t>(xr, L, tmp.data(), rm, r2);
            const double delta = rm - ms[c];
            ms[c] += delta * w_new;
            vs[c] += r2 + delta * delta * w_cross;
          }
        }
      }
    });
  });

  // 2. per segment: variance and loss
  const double* ptm = target_mean.const_data_ptr<double>();
  const double* ptv = target_var.const_data_ptr<double>();
  double* pl = loss.data_ptr<double>();
  at::parallel_for(0, S, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      if (cnt[s] == 0) continue;
      const double inv_n = 1.0 / (static_cast<double>(cnt[s]) * dl);
      double sm = 0.0, sv = 0.0;
      for (int64_t c = s * C; c < (s + 1) * C; ++c) {
        pv[c] *= inv_n;
        const double em = ptm[c] - pm[c];
        const double ev = ptv[c] - pv[c];
        sm += em * em;
        sv += ev * ev;
      }
      pl[s] = std::sqrt(sm) + std::sqrt(sv);
    }
  });
  return {loss, mean, var, count};
}

// The eval-mode BN path of segment_bn_loss_bwd_bn_eval: its upstream gradient and the BN's per-channel
// affine (y = act(x * scale + shift)); null for the plain loss backward.
struct BnPath {
  const Tensor* grad_y;
  const Tensor* scale;
  const Tensor* shift;
  bool relu;
  int64_t width;  // x's W when pooled (x [N, C, H * W] channels-last, grad_y [N, C, (H / 2) * (W / 2)])
  int64_t pool;   // 1, or 2 for a 2x2 / stride-2 average pool after the activation
};

// Same shape, and the same strides wherever a dimension has more than one element (a size-1 dimension's
// stride is arbitrary: a channels-last [N, C, 1, 1] map viewed as [N, C, 1] is also contiguous).
bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_bn_affine(const char* op, const Tensor& x, const Tensor& scale, const Tensor& shift) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32/float64/float16/bfloat16, got ", x.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const Tensor* t : {&scale, &shift}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->scalar_type() == acc && t->is_contiguous() &&
                    t->device() == x.device(),
                op, ": scale and shift must be contiguous [C] tensors of ", acc, " on x's device, got ",
                t->sizes(), " ", t->scalar_type());
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
      TORCH_CHECK(bn->width >= 2 && L % bn->width == 0 && L / bn->width >= 2 && (is_nlc(x) || C == 1),
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
    if (is_nlc(x) || (pool == 2 && C == 1)) {  // rows of C channels, coefficients in lanes
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
      int64_t n = begin / C, c = begin % C;
      int64_t i = seg[n] * C + c;
      for (int64_t r = begin; r < end; ++r, ++i) {
        if (c == C) {  // next sample
          c = 0;
          i = seg[++n] * C;
        }
        const acc_t sc = scale[i], al = alpha[i], hi = mhi[i], lo = mlo[i];
        const scalar_t* xr = px + r * L;
        scalar_t* gr = pg + r * L;
        if (pgy != nullptr) {  // the BN path (not recover's hot layout: plain loop)
          const scalar_t* gyr = pgy + r * L;
          const acc_t s = bs[c], b = bb[c];
          for (int64_t k = 0; k < L; ++k) {
            const acc_t xv = static_cast<acc_t>(xr[k]);
            gr[k] = static_cast<scalar_t>(affine_one(xv, sc, al, hi, lo) +
                                          bn_grad_one(xv, static_cast<acc_t>(gyr[k]), s, b, relu));
          }
        } else if (L <= kShortRow) {  // inline for short rows (no call per row)
          for (int64_t k = 0; k < L; ++k) {
            gr[k] = static_cast<scalar_t>(affine_one(static_cast<acc_t>(xr[k]), sc, al, hi, lo));
          }
        } else {
          grad_row<scalar_t>(xr, gr, L, sc, al, hi, lo, tmp.data());
        }
        ++c;
      }
    });
  });
  return grad_x;
}

Tensor segment_bn_loss_bwd_cpu(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids,
                               const Tensor& target_mean, const Tensor& target_var, const Tensor& mean,
                               const Tensor& var, const Tensor& count) {
  return bwd_impl(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count, nullptr);
}

Tensor segment_bn_loss_bwd_bn_eval_cpu(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids,
                                       const Tensor& target_mean, const Tensor& target_var, const Tensor& mean,
                                       const Tensor& var, const Tensor& count, const Tensor& grad_y,
                                       const Tensor& scale, const Tensor& shift, bool relu, int64_t width,
                                       int64_t pool) {
  const BnPath bn{&grad_y, &scale, &shift, relu, width, pool};
  return bwd_impl(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count, &bn);
}

// out = act(x * scale + shift) per channel; out has x's shape and strides (contiguous [N, C, L] or
// channels-last). The caller allocates out so that the tensor it returns is not a view (autograd refuses
// in-place ops, e.g. a ResNet's ReLU(inplace=True), on view outputs of a multi-output Function).
void bn_eval_act_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, bool relu, const Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && (x.is_contiguous() || is_nlc(x)),
              "bn_eval_act: x must be contiguous [N, C, L] or channels-last (strides (C*L, 1, C)), got ", x.sizes(),
              " / ", x.strides());
  check_bn_affine("bn_eval_act", x, scale, shift);
  TORCH_CHECK(same_layout(out, x) && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "bn_eval_act: out must have x's shape, strides and dtype, got ", out.sizes(), " / ", out.strides());
  const Tensor& y = out;
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  if (y.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_act_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const acc_t* s = scale.const_data_ptr<acc_t>();
    const acc_t* b = shift.const_data_ptr<acc_t>();
    if (is_nlc(x)) {
      at::parallel_for(0, N * L, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) nlc_bn_row<scalar_t>(px + r * C, py + r * C, C, s, b, relu);
      });
      return;
    }
    at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t sc = s[r % C], sh = b[r % C];
        const scalar_t* xr = px + r * L;
        scalar_t* yr = py + r * L;
        for (int64_t k = 0; k < L; ++k) {
          yr[k] = static_cast<scalar_t>(bn_act_one(static_cast<acc_t>(xr[k]), sc, sh, relu));
        }
      }
    });
  });
}

// y = avg_pool2d(act(x * scale + shift), 2) for a channels-last x [N, C, H * W] (floor mode: an odd last
// row / column is dropped); y [N, C, (H / 2) * (W / 2)] channels-last. x is read once, only y is written.
void bn_eval_act_pool2_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, bool relu, int64_t width,
                           const Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && (is_nlc(x) || (x.size(1) == 1 && x.is_contiguous())),
              "bn_eval_act_pool2: x must be channels-last [N, C, H * W] (strides (C*L, 1, C)), got ", x.sizes(),
              " / ", x.strides());
  check_bn_affine("bn_eval_act_pool2", x, scale, shift);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), W = width;
  TORCH_CHECK(W >= 2 && L % W == 0 && L / W >= 2, "bn_eval_act_pool2: need H, W >= 2 with L = H * W (L = ", L,
              ", W = ", W, ")");
  const int64_t OH = (L / W) / 2, OW = W / 2;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == N && out.size(1) == C && out.size(2) == OH * OW &&
                  (out.stride(1) == 1 || C == 1) && (out.stride(2) == C || OH * OW == 1) &&
                  (out.stride(0) == C * OH * OW || N <= 1) && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "bn_eval_act_pool2: out must be channels-last [N, C, (H / 2) * (W / 2)] of x's dtype, got ", out.sizes(),
              " / ", out.strides());
  const Tensor& y = out;
  if (y.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_act_pool2_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const acc_t* s = scale.const_data_ptr<acc_t>();
    const acc_t* b = shift.const_data_ptr<acc_t>();
    at::parallel_for(0, N * OH * OW, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / (OH * OW), oh = (r / OW) % OH, ow = r % OW;
        const scalar_t* x00 = px + (n * L + (2 * oh) * W + 2 * ow) * C;
        nlc_bn_pool2_row<scalar_t>(x00, W * C, py + r * C, C, s, b, relu);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lpqld, CPU, m) {
  m.impl("segment_bn_loss_fwd", &segment_bn_loss_fwd_cpu);
  m.impl("segment_bn_loss_bwd", &segment_bn_loss_bwd_cpu);
  m.impl("segment_bn_loss_bwd_bn_eval", &segment_bn_loss_bwd_bn_eval_cpu);
  m.impl("bn_eval_act", &bn_eval_act_cpu);
  m.impl("bn_eval_act_pool2", &bn_eval_act_pool2_cpu);
}
