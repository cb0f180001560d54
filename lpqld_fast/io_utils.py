"""Safe file I/O: atomic writes, pickle-free checkpoints, content hashes.

Everything a user may receive from someone else is loaded without executing
code: tensors via ``torch.load(weights_only=True)`` (refuses pickled objects),
metadata via JSON.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once (at import, before any thread writes)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path in the target directory; rename it over ``path`` on success.

    A crash leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp makes the file private (0600); give it the mode a plain open() would (0666 less the umask), so
    # reports, stores and checkpoints can be shared like any other output.
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is corrupt (not valid JSON: {e})") from None


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> None:
    """Atomically save a dict of tensors / plain values loadable with weights_only=True.

    Serialised in memory first: torch.save names the zip archive after the
    file, and the temp file's random name would make equal contents differ.
    """
    buf = io.BytesIO()
    torch.save(tensors, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: str | os.PathLike, what: str = "checkpoint", map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by save_tensors (or a plain state dict) without running pickled code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        # torch warns about the pickle protocol of foreign files: the error below is the one line the user needs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        # first sentence only: torch's weights_only text goes on to suggest weights_only=False, which we never do
        msg = str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__
        raise ValueError(f"{what} {path} cannot be loaded safely ({type(e).__name__}: {msg}); "
                         "only plain tensor files are accepted, never arbitrary pickles") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: dict[str, torch.Tensor]) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes (order-independent of storage)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FolderInUse(BlockingIOError):
    """Another process is writing a stage into the same folder."""


_HELD: dict[str, int] = {}  # lock key -> nesting depth, for the locks this process holds
# How long a stage waits for a folder's lock before refusing: a writer holds it for minutes, a finished stage's
# "done already" check for well under a second (two jobs starting together on a shared squeeze folder).
LOCK_PATIENCE_S = 5.0


def folder_lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of ``folder_lock(folder)``: in this user's directory of the temp directory, named by a
    hash of the folder's real path."""
    key = hashlib.sha1(os.path.realpath(folder).encode()).hexdigest()[:20]
    return Path(tempfile.gettempdir()) / f"lpqld-locks-{os.getuid()}" / f"{key}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, stage: str, enabled: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` while ``stage`` writes into it.

    Two processes given the same folder (two terminals, a script and a CLI call) would both write its files; the
    second now fails (after ``LOCK_PATIENCE_S``) with ``FolderInUse`` naming the holder. The lock is a ``flock``
    on a file in the temp directory keyed by the folder's real path, so nothing is written into the folder (a
    refused command leaves it as it was) and a killed holder releases it with its process. It guards one machine
    and one user: under torchrun only rank 0 takes it (``enabled``). Re-entrant within a process. Where no lock
    can be taken (no fcntl, a read-only temp directory) the stage runs unguarded, with a warning.
    """
    if not enabled:
        yield
        return
    path = folder_lock_path(folder)
    key = path.stem
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = None
    try:
        import fcntl

        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_PATIENCE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise FolderInUse(f"{folder} is in use: {holder} is writing into it; wait for it to finish or give "
                          "another output folder") from None
    except (ImportError, OSError) as e:
        if fd is not None:
            os.close(fd)
        fd = None
        warnings.warn(f"folder_lock: cannot lock {path} ({e}); {folder} is not guarded against a second process",
                      RuntimeWarning, stacklevel=3)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"lpqld {stage} (pid {os.getpid()})".encode(), 0)
        _HELD[key] = 1
        try:
            yield
        finally:
            del _HELD[key]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def locks_folder(arg: str, stage: str, when: Callable[[dict[str, Any]], bool] | None = None) -> Callable:
    """Decorator: the function runs under ``folder_lock`` of its argument ``arg``; ``when(arguments)`` (the
    bound call's arguments by name) says whether this call takes the lock (e.g. only on rank 0)."""
    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs).arguments
            with folder_lock(bound[arg], stage, enabled=True if when is None else when(bound)):
                return fn(*args, **kwargs)
        return wrapper
    return deco
