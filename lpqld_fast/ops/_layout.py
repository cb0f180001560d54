"""Activation layouts shared by the segment_bn_loss and classwise_moments wrappers and the fake implementations
(ops._fake)."""
from __future__ import annotations

import math

import torch


def is_nlc(x3: torch.Tensor) -> bool:
    """x3 [N, C, L] stored as [N, L, C] (a channels_last activation): strides (C*L, 1, C)."""
    n, c, length = x3.shape
    return ((c == 1 or x3.stride(1) == 1) and (length == 1 or x3.stride(2) == c)
            and (n <= 1 or x3.stride(0) == c * length) and not x3.is_contiguous())


def kernel_x3(x: torch.Tensor, keep_nlc: bool) -> torch.Tensor:
    """x as [N, C, L] for the kernels: a channels-last x stays in place when ``keep_nlc`` (the CPU kernels
    read it as is), anything else becomes contiguous."""
    x3 = x.detach().reshape(x.shape[0], x.shape[1], math.prod(x.shape[2:]))
    return x3 if keep_nlc and is_nlc(x3) else x3.contiguous()
