"""The native ops as torch.library custom ops: opcheck, torch.compile(fullgraph=True), gradient aliasing.

opcheck (schema, autograd registration, fake tensor, AOT dispatch with dynamic shapes) runs on every
lpqld::* op the public functions call, per device the extension has kernels for (CUDA cases skip
without a GPU), over a few shapes and dtypes including an edge case. The compile tests trace each public
op with fullgraph=True (a graph break fails) and compare the result and the gradients with eager.
The aliasing tests take a gradient twice with retain_graph, edit the first result in place and check
that the second is unchanged.
"""
from __future__ import annotations

import pytest
import torch

from lpqld_fast import ops
from lpqld_fast.ops._dispatch import native_available, native_has_cuda
from lpqld_fast.ops.reference import crop_resize_flip as crf_ref

pytestmark = [pytest.mark.skipif(not native_available(), reason="needs lpqld_fast._C (make build)"),
              pytest.mark.usefixtures("one_thread_module")]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not (torch.cuda.is_available() and native_has_cuda()), reason="needs a GPU and the CUDA build")]),
]
L = torch.ops.lpqld if native_available() else None




def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


FAST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor")
ALL_UTILS = FAST_UTILS + ("test_aot_dispatch_dynamic",)  # opcheck's default set


def _opcheck(op, args, *, dynamic=True):
    """opcheck raises OpCheckError naming the failed test. ``dynamic=False`` leaves out the AOT dispatch
    test (dynamic shapes), the slow one: the raw kernels under a public op take it in one case per op (they
    are traced again, with their fake implementations, every time the public op's opcheck runs)."""
    torch.library.opcheck(op, args, test_utils=ALL_UTILS if dynamic else FAST_UTILS)


# --------------------------------------------------------------------------- soft_label_kl


def _slkl_args(mode: int, b: int, c: int, k: int, device: str, *, logits_dtype=torch.float32, int8=False,
               grad=True, seed=0):
    """Kernel-form arguments of lpqld::soft_label_kl(_fwd) (mode codes: 0 dense, 1 mr, 2 mrs, 3 ms, 4 topk)."""
    g = _gen(seed)
    teacher = torch.randn(b, c, generator=g, dtype=torch.float64) * 3
    z = (torch.randn(b, c, generator=g, dtype=torch.float64) * 3).to(logits_dtype)
    idx = fill = scale = offset = None
    if mode == 0:
        v = teacher.float()
    else:
        idx = teacher.topk(k, dim=1).indices
        v = teacher.gather(1, idx)
        if mode in (3, 4):
            v = torch.softmax(teacher, dim=1).gather(1, idx)
        if mode == 2:
            fill = teacher.min(dim=1).values.float()
        v = v.float()
    if int8:
        lo, hi = v.min(dim=1).values, v.max(dim=1).values
        scale = ((hi - lo) / 255).clamp_min(1e-8).float()
        offset = (lo + 128 * scale).float()
        v = torch.round((v - offset[:, None]) / scale[:, None]).clamp(-128, 127).to(torch.int8)
    z = z.to(device).requires_grad_(grad)
    dev = [t.to(device) if t is not None else None for t in (v, idx, fill, scale, offset)]
    return (z, *dev, mode, 2.0, 0.7, 1.0)


SLKL_CASES = {
    "dense-f32": dict(mode=0, b=6, c=10, k=10),
    "mr-f64": dict(mode=1, b=5, c=12, k=3, logits_dtype=torch.float64),
    "mrs-int8": dict(mode=2, b=4, c=9, k=4, int8=True),
    "ms-bf16": dict(mode=3, b=3, c=16, k=5, logits_dtype=torch.bfloat16),
    "topk-one-class": dict(mode=4, b=2, c=1, k=1),  # edge: C = k = 1
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(SLKL_CASES))
def test_opcheck_soft_label_kl(device, case):
    _opcheck(L.soft_label_kl.default, _slkl_args(**SLKL_CASES[case], device=device))
    _opcheck(L.soft_label_kl_fwd.default, _slkl_args(**SLKL_CASES[case], device=device, grad=False),
             dynamic=case == "mr-f64")


