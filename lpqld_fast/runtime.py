"""Process-wide settings: the CPU allocator's, applied by the entry points (CLI, bench, scripts), never on
import; ``full_fp32()``, a block with TF32 off (GPU equivalence checks); and the hardware's answers to the
config's ``auto`` settings (bf16, threads, loader workers, compile; lpqld_fast.config.resolve_auto); and the
captured (torch.compile) form of a stage's per-step function (``compile_step``).

bf16 autocast is chosen only where the device computes bf16 natively: on a CPU, the ``avx512_bf16`` or
``amx_bf16`` flag in /proc/cpuinfo (oneDNN's bf16 convolutions and matmuls use those instructions; without
them it converts to fp32 and back around every op: `make demo` took 31 min in forced bf16 on a Xeon without
them, 2.3-2.6x slower steps than fp32). The flags are read, not probed by timing: deterministic, free, and what
oneDNN dispatches on; a timing probe on a shared machine would measure the neighbours.

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
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit: blocks below it come from the heap
TRIM_THRESHOLD = 256 << 20  # free heap kept before memory is returned to the kernel

_applied: dict[str, object] | None = None
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
MAX_AUTO_WORKERS = 4  # image decoding beyond 4 workers did not pay on the folder trees measured


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


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: str = "cpu") -> tuple[bool, str]:
    """(use bf16 autocast, why): on a CPU only with native bf16 instructions, on CUDA where supported."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        ok = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return ok, "the GPU computes bf16 natively" if ok else "the GPU lacks native bf16"
    have = sorted(cpu_flags() & set(NATIVE_BF16_FLAGS))
    if have:
        return True, f"the CPU has {'/'.join(have)}"
    return False, "the CPU lacks avx512_bf16/amx_bf16, bf16 would be emulated"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def auto_threads() -> tuple[int, str]:
    """Threads for ``runtime.threads=auto``: never more than torch's current setting (which honours
    OMP_NUM_THREADS and a caller's torch.set_num_threads), nor more than the usable CPUs per local process."""
    import torch

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cpus = max(1, usable_cpus() // max(local, 1))
    n = max(1, min(torch.get_num_threads(), cpus))
    return n, f"{usable_cpus()} usable CPUs" + (f" / {local} local processes" if local > 1 else "")


def auto_workers() -> tuple[int, str]:
    """DataLoader workers for folder trees: one CPU is left to the training process, at most 4."""
    n = min(MAX_AUTO_WORKERS, usable_cpus() - 1)
    return max(0, n), f"{usable_cpus()} usable CPUs"


def apply_threads(threads: int) -> None:
    """torch's intra-op threads for this process (a no-op when already set)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def mem_available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes (4 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


# ----------------------------------------------------------------------------- captured stage steps

# The values of squeeze.compile, recover.compile and train.compile besides "auto".
COMPILE_MODES = ("eager", "compile", "cudagraphs")
# The torch.compile backend of compile=compile (default inductor). Tests set aot_eager: dynamo's whole-graph
# capture and AOT autograd run by eager kernels, bit for bit equal to eager and seconds instead of the
# minutes inductor's C++ code generation takes on a small CPU. Not a config key: it changes no result a
# user asks for, only how a test checks the capture.
COMPILE_BACKEND_ENV = "LPQLD_COMPILE_BACKEND"


def auto_compile(device: str = "cpu") -> tuple[str, str]:
    """(compile mode, why) for ``compile=auto``: eager everywhere until a measurement says otherwise.

    CPU (2-core Zen 3 beside another job, bench/stage_compile.py at the fashion-mnist shapes, README "Compiled
    steps"): the steps are convolution-bound (oneDNN kernels either way) and no stage's step won consistently
    over two runs (compiled vs eager within -15%..+22%), while each compiled step first costs 18-36 s of
    compilation. CUDA: not measured on a GPU yet; scripts/gpu_check.sh runs the same bench there.
    """
    import torch

    if torch.device(device).type == "cuda":
        return "eager", "torch.compile not yet measured to win on a GPU (scripts/gpu_check.sh measures it)"
    return "eager", "CPU conv steps gain nothing from torch.compile, measured"


def check_compile_mode(key: str, mode: str, device: str) -> None:
    """Refuse ``key=cudagraphs`` on a device without CUDA graphs (a ValueError naming the key)."""
    import torch

    if mode == "cudagraphs" and torch.device(device).type != "cuda":
        raise ValueError(f"{key}=cudagraphs needs a CUDA device (CUDA graphs), got --device {device}; use "
                         f"{key}=compile or eager")


def compile_step(fn: Callable[..., Any], mode: str) -> Callable[..., Any]:
    """``fn`` as a stage runs it under ``mode``: itself (eager), ``torch.compile(fn, fullgraph=True)``
    (compile) or the same with ``mode="reduce-overhead"`` (cudagraphs: CUDA graphs replayed per call).

    Made once per stage run and reused for every step. fullgraph=True: a graph break, a recompile beyond
    dynamo's limit or any other capture failure raises instead of falling back to eager unnoticed.
    """
    import torch

    if mode == "eager":
        return fn
    if mode == "compile":
        return torch.compile(fn, fullgraph=True, backend=os.environ.get(COMPILE_BACKEND_ENV) or "inductor")
    if mode != "cudagraphs":
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")

    @functools.wraps(fn)
    def step(*args: Any, **kwargs: Any) -> Any:
        # each call is a new training step: the previous step's graph outputs may be overwritten from here on
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return step
