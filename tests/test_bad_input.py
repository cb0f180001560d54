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

import contextlib
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
from lpqld_fast.real_images import select_indices
from lpqld_fast.ops import (
    available_backends,
    batched_roll,
    bn_eval_segment_loss,
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
    ("segbn-backend-cuda", lambda b: segment_bn_loss(_x(), LAB, TM, TV, backend="cuda"), RuntimeError,
     r"^segment_bn_loss: backend 'cuda' cannot run tensors on cpu here \("),
    # bn_eval_segment_loss (its x / segment_ids / target checks are segment_bn_loss's)
    ("bneval-scale-channels", lambda b: bn_eval_segment_loss(_x(), LAB, TM, TV, torch.ones(4), torch.zeros(3),
                                                              backend=b),
     ValueError, r"^scale has 4 channels but x has 3 \(x is \[N, C, \.\.\.\]\)$"),
    ("bneval-shift-nan", lambda b: bn_eval_segment_loss(_x(), LAB, TM, TV, torch.ones(3),
                                                         torch.tensor([0.0, float("nan"), 1.0]), backend=b),
     ValueError, r"^shift contains NaN or inf$"),
    ("bneval-pool", lambda b: bn_eval_segment_loss(_x(), LAB, TM, TV, torch.ones(3), torch.zeros(3), pool=3,
                                                    backend=b),
     ValueError, r"^pool must be 1 \(none\) or 2 \(2x2 average\), got 3$"),
    ("bneval-pool-small", lambda b: bn_eval_segment_loss(torch.randn(4, 3, 1, 5), LAB, TM, TV, torch.ones(3),
                                                          torch.zeros(3), pool=2, backend=b),
     ValueError, r"^pool=2 needs x \[N, C, H, W\] with H, W >= 2, got shape \(4, 3, 1, 5\)$"),
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
    # select_indices (real-image recover, paper 001 baseline): IPC above a class's image count names the class
    ("ipc-larger-than-class", lambda b: select_indices(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]), 3, 3), ValueError,
     r"^ipc=3 exceeds the 2 training images of class 1$"),
    ("ipc-zero", lambda b: select_indices(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]), 3, 0), ValueError,
     r"^ipc must be a positive int, got 0$"),
]

_NATIVE = {"moments": "classwise_moments_accumulate_", "segbn": "segment_bn_loss_fwd", "crop": "crop_resize_flip",
           "kl": "soft_label_kl_fwd", "roll": "batched_roll", "bneval": "segment_bn_loss_fwd"}


