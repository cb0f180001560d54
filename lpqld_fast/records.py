"""A run on disk: its stage folders (:func:`stage_dirs`), and its provenance: what code, on which machine,
with which threads and library versions.

Every result table is generated from run records (train_metrics.json's ``record`` and the per-row files of
``scripts/fmnist_results.py``), so each number carries the commit, machine and wall time it came from.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

_SOURCE = Path(__file__).resolve().parent
STAGES = ("squeeze", "recover", "relabel", "train", "report")


def stage_dirs(run: str | Path) -> dict[str, Path]:
    """The folder of each stage inside run directory ``run`` (lpqld_fast.pipeline describes what each holds)."""
    run = Path(run)
    return {s: run / s for s in STAGES}


_pinned_commit: list[str | None] = []


def pin_commit() -> str | None:
    """Fix the commit that this process reports to the one checked out now.

    Entry points call it at start: a job that runs for hours records the code it imported, not a HEAD that
    moved while it ran."""
    if not _pinned_commit:
        _pinned_commit.append(git_commit())
    return _pinned_commit[0]


def git_commit(path: Path = _SOURCE) -> str | None:
    """The checkout's commit, with ``+dirty`` when tracked files under the package differ from it;
    None outside a git checkout (an installed wheel)."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no", "--",
                                str(path)], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
                            "torch": torch.__version__, "python": platform.python_version(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_record(config: dict[str, Any], seed: int, device: str) -> dict[str, Any]:
    """The provenance block written with a run's metrics."""
    return {"config": config, "seed": seed, "device": device,
            "commit": _pinned_commit[0] if _pinned_commit else git_commit(), "machine": machine(),
            "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
