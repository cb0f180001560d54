"""soft_label_kl: golden decoders, every backend against the reference, gradcheck, bad input.

Run with TRITON_INTERPRET=1 so that the Triton kernel is checked on CPU tensors
(the interpreter is slow: Triton cases use few rows).
"""
from __future__ import annotations

import math

import pytest
import torch

from lpqld_fast.ops import available_backends
from lpqld_fast.ops.reference import soft_label_kl as ref
from lpqld_fast.ops.soft_label_kl import MODES, calibrate_student_temperature, soft_label_kl


def _backends(device: str) -> list[str]:
    return available_backends(device, "soft_label_kl_fwd")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Correctness tests run single-threaded: on a shared, loaded CPU, OpenMP's
    spinning threads make tiny ops 10-30x slower. test_parallel_rows covers the
    multi-threaded row split."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CPU_BACKENDS = _backends("cpu")
FAST_CPU = [b for b in CPU_BACKENDS if b != "reference"]
SPARSE_MODES = [m for m in MODES if m != "dense"]


# --------------------------------------------------------------------------- helpers


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row affine int8: v ~ q * scale + offset."""
    lo = v.min(dim=1).values
    hi = v.max(dim=1).values
    scale = ((hi - lo) / 255).clamp_min(1e-8)
    offset = lo + 128 * scale
    q = torch.round((v - offset[:, None]) / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scale.float(), offset.float()


def make_problem(
    mode: str,
    b: int,
    c: int,
    k: int,
    *,
    seed: int = 0,
    logits_dtype=torch.float32,
    values_dtype=torch.float32,
    index_dtype=torch.int64,
    spread: float = 3.0,
    T: float = 2.0,
):
    """Student logits and the stored soft labels of a random teacher, as kwargs for soft_label_kl."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, c, generator=g, dtype=torch.float64) * spread
    z = (torch.randn(b, c, generator=g, dtype=torch.float64) * spread).to(logits_dtype)
    kw: dict = {"mode": mode}
    if mode == "dense":
        v = teacher
        idx = None
    else:
        top = teacher.topk(k, dim=1)
        idx = top.indices
        # shuffle the stored order so that no kernel relies on sorted top-k
        perm = torch.argsort(torch.rand(b, k, generator=g), dim=1)
        idx = idx.gather(1, perm)
        v = teacher.gather(1, idx)
        if mode in ("ms", "topk_norenorm"):
            v = torch.softmax(teacher / T, dim=1).gather(1, idx)
        if mode == "mrs":
            kw["fill"] = teacher.min(dim=1).values.float()
        idx = idx.to(index_dtype)
    if values_dtype == torch.int8:
        v, kw["scale"], kw["offset"] = quantize_rows(v)
    else:
        v = v.to(values_dtype)
    return z, v, idx, kw


def reference64(z, v, idx, *, T=1.0, t_s=1.0, t2_scale=False, **kw):
    """Reference loss and gradient in float64 from the same (possibly low-precision) inputs."""
    zz = z.detach().to(torch.float64).requires_grad_(True)
    vv = v if v.dtype == torch.int8 else v.to(torch.float64)
    kw = dict(kw)
    if "fill" in kw:
        kw["fill"] = kw["fill"].to(torch.float64)
    loss = ref.soft_label_kl(zz, vv, idx, T=T, t_s=t_s, t2_scale=t2_scale, **kw)
    (grad,) = torch.autograd.grad(loss, zz)
    return loss.detach(), grad


GRAD_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_against_reference(backend, z, v, idx, *, T=1.0, t_s=1.0, t2_scale=False, loss_rtol=1e-4, **kw):
    zz = z.detach().clone().requires_grad_(True)
    loss = soft_label_kl(zz, v, idx, T=T, t_s=t_s, t2_scale=t2_scale, backend=backend, **kw)
    loss.backward()
    loss = loss.detach()
    ref_loss, ref_grad = reference64(z, v, idx, T=T, t_s=t_s, t2_scale=t2_scale, **kw)
    assert loss.dim() == 0
    assert loss.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    assert zz.grad.dtype == z.dtype and zz.grad.shape == z.shape
    assert torch.isfinite(loss) and bool(torch.isfinite(zz.grad).all())
    scale = max(abs(float(ref_loss)), 1e-3)
    assert abs(float(loss) - float(ref_loss)) <= loss_rtol * scale + 1e-6, (float(loss), float(ref_loss))
    gmax = float(ref_grad.abs().max())
    err = float((zz.grad.to(torch.float64) - ref_grad).abs().max())
    # Triton computes in float32 whatever the input dtype
    rtol = max(GRAD_RTOL[z.dtype], GRAD_RTOL[torch.float32]) if backend == "triton" else GRAD_RTOL[z.dtype]
    assert err <= rtol * gmax + 1e-12, (err, gmax)


# --------------------------------------------------------------------------- golden decoders


