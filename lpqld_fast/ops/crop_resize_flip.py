"""Batched augmentation ops shared by recover, relabel and replay.

:func:`crop_resize_flip` — per-sample crop box, bilinear resize to one output
size, per-sample horizontal flip, in one pass over the batch. Relabel and the
student's replay call this same op, so a stored label describes exactly the
pixels the student sees; recover differentiates through it.

:func:`batched_roll` — the recover jitter: a torch.roll with its own shift per
sample: lpqld::batched_roll on CPU tensors (two row copies per output row),
else one torch.gather. Both are exact permutations (bitwise equal results), so
force_backend / LPQLD_BACKEND do not apply to it; ``backend="cpp"`` or
``"gather"`` picks one.

Backends of crop_resize_flip (``backend=`` / ``force_backend`` / LPQLD_BACKEND):
  reference  per-sample F.interpolate loop (the oracle; autograd)
  cpp        lpqld::crop_resize_flip CPU kernel, hand-written backward
  cuda       lpqld::crop_resize_flip CUDA kernel, atomicAdd backward
  triton     kernels/crop_resize_flip.py forward and backward (atomic_add)
The vectorised plain-torch path (:func:`crop_resize_flip_gather`, no
per-sample loop, any device) is not a dispatcher backend; it is exported for
devices without native kernels and used by the tests as a second oracle.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from lpqld_fast.ops import _validate as V
from lpqld_fast.ops._dispatch import native_has_kernel, resolve_backend
from lpqld_fast.ops.reference import crop_resize_flip as ref

OP = "crop_resize_flip"
NATIVE_OP = "crop_resize_flip"

X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8)
BOX_DTYPES = (torch.float32, torch.float64)
FLIP_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64)
SHIFT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8)

__all__ = ["crop_resize_flip", "crop_resize_flip_gather", "batched_roll", "pixel_boxes"]


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Normalised (i/H, j/W, h/H, w/W) [N, 4] -> int64 pixel boxes (i, j, h, w), clamped inside the image."""
    return ref.pixel_boxes(boxes, height, width)


# ----------------------------------------------------------------------------- validation


