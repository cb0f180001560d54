"""Plain-PyTorch oracles of the batched augmentation ops (crop-resize-flip, roll).

``crop_resize_flip`` is the per-sample loop that defines the semantics:

    out[n] = F.interpolate(x[n:n+1, :, i:i+h, j:j+w], size=(oh, ow),
                           mode="bilinear", align_corners=False, antialias=False)
    out[n] = out[n].flip(-1) where flips[n]

with (i, j, h, w) the integer pixel box of sample n (see :func:`pixel_boxes`).
It is differentiable through autograd. uint8 input is converted to float32
(0..255 scale) before the interpolation.

``crop_resize_flip_gather`` / ``crop_resize_flip_gather_backward`` are the
vectorised plain-torch path (no per-sample loop): the source rows/columns and
weights of every output pixel are computed with PyTorch's bilinear rules
(``area_pixel_compute_source_index`` + ``guard_index_and_lambda``) and the
pixels gathered. It runs on any device; the Triton backend uses its backward
where no Triton backward kernel can run.

``batched_roll`` is the loop of ``torch.roll`` per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised boxes (i/H, j/W, h/H, w/W) [N, 4] float -> integer (i, j, h, w) [N, 4] int64.

    i = round(i_n * H), h = max(1, round(h_n * H)) (round half to even, in
    float32), then h is clamped to H and i to [0, H - h); same for j, w with W.
    So every box lies inside the image and holds at least one pixel.
    """
    b = boxes.to(torch.float32)
    i = torch.round(b[:, 0] * height).to(torch.int64)
    j = torch.round(b[:, 1] * width).to(torch.int64)
    h = torch.round(b[:, 2] * height).to(torch.int64).clamp(1, height)
    w = torch.round(b[:, 3] * width).to(torch.int64).clamp(1, width)
    i = torch.minimum(i.clamp_min(0), height - h)
    j = torch.minimum(j.clamp_min(0), width - w)
    return torch.stack([i, j, h, w], dim=1)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype == torch.uint8 else x.dtype


