"""The recycled output blocks of the CPU kernels (csrc/cpu/output_pool.cpp): a block is reused only after the
tensor that owned it died, so live outputs never alias, and the byte limit is honoured."""
from __future__ import annotations

import pytest
import torch

from lpqld_fast.ops import _dispatch
from lpqld_fast.ops.crop_resize_flip import NATIVE_OP, crop_resize_flip

pytestmark = pytest.mark.skipif("cpp" not in _dispatch.available_backends("cpu", NATIVE_OP),
                                reason="extension not built")


def _pool(limit: int = -1) -> list[int]:
    return list(torch.ops.lpqld._cpu_output_pool(limit))


@pytest.fixture
def pool_limit():
    before = _pool()[0]
    yield
    _pool(before)


def _batch(seed: int, n: int = 12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 160, 160), generator=gen, dtype=torch.uint8)
    boxes = torch.rand(n, 4, generator=gen) * 0.4 + torch.tensor([0.0, 0.0, 0.5, 0.5])
    flips = torch.rand(n, generator=gen) < 0.5
    return x, boxes, flips


def test_live_outputs_never_share_a_block(pool_limit):
    """Outputs >= 1 MiB come from the pool; while one is alive the next call gets other memory, and a dead
    one's block is reused (a hit) with every element rewritten."""
    _pool(0)  # empty the pool, then allow it again
    _pool(512 << 20)
    x1, b1, f1 = _batch(1)
    x2, b2, f2 = _batch(2)
    want1 = crop_resize_flip(x1, b1, f1, 144, backend="reference")
    want2 = crop_resize_flip(x2, b2, f2, 144, backend="reference")
    assert want1.numel() * 4 >= 1 << 20
    a = crop_resize_flip(x1, b1, f1, 144, backend="cpp")
    b = crop_resize_flip(x2, b2, f2, 144, backend="cpp")
    assert a.data_ptr() != b.data_ptr()
    torch.testing.assert_close(a, want1, rtol=0, atol=1e-3)
    torch.testing.assert_close(b, want2, rtol=0, atol=1e-3)
    ptr_a = a.data_ptr()
    del a
    hits = _pool()[2]
    c = crop_resize_flip(x2, b2, f2, 144, backend="cpp")
    assert _pool()[2] == hits + 1 and c.data_ptr() == ptr_a  # the dead block, reused
    torch.testing.assert_close(c, want2, rtol=0, atol=1e-3)
    torch.testing.assert_close(b, want2, rtol=0, atol=1e-3)  # the live one is untouched


def test_limit_bounds_cached_bytes_and_zero_disables(pool_limit):
    x, b, f = _batch(3)
    _pool(0)
    out = crop_resize_flip(x, b, f, 144, backend="cpp")
    block = out.numel() * 4
    del out
    assert _pool()[1] == 0  # limit 0: released blocks are freed, nothing cached
    _pool(4 << 20)
    outs = [crop_resize_flip(x, b, f, 144, backend="cpp") for _ in range(3)]
    del outs
    assert 0 < _pool()[1] <= 4 << 20 and block < 4 << 20
    assert _pool(0)[1] == 0  # lowering the limit frees what exceeds it


def test_small_outputs_and_backward_use_plain_memory_correctly(pool_limit):
    """Below 1 MiB outputs are ordinary tensors; the backward's pooled gradient starts from zeros even when
    its block held another tensor's values."""
    x, b, f = _batch(4, n=2)
    small = crop_resize_flip(x[:, :1, :32, :32], b, f, 16, backend="cpp")
    assert small.shape == (2, 1, 16, 16)
    _pool(512 << 20)
    xf = torch.rand(8, 3, 160, 160, requires_grad=True)
    bf = torch.rand(8, 4) * 0.4 + torch.tensor([0.0, 0.0, 0.5, 0.5])
    ff = torch.zeros(8, dtype=torch.bool)
    junk = torch.ops.lpqld.crop_resize_flip_backward(torch.full((8, 3, 144, 144), 7.0),
                                                     torch.zeros(8, 4, dtype=torch.int64) + torch.tensor([0, 0, 160, 160]),
                                                     ff, 160, 160)
    del junk  # its block, full of non-zero values, goes back to the pool
    g = torch.rand(8, 3, 144, 144)
    (crop_resize_flip(xf, bf, ff, 144, backend="cpp") * g).sum().backward()
    got = xf.grad.clone()
    xf.grad = None
    (crop_resize_flip(xf, bf, ff, 144, backend="reference") * g).sum().backward()
    torch.testing.assert_close(got, xf.grad, rtol=1e-5, atol=1e-4)

