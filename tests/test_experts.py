"""Experts (paper 001): per-epoch checkpoints, ensembles, and relabelling a real-image set with an expert."""
from __future__ import annotations

import json

import pytest
import torch

from lpqld_fast.augment import replay_batch
from lpqld_fast.data import get_dataset
from lpqld_fast.experts import ExpertEnsemble, ExpertNotFoundError, load_expert, relabel_with_expert
from lpqld_fast.image_set import bind_real_images, load_recovered
from lpqld_fast.io_utils import save_tensors, sha256_tensors
from lpqld_fast.models import get_model
from lpqld_fast.models.teacher import build_teacher
from lpqld_fast.real_images import select_real_images
from lpqld_fast.records import stage_dirs
from lpqld_fast.train import run_train


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    import lpqld_fast.presets as presets

    p = presets.get_preset("fashion-mnist")
    p["dataset"] = "synthetic"
    monkeypatch.setitem(presets.PRESETS, "fashion-mnist", p)
    config = presets.get_preset("fashion-mnist")
    config["relabel"].update({"epochs": 2, "batch_size": 10, "label": "topk_norenorm", "k": 2, "temperature": 2.0,
                              "prune_ratio": 0.0})
    config["train"].update({"epochs": 1, "eval_every": 1})
    sq = tmp_path / "squeeze"
    train = get_dataset("synthetic", "train")
    states = {}
    for i, name in enumerate(["checkpoints/epoch_001.pt", "checkpoints/epoch_003.pt", "teacher.pt"]):
        torch.manual_seed(200 + i)
        states[name] = build_teacher(config["squeeze"], train).state_dict()
        save_tensors(sq / name, states[name])
    return config, sq, states


def _member(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_model("convnet-bn", num_classes=5, in_chans=1, image_size=16, width=8).eval()


def test_ensemble_averages_members() -> None:
    a, b, c = _member(1), _member(2), _member(3)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        za, zb, zc = a(x), b(x), c(x)
        torch.testing.assert_close(ExpertEnsemble([a, b, c]).eval()(x), (za + zb + zc) / 3)
        probs = ExpertEnsemble([a, b, c], combine="probs").eval()(x)
        mean_p = (za.softmax(1) + zb.softmax(1) + zc.softmax(1)) / 3
        torch.testing.assert_close(probs.softmax(1), mean_p)
        torch.testing.assert_close(probs.exp(), mean_p)  # log of the mean probabilities, exactly
        torch.testing.assert_close(ExpertEnsemble([a, b]).features(x), a.features(x))
    with pytest.raises(ValueError, match="combine"):
        ExpertEnsemble([a], combine="median")


def test_expert_epoch_loads_its_checkpoint_and_missing_epoch_names_file(setup) -> None:
    config, sq, states = setup
    model, h = load_expert(config, sq, epoch=3)
    assert h == sha256_tensors(states["checkpoints/epoch_003.pt"])
    for k, v in states["checkpoints/epoch_003.pt"].items():
        assert torch.equal(model.state_dict()[k], v)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _, h_final = load_expert(config, sq)
    assert h_final == sha256_tensors(states["teacher.pt"])
    with pytest.raises(ExpertNotFoundError, match=r"epoch_002\.pt not found.*\[1, 3\]"):
        load_expert(config, sq, epoch=2)
    with pytest.raises(ValueError, match="epoch_007.pt"):  # also a ValueError (bad input) for callers
        load_expert(config, sq, ensemble=[1, 7])
    with pytest.raises(ValueError, match="positive int"):
        load_expert(config, sq, epoch=0)
    with pytest.raises(ValueError, match="not both"):
        load_expert(config, sq, epoch=1, ensemble=[1, 3])
    ens, h_ens = load_expert(config, sq, ensemble=[1, None])
    assert isinstance(ens, ExpertEnsemble) and len(ens.members) == 2
    _, h_probs = load_expert(config, sq, ensemble=[1, None], combine="probs")
    assert len({h_ens, h_probs, h, h_final}) == 4


def test_relabel_with_expert_binds_real_images_and_trains(setup, tmp_path) -> None:
    config, sq, _ = setup
    shared = tmp_path / "real-ipc2"
    select_real_images(config, sq, shared, seed=0, strategy="random", ipc=2)
    shared_manifest = (shared / "manifest.json").read_text()
    run = tmp_path / "run"
    d = stage_dirs(run)
    run.mkdir()
    d["squeeze"].symlink_to(sq)
    d["recover"].symlink_to(shared)
    store = relabel_with_expert(config, run, seed=0, expert_epoch=1, progress=False)
    expert, h = load_expert(config, sq, epoch=1)
    assert store.manifest["teacher_sha256"] == h
    # The run's recover is now its own manifest (bound to the expert) over the shared files; the shared set is
    # unchanged and its images load identically.
    assert not d["recover"].is_symlink() and (d["recover"] / "images.pt").is_symlink()
    assert (shared / "manifest.json").read_text() == shared_manifest
    images, _, m = load_recovered(d["recover"])
    assert m["teacher_sha256"] == h and m["images_sha256"] == json.loads(shared_manifest)["images_sha256"]
    assert json.loads((run / "expert.json").read_text())["epoch"] == 1
    # topk_norenorm from the config: the top-2 probabilities softmax(z / T_relabel) of the expert, not renormalised.
    rec = store.batch(int(store.kept_batch_ids[0]))
    with torch.no_grad():
        p = (expert(replay_batch(images, rec, store.mean, store.std)) / 2.0).softmax(1)
    top = p.topk(2, dim=1)
    torch.testing.assert_close(rec.labels.values.float(), top.values, atol=2e-3, rtol=0)
    assert torch.equal(rec.labels.indices.long(), top.indices)
    assert float(rec.labels.values.float().sum(1).max()) < 1.0
    summary = run_train(config, d["recover"], d["relabel"], d["train"], seed=0, progress=False)
    assert 0 <= summary["last_acc"] <= 100
    # A shared logit cache: a second store (mode mr, k=3) over the same batches runs the expert on none of
    # them and stores exactly the expert's top-3 logits.
    cache: dict = {}
    for mode, k, name in (("topk_norenorm", 2, "run_a"), ("mr", 3, "run_b")):
        r = tmp_path / name
        r.mkdir()
        stage_dirs(r)["squeeze"].symlink_to(sq)
        stage_dirs(r)["recover"].symlink_to(shared)
        cfg = {**config, "relabel": {**config["relabel"], "label": mode, "k": k}}
        before = len(cache)
        s = relabel_with_expert(cfg, r, seed=0, expert_epoch=1, progress=False, logit_cache=cache)
        assert len(cache) - before == (len(s) if mode == "topk_norenorm" else 0)
    rec = s.batch(int(s.kept_batch_ids[-1]))
    with torch.no_grad():
        z = expert(replay_batch(images, rec, s.mean, s.std)).topk(3, dim=1)
    torch.testing.assert_close(rec.labels.values.float(), z.values, atol=1e-2, rtol=1e-3)  # fp16 storage
    # Synthetic (teacher-made) sets are not re-bound to another expert.
    fake = tmp_path / "synthetic"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"teacher_sha256": "a" * 64, "images_sha256": "b" * 64}))
    with pytest.raises(ValueError, match="synthetic"):
        bind_real_images(fake, h)
