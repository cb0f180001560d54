"""README's Performance table is generated from bench result files: run matching, bandwidth, baselines, --check."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bench.common import SCHEMA

_SPEC = importlib.util.spec_from_file_location("perf_tables",
                                               Path(__file__).resolve().parents[1] / "scripts/perf_tables.py")
pt = importlib.util.module_from_spec(_SPEC)
sys.modules["perf_tables"] = pt  # dataclasses look their module up while the class is created
_SPEC.loader.exec_module(pt)

FULL = {"command": "python -m bench.run --out bench/results", "finished": "2026-01-01T10:10:00+0000",
        "wall_s": 600.0, "git_commit": "aaaaaaa", "threads": 2, "cpus": 2}
ONLY = {"command": "python -m bench.run --only crop --out bench/results", "finished": "2026-01-01T11:02:00+0000",
        "wall_s": 120.0, "git_commit": "bbbbbbb", "threads": 2, "cpus": 2}


def _row(kernel: str, impl: str, sizes: str, p50: float, gbps: float, frac: float, ts: str) -> dict[str, str]:
    row = dict.fromkeys(SCHEMA, "")
    row.update(kernel=kernel, impl=impl, mode="full", sizes=sizes, p20_ms=str(p50), p50_ms=str(p50),
               p80_ms=str(p50), gbps=str(gbps), frac_read_bw=str(frac), device="cpu", cpu="Test CPU", threads="2",
               timestamp=ts)
    return row


def _results_dir(tmp: Path) -> Path:
    """A full run (moments, its bandwidth row since replaced) and a later --only run with its bandwidth row."""
    d = tmp / "bench" / "results"
    d.mkdir(parents=True)
    t_full, t_only = "2026-01-01T10:05:00+0000", "2026-01-01T11:01:00+0000"
    rows = [
        # stored frac against the full run's own (lost) 20 GB/s: 40 / 20 = 2.0, the value a table must not show
        _row("moments", "cpp", "K=10", 1.0, 40.0, 2.0, t_full),
        _row("moments", "torch-index_add", "K=10", 0.8, 50.0, 2.5, t_full),
        _row("moments", "reference-loop", "K=10", 30.0, 1.3, 0.07, t_full),
        _row("moments", "read-pass", "K=10", 0.5, 80.0, 4.0, t_full),
        _row("moments", "cpp", "K=20", 1.0, 40.0, 2.0, t_full),
        _row("moments", "torch-index_add", "K=20", 2.0, 20.0, 1.0, t_full),
        _row("moments", "reference-loop", "K=20", 10.0, 4.0, 0.2, t_full),
        _row("bandwidth", "read", "MiB=256", 5.0, 48.0, 0.96, t_only),  # best read = 48 / 0.96 = 50 GB/s
        _row("crop", "cpp", "N=8", 2.0, 25.0, 0.5, t_only),
        _row("crop", "torch-gather", "N=8", 4.0, 12.5, 0.25, t_only),
        _row("crop", "pil-loop", "N=8", 3.0, 16.0, 0.33, t_only),
    ]
    with open(d / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SCHEMA)
        w.writeheader()
        w.writerows(rows)
    (d / "run_meta.json").write_text(json.dumps({"moments": FULL, "bandwidth": ONLY, "crop": ONLY}))
    return d


def test_rows_are_tied_to_their_run_and_its_bandwidth(tmp_path) -> None:
    rows = pt.load_csv(_results_dir(tmp_path))
    runs = {r.kernel: r.run for r in rows}
    assert runs["moments"].commit == "aaaaaaa" and runs["moments"].read_bw is None
    assert runs["crop"].commit == "bbbbbbb" and runs["crop"].read_bw == pytest.approx(50.0)
    assert "bandwidth" not in runs


def test_baseline_is_the_fastest_plain_strategy_per_size(tmp_path) -> None:
    rows = pt.load_csv(_results_dir(tmp_path))
    claim = pt.Claim("moments", "m", pt.CSV, "cpp", ("torch-index_add", "reference-loop"), "reference-loop",
                     "read-pass")
    cells = pt.claim_row(claim, rows)
    # K=10: index_add 0.8 ms beats cpp 1.0 ms (0.80x); K=20: 2.0 / 1.0 = 2.00x; the loop only beside it
    assert cells[1] == "2" and cells[2] == "torch-index_add"
    assert cells[3] == "0.80-2.00x" and cells[4] == "10.00-30.00x"
    assert cells[5] == "2.00x"  # cpp / read-pass, only where the floor was timed (K=10)
    assert cells[6] == "n/a"  # that run's bandwidth row is gone: no fraction against another run's bandwidth
    assert cells[8] == "`aaaaaaa`"


def test_fraction_uses_the_same_run_bandwidth(tmp_path) -> None:
    rows = pt.load_csv(_results_dir(tmp_path))
    cells = pt.claim_row(pt.Claim("crop", "c", pt.CSV, "cpp", ("torch-gather", "pil-loop"), "pil-loop"), rows)
    assert cells[2] == "pil-loop" and cells[3] == "1.50x" and cells[4] == "1.50x"
    assert cells[6] == "0.50"  # 25 GB/s over the same run's best read, 50 GB/s
    assert pt.claim_row(pt.Claim("absent", "a", pt.CSV, "cpp", ("x",)), rows) is None


def test_md_source_reads_run_and_rows(tmp_path) -> None:
    md = tmp_path / "r.md"
    md.write_text(
        "# Benchmark results\n\ncpu: Test CPU; threads: 1; torch x\n"
        "measured bandwidth (best of the run): copy (p50) 9.00 GB/s, read (best) 10.00 GB/s, read (p50) 9.50 GB/s\n\n"
        "- op: `python -m bench.run --only op --threads 1` — 5 s, load 0.1/0.2 on 4 CPUs, 1 threads, commit "
        "ccccccc, _C sha1 x, 2026-01-01T00:00:00+0000\n\n## op (baseline: loop)\n\n| sizes | device | impl | mode |"
        " p50 ms | p20..p80 ms | GB/s | frac read bw |\n|---|---|---|---|---|---|---|---|\n"
        "| `N=1` | cpu | loop | full | 6 | 5..7 | 1.00 | 0.10 |\n| `N=1` | cpu | cpp | full | 2 | 1..3 | 3.00 | 0.30 |\n")
    rows = pt.load_md(md)
    assert [(r.impl, r.p50) for r in rows] == [("loop", 6.0), ("cpp", 2.0)]
    assert rows[1].run == pt.Run("python -m bench.run --only op --threads 1", "ccccccc", 1, 4, "Test CPU", 10.0)
    cells = pt.claim_row(pt.Claim("op", "o", str(md), "cpp", ("loop",)), rows)
    assert cells[3] == "3.00x" and cells[6] == "0.30" and "1 thread" in cells[7]
    (tmp_path / "bad.md").write_text("## op\n| `N=1` | cpu | loop | full | 6 | 5..7 | 1.00 | 0.10 |\n")
    with pytest.raises(ValueError, match="no 'Runs' line"):
        pt.load_md(tmp_path / "bad.md")


def test_check_reports_a_stale_block_and_rewrite_fixes_it(tmp_path, monkeypatch) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("top\n<!-- perf:readme -->\nold\n<!-- /perf:readme -->\nbottom\n")
    monkeypatch.setattr(pt, "readme_table", lambda root: "| new |")
    assert pt.main(["--root", str(tmp_path), "--check"]) == 1
    assert "old" in readme.read_text()
    assert pt.main(["--root", str(tmp_path)]) == 0
    assert readme.read_text() == "top\n<!-- perf:readme -->\n| new |\n<!-- /perf:readme -->\nbottom\n"
    assert pt.main(["--root", str(tmp_path), "--check"]) == 0
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="no <!-- perf:readme -->"):
        pt.main(["--root", str(tmp_path), "--check"])


def test_committed_readme_is_up_to_date() -> None:
    assert pt.main(["--check"]) == 0, "README's Performance table is stale: run scripts/perf_tables.py"


def test_versus_table_states_ours_against_the_strongest_plain(tmp_path) -> None:
    rows = pt.load_csv(_results_dir(tmp_path))
    v = pt.Versus("moments", ("reference-loop", "torch-index_add", "cpp", "read-pass"), ("torch-index_add",),
                  ("cpp",), "read-pass")
    table = pt.versus_table(v, rows)
    lines = table.splitlines()
    assert lines[2].startswith("`python -m bench.run --out bench/results` at `aaaaaaa`, 2 threads, Test CPU")
    assert lines[4] == ("| sizes | reference-loop | torch-index_add | cpp | read-pass | strongest plain | cpp vs it | "
                        "read-pass / cpp |")
    # K=10: index_add 0.8 ms over cpp 1.0 ms; read-pass 0.5 ms = 50% of cpp; K=20 has no floor row
    assert lines[6] == "| `K=10` | 30 ms | 0.8 ms | 1 ms | 0.5 ms | torch-index_add | 0.80x | 50% |"
    assert lines[7] == "| `K=20` | 10 ms | 2 ms | 1 ms | – | torch-index_add | 2.00x | – |"
    assert pt.versus_table(pt.Versus("absent", ("cpp",), ("x",), ("cpp",)), rows) is None
