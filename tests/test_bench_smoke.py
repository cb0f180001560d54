"""Smoke test of the benchmark machinery (bench/): tiny sizes, no timing asserted."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from bench import common
from bench import run as bench_run

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["pytester"]


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def test_quick_suite_machinery_writes_csv_markdown_png(tmp_path):
    rc = bench_run.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--only", "classwise_moments"])
    assert rc == 0
    header, rows = _read_csv(tmp_path / "results.csv")
    assert header == list(common.SCHEMA)
    kernels = {r["kernel"] for r in rows}
    assert {"bandwidth", "classwise_moments"} <= kernels
    impls = {r["impl"] for r in rows if r["kernel"] == "classwise_moments"}
    assert {"reference-loop", "torch-index_add", "read-pass"} <= impls
    for r in rows:
        assert r["mode"] in common.MODES
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert int(r["bytes"]) > 0
        assert float(r["frac_read_bw"]) > 0  # bandwidth was measured first
        assert common.parse_sizes(common.format_sizes(common.parse_sizes(r["sizes"]))) == common.parse_sizes(r["sizes"])
    md = (tmp_path / "results.md").read_text()
    assert "## classwise_moments" in md and "speed-up vs reference-loop" in md and "time / read-pass" in md
    assert "- classwise_moments acceptance" in md  # the module's summary(rows) lines
    assert "Runs (exact command" in md and "--tiny" in md  # run_meta.json: how the rows were made
    png = tmp_path / "classwise_moments.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --only keeps the other kernels' rows and replaces the selected one's
    common.append_rows(tmp_path / "results.csv", [dict(rows[-1], kernel="other_kernel")])
    assert bench_run.main(["--report-only", "--out", str(tmp_path)]) == 0
    assert "## other_kernel" in (tmp_path / "results.md").read_text()


def test_tiny_soft_label_kl_and_train_epoch(tmp_path):
    """The issue-5 modules at tiny sizes: every impl row is written and the summaries reach results.md."""
    rc = bench_run.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--only", "soft_label_kl",
                         "--only", "train_epoch"])
    assert rc == 0
    _, rows = _read_csv(tmp_path / "results.csv")
    got = {(r["kernel"], r["impl"]) for r in rows}
    want = {("soft_label_kl", i) for i in ("reference-strategy", "op-reference", "copy-pass", "autograd-floor")}
    want |= {("train_epoch", i) for i in ("reference-loop", "ours", "model-steps")}
    assert want <= got
    parts = {common.parse_sizes(r["sizes"]).get("part") for r in rows if r["kernel"] == "train_epoch"}
    assert parts == {"epoch", "data"}
    md = (tmp_path / "results.md").read_text()
    assert "## soft_label_kl (baseline: reference-strategy; limit: copy-pass)" in md
    assert "## train_epoch (baseline: reference-loop; limit: model-steps)" in md
    assert "vs reference-loop" in md


def test_tiny_student_step(tmp_path):
    """Whole student steps, ours and plain, checked against the dense reference loss before timing."""
    rc = bench_run.main(["--tiny", "--threads", "1", "--out", str(tmp_path), "--only", "student_step"])
    assert rc == 0  # a loss or gradient that disagreed would be a failure (rc 1)
    _, rows = _read_csv(tmp_path / "results.csv")
    got = {r["impl"] for r in rows if r["kernel"] == "student_step"}
    assert {"torch-dense-step", "torch-topk-step", "ours-step", "model-step"} <= got
    md = (tmp_path / "results.md").read_text()
    assert "the model's own step is" in md


def test_student_step_check_refuses_a_wrong_loss(monkeypatch):
    from bench import bench_student_step as bss

    def wrong(z, values, indices):
        return 2 * bss.topk_loss(z, values, indices)

    monkeypatch.setitem(bss.LOSSES, "torch-topk-step", (wrong, False))
    cases, problems = bss.build_cases(4, 10, 2, compiled=False)
    assert "torch-topk-step" in problems and "loss off by" in problems["torch-topk-step"]
    assert "torch-topk-step" not in {c.impl for c in cases}


def test_markdown_ratios_and_schema_guard(tmp_path):
    case = common.Case("k", "reference-loop", {"N": 4}, lambda: None, bytes=10**9)
    rows = [
        common.make_row(case, [0.4, 0.5, 0.6], read_bw_gbps=10.0),
        common.make_row(common.Case("k", "fast", "N=4", lambda: None, bytes=10**9), [0.05], read_bw_gbps=10.0),
        common.make_row(common.Case("k", "floor", "N=4", lambda: None, bytes=10**9), [0.025], read_bw_gbps=10.0),
    ]
    assert rows[0]["sizes"] == "N=4" and float(rows[0]["gbps"]) == pytest.approx(2.0)
    assert float(rows[0]["frac_read_bw"]) == pytest.approx(0.2)
    md = common.to_markdown(rows, limits={"k": "floor"})
    fast_line = next(line for line in md.splitlines() if "| fast |" in line)
    assert "10.0x" in fast_line and "2.00x" in fast_line
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="schema"):
        common.append_rows(bad, rows)
    with pytest.raises(ValueError, match="mode"):
        common.make_row(common.Case("k", "x", "N=1", lambda: None, bytes=1, mode="bogus"), [0.1], read_bw_gbps=None)


def test_pytest_benchmark_fixture_records_into_csv(tmp_path, pytester, monkeypatch):
    # In-process (no second interpreter start): bench/conftest.py's record_benchmark fixture
    # times through pytest-benchmark and appends schema rows to LPQLD_BENCH_CSV.
    monkeypatch.setenv("LPQLD_BENCH_CSV", str(tmp_path / "pb.csv"))
    monkeypatch.setenv("LPQLD_BENCH_PROFILE", "tiny")
    res = pytester.runpytest_inprocess(
        str(ROOT / "bench" / "bench_classwise_moments.py"), "-q", "-p", "no:cacheprovider",
        "-k", "C512-7x7-K10- and (read-pass or torch-index_add)", f"--rootdir={ROOT}",
    )
    assert res.ret == 0, "\n".join(res.outlines[-40:])
    header, rows = _read_csv(tmp_path / "pb.csv")
    assert header == list(common.SCHEMA)
    assert {r["impl"] for r in rows if r["kernel"] == "classwise_moments"} == {"read-pass", "torch-index_add"}


def test_soft_label_kl_summary_states_target_and_autograd_ceiling():
    from bench import bench_soft_label_kl as b

    sizes = "B=128;C=1000;k=100;labels=mr-fp16"
    times = {"reference-strategy": 1.0, "cpp": 0.25, "copy-pass": 0.01, "autograd-floor": 0.1}
    rows = [{"kernel": b.KERNEL, "impl": i, "sizes": sizes, "device": "cpu", "p50_ms": str(t)}
            for i, t in times.items()]
    text = "\n".join(b.summary(rows))
    assert "cpp vs reference-strategy: 4.0x" in text
    assert "NOT met (lowest 4.0x" in text
    assert "autograd floor alone is 40% of its time" in text
    assert "reference-strategy / autograd-floor = 10.0x" in text
