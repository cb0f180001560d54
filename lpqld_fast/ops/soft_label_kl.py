"""Fused soft-label KL loss: the "dequantize soft labels during training" kernel.

    loss = (1/B) * sum_b sum_j p_bj (log p_bj - log q_bj)   (times T^2 if t2_scale)

with q = softmax(student_logits / t_s) and p the teacher distribution decoded
from the stored soft labels (``mode``, see decode_teacher in
lpqld_fast/ops/reference/soft_label_kl.py): "dense" logits, LPQLD top-k
logits ("mr", "mrs"), FKD marginal smoothing of top-k probabilities ("ms"),
or top-k probabilities without renormalisation ("topk_norenorm"). Values
may be int8 with a per-row scale/offset, dequantised inside the kernel.

The fast backends (cpp, cuda, triton) compute the loss and d(loss)/d(logits)
in one kernel pass per row without materialising a dense [B, C] teacher; the
gradient is saved for backward, which only multiplies it by grad_output.

Rules the inputs must follow: indices within [0, C) and no class twice within
a row (a duplicate would make the top-k decode ambiguous), stored values,
scale, offset and fill finite. The cpp kernel checks them as it reads the
rows; for the other backends the op checks them first (a sort of the [B, k]
indices and one device sync) unless ``validate=False``. Probabilities ("ms",
"topk_norenorm") are clamped at 0 after dequantisation.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from lpqld_fast.ops import _validate as V
from lpqld_fast.ops._dispatch import resolve_backend
from lpqld_fast.ops.label_modes import MODE_CODES, MODES
from lpqld_fast.ops.reference import soft_label_kl as ref

OP = "soft_label_kl"
NATIVE_OP = "soft_label_kl_fwd"
VALUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8)
LABEL_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)

decode_teacher = ref.decode_teacher


def _triton_module():
    from lpqld_fast.kernels import soft_label_kl as mod  # imports triton

    return mod


def _check_temperature(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = float(value)
        else:
            raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _check_row_vector(name: str, t: object, b: int, device: torch.device) -> torch.Tensor:
    V.check_tensor(name, t, ndim=1, dtypes=V.FLOAT_DTYPES, device=device)
    V.check_shape(name, t, (b,))
    return t


_FLOAT_DTYPES = frozenset(V.FLOAT_DTYPES)
_VALUE_DTYPES = frozenset(VALUE_DTYPES)
_INDEX_DTYPES = frozenset(LABEL_INDEX_DTYPES)


def _row_vector_ok(t, b: int, device: torch.device) -> bool:
    return (isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == b and t.dtype in _FLOAT_DTYPES
            and t.device == device)


def _inputs_ok(z, values, indices, mode, fill, scale, offset) -> bool:
    """True only for input that every structural check of _check_inputs accepts (the common case, in a few
    microseconds); anything else, or anything unusual, goes through those checks for their messages."""
    if not (isinstance(z, torch.Tensor) and isinstance(values, torch.Tensor) and z.dim() == 2 and values.dim() == 2
            and z.dtype in _FLOAT_DTYPES and values.dtype in _VALUE_DTYPES and isinstance(mode, str)):
        return False
    device = z.device
    b, c = z.shape
    vb, k = values.shape
    if vb != b or c < 1 or values.device != device:
        return False
    if mode == "dense":
        if k != c or indices is not None:
            return False
    elif mode in MODES:
        if not (1 <= k <= c and isinstance(indices, torch.Tensor) and indices.shape == values.shape
                and indices.dtype in _INDEX_DTYPES and indices.device == device):
            return False
    else:
        return False
    if (mode == "mrs") != (fill is not None) or (fill is not None and not _row_vector_ok(fill, b, device)):
        return False
    if values.dtype == torch.int8:
        return _row_vector_ok(scale, b, device) and _row_vector_ok(offset, b, device)
    return scale is None and offset is None


def _check_inputs(student_logits, values, indices, mode, T, t_s, fill, scale, offset) -> tuple[float, float]:
    """Structural checks: types, shapes, dtypes, devices, temperatures."""
    if (type(T) is float and type(t_s) is float and 0.0 < T < math.inf and 0.0 < t_s < math.inf
            and _inputs_ok(student_logits, values, indices, mode, fill, scale, offset)):
        return T, t_s
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    V.check_tensor("student_logits", student_logits, ndim=2, dtypes=V.FLOAT_DTYPES)
    device = student_logits.device
    b, c = student_logits.shape
    if c < 1:
        raise ValueError(f"student_logits must have at least one class, got shape {tuple(student_logits.shape)}")
    V.check_tensor("values", values, ndim=2, dtypes=VALUE_DTYPES, device=device)
    if values.shape[0] != b:
        raise ValueError(f"values has {values.shape[0]} rows but student_logits has B = {b}")
    k = values.shape[1]
    if mode == "dense":
        if k != c:
            raise ValueError(f"mode 'dense' needs values [B, C] = [{b}, {c}] teacher logits, got {tuple(values.shape)}")
        if indices is not None:
            raise ValueError("indices must be None for mode 'dense' (values hold all C teacher logits)")
    else:
        if k < 1:
            raise ValueError(f"values must hold k >= 1 stored entries per row, got shape {tuple(values.shape)}")
        if k > c:
            raise ValueError(f"values holds k = {k} entries per row but student_logits has only C = {c} classes")
        if indices is None:
            raise ValueError(f"indices is required for mode {mode!r} (the class ids of the stored values)")
        V.check_tensor("indices", indices, ndim=2, dtypes=LABEL_INDEX_DTYPES, device=device)
        V.check_shape("indices", indices, tuple(values.shape))
    if mode == "mrs":
        if fill is None:
            raise ValueError("fill is required for mode 'mrs' (the per-sample minimum logit, [B])")
        _check_row_vector("fill", fill, b, device)
    elif fill is not None:
        raise ValueError(f"fill is only used by mode 'mrs', got it with mode {mode!r}")
    if values.dtype == torch.int8:
        if scale is None or offset is None:
            missing = "scale" if scale is None else "offset"
            raise ValueError(f"{missing} is required for int8 values (v = values * scale + offset, per row)")
        _check_row_vector("scale", scale, b, device)
        _check_row_vector("offset", offset, b, device)
    elif scale is not None or offset is not None:
        raise ValueError(f"scale/offset apply only to int8 values, got values of dtype {values.dtype}")
    return _check_temperature("T", T), _check_temperature("t_s", t_s)


def _check_data(student_logits, values, indices, mode, fill, scale, offset) -> None:
    """Data checks (index range, duplicates, finiteness), gathered into one device synchronisation.

    The cpp kernel makes the same checks itself while it reads the rows, so the
    op skips these for the cpp backend.
    """
    check_label_data(values, indices, mode=mode, num_classes=student_logits.shape[1], fill=fill, scale=scale,
                     offset=offset)


def check_label_data(values: torch.Tensor, indices: torch.Tensor | None, *, mode: str, num_classes: int,
                     fill: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                     offset: torch.Tensor | None = None) -> None:
    """The data checks of soft_label_kl on stored labels (class ids in [0, num_classes) and distinct within a
    row, finite values / scale / offset / fill), as IndexError / ValueError. Run on the host copy of a batch
    before it moves to a GPU, they cost no device sync: the op is then called with validate=False."""
    c = num_classes
    b, k = values.shape[0], values.shape[1]
    if b == 0:
        return
    names, flags = [], []
    if indices is not None:
        idx = indices.to(torch.int64)
        names += ["min index", "max index"]
        flags += [idx.min(), idx.max()]
        if k > 1:
            srt = idx.sort(dim=1).values
            names.append("duplicates")
            flags.append((srt[:, 1:] == srt[:, :-1]).any())
    finite_checked = [("values", values)] if values.is_floating_point() else []
    finite_checked += [(n, t) for n, t in (("scale", scale), ("offset", offset), ("fill", fill)) if t is not None]
    for n, t in finite_checked:
        names.append(n)
        flags.append(~torch.isfinite(t).all())
    if not flags:
        return
    got = dict(zip(names, torch.stack([f.to(torch.float64) for f in flags]).tolist()))
    if indices is not None:
        lo, hi = int(got["min index"]), int(got["max index"])
        if lo < 0 or hi >= c:
            raise IndexError(f"indices holds class id {lo if lo < 0 else hi} outside [0, {c})")
        if got.get("duplicates", 0.0):
            raise ValueError(f"indices repeats a class id within a row; mode {mode!r} needs distinct top-k classes")
    for n, _ in finite_checked:
        if got[n]:
            raise ValueError(f"{n} contains NaN or inf")


def _triton_forward(logits, values, indices, fill, scale, offset, mode_code, T, t_s, grad_scale):
    if fill is not None:
        fill = fill.to(torch.float32)
    if scale is not None:
        scale = scale.to(torch.float32)
        offset = offset.to(torch.float32)
    return _triton_module().soft_label_kl_fwd(logits, values, indices, fill, scale, offset, mode_code, T, t_s,
                                              grad_scale)


def _graph_retained() -> bool:
    """True inside a backward pass that keeps the graph (retain_graph=True)."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


