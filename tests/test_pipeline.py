"""End-to-end smoke run of squeeze -> recover -> relabel -> train -> report on tiny synthetic data."""
from __future__ import annotations

import json

import pytest
import torch

from lpqld_fast.cli import main
from lpqld_fast.label_pool import epoch_batch_ids, temperature_at

TINY = [
    "--dataset", "synthetic",  # the small synthetic set under the fashion-mnist preset: no 60k-image teacher
    "--set", "squeeze.epochs=1", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=50",
    "--set", "recover.ipc=2", "--set", "recover.iterations=3",
    "--set", "relabel.epochs=3", "--set", "relabel.batch_size=5", "--set", "relabel.k=3",
    "--set", "relabel.prune_ratio=0.5",
    "--set", "train.epochs=3", "--set", "train.eval_every=1", "--set", "train.model=convnet-bn",
]


def test_distill_end_to_end_and_resume(tmp_path, synthetic_preset, capsys) -> None:
    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), *TINY]) == 0
    assert json.loads((run / "run.json").read_text())["dataset"] == "synthetic"  # not the 60k-image set
    report = (run / "report" / "REPORT.md").read_text()
    assert "student test top-1" in report
    for png in ("training_curves.png", "distilled_images.png", "accuracy_vs_storage.png"):
        assert (run / "report" / png).stat().st_size > 1000
    metrics = json.loads((run / "train" / "train_metrics.json").read_text())
    assert len(metrics["epochs"]) == 3 and 0 <= metrics["best_acc"] <= 100
    assert metrics["epochs"][0]["T"] == synthetic_preset["train"]["t0"]  # step schedule at e = 1: T0
    assert 0.01 <= metrics["epochs"][-1]["t_s"] <= 1.0
    # selection on a validation split of real training images, diagnostics per evaluation, provenance
    assert metrics["val_images"] > 0 and metrics["selection"] == "best validation accuracy"
    ev = metrics["evals"][-1]
    assert {"val_acc", "val_nll", "test_nll", "train_loss", "logit_dropped_mean"} <= set(ev)
    assert metrics["selected_acc"] in [e["test_acc"] for e in metrics["evals"]]
    assert metrics["record"]["seed"] == 0 and metrics["record"]["machine"]["cores"] >= 1
    assert metrics["record"]["config"]["train"]["epochs"] == 3
    manifest = json.loads((run / "relabel" / "manifest.json").read_text())
    assert manifest["complete"] is True
    # A second run reuses every stage (resume / no-op) and gives the same student.
    before = (run / "train" / "student.pt").read_bytes()
    assert main(["distill", "--out", str(run), *TINY]) == 0
    assert (run / "train" / "student.pt").read_bytes() == before
    out = capsys.readouterr().out
    assert "storage" in out
    assert main(["report", "storage", "--out", str(run), *TINY]) == 0
    assert "label" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, synthetic_preset, capsys) -> None:
    assert main(["recover", "--out", str(tmp_path / "none"), *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "teacher checkpoint not found" in err[0]
    assert main(["squeeze", "--out", str(tmp_path), "--set", "bogus=1"]) == 2
    assert "stage.key=value" in capsys.readouterr().err


def test_temperature_schedules() -> None:
    assert temperature_at(1, 300) == 20.0
    assert temperature_at(29, 300) == 20.0 and temperature_at(30, 300) == pytest.approx(14.0)
    assert temperature_at(300, 300) == 2.0  # floor
    assert temperature_at(1, 10, "cosine") == 20.0 and temperature_at(10, 10, "cosine") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="schedule"):
        temperature_at(1, 10, "linear")


def test_label_pools_are_seeded_and_keyed_by_batch_id() -> None:
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 10, 11])  # 4 batches per epoch, 3 stored epochs, some pruned
    # epoch mode cycles the kept batches in stored order, 4 steps per training epoch however many are pruned
    assert epoch_batch_ids(kept, "epoch", 1, 4, 0).tolist() == [0, 2, 3, 5]
    assert epoch_batch_ids(kept, "epoch", 2, 4, 0).tolist() == [7, 8, 10, 11]
    assert epoch_batch_ids(kept, "epoch", 3, 4, 0).tolist() == [0, 2, 3, 5]  # cycles
    assert epoch_batch_ids(kept[torch.randperm(8)], "epoch", 2, 4, 0).tolist() == [7, 8, 10, 11]  # stored order
    assert epoch_batch_ids(torch.tensor([6]), "epoch", 5, 4, 0).tolist() == [6] * 4
    unpruned = torch.arange(12)  # without pruning: stored epoch (e-1) mod E whole, as the reference replays it
    assert epoch_batch_ids(unpruned, "epoch", 2, 4, 0).tolist() == [4, 5, 6, 7]
    assert epoch_batch_ids(unpruned, "epoch", 4, 4, 0).tolist() == [0, 1, 2, 3]
    for mode in ("epoch", "lpld", "lpqld"):
        for nkept in (1, 3, 8):
            for e in (1, 2, 7):
                assert len(epoch_batch_ids(kept[:nkept], mode, e, 4, 0)) == 4, (mode, nkept, e)
    a = epoch_batch_ids(kept, "lpqld", 3, 4, 0)
    assert a.tolist() == epoch_batch_ids(kept, "lpqld", 3, 4, 0).tolist()  # seeded
    assert len(set(a.tolist())) == 4 and set(a.tolist()) <= set(kept.tolist())  # no repeats within an epoch
    b = epoch_batch_ids(kept, "lpld", 3, 4, 0)
    assert len(b) == 4 and set(b.tolist()) <= set(kept.tolist())
    with pytest.raises(ValueError, match="pool"):
        epoch_batch_ids(kept, "random", 1, 4, 0)


