// Schemas of recover's supervised eval-mode BN layers (CPU kernels in csrc/cpu/bn_eval_cpu.cpp; other
// devices compose the ops) and the C++ autograd of bn_eval_segment_loss.
//
// bn_eval_act(x, scale, shift, relu, out) -> ()   (writes y into out)
//   x [N, C, L] contiguous or channels-last (strides (C*L, 1, C)); scale, shift [C] contiguous float32
//   (float64 for float64 x). y = relu?(fma(x, scale[c], shift[c])) computed in float32 (float64), in x's
//   dtype and strides (out is allocated by the caller: the tensor it returns is then not a view): a
//   BatchNorm in eval mode (scale = w / sqrt(running_var + eps), shift = b - running_mean
//   * scale), with the ReLU after it when relu is set.
// segment_bn_loss_bwd_bn_eval(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count,
//                             grad_y, scale, shift, relu) -> grad_x
//   segment_bn_loss_bwd's gradient plus the BN path's grad_y * scale[c] (0 where fma(x, scale, shift) <= 0
//   under relu) in one pass; grad_y has x's shape, strides and dtype. With pool == 2 (x channels-last
//   [N, C, H * W], W = width) the layer ends in a 2x2 / stride-2 average pool: grad_y is the pooled gradient
//   [N, C, (H / 2) * (W / 2)] channels-last and each x position takes grad_y of its window / 4 (0 for an odd
//   last row / column, floor mode).
// bn_eval_act_pool2(x, scale, shift, relu, width, out) -> ()   (writes y into out)
//   avg_pool2d(bn_eval_act(x), 2) in one pass for a channels-last x [N, C, H * W]: y [N, C, (H/2) * (W/2)]
//   channels-last, window sums in float32 (float64) in row-major order.
//
// The public op, with C++ autograd (what lpqld_fast.ops calls; fake implementation in lpqld_fast/ops/_fake.py):
// bn_eval_segment_loss(x, segment_ids, target_mean, target_var, scale, shift, relu, pool) -> (y, loss)
//   CPU. y = bn_eval_act of x (pool 2: then avg_pool2d(., 2), x channels-last [N, C, H, W] or C == 1),
//   loss = segment_bn_loss(x, ...). scale / shift are constants like the targets. Differentiable w.r.t. x
//   through both outputs in one backward pass.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "segment_bn_loss.h"

