"""Triton kernels of the batched crop -> bilinear resize -> horizontal flip.

Forward: one program per (sample, channel) plane and block of output pixels.
Each lane computes its source rows/columns and weights with PyTorch's bilinear
rules (align_corners=False, no scale factor: scale = in / out,
src = max(fma(scale, d + 0.5, -0.5), 0) rounded once as in FMA builds of
PyTorch and in the C++/CUDA kernels, i0 = min(floor(src), in - 1),
l1 = clamp(src - i0, 0, 1), i1 = i0 + (i0 < in - 1); in == out copies), the
flip mirrors the output column, and the four source pixels are gathered
through x's strides (uint8 read directly, math in float32, float64 for
float64 input).

Backward: the same lanes scatter grad * weight into a zero float32 (float64)
buffer with tl.atomic_add, cast to the gradient's dtype at the end.

Runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK = 512  # output pixels per program on the GPU
INTERPRET_MAX_BLOCK = 1 << 14  # under TRITON_INTERPRET=1 a program costs ~ms of Python: one per plane


def _block(plane: int, device: torch.device) -> int:
    if device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return min(triton.next_power_of_2(max(plane, 1)), INTERPRET_MAX_BLOCK)
    return BLOCK


@triton.jit
def _taps(d, start, length, out, F64: tl.constexpr):
    """Source indices (absolute) and weights of output positions ``d`` along one axis."""
    if F64:
        scale = length.to(tl.float64) / out
        src = scale * (d.to(tl.float64) + 0.5) - 0.5
    else:
        # fma(scale, d + 0.5, -0.5) rounded once, like the C++/CUDA kernels:
        # the float32 product is exact in float64.
        scale = (length.to(tl.float32) / out).to(tl.float64)
        src = (scale * (d.to(tl.float64) + 0.5) - 0.5).to(tl.float32)
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(tl.floor(src).to(tl.int32), length - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(src.dtype), 0.0), 1.0)
    same = length == out
    i0 = tl.where(same, d, i0)
    l1 = tl.where(same, 0.0, l1)
    i1 = i0 + (i0 < length - 1).to(tl.int32)
    l0 = 1.0 - l1
    return i0 + start, i1 + start, l0, l1


@triton.jit
def _crf_fwd_kernel(
    x_ptr, box_ptr, flip_ptr, out_ptr,
    C, sN, sC, sH, sW, OH, OW,
    F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    n = plane // C
    c = plane % C
    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < OH * OW
    oy = offs // OW
    ox = offs % OW
    bi = tl.load(box_ptr + n * 4 + 0)
    bj = tl.load(box_ptr + n * 4 + 1)
    bh = tl.load(box_ptr + n * 4 + 2)
    bw = tl.load(box_ptr + n * 4 + 3)
    fl = tl.load(flip_ptr + n)
    sx = tl.where(fl != 0, OW - 1 - ox, ox)
    y0, y1, wy0, wy1 = _taps(oy, bi, bh, OH, F64)
    x0, x1, wx0, wx1 = _taps(sx, bj, bw, OW, F64)
    base = x_ptr + n * sN + c * sC
    r0 = base + y0.to(tl.int64) * sH
    r1 = base + y1.to(tl.int64) * sH
    c0 = x0.to(tl.int64) * sW
    c1 = x1.to(tl.int64) * sW
    if F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    v00 = tl.load(r0 + c0, mask=mask, other=0).to(acc_t)
    v01 = tl.load(r0 + c1, mask=mask, other=0).to(acc_t)
    v10 = tl.load(r1 + c0, mask=mask, other=0).to(acc_t)
    v11 = tl.load(r1 + c1, mask=mask, other=0).to(acc_t)
    top = v00 * wx0 + v01 * wx1
    bot = v10 * wx0 + v11 * wx1
    res = top * wy0 + bot * wy1
    tl.store(out_ptr + plane * (OH * OW) + offs, res.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _crf_bwd_kernel(
    g_ptr, box_ptr, flip_ptr, acc_ptr,
    C, H, W, OH, OW,
    F64: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    plane = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    n = plane // C
    offs = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < OH * OW
    oy = offs // OW
    ox = offs % OW
    bi = tl.load(box_ptr + n * 4 + 0)
    bj = tl.load(box_ptr + n * 4 + 1)
    bh = tl.load(box_ptr + n * 4 + 2)
    bw = tl.load(box_ptr + n * 4 + 3)
    fl = tl.load(flip_ptr + n)
    sx = tl.where(fl != 0, OW - 1 - ox, ox)
    y0, y1, wy0, wy1 = _taps(oy, bi, bh, OH, F64)
    x0, x1, wx0, wx1 = _taps(sx, bj, bw, OW, F64)
    if F64:
        acc_t = tl.float64
    else:
        acc_t = tl.float32
    g = tl.load(g_ptr + plane * (OH * OW) + offs, mask=mask, other=0).to(acc_t)
    base = acc_ptr + plane * (H * W)
    r0 = base + y0.to(tl.int64) * W
    r1 = base + y1.to(tl.int64) * W
    tl.atomic_add(r0 + x0, (wy0 * wx0) * g, mask=mask)
    tl.atomic_add(r0 + x1, (wy0 * wx1) * g, mask=mask)
    tl.atomic_add(r1 + x0, (wy1 * wx0) * g, mask=mask)
    tl.atomic_add(r1 + x1, (wy1 * wx1) * g, mask=mask)


def _prep(boxes: torch.Tensor, flips: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (boxes.to(device=device, dtype=torch.int32).contiguous(),
            flips.to(device=device, dtype=torch.int8).contiguous())


def crop_resize_flip_fwd(x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """x [N, C, H, W] (any strides), boxes [N, 4] int pixel boxes (i, j, h, w) inside the image, flips [N]."""
    n, c = x.shape[:2]
    out_dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    out = torch.empty((n, c, oh, ow), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    b, f = _prep(boxes, flips, x.device)
    block = _block(oh * ow, x.device)
    grid = (n * c, triton.cdiv(oh * ow, block))
    _crf_fwd_kernel[grid](
        x, b, f, out,
        c, x.stride(0), x.stride(1), x.stride(2), x.stride(3), oh, ow,
        F64=x.dtype == torch.float64, BLOCK_SIZE=block,
    )
    return out


def crop_resize_flip_bwd(
    grad_out: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """The adjoint: grad_x [N, C, h, w] (dtype of grad_out), zero outside each crop window."""
    n, c, oh, ow = grad_out.shape
    f64 = grad_out.dtype == torch.float64
    acc = torch.zeros((n, c, h, w), dtype=torch.float64 if f64 else torch.float32, device=grad_out.device)
    if grad_out.numel() == 0:
        return acc.to(grad_out.dtype)
    g = grad_out.contiguous()
    b, f = _prep(boxes, flips, grad_out.device)
    block = _block(oh * ow, grad_out.device)
    grid = (n * c, triton.cdiv(oh * ow, block))
    _crf_bwd_kernel[grid](g, b, f, acc, c, h, w, oh, ow, F64=f64, BLOCK_SIZE=block)
    return acc if acc.dtype == grad_out.dtype else acc.to(grad_out.dtype)
