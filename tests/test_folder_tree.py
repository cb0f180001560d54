"""Bring your own dataset: ``--dataset imagefolder`` on a generated tree, end to end through distill and report.

10 classes x 12 grayscale 16x16 PNGs (two of them 20x18, fitted to 16x16), train/ + val/: the tree's
classes, channels, size and mean/std are measured and recorded in <run>/run.json, every stage runs on it,
in memory (small tree) and streamed (the memory budget forced to 0), and a later command given another
data root is refused while one given none uses the recorded one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lpqld_fast.cli import main
from lpqld_fast.data import InMemoryDataset, get_dataset
from lpqld_fast.data import folder_tree
from lpqld_fast.data.transforms import compute_mean_std

CLASSES, PER_CLASS, SIZE = 10, 12, 16
TINY = [
    "--set", "squeeze.epochs=1", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=60",
    "--set", "recover.ipc=1", "--set", "recover.iterations=2",
    "--set", "relabel.epochs=2", "--set", "relabel.batch_size=5", "--set", "relabel.k=3",
    "--set", "relabel.prune_ratio=0.5", "--set", "train.epochs=2", "--set", "train.eval_every=1",
]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("byod") / "tree"
    g = torch.Generator().manual_seed(0)
    for split, per in (("train", PER_CLASS), ("val", 4)):
        for c in range(CLASSES):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True)
            for i in range(per):
                w, h = (20, 18) if (split, c, i) in (("train", 3, 0), ("val", 5, 1)) else (SIZE, SIZE)
                base = torch.full((h, w), 20 * c, dtype=torch.int16)
                px = (base + torch.randint(0, 40, (h, w), generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy(), mode="L").save(d / f"{i:02d}.png")
    return root


def test_tree_is_measured(tree: Path) -> None:
    info = folder_tree.folder_info(tree)
    assert (info.num_classes, info.in_chans, info.image_size) == (CLASSES, 1, SIZE)
    assert info.class_names[0] == "class_00"
    train = get_dataset("imagefolder", "train", root=tree)
    test = get_dataset("imagefolder", "test", root=tree)  # val/ is the evaluation split
    assert isinstance(train, InMemoryDataset) and train.images.shape == (CLASSES * PER_CLASS, 1, SIZE, SIZE)
    assert len(test) == CLASSES * 4 and test.mean == train.mean
    mean, std = compute_mean_std(train.images)
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)


def _distill(run: Path, tree: Path, capsys) -> str:
    capsys.readouterr()
    assert main(["distill", "--dataset", "imagefolder", "--data-root", str(tree), "--out", str(run), *TINY]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_distill_and_report_on_a_folder_tree(tree: Path, tmp_path: Path, capsys, monkeypatch, streamed) -> None:
    if streamed:  # as a tree too large for memory: decoded image by image, transforms sized to 16 px
        monkeypatch.setattr(folder_tree, "memory_budget", lambda: 0)
        folder_tree._measure.cache_clear()
        folder_tree._IN_MEMORY.clear()
        ds = get_dataset("imagefolder", "train", root=tree)
        assert not isinstance(ds, InMemoryDataset)
        assert ds[0][0].shape == (1, SIZE, SIZE) and "RandomCrop" in repr(ds.transform)
        assert "RandomResizedCrop" not in repr(ds.transform)
    run = tmp_path / "run"
    out = _distill(run, tree, capsys)
    assert "squeeze: " in out and "bf16=" in out and "threads=" in out  # the choices, printed per stage
    record = json.loads((run / "run.json").read_text())
    assert record["dataset"] == "imagefolder" and record["data_root"] == str(tree.resolve())
    meta = record["dataset_info"]
    assert (meta["num_classes"], meta["in_chans"], meta["image_size"]) == (CLASSES, 1, SIZE)
    assert len(meta["mean"]) == 1 and 0 < meta["std"][0]
    images = torch.load(run / "recover" / "images.pt", weights_only=True)["images"]
    assert images.shape == (CLASSES, 1, SIZE, SIZE)
    report = (run / "report" / "REPORT.md").read_text()
    assert "dataset: imagefolder" in report and "mmd2_synthetic_vs_real" in report  # diversity on the tree
    resolved = json.loads((run / "train" / "config.json").read_text())["config"]["train"]
    assert resolved["bf16"] in (True, False) and resolved["channels_last"] in (True, False)

    # later commands: none given -> the recorded tree; another one -> refused naming both
    assert main(["report", "--out", str(run), "--no-diversity"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--data-root", str(other), *TINY]) == 2
    err = capsys.readouterr().err
    assert f"holds a run on data root '{tree.resolve()}', not '{other.resolve()}'" in err
    assert main(["squeeze", "--out", str(run), *TINY]) == 0  # the default dataset is the recorded one
    assert "done already" in capsys.readouterr().out
