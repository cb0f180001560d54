"""train.test_eval=selected: the validation split at each evaluation, the test split only for the weights
selection keeps and the last ones; the reported accuracies equal those of train.test_eval=every."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lpqld_fast.train as train_mod
from lpqld_fast.cli import main
from tests.cli_args import run_upstream, tiny_args, train_from

TINY = tiny_args({"train.epochs": 12, "train.eval_every": 2, "train.checkpoint_every": 4})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, synthetic_run_module) -> Path:
    """squeeze, recover and relabel of a tiny synthetic run, single-threaded."""
    return run_upstream(tmp_path_factory.mktemp("test-eval") / "up", TINY)


def _train(upstream: Path, dest: Path, *extra: str, rc: int = 0) -> dict:
    return train_from(upstream, dest, TINY, *extra, rc=rc)


def test_selected_mode_reports_the_same_accuracies_with_two_test_passes(upstream, tmp_path) -> None:
    every = _train(upstream, tmp_path / "every")
    sel = _train(upstream, tmp_path / "selected", "--set", "train.test_eval=selected")
    assert (sel["selected_acc"], sel["selected_epoch"], sel["last_acc"]) == \
        (every["selected_acc"], every["selected_epoch"], every["last_acc"])
    assert every["best_acc"] is not None and sel["best_acc"] is None
    assert [e["val_acc"] for e in sel["evals"]] == [e["val_acc"] for e in every["evals"]]
    tested = {e["epoch"] for e in sel["evals"] if "test_acc" in e}
    assert tested == {sel["selected_epoch"], 12}
    assert len(sel["evals"]) == 6
    if sel["selected_epoch"] != 12:  # the selected weights came from the kept copy, not the final ones
        assert sel["selected_acc"] == next(e["test_acc"] for e in every["evals"] if e["epoch"] == sel["selected_epoch"])
    assert main(["report", "--out", str(tmp_path / "selected")]) == 0  # a curve with two test points, no best-of-test
    text = (tmp_path / "selected" / "report" / "REPORT.md").read_text()
    assert "the test split ran for the selected and the last weights only" in text


def test_selected_mode_resumes_with_the_kept_weights(upstream, tmp_path, monkeypatch) -> None:
    whole = _train(upstream, tmp_path / "whole", "--set", "train.test_eval=selected")
    real = train_mod.train_one_epoch

    def crash_at_10(state, src, cfg, epoch, seed, device):
        if epoch == 10:
            raise KeyboardInterrupt("killed")
        return real(state, src, cfg, epoch, seed, device)

    monkeypatch.setattr(train_mod, "train_one_epoch", crash_at_10)
    _train(upstream, tmp_path / "killed", "--set", "train.test_eval=selected", rc=130)  # the CLI's interrupted rc
    saved = torch.load(tmp_path / "killed" / "train" / "last.pt", weights_only=True)
    assert saved["epoch"] == 8 and "best_weights" in saved
    monkeypatch.setattr(train_mod, "train_one_epoch", real)
    resumed = _train(upstream, tmp_path / "killed", "--set", "train.test_eval=selected")
    for key in ("selected_acc", "selected_epoch", "last_acc"):
        assert resumed[key] == whole[key], key
    assert [e["val_acc"] for e in resumed["evals"]] == [e["val_acc"] for e in whole["evals"]]


def test_selected_mode_needs_a_validation_split(upstream, tmp_path, capsys) -> None:
    with pytest.raises(FileNotFoundError):  # rc 2: refused before train_metrics.json (or anything) is written
        _train(upstream, tmp_path / "noval", "--set", "train.test_eval=selected", "--set", "train.val_size=0", rc=2)
    assert "train.test_eval=selected needs a validation split" in capsys.readouterr().err
    assert not (tmp_path / "noval" / "train").exists()


def test_switching_mode_on_a_started_run_is_refused(upstream, tmp_path, capsys) -> None:
    _train(upstream, tmp_path / "switch")
    _train(upstream, tmp_path / "switch", "--set", "train.test_eval=selected", rc=2)
    assert "train.test_eval 'every' -> 'selected'" in capsys.readouterr().err
