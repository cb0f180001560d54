// Row kernels of the soft-label KL CPU kernel: the float SIMD loops (templates on the vector type, one
// instantiation per ISA variant) and their float64 scalar twins with std::exp (gradcheck).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu/simd_exp.h"
#include "cpu/simd_float.h"

namespace lpqld::slkl_cpu {

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

}  // namespace lpqld::slkl_cpu
