"""Recover: synthesise IPC images per class from the squeezed teacher (LPLD Eq. 6).

Loss per class c (one "unit" of IPC images optimised together):
    CE(f(x_aug), c) + r_bn * sum_l w_l (||mu_c^l - mu^l(x_aug)||_2 + ||var_c^l - var^l(x_aug)||_2)
with w_1 = first_bn_mult (10) and 1 for every other BN layer, batch statistics of
each BN input over (N, H, W), the teacher in eval mode. Adam(0.5, 0.9) on
normalised pixels from randn, cosine lr to 0, per-channel clipping, last
iterate saved.

Many classes share one forward pass exactly: in eval mode images do not
interact, the BN loss is computed per class segment (``segment_bn_loss``) and
each segment draws its own crop / flip / jitter from its own per-class
generator; Adam is elementwise. So the images do not depend on how many
classes are batched together (nor, later, on how classes are sharded across
ranks) up to float rounding.

Modes (paper 002 Table 4 ablations):
- classwise_batching=True : a unit is the IPC images of one class (LPLD);
  False: a unit is one image of every class (SRe2L batching, one crop per batch).
- classwise_supervision=True : BN targets are the class-wise statistics;
  False: the teacher's global running statistics (SRe2L).

Resume: finished units are files (units/unit_*.pt); inside a pass, every
``recover.checkpoint_every`` iterations (default 100, 0 = off) the pass state
(images, Adam state, next iteration, the units' generator states) is written
atomically to units/pass_<first uid>-<last uid>.ckpt.pt and removed once the
pass's unit files exist, so a kill loses at most that many iterations and the
resumed images equal the uninterrupted ones bit for bit (same device/threads).
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from lpqld_fast import config as schema
from lpqld_fast import distributed, seeding
from lpqld_fast.augment import sample_flips, sample_rrc_boxes
from lpqld_fast.bn_stats import bn_layers, load_bn_stats
from lpqld_fast.data import dataset_info, get_dataset, require_in_memory
from lpqld_fast.image_set import Unit, finalize_recover, random_class_pick
from lpqld_fast.io_utils import atomic_write_json, load_tensors, locks_folder, read_json, save_tensors, sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.ops import batched_roll, crop_resize_flip
from lpqld_fast.runtime import compile_step, mem_available_bytes
from lpqld_fast.supervised_bn import SupervisedBN, supervised_bn
from lpqld_fast.thin_conv import thin_input_grad_convs

PASS_CKPT_SCHEMA = 1


def recover_config(cfg: dict[str, Any] | None, device: str = "cpu",
                   recorded: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The recover section validated (schema defaults filled in) with its auto settings chosen."""
    return schema.resolve_auto("recover", schema.check_section("recover", cfg), device, recorded)


