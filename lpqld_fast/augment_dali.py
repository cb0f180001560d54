"""DALI backend of the stored-augmentation replay (crop -> bilinear resize -> flip).

The same semantics as :func:`lpqld_fast.ops.crop_resize_flip` (the per-sample
``F.interpolate(..., mode="bilinear", align_corners=False, antialias=False)``
oracle), run as a DALI pipeline:

    external_source (images [C, H, W] per sample, pixel anchors/shapes, flip flags)
    -> fn.slice(axis_names="HW", normalized_anchor=False, normalized_shape=False)
    -> fn.resize(linear, antialias=False, float output)
    -> fn.flip(horizontal=per-sample flag)

Why each choice:
- The crop is a *hard* slice before the resize (not ``fn.resize``'s ``roi_*``):
  the oracle resizes the cropped tensor, so taps at the crop border clamp to
  the crop's edge pixels; a resize ROI would read the neighbours outside it.
- ``antialias=False``: the oracle is plain 2-tap bilinear also when
  downscaling; DALI's default widens the filter there.
- DALI's resampling uses pixel centres at (k + 0.5), the same half-pixel
  convention as ``align_corners=False``, and clamps at the edges like PyTorch.
- Float output (``dtype=FLOAT``): the oracle returns float32 on the 0..255
  scale for uint8 input, so nothing is rounded to uint8 in between.

The pipeline runs on DALI's CPU backend for CPU tensors and on the GPU for CUDA
tensors; anchors, shapes and flip flags are argument inputs and always live
on the CPU. Pipelines are built once per (device, dtype, channels, out size,
batch capacity) and cached. DALI is an optional import: :func:`dali_available`
says whether it can be used.
"""
from __future__ import annotations

import atexit
import functools
import gc
from collections.abc import Sequence

import numpy as np
import torch

from lpqld_fast.ops.crop_resize_flip import _check_crop_inputs
from lpqld_fast.ops.reference.crop_resize_flip import pixel_boxes

__all__ = ["dali_available", "dali_import_error", "crop_resize_flip_dali"]

# Largest batch one pipeline run takes; bigger batches are split into chunks.
MAX_BATCH = 1024


