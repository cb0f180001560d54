"""The soft-label mode codes are defined once (lpqld_fast/ops/label_modes.py) and every other side agrees.

The C++ kernels take the codes from csrc/common/label_modes.h and the Triton kernel builds its constants from
the Python table; this parses the header and the Triton module's source (no compiler, no triton import) and
compares them with the table. The checkers are also run on altered copies of both sources, so a change on
one side that the comparison would miss fails here.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from lpqld_fast.ops import label_modes
from lpqld_fast.ops.reference import soft_label_kl as ref_kl
from lpqld_fast.store import quantize

ops_kl = importlib.import_module("lpqld_fast.ops.soft_label_kl")  # the module (the package re-exports the function)

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "common" / "label_modes.h"
TRITON = ROOT / "kernels" / "soft_label_kl.py"


def header_modes(text: str) -> dict[str, int]:
    """name -> code of ``enum LabelMode`` (the name is each enumerator's trailing comment)."""
    body = re.search(r"enum\s+LabelMode\s*:\s*int\s*\{(.*?)\};", text, re.S)
    assert body, "no `enum LabelMode : int { ... };` in the header"
    entries = re.findall(r"^\s*k\w+\s*=\s*(\d+)\s*,?\s*//\s*(\w+)\s*$", body.group(1), re.M)
    lines = [ln for ln in body.group(1).splitlines() if ln.strip() and not ln.strip().startswith("//")]
    assert len(entries) == len(lines), f"an enumerator without `= code,  // name`: {lines}"
    return {name: int(code) for code, name in entries}


def check_header(text: str) -> None:
    modes = header_modes(text)
    assert modes == label_modes.MODE_CODES, (modes, label_modes.MODE_CODES)
    count = re.search(r"kNumLabelModes\s*=\s*(\d+)\s*;", text)
    assert count and int(count.group(1)) == len(label_modes.MODES)
    names = re.search(r'kLabelModeNames\s*=\s*"([^"]*)"', text)
    assert names and names.group(1) == ", ".join(label_modes.MODES)


def check_triton(source: str) -> None:
    """Every comparison with the kernel's MODE is against a module constant tl.constexpr(MODE_CODES[name]),
    and MODE_CODES is the Python table's (imported, not redefined)."""
    tree = ast.parse(source)
    imported = any(isinstance(n, ast.ImportFrom) and n.module == "lpqld_fast.ops.label_modes"
                   and any(a.name == "MODE_CODES" and a.asname is None for a in n.names) for n in tree.body)
    assert imported, "the Triton module must import MODE_CODES from lpqld_fast.ops.label_modes"
    constants: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            assert "MODE_CODES" not in names, "MODE_CODES redefined in the Triton module"
            v = node.value
            if (isinstance(v, ast.Call) and ast.unparse(v.func) in ("tl.constexpr", "triton.language.constexpr")
                    and len(v.args) == 1 and isinstance(v.args[0], ast.Subscript)
                    and ast.unparse(v.args[0].value) == "MODE_CODES"):
                key = v.args[0].slice
                assert isinstance(key, ast.Constant) and key.value in label_modes.MODES, ast.unparse(v)
                for name in names:
                    constants[name] = key.value
    compared = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(isinstance(o, ast.Name) and o.id == "MODE" for o in operands):
                compared += 1
                for o in operands:
                    if not (isinstance(o, ast.Name) and o.id == "MODE"):
                        assert isinstance(o, ast.Name) and o.id in constants, \
                            f"MODE compared with {ast.unparse(o)!r}, not a constant from MODE_CODES"
    assert compared > 0, "no MODE comparison found: the checker no longer sees the kernel's mode switch"


def test_python_sides_use_the_table() -> None:
    assert label_modes.MODE_CODES == {m: i for i, m in enumerate(label_modes.MODES)}
    assert quantize.MODES is label_modes.MODES and quantize.PROB_MODES is label_modes.PROB_MODES
    assert ref_kl.MODES is label_modes.MODES
    assert ops_kl.MODES is label_modes.MODES and ops_kl.MODE_CODES is label_modes.MODE_CODES


def test_cpp_header_matches_the_table() -> None:
    check_header(HEADER.read_text())


def test_triton_constants_come_from_the_table() -> None:
    check_triton(TRITON.read_text())


def test_no_other_mode_table_in_csrc() -> None:
    """The kernels use the header's names: no second enum, no mode compared with a bare number."""
    for path in sorted((ROOT / "csrc").rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu") or path == HEADER:
            continue
        text = path.read_text()
        assert not re.search(r"enum\s+\w*Mode\b", text), path
        assert not re.search(r"\bmode\s*(==|!=|<=|<|>)\s*\d", text), path


@pytest.mark.parametrize("change", [
    ("kMRS = 2,    // mrs", "kMRS = 3,    // mrs"),  # a code changed
    ("kMS = 3,     // ms", "kMS = 3,     // msx"),  # a name changed
    ("  kTopK = 4,   // topk_norenorm\n", ""),  # a mode dropped
    ("kNumLabelModes = 5", "kNumLabelModes = 4"),
])
def test_header_check_sees_a_change(change) -> None:
    text = HEADER.read_text()
    assert change[0] in text
    with pytest.raises(AssertionError):
        check_header(text.replace(change[0], change[1]))


@pytest.mark.parametrize("change", [
    ('_MRS = tl.constexpr(MODE_CODES["mrs"])', "_MRS = tl.constexpr(2)"),  # a literal code
    ("if MODE == _MS:", "if MODE == 3:"),  # a literal comparison
    ("from lpqld_fast.ops.label_modes import MODE_CODES\n",
     'MODE_CODES = {"dense": 0, "mr": 1, "mrs": 2, "ms": 3, "topk_norenorm": 4}\n'),  # a copy of the table
])
def test_triton_check_sees_a_change(change) -> None:
    text = TRITON.read_text()
    assert change[0] in text
    with pytest.raises(AssertionError):
        check_triton(text.replace(change[0], change[1]))