# What the docs say about each op case: (op as the user calls it, the bad input in words).
OP_DOC: dict[str, tuple[str, str]] = {
    "moments-x-dtype": ("classwise_moments", "x int64"),
    "moments-x-shape": ("classwise_moments", "x 1-D"),
    "moments-labels-length": ("classwise_moments", "3 labels for 4 samples"),
    "moments-labels-dtype": ("classwise_moments", "labels float32"),
    "moments-labels-device": ("classwise_moments", "labels on another device"),
    "moments-class-id-too-large": ("classwise_moments", "class id 5 with K = 3"),
    "moments-class-id-negative": ("classwise_moments", "class id -1"),
    "moments-no-classes": ("classwise_moments", "num_classes 0"),
    "moments-state-dtype": ("classwise_moments_accumulate_", "count float32"),
    "moments-state-shape": ("classwise_moments_accumulate_", "mean [K, C+1]"),
    "segbn-x-dtype": ("segment_bn_loss", "x int64"),
    "segbn-empty-spatial": ("segment_bn_loss", "empty spatial dim"),
    "segbn-segment-id": ("segment_bn_loss", "segment id 3 with S = 3"),
    "segbn-target-inf": ("segment_bn_loss", "inf in target_mean"),
    "segbn-target-nan": ("segment_bn_loss", "NaN in target_var"),
    "segbn-target-shape": ("segment_bn_loss", "target_var [S, C-1]"),
    "segbn-channels": ("segment_bn_loss", "x with 2 channels, targets 3"),
    "segbn-device": ("segment_bn_loss", "target on another device"),
    "segbn-backend-cuda": ("segment_bn_loss", 'backend "cuda" forced for CPU tensors'),
    "bneval-scale-channels": ("bn_eval_segment_loss", "scale [C+1]"),
    "bneval-shift-nan": ("bn_eval_segment_loss", "NaN in shift"),
    "bneval-pool": ("bn_eval_segment_loss", "pool 3"),
    "bneval-pool-small": ("bn_eval_segment_loss", "pool 2, x [4, 3, 1, 5]"),
    "crop-box-nan": ("crop_resize_flip", "NaN in a box"),
    "crop-box-outside": ("crop_resize_flip", "box value 1.5"),
    "crop-flips-length": ("crop_resize_flip", "1 flip for 2 images"),
    "crop-flips-values": ("crop_resize_flip", "flip value 2"),
    "crop-out-size": ("crop_resize_flip", "out_size (0, 4)"),
    "crop-x-shape": ("crop_resize_flip", "x 3-D"),
    "crop-x-dtype": ("crop_resize_flip", "x int32"),
    "crop-device": ("crop_resize_flip", "boxes on another device"),
    "roll-shift-dtype": ("batched_roll", "float shifts"),
    "roll-shift-shape": ("batched_roll", "shifts [3, 2] for 2 images"),
    "roll-backend": ("batched_roll", 'backend "triton"'),
    "kl-k-larger-than-C": ("soft_label_kl", "k = 11 > C = 10"),
    "kl-class-id-too-large": ("soft_label_kl", "class id 10 with C = 10"),
    "kl-class-id-negative": ("soft_label_kl", "class id -1"),
    "kl-class-twice": ("soft_label_kl", "a class twice in a row"),
    "kl-values-nan": ("soft_label_kl", "NaN in values"),
    "kl-values-inf": ("soft_label_kl", "inf in values (mode ms)"),
    "kl-T-zero": ("soft_label_kl", "T = 0"),
    "kl-t_s-nan": ("soft_label_kl", "t_s = NaN"),
    "kl-mode": ("soft_label_kl", 'mode "topk"'),
    "kl-int8-no-scale": ("soft_label_kl", "int8 values without scale"),
    "kl-index-dtype": ("soft_label_kl", "indices float32"),
    "kl-device": ("soft_label_kl", "indices on another device"),
    "kl-rows": ("soft_label_kl", "1 row of values for B = 2"),
    "kl-mrs-no-fill": ("soft_label_kl", 'mode "mrs" without fill'),
    "calib-empty-grid": ("calibrate_student_temperature", "grid []"),
    "calib-grid-negative": ("calibrate_student_temperature", "grid with -1"),
    "calib-no-samples": ("calibrate_student_temperature", "B = 0"),
    "calib-class-id": ("calibrate_student_temperature", "class id 10 with C = 10"),
    "ipc-larger-than-class": ("select_indices (real-image recover)", "IPC 3, class 1 has 2 images"),
    "ipc-zero": ("select_indices (real-image recover)", "IPC 0"),
}

# What each case printed in this session, for the doc check at the end of this file (scripts/bad_input_doc.py
# turns them into docs/BAD_INPUT.md's tables): ("op", case, backend) -> (exception type, message);
# ("cli" or "disk", case, None) -> (stderr line, the case's tmp directory).
OBSERVED: dict[tuple[str, str, str | None], tuple[str, str]] = {}


def op_backends(case_id: str) -> list[str | None]:
    """The backends a case runs on here: every CPU backend of its op's native kernel, [None] for an op without."""
    op = case_id.split("-")[0]
    return available_backends("cpu", _NATIVE[op]) if op in _NATIVE else [None]


def run_op_case(call, exc, msg, backend) -> BaseException:
    """One op case, as the test and the doc generator run it: the exception, checked against the case."""
    with pytest.raises(exc) as info:
        call(backend)
    assert re.search(msg, str(info.value)), str(info.value)
    assert "\n" not in str(info.value)
    return info.value


def _op_params():
    for case, call, exc, msg in OP_CASES:
        for b in op_backends(case):
            yield pytest.param(case, call, exc, msg, b, id=f"{case}-{b}" if b else case)


@pytest.mark.parametrize("case,call,exc,msg,backend", list(_op_params()))
def test_op_bad_input_message(case, call, exc, msg, backend) -> None:
    err = run_op_case(call, exc, msg, backend)
    OBSERVED["op", case, backend] = (type(err).__name__, str(err))


# Inputs the ops do not check, by design, and what happens instead: (op, input, outcome, the test that shows it).
NOT_CHECKED: list[tuple[str, str, str, str]] = [
    ("classwise_moments", "NaN in x", "no error: NaN in that class's mean/var only, every other entry exact "
     "(not checked: it would cost a pass over x)", "test_moments_nan_stays_in_its_class"),
    ("segment_bn_loss", "NaN in x", "no error: that segment's loss is NaN, the others exact",
     "test_segment_loss_nan_stays_in_its_segment"),
    ("soft_label_kl", "NaN / inf in student logits", "no error: the loss is NaN (never a finite number); logits "
     "come from the model and are not checked", "test_kl_non_finite_logits_give_nan_not_a_number"),
]


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


