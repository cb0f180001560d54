"""segment_bn_loss: every backend vs the plain-PyTorch oracle (loss and grad), gradcheck, bad inputs.

Run with TRITON_INTERPRET=1 to include the Triton kernels on CPU tensors
(`make test` does). CUDA tests skip without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from lpqld_fast.ops import force_backend, segment_bn_loss
from lpqld_fast.ops._dispatch import available_backends
from lpqld_fast.ops.reference import segment_bn_loss as ref
from lpqld_fast.ops.segment_bn_loss import NATIVE_OP

CPU_FAST = [b for b in available_backends("cpu", NATIVE_OP) if b != "reference"]
CPU_ALL = ["reference"] + CPU_FAST
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _make(shape, num_segments, *, seg=None, mean=0.0, std=1.0, seed=0, dtype=torch.float32, device="cpu"):
    """x, segment_ids, targets near the data's statistics (loss O(std)), upstream weights."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * std + mean).to(dtype)
    if seg is None:
        seg = torch.randint(0, num_segments, (shape[0],), generator=g)
    seg = torch.as_tensor(seg)
    c = shape[1]
    tm = mean + 0.5 * std * torch.randn(num_segments, c, generator=g)
    tv = std**2 * (1.0 + 0.5 * torch.rand(num_segments, c, generator=g))
    w = torch.randn(num_segments, generator=g, dtype=torch.float64)
    return x.to(device), seg.to(device), tm.to(device), tv.to(device), w.to(device)


def _loss_and_grad(x, seg, tm, tv, w, backend):
    xx = x.detach().clone().requires_grad_(True)
    loss = segment_bn_loss(xx, seg, tm, tv, backend=backend)
    (loss.double() * w).sum().backward()
    return loss.detach(), xx.grad


def _oracle(x, seg, tm, tv, w):
    """The reference on the float64 copy of x: exact loss and gradient of the given data."""
    xx = x.detach().double().requires_grad_(True)
    loss = ref.segment_bn_loss(xx, seg, tm, tv)
    (loss * w).sum().backward()
    return loss.detach(), xx.grad


def _tol(dtype):
    # gradients are stored in x's dtype: allow a couple of its ulps relative to the largest entry
    return {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _compare(x, seg, tm, tv, w, backend):
    loss, grad = _loss_and_grad(x, seg, tm, tv, w, backend)
    want_loss, want_grad = _oracle(x, seg, tm, tv, w)
    assert loss.dtype == ref.out_dtype_for(x.dtype)
    assert grad.dtype == x.dtype and grad.shape == x.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    ltol = 1e-12 if x.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(loss.double(), want_loss, rtol=ltol, atol=ltol * (1 + want_loss.abs().max().item()))
    scale = want_grad.abs().max().item() + 1e-30
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=_tol(x.dtype) * scale)
    return loss, grad


CASES = {
    # name: (shape, S, segment ids or None for random)
    "4d": ((24, 8, 5, 5), 6, None),
    "2d": ((40, 16), 5, None),
    "n1": ((1, 8, 4, 4), 3, [1]),
    "one_sample_segments": ((6, 4, 3, 3), 6, [3, 0, 5, 1, 4, 2]),
    "empty_segments": ((10, 4, 3, 3), 8, [0, 3, 7, 3, 0, 0, 7, 3, 3, 0]),
    "s1": ((12, 8, 6, 6), 1, None),
    "odd_spatial": ((5, 3, 7, 9), 2, None),
    "5d": ((6, 3, 2, 3, 4), 3, None),
    "long_rows": ((3, 2, 50, 50), 2, [0, 1, 0]),  # L = 2500: several chunks / blocks per row
}


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(backend: str, name: str) -> None:
    shape, s, seg = CASES[name]
    x, seg, tm, tv, w = _make(shape, s, seg=seg)
    loss, grad = _compare(x, seg, tm, tv, w, backend)
    counts = torch.bincount(seg, minlength=s)
    assert (loss[counts == 0] == 0).all()


@pytest.mark.parametrize("backend", CPU_ALL)
def test_empty_segment_gives_zero_and_one_sample_segment_is_exact(backend: str) -> None:
    x, seg, tm, tv, w = _make((3, 4, 2, 2), 4, seg=[0, 2, 2])
    loss, grad = _loss_and_grad(x, seg, tm, tv, w, backend)
    assert loss[1] == 0 and loss[3] == 0
    # one sample: mean/var over its spatial positions only
    mu0 = x[0].double().mean(dim=(1, 2))
    var0 = x[0].double().var(dim=(1, 2), correction=0)
    want0 = torch.linalg.vector_norm(tm[0].double() - mu0) + torch.linalg.vector_norm(tv[0].double() - var0)
    assert loss[0].item() == pytest.approx(want0.item(), rel=1e-6)


