"""Plain-PyTorch oracle for the segmented BN-statistics matching loss.

Readable and slow on purpose: a Python loop over the segments, float64
moments of each segment's samples, and autograd for the gradient. For every
segment s with samples {n : segment_ids[n] == s}:

    mu_s  = mean of x over (those samples, spatial)        [C]
    var_s = biased variance over the same elements          [C]
    loss_s = ||target_mean[s] - mu_s||_2 + ||target_var[s] - var_s||_2

(plain, not squared, L2 norms over the channels). Empty segments give 0 and
no gradient. The targets are constants: they are detached, so no gradient
flows to them. torch.linalg.vector_norm's gradient at a zero norm is 0, which
is the convention the fast backends follow too.
"""
from __future__ import annotations

import math

import torch


def out_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The loss dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def segment_bn_loss(
    x: torch.Tensor, segment_ids: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor
) -> torch.Tensor:
    """loss [S] for x [N, C, *spatial], segment_ids [N] in [0, S), targets [S, C]."""
    num_segments, channels = target_mean.shape
    xd = x.to(torch.float64).reshape(x.shape[0], channels, math.prod(x.shape[2:]))
    tm = target_mean.detach().to(torch.float64)
    tv = target_var.detach().to(torch.float64)
    seg = segment_ids.to(torch.int64)
    members = _members(seg, num_segments)
    losses = []
    for s in range(num_segments):
        if members[s].numel() == 0:
            losses.append(torch.zeros((), dtype=torch.float64, device=x.device))
            continue
        rows = xd.index_select(0, members[s])  # [n_s, C, L]
        flat = rows.transpose(0, 1).reshape(channels, -1)  # [C, n_s * L]
        mu = flat.mean(dim=1)
        var = flat.var(dim=1, correction=0)
        losses.append(torch.linalg.vector_norm(tm[s] - mu) + torch.linalg.vector_norm(tv[s] - var))
    loss = torch.stack(losses)
    if x.shape[0] == 0:
        loss = loss + xd.sum()  # no samples: keep the (empty) graph to x so backward works
    return loss.to(out_dtype_for(x.dtype))


def _members(seg: torch.Tensor, num_segments: int) -> list[torch.Tensor]:
    """The sample indices of every segment (ascending)."""
    order = torch.argsort(seg, stable=True)
    counts = torch.bincount(seg, minlength=num_segments).tolist()
    return list(torch.split(order, counts))


def segment_bn_moments(x: torch.Tensor, segment_ids: torch.Tensor, num_segments: int):
    """(count [S] int64 samples, mean [S, C], biased var [S, C]) in float64; 0 for empty segments."""
    channels = x.shape[1]
    xd = x.detach().to(torch.float64).reshape(x.shape[0], channels, math.prod(x.shape[2:]))
    seg = segment_ids.to(torch.int64)
    mean = torch.zeros(num_segments, channels, dtype=torch.float64, device=x.device)
    var = torch.zeros_like(mean)
    members = _members(seg, num_segments)
    for s in range(num_segments):
        rows = xd.index_select(0, members[s])
        if rows.shape[0]:
            flat = rows.transpose(0, 1).reshape(channels, -1)
            mean[s] = flat.mean(dim=1)
            var[s] = flat.var(dim=1, correction=0)
    return torch.bincount(seg, minlength=num_segments), mean, var


def bn_eval_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool, pool: int = 1) -> torch.Tensor:
    """y = relu?(x * scale[c] + shift[c]), then avg_pool2d(y, 2) if pool == 2; computed in float32 (float64
    for float64 x), returned in x's dtype."""
    acc = out_dtype_for(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = x.to(acc) * scale.to(acc).view(shape) + shift.to(acc).view(shape)
    if relu:
        y = torch.relu(y)
    if pool == 2:
        y = torch.nn.functional.avg_pool2d(y, 2)
    return y.to(x.dtype)
