"""Train: the student replays stored augmentations and learns from compressed labels.

Per training epoch e (from 1): the label pool picks floor(N/B) stored batch
ids (label_pool.epoch_batch_ids); each is replayed exactly (augment.replay_batch,
the function relabel used) and the student learns from its stored labels
through the fused ``soft_label_kl`` op at teacher temperature T(e) (dynamic
knowledge reuse) and student temperature t_s, which calibrated alignment
re-fits at the end of every epoch. Evaluated on the real test set every
``eval_every`` epochs and at the end; best and last are both reported.
Resumes from ``out/last.pt`` after a kill.

:func:`run_train` in order: :func:`open_label_store`, :func:`evaluation_splits`, :func:`build_student`,
:func:`load_resume_state`, then per epoch :func:`train_one_epoch`, :func:`evaluate_epoch` and
:func:`save_checkpoint`; student.pt and the summary at the end.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from tqdm import tqdm

from lpqld_fast import config as schema
from lpqld_fast import distributed, runtime
from lpqld_fast.augment import check_replay_params, mix_batch, replay_batch
from lpqld_fast.data import SplitFactory, get_dataset, stratified_subset
from lpqld_fast.ddp import ddp_model
from lpqld_fast.ema import WeightEMA
from lpqld_fast.engine import build_optimizer, warmup_cosine
from lpqld_fast.evaluation import evaluate_dataset
from lpqld_fast.image_set import load_recovered
from lpqld_fast.io_utils import atomic_write_json, load_tensors, locks_folder, read_json, save_tensors
from lpqld_fast.label_pool import epoch_batch_ids, temperature_at
from lpqld_fast.models import get_model
from lpqld_fast.ops import calibrate_student_temperature, soft_label_kl
from lpqld_fast.ops.soft_label_kl import check_label_data
from lpqld_fast.records import run_record
from lpqld_fast.seeding import seed_everything, stream
from lpqld_fast.store import LabelStore, SoftLabels

# Every train setting with its default (lpqld_fast.config.TrainConfig holds the types and meanings).
TRAIN_DEFAULTS: dict[str, Any] = schema.defaults("train")


def train_config(config: dict[str, Any], device: str = "cpu", out: str | Path | None = None) -> dict[str, Any]:
    """The train section validated against the schema, defaults filled in and its auto settings chosen
    (as recorded in ``out``/config.json when that run exists, else by the hardware; printed)."""
    rec_path = Path(out) / "config.json" if out is not None else None
    recorded = read_json(rec_path, "train config")["config"].get("train") if rec_path and rec_path.exists() else None
    cfg, notes = schema.resolve_auto("train", schema.check_section("train", config.get("train")), device, recorded)
    schema.announce("train", notes)
    return cfg


def _store_identity(store: LabelStore) -> str:
    """sha256 of the store manifest's file checksums: which labels a student was trained on."""
    return hashlib.sha256(json.dumps(store.manifest["files"], sort_keys=True).encode()).hexdigest()


def _check_resume(out: Path, config: dict[str, Any], cfg: dict[str, Any], seed: int, store: LabelStore,
                  images_sha256: str) -> dict[str, Any]:
    """Before anything is written: a run in ``out`` made with other settings, seed, images or labels is
    refused naming what differs; train.epochs may be raised (training goes on) but not lowered below the
    recorded value. Returns the record of this run (the resolved config), for out/config.json."""
    rec_path = out / "config.json"
    record = {"config": {**config, "train": cfg}, "seed": seed, "images_sha256": images_sha256,
              "label_store": _store_identity(store)}
    started = (out / "last.pt").exists() or (out / "student.pt").exists()
    if started and rec_path.exists():
        old = read_json(rec_path, "train config")
        old_cfg = old.get("config", {}).get("train", {})
        diffs = schema.result_diff("train", old_cfg, cfg, ignore=("epochs",))
        if cfg["epochs"] < old_cfg.get("epochs", cfg["epochs"]):
            diffs.append(f"train.epochs {old_cfg['epochs']!r} -> {cfg['epochs']!r} (only raising it trains on)")
        elif cfg["epochs"] > old_cfg.get("epochs", cfg["epochs"]) and not diffs and distributed.is_main():
            # The schedules are functions of the total length: the remaining epochs follow the longer run's
            # curves, so the learning rate (annealed to ~0 at the old end) rises again.
            print(f"train: train.epochs raised {old_cfg['epochs']} -> {cfg['epochs']}: the learning-rate and "
                  f"temperature schedules are re-sized to {cfg['epochs']} epochs (the learning rate rises again)")
        for key, what in (("seed", "--seed"), ("images_sha256", "the distilled images"),
                          ("label_store", "the label store")):
            if old.get(key) != record[key]:
                diffs.append(f"{what} changed" if key != "seed" else f"--seed {old.get(key)!r} -> {seed!r}")
        if diffs:
            schema.refuse_rerun(out, diffs)
    return record


