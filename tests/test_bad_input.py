"""The bad-input matrix (docs/BAD_INPUT.md): every op and every CLI command, and what the user sees.

Ops raise a ValueError/IndexError/TypeError whose message names the argument
and the problem (never a crash, never a wrong number); non-finite data the ops
do not check stays confined (NaN in, NaN out for that class / segment / loss).
CLI commands run in-process through ``lpqld_fast.cli.main``: exit status != 0,
exactly one line on stderr (progress bars aside), no traceback, and nothing
already written is changed. The per-op test files hold further argument checks;
this file is the user-facing table.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import lpqld_fast.io_utils as io_utils
from lpqld_fast.cli import main
from lpqld_fast.ops import (
    available_backends,
    batched_roll,
    calibrate_student_temperature,
    classwise_moments,
    classwise_moments_accumulate_,
    crop_resize_flip,
    segment_bn_loss,
    soft_label_kl,
)

META = torch.device("meta")  # a device other than the inputs' (works on machines without a GPU)


pytestmark = pytest.mark.usefixtures("one_thread_module")


# =========================================================================== ops


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))


LAB = torch.tensor([0, 1, 2, 1])
TM, TV = torch.zeros(3, 3), torch.ones(3, 3)
IMG = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
BOXES = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.5, 0.5]])
FLIPS = torch.tensor([True, False])
Z = torch.randn(2, 10, generator=torch.Generator().manual_seed(2))
V = torch.randn(2, 3, generator=torch.Generator().manual_seed(3))
IDX = torch.tensor([[0, 1, 2], [3, 4, 5]])


def _roll_backend(b: str) -> str:
    """batched_roll's own backend names for a matrix backend: its native kernel for cpp, else the gather path."""
    return "cpp" if b == "cpp" else "gather"


