"""Storage accounting of a label store: on-disk bytes per component and the ratio to full labels.

Full-label baseline (DESIGN 2.3): what the reference relabel keeps without
pruning or quantization — all C logits in fp16 for every batch of every
epoch, ``E * floor(N/B) * B * C * 2`` bytes — plus the augmentation tensors
the reference stores per batch (raw tensor payload, pickle/zip overhead not
counted): crop coordinates float32 [B, 4], flip flags bool [B], and with
CutMix the permutation int64 [B], lambda (float64) and box (4 x int64); with
cutout a box (4 x int64) and a colour (C_img bytes) per sample.

Our side counts the actual size of every file in the store directory,
``manifest.json`` included.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lpqld_fast.io_utils import read_json
from lpqld_fast.store.layout import GROUPS, MANIFEST, component_specs

GROUP_ORDER = ("image indices", "crop boxes", "flips", "mix parameters", "label values", "label indices",
               "fill/scale/offset", "metadata")


@dataclass
class StorageRow:
    component: str
    files: list[str]
    bytes: int
    fraction: float  # of the store's total bytes


@dataclass
class StorageReport:
    path: str
    rows: list[StorageRow]
    total_bytes: int
    label_bytes: int  # label values + indices + fill/scale/offset
    baseline_label_bytes: int  # E * floor(N/B) * B * C * 2
    baseline_aux_bytes: int  # reference per-batch augmentation tensors, all batches
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline_bytes(self) -> int:
        return self.baseline_label_bytes + self.baseline_aux_bytes

    @property
    def ratio(self) -> float:
        """Our total on-disk bytes / the full-label baseline (labels + reference per-batch tensors)."""
        return self.total_bytes / self.baseline_bytes

    @property
    def label_ratio(self) -> float:
        """Our label bytes / all C fp16 logits of every batch (the labels-only compression)."""
        return self.label_bytes / self.baseline_label_bytes

    def as_dicts(self) -> list[dict[str, Any]]:
        return [{"component": r.component, "files": list(r.files), "bytes": r.bytes, "fraction": r.fraction}
                for r in self.rows]


def full_label_bytes(epochs: int, num_images: int, batch_size: int, num_classes: int) -> int:
    """All C fp16 logits for every batch of every epoch: E * floor(N/B) * B * C * 2."""
    return epochs * (num_images // batch_size) * batch_size * num_classes * 2


def reference_aux_bytes_per_batch(batch_size: int, *, cutmix: bool, cutout: bool, channels: int = 3) -> int:
    """Raw tensor bytes the reference stores per batch besides the logits (see module docstring)."""
    b = batch_size
    n = b * 4 * 4 + b  # float32 crop coords + bool flips
    if cutmix:
        n += b * 8 + 8 + 4 * 8
    if cutout:
        n += b * (4 * 8 + channels)
    return n


def storage_report(path: str | os.PathLike) -> StorageReport:
    """Bytes on disk per component group of the store in ``path`` (need not be complete)."""
    path = Path(path)
    m = read_json(path / MANIFEST, "label store manifest")
    specs = component_specs(m)
    by_group: dict[str, tuple[list[str], int]] = {g: ([], 0) for g in GROUP_ORDER}
    for name, spec in specs.items():
        f = path / spec.file
        size = f.stat().st_size if f.exists() else 0
        files, total = by_group[GROUPS[name]]
        by_group[GROUPS[name]] = (files + [spec.file], total + size)
    files, total = by_group["metadata"]
    by_group["metadata"] = ([MANIFEST] + files, total + (path / MANIFEST).stat().st_size)
    grand = sum(t for _, t in by_group.values())
    rows = [StorageRow(g, f, t, t / grand if grand else 0.0) for g, (f, t) in by_group.items() if f]
    label_bytes = sum(r.bytes for r in rows if r.component in ("label values", "label indices", "fill/scale/offset"))
    c_img = int(m["image_shape"][0])
    aug = m.get("augment", {})
    total_batches = int(m["epochs"]) * (int(m["num_images"]) // int(m["batch_size"]))
    base_labels = full_label_bytes(int(m["epochs"]), int(m["num_images"]), int(m["batch_size"]),
                                   int(m["num_classes"]))
    base_aux = total_batches * reference_aux_bytes_per_batch(int(m["batch_size"]), cutmix=bool(aug.get("cutmix")),
                                                             cutout=bool(aug.get("cutout")), channels=c_img)
    lab = m["label"]
    info = {"num_kept": int(m["num_kept"]), "total_batches": total_batches, "batch_size": int(m["batch_size"]),
            "num_classes": int(m["num_classes"]), "mode": lab["mode"], "k": int(lab["stored_k"]),
            "value_dtype": lab["value_dtype"], "prune_ratio": m.get("prune_ratio"), "complete": m.get("complete")}
    return StorageReport(str(path), rows, grand, label_bytes, base_labels, base_aux, info)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def storage_markdown(report: StorageReport) -> str:
    """A markdown table of a :class:`StorageReport` (for ``lpqld report storage``)."""
    i = report.info
    lines = [
        f"Label store `{report.path}`: {i['num_kept']} of {i['total_batches']} batches kept "
        f"(B={i['batch_size']}, C={i['num_classes']}, mode={i['mode']}, k={i['k']}, {i['value_dtype']})",
        "",
        "| component | files | bytes | size | share |",
        "|---|---|---:|---:|---:|",
    ]
    for r in report.rows:
        files = ", ".join(r.files)
        lines.append(f"| {r.component} | {files} | {r.bytes} | {_human(r.bytes)} | {100 * r.fraction:.2f}% |")
    lines += [
        f"| **total** | | {report.total_bytes} | {_human(report.total_bytes)} | 100.00% |",
        "",
        f"Full-label baseline: {report.baseline_label_bytes} B of fp16 logits (E*floor(N/B)*B*C*2) + "
        f"{report.baseline_aux_bytes} B of per-batch augmentation tensors = {report.baseline_bytes} B "
        f"({_human(report.baseline_bytes)}).",
        f"Ratio to baseline: {report.ratio:.6f} ({1 / report.ratio:.1f}x smaller); labels only: "
        f"{report.label_ratio:.6f} ({1 / report.label_ratio:.1f}x smaller).",
    ]
    return "\n".join(lines)
