// CPU kernels of recover's eval-mode BN layers (schemas in csrc/bn_eval.cpp): bn_eval_act,
// bn_eval_act_pool2 and segment_bn_loss_bwd_bn_eval (the loss backward plus the BN path's gradient, in
// segment_bn_loss_bwd_cpu.cpp's pass).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "cpu/segment_bn_loss_cpu.h"

namespace lpqld::sbl_cpu {

void check_bn_affine(const char* op, const Tensor& x, const Tensor& scale, const Tensor& shift) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32/float64/float16/bfloat16, got ", x.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const Tensor* t : {&scale, &shift}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1) && t->scalar_type() == acc && t->is_contiguous() &&
                    t->device() == x.device(),
                op, ": scale and shift must be contiguous [C] tensors of ", acc, " on x's device, got ",
                t->sizes(), " ", t->scalar_type());
  }
}

// One channels-last row of y = act(fma(x, s, b)) (C channels of one position).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void nlc_bn_row(const scalar_t* xr, scalar_t* yr, int64_t C, const acc_t* s, const acc_t* b, bool relu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    (relu ? nlc_bn_relu_f32 : nlc_bn_id_f32)(xr, yr, C, s, b);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    (relu ? nlc_bn_relu_bf16 : nlc_bn_id_bf16)(reinterpret_cast<const uint16_t*>(xr), reinterpret_cast<uint16_t*>(yr),
                                               C, s, b);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      yr[c] = static_cast<scalar_t>(bn_act_one(static_cast<acc_t>(xr[c]), s[c], b[c], relu));
    }
  }
}

// One pooled channels-last position: y = mean of act(fma(x, s, b)) over the 2x2 window at x00 (rows ldw apart,
// columns C apart).
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
inline void nlc_bn_pool2_row(const scalar_t* x00, int64_t ldw, scalar_t* yr, int64_t C, const acc_t* s,
                             const acc_t* b, bool relu) {
  const scalar_t *x01 = x00 + C, *x10 = x00 + ldw, *x11 = x10 + C;
  if constexpr (std::is_same_v<scalar_t, float>) {
    (relu ? nlc_bn_pool2_relu_f32 : nlc_bn_pool2_id_f32)(x00, x01, x10, x11, yr, C, s, b);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    auto u = [](const scalar_t* p) { return reinterpret_cast<const uint16_t*>(p); };
    (relu ? nlc_bn_pool2_relu_bf16 : nlc_bn_pool2_id_bf16)(u(x00), u(x01), u(x10), u(x11),
                                                           reinterpret_cast<uint16_t*>(yr), C, s, b);
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const acc_t v = ((bn_act_one(static_cast<acc_t>(x00[c]), s[c], b[c], relu) +
                        bn_act_one(static_cast<acc_t>(x01[c]), s[c], b[c], relu)) +
                       bn_act_one(static_cast<acc_t>(x10[c]), s[c], b[c], relu)) +
                      bn_act_one(static_cast<acc_t>(x11[c]), s[c], b[c], relu);
      yr[c] = static_cast<scalar_t>(v * acc_t(0.25));
    }
  }
}

Tensor segment_bn_loss_bwd_bn_eval_cpu(const Tensor& grad_loss, const Tensor& x, const Tensor& segment_ids,
                                       const Tensor& target_mean, const Tensor& target_var, const Tensor& mean,
                                       const Tensor& var, const Tensor& count, const Tensor& grad_y,
                                       const Tensor& scale, const Tensor& shift, bool relu, int64_t width,
                                       int64_t pool) {
  const BnPath bn{&grad_y, &scale, &shift, relu, width, pool};
  return bwd_impl(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count, &bn);
}