def test_golden_dense():
    v = torch.tensor([[0.0, math.log(2.0)], [math.log(3.0), 0.0]])
    p = ref.decode_teacher(v, mode="dense", T=1.0)
    torch.testing.assert_close(p, torch.tensor([[1 / 3, 2 / 3], [3 / 4, 1 / 4]]))
    p2 = ref.decode_teacher(v * 2, mode="dense", T=2.0)
    torch.testing.assert_close(p2, p)


def test_golden_mr():
    v = torch.tensor([[math.log(3.0), 0.0]])
    idx = torch.tensor([[2, 0]])
    p = ref.decode_teacher(v, idx, mode="mr", num_classes=4, T=1.0)
    torch.testing.assert_close(p, torch.tensor([[0.25, 0.0, 0.75, 0.0]]))
    p2 = ref.decode_teacher(v * 4, idx.to(torch.int16), mode="mr", num_classes=4, T=4.0)
    torch.testing.assert_close(p2, p)


def test_golden_mrs():
    v = torch.tensor([[math.log(4.0), math.log(2.0)]])
    idx = torch.tensor([[1, 3]], dtype=torch.int32)
    p = ref.decode_teacher(v, idx, mode="mrs", num_classes=4, T=1.0, fill=torch.tensor([0.0]))
    torch.testing.assert_close(p, torch.tensor([[1 / 8, 4 / 8, 1 / 8, 2 / 8]]))
    # k == C: the fill never enters
    p_full = ref.decode_teacher(torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0, 1]]), mode="mrs",
                                num_classes=2, fill=torch.tensor([100.0]))
    torch.testing.assert_close(p_full, torch.tensor([[0.25, 0.75]]))


def test_golden_ms():
    v = torch.tensor([[0.5, 0.2], [0.7, 0.5]])
    idx = torch.tensor([[4, 0], [1, 2]])
    p = ref.decode_teacher(v, idx, mode="ms", num_classes=5)
    expected = torch.tensor([[0.2, 0.1, 0.1, 0.1, 0.5], [0.0, 0.7, 0.5, 0.0, 0.0]])  # row 2: sum > 1, nothing spread
    torch.testing.assert_close(p, expected)
    p_full = ref.decode_teacher(torch.tensor([[0.6, 0.3]]), torch.tensor([[1, 0]]), mode="ms", num_classes=2)
    torch.testing.assert_close(p_full, torch.tensor([[0.3, 0.6]]))  # k == C


def test_golden_topk_norenorm():
    v = torch.tensor([[0.5, 0.3]])
    idx = torch.tensor([[1, 2]], dtype=torch.uint8)
    p = ref.decode_teacher(v, idx, mode="topk_norenorm", num_classes=4, T=7.0)  # T ignored
    torch.testing.assert_close(p, torch.tensor([[0.0, 0.5, 0.3, 0.0]]))


def test_golden_int8_dequant():
    q = torch.tensor([[10, -5]], dtype=torch.int8)
    scale = torch.tensor([0.1])
    offset = torch.tensor([1.0])  # v = [2.0, 0.5]
    idx = torch.tensor([[0, 2]])
    p = ref.decode_teacher(q, idx, mode="mr", num_classes=3, scale=scale, offset=offset)
    e = [math.exp(2.0), math.exp(0.5)]
    torch.testing.assert_close(p, torch.tensor([[e[0] / sum(e), 0.0, e[1] / sum(e)]]))
    # probabilities: v = q * 0.01 + 0.3 = [0.4, 0.25]; 0.35 spread over one class
    p = ref.decode_teacher(q, idx, mode="ms", num_classes=3, scale=torch.tensor([0.01]), offset=torch.tensor([0.3]))
    torch.testing.assert_close(p, torch.tensor([[0.4, 0.35, 0.25]]))


