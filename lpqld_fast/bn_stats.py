"""Class-wise statistics of every BatchNorm input, collected with forward hooks.

Hooks work on any model (ResNet-18/50, ConvNet, ...) without rewriting it.
Two modes:
- "exact": whole-pass class moments, merged batch by batch in float64 with
  the fused ``classwise_moments_accumulate_`` op (default; independent of
  batch order and of how the pass is split across ranks).
- "ema": the reference's running estimate: per batch, the class moments of
  the classes present, blended in with momentum 0.1 (mean starts at 0, var
  at 1, like a fresh BatchNorm).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from lpqld_fast import distributed
from lpqld_fast.io_utils import load_tensors, save_tensors
from lpqld_fast.ops import ClasswiseMomentsAccumulator, classwise_ema_update_, classwise_moments
from lpqld_fast.ops import _validate as V

STATS_SCHEMA = 1


def bn_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """Every BatchNorm layer of ``model`` in registration (= forward) order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _module_device(module: nn.Module) -> torch.device:
    return next(iter([*module.parameters(), *module.buffers()]), torch.empty(0)).device


class ClasswiseBNStats:
    """Collects per-class mean / biased variance of each BN layer's input.

    The state lives on each BN layer's device, created here: make the collector after moving the model.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        mode: str = "exact",
        momentum: float = 0.1,
        backend: str | None = None,
    ) -> None:
        if mode not in ("exact", "ema"):
            raise ValueError(f"mode must be 'exact' or 'ema', got {mode!r}")
        self.layers = bn_layers(model)
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm layers: class-wise BN statistics need them")
        self.num_classes = num_classes
        self.mode = mode
        self.momentum = momentum
        self.backend = backend
        self._labels: torch.Tensor | None = None
        self._validate = True
        self._reduced = False
        # Created up front (not at a layer's first input): the per-batch update then only updates tensors in
        # place, which torch.compile traces as one graph.
        self._acc: dict[str, ClasswiseMomentsAccumulator] = {}
        self._ema: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._seen: dict[str, torch.Tensor] = {}  # batches each layer saw, counted on its device (no sync)
        for name, module in self.layers:
            dev, c = _module_device(module), module.num_features
            if mode == "exact":
                self._acc[name] = ClasswiseMomentsAccumulator(num_classes, c, device=dev)
            else:
                self._ema[name] = (torch.zeros(num_classes, c, dtype=torch.float32, device=dev),
                                   torch.ones(num_classes, c, dtype=torch.float32, device=dev))
            self._seen[name] = torch.zeros((), dtype=torch.int64, device=dev)
        self.samples = torch.zeros(num_classes, dtype=torch.int64, device=_module_device(self.layers[0][1]))

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if self._labels is None:
                return
            x = inputs[0].detach()
            self._seen[name].add_(1)
            if self.mode == "exact":
                self._acc[name].update(x, self._labels, backend=self.backend, validate=self._validate)
            else:
                rm, rv = self._ema[name]
                classwise_ema_update_(rm, rv, classwise_moments(x, self._labels, self.num_classes,
                                                                backend=self.backend, validate=self._validate),
                                      self.momentum)

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator["ClasswiseBNStats"]:
        """Register the hooks for the duration of the block."""
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def check_labels(self, labels: torch.Tensor) -> None:
        """Refuse class ids outside [0, num_classes): once for a pass's labels, which then go to
        ``observe(..., validate=False)`` batch by batch."""
        V.check_index_range("labels", torch.as_tensor(labels), self.num_classes)

    def observe(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor, validate: bool = True) -> torch.Tensor:
        """Forward ``x`` through ``model`` (hooks attached) recording class-wise stats.

        ``validate=False``, for labels checked already (:meth:`check_labels`), reads no value back: no host
        sync, and the update compiles with ``torch.compile(fullgraph=True)`` (tests/test_bn_stats_step.py).
        """
        labels = labels.to(device=x.device, dtype=torch.int64)
        self._labels, self._validate = labels, validate
        try:
            out = model(x)
        finally:
            self._labels, self._validate = None, True
        # index_add_, not bincount of a host copy: counted on the device, a static shape
        lab = labels.to(self.samples.device)
        self.samples.index_add_(0, lab, torch.ones_like(lab))
        return out

    def result(self) -> dict[str, torch.Tensor]:
        """Flat tensor dict: '<layer>.mean', '<layer>.var' [K, C] float32, 'samples' [K]."""
        out: dict[str, torch.Tensor] = {"samples": self.samples.cpu().clone()}
        for name, _ in self.layers:
            if not self._reduced and int(self._seen[name]) == 0:  # read once per pass
                raise RuntimeError(f"BN layer {name!r} saw no input: was observe() called?")
            if self.mode == "exact":
                m = self._acc[name].result(torch.float32)
                out[f"{name}.mean"], out[f"{name}.var"] = m.mean.cpu(), m.var.cpu()
            else:
                out[f"{name}.mean"], out[f"{name}.var"] = (t.cpu().clone() for t in self._ema[name])
        return out

    def all_reduce_(self) -> None:
        """Combine the exact-mode state of every torch.distributed rank, in place (no-op for 1 process).

        Under torchrun: see lpqld_fast.distributed.all_reduce_moments_ for the numerics. A
        rank that saw no batch contributes its zero state.
        """
        if distributed.world_size() == 1:
            return
        if self.mode != "exact":
            raise ValueError("only exact-mode statistics can be combined across ranks (EMA depends on batch order)")
        for name, _ in self.layers:
            acc = self._acc[name]
            distributed.all_reduce_moments_(acc.count, acc.mean, acc.m2, acc.samples)
        distributed.all_reduce_(self.samples)
        self._reduced = True  # a rank that saw no batch holds the others' statistics now

    def accumulator_state(self) -> dict[str, torch.Tensor]:
        """The exact-mode float64 state, for merging across ranks or resuming."""
        out: dict[str, torch.Tensor] = {}
        for name, acc in self._acc.items():
            for key, t in acc.state_dict().items():
                out[f"{name}.{key}"] = t
        return out


def save_bn_stats(path: str | Path, stats: dict[str, torch.Tensor], layer_names: list[str], mode: str,
                  teacher_sha256: str) -> None:
    meta = {"schema": torch.tensor(STATS_SCHEMA)}
    payload = {"tensors": stats, "layers": list(layer_names), "mode": mode, "teacher_sha256": teacher_sha256, **meta}
    save_tensors(path, payload)


def load_bn_stats(path: str | Path) -> dict:
    """Load class-wise BN statistics; refuse files of another schema or with missing layers."""
    payload = load_tensors(path, what="class-wise BN statistics")
    if not isinstance(payload, dict) or "tensors" not in payload or "layers" not in payload:
        raise ValueError(f"class-wise BN statistics {path} is not a statistics file (missing keys)")
    schema = int(payload.get("schema", -1))
    if schema != STATS_SCHEMA:
        raise ValueError(f"class-wise BN statistics {path} has schema {schema}, expected {STATS_SCHEMA}")
    for name in payload["layers"]:
        for key in (f"{name}.mean", f"{name}.var"):
            if key not in payload["tensors"]:
                raise ValueError(f"class-wise BN statistics {path} lacks {key!r}")
    return payload