# --------------------------------------------------------------------------- classwise_moments


def _moments_state(k: int, c: int, device: str):
    g = _gen(3)
    count = torch.randint(0, 5, (k,), generator=g).double().to(device)
    return count, torch.randn(k, c, generator=g, dtype=torch.float64).to(device), \
        torch.rand(k, c, generator=g, dtype=torch.float64).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype", [((6, 3, 5), torch.float32), ((4, 2, 1), torch.float64),
                                         ((5, 4, 7), torch.bfloat16), ((0, 3, 4), torch.float32)])
def test_opcheck_classwise_moments_accumulate_(device, shape, dtype):
    x = torch.randn(shape, generator=_gen(1)).to(dtype).to(device)
    labels = torch.randint(0, 3, (shape[0],), generator=_gen(2)).to(device)
    _opcheck(L.classwise_moments_accumulate_.default, (x, labels, *_moments_state(3, shape[1], device)))


# --------------------------------------------------------------------------- segment_bn_loss / bn_eval_*


def _segment_args(shape, s: int, device: str, *, dtype=torch.float32, channels_last=False, grad=True, seed=0):
    g = _gen(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    seg = torch.randint(0, max(s - 1, 1), (shape[0],), generator=g)  # the last segment stays empty
    tm = torch.randn(s, shape[1], generator=g, dtype=torch.float64)
    tv = torch.rand(s, shape[1], generator=g, dtype=torch.float64) + 0.5
    return x.to(device).requires_grad_(grad), seg.to(device), tm.to(device), tv.to(device)


SEGMENT_CASES = {
    "nchw-f32": dict(shape=(6, 3, 4, 5), s=3),
    "nhwc-f32": dict(shape=(6, 3, 4, 4), s=3, channels_last=True),
    "nc-f64": dict(shape=(5, 4), s=2, dtype=torch.float64),
    "bf16-one-sample": dict(shape=(1, 2, 3, 3), s=2, dtype=torch.bfloat16),  # edge: N = 1, an empty segment
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(SEGMENT_CASES))
def test_opcheck_segment_bn_loss(device, case):
    x, seg, tm, tv = _segment_args(**SEGMENT_CASES[case], device=device)
    _opcheck(L.segment_bn_loss.default, (x, seg, tm, tv))
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)
    x3 = x3 if device == "cpu" and not x3.is_contiguous() and x3.stride(1) == 1 else x3.contiguous()
    loss, mean, var, count = L.segment_bn_loss_fwd(x3, seg, tm, tv)
    dynamic = case == "nhwc-f32"
    _opcheck(L.segment_bn_loss_fwd.default, (x3, seg, tm, tv), dynamic=dynamic)
    _opcheck(L.segment_bn_loss_bwd.default, (torch.ones_like(loss), x3, seg, tm, tv, mean, var, count),
             dynamic=dynamic)


BN_EVAL_CASES = {
    "nhwc-relu-pool": dict(shape=(4, 3, 6, 4), s=3, channels_last=True, relu=True, pool=2),
    "nchw-relu": dict(shape=(4, 3, 5, 5), s=2, relu=True, pool=1),
    "nc-f64": dict(shape=(5, 4), s=2, dtype=torch.float64, relu=False, pool=1),
    "one-channel-odd-pool": dict(shape=(3, 1, 5, 3), s=2, relu=False, pool=2),  # edge: C = 1, odd H / W
}


