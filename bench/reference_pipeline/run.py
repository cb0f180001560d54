"""End-to-end run of the reference strategy: class-wise BN stats -> recover -> relabel -> train.

    python -m bench.reference_pipeline.run --teacher <squeeze_dir> --out <dir> --ipc 10 --seed 0 [--quick]
        [--set stage.key=value ...] [--settings overrides.json] [--data-root DIR] [--threads N] [--quiet]

Settings mirror ``lpqld_fast.presets.get_preset("fashion-mnist")`` (stages
squeeze / recover / relabel / train) plus the reference-only knobs listed in
README.md. Writes into ``--out``: settings.json, stats/ (class-wise BN
statistics), recover/png/<class>/*.png, relabel/batch_<n>.tar,
timings.json (wall seconds per stage) and result.json (best and last test top-1).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lpqld_fast.data import get_dataset
from lpqld_fast.io_utils import atomic_write_json
from lpqld_fast.models import get_model
from lpqld_fast.presets import apply_overrides, get_preset
from lpqld_fast.train import TRAIN_DEFAULTS

from .recover import run_recover
from .relabel import run_relabel
from .stats import collect_classwise_stats
from .train import run_train

MODEL_NAME = "convnet-bn"

# How our pipeline runs the same arithmetic faster (bf16 autocast, NHWC layouts), not part of the algorithm: the
# reference strategy is the public scripts' fp32 NCHW, so these preset keys are not carried over.
OURS_ONLY_SPEED = ("bf16", "channels_last")

# Reference-only knobs, added on top of the preset (README.md explains each).
REFERENCE_EXTRAS: dict[str, dict[str, Any]] = {
    "squeeze": {"stats_limit": None},
    "recover": {"crop_scale": [0.08, 1.0], "classes": None},
    "relabel": {"value_dtype": "fp16", "rrc_scale": [0.08, 1.0], "rrc_ratio": [3 / 4, 4 / 3],
                "prune_mode": "first_k"},
    "train": {"eval_limit": None, "pool_key": "first_index", "checkpoint_every_epoch": True},
}
# Keys of lpqld_fast's train defaults that the reference pipeline reads (train.check_config refuses values it
# cannot re-create for the others it reads: pool, calibrate_batches, hard_labels, bf16, warmup_epochs).
TRAIN_KEYS = ("model", "epochs", "batch_size", "optimizer", "lr", "weight_decay", "momentum", "warmup_epochs", "pool",
              "temperature", "t0", "t_decay", "t_step", "t_floor", "calibrate", "student_t", "calibrate_batches",
              "t2_scale", "hard_labels", "eval_every", "bf16")

# --quick: a smoke run (< 1 min on 2 cores): tiny iteration/epoch counts and data subsets.
QUICK: dict[str, dict[str, Any]] = {
    "squeeze": {"stats_limit": 1000},
    "recover": {"iterations": 10},
    "relabel": {"epochs": 2},
    "train": {"epochs": 2, "eval_every": 1, "eval_limit": 500},
}


def reference_settings(quick: bool = False, ipc: int | None = None) -> dict[str, Any]:
    """The Fashion-MNIST preset of lpqld_fast plus the reference-only knobs (a new dict)."""
    preset = get_preset("fashion-mnist")
    s: dict[str, Any] = {"dataset": preset["dataset"]}
    sq = preset["squeeze"]
    s["squeeze"] = {k: sq[k] for k in ("model", "stats_mode", "stats_momentum", "stats_batch_size", "augment",
                                       "crop_pad")}
    for stage in ("recover", "relabel"):
        s[stage] = {k: copy.deepcopy(v) for k, v in preset[stage].items() if k not in OURS_ONLY_SPEED}
    # Our train stage fills unset keys from TRAIN_DEFAULTS and takes the batch size from the label store.
    train = {**TRAIN_DEFAULTS, "batch_size": preset["relabel"]["batch_size"], **preset["train"]}
    train = {k: v for k, v in train.items() if k not in OURS_ONLY_SPEED}
    s["train"] = {k: copy.deepcopy(train[k]) for k in TRAIN_KEYS if k in train}
    for stage, extra in REFERENCE_EXTRAS.items():
        s[stage].update(copy.deepcopy(extra))
    if quick:
        for stage, extra in QUICK.items():
            s[stage].update(extra)
    if ipc is not None:
        s["recover"]["ipc"] = int(ipc)
    return s


def _merge(dst: dict, src: dict, where: str = "settings") -> None:
    for k, v in src.items():
        if k not in dst:
            raise ValueError(f"{where}: unknown key {k!r} (known: {sorted(dst)})")
        if isinstance(v, dict) and isinstance(dst[k], dict):
            _merge(dst[k], v, f"{where}.{k}")
        else:
            dst[k] = v


def load_teacher(squeeze_dir: Path, num_classes: int, in_chans: int, image_size: int) -> torch.nn.Module:
    """ConvNet-BN with the weights of <squeeze_dir>/teacher.pt (torch.load(weights_only=True))."""
    path = squeeze_dir / "teacher.pt"
    if not path.is_file():
        raise FileNotFoundError(f"teacher weights {str(path)!r} not found (expected the `lpqld squeeze` output)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    model = get_model(MODEL_NAME, num_classes, in_chans, image_size)
    model.load_state_dict(state)
    return model


def run(squeeze_dir: str | Path, out: str | Path, settings: dict[str, Any], seed: int = 0,
        data_root: str | None = None, verbose: bool = True, command: str | None = None) -> dict[str, Any]:
    """Run all stages; write settings.json, timings.json and result.json into ``out``; return the result."""
    squeeze_dir, out = Path(squeeze_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if settings["squeeze"]["model"] != MODEL_NAME or settings["train"]["model"] != MODEL_NAME:
        raise ValueError(f"the reference pipeline runs {MODEL_NAME!r} teacher and student only")
    atomic_write_json(out / "settings.json", settings)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    t = time.perf_counter()
    train_set = get_dataset(settings["dataset"], "train", root=data_root)
    test_set = get_dataset(settings["dataset"], "test", root=data_root)
    k, c_in, size = train_set.num_classes, train_set.in_chans, train_set.image_size
    mean, std = list(train_set.mean), list(train_set.std)
    teacher = load_teacher(squeeze_dir, k, c_in, size)

    def make_teacher() -> torch.nn.Module:  # the reference rebuilds and reloads the teacher for every class
        return load_teacher(squeeze_dir, k, c_in, size)

    timings["setup"] = time.perf_counter() - t

    sq = settings["squeeze"]
    t = time.perf_counter()
    class_stats = collect_classwise_stats(
        teacher, train_set.images, train_set.labels, k, mean, std, mode=sq["stats_mode"],
        momentum=float(sq["stats_momentum"]), batch_size=int(sq["stats_batch_size"]), augment=sq["augment"],
        crop_pad=int(sq["crop_pad"]), seed=seed, limit=sq.get("stats_limit"))
    timings["stats"] = time.perf_counter() - t
    torch.save({f"{n}.{w}": v for n, (m, var) in class_stats.items() for w, v in (("mean", m), ("var", var))},
               out / "class_stats.pt")
    if verbose:
        print(f"[reference stats] {sq['stats_mode']} class-wise stats of {len(class_stats)} BN layers: "
              f"{timings['stats']:.1f}s", flush=True)

    rc = settings["recover"]
    classes = rc.get("classes")
    classes = list(range(k)) if classes is None else [int(c) for c in classes]
    t = time.perf_counter()
    rec = run_recover(make_teacher, class_stats, rc, classes, (c_in, size, size), mean, std, out / "recover" / "png",
                      seed=seed, verbose=verbose)
    timings["recover"] = time.perf_counter() - t

    rl = settings["relabel"]
    t = time.perf_counter()
    rel = run_relabel(teacher, out / "recover" / "png", rl, out / "relabel", size, mean, std, seed=seed,
                      verbose=verbose)
    timings["relabel"] = time.perf_counter() - t

    tr = dict(settings["train"])
    if tr.pop("checkpoint_every_epoch", True):
        tr["checkpoint_dir"] = str(out / "train")
    t = time.perf_counter()
    res = run_train(lambda: get_model(MODEL_NAME, k, c_in, size), out / "recover" / "png", out / "relabel", tr,
                    rl.get("label", "mr"), k, size, mean, std, test_set.images, test_set.labels, seed=seed,
                    verbose=verbose)
    timings["train"] = time.perf_counter() - t
    timings["train_eval"] = res.pop("eval_seconds")
    timings["total"] = time.perf_counter() - t_all
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine()}
    atomic_write_json(out / "timings.json", {"seconds": timings, "env": env,
                                             "stages": ["setup", "stats", "recover", "relabel", "train"],
                                             "note": "train includes train_eval (test-set evaluations)"})
    result = {"best_acc": res["best_acc"], "last_acc": res["last_acc"], "quoted": "last",
              "seed": seed, "command": command, "teacher": str(squeeze_dir / "teacher.pt"),
              "recover": rec, "relabel": rel, "train": res, "settings": settings, "wall_seconds": timings["total"]}
    atomic_write_json(out / "result.json", result)
    if verbose:
        print(f"[reference] test top-1 best {res['best_acc']:.2f}% last {res['last_acc']:.2f}% | "
              + ", ".join(f"{n} {v:.1f}s" for n, v in timings.items()), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reference_pipeline.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="squeeze output directory holding teacher.pt")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--ipc", type=int, default=None, help="images per class (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny iteration/epoch counts: a smoke run (< 1 min)")
    ap.add_argument("--settings", default=None, help="JSON file of settings overrides ({stage: {key: value}})")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override one setting (repeatable), e.g. --set relabel.prune_ratio=0.9")
    ap.add_argument("--data-root", default=None, help="Fashion-MNIST IDX directory (default: the system one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads(N) before running (default: torch's own choice); time both "
                         "pipelines with the same value")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.ipc is not None and args.ipc < 1:
        ap.error(f"--ipc must be >= 1, got {args.ipc}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = reference_settings(args.quick, args.ipc)
    if args.settings:
        with open(args.settings) as f:
            _merge(settings, json.load(f))
    try:
        apply_overrides(settings, args.overrides)
    except ValueError as e:
        ap.error(str(e))
    command = " ".join(["python -m bench.reference_pipeline.run"] + (sys.argv[1:] if argv is None else list(argv)))
    run(args.teacher, args.out, settings, seed=args.seed, data_root=args.data_root, verbose=not args.quiet,
        command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
