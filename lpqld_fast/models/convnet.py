"""The ConvNet of the dataset distillation literature (DC / DSA / MTT).

``depth`` blocks of conv3x3(pad 1) -> norm -> ReLU -> avgpool 2, then a linear
classifier on the flattened features. Default depth 3, width 128. With
BatchNorm2d it is the "ConvNet-BN" teacher, whose BN layers the class-wise
statistics hooks attach to; "instancenorm" follows the papers' code, i.e.
GroupNorm with one group per channel and affine parameters; "none" has no norm.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["NORMS", "ConvNet", "convnet"]

NORMS: tuple[str, ...] = ("batchnorm", "instancenorm", "none")
_NORM_ALIASES = {"bn": "batchnorm", "batch": "batchnorm", "in": "instancenorm", "instance": "instancenorm",
                 None: "none", "identity": "none"}


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    return nn.Identity()


class ConvNet(nn.Module):
    """ConvNet-{depth} with ``width`` channels; ``features(x)`` gives the flattened penultimate features.

    The input must be [N, in_chans, image_size, image_size]; image_size fixes the
    classifier's input size ``width * (image_size // 2**depth)**2``.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int = 32,
        width: int = 128,
        depth: int = 3,
        norm: str | None = "batchnorm",
    ) -> None:
        super().__init__()
        norm = _NORM_ALIASES.get(norm.lower() if isinstance(norm, str) else norm, norm)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
        for name, v in (("num_classes", num_classes), ("in_chans", in_chans), ("width", width), ("depth", depth)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(image_size, int) or image_size < 2**depth:
            raise ValueError(f"image_size must be an int >= 2**depth = {2**depth}, got {image_size!r}")
        layers: list[nn.Module] = []
        c, size = in_chans, image_size
        for _ in range(depth):
            layers += [
                nn.Conv2d(c, width, kernel_size=3, padding=1),
                _norm_layer(norm, width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            c, size = width, size // 2
        self.body = nn.Sequential(*layers)
        self.num_features = width * size * size
        self.classifier = nn.Linear(self.num_features, num_classes)
        self.norm = norm
        self.in_chans = in_chans
        self.image_size = image_size
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, num_features] (flattened conv output)."""
        return torch.flatten(self.body(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def convnet(
    num_classes: int, in_chans: int = 3, image_size: int = 32, *, width: int = 128, depth: int = 3,
    norm: str | None = "batchnorm",
) -> ConvNet:
    """ConvNet-BN (depth 3, width 128) by default."""
    return ConvNet(num_classes, in_chans, image_size, width=width, depth=depth, norm=norm)