def _bn_eval_args(case, device, grad=True):
    kw = dict(BN_EVAL_CASES[case])
    relu, pool = kw.pop("relu"), kw.pop("pool")
    x, seg, tm, tv = _segment_args(**kw, device=device, grad=grad)
    scale = torch.rand(x.shape[1], generator=_gen(5), dtype=torch.float64).to(x.dtype).to(device) + 0.5
    shift = torch.randn(x.shape[1], generator=_gen(6), dtype=torch.float64).to(x.dtype).to(device)
    return x, seg, tm, tv, scale, shift, relu, pool


@pytest.mark.parametrize("case", list(BN_EVAL_CASES))
def test_opcheck_bn_eval_segment_loss(case):  # CPU kernels only
    args = _bn_eval_args(case, "cpu")
    _opcheck(L.bn_eval_segment_loss.default, args)
    x, seg, tm, tv, scale, shift, relu, pool = args
    x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)
    x3 = x3 if not x3.is_contiguous() else x3.contiguous()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s, b = scale.to(acc), shift.to(acc)
    y3 = torch.empty_like(x3)
    dynamic = case == "nhwc-relu-pool"
    _opcheck(L.bn_eval_act.default, (x3, s, b, relu, y3), dynamic=dynamic)
    loss, mean, var, count = L.segment_bn_loss_fwd(x3, seg, tm, tv)
    if pool == 2:
        n, c, h, w = x.shape
        y = torch.empty(n, c, h // 2, w // 2, dtype=x.dtype, memory_format=torch.channels_last)
        _opcheck(L.bn_eval_act_pool2.default, (x3, s, b, relu, w, y.view(n, c, -1)), dynamic=dynamic)
        gy = torch.randn(y.shape, generator=_gen(7)).to(x.dtype).contiguous(memory_format=torch.channels_last)
        gy3, width = gy.view(n, c, -1), w
    else:
        gy3, width = torch.randn(x3.shape, generator=_gen(7)).to(x.dtype), 0
        gy3 = gy3.transpose(1, 2).contiguous().transpose(1, 2) if not x3.is_contiguous() else gy3
    _opcheck(L.segment_bn_loss_bwd_bn_eval.default,
             (torch.ones_like(loss), x3, seg, tm, tv, mean, var, count, gy3, s, b, relu, width, pool),
             dynamic=dynamic)


# --------------------------------------------------------------------------- crop_resize_flip / batched_roll


def _crop_args(n, c, h, w, out, device, *, dtype=torch.float32, grad=True, full=False, seed=0):
    g = _gen(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64)
    x = (x * 255).round().to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1) if full else torch.rand(n, 4, generator=g) * 0.5
    pix = crf_ref.pixel_boxes(boxes, h, w)
    flips = torch.arange(n) % 2 == 0
    x = x.to(device).requires_grad_(grad and dtype != torch.uint8)
    return x, pix.to(device), flips.to(device), out[0], out[1]


CROP_CASES = {
    "f32-up": dict(n=3, c=2, h=8, w=6, out=(10, 9)),
    "f64-down": dict(n=2, c=3, h=9, w=11, out=(4, 5), dtype=torch.float64),
    "bf16": dict(n=2, c=1, h=6, w=6, out=(5, 7), dtype=torch.bfloat16),
    "uint8-no-grad": dict(n=2, c=3, h=7, w=5, out=(6, 6), dtype=torch.uint8),
    "full-box-1x1": dict(n=1, c=1, h=4, w=4, out=(1, 1), full=True),  # edge: identity box, 1x1 output
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CROP_CASES))
def test_opcheck_crop_resize_flip(device, case):
    x, pix, flips, oh, ow = _crop_args(**CROP_CASES[case], device=device)
    _opcheck(L.crop_resize_flip.default, (x, pix, flips, oh, ow))
    if x.dtype != torch.uint8:
        g = torch.randn(x.shape[0], x.shape[1], oh, ow, generator=_gen(4)).to(x.dtype).to(device)
        _opcheck(L.crop_resize_flip_backward.default, (g, pix, flips, x.shape[2], x.shape[3]),
                 dynamic=case == "f32-up")