def test_every_pool_takes_a_full_epoch_of_steps_under_pruning(tmp_path, synthetic_preset) -> None:
    """A pruned store still gives floor(N/B) optimiser steps per epoch in every pool, and the schedule anneals."""
    from lpqld_fast.presets import apply_overrides, get_preset
    from lpqld_fast.train import run_train

    run = tmp_path / "run"
    args = [*TINY, "--set", "relabel.prune_ratio=0.8", "--set", "train.pool=epoch", "--set", "train.epochs=4"]
    assert main(["distill", "--out", str(run), *args]) == 0
    manifest = json.loads((run / "relabel" / "manifest.json").read_text())
    nb = manifest["batches_per_epoch"]
    assert manifest["kept_batch_ids"]["count"] < nb * manifest["epochs"] and nb > 1  # really pruned
    sets = [a for a in args[2:] if a != "--set"]  # the stage.key=value overrides (TINY starts with --dataset)
    for pool in ("epoch", "lpld", "lpqld"):
        out = run / "train" if pool == "epoch" else tmp_path / f"train-{pool}"
        if pool != "epoch":  # the same store and images, another pool
            config = apply_overrides(get_preset("fashion-mnist"), [*sets, f"train.pool={pool}"])
            run_train(config, run / "recover", run / "relabel", out, progress=False)
        metrics = json.loads((out / "train_metrics.json").read_text())
        assert [e["steps"] for e in metrics["epochs"]] == [nb] * 4, pool
        lrs = [e["lr"] for e in metrics["epochs"]]
        assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and lrs[0] > lrs[1] > lrs[2] > 0, pool


def test_train_test_subset_evaluates_on_a_fixed_balanced_subset(tmp_path, synthetic_preset, capsys) -> None:
    from lpqld_fast.data import get_dataset, stratified_subset
    from lpqld_fast.evaluation import evaluate
    from lpqld_fast.io_utils import load_tensors
    from lpqld_fast.models import get_model

    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), *TINY, "--set", "train.test_subset=30"]) == 0
    metrics = json.loads((run / "train" / "train_metrics.json").read_text())
    full = get_dataset("synthetic", "test")
    sub = stratified_subset(full, 30, seed=0)
    assert metrics["test_images"] == len(sub) < len(full.labels)
    student = get_model("convnet-bn", num_classes=full.num_classes, in_chans=full.images.shape[1],
                        image_size=full.images.shape[2])
    student.load_state_dict(load_tensors(run / "train" / "student.pt"))
    # evaluated as train evaluates: the precision and layout it chose for this machine (its recorded config)
    train_cfg = json.loads((run / "train" / "config.json").read_text())["config"]["train"]
    assert isinstance(train_cfg["bf16"], bool) and isinstance(train_cfg["channels_last"], bool)
    if train_cfg.get("channels_last"):
        student = student.to(memory_format=torch.channels_last)
    acc = evaluate(student, sub.images, sub.labels, full.mean, full.std, bf16=bool(train_cfg.get("bf16")),
                   channels_last=bool(train_cfg.get("channels_last")))
    assert metrics["last_acc"] == pytest.approx(acc)
    capsys.readouterr()
    assert main(["train", "--out", str(run), *TINY, "--set", "train.test_subset=-1"]) == 2
    assert "train.test_subset must be an int >= 0 (0 = the whole test split), got -1" in capsys.readouterr().err


def test_distill_with_selected_real_images(tmp_path, synthetic_preset) -> None:
    """recover.select: the recover stage of `lpqld distill` selects herded real images, and every later stage
    (relabel, train, report) runs on them unchanged."""
    from lpqld_fast.real_images import load_real_indices

    run = tmp_path / "run"
    assert main(["distill", "--out", str(run), *TINY, "--set", "recover.select=herding"]) == 0
    manifest = json.loads((run / "recover" / "manifest.json").read_text())
    assert manifest["source"] == "real" and manifest["recover"]["strategy"] == "herding"
    assert load_real_indices(run / "recover").shape == (20,)
    assert (run / "report" / "REPORT.md").stat().st_size > 0
    assert 0 <= json.loads((run / "train" / "train_metrics.json").read_text())["selected_acc"] <= 100
