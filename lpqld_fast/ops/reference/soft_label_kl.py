"""Plain-PyTorch oracle for the soft-label KL loss and the soft-label decoders.

Readable and dense on purpose: every stored soft label is decoded to a full
teacher distribution p [B, C] (``decode_teacher``), and the loss is

    loss = (1/B) * sum_b sum_j p_bj * (log p_bj - log q_bj),  q = softmax(z / t_s)

(times T^2 when ``t2_scale``), terms with p = 0 counting 0, written with
torch ops so that autograd gives the reference gradient. This is also the
"reference strategy" baseline: decode densely, then a KLDivLoss.

Decoders (``mode``), for values [B, k] and indices [B, k]:

- "dense": values [B, C] are teacher logits, p = softmax(values / T).
- "mr" (LPQLD MR-k): values are the top-k teacher logits, p = softmax(values / T)
  over the k stored classes, 0 elsewhere.
- "mrs" (MRS-k): like "mr", but every non-stored class has logit ``fill`` [B]
  (the per-sample minimum logit) before the softmax over all C classes.
- "ms" (FKD marginal smoothing): values are top-k probabilities (T ignored);
  the remaining mass max(1 - sum, 0) is spread uniformly over the C - k others.
- "topk_norenorm" (paper 001): values are top-k probabilities, 0 elsewhere, not
  renormalised (sum p <= 1). T ignored.

int8 values are dequantised as values * scale[:, None] + offset[:, None].
Probabilities (modes "ms", "topk_norenorm") are clamped at 0 after
dequantisation, so a slightly negative dequantised value counts as 0.
"""
from __future__ import annotations

import torch

from lpqld_fast.ops.label_modes import MODES


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def dequantize(
    values: torch.Tensor,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Stored values as ``dtype``: int8 rows are mapped through v * scale + offset."""
    if values.dtype == torch.int8:
        if scale is None or offset is None:
            raise ValueError("int8 values need both scale and offset")
        return values.to(dtype) * scale.to(dtype)[:, None] + offset.to(dtype)[:, None]
    return values.to(dtype)


def decode_teacher(
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    mode: str,
    num_classes: int | None = None,
    T: float = 1.0,
    fill: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Decode stored soft labels to the dense teacher distribution p [B, C].

    ``num_classes`` is C (required for every mode but "dense", where it is
    values.shape[1]). ``dtype`` defaults to float32 (float64 if values are).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    dtype = dtype or _compute_dtype(values, fill)
    v = dequantize(values, scale, offset, dtype)
    if mode == "dense":
        return torch.softmax(v / T, dim=1)
    if indices is None or num_classes is None:
        raise ValueError(f"mode {mode!r} needs indices and num_classes")
    b, k = v.shape
    c = num_classes
    idx = indices.to(torch.int64)
    if mode == "mr":
        p = torch.zeros(b, c, dtype=dtype, device=v.device)
        return p.scatter(1, idx, torch.softmax(v / T, dim=1))
    if mode == "mrs":
        if fill is None:
            raise ValueError("mode 'mrs' needs fill")
        teacher_logits = fill.to(dtype)[:, None].expand(b, c).clone()
        teacher_logits.scatter_(1, idx, v)
        return torch.softmax(teacher_logits / T, dim=1)
    probs = v.clamp_min(0)
    if mode == "ms":
        rest = (1 - probs.sum(dim=1)).clamp_min(0)
        per_class = rest / (c - k) if c > k else torch.zeros_like(rest)
        p = per_class[:, None].expand(b, c).clone()
        return p.scatter(1, idx, probs)
    # topk_norenorm
    p = torch.zeros(b, c, dtype=dtype, device=v.device)
    return p.scatter(1, idx, probs)


def kl_from_dense(student_logits: torch.Tensor, p: torch.Tensor, t_s: float = 1.0) -> torch.Tensor:
    """sum_b sum_j p (log p - log softmax(z / t_s)) / B, with 0 log 0 = 0 (differentiable in z)."""
    b = student_logits.shape[0]
    log_q = torch.log_softmax(student_logits.to(p.dtype) / t_s, dim=1)
    rows = (torch.special.xlogy(p, p) - p * log_q).sum(dim=1)
    return rows.sum() / max(b, 1)


def soft_label_kl(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    mode: str,
    T: float = 1.0,
    t_s: float = 1.0,
    fill: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    t2_scale: bool = False,
) -> torch.Tensor:
    """The loss, batchmean; autograd gives d(loss)/d(student_logits).

    Computed in float32 (float64 when the logits or values are float64).
    """
    dtype = _compute_dtype(student_logits, values, fill)
    p = decode_teacher(
        values, indices, mode=mode, num_classes=student_logits.shape[1], T=T,
        fill=fill, scale=scale, offset=offset, dtype=dtype,
    )
    loss = kl_from_dense(student_logits, p, t_s)
    if t2_scale:
        loss = loss * (T * T)
    return loss


def reference_strategy_loss(
    student_logits: torch.Tensor, p: torch.Tensor, t_s: float = 1.0, T: float = 1.0, t2_scale: bool = False
) -> torch.Tensor:
    """What the public reference code does: log_softmax + nn.KLDivLoss(batchmean) on a dense p."""
    log_q = torch.log_softmax(student_logits.to(p.dtype) / t_s, dim=1)
    loss = torch.nn.KLDivLoss(reduction="batchmean")(log_q, p)
    return loss * (T * T) if t2_scale else loss
