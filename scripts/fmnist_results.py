"""The Fashion-MNIST results table: SRe2L-style vs LPLD vs LPQLD across label budgets.

One teacher (squeeze) is shared; each recovery variant is made once per
(IPC, seed) and shared by the label configurations that use it; each row gets
its own run directory (symlinks to the shared squeeze/recover) with its own
relabel + train. Results go to <root>/results.json, results.md and
accuracy_vs_storage.png. Rerunning resumes (finished stages are skipped).

    .venv/bin/python scripts/fmnist_results.py --root runs/results --ipc 10 --seeds 0 --rows core
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpqld_fast.io_utils import atomic_write_bytes, atomic_write_json  # noqa: E402
from lpqld_fast.pipeline import run_relabel_stage, stage_dirs  # noqa: E402
from lpqld_fast.presets import get_preset  # noqa: E402
from lpqld_fast.recover import run_recover  # noqa: E402
from lpqld_fast.report import plot_accuracy_vs_storage, run_summary  # noqa: E402
from lpqld_fast.squeeze import run_squeeze  # noqa: E402
from lpqld_fast.train import run_train  # noqa: E402

RECOVERY = {  # name -> (class-wise batching, class-wise supervision)
    "sre2l": (False, False),
    "classwise": (True, True),
    "cb-only": (True, False),
    "cs-only": (False, True),
}
FACTORS = (1, 10, 20, 40, 100)


def bytes_per_sample(num_classes: int, n_images: int, label: str, k: int) -> float:
    """On-disk bytes per stored sample: labels + augmentation record (for matching budgets)."""
    idx = 1 if n_images <= 256 else 2 if n_images <= 32767 else 4
    aux = idx + 4 + 1 / 8
    if label == "dense":
        return 2 * num_classes + aux
    return 3 * k + aux  # fp16 value + uint8 class index


def rows_for(kind: str, num_classes: int, n_images: int) -> list[dict]:
    """Row specs: name, recovery variant, relabel overrides, train overrides, group."""
    sre2l_train = {"pool": "epoch", "temperature": "constant", "t0": 20.0, "calibrate": False, "student_t": "teacher"}
    lpld_train = {**sre2l_train, "pool": "lpld"}
    lpqld_train = {"pool": "lpqld", "temperature": "step", "calibrate": True}
    rows = []
    for f in FACTORS:
        r = 1 - 1 / f
        rows.append({"name": f"SRe2L x{f}", "recovery": "sre2l", "group": "SRe2L-style recovery",
                     "relabel": {"label": "dense", "prune_ratio": r}, "train": sre2l_train, "factor": f})
        rows.append({"name": f"LPLD x{f}", "recovery": "classwise", "group": "LPLD",
                     "relabel": {"label": "dense", "prune_ratio": r}, "train": lpld_train, "factor": f})
        if f == 1:
            continue
        for k in (1, 2, 3, 5):
            # Same total store bytes as the dense row at this factor: keep more batches of top-k labels.
            keep = (1 / f) * bytes_per_sample(num_classes, n_images, "dense", 0) / bytes_per_sample(
                num_classes, n_images, "mr", k)
            if keep >= 1:
                continue
            rows.append({"name": f"LPQLD x{f} MR-{k}", "recovery": "classwise", "group": f"LPQLD MR-{k}",
                         "relabel": {"label": "mr", "k": k, "prune_ratio": 1 - keep}, "train": lpqld_train,
                         "factor": f})
    if kind == "core":
        keep = {"SRe2L x1", "SRe2L x40", "SRe2L x100", "LPLD x1", "LPLD x40", "LPLD x100",
                "LPQLD x40 MR-2", "LPQLD x40 MR-3", "LPQLD x100 MR-2", "LPQLD x100 MR-3"}
        rows = [r for r in rows if r["name"] in keep]
    if kind in ("ablation", "all"):
        for name, rec in (("Ablation: SRe2L (no CB, no CS, epoch pool)", "sre2l"),
                          ("Ablation: + class-wise batching", "cb-only"),
                          ("Ablation: + class-wise supervision", "cs-only"),
                          ("Ablation: + CB + CS", "classwise")):
            for f in (1, 100):
                rows.append({"name": f"{name} x{f}", "recovery": rec, "group": "ablation",
                             "relabel": {"label": "dense", "prune_ratio": 1 - 1 / f}, "train": sre2l_train,
                             "factor": f})
            rows.append({"name": f"{name} + ILP x100", "recovery": rec, "group": "ablation",
                         "relabel": {"label": "dense", "prune_ratio": 0.99}, "train": lpld_train, "factor": 100})
    return rows


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(src, dst.parent), dst)


def main() -> int:
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/results")
    ap.add_argument("--ipc", type=int, nargs="+", default=[10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rows", default="core", choices=["core", "main", "all", "ablation"],
                    help="core: a few rows; main: every factor and k without the ablations; all: main + ablations")
    ap.add_argument("--only", default=None, help="substring filter on row names")
    ap.add_argument("--name", action="append", default=[], help="exact row name (repeatable): only these rows")
    ap.add_argument("--set", action="append", default=[], help="preset override stage.key=value for every row")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--tag", default="", help="results-<tag>.json, so several processes can share one root")
    args = ap.parse_args()
    from lpqld_fast.presets import apply_overrides

    base = apply_overrides(get_preset("fashion-mnist"), args.set)
    root = Path(args.root)
    if args.list:
        for ipc in args.ipc:
            for s in rows_for(args.rows, 10, 10 * ipc):
                if (not args.only or args.only in s["name"]) and (not args.name or s["name"] in args.name):
                    print(f"IPC{ipc}", s["name"], s["relabel"], s["train"])
        return 0
    t0 = time.perf_counter()
    squeeze_dir = root / "squeeze"
    run_squeeze(base, squeeze_dir, seed=0)
    results_path = root / (f"results-{args.tag}.json" if args.tag else "results.json")
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for ipc in args.ipc:
        specs = rows_for(args.rows, 10, 10 * ipc)
        if args.only:
            specs = [s for s in specs if args.only in s["name"]]
        if args.name:
            unknown = sorted(set(args.name) - {s["name"] for s in specs})
            if unknown:
                raise SystemExit(f"--name: no such row {unknown} in --rows {args.rows}")
            specs = [s for s in specs if s["name"] in args.name]
        for seed in args.seeds:
            for spec in specs:
                key = f"{spec['name']} | IPC{ipc} | seed {seed}"
                if key in results:
                    continue
                cfg = copy.deepcopy(base)
                cb, cs = RECOVERY[spec["recovery"]]
                cfg["recover"].update({"ipc": ipc, "classwise_batching": cb, "classwise_supervision": cs})
                cfg["relabel"].update(spec["relabel"])
                cfg["train"].update(spec["train"])
                rec_dir = root / "recover" / f"{spec['recovery']}-ipc{ipc}-s{seed}"
                t_row = time.perf_counter()
                run_recover(cfg, squeeze_dir, rec_dir, seed=seed)
                run = root / "rows" / f"ipc{ipc}-s{seed}" / spec["name"].replace(" ", "_").replace(":", "")
                link(squeeze_dir, stage_dirs(run)["squeeze"])
                link(rec_dir, stage_dirs(run)["recover"])
                run_relabel_stage(cfg, run, seed=seed)
                run_train(cfg, stage_dirs(run)["recover"], stage_dirs(run)["relabel"], stage_dirs(run)["train"],
                          seed=seed)
                s = run_summary(run)
                results[key] = {"name": spec["name"], "group": spec["group"], "ipc": ipc, "seed": seed,
                                "factor": spec["factor"], "best_acc": s["best_acc"], "last_acc": s["last_acc"],
                                "total_bytes": s["total_bytes"], "label_bytes": s["label_bytes"],
                                "image_bytes": s["image_bytes"], "label_compression": s["label_compression"],
                                "relabel": spec["relabel"], "train": spec["train"],
                                "row_seconds": time.perf_counter() - t_row}
                atomic_write_json(results_path, results)
                print(f"{key}: best {s['best_acc']:.2f} last {s['last_acc']:.2f} labels x{s['label_compression']:.1f}")
    merged: dict = {}
    for path in sorted(root.glob("results*.json")):
        merged.update(json.loads(path.read_text()))
    write_tables(root, merged)
    print(f"done in {time.perf_counter() - t0:.0f}s -> {root / 'results.md'}")
    return 0


def write_tables(root: Path, results: dict) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["ipc"], r["name"]), []).append(r)
    lines = ["| IPC | row | label compression | total storage | best top-1 % (mean +- std) | last top-1 % | seeds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    plot_rows = {}
    for (ipc, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[1][0]["group"], kv[1][0]["factor"])):
        best = [r["best_acc"] for r in rs]
        last = [r["last_acc"] for r in rs]
        sd = statistics.stdev(best) if len(best) > 1 else 0.0
        lines.append(f"| {ipc} | {name} | x{rs[0]['label_compression']:.1f} | {rs[0]['total_bytes'] / 1024:.1f} KiB | "
                     f"{statistics.mean(best):.2f} +- {sd:.2f} | {statistics.mean(last):.2f} | {len(rs)} |")
        plot_rows.setdefault(ipc, []).append({"label": name.split(" ")[-1] if "MR" in name else f"x{rs[0]['factor']}",
                                              "total_bytes": rs[0]["total_bytes"], "acc": statistics.mean(best),
                                              "std": sd, "group": rs[0]["group"]})
    atomic_write_bytes(root / "results.md", ("\n".join(lines) + "\n").encode())
    for ipc, rows in plot_rows.items():
        plot_accuracy_vs_storage([r for r in rows if r["group"] != "ablation"],
                                 root / f"accuracy_vs_storage_ipc{ipc}.png",
                                 f"Fashion-MNIST IPC{ipc}: accuracy against total storage")


if __name__ == "__main__":
    sys.exit(main())
