"""Recover's BN supervision inside the teacher's forward pass.

During recover the teacher is frozen in eval mode, so each BatchNorm is a
per-channel affine map, and the class-wise loss needs exactly the BN inputs.
``supervised_bn`` swaps every BN layer (and, in an nn.Sequential, the nn.ReLU
right after it and a 2x2 / stride-2 nn.AvgPool2d after that, the ConvNet
block) for a ``SupervisedBN`` that computes all of it in one fused op
(``lpqld_fast.ops.bn_eval_segment_loss``): same images and losses as hooks +
BatchNorm + ReLU + AvgPool2d + ``segment_bn_loss``, up to rounding, with one
backward pass per layer instead of five (pool, ReLU, BN, the loss, autograd's
gradient sum) and no full-size activation written in the forward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lpqld_fast.bn_stats import bn_layers
from lpqld_fast.ops import bn_eval_act, bn_eval_segment_loss
from lpqld_fast.ops import _validate as V
from lpqld_fast.ops.segment_bn_loss import check_segment_data


def bn_eval_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C] float32 with bn(x) = x * scale + shift in eval mode (float64 for a float64 BN)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics is not an affine map in eval mode")
    dtype = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dtype)
        shift = -bn.running_mean.to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.to(dtype)
    return scale.contiguous(), shift.contiguous()


class SupervisedBN(nn.Module):
    """An eval-mode BN (+ ReLU when ``relu``, + 2x2 average pool when ``pool == 2``) whose forward also
    computes the segment BN loss of its input."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, relu: bool, segment_ids: torch.Tensor,
                 target_mean: torch.Tensor, target_var: torch.Tensor, pool: int = 1) -> None:
        super().__init__()
        self.scale, self.shift = bn_eval_affine(bn)
        self.relu = relu
        self.pool = pool
        # In the kernels' dtypes once per pass (int64 ids, float64 targets): the per-call conversions are no-ops.
        self.segment_ids = segment_ids.to(torch.int64).contiguous()
        self.target_mean = target_mean.detach().to(torch.float64).contiguous()
        self.target_var = target_var.detach().to(torch.float64).contiguous()
        # The data checks once per pass, not per forward: on a GPU each is a device sync per layer and step.
        check_segment_data(segment_ids, target_mean, target_var)
        for name, t in (("scale", self.scale), ("shift", self.shift)):
            V.check_finite(f"the eval-mode {name} of {type(bn).__name__} (from its running_var, weight, bias)", t)
        self.loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.loss = bn_eval_segment_loss(x, self.segment_ids, self.target_mean, self.target_var,
                                            self.scale.to(x.device), self.shift.to(x.device), relu=self.relu,
                                            pool=self.pool, validate=False)
        return y

    def pop_loss(self) -> torch.Tensor:
        if self.loss is None:
            raise RuntimeError("SupervisedBN: no forward pass since the last pop_loss()")
        loss, self.loss = self.loss, None
        return loss


def _is_pool2(m: nn.Module) -> bool:
    """A 2x2 / stride-2 average pool without padding (floor mode), the ConvNet block's."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (type(m) is nn.AvgPool2d and pair(m.kernel_size) == (2, 2) and pair(m.stride) == (2, 2)
            and pair(m.padding) == (0, 0) and not m.ceil_mode and m.divisor_override is None)


def _parent_and_name(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, name = qualified.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), name


def _swap_bn_blocks(model: nn.Module, make: Callable[[nn.modules.batchnorm._BatchNorm, bool, int, int], nn.Module],
                    swapped: list[tuple[nn.Module, str, nn.Module]]) -> list[nn.Module]:
    """Replace every BN of ``model`` (eval mode) by make(bn, relu, pool, index), fusing a following nn.ReLU
    (and a 2x2 / stride-2 nn.AvgPool2d after it) of the same nn.Sequential, which become Identity. The
    replaced modules are appended to ``swapped`` (parent, name, original) for the caller to restore."""
    layers = bn_layers(model)
    if any(m.training for _, m in layers):
        raise ValueError("the model must be in eval mode (BN layers as fixed affine maps)")
    modules = []
    for index, (qualified, bn) in enumerate(layers):
        parent, name = _parent_and_name(model, qualified)
        relu, pool = False, 1
        if isinstance(parent, nn.Sequential):
            keys = list(parent._modules)
            at = keys.index(name)
            nxt = [parent._modules[k] for k in keys[at + 1:at + 3]]
            if nxt and type(nxt[0]) is nn.ReLU:
                relu = True
                pool = 2 if len(nxt) > 1 and _is_pool2(nxt[1]) else 1
                for k in keys[at + 1:at + (3 if pool == 2 else 2)]:
                    swapped.append((parent, k, parent._modules[k]))
                    setattr(parent, k, nn.Identity())
        mod = make(bn, relu, pool, index)
        swapped.append((parent, name, bn))
        setattr(parent, name, mod)
        modules.append(mod)
    return modules


def _restore(swapped: list[tuple[nn.Module, str, nn.Module]]) -> None:
    for parent, name, original in reversed(swapped):
        setattr(parent, name, original)


@contextlib.contextmanager
def supervised_bn(model: nn.Module, segment_ids: torch.Tensor,
                  targets: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[list[SupervisedBN]]:
    """Swap ``model``'s BN layers for SupervisedBN modules (in bn_layers order) inside the block.

    ``targets``: per BN layer the (target_mean, target_var) [S, C] of the segments in ``segment_ids``.
    An nn.ReLU that directly follows a BN in an nn.Sequential is fused into it, and a 2x2 / stride-2
    nn.AvgPool2d right after that ReLU too (replaced by Identity); the model is restored on exit. The
    model must be in eval mode (its BNs are affine maps then).
    """
    n_layers = len(bn_layers(model))
    if n_layers != len(targets):
        raise ValueError(f"{len(targets)} BN targets for a model with {n_layers} BN layers")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        yield _swap_bn_blocks(model, lambda bn, relu, pool, i: SupervisedBN(bn, relu, segment_ids, *targets[i], pool),
                              swapped)
    finally:
        _restore(swapped)


class EvalBN(nn.Module):
    """An eval-mode BN (+ ReLU, + 2x2 average pool) for inference through ``lpqld_fast.ops.bn_eval_act``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, relu: bool, pool: int) -> None:
        super().__init__()
        self.scale, self.shift = bn_eval_affine(bn)
        self.relu = relu
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bn_eval_act(x, self.scale.to(x.device), self.shift.to(x.device), relu=self.relu, pool=self.pool)


@contextlib.contextmanager
def fused_eval_bn(model: nn.Module) -> Iterator[int]:
    """Inside the block, ``model``'s BN (+ ReLU + 2x2 average pool) blocks run as one fused op each.

    For evaluation (the model in eval mode, nothing needing gradients): a ConvNet block's BN, ReLU and
    pool were three passes over the activation (~1.75 of ~5.2 s of a bf16 Fashion-MNIST test pass,
    profiled), the fused op reads it once. A model without BN layers is left as is. Yields the number
    of BN layers swapped; the model is restored on exit.
    """
    layers = bn_layers(model)
    if not layers or any(m.running_mean is None or m.running_var is None for _, m in layers):
        yield 0  # batch statistics even in eval mode: not an affine map
        return
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        yield len(_swap_bn_blocks(model, lambda bn, relu, pool, i: EvalBN(bn, relu, pool), swapped))
    finally:
        _restore(swapped)
