"""Stage glue: each stage reads the previous stage's folder inside one run directory.

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
from pathlib import Path
from typing import Any

from lpqld_fast import distributed
from lpqld_fast.data import dataset_info
from lpqld_fast.image_set import load_recovered
from lpqld_fast.io_utils import atomic_write_json, read_json, sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.records import stage_dirs
from lpqld_fast.recover import run_recover
from lpqld_fast.relabel import config_stored_k, kept_count, normalize_config, run_relabel_sharded
from lpqld_fast.report import write_report
from lpqld_fast.squeeze import run_squeeze
from lpqld_fast.store.quantize import index_dtype_for
from lpqld_fast.train import run_train

__all__ = ["check_store_size", "run_relabel_stage", "run_distill"]


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
    # run_relabel itself for 1 process; under torchrun the slots are split over ranks (one store).
    return run_relabel_sharded(images, labels, teacher, info.mean, info.std, relabel_cfg, out_dir=d["relabel"],
                               seed=seed, teacher_sha256=teacher_hash, images_sha256=manifest["images_sha256"],
                               progress=progress)


def run_distill(config: dict[str, Any], run: str | Path, seed: int = 0, device: str = "cpu",
                checkpoint: str | None = None, progress: bool = True,
                units_at_once: int | None = None) -> dict[str, Any]:
    """squeeze -> recover -> relabel -> train -> report, timing each stage."""
    d = stage_dirs(run)
    timings: dict[str, float] = {}
    prev = Path(run) / "timings.json"
    if prev.exists():
        timings = read_json(prev, "timings")

    def timed(name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        if distributed.is_main():  # rank 0 writes shared files
            atomic_write_json(prev, timings)
        return out

    timed("squeeze", run_squeeze, config, d["squeeze"], seed=seed, device=device, checkpoint=checkpoint)
    timed("recover", run_recover, config, d["squeeze"], d["recover"], seed=seed, device=device, progress=progress,
          units_at_once=units_at_once)
    timed("relabel", run_relabel_stage, config, run, seed=seed, device=device, progress=progress)
    summary = timed("train", run_train, config, d["recover"], d["relabel"], d["train"], seed=seed, device=device,
                    progress=progress)
    report = distributed.on_main(write_report, run)  # rank 0 only (None elsewhere)
    return {"train": summary, "timings": timings, "report": str(report)}