def test_golden_loss_by_hand():
    # p = [1/4, 0, 3/4, 0], q uniform over 4: KL = 1/4 log(1) + 3/4 log(3) = 0.75 log 3
    v = torch.tensor([[math.log(3.0), 0.0]])
    idx = torch.tensor([[2, 0]])
    for backend in CPU_BACKENDS:
        z = torch.zeros(1, 4, requires_grad=True)
        loss = soft_label_kl(z, v, idx, mode="mr", backend=backend)
        assert loss.item() == pytest.approx(0.75 * math.log(3.0), rel=1e-6), backend
        loss.backward()
        torch.testing.assert_close(z.grad, torch.tensor([[0.0, 0.25, -0.5, 0.25]]), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- backends vs reference


SHAPES = [(c, k) for c in (10, 1000, 10450) for k in (1, 10, 100) if k <= c]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("c,k", SHAPES)
@pytest.mark.parametrize("b", [1, 7, 64])
def test_matches_reference_shapes(backend, mode, c, k, b):
    if mode == "dense" and k != 1:
        pytest.skip("dense does not depend on k")
    if backend == "triton" and (b > 7 or b * c > 10450):
        pytest.skip("interpreted Triton: few rows")
    if backend == "reference" and b == 64 and c == 10450:
        pytest.skip("reference vs itself in float64: covered by the smaller shapes")
    z, v, idx, kw = make_problem(mode, b, c, k, seed=b * 7 + c + k)
    check_against_reference(backend, z, v, idx, T=2.0, t_s=0.7, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "logits_dtype,values_dtype,index_dtype",
    [
        (torch.float32, torch.float32, torch.int64),
        (torch.float16, torch.float16, torch.int16),
        (torch.bfloat16, torch.bfloat16, torch.int32),
        (torch.float32, torch.int8, torch.int16),
        (torch.bfloat16, torch.int8, torch.int64),
        (torch.float16, torch.float32, torch.uint8),
        (torch.float64, torch.float64, torch.int64),
    ],
    ids=["f32", "f16", "bf16", "int8", "bf16-int8", "f16-u8", "f64"],
)
def test_matches_reference_dtypes(backend, mode, logits_dtype, values_dtype, index_dtype):
    b, c, k = (3, 200, 20) if backend == "triton" else (13, 200, 20)
    z, v, idx, kw = make_problem(mode, b, c, k, seed=5, logits_dtype=logits_dtype, values_dtype=values_dtype,
                                 index_dtype=index_dtype)
    check_against_reference(backend, z, v, idx, T=3.0, t_s=0.5, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("T", [0.01, 1.0, 4.0, 20.0, 100.0])
@pytest.mark.parametrize("t_s", [0.01, 1.0])
def test_matches_reference_temperatures(backend, mode, T, t_s):
    b = 2 if backend == "triton" else 16
    z, v, idx, kw = make_problem(mode, b, 300, 30, seed=11, T=T)
    check_against_reference(backend, z, v, idx, T=T, t_s=t_s, t2_scale=(T == 4.0), **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.float16])
def test_large_logits(backend, mode, logits_dtype):
    # logits up to +-1e4 at the temperature extremes: every exp must be max-subtracted
    b = 2 if backend == "triton" else 8
    z, v, idx, kw = make_problem(mode, b, 500, 50, seed=3, spread=3000.0, T=1.0, logits_dtype=logits_dtype)
    z = z.clamp(-1e4, 1e4)
    z[:, 0] = 1e4
    z[:, 1] = -1e4
    if mode in ("dense", "mr", "mrs"):
        v = v.clamp(-1e4, 1e4)
    for T, t_s in [(0.01, 0.01), (100.0, 1.0), (1.0, 0.01)]:
        check_against_reference(backend, z, v, idx, T=T, t_s=t_s, loss_rtol=2e-4, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", ["dense", "mr", "ms"])
def test_non_contiguous_logits(backend, mode):
    b, c = 5, 120
    z_full, v, idx, kw = make_problem(mode, b, c, 12, seed=21)
    views = {
        "transposed": z_full.t().contiguous().t(),
        "column_slice": torch.cat([z_full, torch.randn(b, 7)], dim=1)[:, :c],
        "strided": torch.stack([z_full, z_full], dim=2)[:, :, 0],
    }
    for name, z in views.items():
        assert not z.is_contiguous(), name
        check_against_reference(backend, z, v, idx, T=2.0, t_s=0.9, **kw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_single_class_and_k_equals_c(backend, mode):
    for c, k in ((1, 1), (33, 33)):
        z, v, idx, kw = make_problem(mode, 3, c, k, seed=c)
        check_against_reference(backend, z, v, idx, T=2.0, t_s=0.5, **kw)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpp_simd_variants(isa):
    """Every SIMD variant of the CPU kernel this CPU can run (vector widths 4/8/16, tails included)."""
    switch = torch.ops.lpqld._soft_label_kl_cpu_isa
    before = switch()
    try:
        try:
            switch(isa)
        except RuntimeError:
            pytest.skip(f"{isa} not supported on this CPU")
        for mode in MODES:
            for c in (3, 10, 517, 1037):
                z, v, idx, kw = make_problem(mode, 5, c, min(c, 7), seed=c)
                check_against_reference("cpp", z, v, idx, T=2.0, t_s=0.3, **kw)
    finally:
        switch(before)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpp_block_edges(isa):
    """The top-k student pass works in blocks of 512 columns (block max, one exp, a factor per block): row
    lengths around block and vector boundaries, stored classes in every block, k not a multiple of the lanes."""
    switch = torch.ops.lpqld._soft_label_kl_cpu_isa
    before = switch()
    try:
        try:
            switch(isa)
        except RuntimeError:
            pytest.skip(f"{isa} not supported on this CPU")
        for mode in SPARSE_MODES:
            for c, k in ((511, 5), (512, 17), (513, 33), (1025, 1), (1537, 200), (2048, 2048)):
                z, v, idx, kw = make_problem(mode, 3, c, k, seed=c + k)
                z[1, : min(c, 512)] -= 40.0  # one block far below the row max: its factor is tiny
                check_against_reference("cpp", z, v, idx, T=2.0, t_s=0.3, **kw)
    finally:
        switch(before)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("mode", ["mr", "topk_norenorm"])
def test_cpp_block_of_neg_inf_logits(mode):
    """A whole 512-column block of -inf logits (q = 0 there) next to finite ones, none of them stored."""
    z, v, idx, kw = make_problem(mode, 2, 1200, 8, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(600, generator=g)[:8] + 600 for _ in range(2)])  # outside the -inf block
    z[:, 0:512] = float("-inf")
    zz = z.clone().requires_grad_(True)
    loss = soft_label_kl(zz, v, idx, T=2.0, t_s=0.5, backend="cpp", **kw)
    loss.backward()
    zf = z[:, 512:].clone().requires_grad_(True)  # the same problem without the -inf columns
    ref_loss = soft_label_kl(zf, v, idx - 512, T=2.0, t_s=0.5, backend="reference", **kw)
    ref_loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss.detach()), rel=1e-5)
    assert bool((zz.grad[:, :512] == 0).all())
    torch.testing.assert_close(zz.grad[:, 512:], zf.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpp_fp16_values_decode_exactly(isa):
    """fp16 stored values are converted in SIMD: subnormals, signed zero, the largest half and ordinary values
    must come out as torch's conversion (the loss would differ otherwise); half NaN/inf are rejected."""
    switch = torch.ops.lpqld._soft_label_kl_cpu_isa
    before = switch()
    try:
        try:
            switch(isa)
        except RuntimeError:
            pytest.skip(f"{isa} not supported on this CPU")
        special = torch.tensor([6e-8, -6e-8, 3e-5, -0.0, 0.0, 65504.0, -65504.0, 1.0, -2.5, 1e-3, 7.0, 1e4,
                                -1e4, 0.33, 5.96e-8, 6.1e-5, 2.0, -1.0, 100.0], dtype=torch.float16)
        k = special.numel()
        for c in (k, 40, 700):
            v = special.repeat(2, 1)
            v[1] = v[1].flip(0)
            idx = torch.stack([torch.randperm(c, generator=torch.Generator().manual_seed(r))[:k] for r in range(2)])
            z = torch.randn(2, c, generator=torch.Generator().manual_seed(c)) * 3
            for T in (1e5, 3e4):  # T large enough that the softmax over +-65504 stays informative
                check_against_reference("cpp", z, v, idx, mode="mr", T=T, t_s=0.5)
            p = torch.softmax(torch.randn(2, k, dtype=torch.float64), dim=1).half()
            p[0, 3] = 6e-8  # a subnormal probability
            check_against_reference("cpp", z, p, idx, mode="topk_norenorm")
        idx40 = torch.stack([torch.randperm(40, generator=torch.Generator().manual_seed(r))[:k] for r in range(2)])
        for bad in (float("nan"), float("inf"), float("-inf")):
            vb = special.repeat(2, 1)
            vb[1, k - 1] = bad
            with pytest.raises(ValueError, match="values contains NaN or inf"):
                soft_label_kl(torch.randn(2, 40), vb, idx40, mode="mr", backend="cpp")
    finally:
        switch(before)


@pytest.mark.parametrize("backend", FAST_CPU)
def test_parallel_rows(backend):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for mode in ("dense", "mrs"):
            b = 4 if backend == "triton" else 96
            z, v, idx, kw = make_problem(mode, b, 700, 16, seed=9)
            check_against_reference(backend, z, v, idx, T=2.0, t_s=0.9, **kw)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_output_scaling_and_retain_graph(backend):
    z0, v, idx, kw = make_problem("mr", 4, 50, 5, seed=2)
    z = z0.clone().requires_grad_(True)
    loss = soft_label_kl(z, v, idx, T=2.0, backend=backend, **kw)
    (loss * 3.0).backward(retain_graph=True)
    g3 = z.grad.clone()
    z.grad = None
    loss.backward()
    torch.testing.assert_close(g3, 3.0 * z.grad)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
def test_cpp_autograd_op_paths():
    """The cpp backend is a C++ autograd op: without grad (no_grad, inference_mode, logits not requiring grad) it
    returns the same loss; backward reaches the weights behind non-leaf logits (a matmul) like the reference;
    a double backward (create_graph) is refused."""
    z0, v, idx, kw = make_problem("mrs", 5, 40, 6, seed=11)
    z = z0.clone().requires_grad_(True)
    loss = soft_label_kl(z, v, idx, mode="mrs", T=2.0, t_s=0.7, backend="cpp", fill=kw["fill"])
    assert loss.requires_grad and loss.dim() == 0
    with torch.no_grad():
        nl = soft_label_kl(z, v, idx, mode="mrs", T=2.0, t_s=0.7, backend="cpp", fill=kw["fill"])
    with torch.inference_mode():
        il = soft_label_kl(z0, v, idx, mode="mrs", T=2.0, t_s=0.7, backend="cpp", fill=kw["fill"])
    plain = soft_label_kl(z0, v, idx, mode="mrs", T=2.0, t_s=0.7, backend="cpp", fill=kw["fill"])
    assert not nl.requires_grad and not plain.requires_grad
    assert torch.equal(nl, loss.detach()) and torch.equal(il, loss.detach()) and torch.equal(plain, loss.detach())
    w = torch.randn(40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float32, requires_grad=True)
    x = z0.clone()
    y = soft_label_kl(x @ w, v, idx, mode="mrs", T=2.0, t_s=0.7, backend="cpp", fill=kw["fill"])
    y.backward()
    wr = w.detach().clone().requires_grad_(True)
    want = soft_label_kl(x @ wr, v, idx, mode="mrs", T=2.0, t_s=0.7, backend="reference", fill=kw["fill"])
    want.backward()
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_empty_batch(backend, mode):
    z, v, idx, kw = make_problem(mode, 0, 30, 4)
    z.requires_grad_(True)
    loss = soft_label_kl(z, v, idx, backend=backend, **kw)
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad.shape == (0, 30)


def test_ignores_values_grad():
    z, v, idx, kw = make_problem("mr", 3, 20, 4)
    v = v.clone().requires_grad_(True)
    z.requires_grad_(True)
    for backend in FAST_CPU:
        loss = soft_label_kl(z, v, idx, backend=backend, **kw)
        loss.backward()
        assert v.grad is None


# --------------------------------------------------------------------------- gradcheck, KLDivLoss, calibration


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b in ("reference", "cpp")])
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(backend, mode):
    z, v, idx, kw = make_problem(mode, 3, 9, 4, seed=8, logits_dtype=torch.float64, values_dtype=torch.float64)
    if "fill" in kw:
        kw["fill"] = kw["fill"].to(torch.float64)
    z.requires_grad_(True)
    torch.autograd.gradcheck(
        lambda x: soft_label_kl(x, v, idx, T=1.5, t_s=0.8, t2_scale=True, backend=backend, **kw), (z,),
        eps=1e-6, atol=1e-7,
    )


