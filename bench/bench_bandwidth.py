"""Memory bandwidth of this machine, measured in the same run as the kernels.

Two rows, kernel "bandwidth":
  read  x.sum() over a float32 buffer much larger than the last-level cache;
        bytes = the buffer (one read)
  copy  y.copy_(x); bytes = 2 * the buffer (one read + one write; write-allocate
        traffic is not counted)
The best read GB/s (fastest call) becomes ctx.read_bw_gbps, the denominator of
every later row's frac_read_bw. The buffer is max(256 MiB, 4 x LLC) (2 x LLC in
quick), capped at 2 GiB; ctx.options["bw_bytes"] overrides it (tests use a tiny one).
With a CUDA device among ctx.devices(), the same two rows on the GPU (a 2 GiB
buffer, far beyond its L2): their best read GB/s is ctx.read_bw_by_device["cuda"],
the denominator of the GPU rows' frac_read_bw.
"""
from __future__ import annotations

import torch

from bench.common import BenchContext, Case, last_level_cache_bytes, time_callable

KERNEL = "bandwidth"


def buffer_bytes(ctx: BenchContext) -> int:
    if ctx.options.get("bw_bytes"):
        return int(ctx.options["bw_bytes"])
    llc_multiple = 4 if ctx.profile == "full" else 2  # quick: smaller, still well beyond the LLC
    return int(min(max(256 << 20, llc_multiple * last_level_cache_bytes()), 2 << 30))


def run(ctx: BenchContext) -> None:
    devices = ctx.devices()
    if "cpu" in devices:
        run_cpu(ctx)
    if "cuda" in devices:
        run_cuda(ctx)


def run_cuda(ctx: BenchContext) -> None:
    nbytes = int(ctx.options["bw_bytes"]) if ctx.options.get("bw_bytes") else 2 << 30
    n = nbytes // 4
    x = torch.ones(n, dtype=torch.float32, device="cuda")
    y = torch.zeros_like(x)
    sizes = {"MiB": round(n * 4 / 2**20), "dtype": "float32"}
    reps = {"full": 20, "quick": 5}.get(ctx.profile, 2)
    read_times = time_callable(x.sum, warmup=2, repeats=reps, min_repeats=reps, device="cuda")
    ctx.read_bw_by_device["cuda"] = n * 4 / min(read_times) / 1e9
    ctx.record(Case(KERNEL, "read", sizes, x.sum, bytes=n * 4, device="cuda"), read_times)
    copy_times = time_callable(lambda: y.copy_(x), warmup=2, repeats=reps, min_repeats=reps, device="cuda")
    ctx.record(Case(KERNEL, "copy", sizes, lambda: y.copy_(x), bytes=2 * n * 4, device="cuda"), copy_times)
    ctx.log(f"bandwidth [cuda]: read {ctx.read_bw_by_device['cuda']:.0f} GB/s (best), "
            f"copy {2 * n * 4 / min(copy_times) / 1e9:.0f} GB/s (best, read+write)")
    del x, y
    torch.cuda.empty_cache()


def run_cpu(ctx: BenchContext) -> None:
    nbytes = buffer_bytes(ctx)
    n = nbytes // 4
    x = torch.ones(n, dtype=torch.float32)  # written once: pages are mapped before timing
    y = torch.zeros_like(x)
    sizes = {"MiB": round(n * 4 / 2**20), "dtype": "float32"}
    # Timing knobs: enough calls that "best" means something, without a long run.
    reps = {"full": 10, "quick": 5}.get(ctx.profile, 2)
    ctx.log(f"bandwidth: buffer {n * 4 / 2**20:.0f} MiB (LLC {last_level_cache_bytes() / 2**20:.0f} MiB)")

    read_times = time_callable(x.sum, warmup=1, repeats=reps, min_repeats=reps)
    ctx.read_bw_gbps = n * 4 / min(read_times) / 1e9
    ctx.read_bw_by_device["cpu"] = ctx.read_bw_gbps
    ctx.record(Case(KERNEL, "read", sizes, x.sum, bytes=n * 4), read_times)

    copy_times = time_callable(lambda: y.copy_(x), warmup=1, repeats=reps, min_repeats=reps)
    ctx.copy_bw_gbps = 2 * n * 4 / min(copy_times) / 1e9
    ctx.record(Case(KERNEL, "copy", sizes, lambda: y.copy_(x), bytes=2 * n * 4), copy_times)
    ctx.log(f"bandwidth: read {ctx.read_bw_gbps:.2f} GB/s (best), copy {ctx.copy_bw_gbps:.2f} GB/s (best, read+write)")
