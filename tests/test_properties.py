"""Property-based tests (hypothesis): every op against its reference, every backend that runs here.

Random shapes (empty and single-element included), dtypes, strides
(sliced, transposed, channels_last), class counts up to 10,450 and extreme
values (large means, huge and tiny logits, temperatures 0.01..100). The
hand-picked cases live in the per-op test files; this file searches the space
between them. Profiles (tests/conftest.py): "ci" by default, "thorough" with
LPQLD_HYPOTHESIS_PROFILE=thorough. Triton runs on CPU tensors only under
TRITON_INTERPRET=1 (as in `make test`), with smaller problems and fewer examples.

Tolerances follow an error model rather than one constant: the fast kernels
compute in float32 (float64 for float64 inputs), so an exponent z / t_s carries
an absolute rounding error of about eps * |z| / t_s; the soft-label checks
scale their bounds by that magnitude (at |z| / t_s ~ 1e6 float32 cannot
resolve the softmax, and the check reduces to "finite and bounded").
"""
from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lpqld_fast.ops import (  # noqa: E402
    ClasswiseMomentsAccumulator,
    available_backends,
    batched_roll,
    calibrate_student_temperature,
    classwise_moments,
    classwise_moments_accumulate_,
    crop_resize_flip,
    merge_moments_,
    segment_bn_loss,
    soft_label_kl,
)
from lpqld_fast.ops.reference import crop_resize_flip as ref_crf  # noqa: E402
from lpqld_fast.ops.reference import segment_bn_loss as ref_seg  # noqa: E402
from lpqld_fast.ops.reference import soft_label_kl as ref_kl  # noqa: E402

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
FLOATS = [F32, F64, F16, BF16]
EPS32 = 2.0**-23
EPS64 = 2.0**-52


def _fast(native_op: str) -> list[str]:
    """The non-reference backends that can run CPU tensors in this process."""
    return [b for b in available_backends("cpu", native_op) if b != "reference"]


