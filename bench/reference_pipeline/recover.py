"""Recover, the reference way: one class per optimisation batch, a Python loop over classes.

For each class c (as the reference's ``main_syn(class_id)``): build the teacher
and load its weights, put it in eval mode with frozen parameters, attach one
forward hook per BatchNorm2d that compares the batch statistics of the layer's
input with the class-c statistics, and optimise ``ipc`` images of class c:

    per iteration: lr <- 0.5 (1 + cos(pi it / iters)) lr0
                   x_aug = RandomResizedCrop(scale=(0.08, 1)) + RandomHorizontalFlip of
                           torch.roll(x, (dy, dx)), dy, dx ~ U{0..jitter}     (one draw per batch)
                   loss  = CE(f(x_aug), c) + r_bn * sum_l w_l (||var_c^l - var^l||_2 + ||mu_c^l - mu^l||_2)
                   Adam(betas 0.5, 0.9) step; clamp each channel to [-m/s, (1-m)/s]

w_1 = first_bn_mult (10), 1 for the other layers. The last iterate is
denormalised, rounded to uint8 and saved as one PNG per image (the reference
saves JPEG quality 75; see README.md).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision import transforms


class BNClassStatsHook:
    """Forward hook: ``r_feature`` = ||var_c - var(x)||_2 + ||mu_c - mu(x)||_2 of the BN input of this forward."""

    def __init__(self, module: nn.BatchNorm2d, mean_c: torch.Tensor, var_c: torch.Tensor) -> None:
        self.mean = mean_c
        self.var = var_c
        self.r_feature: torch.Tensor | None = None
        self.hook = module.register_forward_hook(self.hook_fn)

    def hook_fn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        self.r_feature = torch.norm(self.var - var, 2) + torch.norm(self.mean - mean, 2)

    def close(self) -> None:
        self.hook.remove()


def clip(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Clamp each channel of normalised images to the range of valid pixels (a loop over channels)."""
    for c in range(x.shape[1]):
        m, s = mean[c], std[c]
        x[:, c] = torch.clamp(x[:, c], -m / s, (1 - m) / s)
    return x


def denormalize_to_uint8(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [N, C, H, W] -> uint8 [N, H, W, C] (rounded; the reference truncates)."""
    out = x.detach().clone()
    for c in range(out.shape[1]):
        out[:, c] = torch.clamp(out[:, c] * std[c] + mean[c], 0, 1)
    return np.round(out.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def synthesize_class(
    teacher: nn.Module,
    class_id: int,
    class_stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: dict,
    image_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Optimise the ``cfg['ipc']`` images of one class; return the last iterate (normalised space)."""
    hooks = []
    for name, module in teacher.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            m, v = class_stats[name]
            hooks.append(BNClassStatsHook(module, m[class_id].clone(), v[class_id].clone()))
    try:
        ipc = int(cfg["ipc"])
        c, h, w = image_shape
        targets = torch.LongTensor([class_id] * ipc)
        inputs = torch.randn((ipc, c, h, w), requires_grad=True, dtype=torch.float)
        iterations = int(cfg["iterations"])
        lr0 = float(cfg["lr"])
        jitter = int(cfg.get("jitter", 0))
        r_bn = float(cfg["r_bn"])
        first_mult = float(cfg.get("first_bn_mult", 10.0))
        scale = tuple(cfg.get("crop_scale", (0.08, 1.0)))
        optimizer = torch.optim.Adam([inputs], lr=lr0, betas=[0.5, 0.9], eps=1e-8)
        criterion = nn.CrossEntropyLoss()
        for iteration in range(iterations):
            lr = 0.5 * (1 + np.cos(np.pi * iteration / iterations)) * lr0
            for group in optimizer.param_groups:
                group["lr"] = lr
            # The augmentation pipeline is rebuilt every iteration, as in the reference scripts.
            aug_function = transforms.Compose([
                transforms.RandomResizedCrop((h, w), scale=scale),
                transforms.RandomHorizontalFlip(),
            ])
            off1 = random.randint(0, jitter)
            off2 = random.randint(0, jitter)
            inputs_jit = torch.roll(inputs, shifts=(off1, off2), dims=(2, 3))
            inputs_jit = aug_function(inputs_jit)
            optimizer.zero_grad()
            outputs = teacher(inputs_jit)
            loss_ce = criterion(outputs, targets)
            rescale = [first_mult] + [1.0 for _ in range(len(hooks) - 1)]
            loss_r_bn_feature = sum(mod.r_feature * rescale[idx] for idx, mod in enumerate(hooks))
            loss = loss_ce + r_bn * loss_r_bn_feature
            loss.backward()
            optimizer.step()
            inputs.data = clip(inputs.data, mean, std)
        return inputs.data.clone()
    finally:
        for hk in hooks:
            hk.close()


def save_class_pngs(out_dir: Path, class_id: int, images_uint8: np.ndarray) -> list[Path]:
    """One PNG per image under out_dir/<class:05d>/<i:04d>.png (ImageFolder layout)."""
    d = out_dir / f"{class_id:05d}"
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(images_uint8):
        img = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)
        p = d / f"{i:04d}.png"
        img.save(p, format="PNG")
        paths.append(p)
    return paths


def run_recover(
    make_teacher: Callable[[], nn.Module],
    class_stats: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: dict,
    classes: Sequence[int],
    image_shape: tuple[int, int, int],
    mean: Sequence[float],
    std: Sequence[float],
    out_dir: str | Path,
    seed: int = 0,
    verbose: bool = True,
) -> dict:
    """Synthesise and save the images of ``classes`` (a loop over classes, one teacher load per class)."""
    out_dir = Path(out_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    per_class = []
    for class_id in classes:
        t0 = time.perf_counter()
        teacher = make_teacher()
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad = False
        x = synthesize_class(teacher, int(class_id), class_stats, cfg, image_shape, mean, std)
        save_class_pngs(out_dir, int(class_id), denormalize_to_uint8(x, mean, std))
        per_class.append(time.perf_counter() - t0)
        if verbose:
            print(f"[reference recover] class {class_id}: {cfg['ipc']} images, {cfg['iterations']} it, "
                  f"{per_class[-1]:.1f}s", flush=True)
    return {"classes": [int(c) for c in classes], "seconds_per_class": per_class}
