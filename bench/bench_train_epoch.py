"""One student training epoch: label store + batched replay + fused loss against the reference-style loop.

Setup (untimed, in a temporary folder): N = 100 synthetic Fashion-MNIST-sized
images (uint8 1x28x28, smooth random blobs), a label store written by
lpqld_fast.relabel.run_relabel (the StoreWriter) for 300 stored epochs at
B = 50 (2 batches per epoch, 600 stored batches) from a fixed random linear
teacher (10 classes), in two label formats: MR top-k k = 3 fp16 ("mr-k3-fp16")
and all 10 logits fp16 ("dense-fp16"). From the same store records the
reference-style files are written: one ``torch.save`` dict per stored batch
(coords fp16, flips, indices, targets, soft_label, label_indices: the format of
bench/reference_pipeline/relabel.py) and the images as PNG files.

Implementations (the same ConvNet-BN student, depth 3, width 128 (16 in the
tiny profile), same initial weights, AdamW, T(e) of
the step schedule, calibrated student temperature at the end of every epoch):

  reference-loop  the reference training loop (bench/reference_pipeline/train.py):
                  LPQLD pool (random.sample), per batch torch.load of its file,
                  per-sample PIL decode + resized_crop + hflip + ToTensor +
                  Normalize replay (FKDImageList.replay), dense decode (softmax
                  over the stored logits scattered into zeros), student step with
                  nn.KLDivLoss(batchmean)(log_softmax(z / t_s), p); calibration: 100
                  KLDivLoss evaluations on the last batch
  ours            lpqld_fast's train loop body (lpqld_fast/train.py): label_pool
                  ids, LabelStore.batch (memory-mapped record), replay_batch (one
                  batched crop/resize/flip), fused soft_label_kl, student step;
                  calibration: calibrate_student_temperature (vectorised grid)
  model-steps     the floor: the same number of student steps (forward, backward,
                  AdamW) on one fixed batch with a cross-entropy loss, no data work

One training epoch is 2 steps (~tens of ms), too short to time alone on a
shared machine, so each timed call runs ``epochs`` consecutive epochs (5 in
the full profile, 1 in quick and tiny): the sizes column says how many. The
quick profile writes 30 stored epochs instead of 300 (setup time; the replayed
batches are drawn from the pool either way).
Rows with ``part=epoch`` time whole epochs; rows with ``part=data`` time the
same loops with the student replaced by a [B, C] leaf tensor (label load,
replay, loss forward + backward, calibration: everything that differs between
the two loops), which is where our path differs from the reference.
bytes = the stored record bytes (labels + augmentation parameters) the calls
replay, the same for every impl.
"""
from __future__ import annotations

import copy
import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.common import BenchContext, Case

KERNEL = "train_epoch"
BASELINE = "reference-loop"
LIMIT = "model-steps"
IMPLS = ("reference-loop", "ours", "ours-bf16-nhwc", "model-steps")
LABELS = ("mr-k3-fp16", "dense-fp16")
SEED = 0
STUDENT_LR, WEIGHT_DECAY = 1e-3, 0.01


def profile_sizes(profile: str, batch: int | None = None) -> dict[str, int]:
    """Images, batch size, stored epochs, epochs per timed call and student width (ConvNet default 128) of a profile."""
    if profile == "tiny":
        out = {"N": 8, "B": 4, "stored_epochs": 2, "epochs": 1, "width": 16}
    elif profile == "quick":
        out = {"N": 100, "B": 50, "stored_epochs": 30, "epochs": 1, "width": 128}
    else:
        out = {"N": 100, "B": 50, "stored_epochs": 300, "epochs": 5, "width": 128}
    if batch:
        out["B"] = min(batch, out["N"])
    return out


def label_config(labels: str) -> dict[str, Any]:
    return {"mr-k3-fp16": {"label": "mr", "k": 3, "value_dtype": "fp16"},
            "dense-fp16": {"label": "dense", "value_dtype": "fp16"}}[labels]


# ----------------------------------------------------------------------------- setup


def synthetic_images(n: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, 1, 28, 28] smooth random blobs on a dark background (Fashion-MNIST-like statistics), labels i % 10."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 7, 7, generator=g)
    img = torch.nn.functional.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)
    img = (img - 0.35).clamp_min(0) / 0.65  # about half of the pixels black, as in Fashion-MNIST
    return (img * 255).round().to(torch.uint8), torch.arange(n) % 10


def linear_teacher(seed: int = SEED) -> torch.nn.Module:
    """A fixed random linear teacher (logit spread of a trained one, a few units): its cost is not timed."""
    torch.manual_seed(seed)
    t = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
    with torch.no_grad():
        t[1].weight.mul_(8.0)
    return t.eval()


