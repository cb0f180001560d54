"""Models of the pipeline. Every model has ``features(x)`` (penultimate features, [N, num_features]),
``num_features``, and keeps plain ``nn.BatchNorm2d`` modules so hooks can collect class-wise BN statistics."""
from __future__ import annotations

from torch import nn

from .convnet import ConvNet, convnet
from .resnet import FeatureResNet, resnet18, resnet18_small, resnet50

__all__ = ["MODEL_NAMES", "TEACHER_MODEL_NAMES", "ConvNet", "FeatureResNet", "get_model", "bn_layers", "convnet",
           "resnet18", "resnet18_small", "resnet50"]

MODEL_NAMES: tuple[str, ...] = ("convnet", "convnet-bn", "convnet-in", "resnet18-small", "resnet18", "resnet50")
# Teachers need BatchNorm layers: squeeze records their per-class statistics and recovery matches them.
TEACHER_MODEL_NAMES: tuple[str, ...] = tuple(n for n in MODEL_NAMES if n != "convnet-in")


def get_model(name: str, num_classes: int, in_chans: int = 3, image_size: int = 32, **kwargs) -> nn.Module:
    """Build a model by name (names in MODEL_NAMES, case-insensitive).

    - "convnet" / "convnet-bn": ConvNet depth 3, width 128, BatchNorm (kwargs: width, depth, norm).
    - "convnet-in": the same ConvNet with instance norm, the evaluation model of DC / DSA / MTT / KIP (a
      student only: it has no BatchNorm statistics to squeeze).
    - "resnet18-small": ResNet-18 with a 3x3 stride-1 stem and no maxpool (kwargs: zero_init_residual).
    - "resnet18", "resnet50": torchvision ImageNet architectures, weights=None (kwargs: zero_init_residual).

    image_size sizes the ConvNet classifier; ResNets pool adaptively and accept any size.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    key = name.lower()
    if key in ("convnet", "convnet-bn"):
        return convnet(num_classes, in_chans, image_size, **kwargs)
    if key == "convnet-in":
        return convnet(num_classes, in_chans, image_size, **{"norm": "instancenorm", **kwargs})
    if key == "resnet18-small":
        return resnet18_small(num_classes, in_chans, **kwargs)
    if key == "resnet18":
        return resnet18(num_classes, in_chans, **kwargs)
    if key == "resnet50":
        return resnet50(num_classes, in_chans, **kwargs)
    raise ValueError(f"unknown model {name!r}; valid names: {list(MODEL_NAMES)}")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, module) of every nn.BatchNorm2d in ``model``, in module registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
