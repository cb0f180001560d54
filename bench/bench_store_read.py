"""Reading stored label batches: our label store against the reference's one-file-per-batch layout.

kernel "store_read" (mode full). One timed call = one pass over all K stored
batches of a store, in a fixed random order (the LPLD label pool draws
batches at random), each batch turned into what the training step consumes:
the augmentation parameters (image indices int64, crop boxes float32, flips)
and the decoded soft labels (float32 values or int8 + scale/offset, int64
indices).

  reference-torch-load  the reference layout (FKD / SRe2L / LPLD relabel): one
                        ``torch.save`` file per batch (``epoch_{e}/batch_{p}.tar``)
                        holding the batch's tensors, read with
                        ``torch.load(weights_only=True)`` and decoded with the
                        same ``decode_labels`` our reader uses. The files hold
                        exactly the content of our store's records (same label
                        dtypes), so only the layout differs. ``weights_only=True``
                        is torch.load's default since torch 2.6 (what the
                        reference scripts get here).
  reference-torch-load-pickle  the same with ``weights_only=False`` (plain
                        unpickling, the default before torch 2.6; unsafe for
                        files from others, and faster). The acceptance ratio is
                        taken against the faster of the two references.
  store                 ``LabelStore[slot]`` (memory-mapped packed arrays, one
                        row range per component per batch).
  store-open-sha256     ``LabelStore.open(verify="sha256")``: the checksum of
                        every store file that ``train`` computes once before its
                        first step (bytes: the files' size).

Stores (full profile; --quick: 60 epochs -> 120 batches, and 50 ImageNet-like
batches): Fashion-MNIST IPC10 scale (N=100 images 28x28x1, B=50, E=300 ->
600 batches, C=10): dense fp32, dense fp16, top-k (MR-3) fp16, top-k (MR-3)
int8; and an ImageNet-1K-like batch shape (N=10000 images 3x224x224, B=100,
C=1000, MR-100 fp16 and int8, CutMix parameters stored, 100 batches). Both
layouts are written once per store with the same augmentation parameters
(``sample_aug_params``) and random teacher logits (read speed does not
depend on the values), under a temporary directory that is removed afterwards.

Page cache, both sides alike:
  cache=warm  every file is in the OS page cache (a warm-up pass first). Before
              each pass the store drops its mapped pages (``release_pages``),
              so it faults them back in from the page cache like a fresh
              process, as the reference re-reads its files.
  cache=cold  before each pass both layouts' files are evicted from the page
              cache (``posix_fadvise(DONTNEED)`` after an fsync; the store's
              maps released first), so every byte comes from the disk. Dentries
              and inodes stay cached (dropping them needs root). On a shared
              disk these rows are noisy.

bytes: the record bytes of all K batches (the store's row bytes; the
reference files are larger, zip container + pickle). summary() reports
batches/s = K / p50 and the ratio store / reference.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common import BenchContext, Case, parse_sizes

KERNEL = "store_read"
BASELINE = "reference-torch-load"
IMPLS = ("reference-torch-load", "reference-torch-load-pickle", "store")
REFS = IMPLS[:2]


@dataclass(frozen=True)
class StoreSpec:
    """One store to write and read: layout name, image set, batches, label encoding."""

    layout: str
    n: int
    image_shape: tuple[int, int, int]
    batch: int
    epochs: int
    classes: int
    label: str
    k: int
    dtype: str
    cutmix: bool = False

    @property
    def batches(self) -> int:
        return self.epochs * (self.n // self.batch)

    def sizes(self, cache: str) -> dict[str, object]:
        kk = self.classes if self.label == "dense" else self.k
        return {"layout": self.layout, "N": self.n, "B": self.batch, "C": self.classes, "batches": self.batches,
                "label": self.label, "k": kk, "dtype": self.dtype, "cache": cache}


def store_specs(profile: str) -> list[tuple[StoreSpec, tuple[str, ...]]]:
    """(store, caches) per profile. Cold passes run where they are cheap enough for the profile."""
    fm = dict(layout="fmnist-ipc10", n=100, image_shape=(1, 28, 28), batch=50, classes=10)
    inet = dict(layout="in1k-like", n=10000, image_shape=(3, 224, 224), batch=100, classes=1000, label="mr",
                k=100, cutmix=True)
    if profile == "tiny":
        return [(StoreSpec(**fm, epochs=3, label="mr", k=3, dtype="fp16"), ("warm", "cold")),
                (StoreSpec(**{**inet, "n": 400}, epochs=1, dtype="int8"), ("warm",))]
    full = profile == "full"
    # quick: 60 stored epochs (120 batches) and 50 ImageNet-like batches keep the module near 15 s.
    e_fm = 300 if full else 60
    if not full:
        inet["n"] = 5000
    cold_fm = ("warm", "cold") if full else ("warm",)
    return [
        (StoreSpec(**fm, epochs=e_fm, label="dense", k=10, dtype="fp32"), cold_fm),
        (StoreSpec(**fm, epochs=e_fm, label="dense", k=10, dtype="fp16"), ("warm",)),
        (StoreSpec(**fm, epochs=e_fm, label="mr", k=3, dtype="fp16"), ("warm", "cold")),
        (StoreSpec(**fm, epochs=e_fm, label="mr", k=3, dtype="int8"), cold_fm),
        (StoreSpec(**inet, epochs=1, dtype="fp16"), ("warm", "cold") if full else ("warm",)),
        (StoreSpec(**inet, epochs=1, dtype="int8"), ("warm",)),
    ]


# ----------------------------------------------------------------------------- writing both layouts


def _manifest(spec: StoreSpec) -> dict:
    """The layout fields LabelStore needs (what run_relabel writes, minus the run config)."""
    c_img, h, w = spec.image_shape
    kk = spec.classes if spec.label == "dense" else spec.k
    return {
        "num_images": spec.n, "image_shape": [c_img, h, w], "out_size": [h, w], "num_classes": spec.classes,
        "batch_size": spec.batch, "epochs": spec.epochs, "batches_per_epoch": spec.n // spec.batch,
        "total_batches": spec.batches, "num_kept": spec.batches, "prune_ratio": 0.0,
        "mean": [0.5] * c_img, "std": [0.25] * c_img, "teacher_sha256": "bench", "images_sha256": "bench",
        "label": {"mode": spec.label, "k": spec.k, "stored_k": kk, "value_dtype": spec.dtype},
        "augment": {"cutmix": spec.cutmix, "cutout": False, "flip": True},
    }


def ref_path(root: Path, batch_id: int, batches_per_epoch: int) -> Path:
    e, p = divmod(batch_id, batches_per_epoch)
    return root / f"epoch_{e}" / f"batch_{p}.tar"


def write_layouts(spec: StoreSpec, root: Path, *, durable: bool, seed: int = 0) -> tuple[Path, Path]:
    """Write the store and the reference files of ``spec`` under ``root``; returns (store dir, reference dir)."""
    from lpqld_fast.augment import sample_aug_params
    from lpqld_fast.store import StoreWriter, encode_labels
    from lpqld_fast.store.layout import component_specs, encode_slot

    m = _manifest(spec)
    c_img, h, w = spec.image_shape
    nb = spec.n // spec.batch
    sdir, rdir = root / "store", root / "reference"
    g = torch.Generator().manual_seed(seed)
    writer = StoreWriter.create(sdir, m, np.arange(spec.batches), durable=durable, commit_every=256)
    specs = component_specs(writer.manifest)
    try:
        for b in range(spec.batches):
            if b % nb == 0:
                perm = torch.randperm(spec.n, generator=g)
            idx = perm[(b % nb) * spec.batch:(b % nb + 1) * spec.batch].clone()
            aug = sample_aug_params(idx, h, w, c_img, (h, w), g, cutmix=spec.cutmix)
            logits = torch.randn(spec.batch, spec.classes, generator=g) * 4
            enc = encode_labels(logits, mode=spec.label, k=spec.k, value_dtype=spec.dtype)
            writer.write_slot(b, encode_slot(writer.manifest, specs, aug, enc))
            cm = aug.cutmix
            payload = {  # what the reference keeps per batch, here with our record's content
                "image_indices": aug.image_indices, "coords": aug.boxes, "flips": aug.flips,
                "mix_index": None if cm is None else cm.perm, "mix_lam": None if cm is None else cm.lam,
                "mix_bbox": None if cm is None else cm.box, "soft_label": enc.values, "soft_label_idx": enc.indices,
                "scale": enc.scale, "offset": enc.offset,
            }
            f = ref_path(rdir, b, nb)
            f.parent.mkdir(parents=True, exist_ok=True)
            with open(f, "wb") as fh:
                torch.save(payload, fh)
                if durable:  # clean pages, so that posix_fadvise(DONTNEED) can evict them
                    fh.flush()
                    os.fsync(fh.fileno())
        writer.finalize()
    finally:
        writer.close()
    return sdir, rdir


def evict(paths: list[Path]) -> None:
    """Drop the files' clean pages from the OS page cache (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- readers


