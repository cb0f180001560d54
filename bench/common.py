"""Shared benchmark machinery: one CSV schema, a timer, the report (markdown + PNG).

Every benchmark row has the columns of :data:`SCHEMA`:

    kernel        op or stage name, e.g. "classwise_moments", "bandwidth"
    impl          implementation, e.g. "reference-loop", "cpp", "read-pass"
    mode          "fwd", "bwd" or "full"
    sizes         problem size as a compact "k=v;k=v" string (see format_sizes)
    p20_ms, p50_ms, p80_ms   percentiles of the per-call wall time
    bytes         the minimal bytes the op must move (reads + writes)
    gbps          bytes / p50, in GB/s (1e9 bytes/s)
    frac_read_bw  gbps / the read bandwidth measured in the same run (bench_bandwidth)
    device, torch, triton, cpu, threads, timestamp   where and when

Timings are wall clock (time.perf_counter) around one call, with
torch.cuda.synchronize() after the call on GPU; every case gets warm-up calls
first and an optional untimed ``setup`` before each call. Several impls of one
size are best timed round-robin (BenchContext.time_group), so that load from
other processes on a shared machine hits them alike.
"""
from __future__ import annotations

import csv
import fcntl
import functools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SCHEMA: tuple[str, ...] = (
    "kernel",
    "impl",
    "mode",
    "sizes",
    "p20_ms",
    "p50_ms",
    "p80_ms",
    "bytes",
    "gbps",
    "frac_read_bw",
    "device",
    "torch",
    "triton",
    "cpu",
    "threads",
    "timestamp",
)
MODES = ("fwd", "bwd", "full")
NOISY = 2.0  # results.md flags a row whose p80 exceeds NOISY x its p20

# Run profiles: "full" is the real benchmark, "quick" a < 2 minute pass, "tiny"
# only exercises the machinery (tests). Each module picks its problem sizes
# from ctx.profile; these are the timing knobs.
PROFILES: dict[str, dict[str, float]] = {
    "full": {"warmup": 1, "repeats": 30, "min_repeats": 3, "max_seconds": 5.0},
    "quick": {"warmup": 1, "repeats": 5, "min_repeats": 2, "max_seconds": 0.5},
    "tiny": {"warmup": 1, "repeats": 2, "min_repeats": 1, "max_seconds": 0.2},
}


# ----------------------------------------------------------------------------- sizes


def format_sizes(sizes: Mapping[str, Any] | str) -> str:
    """{"N": 256, "C": 64} -> "N=256;C=64" (insertion order kept)."""
    if isinstance(sizes, str):
        return sizes
    parts = []
    for k, v in sizes.items():
        k, v = str(k), str(v)
        if any(ch in k + v for ch in ";=,\n"):
            raise ValueError(f"sizes: key/value {k!r}={v!r} must not contain ';', '=', ',' or newlines")
        parts.append(f"{k}={v}")
    return ";".join(parts)


def parse_sizes(s: str) -> dict[str, str]:
    """"N=256;C=64" -> {"N": "256", "C": "64"}."""
    out: dict[str, str] = {}
    for part in filter(None, s.split(";")):
        k, _, v = part.partition("=")
        out[k] = v
    return out


# ----------------------------------------------------------------------------- environment


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def triton_version() -> str:
    try:
        import triton

        return str(triton.__version__)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return "none"


