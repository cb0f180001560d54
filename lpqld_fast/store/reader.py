"""Reading a label store: verified open, per-batch records straight from memory maps.

``LabelStore.open`` refuses (ValueError naming the file and the problem) a
store that is not a label store of this schema version, is incomplete, has a
missing, truncated, resized or (unless ``verify="size"``) modified file, or
whose teacher / image-set hash differs from the expected one.

``store[slot]`` / ``store.batch(batch_id)`` copy one slot's rows out of the
memory maps; nothing else is loaded. The per-record path is kept short
because the student reads one record per training step: every file is one
read-only ``mmap`` viewed as a plain numpy array (no ``np.memmap`` subclass
overhead per index), each row is converted to its final dtype in one numpy
call and handed to torch without a further copy. It returns exactly what
:func:`~lpqld_fast.store.layout.decode_slot` + :func:`decode_labels` return
(tests/test_store.py checks that on every mode and value dtype); bf16 stores
and ``dequantize=True`` take that general path. The pages a read touches are dropped from
this process's mappings (``madvise(MADV_DONTNEED)``) once ``release_bytes``
have been read, so resident memory stays flat however many batches are read
(the data stays in the OS page cache).
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpqld_fast.augment import AugParams, CutMixParams, CutoutParams
from lpqld_fast.io_utils import read_json, sha256_file
from lpqld_fast.store.layout import FORMAT, MANIFEST, META_COMPONENTS, SCHEMA_VERSION, Component, component_specs, \
    components_json, decode_slot
from lpqld_fast.store.quantize import EncodedLabels, SoftLabels, check_mode, decode_labels

VERIFY_MODES = ("sha256", "size")


@dataclass
class BatchRecord:
    """One stored batch: where it came from, how to re-create its pixels, and its soft labels."""

    slot: int
    batch_id: int
    epoch: int
    aug: AugParams
    labels: SoftLabels
    _encoded: EncodedLabels | None = field(default=None, repr=False)
    # storage dtypes (values, indices, fill) from which ``encoded`` is derived when it was not kept
    _dtypes: tuple[torch.dtype, torch.dtype | None, torch.dtype | None] | None = field(default=None, repr=False)

    @property
    def image_indices(self) -> torch.Tensor:
        return self.aug.image_indices

    @property
    def encoded(self) -> EncodedLabels:
        """The labels as stored (storage dtypes).

        The fast read path does not copy them twice: they are derived from the
        decoded labels on first access, which is exact (fp16 -> fp32 -> fp16 and
        int -> int64 -> int round trips are lossless; int8 values, scale and offset
        are the decoded tensors themselves).
        """
        if self._encoded is None:
            assert self._dtypes is not None
            vd, idd, fd = self._dtypes
            lab = self.labels
            self._encoded = EncodedLabels(
                values=lab.values.to(vd), indices=None if lab.indices is None else lab.indices.to(idd),
                fill=None if lab.fill is None else lab.fill.to(fd), scale=lab.scale, offset=lab.offset)
        return self._encoded


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
        self._mmaps: dict[str, mmap.mmap] = {}
        self._arrays: dict[str, np.ndarray] = {}
        for name, spec in self.specs.items():
            if name == "done":
                continue
            self._arrays[name] = self._map(name, spec)
        self._row_bytes = sum(s.row_bytes for n, s in self.specs.items() if n not in META_COMPONENTS)
        self._kept = torch.from_numpy(np.array(self._arrays["batch_ids"], dtype=np.int64))
        self._kept_list: list[int] = self._kept.tolist()
        # Layout constants, read once: the manifest dict is not consulted per record.
        m = manifest
        _, h, w = (int(v) for v in m["image_shape"])
        # normalised box coordinates by table lookup: (v / H or v / W) in float64 rounded once to float32,
        # bit-identical to augment.normalized_boxes (stored pixel values lie in [0, max(H, W)]).
        vals = np.arange(max(h, w) + 1, dtype=np.float64)
        self._box_lut = np.stack([vals / h, vals / w, vals / h, vals / w]).astype(np.float32)
        self._box_col = np.arange(4)[None, :]
        # bit-unpacking by table lookup: byte -> its 8 flags, little bit order (as np.packbits wrote them)
        self._bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little").view(np.bool_)
        self._b = int(m["batch_size"])
        self._nb = int(m["batches_per_epoch"])
        self._out = (int(m["out_size"][0]), int(m["out_size"][1]))
        self._mode = check_mode(str(m["label"]["mode"]))
        # bf16 has no numpy dtype and dequantize builds new values: both use the general decoder.
        self._fast = m["label"]["value_dtype"] != "bf16" and not dequantize
        self._rows = [n for n in self._arrays if n != "batch_ids"]
        torch_of = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                    np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8, np.dtype(np.int16): torch.int16,
                    np.dtype(np.int32): torch.int32}
        lv = self._arrays["label_values"]
        li = self._arrays.get("label_indices")
        lf = self._arrays.get("label_fill")
        self._dtypes = (torch_of.get(lv.dtype), None if li is None else torch_of.get(li.dtype),
                        None if lf is None else torch_of.get(lf.dtype))
        # fp16 values: torch converts to fp32 vectorised, numpy with scalar code, so keep a torch view of the
        # read-only map (only ever read through .to(float32), which copies).
        self._values_t: torch.Tensor | None = None
        if lv.dtype == np.float16 and lv.size:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "non-writable array": never written
                self._values_t = torch.from_numpy(lv)

    def _map(self, name: str, spec: Component) -> np.ndarray:
        """A read-only numpy view of the component file (one mmap per file, closed in :meth:`close`)."""
        if spec.nbytes == 0:  # mmap refuses empty files
            return np.zeros(spec.shape, dtype=np.dtype(spec.dtype))
        with open(self.path / spec.file, "rb") as f:
            mm = mmap.mmap(f.fileno(), spec.nbytes, access=mmap.ACCESS_READ)
        self._mmaps[name] = mm
        return np.frombuffer(mm, dtype=np.dtype(spec.dtype)).reshape(spec.shape)

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
        return len(self._kept_list)

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
        k = len(self._kept_list)
        s = int(slot)
        if s < 0:
            s += k
        if not (0 <= s < k):
            raise IndexError(f"slot {slot} outside [0, {k})")
        enc = None
        if self._fast:
            aug, labels = self._decode_fast(s)
        else:
            rows = {name: self._arrays[name][s] for name in self._rows}
            aug, enc = decode_slot(self.manifest, rows)  # copies out of the maps
            labels = decode_labels(enc, self._mode, dequantize=self.dequantize)
        self._touched += self._row_bytes
        if self._touched >= self.release_bytes:
            self.release_pages()
        bid = self._kept_list[s]
        return BatchRecord(slot=s, batch_id=bid, epoch=bid // self._nb, aug=aug, labels=labels, _encoded=enc,
                           _dtypes=self._dtypes)

    def _decode_fast(self, s: int) -> tuple[AugParams, SoftLabels]:
        """decode_slot + decode_labels for one slot, one conversion (= one copy) per tensor."""
        a = self._arrays
        t = torch.from_numpy
        i64 = np.int64
        boxes = self._box_lut[self._box_col, a["crop_boxes"][s]]
        flips = self._bits[a["flips"][s]].reshape(-1)[:self._b]
        aug = AugParams(image_indices=t(a["image_indices"][s].astype(i64)), boxes=t(boxes), flips=t(flips),
                        out_size=self._out)
        if "cutmix_lam" in a:
            aug.cutmix = CutMixParams(float(a["cutmix_lam"][s]), t(a["cutmix_box"][s].astype(i64)),
                                      t(a["cutmix_perm"][s].astype(i64)))
        if "cutout_box" in a:
            aug.cutout = CutoutParams(t(a["cutout_box"][s].astype(i64)), t(a["cutout_fill"][s].copy()))
        raw = a["label_values"][s]
        if raw.dtype == np.int8 or raw.dtype == np.float32:  # int8 stays int8 for the fused loss
            vals = t(raw.copy())
        elif raw.size >= 512 and self._values_t is not None:  # numpy's fp16 -> fp32 is scalar: 7x slower
            vals = self._values_t[s].to(torch.float32)
        else:  # small rows: numpy's lower per-call cost wins
            vals = t(raw.astype(np.float32))
        labels = SoftLabels(self._mode, vals)
        if "label_indices" in a:
            labels.indices = t(a["label_indices"][s].astype(i64))
        if "label_fill" in a:
            labels.fill = t(a["label_fill"][s].astype(np.float32))
        if "label_scale" in a:
            labels.scale = t(a["label_scale"][s].copy())
            labels.offset = t(a["label_offset"][s].copy())
        elif raw.dtype == np.int8:
            raise ValueError("int8 label values need scale and offset")
        if self._mode != "dense" and labels.indices is None:
            raise ValueError(f"mode {self._mode!r} needs label indices")
        return aug, labels

    def batch(self, batch_id: int) -> BatchRecord:
        return self[self.slot_of(batch_id)]

    def __iter__(self) -> Iterator[BatchRecord]:
        for s in range(len(self)):
            yield self[s]

    def release_pages(self) -> None:
        """Drop this process's mapped pages (they stay in the page cache): bounds resident memory."""
        self._touched = 0
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for mm in self._mmaps.values():
            try:
                mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self._arrays = {}  # drop the numpy/torch views first: an mmap with exported buffers cannot close
        self._values_t = None
        for mm in self._mmaps.values():
            try:
                mm.close()
            except (BufferError, ValueError):
                pass
        self._mmaps = {}

    def __enter__(self) -> LabelStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        lab = self.manifest["label"]
        return (f"LabelStore({str(self.path)!r}, K={len(self)} of {self.manifest['total_batches']} batches, "
                f"B={self.batch_size}, C={self.num_classes}, mode={lab['mode']}, k={lab['stored_k']}, "
                f"{lab['value_dtype']})")