@pytest.mark.parametrize("shape,dtype,grad", [((3, 2, 5, 7), torch.float32, True),
                                              ((2, 1, 4, 4), torch.float64, True),
                                              ((2, 3, 3, 6), torch.uint8, False),
                                              ((0, 2, 3, 3), torch.float32, True)])  # edge: empty batch
def test_opcheck_batched_roll(shape, dtype, grad):  # CPU kernel only
    x = (torch.rand(shape, generator=_gen(1)) * 100).to(dtype).requires_grad_(grad)
    shifts = torch.tensor([[-7, 3], [2, -9], [11, 0]])[: shape[0]]
    _opcheck(L.batched_roll.default, (x, shifts))


# --------------------------------------------------------------------------- torch.compile(fullgraph=True)
#
# backend="aot_eager": AOTAutograd traces forward and backward through the ops' fake implementations and
# autograd formulas exactly as inductor would, without inductor's C++ codegen and compiler runs: a cold
# inductor compile of the one small soft_label_kl graph below took 60 s on the 2-core CI host (0.2-1.5 s per
# op with aot_eager), so the inductor test is marked slow (make test-all).


def _compiled(fn, backend="aot_eager"):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend)


def _check_compiled(fn, inputs, backend="aot_eager", atol=0.0, rtol=0.0):
    """fn(*inputs) compiled gives eager's outputs, and the same gradients w.r.t. the inputs needing one."""
    def run(f):
        ins = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
               for t in inputs]
        out = f(*ins)
        outs = out if isinstance(out, tuple) else (out,)
        diff = [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]
        grads = []
        if diff:
            w = [torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype).view(o.shape) for o in diff]
            total = sum((o * wi).sum() for o, wi in zip(diff, w))
            leaves = [t for t in ins if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad(total, leaves)
        return [o.detach() if isinstance(o, torch.Tensor) else o for o in outs], grads

    want_out, want_grads = run(fn)
    got_out, got_grads = run(_compiled(fn, backend))
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert len(got_grads) == len(want_grads)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    return want_grads


def test_compile_soft_label_kl():
    z, v, idx, fill, _, _, *_ = _slkl_args(2, 6, 20, 5, "cpu")
    grads = _check_compiled(
        lambda z, v, idx, fill: ops.soft_label_kl(z * 1.5, v, idx, mode="mrs", T=2.0, t_s=0.7, fill=fill) * 2,
        [z, v, idx, fill])
    assert len(grads) == 1 and grads[0].abs().sum() > 0


@pytest.mark.slow
def test_compile_inductor_soft_label_kl():
    z, v, idx, *_ = _slkl_args(1, 4, 12, 3, "cpu")
    _check_compiled(lambda z, v, idx: ops.soft_label_kl(z, v, idx, mode="mr", T=2.0, t2_scale=True),
                    [z, v, idx], backend="inductor", atol=1e-6, rtol=1e-5)


def test_compile_classwise_moments():
    x = torch.randn(8, 3, 4, 4, generator=_gen(1))
    labels = torch.randint(0, 4, (8,), generator=_gen(2))
    _check_compiled(lambda x, labels: tuple(ops.classwise_moments(x, labels, 4, validate=False)), [x, labels])


@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_segment_bn_loss(channels_last):
    x, seg, tm, tv = _segment_args((6, 3, 4, 4), 3, "cpu", channels_last=channels_last)
    grads = _check_compiled(lambda x, seg, tm, tv: ops.segment_bn_loss(x.relu(), seg, tm, tv, validate=False),
                            [x, seg, tm, tv])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("case", ["nhwc-relu-pool", "nchw-relu"])
def test_compile_bn_eval_segment_loss(case):
    x, seg, tm, tv, scale, shift, relu, pool = _bn_eval_args(case, "cpu")
    fn = lambda x, seg, tm, tv, scale, shift: ops.bn_eval_segment_loss(  # noqa: E731
        x, seg, tm, tv, scale, shift, relu=relu, pool=pool, validate=False)
    grads = _check_compiled(fn, [x, seg, tm, tv, scale, shift])
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("grad", [False, True])
def test_compile_bn_eval_act(grad):
    x, _, _, _, scale, shift, relu, pool = _bn_eval_args("nhwc-relu-pool", "cpu", grad=grad)
    _check_compiled(lambda x, scale, shift: ops.bn_eval_act(x, scale, shift, relu=relu, pool=pool, validate=False),
                    [x, scale, shift])


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_compile_crop_resize_flip(dtype):
    x, pix, flips, _, _ = _crop_args(3, 2, 8, 6, (5, 7), "cpu", dtype=dtype)
    boxes = torch.rand(3, 4, generator=_gen(9)) * 0.5
    _check_compiled(lambda x, boxes, flips: ops.crop_resize_flip(x, boxes, flips, (5, 7), validate=False) * 2,
                    [x, boxes, flips])


def test_compile_batched_roll():
    x = torch.randn(3, 2, 5, 6, generator=_gen(1), requires_grad=True)
    shifts = torch.tensor([[-7, 3], [2, -9], [11, 0]])
    _check_compiled(lambda x, shifts: ops.batched_roll(x * 2, shifts), [x, shifts])


# --------------------------------------------------------------------------- gradient aliasing


def _aliasing_cases():
    """(name, make) -> make() returns (output to differentiate, the input its gradient is taken for)."""
    def slkl(backend):
        def make():
            z, v, idx, fill, *_ = _slkl_args(2, 5, 12, 4, "cpu")
            return ops.soft_label_kl(z, v, idx, mode="mrs", T=2.0, fill=fill, backend=backend), z
        return make

    def segment():
        x, seg, tm, tv = _segment_args((4, 3, 3, 3), 2, "cpu")
        return ops.segment_bn_loss(x, seg, tm, tv).sum(), x

    def bn_eval():
        x, seg, tm, tv, scale, shift, relu, pool = _bn_eval_args("nhwc-relu-pool", "cpu")
        y, loss = ops.bn_eval_segment_loss(x, seg, tm, tv, scale, shift, relu=relu, pool=pool)
        return y.sum() + loss.sum(), x

    def crop():
        x, pix, flips, oh, ow = _crop_args(2, 2, 6, 6, (4, 4), "cpu")
        return ops.crop_resize_flip(x, torch.rand(2, 4, generator=_gen(3)) * 0.5, flips, (oh, ow)).sum(), x

    def roll():
        x = torch.randn(2, 2, 4, 5, generator=_gen(1), requires_grad=True)
        return ops.batched_roll(x, torch.tensor([[1, -2], [3, 4]])).sum(), x

    backends = ops.available_backends("cpu", "soft_label_kl_fwd")
    cases = [(f"soft_label_kl-{b}", slkl(b)) for b in backends]
    cases += [("segment_bn_loss", segment), ("bn_eval_segment_loss", bn_eval), ("crop_resize_flip", crop),
              ("batched_roll", roll)]
    return cases


@pytest.mark.parametrize("name,make", _aliasing_cases(), ids=[n for n, _ in _aliasing_cases()])
def test_gradient_is_not_shared_across_backward_calls(name, make):
    """With retain_graph, editing a returned gradient in place (here through .data) leaves the next call's
    gradient untouched: no backward hands out a tensor it keeps."""
    out, x = make()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    want = g1.clone()
    g1.data.mul_(0).add_(1234.5)
    (g2,) = torch.autograd.grad(out, x, retain_graph=True)
    torch.testing.assert_close(g2, want, atol=0, rtol=0)
    (g3,) = torch.autograd.grad(out, x)  # the last pass frees the graph
    torch.testing.assert_close(g3, want, atol=0, rtol=0)