# =========================================================================== CLI

TINY = [
    "--set", "squeeze.epochs=1", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=50",
    "--set", "recover.ipc=2", "--set", "recover.iterations=3",
    "--set", "relabel.epochs=3", "--set", "relabel.batch_size=5", "--set", "relabel.k=3",
    "--set", "relabel.prune_ratio=0.5",
    "--set", "train.epochs=3", "--set", "train.eval_every=1",
]
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@contextlib.contextmanager
def patched_presets():
    """fashion-mnist -> the small synthetic dataset; "fmnist-real" keeps the real Fashion-MNIST preset."""
    import lpqld_fast.presets as presets

    mp = pytest.MonkeyPatch()
    real = presets.get_preset("fashion-mnist")
    tiny = presets.get_preset("fashion-mnist")
    tiny["dataset"] = "synthetic"
    mp.setitem(presets.PRESETS, "fashion-mnist", tiny)
    mp.setitem(presets.PRESETS, "fmnist-real", real)
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def presets_patched():
    with patched_presets():
        yield


def make_finished_run(root: Path) -> Path:
    """One complete tiny run (squeeze, recover, relabel, train) under ``root`` (presets patched)."""
    run = root / "run"
    for stage in ("squeeze", "recover", "relabel", "train"):
        assert main([stage, "--out", str(run), *TINY]) == 0, stage
    return run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, presets_patched) -> Path:
    """One complete tiny run, copied by each case that needs one."""
    return make_finished_run(tmp_path_factory.mktemp("bad-input"))


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


def _fails_with_one_line(read_err: Callable[[], str], argv: list[str], pattern: str) -> str:
    """Run ``argv``; it must fail with one line on stderr (``read_err()``: stderr since its last call) matching
    ``pattern``. Returns that line."""
    read_err()
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's usage errors exit from parse_args
        rc = e.code
    err = read_err()
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


_HELD_LOCKS: list[int] = []  # descriptors holding a folder's lock for the rest of the session


