"""Datasets for the pipeline: small in-memory tensor datasets and lazy ImageNet-style folders.

- :class:`InMemoryDataset`: uint8 images [N, C, H, W] + int64 labels [N] held in
  memory (Fashion-MNIST, synthetic data, distilled images), with an on-device
  batch loader (:class:`InMemoryLoader`, airbench style: indexing + vectorised
  augmentation on the tensors, no DataLoader workers).
- :class:`ImageFolderDataset`: root/<wnid>/*.JPEG, decoded lazily with PIL, for
  ``torch.utils.data.DataLoader``.
- :func:`get_dataset` / :func:`dataset_info`: lookup by name.

The in-memory classes live in :mod:`lpqld_fast.data.memory`, which the other
submodules build on; this module only gathers them and the registry.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from lpqld_fast import seeding

from . import transforms as T

__all__ = [
    "DatasetInfo",
    "InMemoryDataset",
    "InMemoryLoader",
    "ImageFolderDataset",
    "SyntheticDataset",
    "IDXFormatError",
    "read_idx",
    "load_fashion_mnist",
    "FASHION_MNIST_CLASSES",
    "DATASET_INFO",
    "stratified_subset",
    "DATASET_NAMES",
    "dataset_info",
    "get_dataset",
    "SplitFactory",
]

# A split by name ("train", "test") of the dataset a stage works on: what a caller passes to use a dataset
# get_dataset does not name (scripts/scale_21k.py's 10,450-class set).
SplitFactory = Callable[[str], Any]

from .fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDXFormatError,
    load_fashion_mnist,
    read_idx,
)
from .folder_tree import folder_info, load_folder
from .image_folder import ImageFolderDataset
from .memory import DatasetInfo, InMemoryDataset, InMemoryLoader
from .synthetic import SyntheticDataset

# --------------------------------------------------------------------------- registry

DATASET_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(
        "fashion-mnist", 10, 1, 28, (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), FASHION_MNIST_CLASSES
    ),
    "imagenet-1k": DatasetInfo("imagenet-1k", 1000, 3, 224, T.IMAGENET_MEAN, T.IMAGENET_STD),
    "imagenet-21k-p": DatasetInfo("imagenet-21k-p", 10450, 3, 224, T.IMAGENET_MEAN, T.IMAGENET_STD),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 3, 64, T.IMAGENET_MEAN, T.IMAGENET_STD),
}

# Named ImageFolder trees (root/<split>/<class>/*): the presets' datasets. The name fixes the class count,
# image size and normalisation (DATASET_INFO), so every stage knows them without reading the images.
FOLDER_DATASETS: tuple[str, ...] = ("imagenet-1k", "imagenet-21k-p", "tiny-imagenet")

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "imagefolder", "synthetic") + FOLDER_DATASETS


def dataset_info(name: str, root: str | os.PathLike | None = None, **kwargs) -> DatasetInfo:
    """Metadata: a named dataset's from DATASET_INFO (without reading data), "synthetic" from its keyword
    arguments, "imagefolder" measured from the tree at ``root`` (lpqld_fast.data.folder_tree)."""
    key = name.lower()
    if key in DATASET_INFO:
        return DATASET_INFO[key]
    if key == "synthetic":
        return SyntheticDataset.describe(**kwargs)
    if key == "imagefolder":
        return folder_info(root)
    raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASET_NAMES)}")


def get_dataset(
    name: str, split: str = "train", root: str | os.PathLike | None = None, **kwargs
) -> InMemoryDataset | ImageFolderDataset:
    """Build a dataset by name.

    - ``"fashion-mnist"``: split "train" | "test"; root overrides the IDX directory (else $LPQLD_FASHION_MNIST,
      else /usr/share/datasets/fashion-mnist). Returns an :class:`InMemoryDataset`.
    - ``"imagefolder"``: any tree ``root/train/<class>/*`` + ``root/test`` or ``root/val``, measured and read
      as the pipeline needs it (lpqld_fast.data.folder_tree: in memory when small, streamed otherwise).
      With kwargs, ``root/<split>/<class>/*`` as a plain :class:`ImageFolderDataset` (``image_size``,
      ``transform``, ``classes``, ...; the ImageNet train transform for split "train", eval otherwise).
    - ``"synthetic"``: split "train" | "test"; kwargs go to :class:`SyntheticDataset`.
    - ``"imagenet-1k"``, ``"imagenet-21k-p"``, ``"tiny-imagenet"`` (FOLDER_DATASETS): ``"imagefolder"`` with the
      image size, normalisation and class count of DATASET_INFO; root is required and must hold that many
      class folders.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key == "fashion-mnist":
        if kwargs:
            raise TypeError(f"fashion-mnist takes no extra arguments, got {sorted(kwargs)}")
        return load_fashion_mnist(split, root)
    if key in FOLDER_DATASETS:
        info = DATASET_INFO[key]
        if root is None:
            raise ValueError(f"dataset {key!r} is an ImageFolder tree: pass its location (--data-root DIR with "
                             f"DIR/{split}/<class>/*)")
        for k, v in (("image_size", info.image_size), ("mean", info.mean), ("std", info.std), ("name", key)):
            kwargs.setdefault(k, v)
        ds = _image_folder(split, root, **kwargs)
        if "classes" not in kwargs and ds.num_classes != info.num_classes:
            raise ValueError(f"{os.path.join(os.fspath(root), split)} holds {ds.num_classes} class folders; "
                             f"{key} has {info.num_classes} (use dataset 'imagefolder' for another tree)")
        return ds
    if key == "imagefolder":
        if kwargs or split not in ("train", "test", "val"):
            return _image_folder(split, root, **kwargs)
        return load_folder(root, split)
    if key == "synthetic":
        if root is not None:
            raise ValueError("the synthetic dataset takes no root")
        return SyntheticDataset(split=split, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; valid names: {list(DATASET_NAMES)}")


def _image_folder(split: str, root: str | os.PathLike | None, **kwargs) -> ImageFolderDataset:
    """root/<split>/<class>/* with the ImageNet train (split "train") or eval transform unless one is given."""
    if root is None:
        raise ValueError("root is required for the 'imagefolder' dataset (a directory holding <split>/<class>/)")
    split_dir = os.path.join(os.fspath(root), split)
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"imagefolder split directory {split_dir!r} does not exist (expected root/<split>)")
    if "transform" not in kwargs:
        size = kwargs.get("image_size", 224)
        norm = {k: kwargs[k] for k in ("mean", "std") if k in kwargs}
        kwargs["transform"] = (
            T.imagenet_train_transform(size, **norm) if split == "train" else T.imagenet_eval_transform(size, **norm)
        )
    return ImageFolderDataset(split_dir, **kwargs)


def require_in_memory(ds: Any, what: str) -> Any:
    """``ds`` if it holds its images as one uint8 tensor; a clear error for a streamed ImageFolder tree.

    Real-image selection indexes ``ds.images``; teacher training, the statistics pass and the evaluations
    stream an ImageFolder tree instead (lpqld_fast.data.streaming; docs/LAUNCH.md, "Known limits").
    """
    if not hasattr(ds, "images"):
        raise ValueError(f"{what} needs a dataset held in memory; {getattr(ds, 'name', type(ds).__name__)!r} is an "
                         "ImageFolder tree read image by image, which this stage does not stream yet")
    return ds


def stratified_subset(ds: Any, n: int, seed: int = 0) -> Any:
    """A fixed class-balanced subset of an in-memory dataset: per class the first n // C images of a
    permutation seeded by ``seed`` (at least one), in dataset order. ``n >= len(ds)`` returns ``ds``."""
    ds = require_in_memory(ds, "a test subset")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"subset size must be a positive int, got {n!r}")
    if n >= len(ds.labels):
        return ds
    per = max(1, n // ds.num_classes)
    g = seeding.subset(seed)
    picked = []
    for c in range(ds.num_classes):
        idx = torch.nonzero(ds.labels == c).flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    idx = torch.sort(torch.cat(picked)).values
    return InMemoryDataset(ds.images[idx], ds.labels[idx], num_classes=ds.num_classes, mean=ds.mean, std=ds.std,
                           class_names=ds.class_names, name=f"{ds.name}[{len(idx)} of {len(ds.labels)}]")
