"""Relabel wall time: pruning at generation (LPQLD) against generating every batch and pruning afterwards.

kernel "relabel" (mode full). One timed call = one whole relabel run with a
ConvNet-BN teacher (lpqld_fast.models, depth 3 width 128, random weights, eval
mode, float32) on N=100 images 28x28x1 (Fashion-MNIST IPC10 scale), E=300
stored epochs of B=50 -> 600 batch ids, prune ratio r=0.9 -> K=60 kept,
labels MR-3 fp16 (the fashion-mnist preset's relabel stage):

  reference-all-then-prune  the reference strategy (LPLD): every one of the
                            E*floor(N/B) batches is generated (same augmentation
                            draw, replay, teacher forward and label encoding as
                            ours) and written as one ``torch.save`` file; then
                            the files of the pruned batches are deleted, which
                            leaves the same K batches.
  store-kept                ``lpqld_fast.relabel.run_relabel`` with
                            prune_ratio=r: only the K kept batches are
                            generated, into the label store (fsync'ed commits,
                            sha256 of every file at the end).

The teacher forward dominates both, so the expected ratio is about
1/(1-r) = 10x. summary() reports it with the milliseconds per generated
batch of each side (which also shows the store's write cost against
torch.save's). After timing, the kept batches of the reference files are
checked against the store's records (same labels).

Repeats: the reference call takes minutes on a loaded 2-core machine, so this
module times its own rounds (no warm-up call; the reference stops after one
call once past ``max_seconds``). Sizes per profile: full E=300 (600 ids,
60 kept), quick E=10 (20 ids, 2 kept), tiny E=2 with a width-8 ConvNet.
The store and the files go to a temporary directory, removed afterwards.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from bench.common import BenchContext, Case, parse_sizes, time_interleaved

KERNEL = "relabel"
BASELINE = "reference-all-then-prune"
IMPLS = ("reference-all-then-prune", "store-kept")
MEAN, STD = [0.2860], [0.3530]  # Fashion-MNIST
SEED = 0


def problem(profile: str) -> dict[str, int | float | str]:
    epochs = {"full": 300, "quick": 10, "tiny": 2}[profile]
    return {"N": 100, "HW": 28, "B": 50, "E": epochs, "r": 0.9 if profile != "tiny" else 0.5,
            "width": 8 if profile == "tiny" else 128, "label": "mr", "k": 3, "dtype": "fp16"}


def timing(profile: str) -> dict[str, float]:
    """(repeats, max_seconds) of the module's own rounds: one reference call in full/quick."""
    return {"full": {"repeats": 3, "max_seconds": 60.0}, "quick": {"repeats": 3, "max_seconds": 3.0},
            "tiny": {"repeats": 2, "max_seconds": 0.2}}[profile]


def reference_all_then_prune(images: torch.Tensor, teacher: torch.nn.Module, p: dict, out: Path) -> list[int]:
    """Generate every batch into one torch.save file each, then delete the pruned ones; returns the kept ids."""
    from lpqld_fast.augment import replay_batch, sample_aug_params
    from lpqld_fast.relabel import EpochPermutations, batch_image_indices, kept_count, seeded_generator, \
        select_kept_batch_ids
    from lpqld_fast.store.quantize import encode_labels

    n, c_img, h, w = images.shape
    nb = n // p["B"]
    total = p["E"] * nb
    perms = EpochPermutations(n, SEED)
    out.mkdir(parents=True, exist_ok=True)
    for b in range(total):
        idx = batch_image_indices(b, n, p["B"], SEED, perms)
        aug = sample_aug_params(idx, h, w, c_img, (h, w), seeded_generator(SEED, "batch", b))
        with torch.no_grad():
            logits = teacher(replay_batch(images, aug, MEAN, STD)).to(torch.float32)
        enc = encode_labels(logits, mode=p["label"], k=p["k"], value_dtype=p["dtype"])
        e, pos = divmod(b, nb)
        torch.save({"image_indices": aug.image_indices, "coords": aug.boxes, "flips": aug.flips,
                    "soft_label": enc.values, "soft_label_idx": enc.indices}, out / f"epoch_{e}_batch_{pos}.tar")
    kept = select_kept_batch_ids(total, kept_count(total, p["r"]), SEED).tolist()
    keep = set(kept)
    for b in range(total):  # LPLD's pruning: delete the files of the dropped batches
        if b not in keep:
            e, pos = divmod(b, nb)
            os.remove(out / f"epoch_{e}_batch_{pos}.tar")
    return kept