def _with(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


def _state(k: int, c: int, dtype=torch.float64):
    return torch.zeros(k, dtype=dtype), torch.zeros(k, c, dtype=torch.float64), torch.zeros(k, c, dtype=torch.float64)


# (case id, call(backend), exception, message regex); backend None = op without backends
OP_CASES: list[tuple[str, Callable[[str], object], type, str]] = [
    # classwise_moments / classwise_moments_accumulate_
    ("moments-x-dtype", lambda b: classwise_moments(_x().long(), LAB, 3, backend=b), ValueError,
     r"^x must have dtype in \[.*\], got torch.int64$"),
    ("moments-x-shape", lambda b: classwise_moments(_x()[:, 0, 0, 0], LAB, 3, backend=b), ValueError,
     r"^x must have 2 or 3 or 4 or 5 or 6 or 7 dimensions, got shape \(4,\)$"),
    ("moments-labels-length", lambda b: classwise_moments(_x(), LAB[:3], 3, backend=b), ValueError,
     r"^labels has 3 entries but x has 4 samples$"),
    ("moments-labels-dtype", lambda b: classwise_moments(_x(), LAB.float(), 3, backend=b), ValueError,
     r"^labels must have dtype in \[.*\], got torch.float32$"),
    ("moments-labels-device", lambda b: classwise_moments(_x(), LAB.to(META), 3, backend=b), ValueError,
     r"^labels is on meta but must be on cpu like the other inputs$"),
    ("moments-class-id-too-large", lambda b: classwise_moments(_x(), torch.tensor([0, 1, 5, 1]), 3, backend=b),
     IndexError, r"^labels holds class id 5 outside \[0, 3\)$"),
    ("moments-class-id-negative", lambda b: classwise_moments(_x(), torch.tensor([0, -1, 2, 1]), 3, backend=b),
     IndexError, r"^labels holds class id -1 outside \[0, 3\)$"),
    ("moments-no-classes", lambda b: classwise_moments(_x(), LAB, 0, backend=b), ValueError,
     r"^num_classes must be a positive int, got 0$"),
    ("moments-state-dtype", lambda b: classwise_moments_accumulate_(_x(), LAB, *_state(3, 3, torch.float32),
                                                                    backend=b),
     ValueError, r"^count must have dtype in \['torch.float64'\], got torch.float32$"),
    ("moments-state-shape", lambda b: classwise_moments_accumulate_(_x(), LAB, *_state(3, 4), backend=b),
     ValueError, r"^mean must have shape \(3, 3\), got \(3, 4\)$"),
    # segment_bn_loss
    ("segbn-x-dtype", lambda b: segment_bn_loss(_x().long(), LAB, TM, TV, backend=b), ValueError,
     r"^x must have dtype in \[.*\], got torch.int64$"),
    ("segbn-empty-spatial", lambda b: segment_bn_loss(_x()[:, :, :0], LAB, TM, TV, backend=b), ValueError,
     r"^x must have at least one channel and non-empty spatial dims, got shape \(4, 3, 0, 2\)$"),
    ("segbn-segment-id", lambda b: segment_bn_loss(_x(), torch.tensor([0, 1, 3, 1]), TM, TV, backend=b),
     IndexError, r"^segment_ids holds segment id 3 outside \[0, 3\)$"),
    ("segbn-target-inf", lambda b: segment_bn_loss(_x(), LAB, _with(TM, (0, 0), float("inf")), TV, backend=b),
     ValueError, r"^target_mean contains NaN or inf$"),
    ("segbn-target-nan", lambda b: segment_bn_loss(_x(), LAB, TM, _with(TV, (1, 2), float("nan")), backend=b),
     ValueError, r"^target_var contains NaN or inf$"),
    ("segbn-target-shape", lambda b: segment_bn_loss(_x(), LAB, TM, TV[:, :2], backend=b), ValueError,
     r"^target_var must have shape \(3, 3\), got \(3, 2\)$"),
    ("segbn-channels", lambda b: segment_bn_loss(_x()[:, :2], LAB, TM, TV, backend=b), ValueError,
     r"^target_mean has 3 channels but x has 2 \(x is \[N, C, \.\.\.\]\)$"),
    ("segbn-device", lambda b: segment_bn_loss(_x(), LAB, TM.to(META), TV, backend=b), ValueError,
     r"^target_mean is on meta but must be on cpu like the other inputs$"),
    # crop_resize_flip / batched_roll
    ("crop-box-nan", lambda b: crop_resize_flip(IMG, _with(BOXES, (1, 0), float("nan")), FLIPS, 4, backend=b),
     ValueError, r"^boxes must hold finite normalised \(i/H, j/W, h/H, w/W\) values in \[0, 1\], got row 1: "),
    ("crop-box-outside", lambda b: crop_resize_flip(IMG, _with(BOXES, (0, 3), 1.5), FLIPS, 4, backend=b),
     ValueError, r"^boxes must hold finite normalised .* got row 0: \[0.0, 0.0, 1.0, 1.5\]$"),
    ("crop-flips-length", lambda b: crop_resize_flip(IMG, BOXES, FLIPS[:1], 4, backend=b), ValueError,
     r"^flips has 1 entries but x has 2 samples$"),
    ("crop-flips-values", lambda b: crop_resize_flip(IMG, BOXES, torch.tensor([0, 2]), 4, backend=b), ValueError,
     r"^flips must hold 0/1 \(or bool\) values$"),
    ("crop-out-size", lambda b: crop_resize_flip(IMG, BOXES, FLIPS, (0, 4), backend=b), ValueError,
     r"^out_size must be positive, got \(0, 4\)$"),
    ("crop-x-shape", lambda b: crop_resize_flip(IMG[0], BOXES, FLIPS, 4, backend=b), ValueError,
     r"^x must have 4 dimensions, got shape \(3, 8, 8\)$"),
    ("crop-x-dtype", lambda b: crop_resize_flip(IMG.int(), BOXES, FLIPS, 4, backend=b), ValueError,
     r"^x must have dtype in \[.*\], got torch.int32$"),
    ("crop-device", lambda b: crop_resize_flip(IMG, BOXES.to(META), FLIPS, 4, backend=b), ValueError,
     r"^boxes is on meta but must be on cpu like the other inputs$"),
    ("roll-shift-dtype", lambda b: batched_roll(IMG, torch.zeros(2, 2), backend=_roll_backend(b)), ValueError,
     r"^shifts must have dtype in \[.*\], got torch.float32$"),
    ("roll-shift-shape", lambda b: batched_roll(IMG, torch.zeros(3, 2, dtype=torch.long), backend=_roll_backend(b)),
     ValueError, r"^shifts must have shape \(2, 2\), got \(3, 2\)$"),
    ("roll-backend", lambda b: batched_roll(IMG, torch.zeros(2, 2, dtype=torch.long), backend="triton"), ValueError,
     r"^batched_roll: backend must be one of \('cpp', 'gather'\) or None, got 'triton'$"),
    # soft_label_kl (data checks: the op's for reference/triton, the cpp kernel's own, same wording)
    ("kl-k-larger-than-C", lambda b: soft_label_kl(Z, torch.randn(2, 11), torch.arange(11).repeat(2, 1), mode="mr",
                                                   backend=b),
     ValueError, r"^values holds k = 11 entries per row but student_logits has only C = 10 classes$"),
    ("kl-class-id-too-large", lambda b: soft_label_kl(Z, V, _with(IDX, (1, 2), 10), mode="mr", backend=b),
     IndexError, r"^(soft_label_kl_fwd: )?indices holds class id 10 outside \[0, 10\)$"),
    ("kl-class-id-negative", lambda b: soft_label_kl(Z, V, _with(IDX, (0, 1), -1), mode="mr", backend=b),
     IndexError, r"^(soft_label_kl_fwd: )?indices holds class id -1 outside \[0, 10\)$"),
    ("kl-class-twice", lambda b: soft_label_kl(Z, V, _with(IDX, (0, 2), 1), mode="mr", backend=b), ValueError,
     r"^(soft_label_kl_fwd: )?indices repeats a class id within a row"),
    ("kl-values-nan", lambda b: soft_label_kl(Z, _with(V, (1, 1), float("nan")), IDX, mode="mr", backend=b),
     ValueError, r"^(soft_label_kl_fwd: )?values contains NaN or inf$"),
    ("kl-values-inf", lambda b: soft_label_kl(Z, _with(V, (0, 0), float("inf")), IDX, mode="ms", backend=b),
     ValueError, r"^(soft_label_kl_fwd: )?values contains NaN or inf$"),
    ("kl-T-zero", lambda b: soft_label_kl(Z, V, IDX, mode="mr", T=0.0, backend=b), ValueError,
     r"^T must be a finite number > 0, got 0.0$"),
    ("kl-t_s-nan", lambda b: soft_label_kl(Z, V, IDX, mode="mr", t_s=float("nan"), backend=b), ValueError,
     r"^t_s must be a finite number > 0, got nan$"),
    ("kl-mode", lambda b: soft_label_kl(Z, V, IDX, mode="topk", backend=b), ValueError,
     r"^mode must be one of \('dense', 'mr', 'mrs', 'ms', 'topk_norenorm'\), got 'topk'$"),
    ("kl-int8-no-scale", lambda b: soft_label_kl(Z, V.to(torch.int8), IDX, mode="mr", backend=b), ValueError,
     r"^scale is required for int8 values"),
    ("kl-index-dtype", lambda b: soft_label_kl(Z, V, IDX.float(), mode="mr", backend=b), ValueError,
     r"^indices must have dtype in \[.*\], got torch.float32$"),
    ("kl-device", lambda b: soft_label_kl(Z, V, IDX.to(META), mode="mr", backend=b), ValueError,
     r"^indices is on meta but must be on cpu like the other inputs$"),
    ("kl-rows", lambda b: soft_label_kl(Z, V[:1], IDX[:1], mode="mr", backend=b), ValueError,
     r"^values has 1 rows but student_logits has B = 2$"),
    ("kl-mrs-no-fill", lambda b: soft_label_kl(Z, V, IDX, mode="mrs", backend=b), ValueError,
     r"^fill is required for mode 'mrs'"),
    # calibrate_student_temperature
    ("calib-empty-grid", lambda b: calibrate_student_temperature(Z, V, IDX, mode="mr", T=2.0, grid=[]), ValueError,
     r"^grid must be a non-empty 1-D sequence of temperatures, got shape \(0,\)$"),
    ("calib-grid-negative", lambda b: calibrate_student_temperature(Z, V, IDX, mode="mr", T=2.0, grid=[0.5, -1.0]),
     ValueError, r"^grid must hold finite temperatures > 0$"),
    ("calib-no-samples", lambda b: calibrate_student_temperature(Z[:0], V[:0], IDX[:0], mode="mr", T=2.0),
     ValueError, r"^calibrate_student_temperature needs at least one sample"),
    ("calib-class-id", lambda b: calibrate_student_temperature(Z, V, _with(IDX, (1, 2), 10), mode="mr", T=2.0),
     IndexError, r"^indices holds class id 10 outside \[0, 10\)$"),
]

_NATIVE = {"moments": "classwise_moments_accumulate_", "segbn": "segment_bn_loss_fwd", "crop": "crop_resize_flip",
           "kl": "soft_label_kl_fwd", "roll": "batched_roll"}


def _op_params():
    for case, call, exc, msg in OP_CASES:
        op = case.split("-")[0]
        backends = available_backends("cpu", _NATIVE[op]) if op in _NATIVE else [None]
        for b in backends:
            yield pytest.param(call, exc, msg, b, id=f"{case}-{b}" if b else case)


@pytest.mark.parametrize("call,exc,msg,backend", list(_op_params()))
def test_op_bad_input_message(call, exc, msg, backend) -> None:
    with pytest.raises(exc) as info:
        call(backend)
    assert re.search(msg, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", available_backends("cpu", "classwise_moments_accumulate_"))
def test_moments_nan_stays_in_its_class(backend: str) -> None:
    """Not checked (a pass over x): NaN/inf reach only the class that holds them."""
    x = _with(_x(), (0, 0, 0, 0), float("nan"))
    res = classwise_moments(x, LAB, 3, backend=backend)
    want = classwise_moments(_x(), LAB, 3, backend="reference")
    assert torch.isnan(res.mean[0, 0]) and torch.isnan(res.var[0, 0])
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[0, 0] = False
    torch.testing.assert_close(res.mean[keep], want.mean[keep])
    torch.testing.assert_close(res.var[keep], want.var[keep])


@pytest.mark.parametrize("backend", available_backends("cpu", "segment_bn_loss_fwd"))
def test_segment_loss_nan_stays_in_its_segment(backend: str) -> None:
    x = _with(_x(), (0, 1, 0, 0), float("nan"))  # sample 0 is segment 0
    loss = segment_bn_loss(x, LAB, TM, TV, backend=backend)
    want = segment_bn_loss(_x(), LAB, TM, TV, backend="reference")
    assert torch.isnan(loss[0])
    torch.testing.assert_close(loss[1:], want[1:])


@pytest.mark.parametrize("backend", available_backends("cpu", "soft_label_kl_fwd"))
def test_kl_non_finite_logits_give_nan_not_a_number(backend: str) -> None:
    """Student logits are not checked (they come from the model): NaN/inf give a NaN loss, never a finite one."""
    for bad in (float("nan"), float("inf")):
        loss = soft_label_kl(_with(Z, (0, 0), bad), V, IDX, mode="mr", backend=backend)
        assert torch.isnan(loss)


def test_ipc_larger_than_a_class_is_refused() -> None:
    """Real-image recover (paper 001 baseline): IPC above a class's image count names the class."""
    from lpqld_fast.real_images import select_indices

    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    with pytest.raises(ValueError, match=r"^ipc=3 exceeds the 2 training images of class 1$"):
        select_indices(labels, 3, 3)
    with pytest.raises(ValueError, match=r"^ipc must be a positive int, got 0$"):
        select_indices(labels, 3, 0)


# =========================================================================== CLI

TINY = [
    "--set", "squeeze.epochs=1", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=50",
    "--set", "recover.ipc=2", "--set", "recover.iterations=3",
    "--set", "relabel.epochs=3", "--set", "relabel.batch_size=5", "--set", "relabel.k=3",
    "--set", "relabel.prune_ratio=0.5",
    "--set", "train.epochs=3", "--set", "train.eval_every=1",
]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="module")
def presets_patched():
    """fashion-mnist -> the small synthetic dataset; "fmnist-real" keeps the real Fashion-MNIST preset."""
    import lpqld_fast.presets as presets

    mp = pytest.MonkeyPatch()
    real = presets.get_preset("fashion-mnist")
    tiny = presets.get_preset("fashion-mnist")
    tiny["dataset"] = "synthetic"
    mp.setitem(presets.PRESETS, "fashion-mnist", tiny)
    mp.setitem(presets.PRESETS, "fmnist-real", real)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, presets_patched) -> Path:
    """One complete tiny run (squeeze, recover, relabel, train), copied by each case that needs one."""
    run = tmp_path_factory.mktemp("bad-input") / "run"
    for stage in ("squeeze", "recover", "relabel", "train"):
        assert main([stage, "--out", str(run), *TINY]) == 0, stage
    return run


