"""Which stored batches the student replays each epoch, and at what temperature.

Label pool modes (DESIGN 2.4), all seeded by (seed, epoch) and keyed by batch
id (the reference keys batches by their first image index, which collides):
- "epoch": the kept batches in stored order (stored epoch, then position),
  cycled: training epoch e replays positions [(e-1)*nb, e*nb) modulo the
  number kept. Without pruning that is stored epoch (e-1) mod E whole, as the
  reference replays it; with pruning every training epoch still takes nb
  steps (a stored epoch then holds only its kept batches, and replaying just
  those would cut the schedule short);
- "lpld": the LPLD improved label pool: floor(N/B) batch ids drawn at random
  (with replacement) from the whole pool, mixing stored epochs;
- "lpqld": as "lpld" but without replacement within a training epoch.

Every mode returns exactly ``batches_per_epoch`` ids per training epoch, so
the learning-rate schedule (epochs x floor(N/B) steps) anneals fully.

Dynamic knowledge reuse: the teacher temperature moves over epochs on the same
stored logits: "step" is the reference T(e) = max(t0 * decay^floor(e/step), floor)
with e from 1; "cosine" goes from t0 to floor; "constant" keeps t0.
"""
from __future__ import annotations

import math

import torch

from lpqld_fast import seeding

POOL_MODES = ("epoch", "lpld", "lpqld")
TEMPERATURE_SCHEDULES = ("step", "cosine", "constant")


def temperature_at(epoch: int, total_epochs: int, schedule: str = "step", t0: float = 20.0, decay: float = 0.7,
                   step: int = 30, floor: float = 2.0) -> float:
    """Teacher temperature for training epoch ``epoch`` (counted from 1)."""
    if epoch < 1:
        raise ValueError(f"epoch counts from 1, got {epoch}")
    if schedule == "step":
        return max(t0 * decay ** (epoch // step), floor)
    if schedule == "cosine":
        progress = (epoch - 1) / max(total_epochs - 1, 1)
        return floor + (t0 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "constant":
        return t0
    raise ValueError(f"unknown temperature schedule {schedule!r}; choose one of {TEMPERATURE_SCHEDULES}")


def epoch_batch_ids(kept_ids: torch.Tensor, mode: str, epoch: int, batches_per_epoch: int, seed: int) -> torch.Tensor:
    """Batch ids replayed in training epoch ``epoch`` (from 1), in replay order."""
    if mode not in POOL_MODES:
        raise ValueError(f"unknown label pool mode {mode!r}; choose one of {POOL_MODES}")
    kept_ids = kept_ids.to(torch.int64)
    if kept_ids.numel() == 0:
        raise ValueError("the label store keeps no batches")
    g = seeding.label_pool_epoch(seed, epoch)
    if mode == "epoch":
        ordered = torch.sort(kept_ids).values
        first = (epoch - 1) * batches_per_epoch
        positions = torch.arange(first, first + batches_per_epoch) % ordered.numel()
        return ordered[positions]
    if mode == "lpld":
        return kept_ids[torch.randint(0, kept_ids.numel(), (batches_per_epoch,), generator=g)]
    reps = -(-batches_per_epoch // kept_ids.numel())
    order = torch.cat([torch.randperm(kept_ids.numel(), generator=g) for _ in range(reps)])
    return kept_ids[order[:batches_per_epoch]]
