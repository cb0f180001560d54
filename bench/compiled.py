"""torch.compile rows of the op benchmarks: one place for the settings every bench uses.

- ``compile_fn(fn, fullgraph=...)``: ``torch.compile(fn, dynamic=False)`` with the default (inductor)
  backend. Only the loss / forward function is compiled; the benches take gradients outside it
  (``torch.autograd.grad`` or ``.backward()``), so AOTAutograd compiles the backward graph as well.
- ``dynamic=False``: every (shape, dtype) gets its own specialised graph, like a training run with a fixed
  batch shape. The dynamo cache limits are raised (``configure()``) so a bench's shapes do not hit the
  recompile limit and silently fall back to eager.
- Compilation happens in the correctness check that runs before timing (the first call compiles the
  forward and the backward); the timed rounds never include compile time, and a warm-up call precedes them
  (``bench.common.time_interleaved``).
- Not in the tiny profile (tests/test_bench_smoke.py, ``make test``): a cold inductor compile costs
  seconds to tens of seconds per graph on a 2-core host. Inductor's on-disk cache
  (``/tmp/torchinductor_$USER``) makes a second run's compiles fast.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from bench.common import p50_by_size

CACHE_LIMIT = 256


def configure() -> None:
    """Raise dynamo's recompile limits (names differ across torch versions)."""
    cfg = torch._dynamo.config
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < CACHE_LIMIT:
            setattr(cfg, name, CACHE_LIMIT)


def compile_fn(fn: Callable, *, fullgraph: bool = False) -> Callable:
    """``torch.compile(fn, dynamic=False, fullgraph=fullgraph)`` after ``configure()``."""
    configure()
    return torch.compile(fn, dynamic=False, fullgraph=fullgraph)


_ONCE: dict[tuple[str, str], Callable] = {}


def compiled_once(kernel: str, impl: str, plain: Callable, ours: Callable, plain_impl: str) -> Callable:
    """The compiled function of ``impl`` (``plain_impl``: ``plain`` compiled; ``cpp-compiled``: ``ours`` with
    fullgraph), made once per process so the shapes of a run recompile one object."""
    key = (kernel, impl)
    if key not in _ONCE:
        if impl == plain_impl:
            _ONCE[key] = compile_fn(plain)
        elif impl == "cpp-compiled":
            _ONCE[key] = compile_fn(ours, fullgraph=True)
        else:
            raise ValueError(f"{kernel}: no compiled impl {impl!r}")
    return _ONCE[key]


def enabled(profile: str) -> bool:
    """Whether a profile has compiled rows (not ``tiny``: it is the test suite's smoke profile)."""
    return profile != "tiny"


def _sz(s: str) -> str:
    return s.replace(";", " ")


def versus_strongest(rows: list[dict[str, str]], kernel: str, ours: tuple[str, ...], plain: tuple[str, ...],
                     floor: str | None = None, *, speedup: float = 1.5, roofline: float = 0.9,
                     shape_filter: Callable[[str], bool] | None = None) -> list[str]:
    """Lines stating each of ``ours`` against the strongest of ``plain`` (eager and compiled), per size.

    The project's CPU target, per size: at least as fast as the strongest plain strategy (compiled form
    included), and >= ``speedup`` x it or >= ``roofline`` of the floor (``floor``'s time / ours), whichever
    comes first. The baseline is named in every ratio. Judged on p50 of one run (impls timed round-robin).
    """
    by = p50_by_size(rows, kernel)
    out = []
    for o in ours:
        verdicts = []
        for (sizes, dev), t in by.items():
            if o not in t or (shape_filter is not None and not shape_filter(sizes)):
                continue
            have = [p for p in plain if p in t]
            if not have:
                continue
            best = min(have, key=lambda p: t[p])
            ratio = t[best] / t[o]
            parts = [f"{t[p] / t[o]:.2f}x vs {p} ({t[p]:.3g} ms)" for p in have]
            frac = t[floor] / t[o] if floor and floor in t else None
            if frac is not None:
                parts.append(f"{frac:.0%} of the {floor} roofline")
            met = ratio >= 1.0 and (ratio >= speedup or (frac is not None and frac >= roofline))
            if not any(p.endswith("-compiled") for p in have):
                parts.append("no compiled plain row in this run")
            verdicts.append((met, ratio, best, sizes, dev))
            out.append(f"{kernel} {o} [{dev}] {_sz(sizes)}: {ratio:.2f}x vs the strongest plain = {best}; "
                       + ", ".join(parts) + f" (ours {t[o]:.3g} ms)")
        if verdicts:
            missed = [v for v in verdicts if not v[0]]
            worst = min(verdicts, key=lambda v: v[1])
            head = (f"{kernel} target ({o} >= strongest plain incl. compiled at every shape, and >= {speedup}x it"
                    + (f" or >= {roofline:.0%} of {floor}" if floor else "") + "): ")
            if missed:
                out.append(head + f"NOT met at {len(missed)} of {len(verdicts)} shapes; lowest {worst[1]:.2f}x vs "
                           f"{worst[2]} at {_sz(worst[3])}")
            else:
                out.append(head + f"met at all {len(verdicts)} shapes; lowest {worst[1]:.2f}x vs {worst[2]} at "
                           f"{_sz(worst[3])}")
    return out
