"""Relabel, the reference way (FKD / SRe2L file format, LPLD pruning, LPQLD top-k labels).

An ImageFolder-like list of the recovered PNGs feeds a DataLoader (RandomSampler
seeded once, batch B). Every sample is decoded with PIL and augmented in a
Python loop: torchvision ``RandomResizedCrop.get_params`` (scale 0.08-1,
ratio 3/4-4/3), ``resized_crop`` (bilinear), ``hflip`` with p = 0.5, ToTensor,
Normalize; the crop coordinates (i/H, j/W, h/H, w/W) and the flip flag are
recorded per sample. For each epoch and each batch the teacher runs in eval
mode and the batch is written as ONE pickled file ``batch_<n>.tar``
(``torch.save`` of a dict: coords fp16, flips, image indices, targets and the
soft labels), plus ``sampler_indices_batch.json`` {batch id: image indices}.

Soft labels (``label``):
- ``"dense"``: all C logits (value dtype, fp16 by default);
- ``"mr"`` (LPQLD MR-k): the top-k logits and their class indices (int16),
  taken at generation time as in the LPQLD relabel script; decoded densely at
  training time;
- ``"mrs"`` (MRS-k): as "mr" plus the per-sample minimum logit.

Pruning ratio r (K = int(E * nb * (1 - r)) of the E * nb batches kept; the
partial last batch is dropped when r > 0, as in the reference):
- ``prune_mode="first_k"`` (default, what the public LPLD/LPQLD relabel scripts
  do): generation stops after the first K batches in generation order;
- ``prune_mode="generate_all"``: all E * nb batches are generated, then a
  random subset of E * nb - K files is deleted (the cost of "label everything,
  keep a random subset").

Pickle is used here only because this is the baseline being measured; the
training side loads the files with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

LABEL_MODES = ("dense", "mr", "mrs")
PRUNE_MODES = ("first_k", "generate_all")
VALUE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class FKDImageList(torch.utils.data.Dataset):
    """ImageFolder-like list ``root/<class:05d>/*.png`` (class id = the folder name as an int).

    ``dataset[i]`` decodes the PNG and applies a fresh RandomResizedCrop + flip,
    returning ``(image, target, flip, coords, index)`` (the FKD "save" mode);
    :meth:`replay` re-applies stored coords and a flip flag (the "load" mode).
    """

    def __init__(self, root: str | Path, size: int, mean: Sequence[float], std: Sequence[float],
                 scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
        self.samples: list[tuple[str, int]] = []
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in sorted(d.glob("*.png")):
                self.samples.append((str(f), int(d.name)))
        if not self.samples:
            raise ValueError(f"no PNG images under {str(root)!r} (expected root/<class>/*.png)")
        self.size = (size, size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.to_tensor = transforms.ToTensor()
        self.normalize = transforms.Normalize(list(mean), list(std))

    def __len__(self) -> int:
        return len(self.samples)

    @staticmethod
    def loader(path: str) -> Image.Image:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB")

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        img = self.loader(path)
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        coords = torch.FloatTensor((i / img.size[1], j / img.size[0], h / img.size[1], w / img.size[0]))
        img = TF.resized_crop(img, i, j, h, w, self.size, InterpolationMode.BILINEAR)
        flip = False
        if torch.rand(1) < 0.5:
            flip = True
            img = TF.hflip(img)
        return self.normalize(self.to_tensor(img)), target, flip, coords, index

    def replay(self, index: int, coords: torch.Tensor, flip: bool) -> torch.Tensor:
        """Decode image ``index`` again and apply the stored crop (coords x image size, as the reference) + flip."""
        path, _ = self.samples[index]
        img = self.loader(path)
        i = coords[0].item() * img.size[1]
        j = coords[1].item() * img.size[0]
        h = coords[2].item() * img.size[1]
        w = coords[3].item() * img.size[0]
        img = TF.resized_crop(img, i, j, h, w, self.size, InterpolationMode.BILINEAR)
        if flip:
            img = TF.hflip(img)
        return self.normalize(self.to_tensor(img))


def kept_batches(epochs: int, batches_per_epoch: int, prune_ratio: float) -> int:
    """K = int(E * nb * (1 - r)), the reference's formula (plain int())."""
    return int(epochs * batches_per_epoch * (1 - prune_ratio))


@torch.no_grad()
def run_relabel(
    teacher: nn.Module,
    image_root: str | Path,
    cfg: dict,
    out_dir: str | Path,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Write one pickled file per kept batch into ``out_dir``; return a summary (counts, bytes, seconds)."""
    label = cfg.get("label", "mr")
    if label not in LABEL_MODES:
        raise ValueError(f"relabel.label must be one of {LABEL_MODES} in the reference pipeline, got {label!r}")
    if cfg.get("cutmix", False):
        raise ValueError("relabel.cutmix is not re-created in the reference pipeline (the Fashion-MNIST preset "
                         "has it off)")
    prune_mode = cfg.get("prune_mode", "first_k")
    if prune_mode not in PRUNE_MODES:
        raise ValueError(f"relabel.prune_mode must be one of {PRUNE_MODES}, got {prune_mode!r}")
    value_dtype = cfg.get("value_dtype", "fp16")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"relabel.value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    r = float(cfg.get("prune_ratio", 0.0))
    if not 0.0 <= r < 1.0:
        raise ValueError(f"relabel.prune_ratio must be in [0, 1), got {r}")
    epochs, bs = int(cfg["epochs"]), int(cfg["batch_size"])
    k = int(cfg.get("k", 0))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad = False

    ds = FKDImageList(image_root, size, mean, std, cfg.get("rrc_scale", (0.08, 1.0)),
                      cfg.get("rrc_ratio", (3 / 4, 4 / 3)))
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(ds, generator=generator)
    loader = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=r > 0, num_workers=0)
    nb = len(loader)
    if nb < 1:
        raise ValueError(f"relabel.batch_size {bs} exceeds the {len(ds)} images")
    total = epochs * nb
    keep = kept_batches(epochs, nb, r)
    if keep < 1:
        raise ValueError(f"prune_ratio {r} keeps no batch of {total}")
    to_generate = keep if prune_mode == "first_k" else total
    torch.manual_seed(seed)  # per-sample crop/flip draws use the global RNG, as in torchvision
    sampler_indices: dict[str, list[int]] = {}
    counter = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for images, target, flip_status, coords_status, index in loader:
            output = teacher(images)
            record = {"coords": coords_status.half(), "flips": flip_status.clone(), "indices": index.clone(),
                      "targets": target.clone()}
            if label == "dense":
                record["soft_label"] = output.to(VALUE_DTYPES[value_dtype]).cpu()
            else:
                if not 1 <= k <= output.shape[1]:
                    raise ValueError(f"relabel.k must be in [1, {output.shape[1]}], got {k}")
                if label == "mrs":
                    record["sample_min"] = torch.min(output, dim=1, keepdim=True)[0].half()
                topk = torch.topk(output, k, dim=1)
                record["soft_label"] = topk.values.to(VALUE_DTYPES[value_dtype]).cpu()
                record["label_indices"] = topk.indices.short().cpu()
            torch.save(record, out_dir / f"batch_{counter}.tar")
            sampler_indices[str(counter)] = index.tolist()
            counter += 1
            if counter == to_generate:
                break
        if verbose and (epoch % max(1, epochs // 10) == 0 or counter == to_generate):
            print(f"[reference relabel] epoch {epoch + 1}/{epochs}: {counter} batch files, "
                  f"{time.perf_counter() - t0:.1f}s", flush=True)
        if counter == to_generate:
            break
    deleted = 0
    if prune_mode == "generate_all" and keep < total:
        g = torch.Generator().manual_seed(seed + 7)
        for bid in torch.randperm(total, generator=g)[keep:].tolist():
            os.remove(out_dir / f"batch_{bid}.tar")
            sampler_indices.pop(str(bid))
            deleted += 1
    with open(out_dir / "sampler_indices_batch.json", "w") as f:
        json.dump(sampler_indices, f)
    label_bytes = sum((out_dir / f"batch_{b}.tar").stat().st_size for b in sampler_indices)
    return {"images": len(ds), "batches_per_epoch": nb, "total_batches": total, "kept_batches": keep,
            "generated_batches": counter, "deleted_batches": deleted, "label_file_bytes": label_bytes,
            "label_mode": label, "k": k if label != "dense" else None, "prune_mode": prune_mode}
