"""Run the benchmark suite: python -m bench.run [--quick] [--out bench/results] [--only KERNEL].

Discovers every bench/bench_*.py module, measures memory bandwidth first
(bench_bandwidth), then calls each module's ``run(ctx)`` with one shared
:class:`bench.common.BenchContext`; rows go to OUT/results.csv as they are
measured, then OUT/results.md and OUT/<kernel>.png are written and the
markdown is printed. OUT/run_meta.json notes per kernel the command, wall
time, machine load, commit and native library hash of the run that measured it.

Without --only the CSV starts empty. With --only the rows of the other kernels
are kept and those of the selected kernels (and the bandwidth rows) replaced,
so one kernel can be re-measured without re-running the rest.

Module contract (see bench/README.md): module-level KERNEL (str, defaults to
the file name after "bench_"), optional BASELINE (impl the speed-ups are
relative to) and LIMIT (impl that is the practical floor),
``run(ctx: BenchContext) -> None`` which builds Cases and calls
ctx.time_group(cases) / ctx.time(case), and optionally
``summary(rows) -> list[str]`` whose lines go under the kernel's table.
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType

import torch

from bench.common import BenchContext, read_rows, record_run, write_report, write_rows

BENCH_DIR = Path(__file__).resolve().parent
FIRST = "bench_bandwidth"


def discover(bench_dir: Path = BENCH_DIR) -> list[str]:
    """Module names bench.bench_*, bandwidth first, the rest sorted."""
    names = sorted(p.stem for p in bench_dir.glob("bench_*.py"))
    return ([FIRST] if FIRST in names else []) + [n for n in names if n != FIRST]


def kernel_of(name: str, module: ModuleType | None) -> str:
    return str(getattr(module, "KERNEL", None) or name[len("bench_"):])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repeats (< 2 minutes)")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: only exercises the machinery (tests)")
    ap.add_argument("--out", default="bench/results", help="output folder (results.csv, results.md, PNGs)")
    ap.add_argument("--only", action="append", default=[], metavar="KERNEL",
                    help="run only this kernel (repeatable or comma-separated); bandwidth always runs")
    ap.add_argument("--batch", type=int, default=None, help="batch override for modules that have one")
    ap.add_argument("--devices", default=None, metavar="LIST",
                    help="comma-separated device types to measure on (cpu, cuda); default: cpu and cuda when present")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads before running")
    ap.add_argument("--report-only", action="store_true", help="re-make results.md and PNGs from the CSV")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # the same process settings as the CLI: both sides of every ratio get them
    Path(args.out).mkdir(parents=True, exist_ok=True)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, profile, argv)
    finally:
        torch.set_num_threads(threads_before)


def git_commit() -> str:
    """HEAD commit (short), "+dirty" when csrc/, lpqld_fast/ or bench/ have changed or uncommitted files."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "csrc", "lpqld_fast", "bench",
                                ":!bench/results"], cwd=BENCH_DIR.parent, capture_output=True, text=True,
                               timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty.strip() else "")


def native_so_sha1() -> str:
    """First 12 hex digits of the sha1 of the built lpqld_fast._C library (which kernels were timed)."""
    import hashlib

    libs = sorted((BENCH_DIR.parent / "lpqld_fast").glob("_C*.so"))
    if not libs:
        return "none"
    return hashlib.sha1(libs[0].read_bytes()).hexdigest()[:12]


def _main(args: argparse.Namespace, profile: str, argv: list[str] | None) -> int:
    from lpqld_fast.runtime import tune_cpu_allocator

    out = Path(args.out)
    csv_path = out / "results.csv"
    only = {k.strip() for item in args.only for k in item.split(",") if k.strip()}

    modules: dict[str, ModuleType] = {}
    failures: list[str] = []
    for name in discover():
        try:
            modules[name] = importlib.import_module(f"bench.{name}")
        except Exception:  # noqa: BLE001 - a broken module must not stop the others
            kernel = name[len("bench_"):]
            if not only or kernel in only or name == FIRST:
                failures.append(f"import bench.{name} failed:\n{traceback.format_exc()}")
            else:
                print(f"note: bench.{name} does not import (not selected, ignored)", file=sys.stderr)
    baselines = {kernel_of(n, m): m.BASELINE for n, m in modules.items() if getattr(m, "BASELINE", None)}
    limits = {kernel_of(n, m): m.LIMIT for n, m in modules.items() if getattr(m, "LIMIT", None)}
    summaries = {kernel_of(n, m): m.summary for n, m in modules.items() if callable(getattr(m, "summary", None))}

    if not args.report_only:
        selected = [n for n, m in modules.items()
                    if n == FIRST or not only or kernel_of(n, m) in only or n[len("bench_"):] in only]
        known = {kernel_of(n, m) for n, m in modules.items()} | {n[len("bench_"):] for n in modules}
        for k in sorted(only - known):
            failures.append(f"--only {k}: no bench module has KERNEL {k!r} (have {sorted(known)})")
        rerun = {kernel_of(n, modules[n]) for n in selected}
        kept = [r for r in read_rows(csv_path) if only and r["kernel"] not in rerun] if csv_path.exists() else []
        write_rows(csv_path, kept)

        opts: dict = {"batch": args.batch} if args.batch else {}
        if args.devices:
            devs = [d.strip() for d in args.devices.split(",") if d.strip()]
            bad = [d for d in devs if d not in ("cpu", "cuda")]
            if bad or not devs:
                print(f"--devices: expected a comma-separated list of cpu, cuda; got {args.devices!r}", file=sys.stderr)
                return 2
            if "cuda" in devs and not torch.cuda.is_available():
                print("--devices cuda: no CUDA device here", file=sys.stderr)
                return 2
            opts["devices"] = devs
        if profile == "tiny":
            opts["bw_bytes"] = 8 << 20
        ctx = BenchContext(csv_path, profile=profile, options=opts)
        t_all = time.perf_counter()
        load_start = list(os.getloadavg())
        for name in selected:
            mod = modules[name]
            if not hasattr(mod, "run"):
                print(f"note: bench.{name} has no run(ctx) (pytest-only module), skipped", file=sys.stderr)
                continue
            print(f"== bench.{name} ({profile})", flush=True)
            t0 = time.perf_counter()
            try:
                mod.run(ctx)
            except Exception:  # noqa: BLE001
                failures.append(f"bench.{name}.run failed:\n{traceback.format_exc()}")
                print(failures[-1], file=sys.stderr)
            print(f"== bench.{name}: {time.perf_counter() - t0:.1f} s", flush=True)
            if name == FIRST and not ctx.read_bw_by_device:
                failures.append("bench_bandwidth measured no device's bandwidth")
        failures.extend(ctx.failures)
        wall = time.perf_counter() - t_all
        print(f"== total {wall:.1f} s; rows in {csv_path}", flush=True)
        record_run(out, rerun, {
            "command": "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv),
            "profile": profile,
            "wall_s": round(wall, 1),
            "loadavg_start": load_start,
            "loadavg_end": list(os.getloadavg()),
            "cpus": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the ISA level ATen's kernels use
            "threads": torch.get_num_threads(),
            "allocator": tune_cpu_allocator(),
            "git_commit": git_commit(),
            "native_so_sha1": native_so_sha1(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })

    md_path, md, pngs = write_report(csv_path, out, baselines, limits, summaries)
    print()
    print(md)
    print(f"wrote {md_path} and {', '.join(str(p) for p in pngs) or 'no plots'}")
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f" - {f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
