"""Student training, the reference way (FKD replay + LPLD label pool + LPQLD DKR / CA).

Per training epoch e = 1..E:
- label pool, ``pool="lpqld"`` (default): ``random.sample(pool, nb)``,
  nb = floor(N / B) stored batches drawn without replacement from all kept
  batches (Python ``random``, seeded here; the reference does not seed it);
  ``pool="lpld"``: nb independent uniform draws (``torch.randint``, with replacement);
- batch lookup keyed by the first image index (LPLD): the epoch's batch list is
  turned into a dict {first image index: batch id}; each batch's images are
  then replayed with the file found under *its first image index*. When two
  batches of the list start with the same image the later one wins, so the
  earlier batch's images are replayed with the other batch's crops, flips and
  soft labels (a silent mismatch; counted in ``collisions``). ``pool_key =
  "first3"`` is the LPQLD variant: one dict over the whole pool keyed by the
  first three indices, which raises on a clash;
- for each batch: ``torch.load`` of its file, per-sample PIL decode +
  ``resized_crop`` + ``hflip`` replay, dense decode of the soft labels to a
  [B, C] teacher distribution at temperature T(e) (MR-k: softmax over the k
  stored logits scattered into zeros; MRS-k: the other classes take the
  stored per-sample minimum logit; dense: softmax over all C), student
  forward, ``nn.KLDivLoss(reduction="batchmean")(log_softmax(z / t_s), p)``
  (times T^2 if ``t2_scale``), optimizer step;
- DKR: T(e) = max(t0 * t_decay^floor(e / t_step), t_floor) (20, 0.7, 30, 2);
- CA: after the epoch, t_s = argmin over t in linspace(0.01, 1, 100) of the KL
  on the last mini-batch (t_s starts at 1.0); without CA, t_s = T(e)
  (``student_t="teacher"``) or a fixed number;
- lr: cosine over epochs, ``LambdaLR`` stepped once per epoch (reference);
- a checkpoint (model, optimizer, scheduler) saved after every epoch when
  ``checkpoint_dir`` is set, copied to model_best when the accuracy improved
  (reference ``save_checkpoint``);
- evaluation on the test set every ``eval_every`` epochs and at the last one
  (the same epochs as lpqld_fast's train stage); best and last top-1 reported.
"""
from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms

from .relabel import FKDImageList
from .stats import UInt8ImageDataset

POOL_KEYS = ("first_index", "first3")
POOL_MODES = ("lpqld", "lpld")


def check_config(cfg: dict) -> None:
    """Refuse settings of our train stage that the reference strategy has no equivalent for."""
    if cfg.get("pool", "lpqld") not in POOL_MODES:
        raise ValueError(f"train.pool must be one of {POOL_MODES} in the reference pipeline, got {cfg['pool']!r}")
    if cfg.get("pool_key", "first_index") not in POOL_KEYS:
        raise ValueError(f"train.pool_key must be one of {POOL_KEYS}, got {cfg['pool_key']!r}")
    for key, ok in (("calibrate_batches", 1), ("hard_labels", False), ("bf16", False), ("warmup_epochs", 0)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"train.{key}={cfg[key]!r} is not re-created in the reference pipeline (only {ok!r})")


