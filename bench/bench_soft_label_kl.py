"""Soft-label KL loss (train stage), forward + backward ("full"), at the preset sizes.

Student logits z [B, C] float32 and stored top-k soft labels (LPQLD MR-k:
top-k teacher logits + class indices), fp16 values ("mr-fp16") or int8 values
with a per-row scale/offset ("mr-int8"); T = 4, t_s = 0.8. Implementations,
side by side in one process on the same tensors, each computing the loss and
d(loss)/d(z):

  reference   the reference strategy in plain torch: decode to a dense [B, C]
              teacher (dequantise, softmax over k at T, scatter into zeros),
              log_softmax(z / t_s), nn.KLDivLoss(reduction="batchmean"),
              backward by autograd
  cpp         lpqld_fast.ops.soft_label_kl(..., backend="cpp") + backward: the
              fused kernel (loss and gradient in one pass, no dense teacher;
              it checks the labels as it reads them: index range, a class twice
              in a row, finiteness)
  copy-pass   grad.copy_(z): read the logits once and write a [B, C] result
              once, the practical floor of any op that returns the gradient
  cuda / triton, and the torch impls on the GPU, when a GPU is present (with
              the op's default validation: a sort of the [B, k] indices and one
              sync before the launch)

bytes (the op's minimal traffic) = read z + write grad + the stored labels
(values, indices, scale/offset). Sizes: C in {10, 200, 1000, 10450},
k in {10, 100} (k <= C), B in {32, 128, 256} (full); quick: B = 128,
C in {10, 1000, 10450}, k in {10, 100}; tiny: B = 4, C = 10.
Before timing, every fused impl is checked against the reference on the same
inputs (an impl that disagrees is reported as a failure and not timed).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch

from bench.common import BenchContext, Case

KERNEL = "soft_label_kl"
BASELINE = "reference"
LIMIT = "copy-pass"
IMPLS = ("reference", "cpp", "cuda", "triton", "copy-pass")
LABELS = ("mr-fp16", "mr-int8")
T, T_S = 4.0, 0.8


def problem_grid(profile: str, batch: int | None = None) -> list[tuple[int, int, int]]:
    """(B, C, k) triples for a profile."""
    if profile == "tiny":
        bs, cs, ks = (4,), (10,), (10,)
    elif profile == "quick":
        bs, cs, ks = (128,), (10, 1000, 10450), (10, 100)
    else:
        bs, cs, ks = (32, 128, 256), (10, 200, 1000, 10450), (10, 100)
    if batch:
        bs = (batch,)
    return [(b, c, k) for b in bs for c in cs for k in ks if k <= c]


# ----------------------------------------------------------------------------- inputs and impls


def make_inputs(b: int, c: int, k: int, labels: str, device: str = "cpu", seed: int = 0) -> dict:
    """Student logits and stored MR-k labels of a random teacher (fp16 or int8 values)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + b * 7919 + c * 31 + k)
    teacher = torch.randn(b, c, generator=g) * 4
    z = torch.randn(b, c, generator=g) * 4
    top = teacher.topk(k, dim=1)
    kw: dict = {"mode": "mr", "indices": top.indices.to(torch.int16 if c < 2**15 else torch.int32)}
    if labels == "mr-int8":
        v = top.values.double()
        lo, hi = v.min(dim=1).values, v.max(dim=1).values
        scale = ((hi - lo) / 255).clamp_min(1e-8)
        offset = lo + 128 * scale
        kw["values"] = torch.round((v - offset[:, None]) / scale[:, None]).clamp(-128, 127).to(torch.int8)
        kw["scale"], kw["offset"] = scale.float(), offset.float()
    elif labels == "mr-fp16":
        kw["values"] = top.values.half()
    else:
        raise ValueError(f"labels must be one of {LABELS}, got {labels!r}")
    out = {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in kw.items()}
    out["z"] = z.to(device).requires_grad_(True)
    return out


def label_bytes(inp: dict) -> int:
    return sum(inp[n].numel() * inp[n].element_size() for n in ("values", "indices", "scale", "offset") if n in inp)