def _copy(finished_run: Path, tmp_path: Path, drop: tuple[str, ...] = ()) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for d in drop:
        shutil.rmtree(run / d)
    return run


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _user_lines(err: str) -> list[str]:
    """stderr without tqdm's progress output (carriage-return redraws and ANSI cursor moves)."""
    lines = []
    for raw in err.split("\n"):
        line = _ANSI.sub("", raw.split("\r")[-1]).strip()
        if line and not re.search(r"\d+it/s|s/it|it \[|\|.*\|", line):
            lines.append(line)
    return lines


def _fails_with_one_line(capsys, argv: list[str], pattern: str) -> str:
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors exit from parse_args
        rc = e.code
    err = capsys.readouterr().err
    lines = _user_lines(err)
    assert rc != 0, err
    assert "Traceback" not in err, err
    assert len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert lines[0].startswith(("lpqld ", "lpqld:")), lines[0]
    return lines[0]


def _evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps({"model": Evil(), "images": Evil()}))


def _other_arch_weights(path: Path) -> None:
    from lpqld_fast.models import get_model

    torch.save(get_model("resnet18-small", num_classes=10, in_chans=1, image_size=28).state_dict(), path)


# Each case: (id, stages to drop from the copied run, prepare(run, tmp_path) -> extra argv, command, message regex)
ALL_STAGES = ("squeeze", "recover", "relabel", "train")  # a fresh run directory (run.json binds only a started run)
def _prep_none(run: Path, tmp: Path) -> list[str]:
    return []


