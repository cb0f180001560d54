// The row-moment kernels shared by the classwise_moments and segment_bn_loss CPU forwards: each row of L
// values to its mean and M2 in double, written once over a vector width; row_moments.cpp instantiates them
// per ISA level behind the entry points declared at the end.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vector types only live inside always-inline helpers
#endif

#define LPQLD_AI [[gnu::always_inline]] inline
// Explicit multiversioning: each ISA level gets its own vector width, because
// a generic vector wider than the hardware's registers is not kept in
// registers by GCC (the 64-byte accumulators of the AVX2 clone lived on the
// stack, a load-add-store chain per vector: 4-12x one read pass).
// __builtin_cpu_supports("x86-64-v3"/"x86-64-v4") needs GCC >= 12; older compilers and clang build the
// one width their flags target (as with -DLPQLD_NO_MULTIVERSION).
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__) && \
    !defined(LPQLD_NO_MULTIVERSION)
#define LPQLD_MULTIVERSION 1
#define LPQLD_TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define LPQLD_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define LPQLD_MULTIVERSION 0
#endif

namespace lpqld::rowk {
constexpr int64_t kChunk = 1024;  // elements per L1-resident chunk

// Generic vectors of B bytes (64: AVX-512, 32: AVX2, 16: SSE2 / NEON).
template <int B> struct Vec;
#define LPQLD_VEC(B)                                            \
  template <> struct Vec<B> {                                   \
    typedef float f __attribute__((vector_size(B)));            \
    typedef double d __attribute__((vector_size(B)));           \
    typedef int32_t i __attribute__((vector_size(B)));          \
    typedef uint32_t u __attribute__((vector_size(B)));         \
    typedef int64_t l __attribute__((vector_size(B)));          \
    typedef uint16_t h __attribute__((vector_size(B / 2)));     \
  };
LPQLD_VEC(64)
LPQLD_VEC(32)
LPQLD_VEC(16)
#undef LPQLD_VEC
typedef Vec<64>::f vf;
typedef Vec<64>::d vd;

enum class In { F32, F64, F16, BF16 };

LPQLD_AI float bf16_to_float(uint16_t h) { return std::bit_cast<float>(static_cast<uint32_t>(h) << 16); }
LPQLD_AI float half_to_float(uint16_t h) {
  const uint32_t sign = (static_cast<uint32_t>(h) & 0x8000u) << 16;
  const uint32_t em = (static_cast<uint32_t>(h) & 0x7fffu) << 13;  // exponent|mantissa at float position
  const uint32_t e = em & 0x0f800000u;
  const float normal = std::bit_cast<float>(em + 0x38000000u);  // rebias 15 -> 127
  // subnormal: 2^-14 * (1 + m/1024) - 2^-14, exact, no denormal arithmetic
  const float subnormal = std::bit_cast<float>(em + 0x38800000u) - 0x1p-14f;
  const float special = std::bit_cast<float>(em | 0x7f800000u);  // inf, nan
  const float mag = e == 0 ? subnormal : (e == 0x0f800000u ? special : normal);
  return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | sign);
}

