"""The config schema (lpqld_fast.config): --set parsing and validation, auto settings, rerun comparisons, help."""
from __future__ import annotations

import pytest

from lpqld_fast import config as schema
from lpqld_fast import runtime


def test_every_field_has_a_kind_a_meaning_and_a_valid_default() -> None:
    for section in schema.SECTIONS:
        for key, f in schema.fields_of(section).items():
            assert f.metadata["help"] and f.metadata["kind"], (section, key)
            default = schema.defaults(section)[key]
            assert schema.check_value(section, key, default) == default, (section, key)


@pytest.mark.parametrize("item,section,key,value", [
    ("recover.ipc=3", "recover", "ipc", 3),
    ("train.lr=1e-3", "train", "lr", 1e-3),
    ("train.bf16=auto", "train", "bf16", "auto"),
    ("train.bf16=false", "train", "bf16", False),
    ("squeeze.stats_workers=0", "squeeze", "stats_workers", 0),
    ("relabel.mode=ms", "relabel", "label", "ms"),  # the alias
    ("relabel.out_size=16", "relabel", "out_size", [16, 16]),
    ("relabel.flip=none", "relabel", "flip", None),
    ("runtime.threads=1", "runtime", "threads", 1),
    ("dataset=imagefolder", None, "dataset", "imagefolder"),
    ("data_root=/some/where", None, "data_root", "/some/where"),
])
def test_set_parses_by_the_fields_kind(item, section, key, value) -> None:
    assert schema.parse_override(item) == (section, key, value)


@pytest.mark.parametrize("item,message", [
    ("recover.ipc=2.7", "recover.ipc must be a positive int, got '2.7'"),
    ("recover.ipc=abc", "recover.ipc must be a positive int, got 'abc'"),
    ("recover.ipc=0", "recover.ipc must be a positive int, got 0"),
    ("train.test_subset=-1", "train.test_subset must be an int >= 0 (0 = the whole test split), got -1"),
    ("train.lr=nan", "train.lr must be a number >= 0, got nan"),
    ("relabel.prune_ratio=1", "relabel.prune_ratio must be a number in [0, 1), got 1.0"),
    ("relabel.temperature=inf", "relabel.temperature must be a positive number, got inf"),
    ("relabel.rrc_scale=1,0.5", "relabel.rrc_scale must be a pair of numbers lo,hi with 0 < lo <= hi"),
    ("train.calibrate=yes", "train.calibrate must be true or false, got 'yes'"),
    ("train.bf16=1", "train.bf16 must be true, false or auto, got '1'"),
    ("train.pool=random", "train.pool must be one of ['epoch', 'lpld', 'lpqld'], got 'random'"),
    ("squeeze.train_workers=-1", "squeeze.train_workers must be an int >= 0 or auto, got -1"),
    ("runtime.threads=0", "runtime.threads must be a positive int or auto, got 0"),
    ("train.student_t=0", "train.student_t must be a positive number or teacher, got 0.0"),
    ("squeeze.epoch=2", "unknown squeeze config keys 'epoch' (did you mean 'epochs'?)"),
    ("nostage.x=1", "unknown stage 'nostage'"),
])
def test_set_refuses_bad_values_naming_the_key(item: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        schema.parse_override(item)
    assert message in str(e.value)


def test_check_section_fills_defaults_and_refuses_unknown_and_mistyped_keys() -> None:
    cfg = schema.check_section("recover", {"ipc": 2})
    assert cfg == {**schema.defaults("recover"), "ipc": 2}
    with pytest.raises(ValueError, match=r"recover.ipc must be a positive int, got 2.7"):
        schema.check_section("recover", {"ipc": 2.7})  # a preset or library dict: not truncated either
    with pytest.raises(ValueError, match=r"recover.ipc must be a positive int, got True"):
        schema.check_section("recover", {"ipc": True})
    with pytest.raises(ValueError, match=r"unknown train config keys 'epoch' \(did you mean 'epochs'\?\)"):
        schema.check_section("train", {"epoch": 3})
    with pytest.raises(ValueError, match=r"both label='mr' and mode='ms'"):
        schema.check_section("relabel", {"label": "mr", "mode": "ms"})


def test_auto_settings_follow_the_hardware_and_the_record(monkeypatch) -> None:
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2"})
    cfg, notes = schema.resolve_auto("train", schema.check_section("train", {}), "cpu")
    assert cfg["bf16"] is False and cfg["channels_last"] is True
    assert any("bf16=False (auto: the CPU lacks avx512_bf16/amx_bf16" in n for n in notes)
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    cfg, _ = schema.resolve_auto("train", schema.check_section("train", {}), "cpu")
    assert cfg["bf16"] is True
    # a run recorded in fp32 keeps fp32 when continued on a bf16 machine; explicit values are kept
    cfg, notes = schema.resolve_auto("train", schema.check_section("train", {}), "cpu", recorded={"bf16": False})
    assert cfg["bf16"] is False and "bf16=False (as recorded)" in notes
    cfg, _ = schema.resolve_auto("train", schema.check_section("train", {"bf16": False}), "cpu")
    assert cfg["bf16"] is False
    workers, _ = runtime.auto_workers()
    assert workers == max(0, min(runtime.MAX_AUTO_WORKERS, runtime.usable_cpus() - 1))
    threads, _ = runtime.auto_threads()
    assert 1 <= threads <= runtime.usable_cpus()


def test_result_diff_names_result_keys_only_and_fills_missing_with_defaults() -> None:
    old = schema.check_section("train", {"lr": 1e-3})
    assert schema.result_diff("train", old, {**old, "eval_every": 5, "channels_last": False}) == []
    assert schema.result_diff("train", old, {**old, "lr": 0.01}) == ["train.lr 0.001 -> 0.01"]
    # a record written before a setting existed compares as that setting's default
    partial = {k: v for k, v in old.items() if k != "t_floor"}
    assert schema.result_diff("train", partial, old) == []
    assert schema.result_diff("recover", {"crop_scale": (0.08, 1.0)}, {"crop_scale": [0.08, 1.0]}) == []


def test_options_help_lists_every_key_with_type_default_and_meaning() -> None:
    text = schema.options_help(("recover", "runtime"), {"recover": {"jitter": 2}})
    for key in schema.defaults("recover"):
        assert f"recover.{key} (" in text
    assert "recover.ipc (int, default 10): images per class" in text
    assert "recover.jitter (int, default 0, preset 2)" in text
    assert "runtime.threads (int|auto, default auto)" in text
