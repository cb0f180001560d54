"""lpqld_fast.runtime: the entry points' allocator settings, applied once, never overriding the environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import lpqld_fast

CODE = ("import json, lpqld_fast.runtime as r; a = r.tune_cpu_allocator(); "
        "assert r.tune_cpu_allocator() is a; print(json.dumps(a))")


def _run(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_",
                                                          "MALLOC_TRIM_THRESHOLD_")}
    env.update(env_extra)
    root = os.path.dirname(os.path.dirname(os.path.abspath(lpqld_fast.__file__)))
    out = subprocess.run([sys.executable, "-c", CODE], env={**env, "PYTHONPATH": root}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_import_sets_nothing():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    code = "import os, lpqld_fast, lpqld_fast.ops; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_defaults_and_environment_wins():
    got = _run({})
    assert got["THP_MEM_ALLOC_ENABLE"] == "1"
    if sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" in got:  # glibc
        assert got["MALLOC_MMAP_THRESHOLD_"] == 32 << 20 and got["MALLOC_TRIM_THRESHOLD_"] == 256 << 20
    got = _run({"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_THRESHOLD_": "131072"})
    assert got["THP_MEM_ALLOC_ENABLE"] == "0"
    assert got["MALLOC_MMAP_THRESHOLD_"] == "131072 (environment)"
