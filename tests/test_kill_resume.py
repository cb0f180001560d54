"""Crash safety: SIGKILL each long stage mid-run, rerun the same command, get the uninterrupted result.

For squeeze, recover, relabel and train: the stage runs through the CLI in a
subprocess on a tiny synthetic run, is SIGKILLed as soon as its progress
marker appears (a teacher epoch checkpoint, a recovered unit, a committed
label-store slot, a student checkpoint), and is then resumed with the same
command. Every stage is deterministic here (single-threaded, fixed
--units-at-once), so the outputs must equal those of an uninterrupted run
bit for bit: teacher.pt and bn_stats.pt, images.pt, every label-store file,
student.pt and the per-epoch metrics (wall times excepted).

The uninterrupted runs and the resumes run in this process (one thread, like
the subprocess's OMP_NUM_THREADS=1); only the killed run pays a process
start-up.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lpqld_fast.cli import main

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "--set", "squeeze.epochs=2", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=50",
    "--set", "recover.ipc=2", "--set", "recover.iterations=12",
    "--set", "relabel.epochs=32", "--set", "relabel.batch_size=5", "--set", "relabel.k=3",
    "--set", "relabel.prune_ratio=0.5",
    "--set", "train.epochs=4", "--set", "train.eval_every=1", "--set", "train.checkpoint_every=1",
    "--set", "train.ema=0.5",  # the weight average is part of the resume state
]
STAGE_ARGS = {"recover": ["--units-at-once", "1"]}  # fixed grouping: the images do not depend on free memory
STAGES = ("squeeze", "recover", "relabel", "train")

# The subprocess: the same CLI with the fashion-mnist preset pointed at the synthetic dataset (as the fixture does).
DRIVER = (
    "import sys, lpqld_fast.presets as p\n"
    "c = p.get_preset('fashion-mnist'); c['dataset'] = 'synthetic'; p.PRESETS['fashion-mnist'] = c\n"
    "from lpqld_fast.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, synthetic_run_module) -> Path:
    """The uninterrupted run, stage by stage, single-threaded, on the synthetic preset."""
    run = tmp_path_factory.mktemp("kill-resume") / "reference"
    for stage in STAGES:
        assert main(_argv(stage, run)) == 0, stage
    return run


def _argv(stage: str, run: Path) -> list[str]:
    return [stage, "--out", str(run), *ARGS, *STAGE_ARGS.get(stage, [])]


def _any_unit(run: Path) -> bool:
    return len(list((run / "recover" / "units").glob("unit_*.pt"))) >= 2


def _store_committed(run: Path) -> bool:
    done = run / "relabel" / "done.bin"
    return done.exists() and done.read_bytes().count(1) >= 1


MARKERS: dict[str, Callable[[Path], bool]] = {
    # last.pt (after epoch 1 of 2): the resume starts from a mid-training checkpoint, not from scratch
    "squeeze": lambda r: (r / "squeeze" / "checkpoints" / "last.pt").exists(),
    "recover": _any_unit,
    "relabel": _store_committed,
    "train": lambda r: (r / "train" / "last.pt").exists(),
}
FINISHED: dict[str, Callable[[Path], bool]] = {
    "squeeze": lambda r: (r / "squeeze" / "metrics.json").exists() and (r / "squeeze" / "bn_stats.pt").exists(),
    "recover": lambda r: (r / "recover" / "manifest.json").exists(),
    "relabel": lambda r: json.loads((r / "relabel" / "manifest.json").read_text()).get("complete") is True
    if (r / "relabel" / "manifest.json").exists() else False,
    "train": lambda r: (r / "train" / "student.pt").exists(),
}


def _kill_mid_stage(stage: str, run: Path, timeout: float = 120.0) -> None:
    """Start ``stage`` in a subprocess and SIGKILL it once its progress marker exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *_argv(stage, run)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not MARKERS[stage](run):
            if proc.poll() is not None:
                raise AssertionError(f"{stage} exited ({proc.returncode}) before its progress marker appeared: "
                                     f"{proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{stage}: no progress marker within {timeout:.0f}s")
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    if FINISHED[stage](run):
        pytest.skip(f"{stage} finished before the kill landed (machine too fast for this marker)")