@pytest.mark.parametrize("backend", CPU_FAST)
def test_many_segments(backend: str) -> None:
    # S = 1000 for the native kernels; the Triton interpreter runs one program per segment, so fewer there
    s = 1000 if backend != "triton" else 48
    n = int(1.5 * s)
    g = torch.Generator().manual_seed(1)
    seg = torch.randint(0, s, (n,), generator=g)  # some segments empty, some with several samples
    # 2-D x keeps the oracle's per-segment autograd buffers below ATen's parallel grain (fast on a busy machine)
    x, seg, tm, tv, w = _make((n, 8), s, seg=seg)
    _compare(x, seg, tm, tv, w, backend)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("layout", ["strided", "channels_last", "transposed"])
def test_non_contiguous_x(backend: str, layout: str) -> None:
    x, seg, tm, tv, w = _make((8, 6, 10, 12), 3)
    if layout == "strided":
        x = x[:, :, ::2, 1:]
    elif layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3)
    assert not x.is_contiguous()
    _compare(x, seg, tm, tv, w, backend)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("mean,shape", [(1e4, (16, 4, 6, 6)), (-3e5, (16, 4, 6, 6)), (1e4, (6, 3, 30, 30)),
                                        (-2e4, (3, 2, 50, 50)),
                                        # >= 16 channels: short rows reduced a vector of rows at a time (7x7,
                                        # 16x16, 3x3 maps), with channels left over past the last full vector
                                        (1e4, (8, 20, 7, 7)), (-3e3, (4, 33, 16, 16)), (5e3, (6, 17, 3, 3))])
def test_large_means(backend: str, mean: float, shape: tuple[int, ...]) -> None:
    # |mean| >> std: naive sum / sum-of-squares in float32 would lose the variance entirely
    # (short rows, rows of one chunk, rows of several chunks)
    x, seg, tm, tv, w = _make(shape, 3, mean=mean, std=0.5, seed=len(shape) + shape[-1])
    loss, grad = _compare(x, seg, tm, tv, w, backend)
    assert (loss[torch.bincount(seg, minlength=3) > 0] > 0).all()


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("shape", [(8, 3, 5, 5), (4, 2, 20, 20), (2, 2, 50, 50)])
def test_outlier_first_element(backend: str, shape: tuple[int, ...]) -> None:
    # kernels shift each row by its first value before summing: make that value far from the row mean
    x, seg, tm, tv, w = _make(shape, 2, mean=100.0, std=1.0, seed=7)
    x[..., 0, 0] = 100.0 + 60.0 * torch.sign(torch.randn(shape[:2], generator=torch.Generator().manual_seed(8)))
    _compare(x, seg, tm, tv, w, backend)


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(10, 8, 4, 4), (10, 24, 7, 7)])
def test_dtypes(backend: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x, seg, tm, tv, w = _make(shape, 3, mean=0.3, dtype=dtype)
    _compare(x, seg, tm, tv, w, backend)


@pytest.mark.parametrize("backend", CPU_ALL)
@pytest.mark.parametrize("seg_dtype", [torch.int32, torch.int16, torch.uint8])
def test_segment_id_dtypes(backend: str, seg_dtype: torch.dtype) -> None:
    x, seg, tm, tv, w = _make((6, 3, 2, 2), 3, seg=[0, 1, 2, 2, 1, 0])
    want = segment_bn_loss(x, seg, tm, tv, backend="reference")
    got = segment_bn_loss(x, seg.to(seg_dtype), tm, tv, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_ALL)
def test_zero_norm_has_zero_gradient(backend: str) -> None:
    # segment 0: constant x equal to its targets -> both norms exactly 0 -> loss 0, gradient 0 (not NaN)
    # segment 1: only the variance term is 0 -> gradient from the mean term alone
    x = torch.full((4, 3, 2, 2), 2.0)
    x[2:] = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) / 8
    seg = torch.tensor([0, 0, 1, 1])
    mu1, var1 = x[2:].double().mean(dim=(0, 2, 3)), x[2:].double().var(dim=(0, 2, 3), correction=0)
    tm = torch.stack([torch.full((3,), 2.0, dtype=torch.float64), mu1 + 1.0])
    tv = torch.stack([torch.zeros(3, dtype=torch.float64), var1])
    xx = x.clone().requires_grad_(True)
    loss = segment_bn_loss(xx, seg, tm, tv, backend=backend)
    loss.sum().backward()
    assert loss[0] == 0
    assert loss[1].item() == pytest.approx(math.sqrt(3.0), rel=1e-5)
    assert torch.isfinite(xx.grad).all()
    assert (xx.grad[:2] == 0).all()
    # d||mu - tm||/dx = (mu - tm) / ||mu - tm|| / n = -1/sqrt(3) / 8 per element (var term ~ 0)
    torch.testing.assert_close(xx.grad[2:], torch.full_like(xx.grad[2:], -1 / math.sqrt(3) / 8), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_ALL)