@pytest.mark.parametrize("mode", MODES)
def test_equals_kldivloss_on_dense_decode(mode):
    """The fused loss is nn.KLDivLoss(batchmean) on the decoded dense p: the reference strategy."""
    T, t_s = 3.0, 0.6
    z, v, idx, kw = make_problem(mode, 9, 150, 15, seed=4, values_dtype=torch.int8, T=T)
    p = ref.decode_teacher(v, idx, mode=mode, num_classes=150, T=T, fill=kw.get("fill"), scale=kw.get("scale"),
                           offset=kw.get("offset"))
    expected = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(z / t_s, dim=1), p)
    assert float(ref.reference_strategy_loss(z, p, t_s)) == pytest.approx(float(expected), rel=1e-6)
    for backend in CPU_BACKENDS:
        got = soft_label_kl(z, v, idx, T=T, t_s=t_s, backend=backend, **kw)
        assert float(got) == pytest.approx(float(expected), rel=2e-5, abs=1e-6), backend
        got_t2 = soft_label_kl(z, v, idx, T=T, t_s=t_s, t2_scale=True, backend=backend, **kw)
        assert float(got_t2) == pytest.approx(T * T * float(expected), rel=2e-5, abs=1e-6), backend


@pytest.mark.parametrize("t0,T", [(0.37, 1.0), (0.05, 4.0), (1.0, 2.0)])
def test_calibrate_finds_rescaled_teacher(t0, T):
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(16, 50, generator=g, dtype=torch.float64) * 3
    # softmax(z / t0) == softmax(teacher / T): KL is 0 exactly at t = t0
    z = (teacher * t0 / T).float()
    got = calibrate_student_temperature(z, teacher.float(), mode="dense", T=T)
    assert got == pytest.approx(t0, abs=1e-6)
    # k == C top-k logits decode to the dense teacher too
    top = teacher.topk(50, dim=1)
    got_mr = calibrate_student_temperature(z, top.values.float(), top.indices, mode="mr", T=T)
    assert got_mr == pytest.approx(t0, abs=1e-6)


