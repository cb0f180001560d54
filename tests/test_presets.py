"""Presets (overrides of the config schema) and ``--set stage.key=value`` overrides."""
from __future__ import annotations

import pytest

from lpqld_fast import config as schema
from lpqld_fast.presets import PRESETS, apply_overrides, get_preset, preset_overrides


def test_override_value_types() -> None:
    cfg = get_preset("fashion-mnist")
    apply_overrides(cfg, ["train.epochs=7", "train.lr=0.002", "train.calibrate=false", "train.student_t=teacher",
                          "relabel.rrc_scale=0.5,1.0", "relabel.rrc_ratio=[0.75, 1.25]", "train.batch_size=none",
                          "train.bf16=auto", "squeeze.train_workers=2", "relabel.out_size=20,24"])
    assert cfg["train"]["epochs"] == 7 and isinstance(cfg["train"]["epochs"], int)
    assert cfg["train"]["lr"] == pytest.approx(0.002)
    assert cfg["train"]["calibrate"] is False
    assert cfg["train"]["student_t"] == "teacher"
    assert cfg["relabel"]["rrc_scale"] == [0.5, 1.0]
    assert cfg["relabel"]["rrc_ratio"] == [0.75, 1.25]
    assert cfg["train"]["batch_size"] is None and cfg["train"]["bf16"] == "auto"
    assert cfg["squeeze"]["train_workers"] == 2 and cfg["relabel"]["out_size"] == [20, 24]


def test_get_preset_is_a_copy() -> None:
    a = get_preset("fashion-mnist")
    a["train"]["epochs"] = -1
    assert get_preset("fashion-mnist")["train"]["epochs"] != -1


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_complete_and_valid_overrides(name: str) -> None:
    """Every preset names only schema keys; applied to the defaults it is a complete, valid config."""
    for section, values in PRESETS[name].items():
        if section in schema.SECTIONS:
            assert set(values) <= set(schema.defaults(section)), (name, section)
    cfg = get_preset(name)
    assert schema.check_config(cfg) == cfg
    for section in schema.SECTIONS:
        assert set(cfg[section]) == set(schema.defaults(section))
    over = preset_overrides(name)
    assert over["dataset"] == cfg["dataset"]
    for section, values in over.items():
        if section in schema.SECTIONS:
            assert all(schema.defaults(section)[k] != v for k, v in values.items())


@pytest.mark.parametrize("bad", ["train", "train=3", "nostage.x=1", "dataset.x=1"])
def test_bad_override_names_the_problem(bad: str) -> None:
    with pytest.raises(ValueError, match="override"):
        apply_overrides(get_preset("fashion-mnist"), [bad])


def test_demo_preset_builds_a_half_width_teacher_and_the_paper_student() -> None:
    """squeeze.width reaches the teacher that squeeze trains and the later stages load; the student keeps its
    width (the demo preset changes the teacher, and evaluates the test split for the selected student only)."""
    from types import SimpleNamespace

    from lpqld_fast.models import get_model
    from lpqld_fast.models.teacher import build_teacher

    meta = SimpleNamespace(num_classes=10, in_chans=1, image_size=28)
    demo, paper = get_preset("fashion-mnist-demo"), get_preset("fashion-mnist")
    assert build_teacher(demo["squeeze"], meta).body[0].out_channels == 64
    assert build_teacher(paper["squeeze"], meta).body[0].out_channels == 128
    assert {**demo["train"], "test_eval": "every"} == {**paper["train"], "test_eval": "every"}
    assert demo["train"]["test_eval"] == "selected" and demo["relabel"] == paper["relabel"]
    student = get_model(demo["train"]["model"], num_classes=10, in_chans=1, image_size=28)
    assert student.body[0].out_channels == 128


def test_best_preset_is_the_measured_row() -> None:
    """fashion-mnist-best is exactly the config of the results row that measured it (docs/RESULTS.md), so the
    row's three seeds are the preset's numbers."""
    import copy
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "fmnist_results", Path(__file__).resolve().parents[1] / "scripts/fmnist_results.py")
    fr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fr)
    name = "LPLD x40 + herded real images + 1000 epochs + 3 teachers"
    row = next(r for r in fr.rows_for("beyond", 10, 100) if r["name"] == name)
    made = copy.deepcopy(get_preset("fashion-mnist"))
    made["squeeze"]["teachers"] = row.get("teachers", 1)
    made["relabel"].update(row["relabel"])
    made["train"].update(row["train"])
    made["recover"].update(fr.RECOVERY[row["recovery"]])
    best = get_preset("fashion-mnist-best")
    for section in ("squeeze", "recover", "relabel", "train"):
        assert best[section] == made[section], section
    assert best["squeeze"]["teachers"] == 3 and best["train"]["epochs"] == 1000
    assert best["recover"]["select"] == "herding"
    assert not best["relabel"]["cutmix"] and best["relabel"]["prune_ratio"] == 0.975
