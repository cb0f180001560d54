"""Command line: ``lpqld <stage> ...`` (also ``python -m lpqld_fast.cli``).

Stages: squeeze, recover, relabel, train, distill (all of them), report.
User errors print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
                       checkpoint=args.checkpoint, data_root=args.data_root)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lpqld", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--dataset", default="fashion-mnist", choices=sorted(PRESETS),
                       help="dataset preset (default: fashion-mnist)")
        p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="alias of --dataset")
        p.add_argument("--out", default="runs/fashion-mnist", help="run directory (one folder per stage inside)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--data-root", default=None, help="dataset location (default: the preset's)")
        p.add_argument("--set", action="append", metavar="STAGE.KEY=VALUE",
                       help="override a preset field, e.g. --set squeeze.epochs=2 (repeatable)")

    p = sub.add_parser("squeeze", help="train/load the teacher and collect class-wise BN statistics")
    common(p)
    p.add_argument("--checkpoint", default=None, help="teacher weights to use instead of training one")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
        _COMMANDS[args.command](args, config)
    except (ValueError, FileNotFoundError, IndexError, PermissionError, OSError) as e:
        print(f"lpqld {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lpqld {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
