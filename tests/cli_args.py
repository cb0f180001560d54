"""``--set`` arguments of a tiny run on the synthetic dataset (with the conftest ``synthetic_run_module`` fixture),
for tests that run the CLI stage by stage: one base, each test naming only what it changes; and the two steps
those tests repeat (the upstream stages once, then train on copies of them)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# A 1-epoch teacher on 20-image batches, 2 images per class recovered in 4 steps, 3 stored epochs of 5-image
# batches: seconds per stage on one thread.
BASE: dict[str, Any] = {
    "squeeze.epochs": 1, "squeeze.batch_size": 20, "squeeze.stats_batch_size": 40,
    "recover.ipc": 2, "recover.iterations": 4,
    "relabel.epochs": 3, "relabel.batch_size": 5, "relabel.k": 3,
}


def tiny_args(settings: dict[str, Any] | None = None) -> list[str]:
    """``["--set", "key=value", ...]`` for BASE updated with ``settings`` (stage.key -> value)."""
    merged = {**BASE, **(settings or {})}
    text = {key: str(v).lower() if isinstance(v, bool) else str(v) for key, v in merged.items()}
    return [arg for key, value in text.items() for arg in ("--set", f"{key}={value}")]


UPSTREAM = ("squeeze", "recover", "relabel")


def run_upstream(run: Path, args: list[str]) -> Path:
    """squeeze, recover and relabel of one run through the CLI (the module fixtures' shared upstream)."""
    from lpqld_fast.cli import main

    for stage in UPSTREAM:
        assert main([stage, "--out", str(run), *args]) == 0
    return run


def train_from(upstream: Path, dest: Path, args: list[str], *extra: str, rc: int = 0) -> dict[str, Any]:
    """``lpqld train`` in ``dest`` on a copy of ``upstream``'s stages (copied once); its train_metrics.json."""
    from lpqld_fast.cli import main

    if not dest.exists():
        for stage in UPSTREAM:
            shutil.copytree(upstream / stage, dest / stage)
        shutil.copy(upstream / "run.json", dest / "run.json")
    assert main(["train", "--out", str(dest), *args, *extra]) == rc
    return json.loads((dest / "train" / "train_metrics.json").read_text())
