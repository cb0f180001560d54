"""The input gradient of thin convolutions (few input channels) as one GEMM plus col2im.

Recover differentiates the frozen teacher with respect to its input images, so
the first convolution (1 or 3 input channels) runs a data-gradient pass whose
output has 1-3 channels: oneDNN's kernel for that shape is badly vectorised
here (profiled: 15.5 ms of a ~125 ms bf16 ConvNet recover iteration on
[100, 128, 28, 28] -> [100, 1, 28, 28], ~12 GFLOP/s). The same gradient is
cols = grad_out^T W ([N, L, Cout] x [Cout, Cin*kh*kw], a plain GEMM on the
channels-last gradient) folded back onto the image (F.fold, the transpose of
unfold): ~6 ms in the loop (GEMM ~4 + col2im ~2). ``thin_input_grad_convs(model)``
swaps such layers inside a block; the weights must be frozen (no weight or bias
gradient is computed).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

MAX_IN_CHANNELS = 4  # wider inputs: oneDNN's data-gradient kernel is efficient


class _ThinConvInputGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):  # type: ignore[override]
        ctx.conf = (x.shape, x.dtype, stride, padding, dilation)
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        x_shape, x_dtype, stride, padding, dilation = ctx.conf
        n, cout, oh, ow = grad_out.shape
        cin, kh, kw = weight.shape[1:]
        g = grad_out.permute(0, 2, 3, 1).reshape(n, oh * ow, cout)  # a view for a channels-last gradient
        w = weight.detach().reshape(cout, cin * kh * kw).to(g.dtype)
        # [N, Cin*kh*kw, L]; col2im sums in float32 at least
        cols = torch.matmul(g, w).transpose(1, 2).to(torch.promote_types(g.dtype, torch.float32))
        grad_x = F.fold(cols, x_shape[2:], (kh, kw), dilation=dilation, padding=padding, stride=stride)
        return grad_x.to(x_dtype), None, None, None, None, None


class ThinInputGradConv2d(nn.Module):
    """``conv`` (frozen weights) with the input gradient computed as GEMM + col2im."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not x.requires_grad or not torch.is_grad_enabled():
            return c(x)
        # Under autocast the conv runs in the autocast dtype; cast here so the Function sees the real inputs.
        if torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return _ThinConvInputGrad.apply(x.to(dt), c.weight.to(dt), None if c.bias is None else c.bias.to(dt),
                                                c.stride, c.padding, c.dilation)
        return _ThinConvInputGrad.apply(x, c.weight, c.bias, c.stride, c.padding, c.dilation)


def is_thin(conv: nn.Module) -> bool:
    """A Conv2d this module handles: groups 1, numeric zero padding, at most MAX_IN_CHANNELS input channels."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.in_channels <= MAX_IN_CHANNELS
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


@contextlib.contextmanager
def thin_input_grad_convs(model: nn.Module) -> Iterator[int]:
    """Swap ``model``'s thin Conv2d layers (frozen weights) for ThinInputGradConv2d inside the block.

    Yields how many were swapped; the model is restored on exit.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for qualified, conv in list(model.named_modules()):
            if not qualified or not is_thin(conv) or any(p.requires_grad for p in conv.parameters()):
                continue
            parent_name, _, name = qualified.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            swapped.append((parent, name, conv))
            setattr(parent, name, ThinInputGradConv2d(conv))
        yield len(swapped)
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
