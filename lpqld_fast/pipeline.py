"""Stage glue: each stage reads the previous stage's folder inside one run directory.

:func:`run_distill` runs the method (synthesised images, the final teacher's labels); :func:`run_baseline`
paper 001's baseline into the same layout (random real images, an expert's top-k labels).

    <run>/squeeze   teacher + class-wise BN statistics
    <run>/recover   distilled images (images.pt, PNGs, grid.png, manifest.json)
    <run>/relabel   label store (manifest.json + packed arrays)
    <run>/train     student, train_metrics.json
    <run>/report    REPORT.md + PNG plots
Every stage resumes where a killed run stopped; rerunning a finished stage is a no-op.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lpqld_fast import config as schema
from lpqld_fast import distributed
from lpqld_fast.data import dataset_info
from lpqld_fast.experts import ExpertEnsemble, relabel_with_expert
from lpqld_fast.image_set import load_recovered
from lpqld_fast.io_utils import atomic_write_json, read_json, sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.real_images import select_real_images
from lpqld_fast.records import stage_dirs
from lpqld_fast.recover import run_recover
from lpqld_fast.relabel import config_stored_k, kept_count, normalize_config, run_relabel_sharded
from lpqld_fast.report import write_report
from lpqld_fast.squeeze import load_members, run_squeeze
from lpqld_fast.store.quantize import index_dtype_for
from lpqld_fast.train import run_train

__all__ = ["BASELINE_SETTINGS", "check_store_size", "run_relabel_stage", "run_distill", "run_baseline"]


_VALUE_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4, "int8": 1}


def check_store_size(config: dict[str, Any], info: Any, run: str | Path) -> None:
    """Refuse, before anything is written, a label store that keeps no batch or cannot fit on the disk: per
    kept batch, B rows of k values and k class ids, plus the augmentation record (a lower bound of the real
    layout)."""
    cfg = normalize_config(config["relabel"])
    images = config["recover"]["ipc"] * info.num_classes
    nb = images // cfg["batch_size"]
    if nb < 1:
        return  # relabel refuses it, naming both numbers
    kept = kept_count(cfg["epochs"] * nb, cfg["prune_ratio"])
    if kept < 1:  # relabel's own check, made before squeeze and recover run
        raise ValueError(f"relabel.prune_ratio {cfg['prune_ratio']} keeps no batch of {cfg['epochs'] * nb} "
                         f"({images} images in batches of {cfg['batch_size']}, {cfg['epochs']} epochs)")
    k = config_stored_k(cfg, info.num_classes)
    index_bytes = 0 if cfg["label"] == "dense" else index_dtype_for(info.num_classes).itemsize
    need = kept * cfg["batch_size"] * (k * (_VALUE_BYTES[cfg["value_dtype"]] + index_bytes) + 10)
    where = Path(run).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise ValueError(f"relabel.epochs={cfg['epochs']} with relabel.batch_size={cfg['batch_size']}, "
                         f"prune_ratio={cfg['prune_ratio']} and k={k} makes a label store of at least "
                         f"{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB are free under {where}")


def run_relabel_stage(config: dict[str, Any], run: str | Path, seed: int = 0, device: str = "cpu",
                      progress: bool = True):
    """Relabel the recovered images with the squeezed teacher into <run>/relabel."""
    d = stage_dirs(run)
    images, labels, manifest = load_recovered(d["recover"])
    info = dataset_info(config["dataset"], root=config.get("data_root"))
    teacher = load_teacher(d["squeeze"] / "teacher.pt", build_teacher(config["squeeze"], info)).to(device).eval()
    teacher_hash = sha256_tensors(teacher.state_dict())
    if teacher_hash != manifest["teacher_sha256"]:
        raise ValueError(f"{d['recover']} was recovered with another teacher than {d['squeeze'] / 'teacher.pt'}")
    relabel_cfg = {k: v for k, v in config["relabel"].items()}
    if relabel_cfg.get("num_classes") is None:
        relabel_cfg["num_classes"] = info.num_classes
    labeller, labeller_hash = teacher, None
    squeeze_cfg = schema.check_section("squeeze", config["squeeze"])
    if squeeze_cfg["teachers"] > 1:  # the stored labels are the teachers' mean logits
        members = [m.to(device) for m in load_members(squeeze_cfg, d["squeeze"], info)]
        labeller = ExpertEnsemble([teacher, *members], combine="logits").eval()
        labeller_hash = sha256_tensors(labeller.state_dict())
    # run_relabel itself for 1 process; under torchrun the slots are split over ranks (one store).
    return run_relabel_sharded(images, labels, labeller, info.mean, info.std, relabel_cfg, out_dir=d["relabel"],
                               seed=seed, teacher_sha256=teacher_hash, images_sha256=manifest["images_sha256"],
                               labeller_sha256=labeller_hash, progress=progress)


class StageTimer:
    """Calls a stage and adds its wall time to ``<run>/timings.json`` (summed over the runs that resume it)."""

    def __init__(self, run: str | Path) -> None:
        self.path = Path(run) / "timings.json"
        self.timings: dict[str, float] = read_json(self.path, "timings") if self.path.exists() else {}

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
        if distributed.is_main():  # rank 0 writes shared files
            atomic_write_json(self.path, self.timings)
        return out


def run_recover_stage(config: dict[str, Any], squeeze_dir: str | Path, out: str | Path, seed: int = 0,
                      device: str = "cpu", progress: bool = True, units_at_once: int | None = None) -> dict[str, Any]:
    """The recover stage as ``recover.select`` asks: synthesis (``none``) or real training images selected by
    that strategy (:func:`lpqld_fast.real_images.select_real_images`, written by rank 0); returns the manifest."""
    strategy = config["recover"].get("select", "none")
    if strategy == "none":
        return run_recover(config, squeeze_dir, out, seed=seed, device=device, progress=progress,
                           units_at_once=units_at_once)
    manifest = distributed.on_main(select_real_images, config, squeeze_dir, out, seed=seed, strategy=strategy,
                                   device=device)  # the other ranks read the set after on_main's barrier
    return manifest if manifest is not None else read_json(Path(out) / "manifest.json", "recover manifest")


def run_distill(config: dict[str, Any], run: str | Path, seed: int = 0, device: str = "cpu",
                checkpoint: str | None = None, progress: bool = True,
                units_at_once: int | None = None) -> dict[str, Any]:
    """squeeze -> recover -> relabel -> train -> report, timing each stage."""
    d = stage_dirs(run)
    timed = StageTimer(run)
    timed("squeeze", run_squeeze, config, d["squeeze"], seed=seed, device=device, checkpoint=checkpoint)
    timed("recover", run_recover_stage, config, d["squeeze"], d["recover"], seed=seed, device=device,
          progress=progress, units_at_once=units_at_once)
    timed("relabel", run_relabel_stage, config, run, seed=seed, device=device, progress=progress)
    summary = timed("train", run_train, config, d["recover"], d["relabel"], d["train"], seed=seed, device=device,
                    progress=progress)
    report = distributed.on_main(write_report, run)  # rank 0 only (None elsewhere)
    return {"train": summary, "timings": timed.timings, "report": str(report)}


# Paper 001's knowledge distillation, the baseline's defaults (``--set`` overrides them): the top-k
# probabilities, not renormalised, of every augmented batch (no pruning, no CutMix), learned with
# KL(p_T || softmax(z / T)) at one constant T = 1 for teacher and student (no schedule, no calibration).
BASELINE_SETTINGS = ("relabel.label=topk_norenorm", "relabel.prune_ratio=0", "relabel.cutmix=false",
                     "train.temperature=constant", "train.t0=1", "train.calibrate=false",
                     "train.student_t=teacher")


def run_baseline(config: dict[str, Any], run: str | Path, seed: int = 0, device: str = "cpu",
                 expert_epoch: int | None = None, checkpoint: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Paper 001's baseline ("A Label is Worth a Thousand Images") into the run layout, timing each stage.

    squeeze (the teacher, with its weights after every epoch) -> recover.ipc random real training images per
    class (real_images.select_real_images) -> relabel with the expert at squeeze epoch ``expert_epoch`` (None:
    the final teacher; experts.relabel_with_expert, which writes ``<run>/expert.json``) -> train -> report.
    The label mode and k are relabel.label / relabel.k (BASELINE_SETTINGS: topk_norenorm).
    """
    d = stage_dirs(run)
    timed = StageTimer(run)
    timed("squeeze", run_squeeze, config, d["squeeze"], seed=seed, device=device, checkpoint=checkpoint)
    # rank 0 writes the image set; the others read it after the barrier
    timed("recover", distributed.on_main, select_real_images, config, d["squeeze"], d["recover"], seed=seed,
          strategy="random", device=device)
    timed("relabel", relabel_with_expert, config, run, seed=seed, expert_epoch=expert_epoch, device=device,
          progress=progress)
    summary = timed("train", run_train, config, d["recover"], d["relabel"], d["train"], seed=seed, device=device,
                    progress=progress)
    report = distributed.on_main(write_report, run)
    return {"train": summary, "timings": timed.timings, "report": str(report)}
