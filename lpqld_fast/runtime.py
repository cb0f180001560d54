"""Process-wide settings: the CPU allocator's, applied by the entry points (CLI, bench, scripts), never on
import; and ``full_fp32()``, a block with TF32 off (GPU equivalence checks).

Two costs showed up in the profiles of the CPU pipeline, both page faults on freshly allocated tensors:

- large blocks (a 77 MB ImageNet replay batch): torch's CPU allocator hands them out 2 MiB-aligned and
  backed by transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` (read by torch at its first large
  allocation), ~500x fewer faults;
- mid-size blocks (a [128, 1000] float32 gradient is 512 KB): glibc serves them from mmap or returns them
  to the kernel on free (its mmap and trim thresholds), so a loop that allocates one per step faults in
  every page again each step. Raising both thresholds keeps them on the heap, reused without faults, as
  jemalloc/tcmalloc would.

Values the user set in the environment (``THP_MEM_ALLOC_ENABLE``, ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) are kept. Measured effect: bench/README.md ("Allocator").
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: blocks below it come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap kept before memory is returned to the kernel

_applied: dict[str, object] | None = None


def tune_cpu_allocator() -> dict[str, object]:
    """Apply the settings above once per process; returns what was set (recorded in bench metadata)."""
    global _applied
    if _applied is not None:
        return _applied
    applied: dict[str, object] = {}
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    applied["THP_MEM_ALLOC_ENABLE"] = os.environ["THP_MEM_ALLOC_ENABLE"]
    mallopt = _glibc_mallopt()
    if mallopt is not None:
        for name, param, value in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                   ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
            if name in os.environ:
                applied[name] = f"{os.environ[name]} (environment)"
            elif mallopt(param, value) == 1:
                applied[name] = value
    _applied = applied
    return applied


def _glibc_mallopt():
    """glibc's mallopt, or None on another C library (musl, macOS): the settings are then skipped."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """TF32 off for cuDNN convolutions and CUDA matmuls inside the block (the previous settings restored after).

    cuDNN convolutions default to TF32 (10-bit mantissa) on Ampere and later, and their rounding differs
    between batch sizes: comparisons of a many-classes pass with a one-class pass need full fp32.
    """
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