namespace lpqld {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using namespace lpqld::sbl;

// y of the bn_eval_act kernels, allocated by this op so that it is not a view of anything the caller sees
// (autograd refuses in-place ops, e.g. a ResNet's ReLU(inplace=True), on view outputs).
Tensor bn_act(const Tensor& x, const Tensor& x3, const Tensor& s, const Tensor& b, bool relu, int64_t pool) {
  if (pool == 2) {
    TORCH_CHECK_VALUE(x.dim() == 4, "bn_eval_segment_loss: pool 2 needs x [N, C, H, W], got ", x.sym_sizes());
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lpqld::bn_eval_act_pool2", "")
                         .typed<void(const Tensor&, const Tensor&, const Tensor&, bool, int64_t, const Tensor&)>();
    const auto& n = x.sym_size(0);
    const auto& c = x.sym_size(1);
    const c10::SymInt oh = x.sym_size(2) / 2, ow = x.sym_size(3) / 2;
    Tensor y = at::empty_symint({n, c, oh, ow}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    op.call(x3, s, b, relu, x.sym_size(3).guard_int(__FILE__, __LINE__), y.view_symint({n, c, oh * ow}));
    return y;
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lpqld::bn_eval_act", "")
                       .typed<void(const Tensor&, const Tensor&, const Tensor&, bool, const Tensor&)>();
  Tensor y3 = at::empty_strided_symint(x3.sym_sizes(), x3.sym_strides(), x3.options());
  op.call(x3, s, b, relu, y3);
  return y3.view_symint(x.sym_sizes());
}

class BnEvalSegmentLossFunction : public torch::autograd::Function<BnEvalSegmentLossFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& segment_ids,
                               const Tensor& target_mean, const Tensor& target_var, const Tensor& scale,
                               const Tensor& shift, bool relu, int64_t pool) {
    at::AutoDispatchBelowADInplaceOrView guard;
    check_x("bn_eval_segment_loss", x);
    TORCH_CHECK_VALUE(pool == 1 || pool == 2, "bn_eval_segment_loss: pool must be 1 or 2, got ", pool);
    const Tensor x3 = kernel_x3(x);
    const Tensor seg = converted(segment_ids, at::kLong);
    const Tensor tm = converted(target_mean, at::kDouble);
    const Tensor tv = converted(target_var, at::kDouble);
    const Tensor s = converted(scale, acc_type(x));
    const Tensor b = converted(shift, acc_type(x));
    auto [loss, mean, var, count] = call_fwd(x3, seg, tm, tv);
    Tensor y = bn_act(x, x3, s, b, relu, pool);
    ctx->save_for_backward({x3, seg, tm, tv, mean, var, count, s, b});
    ctx->saved_data["sizes"] = x.sym_sizes();
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["pool"] = pool;
    ctx->saved_data["width"] = pool == 2 ? x.sym_size(3).guard_int(__FILE__, __LINE__) : int64_t{0};
    ctx->set_materialize_grads(false);  // an unused y or loss costs no zero-filled gradient
    return {y, converted(loss, acc_type(x))};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto v = ctx->get_saved_variables();
    const Tensor &x3 = v[0], &tm = v[2];
    const Tensor& grad_y = grad_outputs[0];
    const Tensor& grad_loss = grad_outputs[1];
    const int64_t pool = ctx->saved_data["pool"].toInt();
    const Tensor g = grad_loss.defined() ? converted(grad_loss, at::kDouble)
                                         : at::zeros_symint({tm.sym_size(0)}, tm.options());
    Tensor grad3;
    if (!grad_y.defined()) {  // y unused: the loss gradient alone
      grad3 = call_bwd(g, x3, v[1], tm, v[3], v[4], v[5], v[6]);
    } else {
      static auto op = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("lpqld::segment_bn_loss_bwd_bn_eval", "")
                           .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                         const Tensor&, bool, int64_t, int64_t)>();
      Tensor gy3 = grad_y.scalar_type() == x3.scalar_type() ? grad_y : grad_y.to(x3.scalar_type());
      gy3 = gy3.reshape_symint({grad_y.sym_size(0), grad_y.sym_size(1), -1});
      // The kernel walks grad_y in x3's layout (channels-last when pooled).
      if (is_nlc(x3) || pool == 2) {
        gy3 = gy3.transpose(1, 2).contiguous().transpose(1, 2);  // a no-op when it is channels-last already
      } else if (!gy3.is_contiguous()) {
        gy3 = gy3.contiguous();
      }
      grad3 = op.call(g, x3, v[1], tm, v[3], v[4], v[5], v[6], gy3, v[7], v[8], ctx->saved_data["relu"].toBool(),
                      ctx->saved_data["width"].toInt(), pool);
    }
    return {grad3.view_symint(ctx->saved_data["sizes"].toSymIntVector()),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> bn_eval_segment_loss_autograd(const Tensor& x, const Tensor& segment_ids,
                                                         const Tensor& target_mean, const Tensor& target_var,
                                                         const Tensor& scale, const Tensor& shift, bool relu,
                                                         int64_t pool) {
  auto out = BnEvalSegmentLossFunction::apply(x, segment_ids, target_mean, target_var, scale, shift, relu, pool);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor> bn_eval_segment_loss_no_grad(const Tensor& x, const Tensor& segment_ids,
                                                        const Tensor& target_mean, const Tensor& target_var,
                                                        const Tensor& scale, const Tensor& shift, bool relu,
                                                        int64_t pool) {
  check_x("bn_eval_segment_loss", x);
  TORCH_CHECK_VALUE(pool == 1 || pool == 2, "bn_eval_segment_loss: pool must be 1 or 2, got ", pool);
  const Tensor x3 = kernel_x3(x);
  auto [loss, mean, var, count] =
      call_fwd(x3, converted(segment_ids, at::kLong), converted(target_mean, at::kDouble),
               converted(target_var, at::kDouble));
  Tensor y = bn_act(x, x3, converted(scale, acc_type(x)), converted(shift, acc_type(x)), relu, pool);
  return {y, converted(loss, acc_type(x))};
}

}  // namespace
}  // namespace lpqld

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.set_python_module("lpqld_fast.ops._fake");  // fake (meta) implementations for torch.compile / opcheck
  m.def(
      "bn_eval_segment_loss(Tensor x, Tensor segment_ids, Tensor target_mean, Tensor target_var, Tensor scale, "
      "Tensor shift, bool relu, int pool) -> (Tensor y, Tensor loss)");
  m.def("bn_eval_act(Tensor x, Tensor scale, Tensor shift, bool relu, Tensor(a!) out) -> ()");
  m.def(
      "segment_bn_loss_bwd_bn_eval(Tensor grad_loss, Tensor x, Tensor segment_ids, Tensor target_mean, "
      "Tensor target_var, Tensor mean, Tensor var, Tensor count, Tensor grad_y, Tensor scale, Tensor shift, "
      "bool relu, int width, int pool) -> Tensor");
  m.def("bn_eval_act_pool2(Tensor x, Tensor scale, Tensor shift, bool relu, int width, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lpqld, Autograd, m) {
  m.impl("bn_eval_segment_loss", &lpqld::bn_eval_segment_loss_autograd);
  // The kernel under it is not differentiable itself: backprop through a direct call raises.
  m.impl("segment_bn_loss_bwd_bn_eval", torch::autograd::autogradNotImplementedFallback());
}

TORCH_LIBRARY_IMPL(lpqld, CompositeExplicitAutograd, m) {
  m.impl("bn_eval_segment_loss", &lpqld::bn_eval_segment_loss_no_grad);
}
