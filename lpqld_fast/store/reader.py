"""Reading a label store: verified open, per-batch records straight from memory maps.

``LabelStore.open`` refuses (ValueError naming the file and the problem) a
store that is not a label store of this schema version, is incomplete, has a
missing, truncated, resized or (unless ``verify="size"``) modified file, or
whose teacher / image-set hash differs from the expected one.

``store[slot]`` / ``store.batch(batch_id)`` copy one slot's rows out of the
memory maps; nothing else is loaded. The pages a read touches are dropped from
this process's mappings (``madvise(MADV_DONTNEED)``) once ``release_bytes``
have been read, so resident memory stays flat however many batches are read
(the data stays in the OS page cache).
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpqld_fast.augment import AugParams
from lpqld_fast.io_utils import read_json, sha256_file
from lpqld_fast.store.layout import FORMAT, MANIFEST, META_COMPONENTS, SCHEMA_VERSION, Component, component_specs, \
    components_json, decode_slot
from lpqld_fast.store.quantize import EncodedLabels, SoftLabels, decode_labels

VERIFY_MODES = ("sha256", "size")


@dataclass
class BatchRecord:
    """One stored batch: where it came from, how to re-create its pixels, and its soft labels."""

    slot: int
    batch_id: int
    epoch: int
    aug: AugParams
    labels: SoftLabels
    encoded: EncodedLabels

    @property
    def image_indices(self) -> torch.Tensor:
        return self.aug.image_indices


class LabelStore:
    """A complete, verified label store (open with :meth:`LabelStore.open`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], *, dequantize: bool = False,
                 release_bytes: int = 64 << 20):
        self.path = Path(path)
        self.manifest = manifest
        self.specs: dict[str, Component] = component_specs(manifest)
        self.dequantize = dequantize
        self.release_bytes = int(release_bytes)
        self._touched = 0
        self._maps: dict[str, np.memmap] = {}
        for name, spec in self.specs.items():
            if name == "done":
                continue
            self._maps[name] = np.memmap(self.path / spec.file, dtype=np.dtype(spec.dtype), mode="r",
                                         shape=spec.shape)
        self._row_bytes = sum(s.row_bytes for n, s in self.specs.items() if n not in META_COMPONENTS)
        self._kept = torch.from_numpy(np.array(self._maps["batch_ids"], dtype=np.int64))

    # ------------------------------------------------------------------ open + verify

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        expect_teacher_sha256: str | None = None,
        expect_images_sha256: str | None = None,
        verify: str = "sha256",
        dequantize: bool = False,
        release_bytes: int = 64 << 20,
    ) -> LabelStore:
        """Open and verify the store in ``path``.

        ``verify="sha256"`` (default) hashes every file; ``"size"`` checks sizes
        only (fast for multi-GB stores). ``dequantize`` makes records hold
        float32 label values even for int8 stores.
        """
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"label store directory not found: {path}")
        mpath = path / MANIFEST
        m = read_json(mpath, "label store manifest")
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            fmt = m.get("format") if isinstance(m, dict) else None
            raise ValueError(f"{mpath}: not a label store manifest (format {fmt!r})")
        if m.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{mpath}: schema_version {m.get('schema_version')!r} is not supported "
                             f"(this version reads {SCHEMA_VERSION})")
        if m.get("complete") is not True:
            raise ValueError(f"{mpath}: the label store is incomplete (\"complete\": false); "
                             "resume the relabel run to finish it")
        try:
            specs = component_specs(m)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{mpath}: layout fields are missing or invalid ({type(e).__name__}: {e})") from None
        if m.get("components") != components_json(specs):
            raise ValueError(f"{mpath}: \"components\" does not match the store's layout fields")
        files = m.get("files")
        if not isinstance(files, dict) or set(files) != {s.file for s in specs.values()}:
            raise ValueError(f"{mpath}: \"files\" must list exactly {sorted(s.file for s in specs.values())}")
        for name, spec in specs.items():
            f = path / spec.file
            rec = files[spec.file]
            if not f.is_file():
                raise ValueError(f"label store file {f} is missing")
            size = f.stat().st_size
            if size != spec.nbytes or rec.get("bytes") != spec.nbytes:
                raise ValueError(f"label store file {f} has {size} bytes, expected {spec.nbytes} "
                                 f"({'truncated' if size < spec.nbytes else 'wrong size'})")
            if verify == "sha256" and sha256_file(f) != rec.get("sha256"):
                raise ValueError(f"label store file {f} is corrupt: sha256 differs from the manifest")
        done = np.fromfile(path / specs["done"].file, dtype=np.uint8)
        if not (done == 1).all():
            raise ValueError(f"label store file {path / specs['done'].file}: "
                             f"{int((done != 1).sum())} slots are not marked done")
        for what, expected in (("teacher", expect_teacher_sha256), ("images", expect_images_sha256)):
            have = m.get(f"{what}_sha256")
            if expected is not None and have != expected:
                raise ValueError(f"{mpath}: {what}_sha256 is {have!r}, expected {expected!r}; the store was "
                                 f"made with a different {'teacher' if what == 'teacher' else 'image set'}")
        return cls(path, m, dequantize=dequantize, release_bytes=release_bytes)

    # ------------------------------------------------------------------ properties

    @property
    def kept_batch_ids(self) -> torch.Tensor:
        """int64 [K], sorted: the batch id stored in each slot."""
        return self._kept

    @property
    def epochs(self) -> int:
        return int(self.manifest["epochs"])

    @property
    def batches_per_epoch(self) -> int:
        return int(self.manifest["batches_per_epoch"])

    @property
    def batch_size(self) -> int:
        return int(self.manifest["batch_size"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def mode(self) -> str:
        return str(self.manifest["label"]["mode"])

    @property
    def out_size(self) -> tuple[int, int]:
        oh, ow = self.manifest["out_size"]
        return int(oh), int(ow)

    @property
    def mean(self) -> list[float]:
        return list(self.manifest["mean"])

    @property
    def std(self) -> list[float]:
        return list(self.manifest["std"])

    def __len__(self) -> int:
        return int(self.manifest["num_kept"])

    # ------------------------------------------------------------------ records

    def slot_of(self, batch_id: int) -> int:
        """The slot holding ``batch_id``; KeyError if it was pruned or is out of range."""
        b = int(batch_id)
        s = int(torch.searchsorted(self._kept, torch.tensor(b)))
        if s >= len(self) or int(self._kept[s]) != b:
            total = self.manifest["total_batches"]
            raise KeyError(f"batch id {b} is not in the store (pruned, or outside [0, {total}))")
        return s

    def __getitem__(self, slot: int) -> BatchRecord:
        k = len(self)
        s = int(slot)
        if s < 0:
            s += k
        if not (0 <= s < k):
            raise IndexError(f"slot {slot} outside [0, {k})")
        rows = {name: mm[s] for name, mm in self._maps.items() if name != "batch_ids"}
        aug, enc = decode_slot(self.manifest, rows)  # copies out of the maps
        self._touched += self._row_bytes
        if self._touched >= self.release_bytes:
            self.release_pages()
        bid = int(self._kept[s])
        return BatchRecord(slot=s, batch_id=bid, epoch=bid // self.batches_per_epoch, aug=aug,
                           labels=decode_labels(enc, self.mode, dequantize=self.dequantize), encoded=enc)

    def batch(self, batch_id: int) -> BatchRecord:
        return self[self.slot_of(batch_id)]

    def __iter__(self) -> Iterator[BatchRecord]:
        for s in range(len(self)):
            yield self[s]

    def release_pages(self) -> None:
        """Drop this process's mapped pages (they stay in the page cache): bounds resident memory."""
        self._touched = 0
        for mm in self._maps.values():
            raw = getattr(mm, "_mmap", None)
            if raw is not None and hasattr(raw, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                try:
                    raw.madvise(mmap.MADV_DONTNEED)
                except (OSError, ValueError):
                    pass

    def close(self) -> None:
        for mm in self._maps.values():
            raw = getattr(mm, "_mmap", None)
            if raw is not None:
                try:
                    raw.close()
                except (BufferError, ValueError):
                    pass
        self._maps = {}

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        lab = self.manifest["label"]
        return (f"LabelStore({str(self.path)!r}, K={len(self)} of {self.manifest['total_batches']} batches, "
                f"B={self.batch_size}, C={self.num_classes}, mode={lab['mode']}, k={lab['stored_k']}, "
                f"{lab['value_dtype']})")
