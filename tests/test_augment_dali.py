"""The DALI backend of the augmentation replay against the plain-torch oracle.

Target: backends agree within one grey level. Measured here as
max |dali - reference| <= 1 on the 0..255 scale over many random
RandomResizedCrop boxes, edge boxes (1-pixel crops, strips, full image) and
flips; run with ``-s`` to print the measured max/mean differences. Skipped
with the import error as the reason when nvidia-dali is not installed.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from lpqld_fast import augment_dali
from lpqld_fast.augment import crop_resize_flip, replay_batch, sample_flips, sample_rrc_boxes
from lpqld_fast.ops.crop_resize_flip import crop_resize_flip as op_crop_resize_flip

pytestmark = pytest.mark.skipif(
    not augment_dali.dali_available(),
    reason=f"nvidia-dali not importable ({augment_dali.dali_import_error()}); pip install -r requirements-dev.txt",
)

GREY_LEVEL = 1.0  # the acceptance bound, on the 0..255 scale


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # kind to the shared cores; DALI's pool follows torch's thread count
    yield
    torch.set_num_threads(old)


def _edge_boxes(height: int, width: int) -> torch.Tensor:
    """Boxes that stress the border handling: full image, 1-pixel crops, thin strips, a clamped overhang."""
    return torch.tensor([
        [0.0, 0.0, 1.0, 1.0],
        [0.0, 0.0, 0.0, 0.0],
        [1.0, 1.0, 0.0, 0.0],
        [0.5, 0.25, 1.0 / height, 1.0 / width],
        [0.0, 0.3, 1.0, 2.0 / width],
        [0.2, 0.0, 2.0 / height, 1.0],
        [0.9, 0.9, 0.5, 0.5],
    ], dtype=torch.float32)


def _case(n: int, c: int, height: int, width: int, seed: int, dtype: torch.dtype = torch.uint8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, c, height, width), generator=g, dtype=torch.uint8)
    if dtype != torch.uint8:
        x = x.to(dtype)
    boxes = torch.cat([_edge_boxes(height, width), sample_rrc_boxes(n, height, width, generator=g)])[:n]
    flips = sample_flips(n, g)
    return x, boxes.contiguous(), flips


def _measure(x, boxes, flips, out_size) -> tuple[float, float]:
    ref = op_crop_resize_flip(x, boxes, flips, out_size, backend="reference")
    got = crop_resize_flip(x, boxes, flips, out_size, backend="dali")
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
    d = (got.float() - ref.float()).abs()
    return float(d.max()), float(d.mean())


# (n, C, H, W, out): Fashion-MNIST replay, 224-from-256 ImageNet crops, non-square and up-scaling outputs.
CASES = [
    pytest.param(200, 1, 28, 28, (28, 28), id="28x28-c1"),
    pytest.param(200, 3, 28, 28, (28, 28), id="28x28-c3"),
    pytest.param(64, 3, 256, 256, (224, 224), id="224from256-c3"),
    pytest.param(64, 1, 256, 256, (224, 224), id="224from256-c1"),
    pytest.param(64, 3, 32, 40, (20, 52), id="nonsquare-up-down"),
]


@pytest.mark.parametrize("n,c,height,width,out", CASES)
def test_dali_agrees_within_one_grey_level(n, c, height, width, out):
    x, boxes, flips = _case(n, c, height, width, seed=height * 7 + c)
    mx, mean = _measure(x, boxes, flips, out)
    print(f"\nDALI vs reference {c}x{height}x{width} -> {out}, n={n}: max {mx:.3g}, mean {mean:.3g} grey levels")
    assert mx <= GREY_LEVEL


@pytest.mark.parametrize("c,height,out", [(1, 28, 28), (3, 28, 28), (3, 256, 224), (1, 256, 224)])
def test_dali_one_sample_batches(c, height, out):
    worst = 0.0
    for seed in range(12):
        x, boxes, flips = _case(1, c, height, height, seed=seed)
        if seed < 7:  # every edge box on its own, too
            boxes = _edge_boxes(height, height)[seed:seed + 1]
        worst = max(worst, _measure(x, boxes, flips, (out, out))[0])
    print(f"\nDALI one-sample batches {c}x{height}x{height} -> {out}: max {worst:.3g} grey levels")
    assert worst <= GREY_LEVEL


def test_dali_float_input_and_varying_batch_sizes(monkeypatch):
    # Batch sizes 1..9 reuse the power-of-two pipelines; MAX_BATCH=4 forces the chunked path.
    monkeypatch.setattr(augment_dali, "MAX_BATCH", 4)
    for n in (1, 3, 9, 5):
        for dtype in (torch.uint8, torch.float32, torch.float64):
            x, boxes, flips = _case(n, 3, 28, 28, seed=n, dtype=dtype)
            got = crop_resize_flip(x, boxes, flips, (24, 30), backend="dali")
            ref = op_crop_resize_flip(x, boxes, flips, (24, 30), backend="reference")
            assert got.dtype == ref.dtype
            assert float((got.double() - ref.double()).abs().max()) <= GREY_LEVEL


def test_dali_empty_batch_and_validation():
    x = torch.zeros((0, 3, 8, 8), dtype=torch.uint8)
    out = crop_resize_flip(x, torch.zeros((0, 4)), torch.zeros(0, dtype=torch.bool), 5, backend="dali")
    assert out.shape == (0, 3, 5, 5) and out.dtype == torch.float32
    x, boxes, flips = _case(2, 1, 8, 8, seed=0)
    with pytest.raises(ValueError, match="boxes"):
        crop_resize_flip(x, boxes * 2, flips, 4, backend="dali")
    with pytest.raises(ValueError, match="flips"):
        crop_resize_flip(x, boxes, flips[:1], 4, backend="dali")


# --------------------------------------------------------------------------- replay of a relabelled store

N, HW, NUM_CLASSES = 40, 28, 10
MEAN, STD = [0.3], [0.25]
SHA = {"teacher_sha256": "t" * 64, "images_sha256": "i" * 64}


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(24, NUM_CLASSES)).eval()


@pytest.mark.parametrize("cfg", [
    pytest.param({"label": "dense", "value_dtype": "fp32"}, id="dense-flip"),
    pytest.param({"label": "mr", "cutmix": True, "out_size": [20, 20]}, id="mr-cutmix-20"),
    pytest.param({"label": "mr", "cutout": True}, id="mr-cutout"),
])
def test_dali_replay_matches_relabelled_pixels(tmp_path, cfg):
    """Replaying every stored batch through DALI gives the pixels the relabel stage labelled (within a grey level)."""
    from lpqld_fast.relabel import run_relabel

    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (N, 1, HW, HW), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (N,), generator=g)
    teacher = _teacher()
    base = dict(epochs=2, batch_size=8, prune_ratio=0.25, k=3, value_dtype="fp16", num_classes=NUM_CLASSES)
    store = run_relabel(imgs, labels, teacher, MEAN, STD, {**base, **cfg}, tmp_path / "s", 0, progress=False, **SHA)
    std255 = torch.tensor(STD).view(1, -1, 1, 1) * 255.0  # normalised units -> grey levels
    worst = 0.0
    for rec in store:
        x_relabel = replay_batch(imgs, rec, store.mean, store.std)  # the backend relabel used (auto)
        x_dali = replay_batch(imgs, rec, store.mean, store.std, backend="dali")
        worst = max(worst, float(((x_dali - x_relabel) * std255).abs().max()))
        if cfg["label"] == "dense":  # and the stored fp32 logits follow (teacher is smooth in its input)
            with torch.no_grad():
                z = teacher(x_dali)
            torch.testing.assert_close(z, rec.labels.values.float(), rtol=1e-3, atol=1e-3)
    print(f"\nDALI replay of {len(store)} stored batches ({cfg}): max {worst:.3g} grey levels")
    assert worst <= GREY_LEVEL
