"""Squeeze's per-batch statistics update (forward with hooks + class-wise moments of every BN input) compiles
whole (no graph break, no host sync) and gives the eager float64 state."""
from __future__ import annotations


import pytest
import torch

from lpqld_fast.bn_stats import ClasswiseBNStats, bn_layers
from lpqld_fast.models import get_model

K = 5


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model("convnet-bn", num_classes=K, in_chans=1, image_size=16).eval()
    for _, bn in bn_layers(model):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("mode", ["exact", "ema"])
def test_observe_compiles_fullgraph_and_matches_eager(mode: str) -> None:
    model = _model()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 1, 16, 16, generator=g) + 3, torch.tensor([0, 1, 1, 3, 3, 3])),
               (torch.randn(6, 1, 16, 16, generator=g), torch.tensor([3, 0, 1, 1, 4, 0]))]  # class 2 stays empty
    eager, compiled = ClasswiseBNStats(model, K, mode=mode), ClasswiseBNStats(model, K, mode=mode)
    torch._dynamo.reset()
    # the stage's call: labels checked once per pass, then observe(..., validate=False) per batch
    step = torch.compile(compiled.observe, fullgraph=True, backend="aot_eager")  # a graph break raises
    with torch.no_grad():
        for x, y in batches:
            with eager.attached():
                out_e = eager.observe(model, x, y, validate=False)
            with compiled.attached():
                out_c = step(model, x, y, validate=False)
            assert torch.equal(out_c, out_e)
    state_e, state_c = eager.accumulator_state(), compiled.accumulator_state()
    assert state_e.keys() == state_c.keys()
    for key in state_e:  # float64 moments, counts and samples: bit for bit
        assert torch.equal(state_c[key], state_e[key]), key
    res_e, res_c = eager.result(), compiled.result()
    assert res_c["samples"].tolist() == [3, 4, 0, 4, 1]
    for key in res_e:
        assert torch.equal(res_c[key], res_e[key]), key


def test_check_labels_refuses_out_of_range_once() -> None:
    collector = ClasswiseBNStats(_model(), K)
    collector.check_labels(torch.tensor([0, 4]))
    with pytest.raises(IndexError, match="outside"):
        collector.check_labels(torch.tensor([0, K]))
