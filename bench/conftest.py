"""pytest-benchmark entry to the benchmark suite.

`pytest bench/` (or one module: `pytest bench/bench_classwise_moments.py`)
collects the ``test_*`` functions of bench/bench_*.py. Such a test asks for the
``record_benchmark`` fixture and passes it a :class:`bench.common.Case`; the
fixture times it with pytest-benchmark (so --benchmark-* options, JSON output
and comparisons work) and appends the same schema row to the shared CSV.

Environment:
  LPQLD_BENCH_CSV      CSV to append to (default bench/results/results.csv)
  LPQLD_BENCH_PROFILE  full | quick | tiny (default quick): sizes and repeats
  LPQLD_BENCH_BATCH    batch override for modules that have one
The session measures memory bandwidth once (rows of kernel "bandwidth") so
rows get frac_read_bw.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import bench_bandwidth
from bench.common import BenchContext, Case

ROOT = Path(__file__).resolve().parent.parent


def pytest_collect_file(file_path: Path, parent):
    # bench modules are named bench_*.py, which pytest's default pattern skips.
    # Files named on the command line are collected by pytest itself already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and file_path.parent == Path(__file__).parent and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def bench_ctx() -> BenchContext:
    csv_path = Path(os.environ.get("LPQLD_BENCH_CSV", ROOT / "bench" / "results" / "results.csv"))
    profile = os.environ.get("LPQLD_BENCH_PROFILE", "quick")
    options = {}
    if os.environ.get("LPQLD_BENCH_BATCH"):
        options["batch"] = int(os.environ["LPQLD_BENCH_BATCH"])
    if profile == "tiny":
        options["bw_bytes"] = 8 << 20
    ctx = BenchContext(csv_path, profile=profile, options=options)
    bench_bandwidth.run(ctx)
    return ctx


@pytest.fixture
def record_benchmark(benchmark, bench_ctx: BenchContext):
    """record_benchmark(case) -> the schema row (times via pytest-benchmark, row into the shared CSV)."""

    def _run(case: Case) -> dict[str, str] | None:
        t = bench_ctx.timing
        setup = None
        if case.setup is not None:
            def setup():  # pytest-benchmark's setup may return (args, kwargs); ours returns nothing
                case.setup()

        benchmark.extra_info.update({"kernel": case.kernel, "impl": case.impl, "sizes": str(case.sizes)})
        benchmark.pedantic(
            case.call, setup=setup, rounds=int(t["repeats"]), warmup_rounds=int(t["warmup"]), iterations=1
        )
        stats = getattr(benchmark, "stats", None)
        data = list(stats.stats.data) if stats is not None and getattr(stats, "stats", None) else []
        if not data:  # --benchmark-disable: ran once, nothing to record
            return None
        return bench_ctx.record(case, data)

    return _run
