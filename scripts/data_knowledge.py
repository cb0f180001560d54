"""Paper 001 Figure 6 on Fashion-MNIST: the data-knowledge trade-off of the soft-label baseline.

Random REAL training images (IPC per class, lpqld_fast.real_images) + soft labels from an EXPERT (the squeeze
teacher at an early epoch or the final one, lpqld_fast.experts), keeping the top k labels per sample
(``topk_norenorm``: paper 001, not renormalised; ``mr``: renormalised over the k), over the grid
IPC x k x expert x mode, plus the hard-label baseline (the same random images, one-hot labels). Every row gets
its own run directory (symlinks to the shared squeeze and to the shared real-image set of its IPC) with its own
relabel + train; finished rows are skipped (resume). Writes, under --root:

    results.json               one entry per row (accuracy, storage from lpqld_fast.report.run_summary, timings)
    results.md                 tables: accuracy per (expert, mode) over IPC x k, hard labels, Pareto frontier
    data_knowledge.png         accuracy over the grid (one panel per expert x mode) + accuracy against storage
                               with the Pareto frontier
    pareto.md                  which point is best at each storage budget

    .venv/bin/python scripts/data_knowledge.py                 # the full grid (sized for ~1 h on 2 cores)
    .venv/bin/python scripts/data_knowledge.py --quick         # smoke run: tiny grid, 2 epochs
    .venv/bin/python scripts/data_knowledge.py --list          # print the rows and the planned work
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpqld_fast.io_utils import atomic_write_bytes, atomic_write_json, read_json  # noqa: E402
from lpqld_fast.presets import apply_overrides, get_preset  # noqa: E402
from lpqld_fast.records import stage_dirs  # noqa: E402

FULL = {"ipc": [1, 2, 5, 10, 20, 50], "k": [1, 2, 3, 5, 10], "experts": ["2", "final"],
        "modes": ["topk_norenorm", "mr"], "hard_ipc": [1, 10, 50]}
QUICK = {"ipc": [1, 2], "k": [1, 10], "experts": ["1", "final"], "modes": ["topk_norenorm", "mr"],
         "hard_ipc": [1]}
# Sized from a measured row (docs/PAPER001.md, "Cost"): the full grid in about an hour on 2 shared cores.
DEFAULT_EPOCHS = 12
DEFAULT_MIN_STEPS = 60
QUICK_EPOCHS = 2
QUICK_MIN_STEPS = 0
DEFAULT_TEST_SUBSET = 2000
QUICK_TEST_SUBSET = 1000


# --------------------------------------------------------------------------- rows


def parse_expert(token: str) -> tuple[str, int | None, list[int | None] | None]:
    """'final' | '<epoch>' | 'ens:<e1>,<e2>,...' (epochs or 'final') -> (label, epoch, ensemble)."""
    token = token.strip()
    if token == "final":
        return "final", None, None
    if token.startswith("ens:"):
        parts = [p.strip() for p in token[4:].split(",") if p.strip()]
        if not parts:
            raise ValueError(f"--experts {token!r}: an ensemble needs at least one epoch")
        epochs = [None if p == "final" else int(p) for p in parts]
        return "ens" + "+".join(parts), None, epochs
    try:
        e = int(token)
    except ValueError:
        raise ValueError(f"--experts {token!r}: expected 'final', an epoch number or 'ens:e1,e2,...'") from None
    if e < 1:
        raise ValueError(f"--experts {token!r}: epochs start at 1")
    return f"epoch{e}", e, None


def grid_rows(ipcs: list[int], ks: list[int], experts: list[str], modes: list[str], hard_ipcs: list[int]
              ) -> list[dict[str, Any]]:
    rows = []
    for ipc in sorted(set(ipcs) | set(hard_ipcs)):
        if ipc in hard_ipcs:
            rows.append({"kind": "hard", "ipc": ipc, "expert": "final", "mode": "hard", "k": None})
        if ipc not in ipcs:
            continue
        for ex in experts:
            for mode in modes:
                for k in ks:
                    rows.append({"kind": "soft", "ipc": ipc, "expert": ex, "mode": mode, "k": k})
    return rows


def row_key(row: dict, tag: str, seed: int) -> str:
    if row["kind"] == "hard":
        return f"IPC{row['ipc']} | hard labels | {tag} | seed {seed}"
    return f"IPC{row['ipc']} | {parse_expert(row['expert'])[0]} | {row['mode']}-k{row['k']} | {tag} | seed {seed}"


def row_dir(root: Path, row: dict, tag: str, seed: int) -> Path:
    name = (f"ipc{row['ipc']}-hard" if row["kind"] == "hard"
            else f"ipc{row['ipc']}-{parse_expert(row['expert'])[0]}-{row['mode']}-k{row['k']}")
    return root / "rows" / f"{tag}-s{seed}" / name


def link(src: Path, dst: Path) -> None:
    if not dst.exists() and not dst.is_symlink():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(src.resolve(), dst.parent.resolve()), dst)


# --------------------------------------------------------------------------- squeeze / evaluation


def ensure_squeeze(squeeze_dir: Path, base: dict, quick: bool) -> dict:
    """The squeeze config the teacher in ``squeeze_dir`` was trained with (training one if missing)."""
    from lpqld_fast.squeeze import run_squeeze

    if (squeeze_dir / "teacher.pt").exists():
        cfg = read_json(squeeze_dir / "config.json", "squeeze config")["config"]
        if cfg.get("dataset") != base["dataset"]:
            raise ValueError(f"{squeeze_dir} holds a {cfg.get('dataset')!r} teacher, not {base['dataset']!r}")
        return cfg["squeeze"]
    cfg = copy.deepcopy(base)
    data_root = None
    if quick:
        # A smoke-run teacher: 2 epochs on a 6,000-image stratified subset of the train set (600 per class),
        # per-epoch accuracy on a 2,000-image test subset, written as IDX files that run_squeeze reads.
        cfg["squeeze"]["epochs"] = min(int(cfg["squeeze"]["epochs"]), 2)
        data_root = write_idx_subset(squeeze_dir.parent / "fmnist-subset", train_n=6000, test_n=2000)
    print(f"no teacher in {squeeze_dir}: training one ({cfg['squeeze']['epochs']} epochs"
          f"{', on ' + str(data_root) if data_root else ''}) with run_squeeze", flush=True)
    run_squeeze(cfg, squeeze_dir, seed=0, data_root=data_root)
    return cfg["squeeze"]


def write_idx_subset(out: Path, train_n: int, test_n: int) -> str:
    """Stratified subsets of the Fashion-MNIST splits as (uncompressed) IDX files in ``out``."""
    import struct

    from lpqld_fast.data import get_dataset, stratified_subset

    out.mkdir(parents=True, exist_ok=True)
    for split, n, prefix in (("train", train_n, "train"), ("test", test_n, "t10k")):
        ds = get_dataset("fashion-mnist", split)
        sub = stratified_subset(ds, n, seed=1)
        imgs = sub.images[:, 0].contiguous()
        labels = sub.labels.to(dtype=imgs.dtype)
        for kind, t in (("images-idx3", imgs), ("labels-idx1", labels)):
            head = struct.pack(">HBB", 0, 0x08, t.dim()) + struct.pack(f">{t.dim()}I", *t.shape)
            atomic_write_bytes(out / f"{prefix}-{kind}-ubyte", head + t.numpy().tobytes())
    return str(out)


def full_test_accuracy(run: Path, cfg: dict) -> float:
    """Accuracy of a finished row's student (train/student.pt) on the whole test set."""
    from lpqld_fast.data import get_dataset
    from lpqld_fast.evaluation import evaluate
    from lpqld_fast.io_utils import load_tensors
    from lpqld_fast.models import get_model
    from lpqld_fast.store import LabelStore

    test = get_dataset(cfg["dataset"], "test")
    store = LabelStore.open(stage_dirs(run)["relabel"], verify="size")
    c, h, _ = store.manifest["image_shape"]
    model = get_model(cfg["train"]["model"], num_classes=test.num_classes, in_chans=c, image_size=h)
    model.load_state_dict(load_tensors(stage_dirs(run)["train"] / "student.pt", what="student"))
    return evaluate(model, test.images, test.labels, store.mean, store.std)


