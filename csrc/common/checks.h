// The ops' argument checks that the CPU and CUDA kernels share, defined once beside each op's schema in
// csrc/<op>.cpp. Declarations only (nvcc compiles this header too). Each kernel adds its own device and
// layout checks around these.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace lpqld {

// classwise_moments_accumulate_: shapes, dtypes, layout and devices of x, labels and the state. x must be
// contiguous [N, C, L], or with channels_last also a channels-last activation viewed as [N, C, L] (strides
// (C * L, 1, C), what the CPU kernel reads in place).
void check_classwise_moments_args(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& count,
                                  const at::Tensor& mean, const at::Tensor& m2, bool channels_last = false);

// x [N, C, L] stored as [N, L, C] (a channels-last activation viewed as [N, C, H * W]), not contiguous.
inline bool is_channels_last_ncl(const at::Tensor& x) {
  if (x.dim() != 3) return false;
  const int64_t C = x.size(1), L = x.size(2);
  return (C == 1 || x.stride(1) == 1) && (L == 1 || x.stride(2) == C) && (x.size(0) <= 1 || x.stride(0) == C * L) &&
         !x.is_contiguous();
}

// soft_label_kl_fwd: the structural checks (mode, shapes, dtypes, devices); the data checks are the kernels'.
void soft_label_kl_check_args(const at::Tensor& logits, const at::Tensor& values,
                              const std::optional<at::Tensor>& indices, const std::optional<at::Tensor>& fill,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& offset,
                              int64_t mode, double T, double t_s);

// segment_bn_loss_fwd / _bwd, after the kernel has checked x's rank and layout: x's dtype and sizes,
// segment_ids, the targets and their devices. Returns x's [N, C, L] and the segment count S.
struct SegmentBNLayout {
  int64_t N, C, L, S;
};
SegmentBNLayout check_segment_bn_loss_args(const at::Tensor& x, const at::Tensor& segment_ids,
                                           const at::Tensor& target_mean, const at::Tensor& target_var);

// crop_resize_flip and its backward: t (x or grad_out, named tname) [N, C, H, W], boxes [N, 4] int64,
// flips [N] bool.
void check_crop_resize_flip_args(const at::Tensor& t, const char* tname, const at::Tensor& boxes,
                                 const at::Tensor& flips);

}  // namespace lpqld
