"""Backend selection shared by every op.

Backends: "reference" (plain PyTorch oracle), "cpp" (native CPU kernels in
lpqld_fast._C), "cuda" (native CUDA kernels in lpqld_fast._C) and "triton".
"auto" follows the tensor's device: cpp on CPU, cuda (then triton) on GPU,
falling back to the reference when nothing faster is available. A backend is
forced per call (``backend=``), per block (``force_backend``) or per process
(``LPQLD_BACKEND``).
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

BACKENDS = ("reference", "cpp", "cuda", "triton")
_forced: list[str] = []


@functools.lru_cache(maxsize=None)
def native_available() -> bool:
    """True when lpqld_fast._C imported and registered its ops (and their fake implementations)."""
    try:  # the compiled extension is optional: the reference and Triton backends work without it
        from lpqld_fast import _C  # noqa: F401
    except ImportError:
        return False
    if not hasattr(torch.ops, "lpqld"):
        return False
    from lpqld_fast.ops import _fake  # noqa: F401  (registers fake kernels: only once the extension's ops exist)
    return True


@torch.compiler.assume_constant_result  # fixed once the extension is loaded: torch.compile bakes it in
def native_has_kernel(native_op: str, dispatch_key: str) -> bool:
    """True when lpqld::<native_op> has a kernel for ``dispatch_key`` ("CPU" or "CUDA")."""
    return _native_has_kernel(native_op, dispatch_key)


@functools.lru_cache(maxsize=None)
def _native_has_kernel(native_op: str, dispatch_key: str) -> bool:
    if not native_available():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"lpqld::{native_op}", dispatch_key)
    except RuntimeError:  # schema not registered (op not built)
        return False


def native_has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return native_has_kernel("classwise_moments_accumulate_", "CUDA")


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors natively and CPU tensors under TRITON_INTERPRET=1."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret()


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run every op inside the block with backend ``name``."""
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def available_backends(device: torch.device | str, native_op: str = "classwise_moments_accumulate_") -> list[str]:
    """The backends that can run tensors on ``device`` in this process.

    ``native_op`` names the lpqld::<op> schema whose C++/CUDA kernels decide
    whether "cpp"/"cuda" are available.
    """
    device = torch.device(device)
    return [name for name in BACKENDS if backend_runs(name, device, native_op)]


def backend_runs(name: str, device: torch.device, native_op: str = "classwise_moments_accumulate_") -> bool:
    """True when backend ``name`` can run tensors on ``device`` here (one backend: cheaper than the list)."""
    if name == "reference":
        return True
    if name == "cpp":
        return device.type == "cpu" and native_has_kernel(native_op, "CPU")
    if name == "cuda":
        return device.type == "cuda" and native_has_kernel(native_op, "CUDA")
    return name == "triton" and triton_usable(device)


def resolve_backend(op: str, device: torch.device, backend: str | None = None, native_op: str | None = None) -> str:
    """Pick the backend for ``op`` on ``device``; raise if a forced one cannot run.

    ``native_op`` is the lpqld::<name> schema of the op's C++/CUDA kernels
    (default: ``op``).
    """
    native_op = native_op or op
    name = backend or (_forced[-1] if _forced else None) or os.environ.get("LPQLD_BACKEND") or "auto"
    if name == "auto":
        if device.type == "cpu":
            return "cpp" if native_has_kernel(native_op, "CPU") else "reference"
        if device.type == "cuda":
            if native_has_kernel(native_op, "CUDA"):
                return "cuda"
            return "triton" if triton_usable(device) else "reference"
        return "reference"
    if name not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if not backend_runs(name, device, native_op):
        hint = {
            "cpp": "build the extension (make build) and pass CPU tensors",
            "cuda": "build the extension with CUDA and pass CUDA tensors",
            "triton": "install triton and pass CUDA tensors, or set TRITON_INTERPRET=1 for CPU tensors",
        }.get(name, "")
        raise RuntimeError(f"{op}: backend {name!r} cannot run tensors on {device} here ({hint})")
    return name
