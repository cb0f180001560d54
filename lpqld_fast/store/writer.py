"""Writing a label store: preallocated files, in-place slot writes, done marks, resumable.

Protocol (DESIGN 3):

1. :meth:`StoreWriter.create` preallocates every component file (zero-filled,
   ``posix_fallocate`` where available), writes ``batch_ids.bin``, then writes
   ``manifest.json`` atomically with ``"complete": false``. Re-creating over a
   directory whose manifest describes the *same* run resumes it instead
   (:meth:`StoreWriter.create_or_resume`); a different run is refused.
2. :meth:`write_slot` writes one slot's rows in place with ``os.pwrite`` at
   ``slot * row_bytes`` of each file. Slots are committed in groups:
   :meth:`commit` ``fdatasync``s the data files, then writes the slots' bytes
   in ``done.bin``. So a done mark is never on disk before its data, and a
   killed process loses at most the uncommitted slots, which a resumed run
   recomputes (they are deterministic, so the bytes come out the same).
3. :meth:`finalize` (one process, after every slot is done) checksums every
   file and rewrites the manifest with ``"files"`` and ``"complete": true``.

Several writers (torchrun ranks) may share one store: rank 0 calls
:meth:`create`, the others :meth:`open` after a barrier; each writes only the
slots of the range it owns (:meth:`pending_slots`), so no two processes
write the same bytes (``done.bin`` is one byte per slot); after a barrier one
rank calls :meth:`finalize`.
"""
from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lpqld_fast.io_utils import atomic_write_json, read_json, sha256_file
from lpqld_fast.store.layout import FORMAT, MANIFEST, META_COMPONENTS, SCHEMA_VERSION, Component, component_specs, \
    components_json

_VOLATILE_KEYS = ("complete", "files")


def _identity(manifest: dict[str, Any]) -> dict[str, Any]:
    """The part of a manifest that identifies the run (everything but completion state), JSON-normalised."""
    import json

    return json.loads(json.dumps({k: v for k, v in manifest.items() if k not in _VOLATILE_KEYS}, sort_keys=True))


def _diff_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<missing>"), b.get(key, "<missing>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff_keys(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}")
    return out


