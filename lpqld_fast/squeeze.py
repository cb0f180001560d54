"""Squeeze: train (or load) the teacher, then collect class-wise BN statistics.

Output directory layout:
    config.json                 the resolved config (auto settings as chosen), seed, checkpoint
    checkpoints/epoch_XXX.pt    teacher weights after each epoch (experts for paper 001)
    checkpoints/last.pt         full training state for resume (model, optimizer, scheduler, rng)
    teacher.pt                  final teacher weights (state dict)
    bn_stats.pt                 class-wise BN input statistics, '<layer>.mean'/'.var' [K, C]
    metrics.json                per-epoch loss / accuracy / wall time
    teacher_curve.png           training curve
    members/<i>/                squeeze.teachers > 1: ensemble member i (>= 1), the same layout without the
                                statistics (teacher.pt, checkpoints/, metrics.json, config.json)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lpqld_fast import config as schema
from lpqld_fast import distributed
from lpqld_fast.bn_stats import ClasswiseBNStats, bn_layers, save_bn_stats
from lpqld_fast.data import SplitFactory, get_dataset
from lpqld_fast.data.streaming import seeded_batches
from lpqld_fast.data.transforms import normalize, random_crop_flip
from lpqld_fast.ddp import ddp_model
from lpqld_fast.engine import batch_indices, build_optimizer, to_float_images, warmup_cosine
from lpqld_fast.evaluation import evaluate_dataset
from lpqld_fast.io_utils import atomic_write_json, load_tensors, locks_folder, read_json, save_tensors, sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.runtime import compile_step
from lpqld_fast.seeding import hashed_seed, seed_everything, squeeze_stats_order, stream, teacher_member

# The settings of the statistics pass: a change recomputes the statistics of the existing teacher.
STATS_KEYS = ("stats_mode", "stats_momentum", "stats_batch_size")
MEMBERS = "members"


def squeeze_config(cfg: dict[str, Any] | None, device: str = "cpu",
                   recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The squeeze section validated (schema defaults filled in) with its auto settings chosen."""
    return schema.resolve_auto("squeeze", schema.check_section("squeeze", cfg), device, recorded)


def _augment(x_uint8: torch.Tensor, cfg: dict[str, Any], gen: torch.Generator, mean, std) -> torch.Tensor:
    x = to_float_images(x_uint8)
    if cfg["augment"] == "crop-flip":
        x = random_crop_flip(x, pad=cfg["crop_pad"], generator=gen)
    return normalize(x, mean, std)


def _epoch_seed(seed: int, epoch: int) -> int:
    """The per-image augmentation seed base of teacher epoch ``epoch`` (0-based) on an ImageFolder tree."""
    return hashed_seed("lpqld-teacher-epoch", seed, epoch)


