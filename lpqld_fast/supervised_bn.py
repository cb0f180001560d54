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
from collections.abc import Iterator

import torch
from torch import nn

from lpqld_fast.bn_stats import bn_layers
from lpqld_fast.ops import bn_eval_segment_loss


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
        self.segment_ids = segment_ids
        self.target_mean = target_mean
        self.target_var = target_var
        self.loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.loss = bn_eval_segment_loss(x, self.segment_ids, self.target_mean, self.target_var,
                                            self.scale.to(x.device), self.shift.to(x.device), relu=self.relu,
                                            pool=self.pool)
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


@contextlib.contextmanager
def supervised_bn(model: nn.Module, segment_ids: torch.Tensor,
                  targets: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[list[SupervisedBN]]:
    """Swap ``model``'s BN layers for SupervisedBN modules (in bn_layers order) inside the block.

    ``targets``: per BN layer the (target_mean, target_var) [S, C] of the segments in ``segment_ids``.
    An nn.ReLU that directly follows a BN in an nn.Sequential is fused into it, and a 2x2 / stride-2
    nn.AvgPool2d right after that ReLU too (replaced by Identity); the model is restored on exit. The
    model must be in eval mode (its BNs are affine maps then).
    """
    layers = bn_layers(model)
    if len(layers) != len(targets):
        raise ValueError(f"{len(targets)} BN targets for a model with {len(layers)} BN layers")
    if any(m.training for _, m in layers):
        raise ValueError("supervised_bn needs the model in eval mode (BN layers as fixed affine maps)")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    modules: list[SupervisedBN] = []
    try:
        for (qualified, bn), (tm, tv) in zip(layers, targets):
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
            mod = SupervisedBN(bn, relu, segment_ids, tm, tv, pool)
            swapped.append((parent, name, bn))
            setattr(parent, name, mod)
            modules.append(mod)
        yield modules
    finally:
        for parent, name, original in reversed(swapped):
            setattr(parent, name, original)
