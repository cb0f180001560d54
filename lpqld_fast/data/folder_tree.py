"""Any ImageFolder tree as the pipeline's dataset: ``root/train/<class>/*`` and ``root/val/`` or ``root/test/``.

What the stages need is measured from the tree, once per process (cached by path and modification time):

- classes: the train split's class folders, sorted; the eval split must hold the same ones;
- channels: 1 when every sampled image is grayscale (PIL modes 1, L, LA, I, I;16, F), else 3 (RGB);
- image size: the most common shorter side of the sampled images; an image of another size or shape is
  resized (shorter side) and centre-cropped to it;
- mean/std: per channel over the training split (every image of an in-memory tree, a fixed spread of
  ``STREAM_STATS_IMAGES`` images of a streamed one).

A tree whose uint8 copy fits ``memory_budget()`` is decoded once into an :class:`InMemoryDataset` and then
runs exactly like Fashion-MNIST (in-memory augmentation and evaluation, real-image selection, diversity
metrics); a larger one streams image by image through transforms sized to its images: a padded random crop
+ flip up to 64 px (no ImageNet crops on 28-px images), RandomResizedCrop + flip above.
"""
from __future__ import annotations

import collections
import functools
import os
from typing import Any

import numpy as np
import torch

from lpqld_fast.runtime import mem_available_bytes

from . import transforms as T
from .image_folder import ImageFolderDataset
from .memory import DatasetInfo, InMemoryDataset

__all__ = ["split_dir", "folder_info", "load_folder", "memory_budget", "SAMPLE_IMAGES", "STREAM_STATS_IMAGES"]

SAMPLE_IMAGES = 256  # images whose header decides channels and size
STREAM_STATS_IMAGES = 2000  # images whose pixels give the mean/std of a streamed tree
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
SMALL_IMAGE = 64  # up to this size: padded random crop + flip; above: RandomResizedCrop + flip


def memory_budget() -> int:
    """Bytes a tree's uint8 copy may take to be held in memory: a quarter of the available memory, <= 4 GiB."""
    return min(4 << 30, mem_available_bytes() // 4)


def split_dir(root: str | os.PathLike, split: str) -> str:
    """``root/train`` for "train"; ``root/test`` or else ``root/val`` for "test" / "val"."""
    root = os.fspath(root)
    names = ["train"] if split == "train" else ["test", "val"] if split in ("test", "val") else [split]
    for name in names:
        d = os.path.join(root, name)
        if os.path.isdir(d):
            return d
    if split == "train":
        raise FileNotFoundError(f"imagefolder split directory {os.path.join(root, 'train')!r} does not exist "
                                "(expected root/<split>)")
    raise FileNotFoundError(f"imagefolder tree {root!r} has no evaluation split: expected {root}/test or "
                            f"{root}/val holding the train split's class folders")


def _key(root: str | os.PathLike) -> tuple[str, float]:
    """Cache key: the real path and the train split's modification time (a changed tree is measured again)."""
    real = os.path.realpath(os.fspath(root))
    return real, os.stat(split_dir(real, "train")).st_mtime


def folder_info(root: str | os.PathLike | None) -> DatasetInfo:
    """Classes, channels, image size and mean/std of the tree at ``root`` (measured; see the module doc)."""
    if root is None:
        raise ValueError("root is required for the 'imagefolder' dataset (a directory holding train/<class>/ and "
                         "val/ or test/): pass --data-root DIR")
    return _measure(*_key(root))


@functools.lru_cache(maxsize=4)
def _measure(root: str, _mtime: float) -> DatasetInfo:
    split_dir(root, "test")  # refused now, not after the teacher's first epoch
    files = ImageFolderDataset(split_dir(root, "train"), transform=None)
    n = len(files)
    picks = np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE_IMAGES)).round().astype(np.int64))
    modes, sides = set(), collections.Counter()
    from PIL import Image

    for i in picks.tolist():
        p = files.path(i)
        try:
            with Image.open(p) as img:  # the header only: mode and size
                modes.add(img.mode)
                sides[min(img.size)] += 1
        except (OSError, ValueError) as e:
            raise OSError(f"cannot decode image {p!r}: {e}") from e
    chans = 1 if modes <= set(_GRAY_MODES) else 3
    size = sides.most_common(1)[0][0]
    in_memory = n * chans * size * size <= memory_budget()
    if in_memory:
        images = _decode_all(files, "L" if chans == 1 else "RGB", size)
        mean, std = T.compute_mean_std(images)
        _IN_MEMORY[(root, "train")] = (images, files.targets.clone())
    else:
        stat_picks = np.unique(np.linspace(0, n - 1, num=min(n, STREAM_STATS_IMAGES)).round().astype(np.int64))
        sample = _decode_all(files, "L" if chans == 1 else "RGB", size, stat_picks.tolist())
        mean, std = T.compute_mean_std(sample)
    return DatasetInfo("imagefolder", files.num_classes, chans, size, tuple(mean), tuple(std), files.classes)


