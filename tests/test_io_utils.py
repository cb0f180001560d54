"""Atomic writes: the result has a plain file's mode, a failed write leaves the old file and no temp file."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import lpqld_fast.io_utils as io_utils
from lpqld_fast.io_utils import atomic_path, atomic_write_json, load_tensors, save_tensors


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path: Path, monkeypatch, umask: int) -> None:
    """0666 less the process umask (read once at import), not mkstemp's private 0600."""
    monkeypatch.setattr(io_utils, "_UMASK", umask)
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    save_tensors(tmp_path / "t.pt", {"w": torch.ones(2)})
    for name in ("a.json", "t.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name
    assert torch.equal(load_tensors(tmp_path / "t.pt")["w"], torch.ones(2))


def test_the_umask_read_at_import_is_the_process_umask() -> None:
    mask = os.umask(0)
    os.umask(mask)
    assert io_utils._UMASK == mask


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"v":1}'
    assert sorted(os.listdir(tmp_path)) == ["a.json"]