def _run_diff(old: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    """The identity keys in which the stored manifest ``old`` differs from the run ``manifest`` would write."""
    new = copy.deepcopy(manifest)
    new.update(format=FORMAT, schema_version=SCHEMA_VERSION, components=components_json(component_specs(new)))
    return _diff_keys(_identity(old), _identity(new))


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def _preallocate(path: Path, nbytes: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if nbytes:
            try:
                os.posix_fallocate(fd, 0, nbytes)
            except (AttributeError, OSError):
                os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


class StoreWriter:
    """Writes the slots of one label store directory (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, commit_every: int = 16, durable: bool = True):
        self.path = Path(path)
        self.manifest = manifest
        self.specs: dict[str, Component] = component_specs(manifest)
        self.num_slots = int(manifest["num_kept"])
        self.commit_every = max(1, int(commit_every))
        self.durable = durable
        self._pending: list[int] = []
        self._fds: dict[str, int] = {}
        for name, spec in self.specs.items():
            if name == "batch_ids":
                continue
            f = self.path / spec.file
            if not f.exists():
                raise ValueError(f"label store {self.path}: {spec.file} is missing")
            if f.stat().st_size != spec.nbytes:
                raise ValueError(f"label store {self.path}: {spec.file} has {f.stat().st_size} bytes, expected "
                                 f"{spec.nbytes}")
            self._fds[name] = os.open(f, os.O_RDWR)

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict[str, Any], batch_ids: np.ndarray,
               **kwargs: Any) -> StoreWriter:
        """Start a fresh store in ``path`` (any previous store files there are overwritten)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = copy.deepcopy(manifest)
        manifest["format"] = FORMAT
        manifest["schema_version"] = SCHEMA_VERSION
        specs = component_specs(manifest)
        manifest["components"] = components_json(specs)
        manifest["complete"] = False
        manifest["files"] = {}
        ids = np.asarray(batch_ids)
        spec = specs["batch_ids"]
        if ids.shape != spec.shape:
            raise ValueError(f"batch_ids must have shape {spec.shape}, got {ids.shape}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= int(manifest["total_batches"])
                         or bool((np.diff(ids.astype(np.int64)) <= 0).any())):
            raise ValueError("batch_ids must be strictly increasing ids in [0, total_batches)")
        # A stale manifest must not describe the files while they are rewritten.
        (path / MANIFEST).unlink(missing_ok=True)
        for name, s in specs.items():
            if name == "batch_ids":
                data = np.ascontiguousarray(ids.astype(s.dtype))
                with open(path / s.file, "wb") as f:
                    f.write(data.tobytes())
                    f.flush()
                    os.fsync(f.fileno())
            else:
                _preallocate(path / s.file, s.nbytes)
        atomic_write_json(path / MANIFEST, manifest)
        return cls(path, manifest, **kwargs)

    @classmethod
    def open(cls, path: str | os.PathLike, **kwargs: Any) -> StoreWriter:
        """Open an existing, unfinished store for writing (resume, or another rank)."""
        path = Path(path)
        m = read_json(path / MANIFEST, "label store manifest")
        if m.get("format") != FORMAT or m.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path / MANIFEST}: not a label store of schema version {SCHEMA_VERSION} "
                             f"(format {m.get('format')!r}, schema_version {m.get('schema_version')!r})")
        if m.get("complete"):
            raise ValueError(f"label store {path} is already complete; it cannot be written again")
        return cls(path, m, **kwargs)

    @staticmethod
    def stored_batch_ids(path: str | os.PathLike, manifest: dict[str, Any]) -> np.ndarray | None:
        """The kept batch ids of the store in ``path`` when it holds the run ``manifest`` describes (complete or
        not), else None: a resumed run whose kept ids cost a pass to choose reads them back."""
        path = Path(path)
        if not (path / MANIFEST).exists():
            return None
        old = read_json(path / MANIFEST, "label store manifest")
        if _run_diff(old, manifest):
            return None
        spec = component_specs(old)["batch_ids"]
        return np.fromfile(path / spec.file, dtype=spec.dtype).astype(np.int64)

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, manifest: dict[str, Any], batch_ids: np.ndarray,
                         **kwargs: Any) -> StoreWriter | None:
        """Resume the store in ``path`` if its manifest describes the same run, else create it.

        Returns None when the same run is already complete. Refuses (ValueError
        naming the differing keys) a directory holding a different run.
        """
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.exists():
            return cls.create(path, manifest, batch_ids, **kwargs)
        old = read_json(mpath, "label store manifest")
        diff = _run_diff(old, manifest)
        if diff:
            raise ValueError(f"{path} already holds a different label store (differs in: {', '.join(diff[:10])}); "
                             "use another output directory or delete it")
        if old.get("complete"):
            return None
        writer = cls(path, old, **kwargs)
        stored = np.fromfile(path / writer.specs["batch_ids"].file, dtype=writer.specs["batch_ids"].dtype)
        if not np.array_equal(stored.astype(np.int64), np.asarray(batch_ids, dtype=np.int64)):
            writer.close()
            raise ValueError(f"{path}: batch_ids.bin does not hold this run's kept batch ids")
        return writer

    # ------------------------------------------------------------------ writing

    def done_mask(self) -> np.ndarray:
        """bool [K]: slots whose done mark is on disk (plus this writer's uncommitted ones)."""
        done = np.fromfile(self.path / self.specs["done"].file, dtype=np.uint8).astype(bool)
        done[self._pending] = True
        return done

    def pending_slots(self, slot_range: Iterable[int] | None = None) -> list[int]:
        """Slots not yet done, restricted to ``slot_range`` (the slots this writer owns)."""
        done = self.done_mask()
        slots = range(self.num_slots) if slot_range is None else slot_range
        return [int(s) for s in slots if not done[int(s)]]

    def write_slot(self, slot: int, rows: dict[str, np.ndarray]) -> None:
        """Write every component row of ``slot`` in place; the done mark follows at the next commit."""
        if not (0 <= slot < self.num_slots):
            raise IndexError(f"slot {slot} outside [0, {self.num_slots})")
        expected = set(self.specs) - set(META_COMPONENTS)
        if set(rows) != expected:
            raise ValueError(f"slot rows must hold exactly {sorted(expected)}, got {sorted(rows)}")
        for name, arr in rows.items():
            spec = self.specs[name]
            arr = np.asarray(arr)
            if not arr.flags.c_contiguous:
                arr = arr.copy(order="C")
            if arr.shape != spec.row_shape or arr.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{name}: row has shape {arr.shape} dtype {arr.dtype}, expected "
                                 f"{spec.row_shape} {np.dtype(spec.dtype)}")
            _pwrite_all(self._fds[name], memoryview(arr.reshape(-1)).cast("B"), slot * spec.row_bytes)
        self._pending.append(int(slot))
        if len(self._pending) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Make written slots durable, then mark them done."""
        if not self._pending:
            return
        if self.durable:
            for name, fd in self._fds.items():
                if name != "done":
                    os.fdatasync(fd)
        fd = self._fds["done"]
        for slot in sorted(self._pending):
            _pwrite_all(fd, memoryview(b"\x01"), slot)
        if self.durable:
            os.fdatasync(fd)
        self._pending.clear()

    def finalize(self) -> dict[str, Any]:
        """Checksum every file and mark the store complete (call once, after every slot is done)."""
        self.commit()
        done = self.done_mask()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise ValueError(f"label store {self.path}: {missing.size} slots are not done yet "
                             f"(first: {missing[:5].tolist()}); cannot finalize")
        files = {}
        for spec in self.specs.values():
            f = self.path / spec.file
            files[spec.file] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        self.manifest["files"] = files
        self.manifest["complete"] = True
        atomic_write_json(self.path / MANIFEST, self.manifest)
        return self.manifest

    def close(self) -> None:
        """Commit what was written and close the files (safe to call twice; used on errors too)."""
        if self._fds:
            try:
                self.commit()
            finally:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
