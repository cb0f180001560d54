// Schema and shared argument checks of the fused soft-label KL loss.
//
//   soft_label_kl_fwd(logits [B, C], values [B, k], indices [B, k]?, fill [B]?,
//                     scale [B]?, offset [B]?, mode, T, t_s, grad_scale)
//     -> (loss_rows [B], grad [B, C])
//
// loss_rows[b] = grad_scale * KL(p_b || softmax(z_b / t_s)) (float32, float64
// for float64 logits) and grad = grad_scale / (B * t_s) * (q * S - p) in the
// logits' dtype: the gradient of grad_scale * mean_b KL_b. The dense teacher p
// is never materialised. mode: 0 dense, 1 mr, 2 mrs, 3 ms, 4 topk_norenorm
// (common/label_modes.h; see lpqld_fast/ops/reference/soft_label_kl.py for the decoders).
//
// The checks here are the structural ones, so that a direct call with bad
// shapes or dtypes raises instead of reading out of bounds. The data checks
// (index in [0, C), no class twice in a row, finite values/scale/offset/fill)
// are done by the CPU kernel itself while it reads the rows (IndexError /
// ValueError); for the CUDA and Triton kernels the Python op does them
// before the launch (an out-of-range index is skipped there, never written).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/label_modes.h"

namespace lpqld {

void soft_label_kl_check_args(
    const at::Tensor& logits, const at::Tensor& values, const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& fill, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& offset, int64_t mode, double T, double t_s) {
  TORCH_CHECK(mode >= 0 && mode < kNumLabelModes, "soft_label_kl_fwd: mode must be 0..", kNumLabelModes - 1, " (",
              kLabelModeNames, "), got ", mode);
  TORCH_CHECK(logits.dim() == 2, "soft_label_kl_fwd: logits must be [B, C], got ", logits.sizes());
  const auto ld = logits.scalar_type();
  TORCH_CHECK(ld == at::kFloat || ld == at::kHalf || ld == at::kBFloat16 || ld == at::kDouble,
              "soft_label_kl_fwd: logits must be float16/bfloat16/float32/float64, got ", ld);
  const int64_t B = logits.size(0), C = logits.size(1);
  TORCH_CHECK(C >= 1, "soft_label_kl_fwd: logits needs at least one class");
  TORCH_CHECK(values.dim() == 2 && values.size(0) == B, "soft_label_kl_fwd: values must be [B, k] with B = ", B,
              ", got ", values.sizes());
  const auto vd = values.scalar_type();
  TORCH_CHECK(vd == at::kFloat || vd == at::kHalf || vd == at::kBFloat16 || vd == at::kDouble || vd == at::kChar,
              "soft_label_kl_fwd: values must be float16/bfloat16/float32/float64/int8, got ", vd);
  TORCH_CHECK(values.device() == logits.device(), "soft_label_kl_fwd: values must be on ", logits.device());
  const int64_t k = values.size(1);
  if (mode == kDense) {
    TORCH_CHECK(k == C, "soft_label_kl_fwd: dense values must be [B, C] = [", B, ", ", C, "], got ", values.sizes());
  } else {
    TORCH_CHECK(k >= 1 && k <= C, "soft_label_kl_fwd: values must have 1 <= k <= C = ", C, " columns, got ", k);
    TORCH_CHECK(indices.has_value(), "soft_label_kl_fwd: indices are required for a top-k mode");
    const auto& idx = *indices;
    TORCH_CHECK(idx.sizes() == values.sizes(), "soft_label_kl_fwd: indices must have the shape of values ",
                values.sizes(), ", got ", idx.sizes());
    const auto id = idx.scalar_type();
    TORCH_CHECK(id == at::kLong || id == at::kInt || id == at::kShort || id == at::kByte,
                "soft_label_kl_fwd: indices must be int64/int32/int16/uint8, got ", id);
    TORCH_CHECK(idx.device() == logits.device(), "soft_label_kl_fwd: indices must be on ", logits.device());
  }
  auto check_row_vec = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "soft_label_kl_fwd: ", name, " must be [B] with B = ", B,
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "soft_label_kl_fwd: ", name, " must be float32, got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == logits.device(), "soft_label_kl_fwd: ", name, " must be on ", logits.device());
  };
  check_row_vec(fill, "fill");
  check_row_vec(scale, "scale");
  check_row_vec(offset, "offset");
  TORCH_CHECK(mode != kMRS || fill.has_value(), "soft_label_kl_fwd: mode mrs needs fill");
  TORCH_CHECK(vd != at::kChar || (scale.has_value() && offset.has_value()),
              "soft_label_kl_fwd: int8 values need scale and offset");
  TORCH_CHECK(T > 0.0 && t_s > 0.0, "soft_label_kl_fwd: T and t_s must be > 0, got ", T, " and ", t_s);
}

}  // namespace lpqld

