"""The result tables are generated from run records: aggregation, selection column, block rewriting."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location("results_tables",
                                               Path(__file__).resolve().parents[1] / "scripts/results_tables.py")
rt = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(rt)


def _record(tmp: Path, name: str, seed: int, selected: float, best: float, cpu: str = "CPU A",
            group: str = "LPLD", factor: int = 40, commit: str = "abcdef0123", teacher: float | None = 91.35) -> None:
    rec = {"name": name, "group": group, "ipc": 10, "seed": seed, "factor": factor, "selected_acc": selected,
           "last_acc": selected - 1, "best_acc": best, "total_bytes": 2048, "label_compression": 49.4,
           "row_seconds": 120.0, "record": {"commit": commit, "machine": {"cpu": cpu}}}
    if teacher is not None:
        rec["teacher_test_acc"] = teacher
    path = tmp / "ipc10" / name.replace(" ", "_") / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))


def test_rows_average_the_selected_accuracy_over_seeds(tmp_path) -> None:
    for seed, (sel, best) in enumerate([(80.0, 81.0), (82.0, 83.0), (84.0, 84.5)]):
        _record(tmp_path, "LPLD x40", seed, sel, best)
    rows = rt.aggregate(rt.load_records(tmp_path))
    assert len(rows) == 1 and rows[0]["seeds"] == [0, 1, 2]
    text = rt.table(rows)
    assert "**82.00 +- 2.00**" in text  # the headline is the validation-selected accuracy
    assert "82.83 +- 1.76" in text  # best-of-test beside it
    assert "| 2.0 KiB |" in text and "abcdef0" in text and "| 91.35 |" in text


def test_rows_name_their_teachers_machines_and_dirty_commits(tmp_path) -> None:
    _record(tmp_path, "LPLD x40", 0, 80.0, 81.0, commit="1234567abc+dirty", teacher=91.35)
    _record(tmp_path, "LPLD x40", 1, 81.0, 81.0, cpu="CPU B", teacher=91.38)
    _record(tmp_path, "LPLD x40", 2, 82.0, 82.0, teacher=None)  # a record from before the field
    rows = rt.aggregate(rt.load_records(tmp_path))
    text = rt.table(rows)
    assert "| 91.35, 91.38, ? |" in text
    assert "1234567+dirty, abcdef0" in text  # a run from uncommitted changes stays marked
    assert rows[0]["cpus"] == ["CPU A", "CPU B"]


def test_blocks_are_rewritten_between_markers_only(tmp_path) -> None:
    for seed in range(3):
        _record(tmp_path, "LPLD x40", seed, 80.0 + seed, 85.0)
    generated = rt.blocks(rt.load_records(tmp_path))
    assert {"all", "pruning", "summary"} <= set(generated)
    doc = "keep me\n<!-- results:pruning -->\nold table\n<!-- /results:pruning -->\nand me\n<!-- results:nope -->x" \
          "<!-- /results:nope -->"
    new = rt.rewrite(doc, generated)
    assert new.startswith("keep me\n<!-- results:pruning -->\n") and "old table" not in new
    assert "LPLD x40" in new and new.endswith("and me\n<!-- results:nope -->x<!-- /results:nope -->")
    assert rt.rewrite(new, generated) == new  # idempotent


def test_beyond_block_compares_each_switch_with_its_base_row(tmp_path) -> None:
    _record(tmp_path, "LPLD x40", 0, 79.0, 79.5)
    _record(tmp_path, "LPLD x10", 0, 82.0, 82.5, factor=10)
    assert "beyond" not in rt.blocks(rt.load_records(tmp_path))  # no switch measured: no block
    _record(tmp_path, "LPLD x40 + student CutMix", 0, 81.0, 81.5, group="beyond the papers")
    block = rt.blocks(rt.load_records(tmp_path))["beyond"]
    assert "LPLD x40 + student CutMix" in block and "| LPLD x40 |" in block and "LPLD x10" not in block


def test_plot_draws_the_published_points(tmp_path, monkeypatch) -> None:
    seen = {}
    import lpqld_fast.report as report

    monkeypatch.setattr(report, "plot_accuracy_vs_storage",
                        lambda pts, path, title, references: seen.update(pts=pts, refs=references))
    _record(tmp_path, "LPLD x40", 0, 79.0, 79.5)
    _record(tmp_path, "LPLD x40 + student CutMix", 0, 81.0, 81.5, group="beyond the papers")
    rt.plot(rt.aggregate(rt.load_records(tmp_path)), tmp_path / "p.png", 10)
    assert {p["label"] for p in seen["pts"]} == {"x40", "student CutMix"}
    kip = next(r for r in seen["refs"] if r["label"] == "KIP")
    assert kip["acc"] == 88.8 and kip["total_bytes"] == 10 * 10 * 784


@pytest.mark.parametrize("values,expect", [([81.0], "81.00"), ([80.0, 82.0], "81.00 +- 1.41")])
def test_mean_sd_format(values, expect) -> None:
    assert rt._mean_sd(values) == expect


def _demo_record(tmp: Path, name: str, seed: int, teacher_seed: int, selected: float) -> None:
    rec = {"preset": "fashion-mnist-demo", "teacher": "convnet-bn width 64, 7 epochs", "teacher_seed": teacher_seed,
           "seed": seed, "teacher_test_acc": 91.5, "student_selected_acc": selected, "student_last_acc": selected,
           "stage_seconds": None, "wall_seconds": None, "commit": "abcdef0",
           "machine": {"cpu": "CPU A", "cpu_capability": "AVX2", "threads": 2, "load": "idle"}}
    (tmp / name).mkdir()
    (tmp / name / "record.json").write_text(json.dumps(rec))


def test_demo_summary_compares_students_of_one_teacher(tmp_path) -> None:
    """A student downstream of another teacher seed is summarised apart, not averaged in."""
    for seed, sel in enumerate([78.0, 79.0, 80.0]):
        _demo_record(tmp_path, f"t0-s{seed}", seed, 0, sel)
    _demo_record(tmp_path, "t1-s1", 1, 1, 70.0)
    text = rt.demo_block(tmp_path)
    assert "teacher seed 0: student selected 79.00 +- 1.00" in text
    assert "teacher seed 1: student selected 70.00" in text
    assert text.count("| fashion-mnist-demo |") == 4


def test_screening_block_names_each_screens_own_settings(tmp_path) -> None:
    base = "python scripts/fmnist_results.py --rows beyond --tag {} --set train.bf16=false --set runtime.threads=1"
    for name, extra, acc in (("LPLD x40 [screen]", "", 79.45), ("LPLD x40 [t4]", " --set train.t0=4", 79.6)):
        rec = {"name": name, "seed": 0, "selected_acc": acc, "last_acc": acc - 0.1, "best_acc": acc + 0.2,
               "teacher_test_acc": 91.38, "command": base.format(name[-3:-1]) + extra,
               "record": {"commit": "0123456789"}}
        (tmp_path / f"{name[-3:-1]}.json").write_text(json.dumps(rec))
    text = rt.screening_block(tmp_path)
    assert "from 2 records" in text
    assert "| LPLD x40 [screen] | none (the base) | 0 | 79.45 | 79.35 | 79.65 | 91.38 | 0123456 |" in text
    assert "| LPLD x40 [t4] | `train.t0=4` | 0 | 79.60 |" in text  # the settings all screens share are left out
    assert rt.screening_block(tmp_path / "none") == ""
