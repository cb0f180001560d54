// Schema of the batched crop-resize-flip augmentation (recover, relabel, replay).
//
// crop_resize_flip(x, boxes, flips, out_h, out_w):
//   x [N, C, H, W] float16/bfloat16/float32/float64 or uint8 (any strides);
//   boxes [N, 4] int64 pixel boxes (i, j, h, w), already clamped inside the
//   image (1 <= h, i + h <= H; same for j, w); flips [N] bool.
//   out[n] = bilinear resize (align_corners=False, no antialias) of
//   x[n, :, i:i+h, j:j+w] to (out_h, out_w), flipped along W where flips[n].
//   Output [N, C, out_h, out_w] contiguous, dtype of x (float32 for uint8,
//   values on the 0..255 scale).
// crop_resize_flip_backward(grad_out, boxes, flips, in_h, in_w):
//   the adjoint: grad_x [N, C, in_h, in_w] (dtype of grad_out), zero outside
//   each sample's crop window.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(lpqld, m) {
  m.def("crop_resize_flip(Tensor x, Tensor boxes, Tensor flips, int out_h, int out_w) -> Tensor");
  m.def("crop_resize_flip_backward(Tensor grad_out, Tensor boxes, Tensor flips, int in_h, int in_w) -> Tensor");
}
