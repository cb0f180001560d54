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
// The files: simd_float.h / simd_exp.h (vectors, exp), soft_label_kl_rows.h (row loops),
// label_decode.h (stored rows), soft_label_kl_topk.h (one top-k row), soft_label_kl_variants.cpp
// (the per-ISA instantiations and their selection); this file runs the rows and registers the kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/op_math.h"
#include "cpu/label_decode.h"
#include "cpu/output_pool.h"
#include "cpu/soft_label_kl_cpu.h"
#include "cpu/soft_label_kl_rows.h"
#include "cpu/soft_label_kl_topk.h"

namespace lpqld::slkl_cpu {

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

template <typename scalar_t>
void run(const Problem& P, const at::Tensor& logits, at::Tensor& grad, at::Tensor& loss_rows) {
  using acc_t = opmath_t<scalar_t>;
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
  // Pooled: the gradient dies after the student's backward, so the next step reuses its pages; a fresh 41 MiB
  // tensor (B 1024, C 10450) is mapped and faulted in on every call (~5 ms of a ~15 ms call on the CPU).
  at::Tensor grad = lpqld::pooled_empty({B, C}, logits.scalar_type());
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
