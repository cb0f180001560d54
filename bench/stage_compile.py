"""The stages' per-step functions eager vs torch.compile (vs CUDA graphs on a GPU): what ``<stage>.compile=auto``
is chosen from.

    python -m bench.stage_compile                       # CPU: eager and compile, the three stage steps
    python -m bench.stage_compile --device cuda --out gpu_out/bench/stage_compile.csv   # + cudagraphs

One step per stage at the fashion-mnist preset's shapes, each timed as the stage runs it (the compiled part is
the function the stage hands to ``lpqld_fast.runtime.compile_step``; backward and optimizer step eager):

  squeeze   teacher_loss (ConvNet-BN width 128, batch 256, 1x28x28) + backward + SGD(momentum 0.9)
  recover   recover_loss (the same teacher, eval mode, 10 classes x IPC 10 = 100 images, jitter 2, supervised
            BN layers + thin first-conv gradient) + backward + Adam on the pixels
  train     student_logits (ConvNet-BN width 128, batch 50) + soft_label_kl (MR top-3 fp16 labels, T = 20,
            t_s = 1) + backward + AdamW

bf16 and channels_last as ``auto`` chooses them on the device. The modes of a stage run on copies of one model
with the same inputs and are timed round-robin (one step of each per round), so load from other processes hits
them alike. ``warmup_s`` is the first call (for compile and cudagraphs: tracing and code generation; inductor's
on-disk cache, /tmp/torchinductor_$USER, makes a second run's warm-up shorter). ``graphs`` counts the graphs
dynamo captured for the mode (1 = no recompilation over the timed steps). Prints one row per (stage, mode) and
writes them to ``--out`` as CSV.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lpqld_fast import runtime
from lpqld_fast.models import get_model

STAGES = ("squeeze", "recover", "train")
WIDTH, IMAGE, CLASSES, IPC = 128, 28, 10, 10
FIELDS = ("stage", "mode", "device", "p20_ms", "p50_ms", "p80_ms", "warmup_s", "graphs", "steps", "threads",
          "torch", "timestamp")


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _model(device: str, channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    m = get_model("convnet-bn", num_classes=CLASSES, in_chans=1, image_size=IMAGE, width=WIDTH).to(device)
    return m.to(memory_format=torch.channels_last) if channels_last else m


def squeeze_step(device: str, mode: str, bf16: bool) -> Callable[[], None]:
    from lpqld_fast.squeeze import teacher_loss

    net = _model(device, True).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, IMAGE, IMAGE, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (256,), generator=g).to(device)
    fn = runtime.compile_step(teacher_loss, mode)

    def step() -> None:
        loss = fn(net, x, y, bf16, 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def recover_step(device: str, mode: str, bf16: bool) -> Callable[[], None]:
    """One recover iteration; the supervised-BN and thin-conv contexts stay entered for the bench's life."""
    import contextlib

    from lpqld_fast.bn_stats import bn_layers
    from lpqld_fast.recover import draw_augmentation, make_units, recover_loss
    from lpqld_fast.seeding import recover_unit
    from lpqld_fast.supervised_bn import supervised_bn
    from lpqld_fast.thin_conv import thin_input_grad_convs

    teacher = _model(device, True).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    units = make_units(CLASSES, IPC, True)
    sizes = [len(u.labels) for u in units]
    seg = torch.repeat_interleave(torch.arange(len(units)), torch.tensor(sizes)).to(device)
    labels = torch.cat([u.labels for u in units]).to(device)
    g = torch.Generator().manual_seed(2)
    targets = [(torch.randn(CLASSES, m.num_features, generator=g).mul(0.1).to(device),
                torch.rand(CLASSES, m.num_features, generator=g).add(0.5).to(device)) for _, m in bn_layers(teacher)]
    gens = [recover_unit(0, u.uid) for u in units]
    boxes, flips, shifts = (a.to(device) for a in draw_augmentation(gens, 1, IMAGE, IMAGE, 2, (0.08, 1.0)))
    unit_sizes = torch.tensor(sizes, dtype=torch.float32, device=device)
    x = torch.randn(len(labels), 1, IMAGE, IMAGE, generator=g).to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1, betas=(0.5, 0.9))
    stack = contextlib.ExitStack()
    supervised = stack.enter_context(supervised_bn(teacher, seg, targets))
    stack.enter_context(thin_input_grad_convs(teacher))
    fn = runtime.compile_step(recover_loss, mode)

    def step() -> None:
        loss, _, _ = fn(teacher, supervised, x, boxes[0], flips[0], shifts[0], labels, seg, unit_sizes, 10.0, 0.05,
                        bf16, True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.close = stack.close  # type: ignore[attr-defined]
    return step


def train_step(device: str, mode: str, bf16: bool) -> Callable[[], None]:
    from lpqld_fast.store.quantize import decode_labels, encode_labels
    from lpqld_fast.train import soft_label_forward, student_logits

    net = _model(device, True).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 1, IMAGE, IMAGE, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    labels = decode_labels(encode_labels(torch.randn(50, CLASSES, generator=g) * 3, mode="mr", k=3,
                                         value_dtype="fp16"), "mr").to(device)
    fn = runtime.compile_step(student_logits, mode)

    def step() -> None:
        loss, _ = soft_label_forward(net, x, labels, 20.0, 1.0, False, bf16, validate=False, forward=fn)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


BUILDERS: dict[str, Callable[[str, str, bool], Callable[[], None]]] = {
    "squeeze": squeeze_step, "recover": recover_step, "train": train_step}


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bench_stage(stage: str, modes: list[str], device: str, rounds: int) -> list[dict[str, Any]]:
    """Rows of one stage: every mode built and warmed up (first call timed), then ``rounds`` round-robin steps."""
    bf16, _ = runtime.native_bf16(device)
    steps: dict[str, Callable[[], None]] = {}
    warm: dict[str, float] = {}
    graphs: dict[str, int] = {}
    start = _graphs()
    for mode in modes:
        before = _graphs()
        steps[mode] = BUILDERS[stage](device, mode, bf16)
        t0 = time.perf_counter()
        steps[mode]()
        _sync(device)
        warm[mode] = time.perf_counter() - t0
        steps[mode]()  # a second call: cudagraphs records on its second call
        graphs[mode] = _graphs() - before
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            t0 = time.perf_counter()
            steps[mode]()
            _sync(device)
            times[mode].append((time.perf_counter() - t0) * 1e3)
    late = _graphs() - sum(graphs.values()) - start
    if late:
        print(f"{stage}: {late} graph(s) captured during the timed steps (recompiles)", flush=True)
    for mode in modes:
        close = getattr(steps[mode], "close", None)
        if close is not None:
            close()
    rows = []
    for mode in modes:
        q = statistics.quantiles(times[mode], n=5) if len(times[mode]) > 1 else times[mode] * 4
        rows.append({"stage": stage, "mode": mode, "device": _device_name(device), "p20_ms": f"{q[0]:.2f}",
                     "p50_ms": f"{statistics.median(times[mode]):.2f}", "p80_ms": f"{q[-1]:.2f}",
                     "warmup_s": f"{warm[mode]:.2f}", "graphs": graphs[mode], "steps": rounds,
                     "threads": torch.get_num_threads(), "torch": torch.__version__,
                     "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return rows


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"cuda:{torch.cuda.get_device_name()}"
    return "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stage_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated: squeeze,recover,train")
    ap.add_argument("--modes", default=None, help="comma-separated (default: eager,compile; + cudagraphs on cuda)")
    ap.add_argument("--rounds", type=int, default=None, help="timed steps per mode (default: 5 on cpu, 50 on cuda)")
    ap.add_argument("--out", default=None, help="CSV file for the rows")
    args = ap.parse_args(argv)
    runtime.tune_cpu_allocator()
    cuda = torch.device(args.device).type == "cuda"
    modes = args.modes.split(",") if args.modes else ["eager", "compile", *(["cudagraphs"] if cuda else [])]
    rounds = args.rounds or (50 if cuda else 5)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writeheader()
    for stage in args.stages.split(","):
        rows = bench_stage(stage, modes, args.device, rounds)
        for r in rows:
            print(f"{r['stage']:8s} {r['mode']:10s} {r['device']}: p50 {r['p50_ms']} ms "
                  f"(p20 {r['p20_ms']}, p80 {r['p80_ms']}), warm-up {r['warmup_s']} s, graphs {r['graphs']}",
                  flush=True)
        if args.out:  # stage by stage: a run stopped by a time limit keeps the stages it finished
            with open(args.out, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