def temperature_at(epoch: int, cfg: dict) -> float:
    """Teacher temperature of training epoch ``epoch`` (from 1): the reference's step schedule or a constant."""
    t0 = float(cfg.get("t0", 20.0))
    sched = cfg.get("temperature", "step")
    if sched == "step":
        t = t0 * float(cfg.get("t_decay", 0.7)) ** (epoch // int(cfg.get("t_step", 30)))
        floor = float(cfg.get("t_floor", 2.0))
        return t if t > floor else floor
    if sched == "constant":
        return t0
    raise ValueError(f"train.temperature must be 'step' or 'constant' in the reference pipeline, got {sched!r}")


def get_parameters(model: nn.Module, weight_decay: float) -> list[dict]:
    """SRe2L-style groups: weight decay on parameters named '*weight*' with ndim > 1, none on the rest."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if "weight" in name and p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def decode_soft_label(record: dict, mode: str, temperature: float, num_classes: int) -> torch.Tensor:
    """Dense [B, C] teacher distribution from one stored batch (the reference's decode)."""
    soft = record["soft_label"].float()
    if mode == "dense":
        return F.softmax(soft / temperature, dim=1)
    idx = record["label_indices"].long()
    if mode == "mr":
        p = F.softmax(soft / temperature, dim=1)
        return torch.zeros(soft.size(0), num_classes).scatter_(1, idx, p)
    if mode == "mrs":
        full = record["sample_min"].float().expand(soft.size(0), num_classes).clone()
        full.scatter_(1, idx, soft)
        return F.softmax(full / temperature, dim=1)
    raise ValueError(f"unknown label mode {mode!r}")


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
             std: Sequence[float], batch_size: int = 64) -> float:
    """Top-1 (%) with a DataLoader and per-sample ToTensor + Normalize (the reference's validate())."""
    ds = UInt8ImageDataset(images, labels, transforms.Compose([transforms.ToTensor(),
                                                               transforms.Normalize(list(mean), list(std))]))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += y.numel()
    model.train()
    return 100.0 * correct / max(total, 1)


def save_checkpoint(state: dict, is_best: bool, out_dir: Path) -> None:
    """checkpoint.pth.tar every epoch, copied to model_best.pth.tar when the test accuracy improved."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_dir / "checkpoint.pth.tar")
    if is_best:
        shutil.copyfile(out_dir / "checkpoint.pth.tar", out_dir / "model_best.pth.tar")


def _key(indices: list[int], pool_key: str):
    return indices[0] if pool_key == "first_index" else str(indices[:3])


def run_train(
    make_student: Callable[[], nn.Module],
    image_root: str | Path,
    label_dir: str | Path,
    cfg: dict,
    label_mode: str,
    num_classes: int,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Train a student on the stored batches; return accuracies, temperatures, collisions and timings."""
    check_config(cfg)
    pool_key = cfg.get("pool_key", "first_index")
    pool_mode = cfg.get("pool", "lpqld")
    label_dir = Path(label_dir)
    epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    ds = FKDImageList(image_root, size, mean, std)
    with open(label_dir / "sampler_indices_batch.json") as f:
        batch_to_indices = {int(k): v for k, v in json.load(f).items()}
    pool = sorted(batch_to_indices)
    if not pool:
        raise ValueError(f"no stored batches in {label_dir}")
    nb = len(ds) // bs
    if nb < 1:
        raise ValueError(f"train.batch_size {bs} exceeds the {len(ds)} images")
    global_map = None
    if pool_key == "first3":
        global_map = {}
        for bid in pool:
            key = _key(batch_to_indices[bid], pool_key)
            if key in global_map:
                raise ValueError("Having conflict between batch_to_indices and num_batches")
            global_map[key] = bid

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = make_student()
    model.train()
    opt_name = cfg.get("optimizer", "adamw")
    wd = float(cfg.get("weight_decay", 0.0))
    if opt_name == "adamw":
        optimizer = torch.optim.AdamW(get_parameters(model, wd), lr=float(cfg["lr"]), weight_decay=wd)
    elif opt_name == "sgd":
        optimizer = torch.optim.SGD(get_parameters(model, wd), lr=float(cfg["lr"]),
                                    momentum=float(cfg.get("momentum", 0.9)), weight_decay=wd)
    else:
        raise ValueError(f"train.optimizer must be 'adamw' or 'sgd', got {opt_name!r}")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / epochs)) if step <= epochs else 0)
    calibrate = bool(cfg.get("calibrate", True))
    student_t = cfg.get("student_t", "teacher")
    t_stu = 1.0  # CA starts from 1.0
    t2_scale = bool(cfg.get("t2_scale", False))
    eval_every = int(cfg.get("eval_every", 25))
    checkpoint_dir = Path(cfg["checkpoint_dir"]) if cfg.get("checkpoint_dir") else None
    best_acc = 0.0
    eval_limit = cfg.get("eval_limit")
    if eval_limit is not None:
        test_images, test_labels = test_images[:eval_limit], test_labels[:eval_limit]
    kl = nn.KLDivLoss(reduction="batchmean")
    history, collisions, replayed = [], 0, 0
    eval_seconds = load_seconds = replay_seconds = 0.0
    t_start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        if pool_mode == "lpqld":  # LPQLD: without replacement within an epoch
            step_list = random.sample(pool, min(nb, len(pool)))
        else:  # LPLD: each of the nb draws uniform over the pool (with replacement)
            step_list = [pool[torch.randint(0, len(pool), (1,)).item()] for _ in range(nb)]
        if global_map is None:
            mapping = {}
            for bid in step_list:
                mapping[_key(batch_to_indices[bid], pool_key)] = bid
        else:
            mapping = global_map
        current_temp = temperature_at(epoch, cfg)
        total_loss, n_seen = 0.0, 0
        output = p = None
        if calibrate:
            t_used = t_stu
        else:
            t_used = current_temp if student_t == "teacher" else float(student_t)
        for bid in step_list:
            img_idx = batch_to_indices[bid]
            resolved = mapping[_key(img_idx, pool_key)]
            collisions += int(resolved != bid)
            t0 = time.perf_counter()
            record = torch.load(label_dir / f"batch_{resolved}.tar", weights_only=True)
            t1 = time.perf_counter()
            coords, flips = record["coords"], record["flips"]
            images = torch.stack([ds.replay(img_idx[n], coords[min(n, len(coords) - 1)],
                                            bool(flips[min(n, len(flips) - 1)]))
                                  for n in range(len(img_idx))])
            replay_seconds += time.perf_counter() - t1
            load_seconds += t1 - t0
            replayed += len(img_idx)
            p = decode_soft_label(record, label_mode, current_temp, num_classes)
            optimizer.zero_grad()
            output = model(images)
            loss = kl(F.log_softmax(output / t_used, dim=1), p)
            if t2_scale:
                loss = loss * current_temp ** 2
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * images.size(0)
            n_seen += images.size(0)
        if calibrate and output is not None:
            with torch.no_grad():
                temps = np.linspace(0.01, 1, 100)
                losses = [kl(F.log_softmax(output / t, dim=1), p).item() for t in temps]
            t_stu = float(temps[int(np.argmin(losses))])
        entry = {"epoch": epoch, "loss": total_loss / max(n_seen, 1), "T": current_temp, "t_student": t_used,
                 "t_student_next": t_stu if calibrate else None, "lr": scheduler.get_last_lr()[0]}
        scheduler.step()
        if epoch % eval_every == 0 or epoch == epochs:
            te = time.perf_counter()
            entry["test_acc"] = evaluate(model, test_images, test_labels, mean, std)
            eval_seconds += time.perf_counter() - te
            if verbose:
                print(f"[reference train] epoch {epoch}/{epochs}: loss {entry['loss']:.4f}, T {current_temp:.2f}, "
                      f"t_s {entry['t_student']:.2f}, test top-1 {entry['test_acc']:.2f}%, "
                      f"{time.perf_counter() - t_start:.1f}s", flush=True)
        history.append(entry)
        if checkpoint_dir is not None:  # the reference saves model + optimizer + scheduler after every epoch
            acc = entry.get("test_acc", 0.0)
            is_best = acc > best_acc
            best_acc = max(acc, best_acc)
            save_checkpoint({"epoch": epoch + 1, "state_dict": model.state_dict(), "best_acc1": best_acc,
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                            is_best, checkpoint_dir)
    accs = [h["test_acc"] for h in history if "test_acc" in h]
    return {"best_acc": max(accs), "last_acc": history[-1]["test_acc"], "history": history,
            "collisions": collisions, "replayed_samples": replayed, "final_t_student": t_stu,
            "eval_seconds": eval_seconds, "label_load_seconds": load_seconds, "replay_seconds": replay_seconds,
            "test_images": int(test_labels.numel())}
