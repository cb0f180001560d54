"""ResNets built on torchvision's classes (BasicBlock / Bottleneck are torchvision's, not rewritten).

:class:`FeatureResNet` only adds ``features(x)`` (the pooled penultimate
features) to torchvision's ``ResNet``; the modules, their names and the
state_dict keys are torchvision's, so torchvision checkpoints load as-is and
forward hooks on every ``nn.BatchNorm2d`` (class-wise BN statistics) see the
usual 20 (ResNet-18) / 53 (ResNet-50) layers.

- :func:`resnet18_small`: CIFAR-style stem (conv1 3x3 stride 1, no maxpool) for 28x28 / 32x32 / 64x64 images.
- :func:`resnet18`, :func:`resnet50`: the ImageNet architectures (weights=None; 7x7 stride-2 conv1 + maxpool).
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["FeatureResNet", "resnet18_small", "resnet18", "resnet50"]


class FeatureResNet(ResNet):
    """torchvision ``ResNet`` with ``features(x)`` and ``num_features``; forward = fc(features(x))."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled output of layer4, [N, num_features]."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))

    @property
    def num_features(self) -> int:
        return self.fc.in_features


def _check(num_classes: int, in_chans: int) -> None:
    for name, v in (("num_classes", num_classes), ("in_chans", in_chans)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _new_conv1(in_chans: int, kernel_size: int, stride: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_chans, 64, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    # Same init torchvision's ResNet applies to its convolutions.
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def resnet18_small(num_classes: int, in_chans: int = 3, *, zero_init_residual: bool = False) -> FeatureResNet:
    """ResNet-18 for small images: conv1 3x3 stride 1, no maxpool (the teacher for Fashion-MNIST / Tiny)."""
    _check(num_classes, in_chans)
    model = FeatureResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, zero_init_residual=zero_init_residual)
    model.conv1 = _new_conv1(in_chans, 3, 1)
    model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int = 1000, in_chans: int = 3, *, zero_init_residual: bool = False) -> FeatureResNet:
    """torchvision ResNet-18 (ImageNet stem), randomly initialised."""
    _check(num_classes, in_chans)
    model = FeatureResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, zero_init_residual=zero_init_residual)
    if in_chans != 3:
        model.conv1 = _new_conv1(in_chans, 7, 2)
    return model


def resnet50(num_classes: int = 1000, in_chans: int = 3, *, zero_init_residual: bool = False) -> FeatureResNet:
    """torchvision ResNet-50 (ImageNet stem), randomly initialised."""
    _check(num_classes, in_chans)
    model = FeatureResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, zero_init_residual=zero_init_residual)
    if in_chans != 3:
        model.conv1 = _new_conv1(in_chans, 7, 2)
    return model
