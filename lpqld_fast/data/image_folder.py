"""Lazy ImageNet-1K / ImageNet-21K-P style folders: root/<wnid>/*.JPEG.

Only the file list is held in memory, and not as Python objects: file names
live in one numpy byte buffer with offsets, labels in an int64 array. At 11M
images (ImageNet-21K-P) a list of (path, label) tuples costs gigabytes and is
copied page by page into every DataLoader worker as refcounts are touched;
numpy buffers are shared copy-on-write untouched.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch

from . import transforms as T
from .memory import DatasetInfo

__all__ = ["IMG_EXTENSIONS", "ImageFolderDataset"]

IMG_EXTENSIONS: tuple[str, ...] = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class>/<file>``, class index = position of the folder name in sorted order.

    ``dataset[i]`` returns ``(transform(image), label)``; without a transform the
    image is a uint8 tensor [C, H, W]. Images are decoded with PIL on access.

    Args:
        root: directory holding one sub-directory per class.
        transform: callable applied to the PIL image (see :mod:`lpqld_fast.data.transforms`).
        classes: explicit class folder names in class-index order (e.g. the train split's classes for a
            validation split, or a class subset); default: every sub-directory of root, sorted.
        extensions: accepted file suffixes (case-insensitive).
        mode: PIL mode the images are converted to ("RGB"; "L" for 1 channel).
        image_size, mean, std: metadata reported by :attr:`info` (what the transform produces).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        *,
        classes: Sequence[str] | None = None,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        mode: str = "RGB",
        image_size: int = 224,
        mean: Sequence[float] = T.IMAGENET_MEAN,
        std: Sequence[float] = T.IMAGENET_STD,
        name: str = "imagefolder",
    ) -> None:
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root {self.root!r} does not exist or is not a directory")
        exts = tuple(e.lower() for e in extensions)
        if classes is None:
            with os.scandir(self.root) as it:
                classes = sorted(e.name for e in it if e.is_dir())
            if not classes:
                raise ValueError(f"image folder root {self.root!r} has no class sub-directories")
        else:
            classes = list(classes)
            if len(set(classes)) != len(classes):
                raise ValueError("classes contains duplicate names")
        names: list[bytes] = []
        counts: list[int] = []
        for c in classes:
            cdir = os.path.join(self.root, c)
            if not os.path.isdir(cdir):
                raise FileNotFoundError(f"class folder {cdir!r} does not exist")
            with os.scandir(cdir) as it:
                files = sorted(e.name for e in it if e.is_file() and os.path.splitext(e.name)[1].lower() in exts)
            if not files:
                raise ValueError(f"class folder {cdir!r} contains no images with extensions {list(exts)}")
            names.extend(f.encode("utf-8", "surrogateescape") for f in files)
            counts.append(len(files))
        lengths = np.fromiter((len(n) for n in names), dtype=np.int64, count=len(names))
        self._offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._names = np.frombuffer(b"".join(names), dtype=np.uint8)
        self._labels = np.repeat(np.arange(len(classes), dtype=np.int64), counts)
        self.classes: tuple[str, ...] = tuple(classes)
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.mode = mode
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.name = name

    def __len__(self) -> int:
        return int(self._labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return 1 if self.mode in ("L", "I", "F") else len(self.mode)

    @property
    def targets(self) -> torch.Tensor:
        """int64 [N] labels (a view of the internal array)."""
        return torch.from_numpy(self._labels)

    @property
    def info(self) -> DatasetInfo:
        return DatasetInfo(self.name, self.num_classes, self.in_chans, self.image_size, self.mean, self.std,
                           self.classes)

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.targets, minlength=self.num_classes)

    def path(self, index: int) -> str:
        """File path of sample ``index`` (root/<class>/<file>)."""
        i = self._check_index(index)
        fname = self._names[self._offsets[i] : self._offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")
        return os.path.join(self.root, self.classes[self._labels[i]], fname)

    def _check_index(self, index: int) -> int:
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        return i

    def load_image(self, index: int):
        """Decode sample ``index`` with PIL, converted to ``mode``; errors name the file."""
        from PIL import Image

        p = self.path(index)
        try:
            with Image.open(p) as img:
                return img.convert(self.mode)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot decode image {p!r}: {e}") from e

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        i = self._check_index(index)
        img = self.load_image(i)
        if self.transform is not None:
            out = self.transform(img)
        else:
            from torchvision.transforms.functional import pil_to_tensor

            out = pil_to_tensor(img)
        return out, int(self._labels[i])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, n={len(self)}, num_classes={self.num_classes})"
