"""train.mix: student-side CutMix / MixUp of the replayed batch, the loss the same mix of the two stored labels.

The reference: decode both stored labels to dense teacher probabilities, mix them with the same lam, and take
the KL of the student against that mixed target (ops.reference). The loss the stage computes (two fused KL
terms) must have the same gradient; its value differs only by the mixed target's entropy, which is constant.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lpqld_fast import config as schema
from lpqld_fast.augment import mix_batch
from tests.cli_args import run_upstream, tiny_args, train_from
from lpqld_fast.ops import calibrate_student_temperature, soft_label_kl
from lpqld_fast.ops.reference.soft_label_kl import decode_teacher
from lpqld_fast.store.quantize import SoftLabels, decode_labels, encode_labels


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (5, 3, 7, 11), (1, 2, 4, 4)])
def test_cutmix_pastes_the_permuted_batch_into_one_box(shape) -> None:
    x = torch.randn(shape)
    mixed, perm, lam = mix_batch(x, "cutmix", _gen(3))
    inside = (mixed != x).any(dim=(0, 1))  # pixels taken from the partner (where it differs)
    n, _, h, w = shape
    assert sorted(perm.tolist()) == list(range(n))
    # every pixel is either the image's own or its partner's, at the same place
    partner = x[perm]
    assert bool(((mixed == x) | (mixed == partner)).all())
    ys, xs = torch.nonzero(inside, as_tuple=True)
    if ys.numel():
        box_area = (int(ys.max()) - int(ys.min()) + 1) * (int(xs.max()) - int(xs.min()) + 1)
        assert lam <= 1 - box_area / (h * w) + 1e-6  # lam is the kept fraction (the box may be larger)
    assert 0.0 <= lam <= 1.0


def test_mixup_is_the_convex_combination() -> None:
    x = torch.randn(7, 2, 5, 5)
    mixed, perm, lam = mix_batch(x, "mixup", _gen(1))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    again = mix_batch(x, "mixup", _gen(1))
    assert torch.equal(again[0], mixed) and torch.equal(again[1], perm) and again[2] == lam


def test_mix_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="cutmix' or 'mixup"):
        mix_batch(torch.zeros(2, 1, 4, 4), "blend", _gen())


@pytest.mark.parametrize("mode,k", [("dense", 10), ("mr", 3), ("mrs", 4)])
@pytest.mark.parametrize("T,t_s", [(1.0, 1.0), (4.0, 0.5)])
def test_two_kl_terms_have_the_gradient_of_the_mixed_target(mode, k, T, t_s) -> None:
    torch.manual_seed(0)
    b, c = 8, 10
    labels = decode_labels(encode_labels(torch.randn(b, c) * 3, mode=mode, k=k), mode)
    perm = torch.randperm(b)
    lam = 0.3
    z = torch.randn(b, c, requires_grad=True)
    ours = lam * soft_label_kl(z, **labels.kl_kwargs(), T=T, t_s=t_s) + \
        (1 - lam) * soft_label_kl(z, **labels.take_rows(perm).kl_kwargs(), T=T, t_s=t_s)
    (g_ours,) = torch.autograd.grad(ours, z)

    def dense(lab):
        return decode_teacher(**{k_: v for k_, v in lab.kl_kwargs().items()}, num_classes=c, T=T,
                              dtype=torch.float64)

    p = lam * dense(labels) + (1 - lam) * dense(labels.take_rows(perm))
    z64 = z.detach().double().requires_grad_(True)
    ref = -(p * torch.log_softmax(z64 / t_s, dim=1)).sum() / b  # KL up to the target's (constant) entropy
    (g_ref,) = torch.autograd.grad(ref, z64)
    torch.testing.assert_close(g_ours.double(), g_ref, rtol=1e-4, atol=1e-6)


def test_take_rows_reorders_every_field() -> None:
    labels = decode_labels(encode_labels(torch.randn(5, 10), mode="mrs", k=3, value_dtype="int8"), "mrs")
    idx = torch.tensor([4, 0, 0, 2])
    out = labels.take_rows(idx)
    for name in ("values", "indices", "fill", "scale", "offset"):
        assert torch.equal(getattr(out, name), getattr(labels, name)[idx]), name


def test_mix_refuses_hard_labels() -> None:
    with pytest.raises(ValueError, match="train.mix=cutmix mixes stored soft labels; train.hard_labels=true"):
        schema.check_section("train", {"mix": "cutmix", "hard_labels": True})
    assert schema.check_section("train", {"mix": "mixup", "calibrate": True})["calibrate"] is True


@pytest.mark.parametrize("mode,k", [("dense", 10), ("mr", 3)])
def test_weighted_calibration_is_the_calibration_against_the_mixed_target(mode, k) -> None:
    torch.manual_seed(1)
    b, c, T, lam = 16, 10, 4.0, 0.35
    labels = decode_labels(encode_labels(torch.randn(b, c) * 3, mode=mode, k=k), mode)
    perm = torch.randperm(b)
    z = torch.randn(b, c) * 2
    got = calibrate_student_temperature(torch.cat([z, z]), **SoftLabels.concat([labels, labels.take_rows(perm)])
                                        .kl_kwargs(), T=T,
                                        row_weights=torch.cat([torch.full((b,), lam), torch.full((b,), 1 - lam)]))

    def dense(lab):
        return decode_teacher(**lab.kl_kwargs(), num_classes=c, T=T, dtype=torch.float64)

    p = lam * dense(labels) + (1 - lam) * dense(labels.take_rows(perm))
    grid = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    ce = torch.stack([-(p * torch.log_softmax(z.double() / t, dim=1)).sum() for t in grid])
    assert got == pytest.approx(float(grid[int(torch.argmin(ce))]))
    ones = calibrate_student_temperature(z, **labels.kl_kwargs(), T=T, row_weights=torch.ones(b))
    assert ones == calibrate_student_temperature(z, **labels.kl_kwargs(), T=T)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.tensor([1.0, -1.0, 1.0, 1.0]), torch.full((4,), float("nan"))])
def test_row_weights_are_checked(bad) -> None:
    labels = decode_labels(encode_labels(torch.randn(4, 10), mode="mr", k=3), "mr")
    with pytest.raises(ValueError, match="row_weights must"):
        calibrate_student_temperature(torch.randn(4, 10), **labels.kl_kwargs(), T=2.0, row_weights=bad)


TINY = tiny_args({"relabel.prune_ratio": 0.5, "train.epochs": 6, "train.eval_every": 3,
                  "train.checkpoint_every": 2, "train.calibrate": False, "train.pool": "lpld"})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, synthetic_run_module) -> Path:
    """squeeze, recover and relabel of a tiny synthetic run, single-threaded."""
    return run_upstream(tmp_path_factory.mktemp("train-mix") / "up", TINY)


def _train(upstream: Path, dest: Path, *extra: str, rc: int = 0) -> dict:
    return train_from(upstream, dest, TINY, *extra, rc=rc)


@pytest.mark.parametrize("mode", ["cutmix", "mixup"])
def test_a_mixed_student_trains_deterministically(upstream, tmp_path, mode) -> None:
    plain = _train(upstream, tmp_path / "plain")
    mixed = _train(upstream, tmp_path / "a", "--set", f"train.mix={mode}")
    again = _train(upstream, tmp_path / "b", "--set", f"train.mix={mode}")
    losses = [e["train_loss"] for e in mixed["evals"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses == [e["train_loss"] for e in again["evals"]]  # the mix stream is a function of the seed
    assert losses != [e["train_loss"] for e in plain["evals"]]
    assert mixed["record"]["config"]["train"]["mix"] == mode


def test_a_mixed_student_calibrates_against_both_labels(upstream, tmp_path, monkeypatch) -> None:
    import lpqld_fast.train as train_mod

    seen = []

    def spy(batches, T):
        seen.append(batches)
        return 0.5

    monkeypatch.setattr(train_mod, "calibrate_on", spy)
    out = _train(upstream, tmp_path / "cal", "--set", "train.mix=cutmix", "--set", "train.calibrate=true")
    assert [e["t_s"] for e in out["evals"]] == [0.5] * len(out["evals"])
    assert len(seen) == 6  # once per epoch
    for batches in seen:
        (z, labels, w), = batches  # train.calibrate_batches = 1
        b = z.shape[0] // 2
        assert torch.equal(z[:b], z[b:]) and labels.values.shape[0] == 2 * b
        lam = float(w[0])
        assert torch.allclose(w, torch.cat([torch.full((b,), lam), torch.full((b,), 1 - lam)]))
