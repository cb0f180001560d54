"""Every random stream comes from lpqld_fast.seeding, and each keeps the arithmetic recorded runs were made
with (a changed stream would silently give other images, stores and students for the same seed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lpqld_fast import seeding

PACKAGE = Path(__file__).resolve().parents[1] / "lpqld_fast"


def _same_stream(a: torch.Generator, b: torch.Generator) -> bool:
    return torch.equal(torch.randint(0, 2**62, (8,), generator=a), torch.randint(0, 2**62, (8,), generator=b))


@pytest.mark.parametrize("seed", [0, 1, 7, 2**40])
def test_frozen_streams_keep_their_recorded_arithmetic(seed) -> None:
    g = torch.Generator
    assert _same_stream(seeding.recover_unit(seed, 3), g().manual_seed((seed * 1_000_003 + 3 * 7919 + 12345)
                                                                         % (2**63 - 1)))
    assert _same_stream(seeding.loader_epoch(seed, 5), g().manual_seed((seed * 1_000_003 + 5) % 2**63))
    assert _same_stream(seeding.label_pool_epoch(seed, 5), g().manual_seed(seed * 100_003 + 5))
    assert _same_stream(seeding.squeeze_stats_order(seed), g().manual_seed(seed + 1))
    assert _same_stream(seeding.subset(seed), g().manual_seed(seed))
    assert _same_stream(seeding.synthetic(seed, 2), g().manual_seed(seed * 7919 + 2))


def test_hashed_streams_are_stable_and_independent() -> None:
    # the label store's manifest states this rule: these values are part of the store format
    assert seeding.hashed_seed("lpqld-relabel", "keep", 0, 0) == 290695461009448274
    assert seeding.hashed_seed("lpqld-teacher-epoch", 3, 1) == 7708747879516838476
    assert seeding.hashed_seed("x", 3) == seeding.hashed_seed("x", 3.0)
    assert not _same_stream(seeding.stream("a", 0, 1), seeding.stream("a", 1, 0))
    assert _same_stream(seeding.stream("a", 0, 1), torch.Generator().manual_seed(seeding.hashed_seed("a", 0, 1)))


def test_no_stream_is_seeded_outside_the_seeding_module() -> None:
    """A new generator must be a named stream in lpqld_fast/seeding.py (its docstring lists them all)."""
    pattern = re.compile(r"(Generator\(\)\.manual_seed|torch\.manual_seed|np\.random\.seed|random\.seed)\(")
    allowed = {("data/streaming.py", "torch.manual_seed(image_seed(")}  # per-image seed inside a loader worker
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "seeding.py":
            continue
        for line in path.read_text().splitlines():
            code = line.split("#")[0]
            if pattern.search(code) and not code.lstrip().startswith(("RNG_RULE", '"', "'")):
                if not any(rel == f and s in code for f, s in allowed):
                    found.append(f"{rel}: {line.strip()}")
    assert not found, "seed these streams through lpqld_fast.seeding:\n" + "\n".join(found)
