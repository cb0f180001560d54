"""Triton backend of ``classwise_moments_accumulate_``.

Contract (the public wrapper in lpqld_fast.ops.classwise_moments validates and
reshapes first): x3 [N, C, L] contiguous float32/float16/bfloat16/float64,
labels [N] int64 in [0, K), count [K] float64 (elements per class), mean and
m2 [K, C] float64 contiguous; all updated in place with Chan's parallel merge.

Phase 1 (``_row_moments_kernel``): a program reduces BLOCK_R rows of L values
to (mean, M2), BLOCK_L columns at a time. Each row is shifted by its first
value so float32 works on deviations, each block's (mean, M2) comes from two
passes in registers, and blocks are Chan-merged in float64. x is read once.
Phase 2: the class count before every sample (its rank within its class,
from a stable sort) gives the Chan weights (torch, O(N log N)); then
``_merge_kernel`` programs own blocks of channels and walk the samples in
order, merging row stats into mean/m2 of the sample's class. L == 1 skips
phase 1 (the merge reads x directly).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _row_moments_kernel(x_ptr, rm_ptr, rm2_ptr, rows, length,
                        BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr, F64: tl.constexpr):
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    base = r * length
    if F64:
        shift = tl.load(x_ptr + base, mask=rmask, other=0.0).to(tl.float64)
    else:
        shift = tl.load(x_ptr + base, mask=rmask, other=0.0).to(tl.float32)
    mean = tl.zeros([BLOCK_R], dtype=tl.float64)
    m2 = tl.zeros([BLOCK_R], dtype=tl.float64)
    for start in range(0, length, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        mask = rmask[:, None] & (cols < length)[None, :]
        v = tl.load(x_ptr + base[:, None] + cols[None, :], mask=mask, other=0.0)
        if F64:
            v = v.to(tl.float64)
        else:
            v = v.to(tl.float32)
        v = tl.where(mask, v - shift[:, None], 0.0)
        nb = tl.minimum(length - start, BLOCK_L).to(tl.float64)
        bm = tl.sum(v, axis=1) / nb.to(v.dtype)
        d = tl.where(mask, v - bm[:, None], 0.0)
        bm2 = tl.sum(d * d, axis=1).to(tl.float64)
        na = tl.cast(start, tl.float64)
        tot = na + nb
        delta = bm.to(tl.float64) - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + bm2 + delta * delta * (na * nb / tot)
    tl.store(rm_ptr + r, shift.to(tl.float64) + mean, mask=rmask)
    tl.store(rm2_ptr + r, tl.maximum(m2, 0.0), mask=rmask)


@triton.jit
def _merge_kernel(src_ptr, src2_ptr, labels_ptr, wb_ptr, wab_ptr, mean_ptr, m2_ptr, n, channels,
                  BLOCK_C: tl.constexpr, DIRECT: tl.constexpr):
    pid = tl.program_id(0)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < channels
    for i in range(0, n):
        k = tl.load(labels_ptr + i)
        wb = tl.load(wb_ptr + i)
        wab = tl.load(wab_ptr + i)
        row = tl.cast(i, tl.int64) * channels + c
        if DIRECT:
            rmean = tl.load(src_ptr + row, mask=cmask, other=0.0).to(tl.float64)
            rm2 = tl.zeros([BLOCK_C], dtype=tl.float64)
        else:
            rmean = tl.load(src_ptr + row, mask=cmask, other=0.0)
            rm2 = tl.load(src2_ptr + row, mask=cmask, other=0.0)
        s = k * channels + c
        m = tl.load(mean_ptr + s, mask=cmask, other=0.0)
        q = tl.load(m2_ptr + s, mask=cmask, other=0.0)
        delta = rmean - m
        tl.store(mean_ptr + s, m + delta * wb, mask=cmask)
        tl.store(m2_ptr + s, q + rm2 + delta * delta * wab, mask=cmask)
        tl.debug_barrier()  # the next sample may be of the same class


def _check(x3: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor) -> None:
    if x3.dim() != 3 or x3.dtype not in _FLOAT_DTYPES or not x3.is_contiguous():
        raise ValueError(f"x3 must be a contiguous [N, C, L] float tensor, got {x3.dtype} {tuple(x3.shape)}")
    n, c, _ = x3.shape
    if labels.dim() != 1 or labels.dtype != torch.int64 or labels.shape[0] != n or not labels.is_contiguous():
        raise ValueError(f"labels must be a contiguous int64 [{n}] tensor, got {labels.dtype} {tuple(labels.shape)}")
    if count.dim() != 1 or count.dtype != torch.float64 or not count.is_contiguous():
        raise ValueError(f"count must be a contiguous float64 [K] tensor, got {count.dtype} {tuple(count.shape)}")
    k = count.shape[0]
    for name, t in (("mean", mean), ("m2", m2)):
        if tuple(t.shape) != (k, c) or t.dtype != torch.float64 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float64 [{k}, {c}] tensor, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("labels", labels), ("count", count), ("mean", mean), ("m2", m2)):
        if t.device != x3.device:
            raise ValueError(f"{name} is on {t.device} but x3 is on {x3.device}")


def _chan_weights(labels: torch.Tensor, count: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: weights nb/n and na*nb/n of its merge in sample order; updates count."""
    n = labels.shape[0]
    sorted_labels, perm = torch.sort(labels, stable=True)
    pos = torch.arange(n, device=labels.device)
    first = torch.ones(n, dtype=torch.bool, device=labels.device)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    seg_start = torch.cummax(torch.where(first, pos, torch.zeros_like(pos)), dim=0).values
    rank = torch.empty_like(pos)
    rank[perm] = pos - seg_start  # samples of the same class before this one
    nb = float(length)
    na = count[labels] + nb * rank.to(torch.float64)
    w_b = nb / (na + nb)
    w_ab = na * w_b
    count.add_(torch.bincount(labels, minlength=count.shape[0]).to(torch.float64) * nb)
    return w_b.contiguous(), w_ab.contiguous()


def classwise_moments_accumulate_(
    x3: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> None:
    """Merge the class-wise moments of x3 [N, C, L] into (count, mean, m2), in place."""
    _check(x3, labels, count, mean, m2)
    n, c, length = x3.shape
    if n == 0 or length == 0:
        return
    w_b, w_ab = _chan_weights(labels, count, length)
    if c == 0:
        return
    if length == 1:
        src, src2, direct = x3, x3, True
    else:
        rows = n * c
        rm = torch.empty(rows, dtype=torch.float64, device=x3.device)
        rm2 = torch.empty(rows, dtype=torch.float64, device=x3.device)
        block_l = min(triton.next_power_of_2(length), 1024)
        block_r = max(1, min(4096 // block_l, triton.next_power_of_2(rows)))
        _row_moments_kernel[(triton.cdiv(rows, block_r),)](
            x3, rm, rm2, rows, length, BLOCK_R=block_r, BLOCK_L=block_l, F64=x3.dtype == torch.float64
        )
        src, src2, direct = rm, rm2, False
    block_c = min(triton.next_power_of_2(c), 64)
    _merge_kernel[(triton.cdiv(c, block_c),)](
        src, src2, labels, w_b, w_ab, mean, m2, n, c, BLOCK_C=block_c, DIRECT=direct
    )
