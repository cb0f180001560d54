"""Recover: many classes per forward pass equal the one-class-at-a-time loop."""
from __future__ import annotations

import pytest
import torch

from lpqld_fast.bn_stats import bn_layers
from lpqld_fast.models import get_model
from lpqld_fast.recover import Unit, bn_targets, make_units, synthesize_units, to_uint8
from lpqld_fast.runtime import full_fp32

K, IPC = 4, 3
CFG = {"iterations": 6, "lr": 0.1, "r_bn": 0.05, "jitter": 2, "first_bn_mult": 10.0}


def _teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_model("convnet-bn", num_classes=K, in_chans=1, image_size=16).eval()
    for _, bn in bn_layers(model):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _targets(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(K, m.num_features, generator=g) * 0.1, torch.rand(K, m.num_features, generator=g) + 0.5)
            for _, m in bn_layers(model)]


MEAN, STD = torch.tensor([0.3]), torch.tensor([0.35])


@pytest.mark.parametrize("classwise_batching", [True, False])
def test_batched_classes_equal_per_class_loop(classwise_batching: bool) -> None:
    teacher = _teacher()
    targets = _targets(teacher)
    units = make_units(K, IPC, classwise_batching)
    if not classwise_batching:  # SRe2L batching matched to the global statistics
        targets = bn_targets(teacher, None, classwise=False)
    together = synthesize_units(teacher, units, targets, CFG, (1, 16, 16), MEAN, STD, seed=7, progress=False)
    alone = torch.cat([synthesize_units(teacher, [u], targets, CFG, (1, 16, 16), MEAN, STD, seed=7, progress=False)
                       for u in units])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    # The optimisation moved the pixels (the test would pass trivially otherwise).
    init = torch.cat([torch.randn(len(u.labels), 1, 16, 16,
                                  generator=torch.Generator().manual_seed((7 * 1_000_003 + u.uid * 7919 + 12345)))
                      for u in units])
    assert (together - init).abs().max() > 1e-2


def test_pixels_stay_in_valid_range_and_uint8_roundtrip() -> None:
    teacher = _teacher()
    x = synthesize_units(teacher, make_units(K, 2, True)[:2], _targets(teacher), {**CFG, "lr": 1.0}, (1, 16, 16),
                         MEAN, STD, seed=0, progress=False)
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    assert float(x.min()) >= float(lo) - 1e-6 and float(x.max()) <= float(hi) + 1e-6
    u8 = to_uint8(x, MEAN, STD)
    assert u8.dtype == torch.uint8 and u8.shape == x.shape


def test_classwise_targets_pick_each_units_class() -> None:
    """Swapping two classes' targets must change exactly those classes' images."""
    teacher = _teacher()
    targets = _targets(teacher)
    units = make_units(K, 2, True)
    base = synthesize_units(teacher, units, targets, CFG, (1, 16, 16), MEAN, STD, seed=1, progress=False)
    swapped = [(m[[1, 0, 2, 3]], v[[1, 0, 2, 3]]) for m, v in targets]
    other = synthesize_units(teacher, units, swapped, CFG, (1, 16, 16), MEAN, STD, seed=1, progress=False)
    diff = (base - other).abs().flatten(1).max(dim=1).values.view(K, 2)
    assert bool((diff[:2] > 1e-4).all()) and bool((diff[2:] < 1e-5).all())


def test_units_are_class_wise_or_sre2l() -> None:
    cw = make_units(3, 4, True)
    assert [u.labels.tolist() for u in cw] == [[0] * 4, [1] * 4, [2] * 4]
    sre = make_units(3, 4, False)
    assert len(sre) == 4 and all(u.labels.tolist() == [0, 1, 2] for u in sre)
    assert isinstance(cw[0], Unit)


# ----------------------------------------------------------------------------- in-pass checkpoint (resume)


class _Killed(RuntimeError):
    pass


