"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

The IDX parser is our own (no torchvision download logic): header = 2 zero
bytes, a dtype code, the number of dimensions, then one big-endian uint32 per
dimension, then the big-endian payload. Files may be gzip-compressed. Every
structural problem raises :class:`IDXFormatError` naming the file.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .memory import InMemoryDataset

__all__ = [
    "DEFAULT_ROOT",
    "ENV_VAR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IDXFormatError",
    "read_idx",
    "fashion_mnist_root",
    "load_fashion_mnist",
]

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ENV_VAR = "LPQLD_FASHION_MNIST"
INSTALL_HINT = "apt-get install -y dataset-fashion-mnist"

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Standard train-set statistics of the [0, 1]-scaled pixels (the test checks them against the data).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# IDX dtype code -> big-endian numpy dtype
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(ValueError):
    """An IDX file is corrupt, truncated or not what was expected."""


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x1f\x8b":  # plain (uncompressed) IDX
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; truncation is an EOFError
        raise IDXFormatError(
            f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e}); "
            f"reinstall the file (e.g. apt-get install --reinstall dataset-fashion-mnist)"
        ) from e


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Parse an IDX file (optionally gzip-compressed) into a tensor of its shape and native-endian dtype."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {str(path)!r} does not exist")
    data = _read_bytes(path)
    if len(data) < 4:
        raise IDXFormatError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 + dtype code "
            f"{sorted(hex(c) for c in _IDX_DTYPES)} + ndim >= 1)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated header ({len(data)} bytes, {ndim} dimensions need {header})")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(data) - header
    if actual != expected:
        raise IDXFormatError(
            f"{path}: payload has {actual} bytes but the header {list(dims)} x {dtype.itemsize} B needs {expected}"
            + (" (file truncated)" if actual < expected else " (trailing bytes)")
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    # astype copies into a writable, native-endian array (torch needs both).
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """The directory to read: ``root``, else $LPQLD_FASHION_MNIST, else /usr/share/datasets/fashion-mnist."""
    if root is None:
        root = os.environ.get(ENV_VAR) or DEFAULT_ROOT
    return Path(root)


def _idx_path(root: Path, split: str, kind: str) -> Path:
    base = f"{_SPLIT_PREFIX[split]}-{kind}-ubyte"
    for name in (base + ".gz", base):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {str(root / (base + '.gz'))!r} not found. Install the dataset with "
        f"`{INSTALL_HINT}`, or point the root argument / ${ENV_VAR} at a directory holding the IDX files."
    )


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> InMemoryDataset:
    """Load a Fashion-MNIST split ("train": 60k, "test": 10k) as uint8 [N, 1, 28, 28] + int64 labels [N]."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    root_dir = fashion_mnist_root(root)
    if not root_dir.is_dir():
        raise FileNotFoundError(
            f"Fashion-MNIST directory {str(root_dir)!r} does not exist. Install the dataset with "
            f"`{INSTALL_HINT}`, or point the root argument / ${ENV_VAR} at a directory holding the IDX files."
        )
    img_path = _idx_path(root_dir, split, "images-idx3")
    lbl_path = _idx_path(root_dir, split, "labels-idx1")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
        raise IDXFormatError(f"{img_path}: expected uint8 images [N, 28, 28], got {images.dtype} {tuple(images.shape)}")
    if labels.dtype != torch.uint8 or labels.dim() != 1:
        raise IDXFormatError(f"{lbl_path}: expected uint8 labels [N], got {labels.dtype} {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise IDXFormatError(f"{lbl_path}: label {int(labels.max())} outside [0, {len(FASHION_MNIST_CLASSES)})")
    return InMemoryDataset(
        images.unsqueeze(1),
        labels.to(torch.int64),
        num_classes=len(FASHION_MNIST_CLASSES),
        mean=(FASHION_MNIST_MEAN,),
        std=(FASHION_MNIST_STD,),
        class_names=FASHION_MNIST_CLASSES,
        name="fashion-mnist",
    )