template <In I, int B> struct Traits;
template <int B> struct Traits<In::F32, B> {
  using S = float; using T = float; using V = typename Vec<B>::f; using M = typename Vec<B>::i;
  static constexpr int W = B / 4;
  LPQLD_AI static V load(const S* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
  LPQLD_AI static T scalar(const S* p) { return *p; }
};
template <int B> struct Traits<In::F64, B> {
  using S = double; using T = double; using V = typename Vec<B>::d; using M = typename Vec<B>::l;
  static constexpr int W = B / 8;
  LPQLD_AI static V load(const S* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
  LPQLD_AI static T scalar(const S* p) { return *p; }
};
template <int B> struct Traits<In::BF16, B> {
  using S = uint16_t; using T = float; using V = typename Vec<B>::f; using M = typename Vec<B>::i;
  static constexpr int W = B / 4;
  LPQLD_AI static V load(const S* p) {
    using vh = typename Vec<B>::h;
    using vu = typename Vec<B>::u;
    vh h; std::memcpy(&h, p, sizeof(vh));
    return reinterpret_cast<V>(__builtin_convertvector(h, vu) << 16);
  }
  LPQLD_AI static T scalar(const S* p) { S h; std::memcpy(&h, p, sizeof(S)); return bf16_to_float(h); }
};
template <int B> struct Traits<In::F16, B> {
  using S = uint16_t; using T = float; using V = typename Vec<B>::f; using M = typename Vec<B>::i;
  static constexpr int W = B / 4;
  LPQLD_AI static V load(const S* p) {
    using vh = typename Vec<B>::h;
    using vu = typename Vec<B>::u;
    using vf = V;
    vh h; std::memcpy(&h, p, sizeof(vh));
    const vu u = __builtin_convertvector(h, vu);
    const vu sign = (u & 0x8000u) << 16;
    const vu em = (u & 0x7fffu) << 13;
    const vu e = em & 0x0f800000u;
    const vf normal = reinterpret_cast<vf>(em + 0x38000000u);
    const vf subnormal = reinterpret_cast<vf>(em + 0x38800000u) - 0x1p-14f;
    const vf special = reinterpret_cast<vf>(em | 0x7f800000u);
    const vf mag = e == 0u ? subnormal : (e == 0x0f800000u ? special : normal);
    return reinterpret_cast<vf>(reinterpret_cast<vu>(mag) | sign);
  }
  LPQLD_AI static T scalar(const S* p) { S h; std::memcpy(&h, p, sizeof(S)); return half_to_float(h); }
};

typedef float vf8 __attribute__((vector_size(32)));
typedef float vf4 __attribute__((vector_size(16)));
typedef double vd4 __attribute__((vector_size(32)));
typedef double vd2 __attribute__((vector_size(16)));

// Horizontal sums by halving (pairwise, no trip through memory).
LPQLD_AI float hsum(const vf& v) {
  const vf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vf4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
LPQLD_AI double hsum(const vd& v) {
  const vd4 a = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  const vd2 b = __builtin_shufflevector(a, a, 0, 1) + __builtin_shufflevector(a, a, 2, 3);
  return b[0] + b[1];
}
LPQLD_AI float hsum(const vf8& v) {
  const vf4 b = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}
LPQLD_AI float hsum(const vf4& v) { return (v[0] + v[2]) + (v[1] + v[3]); }
LPQLD_AI double hsum(const vd4& v) {
  const vd2 b = __builtin_shufflevector(v, v, 0, 1) + __builtin_shufflevector(v, v, 2, 3);
  return b[0] + b[1];
}
LPQLD_AI double hsum(const vd2& v) { return v[0] + v[1]; }

template <typename M, int W>
LPQLD_AI M lane_index() {
  M iota;
#pragma GCC unroll 16
  for (int i = 0; i < W; ++i) iota[i] = i;
  return iota;
}

// Independent accumulators per sum in a chunk: enough to hide the add / FMA
// latency (2 x 64-byte vectors on AVX-512, 4 x 32 or 16 bytes elsewhere).
// Short rows use it too when they hold at least 2 groups of vectors, else 2
// (4 would leave most of a 49-value row to the leftover code).
template <int B> constexpr int kAcc = B == 64 ? 2 : 4;

template <int U, typename V>
LPQLD_AI V tree_sum(const V* a) {
  if constexpr (U == 2) return a[0] + a[1];
  else return (a[0] + a[1]) + (a[2] + a[3]);
}

// Sums x - shift and (x - shift)^2 over the nv full vectors at q, the masked
// tail vector (tail, tail_mask) if rem, into U accumulator pairs: one
// accumulator per vector of a group of U, a leftover vector u into pair u,
// the tail into pair U - 1.
template <int U, typename V, typename M, typename T>
LPQLD_AI void shifted_sums(const T* __restrict__ q, int64_t nv, int rem, const V& tail, const M& tail_mask,
                           T shift, V& s1, V& s2) {
  constexpr int W = sizeof(V) / sizeof(T);
  V b1[U], b2[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) b1[u] = b2[u] = V{};
  int64_t v = 0;
  for (; v + U <= nv; v += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      V x0;
      std::memcpy(&x0, q + (v + u) * W, sizeof(V));
      const V d0 = x0 - shift;
      b1[u] += d0; b2[u] += d0 * d0;
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < U - 1; ++u) {
    if (v < nv) {
      V x0;
      std::memcpy(&x0, q + v * W, sizeof(V));
      const V d0 = x0 - shift;
      b1[u] += d0; b2[u] += d0 * d0;
      ++v;
    }
  }
  if (rem) {
    const V d = tail_mask ? tail - shift : V{};
    b1[U - 1] += d; b2[U - 1] += d * d;
  }
  s1 = tree_sum<U>(b1);
  s2 = tree_sum<U>(b2);
}

// Sum of the nv full vectors at p (converted into buf for 16-bit inputs) and
// of the lanes >= W - rem of the vector ending at p + n (the ragged end, read
// overlapping; requires n >= W), which is returned in tail.
template <In I, int B, int U>
LPQLD_AI typename Traits<I, B>::V plain_sum(const typename Traits<I, B>::S* __restrict__ p, int64_t n, int64_t nv,
                                            int rem, typename Traits<I, B>::T* __restrict__ buf,
                                            const typename Traits<I, B>::M& tail_mask,
                                            typename Traits<I, B>::V& tail) {
  using Tr = Traits<I, B>;
  using V = typename Tr::V;
  constexpr int W = Tr::W;
  constexpr bool kConvert = !std::is_same_v<typename Tr::S, typename Tr::T>;
  V a[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) a[u] = V{};
  int64_t v = 0;
  for (; v + U <= nv; v += U) {
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      const V x0 = Tr::load(p + (v + u) * W);
      if constexpr (kConvert) std::memcpy(buf + (v + u) * W, &x0, sizeof(V));
      a[u] += x0;
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < U - 1; ++u) {
    if (v < nv) {
      const V x0 = Tr::load(p + v * W);
      if constexpr (kConvert) std::memcpy(buf + v * W, &x0, sizeof(V));
      a[u] += x0;
      ++v;
    }
  }
  if (rem) {
    tail = Tr::load(p + n - W);  // kept converted by the caller for the second pass
    a[U - 1] += tail_mask ? tail : V{};
  }
  return tree_sum<U>(a);
}

// (mean, M2) of n (1..kChunk) values at p: corrected two-pass around the
// chunk mean, all in L1 (16-bit inputs are converted once into buf). inv_n
// is 1/n. The ragged end is read as the last full vector of the chunk
// (overlapping, lanes masked); requires n >= W.
template <In I, int B>
LPQLD_AI void chunk_moments(const typename Traits<I, B>::S* __restrict__ p, int64_t n, double inv_n,
                            typename Traits<I, B>::T* __restrict__ buf, double& mean_out, double& m2_out) {
  using Tr = Traits<I, B>;
  using T = typename Tr::T;
  using V = typename Tr::V;
  using M = typename Tr::M;
  constexpr int W = Tr::W;
  constexpr bool kConvert = !std::is_same_v<typename Tr::S, T>;
  const int64_t nv = n / W;
  const int rem = static_cast<int>(n - nv * W);
  const M tail_mask = rem ? lane_index<M, W>() >= (W - rem) : M{};
  V tail = {};
  const T shift = hsum(plain_sum<I, B, kAcc<B>>(p, n, nv, rem, buf, tail_mask, tail)) * static_cast<T>(inv_n);
  const T* q;
  if constexpr (kConvert) q = buf; else q = p;
  V s1v, s2v;
  shifted_sums<kAcc<B>>(q, nv, rem, tail, tail_mask, shift, s1v, s2v);
  const double s1 = static_cast<double>(hsum(s1v));
  const double s2 = static_cast<double>(hsum(s2v));
  mean_out = static_cast<double>(shift) + s1 * inv_n;
  m2_out = std::max(0.0, s2 - s1 * s1 * inv_n);
}

// Transposing horizontal sum of W vectors: lane r of the result is the sum of
// the lanes of v[r] (log2(W) levels of shuffle + add, ~1 op per vector).
LPQLD_AI vf reduce_rows(const vf* v) {
  vf a[8], b[4], c[2];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
template <typename V>  // 8 lanes (vd, vf8)
LPQLD_AI V reduce_rows8(const V* v) {
  V a[4], b[2];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(b[0], b[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(b[0], b[1], 1, 3, 5, 7, 9, 11, 13, 15);
}
template <typename V>  // 4 lanes (vd4, vf4)
LPQLD_AI V reduce_rows4(const V* v) {
  V a[2];
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 4, 5) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 2, 3, 6, 7);
  return __builtin_shufflevector(a[0], a[1], 0, 2, 4, 6) + __builtin_shufflevector(a[0], a[1], 1, 3, 5, 7);
}
template <typename V>  // 2 lanes (vd2)
LPQLD_AI V reduce_rows2(const V* v) {
  return __builtin_shufflevector(v[0], v[1], 0, 2) + __builtin_shufflevector(v[0], v[1], 1, 3);
}
template <int W, typename V>
LPQLD_AI V reduce_rows_w(const V* v) {
  if constexpr (W == 16) return reduce_rows(v);
  else if constexpr (W == 8) return reduce_rows8(v);
  else if constexpr (W == 4) return reduce_rows4(v);
  else return reduce_rows2(v);
}

constexpr int64_t kShortRow = 256;  // rows up to this long are reduced W at a time

// (mean, M2) of W consecutive short rows (W <= length <= kShortRow): the same
// corrected two-pass per row, but the horizontal sums of W rows are done
// together by reduce_rows. buf holds the W converted rows (16-bit inputs).
template <In I, int B, int U>
LPQLD_AI void short_rows_block_u(const typename Traits<I, B>::S* __restrict__ x, int64_t length, double inv_n,
                                 typename Traits<I, B>::T* __restrict__ buf, double* __restrict__ rm,
                                 double* __restrict__ rm2) {
  using Tr = Traits<I, B>;
  using T = typename Tr::T;
  using V = typename Tr::V;
  using M = typename Tr::M;
  constexpr int W = Tr::W;
  constexpr bool kConvert = !std::is_same_v<typename Tr::S, T>;
  const int64_t nv = length / W;  // >= 1
  const int rem = static_cast<int>(length - nv * W);
  const M tail_mask = lane_index<M, W>() >= (W - rem);
  V acc[W], tails[W];
  for (int r = 0; r < W; ++r) {
    T* rbuf = nullptr;
    if constexpr (kConvert) rbuf = buf + r * length;
    acc[r] = plain_sum<I, B, U>(x + r * length, length, nv, rem, rbuf, tail_mask, tails[r]);
  }
  const V shifts = reduce_rows_w<W>(acc) * static_cast<T>(inv_n);
  V sum1[W], sum2[W];
  for (int r = 0; r < W; ++r) {
    const T* q;
    if constexpr (kConvert) q = buf + r * length; else q = x + r * length;
    shifted_sums<U>(q, nv, rem, tails[r], tail_mask, static_cast<T>(shifts[r]), sum1[r], sum2[r]);
  }
  const V s1 = reduce_rows_w<W>(sum1), s2 = reduce_rows_w<W>(sum2);
  for (int r = 0; r < W; ++r) {
    const double d1 = static_cast<double>(s1[r]), d2 = static_cast<double>(s2[r]);
    rm[r] = static_cast<double>(shifts[r]) + d1 * inv_n;
    rm2[r] = std::max(0.0, d2 - d1 * d1 * inv_n);
  }
}
template <In I, int B>
LPQLD_AI void short_rows_block(const typename Traits<I, B>::S* __restrict__ x, int64_t length, double inv_n,
                               typename Traits<I, B>::T* __restrict__ buf, double* __restrict__ rm,
                               double* __restrict__ rm2) {
  constexpr int U = kAcc<B>;
  if constexpr (U > 2) {
    if (length < 2 * U * Traits<I, B>::W) return short_rows_block_u<I, B, 2>(x, length, inv_n, buf, rm, rm2);
  }
  short_rows_block_u<I, B, U>(x, length, inv_n, buf, rm, rm2);
}

// (mean, M2) of a row shorter than one vector: plain two-pass in double.
template <In I, int B>
LPQLD_AI void tiny_row_moments(const typename Traits<I, B>::S* __restrict__ p, int64_t n, double inv_n, double& mean_out,
                               double& m2_out) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(Traits<I, B>::scalar(p + i));
  const double mu = s * inv_n;
  double m2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(Traits<I, B>::scalar(p + i)) - mu;
    m2 += d * d;
  }
  mean_out = mu;
  m2_out = m2;
}

// (mean, M2) of rows [r0, r1) of length L starting at x; chunks Chan-merged in double.
template <In I, int B>
LPQLD_AI void rows_moments(const typename Traits<I, B>::S* __restrict__ x, int64_t length, int64_t r0, int64_t r1,
                           double* __restrict__ rm, double* __restrict__ rm2) {
  using Tr = Traits<I, B>;
  if (length < Tr::W) {
    const double inv = 1.0 / static_cast<double>(length);
    for (int64_t r = r0; r < r1; ++r) tiny_row_moments<I, B>(x + r * length, length, inv, rm[r], rm2[r]);
    return;
  }
  if (length <= kShortRow) {
    alignas(64) typename Tr::T sbuf[kShortRow * Tr::W];
    const double inv = 1.0 / static_cast<double>(length);
    for (; r0 + Tr::W <= r1; r0 += Tr::W)
      short_rows_block<I, B>(x + r0 * length, length, inv, sbuf, rm + r0, rm2 + r0);
  }
  alignas(64) typename Tr::T buf[kChunk];
  // Chunks are kChunk long except the last, which is made at least W long by
  // shortening the one before it (every chunk then holds a full vector).
  const int64_t nchunks = (length + kChunk - 1) / kChunk;
  int64_t last = length - (nchunks - 1) * kChunk;  // 1..kChunk
  int64_t before = kChunk;                         // size of the chunk before the last
  if (nchunks > 1 && last < Tr::W) {
    before -= Tr::W;
    last += Tr::W;
  }
  const double inv_full = 1.0 / static_cast<double>(kChunk);
  const double inv_before = 1.0 / static_cast<double>(before);
  const double inv_last = 1.0 / static_cast<double>(last);
  for (int64_t r = r0; r < r1; ++r) {
    const auto* row = x + r * length;
    double n_acc = 0.0, mean_acc = 0.0, m2_acc = 0.0;
    int64_t off = 0;
    for (int64_t ci = 0; ci < nchunks; ++ci) {
      const bool is_last = ci == nchunks - 1, is_before = ci == nchunks - 2;
      const int64_t n = is_last ? last : (is_before ? before : kChunk);
      const double inv = is_last ? inv_last : (is_before ? inv_before : inv_full);
      double cm, cm2;
      chunk_moments<I, B>(row + off, n, inv, buf, cm, cm2);
      const double nb = static_cast<double>(n);
      if (ci == 0) {
        n_acc = nb; mean_acc = cm; m2_acc = cm2;
      } else {
        const double tot = n_acc + nb, delta = cm - mean_acc;
        mean_acc += delta * (nb / tot);
        m2_acc += cm2 + delta * delta * (n_acc * nb / tot);
        n_acc = tot;
      }
      off += n;
    }
    rm[r] = mean_acc;
    rm2[r] = m2_acc;
  }
}

// Phase 1 over rows [r0, r1) of x [rows, L]: rm[r], rm2[r] = mean and M2 of row r. One entry per input
// type (row_moments.cpp); float16 / bfloat16 as their bits.
void rows_f32(const float* x, int64_t L, int64_t r0, int64_t r1, double* rm, double* rm2);
void rows_f64(const double* x, int64_t L, int64_t r0, int64_t r1, double* rm, double* rm2);
void rows_f16(const uint16_t* x, int64_t L, int64_t r0, int64_t r1, double* rm, double* rm2);
void rows_bf16(const uint16_t* x, int64_t L, int64_t r0, int64_t r1, double* rm, double* rm2);

template <typename scalar_t> struct InOf;
template <> struct InOf<float> { static constexpr In value = In::F32; };
template <> struct InOf<double> { static constexpr In value = In::F64; };
template <> struct InOf<c10::Half> { static constexpr In value = In::F16; };
template <> struct InOf<c10::BFloat16> { static constexpr In value = In::BF16; };

// The entry point for an ATen scalar type.
template <typename scalar_t>
inline void rows(const scalar_t* x, int64_t length, int64_t r0, int64_t r1, double* rm, double* rm2) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    rows_f32(x, length, r0, r1, rm, rm2);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    rows_f64(x, length, r0, r1, rm, rm2);
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    rows_f16(reinterpret_cast<const uint16_t*>(x), length, r0, r1, rm, rm2);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::BFloat16>);
    rows_bf16(reinterpret_cast<const uint16_t*>(x), length, r0, r1, rm, rm2);
  }
}
}  // namespace lpqld::rowk
