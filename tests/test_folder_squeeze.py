"""Squeeze and evaluation on an ImageFolder tree (the ImageNet presets' path), decoded in workers.

A 200-class `tiny-imagenet`-shaped tree of small PNGs and a user checkpoint: the class-wise statistics do
not depend on the batch size (per-image seeds, float64 sums), and the teacher accuracy equals a plain loop
over the test split with its eval transform.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lpqld_fast.bn_stats import load_bn_stats
from lpqld_fast.cli import main
from lpqld_fast.data import get_dataset
from lpqld_fast.data.streaming import image_seed, seeded_batches
from lpqld_fast.evaluation import evaluate_folder
from lpqld_fast.io_utils import read_json, save_tensors
from lpqld_fast.models import get_model

CLASSES = 200
MODEL = "convnet-bn"  # the preset's resnet18-small costs ~40 ms per 64x64 image here; the path is the same


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny")
    g = torch.Generator().manual_seed(0)
    for split, per in (("train", 1), ("test", 1)):
        for c in range(CLASSES):
            d = root / split / f"n{c:03d}"
            d.mkdir(parents=True)
            for i in range(per):
                px = torch.randint(0, 256, (12, 10, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = get_model(MODEL, num_classes=CLASSES, in_chans=3, image_size=64)
    path = tmp_path_factory.mktemp("ck") / "teacher.pt"
    save_tensors(path, model.state_dict())
    return path


def _squeeze(tree: Path, ck: Path, out: Path, batch: int) -> dict:
    rc = main(["squeeze", "--dataset", "tiny-imagenet", "--data-root", str(tree), "--checkpoint", str(ck),
               "--out", str(out), "--set", f"squeeze.stats_batch_size={batch}", "--set", "squeeze.stats_workers=0",
               "--set", f"squeeze.model={MODEL}"])
    assert rc == 0
    return read_json(out / "squeeze" / "metrics.json", "metrics")


def test_seeded_batches_do_not_depend_on_batching(tree):
    ds = get_dataset("tiny-imagenet", "train", root=tree)
    a = torch.cat([x for x, _ in seeded_batches(ds, [[0, 5, 9], [3]], seed=7, num_workers=0)])
    b = torch.cat([x for x, _ in seeded_batches(ds, [[0], [5, 9, 3]], seed=7, num_workers=2)])
    assert torch.equal(a, b) and a.shape == (4, 3, 64, 64)
    c = torch.cat([x for x, _ in seeded_batches(ds, [[0, 5, 9, 3]], seed=8, num_workers=0)])
    assert not torch.equal(a, c)  # another pass seed draws other crops
    assert image_seed(7, 0) != image_seed(7, 1) != image_seed(8, 0)
    state = torch.random.get_rng_state()
    list(seeded_batches(ds, [[1, 2]], seed=3, num_workers=0))
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone


def test_folder_squeeze_stats_and_accuracy(tree, checkpoint, tmp_path):
    m1 = _squeeze(tree, checkpoint, tmp_path / "a", batch=64)
    m2 = _squeeze(tree, checkpoint, tmp_path / "b", batch=25)
    s1 = load_bn_stats(tmp_path / "a" / "squeeze" / "bn_stats.pt")
    s2 = load_bn_stats(tmp_path / "b" / "squeeze" / "bn_stats.pt")
    assert s1["layers"] == s2["layers"] and len(s1["layers"]) >= 3
    for name in s1["tensors"]:
        torch.testing.assert_close(s1["tensors"][name], s2["tensors"][name], rtol=1e-5, atol=1e-6, msg=name)
    first = next(iter(s1["tensors"].values()))
    assert first.shape[0] == CLASSES
    # teacher accuracy: a plain loop over the test split (eval transform, no seeds) gives the same number
    model = get_model(MODEL, num_classes=CLASSES, in_chans=3, image_size=64)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    model.eval()
    test = get_dataset("tiny-imagenet", "test", root=tree)
    with torch.no_grad():
        xs = torch.stack([test[i][0] for i in range(len(test))])
        correct = int((model(xs).argmax(1) == test.targets).sum())
    assert m1["teacher_test_acc"] == pytest.approx(100.0 * correct / len(test))
    assert m2["teacher_test_acc"] == m1["teacher_test_acc"]
    assert evaluate_folder(model, test, batch_size=37, num_workers=0) == pytest.approx(m1["teacher_test_acc"])


def _train(tree: Path, out: Path, workers: int) -> int:
    return main(["squeeze", "--dataset", "tiny-imagenet", "--data-root", str(tree), "--out", str(out),
                 "--set", f"squeeze.model={MODEL}", "--set", "squeeze.epochs=2", "--set", "squeeze.batch_size=100",
                 "--set", "squeeze.warmup_epochs=0", "--set", f"squeeze.train_workers={workers}",
                 "--set", "squeeze.stats_workers=0", "--set", "squeeze.stats_batch_size=100"])


def test_folder_teacher_training_streams_and_resumes(tree, tmp_path, monkeypatch, capsys):
    """Teacher training on the tree (no checkpoint): decoded in workers, per-epoch checkpoints, and a run
    killed after epoch 1 and resumed ends with the uninterrupted run's weights, bit for bit, whatever the
    number of workers."""
    from lpqld_fast import squeeze
    from lpqld_fast.io_utils import load_tensors

    assert _train(tree, tmp_path / "a", workers=0) == 0
    sq = tmp_path / "a" / "squeeze"
    metrics = read_json(sq / "metrics.json", "metrics")
    assert [m["epoch"] for m in metrics["teacher"]] == [1, 2]
    assert all(0.0 <= m["test_acc"] <= 100.0 and m["train_loss"] > 0 for m in metrics["teacher"])
    assert (sq / "checkpoints" / "epoch_001.pt").exists() and (sq / "bn_stats.pt").exists()
    first = load_tensors(sq / "checkpoints" / "epoch_001.pt")
    final = load_tensors(sq / "teacher.pt")
    assert any(not torch.equal(first[k], final[k]) for k in final)  # epoch 2 trained

    calls = {"n": 0}
    real_eval = squeeze.evaluate_dataset

    def dies_in_epoch_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed during epoch 2")
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(squeeze, "evaluate_dataset", dies_in_epoch_2)
    assert _train(tree, tmp_path / "b", workers=2) != 0  # the CLI reports the interrupt and exits non-zero
    assert calls["n"] == 2
    assert not (tmp_path / "b" / "squeeze" / "teacher.pt").exists()
    monkeypatch.setattr(squeeze, "evaluate_dataset", real_eval)
    capsys.readouterr()
    assert _train(tree, tmp_path / "b", workers=2) == 0
    out = capsys.readouterr().out
    assert "resuming teacher training after epoch 1" in out and "teacher epoch 1/2" not in out  # epoch 1 not redone
    resumed = load_tensors(tmp_path / "b" / "squeeze" / "teacher.pt")
    assert resumed.keys() == final.keys()
    for k in final:
        assert torch.equal(resumed[k], final[k]), k
