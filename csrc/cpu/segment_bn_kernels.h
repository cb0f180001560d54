// The hot loops of the segment_bn_loss and bn_eval CPU kernels, compiled per ISA level in
// segment_bn_kernels.cpp, and the scalar element rules they share with the generic paths.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lpqld::sbl_cpu {

constexpr int64_t kChunk = 256;  // elements per float partial sum, then folded into double: bounds the
                                // float rounding even where the compiler does not split the sum into lanes (-O1)

// g[i] = sc * ((x[i] - hi) - lo) + al. For float the product and the sum are
// taken in double: a product of two floats is exact in double, so the result is
// rounded once (like an FMA) whether or not the compiler contracts (it does at
// -O3 in the AVX2/AVX-512 clones, not at -O1 or in the baseline clone). With
// |mean| >> std, al nearly cancels sc * d and a float product's rounding showed.
inline float affine_one(float x, float sc, float al, float hi, float lo) {
  return static_cast<float>(static_cast<double>(sc) * static_cast<double>((x - hi) - lo) + static_cast<double>(al));
}
inline double affine_one(double x, double sc, double al, double hi, double lo) { return sc * ((x - hi) - lo) + al; }

// bfloat16 is read as its bits (<< 16 is the exact float) and written with c10's round-to-nearest-even
// (NaN -> 0x7FC0), so the channels-last gradient has the bits of the contiguous path's static_cast.
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

// Per-ISA loops (segment_bn_kernels.cpp). f32 / bf16: float / bfloat16 bits; id / relu: the activation.
void affine_rows_f32(const float* x, float* g, int64_t n, int64_t rows, const float* sc, const float* al,
                     const float* hi, const float* lo);
void affine_rows_f64(const double* x, double* g, int64_t n, int64_t rows, const double* sc, const double* al,
                     const double* hi, const double* lo);
#define LPQLD_NLC_DECLS(T, S)                                                                                    \
  void nlc_sums_##S(const T* p, int64_t ldc, int64_t nl, int64_t nc, const float* shift, float* a1, float* a2);  \
  void nlc_moments64_##S(const T* p, int64_t ldc, int64_t nl, int64_t fold, const float* shift, double* s1,      \
                         double* s2);                                                                            \
  void nlc_affine_##S(const T* x, T* g, int64_t n, const float* sc, const float* al, const float* hi,           \
                      const float* lo);                                                                          \
  void nlc_bn_id_##S(const T* x, T* y, int64_t n, const float* s, const float* b);                              \
  void nlc_bn_relu_##S(const T* x, T* y, int64_t n, const float* s, const float* b);                            \
  void nlc_affine_bn_id_##S(const T* x, const T* gy, T* g, int64_t n, const float* sc, const float* al,         \
                            const float* hi, const float* lo, const float* s, const float* b, const float* gs);  \
  void nlc_affine_bn_relu_##S(const T* x, const T* gy, T* g, int64_t n, const float* sc, const float* al,       \
                              const float* hi, const float* lo, const float* s, const float* b, const float* gs); \
  void nlc_bn_pool2_id_##S(const T* x00, const T* x01, const T* x10, const T* x11, T* y, int64_t n,             \
                           const float* s, const float* b);                                                      \
  void nlc_bn_pool2_relu_##S(const T* x00, const T* x01, const T* x10, const T* x11, T* y, int64_t n,           \
                             const float* s, const float* b);
LPQLD_NLC_DECLS(float, f32)
LPQLD_NLC_DECLS(uint16_t, bf16)
#undef LPQLD_NLC_DECLS

inline void affine_rows(const float* x, float* g, int64_t n, int64_t rows, const float* sc, const float* al,
                        const float* hi, const float* lo) {
  affine_rows_f32(x, g, n, rows, sc, al, hi, lo);
}
inline void affine_rows(const double* x, double* g, int64_t n, int64_t rows, const double* sc, const double* al,
                        const double* hi, const double* lo) {
  affine_rows_f64(x, g, n, rows, sc, al, hi, lo);
}

}  // namespace lpqld::sbl_cpu
