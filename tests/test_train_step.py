"""The student's step (replay + forward + loss) compiles whole (no graph break, no host sync) and matches eager;
its data checks run once per stored batch on the host."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from lpqld_fast.augment import replay_batch, sample_aug_params
from lpqld_fast.models import get_model
from lpqld_fast.store.quantize import decode_labels, encode_labels
from lpqld_fast.train import ReplaySource, soft_label_forward


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


def _replay_step(net, images, rec, mean, std, labels, T, t_s):
    """The student's step as train_one_epoch runs it after ReplaySource.check_batch: replay + forward + loss."""
    x = replay_batch(images, rec, mean, std, validate=False)
    return soft_label_forward(net, x, labels, T, t_s, False, False, validate=False)


@pytest.mark.parametrize("cutmix", [False, True])
def test_replay_and_forward_compile_fullgraph_and_match_eager(cutmix) -> None:
    torch.manual_seed(0)
    net = get_model("convnet-bn", num_classes=10, in_chans=1, image_size=28).train()
    images = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    rec = sample_aug_params(torch.arange(0, 20, 2), 28, 28, 1, 28, torch.Generator().manual_seed(1), cutmix=cutmix)
    labels = decode_labels(encode_labels(torch.randn(10, 10) * 3, mode="mr", k=3, value_dtype="fp16"), "mr")
    loss_e, _ = _replay_step(net, images, rec, [0.3], [0.35], labels, 4.0, 0.8)
    torch._dynamo.reset()
    step = torch.compile(_replay_step, fullgraph=True, backend="aot_eager")  # a host read would break the graph
    loss_c, _ = step(copy.deepcopy(net), images, rec, [0.3], [0.35], labels, 4.0, 0.8)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-7)


def test_replay_source_checks_each_stored_batch_once_on_the_host() -> None:
    images = torch.zeros(6, 1, 8, 8, dtype=torch.uint8)
    src = ReplaySource(SimpleNamespace(std=[0.5]), images, torch.zeros(6, dtype=torch.int64), 10)
    g = torch.Generator().manual_seed(0)
    good = SimpleNamespace(aug=sample_aug_params(torch.tensor([0, 5]), 8, 8, 1, 8, g),
                           labels=decode_labels(encode_labels(torch.randn(2, 10), mode="mr", k=3), "mr"))
    src.check_batch(3, good, hard_labels=False)
    assert src.checked == {3}
    bad_index = SimpleNamespace(aug=sample_aug_params(torch.tensor([0, 6]), 8, 8, 1, 8, g), labels=good.labels)
    with pytest.raises(IndexError, match=r"outside \[0, 6\)"):
        src.check_batch(4, bad_index, hard_labels=False)
    values = good.labels.values.clone().float()
    values[0, 0] = float("nan")
    bad_labels = SimpleNamespace(aug=good.aug, labels=dataclasses.replace(good.labels, values=values))
    with pytest.raises(ValueError, match="NaN"):
        src.check_batch(5, bad_labels, hard_labels=False)
    src.check_batch(5, bad_labels, hard_labels=True)  # hard-label training does not read the soft labels
    assert src.checked == {3, 5}
    with pytest.raises(ValueError, match="std must be finite and positive"):
        ReplaySource(SimpleNamespace(std=[0.0]), images, torch.zeros(6, dtype=torch.int64), 10)