def _few(backend: str):
    """Interpreted Triton is ~100x slower: a third of the profile's examples (at least 4)."""
    n = settings.default.max_examples
    return settings(max_examples=max(4, n // 3) if backend == "triton" else n)


pytestmark = pytest.mark.usefixtures("one_thread_module")


# --------------------------------------------------------------------------- strategies


def _layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values with other strides."""
    if kind == "sliced" and t.dim() >= 1:
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if kind == "transposed" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


LAYOUTS = st.sampled_from(["contiguous", "sliced", "transposed", "channels_last"])
SEEDS = st.integers(0, 2**31 - 1)
# class counts: small ones, plus the preset sizes up to ImageNet-21K-P
CLASS_COUNTS = st.one_of(st.integers(1, 12), st.sampled_from([1, 200, 1000, 10450]))
TEMPS = st.one_of(st.sampled_from([0.01, 100.0, 1.0]), st.floats(-2.0, 2.0).map(lambda e: 10.0**e))


def _index_dtype(upper: int, choice: torch.dtype) -> torch.dtype:
    """``choice`` if it holds ids up to ``upper`` - 1, else int64."""
    limit = {torch.uint8: 255, torch.int16: 32767}.get(choice, 2**31)
    return choice if upper - 1 <= limit else torch.int64


def _absmax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _offset_for(dtype: torch.dtype, offset: float) -> float:
    # float16 stops at 65504: cap its offsets so that the data stays finite
    return max(min(offset, 3e4), -3e4) if dtype == F16 else offset


# --------------------------------------------------------------------------- classwise moments


def _moments_oracle(x: torch.Tensor, labels: torch.Tensor, k: int):
    """Exact per-class (count, mean, m2) in float64 by a loop over classes."""
    c = x.shape[1]
    xd = x.to(F64).reshape(x.shape[0], c, math.prod(x.shape[2:]))
    count = torch.zeros(k, dtype=F64)
    mean = torch.zeros(k, c, dtype=F64)
    m2 = torch.zeros(k, c, dtype=F64)
    lab = labels.long()
    for cls in torch.unique(lab).tolist():
        flat = xd[lab == cls].transpose(0, 1).reshape(c, -1)
        if flat.shape[1]:
            count[cls] = flat.shape[1]
            mean[cls] = flat.mean(1)
            m2[cls] = ((flat - mean[cls][:, None]) ** 2).sum(1)
    return count, mean, m2


@st.composite
def moments_problem(draw, small: bool):
    n = draw(st.integers(0, 5 if small else 24))
    c = draw(st.integers(1, 3 if small else 6))
    spatial = draw(st.lists(st.integers(0 if not small else 1, 4 if small else 6), max_size=2))
    k = draw(CLASS_COUNTS)
    dtype = draw(st.sampled_from(FLOATS))
    std = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    offset = _offset_for(dtype, draw(st.sampled_from([0.0, 1.0, -7.5, 1e4, -1e6])))
    g = torch.Generator().manual_seed(draw(SEEDS))
    x = (torch.randn(n, c, *spatial, generator=g, dtype=F64) * std + offset).to(dtype)
    labels = torch.randint(0, k, (n,), generator=g)
    if n and draw(st.booleans()):  # crowd one class (single-element and empty classes appear too)
        labels[: n // 2] = labels[0]
    labels = labels.to(_index_dtype(k, draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))))
    return _layout(x, draw(LAYOUTS)), _layout(labels, draw(st.sampled_from(["contiguous", "sliced"]))), k, std


def _assert_moments(got, want, dtype: torch.dtype, std: float) -> None:
    count, mean, m2 = got
    wcount, wmean, wm2 = want
    assert torch.equal(count, wcount)
    assert bool(torch.isfinite(mean).all()) and bool(torch.isfinite(m2).all())
    # inputs convert exactly; 16/32-bit rows are reduced in float32, float64 rows in float64
    tol = 1e-10 if dtype == F64 else 2e-5
    # conditioning: a deviation x - mean carries an error of about eps * |x|, so var is off by ~eps * |x| * std
    big = float(wmean.abs().max()) if wmean.numel() else 0.0
    eps = EPS64 if dtype == F64 else EPS32
    torch.testing.assert_close(mean, wmean, rtol=tol, atol=tol * std + 8 * eps * big)
    var, wvar = m2 / count.clamp_min(1)[:, None], wm2 / wcount.clamp_min(1)[:, None]
    torch.testing.assert_close(var, wvar, rtol=max(tol, 1e-4 if dtype != F64 else tol),
                               atol=tol * std * std + 8 * eps * big * std)
    assert bool((m2 >= 0).all()), "negative sum of squared deviations"


@pytest.mark.parametrize("backend", _fast("classwise_moments_accumulate_"))
def test_classwise_moments_accumulate_matches_oracle(backend: str) -> None:
    @_few(backend)
    @given(moments_problem(small=backend == "triton"))
    def prop(problem) -> None:
        x, labels, k, std = problem
        state = (torch.zeros(k, dtype=F64), torch.zeros(k, x.shape[1], dtype=F64), torch.zeros(k, x.shape[1], dtype=F64))
        classwise_moments_accumulate_(x, labels, *state, backend=backend)
        _assert_moments(state, _moments_oracle(x, labels, k), x.dtype, std)
        # the convenience wrapper agrees with the accumulator and counts samples, not elements
        res = classwise_moments(x, labels, k, out_dtype=F64, backend=backend)
        assert torch.equal(res.count, torch.bincount(labels.long(), minlength=k))
        torch.testing.assert_close(res.var, state[2] / state[0].clamp_min(1)[:, None], rtol=0, atol=0)

    prop()


@pytest.mark.parametrize("backend", _fast("classwise_moments_accumulate_"))
def test_classwise_moments_split_and_merge_equal_one_pass(backend: str) -> None:
    """Accumulating in pieces, or on two accumulators merged, equals one pass (Chan's merge is exact)."""

    @_few(backend)
    @given(moments_problem(small=backend == "triton"), st.floats(0.0, 1.0))
    def prop(problem, frac: float) -> None:
        x, labels, k, std = problem
        cut = int(frac * x.shape[0])
        c = x.shape[1]
        seq = ClasswiseMomentsAccumulator(k, c)
        seq.update(x[:cut], labels[:cut], backend=backend)
        seq.update(x[cut:], labels[cut:], backend=backend)
        a, b = ClasswiseMomentsAccumulator(k, c), ClasswiseMomentsAccumulator(k, c)
        a.update(x[:cut], labels[:cut], backend=backend)
        b.update(x[cut:], labels[cut:], backend=backend)
        a.merge_(b)
        want = _moments_oracle(x, labels, k)
        for acc in (seq, a):
            _assert_moments((acc.count, acc.mean, acc.m2), want, x.dtype, std)
            assert torch.equal(acc.samples, torch.bincount(labels.long(), minlength=k))
        # merging an empty state changes nothing, in either direction
        empty = (torch.zeros(k, dtype=F64), torch.zeros(k, c, dtype=F64), torch.zeros(k, c, dtype=F64))
        before = tuple(t.clone() for t in (a.count, a.mean, a.m2))
        merge_moments_(a.count, a.mean, a.m2, *empty)
        assert all(torch.equal(p, q) for p, q in zip(before, (a.count, a.mean, a.m2)))
        merge_moments_(*empty, *before)
        assert all(torch.equal(p, q) for p, q in zip(before, empty))

    prop()


# --------------------------------------------------------------------------- segment BN loss


@st.composite
def segment_problem(draw, small: bool):
    n = draw(st.integers(0, 5 if small else 16))
    c = draw(st.integers(1, 3 if small else 6))
    spatial = draw(st.lists(st.integers(1, 4 if small else 7), max_size=2))
    s = draw(st.one_of(st.integers(1, 6), st.sampled_from([1, 10450] if not small else [1, 50])))
    dtype = draw(st.sampled_from(FLOATS))
    std = draw(st.sampled_from([1e-2, 0.5, 20.0]))
    offset = _offset_for(dtype, draw(st.sampled_from([0.0, 0.3, 100.0, 1e4, -3e5])))
    g = torch.Generator().manual_seed(draw(SEEDS))
    x = (torch.randn(n, c, *spatial, generator=g, dtype=F64) * std + offset).to(dtype)
    seg = torch.randint(0, s, (n,), generator=g)
    seg = seg.to(_index_dtype(s, draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))))
    tm = offset + 0.5 * std * torch.randn(s, c, generator=g)  # targets near the data: loss O(std)
    tv = std**2 * (1.0 + 0.5 * torch.rand(s, c, generator=g))
    w = torch.randn(s, generator=g, dtype=F64)
    return _layout(x, draw(LAYOUTS)), seg, tm.to(draw(st.sampled_from([F32, F64]))), tv, w


@pytest.mark.parametrize("backend", _fast("segment_bn_loss_fwd"))
def test_segment_bn_loss_matches_reference(backend: str) -> None:
    @_few(backend)
    @given(segment_problem(small=backend == "triton"))
    def prop(problem) -> None:
        x, seg, tm, tv, w = problem
        xx = x.detach().clone().requires_grad_(True)
        loss = segment_bn_loss(xx, seg, tm, tv, backend=backend)
        (loss.double() * w).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        want = ref_seg.segment_bn_loss(x64, seg, tm, tv)
        (want * w).sum().backward()
        assert loss.dtype == ref_seg.out_dtype_for(x.dtype) and loss.shape == (tm.shape[0],)
        assert xx.grad.dtype == x.dtype and xx.grad.shape == x.shape
        assert bool(torch.isfinite(loss).all()) and bool(torch.isfinite(xx.grad).all())
        empty = torch.bincount(seg.long(), minlength=tm.shape[0]) == 0
        assert bool((loss[empty] == 0).all()), "an empty segment must give 0"
        # moments are float64 in every backend; a mean of values ~|x| is then exact to ~eps64 * |x| only
        cond = 8 * EPS64 * _absmax(x64.detach())
        ltol = 1e-12 if x.dtype == F64 else 1e-6
        torch.testing.assert_close(loss.double(), want.detach(), rtol=ltol,
                                   atol=ltol * (1 + _absmax(want.detach())) + cond)
        gtol = {F64: 1e-10, F32: 2e-6, F16: 2e-3, BF16: 1.6e-2}[x.dtype]
        scale = _absmax(x64.grad) + 1e-30
        std = float(tv.max()) ** 0.5  # the problem's spread (targets were drawn around it)
        torch.testing.assert_close(xx.grad.double(), x64.grad, rtol=0, atol=(gtol + cond / std) * scale)

    prop()


# --------------------------------------------------------------------------- crop / resize / flip, batched roll


@st.composite
def crop_problem(draw, small: bool):
    n = draw(st.integers(0, 3 if small else 6))
    c = draw(st.integers(1, 2 if small else 3))
    h, w = draw(st.integers(1, 8 if small else 20)), draw(st.integers(1, 8 if small else 20))
    oh, ow = draw(st.integers(1, 8 if small else 16)), draw(st.integers(1, 8 if small else 16))
    dtype = draw(st.sampled_from(FLOATS + [torch.uint8]))
    amp = 1.0 if dtype in (torch.uint8, F16, BF16) else draw(st.sampled_from([1.0, 1e4]))
    g = torch.Generator().manual_seed(draw(SEEDS))
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    else:
        x = ((torch.rand(n, c, h, w, generator=g, dtype=F64) - 0.5) * 2 * amp).to(dtype)
    unit = st.floats(0.0, 1.0, allow_nan=False)
    boxes = torch.tensor([[draw(unit) for _ in range(4)] for _ in range(n)], dtype=F32).reshape(n, 4)
    flips = torch.tensor([draw(st.booleans()) for _ in range(n)], dtype=torch.bool)
    flips = flips.to(draw(st.sampled_from([torch.bool, torch.uint8, torch.int64])))
    return _layout(x, draw(LAYOUTS)), boxes, flips, (oh, ow), amp


FWD_ATOL = {F32: 1e-5, F64: 1e-10, BF16: 1.6e-2, F16: 2e-3, torch.uint8: 1e-3}


@pytest.mark.parametrize("backend", _fast("crop_resize_flip"))
def test_crop_resize_flip_matches_reference(backend: str) -> None:
    @_few(backend)
    @given(crop_problem(small=backend == "triton"))
    def prop(problem) -> None:
        x, boxes, flips, out, amp = problem
        want = crop_resize_flip(x, boxes, flips, out, backend="reference")
        got = crop_resize_flip(x, boxes, flips, out, backend=backend)
        assert got.dtype == want.dtype and got.shape == (x.shape[0], x.shape[1], *out)
        assert bool(torch.isfinite(got).all())
        torch.testing.assert_close(got, want, rtol=0, atol=FWD_ATOL[x.dtype] * amp)
        if x.dtype not in (F32, F64) or x.shape[0] == 0:
            return
        g = torch.Generator().manual_seed(x.shape[0] * 31 + out[0])
        go = torch.randn(x.shape[0], x.shape[1], *out, generator=g, dtype=F64)
        xr = x.detach().clone().requires_grad_(True)
        crop_resize_flip(xr, boxes, flips, out, backend=backend).backward(go.to(x.dtype))
        x64 = x.detach().double().requires_grad_(True)
        crop_resize_flip(x64, boxes, flips, out, backend="reference").backward(go)
        assert xr.grad.dtype == x.dtype and xr.grad.shape == x.shape
        scale = float(x64.grad.abs().max().clamp_min(1.0))
        tol = 1e-5 if x.dtype == F32 else 1e-12
        torch.testing.assert_close(xr.grad.double(), x64.grad, rtol=tol, atol=tol * scale)

    prop()


@settings(max_examples=max(8, settings.default.max_examples))
@given(
    st.integers(0, 4), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9),
    st.sampled_from([F32, F64, F16, BF16, torch.int64, torch.uint8, torch.bool]),
    st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8]),
    st.sampled_from([9, 1000, 2**40]), LAYOUTS, SEEDS,
)
def test_batched_roll_matches_roll_loop(n, c, h, w, dtype, shift_dtype, reach, layout, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = _layout((torch.randn(n, c, h, w, generator=g) * 100).to(dtype), layout)
    lim = min(reach, torch.iinfo(shift_dtype).max)
    shifts = torch.randint(-lim, lim + 1, (n, 2), generator=g).to(shift_dtype)
    got = batched_roll(x, shifts)
    assert torch.equal(got, ref_crf.batched_roll(x, shifts))
    if dtype in (F32, F64):  # the adjoint of a roll is the roll back: exact
        xr = x.clone().requires_grad_(True)
        go = torch.randn(n, c, h, w, generator=g, dtype=dtype)
        batched_roll(xr, shifts).backward(go)
        assert torch.equal(xr.grad, ref_crf.batched_roll(go, -shifts.long()))


# --------------------------------------------------------------------------- soft-label KL


def _quantize_rows(v: torch.Tensor):
    """Per-row affine int8 (v ~ q * scale + offset), scale and offset float32."""
    lo, hi = v.min(1).values, v.max(1).values
    scale = ((hi - lo) / 255).clamp_min(1e-8).float()
    offset = (lo + 128 * scale).float()
    q = torch.round((v - offset[:, None]) / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale, offset


@st.composite
def kl_problem(draw, small: bool, modes=ref_kl.MODES):
    mode = draw(st.sampled_from(modes))
    b = draw(st.integers(0, 3 if small else 6))
    c = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 1000, 10450])))
    if small and b * c > 10450:
        b = max(1, 10450 // c)
    k = c if mode == "dense" else draw(st.integers(1, min(c, 64)))
    logits_dtype = draw(st.sampled_from(FLOATS))
    values_dtype = draw(st.sampled_from(FLOATS + [torch.int8]))
    # logit spreads from almost-uniform to saturating; float16 tops out at 65504
    z_spread = draw(st.sampled_from([1e-6, 1e-2, 1.0, 8.0, 1e3, 1e4]))
    v_spread = draw(st.sampled_from([1e-6, 1e-2, 1.0, 8.0, 1e3, 1e4]))
    T, t_s = draw(TEMPS), draw(TEMPS)
    g = torch.Generator().manual_seed(draw(SEEDS))
    z = (torch.randn(b, c, generator=g, dtype=F64) * z_spread).to(logits_dtype)
    teacher = torch.randn(b, c, generator=g, dtype=F64) * v_spread
    kw: dict = {"mode": mode}
    if mode == "dense":
        v, idx = teacher, None
    else:
        # distinct class ids per row, in random order (no kernel may rely on sorted top-k)
        idx = torch.argsort(torch.rand(b, c, generator=g), dim=1)[:, :k]
        if draw(st.booleans()):  # or the real top-k, shuffled
            top = teacher.topk(k, dim=1).indices
            idx = top.gather(1, torch.argsort(torch.rand(b, k, generator=g), dim=1))
        v = teacher.gather(1, idx)
        if mode in ("ms", "topk_norenorm"):
            v = torch.softmax(teacher / T, dim=1).gather(1, idx)
        if mode == "mrs":
            kw["fill"] = (teacher.min(1).values - draw(st.sampled_from([0.0, 1.0]))).float()
        idx = idx.to(_index_dtype(c, draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))))
    if values_dtype == torch.int8 and b:
        v, kw["scale"], kw["offset"] = _quantize_rows(v)
    else:
        v = v.to(values_dtype if values_dtype != torch.int8 else F32)
    z = _layout(z, draw(st.sampled_from(["contiguous", "sliced", "transposed"])))
    return z, v, idx, kw, T, t_s, draw(st.booleans())