def test_calibrate_custom_grid_and_errors():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 20, generator=g)
    z = teacher * 0.5
    assert calibrate_student_temperature(z, teacher, mode="dense", T=1.0, grid=[0.25, 0.5, 2.0]) == 0.5
    with pytest.raises(ValueError, match="grid"):
        calibrate_student_temperature(z, teacher, mode="dense", T=1.0, grid=[0.5, -1.0])
    with pytest.raises(ValueError, match="grid"):
        calibrate_student_temperature(z, teacher, mode="dense", T=1.0, grid=[])
    with pytest.raises(ValueError, match=r"\bT\b"):
        calibrate_student_temperature(z, teacher, mode="dense", T=0.0)


# --------------------------------------------------------------------------- bad input


def _good(mode="mr", b=3, c=10, k=4, int8=False):
    z, v, idx, kw = make_problem(mode, b, c, k, values_dtype=torch.int8 if int8 else torch.float32)
    return z, v, idx, kw


def _bad_cases():
    cases = []

    def add(name, err, pattern, fn):
        cases.append(pytest.param(err, pattern, fn, id=name))

    def call(z, v, idx, **kw):
        return soft_label_kl(z, v, idx, **kw)

    z, v, idx, kw = _good()
    add("mode-unknown", ValueError, r"mode must be one of .*dense.*mr.*mrs.*ms.*topk_norenorm",
        lambda: call(z, v, idx, **{**kw, "mode": "mx"}))
    add("logits-not-tensor", TypeError, "student_logits", lambda: call(z.tolist(), v, idx, **kw))
    add("logits-1d", ValueError, "student_logits", lambda: call(z[0], v, idx, **kw))
    add("logits-int", ValueError, "student_logits", lambda: call(z.long(), v, idx, **kw))
    add("values-1d", ValueError, "values", lambda: call(z, v[0], idx, **kw))
    add("values-rows", ValueError, "values", lambda: call(z, v[:2], idx[:2], **kw))
    add("values-dtype", ValueError, "values", lambda: call(z, v.to(torch.int32), idx, **kw))
    add("k-gt-C", ValueError, r"values holds k = 12 .* C = 10",
        lambda: call(z, torch.randn(3, 12), torch.arange(12).repeat(3, 1), **kw))
    add("k-zero", ValueError, "values", lambda: call(z, v[:, :0], idx[:, :0], **kw))
    add("indices-missing", ValueError, "indices", lambda: call(z, v, None, **kw))
    add("indices-shape", ValueError, "indices", lambda: call(z, v, idx[:, :3], **kw))
    add("indices-dtype", ValueError, "indices", lambda: call(z, v, idx.float(), **kw))
    add("indices-int8", ValueError, "indices", lambda: call(z, v, idx.to(torch.int8), **kw))
    bad_hi = idx.clone()
    bad_hi[1, 2] = 10
    add("indices-too-large", IndexError, r"indices .*10 outside \[0, 10\)", lambda: call(z, v, bad_hi, **kw))
    bad_lo = idx.clone()
    bad_lo[0, 0] = -1
    add("indices-negative", IndexError, "indices", lambda: call(z, v, bad_lo, **kw))
    dup = idx.clone()
    dup[2, 1] = dup[2, 0]
    add("indices-duplicate", ValueError, "indices repeats", lambda: call(z, v, dup, **kw))
    v_nan = v.clone()
    v_nan[1, 1] = float("nan")
    add("values-nan", ValueError, "values contains NaN", lambda: call(z, v_nan, idx, **kw))
    v_inf = v.clone()
    v_inf[0, 3] = float("inf")
    add("values-inf", ValueError, "values contains NaN or inf", lambda: call(z, v_inf, idx, **kw))
    add("T-zero", ValueError, r"\bT\b", lambda: call(z, v, idx, T=0.0, **kw))
    add("T-negative", ValueError, r"\bT\b", lambda: call(z, v, idx, T=-1.0, **kw))
    add("T-nan", ValueError, r"\bT\b", lambda: call(z, v, idx, T=float("nan"), **kw))
    add("T-str", TypeError, r"\bT\b", lambda: call(z, v, idx, T="2", **kw))
    add("t_s-zero", ValueError, r"\bt_s\b", lambda: call(z, v, idx, t_s=0.0, **kw))
    add("t_s-negative", ValueError, r"\bt_s\b", lambda: call(z, v, idx, t_s=-0.5, **kw))
    add("t2_scale-not-bool", TypeError, "t2_scale", lambda: call(z, v, idx, t2_scale=1, **kw))
    add("backend-unknown", ValueError, "backend", lambda: call(z, v, idx, backend="fortran", **kw))
    add("fill-not-for-mr", ValueError, "fill", lambda: call(z, v, idx, fill=torch.zeros(3), **kw))
    add("scale-for-float-values", ValueError, "scale", lambda: call(z, v, idx, scale=torch.ones(3),
                                                                      offset=torch.zeros(3), **kw))
    add("values-other-device", ValueError, "values", lambda: call(z, v.to("meta"), idx, **kw))
    add("indices-other-device", ValueError, "indices", lambda: call(z, v, idx.to("meta"), **kw))

    zd, vd, _, kwd = _good("dense")
    add("dense-values-shape", ValueError, "values", lambda: call(zd, vd[:, :5], None, **kwd))
    add("dense-with-indices", ValueError, "indices", lambda: call(zd, vd, idx, **kwd))

    zs, vs, idxs, kws = _good("mrs")
    add("mrs-fill-missing", ValueError, "fill is required",
        lambda: call(zs, vs, idxs, mode="mrs"))
    add("mrs-fill-shape", ValueError, "fill", lambda: call(zs, vs, idxs, mode="mrs", fill=torch.zeros(2)))
    add("mrs-fill-inf", ValueError, "fill contains NaN",
        lambda: call(zs, vs, idxs, mode="mrs", fill=torch.tensor([0.0, float("-inf"), 0.0])))
    add("mrs-fill-int", ValueError, "fill",
        lambda: call(zs, vs, idxs, mode="mrs", fill=torch.zeros(3, dtype=torch.long)))

    zq, vq, idxq, kwq = _good(int8=True)
    sc, off = kwq["scale"], kwq["offset"]
    add("int8-scale-missing", ValueError, "scale is required", lambda: call(zq, vq, idxq, mode="mr", offset=off))
    add("int8-offset-missing", ValueError, "offset is required", lambda: call(zq, vq, idxq, mode="mr", scale=sc))
    add("int8-scale-shape", ValueError, "scale", lambda: call(zq, vq, idxq, mode="mr", scale=sc[:2], offset=off))
    add("int8-scale-inf", ValueError, "scale contains NaN",
        lambda: call(zq, vq, idxq, mode="mr", scale=sc.clone().fill_(float("inf")), offset=off))
    add("int8-offset-nan", ValueError, "offset contains NaN",
        lambda: call(zq, vq, idxq, mode="mr", scale=sc, offset=off.clone().fill_(float("nan"))))
    add("int8-scale-other-device", ValueError, "scale",
        lambda: call(zq, vq, idxq, mode="mr", scale=sc.to("meta"), offset=off))
    return cases