@functools.lru_cache(maxsize=None)
def dali_import_error() -> str | None:
    """None when nvidia.dali imports, else the reason (for skip messages and errors)."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.fn  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA runtime inside the wheel
        return f"{type(e).__name__}: {e}"
    return None


def dali_available() -> bool:
    """True when DALI (nvidia-dali-cuda130) is installed and imports beside torch."""
    return dali_import_error() is None


def _require_dali() -> None:
    err = dali_import_error()
    if err is not None:
        raise RuntimeError(f"the DALI backend needs nvidia-dali (pip install -r requirements-dev.txt); import failed: {err}")


def _capacity(n: int) -> int:
    """Batch capacity of the pipeline for n samples: the next power of two, so varying batch sizes share pipelines."""
    return min(MAX_BATCH, 1 << max(0, n - 1).bit_length())


@functools.lru_cache(maxsize=32)
def _pipeline(dev: str, device_id: int | None, dtype_name: str, channels: int, oh: int, ow: int,
              capacity: int, num_threads: int):
    """A built DALI pipeline for one configuration (cached: building costs tens of milliseconds)."""
    from nvidia.dali import fn, pipeline_def, types

    in_type = {"uint8": types.UINT8, "float32": types.FLOAT}[dtype_name]

    @pipeline_def(batch_size=capacity, num_threads=num_threads, device_id=device_id,
                  # Synchronous, no prefetch: every run consumes exactly the batch fed just before it.
                  exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
    def replay():
        imgs = fn.external_source(name="images", device=dev, layout="CHW", dtype=in_type, ndim=3)
        anchor = fn.external_source(name="anchor", device="cpu", dtype=types.INT64, ndim=1)
        shape = fn.external_source(name="shape", device="cpu", dtype=types.INT64, ndim=1)
        flip = fn.external_source(name="flip", device="cpu", dtype=types.INT32, ndim=0)
        crop = fn.slice(imgs, anchor, shape, axis_names="HW", normalized_anchor=False, normalized_shape=False,
                        out_of_bounds_policy="error")
        out = fn.resize(crop, resize_x=float(ow), resize_y=float(oh), interp_type=types.INTERP_LINEAR,
                        antialias=False, dtype=types.FLOAT)
        return fn.flip(out, horizontal=flip, vertical=0)

    pipe = replay()
    pipe.build()
    return pipe


@atexit.register
def _release_pipelines() -> None:
    # Cached pipelines must die while DALI's module globals still exist: left to interpreter teardown,
    # Pipeline.__del__ finds them None and prints an AttributeError per pipeline.
    _pipeline.cache_clear()
    gc.collect()


def _run_chunk(pipe, x: torch.Tensor, pix: torch.Tensor, flips: torch.Tensor, out: torch.Tensor) -> None:
    """Feed one chunk (x contiguous float32/uint8 [n, C, H, W]) and copy the result into ``out`` [n, C, oh, ow]."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    pix_np = pix.cpu().numpy()
    anchors = np.ascontiguousarray(pix_np[:, 0:2])
    shapes = np.ascontiguousarray(pix_np[:, 2:4])
    flip_np = flips.cpu().numpy().astype(np.int32)
    if x.is_cuda:
        stream = torch.cuda.current_stream(x.device)
        stream.synchronize()  # x was produced on torch's stream; DALI reads it on its own
        pipe.feed_input("images", x)  # a dense [n, C, H, W] tensor is taken as n samples
    else:
        pipe.feed_input("images", x.numpy())
    pipe.feed_input("anchor", anchors)
    pipe.feed_input("shape", shapes)
    pipe.feed_input("flip", flip_np)
    (res,) = pipe.run()
    dense = res.as_tensor()  # all samples share (C, oh, ow)
    if x.is_cuda:
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(x.device))
    else:
        feed_ndarray(dense, out)


def crop_resize_flip_dali(
    x: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out_size: int | Sequence[int],
    *,
    num_threads: int | None = None,
) -> torch.Tensor:
    """:func:`lpqld_fast.ops.crop_resize_flip` computed by a DALI pipeline (CPU or GPU after x's device).

    x [N, C, H, W] uint8 or float (float16/bfloat16/float64 go through float32),
    boxes [N, 4] normalised (i/H, j/W, h/H, w/W) as stored in :class:`AugParams`,
    flips [N] bool, out_size int or (oh, ow). Returns float32 on the 0..255 scale
    for uint8 input, else x's dtype, on x's device. No autograd (replay only).
    Agrees with the oracle within one grey level (tests/test_augment_dali.py).
    """
    _require_dali()
    oh, ow = _check_crop_inputs(x, boxes, flips, out_size)
    n, c, height, width = x.shape
    out_dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
    if n == 0 or c == 0:
        return x.new_zeros((n, c, oh, ow), dtype=out_dtype)
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the DALI backend runs CPU or CUDA tensors, got {x.device}")
    feed = x.detach()
    feed = (feed if feed.dtype == torch.uint8 else feed.to(torch.float32)).contiguous()
    pix = pixel_boxes(boxes, height, width)
    fl = flips.to(torch.bool)
    dev = "gpu" if x.is_cuda else "cpu"
    device_id = x.device.index if x.is_cuda else None
    if x.is_cuda and device_id is None:
        device_id = torch.cuda.current_device()
    threads = max(1, int(num_threads if num_threads is not None else torch.get_num_threads()))
    out = torch.empty((n, c, oh, ow), dtype=torch.float32, device=x.device)
    for s in range(0, n, MAX_BATCH):
        e = min(n, s + MAX_BATCH)
        pipe = _pipeline(dev, device_id, str(feed.dtype).removeprefix("torch."), c, oh, ow, _capacity(e - s), threads)
        _run_chunk(pipe, feed[s:e], pix[s:e], fl[s:e], out[s:e])
    return out if out_dtype == torch.float32 else out.to(out_dtype)