def reference_read(path: Path, mode: str, weights_only: bool = True):
    """One reference batch: torch.load + the decoding the training step needs."""
    from lpqld_fast.store.quantize import EncodedLabels, decode_labels

    d = torch.load(path, weights_only=weights_only)
    enc = EncodedLabels(values=d["soft_label"], indices=d["soft_label_idx"], scale=d["scale"], offset=d["offset"])
    return d["image_indices"], d["coords"], d["flips"], decode_labels(enc, mode)


def build_cases(spec: StoreSpec, caches: tuple[str, ...], root: Path) -> tuple[list[list[Case]], list[str], object]:
    """Write both layouts, check they read back the same batches.

    Returns one case group per cache state, the problems found and the open store (close it after timing).
    """
    from lpqld_fast.store import LabelStore

    cold = "cold" in caches
    sdir, rdir = write_layouts(spec, root, durable=cold)
    store = LabelStore.open(sdir, verify="sha256")
    nb = store.batches_per_epoch
    order = torch.randperm(len(store), generator=torch.Generator().manual_seed(1)).tolist()
    ref_files = [ref_path(rdir, store[s].batch_id, nb) for s in order]
    store_files = sorted(sdir.iterdir())
    problems = []
    for s, f in list(zip(order, ref_files))[:: max(1, len(order) // 16)]:
        rec = store[s]
        ii, boxes, flips, lab = reference_read(f, spec.label)
        same = torch.equal(ii, rec.aug.image_indices) and torch.equal(boxes, rec.aug.boxes) \
            and torch.equal(flips, rec.aug.flips) and torch.equal(lab.values, rec.labels.values) \
            and (lab.indices is None or torch.equal(lab.indices, rec.labels.indices))
        if not same:
            problems.append(f"{spec.layout} {spec.label}/{spec.dtype}: slot {s} differs between the layouts")
            break
    nbytes = store._row_bytes * len(store)

    def read_store() -> None:
        for s in order:
            store[s]

    def read_reference(weights_only: bool = True) -> None:
        for f in ref_files:
            reference_read(f, spec.label, weights_only)

    file_bytes = sum(f.stat().st_size for f in store_files)

    def open_verified() -> None:  # what train does once before its first step
        LabelStore.open(sdir, verify="sha256").close()

    def warm_store() -> None:
        store.release_pages()  # fault pages back in from the page cache, like a fresh process

    def cold_store() -> None:
        store.release_pages()
        evict(store_files)

    def cold_ref() -> None:
        evict(ref_files)

    groups = []
    for cache in caches:
        sizes = spec.sizes(cache)
        groups.append([
            Case(KERNEL, "reference-torch-load", sizes, read_reference, nbytes, setup=cold_ref if cache == "cold"
                 else None),
            Case(KERNEL, "reference-torch-load-pickle", sizes, lambda: read_reference(False), nbytes,
                 setup=cold_ref if cache == "cold" else None),
            Case(KERNEL, "store", sizes, read_store, nbytes, setup=cold_store if cache == "cold" else warm_store),
            Case(KERNEL, "store-open-sha256", sizes, open_verified, file_bytes,
                 setup=(lambda: evict(store_files)) if cache == "cold" else None),
        ])
    return groups, problems, store


def run(ctx: BenchContext) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="lpqld_bench_store_read_"))
    start = len(ctx.rows)
    try:
        for i, (spec, caches) in enumerate(store_specs(ctx.profile)):
            root = tmp / str(i)
            groups, problems, store = build_cases(spec, caches, root)
            for msg in problems:
                ctx.fail(msg)
            if not problems:
                ctx.log(f"store_read: {spec.layout} {spec.label}-{spec.k} {spec.dtype}, {spec.batches} batches, "
                        f"caches {caches}")
                for cases in groups:
                    ctx.time_group(cases)
            del groups
            store.close()
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in summary(ctx.rows[start:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    """batches/s of each layout and the store / reference ratios, per store and cache state."""
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        by.setdefault(r["sizes"], {})[r["impl"]] = float(r["p50_ms"])
    out, warm_ratios = [], []
    for sizes, t in by.items():
        refs = [i for i in REFS if i in t]
        if "store" not in t or not refs:
            continue
        k = int(parse_sizes(sizes)["batches"])
        best_ref = min(t[i] for i in refs)  # the faster reference: the conservative ratio
        if parse_sizes(sizes).get("cache") == "warm":
            warm_ratios.append(best_ref / t["store"])
        parts = [f"{i} {k / t[i] * 1e3:,.0f} batches/s ({t[i] / t['store']:.1f}x)" for i in refs]
        out.append(f"`{sizes}`: store {k / t['store'] * 1e3:,.0f} batches/s "
                   f"({t['store'] / k * 1e3:.0f} us/batch); " + ", ".join(parts))
        if "store-open-sha256" in t:  # train's one-time check, against one read of every stored batch
            out.append(f"`{sizes}`: sha256 verification on open {t['store-open-sha256']:.1f} ms = "
                       f"{t['store-open-sha256'] / t['store']:.2f}x one pass over all {k} batches")
    if warm_ratios:
        ok = min(warm_ratios) >= 10
        out.append(f"store_read acceptance (store >= 10x the faster reference, warm cache, every store): "
                   f"{'met' if ok else 'NOT met'} (min {min(warm_ratios):.1f}x, max {max(warm_ratios):.1f}x)")
    return out or ["store_read: no rows"]