@pytest.mark.parametrize("err,pattern,fn", _bad_cases())
def test_bad_input(err, pattern, fn):
    with pytest.raises(err, match=pattern):
        fn()


def _data_error_cases():
    """(name, error, pattern, kwargs-maker): bad data that only a look at the values reveals."""
    out = []

    def case(name, err, pattern, mode, mutate, int8=False):
        out.append(pytest.param(err, pattern, mode, mutate, int8, id=name))

    def set_index(i, j, val):
        return lambda a: a["indices"].__setitem__((i, j), val)

    case("index-too-large", IndexError, r"indices .*99 outside \[0, 10\)", "mr", set_index(0, 0, 99))
    case("index-negative", IndexError, r"indices .*-3 outside", "mrs", set_index(2, 3, -3))
    case("duplicate-mr", ValueError, "indices repeats", "mr",
         lambda a: a["indices"].__setitem__((1, 2), a["indices"][1, 0]))
    case("duplicate-ms", ValueError, "indices repeats", "ms",
         lambda a: a["indices"].__setitem__((2, 3), a["indices"][2, 1]))
    case("values-nan", ValueError, "values contains NaN", "mr", lambda a: a["values"].__setitem__((0, 1), float("nan")))
    case("values-inf-ms", ValueError, "values contains NaN or inf", "ms",
         lambda a: a["values"].__setitem__((2, 0), float("inf")))
    case("dense-values-neg-inf", ValueError, "values contains NaN or inf", "dense",
         lambda a: a["values"].__setitem__((1, 4), float("-inf")))
    case("dense-values-nan", ValueError, "values contains NaN or inf", "dense",
         lambda a: a["values"].__setitem__((0, 9), float("nan")))
    case("fill-nan", ValueError, "fill contains NaN", "mrs", lambda a: a["fill"].__setitem__(1, float("nan")))
    case("scale-inf", ValueError, "scale contains NaN", "mr", lambda a: a["scale"].__setitem__(0, float("inf")),
         int8=True)
    case("offset-nan", ValueError, "offset contains NaN", "ms", lambda a: a["offset"].__setitem__(2, float("nan")),
         int8=True)
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("err,pattern,mode,mutate,int8", _data_error_cases())
def test_data_errors_every_backend(backend, err, pattern, mode, mutate, int8):
    z, v, idx, kw = make_problem(mode, 3, 10, 4, values_dtype=torch.int8 if int8 else torch.float32)
    args = {"values": v.clone(), "indices": None if idx is None else idx.clone(),
            **{n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}}
    mutate(args)
    with pytest.raises(err, match=pattern):
        soft_label_kl(z, backend=backend, **args)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
