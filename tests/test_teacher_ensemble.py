"""squeeze.teachers > 1: ensemble members trained beside the teacher; relabel stores their mean logits."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lpqld_fast.cli import main
from tests.cli_args import tiny_args
from lpqld_fast.data import dataset_info
from lpqld_fast.experts import ExpertEnsemble
from lpqld_fast.image_set import load_recovered
from lpqld_fast.io_utils import sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.presets import get_preset
from lpqld_fast.relabel import run_relabel
from lpqld_fast.store import LabelStore

TINY = tiny_args({"recover.iterations": 2, "relabel.epochs": 2, "relabel.prune_ratio": 0.5, "train.epochs": 2,
                  "train.eval_every": 2})
TWO = ["--set", "squeeze.teachers=2"]


def _hash(path: Path) -> str:
    return sha256_tensors(torch.load(path, weights_only=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_run_module) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("ensemble")
    single, ens = base / "single", base / "ens"
    for stage in ("squeeze", "recover", "relabel"):
        assert main([stage, "--out", str(single), *TINY]) == 0
    assert main(["squeeze", "--out", str(ens), *TINY, *TWO]) == 0
    return {"single": single, "ens": ens}


def test_members_are_trained_beside_an_unchanged_teacher(runs) -> None:
    s, e = runs["single"] / "squeeze", runs["ens"] / "squeeze"
    assert _hash(e / "teacher.pt") == _hash(s / "teacher.pt")  # the first teacher is the single one
    member = e / "members" / "1" / "teacher.pt"
    assert member.exists() and _hash(member) != _hash(e / "teacher.pt")  # another seed
    stats_e, stats_s = (torch.load(d / "bn_stats.pt", weights_only=True)["tensors"] for d in (e, s))
    assert stats_e.keys() == stats_s.keys()
    assert all(torch.equal(stats_e[k], stats_s[k]) for k in stats_s)  # recovery's statistics: the first teacher's


def test_more_teachers_extend_the_run(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["ens"], run)
    first, m1 = _hash(run / "squeeze" / "teacher.pt"), _hash(run / "squeeze" / "members" / "1" / "teacher.pt")
    assert main(["squeeze", "--out", str(run), *TINY, "--set", "squeeze.teachers=3"]) == 0
    assert _hash(run / "squeeze" / "teacher.pt") == first
    assert _hash(run / "squeeze" / "members" / "1" / "teacher.pt") == m1  # found trained, not retrained
    assert (run / "squeeze" / "members" / "2" / "teacher.pt").exists()


def test_relabel_stores_the_mean_logits_and_train_accepts_the_store(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["ens"] / "squeeze", run / "squeeze")
    shutil.copytree(runs["single"] / "recover", run / "recover")  # recovered by the same first teacher
    shutil.copy(runs["ens"] / "run.json", run / "run.json")
    assert main(["relabel", "--out", str(run), *TINY, *TWO]) == 0
    manifest = json.loads((run / "relabel" / "manifest.json").read_text())
    single = json.loads((runs["single"] / "relabel" / "manifest.json").read_text())
    assert "labeller_sha256" not in single and manifest["teacher_sha256"] == single["teacher_sha256"]

    # the same store written directly with the two-teacher ensemble
    cfg = get_preset("fashion-mnist")
    info = dataset_info("synthetic")
    models = [load_teacher(p, build_teacher(cfg["squeeze"], info)).eval()
              for p in (run / "squeeze" / "teacher.pt", run / "squeeze" / "members" / "1" / "teacher.pt")]
    ens = ExpertEnsemble(models, combine="logits").eval()
    assert manifest["labeller_sha256"] == sha256_tensors(ens.state_dict())
    images, labels, rec = load_recovered(run / "recover")
    relabel_cfg = {**cfg["relabel"], "epochs": 2, "batch_size": 5, "k": 3, "prune_ratio": 0.5,
                   "num_classes": info.num_classes}
    direct = run_relabel(images, labels, ens, info.mean, info.std, relabel_cfg, out_dir=tmp_path / "direct", seed=0,
                         teacher_sha256=rec["teacher_sha256"], images_sha256=rec["images_sha256"],
                         labeller_sha256=manifest["labeller_sha256"], progress=False)
    ours = LabelStore.open(run / "relabel")
    for bid in ours.kept_batch_ids.tolist():
        a, b = ours.batch(bid).labels, direct.batch(bid).labels
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    plain = LabelStore.open(runs["single"] / "relabel")
    assert any(not torch.equal(ours.batch(i).labels.values, plain.batch(i).labels.values)
               for i in ours.kept_batch_ids.tolist())  # not the single teacher's labels
    assert main(["train", "--out", str(run), *TINY, *TWO]) == 0


def test_missing_members_are_named(runs, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["single"], run)
    shutil.rmtree(run / "relabel")
    assert main(["relabel", "--out", str(run), *TINY, *TWO]) == 2
    err = capsys.readouterr().err
    assert "squeeze.teachers=2 needs ensemble member 1" in err and "--set squeeze.teachers=2" in err


def test_a_checkpoint_teacher_has_no_members(runs, tmp_path, capsys) -> None:
    ckpt = runs["single"] / "squeeze" / "teacher.pt"
    assert main(["squeeze", "--out", str(tmp_path / "c"), *TINY, *TWO, "--checkpoint", str(ckpt)]) == 2
    assert "squeeze.teachers > 1 trains the ensemble members" in capsys.readouterr().err
