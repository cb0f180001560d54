"""classwise_moments: every backend against an independent float64 oracle.

The oracle below (per class: float64 mean and sum of squared deviations over
samples and spatial positions) is written independently of
lpqld_fast.ops.reference, which is itself one of the backends under test.
Run with TRITON_INTERPRET=1 so that the Triton kernels are checked on CPU
tensors (the interpreter is slow: Triton cases use few, short rows).
"""
from __future__ import annotations

import pytest
import torch

from lpqld_fast.ops import (
    ClasswiseMomentsAccumulator,
    available_backends,
    classwise_ema_update_,
    classwise_moments,
    classwise_moments_accumulate_,
    merge_moments_,
)
from lpqld_fast.ops.reference import classwise_moments as ref

NATIVE_OP = "classwise_moments_accumulate_"


def _backends(device: str) -> list[str]:
    return available_backends(device, NATIVE_OP)


CPU_BACKENDS = _backends("cpu")
FAST_CPU = [b for b in CPU_BACKENDS if b != "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Inputs are converted exactly; what differs is the internal arithmetic
# (float32 inside a row for 16/32-bit inputs, float64 for float64).
TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5, torch.float64: 1e-10}

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Single-threaded by default (tiny ops on a shared, loaded CPU are much
    faster without OpenMP); test_cpp_parallel covers the threaded splits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- helpers


def oracle(x: torch.Tensor, labels: torch.Tensor, k: int, state=None):
    """(count, mean, m2) per class in float64, optionally merged into ``state``."""
    c = x.shape[1]
    xd = x.detach().to(torch.float64).reshape(x.shape[0], c, -1)
    count = torch.zeros(k, dtype=torch.float64)
    mean = torch.zeros(k, c, dtype=torch.float64)
    m2 = torch.zeros(k, c, dtype=torch.float64)
    labels = labels.cpu().long()
    for cls in torch.unique(labels).tolist():
        flat = xd[labels == cls].cpu().transpose(0, 1).reshape(c, -1)  # [C, n_k * L]
        if flat.shape[1] == 0:
            continue
        count[cls] = flat.shape[1]
        mean[cls] = flat.mean(dim=1)
        m2[cls] = ((flat - mean[cls][:, None]) ** 2).sum(dim=1)
    if state is not None:  # exact merge with the old state, done on the raw sums
        c0, mu0, q0 = (t.cpu() for t in state)
        tot = c0 + count
        s = mu0 * c0[:, None] + mean * count[:, None]
        new_mean = torch.where(tot[:, None] > 0, s / tot.clamp_min(1)[:, None], mu0)
        q = q0 + c0[:, None] * (mu0 - new_mean) ** 2 + m2 + count[:, None] * (mean - new_mean) ** 2
        return tot, new_mean, q
    return count, mean, m2


def fresh_state(k: int, c: int, device="cpu"):
    return (
        torch.zeros(k, dtype=torch.float64, device=device),
        torch.zeros(k, c, dtype=torch.float64, device=device),
        torch.zeros(k, c, dtype=torch.float64, device=device),
    )


def run(x, labels, k, backend, state=None):
    state = fresh_state(k, x.shape[1], x.device) if state is None else state
    classwise_moments_accumulate_(x, labels, *state, backend=backend)
    return state


def assert_state(got, want, dtype, scale=1.0, var_rtol=None):
    count, mean, m2 = (t.cpu() for t in got)
    wcount, wmean, wm2 = want
    assert torch.equal(count, wcount), "count differs"
    tol = TOL[dtype]
    torch.testing.assert_close(mean, wmean, rtol=tol, atol=tol * scale)
    var = m2 / count.clamp_min(1)[:, None]
    wvar = wm2 / wcount.clamp_min(1)[:, None]
    torch.testing.assert_close(var, wvar, rtol=var_rtol or tol, atol=(var_rtol or tol) * scale * scale)


def make_x(shape, dtype, seed=0, scale=2.0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(dtype)


def make_labels(n, k, seed=0):
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, k, (n,), generator=g)


def shapes_for(backend):
    if backend == "triton":  # interpreter: few programs, short rows
        return [(6, 5), (5, 3, 7), (4, 3, 2, 5), (3, 2, 2, 3, 2), (3, 2, 1100), (40, 30, 7), (6, 70)]
    return [(40, 19), (37, 5, 33), (29, 6, 9, 7), (11, 4, 3, 5, 6), (9, 3, 2049), (21, 3, 4, 4)]


