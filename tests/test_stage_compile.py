"""The stages' compile setting: its config (values, auto, cudagraphs refused without CUDA), and tiny squeeze,
recover and train runs under compile=compile against the eager run, with the number of captured graphs bounded.

The compiled runs use the aot_eager backend (LPQLD_COMPILE_BACKEND): dynamo's whole-graph capture and AOT
autograd's joint graph, run by eager kernels, in seconds; inductor's code generation takes minutes on this CPU
(the slow test at the end). Graphs are counted with dynamo's ``unique_graphs`` counter after a reset: 0 means
the stage never went through torch.compile (the setting ignored), a count growing with epochs or passes means
recompiles.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from lpqld_fast import config as schema
from lpqld_fast import runtime
from lpqld_fast.cli import main
from lpqld_fast.io_utils import load_tensors

STAGES = ("squeeze", "recover", "train")
TINY = [
    "--set", "squeeze.epochs=1", "--set", "squeeze.batch_size=20", "--set", "squeeze.stats_batch_size=40",
    "--set", "recover.ipc=2", "--set", "recover.iterations=4",
    "--set", "relabel.epochs=3", "--set", "relabel.batch_size=5", "--set", "relabel.k=3",
    # 12 epochs, a new T (cosine from 20) and a new calibrated t_s every epoch: a graph per temperature would
    # pass dynamo's recompile limit (8) and fail
    "--set", "train.epochs=12", "--set", "train.temperature=cosine", "--set", "train.t0=20",
    "--set", "train.eval_every=6",
]
STAGE_ARGS = {"recover": ["--units-at-once", "4"]}  # 10 classes in passes of 4, 4, 2: a smaller last pass


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("stage", STAGES)
def test_compile_values_accepted_and_refused(stage: str) -> None:
    assert schema.defaults(stage)["compile"] == "auto"
    for value in ("auto", "eager", "compile", "cudagraphs"):
        assert schema.parse_override(f"{stage}.compile={value}") == (stage, "compile", value)
    with pytest.raises(ValueError, match=rf"^{stage}.compile must be one of \['auto', 'eager', 'compile', "
                                         r"'cudagraphs'\], got 'jit'$"):
        schema.parse_override(f"{stage}.compile=jit")
    assert "compile" not in schema.defaults("relabel")  # relabel has no compile setting (yet)


@pytest.mark.parametrize("stage", STAGES)
def test_auto_is_eager_on_cpu_with_a_note(stage: str) -> None:
    cfg, notes = schema.resolve_auto(stage, schema.check_section(stage, {}), "cpu")
    assert cfg["compile"] == "eager"
    assert "compile=eager (auto: CPU conv steps gain nothing from torch.compile, measured)" in notes
    # chosen afresh, not as recorded: a rerun of a GPU run with cudagraphs on a CPU goes on eager
    cfg, notes = schema.resolve_auto(stage, schema.check_section(stage, {}), "cpu", recorded={"compile": "cudagraphs"})
    assert cfg["compile"] == "eager"
    # an explicit value is kept
    cfg, _ = schema.resolve_auto(stage, schema.check_section(stage, {"compile": "compile"}), "cpu")
    assert cfg["compile"] == "compile"


def test_auto_on_cuda_is_eager_until_measured() -> None:
    mode, why = runtime.auto_compile("cuda")
    assert mode == "eager" and "gpu_check" in why


@pytest.mark.parametrize("stage", STAGES)
def test_cudagraphs_refused_without_cuda_naming_the_key(stage: str) -> None:
    want = rf"^{stage}\.compile=cudagraphs needs a CUDA device \(CUDA graphs\), got --device cpu"
    with pytest.raises(ValueError, match=want):
        schema.resolve_auto(stage, schema.check_section(stage, {"compile": "cudagraphs"}), "cpu")
    with pytest.raises(ValueError, match=want):
        schema.check_device(stage, {"compile": "cudagraphs"}, "cpu")
    schema.check_device(stage, {"compile": "cudagraphs"}, "cuda")  # the check itself needs no GPU


def test_compile_changes_no_result_setting() -> None:
    """A stage finished eager may be rerun or continued compiled (and the reverse): not a result setting."""
    for stage in STAGES:
        assert schema.fields_of(stage)["compile"].metadata["result"] is False
        old, new = schema.defaults(stage), {**schema.defaults(stage), "compile": "compile"}
        assert schema.result_diff(stage, old, new) == []


def test_compile_step_modes(monkeypatch) -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    assert runtime.compile_step(f, "eager") is f
    calls = []
    real = torch.compile

    def spy(fn, **kwargs):
        calls.append(kwargs)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    monkeypatch.setenv(runtime.COMPILE_BACKEND_ENV, "eager")
    assert torch.equal(runtime.compile_step(f, "compile")(torch.ones(2)), torch.full((2,), 2.0))
    assert calls == [{"fullgraph": True, "backend": "eager"}]
    monkeypatch.delenv(runtime.COMPILE_BACKEND_ENV)
    runtime.compile_step(f, "compile")
    assert calls[-1] == {"fullgraph": True, "backend": "inductor"}
    runtime.compile_step(f, "cudagraphs")  # wrapping only (nothing runs here): CUDA graphs need a GPU
    assert calls[-1] == {"fullgraph": True, "mode": "reduce-overhead"}
    with pytest.raises(ValueError, match="compile mode must be one of"):
        runtime.compile_step(f, "auto")


def test_stage_help_lists_compile(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "train.compile (auto|eager|compile|cudagraphs, default auto)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- stage runs


def _run_stage(stage: str, run: Path, *extra: str) -> int:
    """``stage`` in ``run`` (fashion-mnist preset on the synthetic data); the graphs dynamo captured."""
    torch._dynamo.reset()
    counters.clear()
    assert main([stage, "--out", str(run), *TINY, *STAGE_ARGS.get(stage, []), *extra]) == 0, stage
    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory, synthetic_run_module) -> Path:
    """A whole tiny run with every stage eager (the reference), single-threaded."""
    run = tmp_path_factory.mktemp("stage-compile") / "eager"
    for stage in ("squeeze", "recover", "relabel", "train"):
        graphs = _run_stage(stage, run, *(["--set", f"{stage}.compile=eager"] if stage != "relabel" else []))
        assert graphs == 0, stage  # eager: nothing goes through dynamo
    return run


def _compiled_copy(eager_run: Path, tmp_path: Path, stage: str, monkeypatch,
                   backend: str = "aot_eager") -> tuple[Path, int]:
    """The eager run's stages before ``stage`` copied, then ``stage`` run with compile=compile (``backend``);
    returns the run and the graphs captured."""
    run = tmp_path / "run"
    run.mkdir()
    order = ("squeeze", "recover", "relabel", "train")
    for s in order[:order.index(stage)]:
        shutil.copytree(eager_run / s, run / s)
    shutil.copy(eager_run / "run.json", run / "run.json")
    monkeypatch.setenv(runtime.COMPILE_BACKEND_ENV, backend)
    return run, _run_stage(stage, run, "--set", f"{stage}.compile=compile")


def _close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]) and a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")
        elif torch.is_tensor(a[k]):
            assert torch.equal(b[k], a[k]), k


def _with_presets(fn):
    """Run ``fn()`` with the fashion-mnist preset on the synthetic data, single-threaded."""
    import lpqld_fast.presets as presets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            tiny = presets.get_preset("fashion-mnist")
            tiny["dataset"] = "synthetic"
            mp.setitem(presets.PRESETS, "fashion-mnist", tiny)
            return fn()
    finally:
        torch.set_num_threads(threads)


def test_squeeze_compiled_matches_eager(eager_run: Path, tmp_path: Path, monkeypatch) -> None:
    run, graphs = _with_presets(lambda: _compiled_copy(eager_run, tmp_path, "squeeze", monkeypatch))
    # the teacher step once; the statistics update once, and once more for the smaller last batch (100 = 2x40 + 20)
    assert 2 <= graphs <= 3, graphs
    teacher_e = load_tensors(eager_run / "squeeze" / "teacher.pt", what="teacher")
    teacher_c = load_tensors(run / "squeeze" / "teacher.pt", what="teacher")
    _close(teacher_e, teacher_c, rtol=1e-5, atol=1e-6)
    stats_e = load_tensors(eager_run / "squeeze" / "bn_stats.pt", what="stats")["tensors"]
    stats_c = load_tensors(run / "squeeze" / "bn_stats.pt", what="stats")["tensors"]
    _close(stats_e, stats_c, rtol=1e-5, atol=1e-6)
    assert json.loads((run / "squeeze" / "config.json").read_text())["config"]["squeeze"]["compile"] == "compile"


def test_recover_compiled_matches_eager(eager_run: Path, tmp_path: Path, monkeypatch) -> None:
    run, graphs = _with_presets(lambda: _compiled_copy(eager_run, tmp_path, "recover", monkeypatch))
    # three passes (4, 4, 2 classes) with one compiled function: the first shape, then one dynamic-shape graph
    assert 1 <= graphs <= 2, graphs
    images_e = load_tensors(eager_run / "recover" / "images.pt", what="images")
    images_c = load_tensors(run / "recover" / "images.pt", what="images")
    assert torch.equal(images_c["images"], images_e["images"])  # aot_eager: the eager kernels, bit for bit


def test_train_compiled_matches_eager_and_compiles_once(eager_run: Path, tmp_path: Path, monkeypatch) -> None:
    run, graphs = _with_presets(lambda: _compiled_copy(eager_run, tmp_path, "train", monkeypatch))
    assert graphs == 1  # the student's forward, once for 12 epochs of changing T and t_s
    m_e = json.loads((eager_run / "train" / "train_metrics.json").read_text())
    m_c = json.loads((run / "train" / "train_metrics.json").read_text())
    assert len(m_c["epochs"]) == 12 and len({e["T"] for e in m_c["epochs"]}) == 12
    assert len({e["t_s"] for e in m_c["epochs"]}) > 1
    for e, c in zip(m_e["epochs"], m_c["epochs"]):
        assert c["T"] == e["T"]
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-4, abs=1e-6)
        assert c["t_s"] == pytest.approx(e["t_s"], abs=0.011)  # calibration's grid step is 0.01
    _close(load_tensors(eager_run / "train" / "student.pt", what="student"),
           load_tensors(run / "train" / "student.pt", what="student"), rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_train_compiled_with_inductor_matches_eager(eager_run: Path, tmp_path: Path, monkeypatch) -> None:
    """The default backend (inductor: generated C++ for the student's forward and backward, ~20-60 s of
    compilation on a loaded 2-core CPU). Its fused kernels round differently from eager's and 48 AdamW steps
    amplify that (measured: epoch losses within 0.45% relative, the calibrated t_s equal, test accuracy equal;
    single weights up to 23% apart where Adam normalises near-zero gradients), so the run is compared by its
    training curve, not its weights."""
    run, graphs = _with_presets(lambda: _compiled_copy(eager_run, tmp_path, "train", monkeypatch, "inductor"))
    assert graphs == 1
    m_e = json.loads((eager_run / "train" / "train_metrics.json").read_text())
    m_c = json.loads((run / "train" / "train_metrics.json").read_text())
    for e, c in zip(m_e["epochs"], m_c["epochs"]):
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-2, abs=1e-6)
        assert c["t_s"] == pytest.approx(e["t_s"], abs=0.011)  # calibration's grid step is 0.01
    for e, c in zip(m_e["evals"], m_c["evals"]):
        assert abs(c["test_acc"] - e["test_acc"]) <= 5.0


def test_finished_stage_rerun_in_another_compile_mode_is_accepted(eager_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(eager_run, run)
    before = (run / "train" / "student.pt").read_bytes()
    graphs = _with_presets(lambda: _run_stage("train", run, "--set", "train.compile=compile",
                                              "--set", "squeeze.compile=compile"))
    assert graphs == 0  # finished: nothing left to train, nothing compiled
    assert (run / "train" / "student.pt").read_bytes() == before