// soft_label_kl(...same arguments...) -> loss: grad_scale * mean_b KL_b as a
// differentiable 0-d tensor. The autograd kernel below is the whole op for the
// cpp and cuda backends: the forward kernel already returns the gradient, so
// the backward only hands it on (scaled when grad_output != 1). Written in C++
// because the Python autograd.Function it replaces added ~0.05-0.1 ms per call,
// a third of the CPU kernel's time at (B, C, k) = (128, 1000, 100).
namespace lpqld {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_fwd(const at::Tensor& logits, const at::Tensor& values,
                                            const std::optional<at::Tensor>& indices,
                                            const std::optional<at::Tensor>& fill,
                                            const std::optional<at::Tensor>& scale,
                                            const std::optional<at::Tensor>& offset, int64_t mode, double T,
                                            double t_s, double grad_scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lpqld::soft_label_kl_fwd", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                           const std::optional<at::Tensor>&, int64_t, double, double, double)>();
  return op.call(logits, values, indices, fill, scale, offset, mode, T, t_s, grad_scale);
}

// An ordinary CPU tensor whose bytes this file may read directly. The fake and functional tensors of
// torch.compile / opcheck tracing (and vmap's batched tensors) have no readable data: they take the
// dispatched path, which the tracer records.
bool readable_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet wrapper_keys =
      c10::python_ks | c10::DispatchKeySet({c10::DispatchKey::Functionalize, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper});
  return t.is_cpu() && t.layout() == at::kStrided && !t.key_set().has_any(wrapper_keys);
}

// The batch mean of the row losses. On the CPU summed here in double (two dispatched ops,
// sum and div_, cost a few microseconds per call, which shows at small B).
at::Tensor mean_loss(const at::Tensor& loss_rows) {
  if (readable_cpu(loss_rows) && loss_rows.dim() == 1 && loss_rows.is_contiguous() &&
      (loss_rows.scalar_type() == at::kFloat || loss_rows.scalar_type() == at::kDouble)) {
    const int64_t B = loss_rows.size(0);
    at::Tensor out = at::empty({}, loss_rows.options());
    double sum = 0.0;
    if (loss_rows.scalar_type() == at::kFloat) {
      const float* p = loss_rows.const_data_ptr<float>();
      for (int64_t i = 0; i < B; ++i) sum += static_cast<double>(p[i]);
      *out.mutable_data_ptr<float>() = static_cast<float>(sum / static_cast<double>(B));
    } else {
      const double* p = loss_rows.const_data_ptr<double>();
      for (int64_t i = 0; i < B; ++i) sum += p[i];
      *out.mutable_data_ptr<double>() = sum / static_cast<double>(B);
    }
    return out;
  }
  // A traced CPU loss (symbolic B): the same mean in double, so a compiled loss has the eager loss's float bits
  // (a float32 mean rounds each partial sum, in an order that follows the vector width: 1 ulp apart on
  // AVX-512). On a GPU eager and traced calls both take loss_rows.mean() (two more kernels would cost there).
  if (loss_rows.is_cpu() && loss_rows.scalar_type() == at::kFloat) {
    return loss_rows.to(at::kDouble).mean().to(at::kFloat);
  }
  return loss_rows.mean();
}

