"""Model zoo: shapes, features(), BatchNorm layout and hookability, torchvision compatibility."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lpqld_fast.models import MODEL_NAMES, ConvNet, bn_layers, get_model

# (name, in_chans, image_size, num_features, expected BatchNorm2d count)
CASES = [
    ("convnet", 1, 28, 128 * 3 * 3, 3),
    ("convnet-bn", 3, 32, 128 * 4 * 4, 3),
    ("resnet18-small", 1, 28, 512, 20),
    ("resnet18-small", 3, 32, 512, 20),
    ("resnet18", 3, 64, 512, 20),
    ("resnet50", 3, 32, 2048, 53),
]


@pytest.mark.parametrize("name,in_chans,size,num_features,num_bn", CASES)
def test_forward_features_and_bn(name, in_chans, size, num_features, num_bn):
    torch.manual_seed(0)
    model = get_model(name, num_classes=7, in_chans=in_chans, image_size=size).eval()
    x = torch.randn(2, in_chans, size, size)
    bns = bn_layers(model)
    assert len(bns) == num_bn
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == num_bn
    # Every BN layer is reached by forward hooks (how class-wise BN statistics are collected).
    seen: list[torch.Size] = []
    handles = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape)) for _, m in bns]
    with torch.no_grad():
        y = model(x)
        f = model.features(x)
    for h in handles:
        h.remove()
    assert len(seen) == 2 * num_bn  # once per forward and once per features()
    assert y.shape == (2, 7) and f.shape == (2, num_features) and model.num_features == num_features
    head = model.classifier if isinstance(model, ConvNet) else model.fc
    assert torch.allclose(head(f), y, atol=1e-5)


def test_small_resnet_stem():
    m = get_model("resnet18-small", 10, in_chans=1, image_size=28)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.in_channels == 1
    assert isinstance(m.maxpool, nn.Identity)
    assert isinstance(m.layer1[0], torchvision.models.resnet.BasicBlock)


@pytest.mark.parametrize("name,ctor", [("resnet18", torchvision.models.resnet18),
                                       ("resnet50", torchvision.models.resnet50)])
def test_imagenet_presets_match_torchvision(name, ctor):
    ours = get_model(name, num_classes=1000, in_chans=3, image_size=224)
    ref = ctor(weights=None)
    ref_sd = ref.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd)  # torchvision checkpoints load as-is


def test_imagenet_preset_in_chans():
    one = get_model("resnet18", num_classes=5, in_chans=1, image_size=64)
    assert one.conv1.in_channels == 1 and one.conv1.kernel_size == (7, 7) and one.conv1.stride == (2, 2)
    assert one.fc.out_features == 5 and one(torch.randn(1, 1, 64, 64)).shape == (1, 5)


def test_convnet_variants_and_errors():
    for norm, n_bn in (("instancenorm", 0), ("none", 0), ("batchnorm", 3)):
        m = ConvNet(10, in_chans=1, image_size=28, norm=norm)
        assert len(bn_layers(m)) == n_bn
        assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert any(isinstance(m, nn.GroupNorm) for m in ConvNet(10, 1, 28, norm="instancenorm").modules())
    assert get_model("convnet", 10, 3, 32, depth=4, width=32).num_features == 32 * 2 * 2
    with pytest.raises(ValueError, match="norm"):
        ConvNet(10, 1, 28, norm="layernorm")
    with pytest.raises(ValueError, match="image_size"):
        ConvNet(10, 1, 4, depth=3)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("resnet18", 0)


def test_get_model_unknown_name_lists_valid():
    with pytest.raises(ValueError) as e:
        get_model("vit", 10)
    for n in MODEL_NAMES:
        assert n in str(e.value)


def test_convnet_in_is_instance_norm_student_only():
    from torch import nn

    from lpqld_fast.config import check_value

    m = get_model("convnet-in", 10, in_chans=1, image_size=28)
    assert isinstance(m, ConvNet) and not bn_layers(m)
    norms = [x for x in m.modules() if isinstance(x, nn.GroupNorm)]
    assert len(norms) == 3 and all(n.num_groups == n.num_channels == 128 for n in norms)
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # a student choice; a teacher needs BatchNorm statistics, so squeeze refuses it by name
    assert check_value("train", "model", "convnet-in") == "convnet-in"
    with pytest.raises(ValueError, match="convnet-in"):
        check_value("squeeze", "model", "convnet-in")
