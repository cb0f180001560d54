"""The package's import structure: the layer contract of pyproject.toml, no cycles, no hidden imports.

The contracts ([tool.importlinter] in pyproject.toml) are checked by import-linter, which also reads imports
inside functions; the two tests after it check what the contracts do not say on their own: no cycle through
a package and its own submodules, and function-local imports of the package only where a reason is given.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lpqld_fast"

# (importing module, imported module) -> why the import waits for the call. Nothing else of the package may
# be imported inside a function: a new entry needs a reason of this kind, never to hide a cycle.
LOCAL_IMPORTS = {
    ("lpqld_fast.augment", "lpqld_fast.augment_dali"): "DALI is optional and slow to import",
    ("lpqld_fast.ops._dispatch", "lpqld_fast._C"): "the compiled extension is optional",
    ("lpqld_fast.ops._dispatch", "lpqld_fast.ops._fake"): "fake kernels register only once _C's ops exist",
    ("lpqld_fast.ops.classwise_moments", "lpqld_fast.kernels.classwise_moments"): "imports triton",
    ("lpqld_fast.ops.soft_label_kl", "lpqld_fast.kernels.soft_label_kl"): "imports triton",
}


def test_import_contracts_are_kept() -> None:
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                          "sys.exit(lint_imports_command())", "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "0 broken" in run.stdout


def _cycle(graph: grimp.ImportGraph) -> list[str] | None:
    """One import cycle among the package's modules (packages and their submodules included), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph.modules):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycle() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        graph = grimp.build_graph("lpqld_fast", cache_dir=None)
    finally:
        sys.path.remove(str(ROOT))
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _local_imports(path: Path) -> set[tuple[str, str]]:
    """(module, imported package module) for every import inside a function of ``path``."""
    name = _module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for fn in ast.walk(ast.parse(path.read_text())):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.ImportFrom):
                mod = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]).rstrip(".") \
                    if node.level else node.module or ""
                targets = [f"{mod}.{a.name}" if mod in ("lpqld_fast", "lpqld_fast.ops", "lpqld_fast.kernels")
                           else mod for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {(name, t) for t in targets if t == "lpqld_fast" or t.startswith("lpqld_fast.")}
    return found


def test_function_local_imports_have_a_reason() -> None:
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        found |= _local_imports(path)
    unexplained = sorted(found - set(LOCAL_IMPORTS))
    assert not unexplained, ("package modules imported inside functions without a stated reason (import them at "
                             f"module level; a cycle means the code belongs in a lower layer): {unexplained}")
    assert not set(LOCAL_IMPORTS) - found, f"stale entries: {sorted(set(LOCAL_IMPORTS) - found)}"