# --------------------------------------------------------------------------- correctness on CPU


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_random_shapes(backend, dtype):
    for i, shape in enumerate(shapes_for(backend)):
        k = 4
        x = make_x(shape, dtype, seed=i)
        labels = make_labels(shape[0], k, seed=i)
        assert_state(run(x, labels, k, backend), oracle(x, labels, k), dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_row_lengths(dtype):
    """Every code path of the CPU row kernel: tiny rows, vector-width edges,
    short-row blocks with a remainder of rows, chunk edges."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    lengths = [1, 2, 7, 8, 9, 15, 16, 17, 31, 33, 49, 64, 196, 255, 256, 257, 1023, 1024, 1025, 1030, 2049, 3000]
    for i, length in enumerate(lengths):
        x = make_x((23, 3, length), dtype, seed=i, offset=-1.0)  # 69 rows: not a multiple of 8 or 16
        labels = make_labels(23, 5, seed=i)
        assert_state(run(x, labels, 5, "cpp"), oracle(x, labels, 5), dtype, scale=2.0)


def test_cpp_parallel():
    """Threaded row split and channel-block split give the same result as the oracle."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    torch.set_num_threads(4)
    try:
        for shape in [(64, 70, 49), (48, 33, 300), (300, 70)]:
            x = make_x(shape, torch.float32)
            labels = make_labels(shape[0], 7)
            assert_state(run(x, labels, 7, "cpp"), oracle(x, labels, 7), torch.float32, scale=2.0)
    finally:
        torch.set_num_threads(1)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_half_subnormals_and_non_finite(backend):
    """float16 subnormals convert exactly; a non-finite value only spoils its own class."""
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(8, 3, 20, generator=g) * 6e-5).to(torch.float16)  # mostly subnormal in float16
    x[0, 0, :3] = torch.tensor([65504.0, -65504.0, 1e-7], dtype=torch.float16)
    labels = torch.tensor([0, 1, 2, 1, 2, 1, 2, 2])
    want = oracle(x, labels, 3)
    got = run(x, labels, 3, backend)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1][1:], want[1][1:], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got[2][1:], want[2][1:], rtol=1e-4, atol=1e-15)
    torch.testing.assert_close(got[1][0], want[1][0], rtol=1e-5, atol=1e-3)
    x[3, 1, 5] = float("inf")
    x[4, 2, 0] = float("nan")
    got = run(x, labels, 3, backend)
    assert torch.all(torch.isfinite(got[1][0])) and torch.all(torch.isfinite(got[2][0]))  # class 0 untouched
    assert not torch.isfinite(got[1][1, 1]) and torch.isnan(got[1][2, 2])
    assert torch.isfinite(got[1][1, 0]) and torch.isfinite(got[1][2, 0])  # other channels untouched


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_single_sample_classes(backend):
    k = 9
    labels = torch.tensor([3, 3, 5, 0, 3, 7])  # 1, 2, 4, 6, 8 empty; 0, 5, 7 one sample each
    for shape in [(6, 4, 5), (6, 4)]:
        x = make_x(shape, torch.float32)
        got = run(x, labels, k, backend)
        assert_state(got, oracle(x, labels, k), torch.float32, scale=2.0)
        empty = torch.tensor([1, 2, 4, 6, 8])
        assert torch.all(got[0][empty] == 0) and torch.all(got[1][empty] == 0) and torch.all(got[2][empty] == 0)
        if len(shape) == 2:  # one sample, one value: exactly that value, zero spread
            assert torch.equal(got[1][0], x[3].double()) and torch.all(got[2][[0, 5, 7]] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_samples_and_zero_length(backend):
    k, c = 3, 4
    state = fresh_state(k, c)
    state[0][:] = torch.tensor([2.0, 0.0, 5.0])
    state[1].normal_()
    before = [t.clone() for t in state]
    run(torch.zeros(0, c, 5), torch.zeros(0, dtype=torch.long), k, backend, state)
    run(torch.zeros(0, c), torch.zeros(0, dtype=torch.long), k, backend, state)
    run(torch.zeros(2, c, 0), torch.tensor([0, 2]), k, backend, state)
    for a, b in zip(state, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_one_class_and_many_classes(backend):
    small = backend == "triton"
    x = make_x((12, 3, 5) if small else (70, 6, 10), torch.float32)
    labels = torch.zeros(x.shape[0], dtype=torch.long)
    assert_state(run(x, labels, 1, backend), oracle(x, labels, 1), torch.float32, scale=2.0)
    k = 10450
    labels = torch.tensor([10449, 0, 5000, 10449, 7, 5000, 10449, 3][: x.shape[0]] * (x.shape[0] // 8 + 1))[: x.shape[0]]
    got = run(x, labels, k, backend)
    assert_state(got, oracle(x, labels, k), torch.float32, scale=2.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    small = backend == "triton"
    n, c, h, w = (5, 3, 4, 3) if small else (17, 6, 9, 7)
    base = make_x((n, h, w, c), torch.float32)
    labels = make_labels(n, 3)
    views = {
        "permuted (NHWC storage)": base.permute(0, 3, 1, 2),
        "channels_last": base.permute(0, 3, 1, 2).contiguous().to(memory_format=torch.channels_last),
        "transposed spatial": base.permute(0, 3, 2, 1),
        "sliced": make_x((2 * n, c + 2, h, w), torch.float32)[::2, 1:-1, :, ::2],
        "2-D transposed": make_x((c, n), torch.float32).t(),
    }
    for name, x in views.items():
        assert not x.is_contiguous(), name
        got = run(x, labels[: x.shape[0]], 3, backend)
        assert_state(got, oracle(x, labels[: x.shape[0]], 3), torch.float32, scale=2.0)
    # labels: non-contiguous and int32 / uint8
    x = make_x((n, c, 4), torch.float32)
    lab = torch.stack([labels, labels], dim=1)[:, 0]
    assert not lab.is_contiguous()
    for lab_t in (lab, labels.to(torch.int32), labels.to(torch.uint8)):
        assert_state(run(x, lab_t, 3, backend), oracle(x, labels, 3), torch.float32, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_channels_last_read_in_place(dtype, monkeypatch):
    """A channels_last activation reaches the CPU kernel as its [N, C, H * W] view (no transposing copy) and
    gives the oracle's moments: channel blocks of 64 with a remainder, maps from 1x3 to 28x28, large means."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    import sys

    cm = sys.modules["lpqld_fast.ops.classwise_moments"]  # the module (the package exports the function's name)
    seen = []
    real = cm._run_accumulate
    monkeypatch.setattr(cm, "_run_accumulate", lambda x3, *a: (seen.append(x3.is_contiguous()), real(x3, *a)))
    cases = [((9, 3, 1, 3), 0.5), ((7, 64, 7, 7), 0.5), ((5, 130, 5, 4), -1.0), ((4, 65, 28, 28), 0.5),
             ((6, 70, 7, 7), 1e3)]
    for i, (shape, offset) in enumerate(cases):
        x = make_x(shape, dtype, seed=i, offset=offset).contiguous(memory_format=torch.channels_last)
        labels = make_labels(shape[0], 3, seed=i)
        tol = 1e-4 if offset >= 1e3 and dtype == torch.float32 else None
        assert_state(run(x, labels, 3, "cpp"), oracle(x, labels, 3), dtype, scale=2.0, var_rtol=tol)
    assert seen == [False] * len(cases)
    torch.set_num_threads(4)  # tiles (sample, channel block) split over threads
    try:
        x = make_x((33, 130, 9, 9), dtype).contiguous(memory_format=torch.channels_last)
        labels = make_labels(33, 5)
        assert_state(run(x, labels, 5, "cpp"), oracle(x, labels, 5), dtype, scale=2.0)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_mean(backend):
    """1e4 + N(0, 1) in float32: the variance is still right to 1e-4 relative."""
    shape = (8, 2, 300) if backend == "triton" else (40, 3, 2000)
    for i, s in enumerate([shape, shape[:2]] if backend == "triton" else [shape, (64, 5, 49), (300, 4)]):
        x = make_x(s, torch.float32, seed=i, scale=1.0, offset=1e4)
        labels = make_labels(s[0], 3, seed=i)
        got = run(x, labels, 3, backend)
        want = oracle(x, labels, 3)
        assert_state(got, want, torch.float32, scale=1.0, var_rtol=1e-4)
        big = got[0] >= 500  # sanity: the data has unit variance
        var = got[2][big] / got[0][big][:, None]
        assert torch.all((var - 1).abs() < 0.25)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_successive_calls_equal_one_call(backend):
    small = backend == "triton"
    x = make_x((12, 3, 6) if small else (90, 5, 37), torch.float32, offset=3.0)
    labels = make_labels(x.shape[0], 4)
    state = fresh_state(4, x.shape[1])
    cuts = [0, 5, 6, 12] if small else [0, 31, 32, 70, 90]
    for a, b in zip(cuts[:-1], cuts[1:]):
        classwise_moments_accumulate_(x[a:b], labels[a:b], *state, backend=backend)
    assert_state(state, oracle(x, labels, 4), torch.float32, scale=2.0)
    # and merging into a non-empty state equals the exact merge
    y = make_x((x.shape[0], x.shape[1], x.shape[2]), torch.float32, seed=5, offset=-2.0)
    want = oracle(y, labels, 4, state=tuple(t.clone() for t in state))
    classwise_moments_accumulate_(y, labels, *state, backend=backend)
    assert_state(state, want, torch.float32, scale=3.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_merge_moments_equals_single_accumulate(backend):
    small = backend == "triton"
    x = make_x((10, 3, 4) if small else (60, 4, 25), torch.float32, offset=1.0)
    labels = make_labels(x.shape[0], 5)
    half = x.shape[0] // 2
    a = ClasswiseMomentsAccumulator(5, x.shape[1])
    b = ClasswiseMomentsAccumulator(5, x.shape[1])
    a.update(x[:half], labels[:half], backend=backend)
    b.update(x[half:], labels[half:], backend=backend)
    a.merge_(b)
    assert_state((a.count, a.mean, a.m2), oracle(x, labels, 5), torch.float32, scale=2.0)
    assert torch.equal(a.samples, torch.bincount(labels, minlength=5))
    # the functional form on raw tensors, against the same oracle
    s1 = run(x[:half], labels[:half], 5, backend)
    s2 = run(x[half:], labels[half:], 5, backend)
    merge_moments_(*s1, *s2)
    assert_state(s1, oracle(x, labels, 5), torch.float32, scale=2.0)
    res = a.result(torch.float64)
    wc, wm, wq = oracle(x, labels, 5)
    torch.testing.assert_close(res.var, wq / wc.clamp_min(1)[:, None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_classwise_moments_and_ema(backend):
    small = backend == "triton"
    k = 6
    x = make_x((9, 3, 2, 3) if small else (50, 8, 5, 5), torch.float32)
    labels = make_labels(x.shape[0], k - 1)  # class k-1 absent
    batch = classwise_moments(x, labels, k, out_dtype=torch.float64, backend=backend)
    wc, wm, wq = oracle(x, labels, k)
    wvar = wq / wc.clamp_min(1)[:, None]
    assert torch.equal(batch.count, torch.bincount(labels, minlength=k))
    torch.testing.assert_close(batch.mean, wm, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch.var, wvar, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(3)
    run_mean = torch.randn(k, x.shape[1], generator=g, dtype=torch.float64)
    run_var = torch.rand(k, x.shape[1], generator=g, dtype=torch.float64)
    ref_mean, ref_var = run_mean.clone(), run_var.clone()
    classwise_ema_update_(run_mean, run_var, batch, momentum=0.1)
    ref.classwise_ema_update_(ref_mean, ref_var, wm, wvar, torch.bincount(labels, minlength=k) > 0, 0.1)
    torch.testing.assert_close(run_mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run_var, ref_var, rtol=1e-5, atol=1e-6)
    assert torch.equal(run_mean[k - 1], ref_mean[k - 1])  # absent class untouched
    with pytest.raises(ValueError, match="momentum"):
        classwise_ema_update_(run_mean, run_var, batch, momentum=1.5)
    with pytest.raises(ValueError, match="running_var"):
        classwise_ema_update_(run_mean, run_var[:, :2], batch)


# --------------------------------------------------------------------------- bad input


def _good():
    x = make_x((6, 3, 4), torch.float32)
    labels = make_labels(6, 4)
    return {"x": x, "labels": labels, "count": torch.zeros(4, dtype=torch.float64),
            "mean": torch.zeros(4, 3, dtype=torch.float64), "m2": torch.zeros(4, 3, dtype=torch.float64)}


BAD_INPUTS = [
    # (case, argument to replace, replacement builder, error type, message must name)
    ("x not a tensor", "x", lambda g: g["x"].tolist(), TypeError, "x"),
    ("x int dtype", "x", lambda g: g["x"].to(torch.int32), ValueError, "x"),
    ("x 1-D", "x", lambda g: g["x"][:, 0, 0], ValueError, "x"),
    ("labels float", "labels", lambda g: g["labels"].float(), ValueError, "labels"),
    ("labels 2-D", "labels", lambda g: g["labels"][:, None], ValueError, "labels"),
    ("labels too short", "labels", lambda g: g["labels"][:5], ValueError, "labels"),
    ("labels -1", "labels", lambda g: torch.tensor([0, 1, -1, 2, 3, 0]), IndexError, "labels"),
    ("labels == K", "labels", lambda g: torch.tensor([0, 1, 4, 2, 3, 0]), IndexError, "labels"),
    ("labels on another device", "labels", lambda g: g["labels"].to("meta"), ValueError, "labels"),
    ("count float32", "count", lambda g: g["count"].float(), ValueError, "count"),
    ("count 2-D", "count", lambda g: g["count"][:, None], ValueError, "count"),
    ("count non-contiguous", "count", lambda g: torch.zeros(8, dtype=torch.float64)[::2], ValueError, "count"),
    ("count on another device", "count", lambda g: g["count"].to("meta"), ValueError, "count"),
    ("mean float32", "mean", lambda g: g["mean"].float(), ValueError, "mean"),
    ("mean wrong shape", "mean", lambda g: torch.zeros(4, 2, dtype=torch.float64), ValueError, "mean"),
    ("mean non-contiguous", "mean", lambda g: torch.zeros(3, 4, dtype=torch.float64).t(), ValueError, "mean"),
    ("m2 wrong classes", "m2", lambda g: torch.zeros(5, 3, dtype=torch.float64), ValueError, "m2"),
    ("m2 non-contiguous", "m2", lambda g: torch.zeros(4, 6, dtype=torch.float64)[:, ::2], ValueError, "m2"),
    ("m2 on another device", "m2", lambda g: g["m2"].to("meta"), ValueError, "m2"),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case,arg,build,exc,name", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(backend, case, arg, build, exc, name):
    args = _good()
    args[arg] = build(args)
    before = [args[k].clone() for k in ("count", "mean", "m2") if isinstance(args[k], torch.Tensor)
              and args[k].device.type == "cpu"]
    with pytest.raises(exc, match=rf"\b{name}\b"):
        classwise_moments_accumulate_(args["x"], args["labels"], args["count"], args["mean"], args["m2"],
                                      backend=backend)
    after = [args[k] for k in ("count", "mean", "m2") if isinstance(args[k], torch.Tensor)
             and args[k].device.type == "cpu"]
    assert all(torch.equal(a, b) for a, b in zip(after, before)), "state changed on bad input"


def test_bad_backend_and_num_classes():
    g = _good()
    with pytest.raises(ValueError, match="backend"):
        classwise_moments_accumulate_(g["x"], g["labels"], g["count"], g["mean"], g["m2"], backend="nope")
    with pytest.raises(ValueError, match="num_classes"):
        classwise_moments(g["x"], g["labels"], 0)
    with pytest.raises(IndexError, match="labels"):
        classwise_moments(g["x"], g["labels"], 2)


def test_native_checks_contract():
    """The C++ op re-checks its contract (the Python wrapper validates first)."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("extension not built")
    op = torch.ops.lpqld.classwise_moments_accumulate_
    g = _good()
    cases = [
        ({"x": g["x"][:, :, ::2]}, ValueError, "x"),  # strided: neither contiguous nor channels-last
        ({"x": g["x"][:, :, 0]}, ValueError, "x"),
        ({"labels": g["labels"].int()}, ValueError, "labels"),
        ({"labels": torch.tensor([0, 1, 9, 2, 3, 0])}, IndexError, "labels"),
        ({"labels": torch.tensor([0, 1, -1, 2, 3, 0])}, IndexError, "labels"),
        ({"count": g["count"].float()}, ValueError, "count"),
        ({"mean": torch.zeros(4, 2, dtype=torch.float64)}, ValueError, "mean"),
        ({"m2": torch.zeros(3, 4, dtype=torch.float64).t()}, ValueError, "m2"),
        ({"m2": g["mean"]}, ValueError, "m2"),
    ]
    for change, exc, name in cases:
        args = dict(g, **change)
        with pytest.raises(exc, match=rf"\b{name}\b"):
            op(args["x"], args["labels"], args["count"], args["mean"], args["m2"])
    assert torch.all(g["count"] == 0)


def test_triton_checks_contract():
    if "triton" not in CPU_BACKENDS:
        pytest.skip("triton not usable here (set TRITON_INTERPRET=1)")
    from lpqld_fast.kernels import classwise_moments as tk

    g = _good()
    for change, name in [({"x": g["x"].transpose(1, 2)}, "x3"), ({"labels": g["labels"].int()}, "labels"),
                         ({"count": g["count"].float()}, "count"),
                         ({"m2": torch.zeros(4, 2, dtype=torch.float64)}, "m2")]:
        args = dict(g, **change)
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            tk.classwise_moments_accumulate_(args["x"], args["labels"], args["count"], args["mean"], args["m2"])


def test_backends_listed():
    assert CPU_BACKENDS[0] == "reference"
    assert set(CPU_BACKENDS) <= {"reference", "cpp", "triton"}


# --------------------------------------------------------------------------- GPU


GPU_BACKENDS = [b for b in _backends("cuda") if b != "reference"] if torch.cuda.is_available() else []


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_against_oracle(backend, dtype):
    if backend == "none":
        pytest.skip("no CUDA backend built")
    shapes = [(40, 19), (37, 5, 33), (29, 6, 9, 7), (11, 4, 3, 5, 6), (9, 3, 2049), (33, 70, 49), (64, 3, 5000)]
    for i, shape in enumerate(shapes):
        for k in (1, 4, 10450):
            x = make_x(shape, dtype, seed=i).cuda()
            labels = make_labels(shape[0], k, seed=i).cuda()
            assert_state(run(x, labels, k, backend), oracle(x.cpu(), labels.cpu(), k), dtype, scale=2.0)
            # the reference backend on the same device agrees too
            assert_state(run(x, labels, k, "reference"), oracle(x.cpu(), labels.cpu(), k), dtype, scale=2.0)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS or ["none"])
def test_gpu_edge_cases(backend):
    if backend == "none":
        pytest.skip("no CUDA backend built")
    dev = "cuda"
    # large mean
    x = make_x((64, 5, 700), torch.float32, scale=1.0, offset=1e4).to(dev)
    labels = make_labels(64, 3).to(dev)
    assert_state(run(x, labels, 3, backend), oracle(x.cpu(), labels.cpu(), 3), torch.float32, var_rtol=1e-4)
    # long segments (one class, many samples) and L == 1
    for shape in [(1000, 7, 3), (5000, 9)]:
        x = make_x(shape, torch.float32).to(dev)
        labels = torch.zeros(shape[0], dtype=torch.long, device=dev)
        assert_state(run(x, labels, 1, backend), oracle(x.cpu(), labels.cpu(), 1), torch.float32, scale=2.0)
    # N == 0, successive calls, non-empty state
    state = fresh_state(4, 3, dev)
    run(torch.zeros(0, 3, 5, device=dev), torch.zeros(0, dtype=torch.long, device=dev), 4, backend, state)
    assert torch.all(state[0] == 0)
    x = make_x((90, 3, 37), torch.float32).to(dev)
    labels = make_labels(90, 4).to(dev)
    for a, b in [(0, 31), (31, 32), (32, 90)]:
        run(x[a:b], labels[a:b], 4, backend, state)
    assert_state(state, oracle(x.cpu(), labels.cpu(), 4), torch.float32, scale=2.0)
    # non-contiguous input
    xn = make_x((17, 9, 7, 6), torch.float32).to(dev).permute(0, 3, 1, 2)
    labels = make_labels(17, 3).to(dev)
    assert_state(run(xn, labels, 3, backend), oracle(xn.cpu(), labels.cpu(), 3), torch.float32, scale=2.0)
    # device mismatch names the argument
    g = _good()
    with pytest.raises(ValueError, match="labels"):
        classwise_moments_accumulate_(g["x"].to(dev), g["labels"], *fresh_state(4, 3, dev), backend=backend)
