"""Relabel's per-batch work (replay, teacher forward, label encoding) compiles whole (no graph break, no host
sync) and gives the eager rows; the unchecked encoder equals the checked one and refuses the same data."""
from __future__ import annotations

import pytest
import torch

from lpqld_fast.augment import sample_aug_params
from lpqld_fast.relabel import relabel_batch, seeded_generator
from lpqld_fast.store.quantize import check_encoding, encode_labels, encode_labels_unchecked

from test_relabel import C_IMG, HW, MEAN, NUM_CLASSES, STD, make_images, make_teacher  # noqa: E402

FIELDS = ("values", "indices", "fill", "scale", "offset")

CASES = [  # label mode, value dtype, cutmix, cutout
    ("mr", "fp16", False, False),
    ("mrs", "int8", True, False),
    ("ms", "bf16", False, True),
    ("dense", "fp32", True, True),
]


def _batch_args(label: str, value_dtype: str, cutmix: bool, cutout: bool) -> tuple:
    images, _ = make_images()
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(1))[:8]
    aug = sample_aug_params(idx, HW, HW, C_IMG, (HW, HW), seeded_generator(0, "batch", 3), cutmix=cutmix,
                            cutout=cutout)
    return (make_teacher(), images, aug, torch.tensor(MEAN), torch.tensor(STD), torch.device("cpu"), NUM_CLASSES,
            label, 3, value_dtype, 2.0)


@pytest.mark.parametrize("label,value_dtype,cutmix,cutout", CASES)
def test_relabel_batch_compiles_fullgraph_and_matches_eager(label, value_dtype, cutmix, cutout) -> None:
    """aot_eager (dynamo's whole-graph capture run by eager kernels): seconds, and the same rows bit for bit."""
    args = _batch_args(label, value_dtype, cutmix, cutout)
    teacher, images, aug = args[:3]
    enc_e, checks_e = relabel_batch(*args)
    torch._dynamo.reset()
    enc_c, checks_c = torch.compile(relabel_batch, fullgraph=True, backend="aot_eager")(*args)  # a break raises
    for name in FIELDS:
        e, c = getattr(enc_e, name), getattr(enc_c, name)
        assert (e is None) == (c is None), name
        if e is not None:
            assert c.dtype == e.dtype and torch.equal(c, e), name  # identical rows, indices included
    assert torch.equal(checks_c, checks_e)
    # and the rows are those of the checked encoder the store used before
    from lpqld_fast.augment import replay_batch

    with torch.no_grad():
        logits = teacher(replay_batch(images, aug, MEAN, STD))
    want = encode_labels(logits, mode=label, k=3, value_dtype=value_dtype, temperature=2.0)
    for name in FIELDS:
        e, w = getattr(enc_e, name), getattr(want, name)
        assert (e is None) == (w is None) and (w is None or torch.equal(e, w)), name


@pytest.mark.slow
def test_relabel_batch_compiles_with_inductor() -> None:
    """Inductor (generated C++, ~15-35 s cold here): the same int8 codes, top-k indices and fill; inductor's fused
    conv / BN / linear kernels round the logits differently at float32 level, which moves the rows' scale /
    offset by up to 1.1e-6 relative (measured: 2.6e-10 absolute on scales 2e-4 to 5e-4, 3.0e-8 on offsets ~0.1)."""
    args = _batch_args("mrs", "int8", True, False)
    enc_e, checks_e = relabel_batch(*args)
    torch._dynamo.reset()
    enc_c, checks_c = torch.compile(relabel_batch, fullgraph=True)(*args)
    for name in ("values", "indices", "fill"):
        assert torch.equal(getattr(enc_c, name), getattr(enc_e, name)), name
    for name in ("scale", "offset"):
        torch.testing.assert_close(getattr(enc_c, name), getattr(enc_e, name), rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(checks_c, checks_e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("label,value_dtype,logits,match", [
    ("mr", "fp16", [[1.0, float("nan"), 0.0]], "NaN or inf"),
    ("dense", "fp16", [[7e4, 0.0, 1.0]], "label values exceed"),
    ("mrs", "fp16", [[1.0, -7e4, 0.0]], "fill"),
    ("ms", "int8", [[1e30, 0.0, -1e30]], None),  # finite softmax: fine
    ("mr", "int8", [[float("inf"), 0.0, 1.0]], "NaN or inf"),
])
def test_check_encoding_refuses_what_encode_labels_refuses(label, value_dtype, logits, match) -> None:
    z = torch.tensor(logits)
    _, checks = encode_labels_unchecked(z, mode=label, k=2, value_dtype=value_dtype, temperature=1e-3)
    if match is None:
        encode_labels(z, mode=label, k=2, value_dtype=value_dtype, temperature=1e-3)
        check_encoding(checks, label, value_dtype)
        return
    with pytest.raises(ValueError, match=match):
        encode_labels(z, mode=label, k=2, value_dtype=value_dtype, temperature=1e-3)
    with pytest.raises(ValueError, match=match):
        check_encoding(checks, label, value_dtype)