def test_native_op_refuses_bad_index_without_python_checks():
    z, v, idx, kw = _good()
    bad = idx.clone()
    bad[2, 1] = 1000
    with pytest.raises(IndexError, match="outside"):
        torch.ops.lpqld.soft_label_kl_fwd(z, v, bad, None, None, None, 1, 1.0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="mode"):
        torch.ops.lpqld.soft_label_kl_fwd(z, v, idx, None, None, None, 9, 1.0, 1.0, 1.0)


def test_validate_false_skips_data_checks_only():
    z, v, idx, kw = _good()
    v_nan = v.clone()
    v_nan[0, 0] = float("nan")
    loss = soft_label_kl(z, v_nan, idx, validate=False, backend="reference", **kw)
    assert math.isnan(float(loss))
    if "cpp" in CPU_BACKENDS:  # the cpp kernel checks while it reads, whatever validate says
        with pytest.raises(ValueError, match="values contains NaN"):
            soft_label_kl(z, v_nan, idx, validate=False, backend="cpp", **kw)
    with pytest.raises(ValueError, match="indices"):
        soft_label_kl(z, v, idx[:, :2], validate=False, **kw)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("values_dtype", [torch.float16, torch.int8])
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c,k", [(10, 10), (1000, 100), (10450, 100)])
def test_cuda_backends_match_reference(mode, values_dtype, logits_dtype, c, k):
    backends = [b for b in _backends("cuda") if b != "reference"]
    if not backends:
        pytest.skip("no CUDA backend built")
    z, v, idx, kw = make_problem(mode, 64, c, k, seed=c + k, logits_dtype=logits_dtype, values_dtype=values_dtype)
    ref_loss, ref_grad = reference64(z, v, idx, T=4.0, t_s=0.5, **kw)
    to = {n: (t.cuda() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    for backend in backends:
        zz = z.cuda().requires_grad_(True)
        loss = soft_label_kl(zz, v.cuda(), None if idx is None else idx.cuda(), T=4.0, t_s=0.5, backend=backend, **to)
        loss.backward()
        assert loss.item() == pytest.approx(float(ref_loss), rel=1e-4, abs=1e-6), backend
        err = float((zz.grad.double().cpu() - ref_grad).abs().max())
        assert err <= GRAD_RTOL[logits_dtype] * float(ref_grad.abs().max()) + 1e-12, backend


def test_fast_input_check_accepts_only_what_the_full_checks_accept():
    """soft_label_kl takes a fast path through its structural checks for well-formed input; every input the
    full checks reject must miss that path (so that it gets their message), every good one must take it."""
    import importlib

    slk = importlib.import_module("lpqld_fast.ops.soft_label_kl")  # the module (the package exports the function)
    z = torch.randn(4, 12)
    v = torch.randn(4, 3)
    idx = torch.randint(0, 12, (4, 3))
    q = torch.zeros(4, 3, dtype=torch.int8)
    row = torch.ones(4)
    good = [
        (z, v, idx, "mr", None, None, None),
        (z, v, idx, "mrs", row, None, None),
        (z, v.half(), idx.short(), "ms", None, None, None),
        (z.double(), q, idx, "topk_norenorm", None, row, row.double()),
        (z, torch.randn(4, 12), None, "dense", None, None, None),
    ]
    bad = [
        (z, v, idx, "mrx", None, None, None),
        (z, v, None, "mr", None, None, None),
        (z, v, idx, "dense", None, None, None),
        (z, torch.randn(4, 12), idx, "dense", None, None, None),
        (z, torch.randn(4, 13), torch.randint(0, 12, (4, 13)), "mr", None, None, None),
        (z, torch.randn(4, 0), torch.zeros(4, 0, dtype=torch.long), "mr", None, None, None),
        (z, v[:3], idx[:3], "mr", None, None, None),
        (z, v, idx[:, :2], "mr", None, None, None),
        (z, v, idx.float(), "mr", None, None, None),
        (z, v, idx, "mrs", None, None, None),
        (z, v, idx, "mrs", row[:3], None, None),
        (z, v, idx, "mrs", row.long(), None, None),
        (z, v, idx, "mr", row, None, None),
        (z, q, idx, "mr", None, row, None),
        (z, q, idx, "mr", None, row[:2], row),
        (z, v, idx, "mr", None, row, row),
        (z.long(), v, idx, "mr", None, None, None),
        (z[0], v, idx, "mr", None, None, None),
        (z[:, :0], v, idx, "mr", None, None, None),
        (z, v.long(), idx, "mr", None, None, None),
        (z.tolist(), v, idx, "mr", None, None, None),
    ]
    for args in good:
        assert slk._inputs_ok(*args)
        slk._check_inputs(*args[:4], 1.0, 1.0, *args[4:])
    for n, args in enumerate(bad):
        assert not slk._inputs_ok(*args), n
        with pytest.raises((ValueError, TypeError)):
            slk._check_inputs(*args[:4], 1.0, 1.0, *args[4:])
    for T in (0.0, -1.0, float("nan"), float("inf")):  # temperatures off the fast path: the full check raises
        with pytest.raises(ValueError, match="T must be a finite number > 0"):
            slk._check_inputs(z, v, idx, "mr", T, 1.0, None, None, None)
    assert slk._check_inputs(z, v, idx, "mr", 2, torch.tensor(0.5), None, None, None) == (2.0, 0.5)


def test_check_label_data_on_the_host_copy() -> None:
    """train checks each batch's labels on the CPU before it moves to a GPU, then calls the op unvalidated."""
    from lpqld_fast.ops.soft_label_kl import check_label_data

    v = torch.randn(3, 2)
    good = torch.tensor([[0, 1], [2, 3], [4, 0]])
    check_label_data(v, good, mode="mr", num_classes=5)
    with pytest.raises(IndexError, match="class id 5 outside"):
        check_label_data(v, torch.tensor([[0, 1], [2, 5], [4, 0]]), mode="mr", num_classes=5)
    with pytest.raises(ValueError, match="repeats a class id"):
        check_label_data(v, torch.tensor([[0, 0], [2, 3], [4, 0]]), mode="mr", num_classes=5)
    v[1, 1] = float("nan")
    with pytest.raises(ValueError, match="values contains NaN"):
        check_label_data(v, good, mode="mr", num_classes=5)