class _FusedSoftLabelKL(torch.autograd.Function):
    """The Triton backend: forward runs the fused kernel (loss rows and the full gradient); backward scales
    it. (cpp and cuda run lpqld::soft_label_kl, whose autograd is in C++.)"""

    @staticmethod
    def forward(ctx, logits, values, indices, fill, scale, offset, mode_code, T, t_s, grad_scale):
        loss_rows, grad = _triton_forward(logits, values, indices, fill, scale, offset, mode_code, T, t_s,
                                          grad_scale)
        ctx.save_for_backward(grad)
        return loss_rows.sum() / logits.shape[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        # loss.backward() on a CPU loss: grad_output is 1, so the saved gradient is the answer (no [B, C]
        # pass; on a GPU, checking the value would synchronise). Handed over only when the graph is freed
        # after this pass: with retain_graph the caller could edit the returned tensor in place and so change
        # what the next backward returns, so it gets a copy.
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return (grad.clone() if _graph_retained() else grad,) + (None,) * 9
        return (grad * grad_output.to(grad.dtype),) + (None,) * 9


def soft_label_kl(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    mode: str,
    T: float = 1.0,
    t_s: float = 1.0,
    fill: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    t2_scale: bool = False,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """KL(p_teacher(T) || softmax(student_logits / t_s)), batchmean, as a 0-d tensor.

    student_logits [B, C] float16/bfloat16/float32/float64 (differentiable);
    values [B, C] teacher logits for mode "dense", else [B, k] stored entries
    (top-k logits for "mr"/"mrs", top-k probabilities for "ms"/"topk_norenorm",
    where T is ignored), float or int8 with ``scale``/``offset`` [B];
    indices [B, k] int64/int32/int16/uint8 class ids, distinct within a row;
    fill [B] the per-sample fill logit of "mrs". ``t2_scale`` multiplies loss
    and gradient by T^2. The loss is float32 (float64 for float64 logits); the
    gradient has the logits' dtype. B = 0 gives a zero loss.

    Data checks (indices in [0, C) -> IndexError; a class twice in a row,
    NaN/inf in values, scale, offset or fill -> ValueError): the cpp kernel
    makes them itself as it reads the rows, at no extra cost; for the other
    backends they cost a device sync and a sort of the [B, k] indices, and
    ``validate=False`` skips them for inputs known to be good.
    """
    T, t_s = _check_inputs(student_logits, values, indices, mode, T, t_s, fill, scale, offset)
    if not isinstance(t2_scale, bool):
        raise TypeError(f"t2_scale must be a bool, got {type(t2_scale).__name__}")
    name = resolve_backend(OP, student_logits.device, backend, native_op=NATIVE_OP)
    if validate and name != "cpp":
        _check_data(student_logits, values, indices, mode, fill, scale, offset)
    b = student_logits.shape[0]
    out_dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    if b == 0:
        return (student_logits.to(out_dtype) * 0.0).sum()
    if name == "reference":
        return ref.soft_label_kl(student_logits, values, indices, mode=mode, T=T, t_s=t_s, fill=fill, scale=scale,
                                 offset=offset, t2_scale=t2_scale)
    grad_scale = T * T if t2_scale else 1.0
    if name in ("cpp", "cuda"):  # the C++ autograd op (csrc/soft_label_kl.cpp): no Python Function per call
        if fill is not None and fill.dtype != torch.float32:
            fill = fill.to(torch.float32)
        if scale is not None and scale.dtype != torch.float32:
            scale = scale.to(torch.float32)
        if offset is not None and offset.dtype != torch.float32:
            offset = offset.to(torch.float32)
        return torch.ops.lpqld.soft_label_kl(student_logits, values, indices, fill, scale, offset, MODE_CODES[mode],
                                             T, t_s, grad_scale)
    return _FusedSoftLabelKL.apply(student_logits, values, indices, fill, scale, offset, MODE_CODES[mode], T, t_s,
                                   grad_scale)


def calibrate_student_temperature(
    student_logits: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    mode: str,
    T: float,
    fill: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    grid: torch.Tensor | list[float] | None = None,
    row_weights: torch.Tensor | None = None,
) -> float:
    """LPQLD calibrated alignment: argmin_t KL(p_teacher(T) || softmax(student_logits / t)).

    t ranges over ``grid`` (default torch.linspace(0.01, 1, 100)); the smallest
    t wins ties. Vectorised over the grid in float64 chunks. Since the teacher
    entropy does not depend on t, the minimised quantity is the cross-entropy
    sum_b w_b [S_b * logsumexp(z_b / t) - (p_b . z_b) / t], with ``row_weights`` w [B] (default 1; a mixed
    batch passes its logits twice, against each label, weighted lam and 1 - lam: the cross-entropy is linear in
    the target).
    """
    _check_inputs(student_logits, values, indices, mode, T, 1.0, fill, scale, offset)
    _check_data(student_logits, values, indices, mode, fill, scale, offset)
    if grid is None:
        grid_t = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    else:
        grid_t = torch.as_tensor(grid, dtype=torch.float64).cpu()
        if grid_t.dim() != 1 or grid_t.numel() == 0:
            raise ValueError(f"grid must be a non-empty 1-D sequence of temperatures, got shape {tuple(grid_t.shape)}")
        if not bool(torch.isfinite(grid_t).all()) or bool((grid_t <= 0).any()):
            raise ValueError("grid must hold finite temperatures > 0")
    b, c = student_logits.shape
    if b == 0:
        raise ValueError("calibrate_student_temperature needs at least one sample (student_logits has B = 0)")
    if row_weights is not None:
        if not isinstance(row_weights, torch.Tensor) or row_weights.shape != (b,):
            raise ValueError(f"row_weights must be a tensor of shape [{b}], got "
                             f"{getattr(row_weights, 'shape', type(row_weights).__name__)}")
        if not bool(torch.isfinite(row_weights).all()) or bool((row_weights < 0).any()):
            raise ValueError("row_weights must be finite and >= 0")
    with torch.no_grad():
        p = decode_teacher(values, indices, mode=mode, num_classes=c, T=float(T), fill=fill, scale=scale,
                           offset=offset, dtype=torch.float64)
        z = student_logits.detach().to(torch.float64)
        if row_weights is None:  # the unweighted arithmetic as recorded runs computed it
            mass = p.sum(dim=1)  # [B]
            dot = (p * z).sum()  # sum_b p_b . z_b
        else:
            w = row_weights.to(z.device, torch.float64)
            mass = p.sum(dim=1) * w
            dot = ((p * z).sum(dim=1) * w).sum()  # sum_b w_b p_b . z_b
        grid_dev = grid_t.to(z.device)
        chunk = max(1, (1 << 22) // max(b * c, 1))
        ce = []
        for g0 in range(0, grid_dev.numel(), chunk):
            t = grid_dev[g0:g0 + chunk]
            lse = torch.logsumexp(z[None] / t[:, None, None], dim=2)  # [g, B]
            ce.append((lse * mass[None]).sum(dim=1) - dot / t)
        best = int(torch.argmin(torch.cat(ce)))
    return float(grid_t[best])
