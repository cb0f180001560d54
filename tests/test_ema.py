"""train.ema: the weight average against a plain loop, and what a run with it evaluates and saves."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lpqld_fast.cli import main
from lpqld_fast.ema import WeightEMA
from lpqld_fast.io_utils import load_tensors


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_average_matches_the_definition_on_params_and_bn_buffers() -> None:
    model = _model()
    decay = 0.5  # below the warm-up's (1+n)/(10+n) from update 9 on: both branches of the min run
    ema = WeightEMA(model, decay)
    want = {k: v.clone().double() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(12):
        model.train()
        loss = model(torch.randn(6, 1, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        d = min(decay, (2 + step) / (11 + step))  # warm-up: update n = step + 1 uses min(decay, (1+n)/(10+n))
        for k, v in model.state_dict().items():
            want[k] = v.double() if not v.is_floating_point() else d * want[k] + (1 - d) * v.double()
    got = ema.state_dict()
    assert got.pop(WeightEMA.UPDATES_KEY).item() == 12
    assert got["1.num_batches_tracked"].item() == 12  # integer buffers are copied, not averaged
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_average_is_a_copy_not_a_view() -> None:
    model = _model()
    ema = WeightEMA(model, 0.9)
    before = copy.deepcopy(ema.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_resume_restores_the_count_and_old_checkpoints_skip_the_warm_up() -> None:
    model = _model()
    a = WeightEMA(model, 0.99)
    for _ in range(3):
        a.update(model)
    b = WeightEMA(_model(), 0.99)
    b.load_state_dict(a.state_dict())
    assert b.updates == 3
    old = {k: v for k, v in a.state_dict().items() if k != WeightEMA.UPDATES_KEY}  # a checkpoint made before
    b.load_state_dict(old)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    before = {k: v.clone() for k, v in b.module.state_dict().items()}
    b.update(model)  # the plain decay 0.99, not the warm-up's (1+n)/(10+n)
    for (k, v), p in zip(before.items(), model.state_dict().values()):
        if v.is_floating_point():
            torch.testing.assert_close(b.module.state_dict()[k], 0.99 * v + 0.01 * p, msg=k)


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_decay_outside_the_open_interval_is_refused(decay) -> None:
    with pytest.raises(ValueError, match="train.ema must be in"):
        WeightEMA(_model(), decay)


def test_train_with_ema_saves_and_evaluates_the_average(tmp_path, capsys) -> None:
    import lpqld_fast.presets as presets

    tiny = presets.get_preset("fashion-mnist")
    tiny["dataset"] = "synthetic"
    mp = pytest.MonkeyPatch()
    mp.setitem(presets.PRESETS, "fashion-mnist", tiny)
    args = ["--set", "squeeze.epochs=1", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=50",
            "--set", "recover.ipc=2", "--set", "recover.iterations=3", "--set", "relabel.epochs=3",
            "--set", "relabel.batch_size=5", "--set", "relabel.k=3", "--set", "train.epochs=3",
            "--set", "train.eval_every=1", "--set", "train.checkpoint_every=1", "--set", "train.val_size=0"]
    try:
        run = tmp_path / "run"
        assert main(["distill", "--out", str(run), *args, "--set", "train.ema=0.5"]) == 0
        last = load_tensors(run / "train" / "last.pt")
        student = load_tensors(run / "train" / "student.pt")
        n_steps = 3 * 4  # epochs x stored batches per epoch (20 images / 5)
        assert last["ema"].pop(WeightEMA.UPDATES_KEY).item() == n_steps  # the count resumes with the weights
        assert student.keys() == last["ema"].keys()
        for k in student:  # student.pt is the average, not the last weights
            assert torch.equal(student[k], last["ema"][k]), k
        assert any(not torch.equal(student[k], last["model"][k]) for k in student if student[k].is_floating_point())
        capsys.readouterr()
        # a finished run's average is a result setting: changing it is refused, naming the key
        assert main(["train", "--out", str(run), *args, "--set", "train.ema=0.9"]) == 2
        assert "train.ema" in capsys.readouterr().err
        assert main(["train", "--out", str(run), *args, "--set", "train.ema=1"]) == 2
        assert "train.ema" in capsys.readouterr().err
        metrics = json.loads((run / "train" / "train_metrics.json").read_text())
        assert metrics["selection"] == "last evaluation" and len(metrics["evals"]) == 3
    finally:
        mp.undo()
