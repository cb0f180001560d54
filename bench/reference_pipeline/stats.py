"""Class-wise BatchNorm statistics, the reference way (squeeze stage of the reference strategy).

One eval-mode pass of the teacher over the train set, fed by a DataLoader with
per-sample PIL/torchvision train augmentation. A forward hook on every
``nn.BatchNorm2d`` takes the layer's input and, for every class, builds a
boolean mask of the batch, checks whether the class is present (a host sync
per class per layer per batch) and computes that class's mean and biased
variance over (N, H, W) with ``x.mean([0, 2, 3])`` and
``x.permute(1, 0, 2, 3).reshape(C, -1).var(1, unbiased=False)``.

Modes:
- ``"ema"`` (the reference's): ``m_c <- (1 - momentum) m_c + momentum * mean_c(batch)``
  (same for the variance) for each class present in the batch; mean starts
  at 0 and variance at 1, as in a fresh BatchNorm. Momentum 0.1.
- ``"exact"``: the same loop, but per class it accumulates the count, the sum
  and the sum of squares (float64) and returns the whole-pass moments.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

MODES = ("ema", "exact")


class ClassLoopBNStats:
    """Forward hooks that collect class-wise statistics of every BN layer's input with a loop over classes."""

    def __init__(self, model: nn.Module, num_classes: int, mode: str = "ema", momentum: float = 0.1) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 < float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        if not self.layers:
            raise ValueError(f"{type(model).__name__} has no BatchNorm2d layers")
        self.num_classes = num_classes
        self.mode = mode
        self.momentum = float(momentum)
        self.labels: torch.Tensor | None = None
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._make_hook(n)) for n, m in self.layers]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self.labels is None:
                return
            x = inputs[0].detach()
            nch = x.shape[1]
            st = self.state.get(name)
            if st is None:
                if self.mode == "ema":
                    st = {"mean": torch.zeros(self.num_classes, nch), "var": torch.ones(self.num_classes, nch)}
                else:
                    st = {"count": torch.zeros(self.num_classes, dtype=torch.float64),
                          "sum": torch.zeros(self.num_classes, nch, dtype=torch.float64),
                          "sumsq": torch.zeros(self.num_classes, nch, dtype=torch.float64)}
                self.state[name] = st
            for c in range(self.num_classes):
                mask = self.labels == c
                if not bool(mask.any()):  # host sync per class, as in the reference
                    continue
                xc = x[mask]
                if self.mode == "ema":
                    mean = xc.mean([0, 2, 3])
                    var = xc.permute(1, 0, 2, 3).reshape(nch, -1).var(1, unbiased=False)
                    st["mean"][c] = (1 - self.momentum) * st["mean"][c] + self.momentum * mean.float().cpu()
                    st["var"][c] = (1 - self.momentum) * st["var"][c] + self.momentum * var.float().cpu()
                else:
                    xd = xc.double()
                    st["count"][c] += xd.shape[0] * xd.shape[2] * xd.shape[3]
                    st["sum"][c] += xd.sum([0, 2, 3]).cpu()
                    st["sumsq"][c] += (xd * xd).sum([0, 2, 3]).cpu()

        return hook

    def observe(self, model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward ``x`` through ``model`` with the hooks recording per-class statistics for ``labels``."""
        self.labels = labels.to(x.device)
        try:
            return model(x)
        finally:
            self.labels = None

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def result(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer name: (mean [K, C] float32, biased var [K, C] float32)}. Classes never seen: (0, 1) in
        EMA mode (the initial values), (0, 0) in exact mode."""
        out = {}
        for name, _ in self.layers:
            if name not in self.state:
                raise RuntimeError(f"BN layer {name!r} saw no input: was observe() called?")
            st = self.state[name]
            if self.mode == "ema":
                out[name] = (st["mean"].clone(), st["var"].clone())
            else:
                n = st["count"].clamp_min(1)[:, None]
                mean = st["sum"] / n
                var = (st["sumsq"] / n - mean * mean).clamp_min(0)
                out[name] = (mean.float(), var.float())
        return out


class UInt8ImageDataset(torch.utils.data.Dataset):
    """torchvision-dataset style view of in-memory uint8 images [N, C, H, W]: each item is decoded to a
    PIL image and run through ``transform`` (per sample, in Python), like torchvision.datasets.FashionMNIST."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        arr = self.images[index].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[:, :, 0]) if arr.shape[2] == 1 else Image.fromarray(arr)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[index])


def train_transform(augment: str, pad: int, size: int, mean: Sequence[float], std: Sequence[float]):
    """The squeeze-stage train augmentation, per sample: reflect-padded random crop + flip (``crop-flip``)."""
    ops = []
    if augment == "crop-flip":
        ops += [transforms.RandomCrop(size, padding=pad, padding_mode="reflect"), transforms.RandomHorizontalFlip()]
    elif augment not in ("none", None):
        raise ValueError(f"augment must be 'crop-flip' or 'none', got {augment!r}")
    ops += [transforms.ToTensor(), transforms.Normalize(list(mean), list(std))]
    return transforms.Compose(ops)


@torch.no_grad()
def collect_classwise_stats(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    mode: str = "ema",
    momentum: float = 0.1,
    batch_size: int = 500,
    augment: str = "crop-flip",
    crop_pad: int = 2,
    seed: int = 0,
    limit: int | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One eval-mode pass over ``images`` (the first ``limit`` when given) with per-sample train augmentation."""
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    model.eval()
    ds = UInt8ImageDataset(images, labels, train_transform(augment, crop_pad, images.shape[-1], mean, std))
    gen = torch.Generator().manual_seed(seed + 1)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=torch.utils.data.RandomSampler(
        ds, generator=gen), num_workers=0, drop_last=False)
    torch.manual_seed(seed + 1)  # the per-sample crop/flip draws use the global RNG, as torchvision does
    hooks = ClassLoopBNStats(model, num_classes, mode, momentum)
    try:
        for x, y in loader:
            hooks.observe(model, x, y)
    finally:
        hooks.close()
    return hooks.result()
