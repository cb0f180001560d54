"""bn_eval_segment_loss / bn_eval_act (fused eval-BN + ReLU + pool [+ class-wise BN loss]), supervised_bn,
fused_eval_bn and thin_conv.

The oracle is written independently of the op's (scale, shift) formulation: torch's BatchNorm in eval
mode (+ torch.relu) on a float64 copy of x, and the reference segment_bn_loss; gradients by autograd.
Run with TRITON_INTERPRET=1 to include the Triton composition on CPU tensors (`make test` does).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lpqld_fast.models import ConvNet
from lpqld_fast.ops import bn_eval_act, bn_eval_segment_loss, segment_bn_loss
from lpqld_fast.ops._dispatch import available_backends, native_has_kernel
from lpqld_fast.ops.reference import segment_bn_loss as ref
from lpqld_fast.ops.segment_bn_loss import NATIVE_OP
from lpqld_fast.supervised_bn import EvalBN, SupervisedBN, bn_eval_affine, fused_eval_bn, supervised_bn
from lpqld_fast.thin_conv import ThinInputGradConv2d, thin_input_grad_convs

CPU_ALL = available_backends("cpu", NATIVE_OP)
HAS_FUSED = native_has_kernel("bn_eval_act", "CPU")


def _bn(c: int, seed: int, dtype=torch.float32) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-3).to(dtype).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.2)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _case(shape, segments, seed=0, dtype=torch.float32, layout="contiguous", seg=None, gy_shape=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).mul(1.5).add(0.3)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype)
    if layout == "strided":  # every other channel of a wider tensor
        wide = torch.randn((shape[0], 2 * shape[1]) + tuple(shape[2:]), generator=g, dtype=torch.float64).to(dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    seg = torch.randint(0, segments, (shape[0],), generator=g) if seg is None else torch.as_tensor(seg)
    tm = 0.3 + 0.5 * torch.randn(segments, shape[1], generator=g)
    tv = 2.0 + torch.rand(segments, shape[1], generator=g)
    gy = torch.randn(gy_shape or shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last" and len(gy.shape) == 4:
        gy = gy.contiguous(memory_format=torch.channels_last)
    wl = torch.randn(segments, generator=g, dtype=torch.float64)
    return x, seg, tm, tv, gy, wl


def _oracle(x, seg, tm, tv, bn, relu, gy, wl, pool=1):
    xx = x.detach().double().requires_grad_(True)
    y = F.batch_norm(xx, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(), bn.bias.double(),
                     False, 0.0, bn.eps)
    if relu:
        y = torch.relu(y)
    if pool == 2:
        y = F.avg_pool2d(y, 2)
    loss = ref.segment_bn_loss(xx, seg, tm, tv)
    ((y * gy.double()).sum() + (loss * wl).sum()).backward()
    return y.detach(), loss.detach(), xx.grad


def _run(x, seg, tm, tv, bn, relu, gy, wl, backend, pool=1):
    xx = x.detach().clone().requires_grad_(True)
    scale, shift = bn_eval_affine(bn)
    y, loss = bn_eval_segment_loss(xx, seg, tm, tv, scale, shift, relu=relu, pool=pool, backend=backend)
    ((y.double() * gy.double()).sum() + (loss.double() * wl).sum()).backward()
    return y.detach(), loss.detach(), xx.grad


TOL = {torch.float64: 1e-10, torch.float32: 3e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}
SHAPES = {"4d": ((12, 7, 5, 6), 3), "one_sample": ((1, 5, 4, 4), 1), "one_channel": ((9, 1, 3, 3), 4),
          "many_segments": ((40, 3, 2, 2), 37), "wide": ((6, 130, 3, 3), 2), "2d": ((10, 9), 3),
          "long_rows": ((3, 4, 40, 40), 2)}


def _pooled(shape, pool):
    return tuple(shape[:2]) + tuple(d // 2 for d in shape[2:]) if pool == 2 else None


@pytest.mark.parametrize("backend", CPU_ALL)
@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("relu,pool", [(False, 1), (True, 1), (True, 2), (False, 2)])
def test_matches_batchnorm_relu_pool_and_loss(backend: str, name: str, relu: bool, pool: int) -> None:
    shape, segments = SHAPES[name]
    if pool == 2 and len(shape) != 4:
        pytest.skip("pooling needs [N, C, H, W]")
    x, seg, tm, tv, gy, wl = _case(shape, segments, seed=len(name), gy_shape=_pooled(shape, pool))
    bn = _bn(shape[1], seed=3)
    want = _oracle(x, seg, tm, tv, bn, relu, gy, wl, pool)
    got = _run(x, seg, tm, tv, bn, relu, gy, wl, backend, pool)
    for w, g, what in zip(want, got, ("y", "loss", "grad")):
        assert g.dtype == (x.dtype if what != "loss" else torch.float32)
        scale = float(w.abs().max()) or 1.0
        err = float((g.double() - w).abs().max()) / scale
        assert err <= TOL[torch.float32], f"{what}: relative error {err:.2e}"


@pytest.mark.skipif(not HAS_FUSED, reason="native extension without the fused kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("relu,pool", [(False, 1), (True, 1), (True, 2), (False, 2)])
def test_native_dtypes_and_layouts(dtype: torch.dtype, layout: str, relu: bool, pool: int) -> None:
    # 70 channels: a full 64-lane block plus a tail in the channels-last loops; 5 x 7: odd rows and columns
    # that a 2x2 pool drops (floor mode)
    shape = (10, 70, 5, 7)
    x, seg, tm, tv, gy, wl = _case(shape, 4, seed=1, dtype=dtype, layout=layout, gy_shape=_pooled(shape, pool))
    bn = _bn(70, seed=2, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = _oracle(x, seg, tm, tv, bn, relu, gy, wl, pool)
    got = _run(x, seg, tm, tv, bn, relu, gy, wl, "cpp", pool)
    y, _, grad = got
    if layout == "channels_last":  # outputs keep the activation's layout (no transposing copies)
        assert y.is_contiguous(memory_format=torch.channels_last) and grad.stride() == x.stride()
    for w, g, what in zip(want, got, ("y", "loss", "grad")):
        scale = float(w.abs().max()) or 1.0
        err = float((g.double() - w).abs().max()) / scale
        tol = TOL[dtype] if what != "loss" else max(TOL[dtype], 1e-6)
        assert err <= tol, f"{what} ({dtype}, {layout}): relative error {err:.2e}"


@pytest.mark.skipif(not HAS_FUSED, reason="native extension without the fused kernels")
def test_relu_mask_and_empty_segment() -> None:
    # a segment without samples gives loss 0 and the gradient of the BN path alone, masked by the ReLU
    x, seg, tm, tv, gy, wl = _case((6, 3, 4, 4), 3, seed=5, seg=[0, 0, 2, 2, 0, 2])
    bn = _bn(3, seed=6)
    y, loss, grad = _run(x, seg, tm, tv, bn, True, gy, wl, "cpp")
    assert loss[1] == 0 and loss[0] > 0 and loss[2] > 0
    scale, shift = bn_eval_affine(bn)
    pre = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    assert bool((y[pre <= 0] == 0).all()) and bool((y[pre > 0] > 0).all())
    # only y used: the gradient is gy * scale where the pre-activation is positive, 0 elsewhere
    xx = x.clone().requires_grad_(True)
    y2, _ = bn_eval_segment_loss(xx, seg, tm, tv, scale, shift, relu=True, backend="cpp")
    (y2 * gy).sum().backward()
    want = torch.where(pre > 0, gy.double() * scale.double().view(1, -1, 1, 1), torch.zeros(()))
    torch.testing.assert_close(xx.grad.double(), want, rtol=1e-6, atol=1e-7)
    # only the loss used: the plain segment_bn_loss gradient
    xx = x.clone().requires_grad_(True)
    _, l2 = bn_eval_segment_loss(xx, seg, tm, tv, scale, shift, relu=True, backend="cpp")
    (l2.double() * wl).sum().backward()
    xr = x.clone().requires_grad_(True)
    (segment_bn_loss(xr, seg, tm, tv, backend="cpp").double() * wl).sum().backward()
    torch.testing.assert_close(xx.grad, xr.grad, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_FUSED, reason="native extension without the fused kernels")
@pytest.mark.parametrize("relu,pool,channels_last", [(False, 1, False), (True, 1, True), (True, 2, True),
                                                     (False, 2, False)])
def test_gradcheck_float64(relu: bool, pool: int, channels_last: bool) -> None:
    x, seg, tm, tv, _, _ = _case((5, 3, 5, 4), 2, seed=7, dtype=torch.float64,
                                 layout="channels_last" if channels_last else "contiguous")
    bn = _bn(3, seed=8, dtype=torch.float64)
    scale, shift = bn_eval_affine(bn)
    xx = x.clone().requires_grad_(True)

    def f(t):
        y, loss = bn_eval_segment_loss(t, seg, tm, tv, scale, shift, relu=relu, pool=pool, backend="cpp")
        return y, loss

    assert torch.autograd.gradcheck(f, (xx,), eps=1e-6, atol=1e-7)


def test_pool_needs_4d_input() -> None:
    x, seg, tm, tv, _, _ = _case((4, 3, 1, 5), 2)
    with pytest.raises(ValueError, match="pool=2 needs"):
        bn_eval_segment_loss(x, seg, tm, tv, torch.ones(3), torch.zeros(3), pool=2)


@pytest.mark.parametrize("arg,value,match", [
    ("scale", torch.ones(4), "scale has 4 channels"),
    ("shift", torch.ones(3, 1), "shift"),
    ("scale", torch.ones(3, dtype=torch.int64), "scale"),
    ("shift", torch.tensor([0.0, float("nan"), 1.0]), "shift"),
    ("pool", 3, "pool must be 1"),
])
def test_bad_affine(arg: str, value: torch.Tensor, match: str) -> None:
    x, seg, tm, tv, _, _ = _case((4, 3, 2, 2), 2)
    kwargs = {"scale": torch.ones(3), "shift": torch.zeros(3)}
    kwargs[arg] = value
    with pytest.raises((ValueError, TypeError), match=match):
        bn_eval_segment_loss(x, seg, tm, tv, **kwargs)


# ---- supervised_bn: the swapped teacher equals the original + hooks ------------------------------------------

def _teacher(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    model = ConvNet(num_classes=5, in_chans=1, image_size=16, width=12, depth=2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hooked_forward_backward(model, x, seg, targets):
    """The plain way: hooks on the BN inputs, torch's own BN / ReLU / pool, segment_bn_loss; backward of
    sum(logits^2) + the losses. Returns (logits, loss, x with its .grad)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    inputs: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for m in bns]
    xa = x.clone().requires_grad_(True)
    logits = model(xa)
    for h in handles:
        h.remove()
    loss = sum(segment_bn_loss(t, seg, tm, tv).sum() for t, (tm, tv) in zip(inputs, targets))
    (logits.square().sum() + loss).backward()
    return logits, loss, xa


