"""Batched, on-device augmentation and normalisation for in-memory image tensors.

Everything here works on whole batches [N, C, H, W] with no per-sample Python
loop, so it runs at the same speed on CPU or GPU (airbench style). Random crop
with padding and the horizontal flip are fused into one gather: the padded
image is never materialised, the source pixel of every output pixel is
computed by index arithmetic (reflect or zero padding).

Crop parameters can be sampled and applied separately
(:func:`sample_crop_flip_params`, :func:`apply_crop_flip`) so a distributed
loader can sample them for the global batch and apply them to its shard, and a
relabel stage can store and replay them.

The ImageNet-style PIL transforms for :class:`ImageFolderDataset` live at the
bottom (:func:`imagenet_train_transform`, :func:`imagenet_eval_transform`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "default_crop_padding",
    "to_float",
    "normalize",
    "denormalize",
    "compute_mean_std",
    "sample_crop_flip_params",
    "apply_crop_flip",
    "random_crop_flip",
    "imagenet_train_transform",
    "imagenet_eval_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_PAD_MODES = ("reflect", "zeros")


def default_crop_padding(image_size: int) -> int:
    """Padding of the random crop used by the pipeline: 2 for 28x28, 4 for 32x32 (size // 8)."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return 2 if image_size < 32 else 4


def _check_images(images: object, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{name} must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 or floating point, got {images.dtype}")
    return images


def to_float(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; floating input is only cast (assumed already in [0, 1])."""
    _check_images(images)
    if images.dtype == torch.uint8:
        return images.to(dtype).div_(255.0)
    return images.to(dtype)


def _channel_vector(
    name: str, values: Sequence[float] | torch.Tensor, channels: int, like: torch.Tensor
) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device).flatten()
    if v.numel() == 1:
        v = v.expand(channels)
    if v.numel() != channels:
        raise ValueError(f"{name} has {v.numel()} values but the images have {channels} channels")
    return v.view(1, channels, 1, 1)


def normalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(x / 255 - mean) / std per channel for uint8 input; (x - mean) / std for float input in [0, 1]."""
    x = to_float(images, dtype)
    m = _channel_vector("mean", mean, x.shape[1], x)
    s = _channel_vector("std", std, x.shape[1], x)
    if bool((s <= 0).any()):
        raise ValueError(f"std must be positive, got {s.flatten().tolist()}")
    return x.sub_(m).div_(s)


def denormalize(
    images: torch.Tensor,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
) -> torch.Tensor:
    """Inverse of :func:`normalize`: float [N, C, H, W] -> float in (about) [0, 1]."""
    _check_images(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    m = _channel_vector("mean", mean, images.shape[1], images)
    s = _channel_vector("std", std, images.shape[1], images)
    return images * s + m


def compute_mean_std(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of images scaled to [0, 1], in float64, chunked to bound memory."""
    _check_images(images)
    n, c = images.shape[:2]
    if n == 0:
        raise ValueError("images is empty: cannot compute mean/std")
    s = torch.zeros(c, dtype=torch.float64)
    sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, chunk):
        x = to_float(images[start : start + chunk], torch.float64).transpose(0, 1).reshape(c, -1)
        s += x.sum(1).cpu()
        sq += (x * x).sum(1).cpu()
    count = n * images.shape[2] * images.shape[3]
    mean = s / count
    var = (sq / count - mean * mean).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def sample_crop_flip_params(
    n: int,
    pad: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample per-image crop offsets dy, dx in [0, 2*pad] (into the padded image) and flip flags.

    Sampled on the generator's device (so a seeded CPU generator gives the same
    parameters whatever device the images are on), then moved to ``device``.
    Returns int64 ``dy``, ``dx`` and bool ``flips``, each of shape [n].
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gen_device)
    if flip:
        flips = torch.randint(0, 2, (n,), generator=generator, device=gen_device).bool()
    else:
        flips = torch.zeros(n, dtype=torch.bool, device=gen_device)
    if device is not None:
        dy, dx, flips = dy.to(device), dx.to(device), flips.to(device)
    return dy, dx, flips


def _fold_index(pos: torch.Tensor, size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map positions in padded coordinates (shifted so 0 is the first real pixel) to source indices.

    Returns the source index and, for zero padding, the mask of positions that hit a real pixel.
    """
    if mode == "reflect":
        # Reflect without repeating the edge pixel, like F.pad(mode="reflect"); pad < size makes one bounce enough.
        pos = pos.abs()
        return torch.where(pos >= size, 2 * (size - 1) - pos, pos), None
    valid = (pos >= 0) & (pos < size)
    return pos.clamp(0, size - 1), valid


def apply_crop_flip(
    images: torch.Tensor,
    pad: int,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flips: torch.Tensor | None = None,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Crop each image at (dy[i], dx[i]) of its ``pad``-padded copy, then flip it horizontally where flips[i].

    Equivalent to ``F.pad(images, (pad,) * 4, mode)[i, :, dy:dy+H, dx:dx+W]`` (then ``torch.flip(.., [-1])``),
    computed as one gather, for uint8 or float images of any device. Output has the input's dtype and shape.
    """
    _check_images(images)
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    n, c, h, w = images.shape
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad_mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"pad={pad} must be smaller than the image size {h}x{w} for reflect padding")
    for name, t in (("dy", dy), ("dx", dx)):
        if not isinstance(t, torch.Tensor) or t.shape != (n,):
            raise ValueError(f"{name} must be a tensor of shape [{n}], got {getattr(t, 'shape', type(t).__name__)}")
    if flips is not None and (not isinstance(flips, torch.Tensor) or flips.shape != (n,)):
        raise ValueError(f"flips must be a tensor of shape [{n}], got {getattr(flips, 'shape', type(flips).__name__)}")
    if n == 0:
        return images.clone()
    both = torch.stack([dy, dx])
    if bool(((both < 0) | (both > 2 * pad)).any()):  # one host sync; the internal path skips it
        raise ValueError(f"crop offsets dy/dx must lie in [0, {2 * pad}]")
    return _crop_flip(images, pad, dy, dx, flips, pad_mode)


def _crop_flip(
    images: torch.Tensor,
    pad: int,
    dy: torch.Tensor,
    dx: torch.Tensor,
    flips: torch.Tensor | None,
    pad_mode: str,
) -> torch.Tensor:
    """apply_crop_flip without validation (no host sync): for parameters from sample_crop_flip_params."""
    n, c, h, w = images.shape
    dev = images.device
    dy = dy.to(dev, torch.int64)
    dx = dx.to(dev, torch.int64)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)[None, :].expand(n, w)
    if flips is not None:
        # Flip after crop: output column j reads cropped column W-1-j.
        ar_w = torch.where(flips.to(dev).bool()[:, None], w - 1 - ar_w, ar_w)
    rows, row_ok = _fold_index(dy[:, None] - pad + ar_h[None, :], h, pad_mode)
    cols, col_ok = _fold_index(dx[:, None] - pad + ar_w, w, pad_mode)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = images.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    if pad_mode == "zeros" and pad > 0:
        ok = (row_ok[:, :, None] & col_ok[:, None, :]).view(n, 1, h, w)
        out = out.masked_fill(~ok, 0)
    return out


def random_crop_flip(
    images: torch.Tensor,
    pad: int,
    generator: torch.Generator | None = None,
    flip: bool = True,
    pad_mode: str = "reflect",
) -> torch.Tensor:
    """Random crop with ``pad`` padding + random horizontal flip (p=0.5), vectorised over the batch.

    Deterministic for a given seeded ``generator``; the parameters are drawn on
    the generator's device, so a CPU generator gives identical crops on CPU and GPU.
    """
    _check_images(images)
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    n, _, h, w = images.shape
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if pad_mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"pad={pad} must be smaller than the image size {h}x{w} for reflect padding")
    dy, dx, flips = sample_crop_flip_params(n, pad, generator, images.device, flip=flip)
    if n == 0:
        return images.clone()
    return _crop_flip(images, pad, dy, dx, flips if flip else None, pad_mode)


# --------------------------------------------------------------------------- ImageNet (PIL) transforms


def imagenet_train_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    scale: tuple[float, float] = (0.08, 1.0),
) -> Callable:
    """Standard ImageNet train transform: RandomResizedCrop + horizontal flip + ToTensor + Normalize."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=scale, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def imagenet_eval_transform(
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """Standard ImageNet eval transform: Resize (size / 0.875, i.e. 256 for 224) + CenterCrop + ToTensor + Normalize."""
    from torchvision import transforms as T

    resize_size = resize_size if resize_size is not None else int(round(image_size / 0.875))
    return T.Compose(
        [
            T.Resize(resize_size, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
