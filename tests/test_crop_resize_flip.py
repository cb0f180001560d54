"""crop_resize_flip and batched_roll: every backend against the per-sample reference loop.

Run with TRITON_INTERPRET=1 so the Triton kernels run on CPU tensors; the
CUDA cases skip without a GPU.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from lpqld_fast.ops import _dispatch
from lpqld_fast.ops.crop_resize_flip import (
    NATIVE_OP,
    batched_roll,
    crop_resize_flip,
    crop_resize_flip_gather,
    pixel_boxes,
)
from lpqld_fast.ops.reference import crop_resize_flip as ref

CPU_BACKENDS = _dispatch.available_backends("cpu", NATIVE_OP)
FAST_BACKENDS = [b for b in CPU_BACKENDS if b != "reference"]
FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Output tolerance per dtype, for inputs in [0, 1] (uint8 inputs: 0..255 scale).
FWD_ATOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.uint8: 1e-3}

# (H, W, C, oh, ow): same size, down- and up-scaling, non-square.
SIZES = [
    (28, 28, 1, 28, 28),
    (28, 28, 1, 14, 20),
    (32, 32, 3, 32, 32),
    (32, 32, 3, 48, 40),
    (64, 64, 3, 64, 64),
    (64, 64, 2, 24, 96),
]


def _boxes(n: int, height: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """Normalised boxes: full image, 1-pixel crops (corners), thin strips, RandomResizedCrop-like ones."""
    fixed = torch.tensor(
        [
            [0.0, 0.0, 1.0, 1.0],  # full image
            [0.0, 0.0, 0.0, 0.0],  # 1 pixel, top-left
            [1.0, 1.0, 0.0, 0.0],  # 1 pixel, clamped to the bottom-right corner
            [0.5, 0.25, 1.0 / height, 1.0 / width],  # 1 pixel, inside
            [0.0, 0.3, 1.0, 2.0 / width],  # thin vertical strip
            [0.9, 0.9, 0.5, 0.5],  # runs over the edge: clamped inside
        ]
    )
    area = torch.empty(n).uniform_(0.08, 1.0, generator=gen)
    ratio = torch.exp(torch.empty(n).uniform_(-0.2877, 0.2877, generator=gen))  # log(3/4) .. log(4/3)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    i = torch.rand(n, generator=gen) * (1 - h)
    j = torch.rand(n, generator=gen) * (1 - w)
    rnd = torch.stack([i, j, h, w], dim=1)
    return torch.cat([fixed, rnd])[:n].contiguous()


def _inputs(size, dtype, n=8, seed=0):
    height, width, c, oh, ow = size
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (n, c, height, width), generator=gen, dtype=torch.uint8)
    else:
        x = torch.rand(n, c, height, width, generator=gen).to(dtype)
    boxes = _boxes(n, height, width, gen)
    flips = torch.rand(n, generator=gen) < 0.5
    flips[:2] = torch.tensor([True, False])[:n]
    return x, boxes, flips, (oh, ow)


def _backend_params(backends):
    return [pytest.param(b, id=b) for b in backends]


# ----------------------------------------------------------------------------- semantics of the oracle


def test_pixel_boxes_round_and_clamp():
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0], [0.9, 0.05, 0.5, 0.26], [0.5, 0.5, 1e-4, 0.5]])
    pix = pixel_boxes(b, 28, 30)
    assert pix.dtype == torch.int64
    assert pix.tolist() == [[0, 0, 28, 30], [27, 29, 1, 1], [14, 2, 14, 8], [14, 15, 1, 15]]
    # torchvision's integer boxes survive the normalise -> pixel round trip exactly
    gen = torch.Generator().manual_seed(3)
    for height, width in ((28, 28), (224, 224), (375, 500)):
        i = torch.randint(0, height, (200,), generator=gen)
        j = torch.randint(0, width, (200,), generator=gen)
        h = torch.randint(1, height + 1, (200,), generator=gen).clamp(max=height - i)
        w = torch.randint(1, width + 1, (200,), generator=gen).clamp(max=width - j)
        ints = torch.stack([i, j, h, w], 1)
        norm = (ints.double() / torch.tensor([height, width, height, width])).float()
        assert torch.equal(pixel_boxes(norm, height, width), ints)


def test_reference_equals_torchvision_resized_crop_and_hflip():
    tvf = pytest.importorskip("torchvision.transforms.functional")
    from torchvision.transforms import InterpolationMode

    x, boxes, flips, out = _inputs((32, 32, 3, 24, 20), torch.float32, n=8)
    got = crop_resize_flip(x, boxes, flips, out, backend="reference")
    for k, (i, j, h, w) in enumerate(pixel_boxes(boxes, 32, 32).tolist()):
        want = tvf.resized_crop(x[k], i, j, h, w, list(out), InterpolationMode.BILINEAR, antialias=False)
        if flips[k]:
            want = tvf.hflip(want)
        torch.testing.assert_close(got[k], want, rtol=0, atol=0)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("backend", _backend_params(FAST_BACKENDS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.uint8], ids=str)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "{}x{}x{}->{}x{}".format(*s))
def test_forward_matches_reference(backend, dtype, size):
    if backend == "triton" and dtype != torch.float32 and size not in (SIZES[1], SIZES[3]):
        pytest.skip("interpreted Triton is slow: every dtype on two sizes, float32 on all")
    x, boxes, flips, out = _inputs(size, dtype)
    want = crop_resize_flip(x, boxes, flips, out, backend="reference")
    got = crop_resize_flip(x, boxes, flips, out, backend=backend)
    assert got.dtype == (torch.float32 if dtype == torch.uint8 else dtype)
    assert got.shape == (x.shape[0], x.shape[1], *out) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=FWD_ATOL[dtype])


@pytest.mark.parametrize("backend", _backend_params(FAST_BACKENDS))
def test_uint8_within_one_grey_level_of_uint8_interpolate(backend):
    x, boxes, flips, out = _inputs((64, 64, 3, 40, 56), torch.uint8, n=6)
    got = crop_resize_flip(x, boxes, flips, out, backend=backend)
    assert got.dtype == torch.float32
    for k, (i, j, h, w) in enumerate(pixel_boxes(boxes, 64, 64).tolist()):
        want = F.interpolate(x[k : k + 1, :, i : i + h, j : j + w], size=out, mode="bilinear", align_corners=False)
        if flips[k]:
            want = want.flip(3)
        # PyTorch's uint8 path rounds with fixed-point weights: one grey level once rounded
        assert (got[k].round() - want[0].float()).abs().max() <= 1.0
    # reading uint8 directly gives exactly what the float32 input gives
    assert torch.equal(got, crop_resize_flip(x.float(), boxes, flips, out, backend=backend))


@pytest.mark.parametrize("backend", _backend_params(FAST_BACKENDS))
def test_batch_invariant_and_deterministic(backend):
    """A stored label describes exactly the replayed pixels: same bits whatever the batch around a sample."""
    x, boxes, flips, out = _inputs((32, 32, 3, 28, 28), torch.float32, n=6)
    full = crop_resize_flip(x, boxes, flips, out, backend=backend)
    assert torch.equal(full, crop_resize_flip(x, boxes, flips, out, backend=backend))
    perm = torch.tensor([4, 1, 5, 0, 3, 2])
    assert torch.equal(crop_resize_flip(x[perm], boxes[perm], flips[perm], out, backend=backend), full[perm])
    for k in (0, 3):
        one = crop_resize_flip(x[k : k + 1], boxes[k : k + 1], flips[k : k + 1], out, backend=backend)
        assert torch.equal(one[0], full[k])


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="extension not built")
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_cpp_simd_row_variants_same_bits(isa):
    """uint8/float32 rows run on load-time-picked SIMD kernels (gathers, or planned windows + permutes): each
    variant this CPU can run gives the bits of the portable one and matches the reference, with vector tails
    (widths 1..45), flips, 1-pixel crops, a 256 -> 224 replay shape and > 2x downscales (16 outputs reading
    more than 32 columns: the gather fallback); a strided last dim takes the generic path and agrees too."""
    switch = torch.ops.lpqld._crop_resize_flip_cpu_isa
    before = switch()
    try:
        cases = [(28, 28, 1, 28, 28), (40, 37, 3, 17, 37), (9, 5, 2, 3, 1), (256, 256, 3, 224, 224),
                 (30, 60, 1, 31, 45), (12, 240, 2, 9, 20), (5, 300, 1, 4, 40)]  # last two: > 2x downscale
        for size in cases:
            for dtype in (torch.uint8, torch.float32):
                x, boxes, flips, out = _inputs(size, dtype, n=7, seed=size[1])
                switch("base")
                want = crop_resize_flip(x, boxes, flips, out, backend="cpp")
                try:
                    switch(isa)
                except RuntimeError:
                    pytest.skip(f"{isa} not supported on this CPU")
                got = crop_resize_flip(x, boxes, flips, out, backend="cpp")
                assert torch.equal(got, want), (isa, size, dtype)
                ref_out = crop_resize_flip(x, boxes, flips, out, backend="reference")
                torch.testing.assert_close(got, ref_out, rtol=0, atol=FWD_ATOL[dtype])
                strided = torch.stack([x, x], dim=4)[..., 0]  # equals x with stride(3) == 2: the generic path
                assert strided.stride(3) == 2
                torch.testing.assert_close(crop_resize_flip(strided, boxes, flips, out, backend="cpp"), got,
                                           rtol=0, atol=FWD_ATOL[dtype])
    finally:
        switch(before)


# ----------------------------------------------------------------------------- backward


def _grad(backend, x, boxes, flips, out, go):
    xr = x.detach().clone().requires_grad_(True)
    crop_resize_flip(xr, boxes, flips, out, backend=backend).backward(go)
    return xr.grad


@pytest.mark.parametrize("backend", _backend_params(FAST_BACKENDS))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("size", [SIZES[0], SIZES[1], SIZES[3], SIZES[5]], ids=lambda s: "{}x{}x{}->{}x{}".format(*s))
def test_backward_matches_reference(backend, dtype, size):
    if backend == "triton" and dtype not in (torch.float32, torch.bfloat16) and size not in (SIZES[1], SIZES[3]):
        pytest.skip("interpreted Triton is slow: every dtype on two sizes, float32/bfloat16 on all")
    x, boxes, flips, out = _inputs(size, dtype, n=6)
    go = torch.randn(x.shape[0], x.shape[1], *out, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = _grad(backend, x, boxes, flips, out, go)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype in (torch.float32, torch.float64):
        # against the float64 oracle; the fp32 sums over up to ~1000 terms bound the error
        want = _grad("reference", x.double(), boxes, flips, out, go.double())
        scale = float(want.abs().max().clamp_min(1.0))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)
    else:
        want = _grad("reference", x, boxes, flips, out, go)
        scale = float(want.double().abs().max().clamp_min(1.0))
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2 * scale)
    # zero outside every sample's crop window
    mask = torch.zeros_like(x, dtype=torch.bool)
    for k, (i, j, h, w) in enumerate(pixel_boxes(boxes, x.shape[2], x.shape[3]).tolist()):
        mask[k, :, i : i + h, j : j + w] = True
    assert not got[~mask].any()


def test_gradcheck_cpp_float64():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("native extension not built")
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(3, 1, 7, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.3, 0.5, 0.45], [0.9, 0.1, 0.1, 0.2]])
    flips = torch.tensor([True, False, True])
    for out in ((5, 4), (9, 11)):
        assert torch.autograd.gradcheck(
            lambda t: crop_resize_flip(t, boxes, flips, out, backend="cpp"), (x,), eps=1e-6, atol=1e-8
        )


def test_gather_path_matches_reference():
    """The vectorised plain-torch path (no per-sample loop), forward and autograd backward."""
    for dtype in (torch.float32, torch.uint8):
        x, boxes, flips, out = _inputs(SIZES[3], dtype)
        want = crop_resize_flip(x, boxes, flips, out, backend="reference")
        torch.testing.assert_close(crop_resize_flip_gather(x, boxes, flips, out), want, rtol=0, atol=FWD_ATOL[dtype])
    x, boxes, flips, out = _inputs(SIZES[5], torch.float64, n=6)
    go = torch.randn(6, x.shape[1], *out, dtype=torch.float64)
    xr = x.clone().requires_grad_(True)
    crop_resize_flip_gather(xr, boxes, flips, out).backward(go)
    torch.testing.assert_close(xr.grad, _grad("reference", x, boxes, flips, out, go), rtol=1e-10, atol=1e-10)
    pix = pixel_boxes(boxes, x.shape[2], x.shape[3])
    gb = ref.crop_resize_flip_gather_backward(go, pix, flips, (x.shape[2], x.shape[3]))
    torch.testing.assert_close(gb, xr.grad, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("backend", _backend_params(CPU_BACKENDS))
def test_empty_and_single_sample(backend):
    x = torch.rand(0, 3, 28, 28, requires_grad=True)
    y = crop_resize_flip(x, torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool), (16, 12), backend=backend)
    assert y.shape == (0, 3, 16, 12) and y.dtype == torch.float32
    no_flips = torch.zeros(0, dtype=torch.bool)
    u = crop_resize_flip(torch.zeros(0, 1, 8, 8, dtype=torch.uint8), torch.zeros(0, 4), no_flips, 4, backend=backend)
    assert u.shape == (0, 1, 4, 4) and u.dtype == torch.float32
    x1, b1, f1, out = _inputs((28, 28, 1, 20, 36), torch.float32, n=1)
    f1[:] = True
    want = crop_resize_flip(x1, b1, f1, out, backend="reference")
    torch.testing.assert_close(crop_resize_flip(x1, b1, f1, out, backend=backend), want, rtol=0, atol=1e-5)
    go = torch.randn(1, 1, *out)
    torch.testing.assert_close(_grad(backend, x1, b1, f1, out, go), _grad("reference", x1, b1, f1, out, go),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", _backend_params(FAST_BACKENDS))
def test_non_contiguous_input(backend):
    base, boxes, flips, out = _inputs((32, 32, 3, 24, 28), torch.float32, n=4)
    boxes[3] = torch.tensor([0.2, 0.1, 0.5, 0.7])
    views = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "hw_transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
        "strided_slice": torch.rand(8, 6, 40, 70)[::2, ::2, 3:35, 5:69:2],
    }
    go = torch.randn(4, 3, *out, generator=torch.Generator().manual_seed(5))
    for name, x in views.items():
        assert not x.is_contiguous(), name
        want = crop_resize_flip(x, boxes, flips, out, backend="reference")
        torch.testing.assert_close(crop_resize_flip(x, boxes, flips, out, backend=backend), want, rtol=0, atol=1e-5,
                                   msg=name)
        # float32 sums of many upsampling contributions in another order: tolerance on the gradient's scale
        want_g = _grad("reference", x, boxes, flips, out, go)
        torch.testing.assert_close(_grad(backend, x, boxes, flips, out, go), want_g, rtol=0,
                                   atol=1e-5 * float(want_g.abs().max()), msg=name)
    u = (base * 255).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(crop_resize_flip(u, boxes, flips, out, backend=backend),
                               crop_resize_flip(u, boxes, flips, out, backend="reference"), rtol=0, atol=1e-3)


def test_auto_backend_is_native_on_cpu():
    expected = "cpp" if "cpp" in CPU_BACKENDS else "reference"
    assert _dispatch.resolve_backend("crop_resize_flip", torch.device("cpu"), None, NATIVE_OP) == expected
    x, boxes, flips, out = _inputs(SIZES[1], torch.float32)
    with _dispatch.force_backend("reference"):
        a = crop_resize_flip(x, boxes, flips, out)
    torch.testing.assert_close(crop_resize_flip(x, boxes, flips, out), a, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def _good():
    x = torch.rand(3, 2, 16, 16)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.5, 0.5], [0.5, 0.5, 0.25, 0.25]])
    flips = torch.tensor([True, False, True])
    return {"x": x, "boxes": boxes, "flips": flips, "out_size": (8, 8)}


BAD = [
    ("x", lambda a: a.update(x=a["x"].numpy()), TypeError),
    ("x", lambda a: a.update(x=a["x"][0]), ValueError),
    ("x", lambda a: a.update(x=a["x"].to(torch.int32)), ValueError),
    ("x", lambda a: a.update(x=torch.rand(3, 2, 0, 16)), ValueError),
    ("boxes", lambda a: a.update(boxes=a["boxes"][:, :3]), ValueError),
    ("boxes", lambda a: a.update(boxes=a["boxes"][:2]), ValueError),
    ("boxes", lambda a: a.update(boxes=a["boxes"].flatten()), ValueError),
    ("boxes", lambda a: a.update(boxes=(a["boxes"] * 16).to(torch.int64)), ValueError),
    ("boxes", lambda a: a["boxes"].__setitem__((1, 2), float("nan")), ValueError),
    ("boxes", lambda a: a["boxes"].__setitem__((0, 3), float("inf")), ValueError),
    ("boxes", lambda a: a["boxes"].__setitem__((2, 0), -0.1), ValueError),
    ("boxes", lambda a: a["boxes"].__setitem__((2, 3), 1.5), ValueError),
    ("boxes", lambda a: a.update(boxes=a["boxes"].tolist()), TypeError),
    ("boxes", lambda a: a.update(boxes=a["boxes"].to("meta")), ValueError),
    ("flips", lambda a: a.update(flips=a["flips"][:2]), ValueError),
    ("flips", lambda a: a.update(flips=torch.ones(4, dtype=torch.bool)), ValueError),
    ("flips", lambda a: a.update(flips=a["flips"].float()), ValueError),
    ("flips", lambda a: a.update(flips=a["flips"][:, None]), ValueError),
    ("flips", lambda a: a.update(flips=torch.tensor([0, 2, 1], dtype=torch.uint8)), ValueError),
    ("flips", lambda a: a.update(flips=a["flips"].to("meta")), ValueError),
    ("out_size", lambda a: a.update(out_size=(0, 8)), ValueError),
    ("out_size", lambda a: a.update(out_size=(8, -1)), ValueError),
    ("out_size", lambda a: a.update(out_size=0), ValueError),
    ("out_size", lambda a: a.update(out_size=(8,)), TypeError),
    ("out_size", lambda a: a.update(out_size=(8.0, 8)), TypeError),
    ("out_size", lambda a: a.update(out_size="8"), TypeError),
    ("out_size", lambda a: a.update(out_size=True), TypeError),
]


@pytest.mark.parametrize("name,mutate,exc", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, mutate, exc):
    args = _good()
    mutate(args)
    with pytest.raises(exc, match=name):
        crop_resize_flip(args["x"], args["boxes"], args["flips"], args["out_size"])


def test_bad_backend():
    a = _good()
    with pytest.raises(ValueError, match="backend"):
        crop_resize_flip(a["x"], a["boxes"], a["flips"], 8, backend="nope")
    with pytest.raises(RuntimeError, match="cuda"):
        crop_resize_flip(a["x"], a["boxes"], a["flips"], 8, backend="cuda")


def test_native_op_refuses_bad_boxes_without_crashing():
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("native extension not built")
    x = torch.rand(2, 1, 8, 8)
    flips = torch.zeros(2, dtype=torch.bool)
    for pix in ([[0, 0, 8, 8], [4, 4, 5, 2]], [[0, 0, 0, 3], [0, 0, 1, 1]], [[-1, 0, 2, 2], [0, 0, 1, 1]]):
        with pytest.raises(RuntimeError, match="boxes"):
            torch.ops.lpqld.crop_resize_flip(x, torch.tensor(pix), flips, 4, 4)
    with pytest.raises(RuntimeError, match="boxes"):
        torch.ops.lpqld.crop_resize_flip_backward(torch.rand(2, 1, 4, 4), torch.tensor([[0, 0, 9, 1]] * 2), flips, 8, 8)


# ----------------------------------------------------------------------------- batched_roll


def _roll_backend(backend: str) -> str:
    if backend == "cpp" and not _dispatch.native_has_kernel("batched_roll", "CPU"):
        pytest.skip("native extension not built")
    return backend


def _roll_loop(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """torch.roll per sample, the shifts reduced exactly first (Python ints; torch.roll refuses int64 extremes)."""
    h, w = x.shape[2], x.shape[3]
    return torch.stack([torch.roll(x[k], shifts=(dy % h, dx % w), dims=(1, 2))
                        for k, (dy, dx) in enumerate(shifts.tolist())])


@pytest.mark.parametrize("backend", [None, "cpp", "gather"])
def test_batched_roll_matches_torch_roll_loop(backend):
    backend = _roll_backend(backend) if backend else None
    gen = torch.Generator().manual_seed(2)
    shifts = torch.tensor([[0, 0], [1, -2], [-4, 3], [9, 11], [23, -37], [-100, 250]])
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.uint8, torch.int64, torch.bool):
        x = (torch.rand(6, 3, 9, 11, generator=gen) * 100).to(dtype)
        want = _roll_loop(x, shifts)
        assert torch.equal(batched_roll(x, shifts, backend=backend), want), dtype
        assert torch.equal(ref.batched_roll(x, shifts), want)
        assert torch.equal(batched_roll(x, shifts.to(torch.int32), backend=backend), want)
    # non-contiguous input, N = 0, N = 1, W = 1, H = 1, int64 extremes, planes large enough for several tasks
    xc = torch.rand(4, 8, 10, 3).permute(0, 3, 1, 2)
    sh = torch.tensor([[2, -1], [-9, 4], [0, 13], [5, 5]])
    got = batched_roll(xc, sh, backend=backend)
    assert torch.equal(got, ref.batched_roll(xc, sh)) and got.is_contiguous()
    empty = batched_roll(torch.rand(0, 3, 5, 5), torch.zeros(0, 2, dtype=torch.int64), backend=backend)
    assert empty.shape == (0, 3, 5, 5)
    no_rows = batched_roll(torch.rand(2, 3, 0, 5), torch.ones(2, 2, dtype=torch.int64), backend=backend)
    assert no_rows.shape == (2, 3, 0, 5)
    x1 = torch.rand(1, 2, 5, 6)
    assert torch.equal(batched_roll(x1, torch.tensor([[-7, 8]]), backend=backend), torch.roll(x1, (-7, 8), (2, 3)))
    for shape in ((3, 2, 1, 7), (3, 2, 7, 1), (3, 2, 300, 257)):
        x = torch.rand(shape, generator=gen)
        sh = torch.tensor([[2**63 - 1, -(2**63)], [-(2**63), 2**63 - 1], [-1, 130]])
        assert torch.equal(batched_roll(x, sh, backend=backend), _roll_loop(x, sh)), shape


@pytest.mark.parametrize("backend", [None, "cpp", "gather"])
def test_batched_roll_backward(backend):
    backend = _roll_backend(backend) if backend else None
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(5, 2, 7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    shifts = torch.tensor([[1, 2], [-3, 0], [7, -6], [15, 13], [-(2**63), 2**63 - 1]])
    go = torch.randn(5, 2, 7, 6, generator=gen, dtype=torch.float64)
    batched_roll(x, shifts, backend=backend).backward(go)
    xr = x.detach().clone().requires_grad_(True)
    ref.batched_roll(xr, torch.remainder(shifts, torch.tensor([7, 6]))).backward(go)  # torch.roll: reduced shifts
    assert torch.equal(x.grad, xr.grad)
    xs = x.detach()[:3, :1, :5, :4].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: batched_roll(t, shifts[:3], backend=backend), (xs,))
    assert torch.autograd.gradgradcheck(lambda t: batched_roll(t, shifts[:3], backend=backend), (xs,))


def test_batched_roll_cpu_default_is_the_native_kernel(monkeypatch):
    _roll_backend("cpp")
    crf = sys.modules["lpqld_fast.ops.crop_resize_flip"]  # the package exports a function of the same name

    def no_gather(*_a):
        raise AssertionError("the CPU path went through torch.gather")

    monkeypatch.setattr(crf, "_roll_gather", no_gather)
    x = torch.rand(2, 1, 4, 5, requires_grad=True)
    y = batched_roll(x, torch.tensor([[1, 2], [3, -4]]))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match="backend"):
        batched_roll(x, torch.tensor([[1, 2], [3, -4]]), backend="triton")


def test_batched_roll_native_op_refuses_bad_arguments():
    _roll_backend("cpp")
    x = torch.rand(2, 1, 4, 4)
    for shifts, match in ((torch.zeros(3, 2, dtype=torch.int64), "shifts"), (torch.zeros(2, 2), "int64"),
                          (torch.zeros(2, 3, dtype=torch.int64), "shifts")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.lpqld.batched_roll(x, shifts)
    with pytest.raises(RuntimeError, match="N, C, H, W"):
        torch.ops.lpqld.batched_roll(x[0], torch.zeros(1, 2, dtype=torch.int64))


@pytest.mark.parametrize(
    "mutate,exc,name",
    [
        (lambda x, s: (x[0], s), ValueError, "x"),
        (lambda x, s: (x.numpy(), s), TypeError, "x"),
        (lambda x, s: (x, s[:2]), ValueError, "shifts"),
        (lambda x, s: (x, s[:, :1]), ValueError, "shifts"),
        (lambda x, s: (x, s.float()), ValueError, "shifts"),
        (lambda x, s: (x, s.to("meta")), ValueError, "shifts"),
        (lambda x, s: (x, s.tolist()), TypeError, "shifts"),
    ],
)
def test_batched_roll_bad_input(mutate, exc, name):
    x, s = mutate(torch.rand(3, 1, 4, 4), torch.tensor([[1, 1], [0, 2], [3, -1]]))
    with pytest.raises(exc, match=name):
        batched_roll(x, s)


# ----------------------------------------------------------------------------- GPU (skipped here)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
def test_cuda_backends_match_reference(dtype):
    backends = [b for b in _dispatch.available_backends("cuda", NATIVE_OP) if b != "reference"]
    if not backends:
        pytest.skip("no CUDA/Triton backend built")
    for size in SIZES:
        x, boxes, flips, out = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _inputs(size, dtype))
        want = crop_resize_flip(x, boxes, flips, out, backend="reference")
        for b in backends:
            got = crop_resize_flip(x, boxes, flips, out, backend=b)
            torch.testing.assert_close(got, want, rtol=0, atol=FWD_ATOL[dtype], msg=b)
            if dtype != torch.uint8:
                go = torch.randn_like(want)
                want_g = _grad("reference", x.double(), boxes, flips, out, go.double())
                scale = float(want_g.abs().max().clamp_min(1.0))
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(_grad(b, x, boxes, flips, out, go).double(), want_g, rtol=tol,
                                           atol=tol * scale, msg=b)


@pytest.mark.parametrize("backend", _backend_params([b for b in CPU_BACKENDS if b != "cpp"]))
def test_validate_false_skips_the_box_value_checks_only(backend: str) -> None:
    """recover passes validate=False for its own draws (the value checks sync a GPU per step); the cpp kernel
    checks in C++ always (next test)."""
    from lpqld_fast.ops.crop_resize_flip import crop_resize_flip

    x = torch.rand(2, 1, 8, 8)
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.25, 0.25, 1.5, 0.5]])  # row 1 reaches past the image
    flips = torch.tensor([False, True])
    with pytest.raises(ValueError, match="got row 1"):
        crop_resize_flip(x, boxes, flips, 8, backend=backend)
    out = crop_resize_flip(x, boxes, flips, 8, validate=False, backend=backend)  # clamped, as pixel_boxes does
    want = ref.crop_resize_flip(x, ref.pixel_boxes(boxes, 8, 8), flips, (8, 8))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="boxes must have shape"):  # structural checks stay
        crop_resize_flip(x, boxes[:1], flips, 8, validate=False, backend=backend)


def _native_params() -> list:
    cuda_ok = torch.cuda.is_available() and _dispatch.backend_runs("cuda", torch.device("cuda"), NATIVE_OP)
    return [pytest.param("cpp", marks=pytest.mark.skipif("cpp" not in CPU_BACKENDS,
                                                         reason="needs the built extension (scripts/build_ext.sh)")),
            pytest.param("cuda", marks=[pytest.mark.gpu,
                                        pytest.mark.skipif(not cuda_ok, reason="needs a GPU and the CUDA build")])]


@pytest.mark.parametrize("backend", _native_params())
@pytest.mark.parametrize("box_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flip_dtype", [torch.bool, torch.uint8, torch.int64])
def test_native_kernels_convert_normalised_boxes(backend: str, box_dtype: torch.dtype,
                                                 flip_dtype: torch.dtype) -> None:
    """The cpp and cuda kernels take the normalised boxes as they are (the Python layer no longer converts):
    their conversion gives pixel_boxes' integers bit for bit, fwd and bwd. The cpp kernel also checks the values,
    whatever ``validate`` says (no sync on the CPU)."""
    from lpqld_fast.ops.crop_resize_flip import crop_resize_flip

    dev = "cpu" if backend == "cpp" else "cuda"
    g = torch.Generator().manual_seed(3)
    n, h, w = 64, 29, 23
    x = torch.rand(n, 2, h, w, generator=g).to(dev).requires_grad_(True)
    # every rounding case: exact halves of the pixel grid, random values, and the [0, 1] ends
    boxes = torch.rand(n, 4, generator=g, dtype=torch.float64)
    boxes[:8] = torch.tensor([0.5 / h, 0.5 / w, 1.5 / h, 2.5 / w], dtype=torch.float64)
    boxes[8:12] = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]],
                               dtype=torch.float64)
    boxes = boxes.to(box_dtype)
    flips = (torch.rand(n, generator=g) < 0.5).to(flip_dtype)
    out = crop_resize_flip(x, boxes.to(dev), flips.to(dev), (17, 19), backend=backend)
    pix = ref.pixel_boxes(boxes, h, w).to(dev)
    want = torch.ops.lpqld.crop_resize_flip(x, pix, flips.to(dev, torch.bool), 17, 19)
    assert torch.equal(out, want)
    gy = torch.randn(out.shape, generator=g).to(dev)
    (gx,) = torch.autograd.grad(out, x, gy)
    (gx_want,) = torch.autograd.grad(want, x, gy)
    if backend == "cpp":
        assert torch.equal(gx, gx_want)
    else:  # atomics: the order of the adds varies
        torch.testing.assert_close(gx, gx_want, rtol=1e-5, atol=1e-6)
    if backend != "cpp":
        return
    bad = boxes.clone()
    bad[5, 2] = float("nan")
    for validate in (True, False):
        with pytest.raises(ValueError, match=r"values in \[0, 1\], got row 5"):
            crop_resize_flip(x, bad, flips, 8, backend="cpp", validate=validate)
    if flip_dtype != torch.bool:
        bad_flips = flips.clone()
        bad_flips[3] = 2
        with pytest.raises(ValueError, match="flips must hold 0/1"):
            crop_resize_flip(x, boxes, bad_flips, 8, backend="cpp", validate=False)
