"""Soft-label encoders/decoders: golden hand-made examples for every mode, int8 round trip bounds."""
import math

import pytest
import torch

from lpqld_fast.store.quantize import (
    EncodedLabels,
    decode_labels,
    dequantize_int8,
    encode_labels,
    index_dtype_for,
    quantize_int8,
)

Z = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.5, -1.0, 4.0, 2.0]])


def _softmax(row, t=1.0):
    e = [math.exp(v / t) for v in row]
    s = sum(e)
    return [x / s for x in e]


def _decode_teacher():
    ref = pytest.importorskip("lpqld_fast.ops.reference.soft_label_kl")
    return ref.decode_teacher


def test_index_dtype_thresholds():
    assert index_dtype_for(10) == torch.uint8
    assert index_dtype_for(256) == torch.uint8
    assert index_dtype_for(257) == torch.int16
    assert index_dtype_for(32767) == torch.int16
    assert index_dtype_for(32768) == torch.int32
    with pytest.raises(ValueError):
        index_dtype_for(0)


def test_golden_mr():
    enc = encode_labels(Z, mode="mr", k=2)
    assert enc.values.dtype == torch.float16 and enc.indices.dtype == torch.uint8
    assert enc.values.tolist() == [[3.0, 2.0], [4.0, 2.0]]
    assert enc.indices.tolist() == [[1, 2], [2, 3]]
    assert enc.fill is None and enc.scale is None and enc.offset is None
    lab = decode_labels(enc, "mr")
    assert lab.values.dtype == torch.float32 and lab.indices.dtype == torch.int64
    p = _decode_teacher()(**{k: v for k, v in lab.kl_kwargs().items()}, num_classes=4, T=1.0)
    a = 1 / (1 + math.exp(-1))  # e^3 / (e^3 + e^2)
    b = 1 / (1 + math.exp(-2))  # e^4 / (e^4 + e^2)
    torch.testing.assert_close(p, torch.tensor([[0, a, 1 - a, 0], [0, 0, b, 1 - b]]), rtol=0, atol=1e-6)


def test_golden_mrs():
    enc = encode_labels(Z, mode="mrs", k=2)
    assert enc.values.tolist() == [[3.0, 2.0], [4.0, 2.0]]
    assert enc.fill.dtype == torch.float16 and enc.fill.tolist() == [0.0, -1.0]  # row minimum logit
    lab = decode_labels(enc, "mrs")
    p = _decode_teacher()(**lab.kl_kwargs(), num_classes=4, T=2.0)
    expected = torch.tensor([_softmax([0, 3, 2, 0], 2.0), _softmax([-1, -1, 4, 2], 2.0)])
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["ms", "topk_norenorm"])
def test_golden_probability_modes(mode):
    enc = encode_labels(Z, mode=mode, k=2, value_dtype="fp32", temperature=2.0)
    p0 = _softmax([1, 3, 2, 0], 2.0)
    p1 = _softmax([0.5, -1, 4, 2], 2.0)
    assert enc.indices.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(enc.values, torch.tensor([[p0[1], p0[2]], [p1[2], p1[3]]]), rtol=0, atol=1e-7)
    p = _decode_teacher()(**decode_labels(enc, mode).kl_kwargs(), num_classes=4, T=5.0)  # T ignored
    if mode == "ms":
        r0, r1 = (1 - p0[1] - p0[2]) / 2, (1 - p1[2] - p1[3]) / 2
        expected = [[r0, p0[1], p0[2], r0], [r1, r1, p1[2], p1[3]]]
    else:
        expected = [[0, p0[1], p0[2], 0], [0, 0, p1[2], p1[3]]]
    torch.testing.assert_close(p, torch.tensor(expected), rtol=0, atol=1e-6)


def test_golden_dense():
    enc = encode_labels(Z, mode="dense", k=999)  # k ignored: all C logits
    assert enc.indices is None and enc.values.dtype == torch.float16
    assert enc.values.tolist() == Z.tolist()
    lab = decode_labels(enc, "dense")
    assert lab.indices is None
    p = _decode_teacher()(**lab.kl_kwargs(), T=1.0)
    torch.testing.assert_close(p, torch.tensor([_softmax(r) for r in Z.tolist()]), rtol=0, atol=1e-6)


def test_golden_int8():
    v = torch.tensor([[0.0, 255.0, 100.0], [-1.0, 0.0, 1.0], [2.5, 2.5, 2.5]])
    q, scale, offset = quantize_int8(v)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and offset.dtype == torch.float32
    assert scale[0] == 1.0 and offset[0] == 128.0
    assert q[0].tolist() == [-128, 127, -28]
    assert q[1, 0] == -128 and q[1, 2] == 127
    assert scale[2] == 0.0 and offset[2] == 2.5  # flat row: exact
    torch.testing.assert_close(dequantize_int8(q, scale, offset)[0], v[0], rtol=0, atol=0)
    torch.testing.assert_close(dequantize_int8(q, scale, offset)[2], v[2], rtol=0, atol=0)


