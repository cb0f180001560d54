"""Generate README's Performance table and docs/PERFORMANCE.md's tables against torch.compile from the committed
benchmark result files (never typed by hand).

Sources: the full run in bench/results/ (results.csv + run_meta.json) and the single-kernel runs kept under
docs/results/ (results.md files written by ``bench.run``, which name their command, commit and bandwidth).
Every row compares our implementation with the *fastest plain-PyTorch strategy measured at the same size in
the same process* (the strongest baseline), and gives the reference code's own strategy only beside it.

Bandwidth: a row's fraction of the read bandwidth is taken against the ``bandwidth`` row of the run that
measured the row. ``bench.run --only K`` replaces the bandwidth rows of results.csv while keeping the other
kernels' rows, whose stored ``frac_read_bw`` then refers to a bandwidth that is no longer in the file; for
those rows the table prints "n/a" and the time against the same-run floor (read / write pass of the same
tensors), which needs no bandwidth figure.

    .venv/bin/python scripts/perf_tables.py            # rewrite the blocks in README.md and docs/PERFORMANCE.md
    .venv/bin/python scripts/perf_tables.py --check    # exit 1 if a block is out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import latest_rows, read_rows, read_runs  # noqa: E402
from lpqld_fast.io_utils import atomic_write_bytes  # noqa: E402

MARK = "perf:readme"
VERSUS_MARK = "perf:compiled"
PERF_DOC = "docs/PERFORMANCE.md"
CSV = "bench/results"  # results.csv + run_meta.json
CRF_MD = "docs/results/bench_cpu_epyc_crop_resize_flip.md"
SLKL_MD = "docs/results/bench_cpu_epyc_soft_label_kl.md"
RECOVER_MD = "docs/results/bench_cpu_epyc_recover_1thread.md"


@dataclass(frozen=True)
class Claim:
    """One table row: ``ours`` against the fastest of ``plain`` per size (sizes filtered by ``where``)."""

    kernel: str
    what: str
    source: str  # CSV (the bench/results directory), or a docs/results/*.md written by bench.run
    ours: str
    plain: tuple[str, ...]  # every plain-PyTorch impl measured; the fastest per size is the baseline
    reference: str | None = None  # the reference code's strategy, shown beside the strongest baseline
    floor: str | None = None  # same-run traffic floor (read-pass, write-pass, ...)
    where: str = ""  # substring every used `sizes` must contain


CLAIMS: tuple[Claim, ...] = (
    Claim("classwise_moments", "`classwise_moments` (squeeze), ResNet-18 BN inputs, K = 1000 / 10450", CSV, "cpp",
          ("torch-index_add", "torch-index_add-compiled", "reference-loop"), "reference-loop", "read-pass"),
    Claim("classwise_moments", "`classwise_moments`, ours eager vs `torch.compile`d index_add only", CSV, "cpp",
          ("torch-index_add-compiled",), "reference-loop", "read-pass"),
    Claim("classwise_moments", "`classwise_moments`, ours under `torch.compile`", CSV, "cpp-compiled",
          ("torch-index_add", "torch-index_add-compiled", "reference-loop"), "reference-loop", "read-pass"),
    Claim("segment_bn_loss", "`segment_bn_loss` fwd + bwd (recover), ResNet-18 / ConvNet BN shapes", CSV, "cpp",
          ("torch-index_add", "torch-index_add-compiled", "torch-var_mean", "torch-split", "reference-loop"),
          "reference-loop", "read+write-pass"),
    Claim("segment_bn_loss", "`segment_bn_loss` fwd + bwd, ours eager vs `torch.compile`d index_add only", CSV,
          "cpp", ("torch-index_add-compiled",), "reference-loop", "read+write-pass"),
    Claim("segment_bn_loss", "`segment_bn_loss` fwd + bwd, ours under `torch.compile`", CSV, "cpp-compiled",
          ("torch-index_add", "torch-index_add-compiled", "torch-var_mean", "torch-split", "reference-loop"),
          "reference-loop", "read+write-pass"),
    Claim("crop_resize_flip", "`crop_resize_flip` replay, uint8 -> fp32, 28-256 px (quick run)", CSV, "cpp",
          ("reference-loop", "torch-gather", "tv-tensor-loop", "torch-grid_sample", "torch-grid_sample-compiled",
           "pil-loop"), "pil-loop", "write-pass"),
    Claim("crop_resize_flip", "`crop_resize_flip` replay, ours eager vs `torch.compile`d grid_sample only", CSV,
          "cpp", ("torch-grid_sample-compiled",), "pil-loop", "write-pass"),
    Claim("crop_resize_flip", "`crop_resize_flip` replay, ours under `torch.compile`", CSV, "cpp-compiled",
          ("reference-loop", "torch-gather", "tv-tensor-loop", "torch-grid_sample", "torch-grid_sample-compiled",
           "pil-loop"), "pil-loop", "write-pass"),
    Claim("crop_resize_flip_bwd", "`crop_resize_flip` fwd + bwd (recover), fp32 (quick run)", CSV, "cpp",
          ("reference-loop", "torch-gather", "torch-grid_sample", "torch-grid_sample-compiled"), "reference-loop"),
    Claim("crop_resize_flip_bwd", "`crop_resize_flip` fwd + bwd, ours under `torch.compile`", CSV, "cpp-compiled",
          ("reference-loop", "torch-gather", "torch-grid_sample", "torch-grid_sample-compiled"), "reference-loop"),
    Claim("crop_resize_flip", "`crop_resize_flip` replay, uint8 -> fp32, 28-256 px (full run, no grid_sample rows)",
          CRF_MD, "cpp",
          ("reference-loop", "torch-gather", "tv-tensor-loop", "pil-loop"), "pil-loop", "write-pass"),
    Claim("crop_resize_flip_bwd", "`crop_resize_flip` fwd + bwd (recover), fp32 (full run, no grid_sample rows)",
          CRF_MD, "cpp",
          ("reference-loop", "torch-gather"), "reference-loop"),
    Claim("batched_roll", "`batched_roll` fwd + bwd (recover's jitter)", CRF_MD, "cpp",
          ("batched-gather", "reference-loop"), "reference-loop"),
    Claim("soft_label_kl", "`soft_label_kl` fwd + bwd (train), MR-k fp16 / int8", CSV, "cpp",
          ("torch-topk", "torch-topk-compiled", "reference-strategy", "op-reference"), "reference-strategy",
          "copy-pass"),
    Claim("soft_label_kl", "`soft_label_kl` fwd + bwd, ours eager vs `torch.compile`d k-column KL only", CSV, "cpp",
          ("torch-topk-compiled",), "reference-strategy", "copy-pass"),
    Claim("soft_label_kl", "`soft_label_kl` fwd + bwd, ours under `torch.compile`", CSV, "cpp-compiled",
          ("torch-topk", "torch-topk-compiled", "reference-strategy", "op-reference"), "reference-strategy",
          "copy-pass"),
    Claim("soft_label_kl", "`soft_label_kl` fwd + bwd at (1024, 10450, 200), full run (no k-column rows)", SLKL_MD,
          "cpp", ("reference-strategy", "op-reference"), None, "copy-pass", "B=1024"),
    Claim("store_read", "label store read, warm page cache", CSV, "store",
          ("reference-torch-load", "reference-torch-load-pickle"), None, None, "cache=warm"),
    Claim("relabel", "relabel at r = 0.9 (generate only the kept batches)", CSV, "store-kept",
          ("reference-all-then-prune",)),
    Claim("train_epoch", "student epoch, data path (labels + replay + loss)", CSV, "ours", ("reference-loop",),
          None, None, "part=data"),
    Claim("train_epoch", "student epoch, fp32 student (same numerics)", CSV, "ours", ("reference-loop",),
          None, "model-steps", "part=epoch"),
    Claim("recover", "recover loop, many classes per pass, fp32", RECOVER_MD, "many-classes-per-pass",
          ("reference-loop",), None),
)

# The end-to-end race files record neither commit nor CPU: both are stated here (docs/results/race_fmnist.md).
RACES: tuple[tuple[str, str, str], ...] = (
    ("docs/results/race_fmnist_fp32_seed0.json", "aea8095", "like for like (fp32 recover in both)"),
    ("docs/results/race_fmnist_bf16recover_seed0.json", "1314b25",
     "ours with `recover.bf16=true` against the reference's fp32: not like for like"),
)
RACE_MACHINE = "AMD EPYC, 2 cores"

# Stated under the table: the result files record the CPU's model name only, and two different hosts report
# "AMD EPYC".
NOTES = (
    "The `bench/results` rows of `classwise_moments`, `segment_bn_loss` and `crop_resize_flip` (`--quick`) and of "
    "`soft_label_kl` and `student_step` (full sizes) come from 1-thread runs on the AMD EPYC Zen 4 host (AVX-512), "
    "idle but for the benchmark; the other `bench/results` rows from the 2-thread full run on the same host. "
    "Repeated runs on this virtual machine drifted by up to 2x in absolute time with the same ratios within a "
    "run: compare ratios within a run.",
)


@dataclass(frozen=True)
class Run:
    command: str
    commit: str
    threads: int
    cpus: int
    cpu: str
    read_bw: float | None  # best read GB/s of this run's own bandwidth row; None when that row is gone
    isa: str = ""  # torch's CPU capability (AVX2, AVX512, ...) where the run recorded it


@dataclass(frozen=True)
class Row:
    kernel: str
    impl: str
    sizes: str
    p50: float
    gbps: float
    run: Run


def _ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")


def load_csv(results_dir: Path) -> list[Row]:
    """results.csv rows, each tied to the run (run_meta.json beside it) whose time window holds its timestamp."""
    raw = latest_rows(read_rows(results_dir / "results.csv"))
    meta = read_runs(results_dir)
    windows: dict[tuple[str, str], dict] = {}
    for m in meta.values():
        windows[(m["command"], m["finished"])] = m

    def window_of(ts: str) -> dict | None:
        t = _ts(ts)
        for m in windows.values():
            end = _ts(m["finished"])
            # rows are stamped as they are measured; the run's wall time (+ a minute for set-up) bounds them
            if end - timedelta(seconds=float(m["wall_s"]) + 60) <= t <= end:
                return m
        return None

    bw: dict[tuple[str, str], float] = {}
    for r in raw:
        m = window_of(r["timestamp"])
        if r["kernel"] == "bandwidth" and r["impl"] == "read" and m is not None and float(r["frac_read_bw"]) > 0:
            bw[(m["command"], m["finished"])] = float(r["gbps"]) / float(r["frac_read_bw"])
    rows = []
    for r in raw:
        m = window_of(r["timestamp"])
        if m is None or r["kernel"] == "bandwidth":
            continue
        key = (m["command"], m["finished"])
        run = Run(m["command"], m["git_commit"], int(m["threads"]), int(m["cpus"]), r["cpu"],
                  bw.get(key), m.get("cpu_capability", ""))
        rows.append(Row(r["kernel"], r["impl"], r["sizes"], float(r["p50_ms"]), float(r["gbps"]), run))
    return rows


_RUN_LINE = re.compile(r"^- (\S+): `([^`]*)` — [\d.]+ s, load \S+ on (\d+) CPUs, (\d+) threads, commit (\S+),")
_ROW = re.compile(r"^\| `([^`]*)` \| [^|]+ \| ([^|]+) \| [^|]+ \| ([^|]+) \| [^|]+ \| ([^|]+) \|")


def load_md(path: Path) -> list[Row]:
    """Rows of a results.md written by bench.run; one file is one run, its bandwidth row included."""
    text = path.read_text(encoding="utf-8")
    cpu = re.search(r"^cpu: ([^;]+);", text, re.M)
    read_bw = re.search(r"read \(best\) ([\d.]+) GB/s", text)
    runs: dict[str, Run] = {}
    rows: list[Row] = []
    kernel = None
    for line in text.splitlines():
        if m := _RUN_LINE.match(line):
            runs[m.group(1)] = Run(m.group(2), m.group(5), int(m.group(4)), int(m.group(3)),
                                   cpu.group(1) if cpu else "?", float(read_bw.group(1)) if read_bw else None)
        elif line.startswith("## "):
            kernel = line[3:].split(" ")[0]
        elif (m := _ROW.match(line)) and kernel and kernel != "bandwidth":
            if not runs:
                raise ValueError(f"{path}: no 'Runs' line before the {kernel} table (not a bench.run results.md?)")
            run = runs.get(kernel) or next(iter(runs.values()))  # a module's extra kernels share its run
            rows.append(Row(kernel, m.group(2).strip(), m.group(1), float(m.group(3)), float(m.group(4)), run))
    return rows


def _range(values: Sequence[float], suffix: str = "x") -> str:
    """'1.20-3.40x' (or '1.20x' when all round alike), two decimals."""
    lo, hi = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{lo}{suffix}" if lo == hi else f"{lo}-{hi}{suffix}"


def claim_row(claim: Claim, rows: list[Row]) -> list[str] | None:
    mine = [r for r in rows if r.kernel == claim.kernel and claim.where in r.sizes]
    by_size: dict[str, dict[str, Row]] = {}
    for r in mine:
        by_size.setdefault(r.sizes, {})[r.impl] = r
    ratios, winners, refs, floors, fracs, runs = [], set(), [], [], [], set()
    for impls in by_size.values():
        ours = impls.get(claim.ours)
        plain = [impls[i] for i in claim.plain if i in impls]
        if ours is None or not plain:
            continue
        best = min(plain, key=lambda r: r.p50)
        ratios.append(best.p50 / ours.p50)
        winners.add(best.impl)
        runs.add(ours.run)
        if claim.reference and claim.reference in impls:
            refs.append(impls[claim.reference].p50 / ours.p50)
        if claim.floor and claim.floor in impls:
            floors.append(ours.p50 / impls[claim.floor].p50)
        if ours.run.read_bw and ours.gbps > 0:
            fracs.append(ours.gbps / ours.run.read_bw)
    if not ratios:
        return None
    run = sorted(runs, key=lambda r: r.commit)[0]
    return [claim.what, f"{len(ratios)}", " / ".join(sorted(winners)), _range(ratios),
            _range(refs) if refs else "–", _range(floors) if floors else "–",
            _range(fracs, "") if fracs else ("n/a" if run.read_bw is None else "–"),
            f"{run.cpu}, {run.cpus} cores, {run.threads} thread{'s' * (run.threads > 1)}", f"`{run.commit}`",
            f"`{claim.source}`"]


def race_rows(root: Path) -> list[list[str]]:
    out = []
    for rel, commit, note in RACES:
        d = json.loads((root / rel).read_text())
        rrt = d["recover_relabel_train"]
        acc = d["accuracy"]
        out.append([f"recover + relabel + train, Fashion-MNIST IPC10, seed {d['seed']}: {note}; students "
                    f"{acc['ours']['best']:.2f} vs {acc['reference']['best']:.2f}% (best)", "1",
                    f"reference strategy ({rrt['reference']:.0f} s vs ours {rrt['ours']:.0f} s)",
                    f"{rrt['speedup']:.2f}x", "–", "–", "–",
                    f"{RACE_MACHINE}, {d['threads']} thread{'s' * (d['threads'] > 1)} per pipeline", f"`{commit}`",
                    f"`{rel}`"])
    return out


HEADER = ("| what | sizes | strongest plain-PyTorch baseline (fastest per size) | ours vs it | ours vs the reference "
          "code's strategy | ours / same-run floor | fraction of read bandwidth | machine | commit | source |\n"
          "|---|---:|---|---:|---:|---:|---:|---|---|---|")


def readme_table(root: Path = ROOT) -> str:
    csv_rows = load_csv(root / CSV)
    md_rows = {src: load_md(root / src) for src in {c.source for c in CLAIMS if c.source != CSV}}
    lines = [HEADER]
    runs: dict[str, Run] = {}
    shown: set[tuple[str, ...]] = set()
    skipped = 0
    for claim in CLAIMS:
        rows = csv_rows if claim.source == CSV else md_rows[claim.source]
        cells = claim_row(claim, rows)
        if cells is not None:
            # "ours vs the compiled strategy only" repeats the headline row where that strategy is the strongest
            if tuple(cells[1:]) in shown:
                skipped += 1
                continue
            shown.add(tuple(cells[1:]))
            lines.append("| " + " | ".join(cells) + " |")
            for r in rows:
                if r.kernel == claim.kernel and r.impl == claim.ours:
                    runs.setdefault(f"{claim.source}|{r.run.command}|{r.run.commit}", r.run)
    lines += ["| " + " | ".join(cells) + " |" for cells in race_rows(root)]
    lines.append("")
    lines.append("Commands of the runs (with `.venv/bin/python`): "
                 + "; ".join(sorted({f"`{r.command}` at `{r.commit}`" for r in runs.values()})) + ".")
    lines += list(NOTES)
    if skipped:
        lines.append("A row of ours against the `torch.compile`d strategy alone is left out where it equals the row "
                     "above it (the compiled strategy is the strongest baseline at every size there).")
    if any(r.read_bw is None for r in runs.values()):
        lines.append("Fraction of read bandwidth \"n/a\": the bandwidth row of that run was replaced in "
                     "results.csv by a later `bench.run --only` run; the same-run floor column needs no "
                     "bandwidth figure.")
    return "\n".join(lines)


@dataclass(frozen=True)
class Versus:
    """docs/PERFORMANCE.md "Against torch.compile": every size of a kernel, each impl's p50, and ``ours``
    against the strongest of ``plain`` (eager or compiled)."""

    kernel: str
    impls: tuple[str, ...]  # the columns, in order (the ones a run lacks are left out)
    plain: tuple[str, ...]
    ours: tuple[str, ...]
    floor: str | None = None


VERSUS: tuple[Versus, ...] = (
    Versus("soft_label_kl", ("reference-strategy", "torch-topk", "torch-topk-compiled", "cpp", "cpp-compiled",
                             "copy-pass"), ("torch-topk", "torch-topk-compiled"), ("cpp", "cpp-compiled"),
           "copy-pass"),
    Versus("classwise_moments", ("reference-loop", "torch-index_add", "torch-index_add-compiled", "cpp",
                                 "cpp-compiled", "read-pass"), ("torch-index_add", "torch-index_add-compiled"),
           ("cpp", "cpp-compiled"), "read-pass"),
    Versus("segment_bn_loss", ("torch-var_mean", "torch-index_add", "torch-index_add-compiled", "cpp",
                               "cpp-compiled", "read+write-pass"), ("torch-index_add", "torch-index_add-compiled"),
           ("cpp", "cpp-compiled"), "read+write-pass"),
    Versus("crop_resize_flip", ("pil-loop", "torch-gather", "torch-grid_sample", "torch-grid_sample-compiled", "cpp",
                                "cpp-compiled", "write-pass"),
           ("torch-gather", "torch-grid_sample", "torch-grid_sample-compiled"), ("cpp", "cpp-compiled"),
           "write-pass"),
    Versus("crop_resize_flip_bwd", ("reference-loop", "torch-gather", "torch-grid_sample",
                                    "torch-grid_sample-compiled", "cpp", "cpp-compiled"),
           ("torch-gather", "torch-grid_sample", "torch-grid_sample-compiled"), ("cpp", "cpp-compiled")),
    Versus("student_step", ("torch-dense-step", "torch-topk-step", "torch-topk-step-compiled", "ours-step",
                            "ours-step-compiled", "model-step"),
           ("torch-dense-step", "torch-topk-step", "torch-topk-step-compiled"), ("ours-step", "ours-step-compiled"),
           "model-step"),
)


def _ms(v: float) -> str:
    return f"{v:.3g} ms"


def versus_table(v: Versus, rows: list[Row]) -> str | None:
    mine = [r for r in rows if r.kernel == v.kernel]
    if not mine:
        return None
    by_size: dict[str, dict[str, Row]] = {}
    for r in mine:
        by_size.setdefault(r.sizes, {})[r.impl] = r
    cols = [i for i in v.impls if any(i in impls for impls in by_size.values())]
    head = (["sizes", *cols, "strongest plain", *[f"{o} vs it" for o in v.ours if o in cols]]
            + ([f"{v.floor} / {v.ours[0]}"] if v.floor in cols else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for sizes, impls in by_size.items():
        plain = [impls[i] for i in v.plain if i in impls]
        best = min(plain, key=lambda r: r.p50) if plain else None
        cells = [f"`{sizes}`", *[_ms(impls[c].p50) if c in impls else "–" for c in cols],
                 best.impl if best else "–"]
        cells += [f"{best.p50 / impls[o].p50:.2f}x" if best and o in impls else "–" for o in v.ours if o in cols]
        if v.floor in cols:
            ours = impls.get(v.ours[0])
            cells.append(f"{impls[v.floor].p50 / ours.p50:.0%}" if ours and v.floor in impls else "–")
        lines.append("| " + " | ".join(cells) + " |")
    runs = sorted({(r.run.command, r.run.commit, r.run.threads, r.run.cpu + (f" ({r.run.isa})" if r.run.isa else ""))
                   for r in mine})
    said = "; ".join(f"`{c}` at `{k}`, {t} thread{'s' * (t > 1)}, {cpu}" for c, k, t, cpu in runs)
    return f"#### {v.kernel}\n\n{said}.\n\n" + "\n".join(lines)


def versus_tables(root: Path = ROOT) -> str:
    rows = load_csv(root / CSV)
    parts = [t for v in VERSUS if (t := versus_table(v, rows)) is not None]
    return ("Generated by `scripts/perf_tables.py` from `bench/results/` (p50 per call; \"vs it\" = the strongest "
            "plain strategy, eager or compiled, over ours; the last column is the same-run floor over ours, the "
            "fraction of the roofline reached).\n\n" + "\n\n".join(parts))


def rewrite(text: str, table: str, mark: str = MARK, name: str = "README.md") -> str:
    pattern = re.compile(rf"<!-- {mark} -->.*?<!-- /{mark} -->", re.S)
    if not pattern.search(text):
        raise ValueError(f"{name} has no <!-- {mark} --> ... <!-- /{mark} --> block")
    return pattern.sub(lambda _: f"<!-- {mark} -->\n{table}\n<!-- /{mark} -->", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT), help="repository root holding README.md and the result files")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md's block differs from the results")
    args = ap.parse_args(argv)
    root = Path(args.root)
    targets = [(root / "README.md", MARK, readme_table)]
    if (root / PERF_DOC).exists():
        targets.append((root / PERF_DOC, VERSUS_MARK, versus_tables))
    stale = []
    for path, mark, make in targets:
        old = path.read_text(encoding="utf-8")
        new = rewrite(old, make(root), mark, path.name)
        if new == old:
            continue
        stale.append(path.relative_to(root))
        if not args.check:
            atomic_write_bytes(path, new.encode())
    if args.check:
        for rel in stale:
            print(f"out of date: {rel} (run scripts/perf_tables.py)")
        return 1 if stale else 0
    print(f"rewrote {', '.join(map(str, stale))}" if stale else "up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
