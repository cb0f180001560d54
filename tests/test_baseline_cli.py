"""``lpqld baseline``: paper 001's baseline (random real images, an early expert's top-k labels) end to end."""
from __future__ import annotations

import json

import pytest

from lpqld_fast.cli import main
from lpqld_fast.io_utils import load_tensors, sha256_tensors

TINY = [
    "--dataset", "synthetic",  # the small synthetic set under the fashion-mnist preset
    "--set", "squeeze.epochs=2", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=50",
    "--set", "relabel.epochs=2", "--set", "relabel.batch_size=5",
    "--set", "train.epochs=2", "--set", "train.eval_every=1", "--set", "train.model=convnet-bn",
]


def test_baseline_runs_end_to_end_with_the_expert_and_resumes(tmp_path, synthetic_preset, capsys) -> None:
    run = tmp_path / "run"
    argv = ["baseline", "--out", str(run), *TINY, "--ipc", "2", "--expert-epoch", "1", "--k", "3"]
    assert main(argv) == 0
    recover = json.loads((run / "recover" / "manifest.json").read_text())
    assert recover["source"] == "real" and recover["num_images"] == 2 * 10
    assert recover["recover"]["strategy"] == "random"
    # the labels are the epoch-1 expert's, top-3 probabilities not renormalised, every batch kept
    expert = json.loads((run / "expert.json").read_text())
    epoch1 = sha256_tensors(load_tensors(run / "squeeze" / "checkpoints" / "epoch_001.pt"))
    assert expert["sha256"] == epoch1 and expert["k"] == 3 and expert["label"] == "topk_norenorm"
    store = json.loads((run / "relabel" / "manifest.json").read_text())
    assert store["teacher_sha256"] == epoch1 and store["images_sha256"] == recover["images_sha256"]
    assert store["label"]["mode"] == "topk_norenorm" and store["label"]["k"] == 3
    assert store["num_kept"] == store["total_batches"] and store["config"]["cutmix"] is False
    train_cfg = json.loads((run / "train" / "config.json").read_text())["config"]["train"]
    assert (train_cfg["temperature"], train_cfg["t0"], train_cfg["calibrate"]) == ("constant", 1.0, False)
    metrics = json.loads((run / "train" / "train_metrics.json").read_text())
    assert len(metrics["epochs"]) == 2 and all(e["T"] == 1.0 and e["t_s"] == 1.0 for e in metrics["epochs"])
    assert "student test top-1" in (run / "report" / "REPORT.md").read_text()
    assert set(json.loads((run / "timings.json").read_text())) == {"squeeze", "recover", "relabel", "train"}
    # a rerun finds every stage done and gives the same student
    before = (run / "train" / "student.pt").read_bytes()
    assert main(argv) == 0
    assert (run / "train" / "student.pt").read_bytes() == before


def test_baseline_set_overrides_its_defaults_and_options_win(tmp_path, synthetic_preset) -> None:
    run = tmp_path / "run"
    argv = ["baseline", "--out", str(run), *TINY, "--set", "relabel.label=mr", "--set", "relabel.k=5",
            "--k", "2", "--set", "recover.ipc=1"]
    assert main(argv) == 0  # the final teacher labels
    store = json.loads((run / "relabel" / "manifest.json").read_text())
    assert (store["label"]["mode"], store["label"]["k"], store["num_images"]) == ("mr", 2, 10)
    assert json.loads((run / "expert.json").read_text())["epoch"] == "final"


def test_baseline_expert_epoch_outside_the_teachers_training_is_refused_first(tmp_path, synthetic_preset,
                                                                             capsys) -> None:
    run = tmp_path / "run"
    assert main(["baseline", "--out", str(run), *TINY, "--ipc", "1", "--expert-epoch", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lpqld baseline: error: --expert-epoch 5 is not an epoch of the teacher's training "
                   "(squeeze.epochs=2: 1 to 2)"]
    assert not (run / "squeeze").exists()  # nothing trained or written


def test_baseline_help_documents_its_options(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["baseline", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--ipc", "--expert-epoch", "--k", "topk_norenorm", "relabel.prune_ratio=0"):
        assert option in out