@pytest.mark.parametrize("channels_last", [False, True])
def test_supervised_bn_equals_hooks_batchnorm_and_loss(channels_last: bool) -> None:
    model = _teacher()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(6, 1, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seg = torch.tensor([0, 0, 1, 1, 2, 2])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = [(torch.randn(3, m.num_features), torch.rand(3, m.num_features) + 0.5) for m in bns]
    logits, loss, xa = _hooked_forward_backward(model, x, seg, targets)
    before = [type(m) for m in model.modules()]
    xb = x.clone().requires_grad_(True)
    with supervised_bn(model, seg, targets) as layers:
        assert len(layers) == 2 and all(isinstance(m, SupervisedBN) and m.relu and m.pool == 2 for m in layers)
        # fused into the SupervisedBN layers
        assert not any(type(m) in (nn.ReLU, nn.AvgPool2d) for m in model.modules())
        logits2 = model(xb)
        loss2 = sum(m.pop_loss().sum() for m in layers)
        with pytest.raises(RuntimeError, match="no forward pass"):
            layers[0].pop_loss()
    (logits2.square().sum() + loss2).backward()
    assert [type(m) for m in model.modules()] == before  # restored
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-6)


def test_supervised_bn_refuses_training_mode_and_wrong_targets() -> None:
    model = _teacher()
    seg = torch.zeros(2, dtype=torch.int64)
    targets = [(torch.zeros(1, 12), torch.ones(1, 12))] * 2
    with pytest.raises(ValueError, match="targets"):
        with supervised_bn(model, seg, targets[:1]):
            pass
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        with supervised_bn(model, seg, targets):
            pass


