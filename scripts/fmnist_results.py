"""The Fashion-MNIST results table: SRe2L-style vs LPLD vs LPQLD across label budgets.

One teacher (squeeze) is shared; each recovery variant is made once per
(IPC, seed) and shared by the label configurations that use it; each row gets
its own run directory (symlinks to the shared squeeze/recover) with its own
relabel + train. Each finished (row, IPC, seed) writes one run record,
<records>/ipc<IPC>/<row>/seed<seed>.json: the command, seed, commit, machine,
wall time, the row's settings, storage and every evaluation of the student.
Rerunning resumes (rows with a record are skipped, killed stages resume).
The tables are generated from the records: scripts/results_tables.py.

    .venv/bin/python scripts/fmnist_results.py --root runs/results --ipc 10 --seeds 0 1 2 --rows core
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpqld_fast.io_utils import atomic_write_json, read_json  # noqa: E402
from lpqld_fast.pipeline import run_recover_stage, run_relabel_stage  # noqa: E402
from lpqld_fast.presets import get_preset  # noqa: E402
from lpqld_fast.records import stage_dirs  # noqa: E402
from lpqld_fast.report import run_summary  # noqa: E402
from lpqld_fast.squeeze import run_squeeze  # noqa: E402
from lpqld_fast.train import run_train  # noqa: E402

RECOVERY = {  # name -> recover settings (the image set every row naming it shares)
    "sre2l": {"classwise_batching": False, "classwise_supervision": False},
    "classwise": {"classwise_batching": True, "classwise_supervision": True},
    "cb-only": {"classwise_batching": True, "classwise_supervision": False},
    "cs-only": {"classwise_batching": False, "classwise_supervision": True},
    "classwise-real": {"classwise_batching": True, "classwise_supervision": True, "init": "real"},
    "real-random": {"select": "random"},  # real training images selected, no synthesis (lpqld_fast.real_images)
    "real-herding": {"select": "herding"},
    "real-herding-2x2": {"select": "herding-2x2"},
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
    if kind == "lpqld-vs-lpld":
        rows = [r for r in rows if r["name"] in ("LPLD x40", "LPQLD x40 MR-5")]
    if kind in ("lpqld-vs-lpld", "all"):
        rows += lpqld_vs_lpld_rows(num_classes, n_images, lpld_train, lpqld_train)
    if kind == "late-drop":  # the top-k rows lose 1-4 points after their best epoch; an average of the weights
        base = next(r for r in rows if r["name"] == "LPQLD x40 MR-5")
        rows = [base, {**base, "name": "LPQLD x40 MR-5 + EMA 0.99", "group": "late drop",
                       "train": {**lpqld_train, "ema": 0.99}}]
    if kind in ("beyond", "all"):  # switches beyond the papers, one at a time onto LPLD x40
        base = next(r for r in rows if r["name"] == "LPLD x40")
        group = "beyond the papers"
        # cheapest first: train-only switches, then those that relabel, recover or train teachers again
        extra = [{**base, "name": "LPLD x40 + student CutMix", "group": group,
                  "train": {**lpld_train, "mix": "cutmix"}},
                 {**base, "name": "LPLD x40 + student MixUp", "group": group,
                  "train": {**lpld_train, "mix": "mixup"}},
                 {**base, "name": "LPLD x40 + stored CutMix", "group": group,
                  "relabel": {**base["relabel"], "cutmix": True}},
                 {**base, "name": "LPLD x40 + confident batches", "group": group,
                  "relabel": {**base["relabel"], "keep": "confident"}},
                 {**base, "name": "LPLD x40 + uncertain batches", "group": group,
                  "relabel": {**base["relabel"], "keep": "uncertain"}},
                 {**base, "name": "LPLD x40 + real-image init", "group": group, "recovery": "classwise-real"},
                 {**base, "name": "LPLD x40 + random real images", "group": group, "recovery": "real-random"},
                 {**base, "name": "LPLD x40 + herded real images", "group": group, "recovery": "real-herding"},
                 {**base, "name": "LPLD x40 + herded 2x2 mosaics", "group": group, "recovery": "real-herding-2x2"},
                 {**base, "name": "LPLD x40 + 1000 student epochs", "group": group,
                  "train": {**lpld_train, "epochs": 1000}},
                 {**base, "name": "LPLD x40 + 3 teachers", "group": group, "teachers": 3},
                 # the switches that moved every seed, combined (candidates for fashion-mnist-best)
                 {**base, "name": "LPLD x40 + 1000 epochs + uncertain batches", "group": group,
                  "relabel": {**base["relabel"], "keep": "uncertain"}, "train": {**lpld_train, "epochs": 1000}},
                 {**base, "name": "LPLD x40 + 1000 epochs + 3 teachers", "group": group, "teachers": 3,
                  "train": {**lpld_train, "epochs": 1000}},
                 {**base, "name": "LPLD x40 + herded real images + 3 teachers", "group": group,
                  "recovery": "real-herding", "teachers": 3},
                 {**base, "name": "LPLD x40 + herded real images + 1000 epochs + 3 teachers", "group": group,
                  "recovery": "real-herding", "teachers": 3, "train": {**lpld_train, "epochs": 1000}},
                 {**base, "name": "LPLD x40 + 1000 epochs + 3 teachers + uncertain batches", "group": group,
                  "teachers": 3, "relabel": {**base["relabel"], "keep": "uncertain"},
                  "train": {**lpld_train, "epochs": 1000}}]
        # the same switches onto the LPQLD row (top-k labels of more batches at the same bytes)
        lpqld = next(r for r in rows if r["name"] == "LPQLD x40 MR-5")
        extra += [{**lpqld, "group": group},
                  {**lpqld, "name": "LPQLD x40 MR-5 + 3 teachers", "group": group, "teachers": 3}]
        rows = [base, *extra] if kind == "beyond" else rows + extra
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


def lpqld_vs_lpld_rows(num_classes: int, n_images: int, lpld_train: dict, lpqld_train: dict) -> list[dict]:
    """Which part of the LPQLD recipe gains or loses what against LPLD at x40 label storage.

    (a) all logits with the LPQLD recipe (pool, DKR from T0 = 4 or 20, calibration); (b) top-5 with the LPLD
    recipe (constant T = 20 for teacher and student); (c) top-5 at the number of stored batches of the dense x40
    row, i.e. fewer bytes (the cost of truncation alone, against (a)); (d) MRS-5 (the dropped classes filled
    with the stored minimum) against MR-5 at equal bytes. "LPLD x40" and "LPQLD x40 MR-5" complete the set.
    """
    f, k = 40, 5
    dense = bytes_per_sample(num_classes, n_images, "dense", 0)
    keep_mr = (1 / f) * dense / bytes_per_sample(num_classes, n_images, "mr", k)
    keep_mrs = (1 / f) * dense / (bytes_per_sample(num_classes, n_images, "mr", k) + 2)  # + fp16 fill per sample
    group = "LPQLD vs LPLD at x40"
    return [
        {"name": "x40 dense, LPQLD recipe T0=4", "recovery": "classwise", "group": group,
         "relabel": {"label": "dense", "prune_ratio": 1 - 1 / f}, "train": {**lpqld_train, "t0": 4.0}, "factor": f},
        {"name": "x40 dense, LPQLD recipe T0=20", "recovery": "classwise", "group": group,
         "relabel": {"label": "dense", "prune_ratio": 1 - 1 / f}, "train": {**lpqld_train, "t0": 20.0}, "factor": f},
        {"name": "x40 MR-5, LPLD recipe", "recovery": "classwise", "group": group,
         "relabel": {"label": "mr", "k": k, "prune_ratio": 1 - keep_mr}, "train": lpld_train, "factor": f},
        {"name": "x40-batches MR-5, LPQLD recipe T0=4", "recovery": "classwise", "group": group,
         "relabel": {"label": "mr", "k": k, "prune_ratio": 1 - 1 / f}, "train": {**lpqld_train, "t0": 4.0},
         "factor": f},
        {"name": "x40 MRS-5, LPQLD recipe T0=4", "recovery": "classwise", "group": group,
         "relabel": {"label": "mrs", "k": k, "prune_ratio": 1 - keep_mrs}, "train": {**lpqld_train, "t0": 4.0},
         "factor": f},
    ]


TEACHER_DIR = ROOT / "docs" / "results" / "teacher"
TEACHER_FILES = ("teacher.pt", "bn_stats.pt", "metrics.json", "config.json")


def seed_squeeze(src: Path, squeeze_dir: Path) -> None:
    """Copy a finished squeeze (teacher, statistics, their metrics and config) into an empty squeeze folder, so
    run_squeeze finds it done: a teacher retrained on another CPU rounds differently (91.35% on an AVX2 host,
    91.38% from the same recipe and seed on an AVX-512 one)."""
    if (squeeze_dir / "teacher.pt").exists():
        return
    missing = [f for f in TEACHER_FILES if not (src / f).is_file()]
    if missing:
        raise SystemExit(f"--teacher-from {src}: missing {', '.join(missing)} (or pass --teacher-from none)")
    squeeze_dir.mkdir(parents=True, exist_ok=True)
    for name in TEACHER_FILES:
        shutil.copy2(src / name, squeeze_dir / name)
    print(f"squeeze: teacher and statistics from {src}")


def ensemble_squeeze(cfg: dict, squeeze_dir: Path, out: Path) -> Path:
    """A squeeze folder holding the shared teacher (copied: the same weights and statistics, so the shared
    recoveries stay valid) and the ensemble members squeeze.teachers asks for, trained there once."""
    if not (out / "teacher.pt").exists():
        out.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "metrics.json", "bn_stats.pt", "teacher.pt"):  # teacher.pt last: the marker
            shutil.copy2(squeeze_dir / name, out / name)
    run_squeeze(cfg, out, seed=0)
    return out


def row_slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in name).strip("_")


def link(src: Path, dst: Path) -> None:
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(src, dst.parent), dst)


def main() -> int:
    from lpqld_fast.records import pin_commit
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    pin_commit()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="runs/results")
    ap.add_argument("--ipc", type=int, nargs="+", default=[10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rows", default="core",
                    choices=["core", "main", "all", "ablation", "lpqld-vs-lpld", "late-drop", "beyond"],
                    help="core: a few rows; main: every factor and k without the ablations; lpqld-vs-lpld: the "
                         "x40 recipe cells; late-drop: LPQLD x40 MR-5 with and without train.ema; beyond: switches "
                         "beyond the papers (mixing, real-image start or selection, teacher ensemble, scored "
                         "pruning, longer student) onto LPLD x40; all: everything")
    ap.add_argument("--records", default="docs/results/records", help="where the run records go")
    ap.add_argument("--only", default=None, help="substring filter on row names")
    ap.add_argument("--name", action="append", default=[], help="exact row name (repeatable): only these rows")
    ap.add_argument("--set", action="append", default=[],
                    help="override stage.key=value for every row, applied after the row's own settings")
    ap.add_argument("--list", action="store_true", help="print the rows and exit")
    ap.add_argument("--tag", default=None,
                    help="appended to every row name as ' [TAG]' (records, run folders, tables): rows made under "
                         "another set-up than the records of the same name, e.g. with another teacher")
    ap.add_argument("--teacher-from", default=str(TEACHER_DIR),
                    help="a squeeze folder whose teacher and statistics every row uses (copied into ROOT/squeeze "
                         "when that has none); 'none' trains one. Default: the teacher the records since the "
                         "AVX-512 retrain were made with, so another machine reproduces them")
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
    if args.teacher_from != "none":
        seed_squeeze(Path(args.teacher_from), squeeze_dir)
    run_squeeze(base, squeeze_dir, seed=0)
    records = Path(args.records)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    for ipc in args.ipc:
        specs = rows_for(args.rows, 10, 10 * ipc)
        if args.only:
            specs = [s for s in specs if args.only in s["name"]]
        if args.name:
            unknown = sorted(set(args.name) - {s["name"] for s in specs})
            if unknown:
                raise SystemExit(f"--name: no such row {unknown} in --rows {args.rows}")
            specs = [s for s in specs if s["name"] in args.name]
        if args.tag:  # rows of another set-up (e.g. another teacher): named apart, so tables keep them apart
            specs = [{**s, "name": f"{s['name']} [{args.tag}]"} for s in specs]
        for seed in args.seeds:
            for spec in specs:
                path = records / f"ipc{ipc}" / row_slug(spec["name"]) / f"seed{seed}.json"
                if path.exists():
                    continue
                cfg = copy.deepcopy(base)
                cfg["recover"].update({"ipc": ipc, **RECOVERY[spec["recovery"]]})
                cfg["relabel"].update(spec["relabel"])
                # a stored batch cannot hold more images than the set: IPC1 (10 images) stores batches of 10
                cfg["relabel"]["batch_size"] = min(cfg["relabel"]["batch_size"], 10 * ipc)
                cfg["train"].update(spec["train"])
                cfg = apply_overrides(cfg, args.set)  # --set wins over the row's own settings
                rec_dir = root / "recover" / f"{spec['recovery']}-ipc{ipc}-s{seed}"
                t_row = time.perf_counter()
                run_recover_stage(cfg, squeeze_dir, rec_dir, seed=seed)
                run = root / "rows" / f"ipc{ipc}-s{seed}" / row_slug(spec["name"])
                row_squeeze = squeeze_dir
                if spec.get("teachers", 1) > 1:  # the shared teacher plus members, in a squeeze folder of its own
                    cfg["squeeze"]["teachers"] = spec["teachers"]
                    row_squeeze = ensemble_squeeze(cfg, squeeze_dir, root / f"squeeze-teachers{spec['teachers']}")
                link(row_squeeze, stage_dirs(run)["squeeze"])
                link(rec_dir, stage_dirs(run)["recover"])
                run_relabel_stage(cfg, run, seed=seed)
                run_train(cfg, stage_dirs(run)["recover"], stage_dirs(run)["relabel"], stage_dirs(run)["train"],
                          seed=seed)
                s = run_summary(run)
                metrics = read_json(stage_dirs(run)["train"] / "train_metrics.json", "train metrics")
                teacher = read_json(squeeze_dir / "metrics.json", "squeeze metrics")
                record = {"name": spec["name"], "group": spec["group"], "ipc": ipc, "seed": seed,
                          "factor": spec["factor"], "recovery": spec["recovery"],
                          "relabel": {k: cfg["relabel"][k] for k in spec["relabel"]},
                          "train": {k: cfg["train"][k] for k in spec["train"]}, "set": args.set, "command": command,
                          **{k: s[k] for k in ("selected_acc", "selection", "best_acc", "last_acc", "total_bytes",
                                               "label_bytes", "image_bytes", "label_compression")},
                          "selected_epoch": metrics["selected_epoch"], "teacher_test_acc": teacher["teacher_test_acc"],
                          "row_seconds": time.perf_counter() - t_row, "train_seconds": metrics["seconds"],
                          "record": metrics["record"], "evals": metrics["evals"]}
                atomic_write_json(path, record)
                print(f"IPC{ipc} {spec['name']} seed {seed}: selected {s['selected_acc']:.2f} "
                      f"(last {s['last_acc']:.2f}, best-of-test {s['best_acc']:.2f}) labels x{s['label_compression']:.1f}")
    print(f"done in {time.perf_counter() - t0:.0f}s; tables: scripts/results_tables.py --records {records}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
