"""Presets and ``--set stage.key=value`` overrides."""
from __future__ import annotations

import pytest

from lpqld_fast.presets import PRESETS, apply_overrides, get_preset


def test_override_value_types() -> None:
    cfg = get_preset("fashion-mnist")
    apply_overrides(cfg, ["train.epochs=7", "train.lr=0.002", "train.calibrate=false", "train.student_t=teacher",
                          "relabel.rrc_scale=0.5,1.0", "relabel.rrc_ratio=[0.75, 1.25]", "train.warmup_epochs=none"])
    assert cfg["train"]["epochs"] == 7 and isinstance(cfg["train"]["epochs"], int)
    assert cfg["train"]["lr"] == pytest.approx(0.002)
    assert cfg["train"]["calibrate"] is False
    assert cfg["train"]["student_t"] == "teacher"
    assert cfg["relabel"]["rrc_scale"] == [0.5, 1.0]
    assert cfg["relabel"]["rrc_ratio"] == [0.75, 1.25]
    assert cfg["train"]["warmup_epochs"] is None


def test_get_preset_is_a_copy() -> None:
    a = get_preset("fashion-mnist")
    a["train"]["epochs"] = -1
    assert PRESETS["fashion-mnist"]["train"]["epochs"] != -1


@pytest.mark.parametrize("bad", ["train", "train=3", "nostage.x=1", "dataset.x=1"])
def test_bad_override_names_the_problem(bad: str) -> None:
    with pytest.raises(ValueError, match="override"):
        apply_overrides(get_preset("fashion-mnist"), [bad])
