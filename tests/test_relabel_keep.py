"""relabel.keep: which batches pruning keeps, random (the papers) or scored by the teacher's confidence."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lpqld_fast.augment import replay_batch
from lpqld_fast.relabel import (
    EpochPermutations,
    _batch_aug,
    kept_count,
    normalize_config,
    run_relabel,
    select_kept_batch_ids,
    select_scored_batch_ids,
)
from lpqld_fast.store.manifest import KEPT_IDS_RULE, SCORED_IDS_RULE
from tests.test_relabel import CFG, MEAN, N, SHA, STD, _one_thread, make_images, make_teacher  # noqa: F401


def test_scored_ids_take_the_extremes_with_ties_to_the_lower_id() -> None:
    scores = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.3], dtype=torch.float64)
    assert select_scored_batch_ids(scores, 2, "confident").tolist() == [1, 3]
    assert select_scored_batch_ids(scores, 3, "uncertain").tolist() == [0, 2, 4]
    tie = torch.zeros(5, dtype=torch.float64)
    assert select_scored_batch_ids(tie, 2, "confident").tolist() == [0, 1]
    with pytest.raises(ValueError, match="confident' or 'uncertain"):
        select_scored_batch_ids(scores, 2, "random")


def _brute_force_scores(cfg: dict, total: int) -> torch.Tensor:
    """Each batch's mean max-probability, computed from scratch (replay + teacher) for every id."""
    imgs, _ = make_images()
    teacher = make_teacher()
    cfg = normalize_config(cfg)
    out = []
    for bid in range(total):
        aug = _batch_aug(bid, imgs.shape, cfg, 0, tuple(imgs.shape[-2:]), EpochPermutations(N, 0))
        x = replay_batch(imgs, aug, torch.tensor(MEAN), torch.tensor(STD))
        with torch.no_grad():
            out.append(torch.softmax(teacher(x), dim=1).amax(dim=1).double().mean())
    return torch.stack(out)


@pytest.mark.parametrize("keep", ["confident", "uncertain"])
def test_scored_pruning_keeps_the_teachers_extreme_batches(tmp_path, keep) -> None:
    cfg = {**CFG, "keep": keep}
    imgs, labels = make_images()
    store = run_relabel(imgs, labels, make_teacher(), MEAN, STD, cfg, tmp_path / keep, 0, progress=False, **SHA)
    total = CFG["epochs"] * (N // CFG["batch_size"])
    k = kept_count(total, CFG["prune_ratio"])
    scores = _brute_force_scores(cfg, total)
    order = torch.argsort(scores, descending=(keep == "confident"), stable=True)
    assert store.kept_batch_ids.tolist() == sorted(order[:k].tolist())
    kept, dropped = scores[store.kept_batch_ids], scores[[i for i in range(total) if i not in store.kept_batch_ids]]
    assert (kept.min() >= dropped.max()) if keep == "confident" else (kept.max() <= dropped.min())
    assert not np.array_equal(store.kept_batch_ids.numpy(), select_kept_batch_ids(total, k, 0))
    manifest = json.loads((tmp_path / keep / "manifest.json").read_text())
    assert manifest["kept_batch_ids"]["rule"] == SCORED_IDS_RULE and manifest["config"]["keep"] == keep


def test_a_store_from_before_the_setting_is_the_same_store(tmp_path) -> None:
    """A manifest without relabel.keep (written before it existed) resumes and is found complete."""
    imgs, labels = make_images()
    out = tmp_path / "s"
    run_relabel(imgs, labels, make_teacher(), MEAN, STD, CFG, out, 0, progress=False, finalize=False,
                slot_range=range(0, 3), **SHA)
    path = out / "manifest.json"
    m = json.loads(path.read_text())
    assert m["kept_batch_ids"]["rule"] == KEPT_IDS_RULE
    del m["config"]["keep"]
    path.write_text(json.dumps(m, indent=2))
    store = run_relabel(imgs, labels, make_teacher(), MEAN, STD, CFG, out, 0, progress=False, **SHA)
    assert len(store) == kept_count(CFG["epochs"] * (N // CFG["batch_size"]), CFG["prune_ratio"])
    assert "keep" not in json.loads(path.read_text())["config"]
    again = run_relabel(imgs, labels, make_teacher(), MEAN, STD, CFG, out, 0, progress=False, **SHA)
    assert again.kept_batch_ids.tolist() == store.kept_batch_ids.tolist()
    with pytest.raises(ValueError, match=r"relabel.keep 'random' -> 'confident'"):
        run_relabel(imgs, labels, make_teacher(), MEAN, STD, {**CFG, "keep": "confident"}, out, 0, progress=False,
                    **SHA)


def test_a_scored_store_is_scored_once(tmp_path) -> None:
    """Resuming or rerunning a scored store reads its kept ids back instead of scoring every batch again."""
    from tests.test_relabel import Counting

    cfg = {**CFG, "keep": "confident"}
    imgs, labels = make_images()
    total = CFG["epochs"] * (N // CFG["batch_size"])
    k = kept_count(total, CFG["prune_ratio"])
    first = Counting(make_teacher()).eval()
    run_relabel(imgs, labels, first, MEAN, STD, cfg, tmp_path / "s", 0, progress=False, finalize=False,
                slot_range=range(0, 4), **SHA)
    assert first.calls == total + 4  # the scoring pass, then 4 slots
    again = Counting(make_teacher()).eval()
    store = run_relabel(imgs, labels, again, MEAN, STD, cfg, tmp_path / "s", 0, progress=False, **SHA)
    assert again.calls == k - 4  # no second scoring pass: only the slots left
    done = Counting(make_teacher()).eval()
    run_relabel(imgs, labels, done, MEAN, STD, cfg, tmp_path / "s", 0, progress=False, **SHA)
    assert done.calls == 0
    direct = run_relabel(imgs, labels, make_teacher(), MEAN, STD, cfg, tmp_path / "d", 0, progress=False, **SHA)
    assert store.kept_batch_ids.tolist() == direct.kept_batch_ids.tolist()