def _prep_train_in_use(run: Path, tmp: Path) -> list[str]:
    """run/train's lock held as another `lpqld train` process holds it (a second descriptor: flock refuses it
    even within this process)."""
    import fcntl

    path = io_utils.folder_lock_path(run / "train")
    path.parent.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, b"lpqld train (pid 4242)", 0)
    _HELD_LOCKS.append(fd)
    return ["--set", "train.epochs=4"]  # work left to do: without the lock it would train on


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
    ("squeeze-width-on-a-resnet", ("squeeze",),
     lambda r, t: ["--set", "squeeze.model=resnet18-small", "--set", "squeeze.width=64"], "squeeze",
     r"^lpqld squeeze: error: squeeze.width sets a ConvNet teacher's channels; squeeze.model 'resnet18-small' "
     r"has none \(leave squeeze.width unset\)$"),
    ("squeeze-no-gpu", ("squeeze",), lambda r, t: ["--device", "cuda"], "squeeze",
     r"^lpqld squeeze: error: --device 'cuda' but no CUDA device is available here"),
    ("squeeze-bad-device", ("squeeze",), lambda r, t: ["--device", "gpu0"], "squeeze",
     r"^lpqld squeeze: error: --device 'gpu0' is not a device"),
    ("squeeze-usage", (), lambda r, t: ["--seed", "x"], "squeeze",
     r"^lpqld squeeze: error: argument --seed: invalid int value: 'x' \(see lpqld squeeze --help\)$"),
    ("any-malformed-override", ("squeeze",), lambda r, t: ["--set", "bogus=1"], "squeeze",
     r"^lpqld squeeze: error: override must look like stage.key=value, got 'bogus=1'$"),
    # recover
    ("recover-ipc-zero", ("recover",), lambda r, t: ["--set", "recover.ipc=0"], "recover",
     r"^lpqld recover: error: recover.ipc must be a positive int, got 0$"),
    ("recover-unknown-key", ("recover",), lambda r, t: ["--set", "recover.iteration=5"], "recover",
     r"^lpqld recover: error: unknown recover config keys 'iteration' \(did you mean 'iterations'\?\); known: "),
    ("recover-teacher-other-architecture", ("recover",), "teacher-other-arch", "recover",
     r"^lpqld recover: error: teacher checkpoint .*teacher\.pt does not fit model ConvNet"),
    ("recover-stats-nan", ("recover",), "stats-nan", "recover",
     r"^lpqld recover: error: .*bn_stats\.pt: the class-wise mean of BN layer '.*' contains NaN or inf; rerun "
     r"squeeze into a new --out$"),
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
     r"^lpqld relabel: error: relabel.k 11 exceeds the teacher's 10 classes \(label 'mr' stores k of them per sample\)$"),
    ("relabel-batch-larger-than-images", ("relabel",), lambda r, t: ["--set", "relabel.batch_size=500"], "relabel",
     r"^lpqld relabel: error: relabel.batch_size 500 exceeds the 20 distilled images$"),
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
     r"^lpqld relabel: error: .*/relabel already holds a label store made with other settings \(relabel.k 3 -> 4\); "
     r"use another --out, or delete it to relabel$"),
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
    ("train-folder-in-use", (), _prep_train_in_use, "train",
     r"^lpqld train: error: .*/train is in use: lpqld train \(pid 4242\) is writing into it; wait for it to finish "
     r"or give another output folder$"),
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
    ("any-compile-not-a-choice", ALL_STAGES, lambda r, t: ["--set", "recover.compile=jit"], "distill",
     r"^lpqld distill: error: recover.compile must be one of \['auto', 'eager', 'compile', 'cudagraphs'\], "
     r"got 'jit'$"),
    ("any-cudagraphs-on-cpu", ALL_STAGES, lambda r, t: ["--set", "train.compile=cudagraphs"], "distill",
     r"^lpqld distill: error: train.compile=cudagraphs needs a CUDA device \(CUDA graphs\), got --device cpu; "
     r"use train.compile=compile or eager$"),
    # distill, report
    ("distill-missing-dataset", ALL_STAGES, "fmnist-env-missing", "distill",
     r"^lpqld distill: error: .*nowhere"),
    ("train-data-root-synthetic", (), lambda r, t: ["--data-root", str(t)], "train",
     r"^lpqld train: error: .*/run holds a run on data root the dataset's default location, not '.*'; continue it without --data-root, "
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


# What the docs say about each CLI case: (the bad input in words, a note after the message or "").
CLI_DOC: dict[str, tuple[str, str]] = {
    "squeeze-missing-dataset": ("Fashion-MNIST directory missing", ""),
    "squeeze-unreadable-dataset": ("dataset files unreadable (not IDX)", ""),
    "squeeze-missing-imagefolder": ("image folder missing", ""),
    "squeeze-imagefolder-bad-workers": ("`tiny-imagenet` tree (200 classes), no teacher yet, "
                                        "`--set squeeze.train_workers=-1`", ""),
    "squeeze-imagefolder-class-count": ("`tiny-imagenet` tree with 3 class folders", ""),
    "squeeze-checkpoint-missing": ("`--checkpoint` missing", ""),
    "squeeze-checkpoint-other-architecture": ("`--checkpoint` of another architecture", ""),
    "squeeze-checkpoint-pickle": ("`--checkpoint` is a malicious pickle", "the payload does not run"),
    "squeeze-batch-size-zero": ("`squeeze.batch_size=0`", ""),
    "squeeze-batch-larger-than-dataset": ("batch larger than the dataset", ""),
    "squeeze-lr-not-a-number": ("`squeeze.lr=abc`", ""),
    "squeeze-unknown-key": ("a misspelt key `--set squeeze.epoch=2`", ""),
    "squeeze-width-on-a-resnet": ("`squeeze.width=64` with `squeeze.model=resnet18-small`", ""),
    "squeeze-no-gpu": ("`--device cuda` without a GPU", "not run on a host with a GPU"),
    "squeeze-bad-device": ("`--device gpu0`", ""),
    "squeeze-usage": ("a usage error (`--seed x`)", ""),
    "any-malformed-override": ("`--set bogus=1` (no stage)", ""),
    "recover-ipc-zero": ("`recover.ipc=0`", ""),
    "recover-unknown-key": ("a misspelt key `--set recover.iteration=5`", ""),
    "recover-teacher-other-architecture": ("squeeze/teacher.pt of another architecture", ""),
    "recover-stats-nan": ("NaN in bn_stats.pt", ""),
    "recover-stats-corrupt": ("bn_stats.pt corrupt", ""),
    "recover-no-squeeze": ("no squeeze output", ""),
    "recover-ipc-fraction": ("`recover.ipc=2.7`", ""),
    "recover-ipc-not-a-number": ("`recover.ipc=abc`", ""),
    "recover-ipc-too-large-for-memory": ("`recover.ipc=1000000000000`", "the available memory is the machine's"),
    "recover-changed-setting": ("a finished recover rerun with `recover.iterations=4`", ""),
    "relabel-prune-ratio-one": ("`relabel.prune_ratio=1.0`", ""),
    "relabel-prune-ratio-negative": ("`relabel.prune_ratio=-0.1`", ""),
    "relabel-prune-ratio-nan": ("`relabel.prune_ratio=nan`", ""),
    "relabel-k-larger-than-C": ("`relabel.k=11` with 10 classes", ""),
    "relabel-batch-larger-than-images": ("batch larger than the image set", ""),
    "relabel-images-tampered": ("images.pt modified", ""),
    "relabel-images-pickle": ("images.pt is a malicious pickle", "the payload does not run"),
    "relabel-no-recover": ("no recover output", ""),
    "relabel-store-too-large-for-disk": ("`relabel.epochs=1000000000000`", "the free space is the machine's"),
    "relabel-changed-setting": ("a finished store rerun with `relabel.k=4`", ""),
    "train-image-set-does-not-match-store": ("image set (3/class) does not match the store (made for 2/class)", ""),
    "train-resume-other-architecture": ("`train.model` changed on a started run",
                                        "a run without train/config.json: `train resume checkpoint … does not fit "
                                        "train.model=…`"),
    "train-resume-checkpoint-pickle": ("train/last.pt is a malicious pickle", "the payload does not run"),
    "train-store-truncated": ("label store file truncated", ""),
    "train-store-manifest-corrupt": ("store manifest not JSON", ""),
    "train-no-store": ("no label store", ""),
    "train-batch-size-differs": ("`train.batch_size` differs from the store", ""),
    "train-epochs-zero": ("`train.epochs=0`", ""),
    "train-lr-not-a-number": ("`train.lr=abc`", ""),
    "train-store-values-corrupt": ("3 bytes flipped in label_values.bin (sizes intact)",
                                   "nothing written: every file is hashed before the first step"),
    "train-store-indices-corrupt": ("3 bytes flipped in label_indices.bin", ""),
    "train-changed-setting": ("`train.lr=0.01` on a finished run", ""),
    "train-folder-in-use": ("a second `lpqld train` on a folder another one is writing",
                            "any stage, or a script calling the stage functions; one machine"),
    "train-epochs-lowered": ("`train.epochs=2` on a run finished at 3", "raising it trains on from the last epoch"),
    "squeeze-changed-setting": ("`squeeze.lr=0.2` on a trained teacher",
                                "statistics settings may change: the statistics are recomputed"),
    "squeeze-other-dataset": ("`--dataset fmnist-real` (Fashion-MNIST) on a run made on synthetic data", ""),
    "any-unknown-dataset": ("`--dataset cifar10`", "`fmnist-real` is the tests' extra preset (the real "
                            "Fashion-MNIST); users do not see it"),
    "squeeze-imagefolder-no-eval-split": ("`--dataset imagefolder` on a tree without val/ or test/", ""),
    "any-bf16-not-a-choice": ("`train.bf16=yes`", "every section is validated before the first stage starts"),
    "any-compile-not-a-choice": ("`recover.compile=jit`", ""),
    "any-cudagraphs-on-cpu": ("`train.compile=cudagraphs` with `--device cpu`",
                              "every stage's device settings are checked before the first stage starts"),
    "distill-missing-dataset": ("dataset missing", ""),
    "train-data-root-synthetic": ("`--data-root DIR` on a run recorded without one", ""),
    "train-data-root-missing": ("`--dataset fmnist-real --data-root DIR` on a run made on synthetic data", ""),
    "report-no-run": ("no run", ""),
    "report-storage-no-store": ("`report storage` without a label store", ""),
}

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


def cli_case_skipped(case_id: str) -> str | None:
    """Why a CLI case cannot run here (None: it runs)."""
    if case_id == "squeeze-no-gpu" and torch.cuda.is_available():
        return "a CUDA device is present"
    return None


def run_cli_case(case, finished_run: Path, tmp_path: Path, monkeypatch, read_err: Callable[[], str]) -> str:
    """One CLI case, as the test and the doc generator run it: the stderr line, after every check of the case."""
    _, drop, prepare, command, pattern = case
    run = _copy(finished_run, tmp_path, drop)
    extra = _prepare(prepare, run, tmp_path, monkeypatch)
    before = _snapshot(run)
    argv = [command, *([a for a in extra if a == "storage"]), "--out", str(run), *TINY,
            *[a for a in extra if a != "storage"]]
    line = _fails_with_one_line(read_err, argv, pattern)
    assert not (tmp_path / "PWNED").exists(), "a pickled payload was executed"
    after = _snapshot(run)
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"files changed by a failed command: {changed}"
    if "--set" in extra or prepare in ("store-values-flipped", "store-indices-flipped"):
        # a refused setting or a corrupt store is caught before anything is written
        assert sorted(after) == sorted(before), f"files written by a refused command: {set(after) - set(before)}"
    return line


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in CLI_CASES])
def test_cli_bad_input_one_line(case, finished_run, tmp_path, capsys, monkeypatch) -> None:
    if reason := cli_case_skipped(case[0]):
        pytest.skip(reason)
    line = run_cli_case(case, finished_run, tmp_path, monkeypatch, lambda: capsys.readouterr().err)
    OBSERVED["cli", case[0], None] = (line, str(tmp_path))


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