def _ref64(z, v, idx, kw, T: float, t_s: float, t2: bool):
    """Loss and gradient of the reference in float64 on the same (possibly low-precision) inputs."""
    zz = z.detach().to(F64).requires_grad_(True)
    vv = v if v.dtype == torch.int8 else v.to(F64)
    kw = {n: (t.to(F64) if n == "fill" else t) for n, t in kw.items()}
    loss = ref_kl.soft_label_kl(zz, vv, idx, T=T, t_s=t_s, t2_scale=t2, **kw)
    (grad,) = torch.autograd.grad(loss, zz)
    return float(loss.detach()), grad


def _rounding_scale(z, v, kw, mode: str, T: float, t_s: float) -> float:
    """Largest exponent the kernel forms, |z| / t_s and |v| / T, plus log C: the error model's magnitude."""
    c = z.shape[1]
    zmax = float(z.detach().double().abs().max()) / t_s
    if v.dtype == torch.int8:
        vd = v.double() * kw["scale"].double()[:, None] + kw["offset"].double()[:, None]
    else:
        vd = v.double()
    vmax = float(vd.abs().max()) / T if mode in ("dense", "mr", "mrs") else 1.0
    if mode == "mrs":
        vmax = max(vmax, float(kw["fill"].double().abs().max()) / T)
    return zmax + vmax + 2 * math.log(c + 1) + 1.0