def reference_strategy(inp: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode + log_softmax + nn.KLDivLoss(batchmean), gradient by autograd."""
    from lpqld_fast.ops.reference import soft_label_kl as ref

    z = inp["z"]
    p = ref.decode_teacher(inp["values"], inp["indices"], mode="mr", num_classes=z.shape[1], T=T,
                           scale=inp.get("scale"), offset=inp.get("offset"))
    loss = ref.reference_strategy_loss(z, p, T_S)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def fused(inp: dict, backend: str, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    from lpqld_fast.ops import soft_label_kl

    z = inp["z"]
    loss = soft_label_kl(z, inp["values"], inp["indices"], mode="mr", T=T, t_s=T_S, scale=inp.get("scale"),
                         offset=inp.get("offset"), backend=backend, validate=validate)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


def fused_backends(device: str) -> list[str]:
    from lpqld_fast.ops import available_backends

    dev = torch.device(device)
    avail = available_backends(dev, "soft_label_kl_fwd")
    have_op = hasattr(torch.ops, "lpqld") and hasattr(torch.ops.lpqld, "soft_label_kl_fwd")
    out = []
    if dev.type == "cpu" and "cpp" in avail and have_op:
        out.append("cpp")
    if dev.type == "cuda" and "cuda" in avail and have_op:
        out.append("cuda")
    if dev.type == "cuda" and "triton" in avail:
        out.append("triton")
    return out


def check(inp: dict, impls: list[str]) -> dict[str, str]:
    """{impl: problem} for fused impls whose loss or gradient differ from the reference strategy."""
    want_loss, want_grad = reference_strategy(inp)
    gmax = float(want_grad.abs().max())
    problems = {}
    for impl in impls:
        loss, grad = fused(inp, impl)
        dl = abs(float(loss) - float(want_loss))
        dg = float((grad.float() - want_grad).abs().max())
        if dl > 1e-4 * max(abs(float(want_loss)), 1e-3) or dg > 1e-4 * gmax + 1e-9:
            problems[impl] = f"loss off by {dl:.3g}, gradient by up to {dg:.3g} (max |grad| {gmax:.3g})"
    return problems


def build_cases(b: int, c: int, k: int, labels: str, device: str = "cpu") -> tuple[dict[str, Case], dict[str, str]]:
    inp = make_inputs(b, c, k, labels, device)
    z = inp["z"]
    sizes = {"B": b, "C": c, "k": k, "labels": labels}
    zbytes = z.numel() * z.element_size()
    op_bytes = 2 * zbytes + label_bytes(inp)
    cases: dict[str, Case] = {}

    def add(impl: str, fn: Callable[[], object], nbytes: int = op_bytes) -> None:
        cases[impl] = Case(KERNEL, impl, sizes, fn, nbytes, mode="full", device=device)

    add("reference", lambda: reference_strategy(inp))
    native = fused_backends(device)
    for backend in native:
        add(backend, lambda be=backend: fused(inp, be))
    out = torch.empty_like(z, requires_grad=False)
    zd = z.detach()
    add("copy-pass", lambda: out.copy_(zd), 2 * zbytes)
    problems = check(inp, native)
    for impl in problems:
        cases.pop(impl, None)
    return dict(sorted(cases.items(), key=lambda kv: IMPLS.index(kv[0]))), problems


# ----------------------------------------------------------------------------- run(ctx)


def run(ctx: BenchContext) -> None:
    grid = problem_grid(ctx.profile, ctx.options.get("batch"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ctx.log(f"soft_label_kl: (B, C, k) {grid}, labels {LABELS}; fused CPU backends {fused_backends('cpu')}")
    if not fused_backends("cpu"):
        ctx.log("soft_label_kl: torch.ops.lpqld.soft_label_kl_fwd missing: cpp rows skipped; "
                "build with scripts/build_ext.sh")
    start = len(ctx.rows)
    for device in devices:
        for b, c, k in grid:
            for labels in LABELS:
                cases, problems = build_cases(b, c, k, labels, device)
                for impl, msg in problems.items():
                    ctx.fail(f"{KERNEL}/{impl} B={b} C={c} k={k} {labels} on {device}: {msg}")
                ctx.time_group(list(cases.values()))
    for line in summary(ctx.rows[start:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    """Speed-up of the fused kernel over the reference strategy, and its distance from copy-pass."""
    by_size: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == KERNEL:
            by_size.setdefault((r["sizes"], r["device"]), {})[r["impl"]] = float(r["p50_ms"])
    out = []
    for fast in ("cpp", "cuda", "triton"):
        ratios = [(t["reference"] / t[fast], s) for (s, _d), t in by_size.items() if fast in t and "reference" in t]
        floors = [(t[fast] / t["copy-pass"], s) for (s, _d), t in by_size.items() if fast in t and "copy-pass" in t]
        if ratios:
            lo, hi = min(ratios), max(ratios)
            out.append(f"soft_label_kl: {fast} vs reference strategy: {lo[0]:.1f}x ({lo[1]}) .. {hi[0]:.1f}x ({hi[1]})")
        if floors:
            worst = max(floors)
            out.append(f"soft_label_kl: {fast} / copy-pass worst {worst[0]:.2f}x ({worst[1]})")
    return out or ["soft_label_kl: no fused rows (kernel not built)"]


# ----------------------------------------------------------------------------- pytest-benchmark
# `pytest bench/bench_soft_label_kl.py` runs the same cases through the
# record_benchmark fixture of bench/conftest.py (profile from LPQLD_BENCH_PROFILE,
# default quick; LPQLD_BENCH_BATCH overrides the batch).

try:
    import pytest
except ImportError:  # pragma: no cover - pytest is a dev dependency
    pytest = None

_CACHE: dict[tuple, tuple[dict[str, Case], dict[str, str]]] = {}


def _pytest_params() -> list:
    profile = os.environ.get("LPQLD_BENCH_PROFILE", "quick")
    batch = int(os.environ["LPQLD_BENCH_BATCH"]) if os.environ.get("LPQLD_BENCH_BATCH") else None
    return [
        pytest.param((b, c, k), labels, impl, id=f"B{b}-C{c}-k{k}-{labels}-{impl}")
        for b, c, k in problem_grid(profile, batch)
        for labels in LABELS
        for impl in IMPLS
        if impl not in ("cuda", "triton")
    ]


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ == "test_soft_label_kl":
        metafunc.parametrize("shape,labels,impl", _pytest_params())


if pytest is not None:

    def test_soft_label_kl(record_benchmark, shape, labels, impl):
        key = (shape, labels)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = build_cases(*shape, labels)
        cases, problems = _CACHE[key]
        if impl in problems:
            pytest.fail(f"{impl}: {problems[impl]}")
        if impl not in cases:
            pytest.skip(f"{impl} is not available here")
        record_benchmark(cases[impl])
