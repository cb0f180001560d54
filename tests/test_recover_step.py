"""Recover's iteration: its loss compiles whole (no graph break, no host sync) and matches eager; the pass-level
augmentation draws give the images of the per-iteration draws they replaced, bit for bit."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lpqld_fast.augment import sample_flips, sample_rrc_boxes
from lpqld_fast.ops import batched_roll, crop_resize_flip
from lpqld_fast.recover import (_draw_end, draw_augmentation, make_units, recover_loss,
                                synthesize_units)
from lpqld_fast.seeding import recover_unit
from lpqld_fast.supervised_bn import supervised_bn
from lpqld_fast.thin_conv import thin_input_grad_convs

from test_recover import MEAN, STD, K, _targets, _teacher  # noqa: E402  (tests/ is on sys.path under pytest)

SCALE = (0.08, 1.0)
TOL_AOT = 0.0


def _old_draw(gens: list[torch.Generator], sizes: list[int], h: int, w: int, jitter: int,
              scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-iteration draw recover made before the pass-level one (frozen copy): one crop box, flip and
    jitter shift per unit, expanded to its images."""
    boxes, flips, shifts = [], [], []
    for g, n in zip(gens, sizes):
        shift = torch.randint(0, jitter + 1, (2,), generator=g) if jitter > 0 else torch.zeros(2, dtype=torch.int64)
        box = sample_rrc_boxes(1, h, w, scale=scale, generator=g)
        flip = sample_flips(1, generator=g)
        shifts.append(shift.expand(n, 2))
        boxes.append(box.expand(n, 4))
        flips.append(flip.expand(n))
    return torch.cat(boxes), torch.cat(flips), torch.cat(shifts)


@pytest.mark.parametrize("jitter", [0, 2])
def test_chunked_draws_equal_per_iteration_draws_and_resume(jitter: int) -> None:
    sizes = [2, 3, 1]
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    old = [recover_unit(5, uid) for uid in range(3)]
    new = [recover_unit(5, uid) for uid in range(3)]
    # Drawn in chunks of 4, 4, 1 iterations (recover's chunks end at checkpoints).
    chunks = [draw_augmentation(new, n, 20, 24, jitter, SCALE) for n in (4, 4, 1)]
    boxes, flips, shifts = (torch.cat(parts) for parts in zip(*chunks))
    assert boxes.shape == (9, 3, 4) and flips.shape == (9, 3) and shifts.shape == (9, 3, 2)
    saved = {}
    for it in range(9):
        b, f, s = _old_draw(old, sizes, 20, 24, jitter, SCALE)
        assert torch.equal(boxes[it].index_select(0, seg), b)
        assert torch.equal(flips[it].index_select(0, seg), f)
        assert torch.equal(shifts[it].index_select(0, seg), s)
        if it + 1 == 4:
            saved[it + 1] = [g.get_state() for g in old]
    # Resumed at 4 from the states a checkpoint there stores: the rest of the pass.
    resumed = [torch.Generator() for _ in range(3)]
    for g, st in zip(resumed, saved[4]):
        g.set_state(st)
    rb, rf, rs = draw_augmentation(resumed, 5, 20, 24, jitter, SCALE)
    assert torch.equal(rb, boxes[4:]) and torch.equal(rf, flips[4:]) and torch.equal(rs, shifts[4:])


@pytest.mark.parametrize(("it", "every", "end"), [(0, 0, 100), (0, 30, 30), (30, 30, 60), (90, 0, 100),
                                                  (100, 250, 200), (200, 250, 250), (950, 0, 1000), (990, 7, 994)])
def test_draw_chunks_end_at_checkpoints(it: int, every: int, end: int) -> None:
    assert _draw_end(it, 1000, every) == end


