// One row of a top-k mode (steps 1-5 of soft_label_kl_cpu.cpp's header comment), written once over the
// row operations of an accumulation type and vector width (SimdOps: float, per ISA; ScalarOps64: float64).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/label_decode.h"
#include "cpu/simd_exp.h"
#include "cpu/simd_float.h"
#include "cpu/soft_label_kl_cpu.h"
#include "cpu/soft_label_kl_rows.h"

namespace lpqld::slkl_cpu {

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

// Steps 1-5 of soft_label_kl_cpu.cpp's header comment for row R.b; returns its DataError bits (0: loss and
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

}  // namespace lpqld::slkl_cpu
