// Schema and C++ autograd of lpqld::batched_roll (CPU kernel in csrc/cpu/batched_roll_cpu.cpp).
//
// batched_roll(x, shifts) -> out: out[n] = torch.roll(x[n], shifts=(dy_n, dx_n), dims=(1, 2)) for
// x [N, C, H, W] of any dtype and shifts [N, 2] int64 (dy, dx per sample); out is contiguous.
// recover's jitter, once per iteration forward and once backward. Differentiable to any order: the
// autograd kernel below rolls the gradient back through this same op.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

at::Tensor call_batched_roll(const at::Tensor& x, const at::Tensor& shifts) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lpqld::batched_roll", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, shifts);
}

class BatchedRollFunction : public torch::autograd::Function<BatchedRollFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& shifts) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({shifts});
    ctx->saved_data["sizes"] = x.sym_sizes();
    return call_batched_roll(x, shifts);
  }

  // The adjoint of a roll is the roll by the opposite shift (a permutation: exact, no atomics). Called
  // through the dispatcher, so create_graph records it again (double backward works).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor shifts = ctx->get_saved_variables()[0];
    const auto sizes = ctx->saved_data["sizes"].toSymIntVector();
    const at::Tensor& g = grad_outputs[0];
    if (g.sym_numel() == 0) return {g.contiguous().clone(), at::Tensor()};
    // Reduced before the negation, so that an int64-min shift cannot overflow.
    const at::Tensor back = at::stack({shifts.select(1, 0).remainder(c10::Scalar(sizes[2])).neg(),
                                       shifts.select(1, 1).remainder(c10::Scalar(sizes[3])).neg()},
                                      1);
    return {call_batched_roll(g, back), at::Tensor()};
  }
};

at::Tensor batched_roll_autograd(const at::Tensor& x, const at::Tensor& shifts) {
  return BatchedRollFunction::apply(x, shifts);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.set_python_module("lpqld_fast.ops._fake");  // fake (meta) implementations for torch.compile / opcheck
  m.def("batched_roll(Tensor x, Tensor shifts) -> Tensor");
}
TORCH_LIBRARY_IMPL(lpqld, Autograd, m) { m.impl("batched_roll", &batched_roll_autograd); }
