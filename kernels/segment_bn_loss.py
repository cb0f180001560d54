"""Triton kernels of the fused segmented BN-statistics matching loss.

Same contract as the native ops lpqld::segment_bn_loss_fwd / _bwd (see
csrc/segment_bn_loss.cpp): x [N, C, L] contiguous, segment_ids [N] int64 in
[0, S) (validated by the caller, lpqld_fast.ops.segment_bn_loss), targets
[S, C] float64 contiguous.

Forward (the one pass over x):
  1. ``_row_moments_kernel``: a program takes a [ROWS, BLOCK_L] tile of
     (sample, channel) rows and walks along L; each block's mean and M2 are
     computed in registers and merged into the running row state with Chan's
     formula. Values are shifted by the row's first element before any
     arithmetic, so large means do not cancel. Row mean / M2 go to float64.
  2. ``_segment_combine_kernel``: one program per segment visits the rows of
     its segment (rows sorted by segment with torch.argsort, tiny [N] work):
     mean_s = average of the row means (BLOCK_J rows at a time), M2_s = sum of row M2 +
     L * sum (row mean - mean_s)^2, in float64; then the loss.
Backward:
  3. ``_coeff_kernel``: per segment the norms and the per-channel
     coefficients scale, alpha and the mean split into hi + lo parts;
  4. ``_grad_kernel``: elementwise grad = scale * ((x - hi) - lo) + alpha.

Arithmetic on x is float32 (float64 for float64 x). Runs on CUDA tensors and
on CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 1024  # elements of x per program tile


@triton.jit
def _row_moments_kernel(
    x_ptr, rmean_ptr, rm2_ptr, R, L,
    ROWS: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < R
    base = rows * L
    shift = tl.load(x_ptr + base, mask=rmask, other=0).to(ACC)
    cols = tl.arange(0, BLOCK_L)
    n_a = tl.zeros([ROWS], ACC)
    mean_a = tl.zeros([ROWS], ACC)
    m2_a = tl.zeros([ROWS], ACC)
    for start in range(0, L, BLOCK_L):
        c = start + cols
        m = rmask[:, None] & (c < L)[None, :]
        v = tl.load(x_ptr + base[:, None] + c[None, :], mask=m, other=0).to(ACC) - shift[:, None]
        v = tl.where(m, v, 0.0)
        n_b = tl.minimum(L - start, BLOCK_L).to(ACC)
        mean_b = tl.sum(v, axis=1) / n_b
        d = tl.where(m, v - mean_b[:, None], 0.0)
        m2_b = tl.sum(d * d, axis=1)
        n = n_a + n_b
        delta = mean_b - mean_a
        mean_a = mean_a + delta * (n_b / n)
        m2_a = m2_a + m2_b + delta * delta * (n_a * n_b / n)
        n_a = n
    tl.store(rmean_ptr + rows, shift.to(tl.float64) + mean_a.to(tl.float64), mask=rmask)
    tl.store(rm2_ptr + rows, m2_a.to(tl.float64), mask=rmask)


@triton.jit
def _segment_combine_kernel(
    rmean_ptr, rm2_ptr, order_ptr, offsets_ptr, tm_ptr, tv_ptr, mean_ptr, var_ptr, loss_ptr, C, L,
    BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    rws = tl.arange(0, BLOCK_J)
    lo = tl.load(offsets_ptr + s)
    hi = tl.load(offsets_ptr + s + 1)
    k = (hi - lo).to(tl.float64)
    kf = tl.maximum(k, 1.0)
    lf = tl.cast(L, tl.float64)
    cols = tl.arange(0, BLOCK_C)
    sq_m = tl.sum(tl.zeros([BLOCK_C], tl.float64), axis=0)
    sq_v = tl.sum(tl.zeros([BLOCK_C], tl.float64), axis=0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        cm = c < C
        cm2 = cm[None, :]
        acc = tl.zeros([BLOCK_C], tl.float64)
        for j0 in range(lo, hi, BLOCK_J):
            j = j0 + rws
            jm = j < hi
            n = tl.load(order_ptr + j, mask=jm, other=0)
            acc += tl.sum(tl.load(rmean_ptr + n[:, None] * C + c[None, :], mask=jm[:, None] & cm2, other=0.0), axis=0)
        mu = acc / kf
        acc2 = tl.zeros([BLOCK_C], tl.float64)
        for j0 in range(lo, hi, BLOCK_J):
            j = j0 + rws
            m = (j < hi)[:, None] & cm2
            n = tl.load(order_ptr + j, mask=j < hi, other=0)
            off = n[:, None] * C + c[None, :]
            d = tl.where(m, tl.load(rmean_ptr + off, mask=m, other=0.0) - mu[None, :], 0.0)
            acc2 += tl.sum(tl.load(rm2_ptr + off, mask=m, other=0.0) + lf * d * d, axis=0)
        var = acc2 / (kf * lf)
        tl.store(mean_ptr + s * C + c, mu, mask=cm)
        tl.store(var_ptr + s * C + c, var, mask=cm)
        em = tl.where(cm, tl.load(tm_ptr + s * C + c, mask=cm, other=0.0) - mu, 0.0)
        ev = tl.where(cm, tl.load(tv_ptr + s * C + c, mask=cm, other=0.0) - var, 0.0)
        sq_m += tl.sum(em * em, axis=0)
        sq_v += tl.sum(ev * ev, axis=0)
    loss = tl.where(k > 0, tl.sqrt(sq_m) + tl.sqrt(sq_v), 0.0)
    tl.store(loss_ptr + s, loss)


@triton.jit
def _coeff_kernel(
    g_ptr, mean_ptr, var_ptr, tm_ptr, tv_ptr, count_ptr, scale_ptr, alpha_ptr, mhi_ptr, mlo_ptr, C, L,
    BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    nm = tl.sum(tl.zeros([BLOCK_C], tl.float64), axis=0)
    nv = tl.sum(tl.zeros([BLOCK_C], tl.float64), axis=0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        cm = c < C
        em = tl.load(mean_ptr + s * C + c, mask=cm, other=0.0) - tl.load(tm_ptr + s * C + c, mask=cm, other=0.0)
        ev = tl.load(var_ptr + s * C + c, mask=cm, other=0.0) - tl.load(tv_ptr + s * C + c, mask=cm, other=0.0)
        nm += tl.sum(em * em, axis=0)
        nv += tl.sum(ev * ev, axis=0)
    nm = tl.sqrt(nm)
    nv = tl.sqrt(nv)
    cnt = tl.load(count_ptr + s)
    ns = tl.maximum(cnt.to(tl.float64) * tl.cast(L, tl.float64), 1.0)
    gs = tl.where(cnt > 0, tl.load(g_ptr + s) / ns, 0.0)
    fa = tl.where(nm > 0, gs / tl.where(nm > 0, nm, 1.0), 0.0)
    fb = tl.where(nv > 0, 2.0 * gs / tl.where(nv > 0, nv, 1.0), 0.0)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        cm = c < C
        mu = tl.load(mean_ptr + s * C + c, mask=cm, other=0.0)
        em = mu - tl.load(tm_ptr + s * C + c, mask=cm, other=0.0)
        ev = tl.load(var_ptr + s * C + c, mask=cm, other=0.0) - tl.load(tv_ptr + s * C + c, mask=cm, other=0.0)
        mhi = mu.to(ACC)
        tl.store(mhi_ptr + s * C + c, mhi, mask=cm)
        tl.store(mlo_ptr + s * C + c, (mu - mhi.to(tl.float64)).to(ACC), mask=cm)
        tl.store(alpha_ptr + s * C + c, (fa * em).to(ACC), mask=cm)
        tl.store(scale_ptr + s * C + c, (fb * ev).to(ACC), mask=cm)


@triton.jit
def _grad_kernel(
    x_ptr, gx_ptr, seg_ptr, scale_ptr, alpha_ptr, mhi_ptr, mlo_ptr, R, C, L,
    ROWS: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    rmask = rows < R
    n = rows // C
    ci = tl.load(seg_ptr + n, mask=rmask, other=0) * C + (rows - n * C)
    sc = tl.load(scale_ptr + ci, mask=rmask, other=0.0)
    al = tl.load(alpha_ptr + ci, mask=rmask, other=0.0)
    mh = tl.load(mhi_ptr + ci, mask=rmask, other=0.0)
    ml = tl.load(mlo_ptr + ci, mask=rmask, other=0.0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    m = rmask[:, None] & (cols < L)[None, :]
    offs = rows[:, None] * L + cols[None, :]
    x = tl.load(x_ptr + offs, mask=m, other=0).to(ACC)
    g = sc[:, None] * ((x - mh[:, None]) - ml[:, None]) + al[:, None]
    tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=m)


def _tiles(length: int) -> tuple[int, int]:
    """(ROWS, BLOCK_L): a tile of ~TILE elements, BLOCK_L covering short rows whole."""
    block_l = min(triton.next_power_of_2(max(length, 1)), TILE)
    return max(1, TILE // block_l), block_l


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check(x: torch.Tensor, segment_ids: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor) -> None:
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [N, C, L] tensor, got shape {tuple(x.shape)}")
    if segment_ids.dtype != torch.int64 or segment_ids.shape != (x.shape[0],) or not segment_ids.is_contiguous():
        raise ValueError("segment_ids must be a contiguous int64 [N] tensor")
    for name, t in (("target_mean", target_mean), ("target_var", target_var)):
        if t.dtype != torch.float64 or t.dim() != 2 or t.shape[1] != x.shape[1] or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float64 [S, C] tensor, got {t.dtype} {tuple(t.shape)}")
    if target_var.shape != target_mean.shape:
        raise ValueError("target_var must have the shape of target_mean")


def segment_bn_loss_fwd(
    x: torch.Tensor, segment_ids: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [S] f64, mean [S, C] f64, var [S, C] f64, count [S] int64)."""
    _check(x, segment_ids, target_mean, target_var)
    n, c, length = x.shape
    s = target_mean.shape[0]
    dev = x.device
    r = n * c
    rmean = torch.empty(r, dtype=torch.float64, device=dev)
    rm2 = torch.empty(r, dtype=torch.float64, device=dev)
    if r:
        rows, block_l = _tiles(length)
        _row_moments_kernel[(triton.cdiv(r, rows),)](
            x, rmean, rm2, r, length, ROWS=rows, BLOCK_L=block_l, ACC=_acc(x.dtype)
        )
    order = torch.argsort(segment_ids, stable=True)
    count = torch.zeros(s, dtype=torch.int64, device=dev).index_add_(0, segment_ids, torch.ones_like(segment_ids))
    offsets = torch.zeros(s + 1, dtype=torch.int64, device=dev)
    torch.cumsum(count, 0, out=offsets[1:])
    mean = torch.empty(s, c, dtype=torch.float64, device=dev)
    var = torch.empty_like(mean)
    loss = torch.empty(s, dtype=torch.float64, device=dev)
    _segment_combine_kernel[(s,)](
        rmean, rm2, order, offsets, target_mean, target_var, mean, var, loss, c, length,
        BLOCK_C=min(triton.next_power_of_2(c), 128), BLOCK_J=16,
    )
    return loss, mean, var, count


