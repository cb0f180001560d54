// The hot loops of the segment_bn_loss and bn_eval CPU kernels (declared in segment_bn_kernels.h).
#include "cpu/segment_bn_kernels.h"

#include <cmath>
#include <cstdint>

namespace lpqld::sbl_cpu {

// Every loop here is vectorised with `omp simd` and compiled per ISA level
// (function multiversioning: AVX-512 / AVX2+FMA / baseline, picked at load
// time), since the extension itself is built with portable flags. Other files
// call them through the plain declarations of segment_bn_kernels.h (the ifunc).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define LPQLD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LPQLD_CLONES
#endif

// affine_one (segment_bn_kernels.h) over `rows` consecutive rows of n elements, row r with the coefficients
// sc[r], al[r], hi[r], lo[r]: one call per run of channels, so short rows (7x7 maps) pay no call per row.
#define LPQLD_AFFINE_ROWS(T, NAME)                                                                        \
  LPQLD_CLONES void NAME(const T* x, T* g, int64_t n, int64_t rows, const T* sc, const T* al, const T* hi, \
                         const T* lo) {                                                                   \
    for (int64_t r = 0; r < rows; ++r, x += n, g += n) {                                                  \
      const T s = sc[r], a = al[r], h = hi[r], l = lo[r];                                                 \
      _Pragma("omp simd") for (int64_t i = 0; i < n; ++i) g[i] = affine_one(x[i], s, a, h, l);           \
    }                                                                                                     \
  }
LPQLD_AFFINE_ROWS(float, affine_rows_f32)
LPQLD_AFFINE_ROWS(double, affine_rows_f64)

// Channels-last loops (channels in SIMD lanes), compiled per ISA like the two above, for float and bfloat16
// (what recover's NHWC teacher produces); other types take the generic templates of the kernels.
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
// A whole [nl, 64] channels-last tile at once: per run of `fold` rows the float sums of x - shift and of their
// squares, added in double into s1, s2 (zeroed here). Per half of 32 channels, so the running sums, the shifts
// and a row fit AVX2's 16 vector registers (64 channels spilled them); the second half rereads the run's rows
// from L1. One call per tile, so the fold of each run into double is vectorised per ISA too.
#define LPQLD_NLC_MOMENTS64(T, NAME)                                                                          \
  LPQLD_CLONES void NAME(const T* p, int64_t ldc, int64_t nl, int64_t fold, const float* shift, double* s1,   \
                         double* s2) {                                                                        \
    for (int c = 0; c < 64; ++c) s1[c] = s2[c] = 0.0;                                                         \
    for (int64_t l0 = 0; l0 < nl; l0 += fold) {                                                               \
      const int64_t l1 = l0 + fold < nl ? l0 + fold : nl;                                                     \
      for (int h = 0; h < 64; h += 32) {                                                                      \
        float b1[32] = {}, b2[32] = {}, sh[32];                                                               \
        for (int c = 0; c < 32; ++c) sh[c] = shift[h + c];                                                    \
        for (int64_t l = l0; l < l1; ++l) {                                                                   \
          const T* row = p + l * ldc + h;                                                                     \
          _Pragma("omp simd") for (int c = 0; c < 32; ++c) {                                                  \
            const float d = load_as_float(row[c]) - sh[c];                                                    \
            b1[c] += d;                                                                                       \
            b2[c] += d * d;                                                                                   \
          }                                                                                                   \
        }                                                                                                     \
        _Pragma("omp simd") for (int c = 0; c < 32; ++c) {                                                    \
          s1[h + c] += static_cast<double>(b1[c]);                                                            \
          s2[h + c] += static_cast<double>(b2[c]);                                                            \
        }                                                                                                     \
      }                                                                                                       \
    }                                                                                                         \
  }

LPQLD_NLC_SUMS(float, nlc_sums_f32)
LPQLD_NLC_SUMS(uint16_t, nlc_sums_bf16)
LPQLD_NLC_MOMENTS64(float, nlc_moments64_f32)
LPQLD_NLC_MOMENTS64(uint16_t, nlc_moments64_bf16)
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

}  // namespace lpqld::sbl_cpu
