"""Command line: ``lpqld <stage> ...`` (also ``python -m lpqld_fast.cli``).

Stages: squeeze, recover, relabel, train, distill (all of them), report; baseline: paper 001's
baseline (random real images, an expert's top-k labels) through the same stages.
User errors print one line and exit with status 2 (an internal error: one line, status 1;
LPQLD_DEBUG=1 shows its traceback).
Multi-process: ``torchrun --standalone --nproc_per_node=N -m lpqld_fast.cli <stage> ...``
(gloo on CPU, NCCL with --device cuda; see docs/LAUNCH.md).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from lpqld_fast import config as schema
from lpqld_fast import distributed
from lpqld_fast.data import DATASET_NAMES, dataset_info
from lpqld_fast.io_utils import atomic_write_json, read_json
from lpqld_fast.pipeline import (BASELINE_SETTINGS, check_store_size, run_baseline, run_distill, run_recover_stage,
                                 run_relabel_stage)
from lpqld_fast.presets import DATASET_PRESET, PRESETS, get_preset, preset_overrides
from lpqld_fast.records import pin_commit, stage_dirs
from lpqld_fast.recover import check_memory
from lpqld_fast.report import write_report
from lpqld_fast.runtime import apply_threads, tune_cpu_allocator
from lpqld_fast.squeeze import run_squeeze
from lpqld_fast.store.accounting import storage_markdown, storage_report
from lpqld_fast.train import run_train

_COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], Any]] = {}
STAGES = ("squeeze", "recover", "relabel", "train")
# The config sections each command reads (its --help lists their keys).
COMMAND_SECTIONS: dict[str, tuple[str, ...]] = {
    "squeeze": ("squeeze", "runtime"), "recover": ("recover", "runtime"), "relabel": ("relabel", "runtime"),
    "train": ("train", "runtime"), "distill": ("squeeze", "recover", "relabel", "train", "runtime"),
    "baseline": ("squeeze", "relabel", "train", "runtime"), "report": ("runtime",)}


def command(name: str):
    def register(fn):
        _COMMANDS[name] = fn
        return fn

    return register


def _run_record(run: Path) -> dict[str, Any] | None:
    """What the run in ``run`` was made on (dataset, data root, preset), or None for a fresh folder.

    run.json is binding once a stage folder exists (a first command that failed before any stage wrote
    its outputs may be corrected); a run from before run.json existed is read from squeeze/config.json.
    """
    if not any((run / s).is_dir() for s in STAGES):
        return None
    if (run / "run.json").exists():
        return read_json(run / "run.json", "run record")
    legacy = run / "squeeze" / "config.json"
    if legacy.exists():
        cfg = read_json(legacy, "squeeze config").get("config", {})
        return {"dataset": cfg.get("dataset"), "data_root": cfg.get("data_root"), "preset": None}
    return None


def _abs_root(root: str | None) -> str | None:
    return None if root is None else os.path.realpath(os.path.expanduser(root))


def _config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's config: preset, dataset, data root and --set overrides, every setting validated against the
    schema before anything runs; dataset and data root checked against what the run recorded."""
    overrides = [schema.parse_override(item) for item in args.set or []]
    top = {key: value for section, key, value in overrides if section is None}
    want_ds = args.dataset or top.get("dataset")
    want_root = _abs_root(args.data_root or top.get("data_root"))
    rec = _run_record(Path(args.out))
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not a preset; presets: {sorted(PRESETS)} (lpqld presets)")
    if want_ds is not None and want_ds not in PRESETS and want_ds not in DATASET_NAMES:
        raise ValueError(f"--dataset {want_ds!r} is neither a dataset {list(DATASET_NAMES)} nor a preset "
                         f"{sorted(PRESETS)}")
    if want_ds in PRESETS and want_ds not in DATASET_NAMES and args.preset is None:
        preset, dataset = want_ds, get_preset(want_ds)["dataset"]  # a preset named by --dataset: its dataset
    else:
        rec_preset = rec.get("preset") if rec else None
        preset = args.preset or (rec_preset if rec_preset in PRESETS and (want_ds in (None, rec["dataset"]))
                                 else None) or DATASET_PRESET.get(want_ds or "", "fashion-mnist")
        dataset = want_ds or (rec["dataset"] if rec else get_preset(preset)["dataset"])
    config = get_preset(preset)
    for section, key, value in overrides:
        if section is not None:
            config[section][key] = value
    if rec is not None:
        if rec.get("dataset") != dataset:
            raise ValueError(f"{args.out} holds a run on dataset {rec.get('dataset')!r}, not {dataset!r}; continue "
                             f"it without --dataset, or use another --out for {dataset!r}")
        if want_root is not None and want_root != rec.get("data_root"):
            had = rec.get("data_root")
            had = "the dataset's default location" if had is None else repr(had)
            raise ValueError(f"{args.out} holds a run on data root {had}, not {want_root!r}; "
                             f"continue it without --data-root, or use another --out")
        want_root = rec.get("data_root")
    config["dataset"], config["data_root"] = dataset, want_root
    config["preset"] = preset
    return schema.check_config(config)


