"""Report: accuracy, storage per component, diversity metrics and plots of one run.

Diversity (paper 002 Table 1 and DESIGN 2.6), on penultimate teacher features:
- within-class mean pairwise cosine similarity (lower = more diverse);
- MMD^2 between synthetic and real features with a Gaussian kernel whose
  bandwidth is the median pairwise distance of the pooled features (the
  median heuristic), biased estimator, averaged over classes.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lpqld_fast import seeding
from lpqld_fast.data import get_dataset
from lpqld_fast.data.folder_tree import _decode_all
from lpqld_fast.data.transforms import normalize
from lpqld_fast.image_set import load_recovered
from lpqld_fast.io_utils import atomic_write_bytes, read_json
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.store.accounting import storage_markdown, storage_report


def _plt():
    # matplotlib is imported on first plot: it costs ~0.5 s and only the report draws
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def within_class_cosine(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over classes of the mean pairwise cosine similarity (i != j) within the class."""
    sims = []
    f = torch.nn.functional.normalize(features.double(), dim=1)
    for c in labels.unique().tolist():
        fc = f[labels == c]
        n = fc.shape[0]
        if n < 2:
            continue
        g = fc @ fc.T
        sims.append(float((g.sum() - g.diagonal().sum()) / (n * (n - 1))))
    return float(sum(sims) / len(sims)) if sims else float("nan")


def mmd2_gaussian(a: torch.Tensor, b: torch.Tensor, bandwidth: float | None = None) -> tuple[float, float]:
    """Biased MMD^2 with k(x, y) = exp(-||x-y||^2 / (2 s^2)); s = median pairwise distance if not given."""
    a, b = a.double(), b.double()
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).pow(2)
    if bandwidth is None:
        off = d2[~torch.eye(len(z), dtype=torch.bool)]
        bandwidth = float(off.sqrt().median()) if off.numel() else 1.0
        bandwidth = bandwidth if bandwidth > 0 else 1.0
    k = torch.exp(-d2 / (2 * bandwidth**2))
    n = len(a)
    mmd = k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()
    return float(mmd), bandwidth


@torch.no_grad()
def teacher_features(teacher: torch.nn.Module, images_uint8: torch.Tensor, mean, std, batch: int = 500) -> torch.Tensor:
    teacher.eval()
    out = []
    for i in range(0, len(images_uint8), batch):
        out.append(teacher.features(normalize(images_uint8[i:i + batch], mean, std)).flatten(1))
    return torch.cat(out)


def _real_images(train: Any, idx: torch.Tensor) -> torch.Tensor:
    """uint8 [n, C, S, S] of training images ``idx``: indexed in memory, or decoded from a streamed tree and
    fitted to its image size (centre crop, the eval geometry) without augmentation."""
    if hasattr(train, "images"):
        return train.images[idx]
    files = type(train)(train.root, transform=None, classes=train.classes, mode=train.mode)
    return _decode_all(files, "L" if train.in_chans == 1 else "RGB", train.image_size, idx.tolist())


