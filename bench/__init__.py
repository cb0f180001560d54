"""lpqld_fast benchmark suite.

Every ``bench/bench_<name>.py`` module exposes ``run(ctx)`` and records its
timings through :class:`bench.common.BenchContext` into one shared CSV schema
(:data:`bench.common.SCHEMA`). ``python -m bench.run`` discovers and runs them;
``pytest bench/`` runs the same cases through pytest-benchmark. See
bench/README.md.
"""