def result_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The recover settings that define the images (the schema's result settings; channels_last and
    checkpoint_every only change rounding or resume points, so a run resumed with them changed stays valid)."""
    keep = {k for k, f in schema.fields_of("recover").items() if f.metadata["result"]}
    return {k: v for k, v in sorted(cfg.items()) if k in keep}


def check_memory(cfg: dict[str, Any], num_classes: int, image_shape: tuple[int, int, int],
                 available: int | None = None) -> None:
    """Refuse an image set that cannot fit in memory before anything is written (recover.ipc=1e12 would
    otherwise fail deep inside an allocation): the packed uint8 set (held ~3 times while packing) and the
    float32 state of one unit (images, gradient, two Adam moments, augmented copies: ~6 copies)."""
    c, h, w = image_shape
    ipc = cfg["ipc"]
    unit_images = ipc if cfg["classwise_batching"] else num_classes
    need = 3 * ipc * num_classes * c * h * w + 6 * 4 * unit_images * c * h * w
    available = mem_available_bytes() if available is None else available
    if need > available:
        raise ValueError(f"recover.ipc={ipc} needs at least {need / 2**30:.1f} GiB of memory ({ipc * num_classes} "
                         f"images of {c}x{h}x{w}); {available / 2**30:.1f} GiB are available")


def make_units(num_classes: int, ipc: int, classwise_batching: bool) -> list[Unit]:
    if classwise_batching:
        return [Unit(c, torch.full((ipc,), c, dtype=torch.int64), c) for c in range(num_classes)]
    return [Unit(i, torch.arange(num_classes), -1) for i in range(ipc)]


class BNInputCapture:
    """Forward pre-hooks that keep every BN input (with grad) of one forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = bn_layers(model)
        self.inputs: list[torch.Tensor] = []
        self._handles = [m.register_forward_pre_hook(self._hook) for _, m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.inputs.append(inputs[0])

    def pop(self) -> list[torch.Tensor]:
        out, self.inputs = self.inputs, []
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def bn_targets(model: nn.Module, stats_path: str | Path | None, classwise: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer (mean [T, C], var [T, C]): class-wise table or the global running stats (T = 1)."""
    layers = bn_layers(model)
    if not classwise:
        return [(m.running_mean.detach()[None].float(), m.running_var.detach()[None].float()) for _, m in layers]
    if stats_path is None:
        raise ValueError("class-wise supervision needs the squeeze output bn_stats.pt")
    payload = load_bn_stats(stats_path)
    names = [n for n, _ in layers]
    if list(payload["layers"]) != names:
        raise ValueError(f"{stats_path} was collected on other BN layers ({len(payload['layers'])} layers) than "
                         f"this teacher ({len(names)} layers)")
    t = payload["tensors"]
    for n in names:  # checked once here, so the error names the file and the layer, not the op's argument
        for what in ("mean", "var"):
            if not torch.isfinite(t[f"{n}.{what}"]).all():
                raise ValueError(f"{stats_path}: the class-wise {what} of BN layer {n!r} contains NaN or inf; "
                                 "rerun squeeze into a new --out")
    return [(t[f"{n}.mean"].float(), t[f"{n}.var"].float()) for n in names]


# Iterations of augmentation drawn and uploaded at once: one upload per chunk instead of per iteration (a copy
# per iteration syncs a GPU), host memory bounded for large passes (33 bytes per unit and iteration).
DRAW_CHUNK = 100


def draw_augmentation(gens: list[torch.Generator], steps: int, h: int, w: int, jitter: int,
                      scale: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The crop box, flip and jitter shift of every unit for the next ``steps`` iterations.

    Per generator the draws come in the order of one iteration after the other (shift, box, flip), so draws
    made in chunks (or resumed from generator states saved between chunks) see the same values as draws made
    iteration by iteration. Returns CPU tensors boxes float32 [T, U, 4], flips bool [T, U], shifts int64
    [T, U, 2] (T = steps, U units).
    """
    steps = max(steps, 0)
    boxes = torch.empty(steps, len(gens), 4, dtype=torch.float32)
    flips = torch.empty(steps, len(gens), dtype=torch.bool)
    shifts = torch.zeros(steps, len(gens), 2, dtype=torch.int64)
    for u, g in enumerate(gens):
        for t in range(steps):
            if jitter > 0:
                shifts[t, u] = torch.randint(0, jitter + 1, (2,), generator=g)
            boxes[t, u] = sample_rrc_boxes(1, h, w, scale=scale, generator=g)[0]
            flips[t, u] = sample_flips(1, generator=g)[0]
    return boxes, flips, shifts


def _draw_end(it: int, iters: int, checkpoint_every: int) -> int:
    """The end of the chunk of draws that starts at iteration ``it``: a chunk never crosses a checkpoint, so
    the generators' states at a checkpoint are the ones its iteration left."""
    end = (it // DRAW_CHUNK + 1) * DRAW_CHUNK
    if checkpoint_every > 0:
        end = min(end, (it // checkpoint_every + 1) * checkpoint_every)
    return min(end, iters)


def recover_loss(teacher: nn.Module, supervised: Sequence[SupervisedBN], x: torch.Tensor, boxes: torch.Tensor,
                 flips: torch.Tensor, shifts: torch.Tensor, labels: torch.Tensor, seg: torch.Tensor,
                 unit_sizes: torch.Tensor, first_bn_mult: float, r_bn: float, bf16: bool,
                 channels_last: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, per-unit CE, per-unit BN loss) of one recover iteration on the images ``x`` [N, C, H, W].

    ``boxes`` [U, 4], ``flips`` [U], ``shifts`` [U, 2] are the iteration's augmentation per unit (expanded to
    the unit's images through ``seg`` [N], the unit of each image), ``unit_sizes`` float32 [U] the images per
    unit; ``supervised`` are the teacher's SupervisedBN layers (``supervised_bn``), whose forward computes the
    BN loss. No host sync and no branch on tensor values: the function compiles with
    ``torch.compile(fullgraph=True)`` (tests/test_recover_step.py).
    """
    h, w = x.shape[-2:]
    xa = batched_roll(x, shifts.index_select(0, seg))
    # The boxes are drawn by draw_augmentation (valid by construction): no value checks, which sync a GPU.
    xa = crop_resize_flip(xa, boxes.index_select(0, seg), flips.index_select(0, seg), (h, w), validate=False)
    if channels_last:
        xa = xa.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = teacher(xa)
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    # Mean CE within a unit, summed over units = the per-unit losses added up.
    ce_units = torch.zeros(unit_sizes.shape[0], device=x.device).index_add_(0, seg, ce) / unit_sizes
    loss_bn = 0.0
    for li, layer in enumerate(supervised):  # losses of bf16 BN inputs are summed in fp32/fp64
        wl = first_bn_mult if li == 0 else 1.0
        loss_bn = loss_bn + wl * layer.pop_loss()
    loss = (ce_units + r_bn * loss_bn).sum()
    return loss, ce_units, loss_bn


def synthesize_units(
    teacher: nn.Module,
    units: list[Unit],
    targets: list[tuple[torch.Tensor, torch.Tensor]],
    cfg: dict[str, Any],
    image_shape: tuple[int, int, int],
    mean: torch.Tensor,
    std: torch.Tensor,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    checkpoint_path: str | Path | None = None,
    step: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    x_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Optimise the images of ``units`` together; return the last iterate in normalised space.

    With ``checkpoint_path``, the pass state is saved there (atomically) every
    ``cfg["checkpoint_every"]`` iterations and a matching checkpoint found
    there is resumed from; the caller deletes it once the result is stored.
    ``step`` is :func:`recover_loss` as recover.compile runs it (made once per stage run by the caller;
    by default made here for this pass). ``x_init`` (normalised, one row per image of ``units`` in order)
    replaces the randn start (recover.init=real); the augmentation draws are the same either way.
    """
    c, h, w = image_shape
    sizes = [len(u.labels) for u in units]
    gens = [seeding.recover_unit(seed, u.uid) for u in units]
    # randn init per unit from its own generator, so batching does not change it (drawn with a real start
    # too: the augmentation that follows in each stream is then the same).
    x0 = torch.cat([torch.randn(n, c, h, w, generator=g) for g, n in zip(gens, sizes)])
    if x_init is not None:
        if x_init.shape != x0.shape:
            raise ValueError(f"x_init must hold one image per unit row, shape {tuple(x0.shape)}, "
                             f"got {tuple(x_init.shape)}")
        x0 = x_init.to(torch.float32)
    x = x0.to(device).requires_grad_(True)
    labels = torch.cat([u.labels for u in units]).to(device)
    seg = torch.repeat_interleave(torch.arange(len(units)), torch.tensor(sizes)).to(device)
    layer_targets = _unit_targets(units, targets, device)
    cfg, _ = recover_config(cfg, device)
    if step is None:
        step = compile_step(recover_loss, cfg["compile"])
    iters = cfg["iterations"]
    lr = cfg["lr"]
    jitter, scale = cfg["jitter"], tuple(cfg["crop_scale"])
    opt = torch.optim.Adam([x], lr=lr, betas=(0.5, 0.9), eps=1e-8)
    every = cfg["checkpoint_every"]
    if cfg["channels_last"]:
        teacher.to(memory_format=torch.channels_last)
    # Everything the trajectory depends on besides the teacher / targets (the caller's run identity covers those).
    ckpt_key = json.dumps({"uids": [u.uid for u in units], "sizes": sizes, "seed": seed, "shape": list(image_shape),
                           "cfg": result_config(cfg)},
                          sort_keys=True, default=str)
    start = 0
    if checkpoint_path is not None:
        start = _load_pass_checkpoint(Path(checkpoint_path), ckpt_key, x, opt, gens)
    lo = ((0.0 - mean) / std).view(1, -1, 1, 1).to(device)
    hi = ((1.0 - mean) / std).view(1, -1, 1, 1).to(device)
    ckpt_every = every if checkpoint_path is not None else 0
    drawn_to = start  # augmentation drawn (and uploaded) for iterations [chunk_start, drawn_to)
    unit_sizes = torch.tensor(sizes, dtype=torch.float32, device=device)
    # The BN layers (+ the ReLU after each) compute the class-wise BN loss in their forward: one fused op per
    # layer (lpqld_fast.supervised_bn) instead of hooks + BN + ReLU + segment_bn_loss; the thin first conv's
    # image gradient is a GEMM + col2im (lpqld_fast.thin_conv).
    with supervised_bn(teacher, seg, layer_targets) as supervised, thin_input_grad_convs(teacher):
        bar = tqdm(range(start, iters), desc=f"recover {len(units)} unit(s)", leave=False, disable=not progress,
                   initial=start, total=iters)
        for it in bar:
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * it / iters))
            if it == drawn_to:
                chunk_start, drawn_to = it, _draw_end(it, iters, ckpt_every)
                boxes_c, flips_c, shifts_c = (a.to(device) for a in draw_augmentation(
                    gens, drawn_to - it, h, w, jitter, scale))
            t = it - chunk_start
            loss, ce_units, loss_bn = step(
                teacher, supervised, x, boxes_c[t], flips_c[t], shifts_c[t], labels, seg, unit_sizes,
                cfg["first_bn_mult"], cfg["r_bn"], cfg["bf16"], cfg["channels_last"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
            if ckpt_every > 0 and (it + 1) % ckpt_every == 0 and it + 1 < iters:
                # it + 1 ends a chunk of draws: the generators stand where iteration it + 1 starts
                _save_pass_checkpoint(Path(checkpoint_path), ckpt_key, it + 1, x, opt, [g.get_state() for g in gens])
            if progress and (it % 50 == 0 or it == iters - 1):
                bar.set_postfix(ce=f"{float(ce_units.detach().mean()):.3f}", bn=f"{float(loss_bn.detach().mean()):.3f}")
    return x.detach()


def _unit_targets(units: list[Unit], targets: list[tuple[torch.Tensor, torch.Tensor]],
                  device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BN layer, the (mean, var) rows each unit is matched to: its class's, or (SRe2L) the global ones."""
    if units[0].target >= 0:
        tidx = torch.tensor([u.target for u in units])
        return [(m[tidx].to(device), v[tidx].to(device)) for m, v in targets]
    return [(m.expand(len(units), -1).to(device), v.expand(len(units), -1).to(device)) for m, v in targets]


def _save_pass_checkpoint(path: Path, key: str, next_it: int, x: torch.Tensor, opt: torch.optim.Optimizer,
                          generator_states: list[torch.Tensor]) -> None:
    """Atomic write of the state after ``next_it`` iterations (plain tensors/containers: weights_only loads it)."""
    state = opt.state_dict()
    save_tensors(path, {
        "schema": PASS_CKPT_SCHEMA,
        "key": key,
        "next_iteration": next_it,
        "x": x.detach().cpu().clone(),
        "adam_state": {i: {k: v.detach().cpu().clone() for k, v in st.items()} for i, st in state["state"].items()},
        "generator_states": list(generator_states),
    })


def _load_pass_checkpoint(path: Path, key: str, x: torch.Tensor, opt: torch.optim.Optimizer,
                          gens: list[torch.Generator]) -> int:
    """Restore x, Adam and the generators from ``path`` if it belongs to this pass; the next iteration (0 if not)."""
    if not path.exists():
        return 0
    payload = load_tensors(path, what="recover pass checkpoint")
    if not isinstance(payload, dict) or payload.get("schema") != PASS_CKPT_SCHEMA or payload.get("key") != key:
        # Another pass (e.g. units of the group were finished meanwhile) or another run: start this pass afresh.
        print(f"recover: ignoring {path} (written for another pass or settings)")
        return 0
    states = payload["generator_states"]
    if payload["x"].shape != x.shape or len(states) != len(gens):
        raise ValueError(f"recover pass checkpoint {path} does not fit this pass (shape or unit count differ)")
    with torch.no_grad():
        x.copy_(payload["x"])
    state = opt.state_dict()
    state["state"] = payload["adam_state"]
    opt.load_state_dict(state)  # moves the moments to x's device / dtype
    for g, st in zip(gens, states):
        g.set_state(st)
    return int(payload["next_iteration"])


def pass_checkpoint_path(unit_dir: Path, group: list[Unit]) -> Path:
    """One file per pass: ranks of a distributed run work on different groups, never on the same file."""
    return unit_dir / f"pass_{group[0].uid:06d}-{group[-1].uid:06d}.ckpt.pt"


def to_uint8(x_norm: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = x_norm.cpu() * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def units_per_pass(teacher: nn.Module, image_shape: tuple[int, int, int], unit_size: int, device: str,
                   budget_fraction: float = 0.25) -> int:
    """How many units fit in memory at once, from one probe forward's activation bytes."""
    capture = BNInputCapture(teacher)
    with torch.no_grad():
        teacher(torch.zeros(1, *image_shape, device=device))
    per_image = sum(t.numel() * t.element_size() for t in capture.pop()) * 6  # acts, grads, saved tensors
    capture.close()
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info()
    else:
        free = mem_available_bytes()
    return max(1, int(free * budget_fraction) // max(per_image * unit_size, 1))


@locks_folder("out", "recover", when=lambda a: distributed.is_main())
def run_recover(
    config: dict[str, Any],
    squeeze_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    device: str = "cpu",
    units_at_once: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Synthesise the distilled image set into ``out`` (resumes per unit after a kill).

    Under torchrun the groups of ``units_at_once`` units (the groups one
    process forms) go round-robin to the ranks, each rank writes its unit files,
    and rank 0 packs them after a barrier; with the same ``units_at_once`` and
    per-process thread count the images equal the 1-process ones bit for bit.
    """
    out = Path(out)
    state_path = out / "recover_state.json"
    prev = read_json(state_path, "recover state").get("run") if state_path.exists() else None
    if prev is not None and prev.get("source") == "real":  # refused before the teacher and statistics load
        _check_same_run(out, prev, {})  # _run_diffs names a selected set without reading the new run's config
    cfg, notes = recover_config(config["recover"], device, (prev or {}).get("recover"))
    progress = progress and distributed.is_main()  # one progress bar
    squeeze_dir = Path(squeeze_dir)
    info = dataset_info(config["dataset"], root=config.get("data_root"))
    shape = (info.in_chans, info.image_size, info.image_size)
    check_memory(cfg, info.num_classes, shape)
    ipc = cfg["ipc"]
    teacher = load_teacher(squeeze_dir / "teacher.pt", build_teacher(config["squeeze"], info)).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher_hash = sha256_tensors(teacher.state_dict())
    classwise_sup = cfg["classwise_supervision"]
    targets = bn_targets(teacher, squeeze_dir / "bn_stats.pt" if classwise_sup else None, classwise_sup)
    units = recover_units(info.num_classes, ipc, cfg["classwise_batching"], classwise_sup)
    mean = torch.tensor(info.mean)
    std = torch.tensor(info.std)
    if not cfg["normalize_input"]:
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    run_cfg = {"recover": result_config(cfg), "dataset": config["dataset"],
               "seed": seed, "teacher_sha256": teacher_hash}
    if prev is not None:
        _check_same_run(out, prev, run_cfg)
    schema.announce("recover", notes)
    unit_dir = out / "units"
    unit_dir.mkdir(parents=True, exist_ok=True)
    if distributed.is_main():
        atomic_write_json(state_path, {"run": run_cfg})
    if (out / "manifest.json").exists() and (out / "images.pt").exists():
        done = read_json(out / "manifest.json", "recover manifest")
        if not _run_diffs(done, run_cfg):
            print(f"recover: done already ({out})")
            return done
    per_pass = units_at_once or units_per_pass(teacher, shape, len(units[0].labels), device)
    per_pass = distributed.all_reduce_min_int(per_pass)  # every rank forms the same groups
    t0 = time.perf_counter()
    bar = tqdm(total=len(units), initial=sum(_unit_path(unit_dir, u).exists() for u in units),
               desc="recover units", disable=not progress)
    step = compile_step(recover_loss, cfg["compile"])  # one compiled function for every pass of the run
    real = real_starts(config, cfg, info.num_classes, mean, std, seed) if cfg["init"] == "real" else None
    for group in _my_groups(units, per_pass, unit_dir):
        # Named after the fixed group: a pass whose units were partly saved finds (and replaces) its old file.
        ckpt = pass_checkpoint_path(unit_dir, group.full)
        x_init = None
        if real is not None:
            x_init = torch.cat([real[u.labels, unit_positions(u, cfg["classwise_batching"], info.num_classes)]
                                for u in group.todo])
        x = synthesize_units(teacher, group.todo, targets, cfg, shape, mean, std, seed, device, progress,
                             checkpoint_path=ckpt, step=step, x_init=x_init)
        _save_units(unit_dir, group.todo, to_uint8(x, mean, std))
        ckpt.unlink(missing_ok=True)  # the unit files hold the result now
        bar.update(len(group.todo))
    bar.close()
    seconds = time.perf_counter() - t0
    # rank 0 packs every rank's units once all are written; the others read its manifest.
    distributed.barrier()
    manifest = finalize_recover(out, units, info.num_classes, run_cfg, seconds) if distributed.is_main() else None
    distributed.barrier()
    return manifest if manifest is not None else read_json(out / "manifest.json", "recover manifest")


def real_starts(config: dict[str, Any], cfg: dict[str, Any], num_classes: int, mean: torch.Tensor,
                std: torch.Tensor, seed: int) -> torch.Tensor:
    """recover.init=real: normalised float [num_classes, ipc, C, H, W], image i of class c a random real
    training image of c (:func:`lpqld_fast.image_set.random_class_pick`, the paper-001 baseline's pick)."""
    train = require_in_memory(get_dataset(config["dataset"], "train", root=config.get("data_root")),
                              "recover.init=real")
    ipc = cfg["ipc"]
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(train.labels == c).flatten()
        if len(idx) < ipc:
            raise ValueError(f"recover.init=real needs recover.ipc={ipc} training images of class {c}; it has "
                             f"{len(idx)}")
        picks.append(random_class_pick(idx, ipc, seed, c))
    images = train.images[torch.stack(picks)].to(torch.float32) / 255.0  # [classes, ipc, C, H, W]
    return (images - mean.view(1, 1, -1, 1, 1)) / std.view(1, 1, -1, 1, 1)


def unit_positions(u: Unit, classwise_batching: bool, num_classes: int) -> torch.Tensor:
    """The position within its class of each image of unit ``u`` (the units of :func:`recover_units`)."""
    if classwise_batching:
        return torch.arange(len(u.labels))  # a class's IPC images, in order
    if u.target == -1:
        return torch.full((len(u.labels),), u.uid, dtype=torch.int64)  # unit i: image i of every class
    return torch.tensor([u.uid // num_classes])  # SRe2L batching, class-wise targets: one image per unit


def recover_units(num_classes: int, ipc: int, classwise_batching: bool, classwise_supervision: bool) -> list[Unit]:
    """The units recover optimises (each one segment of a pass) under the batching and supervision settings."""
    units = make_units(num_classes, ipc, classwise_batching)
    if not classwise_supervision:
        for u in units:
            u.target = -1
    elif not classwise_batching:
        # SRe2L batching with class-wise targets: every image is its own segment.
        units = [Unit(u.uid * num_classes + c, torch.tensor([c]), c) for u in units for c in range(num_classes)]
    return units


@dataclass
class _Group:
    full: list[Unit]  # a fixed group of the full unit list (names its pass checkpoint)
    todo: list[Unit]  # its units without a unit file yet


def _unit_path(unit_dir: Path, u: Unit) -> Path:
    return unit_dir / f"unit_{u.uid:06d}.pt"


def _my_groups(units: list[Unit], per_pass: int, unit_dir: Path) -> Iterator[_Group]:
    """This rank's groups with unfinished units: fixed groups of ``per_pass`` units of the full list,
    round-robin over ranks, so every rank forms the same groups and a resumed run the same passes."""
    groups = [units[i:i + per_pass] for i in range(0, len(units), per_pass)]
    for full in groups[distributed.rank()::distributed.world_size()]:
        todo = [u for u in full if not _unit_path(unit_dir, u).exists()]
        if todo:
            yield _Group(full, todo)


def _save_units(unit_dir: Path, group: list[Unit], imgs: torch.Tensor) -> None:
    """One file per unit of ``group``: its rows of ``imgs`` (uint8, the group's units in order) and labels."""
    offset = 0
    for u in group:
        n = len(u.labels)
        save_tensors(_unit_path(unit_dir, u), {"images": imgs[offset:offset + n].clone(), "labels": u.labels.clone()})
        offset += n


def _run_diffs(prev: dict[str, Any], run_cfg: dict[str, Any]) -> list[str]:
    """What differs between a recorded recover run and ``run_cfg``: settings (a setting missing from the
    record counts as its default), dataset, seed, teacher."""
    if prev.get("source") == "real":  # a set select_real_images wrote: its settings are not synthesis settings
        strategy = prev.get("recover", {}).get("strategy")
        return [f"recover.select {strategy!r} -> 'none' (the folder holds selected real training images)"]
    diffs = schema.result_diff("recover", prev.get("recover", {}), run_cfg["recover"])
    for key, what in (("dataset", "dataset"), ("seed", "--seed"), ("teacher_sha256", "teacher")):
        if prev.get(key) != run_cfg[key]:
            diffs.append(f"{what} {prev.get(key)!r} -> {run_cfg[key]!r}" if key != "teacher_sha256" else
                         "another teacher (squeeze/teacher.pt changed)")
    return diffs


def _check_same_run(out: Path, prev: dict[str, Any], run_cfg: dict[str, Any]) -> None:
    diffs = _run_diffs(prev, run_cfg)
    if diffs:
        raise ValueError(f"{out} holds a recover run with another config ({'; '.join(diffs)}); rerun with the "
                         f"recorded settings, or start fresh with another --out (or delete {out})")
