"""The reference-strategy re-creation (bench/reference_pipeline): its per-class-loop BN statistics against a
hand computation, its soft-label decode and temperature schedule against lpqld_fast's, and a tiny end-to-end
run through the CLI that must write timings.json and result.json."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.reference_pipeline.stats import ClassLoopBNStats
from bench.reference_pipeline.train import decode_soft_label, temperature_at
from lpqld_fast.data.fashion_mnist import fashion_mnist_root
from lpqld_fast.label_pool import temperature_at as ours_temperature_at
from lpqld_fast.ops.reference.soft_label_kl import decode_teacher


def _tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).eval()


def _bn_inputs(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        h1 = net[0](x)
        h2 = net[3](net[2](net[1](h1)))
    return {"1": h1.double(), "4": h2.double()}


def _class_moments(h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance over (samples of the class, H, W), written out longhand."""
    hc = h[mask]  # [n, C, H, W]
    c = hc.shape[1]
    vals = hc.transpose(0, 1).reshape(c, -1)
    n = vals.shape[1]
    mean = vals.sum(1) / n
    var = ((vals - mean[:, None]) ** 2).sum(1) / n
    return mean, var


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_class_loop_stats_equal_hand_computation(mode):
    net = _tiny_net()
    k = 3
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(7, 1, 6, 6, generator=g), torch.tensor([0, 1, 1, 0, 0, 1, 0])),  # class 2 absent
               (torch.randn(5, 1, 6, 6, generator=g), torch.tensor([2, 1, 2, 2, 1]))]  # class 0 absent
    hooks = ClassLoopBNStats(net, k, mode=mode, momentum=0.1)
    for x, y in batches:
        hooks.observe(net, x, y)
    hooks.close()
    got = hooks.result()
    assert sorted(got) == ["1", "4"]
    for layer, ch in (("1", 3), ("4", 4)):
        if mode == "exact":
            h = torch.cat([_bn_inputs(net, x)[layer] for x, _ in batches])
            y = torch.cat([y for _, y in batches])
            for c in range(k):
                mean, var = _class_moments(h, y == c)
                torch.testing.assert_close(got[layer][0][c], mean.float(), rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(got[layer][1][c], var.float(), rtol=1e-5, atol=1e-6)
        else:
            rm, rv = torch.zeros(k, ch, dtype=torch.float64), torch.ones(k, ch, dtype=torch.float64)
            for x, y in batches:
                h = _bn_inputs(net, x)[layer]
                for c in range(k):
                    if (y == c).any():
                        mean, var = _class_moments(h, y == c)
                        rm[c] = 0.9 * rm[c] + 0.1 * mean
                        rv[c] = 0.9 * rv[c] + 0.1 * var
            torch.testing.assert_close(got[layer][0], rm.float(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[layer][1], rv.float(), rtol=1e-5, atol=1e-6)


def test_class_loop_stats_reject_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        ClassLoopBNStats(_tiny_net(), 3, mode="welford")
    with pytest.raises(ValueError, match="num_classes"):
        ClassLoopBNStats(_tiny_net(), 0)
    with pytest.raises(ValueError, match="BatchNorm2d"):
        ClassLoopBNStats(nn.Linear(2, 2), 3)


@pytest.mark.parametrize("mode", ["dense", "mr", "mrs"])
def test_dense_decode_matches_lpqld_fast_oracle(mode):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 10, generator=g) * 3
    t = 4.0
    if mode == "dense":
        record = {"soft_label": z.half()}
        want = decode_teacher(z.half().float(), mode="dense", T=t)
    else:
        top = torch.topk(z, 3, dim=1)
        record = {"soft_label": top.values.half(), "label_indices": top.indices.short(),
                  "sample_min": z.min(1, keepdim=True)[0].half()}
        want = decode_teacher(top.values.half().float(), top.indices, mode=mode, num_classes=10, T=t,
                              fill=record["sample_min"].float()[:, 0] if mode == "mrs" else None)
    torch.testing.assert_close(decode_soft_label(record, mode, t, 10), want, rtol=1e-5, atol=1e-6)


def test_temperature_schedule_is_the_reference_step():
    cfg = {"temperature": "step", "t0": 20.0, "t_decay": 0.7, "t_step": 30, "t_floor": 2.0}
    for e in (1, 29, 30, 59, 60, 150, 299, 300):
        assert math.isclose(temperature_at(e, cfg), max(20 * 0.7 ** (e // 30), 2.0))
        assert math.isclose(temperature_at(e, cfg), ours_temperature_at(e, 300, "step"))


@pytest.mark.skipif(not (fashion_mnist_root() / "train-images-idx3-ubyte.gz").exists()
                    and not (fashion_mnist_root() / "train-images-idx3-ubyte").exists(),
                    reason="Fashion-MNIST IDX files not installed")
def test_tiny_end_to_end_run_writes_timings_and_result(tmp_path: Path):
    from bench.reference_pipeline.run import main
    from lpqld_fast.models import get_model

    torch.manual_seed(0)
    (tmp_path / "squeeze").mkdir()
    torch.save(get_model("convnet-bn", 10, 1, 28).state_dict(), tmp_path / "squeeze" / "teacher.pt")
    overrides = {
        "squeeze": {"stats_limit": 200, "stats_batch_size": 100},
        "recover": {"classes": [0, 1], "iterations": 3},
        "relabel": {"epochs": 2, "batch_size": 2, "prune_ratio": 0.5, "k": 3},
        "train": {"epochs": 2, "batch_size": 2, "eval_every": 1, "eval_limit": 64},
    }
    (tmp_path / "overrides.json").write_text(json.dumps(overrides))
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    try:  # one thread: on the shared 2-core machine two threads can be several times slower under load
        assert main(["--teacher", str(tmp_path / "squeeze"), "--out", str(out), "--ipc", "2", "--seed", "0",
                     "--quick", "--settings", str(tmp_path / "overrides.json"), "--threads", "1", "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    timings_file = json.loads((out / "timings.json").read_text())
    assert timings_file["env"]["threads"] == 1
    timings = timings_file["seconds"]
    for stage in ("setup", "stats", "recover", "relabel", "train", "total"):
        assert timings[stage] >= 0
    assert timings["total"] >= timings["stats"] + timings["recover"] + timings["relabel"] + timings["train"]
    result = json.loads((out / "result.json").read_text())
    assert 0 <= result["last_acc"] <= result["best_acc"] <= 100
    assert result["train"]["test_images"] == 64
    assert sorted(p.parent.name for p in (out / "recover" / "png").glob("*/*.png")) == ["00000"] * 2 + ["00001"] * 2
    # 4 images, batch 2 -> 2 batches per epoch, 2 epochs, r = 0.5 -> K = 2 files, the first two generated.
    assert result["relabel"]["kept_batches"] == 2 and result["relabel"]["generated_batches"] == 2
    assert sorted(p.name for p in (out / "relabel").glob("batch_*.tar")) == ["batch_0.tar", "batch_1.tar"]
    record = torch.load(out / "relabel" / "batch_0.tar", weights_only=True)
    assert record["soft_label"].shape == (2, 3) and record["label_indices"].shape == (2, 3)
    assert record["coords"].dtype == torch.float16 and record["flips"].dtype == torch.bool
    assert (out / "train" / "checkpoint.pth.tar").is_file()
