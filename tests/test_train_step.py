"""The student's per-step forward + loss compiles whole (no graph break, no host sync) and matches eager."""
from __future__ import annotations

import copy

import pytest
import torch

from lpqld_fast.models import get_model
from lpqld_fast.store.quantize import decode_labels, encode_labels
from lpqld_fast.train import soft_label_forward


@pytest.mark.parametrize("mode,value_dtype", [("dense", "fp16"), ("mr", "fp16"), ("mrs", "int8")])
def test_soft_label_forward_compiles_fullgraph_and_matches_eager(mode, value_dtype) -> None:
    torch.manual_seed(0)
    student = get_model("convnet-bn", num_classes=10, in_chans=1, image_size=28).train()
    x = torch.randn(8, 1, 28, 28)
    labels = decode_labels(encode_labels(torch.randn(8, 10) * 3, mode=mode, k=3, value_dtype=value_dtype), mode)
    eager_net, compiled_net = student, copy.deepcopy(student)
    loss_e, logits_e = soft_label_forward(eager_net, x, labels, 4.0, 0.8, False, False, validate=False)
    loss_e.backward()
    torch._dynamo.reset()
    step = torch.compile(soft_label_forward, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    loss_c, logits_c = step(compiled_net, x, labels, 4.0, 0.8, False, False, validate=False)
    loss_c.backward()
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-6)
    for (name, pe), (_, pc) in zip(eager_net.named_parameters(), compiled_net.named_parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for (name, be), (_, bc) in zip(eager_net.named_buffers(), compiled_net.named_buffers()):
        torch.testing.assert_close(bc, be, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")  # BN stats
