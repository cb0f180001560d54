// The helpers that the C++ autograd of lpqld::segment_bn_loss (csrc/segment_bn_loss.cpp) and of
// lpqld::bn_eval_segment_loss (csrc/bn_eval.cpp) share: the dispatched kernel calls and x's kernel layout.
// Host code only (the dispatcher, symbolic sizes).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace lpqld::sbl {

using at::Tensor;

using FwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                           const Tensor&);

inline std::tuple<Tensor, Tensor, Tensor, Tensor> call_fwd(const Tensor& x3, const Tensor& seg,
                                                           const Tensor& tm, const Tensor& tv) {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lpqld::segment_bn_loss_fwd", "").typed<FwdSig>();
  return op.call(x3, seg, tm, tv);
}

inline Tensor call_bwd(const Tensor& g, const Tensor& x3, const Tensor& seg, const Tensor& tm, const Tensor& tv,
                       const Tensor& mean, const Tensor& var, const Tensor& count) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lpqld::segment_bn_loss_bwd", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                     const Tensor&, const Tensor&, const Tensor&)>();
  return op.call(g, x3, seg, tm, tv, mean, var, count);
}

// x [N, C, L] stored as [N, L, C] (a channels-last activation): strides (C*L, 1, C). Symbolic-size safe.
inline bool is_nlc(const Tensor& x3) {
  const c10::SymInt& C = x3.sym_size(1);
  const c10::SymInt& L = x3.sym_size(2);
  return (C == 1 || x3.sym_stride(1) == 1) && (L == 1 || x3.sym_stride(2) == C) &&
         (x3.sym_size(0) <= 1 || x3.sym_stride(0) == C * L) && !x3.is_contiguous();
}

// x as [N, C, L] for the kernels: the CPU kernels read a channels-last x in place, the GPU kernels take
// contiguous input.
inline Tensor kernel_x3(const Tensor& x) {
  c10::SymInt L = 1;
  for (int64_t d = 2; d < x.dim(); ++d) L = L * x.sym_size(d);
  Tensor x3 = x.reshape_symint({x.sym_size(0), x.sym_size(1), L});
  return (x.is_cpu() && is_nlc(x3)) || x3.is_contiguous() ? x3 : x3.contiguous();
}

inline at::ScalarType acc_type(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// t as a contiguous tensor of dtype st, with no dispatched no-op: below autograd, .to / .contiguous that
// change nothing return their input, which the custom-op schema checks (opcheck) refuse.
inline Tensor converted(const Tensor& t, at::ScalarType st) {
  const Tensor r = t.scalar_type() == st ? t : t.to(st);
  return r.is_contiguous() ? r : r.contiguous();
}

inline void check_x(const char* op, const Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, op, ": x must be [N, C, *spatial], got ", x.sym_sizes());
}

}  // namespace lpqld::sbl
