"""Command line: ``lpqld <stage> ...`` (also ``python -m lpqld_fast.cli``).

Stages: squeeze, recover, relabel, train, distill (all of them), report.
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

from lpqld_fast.presets import PRESETS, apply_overrides, get_preset

_COMMANDS: dict[str, Callable[[argparse.Namespace, dict[str, Any]], Any]] = {}


def command(name: str):
    def register(fn):
        _COMMANDS[name] = fn
        return fn

    return register


def _config(args: argparse.Namespace) -> dict[str, Any]:
    preset = args.preset or args.dataset
    config = get_preset(preset)
    return apply_overrides(config, args.set or [])


@command("squeeze")
def _squeeze(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from lpqld_fast.squeeze import run_squeeze

    return run_squeeze(config, Path(args.out) / "squeeze", seed=args.seed, device=args.device,
                       checkpoint=args.checkpoint)


@command("recover")
def _recover(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from lpqld_fast.pipeline import stage_dirs
    from lpqld_fast.recover import run_recover

    d = stage_dirs(args.out)
    return run_recover(config, d["squeeze"], d["recover"], seed=args.seed, device=args.device,
                       units_at_once=args.units_at_once)


@command("relabel")
def _relabel(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from lpqld_fast.distributed import is_main
    from lpqld_fast.pipeline import run_relabel_stage

    store = run_relabel_stage(config, args.out, seed=args.seed, device=args.device)
    if is_main():  # issue 8: one line per run, not per rank
        print(store)
    return store


@command("train")
def _train(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from lpqld_fast.distributed import is_main
    from lpqld_fast.pipeline import stage_dirs
    from lpqld_fast.train import run_train

    d = stage_dirs(args.out)
    summary = run_train(config, d["recover"], d["relabel"], d["train"], seed=args.seed, device=args.device)
    if is_main():  # issue 8
        print(f"student test top-1: {summary['selected_acc']:.2f}% (selected by {summary['selection']}), "
              f"last {summary['last_acc']:.2f}%, best of the test evaluations {summary['best_acc']:.2f}%")
    return summary


@command("distill")
def _distill(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    from lpqld_fast.pipeline import run_distill

    return run_distill(config, args.out, seed=args.seed, device=args.device, checkpoint=args.checkpoint,
                       units_at_once=args.units_at_once)


@command("report")
def _report(args: argparse.Namespace, config: dict[str, Any]) -> Any:
    if args.what == "storage":
        from lpqld_fast.store.accounting import storage_markdown, storage_report

        path = Path(args.out) / "relabel" if (Path(args.out) / "relabel").is_dir() else Path(args.out)
        print(storage_markdown(storage_report(path)))
        return None
    from lpqld_fast.report import write_report

    return write_report(args.out, diversity=not args.no_diversity)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit status 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _print_error(msg: str) -> None:
    """The error on a line of its own: a progress bar left open by the failed stage ends without a newline."""
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):
        sys.stderr.write("\n")
    print(msg, file=sys.stderr)


def _one_line(e: BaseException) -> str:
    """The exception's message on one line (some, e.g. load_state_dict's, span many)."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _check_device(device: str) -> None:
    """Refuse a device string torch cannot parse or a device this machine lacks, before any work."""
    import torch

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


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="lpqld", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", default="fashion-mnist", choices=sorted(PRESETS),
                       help="dataset preset (default: fashion-mnist)")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="alias of --dataset")
        p.add_argument("--out", default="runs/fashion-mnist", help="run directory (one folder per stage inside)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--data-root", default=None,
                       help="dataset location (default: the preset's), for every stage that reads it")
        p.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE",
                       help="override a preset field, e.g. --set squeeze.epochs=2 (repeatable)")

    p = sub.add_parser("squeeze", help="train/load the teacher and collect class-wise BN statistics")
    common(p)
    p.add_argument("--checkpoint", default=None, help="teacher weights to use instead of training one")
    p = sub.add_parser("recover", help="synthesise IPC images per class (class-wise batching + BN supervision)")
    common(p)
    p.add_argument("--units-at-once", type=int, default=None,
                   help="classes optimised in one forward pass (default: chosen from free memory)")
    p = sub.add_parser("relabel", help="store augmentations + pruned, top-k quantised teacher labels")
    common(p)
    p = sub.add_parser("train", help="train the student on the distilled images and stored labels")
    common(p)
    p = sub.add_parser("distill", help="squeeze -> recover -> relabel -> train -> report")
    common(p)
    p.add_argument("--checkpoint", default=None, help="teacher weights to use instead of training one")
    p.add_argument("--units-at-once", type=int, default=None,  # issue 8: fixes recover's grouping across runs
                   help="recover: classes optimised in one forward pass (default: chosen from free memory)")
    p = sub.add_parser("report", help="write the run report (or print the storage table)")
    common(p)
    p.add_argument("what", nargs="?", default="run", choices=["run", "storage"])
    p.add_argument("--no-diversity", action="store_true", help="skip the diversity metrics")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lpqld_fast import distributed
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()

    def rank() -> str:
        return f" [rank {distributed.rank()}]" if distributed.world_size() > 1 else ""

    try:
        config = _config(args)
        _check_device(args.device)
        if args.data_root is not None:
            # every stage that reads the dataset (squeeze, train's evaluation, report, real-image selection)
            # takes it from the config; the location does not change what a run is
            config["data_root"] = args.data_root
        # Issue 8: under torchrun (WORLD_SIZE > 1) join the process group; "cuda" becomes cuda:LOCAL_RANK.
        args.device = distributed.init_from_env(args.device)
        _COMMANDS[args.command](args, config)
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
