"""The native sources' layout: every schema beside its op in csrc/<op>.cpp, kernels in csrc/cpu and
csrc/cuda registering implementations only, and no source file above the size limit."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
MAX_LINES = 500


def _sources() -> list[Path]:
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cpp", ".cu"))


def test_schemas_are_defined_in_the_op_files() -> None:
    for path in _sources():
        defs = re.findall(r"\bm\.def\(", path.read_text())
        if path.parent != CSRC:
            assert not defs, f"{path.relative_to(ROOT)} defines a schema; it belongs in csrc/<op>.cpp"
        assert "TORCH_LIBRARY_FRAGMENT" not in path.read_text() or path.parent == CSRC, path


def test_source_files_are_small() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in _sources()}
    assert all(n <= MAX_LINES for n in sizes.values()), {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_cuda_sources_include_no_cpu_headers() -> None:
    """Headers a .cu includes are compiled by nvcc: only csrc/common/ (no CPU intrinsics) may be shared."""
    for path in sorted((CSRC / "cuda").glob("*.cu")):
        for inc in re.findall(r'#include\s+"([^"]+)"', path.read_text()):
            assert inc.startswith("common/"), f"{path.name} includes {inc}"
