"""Class-wise moments: per class count, mean and biased variance of [N, C, *spatial].

One pass over the input: each (sample, channel) row is reduced to (mean, M2)
in cache, and rows are merged into per-class float64 state with Chan's
parallel formula, so large means do not cancel catastrophically. The state is
mergeable across batches and ranks, which gives exact whole-pass moments.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from lpqld_fast.ops import _validate as V
from lpqld_fast.ops._dispatch import resolve_backend
from lpqld_fast.ops._layout import kernel_x3
from lpqld_fast.ops.reference import classwise_moments as ref

OP = "classwise_moments"
NATIVE_OP = "classwise_moments_accumulate_"


class Moments(NamedTuple):
    count: torch.Tensor  # [K] int64, samples per class
    mean: torch.Tensor  # [K, C]
    var: torch.Tensor  # [K, C], biased; 0 for empty classes


def _check_inputs(x: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Structural checks (no device work); classwise_moments_accumulate_ checks the label range."""
    V.check_tensor("x", x, ndim=range(2, 8), dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    V.check_tensor("labels", labels, ndim=1, dtypes=V.INDEX_DTYPES, device=x.device)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries but x has {x.shape[0]} samples")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def _run_accumulate(
    x3: torch.Tensor, labels: torch.Tensor, count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor, backend: str
) -> None:
    if backend == "reference":
        ref.classwise_moments_accumulate_(x3, labels, count, mean, m2)
    elif backend == "triton":
        from lpqld_fast.kernels import classwise_moments as tk  # imports triton, only for this backend

        tk.classwise_moments_accumulate_(x3, labels, count, mean, m2)
    else:  # cpp and cuda are both registered under torch.ops.lpqld
        torch.ops.lpqld.classwise_moments_accumulate_(x3, labels, count, mean, m2)


def classwise_moments_accumulate_(
    x: torch.Tensor,
    labels: torch.Tensor,
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> None:
    """Merge the class-wise moments of ``x`` into running float64 state, in place.

    count [K] float64 holds the number of elements (samples * spatial size) per
    class, mean [K, C] and m2 [K, C] float64 the running mean and sum of
    squared deviations. Variance = m2 / count. Labels outside [0, K) raise
    IndexError; the check reads a value back to the host (a device sync on a
    GPU, a graph break under torch.compile), and ``validate=False`` skips it
    for labels known to be good (the cpp kernel still checks them itself).
    """
    V.check_tensor("x", x)  # before x.device is used below
    V.check_tensor("count", count, ndim=1, dtypes=(torch.float64,), device=x.device)
    num_classes = count.shape[0]
    _check_inputs(x, labels, num_classes)
    channels = x.shape[1]
    for name, t in (("mean", mean), ("m2", m2)):
        V.check_tensor(name, t, ndim=2, dtypes=(torch.float64,), device=x.device)
        V.check_shape(name, t, (num_classes, channels))
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (it is updated in place)")
    if not count.is_contiguous():
        raise ValueError("count must be contiguous (it is updated in place)")
    name = resolve_backend(OP, x.device, backend, NATIVE_OP)
    if validate:
        V.check_index_range("labels", labels, num_classes)
    x3 = kernel_x3(x, keep_nlc=name == "cpp")  # statistics, no gradient; the CPU kernel reads channels-last in place
    labels = labels.to(torch.int64).contiguous()
    _run_accumulate(x3, labels, count, mean, m2, name)


def classwise_moments(
    x: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    out_dtype: torch.dtype = torch.float32,
    backend: str | None = None,
    validate: bool = True,
) -> Moments:
    """Per class: sample count, mean and biased variance over (samples, spatial).

    x is [N, C, *spatial] or [N, C]; labels [N] integer class ids in
    [0, num_classes). Empty classes get count 0, mean 0 and var 0.
    ``validate``: see classwise_moments_accumulate_.
    """
    _check_inputs(x, labels, num_classes)
    acc = ClasswiseMomentsAccumulator(num_classes, x.shape[1], device=x.device)
    acc.update(x, labels, backend=backend, validate=validate)
    return acc.result(out_dtype)


def merge_moments_(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    count_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> None:
    """Chan's merge of state b into state a (vectorised over classes), in place."""
    total = count + count_b
    safe = total.clamp_min(1.0)[:, None]
    delta = mean_b - mean
    mean.add_(delta * (count_b[:, None] / safe))
    m2.add_(m2_b + delta * delta * (count[:, None] * count_b[:, None] / safe))
    count.copy_(total)


class ClasswiseMomentsAccumulator:
    """Running class-wise moments over many batches (and, merged, many ranks)."""

    def __init__(self, num_classes: int, channels: int, device: torch.device | str = "cpu") -> None:
        if num_classes < 1 or channels < 1:
            raise ValueError(f"num_classes and channels must be positive, got {num_classes}, {channels}")
        self.num_classes = num_classes
        self.channels = channels
        self.device = torch.device(device)
        self.samples = torch.zeros(num_classes, dtype=torch.int64, device=self.device)
        self.count = torch.zeros(num_classes, dtype=torch.float64, device=self.device)
        self.mean = torch.zeros(num_classes, channels, dtype=torch.float64, device=self.device)
        self.m2 = torch.zeros(num_classes, channels, dtype=torch.float64, device=self.device)

    def update(self, x: torch.Tensor, labels: torch.Tensor, *, backend: str | None = None,
               validate: bool = True) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"x must be [N, {self.channels}, ...], got shape {tuple(x.shape)}")
        classwise_moments_accumulate_(x, labels, self.count, self.mean, self.m2, backend=backend, validate=validate)
        # index_add_, not bincount: a static output shape, which torch.compile traces without a graph break
        lab = labels.to(torch.int64)
        self.samples.index_add_(0, lab, torch.ones_like(lab))

    def merge_(self, other: "ClasswiseMomentsAccumulator") -> None:
        merge_moments_(self.count, self.mean, self.m2, other.count, other.mean, other.m2)
        self.samples += other.samples

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"samples": self.samples, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("samples", "count", "mean", "m2"):
            if tuple(state[name].shape) != tuple(getattr(self, name).shape):
                raise ValueError(f"moments state {name!r} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(getattr(self, name).shape)}")
            getattr(self, name).copy_(state[name])

    def result(self, out_dtype: torch.dtype = torch.float32) -> Moments:
        var = self.m2 / self.count.clamp_min(1.0)[:, None]
        return Moments(self.samples.clone(), self.mean.to(out_dtype), var.to(out_dtype))


def classwise_ema_update_(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    batch: Moments,
    momentum: float = 0.1,
) -> None:
    """The reference's EMA step: classes present in the batch move by ``momentum``.

    running = (1 - momentum) * running + momentum * batch, only where
    batch.count > 0; absent classes keep their value.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    k, c = batch.mean.shape
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        V.check_tensor(name, t, ndim=2, device=batch.mean.device)
        V.check_shape(name, t, (k, c))
    present = (batch.count > 0)[:, None]
    running_mean.copy_(torch.where(present, running_mean.lerp(batch.mean.to(running_mean.dtype), momentum), running_mean))
    running_var.copy_(torch.where(present, running_var.lerp(batch.var.to(running_var.dtype), momentum), running_var))