def test_no_samples(backend: str) -> None:
    x = torch.zeros(0, 4, 3, 3, requires_grad=True)
    tm, tv = torch.zeros(3, 4), torch.ones(3, 4)
    loss = segment_bn_loss(x, torch.zeros(0, dtype=torch.int64), tm, tv, backend=backend)
    assert loss.shape == (3,) and (loss == 0).all()
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_ALL)
def test_targets_are_constants(backend: str) -> None:
    x, seg, tm, tv, w = _make((6, 3, 2, 2), 2)
    tm.requires_grad_(True)
    tv.requires_grad_(True)
    xx = x.clone().requires_grad_(True)
    segment_bn_loss(xx, seg, tm, tv, backend=backend).sum().backward()
    assert tm.grad is None and tv.grad is None and xx.grad is not None
    # x without requires_grad: plain forward
    out = segment_bn_loss(x, seg, tm, tv, backend=backend)
    assert not out.requires_grad


@pytest.mark.parametrize("backend", [b for b in ("reference", "cpp") if b in CPU_ALL])
def test_gradcheck_float64(backend: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    seg = torch.tensor([0, 2, 2, 0, 2])  # segment 1 empty
    tm = torch.randn(3, 3, dtype=torch.float64, generator=g)
    tv = torch.rand(3, 3, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: segment_bn_loss(t, seg, tm, tv, backend=backend), (x,))
    # 2-D x, a one-sample segment (2) and a two-sample one (0)
    x2 = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    seg2 = torch.tensor([1, 0, 1, 2, 0, 1, 1])
    tm2 = torch.randn(3, 4, dtype=torch.float64, generator=g)
    tv2 = torch.rand(3, 4, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda t: segment_bn_loss(t, seg2, tm2, tv2, backend=backend), (x2,))


def test_auto_backend_and_force_backend() -> None:
    x, seg, tm, tv, _ = _make((6, 3, 2, 2), 2)
    want = segment_bn_loss(x, seg, tm, tv, backend="reference")
    torch.testing.assert_close(segment_bn_loss(x, seg, tm, tv), want, rtol=1e-6, atol=1e-6)
    with force_backend("reference"):
        torch.testing.assert_close(segment_bn_loss(x, seg, tm, tv), want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- bad input


def _good():
    x, seg, tm, tv, _ = _make((6, 3, 2, 2), 3, seg=[0, 1, 2, 0, 1, 2])
    return {"x": x, "segment_ids": seg, "target_mean": tm, "target_var": tv}


def _bad_seg_value(v):
    seg = torch.tensor([0, 1, 2, 0, 1, 2])
    seg[4] = v
    return seg


BAD = [
    # (argument, bad value, exception)
    ("x", [[1.0]], TypeError),
    ("x", torch.ones(6, 3, 2, 2, dtype=torch.int64), ValueError),
    ("x", torch.ones(6), ValueError),
    ("x", torch.ones(6, 0, 2), ValueError),
    ("x", torch.ones(6, 3, 0, 2), ValueError),
    ("segment_ids", [0, 1, 2, 0, 1, 2], TypeError),
    ("segment_ids", torch.zeros(6), ValueError),
    ("segment_ids", torch.zeros(6, 1, dtype=torch.int64), ValueError),
    ("segment_ids", torch.zeros(5, dtype=torch.int64), ValueError),
    ("segment_ids", torch.zeros(6, dtype=torch.int64, device="meta"), ValueError),
    ("segment_ids", _bad_seg_value(3), IndexError),
    ("segment_ids", _bad_seg_value(-1), IndexError),
    ("target_mean", "mean", TypeError),
    ("target_mean", torch.zeros(3, 3, dtype=torch.int32), ValueError),
    ("target_mean", torch.zeros(3), ValueError),
    ("target_mean", torch.zeros(0, 3), ValueError),
    ("target_mean", torch.zeros(3, 5), ValueError),  # C differs from x's channels
    ("target_mean", torch.zeros(3, 3, device="meta"), ValueError),
    ("target_mean", torch.tensor([[0.0, float("nan"), 0.0]] * 3), ValueError),
    ("target_mean", torch.tensor([[0.0, float("inf"), 0.0]] * 3), ValueError),
    ("target_var", None, TypeError),
    ("target_var", torch.zeros(3, 3, dtype=torch.bool), ValueError),
    ("target_var", torch.ones(3, 4), ValueError),
    ("target_var", torch.ones(2, 3), ValueError),
    ("target_var", torch.tensor([[1.0, 1.0, float("-inf")]] * 3), ValueError),
    ("target_var", torch.tensor([[1.0, float("nan"), 1.0]] * 3), ValueError),
]


@pytest.mark.parametrize("arg,value,exc", BAD, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(BAD)])
def test_bad_input(arg: str, value, exc) -> None:
    kwargs = _good()
    kwargs[arg] = value
    with pytest.raises(exc, match=arg):
        segment_bn_loss(kwargs["x"], kwargs["segment_ids"], kwargs["target_mean"], kwargs["target_var"])


def test_bad_backend() -> None:
    kw = _good()
    with pytest.raises(ValueError, match="backend"):
        segment_bn_loss(**kw, backend="numpy")
    with pytest.raises(RuntimeError, match="cuda"):
        segment_bn_loss(**kw, backend="cuda")


@pytest.mark.skipif("cpp" not in CPU_ALL, reason="native extension not built")
def test_native_op_rejects_out_of_range_ids() -> None:
    # the C++ op checks on its own (direct callers bypass the Python validation)
    x = torch.randn(4, 2, 3)
    tm, tv = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(IndexError, match="segment_ids"):
        torch.ops.lpqld.segment_bn_loss_fwd(x, torch.tensor([0, 1, 2, 0]), tm, tv)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.lpqld.segment_bn_loss_fwd(x.transpose(0, 1), torch.tensor([0, 1]), tm, tv)


NLC_CASES = [
    # (shape [N, C, H, W], S, mean, std): C over the 64-channel task block and not a multiple of it, C = 1,
    # L = 1, long rows (many 16-row folds), |mean| >> std
    ((12, 130, 5, 5), 3, 0.2, 1.0),
    ((7, 1, 6, 6), 2, 0.0, 1.0),
    ((9, 70, 1, 1), 4, 0.0, 1.0),
    ((3, 64, 50, 50), 2, 0.0, 1.0),
    ((16, 40, 6, 6), 3, 1e4, 0.5),
    ((6, 3, 30, 30), 3, -3e4, 0.5),  # float16 holds |x| < 65504
]


@pytest.mark.skipif("cpp" not in CPU_ALL, reason="native extension not built")
@pytest.mark.parametrize("case", range(len(NLC_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_native_op_reads_channels_last_in_place(case: int, dtype: torch.dtype) -> None:
    """A channels_last x viewed [N, C, L] (strides (C*L, 1, C)) goes to the CPU kernels as it is: the moments
    and the gradient equal those of the contiguous copy, and the gradient comes back in x's layout."""
    shape, s, mean, std = NLC_CASES[case]
    x, seg, tm, tv, _ = _make(shape, s, mean=mean, std=std, seed=case, dtype=dtype)
    n, c = shape[:2]
    x3 = x.contiguous(memory_format=torch.channels_last).reshape(n, c, -1)
    if c > 1 and x3.shape[2] > 1:  # else both layouts are the same contiguous tensor
        assert not x3.is_contiguous() and x3.stride() == (c * x3.shape[2], 1, c)
    xc = x3.contiguous()
    tm, tv = tm.double(), tv.double()
    got = torch.ops.lpqld.segment_bn_loss_fwd(x3, seg, tm, tv)
    want = torch.ops.lpqld.segment_bn_loss_fwd(xc, seg, tm, tv)
    assert torch.equal(got[3], want[3])
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # float sums in another order: rounding only
    for a, b in zip(got[:3], want[:3]):  # loss, mean, var
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * (1.0 + b.abs().max().item()))
    g = torch.randn(s, dtype=torch.float64, generator=torch.Generator().manual_seed(case))
    gx = torch.ops.lpqld.segment_bn_loss_bwd(g, x3, seg, tm, tv, *want[1:])
    gc = torch.ops.lpqld.segment_bn_loss_bwd(g, xc, seg, tm, tv, *want[1:])
    assert gx.stride() == x3.stride()
    if dtype == torch.float64:  # the contiguous path's AVX2/AVX-512 clone contracts to an FMA, this one may not
        torch.testing.assert_close(gx, gc, rtol=1e-14, atol=1e-14 * gc.abs().max().item())
    else:
        assert torch.equal(gx, gc)  # products in double, one rounding: the same bits in either layout


@pytest.mark.parametrize("backend", CPU_FAST)
@pytest.mark.parametrize("case", range(len(NLC_CASES)))
def test_channels_last_matches_oracle(backend: str, case: int) -> None:
    shape, s, mean, std = NLC_CASES[case]
    x, seg, tm, tv, w = _make(shape, s, mean=mean, std=std, seed=case)
    _compare(x.contiguous(memory_format=torch.channels_last), seg, tm, tv, w, backend)


# ----------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("name", ["4d", "2d", "empty_segments", "s1", "long_rows"])
def test_cuda_matches_reference(name: str) -> None:
    shape, s, seg = CASES[name]
    x, seg, tm, tv, w = _make(shape, s, seg=seg, device="cuda")
    for backend in available_backends("cuda", NATIVE_OP):
        if backend != "reference":
            _compare(x, seg, tm, tv, w, backend)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_dtypes_large_mean_many_segments(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(5)
    seg = torch.randint(0, 1000, (1500,), generator=g)
    for mean in (0.0, 1e4 if dtype != torch.float16 else 1e3):
        x, seg_, tm, tv, w = _make((1500, 8, 3, 3), 1000, seg=seg, mean=mean, dtype=dtype, device="cuda")
        for backend in available_backends("cuda", NATIVE_OP):
            if backend != "reference":
                _compare(x, seg_, tm, tv, w, backend)


@needs_cuda
def test_cuda_gradcheck() -> None:
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, device="cuda", requires_grad=True)
    seg = torch.tensor([0, 2, 2, 0, 2], device="cuda")
    tm = torch.randn(3, 3, dtype=torch.float64, device="cuda")
    tv = torch.rand(3, 3, dtype=torch.float64, device="cuda")
    for backend in available_backends("cuda", NATIVE_OP):
        assert torch.autograd.gradcheck(lambda t: segment_bn_loss(t, seg, tm, tv, backend=backend), (x,))


@pytest.mark.parametrize("backend", CPU_ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_gradient_keeps_the_layout(backend: str, dtype: torch.dtype) -> None:
    # recover feeds NHWC (bf16) BN inputs; the gradient must come back NHWC so autograd's sum with the
    # BN path's NHWC gradient is a dense add, and equal the reference's values.
    x, seg, tm, tv, w = _make((6, 5, 3, 4), 3, seg=[0, 1, 2, 2, 1, 0])
    x = x.to(dtype)
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    (segment_bn_loss(xc, seg, tm, tv, backend=backend).float() * w).sum().backward()
    (segment_bn_loss(xr, seg, tm, tv, backend="reference").float() * w).sum().backward()
    assert xc.grad.dtype == dtype
    if backend != "reference":
        assert xc.grad.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(xc.grad.float(), xr.grad.float(), rtol=tol, atol=tol)


@pytest.mark.skipif("cpp" not in CPU_ALL, reason="native extension not built")
@pytest.mark.parametrize("shape", [(40, 24, 7, 7), (6, 20, 40, 40)])
def test_threads_split_samples_same_bits(shape: tuple[int, ...]) -> None:
    # 4 threads: the backward's row ranges start and end inside a sample (runs of channels), the forward's
    # tasks are (segment, channel block): both must give the 1-thread bits
    x, seg, tm, tv, w = _make(shape, 3, mean=2.0)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = _loss_and_grad(x, seg, tm, tv, w, "cpp")
        torch.set_num_threads(4)
        got = _loss_and_grad(x, seg, tm, tv, w, "cpp")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    _compare(x, seg, tm, tv, w, "cpp")