def _memory_steps(train: Any, cfg: dict[str, Any], gen: torch.Generator, bs: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """(x, y, loss weight) of this rank per step: every rank draws the global batch and its augmentation
    (same generator), then keeps its rows (the whole batch and weight 1.0 in one process)."""
    for idx in batch_indices(len(train.labels), bs, gen, drop_last=True):
        x = _augment(train.images[idx], cfg, gen, train.mean, train.std)
        rows, share = distributed.batch_share(len(idx))
        yield x[rows], train.labels[idx][rows], share


def _folder_steps(train: Any, gen: torch.Generator, bs: int, pass_seed: int, workers: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """The same steps on an ImageFolder tree: each rank decodes only its rows of every global batch."""
    batches = list(batch_indices(len(train.targets), bs, gen, drop_last=True))
    shares = [distributed.batch_share(len(idx)) for idx in batches]
    stream = seeded_batches(train, [idx[rows].tolist() for idx, (rows, _) in zip(batches, shares)], pass_seed,
                            workers)
    for (x, y), (_, share) in zip(stream, shares):
        yield x, y, share


def _plot_curve(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ep = [m["epoch"] for m in metrics]
    ax.plot(ep, [m["test_acc"] for m in metrics], "o-", label="test top-1 %")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 (%)")
    ax2 = ax.twinx()
    ax2.plot(ep, [m["train_loss"] for m in metrics], "s--", color="tab:red", label="train loss")
    ax2.set_ylabel("train loss")
    ax.set_title("teacher training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train_teacher(cfg: dict[str, Any], dataset: str, out: Path, seed: int, device: str = "cpu",
                  data_root: str | None = None, record: dict[str, Any] | None = None) -> tuple[nn.Module, list[dict]]:
    """Train the teacher with per-epoch checkpoints; resumes from checkpoints/last.pt.

    In-memory datasets are augmented with ``squeeze.augment``; an ImageFolder tree is decoded in
    ``squeeze.train_workers`` DataLoader workers with the folder's train transform, each image under a seed of
    (seed, epoch, image index), so a resumed run and any number of ranks see the same pixels.
    ``record`` (the resolved config) is written to config.json once the inputs are checked, before the first
    epoch of a fresh run: a killed run's settings are then known when it is resumed.
    """
    cfg, _ = squeeze_config(cfg, device)
    train = get_dataset(dataset, "train", root=data_root)
    test = get_dataset(dataset, "test", root=data_root)
    streamed = not hasattr(train, "images")
    labels = train.targets if streamed else train.labels
    gen = seed_everything(seed)
    model = build_teacher(cfg, train).to(device)
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # under torchrun, DDP + synchronised BN (model itself for 1 process); optimizer on the shared params.
    net = ddp_model(model, device)
    epochs = cfg["epochs"]
    bs = cfg["batch_size"]
    if bs > len(labels):  # drop_last: not one step per epoch, an untrained teacher
        raise ValueError(f"squeeze.batch_size {bs} exceeds the {len(labels)} training images of {dataset}")
    steps_per_epoch = len(labels) // bs
    workers = cfg["train_workers"]
    opt = build_optimizer(model, cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["momentum"], cfg["nesterov"])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(epochs * steps_per_epoch, cfg["warmup_epochs"] * steps_per_epoch))
    ckpt_dir = out / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.pt"
    start, metrics = _load_teacher_resume(last, out / "metrics.json", model, opt, sched, gen)
    if not last.exists() and record is not None and distributed.is_main():
        atomic_write_json(out / "config.json", record)
    step = compile_step(teacher_loss, cfg["compile"])  # one compiled function for every epoch
    for epoch in range(start, epochs):
        t0 = time.perf_counter()
        steps = (_folder_steps(train, gen, bs, _epoch_seed(seed, epoch), workers) if streamed
                 else _memory_steps(train, cfg, gen, bs))
        bar = tqdm(steps, total=steps_per_epoch, desc=f"teacher epoch {epoch + 1}/{epochs}", leave=False,
                   disable=not distributed.is_main())
        loss = _teacher_epoch(net, opt, sched, bar, cfg, device, step)
        acc = evaluate_dataset(model, test, train.mean, train.std, bf16=cfg["bf16"],
                               channels_last=cfg["channels_last"], num_workers=workers)["acc"]
        metrics.append({"epoch": epoch + 1, "train_loss": loss, "test_acc": acc, "seconds": time.perf_counter() - t0})
        if distributed.is_main():  # rank 0 writes checkpoints and metrics
            print(f"teacher epoch {epoch + 1}/{epochs}: loss {loss:.4f}, test top-1 {acc:.2f}%, "
                  f"{metrics[-1]['seconds']:.1f}s")
            save_tensors(ckpt_dir / f"epoch_{epoch + 1:03d}.pt", model.state_dict())
            atomic_write_json(out / "metrics.json", {"teacher": metrics})
            save_tensors(last, {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                "torch_rng": torch.get_rng_state(), "epoch": epoch + 1})
    return model, metrics


def member_dir(squeeze_dir: str | Path, i: int) -> Path:
    """The folder of ensemble member ``i`` (>= 1) of the squeeze run in ``squeeze_dir``."""
    return Path(squeeze_dir) / MEMBERS / str(i)


def train_members(cfg: dict[str, Any], config: dict[str, Any], out: Path, seed: int, device: str = "cpu",
                  data_root: str | None = None) -> list[float]:
    """Train (or resume, or find trained) ensemble members 1 .. squeeze.teachers - 1: the teacher's settings,
    seeds from :func:`lpqld_fast.seeding.teacher_member`. Returns each member's final test accuracy."""
    accs = []
    for i in range(1, cfg["teachers"]):
        d = member_dir(out, i)
        if not (d / "teacher.pt").exists():
            print(f"squeeze: ensemble member {i} of {cfg['teachers'] - 1}")
            member_seed = teacher_member(seed, i)
            model, _ = train_teacher(cfg, config["dataset"], d, member_seed, device, data_root,
                                     record=_record(config, member_seed, None))
            if distributed.is_main():
                save_tensors(d / "teacher.pt", model.to(memory_format=torch.contiguous_format).state_dict())
        accs.append(read_json(d / "metrics.json", "member metrics")["teacher"][-1]["test_acc"])
    distributed.barrier()
    return accs


def load_members(squeeze_cfg: dict[str, Any], squeeze_dir: str | Path, info: Any) -> list[nn.Module]:
    """Ensemble members 1 .. squeeze.teachers - 1 (eval mode, frozen), each refused by name when missing."""
    members = []
    for i in range(1, squeeze_cfg["teachers"]):
        path = member_dir(squeeze_dir, i) / "teacher.pt"
        if not path.exists():
            raise FileNotFoundError(f"squeeze.teachers={squeeze_cfg['teachers']} needs ensemble member {i} "
                                    f"({path}); run squeeze with --set squeeze.teachers={squeeze_cfg['teachers']}")
        m = load_teacher(path, build_teacher(squeeze_cfg, info)).eval()
        for prm in m.parameters():
            prm.requires_grad_(False)
        members.append(m)
    return members


def _load_teacher_resume(last: Path, metrics_path: Path, model: nn.Module, opt: torch.optim.Optimizer,
                         sched: torch.optim.lr_scheduler.LambdaLR, gen: torch.Generator) -> tuple[int, list[dict]]:
    """(epochs done, their metrics): restored from ``last`` into the arguments, or (0, []) for a fresh run."""
    if not last.exists():
        return 0, []
    state = load_tensors(last, what="squeeze resume checkpoint")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    start = int(state["epoch"])
    metrics = read_json(metrics_path, "squeeze metrics")["teacher"] if metrics_path.exists() else []
    print(f"squeeze: resuming teacher training after epoch {start}")
    return start, metrics[:start]


def teacher_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool,
                 label_smoothing: float) -> torch.Tensor:
    """The teacher's label-smoothed cross-entropy on one batch (bf16 autocast when asked): the part of a
    training step squeeze.compile captures (the optimizer step stays eager)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        return F.cross_entropy(net(x), y, label_smoothing=label_smoothing)


def _teacher_epoch(net: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                   bar: tqdm, cfg: dict[str, Any], device: str,
                   step: Callable[..., torch.Tensor] = teacher_loss) -> float:
    """One epoch of label-smoothed cross-entropy over ``bar`` ((x, y, share) batches under a progress bar),
    each batch's loss computed by ``step`` (:func:`teacher_loss` as squeeze.compile runs it); the mean loss
    over every rank's images."""
    net.train()
    total, n = 0.0, 0
    for x, y, share in bar:
        x, y = x.to(device), y.to(device)
        if cfg["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        loss = step(net, x, y, bool(cfg["bf16"]), float(cfg["label_smoothing"]))
        opt.zero_grad(set_to_none=True)
        (loss * share if share != 1.0 else loss).backward()
        opt.step()
        sched.step()
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.3f}")
    total, n = distributed.all_reduce_scalar(total), int(distributed.all_reduce_scalar(n))
    return total / max(n, 1)


@torch.no_grad()
def collect_class_stats(model: nn.Module, dataset: str, cfg: dict[str, Any], seed: int, device: str = "cpu",
                        data_root: str | None = None, backend: str | None = None,
                        splits: SplitFactory | None = None) -> tuple[dict, list[str]]:
    """One eval-mode pass over the train set (train augmentation, as the reference) recording class-wise BN stats.

    The train set is ``get_dataset(dataset, "train", data_root)``, or ``splits("train")`` when given (a
    dataset get_dataset does not name; ``dataset`` then only names it).

    Batch b of the seeded order is augmented with its own generator (seed, b), so
    each image gets the same pixels however the pass is split. Under
    torchrun, exact mode gives batch b to rank b % world and all-reduces the
    float64 moments (every rank returns the same result); EMA mode depends on
    batch order, so rank 0 runs it alone (the other ranks return ({}, layers)).
    """
    cfg, _ = squeeze_config(cfg, device)
    train = splits("train") if splits is not None else get_dataset(dataset, "train", root=data_root)
    streamed = not hasattr(train, "images")  # an ImageFolder tree: decoded in workers, seeded per image
    model = model.to(device).eval()
    gen = squeeze_stats_order(seed)
    mode = cfg["stats_mode"]
    collector = ClasswiseBNStats(model, train.num_classes, mode=mode, momentum=cfg["stats_momentum"],
                                 backend=backend)
    bs = cfg["stats_batch_size"]
    labels = train.targets if streamed else train.labels
    batches = list(batch_indices(len(labels), bs, gen, drop_last=False))
    rank, world = distributed.rank(), distributed.world_size()
    layers = [n for n, _ in collector.layers]
    if mode != "exact" and rank != 0:
        return {}, layers
    mine = range(rank, len(batches), world) if mode == "exact" else range(len(batches))
    collector.check_labels(labels)  # once for the pass: the per-batch updates read nothing back
    observe = compile_step(collector.observe, cfg["compile"])
    with collector.attached():
        if streamed:
            # the folder's train transform (RandomResizedCrop + flip + normalise) under a per-image seed
            stream = seeded_batches(train, [batches[b].tolist() for b in mine], seed + 1, cfg["stats_workers"])
            for x, y in tqdm(stream, total=len(mine), desc="class-wise BN stats", leave=False, disable=rank != 0):
                observe(model, x.to(device), y, validate=False)
        else:
            for b in tqdm(mine, desc="class-wise BN stats", leave=False, disable=rank != 0):
                idx = batches[b]
                x = _augment(train.images[idx], cfg, _stats_generator(seed, b), train.mean, train.std).to(device)
                observe(model, x, train.labels[idx], validate=False)
    if mode == "exact":
        collector.all_reduce_()
    return collector.result(), layers


def _stats_generator(seed: int, batch: int) -> torch.Generator:
    """The augmentation stream of batch ``batch`` of the statistics pass (independent of how batches are sharded)."""
    return stream("lpqld-squeeze-stats", seed, batch)


def _write_config(out: Path, config: dict[str, Any], seed: int, checkpoint: str | None) -> None:
    """config.json, written once the outputs it describes exist: a command that fails (bad dataset,
    full disk) leaves the config of the finished outputs in place."""
    if distributed.is_main():  # rank 0 writes shared files
        atomic_write_json(out / "config.json", _record(config, seed, checkpoint))


def _record(config: dict[str, Any], seed: int, checkpoint: str | None) -> dict[str, Any]:
    return {"config": config, "seed": seed, "checkpoint": checkpoint}


def _check_rerun(out: Path, config: dict[str, Any], cfg: dict[str, Any], seed: int,
                 checkpoint: str | None) -> None:
    """Refuse a teacher (trained or partly trained in ``out``) made with other teacher settings, seed or
    dataset: it would be reused as if it were the one asked for. The statistics settings may change (the
    statistics are recomputed)."""
    if checkpoint or not ((out / "teacher.pt").exists() or (out / "checkpoints" / "last.pt").exists()):
        return
    if not (out / "config.json").exists():
        return  # a folder from before config.json was written at the start: nothing to compare with
    rec = read_json(out / "config.json", "squeeze config")
    if rec.get("checkpoint"):
        return  # the teacher came from a checkpoint: the training settings did not make it
    old = rec.get("config", {})
    # more (or fewer) ensemble members leave the first teacher as it is
    diffs = schema.result_diff("squeeze", old.get("squeeze", {}), cfg, ignore=(*STATS_KEYS, "teachers"))
    if rec.get("seed") != seed:
        diffs.append(f"--seed {rec.get('seed')!r} -> {seed!r}")
    if old.get("dataset") != config.get("dataset"):
        diffs.append(f"dataset {old.get('dataset')!r} -> {config.get('dataset')!r}")
    if diffs:
        schema.refuse_rerun(out, diffs)


@locks_folder("out", "squeeze", when=lambda a: distributed.is_main())
def run_squeeze(config: dict[str, Any], out: str | Path, seed: int = 0, device: str = "cpu",
                checkpoint: str | None = None, data_root: str | None = None) -> dict[str, Any]:
    """Teacher (trained, resumed or loaded) + class-wise BN statistics into ``out``."""
    out = Path(out)
    recorded = None
    if (out / "config.json").exists():
        recorded = read_json(out / "config.json", "squeeze config").get("config", {}).get("squeeze")
    cfg, notes = squeeze_config(config["squeeze"], device, recorded)
    config = {**config, "squeeze": cfg}
    _check_rerun(out, config, cfg, seed, checkpoint)
    schema.announce("squeeze", notes)
    out.mkdir(parents=True, exist_ok=True)
    if data_root is None:
        data_root = config.get("data_root")
    dataset = config["dataset"]
    t0 = time.perf_counter()
    metrics: list[dict] = []
    if checkpoint:
        meta = get_dataset(dataset, "train", root=data_root)
        model = load_teacher(checkpoint, build_teacher(cfg, meta))
    elif (out / "teacher.pt").exists():
        meta = get_dataset(dataset, "train", root=data_root)
        model = load_teacher(out / "teacher.pt", build_teacher(cfg, meta))
        metrics = read_json(out / "metrics.json", "squeeze metrics").get("teacher", [])
        print(f"squeeze: teacher already trained ({out / 'teacher.pt'})")
    else:
        if cfg["checkpoint_required"]:
            raise ValueError(f"preset for {dataset} expects a teacher checkpoint (--checkpoint PATH)")
        model, metrics = train_teacher(cfg, dataset, out, seed, device, data_root,
                                       record=_record(config, seed, checkpoint))
        model = model.to(memory_format=torch.contiguous_format)
        if distributed.is_main():
            save_tensors(out / "teacher.pt", model.state_dict())
            _plot_curve(metrics, out / "teacher_curve.png")
    if cfg["teachers"] > 1:
        if checkpoint:
            raise ValueError("squeeze.teachers > 1 trains the ensemble members; a teacher given by --checkpoint "
                             "has no training settings to train them with")
        train_members(cfg, config, out, seed, device, data_root)
    teacher_time = time.perf_counter() - t0
    t1 = time.perf_counter()
    teacher_hash = sha256_tensors(model.state_dict())
    summary_path = out / "metrics.json"
    if (out / "bn_stats.pt").exists() and summary_path.exists():
        done = read_json(summary_path, "squeeze metrics")
        # runs recorded before stats_config existed name only stats_mode
        have = done.get("stats_config") or {"stats_mode": done.get("stats_mode")}
        if done.get("teacher_sha256") == teacher_hash and all(cfg[k] == v for k, v in have.items()):
            print(f"squeeze: done already ({out})")
            _write_config(out, config, seed, checkpoint)
            return done
    stats, layers = collect_class_stats(model, dataset, cfg, seed, device, data_root)
    if distributed.is_main():
        save_bn_stats(out / "bn_stats.pt", stats, layers, cfg["stats_mode"], teacher_hash)
    stats_time = time.perf_counter() - t1
    train = get_dataset(dataset, "train", root=data_root)
    test = get_dataset(dataset, "test", root=data_root)
    acc = evaluate_dataset(model, test, train.mean, train.std, num_workers=cfg["stats_workers"])["acc"]
    summary = {"teacher": metrics, "teacher_test_acc": acc, "teacher_sha256": teacher_hash,
               "bn_layers": len(bn_layers(model)), "teacher_seconds": teacher_time, "stats_seconds": stats_time,
               "stats_mode": cfg["stats_mode"], "stats_config": {k: cfg[k] for k in STATS_KEYS}}
    if distributed.is_main():
        _write_config(out, config, seed, checkpoint)
        atomic_write_json(out / "metrics.json", summary)
        print(f"squeeze: teacher test top-1 {acc:.2f}% | class-wise stats of {len(layers)} BN layers in "
              f"{stats_time:.1f}s | {out}")
    distributed.barrier()  # the next stage reads what rank 0 wrote
    return summary
