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
// (see lpqld_fast/ops/reference/soft_label_kl.py for the decoders).
//
// The checks here are the structural ones, so that a direct call with bad
// shapes or dtypes raises instead of reading out of bounds. The data checks
// (index in [0, C), no class twice in a row, finite values/scale/offset/fill)
// are done by the CPU kernel itself while it reads the rows (IndexError /
// ValueError); for the CUDA and Triton kernels the Python op does them
// before the launch (an out-of-range index is skipped there, never written).
#include <ATen/ATen.h>
#include <torch/library.h>

namespace lpqld {

void soft_label_kl_check_args(
    const at::Tensor& logits, const at::Tensor& values, const std::optional<at::Tensor>& indices,
    const std::optional<at::Tensor>& fill, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& offset, int64_t mode, double T, double t_s) {
  TORCH_CHECK(mode >= 0 && mode <= 4, "soft_label_kl_fwd: mode must be 0..4 (dense, mr, mrs, ms, topk_norenorm), got ",
              mode);
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
  if (mode == 0) {
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
  TORCH_CHECK(mode != 2 || fill.has_value(), "soft_label_kl_fwd: mode mrs needs fill");
  TORCH_CHECK(vd != at::kChar || (scale.has_value() && offset.has_value()),
              "soft_label_kl_fwd: int8 values need scale and offset");
  TORCH_CHECK(T > 0.0 && t_s > 0.0, "soft_label_kl_fwd: T and t_s must be > 0, got ", T, " and ", t_s);
}

}  // namespace lpqld

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.def(
      "soft_label_kl_fwd(Tensor logits, Tensor values, Tensor? indices, Tensor? fill, Tensor? scale, "
      "Tensor? offset, int mode, float T, float t_s, float grad_scale) -> (Tensor loss_rows, Tensor grad)");
}
