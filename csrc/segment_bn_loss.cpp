// Schemas of the fused segmented BN-statistics matching loss (recover, DESIGN 2.2).
//
// segment_bn_loss_fwd(x, segment_ids, target_mean, target_var)
//     -> (loss, mean, var, count)
//   x [N, C, L] contiguous float32/float16/bfloat16/float64, segment_ids [N]
//   int64 in [0, S), target_mean/target_var [S, C] contiguous float64.
//   One pass over x: per (sample, channel) row the exact mean and M2, then the
//   rows of each segment are combined (equal counts L) in float64.
//   loss [S] float64: ||target_mean[s] - mean[s]|| + ||target_var[s] - var[s]||
//   (0 for empty segments); mean, var [S, C] float64 (biased var; 0 when
//   empty); count [S] int64 samples per segment.
//
// segment_bn_loss_bwd(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count)
//     -> grad_x
//   grad_loss [S] float64; the rest as produced/consumed by the forward.
//   One elementwise pass: grad_x[n, c, l] = scale[s, c] * (x - mean[s, c]) + alpha[s, c]
//   with s = segment_ids[n], n_s = count[s] * L,
//     alpha = g_s * (mean - target_mean) / ||mean - target_mean|| / n_s
//     scale = g_s * 2 * (var - target_var) / ||var - target_var|| / n_s
//   (a direction with zero norm contributes 0). grad_x has x's dtype and shape.
//
// The public ops, with C++ autograd (what lpqld_fast.ops calls; fake implementations in lpqld_fast/ops/_fake.py):
// segment_bn_loss(x, segment_ids, target_mean, target_var) -> loss
//   x [N, C, *spatial] any float dtype and strides; segment_ids [N] any integer dtype; targets [S, C] floats
//   (constants: no gradient). loss [S] float32 (float64 for float64 x). Differentiable w.r.t. x once; the
//   gradient has x's shape, channels-last for a channels-last 4-D x.
//
// The eval-mode BN ops (bn_eval_act, bn_eval_act_pool2, segment_bn_loss_bwd_bn_eval, bn_eval_segment_loss)
// have their schemas in csrc/bn_eval.cpp.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "common/checks.h"
#include "segment_bn_loss.h"

namespace lpqld {

SegmentBNLayout check_segment_bn_loss_args(const at::Tensor& x, const at::Tensor& seg, const at::Tensor& tm,
                                           const at::Tensor& tv) {
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
  for (const at::Tensor* t : {&seg, &tm, &tv}) {
    TORCH_CHECK(t->device() == x.device(), "segment_bn_loss: all inputs must be on ", x.device());
  }
  return {N, C, L, tm.size(0)};
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace lpqld::sbl;

class SegmentBNLossFunction : public torch::autograd::Function<SegmentBNLossFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& segment_ids, const Tensor& target_mean,
                        const Tensor& target_var) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_x("segment_bn_loss", x);
    const Tensor x3 = kernel_x3(x);
    const Tensor seg = converted(segment_ids, at::kLong);
    const Tensor tm = converted(target_mean, at::kDouble);
    const Tensor tv = converted(target_var, at::kDouble);
    auto [loss, mean, var, count] = call_fwd(x3, seg, tm, tv);
    ctx->save_for_backward({x3, seg, tm, tv, mean, var, count});
    ctx->saved_data["sizes"] = x.sym_sizes();
    // Hand the gradient back in x's layout: autograd adds it to the BN path's gradient, and adding an NCHW
    // tensor to an NHWC one is a slow strided pass (3x the cost of this conversion, profiled).
    ctx->saved_data["channels_last"] =
        x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
    return converted(loss, acc_type(x));
  }

  // The backward kernels have no derivative: a double backward through them raises (once differentiable).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const Tensor g = converted(grad_outputs[0], at::kDouble);
    Tensor grad = call_bwd(g, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6])
                      .view_symint(ctx->saved_data["sizes"].toSymIntVector());
    if (ctx->saved_data["channels_last"].toBool()) grad = grad.contiguous(at::MemoryFormat::ChannelsLast);
    return {grad, Tensor(), Tensor(), Tensor()};
  }
};

Tensor segment_bn_loss_autograd(const Tensor& x, const Tensor& segment_ids, const Tensor& target_mean,
                                const Tensor& target_var) {
  return SegmentBNLossFunction::apply(x, segment_ids, target_mean, target_var);
}

Tensor segment_bn_loss_no_grad(const Tensor& x, const Tensor& segment_ids, const Tensor& target_mean,
                               const Tensor& target_var) {
  check_x("segment_bn_loss", x);
  auto [loss, mean, var, count] = call_fwd(kernel_x3(x), converted(segment_ids, at::kLong),
                                           converted(target_mean, at::kDouble),
                                           converted(target_var, at::kDouble));
  return converted(loss, acc_type(x));
}

}  // namespace
}  // namespace lpqld

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.set_python_module("lpqld_fast.ops._fake");  // fake (meta) implementations for torch.compile / opcheck
  m.def("segment_bn_loss(Tensor x, Tensor segment_ids, Tensor target_mean, Tensor target_var) -> Tensor");
  m.def(
      "segment_bn_loss_fwd(Tensor x, Tensor segment_ids, Tensor target_mean, Tensor target_var)"
      " -> (Tensor loss, Tensor mean, Tensor var, Tensor count)");
  m.def(
      "segment_bn_loss_bwd(Tensor grad_loss, Tensor x, Tensor segment_ids, Tensor target_mean, "
      "Tensor target_var, Tensor mean, Tensor var, Tensor count) -> Tensor");
}

TORCH_LIBRARY_IMPL(lpqld, Autograd, m) {
  m.impl("segment_bn_loss", &lpqld::segment_bn_loss_autograd);
  // The kernels under it are not differentiable themselves: backprop through a direct call raises.
  m.impl("segment_bn_loss_fwd", torch::autograd::autogradNotImplementedFallback());
  m.impl("segment_bn_loss_bwd", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(lpqld, CompositeExplicitAutograd, m) { m.impl("segment_bn_loss", &lpqld::segment_bn_loss_no_grad); }