CLI_CASES = [
    # squeeze
    ("squeeze-missing-dataset", ALL_STAGES, lambda r, t: ["--dataset", "fmnist-real", "--data-root", str(t / "nowhere")],
     "squeeze", r"^lpqld squeeze: error: Fashion-MNIST directory '.*nowhere' does not exist"),
    ("squeeze-unreadable-dataset", ALL_STAGES, "garbage-idx", "squeeze", r"^lpqld squeeze: error: .*garbage"),
    ("squeeze-missing-imagefolder", ALL_STAGES, lambda r, t: ["--dataset", "tiny-imagenet", "--data-root", str(t / "nowhere")],
     "squeeze", r"^lpqld squeeze: error: imagefolder split directory '.*nowhere/train' does not exist"),
    ("squeeze-imagefolder-bad-workers", ("squeeze",), "tiny-imagenet-tree-bad-workers", "squeeze",
     r"^lpqld squeeze: error: squeeze.train_workers must be an int >= 0 or auto, got -1$"),
    ("squeeze-imagefolder-class-count", ALL_STAGES, "tree-3-classes", "squeeze",
     r"^lpqld squeeze: error: .*/train holds 3 class folders; tiny-imagenet has 200"),
    ("squeeze-checkpoint-missing", ("squeeze",), lambda r, t: ["--checkpoint", str(t / "none.pt")], "squeeze",
     r"^lpqld squeeze: error: teacher checkpoint not found: .*none\.pt$"),
    ("squeeze-checkpoint-other-architecture", ("squeeze",), "other-arch", "squeeze",
     r"^lpqld squeeze: error: teacher checkpoint .*other\.pt does not fit model ConvNet \(another architecture\?\): "
     r"Missing key\(s\)"),
    ("squeeze-checkpoint-pickle", ("squeeze",), "evil", "squeeze",
     r"^lpqld squeeze: error: teacher checkpoint .*evil\.pt cannot be loaded safely \(UnpicklingError: Weights only "
     r"load failed\); only plain tensor files are accepted, never arbitrary pickles$"),
    ("squeeze-batch-size-zero", ("squeeze",), lambda r, t: ["--set", "squeeze.batch_size=0"], "squeeze",
     r"^lpqld squeeze: error: squeeze.batch_size must be a positive int, got 0$"),
    ("squeeze-batch-larger-than-dataset", ("squeeze",), lambda r, t: ["--set", "squeeze.batch_size=5000"], "squeeze",
     r"^lpqld squeeze: error: squeeze.batch_size 5000 exceeds the 100 training images of synthetic$"),
    ("squeeze-lr-not-a-number", ("squeeze",), lambda r, t: ["--set", "squeeze.lr=abc"], "squeeze",
     r"^lpqld squeeze: error: squeeze.lr must be a number >= 0, got 'abc'$"),
    ("squeeze-unknown-key", ("squeeze",), lambda r, t: ["--set", "squeeze.epoch=2"], "squeeze",
     r"^lpqld squeeze: error: unknown squeeze config keys 'epoch' \(did you mean 'epochs'\?\); known: "),
    ("squeeze-no-gpu", ("squeeze",), lambda r, t: ["--device", "cuda"], "squeeze",
     r"^lpqld squeeze: error: --device 'cuda' but no CUDA device is available here"),
    ("squeeze-bad-device", ("squeeze",), lambda r, t: ["--device", "gpu0"], "squeeze",
     r"^lpqld squeeze: error: --device 'gpu0' is not a device"),
    ("squeeze-usage", (), lambda r, t: ["--seed", "x"], "squeeze",
     r"^lpqld squeeze: error: argument --seed: invalid int value: 'x' \(see lpqld squeeze --help\)$"),
    # recover
    ("recover-ipc-zero", ("recover",), lambda r, t: ["--set", "recover.ipc=0"], "recover",
     r"^lpqld recover: error: recover.ipc must be a positive int, got 0$"),
    ("recover-unknown-key", ("recover",), lambda r, t: ["--set", "recover.iteration=5"], "recover",
     r"^lpqld recover: error: unknown recover config keys 'iteration' \(did you mean 'iterations'\?\); known: "),
    ("recover-teacher-other-architecture", ("recover",), "teacher-other-arch", "recover",
     r"^lpqld recover: error: teacher checkpoint .*teacher\.pt does not fit model ConvNet"),
    ("recover-stats-nan", ("recover",), "stats-nan", "recover", r"^lpqld recover: error: target_mean contains NaN or inf$"),
    ("recover-stats-corrupt", ("recover",), "stats-corrupt", "recover",
     r"^lpqld recover: error: class-wise BN statistics .*bn_stats\.pt cannot be loaded safely"),
    ("recover-no-squeeze", ("squeeze", "recover"), _prep_none, "recover",
     r"^lpqld recover: error: teacher checkpoint not found: .*squeeze/teacher\.pt$"),
    ("recover-ipc-fraction", ("recover",), lambda r, t: ["--set", "recover.ipc=2.7"], "recover",
     r"^lpqld recover: error: recover.ipc must be a positive int, got '2.7'$"),
    ("recover-ipc-not-a-number", ("recover",), lambda r, t: ["--set", "recover.ipc=abc"], "recover",
     r"^lpqld recover: error: recover.ipc must be a positive int, got 'abc'$"),
    ("recover-ipc-too-large-for-memory", ("recover",), lambda r, t: ["--set", "recover.ipc=1000000000000"],
     "recover", r"^lpqld recover: error: recover.ipc=1000000000000 needs at least [\d.]+ GiB of memory "
     r"\(10000000000000 images of 1x28x28\); [\d.]+ GiB are available$"),
    ("recover-changed-setting", (), lambda r, t: ["--set", "recover.iterations=4"], "recover",
     r"^lpqld recover: error: .*/recover holds a recover run with another config \(recover.iterations 3 -> 4\); "
     r"rerun with the recorded settings, or start fresh with another --out"),
    # relabel
    ("relabel-prune-ratio-one", ("relabel",), lambda r, t: ["--set", "relabel.prune_ratio=1.0"], "relabel",
     r"^lpqld relabel: error: relabel.prune_ratio must be a number in \[0, 1\), got 1.0$"),
    ("relabel-prune-ratio-negative", ("relabel",), lambda r, t: ["--set", "relabel.prune_ratio=-0.1"], "relabel",
     r"^lpqld relabel: error: relabel.prune_ratio must be a number in \[0, 1\), got -0.1$"),
    ("relabel-prune-ratio-nan", ("relabel",), lambda r, t: ["--set", "relabel.prune_ratio=nan"], "relabel",
     r"^lpqld relabel: error: relabel.prune_ratio must be a number in \[0, 1\), got nan$"),
    ("relabel-k-larger-than-C", ("relabel",), lambda r, t: ["--set", "relabel.k=11"], "relabel",
     r"^lpqld relabel: error: k must be an int in \[1, num_classes=10\] for mode 'mr', got 11$"),
    ("relabel-batch-larger-than-images", ("relabel",), lambda r, t: ["--set", "relabel.batch_size=500"], "relabel",
     r"^lpqld relabel: error: batch_size 500 exceeds the number of images 20$"),
    ("relabel-images-tampered", ("relabel",), "images-tampered", "relabel",
     r"^lpqld relabel: error: .*images\.pt does not match the hash in .*manifest\.json \(modified or corrupt\)$"),
    ("relabel-images-pickle", ("relabel",), "images-evil", "relabel",
     r"^lpqld relabel: error: distilled images .*images\.pt cannot be loaded safely"),
    ("relabel-no-recover", ("recover", "relabel"), _prep_none, "relabel",
     r"^lpqld relabel: error: recover manifest not found: .*recover/manifest\.json$"),
    ("relabel-store-too-large-for-disk", ("relabel",), lambda r, t: ["--set", "relabel.epochs=1000000000000"],
     "relabel", r"^lpqld relabel: error: relabel.epochs=1000000000000 with relabel.batch_size=5, prune_ratio=0.5 and "
     r"k=3 makes a label store of at least [\d.]+ GiB; [\d.]+ GiB are free under "),
    ("relabel-changed-setting", (), lambda r, t: ["--set", "relabel.k=4"], "relabel",
     r"^lpqld relabel: error: .*/relabel already holds a different label store \(differs in: .*k"),
    # train
    ("train-image-set-does-not-match-store", ("train",), "recover-ipc3", "train",
     r"^lpqld train: error: .*relabel/manifest\.json: images_sha256 is '[0-9a-f]+', expected '[0-9a-f]+'; the store "
     r"was made with a different image set$"),
    ("train-resume-other-architecture", (), lambda r, t: ["--set", "train.model=resnet18-small",
                                                          "--set", "train.epochs=4"], "train",
     r"^lpqld train: error: .*/train holds a run made with other settings \(train.model 'convnet-bn' -> "
     r"'resnet18-small'\); rerun with the recorded settings, or start fresh with another --out \(or delete "),
    ("train-resume-checkpoint-pickle", (), "last-evil", "train",
     r"^lpqld train: error: train resume checkpoint .*last\.pt cannot be loaded safely \(UnpicklingError: Weights only "
     r"load failed\); only plain tensor files are accepted, never arbitrary pickles$"),
    ("train-store-truncated", ("train",), "store-truncated", "train",
     r"^lpqld train: error: label store file .*label_values\.bin has \d+ bytes, expected \d+ \(truncated\)$"),
    ("train-store-manifest-corrupt", ("train",), "store-manifest-corrupt", "train",
     r"^lpqld train: error: label store manifest .*manifest\.json is corrupt \(not valid JSON"),
    ("train-no-store", ("relabel", "train"), _prep_none, "train",
     r"^lpqld train: error: label store directory not found: .*relabel$"),
    ("train-batch-size-differs", ("train",), lambda r, t: ["--set", "train.batch_size=7"], "train",
     r"^lpqld train: error: train.batch_size 7 differs from the label store's batch size 5"),
    ("train-epochs-zero", ("train",), lambda r, t: ["--set", "train.epochs=0"], "train",
     r"^lpqld train: error: train.epochs must be a positive int, got 0$"),
    ("train-lr-not-a-number", ("train",), lambda r, t: ["--set", "train.lr=abc"], "train",
     r"^lpqld train: error: train.lr must be a number >= 0, got 'abc'$"),
    ("train-store-values-corrupt", ("train",), "store-values-flipped", "train",
     r"^lpqld train: error: label store file .*label_values\.bin is corrupt: sha256 differs from the manifest$"),
    ("train-store-indices-corrupt", ("train",), "store-indices-flipped", "train",
     r"^lpqld train: error: label store file .*label_indices\.bin is corrupt: sha256 differs from the manifest$"),
    ("train-changed-setting", (), lambda r, t: ["--set", "train.lr=0.01"], "train",
     r"^lpqld train: error: .*/train holds a run made with other settings \(train.lr 0.001 -> 0.01\); rerun with "
     r"the recorded settings, or start fresh with another --out \(or delete .*/train\)$"),
    ("train-epochs-lowered", (), lambda r, t: ["--set", "train.epochs=2"], "train",
     r"^lpqld train: error: .*/train holds a run made with other settings \(train.epochs 3 -> 2 \(only raising it "
     r"trains on\)\)"),
    ("squeeze-changed-setting", (), lambda r, t: ["--set", "squeeze.lr=0.2"], "squeeze",
     r"^lpqld squeeze: error: .*/squeeze holds a run made with other settings \(squeeze.lr 0.1 -> 0.2\)"),
    ("squeeze-other-dataset", (), lambda r, t: ["--dataset", "fmnist-real"], "squeeze",
     r"^lpqld squeeze: error: .*/run holds a run on dataset 'synthetic', not 'fashion-mnist'; continue it without "
     r"--dataset, or use another --out for 'fashion-mnist'$"),
    ("any-unknown-dataset", ALL_STAGES, lambda r, t: ["--dataset", "cifar10"], "squeeze",
     r"^lpqld squeeze: error: --dataset 'cifar10' is neither a dataset \[.*'imagefolder'.*\] nor a preset"),
    ("squeeze-imagefolder-no-eval-split", ALL_STAGES, "tree-no-eval", "squeeze",
     r"^lpqld squeeze: error: imagefolder tree '.*tree' has no evaluation split: expected .*tree/test or "
     r".*tree/val holding the train split's class folders$"),
    ("any-bf16-not-a-choice", ALL_STAGES, lambda r, t: ["--set", "train.bf16=yes"], "distill",
     r"^lpqld distill: error: train.bf16 must be true, false or auto, got 'yes'$"),
    # distill, report
    ("distill-missing-dataset", ALL_STAGES, "fmnist-env-missing", "distill",
     r"^lpqld distill: error: .*nowhere"),
    ("train-data-root-synthetic", (), lambda r, t: ["--data-root", str(t)], "train",
     r"^lpqld train: error: .*/run holds a run on data root None, not '.*'; continue it without --data-root, "
     r"or use another --out$"),
    ("train-data-root-missing", ("train",), lambda r, t: ["--dataset", "fmnist-real", "--data-root",
                                                          str(t / "nowhere")], "train",
     r"^lpqld train: error: .*/run holds a run on dataset 'synthetic', not 'fashion-mnist'; continue it without "
     r"--dataset, or use another --out for 'fashion-mnist'$"),
    ("report-no-run", ("squeeze", "recover", "relabel", "train"), _prep_none, "report",
     r"^lpqld report: error: squeeze config not found: .*squeeze/config\.json$"),
    ("report-storage-no-store", ("relabel", "train"), lambda r, t: ["storage"], "report",
     r"^lpqld report: error: label store manifest not found: .*manifest\.json$"),
]


