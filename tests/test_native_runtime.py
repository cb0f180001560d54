"""The native extension uses the shared C++ runtime, so its C++ errors reach Python as exceptions.

On one GPU image the extension was built by a compiler that linked libstdc++ statically: every C++ error of
_C (a TORCH_CHECK) then killed the process instead of raising. setup.py names the shared libraries; this
checks the built library and the behaviour (in a subprocess, so a crash fails the test, not the suite).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lpqld_fast
from lpqld_fast.ops._dispatch import native_available

LIBS = sorted(Path(lpqld_fast.__file__).parent.glob("_C*.so"))
needs_ext = pytest.mark.skipif(not (native_available() and LIBS), reason="native extension not built")


@needs_ext
@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf")
def test_extension_needs_the_shared_cxx_runtime() -> None:
    dyn = subprocess.run(["readelf", "-d", str(LIBS[0])], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dyn.splitlines() if "(NEEDED)" in line]
    assert any(n.startswith("libstdc++.so") for n in needed), needed
    assert any(n.startswith("libgcc_s.so") for n in needed), needed


@needs_ext
def test_cpp_error_raises_in_python() -> None:
    code = ("import torch, lpqld_fast._C\n"
            "z = torch.randn(4, 10); v = torch.randn(4, 2); i = torch.zeros(4, 2, dtype=torch.long)\n"
            "try:\n"
            "    torch.ops.lpqld.soft_label_kl_fwd(z, v, i, None, None, None, 9, 1.0, 1.0, 1.0)\n"
            "except RuntimeError as e:\n"
            "    print('raised:', str(e).splitlines()[0])\n")
    root = str(Path(lpqld_fast.__file__).resolve().parent.parent)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": root, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, f"the process died (rc {r.returncode}) on a C++ error: {r.stderr[-500:]}"
    assert "raised: soft_label_kl_fwd: mode must be 0..4" in r.stdout
