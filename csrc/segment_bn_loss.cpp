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
// Recover's supervised eval-mode BN layers (CPU kernels only; other devices compose the ops):
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
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.def(
      "segment_bn_loss_fwd(Tensor x, Tensor segment_ids, Tensor target_mean, Tensor target_var)"
      " -> (Tensor loss, Tensor mean, Tensor var, Tensor count)");
  m.def(
      "segment_bn_loss_bwd(Tensor grad_loss, Tensor x, Tensor segment_ids, Tensor target_mean, "
      "Tensor target_var, Tensor mean, Tensor var, Tensor count) -> Tensor");
  m.def("bn_eval_act(Tensor x, Tensor scale, Tensor shift, bool relu, Tensor(a!) out) -> ()");
  m.def(
      "segment_bn_loss_bwd_bn_eval(Tensor grad_loss, Tensor x, Tensor segment_ids, Tensor target_mean, "
      "Tensor target_var, Tensor mean, Tensor var, Tensor count, Tensor grad_y, Tensor scale, Tensor shift, "
      "bool relu, int width, int pool) -> Tensor");
  m.def("bn_eval_act_pool2(Tensor x, Tensor scale, Tensor shift, bool relu, int width, Tensor(a!) out) -> ()");
}
