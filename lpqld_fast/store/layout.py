"""On-disk schema of a label store: component names, dtypes, shapes, slot (de)serialisation.

A store is one directory::

    manifest.json          schema version, full relabel config, hashes, layout, per-file sha256/bytes, "complete"
    batch_ids.bin          [K]           kept batch ids, sorted (slot s holds batch id batch_ids[s])
    image_indices.bin      [K, B]        indices into the image set (smallest dtype holding N - 1)
    crop_boxes.bin         [K, B, 4]     integer pixel boxes (i, j, h, w) of the source image (lossless;
                                         the float32 (i/H, j/W, h/H, w/W) of augment.py is recovered exactly)
    flips.bin              [K, ceil(B/8)] flip flags, bit-packed (numpy.packbits, little bit order)
    cutmix_lam.bin         [K]           float32                              } only with cutmix
    cutmix_box.bin         [K, 4]        (y0, x0, y1, x1) in output pixels    }
    cutmix_perm.bin        [K, B]        permutation                          }
    cutout_box.bin         [K, B, 4]     (y0, x0, y1, x1) in output pixels    } only with cutout
    cutout_fill.bin        [K, B, C_img] uint8 fill colour                    }
    label_values.bin       [K, B, k]     fp16 / bf16 (raw uint16 bits) / fp32 / int8 (k = C for dense)
    label_indices.bin      [K, B, k]     uint8 / int16 / int32 (not for dense)
    label_fill.bin         [K, B]        per-sample minimum logit (mrs only)
    label_scale.bin        [K, B]        float32 (int8 only)
    label_offset.bin       [K, B]        float32 (int8 only)
    done.bin               [K]           uint8, 1 = slot finished (one byte per slot, not one bit, so
                                         that writers of different slots never share a byte)

Every ``.bin`` file is a raw little-endian C-order array (no header, no
pickle) whose dtype and shape are recorded in ``manifest["components"]``;
readers map it with ``numpy.memmap``. The leading dimension of every
component but ``batch_ids``/``done`` is the slot, so one slot's bytes are one
contiguous range of each file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lpqld_fast.augment import AugParams, CutMixParams, CutoutParams, normalized_boxes, pixel_boxes
from lpqld_fast.store.quantize import (
    EncodedLabels,
    check_mode,
    check_value_dtype,
    fill_torch_dtype,
    index_dtype_for,
)

FORMAT = "lpqld-label-store"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# component -> accounting group
GROUPS: dict[str, str] = {
    "image_indices": "image indices",
    "crop_boxes": "crop boxes",
    "flips": "flips",
    "cutmix_lam": "mix parameters",
    "cutmix_box": "mix parameters",
    "cutmix_perm": "mix parameters",
    "cutout_box": "mix parameters",
    "cutout_fill": "mix parameters",
    "label_values": "label values",
    "label_indices": "label indices",
    "label_fill": "fill/scale/offset",
    "label_scale": "fill/scale/offset",
    "label_offset": "fill/scale/offset",
    "batch_ids": "metadata",
    "done": "metadata",
}
META_COMPONENTS = ("batch_ids", "done")

_TORCH_TO_NP = {
    torch.uint8: "|u1",
    torch.int8: "|i1",
    torch.int16: "<i2",
    torch.int32: "<i4",
    torch.int64: "<i8",
    torch.float16: "<f2",
    torch.bfloat16: "<u2",  # raw bits; numpy has no bfloat16
    torch.float32: "<f4",
}


def int_dtype_for(max_value: int) -> str:
    """Smallest numpy dtype string holding 0..max_value: |u1, <u2, <i4 or <i8."""
    if max_value < 0:
        raise ValueError(f"max_value must be >= 0, got {max_value}")
    if max_value <= 0xFF:
        return "|u1"
    if max_value <= 0xFFFF:
        return "<u2"
    if max_value <= 2**31 - 1:
        return "<i4"
    return "<i8"


@dataclass(frozen=True)
class Component:
    name: str
    dtype: str  # numpy dtype string
    shape: tuple[int, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.bin"

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.itemsize

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}


def component_specs(m: dict[str, Any]) -> dict[str, Component]:
    """The components of a store from its manifest's layout fields (deterministic order)."""
    k_slots = int(m["num_kept"])
    b = int(m["batch_size"])
    n = int(m["num_images"])
    c_img, h, w = (int(v) for v in m["image_shape"])
    oh, ow = (int(v) for v in m["out_size"])
    num_classes = int(m["num_classes"])
    lab = m["label"]
    mode = check_mode(lab["mode"])
    vdt = check_value_dtype(lab["value_dtype"])
    kk = int(lab["stored_k"])
    aug = m["augment"]
    specs = [
        Component("batch_ids", int_dtype_for(int(m["total_batches"]) - 1), (k_slots,)),
        Component("image_indices", int_dtype_for(n - 1), (k_slots, b)),
        Component("crop_boxes", int_dtype_for(max(h, w)), (k_slots, b, 4)),
        Component("flips", "|u1", (k_slots, (b + 7) // 8)),
    ]
    if aug.get("cutmix"):
        specs += [
            Component("cutmix_lam", "<f4", (k_slots,)),
            Component("cutmix_box", int_dtype_for(max(oh, ow)), (k_slots, 4)),
            Component("cutmix_perm", int_dtype_for(b - 1), (k_slots, b)),
        ]
    if aug.get("cutout"):
        specs += [
            Component("cutout_box", int_dtype_for(max(oh, ow)), (k_slots, b, 4)),
            Component("cutout_fill", "|u1", (k_slots, b, c_img)),
        ]
    vt = torch.int8 if vdt == "int8" else {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[vdt]
    specs.append(Component("label_values", _TORCH_TO_NP[vt], (k_slots, b, kk)))
    if mode != "dense":
        specs.append(Component("label_indices", _TORCH_TO_NP[index_dtype_for(num_classes)], (k_slots, b, kk)))
    if mode == "mrs":
        specs.append(Component("label_fill", _TORCH_TO_NP[fill_torch_dtype(vdt)], (k_slots, b)))
    if vdt == "int8":
        specs += [Component("label_scale", "<f4", (k_slots, b)), Component("label_offset", "<f4", (k_slots, b))]
    specs.append(Component("done", "|u1", (k_slots,)))
    return {s.name: s for s in specs}


def components_json(specs: dict[str, Component]) -> dict[str, Any]:
    return {name: s.to_json() for name, s in specs.items()}


# --------------------------------------------------------------------------- slot <-> arrays


def _np(t: torch.Tensor, dtype: str) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view("<u2")
    return t.numpy().astype(dtype, copy=False)


def _checked_int(name: str, t: torch.Tensor, dtype: str, upper: int) -> np.ndarray:
    t = t.detach().cpu().to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > upper):
        raise ValueError(f"{name} values must lie in [0, {upper}] to fit {dtype}")
    return t.numpy().astype(dtype)


def encode_slot(
    m: dict[str, Any], specs: dict[str, Component], aug: AugParams, enc: EncodedLabels
) -> dict[str, np.ndarray]:
    """One batch's augmentation parameters and encoded labels -> the row of every component."""
    _, h, w = (int(v) for v in m["image_shape"])
    oh, ow = (int(v) for v in m["out_size"])
    b = int(m["batch_size"])
    rows: dict[str, np.ndarray] = {}
    if aug.image_indices.shape != (b,):
        raise ValueError(f"image_indices must have shape [{b}], got {tuple(aug.image_indices.shape)}")
    rows["image_indices"] = _checked_int("image_indices", aug.image_indices, specs["image_indices"].dtype,
                                         int(m["num_images"]) - 1)
    pix = pixel_boxes(aug.boxes.cpu(), h, w)
    if not torch.equal(normalized_boxes(pix, h, w), aug.boxes.cpu().to(torch.float32)):
        raise ValueError("crop boxes are not normalised integer pixel boxes (use augment.sample_rrc_boxes)")
    rows["crop_boxes"] = _checked_int("crop_boxes", pix, specs["crop_boxes"].dtype, max(h, w))
    rows["flips"] = np.packbits(aug.flips.cpu().numpy().astype(bool), bitorder="little")
    if "cutmix_lam" in specs:
        if aug.cutmix is None:
            raise ValueError("the store expects CutMix parameters but the batch has none")
        rows["cutmix_lam"] = np.asarray(aug.cutmix.lam, dtype="<f4")
        rows["cutmix_box"] = _checked_int("cutmix box", aug.cutmix.box, specs["cutmix_box"].dtype, max(oh, ow))
        rows["cutmix_perm"] = _checked_int("cutmix perm", aug.cutmix.perm, specs["cutmix_perm"].dtype, b - 1)
    if "cutout_box" in specs:
        if aug.cutout is None:
            raise ValueError("the store expects cutout parameters but the batch has none")
        rows["cutout_box"] = _checked_int("cutout boxes", aug.cutout.boxes, specs["cutout_box"].dtype, max(oh, ow))
        rows["cutout_fill"] = _np(aug.cutout.fill.to(torch.uint8), "|u1")
    rows["label_values"] = _np(enc.values, specs["label_values"].dtype)
    for name, t in (("label_indices", enc.indices), ("label_fill", enc.fill), ("label_scale", enc.scale),
                    ("label_offset", enc.offset)):
        if name in specs:
            if t is None:
                raise ValueError(f"the store expects {name} but the encoded labels have none")
            rows[name] = _np(t, specs[name].dtype)
    for name, arr in rows.items():
        spec = specs[name]
        if arr.shape != spec.row_shape or arr.dtype != np.dtype(spec.dtype):
            raise ValueError(f"{name}: row has shape {arr.shape} dtype {arr.dtype}, the store expects "
                             f"{spec.row_shape} {np.dtype(spec.dtype)}")
    return rows


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(a, copy=True))


def _t_bf16(a: np.ndarray) -> torch.Tensor:
    """Raw uint16 bits -> torch.bfloat16."""
    return _t(np.asarray(a).view("<i2")).view(torch.bfloat16)


def decode_slot(m: dict[str, Any], rows: dict[str, np.ndarray]) -> tuple[AugParams, EncodedLabels]:
    """The rows of one slot -> (AugParams, EncodedLabels); inverse of :func:`encode_slot`."""
    _, h, w = (int(v) for v in m["image_shape"])
    oh, ow = (int(v) for v in m["out_size"])
    b = int(m["batch_size"])
    flips = np.unpackbits(rows["flips"], count=b, bitorder="little").astype(bool)
    aug = AugParams(
        image_indices=_t(rows["image_indices"]).to(torch.int64),
        boxes=normalized_boxes(_t(rows["crop_boxes"]).to(torch.int64), h, w),
        flips=torch.from_numpy(flips),
        out_size=(oh, ow),
    )
    if "cutmix_lam" in rows:
        aug.cutmix = CutMixParams(float(rows["cutmix_lam"]), _t(rows["cutmix_box"]).to(torch.int64),
                                  _t(rows["cutmix_perm"]).to(torch.int64))
    if "cutout_box" in rows:
        aug.cutout = CutoutParams(_t(rows["cutout_box"]).to(torch.int64), _t(rows["cutout_fill"]))
    vdt = m["label"]["value_dtype"]
    bf16 = vdt == "bf16"
    enc = EncodedLabels(values=_t_bf16(rows["label_values"]) if bf16 else _t(rows["label_values"]))
    if "label_indices" in rows:
        enc.indices = _t(rows["label_indices"])
    if "label_fill" in rows:
        enc.fill = _t_bf16(rows["label_fill"]) if bf16 else _t(rows["label_fill"])
    if "label_scale" in rows:
        enc.scale = _t(rows["label_scale"])
        enc.offset = _t(rows["label_offset"])
    return aug, enc
