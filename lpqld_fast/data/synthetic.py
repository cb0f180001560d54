"""Seeded synthetic classification data for tests and smoke runs.

Each class has a random low-resolution prototype (``proto_size`` x
``proto_size`` per channel, values in [0.2, 0.8]) upsampled to the image size;
a sample is its class prototype plus Gaussian pixel noise, quantised to uint8.
Classes therefore differ in their per-pixel means and a small model learns
them in a few steps, for any number of classes (10,450 included: prototypes
cost num_classes * C * proto_size^2 floats).

The train and test splits share the prototypes (same ``seed``) and draw
independent noise. mean/std are the population values implied by the
prototypes and the noise, so both splits normalise identically.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lpqld_fast import seeding

from .memory import DatasetInfo, InMemoryDataset

__all__ = ["SyntheticDataset"]

_SPLITS = {"train": 0, "test": 1}
_MAX_CLASSES = 1 << 20


def _prototypes(num_classes: int, in_chans: int, proto_size: int, seed: int) -> torch.Tensor:
    g = seeding.synthetic(seed, 0)
    return 0.2 + 0.6 * torch.rand(num_classes, in_chans, proto_size, proto_size, generator=g)


def _check_args(num_classes: int, in_chans: int, image_size: int, proto_size: int, noise: float) -> None:
    if not 1 <= num_classes <= _MAX_CLASSES:
        raise ValueError(f"num_classes must be in [1, {_MAX_CLASSES}], got {num_classes}")
    if in_chans <= 0:
        raise ValueError(f"in_chans must be positive, got {in_chans}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 1 <= proto_size <= image_size:
        raise ValueError(f"proto_size must be in [1, image_size={image_size}], got {proto_size}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")


def _population_stats(protos: torch.Tensor, noise: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    p = protos.double().transpose(0, 1).reshape(protos.shape[1], -1)
    mean = p.mean(1)
    std = (p.var(1, unbiased=False) + noise * noise).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


class SyntheticDataset(InMemoryDataset):
    """Seeded, class-balanced synthetic images (an :class:`InMemoryDataset`).

    Args:
        num_classes: number of classes (any, e.g. 10,450 for ImageNet-21K-P-shaped tests).
        samples_per_class: images per class in this split.
        in_chans, image_size: image shape [in_chans, image_size, image_size].
        split: "train" or "test" (same prototypes, independent noise and order).
        seed: selects the prototypes and the noise.
        noise: std of the Gaussian pixel noise on the [0, 1] scale.
        proto_size: resolution of the class prototypes before nearest upsampling.
    """

    def __init__(
        self,
        num_classes: int = 10,
        samples_per_class: int = 10,
        in_chans: int = 1,
        image_size: int = 28,
        *,
        split: str = "train",
        seed: int = 0,
        noise: float = 0.1,
        proto_size: int = 4,
    ) -> None:
        _check_args(num_classes, in_chans, image_size, proto_size, noise)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if samples_per_class <= 0:
            raise ValueError(f"samples_per_class must be positive, got {samples_per_class}")
        protos = _prototypes(num_classes, in_chans, proto_size, seed)
        g = seeding.synthetic(seed, 1 + _SPLITS[split])
        n = num_classes * samples_per_class
        labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
        labels = labels[torch.randperm(n, generator=g)]
        images = torch.empty(n, in_chans, image_size, image_size, dtype=torch.uint8)
        chunk = max(1, (1 << 22) // (in_chans * image_size * image_size))  # ~16 MB of float work per chunk
        for s in range(0, n, chunk):
            lab = labels[s : s + chunk]
            base = F.interpolate(protos[lab], size=(image_size, image_size), mode="nearest")
            x = base + noise * torch.randn(base.shape, generator=g)
            images[s : s + chunk] = x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        mean, std = _population_stats(protos, noise)
        super().__init__(
            images,
            labels,
            num_classes=num_classes,
            mean=mean,
            std=std,
            class_names=[f"class_{i}" for i in range(num_classes)],
            name="synthetic",
        )
        self.seed = seed
        self.split = split

    @staticmethod
    def describe(
        num_classes: int = 10,
        samples_per_class: int = 10,
        in_chans: int = 1,
        image_size: int = 28,
        *,
        split: str = "train",
        seed: int = 0,
        noise: float = 0.1,
        proto_size: int = 4,
    ) -> DatasetInfo:
        """The :class:`DatasetInfo` of a SyntheticDataset with these arguments, without generating images.

        Takes the constructor's arguments; samples_per_class and split do not change the metadata.
        """
        _check_args(num_classes, in_chans, image_size, proto_size, noise)
        mean, std = _population_stats(_prototypes(num_classes, in_chans, proto_size, seed), noise)
        return DatasetInfo("synthetic", num_classes, in_chans, image_size, mean, std,
                           tuple(f"class_{i}" for i in range(num_classes)))
