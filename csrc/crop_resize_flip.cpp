// Schema of the batched crop-resize-flip augmentation (recover, relabel, replay).
//
// crop_resize_flip(x, boxes, flips, out_h, out_w):
//   x [N, C, H, W] float16/bfloat16/float32/float64 or uint8 (any strides);
//   boxes [N, 4] int64 pixel boxes (i, j, h, w), already clamped inside the
//   image (1 <= h, i + h <= H; same for j, w); flips [N] bool. The CPU kernels
//   also take the normalised float32/float64 boxes (i/H, j/W, h/H, w/W) and 0/1
//   integer flips of the Python API, converted and checked in C++.
//   out[n] = bilinear resize (align_corners=False, no antialias) of
//   x[n, :, i:i+h, j:j+w] to (out_h, out_w), flipped along W where flips[n].
//   Output [N, C, out_h, out_w] contiguous, dtype of x (float32 for uint8,
//   values on the 0..255 scale). Differentiable w.r.t. a float x (the C++
//   autograd kernel below runs crop_resize_flip_backward).
// crop_resize_flip_backward(grad_out, boxes, flips, in_h, in_w):
//   the adjoint: grad_x [N, C, in_h, in_w] (dtype of grad_out), zero outside
//   each sample's crop window.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "common/checks.h"

namespace lpqld {

void check_crop_resize_flip_args(const at::Tensor& t, const char* tname, const at::Tensor& boxes,
                                 const at::Tensor& flips) {
  TORCH_CHECK(t.dim() == 4, "crop_resize_flip: ", tname, " must be [N, C, H, W], got ", t.sizes());
  const int64_t n = t.size(0);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == n && boxes.size(1) == 4,
              "crop_resize_flip: boxes must be [N, 4] with N = ", n, ", got ", boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == at::kLong, "crop_resize_flip: boxes must be int64 pixel boxes, got ",
              boxes.scalar_type());
  TORCH_CHECK(flips.dim() == 1 && flips.size(0) == n, "crop_resize_flip: flips must be [N] with N = ", n,
              ", got ", flips.sizes());
  TORCH_CHECK(flips.scalar_type() == at::kBool, "crop_resize_flip: flips must be bool, got ", flips.scalar_type());
}

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class CropResizeFlipFunction : public torch::autograd::Function<CropResizeFlipFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& boxes, const Tensor& flips,
                        c10::SymInt out_h, c10::SymInt out_w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lpqld::crop_resize_flip", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, c10::SymInt)>();
    ctx->save_for_backward({boxes, flips});
    if (x.dim() == 4) {
      ctx->saved_data["in_h"] = x.sym_size(2);
      ctx->saved_data["in_w"] = x.sym_size(3);
    }
    return op.call(x, boxes, flips, std::move(out_h), std::move(out_w));
  }

  // crop_resize_flip_backward has no derivative: a double backward through it raises (once differentiable).
  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lpqld::crop_resize_flip_backward", "")
                         .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, c10::SymInt, c10::SymInt)>();
    const auto saved = ctx->get_saved_variables();
    Tensor gx = op.call(grad_outputs[0].contiguous(), saved[0], saved[1], ctx->saved_data["in_h"].toSymInt(),
                        ctx->saved_data["in_w"].toSymInt());
    return {gx, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor crop_resize_flip_autograd(const Tensor& x, const Tensor& boxes, const Tensor& flips, c10::SymInt out_h,
                                 c10::SymInt out_w) {
  return CropResizeFlipFunction::apply(x, boxes, flips, std::move(out_h), std::move(out_w));
}

}  // namespace
}  // namespace lpqld

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.set_python_module("lpqld_fast.ops._fake");  // fake (meta) implementations for torch.compile / opcheck
  m.def("crop_resize_flip(Tensor x, Tensor boxes, Tensor flips, SymInt out_h, SymInt out_w) -> Tensor");
  m.def(
      "crop_resize_flip_backward(Tensor grad_out, Tensor boxes, Tensor flips, SymInt in_h, SymInt in_w) -> Tensor");
  // Not a tensor op: selects/queries the SIMD variant of the CPU forward row kernels (tests, benchmarks).
  m.def("_crop_resize_flip_cpu_isa(str isa=\"\") -> str");
}

TORCH_LIBRARY_IMPL(lpqld, Autograd, m) {
  m.impl("crop_resize_flip", &lpqld::crop_resize_flip_autograd);
  m.impl("crop_resize_flip_backward", torch::autograd::autogradNotImplementedFallback());
}