// out = act(x * scale + shift) per channel; out has x's shape and strides (contiguous [N, C, L] or
// channels-last). The caller allocates out so that the tensor it returns is not a view (autograd refuses
// in-place ops, e.g. a ResNet's ReLU(inplace=True), on view outputs of a multi-output Function).
void bn_eval_act_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, bool relu, const Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && (x.is_contiguous() || is_channels_last_ncl(x)),
              "bn_eval_act: x must be contiguous [N, C, L] or channels-last (strides (C*L, 1, C)), got ", x.sizes(),
              " / ", x.strides());
  check_bn_affine("bn_eval_act", x, scale, shift);
  TORCH_CHECK(same_layout(out, x) && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "bn_eval_act: out must have x's shape, strides and dtype, got ", out.sizes(), " / ", out.strides());
  const Tensor& y = out;
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  if (y.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_act_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const acc_t* s = scale.const_data_ptr<acc_t>();
    const acc_t* b = shift.const_data_ptr<acc_t>();
    if (is_channels_last_ncl(x)) {
      at::parallel_for(0, N * L, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) nlc_bn_row<scalar_t>(px + r * C, py + r * C, C, s, b, relu);
      });
      return;
    }
    at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / L), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t sc = s[r % C], sh = b[r % C];
        const scalar_t* xr = px + r * L;
        scalar_t* yr = py + r * L;
        for (int64_t k = 0; k < L; ++k) {
          yr[k] = static_cast<scalar_t>(bn_act_one(static_cast<acc_t>(xr[k]), sc, sh, relu));
        }
      }
    });
  });
}

// y = avg_pool2d(act(x * scale + shift), 2) for a channels-last x [N, C, H * W] (floor mode: an odd last
// row / column is dropped); y [N, C, (H / 2) * (W / 2)] channels-last. x is read once, only y is written.
void bn_eval_act_pool2_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift, bool relu, int64_t width,
                           const Tensor& out) {
  TORCH_CHECK(x.dim() == 3 && (is_channels_last_ncl(x) || (x.size(1) == 1 && x.is_contiguous())),
              "bn_eval_act_pool2: x must be channels-last [N, C, H * W] (strides (C*L, 1, C)), got ", x.sizes(),
              " / ", x.strides());
  check_bn_affine("bn_eval_act_pool2", x, scale, shift);
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2), W = width;
  TORCH_CHECK(W >= 2 && L % W == 0 && L / W >= 2, "bn_eval_act_pool2: need H, W >= 2 with L = H * W (L = ", L,
              ", W = ", W, ")");
  const int64_t OH = (L / W) / 2, OW = W / 2;
  TORCH_CHECK(out.dim() == 3 && out.size(0) == N && out.size(1) == C && out.size(2) == OH * OW &&
                  (out.stride(1) == 1 || C == 1) && (out.stride(2) == C || OH * OW == 1) &&
                  (out.stride(0) == C * OH * OW || N <= 1) && out.scalar_type() == x.scalar_type() &&
                  out.device() == x.device(),
              "bn_eval_act_pool2: out must be channels-last [N, C, (H / 2) * (W / 2)] of x's dtype, got ", out.sizes(),
              " / ", out.strides());
  const Tensor& y = out;
  if (y.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_eval_act_pool2_cpu", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* py = y.data_ptr<scalar_t>();
    const acc_t* s = scale.const_data_ptr<acc_t>();
    const acc_t* b = shift.const_data_ptr<acc_t>();
    at::parallel_for(0, N * OH * OW, std::max<int64_t>(1, 8192 / C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / (OH * OW), oh = (r / OW) % OH, ow = r % OW;
        const scalar_t* x00 = px + (n * L + (2 * oh) * W + 2 * ow) * C;
        nlc_bn_pool2_row<scalar_t>(x00, W * C, py + r * C, C, s, b, relu);
      }
    });
  });
}

}  // namespace lpqld::sbl_cpu

TORCH_LIBRARY_IMPL(lpqld, CPU, m) {
  m.impl("segment_bn_loss_bwd_bn_eval", &lpqld::sbl_cpu::segment_bn_loss_bwd_bn_eval_cpu);
  m.impl("bn_eval_act", &lpqld::sbl_cpu::bn_eval_act_cpu);
  m.impl("bn_eval_act_pool2", &lpqld::sbl_cpu::bn_eval_act_pool2_cpu);
}
