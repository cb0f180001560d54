"""Training building blocks shared by squeeze (teacher) and train (student): optimizer, schedule, batch
order (random streams: lpqld_fast.seeding). Evaluation lives in :mod:`lpqld_fast.evaluation`."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on weights with ndim > 1 (not on biases or norm affine params)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                    nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas)
    raise ValueError(f"unknown optimizer {name!r}; choose sgd, adamw or adam")


def warmup_cosine(total_steps: int, warmup_steps: int = 0, floor: float = 0.0):
    """LambdaLR factor: linear warm-up then cosine decay to ``floor``."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool) -> Iterator[torch.Tensor]:
    """Index batches of a shuffled (generator given) or ordered range(n)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def to_float_images(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div_(255.0)