def _resume(stage: str, run: Path, reference_run: Path) -> None:
    """Rerun the killed stage in this process, single-threaded, as the reference was made."""
    import lpqld_fast.presets as presets

    tiny = presets.get_preset("fashion-mnist")
    tiny["dataset"] = "synthetic"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(presets.PRESETS, "fashion-mnist", tiny)
            assert main(_argv(stage, run)) == 0
    finally:
        torch.set_num_threads(threads)


def _prepare(stage: str, reference_run: Path, tmp_path: Path) -> Path:
    """A copy of the reference run up to (not including) ``stage``."""
    run = tmp_path / "run"
    run.mkdir()
    for s in STAGES[: STAGES.index(stage)]:
        shutil.copytree(reference_run / s, run / s)
    return run


def _same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_squeeze_killed_mid_training_resumes_bit_for_bit(reference_run: Path, tmp_path: Path) -> None:
    run = _prepare("squeeze", reference_run, tmp_path)
    _kill_mid_stage("squeeze", run)
    assert not (run / "squeeze" / "teacher.pt").exists()
    _resume("squeeze", run, reference_run)
    for name in ("teacher.pt", "bn_stats.pt", "checkpoints/epoch_002.pt"):
        assert _same_bytes(run / "squeeze" / name, reference_run / "squeeze" / name), name
    got = json.loads((run / "squeeze" / "metrics.json").read_text())
    want = json.loads((reference_run / "squeeze" / "metrics.json").read_text())
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(got["teacher"]) == strip(want["teacher"])
    assert got["teacher_sha256"] == want["teacher_sha256"]


def test_recover_killed_between_units_resumes_bit_for_bit(reference_run: Path, tmp_path: Path) -> None:
    # Units are the checkpoint grain: a kill inside a unit redoes that unit from its own seeded generator.
    run = _prepare("recover", reference_run, tmp_path)
    _kill_mid_stage("recover", run)
    _resume("recover", run, reference_run)
    assert _same_bytes(run / "recover" / "images.pt", reference_run / "recover" / "images.pt")
    got = json.loads((run / "recover" / "manifest.json").read_text())
    want = json.loads((reference_run / "recover" / "manifest.json").read_text())
    assert got["images_sha256"] == want["images_sha256"]


def test_relabel_killed_mid_store_resumes_byte_identical(reference_run: Path, tmp_path: Path) -> None:
    run = _prepare("relabel", reference_run, tmp_path)
    _kill_mid_stage("relabel", run)
    _resume("relabel", run, reference_run)
    # a kill inside an atomic write may leave its hidden temp file (.name.*.tmp): garbage, never read
    files = lambda d: sorted(p.name for p in d.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp")))  # noqa: E731
    want_files = files(reference_run / "relabel")
    assert files(run / "relabel") == want_files
    for name in want_files:
        assert _same_bytes(run / "relabel" / name, reference_run / "relabel" / name), name


def test_train_killed_mid_training_resumes_bit_for_bit(reference_run: Path, tmp_path: Path) -> None:
    run = _prepare("train", reference_run, tmp_path)
    _kill_mid_stage("train", run)
    assert not (run / "train" / "student.pt").exists()
    _resume("train", run, reference_run)
    assert _same_bytes(run / "train" / "student.pt", reference_run / "train" / "student.pt")
    got = json.loads((run / "train" / "train_metrics.json").read_text())
    want = json.loads((reference_run / "train" / "train_metrics.json").read_text())
    assert got["epochs"] == want["epochs"]  # loss, T and t_s of every epoch, each once
    assert got["evals"] == want["evals"]
    assert got["best_acc"] == want["best_acc"] and got["last_acc"] == want["last_acc"]
