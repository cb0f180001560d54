"""Soft-label encoders (relabel time) and decoders (training time).

Encoders turn the teacher's fp32 logits [B, C] into the compact rows the label
store keeps; decoders turn stored rows back into the arguments of
``lpqld_fast.ops.soft_label_kl(student_logits, values, indices, mode=..., T,
t_s, fill, scale, offset)``. Modes (DESIGN 2.3):

======================  ==============================================  ==========================
mode                    stored values [B, k]                            extra
======================  ==============================================  ==========================
``dense``               all C logits (k = C)                            no indices
``mr``    (MR-k)        top-k logits, descending                        indices
``mrs``   (MRS-k)       top-k logits                                    indices, fill = row min logit
``ms``    (FKD MS-k)    top-k probabilities softmax(z / T_relabel)      indices
``topk_norenorm``       top-k probabilities softmax(z / T_relabel)      indices
======================  ==============================================  ==========================

Value storage dtypes: ``fp16`` (default), ``bf16``, ``fp32``, or ``int8``
with a per-row float32 ``scale`` and ``offset``: v = q * scale + offset,
q in [-128, 127], scale = (max - min) / 255, offset = min + 128 * scale, so
the 256-level grid spans exactly [row min, row max] (q = -128 is the min,
q = 127 the max; in float32 the decoded end points are within a few ulps of
the stored ones, which no float32 (scale, offset) pair can always avoid) and
every entry is within scale / 2 of its original. Rows whose values are all
equal get scale 0 and offset = the value, exactly.

``fill`` (mode mrs) is stored in the value dtype (fp16 for int8 values).
Indices use the smallest integer dtype that holds C: uint8 for C <= 256,
int16 for C <= 32767, else int32.
"""
from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass

import torch

from lpqld_fast.ops.label_modes import MODES, PROB_MODES

__all__ = [
    "MODES",
    "VALUE_DTYPES",
    "EncodedLabels",
    "SoftLabels",
    "index_dtype_for",
    "value_torch_dtype",
    "fill_torch_dtype",
    "quantize_int8",
    "dequantize_int8",
    "encode_labels",
    "encode_labels_unchecked",
    "check_encoding",
    "decode_labels",
]

VALUE_DTYPES = ("fp16", "bf16", "fp32", "int8")

_FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"label mode must be one of {MODES}, got {mode!r}")
    return mode


def check_value_dtype(value_dtype: str) -> str:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")
    return value_dtype


def index_dtype_for(num_classes: int) -> torch.dtype:
    """Smallest integer dtype that holds class ids 0..C-1: uint8 (C <= 256), int16 (C <= 32767), int32."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_classes <= 256:
        return torch.uint8
    if num_classes <= 32767:
        return torch.int16
    if num_classes <= 2**31 - 1:
        return torch.int32
    raise ValueError(f"num_classes {num_classes} does not fit int32 indices")


def value_torch_dtype(value_dtype: str) -> torch.dtype:
    check_value_dtype(value_dtype)
    return torch.int8 if value_dtype == "int8" else _FLOAT_DTYPES[value_dtype]


def fill_torch_dtype(value_dtype: str) -> torch.dtype:
    """dtype of the stored mrs fill: the value dtype, fp16 when values are int8."""
    check_value_dtype(value_dtype)
    return torch.float16 if value_dtype == "int8" else _FLOAT_DTYPES[value_dtype]


def stored_k(mode: str, k: int, num_classes: int) -> int:
    """Number of stored values per sample: C for dense, else k (validated 1 <= k <= C)."""
    check_mode(mode)
    if mode == "dense":
        return num_classes
    if not isinstance(k, int) or isinstance(k, bool) or not (1 <= k <= num_classes):
        raise ValueError(f"k must be an int in [1, num_classes={num_classes}] for mode {mode!r}, got {k!r}")
    return k


@dataclass
class EncodedLabels:
    """One batch of soft labels as stored: values [B, k] (storage dtype), indices [B, k] or None,
    fill [B] or None (mrs), scale/offset float32 [B] or None (int8)."""

    values: torch.Tensor
    indices: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None


@dataclass
class SoftLabels:
    """Decoded soft labels, ready for ``soft_label_kl(student_logits, **labels.kl_kwargs(), T=..., t_s=...)``.

    values: float32 [B, k], or int8 with float32 scale/offset when kept
    quantised for the fused kernel; indices int64 [B, k] (None for dense);
    fill float32 [B] (mrs) or None.
    """

    mode: str
    values: torch.Tensor
    indices: torch.Tensor | None = None
    fill: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def kl_kwargs(self) -> dict:
        return {"values": self.values, "indices": self.indices, "mode": self.mode, "fill": self.fill,
                "scale": self.scale, "offset": self.offset}

    def to(self, device: torch.device | str) -> SoftLabels:
        mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return SoftLabels(self.mode, mv(self.values), mv(self.indices), mv(self.fill), mv(self.scale),
                          mv(self.offset))

    def slice_rows(self, rows: slice) -> SoftLabels:
        """These labels restricted to ``rows`` (every field is batch-first): a rank's share of a global batch."""
        if rows == slice(0, self.values.shape[0]):
            return self
        cut = (lambda t: None if t is None else t[rows])  # noqa: E731
        return SoftLabels(self.mode, cut(self.values), cut(self.indices), cut(self.fill), cut(self.scale),
                          cut(self.offset))

    @staticmethod
    def concat(parts: Sequence[SoftLabels]) -> SoftLabels:
        """The rows of ``parts`` (one mode) one after the other."""
        def cat(name: str) -> torch.Tensor | None:
            got = [getattr(p, name) for p in parts]
            return None if got[0] is None else torch.cat(got)

        return SoftLabels(parts[0].mode, cat("values"), cat("indices"), cat("fill"), cat("scale"), cat("offset"))

    def take_rows(self, index: torch.Tensor) -> SoftLabels:
        """These labels in the row order ``index`` (int64 [B'] on the labels' device)."""
        take = (lambda t: None if t is None else t.index_select(0, index))  # noqa: E731
        return SoftLabels(self.mode, take(self.values), take(self.indices), take(self.fill), take(self.scale),
                          take(self.offset))