// grad_output == 1 on the CPU, read without a dispatched item() call.
bool is_cpu_one(const at::Tensor& go) {
  if (!readable_cpu(go) || go.numel() != 1) return false;
  if (go.scalar_type() == at::kFloat) return *go.const_data_ptr<float>() == 1.0f;
  if (go.scalar_type() == at::kDouble) return *go.const_data_ptr<double>() == 1.0;
  return go.item<double>() == 1.0;
}

class SoftLabelKLFunction : public torch::autograd::Function<SoftLabelKLFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& values,
                            const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& fill,
                            const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                            int64_t mode, double T, double t_s, double grad_scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss_rows, grad] = call_fwd(logits, values, indices, fill, scale, offset, mode, T, t_s, grad_scale);
    ctx->save_for_backward({grad});
    return mean_loss(loss_rows);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const at::Tensor& go = grad_outputs[0];
    // create_graph=True runs the backward with grad mode on: the gradient would be a constant, refuse instead.
    TORCH_CHECK(!torch::autograd::GradMode::is_enabled() && !go.requires_grad(),
                "soft_label_kl: the fused op is differentiable once (no double backward / create_graph)");
    at::Tensor grad = ctx->get_saved_variables()[0];
    // loss.backward() on a CPU loss: grad_output is 1, so the saved gradient is the answer (no [B, C]
    // multiply; on a GPU, reading the value would synchronise). It is handed over only when the graph is
    // freed after this pass: with retain_graph the caller could edit the returned tensor in place and so
    // change what the next backward returns, so it gets a copy.
    if (!is_cpu_one(go)) {
      grad = grad * go.to(grad.scalar_type());
    } else if (torch::autograd::get_current_graph_task_keep_graph()) {
      grad = grad.clone();
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor soft_label_kl_autograd(const at::Tensor& logits, const at::Tensor& values,
                                  const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& fill,
                                  const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                                  int64_t mode, double T, double t_s, double grad_scale) {
  return SoftLabelKLFunction::apply(logits, values, indices, fill, scale, offset, mode, T, t_s, grad_scale);
}

// Below autograd (no input requires grad, or inference mode): the loss only.
at::Tensor soft_label_kl_no_grad(const at::Tensor& logits, const at::Tensor& values,
                                 const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& fill,
                                 const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                                 int64_t mode, double T, double t_s, double grad_scale) {
  auto [loss_rows, grad] = call_fwd(logits, values, indices, fill, scale, offset, mode, T, t_s, grad_scale);
  return mean_loss(loss_rows);
}

}  // namespace
}  // namespace lpqld

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.set_python_module("lpqld_fast.ops._fake");  // fake (meta) implementations for torch.compile / opcheck
  m.def(
      "soft_label_kl_fwd(Tensor logits, Tensor values, Tensor? indices, Tensor? fill, Tensor? scale, "
      "Tensor? offset, int mode, float T, float t_s, float grad_scale) -> (Tensor loss_rows, Tensor grad)");
  m.def(
      "soft_label_kl(Tensor logits, Tensor values, Tensor? indices, Tensor? fill, Tensor? scale, "
      "Tensor? offset, int mode, float T, float t_s, float grad_scale) -> Tensor");
  // Not a tensor op: selects/queries the SIMD variant of the CPU kernel (tests, benchmarks).
  m.def("_soft_label_kl_cpu_isa(str isa=\"\") -> str");
}

TORCH_LIBRARY_IMPL(lpqld, Autograd, m) {
  m.impl("soft_label_kl", &lpqld::soft_label_kl_autograd);
  // The kernel's gradient output is not itself differentiable: backprop through it raises.
  m.impl("soft_label_kl_fwd", torch::autograd::autogradNotImplementedFallback());
}
TORCH_LIBRARY_IMPL(lpqld, CompositeExplicitAutograd, m) { m.impl("soft_label_kl", &lpqld::soft_label_kl_no_grad); }