GRAD_RTOL = {F32: 1e-4, F64: 1e-9, F16: 2e-3, BF16: 1.6e-2}


@pytest.mark.parametrize("backend", _fast("soft_label_kl_fwd"))
def test_soft_label_kl_matches_reference(backend: str) -> None:
    @_few(backend)
    @given(kl_problem(small=backend == "triton"))
    def prop(problem) -> None:
        z, v, idx, kw, T, t_s, t2 = problem
        b, c = z.shape
        zz = z.detach().clone().requires_grad_(True)
        loss = soft_label_kl(zz, v, idx, T=T, t_s=t_s, t2_scale=t2, backend=backend, **kw)
        loss.backward()
        loss = loss.detach()
        assert loss.dim() == 0 and loss.dtype == (F64 if z.dtype == F64 else F32)
        assert zz.grad.dtype == z.dtype and zz.grad.shape == z.shape
        assert math.isfinite(float(loss)) and bool(torch.isfinite(zz.grad).all())
        if b == 0:
            assert float(loss) == 0.0
            return
        want, want_grad = _ref64(z, v, idx, kw, T, t_s, t2)
        # float64 only when every stored input is float64 and the kernel is not Triton (float32 throughout)
        f64 = backend != "triton" and z.dtype == F64 and v.dtype == F64
        eps = EPS64 if f64 else EPS32
        t2f = T * T if t2 else 1.0
        mag = _rounding_scale(z, v, kw, kw["mode"], T, t_s)
        loss_tol = 1e-5 * abs(want) + 16 * eps * mag * t2f
        assert abs(float(loss) - want) <= loss_tol, (float(loss), want, loss_tol)
        # grad = (q - p) / (B t_s) [* T^2]: each entry of q and p off by about eps * mag, relative
        grad_tol = 16 * eps * mag * t2f / (b * t_s) + GRAD_RTOL[z.dtype] * float(want_grad.abs().max())
        err = float((zz.grad.double() - want_grad).abs().max())
        assert err <= grad_tol, (err, grad_tol)

    prop()