# --------------------------------------------------------------------------- int8


def quantize_int8(v: torch.Tensor, *, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row affine int8: v [B, k] float -> (q int8 [B, k], scale float32 [B], offset float32 [B]).

    scale = (max - min) / 255 and offset = min + 128 * scale (computed in
    float64, rounded to float32); q = round((v - offset) / scale) clamped to
    [-128, 127]. |q * scale + offset - v| <= scale / 2 (+ float32 rounding). On ``v``'s device;
    ``validate=False`` skips the NaN/inf check (a host sync), for values checked by the caller.
    """
    if v.dim() != 2:
        raise ValueError(f"values must be [B, k], got shape {tuple(v.shape)}")
    if validate and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
        raise ValueError("values to quantise contain NaN or inf")
    vd = v.to(torch.float64)
    if v.shape[1] == 0:
        z = torch.zeros(v.shape[0], dtype=torch.float32, device=v.device)
        return torch.zeros(v.shape, dtype=torch.int8, device=v.device), z, z.clone()
    lo = vd.min(dim=1).values
    hi = vd.max(dim=1).values
    scale = ((hi - lo) / 255.0).to(torch.float32)
    flat = scale == 0
    offset = torch.where(flat, lo, lo + 128.0 * scale.to(torch.float64)).to(torch.float32)
    s = scale.to(torch.float64)[:, None]
    o = offset.to(torch.float64)[:, None]
    q = torch.where(s > 0, torch.round((vd - o) / torch.where(s > 0, s, 1.0)), torch.zeros_like(vd))
    return q.clamp_(-128, 127).to(torch.int8), scale, offset


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """q * scale + offset in float32, the same two float32 operations as the loss's reference decoder."""
    return q.to(torch.float32) * scale.to(torch.float32)[:, None] + offset.to(torch.float32)[:, None]


# --------------------------------------------------------------------------- encode / decode


def _check_storage_range(name: str, v: torch.Tensor | None, dtype: torch.dtype) -> None:
    if v is not None and dtype != torch.float32:
        limit = torch.finfo(dtype).max
        if v.numel() and float(v.abs().max()) > limit:
            raise ValueError(f"{name} exceed the {dtype} range (|v| > {limit}); store them as fp32 or int8")


def _check_label_args(logits: torch.Tensor, mode: str, value_dtype: str) -> None:
    """The checks on the arguments (no tensor values read)."""
    check_mode(mode)
    check_value_dtype(value_dtype)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a tensor [B, C], got {getattr(logits, 'shape', type(logits).__name__)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be floating point, got {logits.dtype}")


def _check_temperature(temperature: float) -> None:
    if not (float(temperature) > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _encode(z: torch.Tensor, mode: str, k: int, value_dtype: str, temperature: float, validate: bool
            ) -> tuple[EncodedLabels, torch.Tensor, torch.Tensor | None]:
    """The encoding of float32 logits ``z`` on their device: (rows, values and fill before the storage cast)."""
    c = z.shape[1]
    kk = stored_k(mode, k, c)
    if mode == "dense":
        vals, idx = z, None
    elif mode in PROB_MODES:
        p = torch.softmax(z / float(temperature), dim=1)
        vals, idx = torch.topk(p, kk, dim=1, largest=True, sorted=True)
    else:
        vals, idx = torch.topk(z, kk, dim=1, largest=True, sorted=True)
    enc = EncodedLabels(values=vals)
    if idx is not None:
        enc.indices = idx.to(index_dtype_for(c))
    fill = None
    if mode == "mrs":
        fill = z.min(dim=1).values
        if validate:
            _check_storage_range("fill (row min logits)", fill, fill_torch_dtype(value_dtype))
        enc.fill = fill.to(fill_torch_dtype(value_dtype))
    if value_dtype == "int8":
        enc.values, enc.scale, enc.offset = quantize_int8(vals, validate=validate)
    else:
        if validate:
            _check_storage_range("label values", vals, _FLOAT_DTYPES[value_dtype])
        enc.values = vals.to(_FLOAT_DTYPES[value_dtype])
    return enc, vals, fill


def encode_labels(
    logits: torch.Tensor,
    *,
    mode: str,
    k: int,
    value_dtype: str = "fp16",
    temperature: float = 1.0,
) -> EncodedLabels:
    """Teacher logits [B, C] -> the stored rows (CPU tensors) of ``mode``.

    ``temperature`` is the relabel temperature of the probabilities stored by
    "ms" and "topk_norenorm" (ignored by the logit modes). Top-k entries are in
    descending order (torch.topk, deterministic on CPU).
    """
    _check_label_args(logits, mode, value_dtype)
    if logits.numel() and not bool(torch.isfinite(logits).all()):
        raise ValueError("logits contain NaN or inf")
    _check_temperature(temperature)
    return _encode(logits.detach().to("cpu", torch.float32), mode, k, value_dtype, temperature, validate=True)[0]


def encode_labels_unchecked(
    logits: torch.Tensor,
    *,
    mode: str,
    k: int,
    value_dtype: str = "fp16",
    temperature: float = 1.0,
) -> tuple[EncodedLabels, torch.Tensor]:
    """:func:`encode_labels` on the logits' device without reading a value back: (rows, checks).

    ``checks`` float32 [4] holds what :func:`check_encoding` tests on the host once the rows are there (all
    logits finite, all values finite, max |value| and max |fill| before the storage cast), so a batch costs
    no host sync of its own and the function compiles with ``torch.compile(fullgraph=True)``. Same rows as
    :func:`encode_labels` for the same (CPU) logits.
    """
    _check_label_args(logits, mode, value_dtype)
    _check_temperature(temperature)
    z = logits.detach().to(torch.float32)
    enc, vals, fill = _encode(z, mode, k, value_dtype, temperature, validate=False)
    zero = z.new_zeros(())
    amax = lambda t: t.abs().amax() if t is not None and t.numel() else zero  # noqa: E731
    checks = torch.stack([torch.isfinite(z).all().to(torch.float32), torch.isfinite(vals).all().to(torch.float32),
                          amax(vals).to(torch.float32), amax(fill).to(torch.float32)])
    return enc, checks


def check_encoding(checks: torch.Tensor, mode: str, value_dtype: str) -> None:
    """Raise what :func:`encode_labels` raises for the logits whose ``checks`` :func:`encode_labels_unchecked`
    returned (read on the host: call it once the rows are there)."""
    all_finite, vals_finite, vals_max, fill_max = (float(v) for v in checks.cpu())
    if not all_finite:
        raise ValueError("logits contain NaN or inf")
    if mode == "mrs":
        _check_storage_range("fill (row min logits)", torch.tensor([fill_max]), fill_torch_dtype(value_dtype))
    if value_dtype == "int8":
        if not vals_finite:
            raise ValueError("values to quantise contain NaN or inf")
    else:
        _check_storage_range("label values", torch.tensor([vals_max]), _FLOAT_DTYPES[value_dtype])


def decode_labels(enc: EncodedLabels, mode: str, *, dequantize: bool = False) -> SoftLabels:
    """Stored rows -> :class:`SoftLabels` for soft_label_kl.

    Float values become float32. int8 values stay int8 with their float32
    scale/offset (the fused loss dequantises) unless ``dequantize``, which
    returns float32 values q * scale + offset and no scale/offset.
    """
    check_mode(mode)
    v = enc.values
    scale = offset = None
    if v.dtype == torch.int8:
        if enc.scale is None or enc.offset is None:
            raise ValueError("int8 label values need scale and offset")
        if dequantize:
            v = dequantize_int8(v, enc.scale, enc.offset)
        else:
            scale, offset = enc.scale.to(torch.float32), enc.offset.to(torch.float32)
    else:
        v = v.to(torch.float32)
    idx = None if enc.indices is None else enc.indices.to(torch.int64)
    if mode != "dense" and idx is None:
        raise ValueError(f"mode {mode!r} needs label indices")
    fill = None
    if mode == "mrs":
        if enc.fill is None:
            raise ValueError("mode 'mrs' needs the stored fill")
        fill = enc.fill.to(torch.float32)
    return SoftLabels(mode, v, idx, fill, scale, offset)
