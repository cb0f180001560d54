"""A whole student training step (forward, soft-label loss, backward, optimizer step), our loss op against the
strongest plain-PyTorch loss, each eager and compiled.

The student is a 2-layer MLP head on fixed features, x [B, 512] -> Linear(512, 1024) -> ReLU ->
Linear(1024, C), the shape of a ResNet-18 student's classifier end on ImageNet-1K, so the loss's share of
the step is what it would be there; labels are stored MR-k (top-k teacher logits, fp16) with T = 4,
t_s = 0.8. One call = zero_grad, loss, backward, AdamW step (foreach, eager in every impl). Impls (each
with its own copy of the same initial student):
  torch-dense-step       the reference loop's loss (dense scatter of the top-k softmax, log_softmax,
                         KLDivLoss(batchmean)), eager
  torch-topk-step        the strongest plain loss: KL over the k stored columns plus the closed-form rest
                         (bench_soft_label_kl.topk_kl_loss), eager
  torch-topk-step-compiled  torch.compile(forward + that loss, dynamic=False); AOTAutograd compiles the
                         backward
  ours-step              forward + lpqld_fast.ops.soft_label_kl (the device's native backend: cpp on a CPU,
                         cuda on a GPU), eager
  ours-step-compiled     torch.compile(forward + our op, fullgraph=True, dynamic=False): the custom op traced
                         into the step's graph
  model-step             the same step with loss = logits.sum(): the model's own share, the floor of any loss
Before timing, each impl's loss and parameter gradients at the shared initial weights are checked against
torch-dense-step. Sizes (B, C, k): quick and full (128, 1000, 100) and (128, 10, 2); full adds
(256, 10450, 200); tiny (4, 10, 2). The summary states ours against the strongest plain step (eager or
compiled, named): the project's target is a compiled step with our op faster than the compiled plain step at
(128, 1000, 100).
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from bench import compiled as cmp
from bench.bench_soft_label_kl import T, T_S, make_inputs, topk_kl_loss
from bench.common import BenchContext, Case, p50_by_size

KERNEL = "student_step"
IMPLS = ("torch-dense-step", "torch-topk-step", "torch-topk-step-compiled", "ours-step", "ours-step-compiled",
         "model-step")
PLAIN = ("torch-topk-step", "torch-topk-step-compiled", "torch-dense-step")
OURS = ("ours-step", "ours-step-compiled")
FEATURES, HIDDEN = 512, 1024
TARGET = "B=128;C=1000;k=100"


def problem_grid(profile: str) -> list[tuple[int, int, int]]:
    if profile == "tiny":
        return [(4, 10, 2)]
    grid = [(128, 1000, 100), (128, 10, 2)]
    return grid + [(256, 10450, 200)] if profile == "full" else grid


def make_student(c: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, c))


def dense_loss(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    p_topk = torch.softmax(values.float() / T, dim=1)
    p = torch.zeros(z.shape, dtype=torch.float32, device=z.device).scatter_(1, indices.long(), p_topk)
    return nn.functional.kl_div(torch.log_softmax(z / T_S, dim=1), p, reduction="batchmean")


def ours_loss(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    from lpqld_fast.ops import soft_label_kl

    return soft_label_kl(z, values, indices, mode="mr", T=T, t_s=T_S, validate=False)


def topk_loss(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return topk_kl_loss(z, values, indices)


def sum_loss(z: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return z.sum()


LOSSES: dict[str, tuple[Callable, bool]] = {  # impl -> (loss, compiled)
    "torch-dense-step": (dense_loss, False), "torch-topk-step": (topk_loss, False),
    "torch-topk-step-compiled": (topk_loss, True), "ours-step": (ours_loss, False),
    "ours-step-compiled": (ours_loss, True), "model-step": (sum_loss, False),
}


def make_step(impl: str, student: nn.Module, x: torch.Tensor, values: torch.Tensor,
              indices: torch.Tensor) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """(loss_fn, step): ``loss_fn()`` the forward + loss, ``step()`` one whole training step."""
    loss, compiled = LOSSES[impl]

    def forward_loss(x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return loss(student(x), values, indices)

    fwd = cmp.compile_fn(forward_loss, fullgraph=impl.startswith("cpp")) if compiled else forward_loss
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, foreach=True)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = fwd(x, values, indices)
        out.backward()
        opt.step()
        return out

    return (lambda: fwd(x, values, indices)), step


def build_cases(b: int, c: int, k: int, compiled: bool = True,
                device: str = "cpu") -> tuple[list[Case], dict[str, str]]:
    inp = make_inputs(b, c, k, "mr-fp16", device)
    values, indices = inp["values"], inp["indices"]
    x = torch.randn(b, FEATURES, generator=torch.Generator().manual_seed(b * 31 + c)).to(device)
    base = make_student(c).to(device)
    sizes = {"B": b, "C": c, "k": k}
    params = sum(p.numel() for p in base.parameters())
    nbytes = 4 * (3 * params + 2 * b * c) + values.numel() * 2 + indices.numel() * indices.element_size()
    cases, problems = [], {}
    want: tuple[torch.Tensor, list[torch.Tensor]] | None = None
    for impl in IMPLS:
        if impl.endswith("-compiled") and not compiled:
            continue
        student = copy.deepcopy(base)
        loss_fn, step = make_step(impl, student, x, values, indices)
        if impl != "model-step":
            try:  # the first call compiles the compiled impls' forward and backward
                out = loss_fn()
                grads = torch.autograd.grad(out, list(student.parameters()))
            except Exception as e:  # noqa: BLE001 - a compile failure is reported, not timed
                problems[impl] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                continue
            if want is None:
                want = (out.detach(), [g.detach() for g in grads])
            else:
                dl = abs(float(out) - float(want[0]))
                dg = max(float((g - w).abs().max() / w.abs().max().clamp_min(1e-12)) for g, w in zip(grads, want[1]))
                if dl > 1e-4 * max(abs(float(want[0])), 1e-3) or dg > 1e-3:
                    problems[impl] = f"loss off by {dl:.3g}, gradients by up to {dg:.3g} (relative to their max)"
                    continue
        cases.append(Case(KERNEL, impl, sizes, step, nbytes, mode="full", device=device))
    return cases, problems


def run(ctx: BenchContext) -> None:
    grid = problem_grid(ctx.profile)
    ctx.log(f"student_step: (B, C, k) {grid}; MLP head {FEATURES}->{HIDDEN}->C, AdamW, MR-k fp16 labels")
    start = len(ctx.rows)
    for device in ctx.devices():
        for b, c, k in grid:
            cases, problems = build_cases(b, c, k, compiled=cmp.enabled(ctx.profile), device=device)
            for impl, msg in problems.items():
                ctx.fail(f"{KERNEL}/{impl} B={b} C={c} k={k} on {device}: {msg}")
            ctx.time_group(cases)
    for line in summary(ctx.rows[start:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    by = p50_by_size(rows, KERNEL)
    out = cmp.versus_strongest(rows, KERNEL, OURS, PLAIN)
    for (size, device), t in by.items():
        where = f"{size.replace(';', ' ')} on {device}"
        if size == TARGET and "ours-step-compiled" in t and "torch-topk-step-compiled" in t:
            r = t["torch-topk-step-compiled"] / t["ours-step-compiled"]
            out.append(f"ours-step-compiled vs torch-topk-step-compiled at {where}: {r:.2f}x "
                       f"(target: faster, {'met' if r > 1 else 'NOT met'})")
        if "model-step" in t and "ours-step" in t:
            out.append(f"at {where} the model's own step is {t['model-step'] / t['ours-step']:.0%} of ours-step")
    return out
