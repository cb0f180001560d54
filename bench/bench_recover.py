"""Recover throughput: many classes per forward pass vs one class per pass (image-iterations per second).

One call = ``iters`` recover iterations over all S x IPC images (S classes, IPC
images each; the teacher in eval mode, random weights, synthetic class-wise BN
targets: the cost does not depend on their values). Implementations, in one
process, same teacher and targets, timed round-robin:

  reference-loop          plain-torch re-creation of the reference strategy, one class per
                          pass: torch.roll jitter, torchvision RandomResizedCrop + flip on the
                          class batch, BN forward hooks with mean / permute-contiguous var and
                          torch.norm, autograd, Adam(0.5, 0.9), cosine lr, clip
  one-class-per-pass      lpqld_fast.recover.synthesize_units called once per class
                          (fused ops: crop_resize_flip, batched_roll, bn_eval_segment_loss =
                          eval BN + ReLU + 2x2 pool + segment_bn_loss per ConvNet block, the
                          thin first conv's image gradient as GEMM + col2im)
  many-classes-per-pass   synthesize_units with all S classes in one pass (what recover does)
  *-bf16-nhwc             the same two with recover.bf16 + recover.channels_last (bf16 autocast,
                          NHWC teacher; images, Adam and losses fp32), as the CPU preset runs

Sizes (IPC 10 everywhere; Fashion-MNIST image shape 1x28x28):

  full    convnet-bn (width 128, depth 3) S=10, 3 iterations per call;
          resnet18-small S=10, 1 iteration per call
  quick   convnet-bn S=10, 1 iteration; resnet18-small S=2, 1 iteration; no reference-loop
          (the module stays under ~20 s)
  tiny    S=2, IPC 2, 1 iteration: machinery only
  cuda    (when a GPU is among ctx.devices()) the same two nets, S=10, IPC 10, 20 iterations per
          call (launch-bound there: per-pass costs are what many classes per pass amortise)

image-iterations/s = S x IPC x iters / p50; the summary prints them and the
ratios. bytes: the images (4 bytes per pixel, x read + written per iteration),
only so the schema's GB/s column is defined; this stage is compute bound.
Before timing (not in --quick), many-classes-per-pass is checked against
one-class-per-pass (images equal within 1e-3 = 1% of lr: the equivalence
recover relies on, up to float rounding amplified by Adam's first steps).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from bench.common import BenchContext, Case, parse_sizes
from lpqld_fast.runtime import full_fp32

KERNEL = "recover"
BASELINE = "one-class-per-pass"
IMPLS = ("reference-loop", "one-class-per-pass", "many-classes-per-pass", "one-class-bf16-nhwc",
         "many-classes-bf16-nhwc")
FAST = {"bf16": True, "channels_last": True}  # what the fashion-mnist preset runs
SHAPE = (1, 28, 28)  # Fashion-MNIST
CFG: dict[str, Any] = {"lr": 0.1, "r_bn": 0.05, "jitter": 2, "first_bn_mult": 10.0, "checkpoint_every": 0}


def problem_sizes(profile: str) -> list[dict[str, Any]]:
    """[{net, S, ipc, iters, reference}] for a profile."""
    if profile == "tiny":
        return [{"net": n, "S": 2, "ipc": 2, "iters": 1, "reference": True} for n in ("convnet-bn", "resnet18-small")]
    if profile == "quick":
        return [{"net": "convnet-bn", "S": 10, "ipc": 10, "iters": 1, "reference": False},
                {"net": "resnet18-small", "S": 2, "ipc": 10, "iters": 1, "reference": False}]
    return [{"net": "convnet-bn", "S": 10, "ipc": 10, "iters": 3, "reference": True},
            {"net": "resnet18-small", "S": 10, "ipc": 10, "iters": 1, "reference": True}]


def gpu_sizes(profile: str) -> list[dict[str, Any]]:
    """[{net, S, ipc, iters, reference}] on a CUDA device."""
    if profile == "tiny":
        return problem_sizes("tiny")
    iters = 20 if profile == "full" else 5
    return [{"net": n, "S": 10, "ipc": 10, "iters": iters, "reference": profile == "full"}
            for n in ("convnet-bn", "resnet18-small")]


def make_teacher(net: str, num_classes: int, seed: int = 0,
                 device: str = "cpu") -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Random-weight teacher in eval mode (no parameter grads) and synthetic class-wise BN targets."""
    from lpqld_fast.bn_stats import bn_layers
    from lpqld_fast.models import get_model

    torch.manual_seed(seed)
    model = get_model(net, num_classes=num_classes, in_chans=SHAPE[0], image_size=SHAPE[1]).eval()
    g = torch.Generator().manual_seed(seed + 1)
    targets = []
    for _, bn in bn_layers(model):
        bn.running_mean.normal_(0, 0.1, generator=g)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
        targets.append((0.1 * torch.randn(num_classes, bn.num_features, generator=g),
                        0.5 + torch.rand(num_classes, bn.num_features, generator=g)))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device), [(m.to(device), v.to(device)) for m, v in targets]