ModelFactory = Callable[..., nn.Module]


@dataclass
class StudentState:
    """The student and everything ``last.pt`` restores with it."""

    model: nn.Module  # the bare student; its weights go to last.pt
    net: nn.Module  # what trains: the student, wrapped in DDP under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    ema: WeightEMA | None
    gen: torch.Generator
    t_s: float = 1.0
    # train.test_eval=selected: the best validation accuracy so far and a CPU copy of the weights it was reached
    # with (the latest on a tie, as select_evaluation chooses)
    best_val: float = -math.inf
    best_weights: dict[str, torch.Tensor] | None = None
    # the student's forward as train.compile runs it (student_logits, or its torch.compile), made once per run
    forward: Callable[[nn.Module, torch.Tensor, bool], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.forward is None:  # student_logits is defined below this class
            self.forward = student_logits

    def keep_if_best(self, val_acc: float) -> None:
        if val_acc >= self.best_val:
            self.best_val = val_acc
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.evaluated.state_dict().items()}

    @property
    def evaluated(self) -> nn.Module:
        """What evaluations and student.pt hold: the weight average when train.ema is on."""
        return self.model if self.ema is None else self.ema.module


@dataclass
class ReplaySource:
    """What a training step replays: the distilled images and the stored batches of the label store."""

    store: LabelStore
    images: torch.Tensor  # uint8 [N, C, H, W], on the training device
    image_labels: torch.Tensor  # int64 [N], for train.hard_labels
    num_classes: int
    checked: set[int] = field(default_factory=set)  # stored batches whose replay parameters and labels passed

    def __post_init__(self) -> None:
        if not all(math.isfinite(s) and s > 0 for s in self.store.std):
            raise ValueError(f"the label store's std must be finite and positive, got {self.store.std}")

    def check_batch(self, bid: int, rec: Any, hard_labels: bool) -> None:
        """replay_batch's and soft_label_kl's data checks on the host copy of stored batch ``bid``, once per
        batch (each is replayed every epoch): the steps then run with validate=False and read no value back
        from the device."""
        if bid in self.checked:
            return
        check_replay_params(rec.aug, self.images.shape[0])
        if not hard_labels:
            check_label_data(**rec.labels.kl_kwargs(), num_classes=self.num_classes)
        self.checked.add(bid)


def open_label_store(relabel_dir: str | Path, recover_manifest: dict[str, Any], cfg: dict[str, Any]) -> LabelStore:
    """The label store, every file's sha256 checked against its manifest before the first step (a flipped
    byte would otherwise train silently; cost: the store-open-sha256 rows of bench/bench_store_read.py) and
    its images and teacher against the recovered set's."""
    store = LabelStore.open(relabel_dir, expect_images_sha256=recover_manifest["images_sha256"],
                            expect_teacher_sha256=recover_manifest["teacher_sha256"], verify="sha256")
    if cfg.get("batch_size") not in (None, store.batch_size):
        raise ValueError(f"train.batch_size {cfg['batch_size']} differs from the label store's batch size "
                         f"{store.batch_size}: the student replays whole stored batches")
    return store