# --------------------------------------------------------------------------- one row

_SELECTED: set[Path] = set()
_LOGITS: dict[tuple, dict] = {}


def row_epochs(ipc: int, epochs: int, min_steps: int, batch: int) -> tuple[int, int]:
    """(epochs, batch size) of a row: at least ``epochs``, and at least ``min_steps`` student steps."""
    n = 10 * ipc
    b = min(batch, n)
    nb = n // b
    return max(epochs, -(-min_steps // nb)), b


def run_row(row: dict, base: dict, root: Path, squeeze_dir: Path, tag: str, seed: int, epochs: int, batch: int,
            temperature: float, strategy: str, calibrate: bool, min_steps: int) -> dict:
    from lpqld_fast.experts import relabel_with_expert
    from lpqld_fast.real_images import select_real_images
    from lpqld_fast.report import run_summary
    from lpqld_fast.train import run_train

    ipc = row["ipc"]
    n = ipc * 10
    cfg = copy.deepcopy(base)
    epochs, b = row_epochs(ipc, epochs, min_steps, batch)
    cfg["relabel"].update({"epochs": epochs, "batch_size": b, "prune_ratio": 0.0, "cutmix": False,
                           "temperature": temperature})
    cfg["train"].update({"epochs": epochs, "eval_every": epochs, "checkpoint_every": max(1, epochs // 4)})
    if row["kind"] == "hard":
        # The student replays stored augmentations; the store's labels are unused (smallest store: MR-1).
        cfg["relabel"].update({"label": "mr", "k": 1})
        cfg["train"].update({"hard_labels": True})
    else:
        cfg["relabel"].update({"label": row["mode"], "k": row["k"]})
        # Paper-001 knowledge distillation: KL(p_T || softmax(z / T)) at one constant T (no DKR); probability
        # modes stored softmax(z / T) at relabel time, logit modes apply T when decoded.
        cfg["train"].update({"temperature": "constant", "t0": temperature, "calibrate": calibrate,
                             "student_t": "teacher"})
    t0 = time.perf_counter()
    if strategy.startswith("dir:"):  # --images: a finished recover folder (e.g. synthetic images) of this IPC
        real = Path(strategy[4:]).resolve()
        got = read_json(real / "manifest.json", "recover manifest").get("num_images")
        if got != n:
            raise SystemExit(f"--images {real} holds {got} images, IPC{ipc} needs {n}")
    else:
        real = root / "real" / f"{strategy}-ipc{ipc}-s{seed}"
        if real not in _SELECTED:  # once per process (a rerun would be a no-op, but loads the train set)
            select_real_images(cfg, squeeze_dir, real, seed=seed, strategy=strategy, ipc=ipc)
            _SELECTED.add(real)
    run = row_dir(root, row, tag, seed)
    d = stage_dirs(run)
    link(squeeze_dir, d["squeeze"])
    link(real, d["recover"])
    label, epoch, ensemble = parse_expert(row["expert"])
    t1 = time.perf_counter()
    # Rows of one (IPC, expert) draw the same augmented batches: the expert runs once per batch for all k/modes.
    cache_key = (ipc, label, epochs, b, seed, strategy, temperature)
    for key in [k for k in _LOGITS if k[0] != ipc]:  # keep only the current IPC's experts
        del _LOGITS[key]
    _LOGITS.setdefault(cache_key, {})
    relabel_with_expert(cfg, run, seed=seed, expert_epoch=epoch, ensemble=ensemble, progress=False,
                        logit_cache=_LOGITS[cache_key])
    t2 = time.perf_counter()
    tr = run_train(cfg, d["recover"], d["relabel"], d["train"], seed=seed, progress=False)
    t3 = time.perf_counter()
    s = run_summary(run)
    exp = read_json(run / "expert.json", "expert")
    out = {"kind": row["kind"], "ipc": ipc, "expert": label, "mode": row["mode"], "k": row["k"], "seed": seed,
           "tag": tag, "epochs": epochs, "batch_size": b, "temperature": temperature, "strategy": strategy,
           "calibrate": calibrate, "test_acc": s["last_acc"], "best_acc": s["best_acc"],
           "image_bytes": s["image_bytes"], "store_bytes": s["label_bytes"],
           "store_label_payload_bytes": s["storage"].label_bytes,
           "store_metadata_bytes": sum(c.bytes for c in s["storage"].rows if c.component == "metadata"),
           "student_steps": epochs * (n // b), "expert_sha256": exp["sha256"], "run": str(run),
           "seconds": {"select": t1 - t0, "relabel": t2 - t1, "train": t3 - t2, "train_reported": tr["seconds"],
                       "row": time.perf_counter() - t0}}
    if row["kind"] == "hard":
        # Hard labels need one class id per image (uint8 for 10 classes), not the store's soft labels.
        out["label_bytes"] = n
    else:
        out["label_bytes"] = s["label_bytes"]
        out["label_compression"] = s["label_compression"]
    out["total_bytes"] = out["image_bytes"] + out["label_bytes"]
    # Paper-001 accounting: one stored label per image (k fp16 values + k uint8 class ids), no augmentations.
    out["per_image_total_bytes"] = out["image_bytes"] + (n if row["kind"] == "hard" else n * row["k"] * 3)
    return out


# --------------------------------------------------------------------------- tables, plot, frontier


def pareto(points: list[dict], key: str = "total_bytes", acc: str = "test_acc") -> list[dict]:
    """Points not beaten by a cheaper-or-equal point: ascending storage, strictly increasing accuracy."""
    front, best = [], float("-inf")
    for p in sorted(points, key=lambda p: (p[key], -p[acc])):
        if p[acc] > best:
            front.append(p)
            best = p[acc]
    return front


def _kib(b: float) -> str:
    return f"{int(b)} B" if b < 1024 else f"{b / 1024:.2f} KiB"


def _name(r: dict) -> str:
    return f"IPC{r['ipc']} hard" if r["kind"] == "hard" else f"IPC{r['ipc']} {r['expert']} {r['mode']}-k{r['k']}"


def write_outputs(root: Path, rows: list[dict], teacher_acc: dict, command: str, wall: float,
                  subset: int) -> None:
    soft = [r for r in rows if r["kind"] == "soft"]
    hard = sorted([r for r in rows if r["kind"] == "hard"], key=lambda r: r["ipc"])
    experts = sorted({r["expert"] for r in soft}, key=lambda e: (e == "final", e))
    modes = sorted({r["mode"] for r in soft}, key=lambda m: (m != "topk_norenorm", m))
    ipcs = sorted({r["ipc"] for r in soft})
    ks = sorted({r["k"] for r in soft})
    by = {(r["expert"], r["mode"], r["ipc"], r["k"]): r for r in soft}
    acc_what = (f"a fixed stratified subset of {subset} test images" if subset else "the full 10,000-image test set")
    lines = [f"# Paper 001 data-knowledge grid on Fashion-MNIST ({rows[0]['tag'] if rows else ''})", "",
             f"Command: `{command}`", ""]
    row_time = sum(r["seconds"]["row"] for r in rows)
    lines += [f"Seed {rows[0]['seed'] if rows else ''}. Time: {row_time / 60:.1f} min summed over the rows' "
              f"select + relabel + train; the last command ran {wall / 60:.1f} min (rows already done are skipped).",
              ""]
    lines += [f"Test top-1 % of the student after the last epoch (the only evaluation; quoted everywhere) on "
              f"{acc_what}. Storage = raw uint8 images + the label store on disk (run_summary: labels and "
              "augmentation records of every stored batch); hard labels = images + one uint8 class id per image.",
              "", "Experts (teacher test top-1 at that epoch): " +
              ", ".join(f"{e} {teacher_acc.get(e, float('nan')):.2f}%" for e in experts), ""]
    for e in experts:
        for m in modes:
            lines += [f"## expert {e}, labels {m}", "",
                      "| IPC | " + " | ".join(f"k={k}" for k in ks) + " |",
                      "|---:|" + "---:|" * len(ks)]
            for ipc in ipcs:
                cells = []
                for k in ks:
                    r = by.get((e, m, ipc, k))
                    cells.append(f"{r['test_acc']:.2f} ({_kib(r['total_bytes'])})" if r else "")
                lines.append(f"| {ipc} | " + " | ".join(cells) + " |")
            lines.append("")
    if hard:
        lines += ["## hard-label baseline (same random images, one-hot labels)", "",
                  "| IPC | test top-1 % | total storage |", "|---:|---:|---:|"]
        lines += [f"| {r['ipc']} | {r['test_acc']:.2f} | {_kib(r['total_bytes'])} |" for r in hard]
        lines.append("")
    front = pareto(rows)
    lines += ["## Pareto frontier (accuracy against total storage)", "",
              "| point | total storage | images | labels | test top-1 % | full test set % |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in front:
        full = f"{r['full_test_acc']:.2f}" if "full_test_acc" in r else ""
        lines.append(f"| {_name(r)} | {_kib(r['total_bytes'])} | {_kib(r['image_bytes'])} | "
                     f"{_kib(r['label_bytes'])} | {r['test_acc']:.2f} | {full} |")
    lines.append("")
    atomic_write_bytes(root / "results.md", "\n".join(lines).encode())
    atomic_write_bytes(root / "pareto.md", pareto_markdown(rows, front, acc_what).encode())
    plot(root / "data_knowledge.png", soft, hard, experts, modes, ipcs, ks, front, teacher_acc)


def pareto_markdown(rows: list[dict], front: list[dict], acc_what: str) -> str:
    out = ["# Best point at each storage budget", "",
           f"Accuracy: last-epoch test top-1 on {acc_what}. A budget B admits every row whose total storage "
           "(images + labels, run_summary) is <= B; the best admitted row is the frontier point below B.", ""]
    for i, r in enumerate(front):
        hi = f"below {_kib(front[i + 1]['total_bytes'])}" if i + 1 < len(front) else "and above"
        out.append(f"- **{_kib(r['total_bytes'])} {hi}**: {_name(r)} -> {r['test_acc']:.2f}% "
                   f"(images {_kib(r['image_bytes'])}, labels {_kib(r['label_bytes'])})")
    out.append("")
    soft = [r for r in rows if r["kind"] == "soft"]
    hard = {r["ipc"]: r for r in rows if r["kind"] == "hard"}
    if soft:
        out += ["Per IPC, the best soft-label row against the hard-label baseline:", ""]
        for ipc in sorted({r["ipc"] for r in soft}):
            best = max((r for r in soft if r["ipc"] == ipc), key=lambda r: r["test_acc"])
            h = hard.get(ipc)
            vs = f", hard labels {h['test_acc']:.2f}% ({best['test_acc'] - h['test_acc']:+.2f})" if h else ""
            out.append(f"- IPC{ipc}: {best['expert']} {best['mode']}-k{best['k']} {best['test_acc']:.2f}%{vs}")
        out.append("")
        top_hard = max(hard.values(), key=lambda r: r["ipc"]) if hard else None
        if top_hard:
            reach = [r for r in soft if r["test_acc"] >= top_hard["test_acc"]]
            if reach:
                r = min(reach, key=lambda r: (r["ipc"], r["total_bytes"]))
                out.append(f"Knowledge for data: hard labels need IPC{top_hard['ipc']} for "
                           f"{top_hard['test_acc']:.2f}%; soft labels reach it at IPC{r['ipc']} "
                           f"({r['expert']} {r['mode']}-k{r['k']}, {r['test_acc']:.2f}%).")
            else:
                out.append(f"No soft-label row reaches the hard-label IPC{top_hard['ipc']} accuracy "
                           f"({top_hard['test_acc']:.2f}%).")
            out.append("")
    per_image = pareto(rows, key="per_image_total_bytes")
    out += ["Under paper 001's accounting (one stored label per image: images + N*k*(2+1) bytes, no stored "
            "augmentations) the frontier is: " +
            "; ".join(f"{_name(r)} {_kib(r['per_image_total_bytes'])} {r['test_acc']:.2f}%" for r in per_image), ""]
    return "\n".join(out)


def plot(path: Path, soft, hard, experts, modes, ipcs, ks, front, teacher_acc) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_top = max(1, len(experts) * len(modes))
    fig = plt.figure(figsize=(3.6 * max(n_top, 2), 7.4))
    gs = fig.add_gridspec(2, n_top)
    by = {(r["expert"], r["mode"], r["ipc"], r["k"]): r for r in soft}
    cmap = plt.get_cmap("viridis")
    i, first = 0, None
    for e in experts:
        for m in modes:
            ax = fig.add_subplot(gs[0, i], sharey=first)  # one accuracy scale for all panels
            first = first or ax
            i += 1
            for j, k in enumerate(ks):
                pts = [(ipc, by[(e, m, ipc, k)]["test_acc"]) for ipc in ipcs if (e, m, ipc, k) in by]
                if pts:
                    ax.plot(*zip(*pts), "o-", ms=3, color=cmap(j / max(len(ks) - 1, 1)), label=f"k={k}")
            if hard:
                ax.plot([r["ipc"] for r in hard], [r["test_acc"] for r in hard], "kx--", label="hard labels")
            ax.set_xscale("log")
            ax.set_xticks(ipcs, [str(v) for v in ipcs])
            ax.set_xlabel("images per class")
            ax.set_ylabel("test top-1 (%)")
            ax.set_title(f"expert {e} ({teacher_acc.get(e, float('nan')):.1f}%), {m}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    ax = fig.add_subplot(gs[1, :])
    colors = {e: plt.get_cmap("tab10")(q) for q, e in enumerate(experts)}
    markers = {"topk_norenorm": "o", "mr": "s", "ms": "^", "mrs": "v", "dense": "D"}
    for e in experts:
        for m in modes:
            rs = [r for r in soft if r["expert"] == e and r["mode"] == m]
            ax.scatter([r["total_bytes"] / 1024 for r in rs], [r["test_acc"] for r in rs], s=14, alpha=0.7,
                       color=colors[e], marker=markers.get(m, "o"), label=f"{e} {m}")
    if hard:
        ax.scatter([r["total_bytes"] / 1024 for r in hard], [r["test_acc"] for r in hard], color="k", marker="x",
                   s=40, label="hard labels")
    if front:
        xs = [r["total_bytes"] / 1024 for r in front]
        ys = [r["test_acc"] for r in front]
        ax.step(xs, ys, where="post", color="crimson", lw=1.2, label="Pareto frontier")
        for r in front:
            ax.annotate(_name(r).replace("IPC", ""), (r["total_bytes"] / 1024, r["test_acc"]), fontsize=6,
                        xytext=(3, -8), textcoords="offset points", color="crimson")
    ax.set_xscale("log")
    ax.set_xlabel("total storage, images + labels (KiB)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Fashion-MNIST: random real images + expert soft labels (paper 001 Fig. 6)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=None, help="output root (default runs/data_knowledge, quick: "
                                                 "runs/data_knowledge_quick)")
    ap.add_argument("--squeeze", default=None, help="shared squeeze dir (default runs/results/squeeze; --quick "
                                                    "uses it if it holds a teacher, else <root>/squeeze)")
    ap.add_argument("--quick", action="store_true", help="tiny grid, few epochs: a smoke run")
    ap.add_argument("--ipc", type=int, nargs="+", default=None)
    ap.add_argument("--k", type=int, nargs="+", default=None, help="labels kept per sample")
    ap.add_argument("--experts", nargs="+", default=None,
                    help="expert epochs: 'final', an epoch number, or 'ens:e1,e2,...' (logit-averaged ensemble)")
    ap.add_argument("--modes", nargs="+", default=None, choices=["topk_norenorm", "mr", "ms", "mrs", "dense"])
    ap.add_argument("--hard-ipc", type=int, nargs="*", default=None, help="IPCs of the hard-label baseline")
    ap.add_argument("--epochs", type=int, default=None,
                    help=f"student epochs = stored label epochs, at least (see --min-steps; default {DEFAULT_EPOCHS}, "
                         f"quick {QUICK_EPOCHS})")
    ap.add_argument("--min-steps", type=int, default=None,
                    help=f"at least this many student steps per row: small IPCs train more epochs (default "
                         f"{DEFAULT_MIN_STEPS}, quick {QUICK_MIN_STEPS})")
    ap.add_argument("--batch-size", type=int, default=50, help="batch size (capped at the number of images)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="KD temperature: relabel T of the probability modes, train T of the logit modes, and the "
                         "student's temperature")
    ap.add_argument("--calibrate", action="store_true", help="LPLD calibrated student temperature instead of T")
    ap.add_argument("--strategy", default="random", choices=["random", "ce-easiest"], help="real-image selection")
    ap.add_argument("--images", default=None,
                    help="use this finished recover folder (e.g. synthetic images of one IPC, with --ipc) instead of "
                         "selecting real images: the same students on other images, at the same storage")
    ap.add_argument("--test-subset", type=int, default=None,
                    help=f"evaluate students on a fixed stratified subset of this many test images (0 = all "
                         f"10,000; default {DEFAULT_TEST_SUBSET}, quick {QUICK_TEST_SUBSET}); frontier and "
                         "hard-label students are re-evaluated on the full test set at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-rows", type=int, default=None, help="stop after this many new rows (timing a row)")
    ap.add_argument("--set", action="append", default=[], help="preset override stage.key=value for every row")
    ap.add_argument("--list", action="store_true", help="print the rows and the planned work, then exit")
    args = ap.parse_args(argv)

    grid = QUICK if args.quick else FULL
    ipcs = args.ipc or grid["ipc"]
    ks = args.k or grid["k"]
    experts = args.experts or grid["experts"]
    modes = args.modes or grid["modes"]
    # Default hard-label IPCs: the grid's, within the soft IPCs asked for.
    hard_ipcs = [i for i in grid["hard_ipc"] if i in ipcs] if args.hard_ipc is None else args.hard_ipc
    epochs = args.epochs or (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    subset = args.test_subset if args.test_subset is not None else (
        QUICK_TEST_SUBSET if args.quick else DEFAULT_TEST_SUBSET)
    for e in experts:
        parse_expert(e)
    if epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be positive")
    root = Path(args.root or ("runs/data_knowledge_quick" if args.quick else "runs/data_knowledge"))
    shared = Path("runs/results/squeeze")
    if args.squeeze:
        squeeze_dir = Path(args.squeeze)
    elif args.quick and not (shared / "teacher.pt").exists():
        squeeze_dir = root / "squeeze"
    else:
        squeeze_dir = shared
    min_steps = args.min_steps if args.min_steps is not None else (QUICK_MIN_STEPS if args.quick
                                                                     else DEFAULT_MIN_STEPS)
    strategy = f"dir:{args.images}" if args.images else args.strategy
    image_label = f"img-{Path(args.images).resolve().name}" if args.images else args.strategy
    tag = (f"E{epochs}m{min_steps}-T{args.temperature:g}-B{args.batch_size}-{image_label}"
           f"{'-cal' if args.calibrate else ''}-test{subset or 'all'}")
    rows = grid_rows(ipcs, ks, experts, modes, hard_ipcs)
    if args.list:
        steps = imgs = 0
        relabelled: dict[tuple, int] = {}
        for r in rows:
            e, b = row_epochs(r["ipc"], epochs, min_steps, args.batch_size)
            nb = 10 * r["ipc"] // b
            steps += e * nb
            imgs += e * nb * b
            relabelled[(r["ipc"], parse_expert(r["expert"])[0])] = e * nb * b
            print(row_key(r, tag, args.seed), f"| {e} epochs = {e * nb} student steps of {b}")
        print(f"{len(rows)} rows: {steps} student steps ({imgs} images trained on); {sum(relabelled.values())} "
              f"expert forwards of an image (shared by the rows of one IPC and expert); {len(rows)} evaluations "
              f"of {subset or 10000} test images")
        return 0

    base = apply_overrides(get_preset("fashion-mnist"), args.set)
    t_start = time.perf_counter()
    base["squeeze"] = ensure_squeeze(squeeze_dir, base, args.quick)
    from lpqld_fast.experts import expert_checkpoint_path

    for e in experts:  # fail fast, naming the missing checkpoint
        _, epoch, ensemble = parse_expert(e)
        for ep in (ensemble if ensemble is not None else [epoch]):
            expert_checkpoint_path(squeeze_dir, ep)
    metrics = read_json(squeeze_dir / "metrics.json", "squeeze metrics")
    per_epoch = {m["epoch"]: m["test_acc"] for m in metrics.get("teacher", [])}
    teacher_acc = {"final": metrics.get("teacher_test_acc", float("nan"))}
    for e in experts:
        label, epoch, ensemble = parse_expert(e)
        if ensemble is None and epoch is not None:
            teacher_acc[label] = per_epoch.get(epoch, float("nan"))
    results_path = root / "results.json"
    root.mkdir(parents=True, exist_ok=True)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    done_new = 0
    base["train"]["test_subset"] = subset  # run_train evaluates on the fixed stratified subset (0 = all)
    for i, row in enumerate(rows):
        key = row_key(row, tag, args.seed)
        if key in results:
            continue
        if args.max_rows is not None and done_new >= args.max_rows:
            break
        r = run_row(row, base, root, squeeze_dir, tag, args.seed, epochs, args.batch_size, args.temperature,
                    strategy, args.calibrate, min_steps)
        results[key] = r
        atomic_write_json(results_path, results)
        done_new += 1
        print(f"[{i + 1}/{len(rows)}] {key}: test top-1 {r['test_acc']:.2f}% | "
              f"{_kib(r['total_bytes'])} | {r['seconds']['row']:.1f}s "
              f"(relabel {r['seconds']['relabel']:.1f}s, train {r['seconds']['train']:.1f}s) | "
              f"elapsed {(time.perf_counter() - t_start) / 60:.1f} min", flush=True)
    mine = [r for k, r in results.items() if r.get("tag") == tag and r.get("seed") == args.seed]
    complete = all(row_key(r, tag, args.seed) in results for r in rows)
    if subset and complete:  # the points the conclusions rest on, on the whole test set
        cfg = copy.deepcopy(base)
        for r in pareto(mine) + [r for r in mine if r["kind"] == "hard"]:
            if "full_test_acc" not in r:
                r["full_test_acc"] = full_test_accuracy(Path(r["run"]), cfg)
                atomic_write_json(results_path, results)
    wall = time.perf_counter() - t_start
    if mine:
        write_outputs(root, mine, teacher_acc, " ".join([".venv/bin/python", *sys.argv]), wall, subset)
    print(f"{len(mine)}/{len(rows)} rows of {tag} done; {wall / 60:.1f} min this command -> {root / 'results.md'}, "
          f"{root / 'data_knowledge.png'}, {root / 'pareto.md'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:  # user errors: one line, status 2
        print(f"data_knowledge: error: {err}", file=sys.stderr)
        sys.exit(2)
