"""check_replay_params: the host-side form of replay_batch's value checks, made once per stored batch so the
student's replay can run with validate=False (no device value read back per step)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lpqld_fast.augment import (AugParams, CutMixParams, CutoutParams, check_replay_params, replay_batch,
                                sample_aug_params)

N_IMAGES = 12


def _params(cutmix: bool = True, cutout: bool = True) -> AugParams:
    g = torch.Generator().manual_seed(3)
    return sample_aug_params(torch.tensor([0, 5, 11, 2, 7]), 16, 16, 3, 12, g, cutmix=cutmix, cutout=cutout)


def _images() -> torch.Tensor:
    return torch.randint(0, 256, (N_IMAGES, 3, 16, 16), generator=torch.Generator().manual_seed(1),
                         dtype=torch.uint8)


@pytest.mark.parametrize("cutmix,cutout", [(False, False), (True, False), (False, True), (True, True)])
def test_checked_params_replay_the_same_pixels_without_checks(cutmix, cutout) -> None:
    aug = _params(cutmix, cutout)
    check_replay_params(aug, N_IMAGES)
    images = _images()
    want = replay_batch(images, aug, [0.5] * 3, [0.25] * 3)
    got = replay_batch(images, aug, [0.5] * 3, [0.25] * 3, validate=False)
    assert torch.equal(want, got)


def _bad_cases() -> list[tuple[str, AugParams, type[Exception]]]:
    aug = _params()
    boxes = aug.boxes.clone()
    boxes[1, 2] = float("nan")
    flips = torch.tensor([0, 1, 2, 0, 1], dtype=torch.uint8)
    cm = aug.cutmix
    return [
        ("index past the images", dataclasses.replace(aug, image_indices=torch.tensor([0, 5, 12, 2, 7])), IndexError),
        ("negative index", dataclasses.replace(aug, image_indices=torch.tensor([0, -1, 1, 2, 7])), IndexError),
        ("NaN box", dataclasses.replace(aug, boxes=boxes), ValueError),
        ("flip of 2", dataclasses.replace(aug, flips=flips), ValueError),
        ("CutMix box outside", dataclasses.replace(aug, cutmix=CutMixParams(cm.lam, torch.tensor([0, 0, 13, 4]),
                                                                            cm.perm)), ValueError),
        ("CutMix perm short", dataclasses.replace(aug, cutmix=CutMixParams(cm.lam, cm.box, cm.perm[:3])), ValueError),
        ("cutout boxes short", dataclasses.replace(aug, cutout=CutoutParams(aug.cutout.boxes[:2], aug.cutout.fill)),
         ValueError),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_params_are_refused_like_replay_batch(case) -> None:
    _, aug, err = case
    with pytest.raises(err):
        check_replay_params(aug, N_IMAGES)
    with pytest.raises((err, RuntimeError, ValueError, IndexError)):  # replay_batch's own checks (or torch's)
        replay_batch(_images(), aug, [0.5] * 3, [0.25] * 3)


def test_perm_values_outside_the_batch_are_refused() -> None:
    aug = _params()
    bad = dataclasses.replace(aug, cutmix=CutMixParams(aug.cutmix.lam, aug.cutmix.box, torch.tensor([0, 1, 2, 3, 5])))
    with pytest.raises(ValueError, match="permutation"):
        check_replay_params(bad, N_IMAGES)


def test_not_aug_params_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="AugParams"):
        check_replay_params({"boxes": None}, N_IMAGES)
