"""Augmentation *parameters*: drawn once, stored, replayed bit-identically.

Relabel draws the parameters of every stored batch from a generator seeded by
(seed, batch id), applies them with :func:`replay_batch`, runs the teacher and
stores the parameters next to the soft labels. The student calls the same
:func:`replay_batch` on the stored parameters, so a stored label describes
exactly the pixels the student sees (DESIGN 2.3).

Parameters (all CPU tensors; the generator is a CPU ``torch.Generator``):

- crop boxes float32 [n, 4] = (i/H, j/W, h/H, w/W) of integer pixel boxes,
  drawn with torchvision RandomResizedCrop's algorithm (10 tries, then a
  center-crop fallback), vectorised over the batch. ``round(i_n * H)`` etc.
  recovers the integers exactly (:func:`pixel_boxes`).
- flips bool [n] (p = 0.5).
- CutMix (ImageNet-1K): one lambda ~ Beta(1, 1) per batch, one box
  (y0, x0, y1, x1) in output pixels, one permutation; lambda is re-computed
  from the clipped box area as in CutMix. It only pastes
  ``x[perm]`` into the box (the soft label is the teacher's output on the
  mixed batch, so lambda is informational).
- Cutout (ImageNet-21K, Ridnik et al. "CutoutPIL" with factor 0.5): per sample
  a box (y0, x0, y1, x1) of half the output size centred at a uniform pixel,
  clipped, filled with a uniform random colour (uint8 per channel) in pixel
  space, i.e. before normalisation.

Order inside :func:`replay_batch`: gather images -> crop/resize/flip (float32,
0..255 scale) -> cutout -> normalise ``(x / 255 - mean) / std`` -> CutMix.
Draw order inside :func:`sample_aug_params` (part of the store format):
boxes, flips, cutout, cutmix.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lpqld_fast import ops
from lpqld_fast.ops.reference.crop_resize_flip import pixel_boxes  # noqa: F401  (one definition, shared)

__all__ = [
    "AugParams",
    "CutMixParams",
    "CutoutParams",
    "pixel_boxes",
    "normalized_boxes",
    "sample_rrc_boxes",
    "sample_flips",
    "sample_cutmix",
    "apply_cutmix",
    "mix_batch",
    "sample_cutout",
    "apply_cutout",
    "sample_aug_params",
    "crop_resize_flip",
    "check_replay_params",
    "replay_batch",
]


# --------------------------------------------------------------------------- parameter containers


@dataclass
class CutMixParams:
    """One CutMix draw for a whole batch: lam (kept fraction), box (y0, x0, y1, x1) int64 [4], perm int64 [n]."""

    lam: float
    box: torch.Tensor
    perm: torch.Tensor


@dataclass
class CutoutParams:
    """Per-sample cutout: boxes (y0, x0, y1, x1) int64 [n, 4] in output pixels, fill colours uint8 [n, C]."""

    boxes: torch.Tensor
    fill: torch.Tensor


@dataclass
class AugParams:
    """Everything needed to re-create one augmented batch from the uint8 image set."""

    image_indices: torch.Tensor  # int64 [n]
    boxes: torch.Tensor  # float32 [n, 4] normalised (i/H, j/W, h/H, w/W)
    flips: torch.Tensor  # bool [n]
    out_size: tuple[int, int]
    cutmix: CutMixParams | None = None
    cutout: CutoutParams | None = None

    def to(self, device: torch.device | str) -> AugParams:
        cm = self.cutmix
        co = self.cutout
        return replace(
            self,
            image_indices=self.image_indices.to(device),
            boxes=self.boxes.to(device),
            flips=self.flips.to(device),
            cutmix=None if cm is None else CutMixParams(cm.lam, cm.box.to(device), cm.perm.to(device)),
            cutout=None if co is None else CutoutParams(co.boxes.to(device), co.fill.to(device)),
        )


# --------------------------------------------------------------------------- helpers


def _check_n(n: int) -> int:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return n


def _check_size(name: str, v: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _out_size(out_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    out = tuple(int(v) for v in out_size)
    if len(out) != 2 or min(out) < 1:
        raise ValueError(f"out_size must be a positive int or (height, width), got {out_size!r}")
    return out  # type: ignore[return-value]


def normalized_boxes(pix: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Integer pixel boxes (i, j, h, w) [n, 4] -> float32 (i/H, j/W, h/H, w/W).

    The division is done in float64 and rounded once to float32, so the stored
    float is the float32 nearest to the exact ratio; :func:`pixel_boxes`
    inverts it exactly for any H, W < 2**22.
    """
    scale = torch.tensor([height, width, height, width], dtype=torch.float64)
    return (pix.to(torch.float64) / scale).to(torch.float32)


