"""Where a compiled soft_label_kl call spends its time: the op's kernel against torch.compile's own per-call work.

    python -m bench.profile_compiled_call [--shape 128 1000 100] [--threads 1] [--calls 200]

Times one forward + backward (``torch.autograd.grad``) per call, eager and compiled, for our op (cpp) and the
strongest plain strategy (KL over the k stored columns, ``bench_soft_label_kl.topk_kl_loss``), then profiles
the compiled op with ``torch.profiler`` and sums the self CPU time of its rows in three groups: our kernels
(``lpqld::*``), torch.compile's runtime (Dynamo's guard check, AOTAutograd's forward and backward wrappers,
the calls into the compiled graphs) and the rest (allocations, autograd engine). Numbers are per call. Not
part of ``bench.run``: a diagnosis, printed, not recorded.
"""
from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch

from bench.bench_soft_label_kl import T_S, T, make_inputs, topk_kl_loss
from bench.common import percentile, time_callable
from lpqld_fast.ops import soft_label_kl
from lpqld_fast.runtime import tune_cpu_allocator

RUNTIME_ROWS = ("Torch-Compiled Region", "TorchDynamo Cache Lookup", "CompiledFunction", "CompiledFunctionBackward",
                "AOTDispatcher", "Call CompiledFxGraph", "Pregraph bytecode")


def group_of(name: str) -> str:
    if name.startswith("lpqld::"):
        return "our kernels (lpqld::*)"
    if any(name.startswith(r) or r in name for r in RUNTIME_ROWS):
        return "torch.compile runtime"
    return "other (allocation, autograd engine, aten)"


def per_call_us(step: Callable[[], object], calls: int) -> float:
    return percentile(time_callable(step, warmup=20, repeats=calls), 50) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 1000, 100), metavar=("B", "C", "K"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args()
    tune_cpu_allocator()
    torch.set_num_threads(args.threads)
    b, c, k = args.shape
    inp = make_inputs(b, c, k, "mr-fp16")
    z, values, indices = inp["z"], inp["values"], inp["indices"]

    def ours(x: torch.Tensor) -> torch.Tensor:
        return soft_label_kl(x, values, indices, mode="mr", T=T, t_s=T_S, backend="cpp", validate=False)

    def plain(x: torch.Tensor) -> torch.Tensor:
        return topk_kl_loss(x, values, indices)

    def grad_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(z), z)

    compiled_ours = torch.compile(ours, fullgraph=True, dynamic=False)
    compiled_plain = torch.compile(plain, dynamic=False)
    rows = {"ours eager": grad_of(ours), "ours compiled": grad_of(compiled_ours),
            "plain (k columns) eager": grad_of(plain), "plain (k columns) compiled": grad_of(compiled_plain)}
    print(f"soft_label_kl fwd + bwd, (B, C, k) = ({b}, {c}, {k}), MR fp16, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    for name, step in rows.items():
        print(f"  {name:28s} {per_call_us(step, args.calls):9.1f} us / call (p50)")
    step = rows["ours compiled"]
    for _ in range(20):
        step()
    n = 100
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    groups: dict[str, float] = {}
    for ev in prof.key_averages():
        groups[group_of(ev.key)] = groups.get(group_of(ev.key), 0.0) + ev.self_cpu_time_total / n
    print(f"  ours compiled, profiled ({n} calls; the profiler adds its own time): self CPU per call")
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"    {name:44s} {us:9.1f} us")


if __name__ == "__main__":
    main()
