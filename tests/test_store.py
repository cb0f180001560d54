"""Label store: layout, round trip of records, refusal of corrupt / truncated / incomplete / mismatched
stores (naming the file), writer API, flat memory when reading, storage accounting."""
import gc
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lpqld_fast.augment import sample_aug_params
from lpqld_fast.io_utils import atomic_write_json
from lpqld_fast.relabel import batch_image_indices, run_relabel, seeded_generator
from lpqld_fast.store import LabelStore, StoreWriter, full_label_bytes, storage_markdown, storage_report
from lpqld_fast.store.layout import component_specs, int_dtype_for

N, HW, NUM_CLASSES = 40, 28, 10
SHA = {"teacher_sha256": "t" * 64, "images_sha256": "i" * 64}
CFG = dict(epochs=3, batch_size=8, prune_ratio=0.25, label="mr", k=3, value_dtype="fp16", num_classes=NUM_CLASSES)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_store(out: Path, **cfg) -> LabelStore:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, NUM_CLASSES)).eval()
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (N, 1, HW, HW), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    return run_relabel(imgs, labels, teacher, [0.3], [0.25], {**CFG, **cfg}, out, 0, progress=False, **SHA)


@pytest.fixture
def store_dir(tmp_path) -> Path:
    make_store(tmp_path / "s", cutmix=True, value_dtype="int8", label="mrs")
    return tmp_path / "s"


def test_layout_dtypes():
    assert int_dtype_for(255) == "|u1" and int_dtype_for(256) == "<u2" and int_dtype_for(70000) == "<i4"
    m = {"num_kept": 5, "batch_size": 128, "num_images": 1_300_000, "image_shape": [3, 224, 224],
         "out_size": [224, 224], "num_classes": 1000, "total_batches": 10,
         "label": {"mode": "mrs", "value_dtype": "int8", "stored_k": 100}, "augment": {"cutmix": True}}
    s = component_specs(m)
    assert s["image_indices"].dtype == "<i4" and s["crop_boxes"].dtype == "|u1"
    assert s["flips"].shape == (5, 16) and s["cutmix_perm"].dtype == "|u1"
    assert s["label_values"].dtype == "|i1" and s["label_indices"].dtype == "<i2"
    assert {"label_fill", "label_scale", "label_offset"} <= set(s) and "cutout_box" not in s
    m["image_shape"] = [3, 256, 256]
    assert component_specs(m)["crop_boxes"].dtype == "<u2"  # h = 256 does not fit uint8


def test_records_round_trip(store_dir):
    store = LabelStore.open(store_dir, expect_teacher_sha256="t" * 64, expect_images_sha256="i" * 64)
    m = store.manifest
    assert m["complete"] is True and m["schema_version"] == 1 and m["num_kept"] == len(store) == 11
    for key in ("config", "teacher_sha256", "images_sha256", "num_classes", "batch_size", "epochs",
                "batches_per_epoch", "kept_batch_ids", "label", "files"):
        assert key in m
    for rec in store:
        bid = rec.batch_id
        assert store.batch(bid).slot == rec.slot
        idx = batch_image_indices(bid, N, 8, 0)
        want = sample_aug_params(idx, HW, HW, 1, (HW, HW), seeded_generator(0, "batch", bid), cutmix=True)
        assert torch.equal(rec.aug.image_indices, want.image_indices)
        assert torch.equal(rec.aug.boxes, want.boxes)  # lossless integer box encoding
        assert torch.equal(rec.aug.flips, want.flips)
        assert rec.aug.cutmix.lam == want.cutmix.lam
        assert torch.equal(rec.aug.cutmix.box, want.cutmix.box) and torch.equal(rec.aug.cutmix.perm, want.cutmix.perm)
        assert rec.labels.values.dtype == torch.int8 and rec.labels.fill.dtype == torch.float32
        assert rec.labels.indices.dtype == torch.int64 and rec.labels.values.shape == (8, 3)
    with pytest.raises(KeyError):
        store.batch(next(b for b in range(15) if b not in store.kept_batch_ids.tolist()))
    with pytest.raises(IndexError):
        store[len(store)]
    deq = LabelStore.open(store_dir, verify="size", dequantize=True)
    assert deq[0].labels.values.dtype == torch.float32 and deq[0].labels.scale is None


def _expect_refused(path, match, **kw):
    with pytest.raises(ValueError, match=match):
        LabelStore.open(path, **kw)


def test_corrupt_file_refused(store_dir):
    f = store_dir / "label_values.bin"
    data = bytearray(f.read_bytes())
    data[3] ^= 0xFF
    f.write_bytes(bytes(data))
    _expect_refused(store_dir, r"label_values\.bin is corrupt")
    LabelStore.open(store_dir, verify="size")  # size-only verification does not hash


def test_truncated_and_missing_files_refused(store_dir):
    f = store_dir / "image_indices.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    _expect_refused(store_dir, r"image_indices\.bin has .* bytes.*truncated", verify="size")
    f.write_bytes(data + b"\0")
    _expect_refused(store_dir, r"image_indices\.bin .*wrong size")
    f.unlink()
    _expect_refused(store_dir, r"image_indices\.bin is missing")