def _check_out_size(out_size: object) -> tuple[int, int]:
    if isinstance(out_size, int) and not isinstance(out_size, bool):
        out_size = (out_size, out_size)
    if isinstance(out_size, torch.Size):
        out_size = tuple(out_size)
    if (
        not isinstance(out_size, (tuple, list))
        or len(out_size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in out_size)
    ):
        raise TypeError(f"out_size must be an int or a pair of ints (oh, ow), got {out_size!r}")
    oh, ow = int(out_size[0]), int(out_size[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"out_size must be positive, got {(oh, ow)}")
    return oh, ow


def _check_crop_inputs(x: object, boxes: object, flips: object, out_size: object,
                       validate: bool = True) -> tuple[int, int]:
    V.check_tensor("x", x, ndim=4, dtypes=X_DTYPES)
    n, _, height, width = x.shape
    if height < 1 or width < 1:
        raise ValueError(f"x must have a non-empty image (H, W >= 1), got shape {tuple(x.shape)}")
    V.check_tensor("boxes", boxes, ndim=2, dtypes=BOX_DTYPES, device=x.device)
    V.check_shape("boxes", boxes, (n, 4))
    V.check_tensor("flips", flips, ndim=1, dtypes=FLIP_DTYPES, device=x.device)
    if flips.shape[0] != n:
        raise ValueError(f"flips has {flips.shape[0]} entries but x has {n} samples")
    oh_ow = _check_out_size(out_size)
    if validate:
        _check_crop_values(boxes, flips)
    return oh_ow


def _check_crop_values(boxes: torch.Tensor, flips: torch.Tensor) -> None:
    """Box and flip values (a host sync each on a GPU); the CPU kernel makes the same checks in C++."""
    if not boxes.shape[0]:
        return
    ok = (boxes >= 0) & (boxes <= 1)  # False for NaN too: one check, one host sync
    if not bool(ok.all()):
        k = int((~ok).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"boxes must hold finite normalised (i/H, j/W, h/H, w/W) values in [0, 1], "
            f"got row {k}: {boxes[k].tolist()}"
        )
    if flips.dtype != torch.bool and bool(((flips != 0) & (flips != 1)).any()):
        raise ValueError("flips must hold 0/1 (or bool) values")


# ----------------------------------------------------------------------------- backends


def _triton_module():
    """kernels/crop_resize_flip.py: installed as lpqld_fast.kernels.crop_resize_flip, or loaded from the checkout."""
    try:
        return importlib.import_module("lpqld_fast.kernels.crop_resize_flip")
    except ImportError:
        pass
    name = "_lpqld_kernels_crop_resize_flip"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[2] / "kernels" / "crop_resize_flip.py"
    if not path.exists():
        raise ImportError("lpqld_fast.kernels.crop_resize_flip is not installed and kernels/crop_resize_flip.py "
                          "is not next to the package")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


class _CropResizeFlip(torch.autograd.Function):
    """The Triton kernels' forward and backward (cpp and cuda run the lpqld::crop_resize_flip op, whose
    autograd is in C++)."""

    @staticmethod
    def forward(ctx, x, pix, flips, oh, ow):  # noqa: D401 - autograd signature
        ctx.save_for_backward(pix, flips)
        ctx.in_size = (x.shape[2], x.shape[3])
        return _triton_module().crop_resize_flip_fwd(x, pix, flips, oh, ow)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        pix, flips = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _triton_module().crop_resize_flip_bwd(grad_out, pix, flips, *ctx.in_size)
        return gx, None, None, None, None


def crop_resize_flip(
    x: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out_size: int | Sequence[int],
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Crop each sample to its box, resize bilinearly to ``out_size``, flip horizontally where asked.

    x      [N, C, H, W] float16/bfloat16/float32/float64, or uint8 (output
           float32 on the 0..255 scale, no gradient); any strides
    boxes  [N, 4] float32 (or float64) normalised (i/H, j/W, h/H, w/W), the
           torchvision RandomResizedCrop box divided by the image size; turned
           into pixels by :func:`pixel_boxes` (round, h, w >= 1, clamped inside)
    flips  [N] bool (or 0/1 integers): flip along W after the resize
    out_size  (oh, ow) or an int for a square output

    out[n] == F.interpolate(x[n:n+1, :, i:i+h, j:j+w], (oh, ow), mode="bilinear",
    align_corners=False, antialias=False), flipped along W where flips[n].
    Differentiable w.r.t. x (float input) with a hand-written backward. ``validate=False`` skips the value
    checks of boxes and flips (a device sync each on a GPU) for boxes known to be good, e.g. drawn by
    lpqld_fast.augment; a NaN box then gives an unspecified crop inside the image. The ``cpp`` backend converts
    and checks the normalised boxes and the flips inside the kernel, always (it costs no sync there); the
    ``cuda`` backend converts them in one launch and checks them as ``validate`` says.
    """
    oh, ow = _check_crop_inputs(x, boxes, flips, out_size, validate=False)
    name = resolve_backend(OP, x.device, backend, NATIVE_OP)
    if name == "cpp":
        return torch.ops.lpqld.crop_resize_flip(x, boxes, flips, oh, ow)
    if validate:
        _check_crop_values(boxes, flips)
    flips_b = flips.to(torch.bool).contiguous()
    if name == "cuda":
        return torch.ops.lpqld.crop_resize_flip(x, boxes, flips_b, oh, ow)
    pix = ref.pixel_boxes(boxes, x.shape[2], x.shape[3]).contiguous()
    if name == "reference":
        return ref.crop_resize_flip(x, pix, flips_b, (oh, ow))
    if x.requires_grad and torch.is_grad_enabled():  # triton, the one backend left
        return _CropResizeFlip.apply(x, pix, flips_b, oh, ow)
    return _triton_module().crop_resize_flip_fwd(x, pix, flips_b, oh, ow)


def crop_resize_flip_gather(
    x: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out_size: int | Sequence[int]
) -> torch.Tensor:
    """The vectorised plain-torch path of :func:`crop_resize_flip` (gathers, no per-sample loop), any device.

    Same semantics and validation; differentiable through autograd (gather -> scatter_add).
    """
    oh, ow = _check_crop_inputs(x, boxes, flips, out_size)
    pix = ref.pixel_boxes(boxes, x.shape[2], x.shape[3])
    return ref.crop_resize_flip_gather(x, pix, flips.to(torch.bool), (oh, ow))


# ----------------------------------------------------------------------------- batched roll


def _roll_gather(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    n, c, height, width = x.shape
    if x.numel() == 0:
        return x.clone(memory_format=torch.contiguous_format)
    s = shifts.to(device=x.device, dtype=torch.int64)
    ys = torch.remainder(torch.arange(height, device=x.device)[None, :] - s[:, 0:1], height)  # [N, H]
    xs = torch.remainder(torch.arange(width, device=x.device)[None, :] - s[:, 1:2], width)  # [N, W]
    idx = (ys[:, :, None] * width + xs[:, None, :]).reshape(n, 1, height * width).expand(n, c, height * width)
    return torch.gather(x.reshape(n, c, height * width), 2, idx).view(n, c, height, width)


ROLL_BACKENDS = ("cpp", "gather")


class _BatchedRoll(torch.autograd.Function):
    """The gather path with the roll-back backward (a permutation: exact, and no scatter_add atomics)."""

    @staticmethod
    def forward(ctx, x, shifts):  # noqa: D401 - autograd signature
        ctx.save_for_backward(shifts)
        return _roll_gather(x, shifts)

    @staticmethod
    def backward(ctx, grad_out):
        (shifts,) = ctx.saved_tensors
        return _BatchedRoll.apply(grad_out, -shifts), None


def batched_roll(x: torch.Tensor, shifts: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """out[n] = torch.roll(x[n], shifts=(dy, dx), dims=(1, 2)) for x [N, C, H, W], shifts [N, 2] int (dy, dx).

    Shifts of any sign and size (taken modulo H and W). Differentiable (the
    backward rolls back). Any dtype, any device: CPU tensors go through the
    native kernel when the extension is built (``backend="cpp"`` requires it),
    others (or ``backend="gather"``) through one torch.gather.
    """
    V.check_tensor("x", x, ndim=4)
    n = x.shape[0]
    V.check_tensor("shifts", shifts, ndim=2, dtypes=SHIFT_DTYPES, device=x.device)
    V.check_shape("shifts", shifts, (n, 2))
    if backend not in (None,) + ROLL_BACKENDS:
        raise ValueError(f"batched_roll: backend must be one of {ROLL_BACKENDS} or None, got {backend!r}")
    native = backend != "gather" and x.device.type == "cpu" and native_has_kernel("batched_roll", "CPU")
    if backend == "cpp" and not native:
        raise RuntimeError("batched_roll: backend 'cpp' needs CPU tensors and lpqld_fast._C with batched_roll "
                           "(scripts/build_ext.sh)")
    shifts = shifts.to(torch.int64)
    if native:  # lpqld::batched_roll, differentiable (its C++ backward rolls back)
        return torch.ops.lpqld.batched_roll(x, shifts)
    if x.numel():  # reduced first, so that the backward's -shifts cannot overflow (int64 min)
        shifts = torch.stack((shifts[:, 0].remainder(x.shape[2]), shifts[:, 1].remainder(x.shape[3])), dim=1)
    if x.requires_grad and torch.is_grad_enabled():
        return _BatchedRoll.apply(x, shifts)
    return _roll_gather(x, shifts)
