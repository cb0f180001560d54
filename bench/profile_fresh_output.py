"""What a large soft_label_kl call costs beyond memory traffic: the fresh gradient's page faults.

    python -m bench.profile_fresh_output [--shape 1024 10450 200] [--threads 1 2]

Times, per thread count, the op's forward + backward (cpp, MR-k fp16), a copy of the logits into a *fresh*
tensor (``z * 1.0``: what returning a new gradient costs in memory), the same copy into a reused buffer
(``out.copy_(z)``: the traffic alone) and one read (``z.sum()``). Above glibc's largest mmap threshold (32 MiB)
every new tensor is freshly mapped and faulted in, so the first two include the page faults and the last two do
not. A diagnosis, printed, not recorded.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from bench.bench_soft_label_kl import T_S, T, make_inputs
from bench.common import percentile, time_callable
from lpqld_fast.ops import soft_label_kl
from lpqld_fast.runtime import tune_cpu_allocator


def p50_ms(fn: Callable[[], object], calls: int = 15) -> float:
    return percentile(time_callable(fn, warmup=3, repeats=calls), 50) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(1024, 10450, 200), metavar=("B", "C", "K"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    tune_cpu_allocator()
    inp = make_inputs(*args.shape, "mr-fp16")
    z, values, indices = inp["z"], inp["values"], inp["indices"]
    zd = z.detach()
    out = torch.empty_like(zd)
    rows = {
        "op fwd + bwd": lambda: torch.autograd.grad(
            soft_label_kl(z, values, indices, mode="mr", T=T, t_s=T_S, backend="cpp"), z),
        "copy into a fresh tensor": lambda: zd * 1.0,
        "copy into a reused buffer": lambda: out.copy_(zd),
        "one read": lambda: zd.sum(),
    }
    mb = zd.numel() * zd.element_size() / 2**20
    print(f"(B, C, k) = {tuple(args.shape)}: logits {mb:.1f} MiB; p50 per call")
    for th in args.threads:
        torch.set_num_threads(th)
        print(f"  {th} thread(s): " + ", ".join(f"{name} {p50_ms(fn):.2f} ms" for name, fn in rows.items()))


if __name__ == "__main__":
    main()