def _prepare(kind, run: Path, tmp: Path, monkeypatch) -> list[str]:
    if callable(kind):
        return kind(run, tmp)
    if kind == "fmnist-env-missing":  # the real preset, its default location pointed nowhere
        monkeypatch.setenv("LPQLD_FASHION_MNIST", str(tmp / "nowhere"))
        return ["--dataset", "fmnist-real"]
    if kind.startswith("tiny-imagenet-tree") or kind == "tree-3-classes":  # one 8x8 PNG per class, train and test
        from PIL import Image

        for split in ("train", "test"):
            for c in range(3 if kind == "tree-3-classes" else 200):
                d = tmp / "tree" / split / f"n{c:03d}"
                d.mkdir(parents=True)
                Image.new("RGB", (8, 8), (c % 256, 0, 0)).save(d / "a.png")
        extra = ["--set", "squeeze.train_workers=-1"] if kind.endswith("bad-workers") else []
        return ["--dataset", "tiny-imagenet", "--data-root", str(tmp / "tree")] + extra
    if kind == "garbage-idx":
        root = tmp / "garbage"
        root.mkdir()
        for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                  "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                  "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (root / f).write_bytes(b"not an idx file")
        return ["--dataset", "fmnist-real", "--data-root", str(root)]
    if kind == "other-arch":
        _other_arch_weights(tmp / "other.pt")
        return ["--checkpoint", str(tmp / "other.pt")]
    if kind == "evil":
        _evil_pickle(tmp / "evil.pt", tmp / "PWNED")
        return ["--checkpoint", str(tmp / "evil.pt")]
    if kind == "teacher-other-arch":
        _other_arch_weights(run / "squeeze" / "teacher.pt")
        return []
    if kind in ("stats-nan", "stats-corrupt"):
        path = run / "squeeze" / "bn_stats.pt"
        if kind == "stats-corrupt":
            path.write_bytes(b"\x80\x04garbage")
        else:
            payload = torch.load(path, weights_only=True)
            name = f"{payload['layers'][0]}.mean"
            payload["tensors"][name][0, 0] = float("nan")
            torch.save(payload, path)
        return []
    if kind == "images-tampered":
        payload = torch.load(run / "recover" / "images.pt", weights_only=True)
        payload["images"][0, 0, 0, 0] ^= 1
        torch.save(payload, run / "recover" / "images.pt")
        return []
    if kind == "images-evil":
        _evil_pickle(run / "recover" / "images.pt", tmp / "PWNED")
        return []
    if kind == "last-evil":  # a planted resume checkpoint; train.epochs=4 makes the finished run resume
        _evil_pickle(run / "train" / "last.pt", tmp / "PWNED")
        return ["--set", "train.epochs=4"]
    if kind == "recover-ipc3":
        # another image set (3 per class) next to the store made for 2 per class
        shutil.rmtree(run / "recover")
        assert main(["recover", "--out", str(run), *TINY, "--set", "recover.ipc=3"]) == 0
        return ["--set", "recover.ipc=3"]
    if kind == "store-truncated":
        f = run / "relabel" / "label_values.bin"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return []
    if kind in ("store-values-flipped", "store-indices-flipped"):  # 3 flipped bytes: sizes unchanged
        f = run / "relabel" / ("label_values.bin" if kind == "store-values-flipped" else "label_indices.bin")
        data = bytearray(f.read_bytes())
        for i in (0, len(data) // 2, len(data) - 1):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
        return []
    if kind == "tree-no-eval":  # train/<class>/ only
        from PIL import Image

        for c in range(3):
            d = tmp / "tree" / "train" / f"c{c}"
            d.mkdir(parents=True)
            Image.new("L", (8, 8), c).save(d / "a.png")
        return ["--dataset", "imagefolder", "--data-root", str(tmp / "tree")]
    if kind == "store-manifest-corrupt":
        (run / "relabel" / "manifest.json").write_text("{not json")
        return []
    raise AssertionError(kind)


@pytest.mark.parametrize("drop,prepare,command,pattern", [pytest.param(*c[1:], id=c[0]) for c in CLI_CASES])
def test_cli_bad_input_one_line(drop, prepare, command, pattern, finished_run, tmp_path, capsys, monkeypatch) -> None:
    if "--device" in str(pattern) and torch.cuda.is_available() and "no CUDA" in pattern:
        pytest.skip("a CUDA device is present")
    run = _copy(finished_run, tmp_path, drop)
    extra = _prepare(prepare, run, tmp_path, monkeypatch)
    before = _snapshot(run)
    argv = [command, *([a for a in extra if a == "storage"]), "--out", str(run), *TINY,
            *[a for a in extra if a != "storage"]]
    _fails_with_one_line(capsys, argv, pattern)
    assert not (tmp_path / "PWNED").exists(), "a pickled payload was executed"
    after = _snapshot(run)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files changed by a failed command: {changed}"
    if "--set" in extra or prepare in ("store-values-flipped", "store-indices-flipped"):
        # a refused setting or a corrupt store is caught before anything is written
        assert sorted(after) == sorted(before), f"files written by a refused command: {set(after) - set(before)}"


# --------------------------------------------------------------------------- full disk


def _full_disk(monkeypatch, fail_on: Callable[[Path], bool]) -> list[Path]:
    """Every atomic write whose target matches ``fail_on`` writes half its bytes, then hits ENOSPC."""
    real = io_utils.atomic_write_bytes
    hits: list[Path] = []

    def writer(path, data: bytes) -> None:
        path = Path(path)
        if not fail_on(path):
            return real(path, data)
        hits.append(path)
        with io_utils.atomic_path(path) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(io_utils, "atomic_write_bytes", writer)
    import lpqld_fast.report as report

    monkeypatch.setattr(report, "atomic_write_bytes", writer)
    return hits


@pytest.mark.parametrize("command,drop,extra,target", [
    # train resumes from epoch 3 and fails writing epoch 4's metrics: the epoch-3 files stay
    pytest.param("train", (), ["--set", "train.epochs=4"], "train_metrics.json", id="train"),
    # squeeze recomputes the statistics (another stats_mode) and fails writing them
    pytest.param("squeeze", (), ["--set", "squeeze.stats_mode=ema"], "bn_stats.pt", id="squeeze"),
    # recover fails on its first unit file
    pytest.param("recover", ("recover", "relabel", "train"), [], "unit_", id="recover"),
    # relabel fails writing the store's manifest
    pytest.param("relabel", ("relabel", "train"), [], "manifest.json", id="relabel"),
    pytest.param("report", (), ["--no-diversity"], "REPORT.md", id="report"),
])
def test_full_disk_one_line_and_nothing_damaged(command, drop, extra, target, finished_run, tmp_path, capsys,
                                                monkeypatch) -> None:
    run = _copy(finished_run, tmp_path, drop)
    before = _snapshot(run)
    hits = _full_disk(monkeypatch, lambda p: p.name.startswith(target))
    line = _fails_with_one_line(capsys, [command, "--out", str(run), *TINY, *extra],
                                rf"^lpqld {command}: error: \[Errno {errno.ENOSPC}\] No space left on device: ")
    assert hits, "the simulated full disk was never reached"
    after = _snapshot(run)
    if command == "train":  # the resumed run's record (train.epochs=4) is written before its first epoch
        before.pop("train/config.json")
    assert {p: h for p, h in after.items() if p in before} == before, "a file written earlier was damaged"
    assert not [p for p in after if p.endswith(".tmp")], "a temporary file was left behind"
    assert str(hits[0].parent) in line