def evaluation_splits(splits: SplitFactory, cfg: dict[str, Any]) -> tuple[Any, Any]:
    """(test split, validation split or None) as train.test_subset and train.val_size ask."""
    test = splits("test")
    if cfg["test_subset"]:
        test = stratified_subset(test, cfg["test_subset"], seed=0)
    val = validation_split(splits, int(cfg["val_size"]))
    if cfg["test_eval"] == "selected" and val is None:
        raise ValueError("train.test_eval=selected needs a validation split to select with (train.val_size > 0 "
                         "and an in-memory dataset); use train.test_eval=every")
    return test, val


def build_student(cfg: dict[str, Any], num_classes: int, images: torch.Tensor, steps_per_epoch: int, device: str,
                  build_model: ModelFactory, gen: torch.Generator) -> StudentState:
    """A fresh student (initialised from the global RNG, so after seeding) with its optimizer, warmup-cosine
    schedule over train.epochs * steps_per_epoch steps and optional weight average."""
    student = build_model(cfg["model"], num_classes=num_classes, in_chans=images.shape[1],
                          image_size=images.shape[2]).to(device)
    if cfg["channels_last"]:
        student = student.to(memory_format=torch.channels_last)
    net = ddp_model(student, device)  # under torchrun, DDP + synchronised BN; each rank trains on its rows
    opt = build_optimizer(student, cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["momentum"])
    ema = WeightEMA(student, float(cfg["ema"])) if cfg["ema"] > 0 else None
    total, warmup = int(cfg["epochs"]) * steps_per_epoch, int(cfg["warmup_epochs"]) * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warmup))
    return StudentState(student, net, opt, sched, ema, gen, forward=runtime.compile_step(student_logits,
                                                                                          cfg["compile"]))