def diversity_metrics(squeeze_dir: Path, recover_dir: Path, config: dict[str, Any], real_per_class: int = 100,
                      seed: int = 0) -> dict[str, float]:
    """Diversity of the image set in ``recover_dir`` under the teacher of ``squeeze_dir``."""
    images, labels, _ = load_recovered(recover_dir)
    train = get_dataset(config["dataset"], "train", root=config.get("data_root"))
    teacher = load_teacher(Path(squeeze_dir) / "teacher.pt", build_teacher(config["squeeze"], train))
    g = seeding.subset(seed)
    targets = train.targets
    real_idx = []
    for c in range(train.num_classes):
        idx = torch.nonzero(targets == c).flatten()
        real_idx.append(idx[torch.randperm(len(idx), generator=g)[:real_per_class]])
    real_idx = torch.cat(real_idx)
    fs = teacher_features(teacher, images, train.mean, train.std)
    fr = teacher_features(teacher, _real_images(train, real_idx), train.mean, train.std)
    lr = targets[real_idx]
    mmds, bws = [], []
    for c in labels.unique().tolist():
        m, bw = mmd2_gaussian(fs[labels == c], fr[lr == c])
        mmds.append(m)
        bws.append(bw)
    return {"within_class_cosine_synthetic": within_class_cosine(fs, labels),
            "within_class_cosine_real": within_class_cosine(fr, lr),
            "mmd2_synthetic_vs_real": sum(mmds) / len(mmds),
            "mmd_bandwidth_median": float(torch.tensor(bws).median())}


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def plot_training(metrics: dict[str, Any], path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    ep = [e["epoch"] for e in metrics["epochs"]]
    axes[0].plot(ep, [e["loss"] for e in metrics["epochs"]], label="KL loss")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("train loss")
    ax2 = axes[0].twinx()
    ax2.plot(ep, [e["T"] for e in metrics["epochs"]], "--", color="tab:orange", label="teacher T")
    ax2.plot(ep, [e["t_s"] * 10 for e in metrics["epochs"]], ":", color="tab:green", label="student t_s x10")
    ax2.legend(loc="upper right", fontsize=7)
    evals = metrics["evals"]
    tested = [e for e in evals if "test_acc" in e]  # train.test_eval=selected: only the selected and the last
    axes[1].plot([e["epoch"] for e in tested], [e["test_acc"] for e in tested], "o-" if len(tested) == len(evals)
                 else "o", label="test")
    if evals and "val_acc" in evals[0]:
        axes[1].plot([e["epoch"] for e in evals], [e["val_acc"] for e in evals], "s--", label="validation (real train)")
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("top-1 (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_vs_storage(rows: list[dict[str, Any]], path: Path, title: str = "",
                             references: list[dict[str, Any]] | None = None) -> None:
    """rows: {'label': str, 'total_bytes': int, 'acc': float, 'std': float (optional), 'group': str,
    'connect': bool (optional, default True: the group's points are joined by a line)};
    references: published points {'label', 'total_bytes', 'acc'}, drawn as grey stars without lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(references or []):
        ax.plot([r["total_bytes"] / 1024], [r["acc"]], marker="*", color="grey", linestyle="none",
                label="published (images only)" if i == 0 else None)
        ax.annotate(r["label"], (r["total_bytes"] / 1024, r["acc"]), fontsize=6, color="grey", xytext=(3, -8),
                    textcoords="offset points")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r.get("group", ""), []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["total_bytes"])
        # a group of alternatives at one budget (connect=False) is drawn as points, not as a curve
        line = "-" if all(r.get("connect", True) for r in rs) else "none"
        ax.errorbar([r["total_bytes"] / 1024 for r in rs], [r["acc"] for r in rs],
                    yerr=[r.get("std", 0.0) for r in rs], marker="o", capsize=3, label=name or None, linestyle=line)
        for r in rs:
            ax.annotate(r["label"], (r["total_bytes"] / 1024, r["acc"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("total storage, images + labels (KiB)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)  # the long table titles fit the figure
    if any(groups) or references:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_summary(run: str | Path) -> dict[str, Any]:
    """Numbers of one finished run: accuracy, storage (images + labels), teacher accuracy."""
    run = Path(run)
    train = read_json(run / "train" / "train_metrics.json", "train metrics")
    rec = read_json(run / "recover" / "manifest.json", "recover manifest")
    storage = storage_report(run / "relabel")
    image_bytes = rec["num_images"] * int(torch.tensor(rec["shape"]).prod())
    total = image_bytes + storage.total_bytes
    full_labels = storage.baseline_bytes
    return {
        # runs older than validation selection have no "selected_acc": their last evaluation is the selected one
        "selected_acc": train.get("selected_acc", train["last_acc"]),
        "selection": train.get("selection", "last evaluation"),
        "best_acc": train["best_acc"], "last_acc": train["last_acc"],
        "image_bytes": image_bytes, "label_bytes": storage.total_bytes, "total_bytes": total,
        "full_label_bytes": full_labels, "label_compression": full_labels / max(storage.total_bytes, 1),
        "total_compression_vs_full": (image_bytes + full_labels) / max(total, 1),
        "storage": storage,
    }


def write_report(run: str | Path, diversity: bool = True, config: dict[str, Any] | None = None) -> Path:
    """Write <run>/report/REPORT.md with plots; print the headline numbers. Returns the report path.

    The settings are each stage's recorded ones (the teacher's from squeeze/config.json, the student's from
    train/config.json, IPC from the recover manifest); dataset and data root from ``config`` (the CLI's,
    checked against <run>/run.json), else from squeeze/config.json.
    """
    run = Path(run)
    recorded = read_json(run / "squeeze" / "config.json", "squeeze config")["config"]
    config = {**recorded, **({k: config[k] for k in ("dataset", "data_root")} if config else {})}
    if (run / "train" / "config.json").exists():
        config["train"] = read_json(run / "train" / "config.json", "train config")["config"]["train"]
    out = run / "report"
    out.mkdir(parents=True, exist_ok=True)
    s = run_summary(run)
    sq = read_json(run / "squeeze" / "metrics.json", "squeeze metrics")
    train = read_json(run / "train" / "train_metrics.json", "train metrics")
    plot_training(train, out / "training_curves.png")
    shutil.copyfile(run / "recover" / "grid.png", out / "distilled_images.png")
    plot_accuracy_vs_storage([{"label": "this run", "total_bytes": s["total_bytes"], "acc": s["selected_acc"],
                               "group": "ours"},
                              {"label": "full labels", "total_bytes": s["image_bytes"] + s["full_label_bytes"],
                               "acc": float("nan"), "group": "full-label storage (accuracy n/a)"}],
                             out / "accuracy_vs_storage.png", "accuracy against storage")
    div = diversity_metrics(run / "squeeze", run / "recover", config) if diversity else {}
    ipc = read_json(run / "recover" / "manifest.json", "recover manifest")["recover"]["ipc"]
    lines = [
        f"# lpqld_fast report: {run}",
        "",
        f"- dataset: {config['dataset']}" + (f" ({config['data_root']})" if config.get("data_root") else "")
        + f", IPC {ipc}, student {config['train'].get('model')}",
        f"- teacher test top-1: {sq['teacher_test_acc']:.2f}%",
        f"- **student test top-1: {s['selected_acc']:.2f}%** (selected by {s['selection']}), last "
        f"{s['last_acc']:.2f}%" + ("; the test split ran for the selected and the last weights only "
                                   "(train.test_eval=selected)" if s["best_acc"] is None else
                                   f"; best of the test evaluations {s['best_acc']:.2f}% (chosen on the test set, "
                                   "for reference only; all evaluations in train/train_metrics.json)"),
        f"- storage: images {_human(s['image_bytes'])} (uint8 raw) + labels {_human(s['label_bytes'])} = "
        f"**{_human(s['total_bytes'])}**; full fp16 labels would be {_human(s['full_label_bytes'])} "
        f"(label compression x{s['label_compression']:.1f}, total x{s['total_compression_vs_full']:.1f})",
        "",
        "## Label storage per component",
        "",
        storage_markdown(s["storage"]),
        "",
    ]
    if div:
        lines += ["## Diversity (penultimate teacher features)", "",
                  "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in div.items()]
        lines += ["", "MMD^2: Gaussian kernel, bandwidth = median pairwise distance of the pooled synthetic+real "
                  "features per class (median heuristic), 100 random real images per class.", ""]
    lines += ["## Plots", "", "![training](training_curves.png)", "", "![images](distilled_images.png)", "",
              "![storage](accuracy_vs_storage.png)", ""]
    atomic_write_bytes(out / "REPORT.md", "\n".join(lines).encode())
    print(f"student test top-1: {s['selected_acc']:.2f}% ({s['selection']}), last {s['last_acc']:.2f}% | storage "
          f"{_human(s['total_bytes'])} (images {_human(s['image_bytes'])} + labels {_human(s['label_bytes'])}), "
          f"labels x{s['label_compression']:.1f} smaller than full | report: {out / 'REPORT.md'}")
    return out / "REPORT.md"