# ----------------------------------------------------------------------------- the reference strategy


def reference_class_pass(teacher: torch.nn.Module, cls: int, ipc: int, targets: list[tuple[torch.Tensor, torch.Tensor]],
                         cfg: dict[str, Any], iters: int, mean: torch.Tensor, std: torch.Tensor,
                         seed: int) -> torch.Tensor:
    """One class's recover as the reference code does it (plain torch, hooks, torchvision augmentation)."""
    from torchvision import transforms

    g = torch.Generator().manual_seed(seed * 1000 + cls)
    c, h, w = SHAPE
    device = next(teacher.parameters()).device
    mean, std = mean.to(device), std.to(device)
    x = torch.randn(ipc, c, h, w, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg["lr"], betas=(0.5, 0.9), eps=1e-8)
    aug = transforms.Compose([transforms.RandomResizedCrop(h, scale=(0.08, 1.0)), transforms.RandomHorizontalFlip()])
    lo = ((0.0 - mean) / std).view(1, -1, 1, 1)
    hi = ((1.0 - mean) / std).view(1, -1, 1, 1)
    losses: list[torch.Tensor] = []

    def hook_for(tm: torch.Tensor, tv: torch.Tensor):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inp = inputs[0]
            nch = inp.shape[1]
            mu = inp.mean([0, 2, 3])
            var = inp.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
            losses.append(torch.norm(tv - var, 2) + torch.norm(tm - mu, 2))
        return hook

    from lpqld_fast.bn_stats import bn_layers

    handles = [m.register_forward_hook(hook_for(tm[cls], tv[cls])) for (_, m), (tm, tv) in zip(bn_layers(teacher), targets)]
    labels = torch.full((ipc,), cls, dtype=torch.int64, device=device)
    jitter = int(cfg["jitter"])
    try:
        for it in range(iters):
            for group in opt.param_groups:
                group["lr"] = 0.5 * cfg["lr"] * (1 + math.cos(math.pi * it / iters))
            dy, dx = (int(v) for v in torch.randint(0, jitter + 1, (2,), generator=g))
            xa = aug(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
            losses.clear()
            logits = teacher(xa)
            loss_bn = sum((cfg["first_bn_mult"] if i == 0 else 1.0) * v for i, v in enumerate(losses))
            loss = torch.nn.functional.cross_entropy(logits, labels) + cfg["r_bn"] * loss_bn
            opt.zero_grad()
            loss.backward()
            opt.step()
            x.data = torch.max(torch.min(x.data, hi), lo)
    finally:
        for hd in handles:
            hd.remove()
    return x.detach()


# ----------------------------------------------------------------------------- cases


def build_cases(net: str, s: int, ipc: int, iters: int, reference: bool = True,
                check: bool = True, device: str = "cpu") -> tuple[list[Case], list[str]]:
    """The impls for one (net, S, IPC, iters), sharing teacher and targets; plus problems found by the check."""
    from lpqld_fast.recover import make_units, synthesize_units

    teacher, targets = make_teacher(net, s, device=device)
    mean, std = torch.tensor([0.2860]), torch.tensor([0.3530])  # Fashion-MNIST
    units = make_units(s, ipc, classwise_batching=True)
    cfg = {**CFG, "iterations": iters}

    def many(c: dict[str, Any] = cfg) -> torch.Tensor:
        return synthesize_units(teacher, units, targets, c, SHAPE, mean, std, seed=0, device=device,
                                progress=False)

    def one(c: dict[str, Any] = cfg) -> torch.Tensor:
        return torch.cat([synthesize_units(teacher, [u], targets, c, SHAPE, mean, std, seed=0, device=device,
                                           progress=False)
                          for u in units])

    teacher_fast = copy.deepcopy(teacher)  # channels_last converts the module in place
    cfg_fast = {**cfg, **FAST}

    def many_fast() -> torch.Tensor:
        return synthesize_units(teacher_fast, units, targets, cfg_fast, SHAPE, mean, std, seed=0, device=device,
                                progress=False)

    def one_fast() -> torch.Tensor:
        return torch.cat([synthesize_units(teacher_fast, [u], targets, cfg_fast, SHAPE, mean, std, seed=0,
                                           device=device, progress=False) for u in units])

    def ref() -> torch.Tensor:
        return torch.cat([reference_class_pass(teacher, c, ipc, targets, cfg, iters, mean, std, seed=0)
                          for c in range(s)])

    problems = []
    if check:
        # Float rounding differs between batch sizes, and Adam's first steps (update ~ lr * g / |g|) amplify it
        # for near-zero gradients: 1e-3 (1% of lr) tolerates that, a wrong segment or draw is O(lr).
        # Checked over at most 3 iterations with TF32 off (on a GPU): the first GPU run compared 20-iteration
        # passes with cuDNN's default TF32 convolutions, whose 10-bit-mantissa rounding differs between batch
        # sizes and which Adam amplified to 0.08 (ConvNet) / 0.64 (ResNet-18) after 20 steps.
        check_cfg = {**cfg, "iterations": min(iters, 3)}
        with full_fp32():
            a, b = many(check_cfg), one(check_cfg)
        err = (a - b).abs().max().item()
        if not err <= 1e-3:
            problems.append(f"many-classes-per-pass differs from one-class-per-pass by {err:.3g} (> 1e-3)")
    sizes = {"net": net, "img": "x".join(map(str, SHAPE)), "S": s, "IPC": ipc, "iters": iters}
    nbytes = 2 * s * ipc * math.prod(SHAPE) * 4 * iters
    fns: dict[str, Callable[[], Any]] = {"one-class-per-pass": one, "many-classes-per-pass": many,
                                         "one-class-bf16-nhwc": one_fast, "many-classes-bf16-nhwc": many_fast}
    if reference:
        fns["reference-loop"] = ref
    cases = [Case(KERNEL, impl, sizes, fns[impl], nbytes, device=device) for impl in IMPLS if impl in fns]
    return cases, problems


def run(ctx: BenchContext) -> None:
    first = len(ctx.rows)
    for device in ctx.devices():
        sizes = problem_sizes(ctx.profile) if device == "cpu" else gpu_sizes(ctx.profile)
        ctx.log(f"recover [{device}]: image-iterations/s, IPC x S images, image {SHAPE}, sizes {sizes}")
        for p in sizes:
            # The equivalence check costs two more calls: skipped in --quick (tests/test_recover.py proves it).
            cases, problems = build_cases(p["net"], p["S"], p["ipc"], p["iters"], p["reference"],
                                          check=ctx.profile != "quick", device=device)
            for msg in problems:
                ctx.fail(f"{KERNEL} {p['net']} S={p['S']} on {device}: {msg}")
            ctx.time_group(cases)
    for line in summary(ctx.rows[first:]):
        ctx.log(line)


def summary(rows: list[dict[str, str]]) -> list[str]:
    """Image-iterations/s per impl and the speed-ups of many-classes-per-pass, per size."""
    by: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["kernel"] == KERNEL:
            by.setdefault((r["sizes"], r["device"]), {})[r["impl"]] = float(r["p50_ms"]) / 1e3
    out = []
    for (sizes, dev), t in by.items():
        p = parse_sizes(sizes)
        work = int(p["S"]) * int(p["IPC"]) * int(p["iters"])
        rates = ", ".join(f"{impl} {work / t[impl]:.1f}" for impl in IMPLS if impl in t)
        line = f"recover [{dev}] {sizes}: image-iterations/s {rates}"
        for fast in ("many-classes-per-pass", "many-classes-bf16-nhwc"):
            if fast not in t:
                continue
            for base in ("one-class-per-pass", "reference-loop", "one-class-bf16-nhwc"):
                if base in t and base != fast:
                    line += f"; {fast} {t[base] / t[fast]:.2f}x vs {base}"
        out.append(line)
    return out
