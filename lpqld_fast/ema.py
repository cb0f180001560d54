"""An exponential moving average of the student's weights (``train.ema``).

Late in training the calibrated student temperature keeps falling while the
test NLL rises (docs/RESULTS.md, late drop): an average over the last
~1 / (1 - decay) steps is a standard remedy. Parameters and floating-point
buffers (BN running statistics) are averaged, integer buffers copied.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """``avg = decay * avg + (1 - decay) * weights`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema must be in (0, 1) to average, got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[Any, Any]]]:
        avg, cur, copies = [], [], []
        for a, c in zip([*self.module.parameters(), *self.module.buffers()],
                        [*model.parameters(), *model.buffers()]):
            if a.is_floating_point():
                avg.append(a)
                cur.append(c.detach())
            else:
                copies.append((a, c))
        return avg, cur, copies

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        avg, cur, copies = self._pairs(model)
        torch._foreach_lerp_(avg, cur, 1.0 - self.decay)
        for a, c in copies:
            a.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)
