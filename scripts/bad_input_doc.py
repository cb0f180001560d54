#!/usr/bin/env python
"""Regenerate the tables of docs/BAD_INPUT.md from the cases in tests/test_bad_input.py, or check them.

    python scripts/bad_input_doc.py           # run every case, rewrite the generated blocks of the doc
    python scripts/bad_input_doc.py --check   # run every case, exit 1 naming the first row that differs

Each case runs exactly as its test runs it (the test module's run_op_case / run_cli_case /
run_full_disk_case, with every assertion of the test); the message it prints goes into the table.
Only the blocks between ``<!-- generated: NAME ... -->`` and ``<!-- end generated: NAME -->`` are
written; the prose around them is kept. A message is normalised so that the doc is the same on every
machine: the case's temporary directory reads ``$TMP``, machine-dependent parts (free memory, free disk,
image hashes, mkstemp names) read ``…``, and a message over MAX_CHARS is cut at a space with `` …``.
Op cases run on every CPU backend in BACKENDS that runs here; a backend (or a CLI case) that cannot run
here keeps the doc's entry, so the comparison covers exactly what ran. tests/test_bad_input.py ends
with a test that calls check() on the messages its own cases printed (no second run).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BAD_INPUT.md"
REGENERATE = "python scripts/bad_input_doc.py"
BACKENDS = ("reference", "cpp", "triton")  # the backends that run CPU tensors (triton under TRITON_INTERPRET=1)
MAX_CHARS = 300
NO_BACKEND = "—"
# Machine-dependent parts of messages (each group is shown as "…").
MACHINE_DEPENDENT: dict[str, str] = {
    "recover-ipc-too-large-for-memory": r"; ([\d.]+) GiB are available",
    "relabel-store-too-large-for-disk": r"; ([\d.]+) GiB are free under",
    # recover's float rounding (and so the image bytes) may differ between CPUs
    "train-image-set-does-not-match-store": r"'([0-9a-f]{64})'",
}
MKSTEMP = r"/\.[^/']+\.([A-Za-z0-9_]+)\.tmp'"  # io_utils.atomic_path's random temp-file name
SECTIONS = ("suites", "ops", "not-checked", "cli", "full-disk")

Observed = dict  # (kind, case id, backend) -> (exception type, message) for ops, (stderr line, tmp dir) otherwise


def load_cases() -> ModuleType:
    """tests/test_bad_input.py (the module pytest imported, when it did)."""
    if "test_bad_input" in sys.modules:
        return sys.modules["test_bad_input"]
    sys.path.insert(0, str(ROOT / "tests"))
    import test_bad_input

    return test_bad_input


# ------------------------------------------------------------------------------------------- normalising


def normalise(text: str, case_id: str, tmp: str | None = None) -> str:
    if tmp:
        text = text.replace(tmp, "$TMP")
    pats = [MACHINE_DEPENDENT[case_id]] if case_id in MACHINE_DEPENDENT else []
    for pat in pats + [MKSTEMP]:
        text = re.sub(pat, _mask, text)
    if len(text) > MAX_CHARS:
        cut = text.rfind(" ", 0, MAX_CHARS)
        text = text[:cut if cut > 0 else MAX_CHARS] + " …"
    return text


def _mask(m: re.Match) -> str:
    """The match with each of its groups replaced by '…'."""
    s, out, pos = m.group(0), [], 0
    for g in range(1, (m.re.groups or 0) + 1):
        a, b = m.start(g) - m.start(0), m.end(g) - m.start(0)
        out += [s[pos:a], "…"]
        pos = b
    return "".join(out) + s[pos:]


def code(text: str) -> str:
    """``text`` as a Markdown code span inside a table cell."""
    text = text.replace("|", "\\|")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


# --------------------------------------------------------------------------------------------- parsing


def parse_doc(text: str) -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """The generated blocks (name -> text) and the message cell of every row: (case, backend) -> cell."""
    blocks, cells = {}, {}
    for m in re.finditer(r"<!-- generated: ([\w-]+).*?-->\n(.*?)<!-- end generated: \1 -->", text, re.S):
        blocks[m.group(1)] = m.group(2)
        for line in m.group(2).splitlines():
            parts = [p.strip() for p in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(parts) < 4 or not re.fullmatch(r"`[^`]+`", parts[-1]):
                continue
            case = parts[-1].strip("`")
            if m.group(1) == "ops":
                for b in parts[2].split(", "):
                    cells[case, b] = parts[3]
            elif m.group(1) == "cli":
                cells[case, NO_BACKEND] = parts[2]
            elif m.group(1) == "full-disk":
                cells[case, NO_BACKEND] = parts[3]
    return blocks, cells


# ------------------------------------------------------------------------------------------- rendering


class Missing(Exception):
    pass


def _cell(observed: Observed, doc_cells: dict, kind: str, case_id: str, backend: str | None) -> str:
    if (kind, case_id, backend) in observed:
        first, second = observed[kind, case_id, backend]
        if kind == "op":
            return f"{first}: {code(normalise(second, case_id))}"
        return code(normalise(first, case_id, second))
    label = backend or NO_BACKEND
    cell = doc_cells.get((case_id, label)) or (doc_cells.get((case_id, "all")) if backend else None)
    if cell is None:
        raise Missing(f"case {case_id}{f' [{backend}]' if backend else ''} did not run here and the doc has no "
                      f"row for it")
    return cell


def _count_tests(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return sum(isinstance(n, ast.FunctionDef) and n.name.startswith("test_") for n in tree.body)


def render(mod: ModuleType, observed: Observed, doc_cells: dict) -> dict[str, str]:
    """Every generated block's text. Raises Missing for a case that neither ran nor has a doc row."""
    op_ids = [c[0] for c in mod.OP_CASES]
    cli_ids = [c[0] for c in mod.CLI_CASES]
    for name, ids, docs in (("OP_DOC", op_ids, mod.OP_DOC), ("CLI_DOC", cli_ids, mod.CLI_DOC)):
        if set(ids) != set(docs) or len(ids) != len(set(ids)):
            raise Missing(f"tests/test_bad_input.py: {name} does not describe exactly the cases "
                          f"(undescribed: {sorted(set(ids) - set(docs))}, stale: {sorted(set(docs) - set(ids))})")
    for *_, test in mod.NOT_CHECKED:
        if not callable(getattr(mod, test, None)):
            raise Missing(f"NOT_CHECKED names {test}, which is not a test in tests/test_bad_input.py")
    out = {}

    with_backends = [c for c in op_ids if c.split("-")[0] in mod._NATIVE]
    n_runs = len(with_backends) * len(BACKENDS) + len(op_ids) - len(with_backends)
    out["suites"] = "\n".join([
        _row(["file", "what", "cases"]), "|---|---|---|",
        _row(["`tests/test_bad_input.py`", "the tables below",
              f"{len(op_ids)} op cases ({n_runs} case x backend runs where reference, cpp and triton all run), "
              f"{len(mod.NOT_CHECKED)} unchecked inputs (each over the backends), {len(cli_ids)} CLI cases, "
              f"{len(mod.FULL_DISK_CASES)} full-disk cases, and the check of this doc"]),
        _row(["`tests/test_kill_resume.py`", "SIGKILL + resume of squeeze, recover, relabel, train",
              f"{_count_tests(ROOT / 'tests' / 'test_kill_resume.py')} tests"]),
        _row(["`tests/test_properties.py`", "hypothesis: every op vs its reference",
              f"{_count_tests(ROOT / 'tests' / 'test_properties.py')} properties"]),
    ]) + "\n"

    lines = [_row(["op", "input", "backend", "exception: message", "case"]), "|---|---|---|---|---|"]
    prev_op = None
    for case_id in op_ids:
        op, what = mod.OP_DOC[case_id]
        if case_id in with_backends:
            groups: dict[str, list[str]] = {}
            for b in BACKENDS:
                groups.setdefault(_cell(observed, doc_cells, "op", case_id, b), []).append(b)
            rows = ([("all", c) for c in groups] if len(groups) == 1
                    else [(", ".join(bs), c) for c, bs in groups.items()])
        else:
            rows = [(NO_BACKEND, _cell(observed, doc_cells, "op", case_id, None))]
        for i, (backends, cell) in enumerate(rows):
            lines.append(_row([op if op != prev_op else "", what if i == 0 else "", backends, cell, f"`{case_id}`"]))
            prev_op = op
    out["ops"] = "\n".join(lines) + "\n"

    lines = [_row(["op", "input", "what happens", "test"]), "|---|---|---|---|"]
    lines += [_row([op, what, outcome, f"`{test}`"]) for op, what, outcome, test in mod.NOT_CHECKED]
    out["not-checked"] = "\n".join(lines) + "\n"

    lines = [_row(["command", "input", "the line on stderr", "note", "case"]), "|---|---|---|---|---|"]
    for case_id, _, _, command, _ in mod.CLI_CASES:
        what, note = mod.CLI_DOC[case_id]
        lines.append(_row([command, what, _cell(observed, doc_cells, "cli", case_id, None), note, f"`{case_id}`"]))
    out["cli"] = "\n".join(lines) + "\n"

    lines = [_row(["command", "situation", "failing write", "the line on stderr", "case"]), "|---|---|---|---|---|"]
    for case_id, command, *_, situation, target in mod.FULL_DISK_CASES:
        lines.append(_row([command, situation, target, _cell(observed, doc_cells, "disk", case_id, None),
                           f"`{case_id}`"]))
    out["full-disk"] = "\n".join(lines) + "\n"
    return out


