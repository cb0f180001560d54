"""Training building blocks shared by squeeze (teacher) and train (student)."""
from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a dedicated generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


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


def hashed_seed(*parts: str | int) -> int:
    """A 63-bit seed from sha256 of "part0/part1/...": independent named streams that do not depend on how
    the work is split (ints are written as ints, so 3 and 3.0 give the same seed)."""
    text = "/".join(p if isinstance(p, str) else str(int(p)) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & (2**63 - 1)


def batch_indices(n: int, batch_size: int, generator: torch.Generator | None, drop_last: bool) -> Iterator[torch.Tensor]:
    """Index batches of a shuffled (generator given) or ordered range(n)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = (n // batch_size) * batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def to_float_images(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float().div_(255.0)


@torch.no_grad()
def eval_counts(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, batch_size: int = 256,
                bf16: bool = False, channels_last: bool = False) -> tuple[int, float, int]:
    """(correct, summed negative log-likelihood, count) of ``model`` on an in-memory uint8 dataset.

    Sums rather than means, so shards of a split combine exactly (distributed.evaluate_sharded).
    Batches of 256 keep a ConvNet's activations in cache (1000 was ~2x slower);
    ``channels_last`` must match the model's memory format to use the fast conv path.
    """
    from lpqld_fast.supervised_bn import fused_eval_bn

    was_training = model.training
    model.eval()
    correct, nll = 0, 0.0
    device = next(model.parameters()).device
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).to(device)
    with fused_eval_bn(model):  # BN + ReLU + pool blocks as one pass each (lpqld_fast.supervised_bn)
        for idx in batch_indices(len(labels), batch_size, None, drop_last=False):
            x = (to_float_images(images_uint8[idx].to(device)) - mean) / std
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x).float()
            y = labels[idx].to(device)
            correct += int((logits.argmax(dim=1) == y).sum())
            nll += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return correct, nll, len(labels)


def evaluate(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, mean: Sequence[float] | torch.Tensor,
             std: Sequence[float] | torch.Tensor, batch_size: int = 256, bf16: bool = False,
             channels_last: bool = False) -> float:
    """Top-1 accuracy (%) of ``model`` on an in-memory uint8 dataset (see :func:`eval_counts`)."""
    correct, _, n = eval_counts(model, images_uint8, labels, mean, std, batch_size, bf16, channels_last)
    return 100.0 * correct / max(n, 1)