@settings(max_examples=max(6, settings.default.max_examples // 2))
@given(kl_problem(small=False), st.one_of(st.none(), st.lists(TEMPS, min_size=1, max_size=8)))
def test_calibrate_student_temperature_is_grid_argmin(problem, grid) -> None:
    """The chosen t minimises the float64 reference KL over the grid (up to rounding ties)."""
    z, v, idx, kw, T, _, _ = problem
    if z.shape[0] == 0:
        with pytest.raises(ValueError, match="at least one sample"):
            calibrate_student_temperature(z, v, idx, T=T, grid=grid, **kw)
        return
    t = calibrate_student_temperature(z, v, idx, T=T, grid=grid, **kw)
    grid_t = torch.linspace(0.01, 1.0, 100, dtype=F64).tolist() if grid is None else [float(g) for g in grid]
    assert t in grid_t
    if len(grid_t) > 20:
        grid_t = grid_t[::7] + [t]  # the reference loop over 100 temperatures is slow at C = 10,450
    kls = {g: _ref64(z, v, idx, kw, T, g, False)[0] for g in grid_t}
    best = min(kls.values())
    # both sides are float64; the op sums the cross-entropy in another order (|z| / t up to 1e6)
    tol = 1e-9 * (abs(best) + _rounding_scale(z, v, kw, kw["mode"], T, min(grid_t)))
    assert kls[t] <= best + tol, (t, kls[t], best)