class Setup:
    """The label store, the reference-style files and PNGs of one label format, in ``root``."""

    def __init__(self, root: Path, sizes: dict[str, int], labels: str) -> None:
        from PIL import Image

        from lpqld_fast.relabel import run_relabel

        self.sizes, self.labels = sizes, labels
        self.images, self.image_labels = synthetic_images(sizes["N"])
        self.mean, self.std = [0.2860], [0.3530]  # Fashion-MNIST
        cfg = {"epochs": sizes["stored_epochs"], "batch_size": sizes["B"], **label_config(labels)}
        self.store = run_relabel(self.images, self.image_labels, linear_teacher(), self.mean, self.std, cfg,
                                 root / "store", SEED, teacher_sha256="0" * 64, images_sha256="0" * 64,
                                 progress=False)
        self.num_classes = self.store.num_classes
        self.batches_per_epoch = self.store.batches_per_epoch
        # reference-style: one torch.save file per stored batch, PNG images in one class folder
        self.ref_dir = root / "ref_labels"
        self.ref_dir.mkdir()
        self.batch_to_indices: dict[int, list[int]] = {}
        self.record_bytes = 0
        for rec in self.store:
            lab = rec.labels
            record = {"coords": rec.aug.boxes.half(), "flips": rec.aug.flips.clone(),
                      "indices": rec.aug.image_indices.clone(),
                      "targets": self.image_labels[rec.aug.image_indices].clone(),
                      "soft_label": lab.values.to(torch.float16)}
            if lab.indices is not None:
                record["label_indices"] = lab.indices.short()
            torch.save(record, self.ref_dir / f"batch_{rec.batch_id}.tar")
            self.batch_to_indices[rec.batch_id] = rec.aug.image_indices.tolist()
            self.record_bytes += sum(t.numel() * t.element_size() for t in
                                     (rec.encoded.values, rec.aug.boxes, rec.aug.flips, rec.aug.image_indices))
            if rec.encoded.indices is not None:
                self.record_bytes += rec.encoded.indices.numel() * rec.encoded.indices.element_size()
        self.record_bytes //= max(len(self.store), 1)  # per stored batch
        (self.ref_dir / "sampler_indices_batch.json").write_text(json.dumps(self.batch_to_indices))
        self.png_root = root / "png"
        (self.png_root / "00000").mkdir(parents=True)  # one folder: FKDImageList's order = image index order
        for i in range(sizes["N"]):
            Image.fromarray(self.images[i, 0].numpy(), mode="L").save(self.png_root / "00000" / f"{i:05d}.png")


# ----------------------------------------------------------------------------- the loops


class Student:
    """ConvNet-BN student + AdamW (weight decay on ndim > 1), or a [B, C] leaf standing in for it (data part)."""

    def __init__(self, model: torch.nn.Module | None, batch: int, num_classes: int, fast: bool = False) -> None:
        from lpqld_fast.engine import build_optimizer

        # fast: the fashion-mnist preset's student (train.bf16 + train.channels_last), as lpqld train runs it
        self.fast = fast and model is not None
        if self.fast:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        if model is not None:
            model.train()
            self.opt = build_optimizer(model, "adamw", STUDENT_LR, WEIGHT_DECAY, 0.9)
        else:
            self.leaf = torch.zeros(batch, num_classes, requires_grad=True)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.model is None:
            return self.leaf * 1.0  # a graph node, so backward runs as it would through a model
        if self.fast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.model(x.contiguous(memory_format=torch.channels_last))
        return self.model(x)

    def step(self, loss: torch.Tensor) -> None:
        if self.model is not None:
            self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.model is not None:
            self.opt.step()
        else:
            self.leaf.grad = None


class OurLoop:
    """lpqld_fast/train.py's epoch body: pool ids, store record, batched replay, fused loss, CA."""

    def __init__(self, s: Setup, student: Student) -> None:
        self.s, self.student = s, student
        self.epoch, self.t_s = 0, 1.0

    def run_epochs(self, n: int) -> None:
        from lpqld_fast.augment import replay_batch
        from lpqld_fast.label_pool import epoch_batch_ids, temperature_at
        from lpqld_fast.ops import calibrate_student_temperature, soft_label_kl

        s = self.s
        for _ in range(n):
            self.epoch += 1
            T = temperature_at(self.epoch, s.sizes["stored_epochs"])
            ids = epoch_batch_ids(s.store.kept_batch_ids, "lpqld", self.epoch, s.batches_per_epoch, SEED)
            logits = labels = None
            for bid in ids.tolist():
                rec = s.store.batch(bid)
                x = replay_batch(s.images, rec, s.store.mean, s.store.std)
                logits = self.student.logits(x)
                labels = rec.labels
                loss = soft_label_kl(logits.float(), **labels.kl_kwargs(), T=T, t_s=self.t_s)
                self.student.step(loss)
            self.t_s = calibrate_student_temperature(logits.detach().float(), **labels.kl_kwargs(), T=T)


