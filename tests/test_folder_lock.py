"""folder_lock: a second process writing a stage into the same folder is refused at once, naming the holder."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lpqld_fast.io_utils as io_utils
from lpqld_fast.io_utils import FolderInUse, folder_lock, folder_lock_path, locks_folder
from lpqld_fast.recover import run_recover
from lpqld_fast.relabel import run_relabel
from lpqld_fast.squeeze import run_squeeze
from lpqld_fast.train import run_train

HOLDER = """
import sys
from lpqld_fast.io_utils import folder_lock
with folder_lock(sys.argv[1], "recover"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills us
"""


@pytest.fixture(autouse=True)
def no_patience(monkeypatch):
    monkeypatch.setattr(io_utils, "LOCK_PATIENCE_S", 0.0)


@pytest.fixture
def held(tmp_path: Path):
    """A folder whose lock another process holds (as `lpqld recover` would)."""
    folder = tmp_path / "run" / "recover"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield folder, proc
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("stage", ["squeeze", "recover", "relabel", "train"])
def test_second_writer_refused_before_anything(held, stage: str) -> None:
    folder, proc = held
    call = {"squeeze": lambda: run_squeeze({}, folder),
            "recover": lambda: run_recover({}, folder.parent / "squeeze", folder),
            "relabel": lambda: run_relabel(None, None, None, [0.5], [0.5], {}, folder, 0, teacher_sha256="",
                                           images_sha256=""),
            "train": lambda: run_train({}, folder.parent / "recover", folder.parent / "relabel", folder)}[stage]
    with pytest.raises(FolderInUse, match=rf"is in use: lpqld recover \(pid {proc.pid}\) is writing into it"):
        call()
    assert not folder.exists()  # refused before the stage looked at its config or wrote anything


def test_symlink_to_a_held_folder_is_the_same_folder(held, tmp_path: Path) -> None:
    folder, _ = held
    folder.parent.mkdir(parents=True, exist_ok=True)
    link = tmp_path / "link"
    link.symlink_to(folder.parent)
    with pytest.raises(FolderInUse):
        with folder_lock(link / "recover", "train"):
            pass


def test_released_when_the_holder_dies(held) -> None:
    folder, proc = held
    proc.kill()
    proc.wait()
    with folder_lock(folder, "train"):
        assert "lpqld train (pid" in folder_lock_path(folder).read_text()


def test_reentrant_in_one_process_and_other_folders_free(tmp_path: Path) -> None:
    with folder_lock(tmp_path / "a", "recover"):
        with folder_lock(tmp_path / "a", "relabel"):  # a stage calling another on the same folder
            with folder_lock(tmp_path / "b", "train"):
                pass
        # still held by the outer block: another descriptor (as another process would open it) is refused
        fd = os.open(folder_lock_path(tmp_path / "a"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    with folder_lock(tmp_path / "a", "train"):  # released
        pass


def test_when_decides_per_call(held) -> None:
    folder, _ = held
    seen = []

    @locks_folder("out_dir", "relabel", when=lambda a: a.get("slot_range") is None)
    def writer(out_dir, slot_range=None):
        seen.append(slot_range)

    writer(folder, slot_range=range(2))  # a rank's slots of a multi-writer store: not locked
    with pytest.raises(FolderInUse):
        writer(folder)
    assert seen == [range(2)]


def test_waits_out_a_short_hold(tmp_path: Path, monkeypatch) -> None:
    # a finished stage's "done already" check holds the lock briefly: a second job starting then waits for it
    monkeypatch.setattr(io_utils, "LOCK_PATIENCE_S", 10.0)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.replace("sys.stdin.read()", "import time; time.sleep(1)"),
                             str(tmp_path / "f")], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with folder_lock(tmp_path / "f", "train"):
            assert proc.poll() is not None or proc.wait(5) == 0
    finally:
        proc.kill()
        proc.wait()