# Each case: (id, command, stages to drop from the copied run, extra argv, name of the write that fails,
#             the situation in words, the failing write in words)
FULL_DISK_CASES: list[tuple[str, str, tuple[str, ...], list[str], str, str, str]] = [
    ("train", "train", (), ["--set", "train.epochs=4"], "train_metrics.json",
     "resumes a 3-epoch run to 4 epochs", "train_metrics.json of epoch 4 (last.pt, student.pt of epoch 3 intact; "
     "config.json already records train.epochs=4)"),
    ("squeeze", "squeeze", (), ["--set", "squeeze.stats_mode=ema"], "bn_stats.pt",
     "recomputes the statistics (`squeeze.stats_mode=ema`)", "bn_stats.pt (the old statistics, metrics and "
     "config.json intact)"),
    ("recover", "recover", ("recover", "relabel", "train"), [], "unit_", "fresh recover", "its first unit file"),
    ("relabel", "relabel", ("relabel", "train"), [], "manifest.json", "fresh store", "the store's manifest.json"),
    ("report", "report", (), ["--no-diversity"], "REPORT.md", "a finished run", "REPORT.md"),
]


def run_full_disk_case(case, finished_run: Path, tmp_path: Path, monkeypatch, read_err: Callable[[], str]) -> str:
    """One full-disk case, as the test and the doc generator run it: the stderr line, after every check."""
    _, command, drop, extra, target = case[:5]
    run = _copy(finished_run, tmp_path, drop)
    before = _snapshot(run)
    hits = _full_disk(monkeypatch, lambda p: p.name.startswith(target))
    line = _fails_with_one_line(read_err, [command, "--out", str(run), *TINY, *extra],
                                rf"^lpqld {command}: error: \[Errno {errno.ENOSPC}\] No space left on device: ")
    assert hits, "the simulated full disk was never reached"
    after = _snapshot(run)
    if command == "train":  # the resumed run's record (train.epochs=4) is written before its first epoch
        before.pop("train/config.json")
    assert {p: h for p, h in after.items() if p in before} == before, "a file written earlier was damaged"
    assert not [p for p in after if p.endswith(".tmp")], "a temporary file was left behind"
    assert str(hits[0].parent) in line
    return line


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in FULL_DISK_CASES])
def test_full_disk_one_line_and_nothing_damaged(case, finished_run, tmp_path, capsys, monkeypatch) -> None:
    line = run_full_disk_case(case, finished_run, tmp_path, monkeypatch, lambda: capsys.readouterr().err)
    OBSERVED["disk", case[0], None] = (line, str(tmp_path))


# =========================================================================== docs/BAD_INPUT.md


def test_doc_tables_match_what_the_cases_print() -> None:
    """docs/BAD_INPUT.md's tables equal scripts/bad_input_doc.py's rendering of the cases above, with the messages
    this session's tests printed (cases that did not run here, e.g. with -k or on a host without a backend, keep
    the doc's entry). Runs last in this file; regenerate with ``python scripts/bad_input_doc.py``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bad_input_doc.py"
    spec = importlib.util.spec_from_file_location("bad_input_doc", path)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    problem = gen.check(OBSERVED)
    assert problem is None, problem
