"""Decode-as-you-go passes over an ImageFolder tree: the class-wise statistics pass and evaluation.

The in-memory datasets (Fashion-MNIST, synthetic) index one uint8 tensor; an ImageNet-scale tree is decoded
image by image in DataLoader workers instead. Two rules keep the results independent of how the work is
split:

- augmentation is seeded per image: image ``i`` of the pass with seed ``s`` is transformed under the torch
  RNG seeded from ``(s, i)`` (the folder's train transform draws from the torch RNG), so the pixels do not
  depend on the batch size, the number of workers or the number of ranks;
- evaluation counts correct predictions per rank over a contiguous shard and all-reduces the counts.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lpqld_fast.engine import hashed_seed

__all__ = ["image_seed", "seeded_batches", "evaluate_folder"]


def image_seed(seed: int, index: int) -> int:
    """The torch RNG seed of image ``index`` in a pass with seed ``seed``."""
    return hashed_seed("lpqld-folder-pass", seed, index)


class _SeededImages(torch.utils.data.Dataset):
    """``ds[i]`` under the torch RNG seeded by ``image_seed(seed, i)`` (the caller's RNG state is restored)."""

    def __init__(self, ds: Any, seed: int | None) -> None:
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.seed is None:
            return self.ds[i]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(image_seed(self.seed, i))
            return self.ds[i]


def seeded_batches(ds: Any, batches: Sequence[Sequence[int]], seed: int | None, num_workers: int = 4
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images [B, C, H, W] as the dataset's transform returns them, labels [B]) for each index list, in order."""
    if not batches:
        return iter(())
    # its own generator: the DataLoader draws worker base seeds from it, not from the caller's torch RNG
    loader = torch.utils.data.DataLoader(_SeededImages(ds, seed), batch_sampler=[list(b) for b in batches],
                                         num_workers=num_workers, persistent_workers=False,
                                         generator=torch.Generator().manual_seed(0))
    return ((x, torch.as_tensor(y, dtype=torch.int64)) for x, y in loader)


@torch.no_grad()
def evaluate_folder(model: nn.Module, ds: Any, batch_size: int = 256, num_workers: int = 4,
                    channels_last: bool = False, bf16: bool = False) -> float:
    """Top-1 accuracy (%) over an ImageFolder split with its (deterministic) eval transform, ranks sharded."""
    from lpqld_fast import distributed

    model = distributed.unwrap(model)
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
