"""Triton kernel of the fused soft-label KL loss (loss and d(loss)/d(logits) in one pass).

One program per row b of the student logits z [B, C]:

1. decode the k stored teacher entries (dequantise int8, softmax over the k
   logits at T, or the probability modes) into the background probability
   p_bg of the non-stored classes and S = sum_j p_j;
2. online softmax statistics of z / t_s over C, BLOCK_C columns at a time;
3. a second loop over C writing grad_j = coef * (S * q_j - p_bg) and summing
   (z_j - max);
4. after a barrier, the k stored entries: grad = coef * (S * q_i - p_i) and
   the loss, with the background terms in closed form.

Dense mode computes the teacher softmax alongside the student's. The dense
teacher distribution is never materialised. Arithmetic is float32 whatever
the input dtype (float64 inputs are computed in float32 here; the C++
backend computes them in float64). See lpqld_fast/ops/reference/soft_label_kl.py
for the definitions and csrc/soft_label_kl.cpp for the outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lpqld_fast.ops.label_modes import MODE_CODES

# The mode codes as compile-time constants of the kernel (a @triton.jit function reads only constexpr globals).
_DENSE = tl.constexpr(MODE_CODES["dense"])
_MR = tl.constexpr(MODE_CODES["mr"])
_MRS = tl.constexpr(MODE_CODES["mrs"])
_MS = tl.constexpr(MODE_CODES["ms"])


@triton.jit
def _load_values(v_row, cols, mask, qs, qo, QUANT: tl.constexpr):
    v = tl.load(v_row + cols, mask=mask, other=0).to(tl.float32)
    if QUANT:
        v = v * qs + qo
    return v


@triton.jit
def _row_max_sumexp(row_ptr, n, inv_t, qs, qo, QUANT: tl.constexpr, BLOCK: tl.constexpr):
    """Online softmax statistics of x / t over a row: (max x, sum exp((x - max) * inv_t))."""
    offs = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    s = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for start in range(0, n, BLOCK):
        cols = start + offs
        mask = cols < n
        x = _load_values(row_ptr, cols, mask, qs, qo, QUANT)
        x = tl.where(mask, x, float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp((m - m_new) * inv_t) + tl.sum(tl.exp((x - m_new) * inv_t), axis=0)
        m = m_new
    return m, s


@triton.jit
def _soft_label_kl_fwd_kernel(
    z_ptr,
    z_stride,
    v_ptr,
    v_stride,
    i_ptr,
    i_stride,
    fill_ptr,
    scale_ptr,
    offset_ptr,
    loss_ptr,
    g_ptr,
    C,
    K,
    c_f,
    rest_f,
    inv_s,
    inv_t,
    coef,
    grad_scale,
    MODE: tl.constexpr,
    QUANT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    v_row = v_ptr + row * v_stride
    g_row = g_ptr + row * C
    qs = 1.0
    qo = 0.0
    if QUANT:
        qs = tl.load(scale_ptr + row)
        qo = tl.load(offset_ptr + row)
    offs = tl.arange(0, BLOCK_C)

    zm, zs = _row_max_sumexp(z_row, C, inv_s, 1.0, 0.0, False, BLOCK_C)
    log_zs = tl.log(zs)

    if MODE == _DENSE:  # dense teacher logits [B, C]
        um, us = _row_max_sumexp(v_row, C, inv_t, qs, qo, QUANT, BLOCK_C)
        log_zt = tl.log(us)
        acc = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            mask = cols < C
            z = tl.load(z_row + cols, mask=mask, other=0).to(tl.float32)
            u = _load_values(v_row, cols, mask, qs, qo, QUANT)
            dz = (z - zm) * inv_s
            du = (u - um) * inv_t
            q = tl.exp(dz) / zs
            p = tl.exp(du) / us
            lq = dz - log_zs
            lp = du - log_zt
            tl.store(g_row + cols, (coef * (q - p)).to(g_ptr.dtype.element_ty), mask=mask)
            acc += tl.where(mask & (p > 0), p * (lp - lq), 0.0)
        loss = tl.sum(acc, axis=0)
    else:
        i_row = i_ptr + row * i_stride
        koffs = tl.arange(0, BLOCK_K)
        # 1. teacher decode statistics over the k stored entries
        if MODE == _MR or MODE == _MRS:  # logits, softmax at T
            tm = tl.max(tl.full([BLOCK_K], float("-inf"), tl.float32), axis=0)
            for ks in range(0, K, BLOCK_K):
                kk = ks + koffs
                kmask = kk < K
                v = _load_values(v_row, kk, kmask, qs, qo, QUANT)
                tm = tl.maximum(tm, tl.max(tl.where(kmask, v * inv_t, float("-inf")), axis=0))
            uf = 0.0
            if MODE == _MRS:
                uf = tl.load(fill_ptr + row).to(tl.float32) * inv_t
                tm = tl.where(rest_f > 0, tl.maximum(tm, uf), tm)
            zacc = tl.zeros([BLOCK_K], tl.float32)
            for ks in range(0, K, BLOCK_K):
                kk = ks + koffs
                kmask = kk < K
                v = _load_values(v_row, kk, kmask, qs, qo, QUANT)
                zacc += tl.where(kmask, tl.exp(v * inv_t - tm), 0.0)
            zt = tl.sum(zacc, axis=0)
            if MODE == _MRS:
                zt += rest_f * tl.exp(uf - tm)
            log_zt = tl.log(zt)
            logp_bg = uf - tm - log_zt
            p_bg = 0.0
            if MODE == _MRS:
                p_bg = tl.where(rest_f > 0, tl.exp(logp_bg), 0.0)
            S = 1.0
        else:  # ms / topk_norenorm: probabilities
            pacc = tl.zeros([BLOCK_K], tl.float32)
            for ks in range(0, K, BLOCK_K):
                kk = ks + koffs
                kmask = kk < K
                v = _load_values(v_row, kk, kmask, qs, qo, QUANT)
                pacc += tl.where(kmask, tl.maximum(v, 0.0), 0.0)
            stored = tl.sum(pacc, axis=0)
            p_bg = 0.0
            if MODE == _MS:
                p_bg = tl.where(rest_f > 0, tl.maximum(1.0 - stored, 0.0) / tl.maximum(rest_f, 1.0), 0.0)
            logp_bg = tl.log(tl.where(p_bg > 0, p_bg, 1.0))
            S = stored + rest_f * p_bg

        # 2./3. gradient pass over all C columns
        qscale = coef * S / zs
        bg = coef * p_bg
        dacc = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, C, BLOCK_C):
            cols = start + offs
            mask = cols < C
            z = tl.load(z_row + cols, mask=mask, other=0).to(tl.float32)
            d = z - zm
            tl.store(g_row + cols, (qscale * tl.exp(d * inv_s) - bg).to(g_ptr.dtype.element_ty), mask=mask)
            dacc += tl.where(mask, d, 0.0)
        dsum = tl.sum(dacc, axis=0)
        # The stored entries below overwrite columns that other threads of this
        # program wrote above.
        tl.debug_barrier()

        # 4. the k stored entries: exact gradient and loss terms
        lacc = tl.zeros([BLOCK_K], tl.float32)
        lqacc = tl.zeros([BLOCK_K], tl.float32)
        for ks in range(0, K, BLOCK_K):
            kk = ks + koffs
            kmask = kk < K
            idx = tl.load(i_row + kk, mask=kmask, other=0).to(tl.int64)
            kmask = kmask & (idx >= 0) & (idx < C)
            v = _load_values(v_row, kk, kmask, qs, qo, QUANT)
            if MODE == _MR or MODE == _MRS:
                lp = v * inv_t - tm - log_zt
                p = tl.exp(lp)
            else:
                p = tl.maximum(v, 0.0)
                lp = tl.log(tl.where(p > 0, p, 1.0))
            zi = tl.load(z_row + idx, mask=kmask, other=0).to(tl.float32)
            lq = (zi - zm) * inv_s - log_zs
            q = tl.exp(lq)
            tl.store(g_row + idx, (coef * (S * q - p)).to(g_ptr.dtype.element_ty), mask=kmask)
            lacc += tl.where(kmask & (p > 0), p * (lp - lq), 0.0)
            lqacc += tl.where(kmask, lq, 0.0)
        loss = tl.sum(lacc, axis=0)
        if MODE == _MRS or MODE == _MS:
            all_lq = inv_s * dsum - c_f * log_zs
            bg_terms = rest_f * p_bg * logp_bg - p_bg * (all_lq - tl.sum(lqacc, axis=0))
            loss += tl.where(p_bg > 0, bg_terms, 0.0)
    tl.store(loss_ptr + row, loss * grad_scale)


def _blocks(c: int, k: int, interpret: bool) -> tuple[int, int, int]:
    # Larger blocks mean fewer (slow) interpreted steps; on a GPU 4096 columns
    # per step keeps the registers in check.
    cap_c = 16384 if interpret else 4096
    block_c = min(triton.next_power_of_2(max(c, 1)), cap_c)
    block_k = min(triton.next_power_of_2(max(k, 1)), 1024)
    num_warps = 4 if block_c <= 1024 else (8 if block_c <= 2048 else 16)
    return block_c, block_k, num_warps


def soft_label_kl_fwd(
    logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None,
    fill: torch.Tensor | None,
    scale: torch.Tensor | None,
    offset: torch.Tensor | None,
    mode: int,
    T: float,
    t_s: float,
    grad_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as torch.ops.lpqld.soft_label_kl_fwd: (loss_rows [B], grad [B, C]).

    loss_rows[b] = grad_scale * KL_b (float32; float64 for float64 logits),
    grad = grad_scale / (B * t_s) * (q * S - p) in the logits' dtype. Inputs
    are assumed validated by lpqld_fast.ops.soft_label_kl.
    """
    b, c = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    values = values.contiguous()
    k = values.shape[1]
    loss_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    grad = torch.empty((b, c), dtype=logits.dtype, device=logits.device)
    loss_rows = torch.zeros(b, dtype=torch.float32, device=logits.device)
    if b == 0:
        return loss_rows.to(loss_dtype), grad
    quant = values.dtype == torch.int8
    if indices is not None:
        indices = indices.contiguous()
    dummy = loss_rows  # pointer for the arguments a mode does not read
    idx = indices if indices is not None else dummy
    block_c, block_k, num_warps = _blocks(c, k, logits.device.type != "cuda")
    _soft_label_kl_fwd_kernel[(b,)](
        logits,
        logits.stride(0),
        values,
        values.stride(0),
        idx,
        idx.stride(0) if indices is not None else 0,
        fill.to(torch.float32).contiguous() if fill is not None else dummy,
        scale.to(torch.float32).contiguous() if quant else dummy,
        offset.to(torch.float32).contiguous() if quant else dummy,
        loss_rows,
        grad,
        c,
        k,
        float(c),
        float(c - k),
        1.0 / t_s,
        1.0 / T,
        grad_scale / (b * t_s),
        grad_scale,
        MODE=mode,
        QUANT=quant,
        BLOCK_C=block_c,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return loss_rows.to(loss_dtype), grad