def test_tampered_manifest_refused(store_dir):
    mpath = store_dir / "manifest.json"
    m = json.loads(mpath.read_text())

    def write(**changes):
        atomic_write_json(mpath, {**m, **changes})

    write(schema_version=99)
    _expect_refused(store_dir, "schema_version 99 is not supported")
    write(format="something-else")
    _expect_refused(store_dir, "not a label store")
    write(complete=False)
    _expect_refused(store_dir, "incomplete")
    write(num_classes=1000)  # would change the index dtype: components no longer match the layout
    _expect_refused(store_dir, "components")
    files = dict(m["files"])
    files["flips.bin"] = {**files["flips.bin"], "sha256": "0" * 64}
    write(files=files)
    _expect_refused(store_dir, r"flips\.bin is corrupt")
    mpath.write_text("{not json")
    _expect_refused(store_dir, "not valid JSON")


def test_done_bitmap_checked(store_dir):
    (store_dir / "done.bin").write_bytes(b"\x01" * 10 + b"\x00")
    _expect_refused(store_dir, r"done\.bin: 1 slots are not marked done", verify="size")


def test_mismatched_hashes_refused(store_dir):
    _expect_refused(store_dir, "teacher_sha256 .* different teacher", expect_teacher_sha256="x" * 64)
    _expect_refused(store_dir, "images_sha256 .* different image set", expect_images_sha256="x" * 64)
    LabelStore.open(store_dir, expect_teacher_sha256="t" * 64, expect_images_sha256="i" * 64)


def test_incomplete_store_refused(tmp_path):
    imgs = torch.zeros(N, 1, HW, HW, dtype=torch.uint8)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(HW * HW, NUM_CLASSES)).eval()
    out = run_relabel(imgs, torch.zeros(N, dtype=torch.long), teacher, [0.3], [0.25], CFG, tmp_path / "s", 0,
                      progress=False, slot_range=range(3), finalize=False, **SHA)
    assert out is None
    _expect_refused(tmp_path / "s", "incomplete")
    w = StoreWriter.open(tmp_path / "s")
    with pytest.raises(ValueError, match="slots are not done"):
        w.finalize()
    assert w.pending_slots() == list(range(3, 11)) and w.pending_slots(range(5)) == [3, 4]
    with pytest.raises(ValueError, match="exactly"):
        w.write_slot(3, {})
    with pytest.raises(IndexError):
        w.write_slot(11, {})
    w.close()


# --------------------------------------------------------------------------- memory


