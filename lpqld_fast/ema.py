"""An exponential moving average of the student's weights (``train.ema``).

Late in training the calibrated student temperature keeps falling while the
test NLL rises (docs/RESULTS.md, late drop): an average over the last
~1 / (1 - decay) steps is a standard remedy. Parameters and floating-point
buffers (BN running statistics) are averaged, integer buffers copied.

The decay warms up as TensorFlow's ExponentialMovingAverage(num_updates) does:
update n uses min(decay, (1 + n) / (10 + n)). Without it the initial weights
keep a share decay**n: a Fashion-MNIST IPC10 student makes only 2 steps per
epoch, so at decay 0.999 after 300 epochs 55% of the "average" was the random
initialisation and it evaluated at 13% (the plain student: 79%; docs/RESULTS.md "Screens").
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class WeightEMA:
    """``avg = d * avg + (1 - d) * weights`` after optimizer step n (1, 2, ...), d = min(decay, (1+n)/(10+n))."""

    UPDATES_KEY = "_ema_updates"  # the update count, saved beside the averaged weights for resume

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema must be in (0, 1) to average, got {decay}")
        self.decay = decay
        self.updates = 0
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
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(avg, cur, 1.0 - d)
        for a, c in copies:
            a.copy_(c)

    def state_dict(self) -> dict[str, Any]:
        return {**self.module.state_dict(), self.UPDATES_KEY: torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        # a checkpoint without the count predates the warm-up: past it (the plain decay), as it was made
        n = state.pop(self.UPDATES_KEY, None)
        self.updates = 2**62 if n is None else int(n)
        self.module.load_state_dict(state)