def test_int8_round_trip_bound():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4000, 16, generator=g) * torch.rand(4000, 1, generator=g) * 30
    v = v + torch.randn(4000, 1, generator=g) * 5
    q, scale, offset = quantize_int8(v)
    dec = dequantize_int8(q, scale, offset)
    ulp = 4 * torch.finfo(torch.float32).eps * v.abs().amax(dim=1, keepdim=True)  # float32 rounding of q*s+o
    assert ((dec - v).abs() <= scale[:, None] / 2 + ulp).all()
    # the grid spans exactly [row min, row max]: q hits -128 at the min and 127 at the max
    assert (q.gather(1, v.argmin(1, keepdim=True)) == -128).all()
    assert (q.gather(1, v.argmax(1, keepdim=True)) == 127).all()
    assert ((dec.amin(1) - v.amin(1)).abs() <= ulp[:, 0]).all()
    assert ((dec.amax(1) - v.amax(1)).abs() <= ulp[:, 0]).all()


@pytest.mark.parametrize("mode", ["dense", "mr", "mrs", "ms", "topk_norenorm"])
def test_int8_modes_decode(mode):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 50, generator=g) * 4
    enc = encode_labels(z, mode=mode, k=10, value_dtype="int8", temperature=3.0)
    assert enc.values.dtype == torch.int8 and enc.scale.shape == (8,) and enc.offset.shape == (8,)
    raw = decode_labels(enc, mode)
    assert raw.values.dtype == torch.int8 and raw.scale is not None
    deq = decode_labels(enc, mode, dequantize=True)
    assert deq.values.dtype == torch.float32 and deq.scale is None and deq.offset is None
    ref = encode_labels(z, mode=mode, k=10, value_dtype="fp32", temperature=3.0)
    assert (deq.values - ref.values).abs().max() <= enc.scale.max() / 2 + 1e-5
    if mode != "dense":
        assert torch.equal(enc.indices, ref.indices)
    if mode == "mrs":
        assert enc.fill.dtype == torch.float16  # fill kept in fp16 when values are int8


def test_int8_decoders_agree_in_loss():
    ref = pytest.importorskip("lpqld_fast.ops.reference.soft_label_kl")
    g = torch.Generator().manual_seed(2)
    z, s = torch.randn(6, 30, generator=g) * 3, torch.randn(6, 30, generator=g)
    enc = encode_labels(z, mode="mr", k=8, value_dtype="int8")
    a = ref.soft_label_kl(s, **decode_labels(enc, "mr").kl_kwargs(), T=2.0)
    b = ref.soft_label_kl(s, **decode_labels(enc, "mr", dequantize=True).kl_kwargs(), T=2.0)
    torch.testing.assert_close(a, b)


def test_bf16_and_index_dtypes():
    g = torch.Generator().manual_seed(3)
    enc = encode_labels(torch.randn(3, 300, generator=g), mode="mr", k=5, value_dtype="bf16")
    assert enc.values.dtype == torch.bfloat16 and enc.indices.dtype == torch.int16
    enc = encode_labels(torch.randn(2, 40000, generator=g), mode="mr", k=3)
    assert enc.indices.dtype == torch.int32
    assert decode_labels(enc, "mr").indices.dtype == torch.int64


def test_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        encode_labels(Z, mode="nope", k=2)
    with pytest.raises(ValueError, match="k must be"):
        encode_labels(Z, mode="mr", k=5)
    with pytest.raises(ValueError, match="value_dtype"):
        encode_labels(Z, mode="mr", k=2, value_dtype="int3")
    with pytest.raises(ValueError, match="NaN"):
        encode_labels(torch.tensor([[1.0, float("nan")]]), mode="mr", k=1)
    with pytest.raises(ValueError, match="range"):
        encode_labels(torch.tensor([[1e6, 0.0]]), mode="mr", k=1)  # beyond fp16
    assert encode_labels(torch.tensor([[1e6, 0.0]]), mode="mr", k=1, value_dtype="int8").offset[0] == 1e6
    with pytest.raises(ValueError, match="temperature"):
        encode_labels(Z, mode="ms", k=2, temperature=0.0)
    with pytest.raises(ValueError, match="indices"):
        decode_labels(EncodedLabels(values=torch.zeros(2, 2)), "mr")
    with pytest.raises(ValueError, match="scale"):
        decode_labels(EncodedLabels(values=torch.zeros(2, 2, dtype=torch.int8)), "dense")


@pytest.mark.parametrize("value_dtype", ["fp16", "int8"])
@pytest.mark.parametrize("mode", ["dense", "mr", "mrs", "ms", "topk_norenorm"])
def test_decoded_labels_feed_the_loss_op(mode, value_dtype):
    """decode_labels(...).kl_kwargs() is accepted by lpqld_fast.ops.soft_label_kl and matches the oracle."""
    import lpqld_fast.ops as ops

    if not hasattr(ops, "soft_label_kl"):
        pytest.skip("lpqld_fast.ops.soft_label_kl not available yet")
    ref = pytest.importorskip("lpqld_fast.ops.reference.soft_label_kl")
    g = torch.Generator().manual_seed(4)
    z, s = torch.randn(5, 40, generator=g) * 3, torch.randn(5, 40, generator=g)
    lab = decode_labels(encode_labels(z, mode=mode, k=7, value_dtype=value_dtype, temperature=2.0), mode)
    got = ops.soft_label_kl(s, **lab.kl_kwargs(), T=3.0, t_s=0.7)
    want = ref.soft_label_kl(s, **lab.kl_kwargs(), T=3.0, t_s=0.7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
