"""Write the run record of a `make demo`-style run (what docs/results/demo/ holds and results_tables.py reads).

    .venv/bin/python scripts/demo_record.py RUN_DIR docs/results/demo/NAME --wall SECONDS \\
        --command "make demo SEED=1 OUT=RUN_DIR" --load "0.7 (idle)"

Reads the run's own files (squeeze/metrics.json, train/train_metrics.json with its record of commit, seed,
machine and config, timings.json when `distill` wrote one) and writes NAME/record.json: one small file per run
with the numbers the README's demo table shows. ``--wall`` is the wall time of the whole command as measured
outside it (e.g. /usr/bin/time); omit it for runs made stage by stage.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpqld_fast.io_utils import atomic_write_json, read_json  # noqa: E402


def demo_record(run: Path, *, command: str, wall: float | None, load: str | None) -> dict:
    squeeze = read_json(run / "squeeze" / "metrics.json", "squeeze metrics")
    train = read_json(run / "train" / "train_metrics.json", "train metrics")
    rec = train["record"]
    sq = rec["config"]["squeeze"]
    timings = read_json(run / "timings.json", "stage timings") if (run / "timings.json").exists() else None
    preset = read_json(run / "run.json", "run record").get("preset") if (run / "run.json").exists() else None
    return {
        "command": command,
        "preset": preset,
        "seed": rec["seed"],
        "teacher_seed": read_json(run / "squeeze" / "config.json", "squeeze config").get("seed"),
        "teacher": f"{sq['model']} width {sq.get('width') or 128}, {sq['epochs']} epochs",
        "commit": rec["commit"][:7],
        "machine": {**rec["machine"], "load": load},
        "wall_seconds": wall,
        "stage_seconds": timings,
        "teacher_test_acc": squeeze["teacher_test_acc"],
        "student_selected_acc": train["selected_acc"],
        "student_last_acc": train["last_acc"],
        "selection": train["selection"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the run directory (--out of the command)")
    ap.add_argument("dest", type=Path, help="folder for record.json, e.g. docs/results/demo/zen3-seed0")
    ap.add_argument("--command", required=True, help="the command that made the run")
    ap.add_argument("--wall", type=float, default=None, help="wall seconds of the whole command")
    ap.add_argument("--load", default=None, help="the machine's load while it ran (uptime)")
    args = ap.parse_args(argv)
    atomic_write_json(args.dest / "record.json",
                      demo_record(args.run, command=args.command, wall=args.wall, load=args.load))
    print(f"wrote {args.dest / 'record.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
