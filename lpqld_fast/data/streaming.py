"""Decode-as-you-go passes over an ImageFolder tree (teacher training, the class-wise statistics pass and
lpqld_fast.evaluation.evaluate_folder).

The in-memory datasets (Fashion-MNIST, synthetic) index one uint8 tensor; an ImageNet-scale tree is decoded
image by image in DataLoader workers instead. Augmentation is seeded per image, so the results do not
depend on how the work is split: image ``i`` of the pass with seed ``s`` is transformed under the torch RNG
seeded from ``(s, i)`` (the folder's train transform draws from the torch RNG), so the pixels do not depend
on the batch size, the number of workers or the number of ranks.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from lpqld_fast import seeding
from lpqld_fast.seeding import hashed_seed

__all__ = ["image_seed", "seeded_batches"]


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
                                         generator=seeding.subset(0))
    return ((x, torch.as_tensor(y, dtype=torch.int64)) for x, y in loader)
