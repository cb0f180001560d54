"""Plain-PyTorch oracle for the class-wise moment ops.

Readable and slow on purpose: a Python loop over the classes present, exact
float64 moments of each class's samples, and Chan's parallel merge into the
running state. The fast backends must agree with this.
"""
from __future__ import annotations

import torch


def classwise_moments_accumulate_(
    x: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor
) -> None:
    """Merge the moments of ``x`` [N, C, L] per class into (count, mean, m2).

    count [K] float64 counts elements (samples * L); mean, m2 [K, C] float64.
    """
    n, _, length = x.shape
    if n == 0 or length == 0:
        return
    xd = x.to(torch.float64)
    for k in torch.unique(labels).tolist():
        xs = xd[labels == k]  # [n_k, C, L]
        nb = xs.shape[0] * length
        mb = xs.mean(dim=(0, 2))
        m2b = ((xs - mb[None, :, None]) ** 2).sum(dim=(0, 2))
        na = count[k].item()
        ntot = na + nb
        delta = mb - mean[k]
        mean[k] = mean[k] + delta * (nb / ntot)
        m2[k] = m2[k] + m2b + delta * delta * (na * nb / ntot)
        count[k] = ntot


def classwise_moments(x: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Per class: sample count, mean and biased variance over (samples, spatial)."""
    c = x.shape[1]
    xf = x.reshape(x.shape[0], c, -1)
    count = torch.zeros(num_classes, dtype=torch.float64, device=x.device)
    mean = torch.zeros(num_classes, c, dtype=torch.float64, device=x.device)
    m2 = torch.zeros(num_classes, c, dtype=torch.float64, device=x.device)
    classwise_moments_accumulate_(xf, labels, count, mean, m2)
    samples = torch.bincount(labels.long(), minlength=num_classes)
    var = m2 / count.clamp_min(1)[:, None]
    return samples, mean, var


def classwise_ema_update_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch_mean: torch.Tensor,
    batch_var: torch.Tensor,
    present: torch.Tensor,
    momentum: float,
) -> None:
    """The reference's EMA: only classes present in the batch move, by ``momentum``."""
    for k in torch.nonzero(present).flatten().tolist():
        running_mean[k] = (1 - momentum) * running_mean[k] + momentum * batch_mean[k]
        running_var[k] = (1 - momentum) * running_var[k] + momentum * batch_var[k]
