"""``--set`` arguments of a tiny run on the synthetic dataset (with the conftest ``synthetic_run_module`` fixture),
for tests that run the CLI stage by stage: one base, each test naming only what it changes."""
from __future__ import annotations

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
