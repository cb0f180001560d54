"""End-to-end race on Fashion-MNIST IPC10: our pipeline against the reference strategy.

    .venv/bin/python scripts/race_fmnist.py --teacher runs/results/squeeze --out runs/race [--seed 0]

Default (``--mode parallel``): both start at the same time from the same trained teacher, one thread each
(OMP_NUM_THREADS=1), so on the 2-core machine each has a core while both run; whichever finishes first leaves
the other the whole machine (which favours the slower one, i.e. the reference). ``--mode sequential
--threads N``: one after the other (ours first), each alone on the machine with N threads (the whole CPU, as
a user runs it):

- ours: ``lpqld distill --preset fashion-mnist`` with ``<out>/ours/squeeze`` linked to the teacher
  (squeeze is found done: teacher and class-wise statistics are reused), so it times recover, relabel,
  train (+ report);
- reference: ``python -m bench.reference_pipeline.run`` (the public scripts' strategy, fp32 NCHW, same
  preset settings), which computes its own class-wise statistics (its "stats" stage).

The race compares recover + relabel + train, the stages both run; the statistics pass is listed next to it
(ours: the squeeze run's ``stats_seconds``, measured when the teacher was made). Writes
``<out>/race.json`` and ``<out>/race.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("recover", "relabel", "train")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def main() -> int:
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="a finished `lpqld squeeze` directory (fashion-mnist)")
    ap.add_argument("--out", default="runs/race")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("parallel", "sequential"), default="parallel",
                    help="parallel: both at once, one thread each; sequential: one after the other, --threads each")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads per pipeline (parallel: 1, fixed; sequential: default all cores)")
    ap.add_argument("--ours-set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="a preset override for our pipeline only (repeatable), e.g. recover.bf16=true")
    args = ap.parse_args()
    teacher = Path(args.teacher).resolve()
    if not (teacher / "teacher.pt").exists() or not (teacher / "bn_stats.pt").exists():
        print(f"race: {teacher} is not a finished squeeze directory (teacher.pt, bn_stats.pt)", file=sys.stderr)
        return 2
    out = Path(args.out)
    ours, ref = out / "ours", out / "ref"
    ours.mkdir(parents=True, exist_ok=True)
    if not (ours / "squeeze").exists():
        os.symlink(teacher, ours / "squeeze")
    if args.mode == "parallel" and args.threads not in (None, 1):
        print("race: --mode parallel runs one thread per pipeline; use --mode sequential for more", file=sys.stderr)
        return 2
    threads = 1 if args.mode == "parallel" else (args.threads or os.cpu_count() or 1)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    py = sys.executable
    cmd_ours = [py, "-m", "lpqld_fast.cli", "distill", "--preset", "fashion-mnist", "--seed", str(args.seed),
                "--out", str(ours)] + [a for kv in args.ours_set for a in ("--set", kv)]
    cmd_ref = [py, "-m", "bench.reference_pipeline.run", "--teacher", str(teacher), "--out", str(ref), "--ipc", "10",
               "--seed", str(args.seed), "--threads", str(threads), "--quiet"]
    t0 = time.time()
    with open(out / "ours.log", "w") as lo, open(out / "ref.log", "w") as lr:
        walls: dict[str, float] = {}
        jobs = {"ours": (cmd_ours, lo), "ref": (cmd_ref, lr)}
        # parallel: both now; sequential: ours, then the reference once ours has exited
        waves = [["ours", "ref"]] if args.mode == "parallel" else [["ours"], ["ref"]]
        for wave in waves:
            start = time.time()
            procs = {name: subprocess.Popen(jobs[name][0], cwd=ROOT, env=env, stdout=jobs[name][1],
                                            stderr=subprocess.STDOUT) for name in wave}
            while any(name not in walls for name in wave):
                for name, p in procs.items():
                    if name not in walls and p.poll() is not None:
                        walls[name] = time.time() - start
                        if p.returncode != 0:
                            print(f"race: {name} failed (exit {p.returncode}); see {out / (name + '.log')}",
                                  file=sys.stderr)
                            return 1
                time.sleep(5)
    t_ours = _json(ours / "timings.json")
    t_ref = _json(ref / "timings.json")["seconds"]
    m_ours = _json(ours / "train" / "train_metrics.json")
    m_ref = _json(ref / "result.json")
    stats_ours = _json(teacher / "metrics.json").get("stats_seconds")
    race_ours = sum(t_ours[s] for s in STAGES)
    race_ref = sum(t_ref[s] for s in STAGES)
    result = {
        "commands": {"ours": " ".join(cmd_ours[1:]), "reference": " ".join(cmd_ref[1:])},
        "mode": args.mode, "threads": threads, "seed": args.seed, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
        "process_wall_seconds": walls,
        "ours_seconds": {s: t_ours[s] for s in STAGES}, "ours_stats_seconds_from_squeeze": stats_ours,
        "reference_seconds": {k: t_ref[k] for k in ("stats", *STAGES) if k in t_ref},
        "recover_relabel_train": {"ours": race_ours, "reference": race_ref, "speedup": race_ref / race_ours},
        "accuracy": {"ours": {"best": m_ours["best_acc"], "last": m_ours["last_acc"]},
                     "reference": {"best": m_ref.get("best_acc"), "last": m_ref.get("last_acc")}},
    }
    (out / "race.json").write_text(json.dumps(result, indent=2))
    rows = [f"| {s} | {t_ours[s]:.0f} s | {t_ref[s]:.0f} s | {t_ref[s] / t_ours[s]:.1f}x |" for s in STAGES]
    md = "\n".join([
        f"Race started {result['started']}, seed {args.seed}, "
        + ("one thread per pipeline, both at once." if args.mode == "parallel"
           else f"one pipeline after the other, {threads} threads each."),
        "",
        "| stage | ours | reference strategy | speed-up |",
        "|---|---:|---:|---:|",
        *rows,
        f"| **recover + relabel + train** | **{race_ours:.0f} s** | **{race_ref:.0f} s** | "
        f"**{race_ref / race_ours:.1f}x** |",
        f"| class-wise statistics | {stats_ours or float('nan'):.0f} s (squeeze) | {t_ref.get('stats', float('nan')):.0f} s |"
        f" |",
        "",
        f"Student test top-1: ours best {m_ours['best_acc']:.2f} / last {m_ours['last_acc']:.2f}; reference best "
        f"{m_ref.get('best_acc')} / last {m_ref.get('last_acc')}.",
    ])
    (out / "race.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