# ---- thin_conv: GEMM + col2im input gradient ---------------------------------------------------------------

@pytest.mark.parametrize("cin,k,stride,padding,dilation", [(1, 3, 1, 1, 1), (3, 7, 2, 3, 1), (2, 3, 2, 0, 1),
                                                           (3, 5, 1, 2, 2), (4, 1, 1, 0, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_thin_conv_input_gradient(cin: int, k: int, stride: int, padding: int, dilation: int,
                                  channels_last: bool) -> None:
    torch.manual_seed(cin * 10 + k)
    conv = nn.Conv2d(cin, 8, k, stride=stride, padding=padding, dilation=dilation).requires_grad_(False)
    x = torch.randn(3, cin, 17, 15, dtype=torch.float64)
    conv = conv.double()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(conv(x))
    xa = x.clone().requires_grad_(True)
    (conv(xa) * g).sum().backward()
    xb = x.clone().requires_grad_(True)
    (ThinInputGradConv2d(conv)(xb) * g).sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-10, atol=1e-10)


def test_thin_conv_swap_under_bf16_autocast_and_restore() -> None:
    model = _teacher()
    x = torch.randn(4, 1, 16, 16)
    xa = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya = model(xa)
    ya.float().square().sum().backward()
    first = model.body[0]
    with thin_input_grad_convs(model) as swapped:
        assert swapped == 1 and isinstance(model.body[0], ThinInputGradConv2d)  # 12-channel convs are not thin
        xb = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = model(xb)
        assert yb.dtype == ya.dtype
        yb.float().square().sum().backward()
    assert model.body[0] is first
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)  # same forward kernels
    err = float((xb.grad - xa.grad).abs().max() / xa.grad.abs().max())
    assert err < 2e-2, err  # bf16 gradients, summed in another order


def test_thin_conv_skips_trainable_convs() -> None:
    model = _teacher()
    model.body[0].weight.requires_grad_(True)
    with thin_input_grad_convs(model) as swapped:
        assert swapped == 0


# ---- inference: bn_eval_act and fused_eval_bn ----------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("relu,pool", [(False, 1), (True, 1), (True, 2), (False, 2)])
def test_bn_eval_act_matches_batchnorm(backend: str, dtype: torch.dtype, layout: str, relu: bool, pool: int) -> None:
    x, *_ = _case((6, 70, 7, 6), 1, seed=11, dtype=dtype, layout=layout)
    bn = _bn(70, seed=12, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    want = _oracle(x, torch.zeros(6, dtype=torch.int64), torch.zeros(1, 70), torch.ones(1, 70), bn, relu,
                   torch.zeros(_pooled(x.shape, pool) or x.shape), torch.zeros(1, dtype=torch.float64), pool)[0]
    scale, shift = bn_eval_affine(bn)
    with torch.no_grad():
        y = bn_eval_act(x, scale, shift, relu=relu, pool=pool, backend=backend)
    assert y.dtype == dtype and y.shape == want.shape
    err = float((y.double() - want).abs().max() / want.abs().max())
    assert err <= TOL[dtype], err


def test_bn_eval_act_differentiable_when_recording() -> None:
    x, *_ = _case((4, 3, 4, 4), 1, seed=13, dtype=torch.float64)
    bn = _bn(3, seed=14, dtype=torch.float64)
    scale, shift = bn_eval_affine(bn)
    xx = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: bn_eval_act(t, scale, shift, relu=True, pool=2), (xx,))


@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_eval_bn_equals_model(channels_last: bool) -> None:
    model = _teacher()
    x = torch.randn(7, 1, 16, 16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        before = [type(m) for m in model.modules()]
        with fused_eval_bn(model) as n:
            assert n == 2 and not any(type(m) in (nn.BatchNorm2d, nn.ReLU, nn.AvgPool2d) for m in model.modules())
            got = model(x)
        assert [type(m) for m in model.modules()] == before
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fused_eval_bn_leaves_batch_statistics_bn_alone() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    with fused_eval_bn(model) as n:
        assert n == 0 and isinstance(model[1], nn.BatchNorm2d)


def test_evaluate_uses_fused_blocks_and_agrees() -> None:
    from lpqld_fast.evaluation import evaluate

    model = _teacher()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 16, 16), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.25
        labels = model(x).argmax(1)  # the plain model's predictions: accuracy 100% if evaluate agrees
        labels[:8] = (labels[:8] + 1) % 5  # and exactly 87.5% with these changed
    assert evaluate(model, images, labels, [0.5], [0.25], batch_size=16) == pytest.approx(87.5)
    assert all(type(m) is not EvalBN for m in model.modules())


@pytest.mark.parametrize("name,channels_last", [("resnet18-small", False), ("resnet18-small", True),
                                                ("resnet18", True)])
def test_supervised_bn_on_resnets_with_inplace_ops(name: str, channels_last: bool) -> None:
    # ResNet blocks apply ReLU(inplace=True) and `out += identity` to BN outputs: the swapped modules' outputs
    # must not be views (autograd refuses in-place ops on views returned by a multi-output Function)
    from lpqld_fast.models import get_model

    torch.manual_seed(0)
    model = get_model(name, num_classes=4, in_chans=3, image_size=32).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    model.requires_grad_(False)
    x = torch.randn(4, 3, 32, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    seg = torch.tensor([0, 0, 1, 1])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = [(torch.randn(2, m.num_features) * 0.1, torch.rand(2, m.num_features) + 0.5) for m in bns]
    logits, loss, xa = _hooked_forward_backward(model, x, seg, targets)
    xb = x.clone().requires_grad_(True)
    with supervised_bn(model, seg, targets) as layers:
        logits2 = model(xb)
        loss2 = sum(m.pop_loss().sum() for m in layers)
    (logits2.square().sum() + loss2).backward()
    torch.testing.assert_close(logits2, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss2, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-3, atol=1e-5)


CUDA_ALL = available_backends("cuda", NATIVE_OP) if torch.cuda.is_available() else []


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_ALL, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_ALL)
@pytest.mark.parametrize("name", ["4d", "one_sample", "many_segments", "wide", "long_rows"])
@pytest.mark.parametrize("relu,pool", [(False, 1), (True, 1), (True, 2)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_matches_batchnorm_relu_pool_and_loss(backend: str, name: str, relu: bool, pool: int,
                                                   layout: str) -> None:
    shape, segments = SHAPES[name]
    x, seg, tm, tv, gy, wl = _case(shape, segments, seed=len(name), layout=layout, gy_shape=_pooled(shape, pool))
    bn = _bn(shape[1], seed=3)
    want = _oracle(x, seg, tm, tv, bn, relu, gy, wl, pool)
    got = _run(x.cuda(), seg.cuda(), tm.cuda(), tv.cuda(), bn.cuda(), relu, gy.cuda(), wl.cuda(), backend, pool)
    for w, g, what in zip(want, got, ("y", "loss", "grad")):
        assert g.is_cuda and g.dtype == torch.float32
        scale = float(w.abs().max()) or 1.0
        err = float((g.double().cpu() - w).abs().max()) / scale
        assert err <= 1e-5, f"{what}: relative error {err:.2e}"
    y = bn_eval_act(x.cuda(), *bn_eval_affine(bn.cuda()), relu=relu, pool=pool, backend=backend)
    torch.testing.assert_close(y.double().cpu(), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_supervised_bn_equals_hooks() -> None:
    model = _teacher()
    x = torch.randn(6, 1, 16, 16)
    seg = torch.tensor([0, 0, 1, 1, 2, 2])
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = [(torch.randn(3, m.num_features), torch.rand(3, m.num_features) + 0.5) for m in bns]
    logits, loss, xa = _hooked_forward_backward(model, x, seg, targets)
    model = model.cuda()
    xb = x.cuda().requires_grad_(True)
    with supervised_bn(model, seg.cuda(), [(m.cuda(), v.cuda()) for m, v in targets]) as layers:
        logits2 = model(xb)
        loss2 = sum(m.pop_loss().sum() for m in layers)
    (logits2.square().sum() + loss2).backward()
    torch.testing.assert_close(logits2.cpu(), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss2.cpu(), loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xb.grad.cpu(), xa.grad, rtol=1e-3, atol=1e-5)


# ---- validate=False: the data checks run once per recover pass, not per forward -----------------------------

def test_validate_false_skips_only_the_data_checks() -> None:
    x, seg, tm, tv, _, _ = _case((6, 3, 4, 4), 2)
    bn = _bn(3, seed=1)
    bad_tm = tm.clone()
    bad_tm[0, 0] = float("nan")
    with pytest.raises(ValueError, match="target_mean contains NaN"):
        bn_eval_segment_loss(x, seg, bad_tm, tv, *bn_eval_affine(bn), backend="reference")
    y, loss = bn_eval_segment_loss(x, seg, bad_tm, tv, *bn_eval_affine(bn), backend="reference", validate=False)
    assert torch.isnan(loss).any() and torch.isfinite(y).all()  # the NaN went through unchecked
    with pytest.raises(ValueError, match="target_var must have shape"):  # structural checks stay
        segment_bn_loss(x, seg, tm, tv[:1], validate=False)


def test_supervised_bn_checks_ids_and_targets_once_per_pass(monkeypatch) -> None:
    from lpqld_fast.ops import _validate

    model = _teacher()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    targets = [(torch.randn(3, m.num_features), torch.rand(3, m.num_features) + 0.5) for m in bns]
    with pytest.raises(IndexError, match="segment id 3 outside"):
        with supervised_bn(model, torch.tensor([0, 3]), targets):
            pass
    bad = [(t.clone(), v) for t, v in targets]
    bad[1][0][0, 0] = float("inf")
    with pytest.raises(ValueError, match="target_mean contains NaN or inf"):
        with supervised_bn(model, torch.tensor([0, 1]), bad):
            pass
    calls = []
    real = _validate.check_index_range
    monkeypatch.setattr(_validate, "check_index_range", lambda *a, **k: (calls.append(a[0]), real(*a, **k)))
    x = torch.randn(4, 1, 16, 16)
    with supervised_bn(model, torch.tensor([0, 0, 1, 2]), targets) as layers:
        for _ in range(3):
            model(x)
            for m in layers:
                m.pop_loss()
    assert calls == ["segment_ids"] * len(bns)  # at the swap, none in the 3 forwards
