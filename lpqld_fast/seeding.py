"""Every random stream of the package, in one place.

A stage never draws from an unnamed generator: each stream below is a function of the run's seed and the
position it serves (a class, a unit, an epoch, a batch), so a result does not depend on how the work is split
(ranks, units per pass, resumes). New streams use :func:`stream` (sha256 of the stream's name and parts). The
streams marked *frozen* predate it and keep their original arithmetic: changing it would change the images,
stores and students of every recorded run (docs/results/records) for the same seed.

| stream | used by | derivation |
|---|---|---|
| ``seed_everything(seed)`` | squeeze, train: model initialisation (global RNGs); the returned generator orders and augments the teacher's in-memory batches | python, numpy and torch seeded with the seed |
| ``hashed_seed("lpqld-teacher-epoch", seed, epoch)`` | squeeze on an image folder: base of epoch's per-image seeds | sha256 |
| ``stream("lpqld-squeeze-stats", seed, batch)`` | squeeze: statistics pass augmentation | sha256 |
| ``stream("lpqld-relabel", tag, seed, index)`` | relabel: kept ids, epoch permutations, batch augmentation | sha256 (the store's manifest states it) |
| ``stream("lpqld-train-mix", seed, epoch, step)`` | train: student-side mixing of a replayed batch (``train.mix``) | sha256 |
| ``stream("lpqld-real-images", seed, c)`` | paper-001 baseline: real images of class c | sha256 |
| ``teacher_member(seed, i)`` | squeeze: seed of ensemble member i (``squeeze.teachers``), i >= 1 | sha256 |
| ``hashed_seed("lpqld-folder-pass", seed, i)`` | streamed image folders: image i's transform | sha256 |
| ``squeeze_stats_order(seed)`` | squeeze: statistics pass batch order | frozen: seed + 1 |
| ``recover_unit(seed, uid)`` | recover: a unit's initial images and augmentation | frozen: linear mix |
| ``loader_epoch(seed, epoch)`` | in-memory loader: epoch order | frozen: linear mix |
| ``label_pool_epoch(seed, epoch)`` | train: label-pool draw of an epoch | frozen: linear mix |
| ``subset(seed)`` | test subsets, report's real-image sample, streamed loaders' worker seeds (0) | frozen: the seed itself |
| ``synthetic(seed, part)`` | the synthetic test dataset: prototypes (0), splits (1 + split) | frozen: linear mix |
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["hashed_seed", "stream", "seed_everything", "teacher_member", "squeeze_stats_order", "recover_unit",
           "loader_epoch", "label_pool_epoch", "subset", "synthetic"]

_MAX63 = 2**63 - 1


def hashed_seed(*parts: str | int) -> int:
    """A 63-bit seed from sha256 of "part0/part1/...": independent named streams that do not depend on how
    the work is split (ints are written as ints, so 3 and 3.0 give the same seed)."""
    text = "/".join(p if isinstance(p, str) else str(int(p)) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & _MAX63


def stream(name: str, *parts: str | int) -> torch.Generator:
    """The CPU generator of stream ``name`` at ``parts`` (seed, position...)."""
    return torch.Generator().manual_seed(hashed_seed(name, *parts))


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch (model initialisation draws from torch's global RNG); return a dedicated
    generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def teacher_member(seed: int, i: int) -> int:
    """The training seed of squeeze's ensemble member ``i`` (>= 1; member 0 is the teacher of seed ``seed``)."""
    return hashed_seed("lpqld-teacher-member", seed, i)


def squeeze_stats_order(seed: int) -> torch.Generator:
    """Batch order of squeeze's statistics pass (frozen)."""
    return torch.Generator().manual_seed(seed + 1)


def recover_unit(seed: int, uid: int) -> torch.Generator:
    """A recover unit's stream: initial images, then its augmentation draws (frozen)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + uid * 7919 + 12345) % _MAX63)


def loader_epoch(seed: int, epoch: int) -> torch.Generator:
    """The in-memory loader's order of one epoch, identical on every rank (frozen)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def label_pool_epoch(seed: int, epoch: int) -> torch.Generator:
    """The label pool's draw of training epoch ``epoch`` (frozen)."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def subset(seed: int) -> torch.Generator:
    """A fixed sample of a dataset: test subsets, the report's real images (frozen)."""
    return torch.Generator().manual_seed(seed)


def synthetic(seed: int, part: int) -> torch.Generator:
    """The synthetic test dataset's content: its class prototypes (part 0) and each split (frozen)."""
    return torch.Generator().manual_seed(seed * 7919 + part)
