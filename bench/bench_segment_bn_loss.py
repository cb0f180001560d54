"""Segmented BN-statistics matching loss (recover, many classes per forward pass), forward + backward.

One call = loss [S] = segment_bn_loss(x, segment_ids, target_mean, target_var),
then loss.sum().backward() into x.grad (mode "full"). Shapes (C, H, W) of BN
inputs for a class-wise recover batch of S classes x IPC images:

  r18-224   torchvision ResNet-18 at 224x224: 64@112, 64@56, 128@28, 256@14, 512@7
            (scaled down for the CPU: batch 10 classes x IPC 5 in full, x IPC 2 in quick)
Quick profile (< ~20 s): a subset (r18-224 64@112 and 512@7 at N=20, r18-64 128@32 at
N=100, convnet 128@28 N=100) without the slow reference-loop and torch-split.
  r18-64    ResNet-18 small-image variant (3x3 conv1, no maxpool) at 64x64:
            64@64, 128@32, 256@16, 512@8; 10 classes x IPC 10
  convnet   ConvNet (width 128) at 28x28: 128@28, 128@14, 128@7; N = 100 and 500
            (10 classes x IPC 10 / 50)

Samples are grouped by class (as the recover batch is built), segment ids
sorted. Implementations, in one process on the same tensors:

  reference-loop   plain torch per segment: boolean-mask gather, mean / biased
                   var over (N, H, W), the two norms; autograd backward (fp32)
  torch-split      plain torch per segment on contiguous slices (x.split by
                   counts: no gather); separate mean and var; autograd backward
  torch-var_mean   the project's baseline: per segment slice, torch.var_mean
                   (correction=0, one op for both moments) + the two norms;
                   autograd backward (the best case of a plain-torch loop)
  torch-index_add  vectorised plain torch, no loop: per-(sample, channel) sums of
                   x and x^2, index_add_ into [S, C] (counts by index_add too, not
                   bincount, whose output size depends on the data and breaks a
                   compiled graph), var = E[x^2] - mean^2; autograd. The strongest
                   plain strategy (per-segment var_mean via index_add)
  torch-index_add-compiled  torch.compile(torch-index_add's loss, dynamic=False),
                   inductor; backward outside it (AOTAutograd compiles it);
                   compiled in the check, before timing
  cpp              lpqld_fast.ops.segment_bn_loss(..., backend="cpp") (+ cuda /
                   triton on a GPU)
  cpp-compiled     the cpp op inside torch.compile(fullgraph=True, dynamic=False),
                   validate=False (the data checks read values back to the host;
                   ids and targets are checked once, eagerly, by the cpp row)
  read+write-pass  x.sum over space + one elementwise pass into a new grad-sized
                   tensor (allocated per call, as every impl allocates x.grad: on
                   this VM the page faults of a fresh 64 MB tensor cost about as
                   much as writing it): the memory-traffic floor of a fused fwd + bwd

Layout: NCHW rows at every shape; NHWC rows (sizes "layout=NHWC": x in
channels_last, what recover's CPU channels_last model hands the loss) at every
quick shape and at the r18-224 shapes in full. The plain strategies reduce over
the spatial dims of the 4-D tensor, which reads either layout in place.

bytes = 3 x x (read in the forward; read and write of grad in the backward).
Before timing, the fused and compiled impls are checked against torch-split (loss
and grad). No compiled rows in the tiny profile. The summary states cpp /
cpp-compiled against the faster of torch-index_add and torch-index_add-compiled
(named) and the CPU target (>= 1.5x it or >= 90% of read+write-pass).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from bench import compiled as cmp
from bench.common import BenchContext, Case, p50_by_size

KERNEL = "segment_bn_loss"
BASELINE = "torch-var_mean"  # plain torch autograd, per-segment var_mean + norms
LIMIT = "read+write-pass"
IMPLS = ("reference-loop", "torch-split", "torch-var_mean", "torch-index_add", "torch-index_add-compiled", "cpp",
         "cpp-compiled", "cuda", "triton", "read+write-pass")
PLAIN = ("torch-index_add", "torch-index_add-compiled")  # the strongest plain strategy, eager and compiled
OURS = ("cpp", "cpp-compiled", "cuda", "triton")
NUM_CLASSES = 10

# (family, C, H, W)
R18_224 = (("r18-224", 64, 112, 112), ("r18-224", 64, 56, 56), ("r18-224", 128, 28, 28),
           ("r18-224", 256, 14, 14), ("r18-224", 512, 7, 7))
R18_64 = (("r18-64", 64, 64, 64), ("r18-64", 128, 32, 32), ("r18-64", 256, 16, 16), ("r18-64", 512, 8, 8))
CONVNET = (("convnet", 128, 28, 28), ("convnet", 128, 14, 14), ("convnet", 128, 7, 7))


def problem_sizes(profile: str, batch: int | None = None) -> list[tuple[str, int, int, int, int]]:
    """[(family, N, C, H, W)] for a profile; ``batch`` overrides every N."""
    if profile == "tiny":
        out = [("r18-64", 4, 16, 8, 8), ("convnet", 6, 8, 7, 7)]
    elif profile == "quick":
        out = ([(f, 20, c, h, w) for f, c, h, w in R18_224[:1] + R18_224[4:]]
               + [(f, 100, c, h, w) for f, c, h, w in R18_64[1:2]]
               + [("convnet", 100, 128, 28, 28)])
    else:
        out = ([(f, 50, c, h, w) for f, c, h, w in R18_224]
               + [(f, 100, c, h, w) for f, c, h, w in R18_64]
               + [(f, n, c, h, w) for f, c, h, w in CONVNET for n in (100, 500)])
    if batch:
        out = [(f, batch, c, h, w) for f, _, c, h, w in out]
    return out


# ----------------------------------------------------------------------------- plain-torch implementations


def _norms(tm: torch.Tensor, tv: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(tm - mean, dim=-1) + torch.linalg.vector_norm(tv - var, dim=-1)


def reference_loop(x: torch.Tensor, seg: torch.Tensor, tm: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """Per segment present: boolean-mask gather, mean / biased var over (N, spatial), norms."""
    dims = (0,) + tuple(range(2, x.dim()))
    losses = torch.zeros(tm.shape[0], device=x.device)
    out = []
    for s in torch.unique(seg).tolist():
        xs = x[seg == s]
        out.append((s, _norms(tm[s], tv[s], xs.mean(dim=dims), xs.var(dim=dims, correction=0))))
    return losses.index_put((torch.tensor([s for s, _ in out], device=x.device),), torch.stack([v for _, v in out]))


def torch_split(x: torch.Tensor, counts: list[int], tm: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """Samples grouped by segment: one contiguous slice per segment, no gather."""
    dims = (0,) + tuple(range(2, x.dim()))
    out = []
    for s, xs in enumerate(x.split(counts)):
        if xs.shape[0] == 0:
            out.append(torch.zeros((), device=x.device))
        else:
            out.append(_norms(tm[s], tv[s], xs.mean(dim=dims), xs.var(dim=dims, correction=0)))
    return torch.stack(out)


def torch_var_mean(x: torch.Tensor, counts: list[int], tm: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """Per contiguous segment slice: torch.var_mean (biased) over (N, spatial), then the norms."""
    dims = (0,) + tuple(range(2, x.dim()))
    out = []
    for s, xs in enumerate(x.split(counts)):
        if xs.shape[0] == 0:
            out.append(torch.zeros((), device=x.device))
        else:
            var, mean = torch.var_mean(xs, dim=dims, correction=0)
            out.append(_norms(tm[s], tv[s], mean, var))
    return torch.stack(out)


def torch_index_add(x: torch.Tensor, seg: torch.Tensor, tm: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """Vectorised: index_add_ of per-(sample, channel) sums of x and x^2 (E[x^2] - mean^2: cancels for large means)."""
    n, c = x.shape[:2]
    dims = tuple(range(2, x.dim()))  # over the spatial dims of the 4-D tensor: either layout, read in place
    length = x[0, 0].numel()
    s = tm.shape[0]
    s1 = torch.zeros(s, c, device=x.device, dtype=x.dtype).index_add(0, seg, x.sum(dim=dims))
    s2 = torch.zeros(s, c, device=x.device, dtype=x.dtype).index_add(0, seg, x.square().sum(dim=dims))
    cnt = torch.zeros(s, device=x.device, dtype=x.dtype).index_add(0, seg, torch.ones(n, device=x.device,
                                                                                   dtype=x.dtype))[:, None] * length
    mean = s1 / cnt.clamp_min(1)
    var = s2 / cnt.clamp_min(1) - mean.square()
    return torch.where(cnt[:, 0] > 0, _norms(tm, tv, mean, var), 0.0)


def _cpp_loss(x: torch.Tensor, seg: torch.Tensor, tm: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    from lpqld_fast.ops import segment_bn_loss

    return segment_bn_loss(x, seg, tm, tv, backend="cpp", validate=False)


def compiled_impl(impl: str) -> Callable:
    """torch-index_add-compiled / cpp-compiled loss functions, one compiled object per process."""
    return cmp.compiled_once(KERNEL, impl, torch_index_add, _cpp_loss, "torch-index_add-compiled")


# ----------------------------------------------------------------------------- cases


def make_inputs(n: int, c: int, h: int, w: int, num_segments: int, device: str = "cpu", seed: int = 0,
                channels_last: bool = False):
    g = torch.Generator().manual_seed(seed * 7919 + n * 31 + c)
    x = torch.empty(n, c, h, w).normal_(mean=0.3, std=1.5, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seg = torch.arange(num_segments).repeat_interleave(-(-n // num_segments))[:n]  # grouped by class
    tm = 0.3 + 0.5 * torch.randn(num_segments, c, generator=g)
    tv = 2.25 * (1 + 0.5 * torch.rand(num_segments, c, generator=g))
    return x.to(device), seg.to(device), tm.to(device), tv.to(device)


def fused_backends(device: str) -> list[str]:
    from lpqld_fast.ops import available_backends
    from lpqld_fast.ops.segment_bn_loss import NATIVE_OP

    avail = available_backends(device, NATIVE_OP)
    if torch.device(device).type == "cpu":
        return [b for b in avail if b == "cpp"]  # Triton on CPU is the interpreter: not a benchmark
    return [b for b in avail if b in ("cuda", "triton")]


def _fwd_bwd(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def call() -> None:
        x.grad = None
        loss_fn(x).sum().backward()

    return call


QUICK_SKIP = ("reference-loop", "torch-split")  # the slowest loops: --quick keeps the baseline torch-var_mean


def build_cases(family: str, n: int, c: int, h: int, w: int, *, device: str = "cpu",
                num_segments: int = NUM_CLASSES, skip: tuple[str, ...] = (),
                compiled: bool = True, channels_last: bool = False) -> tuple[list[Case], dict[str, str]]:
    """All available impls for one shape, sharing one x; plus {impl: problem} of the check."""
    from lpqld_fast.ops import segment_bn_loss

    s = min(num_segments, n)
    x, seg, tm, tv = make_inputs(n, c, h, w, s, device, channels_last=channels_last)
    x.requires_grad_(True)
    counts = torch.bincount(seg, minlength=s).tolist()
    sizes = {"net": family, "N": n, "C": c, "H": h, "W": w, "S": s}
    if channels_last:
        sizes["layout"] = "NHWC"
    nbytes = 3 * x.numel() * x.element_size()
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "reference-loop": lambda t: reference_loop(t, seg, tm, tv),
        "torch-split": lambda t: torch_split(t, counts, tm, tv),
        "torch-var_mean": lambda t: torch_var_mean(t, counts, tm, tv),
        "torch-index_add": lambda t: torch_index_add(t, seg, tm, tv),
    }
    if compiled:
        fns["torch-index_add-compiled"] = lambda t: compiled_impl("torch-index_add-compiled")(t, seg, tm, tv)
    for b in fused_backends(device):
        fns[b] = lambda t, b=b: segment_bn_loss(t, seg, tm, tv, backend=b)
    if compiled and "cpp" in fns:
        fns["cpp-compiled"] = lambda t: compiled_impl("cpp-compiled")(t, seg, tm, tv)
    problems = check(x, fns, [b for b in fns if b in ("cpp", "cuda", "triton", "torch-index_add",
                                                      "torch-index_add-compiled", "cpp-compiled")])
    cases = [Case(KERNEL, impl, sizes, _fwd_bwd(fn, x), nbytes, device=device)
             for impl, fn in fns.items() if impl not in problems and impl not in skip]
    xd = x.detach()
    cases.append(Case(KERNEL, "read+write-pass", sizes,
                      lambda: (xd.sum(dim=(2, 3)), torch.mul(xd, 2.0)), nbytes, device=device))
    cases.sort(key=lambda cs: IMPLS.index(cs.impl))
    return cases, problems


def check(x: torch.Tensor, fns: dict[str, Callable], fused: list[str]) -> dict[str, str]:
    """{impl: problem} for fused impls whose loss or grad differ from torch-split."""

    def run(fn):
        x.grad = None
        loss = fn(x)
        loss.sum().backward()
        return loss.detach().double(), x.grad.double()

    want_loss, want_grad = run(fns["torch-split"])
    problems = {}
    for impl in fused:
        try:  # a compiled impl compiles here, before timing
            loss, grad = run(fns[impl])
        except Exception as e:  # noqa: BLE001 - a compile failure is reported, not timed
            problems[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        gscale = want_grad.abs().max().item()
        if not torch.allclose(loss, want_loss, rtol=1e-4, atol=1e-4 * (1 + want_loss.abs().max().item())):
            problems[impl] = f"loss differs from torch-split by up to {(loss - want_loss).abs().max().item():.3g}"
        elif not torch.allclose(grad, want_grad, rtol=0, atol=1e-3 * gscale):
            problems[impl] = f"grad differs from torch-split by up to {(grad - want_grad).abs().max().item():.3g}"
    x.grad = None
    return problems


# ----------------------------------------------------------------------------- run(ctx)


def run(ctx: BenchContext) -> None:
    batch = ctx.options.get("batch")
    shapes = problem_sizes(ctx.profile, int(batch) if batch else None)
    devices = ctx.devices()
    ctx.log(f"segment_bn_loss: fwd+bwd, {NUM_CLASSES} segments, shapes {shapes}; fused CPU backends "
            f"{fused_backends('cpu')}")
    first = len(ctx.rows)
    for device in devices:
        layouts = [(shape, False) for shape in shapes] + [
            (shape, True) for shape in shapes if ctx.profile != "full" or shape[0] == "r18-224"]
        for (family, n, c, h, w), nhwc in layouts:
            cases, problems = build_cases(family, n, c, h, w, device=device,
                                          skip=QUICK_SKIP if ctx.profile == "quick" else (),
                                          compiled=cmp.enabled(ctx.profile), channels_last=nhwc)
            for impl, msg in problems.items():
                ctx.fail(f"{KERNEL}/{impl} {family} N={n} C={c} H={h} W={w}{' NHWC' if nhwc else ''} on {device}: "
                         f"{msg}")
            ctx.time_group(cases)
            del cases
    for line in summary(ctx.rows[first:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    """Speed-ups of the fused impls over the loops, per shape (geometric mean at the end)."""
    import math

    by = p50_by_size(rows, KERNEL)
    out, logs = [], {}
    for (sizes, dev), t in by.items():
        for fused in OURS:
            if fused not in t:
                continue
            parts = []
            for base in ("torch-var_mean", "reference-loop", "torch-split", "torch-index_add",
                         "torch-index_add-compiled"):
                if base in t:
                    ratio = t[base] / t[fused]
                    logs.setdefault((fused, base), []).append(math.log(ratio))
                    parts.append(f"{ratio:.1f}x vs {base}")
            if LIMIT in t:
                parts.append(f"{t[fused] / t[LIMIT]:.2f}x the {LIMIT}")
            out.append(f"segment_bn_loss {fused} [{dev}] {sizes}: " + ", ".join(parts))
    for (fused, base), v in logs.items():
        out.append(f"segment_bn_loss {fused}: geometric-mean speed-up vs {base} {math.exp(sum(v) / len(v)):.1f}x "
                   f"over {len(v)} shapes")
    out += cmp.versus_strongest(rows, KERNEL, OURS, PLAIN, LIMIT)
    # Target: fused fwd+bwd >= 2x plain-torch var_mean autograd on the ResNet-18 BN shapes.
    for fused in ("cpp", "cuda", "triton"):
        r18 = [(sizes, t[BASELINE] / t[fused]) for (sizes, _), t in by.items()
               if fused in t and BASELINE in t and "net=r18" in sizes]
        if r18:
            worst = min(r18, key=lambda st: st[1])
            out.append(f"segment_bn_loss acceptance ({fused} >= 2x {BASELINE} on every ResNet-18 shape): "
                       f"{'met' if worst[1] >= 2 else 'NOT met'}, min {worst[1]:.1f}x at {worst[0]}, over {len(r18)} shapes")
    return out


# ----------------------------------------------------------------------------- pytest-benchmark
# `pytest bench/bench_segment_bn_loss.py` runs the same cases through the record_benchmark
# fixture of bench/conftest.py (LPQLD_BENCH_PROFILE, default quick; LPQLD_BENCH_BATCH).

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is a dev dependency
    pytest = None

_CACHE: dict[tuple, tuple[list[Case], dict[str, str]]] = {}


def _pytest_params() -> list:
    profile = os.environ.get("LPQLD_BENCH_PROFILE", "quick")
    batch = os.environ.get("LPQLD_BENCH_BATCH")
    return [
        pytest.param(shape, impl, id=f"{shape[0]}-N{shape[1]}-C{shape[2]}-{shape[3]}x{shape[4]}-{impl}")
        for shape in problem_sizes(profile, int(batch) if batch else None)
        for impl in IMPLS
        if impl not in ("cuda", "triton")
    ]


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_segment_bn_loss":
        metafunc.parametrize("shape,impl", _pytest_params())


if pytest is not None:

    def test_segment_bn_loss(record_benchmark, shape, impl):
        if shape not in _CACHE:
            _CACHE.clear()  # one shape's tensors alive at a time
            _CACHE[shape] = build_cases(*shape, compiled=cmp.enabled(os.environ.get("LPQLD_BENCH_PROFILE", "quick")))
        cases, problems = _CACHE[shape]
        if impl in problems:
            pytest.fail(f"{impl}: {problems[impl]}")
        by_impl = {cs.impl: cs for cs in cases}
        if impl not in by_impl:
            pytest.skip(f"{impl} is not available here")
        record_benchmark(by_impl[impl])