def device_label(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache level (sysfs), or 32 MiB when unknown."""
    best = 0
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for idx in base.glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or (32 << 20)


# ----------------------------------------------------------------------------- timing


def _sync_for(device: torch.device | str | None) -> Callable[[], None]:
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 10,
    min_repeats: int = 3,
    max_seconds: float | None = None,
    setup: Callable[[], Any] | None = None,
    device: torch.device | str | None = None,
) -> list[float]:
    """Per-call wall times in seconds.

    ``warmup`` untimed calls, then up to ``repeats`` timed calls; after
    ``min_repeats`` timed calls it stops once ``max_seconds`` of timed work
    have passed (so slow baselines do not dominate the run). ``setup`` runs
    untimed before every call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = _sync_for(device)
    for _ in range(int(warmup)):
        if setup is not None:
            setup()
        fn()
        sync()
    times: list[float] = []
    spent = 0.0
    for i in range(int(repeats)):
        if setup is not None:
            setup()
            sync()
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if max_seconds is not None and i + 1 >= min_repeats and spent >= max_seconds:
            break
    return times


def time_interleaved(
    cases: Sequence["Case"],
    *,
    warmup: int = 1,
    repeats: int = 10,
    min_repeats: int = 3,
    max_seconds: float | None = None,
) -> list[list[float]]:
    """Per-call wall times (seconds) of several cases, timed round-robin.

    Each round calls every still-active case once, so background load on a
    shared machine hits all implementations alike and their ratios stay
    meaningful. A case drops out after ``min_repeats`` calls once its own
    timed work exceeds ``max_seconds``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for c in cases:
        for _ in range(int(warmup)):
            if c.setup is not None:
                c.setup()
            c.call()
    times: list[list[float]] = [[] for _ in cases]
    spent = [0.0] * len(cases)
    active = list(range(len(cases)))
    for _ in range(int(repeats)):
        for i in list(active):
            c = cases[i]
            sync = _sync_for(c.device)
            if c.setup is not None:
                c.setup()
                sync()
            t0 = time.perf_counter()
            c.fn()
            sync()
            dt = time.perf_counter() - t0
            times[i].append(dt)
            spent[i] += dt
            if max_seconds is not None and len(times[i]) >= min_repeats and spent[i] >= max_seconds:
                active.remove(i)
        if not active:
            break
    return times


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]), like numpy's default."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------- cases and the context


@dataclass
class Case:
    """One timed thing: ``fn()`` is the call, ``bytes`` the op's minimal traffic."""

    kernel: str
    impl: str
    sizes: Mapping[str, Any] | str
    fn: Callable[[], Any]
    bytes: int
    mode: str = "full"
    setup: Callable[[], Any] | None = None
    device: str = "cpu"

    def call(self) -> None:
        """fn() plus a device sync: what a timer should wrap."""
        self.fn()
        _sync_for(self.device)()


@dataclass
class BenchContext:
    """What a benchmark module's ``run(ctx)`` gets.

    profile      "full", "quick" or "tiny": modules choose problem sizes from it
    csv_path     rows are appended here as they are measured
    read_bw_gbps best read bandwidth of this run (set by bench_bandwidth), for frac_read_bw
    options      free-form per-run options from the CLI (e.g. {"batch": 64}, {"devices": ["cuda"]})
    read_bw_by_device  best read GB/s per device type measured by bench_bandwidth ("cpu", "cuda"): a row's
                 frac_read_bw is relative to the bandwidth of the device it ran on
    """

    csv_path: Path
    profile: str = "full"
    read_bw_gbps: float | None = None
    copy_bw_gbps: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = print
    rows: list[dict[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    read_bw_by_device: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {self.profile!r}")
        self.csv_path = Path(self.csv_path)
        self.timing = {**PROFILES[self.profile], **self.timing}

    @property
    def quick(self) -> bool:
        return self.profile != "full"

    def devices(self) -> list[str]:
        """The device types to measure on: options["devices"] (--devices), else "cpu" plus "cuda" when present."""
        chosen = self.options.get("devices") or ["cpu", "cuda"]
        return [d for d in chosen if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]

    def time(self, case: Case) -> dict[str, str]:
        """Time ``case`` with this run's profile and append its row."""
        t = self.timing
        times = time_callable(
            case.fn,
            warmup=int(t["warmup"]),
            repeats=int(t["repeats"]),
            min_repeats=int(t["min_repeats"]),
            max_seconds=t["max_seconds"],
            setup=case.setup,
            device=case.device,
        )
        return self.record(case, times)

    def time_group(self, cases: Sequence[Case]) -> list[dict[str, str]]:
        """Time several impls of one size round-robin (see time_interleaved), append their rows."""
        t = self.timing
        all_times = time_interleaved(
            cases,
            warmup=int(t["warmup"]),
            repeats=int(t["repeats"]),
            min_repeats=int(t["min_repeats"]),
            max_seconds=t["max_seconds"],
        )
        return [self.record(c, ts) for c, ts in zip(cases, all_times)]

    def record(self, case: Case, times_s: Sequence[float]) -> dict[str, str]:
        """Turn per-call times (seconds) into a schema row, append it to the CSV."""
        dev = torch.device(case.device).type
        bw = self.read_bw_by_device.get(dev, self.read_bw_gbps if dev == "cpu" else None)
        row = make_row(case, times_s, read_bw_gbps=bw)
        append_rows(self.csv_path, [row])
        self.rows.append(row)
        self.log(
            f"  {case.kernel:<20} {case.impl:<16} {row['sizes']:<34} p50 {float(row['p50_ms']):10.3f} ms"
            f"  {float(row['gbps']):7.2f} GB/s  ({len(times_s)} calls)"
        )
        return row

    def fail(self, msg: str) -> None:
        """Note a problem (e.g. a kernel disagreeing with the reference); run.py exits non-zero."""
        self.failures.append(msg)
        self.log(f"  FAILED: {msg}")


def make_row(case: Case, times_s: Sequence[float], *, read_bw_gbps: float | None) -> dict[str, str]:
    if case.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {case.mode!r}")
    if not times_s:
        raise ValueError(f"{case.kernel}/{case.impl}: no timings")
    p20, p50, p80 = (percentile(times_s, q) for q in (20, 50, 80))
    gbps = case.bytes / p50 / 1e9 if p50 > 0 else float("nan")
    frac = gbps / read_bw_gbps if read_bw_gbps else float("nan")
    return {
        "kernel": case.kernel,
        "impl": case.impl,
        "mode": case.mode,
        "sizes": format_sizes(case.sizes),
        "p20_ms": f"{p20 * 1e3:.6g}",
        "p50_ms": f"{p50 * 1e3:.6g}",
        "p80_ms": f"{p80 * 1e3:.6g}",
        "bytes": str(int(case.bytes)),
        "gbps": f"{gbps:.6g}",
        "frac_read_bw": f"{frac:.4g}",
        "device": device_label(case.device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "cpu": cpu_model(),
        "threads": str(torch.get_num_threads()),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ----------------------------------------------------------------------------- CSV


def _check_header(path: Path, header: list[str]) -> None:
    if header != list(SCHEMA):
        raise ValueError(
            f"{path}: CSV header {header} does not match the benchmark schema {list(SCHEMA)}; "
            "move the old file away"
        )


def append_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, str]]) -> None:
    """Append rows (header first if the file is new), under an exclusive lock."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", newline="", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            first = f.readline()
            if first:
                _check_header(path, next(csv.reader([first])))
            f.seek(0, os.SEEK_END)
            w = csv.DictWriter(f, fieldnames=SCHEMA, extrasaction="raise")
            if not first:
                w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k, "") for k in SCHEMA})
            f.flush()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        r = csv.DictReader(f)
        if r.fieldnames is None:
            return []
        _check_header(path, list(r.fieldnames))
        return list(r)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_rows(path: str | os.PathLike, rows: Iterable[Mapping[str, str]]) -> None:
    """Replace the CSV with ``rows`` (atomic)."""
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SCHEMA)
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in SCHEMA})
    atomic_write_text(path, buf.getvalue())


def p50_by_size(rows: Iterable[Mapping[str, str]], kernel: str) -> dict[tuple[str, str], dict[str, float]]:
    """{(sizes, device): {impl: p50 ms}} of ``kernel``'s rows: what every module's summary compares."""
    by: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == kernel:
            by.setdefault((r["sizes"], r["device"]), {})[r["impl"]] = float(r["p50_ms"])
    return by


def latest_rows(rows: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    """One row per (kernel, impl, mode, sizes, device): the last one appended."""
    out: dict[tuple[str, ...], dict[str, str]] = {}
    for r in rows:
        key = (r["kernel"], r["impl"], r["mode"], r["sizes"], r["device"])
        out.pop(key, None)
        out[key] = dict(r)
    return list(out.values())


# ----------------------------------------------------------------------------- report


def _f(s: str) -> float:
    try:
        return float(s)
    except (TypeError, ValueError):
        return float("nan")


def _fmt_ms(v: float) -> str:
    if math.isnan(v):
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _fmt(v: float, spec: str, suffix: str = "") -> str:
    return "–" if math.isnan(v) or math.isinf(v) else f"{v:{spec}}{suffix}"


def default_baseline(impls: Sequence[str]) -> str | None:
    if "reference-loop" in impls:
        return "reference-loop"
    for i in impls:
        if i.startswith("reference"):
            return i
    return None


def _group(rows: Iterable[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    by_kernel: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_kernel.setdefault(r["kernel"], []).append(r)
    return by_kernel


def bandwidth_summary(rows: Iterable[Mapping[str, str]]) -> dict[str, float]:
    """{"read (best)": GB/s, "copy (p50)": GB/s, ...} from the bandwidth rows.

    The read row's frac_read_bw is its p50 GB/s over the best read GB/s of the
    run, so the best is recovered exactly as gbps / frac_read_bw.
    """
    out: dict[str, float] = {}
    for r in latest_rows(rows):
        if r["kernel"] != "bandwidth":
            continue
        gbps, frac = _f(r["gbps"]), _f(r["frac_read_bw"])
        tag = "" if r.get("device", "cpu") == "cpu" else f" [{r['device']}]"
        if r["impl"] == "read" and frac > 0:
            out[f"read{tag} (best)"] = gbps / frac
        out[f"{r['impl']}{tag} (p50)"] = gbps
    return out


def to_markdown(
    rows: Iterable[Mapping[str, str]],
    baselines: Mapping[str, str] | None = None,
    limits: Mapping[str, str] | None = None,
    runs: Mapping[str, Mapping[str, Any]] | None = None,
    notes: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Markdown tables, one per kernel, rows grouped per size.

    ``runs`` (from run_meta.json, see record_run) lists per kernel the exact
    command, wall time and machine load of the run that measured it; ``notes``
    maps kernel -> lines printed under its table (a module's summary(rows)).

    ``baselines`` maps kernel -> the impl every other impl's speed-up is
    measured against (default "reference-loop", else the first "reference*");
    ``limits`` maps kernel -> an impl that is the practical floor (e.g.
    "read-pass"): a column shows each impl's time as a multiple of it.
    """
    rows = latest_rows(rows)
    baselines = dict(baselines or {})
    limits = dict(limits or {})
    lines: list[str] = ["# Benchmark results", ""]
    if rows:
        r0 = rows[-1]
        stamps = sorted(r["timestamp"] for r in rows)
        lines.append(
            f"cpu: {r0['cpu']}; threads: {r0['threads']}; torch {r0['torch']}; triton {r0['triton']}; "
            f"measured {stamps[0]} .. {stamps[-1]}"
        )
        bw = bandwidth_summary(rows)
        if bw:
            lines.append(
                "measured bandwidth (best of the run): "
                + ", ".join(f"{k} {v:.2f} GB/s" for k, v in sorted(bw.items()))
            )
        lines.append("")
        lines.append(
            "p50 / p20..p80: per-call wall time in ms; GB/s = minimal bytes / p50; frac read bw = GB/s / best "
            "read bandwidth; speed-up = baseline p50 / impl p50 (same size, same process); "
            f"(noisy): p80 > {NOISY} x p20, i.e. other load disturbed the calls: read its ratios with care."
        )
        lines.append("")
    if runs:
        lines.append("Runs (exact command, wall time, 1-minute load average at start/end, commit of the checkout):")
        lines.append("")
        for kernel, m in sorted(runs.items()):
            load = "/".join(f"{v:.1f}" for v in (m.get("loadavg_start", [float("nan")])[0],
                                                  m.get("loadavg_end", [float("nan")])[0]))
            lines.append(
                f"- {kernel}: `{m.get('command', '?')}` — {m.get('wall_s', float('nan')):.0f} s, "
                f"load {load} on {m.get('cpus', '?')} CPUs, {m.get('threads', '?')} threads, commit "
                f"{m.get('git_commit', '?')}, _C sha1 {m.get('native_so_sha1', '?')}, {m.get('finished', '?')}"
            )
        lines.append("")
    for kernel, krows in _group(rows).items():
        impls = list(dict.fromkeys(r["impl"] for r in krows))
        base = baselines.get(kernel) or default_baseline(impls)
        limit = limits.get(kernel)
        title = f"## {kernel}"
        tags = []
        if base:
            tags.append(f"baseline: {base}")
        if limit:
            tags.append(f"limit: {limit}")
        lines.append(title + (f" ({'; '.join(tags)})" if tags else ""))
        lines.append("")
        head = ["sizes", "device", "impl", "mode", "p50 ms", "p20..p80 ms", "GB/s", "frac read bw"]
        if base:
            head.append(f"speed-up vs {base}")
        if limit:
            head.append(f"time / {limit}")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join("---" for _ in head) + "|")
        groups: dict[tuple[str, str, str], list[dict[str, str]]] = {}
        for r in krows:
            groups.setdefault((r["sizes"], r["device"], r["mode"]), []).append(r)
        for (sizes, device, mode), grows in groups.items():
            by_impl = {r["impl"]: r for r in grows}
            base_p50 = _f(by_impl[base]["p50_ms"]) if base in by_impl else float("nan")
            lim_p50 = _f(by_impl[limit]["p50_ms"]) if limit in by_impl else float("nan")
            for r in sorted(grows, key=lambda r: impls.index(r["impl"])):
                p20, p50, p80 = _f(r["p20_ms"]), _f(r["p50_ms"]), _f(r["p80_ms"])
                cells = [
                    f"`{sizes}`",
                    device,
                    r["impl"],
                    mode,
                    _fmt_ms(p50),
                    f"{_fmt_ms(p20)}..{_fmt_ms(p80)}" + (" (noisy)" if p80 > NOISY * p20 else ""),
                    _fmt(_f(r["gbps"]), ".2f"),
                    _fmt(_f(r["frac_read_bw"]), ".2f"),
                ]
                if base:
                    cells.append(_fmt(base_p50 / p50 if p50 > 0 else float("nan"), ".1f", "x"))
                if limit:
                    cells.append(_fmt(p50 / lim_p50 if lim_p50 > 0 else float("nan"), ".2f", "x"))
                lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for note in (notes or {}).get(kernel, ()):
            lines.append(f"- {note}")
        if (notes or {}).get(kernel):
            lines.append("")
    return "\n".join(lines)


def plot(rows: Iterable[Mapping[str, str]], out_dir: str | os.PathLike, skip: Sequence[str] = ("bandwidth",)) -> list[Path]:
    """One PNG per kernel: p50 time per impl per size (log scale), p20..p80 as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for kernel, krows in _group(latest_rows(rows)).items():
        if kernel in skip:
            continue
        xlabels = list(dict.fromkeys(f"{r['sizes']}" + ("" if r["mode"] == "full" else f" [{r['mode']}]")
                                     + ("" if r["device"] == "cpu" else f" [{r['device']}]") for r in krows))
        series: dict[str, dict[str, tuple[float, float, float]]] = {}
        for r in krows:
            x = f"{r['sizes']}" + ("" if r["mode"] == "full" else f" [{r['mode']}]") \
                + ("" if r["device"] == "cpu" else f" [{r['device']}]")
            series.setdefault(r["impl"], {})[x] = (_f(r["p20_ms"]), _f(r["p50_ms"]), _f(r["p80_ms"]))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(xlabels) + 3), 4.8))
        n = len(series)
        for j, (impl, pts) in enumerate(series.items()):
            xs, ys, lo, hi = [], [], [], []
            for i, lab in enumerate(xlabels):
                if lab in pts:
                    p20, p50, p80 = pts[lab]
                    xs.append(i + (j - (n - 1) / 2) * 0.06)
                    ys.append(p50)
                    lo.append(max(p50 - p20, 0.0))
                    hi.append(max(p80 - p50, 0.0))
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=impl)
        ax.set_yscale("log")
        ax.set_xticks(range(len(xlabels)))
        ax.set_xticklabels([lab.replace(";", "\n") if len(lab) > 24 else lab for lab in xlabels], fontsize=7)
        ax.set_ylabel("p50 time per call [ms] (log)")
        ax.set_title(f"{kernel}: time per implementation")
        ax.grid(True, which="both", axis="y", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{kernel}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


RUN_META = "run_meta.json"


def read_runs(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    path = Path(out_dir) / RUN_META
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record_run(out_dir: str | os.PathLike, kernels: Iterable[str], meta: Mapping[str, Any]) -> None:
    """Note in OUT/run_meta.json which run (command, wall time, load, commit) measured ``kernels``."""
    runs = read_runs(out_dir)
    for k in kernels:
        runs[k] = dict(meta)
    atomic_write_text(Path(out_dir) / RUN_META, json.dumps(runs, indent=1, sort_keys=True) + "\n")


def write_report(
    csv_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    baselines: Mapping[str, str] | None = None,
    limits: Mapping[str, str] | None = None,
    summaries: Mapping[str, Callable[[list[dict[str, str]]], list[str]]] | None = None,
) -> tuple[Path, str, list[Path]]:
    """results.md + one PNG per kernel from the CSV; returns (md path, markdown, PNG paths).

    ``summaries`` maps kernel -> summary(rows) (a module's optional hook); its
    lines go under the kernel's table.
    """
    rows = read_rows(csv_path)
    present = {r["kernel"] for r in rows}
    runs = {k: v for k, v in read_runs(out_dir).items() if k in present}
    latest = latest_rows(rows)
    notes: dict[str, list[str]] = {}
    for kernel, fn in (summaries or {}).items():
        krows = [r for r in latest if r["kernel"] == kernel]
        if krows:
            try:
                notes[kernel] = [str(line) for line in fn(krows)]
            except Exception as e:  # noqa: BLE001 - a summary must not break the report
                notes[kernel] = [f"summary() failed: {type(e).__name__}: {e}"]
    md = to_markdown(rows, baselines, limits, runs, notes)
    md_path = Path(out_dir) / "results.md"
    atomic_write_text(md_path, md + "\n")
    pngs = plot(rows, out_dir)
    return md_path, md, pngs