def store_kept(images: torch.Tensor, labels: torch.Tensor, teacher: torch.nn.Module, p: dict, out: Path) -> None:
    from lpqld_fast.relabel import run_relabel

    cfg = {"epochs": p["E"], "batch_size": p["B"], "prune_ratio": p["r"], "label": p["label"], "k": p["k"],
           "value_dtype": p["dtype"], "num_classes": 10}
    store = run_relabel(images, labels, teacher, MEAN, STD, cfg, out, SEED, teacher_sha256="bench",
                        images_sha256="bench", progress=False)
    store.close()


def check_same(ref_dir: Path, store_dir: Path, nb: int) -> str | None:
    """None if every kept reference file holds the store's labels for that batch, else the first difference."""
    from lpqld_fast.store import LabelStore

    store = LabelStore.open(store_dir, verify="size")
    try:
        files = sorted(ref_dir.iterdir())
        if len(files) != len(store):
            return f"reference kept {len(files)} files, the store {len(store)} batches"
        for rec in store:
            e, pos = divmod(rec.batch_id, nb)
            d = torch.load(ref_dir / f"epoch_{e}_batch_{pos}.tar", weights_only=True)
            if not (torch.equal(d["soft_label"], rec.encoded.values) and torch.equal(d["soft_label_idx"],
                                                                                   rec.encoded.indices)):
                return f"batch {rec.batch_id}: labels differ between the reference files and the store"
    finally:
        store.close()
    return None


def run(ctx: BenchContext) -> None:
    from lpqld_fast.models import get_model

    p = problem(ctx.profile)
    torch.manual_seed(SEED)
    teacher = get_model("convnet-bn", 10, 1, p["HW"], width=p["width"]).eval()
    g = torch.Generator().manual_seed(SEED)
    images = torch.randint(0, 256, (p["N"], 1, p["HW"], p["HW"]), generator=g, dtype=torch.uint8)
    labels = torch.arange(p["N"]) % 10
    with torch.no_grad():  # the first forward sets up the conv primitives: keep it out of both timings
        teacher(torch.zeros(p["B"], 1, p["HW"], p["HW"]))
    nb = p["N"] // p["B"]
    total = p["E"] * nb
    from lpqld_fast.relabel import kept_count

    kept = kept_count(total, p["r"])
    sizes = {"N": p["N"], "H": p["HW"], "W": p["HW"], "B": p["B"], "E": p["E"], "batches": total, "r": p["r"],
             "kept": kept, "teacher": f"convnet-bn-w{p['width']}", "label": f"{p['label']}{p['k']}-{p['dtype']}"}
    # bytes: the uint8 crops the teacher sees are re-created from N images; the op is compute bound, so
    # count the labels written (K batches x B x k x (2 + 1) bytes) as its minimal traffic.
    nbytes = kept * p["B"] * p["k"] * 3
    tmp = Path(tempfile.mkdtemp(prefix="lpqld_bench_relabel_"))
    ref_dir, store_dir = tmp / "reference", tmp / "store"
    try:
        cases = [
            Case(KERNEL, "reference-all-then-prune", sizes, lambda: reference_all_then_prune(images, teacher, p,
                                                                                            ref_dir), nbytes,
                 setup=lambda: shutil.rmtree(ref_dir, ignore_errors=True)),
            # a finished store is resumed as a no-op: start from an empty directory every call
            Case(KERNEL, "store-kept", sizes, lambda: store_kept(images, labels, teacher, p, store_dir), nbytes,
                 setup=lambda: shutil.rmtree(store_dir, ignore_errors=True)),
        ]
        t = timing(ctx.profile)
        ctx.log(f"relabel: {sizes} (each call is a whole relabel run)")
        all_times = time_interleaved(cases, warmup=0, repeats=int(t["repeats"]), min_repeats=1,
                                     max_seconds=t["max_seconds"])
        for c, ts in zip(cases, all_times):
            ctx.record(c, ts)
        msg = check_same(ref_dir, store_dir, nb)
        if msg:
            ctx.fail(f"relabel: {msg}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for line in summary(ctx.rows[-2:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    """Speed-up of generating only the kept batches, and ms per generated batch of each side."""
    by: dict[str, dict[str, float]] = {}
    for r in rows:
        by.setdefault(r["sizes"], {})[r["impl"]] = float(r["p50_ms"])
    out = []
    for sizes, t in by.items():
        if not set(IMPLS) <= set(t):
            continue
        sz = parse_sizes(sizes)
        total, kept = int(sz["batches"]), int(sz["kept"])
        ref, ours = t["reference-all-then-prune"], t["store-kept"]
        out.append(f"`{sizes}`: store-kept {ours / 1e3:.2f} s ({ours / kept:.0f} ms per generated batch, {kept} "
                   f"batches) vs reference-all-then-prune {ref / 1e3:.2f} s ({ref / total:.0f} ms per batch, "
                   f"{total} batches): {ref / ours:.1f}x (ideal 1/(1-r) = {total / kept:.1f}x)")
    return out or ["relabel: no rows"]