# --------------------------------------------------------------------------- samplers


def sample_rrc_boxes(
    n: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """RandomResizedCrop boxes for ``n`` images of size height x width: float32 [n, 4] (i/H, j/W, h/H, w/W).

    torchvision's algorithm, vectorised: for each sample up to 10 tries of
    target area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio);
    w = round(sqrt(area * ar)), h = round(sqrt(area / ar)); the first try with
    0 < w <= W and 0 < h <= H wins and its corner is uniform over the valid
    positions; otherwise the center crop clamped to ``ratio``. The random
    numbers (uniforms in float64) are drawn for all tries at once, so the
    stream differs from torchvision's per-sample draws; the distribution is the same.
    """
    _check_n(n)
    _check_size("height", height)
    _check_size("width", width)
    s0, s1 = (float(v) for v in scale)
    r0, r1 = (float(v) for v in ratio)
    if not (0 < s0 <= s1):
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1], got {tuple(scale)}")
    if not (0 < r0 <= r1):
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {tuple(ratio)}")
    tries = 10
    area = float(height * width)
    u = torch.rand(n, tries, 2, generator=generator, dtype=torch.float64)
    pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    target = area * (s0 + (s1 - s0) * u[..., 0])
    lr0, lr1 = math.log(r0), math.log(r1)
    ar = torch.exp(lr0 + (lr1 - lr0) * u[..., 1])
    w = torch.round(torch.sqrt(target * ar)).to(torch.int64)
    h = torch.round(torch.sqrt(target / ar)).to(torch.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1)
    found = ok.any(dim=1)
    h = h.gather(1, first[:, None])[:, 0]
    w = w.gather(1, first[:, None])[:, 0]
    # Center-crop fallback (torchvision).
    in_ratio = width / height
    if in_ratio < r0:
        fw, fh = width, int(round(width / r0))
    elif in_ratio > r1:
        fh, fw = height, int(round(height * r1))
    else:
        fw, fh = width, height
    h = torch.where(found, h, torch.full_like(h, fh))
    w = torch.where(found, w, torch.full_like(w, fw))
    i = torch.floor(pos[:, 0] * (height - h + 1).to(torch.float64)).to(torch.int64)
    j = torch.floor(pos[:, 1] * (width - w + 1).to(torch.float64)).to(torch.int64)
    i = torch.minimum(i, height - h)
    j = torch.minimum(j, width - w)
    i = torch.where(found, i, torch.full_like(i, (height - fh) // 2))
    j = torch.where(found, j, torch.full_like(j, (width - fw) // 2))
    return normalized_boxes(torch.stack([i, j, h, w], dim=1), height, width)


def sample_flips(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip flags, bool [n], each True with probability 0.5."""
    _check_n(n)
    return torch.rand(n, generator=generator) < 0.5


def sample_cutmix(
    n: int, height: int, width: int, generator: torch.Generator | None = None
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One CutMix draw for a batch of ``n`` images of size height x width (the *output* size).

    lam ~ Beta(1, 1) = U(0, 1); the box has sides int(H*sqrt(1-lam)) x
    int(W*sqrt(1-lam)) around a uniform center, clipped to the image; lam is
    then set to the exact kept fraction 1 - box_area / (H*W) (rounded to
    float32 so that it survives storage unchanged).
    Returns (lam, box int64 [4] = (y0, x0, y1, x1), perm int64 [n]).
    """
    _check_n(n)
    _check_size("height", height)
    _check_size("width", width)
    lam0 = float(torch.rand(1, generator=generator, dtype=torch.float64))
    center = torch.rand(2, generator=generator, dtype=torch.float64)
    perm = torch.randperm(n, generator=generator)
    cut = math.sqrt(1.0 - lam0)
    ch, cw = int(height * cut), int(width * cut)
    cy = min(int(float(center[0]) * height), height - 1)
    cx = min(int(float(center[1]) * width), width - 1)
    y0, y1 = min(max(cy - ch // 2, 0), height), min(max(cy + ch // 2, 0), height)
    x0, x1 = min(max(cx - cw // 2, 0), width), min(max(cx + cw // 2, 0), width)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    lam = float(torch.tensor(lam, dtype=torch.float32))
    return lam, torch.tensor([y0, x0, y1, x1], dtype=torch.int64), perm


def apply_cutmix(x: torch.Tensor, box: torch.Tensor | Sequence[int], perm: torch.Tensor) -> torch.Tensor:
    """Paste x[perm] into the box (y0, x0, y1, x1) of every image; returns a new tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    y0, x0, y1, x1 = (int(v) for v in (box.tolist() if isinstance(box, torch.Tensor) else box))
    n, _, h, w = x.shape
    if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
        raise ValueError(f"box (y0, x0, y1, x1) = {(y0, x0, y1, x1)} does not fit images of size {h}x{w}")
    if not isinstance(perm, torch.Tensor) or perm.shape != (n,):
        raise ValueError(f"perm must be a tensor of shape [{n}], got {getattr(perm, 'shape', type(perm).__name__)}")
    out = x.clone()
    if y1 > y0 and x1 > x0 and n:
        out[:, :, y0:y1, x0:x1] = x[perm.to(x.device, torch.int64), :, y0:y1, x0:x1]
    return out


def mix_batch(x: torch.Tensor, mode: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mix a batch with a permutation of itself: ``(mixed, perm, lam)``, where row i holds ``lam`` of image i.

    ``mode``: "cutmix" (x[perm] pasted into one box, :func:`sample_cutmix`: lam ~ U(0, 1), then the exact kept
    fraction) or "mixup" (lam * x + (1 - lam) * x[perm], lam ~ U(0, 1)). Everything is drawn on the host from
    ``generator``: the step reads nothing back from the device.
    """
    n, _, h, w = x.shape
    if mode == "cutmix":
        lam, box, perm = sample_cutmix(n, h, w, generator)
        perm = perm.to(x.device)
        return apply_cutmix(x, box, perm), perm, lam
    if mode == "mixup":
        lam = float(torch.rand(1, generator=generator, dtype=torch.float64))
        perm = torch.randperm(n, generator=generator).to(x.device)
        return x * lam + x.index_select(0, perm) * (1.0 - lam), perm, lam
    raise ValueError(f"mix mode must be 'cutmix' or 'mixup', got {mode!r}")


def _paste_box(x: torch.Tensor, box: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """:func:`apply_cutmix` without reading the box back to the host: a mask from the box tensor (same values)."""
    h, w = x.shape[2], x.shape[3]
    b = box.to(x.device, torch.int64)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    mask = (((rows >= b[0]) & (rows < b[2]))[:, None] & ((cols >= b[1]) & (cols < b[3]))[None, :])
    return torch.where(mask, x.index_select(0, perm.to(x.device, torch.int64)), x)


def sample_cutout(
    n: int,
    height: int,
    width: int,
    channels: int,
    generator: torch.Generator | None = None,
    factor: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet-21K cutout parameters: boxes int64 [n, 4] (y0, x0, y1, x1) and fill colours uint8 [n, channels].

    Box sides int(factor * H + 0.5) x int(factor * W + 0.5) around a uniform
    pixel, clipped to the image (Ridnik et al.'s CutoutPIL).
    """
    _check_n(n)
    _check_size("height", height)
    _check_size("width", width)
    _check_size("channels", channels)
    if not (0.0 < float(factor) <= 1.0):
        raise ValueError(f"factor must be in (0, 1], got {factor}")
    ch, cw = int(factor * height + 0.5), int(factor * width + 0.5)
    cy = torch.randint(0, height, (n,), generator=generator)
    cx = torch.randint(0, width, (n,), generator=generator)
    fill = torch.randint(0, 256, (n, channels), generator=generator).to(torch.uint8)
    y0 = (cy - ch // 2).clamp(0, height)
    y1 = (cy + ch // 2).clamp(0, height)
    x0 = (cx - cw // 2).clamp(0, width)
    x1 = (cx + cw // 2).clamp(0, width)
    return torch.stack([y0, x0, y1, x1], dim=1), fill


def apply_cutout(x: torch.Tensor, boxes: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Fill box n of image n with colour fill[n] (same scale as x, e.g. 0..255); returns a new tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a tensor [N, C, H, W], got {getattr(x, 'shape', type(x).__name__)}")
    n, c, h, w = x.shape
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (n, 4):
        raise ValueError(f"boxes must be a tensor of shape [{n}, 4], got {getattr(boxes, 'shape', None)}")
    if not isinstance(fill, torch.Tensor) or fill.shape != (n, c):
        raise ValueError(f"fill must be a tensor of shape [{n}, {c}], got {getattr(fill, 'shape', None)}")
    dev = x.device
    b = boxes.to(dev, torch.int64)
    rows = torch.arange(h, device=dev)[None, :]
    cols = torch.arange(w, device=dev)[None, :]
    in_r = (rows >= b[:, 0:1]) & (rows < b[:, 2:3])
    in_c = (cols >= b[:, 1:2]) & (cols < b[:, 3:4])
    mask = (in_r[:, :, None] & in_c[:, None, :])[:, None]
    return torch.where(mask, fill.to(dev, x.dtype)[:, :, None, None], x)


def sample_aug_params(
    image_indices: torch.Tensor,
    height: int,
    width: int,
    channels: int,
    out_size: int | Sequence[int],
    generator: torch.Generator,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = True,
    cutmix: bool = False,
    cutout: bool = False,
    cutout_factor: float = 0.5,
) -> AugParams:
    """All parameters of one batch, drawn in the fixed order boxes, flips, cutout, cutmix."""
    oh, ow = _out_size(out_size)
    n = int(image_indices.numel())
    boxes = sample_rrc_boxes(n, height, width, scale, ratio, generator)
    flips = sample_flips(n, generator) if flip else torch.zeros(n, dtype=torch.bool)
    co = CutoutParams(*sample_cutout(n, oh, ow, channels, generator, cutout_factor)) if cutout else None
    cm = CutMixParams(*sample_cutmix(n, oh, ow, generator)) if cutmix else None
    return AugParams(image_indices.to(torch.int64).cpu(), boxes, flips, (oh, ow), cutmix=cm, cutout=co)


# --------------------------------------------------------------------------- application


def crop_resize_flip(
    x: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out_size: int | Sequence[int],
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Batched crop -> bilinear resize -> horizontal flip (lpqld_fast.ops.crop_resize_flip).

    ``backend``: None/"auto" and the op backends ("reference", "cpp", "cuda",
    "triton") go to the op dispatcher; "dali" runs the DALI pipeline of
    :mod:`lpqld_fast.augment_dali` (replay only; not an op backend, so
    ``force_backend``/LPQLD_BACKEND never pick it). ``validate=False`` skips the op's value checks of boxes
    known to be good (drawn by :func:`sample_rrc_boxes`).
    """
    if backend == "dali":
        # DALI is optional and slow to import (~1 s): loaded only when asked for
        from lpqld_fast.augment_dali import crop_resize_flip_dali

        return crop_resize_flip_dali(x, boxes, flips, _out_size(out_size))
    return ops.crop_resize_flip(x, boxes, flips, _out_size(out_size), backend=backend, validate=validate)


def _channel_vector(name: str, v: Sequence[float] | torch.Tensor, channels: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten().to(device)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the images have {channels} channels")
    return t.view(1, channels, 1, 1)


def check_replay_params(aug: AugParams, num_images: int) -> None:
    """Every value check :func:`replay_batch` makes with ``validate=True``, on the parameters' host copy.

    A reader that replays the same stored batch every epoch calls this once per batch and then replays with
    ``validate=False``: no device value is read back per step (each of replay_batch's checks is a host sync
    when the images are on a GPU). Raises the same errors as replay_batch.
    """
    if not isinstance(aug, AugParams):
        raise TypeError(f"aug must be an AugParams, got {type(aug).__name__}")
    idx, boxes, flips = (t.detach().cpu() for t in (aug.image_indices, aug.boxes, aug.flips))
    n = idx.numel()
    if n and (int(idx.min()) < 0 or int(idx.max()) >= num_images):
        raise IndexError(f"record image indices fall outside [0, {num_images})")
    if boxes.shape != (n, 4) or flips.shape != (n,):
        raise ValueError(f"record boxes {tuple(boxes.shape)} / flips {tuple(flips.shape)} do not match its {n} "
                         "image indices")
    ok = (boxes >= 0) & (boxes <= 1)  # False for NaN too
    if n and not bool(ok.all()):
        k = int((~ok).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"boxes must hold finite normalised (i/H, j/W, h/H, w/W) values in [0, 1], "
                         f"got row {k}: {boxes[k].tolist()}")
    if flips.dtype != torch.bool and n and bool(((flips != 0) & (flips != 1)).any()):
        raise ValueError("flips must hold 0/1 (or bool) values")
    oh, ow = aug.out_size
    if aug.cutmix is not None:
        y0, x0, y1, x1 = (int(v) for v in aug.cutmix.box.detach().cpu().tolist())
        if not (0 <= y0 <= y1 <= oh and 0 <= x0 <= x1 <= ow):
            raise ValueError(f"box (y0, x0, y1, x1) = {(y0, x0, y1, x1)} does not fit images of size {oh}x{ow}")
        perm = aug.cutmix.perm.detach().cpu()
        if perm.shape != (n,) or (n and (int(perm.min()) < 0 or int(perm.max()) >= n)):
            raise ValueError(f"the CutMix permutation must hold {n} indices in [0, {n})")
    if aug.cutout is not None and aug.cutout.boxes.shape != (n, 4):
        raise ValueError(f"cutout boxes must have shape [{n}, 4], got {tuple(aug.cutout.boxes.shape)}")


def replay_batch(
    images_uint8: torch.Tensor,
    record: object,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    out_size: int | Sequence[int] | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The augmented, normalised (and mixed) float32 batch of a stored record.

    ``record`` is an :class:`AugParams` or anything with an ``aug`` attribute
    holding one (a label-store record). ``images_uint8`` is the whole image
    set [N, C, H, W] (any device; the result is on its device). ``out_size``
    defaults to the record's. Relabel and the student's replay both call this
    function, so they see identical pixels. ``backend`` picks the
    crop/resize/flip implementation (see :func:`crop_resize_flip`; "dali"
    agrees with the others within one grey level, not bit for bit). ``validate=False`` (parameters from
    :func:`sample_aug_params`, image indices and std checked by the caller once) reads no value back to the
    host: no device sync, and it compiles with ``torch.compile(fullgraph=True)``; same pixels.
    """
    aug = getattr(record, "aug", record)
    if not isinstance(aug, AugParams):
        raise TypeError(f"record must be an AugParams or have an .aug AugParams, got {type(record).__name__}")
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dim() != 4 or images_uint8.dtype != torch.uint8:
        raise ValueError("images_uint8 must be a uint8 tensor [N, C, H, W], got "
                         f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)} "
                         f"{tuple(getattr(images_uint8, 'shape', ()))}")
    size = aug.out_size if out_size is None else _out_size(out_size)
    if size != tuple(aug.out_size) and (aug.cutmix is not None or aug.cutout is not None):
        raise ValueError(f"out_size {size} differs from the record's {tuple(aug.out_size)}, but the record's "
                         "CutMix/cutout boxes are in the record's output pixels")
    n_img, c = images_uint8.shape[:2]
    dev = images_uint8.device
    idx = aug.image_indices.to(dev, torch.int64)
    if validate and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_img):
        raise IndexError(f"record image indices fall outside [0, {n_img})")
    m = _channel_vector("mean", mean, c, dev)
    s = _channel_vector("std", std, c, dev)
    if validate and bool((s <= 0).any()):
        raise ValueError("std must be positive")
    x = crop_resize_flip(images_uint8.index_select(0, idx), aug.boxes.to(dev), aug.flips.to(dev), size,
                         backend=backend, validate=validate)
    x = x.to(torch.float32)
    if aug.cutout is not None:
        x = apply_cutout(x, aug.cutout.boxes, aug.cutout.fill)
    x = x.div_(255.0).sub_(m).div_(s)
    if aug.cutmix is not None:
        x = apply_cutmix(x, aug.cutmix.box, aug.cutmix.perm) if validate else _paste_box(x, aug.cutmix.box,
                                                                                          aug.cutmix.perm)
    return x
