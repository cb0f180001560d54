"""Every evaluation of a model on a labelled split, in one place; ranks share the work under torchrun.

- :func:`evaluate_dataset`: the one the stages call. A split held in memory (uint8 ``images``) goes to
  :func:`evaluate_sharded_metrics`, a streamed ImageFolder split to :func:`evaluate_folder`.
- :func:`eval_counts`: (correct, summed NLL, count) on in-memory uint8 images, the kernel of the in-memory
  evaluations; :func:`evaluate` is its accuracy in one process.
- :func:`evaluate_sharded` / :func:`evaluate_sharded_metrics`: the in-memory split cut into contiguous
  shards over ranks, the sums all-reduced in float64, so the result equals one process exactly.
- :func:`evaluate_folder`: an ImageFolder split decoded in DataLoader workers with its deterministic eval
  transform, sharded the same way.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lpqld_fast import distributed
from lpqld_fast.data.streaming import seeded_batches
from lpqld_fast.ddp import unwrap
from lpqld_fast.engine import batch_indices, to_float_images
from lpqld_fast.supervised_bn import fused_eval_bn

__all__ = ["evaluate_dataset", "eval_counts", "evaluate", "evaluate_sharded", "evaluate_sharded_metrics",
           "evaluate_folder"]


def evaluate_dataset(model: nn.Module, ds: Any, mean: Sequence[float] | torch.Tensor,
                     std: Sequence[float] | torch.Tensor, *, bf16: bool = False, channels_last: bool = False,
                     num_workers: int = 4, batch_size: int = 256) -> dict[str, float]:
    """``{"acc": top-1 %, "nll": mean NLL}`` of ``model`` on a split held in memory (normalised with
    ``mean``/``std``), ``{"acc"}`` on a streamed ImageFolder split (its own transform normalises; decoded in
    ``num_workers`` workers), in batches of ``batch_size``. The same numbers on every rank."""
    if hasattr(ds, "images"):
        return evaluate_sharded_metrics(model, ds.images, ds.labels, mean, std, bf16=bf16,
                                        channels_last=channels_last, batch_size=batch_size)
    return {"acc": evaluate_folder(model, ds, batch_size=batch_size, num_workers=num_workers,
                                   channels_last=channels_last, bf16=bf16)}


# --------------------------------------------------------------------------- in memory


@torch.no_grad()
def eval_counts(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor, batch_size: int = 256,
                bf16: bool = False, channels_last: bool = False) -> tuple[int, float, int]:
    """(correct, summed negative log-likelihood, count) of ``model`` on an in-memory uint8 dataset.

    Sums rather than means, so shards of a split combine exactly (:func:`evaluate_sharded_metrics`).
    Batches of 256 keep a ConvNet's activations in cache (1000 was ~2x slower);
    ``channels_last`` must match the model's memory format to use the fast conv path.
    """
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
    """Top-1 accuracy (%) of ``model`` on an in-memory uint8 dataset, this process only (see :func:`eval_counts`)."""
    correct, _, n = eval_counts(model, images_uint8, labels, mean, std, batch_size, bf16, channels_last)
    return 100.0 * correct / max(n, 1)


def evaluate_sharded(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, mean, std,
                     **kwargs: Any) -> float:
    """:func:`evaluate` with the test set split over ranks; the same number on every rank."""
    return evaluate_sharded_metrics(model, images_uint8, labels, mean, std, **kwargs)["acc"]


def evaluate_sharded_metrics(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, mean, std,
                             **kwargs: Any) -> dict[str, float]:
    """Top-1 accuracy (%) and mean NLL of ``model``, the split shared over ranks; the same on every rank.

    Each rank counts its contiguous part (:func:`eval_counts`); the sums are all-reduced in float64, so the
    accuracy equals the 1-process value exactly.
    """
    model = unwrap(model)
    ws = distributed.world_size()
    sl = distributed.shard_slice(len(labels)) if ws > 1 else slice(0, len(labels))
    if sl.stop > sl.start:
        correct, nll, n = eval_counts(model, images_uint8[sl], labels[sl], mean, std, **kwargs)
    else:
        correct, nll, n = 0, 0.0, 0
    if ws > 1:
        sums = torch.tensor([correct, nll, n], dtype=torch.float64)
        distributed.all_reduce_(sums)
        correct, nll, n = int(sums[0]), float(sums[1]), int(sums[2])
    return {"acc": 100.0 * correct / max(n, 1), "nll": nll / max(n, 1)}


# --------------------------------------------------------------------------- streamed ImageFolder split


@torch.no_grad()
def evaluate_folder(model: nn.Module, ds: Any, batch_size: int = 256, num_workers: int = 4,
                    channels_last: bool = False, bf16: bool = False) -> float:
    """Top-1 accuracy (%) over an ImageFolder split with its (deterministic) eval transform, ranks sharded."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(ds)
    sl = distributed.shard_slice(n)
    idx = list(range(sl.start, sl.stop))
    batches = [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    correct = 0
    for x, y in seeded_batches(ds, batches, None, num_workers):
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            correct += int((model(x).argmax(dim=1).cpu() == y).sum())
    model.train(was_training)
    counts = torch.tensor([correct, len(idx)], dtype=torch.int64)
    if distributed.world_size() > 1:
        distributed.all_reduce_(counts)
    return 100.0 * int(counts[0]) / max(n, 1)
