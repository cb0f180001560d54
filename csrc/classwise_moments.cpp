// Schema and shared contract check of lpqld::classwise_moments_accumulate_.
//
// Merges the class-wise moments of x [N, C, L] into running float64 state:
// count [K] (elements = samples * L per class), mean [K, C] and m2 [K, C]
// (sum of squared deviations), with Chan's parallel formula. The Python
// wrapper (lpqld_fast.ops.classwise_moments) validates and reshapes first;
// the kernels re-check the contract with check_classwise_moments_args.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"

namespace lpqld {

void check_classwise_moments_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& count,
                                  const at::Tensor& mean, const at::Tensor& m2, bool channels_last) {
  TORCH_CHECK_VALUE(x.dim() == 3, "classwise_moments_accumulate_: x must be [N, C, L], got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_VALUE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                    "classwise_moments_accumulate_: x must be float32/float64/float16/bfloat16, got ", st);
  TORCH_CHECK_VALUE(x.is_contiguous() || (channels_last && is_channels_last_ncl(x)),
                    "classwise_moments_accumulate_: x must be contiguous",
                    channels_last ? " or channels-last (strides (C*L, 1, C))" : "", ", got strides ", x.strides());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.scalar_type() == at::kLong && labels.is_contiguous(),
                    "classwise_moments_accumulate_: labels must be a contiguous 1-D int64 tensor, got ",
                    labels.scalar_type(), " of shape ", labels.sizes());
  TORCH_CHECK_VALUE(labels.size(0) == x.size(0), "classwise_moments_accumulate_: labels has ", labels.size(0),
                    " entries but x has ", x.size(0), " samples");
  TORCH_CHECK_VALUE(count.dim() == 1 && count.scalar_type() == at::kDouble && count.is_contiguous(),
                    "classwise_moments_accumulate_: count must be a contiguous 1-D float64 tensor, got ",
                    count.scalar_type(), " of shape ", count.sizes());
  const int64_t k = count.size(0);
  TORCH_CHECK_VALUE(k >= 1, "classwise_moments_accumulate_: count must have at least one class");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mean", mean}, {"m2", m2}}) {
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == k && t.size(1) == x.size(1),
                      "classwise_moments_accumulate_: ", name, " must have shape [", k, ", ", x.size(1), "], got ",
                      t.sizes());
    TORCH_CHECK_VALUE(t.scalar_type() == at::kDouble && t.is_contiguous(), "classwise_moments_accumulate_: ", name,
                      " must be a contiguous float64 tensor");
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"labels", labels},
                                {"count", count}, {"mean", mean}, {"m2", m2}}) {
    TORCH_CHECK_VALUE(t.device() == x.device(), "classwise_moments_accumulate_: ", name, " is on ", t.device(),
                      " but x is on ", x.device());
  }
  TORCH_CHECK_VALUE(!mean.is_same(m2) && !count.is_same(mean) && !count.is_same(m2),
                    "classwise_moments_accumulate_: count, mean and m2 must be distinct tensors");
}

}  // namespace lpqld

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.set_python_module("lpqld_fast.ops._fake");  // fake (meta) implementations for torch.compile / opcheck
  m.def("classwise_moments_accumulate_(Tensor x, Tensor labels, Tensor(a!) count, Tensor(b!) mean, Tensor(c!) m2) -> ()");
}