def _synthetic_manifest(k_slots: int, b: int, c: int) -> dict:
    return {"num_kept": k_slots, "batch_size": b, "num_images": 1000, "image_shape": [1, 28, 28],
            "out_size": [28, 28], "num_classes": c, "total_batches": k_slots, "epochs": 1,
            "batches_per_epoch": k_slots, "label": {"mode": "dense", "value_dtype": "fp32", "stored_k": c},
            "augment": {}, "teacher_sha256": "t", "images_sha256": "i"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_reading_all_batches_keeps_memory_flat(tmp_path):
    k_slots, b, c = 160, 128, 1000  # 160 batches x 512 KB of labels = 80 MiB on disk
    m = _synthetic_manifest(k_slots, b, c)
    specs = component_specs(m)
    w = StoreWriter.create(tmp_path / "big", m, np.arange(k_slots), durable=False, commit_every=64)
    rng = np.random.default_rng(0)
    values = rng.standard_normal((b, c), dtype=np.float32)
    for s in range(k_slots):
        rows = {n: np.zeros(sp.row_shape, sp.dtype) for n, sp in specs.items() if n not in ("batch_ids", "done")}
        rows["label_values"] = values + s
        w.write_slot(s, rows)
    w.finalize()
    w.close()
    store = LabelStore.open(tmp_path / "big", verify="size", release_bytes=4 << 20)
    store_bytes = specs["label_values"].nbytes
    gc.collect()
    base = _rss()
    peak = base
    for s, rec in enumerate(store):
        if s in (0, k_slots // 2, k_slots - 1):
            assert float(rec.labels.values[0, 0]) == values[0, 0] + s
        del rec
        if s % 16 == 0:
            peak = max(peak, _rss())
    gc.collect()
    peak = max(peak, _rss())
    assert peak - base < 24 << 20, f"RSS grew by {(peak - base) >> 20} MiB reading a {store_bytes >> 20} MiB store"


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("cfg", [{}, {"cutmix": True, "value_dtype": "int8", "label": "mrs"},
                                 {"label": "dense", "cutout": True}])
def test_accounting_sums_and_ratio(tmp_path, cfg):
    store = make_store(tmp_path / "s", **cfg)
    rep = storage_report(tmp_path / "s")
    on_disk = sum(p.stat().st_size for p in (tmp_path / "s").iterdir() if p.is_file())
    assert rep.total_bytes == sum(r.bytes for r in rep.rows) == on_disk
    listed = [f for r in rep.rows for f in r.files]
    assert sorted(listed) == sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_file())
    for r in rep.rows:
        assert r.bytes == sum((tmp_path / "s" / f).stat().st_size for f in r.files)
    e, b = CFG["epochs"], CFG["batch_size"]
    assert rep.baseline_label_bytes == full_label_bytes(e, N, b, NUM_CLASSES) == e * (N // b) * b * NUM_CLASSES * 2
    assert rep.ratio == pytest.approx(rep.total_bytes / rep.baseline_bytes)
    by = {r.component: r.bytes for r in rep.rows}
    kk = NUM_CLASSES if cfg.get("label") == "dense" else CFG["k"]
    vsize = 1 if cfg.get("value_dtype") == "int8" else 2
    assert by["label values"] == len(store) * b * kk * vsize
    assert rep.label_ratio == pytest.approx(rep.label_bytes / rep.baseline_label_bytes)
    assert ("mix parameters" in by) == bool(cfg.get("cutmix") or cfg.get("cutout"))
    md = storage_markdown(rep)
    assert "| label values |" in md and "Ratio to baseline" in md and str(rep.total_bytes) in md


# --------------------------------------------------------------------------- fast reader path


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("cfg", [{"label": "dense", "value_dtype": "fp32"}, {"label": "mr", "value_dtype": "fp16"},
                                 {"label": "mrs", "value_dtype": "int8", "cutmix": True},
                                 {"label": "mrs", "value_dtype": "fp32", "cutout": True},
                                 {"label": "ms", "value_dtype": "bf16"}, {"label": "topk_norenorm"}])
def test_fast_record_path_equals_general_decoder(tmp_path, cfg):
    """store[slot] (numpy fast path) returns exactly what decode_slot + decode_labels return."""
    from lpqld_fast.store.layout import decode_slot
    from lpqld_fast.store.quantize import decode_labels

    store = make_store(tmp_path / "s", **cfg)
    m = store.manifest
    raw = {n: np.fromfile(tmp_path / "s" / sp.file, dtype=sp.dtype).reshape(sp.shape)
           for n, sp in component_specs(m).items() if n not in ("batch_ids", "done")}
    for s in range(len(store)):
        rec = store[s]
        aug, enc = decode_slot(m, {n: a[s] for n, a in raw.items()})
        lab = decode_labels(enc, m["label"]["mode"])
        assert _same(rec.aug.image_indices, aug.image_indices) and _same(rec.aug.boxes, aug.boxes)
        assert _same(rec.aug.flips, aug.flips) and rec.aug.out_size == aug.out_size
        assert (rec.aug.cutmix is None) == (aug.cutmix is None) and (rec.aug.cutout is None) == (aug.cutout is None)
        if aug.cutmix is not None:
            assert rec.aug.cutmix.lam == aug.cutmix.lam and _same(rec.aug.cutmix.box, aug.cutmix.box)
            assert _same(rec.aug.cutmix.perm, aug.cutmix.perm)
        if aug.cutout is not None:
            assert _same(rec.aug.cutout.boxes, aug.cutout.boxes) and _same(rec.aug.cutout.fill, aug.cutout.fill)
        for f in ("values", "indices", "fill", "scale", "offset"):
            assert _same(getattr(rec.encoded, f), getattr(enc, f)), f
            assert _same(getattr(rec.labels, f), getattr(lab, f)), f
        assert rec.labels.mode == lab.mode and rec.epoch == rec.batch_id // store.batches_per_epoch
        rec.labels.values.add_(1)  # records own their memory (the maps are read-only)
    store.close()


def test_fast_path_large_fp16_rows(tmp_path):
    """Rows of >= 512 fp16 values take torch's conversion: same float32 values as the general decoder."""
    from lpqld_fast.store.layout import decode_slot
    from lpqld_fast.store.quantize import decode_labels

    m = _synthetic_manifest(3, 8, 100)
    m["label"] = {"mode": "dense", "value_dtype": "fp16", "stored_k": 100}
    specs = component_specs(m)
    w = StoreWriter.create(tmp_path / "s", m, np.arange(3), durable=False)
    rng = np.random.default_rng(0)
    for s in range(3):
        rows = {n: np.zeros(sp.row_shape, sp.dtype) for n, sp in specs.items() if n not in ("batch_ids", "done")}
        rows["label_values"] = (rng.standard_normal((8, 100)) * 5).astype(np.float16)
        w.write_slot(s, rows)
    w.finalize()
    w.close()
    store = LabelStore.open(tmp_path / "s", verify="size")
    raw = {n: np.fromfile(tmp_path / "s" / sp.file, dtype=sp.dtype).reshape(sp.shape)
           for n, sp in specs.items() if n not in ("batch_ids", "done")}
    for s in range(3):
        aug, enc = decode_slot(store.manifest, {n: a[s] for n, a in raw.items()})
        want = decode_labels(enc, "dense").values
        got = store[s].labels.values
        assert got.dtype == torch.float32 and torch.equal(got, want)
    store.close()