def _old_synthesize(teacher, units, targets, cfg, image_shape, mean, std, seed):
    """recover's pass before the pass-level draws (frozen copy, without checkpoints): per iteration the draw,
    4 uploads and the loss inline."""
    c, h, w = image_shape
    sizes = [len(u.labels) for u in units]
    gens = [recover_unit(seed, u.uid) for u in units]
    x = torch.cat([torch.randn(n, c, h, w, generator=g) for g, n in zip(gens, sizes)]).requires_grad_(True)
    labels = torch.cat([u.labels for u in units])
    seg = torch.repeat_interleave(torch.arange(len(units)), torch.tensor(sizes))
    tidx = torch.tensor([u.target for u in units])
    layer_targets = [(m[tidx], v[tidx]) for m, v in targets]
    iters, lr = cfg["iterations"], cfg["lr"]
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    lo, hi = ((0.0 - mean) / std).view(1, -1, 1, 1), ((1.0 - mean) / std).view(1, -1, 1, 1)
    teacher.to(memory_format=torch.channels_last)  # recover.channels_last, the CPU default
    with supervised_bn(teacher, seg, layer_targets) as supervised, thin_input_grad_convs(teacher):
        for it in range(iters):
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * it / iters))
            boxes, flips, shifts = _old_draw(gens, sizes, h, w, cfg["jitter"], SCALE)
            xa = crop_resize_flip(batched_roll(x, shifts), boxes, flips, (h, w), validate=False)
            xa = xa.contiguous(memory_format=torch.channels_last)
            ce = F.cross_entropy(teacher(xa).float(), labels, reduction="none")
            ce_units = torch.zeros(len(units)).index_add_(0, seg, ce) / torch.tensor(sizes, dtype=ce.dtype)
            loss_bn = 0.0
            for li, layer in enumerate(supervised):
                loss_bn = loss_bn + (cfg["first_bn_mult"] if li == 0 else 1.0) * layer.pop_loss()
            loss = (ce_units + cfg["r_bn"] * loss_bn).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return x.detach()


def test_images_equal_the_per_iteration_draw_code_bit_for_bit() -> None:
    teacher = _teacher()
    targets = _targets(teacher)
    units = make_units(K, 2, True)[:2]  # 2 classes, ipc 2
    cfg = {"iterations": 8, "lr": 0.1, "r_bn": 0.05, "jitter": 2, "first_bn_mult": 10.0, "channels_last": True}
    want = _old_synthesize(teacher, units, targets, cfg, (1, 16, 16), MEAN, STD, seed=3)
    got = synthesize_units(teacher, units, targets, cfg, (1, 16, 16), MEAN, STD, seed=3, progress=False)
    assert torch.equal(got, want)


def _eager_and_compiled(backend: str, bf16_channels_last: bool) -> tuple[tuple[torch.Tensor, ...], ...]:
    """(loss, ce_units, loss_bn, x.grad) of one iteration, eager and through torch.compile(fullgraph=True)."""
    teacher = _teacher()
    if bf16_channels_last:
        teacher.to(memory_format=torch.channels_last)
    targets = _targets(teacher)
    units = make_units(K, 2, True)
    sizes = [len(u.labels) for u in units]
    seg = torch.repeat_interleave(torch.arange(len(units)), torch.tensor(sizes))
    labels = torch.cat([u.labels for u in units])
    boxes, flips, shifts = draw_augmentation([recover_unit(0, u.uid) for u in units], 1, 16, 16, 2, SCALE)
    unit_sizes = torch.tensor(sizes, dtype=torch.float32)
    x0 = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with supervised_bn(teacher, seg, targets) as supervised, thin_input_grad_convs(teacher):
        def run(fn):
            x = x0.clone().requires_grad_(True)
            loss, ce, bn = fn(teacher, supervised, x, boxes[0], flips[0], shifts[0], labels, seg, unit_sizes,
                              10.0, 0.05, bf16_channels_last, bf16_channels_last)
            loss.backward()
            return loss.detach(), ce.detach(), bn.detach(), x.grad

        eager = run(recover_loss)
        torch._dynamo.reset()
        compiled = run(torch.compile(recover_loss, fullgraph=True, backend=backend))  # a graph break raises
        assert all(layer.loss is None for layer in supervised)  # every loss popped inside the graph
    return eager, compiled


NAMES = ("loss", "ce_units", "loss_bn", "x.grad")


@pytest.mark.parametrize("bf16_channels_last", [False, True])
def test_recover_loss_compiles_fullgraph_and_matches_eager(bf16_channels_last: bool) -> None:
    """aot_eager: dynamo's whole-graph capture and AOT autograd's joint graph, run by eager kernels (seconds;
    inductor's C++ code generation takes minutes on this CPU, see the slow test below)."""
    eager, compiled = _eager_and_compiled("aot_eager", bf16_channels_last)
    for name, e, c in zip(NAMES, eager, compiled):
        torch.testing.assert_close(c, e, rtol=TOL_AOT, atol=TOL_AOT, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_recover_loss_compiles_with_inductor() -> None:
    """The inductor backend (generated C++ kernels, fp32): ~1-2 min of compilation on a loaded 2-core CPU."""
    eager, compiled = _eager_and_compiled("inductor", False)
    for name, e, c in zip(NAMES, eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