# decoded splits of in-memory trees: (real root, split) -> (images uint8 [N, C, S, S], labels [N])
_IN_MEMORY: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _fit(img: Any, size: int) -> Any:
    """The image resized (shorter side) and centre-cropped to size x size; unchanged when it already is."""
    if img.size == (size, size):
        return img
    from PIL import Image

    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def _decode_all(files: ImageFolderDataset, mode: str, size: int, indices: list[int] | None = None) -> torch.Tensor:
    """uint8 [N, C, size, size] of the images at ``indices`` (all by default)."""
    from PIL import Image

    idx = range(len(files)) if indices is None else indices
    c = 1 if mode == "L" else 3
    out = np.empty((len(idx), size, size, c), dtype=np.uint8)
    for j, i in enumerate(idx):
        p = files.path(i)
        try:
            with Image.open(p) as img:
                arr = np.asarray(_fit(img.convert(mode), size))
        except (OSError, ValueError) as e:
            raise OSError(f"cannot decode image {p!r}: {e}") from e
        out[j] = arr.reshape(size, size, c)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _transform(train: bool, info: DatasetInfo) -> Any:
    """The streamed tree's transform, sized to its images (the eval transform only fits size and normalises)."""
    from torchvision import transforms as tv

    s = info.image_size
    ops: list[Any] = [tv.Lambda(functools.partial(_fit, size=s))]
    if train and s <= SMALL_IMAGE:
        ops += [tv.RandomCrop(s, padding=T.default_crop_padding(s), padding_mode="reflect"),
                tv.RandomHorizontalFlip()]
    elif train:
        ops += [tv.RandomResizedCrop(s, antialias=True), tv.RandomHorizontalFlip()]
    return tv.Compose([*ops, tv.ToTensor(), tv.Normalize(info.mean, info.std)])


def load_folder(root: str | os.PathLike | None, split: str) -> InMemoryDataset | ImageFolderDataset:
    """Split ``split`` ("train", or "test" = test/ or val/) of the tree at ``root`` as the pipeline reads it."""
    info = folder_info(root)
    real = os.path.realpath(os.fspath(root))
    sdir = split_dir(real, split)
    if split != "train":
        with os.scandir(sdir) as it:
            extra = sorted(set(e.name for e in it if e.is_dir()) - set(info.class_names))
        if extra:
            raise ValueError(f"{sdir} holds class folders the train split lacks: {extra[:5]}")
    mode = "L" if info.in_chans == 1 else "RGB"
    key = (real, "train" if split == "train" else "test")
    if key in _IN_MEMORY or (real, "train") in _IN_MEMORY:
        if key not in _IN_MEMORY:
            files = ImageFolderDataset(sdir, transform=None, classes=info.class_names)
            _IN_MEMORY[key] = (_decode_all(files, mode, info.image_size), files.targets.clone())
        images, labels = _IN_MEMORY[key]
        return InMemoryDataset(images, labels, info.num_classes, info.mean, info.std, info.class_names,
                               name="imagefolder")
    return ImageFolderDataset(sdir, _transform(split == "train", info), classes=info.class_names, mode=mode,
                              image_size=info.image_size, mean=info.mean, std=info.std, name="imagefolder")
