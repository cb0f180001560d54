"""A distilled image set on disk: the folder recover writes and relabel, train and report read.

    units/unit_<uid>.pt   one optimisation unit's images + labels (recover's resumable output)
    images.pt             every image, class-major: uint8 [N, C, H, W] + int64 labels [N]
    png/<class>/<i>.png   the same images as PNGs; grid.png, one row per class
    manifest.json         run config, dataset, seed, teacher_sha256, images_sha256, shape

Synthesised sets come from :mod:`lpqld_fast.recover`, real-image sets from :mod:`lpqld_fast.real_images`;
both pack their unit files with :func:`finalize_recover`. :func:`bind_real_images` rebinds a real-image set
to the expert that labels it (:mod:`lpqld_fast.experts`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lpqld_fast.io_utils import atomic_path, atomic_write_json, load_tensors, read_json, save_tensors, sha256_tensors
from lpqld_fast.seeding import stream

__all__ = ["RECOVER_SCHEMA", "Unit", "class_stream", "random_class_pick", "finalize_recover", "load_recovered",
           "bind_real_images", "save_png", "save_grid"]

RECOVER_SCHEMA = 1


@dataclass
class Unit:
    """One optimisation unit: images that share augmentation draws and BN targets."""

    uid: int
    labels: torch.Tensor  # [n] class of each image
    target: int  # index into the BN target table (class id, or 0 for global stats)


def class_stream(seed: int, c: int) -> torch.Generator:
    """The stream that picks real training images of class ``c`` (every real-image selection draws from it)."""
    return stream("lpqld-real-images", seed, c)


def random_class_pick(class_indices: torch.Tensor, ipc: int, seed: int, c: int) -> torch.Tensor:
    """``ipc`` of class ``c``'s train-set indices, drawn without replacement from :func:`class_stream`:
    independent of the other classes, and a larger IPC extends a smaller one. The paper-001 baseline's
    "random" real images and recover.init=real both pick with it."""
    return class_indices[torch.randperm(len(class_indices), generator=class_stream(seed, c))[:ipc]]


def finalize_recover(out: Path, units: list[Unit], num_classes: int, run_cfg: dict, seconds: float) -> dict:
    """Pack all units into images.pt (+ PNGs per class folder, a grid, the manifest)."""
    imgs, labels = [], []
    for u in units:
        payload = load_tensors(out / "units" / f"unit_{u.uid:06d}.pt", what="recovered unit")
        imgs.append(payload["images"])
        labels.append(payload["labels"])
    images = torch.cat(imgs)
    labels = torch.cat(labels)
    order = torch.argsort(labels, stable=True)  # class-major order for every mode
    images, labels = images[order].contiguous(), labels[order].contiguous()
    save_tensors(out / "images.pt", {"images": images, "labels": labels})
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for i in range(len(labels)):
        c = int(labels[i])
        save_png(out / "png" / f"{c:05d}" / f"{int(counts[c]):04d}.png", images[i])
        counts[c] += 1
    save_grid(out / "grid.png", images, labels, num_classes)
    for stale in (out / "units").glob("pass_*.ckpt.pt"):  # left by a killed run that used other groups
        stale.unlink(missing_ok=True)
    images_hash = sha256_tensors({"images": images, "labels": labels})
    manifest = {"schema": RECOVER_SCHEMA, **run_cfg, "images_sha256": images_hash, "num_images": len(labels),
                "num_classes": num_classes, "shape": list(images.shape[1:]), "seconds": seconds,
                "images_file_bytes": os.path.getsize(out / "images.pt")}
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def load_recovered(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Load a recover output (images uint8 [N, C, H, W], labels [N], manifest); verify its hash."""
    path = Path(path)
    manifest = read_json(path / "manifest.json", "recover manifest")
    payload = load_tensors(path / "images.pt", what="distilled images")
    images, labels = payload["images"], payload["labels"]
    if sha256_tensors({"images": images, "labels": labels}) != manifest.get("images_sha256"):
        raise ValueError(f"{path / 'images.pt'} does not match the hash in {path / 'manifest.json'} "
                         "(modified or corrupt)")
    return images, labels, manifest


def bind_real_images(recover_dir: str | Path, teacher_sha256: str, expert: dict[str, Any] | None = None) -> dict:
    """Bind a real-image recover set to the labeller with hash ``teacher_sha256``; return the new manifest.

    The label store records its teacher's hash and training checks it against
    the recover manifest's ``teacher_sha256``. Real images were not made by a
    teacher, so any expert may label them: this rewrites the manifest's
    ``teacher_sha256`` (keeping the selection's own hash as
    ``selection_teacher_sha256``). A ``recover_dir`` that is a symlink to a
    shared set is replaced by a small directory of symlinks to the shared
    files plus its own manifest, so the shared set is never modified.
    Synthetic (teacher-made) sets are refused.
    """
    d = Path(recover_dir)
    manifest = read_json(d / "manifest.json", "recover manifest")
    if manifest.get("source") != "real":
        raise ValueError(f"{d} holds synthetic images recovered with teacher {manifest.get('teacher_sha256')!r}; "
                         "only real-image sets (lpqld_fast.real_images) can be bound to another expert")
    if manifest["teacher_sha256"] == teacher_sha256:
        return manifest
    new = {**manifest, "teacher_sha256": teacher_sha256,
           "selection_teacher_sha256": manifest.get("selection_teacher_sha256", manifest["teacher_sha256"]),
           "bound_expert": expert or {}}
    if d.is_symlink():
        src = d.resolve()
        new["bound_from"] = str(src)
        d.unlink()
        d.mkdir()
        for name in os.listdir(src):
            if name in ("manifest.json", "recover_state.json", "units"):
                continue
            os.symlink(os.path.relpath(src / name, d), d / name)
    atomic_write_json(d / "manifest.json", new)
    return new


def save_png(path: Path, img_uint8: torch.Tensor) -> None:
    from PIL import Image

    arr = img_uint8.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")


def save_grid(path: Path, images: torch.Tensor, labels: torch.Tensor, num_classes: int, max_per_class: int = 10) -> None:
    """One row per class, up to ``max_per_class`` images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = min(max_per_class, max(int((labels == c).sum()) for c in range(num_classes)))
    rows = min(num_classes, 50)
    fig, axes = plt.subplots(rows, per, figsize=(per * 0.8, rows * 0.8), squeeze=False)
    for r in range(rows):
        idx = torch.nonzero(labels == r).flatten()[:per]
        for col in range(per):
            ax = axes[r][col]
            ax.axis("off")
            if col < len(idx):
                img = images[idx[col]].permute(1, 2, 0).numpy()
                ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=100)
    plt.close(fig)