def load_resume_state(out: Path, state: StudentState, cfg: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(first epoch to train, metrics so far): from ``out/last.pt`` into ``state`` when a killed or shorter run
    left one, else (1, empty metrics)."""
    last_path = out / "last.pt"
    if not last_path.exists():
        return 1, {"epochs": [], "evals": []}
    saved = load_tensors(last_path, what="train resume checkpoint")
    try:
        state.model.load_state_dict(saved["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        # line 0 is "Error(s) in loading state_dict for X:"; line 1 names the missing/unexpected keys
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        detail = lines[1] if len(lines) > 1 else lines[0]
        detail = detail if len(detail) <= 120 else detail[:117] + "..."
        raise ValueError(f"train resume checkpoint {last_path} does not fit train.model={cfg['model']!r}; "
                         f"use a new --out or the model it was started with ({detail})") from None
    state.opt.load_state_dict(saved["optimizer"])
    state.sched.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    state.gen.set_state(saved["generator"])
    state.t_s = float(saved["t_s"])
    if state.ema is not None:
        state.ema.load_state_dict(saved["ema"])
    if "best_weights" in saved:
        state.best_val, state.best_weights = float(saved["best_val"]), saved["best_weights"]
    start, epochs = int(saved["epoch"]) + 1, int(cfg["epochs"])
    if start - 1 > epochs:
        raise ValueError(f"{last_path} holds epoch {start - 1}, more than train.epochs={epochs}; rerun with "
                         f"train.epochs >= {start - 1}, or start fresh with another --out (or delete {out})")
    metrics = read_json(out / "train_metrics.json", "train metrics")
    # a kill between writing the metrics and last.pt leaves metrics of epochs the checkpoint lacks
    for key in ("epochs", "evals"):
        metrics[key] = [m for m in metrics.get(key, []) if m["epoch"] < start]
    print(f"train: resuming after epoch {start - 1}")
    return start, metrics


def save_checkpoint(path: Path, state: StudentState, epoch: int) -> None:
    """``last.pt``: everything :func:`load_resume_state` needs to go on bit for bit after ``epoch``."""
    save_tensors(path, {"model": state.model.state_dict(), "optimizer": state.opt.state_dict(),
                        "scheduler": state.sched.state_dict(), "torch_rng": torch.get_rng_state(),
                        "generator": state.gen.get_state(), "t_s": state.t_s, "epoch": epoch,
                        **({} if state.ema is None else {"ema": state.ema.state_dict()}),
                        **({} if state.best_weights is None else {"best_val": state.best_val,
                                                                 "best_weights": state.best_weights})})


# (student logits, their stored labels, row weights or None): what calibration and the logit diagnostics read
CalibBatch = tuple[torch.Tensor, SoftLabels, Optional[torch.Tensor]]


def train_one_epoch(state: StudentState, src: ReplaySource, cfg: dict[str, Any], epoch: int, seed: int,
                    device: str) -> tuple[dict[str, Any], list[CalibBatch]]:
    """One epoch of floor(N/B) replayed stored batches. Returns the epoch's metrics and the student's logits
    with their labels on the last train.calibrate_batches batches (calibration, logit diagnostics)."""
    epochs, nb = int(cfg["epochs"]), src.store.batches_per_epoch
    state.net.train()
    T = temperature_at(epoch, epochs, cfg["temperature"], cfg["t0"], cfg["t_decay"], cfg["t_step"], cfg["t_floor"])
    if not cfg["calibrate"]:
        state.t_s = T if cfg["student_t"] == "teacher" else float(cfg["student_t"])
    ids = epoch_batch_ids(src.store.kept_batch_ids, cfg["pool"], epoch, nb, seed)
    if len(ids) != nb:  # the schedule was sized for epochs * nb steps
        raise AssertionError(f"pool {cfg['pool']!r} gave {len(ids)} batches for epoch {epoch}, expected {nb}")
    total = 0.0
    calib: list[CalibBatch] = []
    for i, bid in enumerate(ids.tolist()):
        rec = src.store.batch(bid)
        src.check_batch(bid, rec, bool(cfg["hard_labels"]))
        x = replay_batch(src.images, rec, src.store.mean, src.store.std, validate=False)
        perm, lam = None, 1.0
        if cfg["mix"] != "none":  # the whole batch, before a rank takes its rows: every rank mixes alike
            x, perm, lam = mix_batch(x, cfg["mix"], stream("lpqld-train-mix", seed, epoch, i))
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        labels = rec.labels.to(device)
        rows, share = distributed.batch_share(x.shape[0])  # all rows, share 1.0 for 1 process
        if cfg["hard_labels"]:
            logits = state.forward(state.net, x[rows], bool(cfg["bf16"]))
            loss = hard_label_loss(logits.float(), src.image_labels.to(device), rec.aug, rows)
        else:
            loss, logits = soft_label_forward(state.net, x[rows], labels.slice_rows(rows), T, state.t_s,
                                              bool(cfg["t2_scale"]), bool(cfg["bf16"]), validate=False,
                                              forward=state.forward)
            if perm is not None:  # the KL is linear in the target: this is the loss against the mixed label
                other = labels.take_rows(perm).slice_rows(rows)
                loss = lam * loss + (1.0 - lam) * soft_label_kl(
                    logits.float(), **other.kl_kwargs(), T=T, t_s=state.t_s, t2_scale=bool(cfg["t2_scale"]),
                    validate=False)
        if share != 1.0:
            loss = loss * share  # DDP averages: world * n_local / B makes it the full-batch mean
        state.opt.zero_grad(set_to_none=True)
        loss.backward()
        state.opt.step()
        state.sched.step()
        if state.ema is not None:
            state.ema.update(state.model)
        total = total + loss.detach().double()  # summed on the device: float() would sync a GPU per step
        if i >= len(ids) - int(cfg["calibrate_batches"]):
            # a copy: under train.compile=cudagraphs the next step's replay writes into the graph's outputs
            z = distributed.gather_rows(logits.detach().float().clone(), x.shape[0])
            if perm is None:
                calib.append((z, labels, None))
            else:  # a mixed row's target is lam of its label and 1 - lam of its partner's
                w = torch.cat([torch.full((z.shape[0],), lam), torch.full((z.shape[0],), 1.0 - lam)])
                calib.append((torch.cat([z, z]), SoftLabels.concat([labels, labels.take_rows(perm)]), w))
    total = distributed.all_reduce_scalar(float(total)) / distributed.world_size()  # mean over ranks
    if cfg["calibrate"] and not cfg["hard_labels"]:
        state.t_s = calibrate_on(calib, T)
    entry = {"epoch": epoch, "loss": total / max(len(ids), 1), "T": T, "t_s": state.t_s, "steps": len(ids),
             "lr": state.opt.param_groups[0]["lr"]}
    return entry, calib


def evaluate_epoch(model: nn.Module, entry: dict[str, Any], calib: list[CalibBatch], test: Any, val: Any,
                   store: LabelStore, cfg: dict[str, Any], batch_size: int = 256) -> dict[str, Any]:
    """The evaluation after the epoch ``entry`` describes: test (unless ``test`` is None) and validation accuracy
    and NLL, and, with soft labels, the logit ranges of the last calibration batch."""
    kw = {"bf16": bool(cfg["bf16"]), "channels_last": bool(cfg["channels_last"]), "batch_size": batch_size}
    ev = {"epoch": entry["epoch"], "train_loss": entry["loss"], "T": entry["T"], "t_s": entry["t_s"]}
    if test is not None:  # train.test_eval=selected: the test split only at the end (evaluate_selected_and_last)
        ev.update(evaluate_split(model, test, store.mean, store.std, "test", **kw))
    if val is not None:
        ev.update(evaluate_split(model, val, store.mean, store.std, "val", **kw))
    if not cfg["hard_labels"]:
        ev.update(logit_ranges(calib[-1][0], calib[-1][1]))
    return ev


@locks_folder("out", "train", when=lambda a: distributed.is_main())
def run_train(
    config: dict[str, Any],
    recover_dir: str | Path,
    relabel_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    *,
    splits: SplitFactory | None = None,
    build_model: ModelFactory = get_model,
    eval_batch_size: int = 256,
) -> dict[str, Any]:
    """Train a student on ``recover_dir``'s images and ``relabel_dir``'s label store into ``out``
    (train_metrics.json, last.pt after every train.checkpoint_every epochs, student.pt at the end); a run
    killed or stopped at fewer epochs goes on from last.pt. Returns the summary of train_metrics.json.

    ``splits`` (split name -> dataset) replaces the config's dataset for the test and validation splits,
    ``build_model`` (``get_model``'s signature) builds the student, ``eval_batch_size`` is the evaluation's
    batch size: what a scale run without a registered dataset or with another width configures.
    """
    out = Path(out)
    cfg = train_config(config, device, out)
    if splits is None:
        splits = partial(get_dataset, config["dataset"], root=config.get("data_root"))
    images, image_labels, manifest = load_recovered(recover_dir)
    store = open_label_store(relabel_dir, manifest, cfg)
    test, val = evaluation_splits(splits, cfg)
    gen = seed_everything(seed)
    state = build_student(cfg, test.num_classes, images, store.batches_per_epoch, device, build_model, gen)
    src = ReplaySource(store, images.to(device), image_labels, test.num_classes)
    out.mkdir(parents=True, exist_ok=True)
    record = _check_resume(out, config, cfg, seed, store, manifest["images_sha256"])
    start, metrics = load_resume_state(out, state, cfg)
    if distributed.is_main():  # once the resume state loaded: a refused resume leaves the old record
        atomic_write_json(out / "config.json", record)
    t_begin = time.perf_counter()
    epochs = int(cfg["epochs"])
    bar = tqdm(range(start, epochs + 1), desc="train student", disable=not (progress and distributed.is_main()))
    test_at_end = cfg["test_eval"] == "selected"
    for epoch in bar:
        entry, calib = train_one_epoch(state, src, cfg, epoch, seed, device)
        metrics["epochs"].append(entry)
        if epoch % int(cfg["eval_every"]) == 0 or epoch == epochs:
            ev = evaluate_epoch(state.evaluated, entry, calib, None if test_at_end else test, val, store, cfg,
                                eval_batch_size)
            metrics["evals"].append(ev)
            if test_at_end:
                state.keep_if_best(ev["val_acc"])
            acc = ev["val_acc"] if test_at_end else ev["test_acc"]
            bar.set_postfix(acc=f"{acc:.2f}", T=f"{ev['T']:.1f}", t_s=f"{ev['t_s']:.2f}")
        if (epoch % int(cfg["checkpoint_every"]) == 0 or epoch == epochs) and distributed.is_main():
            atomic_write_json(out / "train_metrics.json", metrics)
            save_checkpoint(out / "last.pt", state, epoch)
    if test_at_end:
        evaluate_selected_and_last(state, metrics["evals"], test, store, cfg, eval_batch_size)
    summary = {**select_evaluation(metrics["evals"]), "num_epochs": epochs, "t_s_final": state.t_s,
               "test_images": len(test), "val_images": 0 if val is None else len(val),
               "seconds": time.perf_counter() - t_begin + metrics.get("seconds", 0.0),
               "record": run_record(config, seed, device)}
    metrics.update(summary)
    if distributed.is_main():  # rank 0 writes, the others wait for it
        atomic_write_json(out / "train_metrics.json", metrics)
        save_tensors(out / "student.pt", state.evaluated.state_dict())
    distributed.barrier()
    return summary


def student_logits(net: nn.Module, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The student's logits on a replayed batch (bf16 autocast when asked): the part of a step train.compile
    captures. It has no changing scalar, so a whole run compiles it once per input shape."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return net(x)


def soft_label_forward(net: torch.nn.Module, x: torch.Tensor, labels: SoftLabels, T: float, t_s: float,
                       t2_scale: bool, bf16: bool, validate: bool,
                       forward: Callable[[nn.Module, torch.Tensor, bool], torch.Tensor] = student_logits,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of the student on one replayed batch against its stored soft labels; ``forward`` computes
    the logits (:func:`student_logits` or its compiled form).

    With ``validate=False`` (the labels checked once per stored batch instead) there is no host sync and no
    branch on tensor values: the function compiles with ``torch.compile(fullgraph=True)`` (tests/test_train_step).
    The stage compiles only ``forward``: the fused loss is one opaque op (nothing to fuse) and takes T and t_s
    as floats, and a compiled loss recompiles for every new value (every epoch, with calibration).
    """
    logits = forward(net, x, bf16)
    loss = soft_label_kl(logits.float(), **labels.kl_kwargs(), T=T, t_s=t_s, t2_scale=t2_scale, validate=validate)
    return loss, logits


def validation_split(splits: SplitFactory, size: int) -> Any:
    """The fixed class-balanced validation split of real training images (``splits("train")``), or None (size 0
    or a streamed ImageFolder tree, which is not held in memory)."""
    if size == 0:
        return None
    train_split = splits("train")
    if not hasattr(train_split, "images"):
        return None
    return stratified_subset(train_split, size, seed=0)


def evaluate_split(model: torch.nn.Module, ds: Any, mean: Any, std: Any, name: str, bf16: bool,
                   channels_last: bool, batch_size: int = 256) -> dict[str, float]:
    """``{name}_acc`` (top-1 %) and, for in-memory splits, ``{name}_nll`` of ``model`` on ``ds``."""
    return {f"{name}_{k}": v for k, v in evaluate_dataset(model, ds, mean, std, bf16=bf16,
                                                           channels_last=channels_last,
                                                           batch_size=batch_size).items()}


def logit_ranges(logits: torch.Tensor, labels: Any) -> dict[str, float]:
    """The student's logits on the classes a top-k label stores and on those it drops (last batch).

    With MR labels the dropped classes get probability 0 and the loss has no finite minimum in their
    direction: a widening gap between the two shows the student still pushing them down.
    """
    logits = logits.float()
    if labels.indices is None:  # dense labels store every class
        return {"logit_kept_mean": float(logits.mean())}
    kept = torch.zeros_like(logits, dtype=torch.bool)
    kept.scatter_(1, labels.indices.to(logits.device, torch.int64), True)
    out = {"logit_kept_mean": float(logits[kept].mean())}
    if (~kept).any():
        dropped = logits[~kept]
        out.update(logit_dropped_mean=float(dropped.mean()), logit_dropped_min=float(dropped.min()),
                   logit_dropped_max=float(dropped.max()))
    return out


def evaluate_selected_and_last(state: StudentState, evals: list[dict[str, Any]], test: Any, store: LabelStore,
                           cfg: dict[str, Any], batch_size: int) -> None:
    """train.test_eval=selected: the test accuracy of the weights kept at the best validation evaluation and of
    the final weights, written into those two evaluations (select_evaluation then reads them as usual)."""
    kw = {"bf16": bool(cfg["bf16"]), "channels_last": bool(cfg["channels_last"]), "batch_size": batch_size}
    evals[-1].update(evaluate_split(state.evaluated, test, store.mean, store.std, "test", **kw))
    best_val = max(e["val_acc"] for e in evals)
    chosen = [e for e in evals if e["val_acc"] == best_val][-1]
    if chosen is evals[-1]:
        return
    if state.best_weights is None or state.best_val != best_val:
        raise AssertionError("the weights of the selected evaluation were not kept")
    model = copy.deepcopy(state.evaluated)
    model.load_state_dict(state.best_weights)
    chosen.update(evaluate_split(model, test, store.mean, store.std, "test", **kw))


def select_evaluation(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """The reported accuracies of a run, chosen without the test set.

    ``selected_acc``: test accuracy at the evaluation with the best validation accuracy (the latest such
    evaluation on a tie), or at the last evaluation when there is no validation split; ``last_acc``: the last
    evaluation; ``best_acc``: the best test accuracy of any evaluation (selection on test data: shown only as a
    secondary column), None when not every evaluation ran the test split (train.test_eval=selected).
    """
    if not evals:
        raise ValueError("no evaluation was recorded")
    if all("val_acc" in e for e in evals):
        best_val = max(e["val_acc"] for e in evals)
        chosen = [e for e in evals if e["val_acc"] == best_val][-1]
        rule = "best validation accuracy"
    else:
        chosen, rule = evals[-1], "last evaluation"
    return {"selected_acc": chosen["test_acc"], "selected_epoch": chosen["epoch"], "selection": rule,
            "last_acc": evals[-1]["test_acc"],
            "best_acc": max(e["test_acc"] for e in evals) if all("test_acc" in e for e in evals) else None}


def hard_label_loss(logits: torch.Tensor, image_labels: torch.Tensor, aug: Any,
                    rows: slice = slice(None)) -> torch.Tensor:
    """Cross-entropy with the replayed images' classes (mixed by the record's CutMix, if any).

    ``rows``: the batch rows ``logits`` belong to (a DDP rank's share; all by default).
    """
    y = image_labels[aug.image_indices.to(image_labels.device)]
    if aug.cutmix is None:
        return torch.nn.functional.cross_entropy(logits, y[rows])
    lam = float(aug.cutmix.lam)
    y2 = y[aug.cutmix.perm.to(y.device)]
    ce = torch.nn.functional.cross_entropy
    return lam * ce(logits, y[rows]) + (1 - lam) * ce(logits, y2[rows])


def calibrate_on(batches: list[CalibBatch], T: float) -> float:
    """Calibrated alignment: the student temperature that best matches the teacher on ``batches`` of
    (logits, labels, row weights or None)."""
    logits = torch.cat([b[0] for b in batches])
    labels = batches[0][1] if len(batches) == 1 else SoftLabels.concat([b[1] for b in batches])
    weights = None
    if any(b[2] is not None for b in batches):
        weights = torch.cat([torch.ones(b[0].shape[0]) if b[2] is None else b[2] for b in batches])
    return float(calibrate_student_temperature(logits, **labels.kl_kwargs(), T=T, row_weights=weights))