def update(text: str, blocks: dict[str, str]) -> str:
    for name, body in blocks.items():
        pat = re.compile(rf"(<!-- generated: {name}.*?-->\n).*?(<!-- end generated: {name} -->)", re.S)
        if not pat.search(text):
            raise Missing(f"docs/BAD_INPUT.md has no block <!-- generated: {name} --> … "
                          f"<!-- end generated: {name} -->")
        text = pat.sub(lambda m: m.group(1) + body + m.group(2), text, count=1)
    return text


def check(observed: Observed, mod: ModuleType | None = None, doc: Path = DOC) -> str | None:
    """None when ``doc`` equals its regeneration from ``observed`` (cases not in it keep the doc's entry);
    else a one-paragraph description of the first differing row."""
    mod = mod or load_cases()
    text = doc.read_text()
    _, doc_cells = parse_doc(text)
    try:
        new = update(text, render(mod, observed, doc_cells))
    except Missing as e:
        return f"{doc}: {e}; regenerate with `{REGENERATE}`"
    if new == text:
        return None
    old_lines, new_lines = text.splitlines(), new.splitlines()
    for i, (a, b) in enumerate(zip(old_lines + [""] * len(new_lines), new_lines + [""] * len(old_lines))):
        if a != b:
            case = re.search(r"\| `([^`|]+)` \|$", b) or re.search(r"\| `([^`|]+)` \|$", a)
            where = f"the row of case {case.group(1)}" if case else "a row"
            return (f"{doc} is out of date at line {i + 1} ({where}); regenerate with `{REGENERATE}`\n"
                    f"  doc:       {a}\n  generated: {b}")
    return None