def crop_resize_flip(
    x: torch.Tensor, pix: torch.Tensor, flips: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """The oracle: x [N, C, H, W], pix [N, 4] integer (i, j, h, w), flips [N] bool."""
    n, c = x.shape[:2]
    oh, ow = out_size
    if n == 0:
        return x.new_zeros((0, c, oh, ow), dtype=_out_dtype(x))
    xf = x.to(torch.float32) if x.dtype == torch.uint8 else x
    outs = []
    for k, (i, j, h, w) in enumerate(pix.tolist()):
        y = F.interpolate(
            xf[k : k + 1, :, i : i + h, j : j + w], size=(oh, ow), mode="bilinear", align_corners=False, antialias=False
        )
        if bool(flips[k]):
            y = torch.flip(y, dims=[3])
        outs.append(y)
    return torch.cat(outs, dim=0)


def _axis_tables(start: torch.Tensor, length: torch.Tensor, out: int, opmath: torch.dtype):
    """Source indices (absolute, in the image) and weights along one axis: [N, out] each.

    PyTorch's rules for bilinear, align_corners=False, no scale factor:
    scale = in/out; src = max(scale * (d + 0.5) - 0.5, 0); i0 = min(floor(src), in - 1);
    l1 = clamp(src - i0, 0, 1); i1 = i0 + (i0 < in - 1); l0 = 1 - l1; in == out copies.
    """
    dev = start.device
    d = torch.arange(out, device=dev, dtype=torch.float64)[None, :]
    scale = (length.to(opmath)[:, None] / out).to(torch.float64)
    # src = fma(scale, d + 0.5, -0.5) rounded once to opmath, as the FMA builds of
    # PyTorch and the native kernels compute it (exact in float64 for float32).
    src = (scale * (d + 0.5) - 0.5).to(opmath).clamp_min(0)
    i0 = torch.minimum(src.floor().to(torch.int64), length[:, None] - 1)
    l1 = (src - i0.to(opmath)).clamp(0, 1)
    same = (length == out)[:, None]
    dl = torch.arange(out, device=dev, dtype=torch.int64)[None, :]
    i0 = torch.where(same, dl.expand_as(i0), i0)
    l1 = torch.where(same, torch.zeros_like(l1), l1)
    i1 = i0 + (i0 < length[:, None] - 1).to(torch.int64)
    l0 = 1 - l1
    return i0 + start[:, None], i1 + start[:, None], l0, l1


def gather_tables(pix: torch.Tensor, flips: torch.Tensor, out_size: tuple[int, int], opmath: torch.dtype):
    """(y0, y1, wy0, wy1) [N, oh] and (x0, x1, wx0, wx1) [N, ow], flip folded into the column tables."""
    oh, ow = out_size
    pix = pix.to(torch.int64)
    y0, y1, wy0, wy1 = _axis_tables(pix[:, 0], pix[:, 2], oh, opmath)
    x0, x1, wx0, wx1 = _axis_tables(pix[:, 1], pix[:, 3], ow, opmath)
    f = flips.to(torch.bool)[:, None]
    x0, x1, wx0, wx1 = (torch.where(f, t.flip(1), t) for t in (x0, x1, wx0, wx1))
    return (y0, y1, wy0, wy1), (x0, x1, wx0, wx1)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def crop_resize_flip_gather(
    x: torch.Tensor, pix: torch.Tensor, flips: torch.Tensor, out_size: tuple[int, int]
) -> torch.Tensor:
    """Vectorised forward: four gathers per output pixel, no loop over samples."""
    n, c, height, width = x.shape
    oh, ow = out_size
    out_dtype = _out_dtype(x)
    if n == 0 or c == 0:
        return x.new_zeros((n, c, oh, ow), dtype=out_dtype)
    opmath = _opmath(out_dtype)
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = gather_tables(pix, flips, out_size, opmath)
    xs = x.reshape(n, c, height * width)

    def take(ys: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
        idx = (ys[:, :, None] * width + xc[:, None, :]).reshape(n, 1, oh * ow).expand(n, c, oh * ow)
        return torch.gather(xs, 2, idx).to(opmath).view(n, c, oh, ow)

    wx0_, wx1_ = wx0[:, None, None, :], wx1[:, None, None, :]
    top = take(y0, x0) * wx0_ + take(y0, x1) * wx1_
    bot = take(y1, x0) * wx0_ + take(y1, x1) * wx1_
    out = top * wy0[:, None, :, None] + bot * wy1[:, None, :, None]
    return out.to(out_dtype)


def crop_resize_flip_gather_backward(
    grad_out: torch.Tensor, pix: torch.Tensor, flips: torch.Tensor, in_size: tuple[int, int]
) -> torch.Tensor:
    """Vectorised backward: scatter-add of grad_out * weight into the crop window of each sample."""
    n, c, oh, ow = grad_out.shape
    height, width = in_size
    dtype = grad_out.dtype
    opmath = _opmath(dtype)
    if n == 0 or c == 0:
        return grad_out.new_zeros((n, c, height, width))
    (y0, y1, wy0, wy1), (x0, x1, wx0, wx1) = gather_tables(pix, flips, (oh, ow), opmath)
    g = grad_out.to(opmath).reshape(n, c, oh * ow)
    gx = torch.zeros((n, c, height * width), dtype=opmath, device=grad_out.device)
    for ys, wy in ((y0, wy0), (y1, wy1)):
        for xc, wx in ((x0, wx0), (x1, wx1)):
            idx = (ys[:, :, None] * width + xc[:, None, :]).reshape(n, 1, oh * ow).expand(n, c, oh * ow)
            wgt = (wy[:, :, None] * wx[:, None, :]).reshape(n, 1, oh * ow)
            gx.scatter_add_(2, idx, g * wgt)
    return gx.view(n, c, height, width).to(dtype)


def batched_roll(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """out[n] = torch.roll(x[n], shifts=(dy, dx), dims=(1, 2)), a loop over samples."""
    if x.shape[0] == 0:
        return x.clone()
    return torch.stack([torch.roll(x[k], shifts=(int(dy), int(dx)), dims=(1, 2)) for k, (dy, dx) in
                        enumerate(shifts.tolist())])