def segment_bn_loss_bwd(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    segment_ids: torch.Tensor,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """grad_x (x's dtype and shape) for upstream grad_loss [S] float64."""
    _check(x, segment_ids, target_mean, target_var)
    n, c, length = x.shape
    s = target_mean.shape[0]
    if grad_loss.dtype != torch.float64 or grad_loss.shape != (s,) or not grad_loss.is_contiguous():
        raise ValueError("grad_loss must be a contiguous float64 [S] tensor")
    coef_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = torch.empty(s, c, dtype=coef_dtype, device=x.device)
    alpha, mhi, mlo = torch.empty_like(scale), torch.empty_like(scale), torch.empty_like(scale)
    _coeff_kernel[(s,)](
        grad_loss, mean, var, target_mean, target_var, count, scale, alpha, mhi, mlo, c, length,
        BLOCK_C=min(triton.next_power_of_2(c), 256), ACC=_acc(x.dtype),
    )
    grad_x = torch.empty_like(x)
    r = n * c
    if r:
        rows, block_l = _tiles(length)
        _grad_kernel[(triton.cdiv(r, rows), triton.cdiv(length, block_l))](
            x, grad_x, segment_ids, scale, alpha, mhi, mlo, r, c, length, ROWS=rows, BLOCK_L=block_l, ACC=_acc(x.dtype)
        )
    return grad_x