class ReferenceLoop:
    """bench/reference_pipeline/train.py's epoch body: torch.load per batch, per-sample replay, dense KL, CA."""

    def __init__(self, s: Setup, student: Student) -> None:
        from bench.reference_pipeline.relabel import FKDImageList

        self.s, self.student = s, student
        self.ds = FKDImageList(s.png_root, 28, s.mean, s.std)
        self.pool = sorted(s.batch_to_indices)
        self.rng = random.Random(SEED)
        self.kl = torch.nn.KLDivLoss(reduction="batchmean")
        self.mode = label_config(s.labels)["label"]
        self.epoch, self.t_s = 0, 1.0

    def run_epochs(self, n: int) -> None:
        import numpy as np
        import torch.nn.functional as F

        from bench.reference_pipeline.train import decode_soft_label, temperature_at

        s = self.s
        for _ in range(n):
            self.epoch += 1
            T = temperature_at(self.epoch, {})
            output = p = None
            for bid in self.rng.sample(self.pool, min(s.batches_per_epoch, len(self.pool))):
                idx = s.batch_to_indices[bid]
                record = torch.load(s.ref_dir / f"batch_{bid}.tar", weights_only=True)
                coords, flips = record["coords"], record["flips"]
                images = torch.stack([self.ds.replay(idx[i], coords[i], bool(flips[i])) for i in range(len(idx))])
                p = decode_soft_label(record, self.mode, T, s.num_classes)
                output = self.student.logits(images)
                loss = self.kl(F.log_softmax(output / self.t_s, dim=1), p)
                self.student.step(loss)
            with torch.no_grad():
                temps = np.linspace(0.01, 1, 100)
                losses = [self.kl(F.log_softmax(output / t, dim=1), p).item() for t in temps]
            self.t_s = float(temps[int(np.argmin(losses))])


def model_steps(student: Student, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        student.step(torch.nn.functional.cross_entropy(student.logits(x), y))


# ----------------------------------------------------------------------------- cases


def build_cases(s: Setup, part: str) -> list[Case]:
    """The impls of one label format; ``part`` = "epoch" (with the student) or "data" (a leaf instead)."""
    from lpqld_fast.models import get_model

    sz = s.sizes
    b, epochs = sz["B"], sz["epochs"]
    steps = epochs * s.batches_per_epoch
    sizes = {"N": sz["N"], "B": b, "C": s.num_classes, "labels": s.labels, "stored_epochs": sz["stored_epochs"],
             "epochs": epochs, "part": part, "width": sz["width"]}
    nbytes = steps * s.record_bytes

    def student(fast: bool = False) -> Student:
        if part == "data":
            return Student(None, b, s.num_classes)
        return Student(copy.deepcopy(base), b, s.num_classes, fast=fast)

    torch.manual_seed(SEED)
    base = get_model("convnet-bn", num_classes=s.num_classes, in_chans=1, image_size=28,
                     width=sz["width"]) if part == "epoch" else None
    ours, ref = OurLoop(s, student()), ReferenceLoop(s, student())
    cases = [Case(KERNEL, "reference-loop", sizes, lambda: ref.run_epochs(epochs), nbytes),
             Case(KERNEL, "ours", sizes, lambda: ours.run_epochs(epochs), nbytes)]
    if part == "epoch":
        ours_fast = OurLoop(s, student(fast=True))
        cases.append(Case(KERNEL, "ours-bf16-nhwc", sizes, lambda: ours_fast.run_epochs(epochs), nbytes))
        floor = student()
        g = torch.Generator().manual_seed(SEED)
        x = torch.randn(b, 1, 28, 28, generator=g)
        y = torch.randint(0, s.num_classes, (b,), generator=g)
        cases.append(Case(KERNEL, "model-steps", sizes, lambda: model_steps(floor, x, y, steps), nbytes))
    return cases


def run(ctx: BenchContext) -> None:
    sz = profile_sizes(ctx.profile, ctx.options.get("batch"))
    ctx.log(f"train_epoch: {sz}, labels {LABELS}; each call = {sz['epochs']} epoch(s)")
    start = len(ctx.rows)
    with tempfile.TemporaryDirectory(prefix="lpqld_bench_train_") as tmp:
        for labels in LABELS:
            s = Setup(Path(tmp) / labels, sz, labels)
            for part in ("epoch", "data"):
                ctx.time_group(build_cases(s, part))
            s.store.close()
    for line in summary(ctx.rows[start:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    """Per label format: our epoch and our data path against the reference loop, and the model-step floor."""
    by_size: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == KERNEL:
            by_size.setdefault(r["sizes"], {})[r["impl"]] = float(r["p50_ms"])
    out = []
    for sizes, t in by_size.items():
        if "ours" not in t or BASELINE not in t:
            continue
        kv = dict(part.split("=", 1) for part in sizes.split(";"))
        what = "epoch(s)" if kv.get("part") == "epoch" else "epoch(s), data path only (no student)"
        line = (f"{kv.get('labels')}, {kv.get('epochs')} {what}: ours {t['ours']:.1f} ms vs reference-loop "
                f"{t[BASELINE]:.1f} ms = {t[BASELINE] / t['ours']:.1f}x")
        if "ours-bf16-nhwc" in t:
            line += (f"; ours with the preset's bf16 + channels_last student {t['ours-bf16-nhwc']:.1f} ms = "
                     f"{t[BASELINE] / t['ours-bf16-nhwc']:.1f}x")
        if LIMIT in t:
            line += f"; student steps alone {t[LIMIT]:.1f} ms (ours / that {t['ours'] / t[LIMIT]:.2f}x)"
        out.append(line)
    return out or ["train_epoch: no rows"]

