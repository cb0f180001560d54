// Declarations shared by the segment_bn_loss and bn_eval CPU kernels (segment_bn_loss_cpu.cpp,
// segment_bn_loss_bwd_cpu.cpp, bn_eval_cpu.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/op_math.h"
#include "cpu/segment_bn_kernels.h"

namespace lpqld::sbl_cpu {

using at::Tensor;

constexpr int64_t kChannelBlock = 16;  // channels per forward task

template <typename scalar_t>
using AccType = OpMath<scalar_t>;

template <typename scalar_t>
constexpr bool kDirect = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>;

// p[start, start + n) as acc_t: the data itself for float/double, else converted into tmp.
template <typename scalar_t, typename acc_t>
inline const acc_t* chunk_as_acc(const scalar_t* p, int64_t start, int64_t n, acc_t* tmp) {
  if constexpr (kDirect<scalar_t>) {
    (void)n;
    (void)tmp;
    return p + start;
  } else {
    for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(p[start + i]);
    return tmp;
  }
}

using Layout = SegmentBNLayout;

// Per-(sample, channel) exact mean and M2 of the channels-last [L, nc] tile p (row stride ldc, nc <=
// kNlcBlock), the channels in SIMD lanes, so a channels-last x is read in place (a transposing copy cost recover's
// NHWC teacher ~10 ms twice per 128 x 28 x 28 BN input per iteration, profiled); `guess` (or null) is a shift
// near the means. Defined in
// segment_bn_loss_cpu.cpp for float, double, Half and BFloat16; classwise_moments' channels-last path uses it.
constexpr int64_t kNlcBlock = 64;  // channels per channels-last task (nlc_moments64_*: one call per tile)
template <typename scalar_t>
void nlc_tile_moments(const scalar_t* p, int64_t ldc, int64_t L, int64_t nc, const double* guess, double* mean,
                      double* m2);

// x [N, C, L] contiguous or channels-last, then the shared checks (csrc/segment_bn_loss.cpp).
Layout check_common(const Tensor& x, const Tensor& seg, const Tensor& tm, const Tensor& tv);

// The eval-mode BN path of segment_bn_loss_bwd_bn_eval: its upstream gradient and the BN's per-channel
// affine (y = act(x * scale + shift)); null for the plain loss backward.
struct BnPath {
  const Tensor* grad_y;
  const Tensor* scale;
  const Tensor* shift;
  bool relu;
  int64_t width;  // x's W when pooled (x [N, C, H * W] channels-last, grad_y [N, C, (H / 2) * (W / 2)])
  int64_t pool;   // 1, or 2 for a 2x2 / stride-2 average pool after the activation
};

// Same shape, and the same strides wherever a dimension has more than one element (a size-1 dimension's
// stride is arbitrary: a channels-last [N, C, 1, 1] map viewed as [N, C, 1] is also contiguous).
inline bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// scale / shift of an eval-mode BN over x's channels: contiguous [C] in x's compute type, on x's device.
void check_bn_affine(const char* op, const Tensor& x, const Tensor& scale, const Tensor& shift);

// The backward of segment_bn_loss; with bn, plus the eval-mode BN path's gradient (segment_bn_loss_bwd_cpu.cpp).
Tensor bwd_impl(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids, const Tensor& target_mean,
                const Tensor& target_var, const Tensor& mean, const Tensor& var, const Tensor& count,
                const BnPath* bn);

}  // namespace lpqld::sbl_cpu
