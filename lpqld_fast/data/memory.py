"""Datasets held in memory: uint8 images [N, C, H, W] + int64 labels [N] (Fashion-MNIST, synthetic data,
distilled images, small ImageFolder trees), their metadata, and an on-device batch loader (airbench style:
indexing + vectorised augmentation on the tensors, no DataLoader workers)."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import torch

from lpqld_fast import seeding
from lpqld_fast.distributed import shard_slice

from . import transforms as T

__all__ = ["DatasetInfo", "InMemoryDataset", "InMemoryLoader"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What models and the pipeline need to know about a dataset."""

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None = dataclasses.field(default=None, repr=False, compare=False)


# --------------------------------------------------------------------------- in-memory dataset


class InMemoryDataset(torch.utils.data.Dataset):
    """uint8 images [N, C, H, W] and int64 labels [N] kept in memory (CPU or GPU).

    ``mean``/``std`` are per-channel statistics of the images scaled to [0, 1]
    (the normalisation the models see); computed from the images when not given.
    ``dataset[i]`` returns ``(image uint8 [C, H, W], label int64 scalar)``; any
    tensor/slice index returns the batched tensors.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        name: str = "in-memory",
    ) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(
                f"images must be a uint8 tensor [N, C, H, W], got "
                f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}"
            )
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-D tensor, got {tuple(getattr(labels, 'shape', ()))}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"images has {images.shape[0]} samples but labels has {labels.shape[0]}")
        if labels.device != images.device:
            raise ValueError(f"labels is on {labels.device} but images is on {images.device}")
        labels = labels.to(torch.int64)
        if num_classes is None:
            num_classes = int(labels.max()) + 1 if labels.numel() else 0
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= num_classes:
                raise IndexError(f"labels holds class id {lo if lo < 0 else hi} outside [0, {num_classes})")
        c = images.shape[1]
        if mean is None or std is None:
            if images.shape[0] == 0:
                raise ValueError("mean and std must be given for an empty dataset")
            m, s = T.compute_mean_std(images)
            mean = m if mean is None else mean
            std = s if std is None else std
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean/std need {c} values (one per channel), got {len(mean)}/{len(std)}")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        if class_names is None:
            class_names = [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} entries for {num_classes} classes")
        self.images = images
        self.labels = labels
        self.num_classes = int(num_classes)
        self.mean = mean
        self.std = std
        self.class_names = tuple(class_names)
        self.name = name

    # -- basic protocol
    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: int | slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[idx], self.labels[idx]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, n={len(self)}, shape={tuple(self.images.shape[1:])}, "
            f"num_classes={self.num_classes}, device={self.device})"
        )

    # -- metadata
    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Height (the pipeline's images are square; see ``image_shape`` otherwise)."""
        return self.images.shape[2]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def targets(self) -> torch.Tensor:
        return self.labels

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self.num_classes, self.in_chans, self.image_size, self.mean, self.std,
                           self.class_names)

    def class_counts(self) -> torch.Tensor:
        """int64 [num_classes]: samples per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def indices_of_class(self, c: int) -> torch.Tensor:
        if not 0 <= c < self.num_classes:
            raise IndexError(f"class {c} outside [0, {self.num_classes})")
        return torch.nonzero(self.labels == c).flatten()

    # -- derived datasets
    def _like(self, images: torch.Tensor, labels: torch.Tensor) -> InMemoryDataset:
        return InMemoryDataset(images, labels, self.num_classes, self.mean, self.std, self.class_names, self.name)

    def to(self, device: torch.device | str) -> InMemoryDataset:
        """Same data on ``device`` (self when already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return self._like(self.images.to(device), self.labels.to(device))

    def subset(self, indices: torch.Tensor | Sequence[int]) -> InMemoryDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.device)
        return self._like(self.images[idx], self.labels[idx])

    def normalized(self, idx: torch.Tensor | slice | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float, normalised images (all or ``idx``)."""
        x = self.images if idx is None else self.images[idx]
        return T.normalize(x, self.mean, self.std, dtype)

    def loader(self, batch_size: int, **kwargs) -> InMemoryLoader:
        """Shortcut for :class:`InMemoryLoader` (dataset, batch_size, **kwargs)."""
        return InMemoryLoader(self, batch_size, **kwargs)


class InMemoryLoader:
    """On-device batch iterator over an :class:`InMemoryDataset` (airbench style).

    Yields ``(x, y)``: x float [B, C, H, W] normalised (or uint8 when
    ``normalize=False`` and no augmentation changes that), y int64 [B], on ``device``.

    Determinism and distribution: the permutation and the augmentation
    parameters of epoch ``e`` are drawn from a CPU generator seeded with
    ``(seed, e)`` for the *global* batch; ``batch_size`` is the global batch and
    rank r keeps its slice (``tensor_split(world_size)[r]``). So the union of
    the ranks' batches equals the single-process batch, whatever ``world_size``
    (what a DDP run needs to match a 1-process run).

    Each ``iter()`` uses the current epoch and then advances it; ``set_epoch``
    sets it explicitly (as with DistributedSampler).
    """

    def __init__(
        self,
        dataset: InMemoryDataset,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool = False,
        pad: int | None = None,
        pad_mode: str = "reflect",
        flip: bool = True,
        normalize: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(dataset, InMemoryDataset):
            raise TypeError(f"dataset must be an InMemoryDataset, got {type(dataset).__name__}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < world_size:
            raise ValueError(f"batch_size ({batch_size}) is the global batch and must be >= world_size ({world_size})")
        if pad_mode not in ("reflect", "zeros"):
            raise ValueError(f"pad_mode must be 'reflect' or 'zeros', got {pad_mode!r}")
        self.pad = T.default_crop_padding(dataset.image_size) if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if augment and pad_mode == "reflect" and self.pad >= min(dataset.image_shape[1:]):
            raise ValueError(f"pad={self.pad} too large for {dataset.image_shape[1:]} images with reflect padding")
        self.device = torch.device(device) if device is not None else dataset.device
        self.dataset = dataset.to(self.device)  # one upload; batches are then gathered on-device
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.pad_mode = pad_mode
        self.flip = flip
        self.normalize = normalize
        self.dtype = dtype
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self, epoch: int) -> torch.Generator:
        # Distinct, reproducible stream per (seed, epoch), identical on every rank.
        return seeding.loader_epoch(self.seed, epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self._iterate(epoch)

    def _iterate(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        n = len(ds)
        gen = self._generator(epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.augment:
                params = T.sample_crop_flip_params(idx.numel(), self.pad, gen, flip=self.flip)
            if self.world_size > 1:
                sl = shard_slice(idx.numel(), self.rank, self.world_size)
                idx = idx[sl]
                if self.augment:
                    params = tuple(p[sl] for p in params)
            x, y = ds.images[idx], ds.labels[idx]
            if self.augment and idx.numel():
                dy, dx, flips = (p.to(self.device, non_blocking=True) for p in params)
                x = T._crop_flip(x, self.pad, dy, dx, flips if self.flip else None, self.pad_mode)
            if self.normalize:
                x = T.normalize(x, ds.mean, ds.std, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