# ---------------------------------------------------------------------------------------- running cases


@contextlib.contextmanager
def _stderr() -> Iterator:
    """sys.stderr into a buffer; yields read(): what was written since the last read."""
    buf, real = io.StringIO(), sys.stderr

    def read() -> str:
        out = buf.getvalue()
        buf.seek(0)
        buf.truncate()
        return out

    sys.stderr = buf
    try:
        yield read
    finally:
        sys.stderr = real


def collect(mod: ModuleType) -> Observed:
    """Run every case the way its test does and return what each printed."""
    import pytest
    import torch

    torch.set_num_threads(1)  # as the tests (one_thread_module)
    observed: Observed = {}
    for case_id, call, exc, msg in mod.OP_CASES:
        for b in mod.op_backends(case_id):
            err = mod.run_op_case(call, exc, msg, b)
            observed["op", case_id, b] = (type(err).__name__, str(err))
    with tempfile.TemporaryDirectory(prefix="bad-input-doc-") as root, mod.patched_presets():
        root = Path(root)
        print("building the tiny finished run ...", file=sys.stderr)
        finished = mod.make_finished_run(root / "finished")
        for kind, cases, run in (("cli", mod.CLI_CASES, mod.run_cli_case),
                                 ("disk", mod.FULL_DISK_CASES, mod.run_full_disk_case)):
            for case in cases:
                if kind == "cli" and (why := mod.cli_case_skipped(case[0])):
                    print(f"not run here: {case[0]} ({why}); the doc's row is kept", file=sys.stderr)
                    continue
                tmp = root / kind / case[0]
                tmp.mkdir(parents=True)
                with pytest.MonkeyPatch.context() as mp, _stderr() as read:
                    line = run(case, finished, tmp, mp, read)
                observed[kind, case[0], None] = (line, str(tmp))
    return observed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when the doc differs from what the cases print")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend on CPU tensors
    sys.path.insert(0, str(ROOT))  # this checkout's lpqld_fast
    mod = load_cases()
    observed = collect(mod)
    ran = sorted({b for kind, _, b in observed if kind == "op" and b})
    if missing := [b for b in BACKENDS if b not in ran]:
        print(f"backends not available here: {', '.join(missing)} (their doc entries are kept)", file=sys.stderr)
    if args.check:
        problem = check(observed, mod, args.doc)
        print(problem or f"{args.doc} is up to date", file=sys.stderr)
        return 1 if problem else 0
    text = args.doc.read_text()
    try:
        new = update(text, render(mod, observed, parse_doc(text)[1]))
    except Missing as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if new != text:
        args.doc.write_text(new)
    print(f"{args.doc}: {'rewritten' if new != text else 'unchanged'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
