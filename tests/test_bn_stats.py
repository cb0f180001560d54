"""Hook-based class-wise BN statistics equal a per-class loop computed by hand."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lpqld_fast.bn_stats import ClasswiseBNStats, bn_layers, load_bn_stats, save_bn_stats


def _by_hand(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> dict[str, tuple]:
    """Record every BN input, then per class the float64 mean/biased var over (samples, H, W)."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n, _ in bn_layers(model)}
    handles = [m.register_forward_pre_hook(lambda mod, inp, n=n: inputs[n].append(inp[0].detach().double()))
               for n, m in bn_layers(model)]
    labels = torch.cat([y for _, y in batches])
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, xs in inputs.items():
        x = torch.cat(xs)
        mean = torch.zeros(k, x.shape[1], dtype=torch.float64)
        var = torch.zeros(k, x.shape[1], dtype=torch.float64)
        for c in range(k):
            sel = x[labels == c]
            if len(sel):
                mean[c] = sel.mean(dim=(0, 2, 3))
                var[c] = sel.var(dim=(0, 2, 3), unbiased=False)
        out[name] = (mean, var)
    return out


@pytest.mark.parametrize("arch,n_bn", [("resnet18", 20), ("resnet50", 53)])
def test_hooks_equal_per_class_loop(arch: str, n_bn: int) -> None:
    torch.manual_seed(0)
    k = 5
    model = getattr(torchvision.models, arch)(num_classes=k).eval()
    # Randomise BN running stats so eval-mode normalisation is non-trivial.
    for _, bn in bn_layers(model):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    batches = [(torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 1, 3, 3, 3])),
               (torch.randn(4, 3, 32, 32), torch.tensor([3, 0, 1, 1]))]  # class 2 and 4 stay empty
    collector = ClasswiseBNStats(model, k, mode="exact")
    assert len(collector.layers) == n_bn
    with collector.attached(), torch.no_grad():
        for x, y in batches:
            collector.observe(model, x, y)
    got = collector.result()
    want = _by_hand(model, batches, k)
    assert got["samples"].tolist() == [2, 4, 0, 4, 0]
    for name, (mean, var) in want.items():
        torch.testing.assert_close(got[f"{name}.mean"].double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[f"{name}.var"].double(), var, rtol=1e-4, atol=1e-5)
        assert got[f"{name}.mean"][2].abs().sum() == 0  # empty class stays 0


def test_ema_mode_matches_reference_update() -> None:
    torch.manual_seed(1)
    k = 3
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval()
    b1 = (torch.randn(5, 1, 8, 8), torch.tensor([0, 0, 1, 1, 1]))
    b2 = (torch.randn(3, 1, 8, 8) + 2, torch.tensor([1, 2, 2]))
    collector = ClasswiseBNStats(model, k, mode="ema", momentum=0.1)
    with collector.attached(), torch.no_grad():
        for x, y in (b1, b2):
            collector.observe(model, x, y)
    got = collector.result()
    # Hand-rolled reference EMA: mean starts at 0, var at 1; only present classes move.
    rm, rv = torch.zeros(k, 4, dtype=torch.float64), torch.ones(k, 4, dtype=torch.float64)
    for x, y in (b1, b2):
        with torch.no_grad():
            h = model[0](x).double()
        for c in y.unique().tolist():
            sel = h[y == c]
            rm[c] = 0.9 * rm[c] + 0.1 * sel.mean(dim=(0, 2, 3))
            rv[c] = 0.9 * rv[c] + 0.1 * sel.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(got["1.mean"].double(), rm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got["1.var"].double(), rv, rtol=1e-4, atol=1e-6)


def test_model_without_bn_is_refused() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        ClasswiseBNStats(nn.Linear(3, 3), 2)


def test_stats_file_roundtrip_and_refusals(tmp_path) -> None:
    stats = {"samples": torch.tensor([1, 2]), "bn.mean": torch.zeros(2, 3), "bn.var": torch.ones(2, 3)}
    path = tmp_path / "bn_stats.pt"
    save_bn_stats(path, stats, ["bn"], "exact", "abc")
    loaded = load_bn_stats(path)
    assert loaded["layers"] == ["bn"] and loaded["teacher_sha256"] == "abc"
    torch.testing.assert_close(loaded["tensors"]["bn.var"], torch.ones(2, 3))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="bn_stats.pt"):
        load_bn_stats(path)