def _kill_at_iteration(monkeypatch: pytest.MonkeyPatch, j: int) -> None:
    """Simulate a kill: the j-th iteration (0-based) of the next pass raises before its teacher forward."""
    import lpqld_fast.recover as rec

    real = rec.recover_loss
    calls = {"n": 0}

    def draw(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == j + 1:
            raise _Killed(f"killed at iteration {j}")
        return real(*args, **kwargs)

    monkeypatch.setattr(rec, "recover_loss", draw)


def test_pass_checkpoint_resume_is_bit_exact(tmp_path, monkeypatch) -> None:
    teacher = _teacher()
    targets = _targets(teacher)
    units = make_units(K, IPC, True)
    cfg = {**CFG, "iterations": 7, "checkpoint_every": 2}
    args = (teacher, units, targets, cfg, (1, 16, 16), MEAN, STD)
    plain = synthesize_units(*args, seed=5, progress=False)
    ckpt = tmp_path / "pass.ckpt.pt"
    # Checkpointing must not perturb the trajectory.
    assert torch.equal(synthesize_units(*args, seed=5, progress=False, checkpoint_path=tmp_path / "other.pt"), plain)

    _kill_at_iteration(monkeypatch, 5)  # checkpoints after iterations 2 and 4: 4 are kept, 1 lost
    with pytest.raises(_Killed):
        synthesize_units(*args, seed=5, progress=False, checkpoint_path=ckpt)
    monkeypatch.undo()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["next_iteration"] == 4 and len(saved["generator_states"]) == len(units)
    resumed = synthesize_units(*args, seed=5, progress=False, checkpoint_path=ckpt)
    assert torch.equal(resumed, plain)  # bit for bit

    # A checkpoint of another pass (other units or settings) is ignored, not resumed from.
    sub = (teacher, units[:2], targets, cfg, (1, 16, 16), MEAN, STD)
    assert torch.equal(synthesize_units(*sub, seed=5, progress=False, checkpoint_path=ckpt),
                       synthesize_units(*sub, seed=5, progress=False))


def _squeeze_dir(path) -> None:
    """A fake squeeze output for fashion-mnist: random ConvNet-BN teacher, synthetic class-wise BN statistics."""
    from lpqld_fast.bn_stats import save_bn_stats
    from lpqld_fast.io_utils import save_tensors, sha256_tensors

    torch.manual_seed(0)
    model = get_model("convnet-bn", num_classes=10, in_chans=1, image_size=28).eval()
    for _, bn in bn_layers(model):
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    path.mkdir(parents=True)
    save_tensors(path / "teacher.pt", model.state_dict())
    g = torch.Generator().manual_seed(1)
    stats, names = {}, []
    for name, bn in bn_layers(model):
        names.append(name)
        stats[f"{name}.mean"] = torch.randn(10, bn.num_features, generator=g) * 0.1
        stats[f"{name}.var"] = torch.rand(10, bn.num_features, generator=g) + 0.5
    save_bn_stats(path / "bn_stats.pt", stats, names, "exact", sha256_tensors(model.state_dict()))


def test_run_recover_resumes_mid_pass_bit_exact(tmp_path, monkeypatch) -> None:
    """All 10 classes in one pass (the Fashion-MNIST preset's case): a kill mid-pass resumes from the checkpoint."""
    from lpqld_fast.recover import run_recover

    sq = tmp_path / "squeeze"
    _squeeze_dir(sq)
    config = {"dataset": "fashion-mnist", "squeeze": {"model": "convnet-bn"},
              "recover": {"ipc": 2, "iterations": 5, "lr": 0.1, "r_bn": 0.05, "jitter": 2, "checkpoint_every": 2}}
    want = run_recover(config, sq, tmp_path / "a", units_at_once=10, progress=False)

    out = tmp_path / "b"
    _kill_at_iteration(monkeypatch, 3)
    with pytest.raises(_Killed):
        run_recover(config, sq, out, units_at_once=10, progress=False)
    monkeypatch.undo()
    ckpts = list((out / "units").glob("pass_*.ckpt.pt"))
    assert [p.name for p in ckpts] == ["pass_000000-000009.ckpt.pt"]
    assert not list((out / "units").glob("unit_*.pt"))
    assert torch.load(ckpts[0], weights_only=True)["next_iteration"] == 2
    # The checkpoint interval is not part of the run identity: it may change on resume.
    config["recover"]["checkpoint_every"] = 3
    got = run_recover(config, sq, out, units_at_once=10, progress=False)
    assert got["images_sha256"] == want["images_sha256"]
    assert not list((out / "units").glob("pass_*.ckpt.pt"))  # deleted once the pass finished
    assert len(list((out / "units").glob("unit_*.pt"))) == 10


def test_bf16_channels_last_pass_tracks_fp32() -> None:
    """recover.bf16 + recover.channels_last (the CPU preset's fast path): the same optimisation up to bf16
    rounding of the teacher's activations, and the many-classes-per-pass equivalence still holds."""
    teacher, fast_teacher = _teacher(), _teacher()
    targets = _targets(teacher)
    units = make_units(K, IPC, True)
    fast = {**CFG, "bf16": True, "channels_last": True}
    ref = synthesize_units(teacher, units, targets, CFG, (1, 16, 16), MEAN, STD, seed=7, progress=False)
    got = synthesize_units(fast_teacher, units, targets, fast, (1, 16, 16), MEAN, STD, seed=7, progress=False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    init = torch.cat([torch.randn(len(u.labels), 1, 16, 16,
                                  generator=torch.Generator().manual_seed((7 * 1_000_003 + u.uid * 7919 + 12345)))
                      for u in units])
    moved = (ref - init).abs().mean()
    # Adam's steps are ~lr per pixel whatever the gradient's rounding: the two trajectories stay close
    # relative to how far the images moved (a wrong layout or dtype path would decorrelate them).
    assert (got - ref).abs().mean() < 0.25 * moved
    alone = torch.cat([synthesize_units(fast_teacher, [u], targets, fast, (1, 16, 16), MEAN, STD, seed=7,
                                        progress=False) for u in units])
    assert (got - alone).abs().mean() < 0.25 * moved


def test_run_identity_ignores_layout_but_not_bf16(tmp_path) -> None:
    """A finished recover is reused when only recover.channels_last (layout) differs, refused when bf16 does."""
    from lpqld_fast.recover import run_recover

    sq = tmp_path / "squeeze"
    _squeeze_dir(sq)
    config = {"dataset": "fashion-mnist", "squeeze": {"model": "convnet-bn"},
              "recover": {"ipc": 1, "iterations": 2, "lr": 0.1, "r_bn": 0.05, "jitter": 2}}
    first = run_recover(config, sq, tmp_path / "r", units_at_once=10, progress=False)
    config["recover"].update(channels_last=True, bf16=False)
    again = run_recover(config, sq, tmp_path / "r", units_at_once=10, progress=False)
    assert again["images_sha256"] == first["images_sha256"]
    config["recover"]["bf16"] = True
    with pytest.raises(ValueError, match="another config"):
        run_recover(config, sq, tmp_path / "r", units_at_once=10, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_pass_equals_cpu_pass_and_batching_holds() -> None:
    """The same pass on the GPU (cuda kernels: crop_resize_flip, batched_roll, segment_bn_loss behind
    supervised_bn) tracks the CPU pass, and many classes per pass equal one class per pass there too."""
    teacher = _teacher()
    targets = _targets(teacher)
    units = make_units(K, IPC, True)
    cpu = synthesize_units(teacher, units, targets, CFG, (1, 16, 16), MEAN, STD, seed=7, progress=False)
    gpu_teacher = _teacher().cuda()
    gpu_targets = [(m.cuda(), v.cuda()) for m, v in targets]
    with full_fp32():  # cuDNN's default TF32 rounding differs between batch sizes (1 pixel off by 2.3e-3 with it)
        together = synthesize_units(gpu_teacher, units, gpu_targets, CFG, (1, 16, 16), MEAN, STD, seed=7,
                                    device="cuda", progress=False)
        alone = torch.cat([synthesize_units(gpu_teacher, [u], gpu_targets, CFG, (1, 16, 16), MEAN, STD, seed=7,
                                            device="cuda", progress=False) for u in units])
    assert together.is_cuda
    # cuDNN and the CPU convolutions round differently; Adam's first steps amplify it where the gradient is ~0:
    # 1e-3 = 1% of lr, while a wrong segment, draw or layout is O(lr).
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-3)
    torch.testing.assert_close(together.cpu(), cpu, rtol=0, atol=1e-3)