def _write_run_record(run: Path, config: dict[str, Any], info: Any) -> None:
    """<run>/run.json: the dataset, its location and its measured metadata, read by every later command."""
    record = {"dataset": config["dataset"], "data_root": config["data_root"], "preset": config["preset"],
              "dataset_info": None if info is None else {
                  "num_classes": info.num_classes, "in_chans": info.in_chans, "image_size": info.image_size,
                  "mean": list(info.mean), "std": list(info.std),
                  "class_names": None if info.class_names is None else list(info.class_names)}}
    path = run / "run.json"
    if not path.exists() or read_json(path, "run record") != record:
        atomic_write_json(path, record)


def _check_sizes(command_name: str, config: dict[str, Any], info: Any, run: Path) -> None:
    """Sizes that cannot fit, refused before any stage starts (recover.ipc=1e12 is an 8 TB allocation)."""
    shape = (info.in_chans, info.image_size, info.image_size)
    if command_name in ("recover", "distill"):
        check_memory(config["recover"], info.num_classes, shape)
    if command_name in ("relabel", "distill", "baseline"):
        check_store_size(config, info, run)


@command("squeeze")
def _squeeze(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    return run_squeeze(config, Path(args.out) / "squeeze", seed=args.seed, device=args.device,
                       checkpoint=args.checkpoint)


@command("recover")
def _recover(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    d = stage_dirs(args.out)
    return run_recover_stage(config, d["squeeze"], d["recover"], seed=args.seed, device=args.device,
                             units_at_once=args.units_at_once)


@command("relabel")
def _relabel(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    store = run_relabel_stage(config, args.out, seed=args.seed, device=args.device)
    if distributed.is_main():  # one line per run, not per rank
        print(store)
    return store


@command("train")
def _train(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    d = stage_dirs(args.out)
    summary = run_train(config, d["recover"], d["relabel"], d["train"], seed=args.seed, device=args.device)
    if distributed.is_main():
        best = "" if summary["best_acc"] is None else f", best of the test evaluations {summary['best_acc']:.2f}%"
        print(f"student test top-1: {summary['selected_acc']:.2f}% (selected by {summary['selection']}), "
              f"last {summary['last_acc']:.2f}%{best}")
    return summary


@command("distill")
def _distill(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    return run_distill(config, args.out, seed=args.seed, device=args.device, checkpoint=args.checkpoint,
                       units_at_once=args.units_at_once)


@command("baseline")
def _baseline(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    # refused before the teacher trains: squeeze keeps one checkpoint per epoch, none for --checkpoint
    epochs = config["squeeze"]["epochs"]
    if args.expert_epoch is not None and args.checkpoint is not None:
        raise ValueError("--expert-epoch needs the teacher's epoch checkpoints, which --checkpoint does not have; "
                         "drop one of them")
    if args.expert_epoch is not None and not 1 <= args.expert_epoch <= epochs:
        raise ValueError(f"--expert-epoch {args.expert_epoch} is not an epoch of the teacher's training "
                         f"(squeeze.epochs={epochs}: 1 to {epochs})")
    return run_baseline(config, args.out, seed=args.seed, device=args.device, expert_epoch=args.expert_epoch,
                        checkpoint=args.checkpoint)


def _baseline_overrides(args: argparse.Namespace) -> list[str]:
    """The baseline's --set list: its defaults, then the user's --set, then --ipc and --k (which win)."""
    explicit = [f"recover.ipc={args.ipc}"] * (args.ipc is not None) + [f"relabel.k={args.k}"] * (args.k is not None)
    return [*BASELINE_SETTINGS, *(args.set or []), *explicit]


@command("report")
def _report(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    if args.what == "storage":
        path = Path(args.out) / "relabel" if (Path(args.out) / "relabel").is_dir() else Path(args.out)
        print(storage_markdown(storage_report(path)))
        return None
    return write_report(args.out, diversity=not args.no_diversity, config=config)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_error(msg: str) -> None:
    """The error on a line of its own: a progress bar left open by the failed stage ends without a newline."""
    if getattr(tqdm, "_instances", None):
        sys.stderr.write("\n")
    print(msg, file=sys.stderr)


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (some, e.g. load_state_dict's, span many)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _check_device(device: str) -> None:
    """Refuse a device string torch cannot parse or a device this machine lacks, before any work."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {device!r} is not a device ({_one_line(e)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} but no CUDA device is available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device!r} but only {torch.cuda.device_count()} CUDA device(s) are present")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: only cpu and cuda are supported")


BASELINE_HELP = f"""\
Paper 001 ("A Label is Worth a Thousand Images"): IPC randomly chosen REAL training images per class,
soft labels from an expert (the squeezed teacher after an early epoch, or the final one) keeping the
top k probabilities without renormalising, a student trained on them. Runs squeeze (the teacher and its
per-epoch checkpoints), recover (the real images, lpqld_fast.real_images), relabel (the expert,
lpqld_fast.experts; <out>/expert.json names it), train and report into --out, like distill; a rerun
resumes. Defaults that differ from distill's (--set overrides them; --ipc and --k win over --set):
  {chr(10).join("  " + item for item in BASELINE_SETTINGS)}
e.g. lpqld baseline --dataset fashion-mnist --ipc 10 --expert-epoch 2 --k 5 --out runs/baseline
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lpqld", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="settings (--set KEY=VALUE; defaults of the schema, then the fashion-mnist "
                                  "preset's where it differs):\n"
                                  + schema.options_help(COMMAND_SECTIONS[name], get_preset("fashion-mnist")))
        p.add_argument("--dataset", default=None,
                       help="dataset: fashion-mnist, imagefolder (any root/{train,val|test}/<class>/* tree), "
                            "tiny-imagenet, imagenet-1k, imagenet-21k-p, synthetic, or a preset name (default: "
                            "the run's recorded dataset, else the preset's)")
        p.add_argument("--preset", default=None,
                       help=f"settings preset, one of {sorted(PRESETS)} (default: the dataset's; lpqld presets)")
        p.add_argument("--out", default="runs/fashion-mnist", help="run directory (one folder per stage inside)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--data-root", default=None,
                       help="dataset location (recorded in <out>/run.json; later commands on the run reuse it)")
        p.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE",
                       help="override a setting, e.g. --set squeeze.epochs=2 (repeatable; keys below)")
        return p

    p = stage("squeeze", "train/load the teacher and collect class-wise BN statistics")
    p.add_argument("--checkpoint", default=None, help="teacher weights to use instead of training one")
    p = stage("recover", "synthesise IPC images per class (class-wise batching + BN supervision)")
    p.add_argument("--units-at-once", type=int, default=None,
                   help="classes optimised in one forward pass (default: chosen from free memory)")
    stage("relabel", "store augmentations + pruned, top-k quantised teacher labels")
    stage("train", "train the student on the distilled images and stored labels")
    p = stage("distill", "squeeze -> recover -> relabel -> train -> report")
    p.add_argument("--checkpoint", default=None, help="teacher weights to use instead of training one")
    p.add_argument("--units-at-once", type=int, default=None,  # fixes recover's grouping across runs
                   help="recover: classes optimised in one forward pass (default: chosen from free memory)")
    p = stage("baseline", "paper 001's baseline: random real images + an expert's top-k labels -> train -> report",
              BASELINE_HELP)
    p.add_argument("--ipc", type=int, default=None,
                   help="real training images per class, drawn at random per class (recover.ipc; default: the "
                        "preset's)")
    p.add_argument("--expert-epoch", type=int, default=None, metavar="E",
                   help="label with the teacher's weights after squeeze epoch E (squeeze/checkpoints/"
                        "epoch_00E.pt, 1 <= E <= squeeze.epochs; default: the final teacher)")
    p.add_argument("--k", type=int, default=None, help="labels kept per sample (relabel.k; default: the preset's)")
    p.add_argument("--checkpoint", default=None,
                   help="final teacher weights to use instead of training one (then only the final teacher "
                        "labels: there are no epoch checkpoints)")
    p = stage("report", "write the run report (or print the storage table)")
    p.add_argument("what", nargs="?", default="run", choices=["run", "storage"])
    p.add_argument("--no-diversity", action="store_true", help="skip the diversity metrics")
    sub.add_parser("presets", help="list the presets and the settings each overrides")
    return parser


def _print_presets() -> None:
    """``lpqld presets``: each preset's dataset and what it changes from the schema's defaults."""
    for name in sorted(PRESETS):
        over = preset_overrides(name)
        print(f"{name} (dataset {over.pop('dataset', None)!r}):")
        for section, values in over.items():
            if isinstance(values, dict):
                print(f"  {section}: " + ", ".join(f"{k}={schema._show(v)}" for k, v in values.items()))
    datasets = ", ".join(f"{d} -> {p}" for d, p in DATASET_PRESET.items())
    print(f"preset used when only --dataset is given: {datasets}; every key: lpqld <stage> --help")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        _print_presets()
        return 0
    tune_cpu_allocator()
    pin_commit()

    def rank() -> str:
        return f" [rank {distributed.rank()}]" if distributed.world_size() > 1 else ""

    try:
        _check_device(args.device)
        if args.command == "baseline":
            args.set = _baseline_overrides(args)
        config = _config(args)
        for section in schema.SECTIONS:  # every stage's device settings, before the first stage starts
            schema.check_device(section, config[section], args.device)
        # the dataset's metadata (an ImageFolder tree: measured) checks the location before anything is written
        info = dataset_info(config["dataset"], root=config["data_root"])
        _check_sizes(args.command, config, info, Path(args.out))
        runtime, _ = schema.resolve_auto("runtime", config["runtime"], args.device)
        config["runtime"] = runtime
        apply_threads(runtime["threads"])
        # under torchrun (WORLD_SIZE > 1) join the process group; "cuda" becomes cuda:LOCAL_RANK.
        args.device = distributed.init_from_env(args.device)
        _COMMANDS[args.command](args, config)
        if args.command != "report" and distributed.is_main():
            # after the command: a failed first command writes nothing (squeeze/config.json, written when
            # teacher training starts, records the dataset of a run killed before this point)
            _write_run_record(Path(args.out), config, info)
    except (ValueError, FileNotFoundError, IndexError, PermissionError, OSError) as e:
        # OSError covers a full disk (ENOSPC): the atomic writers leave every earlier file as it was
        _print_error(f"lpqld {args.command}{rank()}: error: {_one_line(e)}")
        return 2
    except KeyboardInterrupt:
        _print_error(f"lpqld {args.command}: interrupted; rerun the same command to resume")
        return 130
    except Exception as e:  # a bug, not a user error: still one line, the traceback on request
        if os.environ.get("LPQLD_DEBUG"):
            raise
        _print_error(f"lpqld {args.command}{rank()}: internal error: {type(e).__name__}: {_one_line(e)} "
                     "(set LPQLD_DEBUG=1 for the traceback)")
        return 1
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
