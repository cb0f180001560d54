"""The config schema: every stage setting with its type, default and meaning, written once.

A run's config is a dict ``{"dataset": ..., "data_root": ..., "squeeze": {...}, "recover": {...},
"relabel": {...}, "train": {...}, "runtime": {...}}``. Each section is declared below as a dataclass whose
fields carry the default and, in their metadata, the kind of value, its bounds and a one-line meaning.
Presets (lpqld_fast.presets) are overrides of these defaults; ``--set section.key=value`` is parsed by the
field's kind (``recover.ipc=2.7`` is refused, not truncated); :func:`check_section` validates a section
given as a dict (a preset, a library caller's dict) and fills in the defaults.

Fields that accept ``auto`` (bf16, channels_last, loader workers, threads, compile) are chosen by the hardware
at the start of each stage (:func:`resolve_auto`, lpqld_fast.runtime) and recorded resolved.

The module is kept whole (about 550 lines, a third of them the fields' declarations and help texts): a
setting's declaration, parsing, checks and help are read together when one is added.

``result=False`` marks settings that do not change a stage's output (layout, workers, checkpoint
frequency, compile mode): they may differ when a stage is rerun on an existing folder; any other difference is refused
(:func:`result_diff`), except where a stage defines what the change means (train.epochs raised).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lpqld_fast import distributed, runtime
from lpqld_fast.models import MODEL_NAMES as _MODELS
from lpqld_fast.models import TEACHER_MODEL_NAMES as _TEACHERS
from lpqld_fast.store.quantize import MODES as _LABEL_MODES
from lpqld_fast.store.quantize import VALUE_DTYPES as _VALUE_DTYPES

AUTO = "auto"
SECTIONS = ("squeeze", "recover", "relabel", "train", "runtime")
# Top-level keys: what the run reads (settable with --dataset/--data-root or --set dataset=...).
TOP_LEVEL = ("dataset", "data_root")

_OPTIMIZERS = ("sgd", "adamw", "adam")  # engine.build_optimizer
_COMPILE = (AUTO, *runtime.COMPILE_MODES)


def _compile_opt(step: str) -> Any:
    """The ``compile`` setting of a stage whose per-step function is ``step``.

    result=False: torch.compile computes the same function; its generated kernels differ from eager only in
    float rounding (like channels_last), so a finished or killed stage may be continued in another mode.
    """
    return opt(AUTO, f"capture {step}: eager, compile (torch.compile), cudagraphs (torch.compile "
               "reduce-overhead, CUDA only) or auto (eager: no measured win yet, see README)", "choice",
               choices=_COMPILE, result=False)


def opt(default: Any, help: str, kind: str, *, lo: float | None = None, hi: float | None = None,
        lo_open: bool = False, hi_open: bool = False, choices: tuple[str, ...] | None = None,
        result: bool = True, note: str = "") -> Any:
    """A schema field: ``kind`` is one of int, float, bool, choice, pair, auto_bool, auto_int, opt_int,
    opt_bool, size, str, float_or_teacher; ``lo``/``hi`` bound numbers (open ends with ``*_open``)."""
    meta = {"help": help, "kind": kind, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "choices": choices, "result": result, "note": note}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class SqueezeConfig:
    """Teacher training (or loading) and the class-wise BN statistics pass."""

    model: str = opt("convnet-bn", "teacher architecture (with BatchNorm)", "choice", choices=_TEACHERS)
    width: Any = opt(None, "ConvNet teacher channels (default: the architecture's 128; convnet models only)",
                     "opt_int", lo=1)
    epochs: int = opt(5, "teacher training epochs", "int", lo=1)
    batch_size: int = opt(256, "teacher training batch size", "int", lo=1)
    optimizer: str = opt("sgd", "teacher optimizer", "choice", choices=_OPTIMIZERS)
    lr: float = opt(0.1, "teacher peak learning rate (warmup, then cosine to 0)", "float", lo=0)
    momentum: float = opt(0.9, "SGD momentum", "float", lo=0)
    nesterov: bool = opt(False, "Nesterov momentum", "bool")
    weight_decay: float = opt(0.0, "weight decay (not on BN and bias parameters)", "float", lo=0)
    warmup_epochs: int = opt(0, "linear warmup epochs", "int", lo=0)
    label_smoothing: float = opt(0.0, "label smoothing of the teacher's cross-entropy", "float", lo=0)
    augment: str = opt("crop-flip", "in-memory datasets: crop-flip (padded random crop + flip) or none; "
                       "rrc-flip is the folder transform", "choice", choices=("crop-flip", "rrc-flip", "none"))
    crop_pad: int = opt(2, "padding of the random crop (crop-flip)", "int", lo=0)
    bf16: Any = opt(AUTO, "bf16 autocast (auto: on where the device computes bf16 natively)", "auto_bool")
    channels_last: Any = opt(AUTO, "NHWC model and inputs (auto: on; the fast conv layout on CPU and GPU)",
                             "auto_bool", result=False)
    checkpoint_required: bool = opt(False, "refuse to train: the preset needs --checkpoint", "bool", result=False)
    # Beyond the papers (EDC: several teachers for relabelling): the stored labels are the mean logits of all
    # teachers, so the store's size does not change. Recovery and its BN statistics use the first teacher only.
    teachers: int = opt(1, "teachers trained; relabel stores the mean of their logits (the first, seed --seed, "
                        "gives recover its BN statistics; the others are members/<i>/teacher.pt)", "int", lo=1)
    stats_mode: str = opt("exact", "class-wise statistics: exact (float64 sums) or ema", "choice",
                          choices=("exact", "ema"))
    stats_momentum: float = opt(0.1, "EMA momentum of the statistics (stats_mode=ema)", "float", lo=0, hi=1)
    stats_batch_size: int = opt(500, "batch size of the statistics pass", "int", lo=1)
    stats_workers: Any = opt(AUTO, "loader workers of the statistics pass on a folder tree (auto: by cores)",
                             "auto_int", lo=0, result=False)
    train_workers: Any = opt(AUTO, "loader workers of teacher training on a folder tree (auto: by cores)",
                             "auto_int", lo=0, result=False)
    compile: str = _compile_opt("the teacher's training step (forward + loss) and the statistics update")


@dataclass(frozen=True)
class RecoverConfig:
    """Synthesis of IPC images per class from the teacher (LPLD Eq. 6)."""

    ipc: int = opt(10, "images per class", "int", lo=1)
    iterations: int = opt(1000, "optimisation steps per unit", "int", lo=1)
    lr: float = opt(0.1, "Adam learning rate on normalised pixels (cosine to 0)", "float", lo=0, lo_open=True)
    r_bn: float = opt(0.05, "weight of the BN-statistics loss", "float", lo=0)
    first_bn_mult: float = opt(10.0, "extra weight of the first BN layer's loss", "float", lo=0)
    jitter: int = opt(0, "random shift (pixels) before each crop", "int", lo=0)
    normalize_input: bool = opt(True, "optimise normalised pixels (false: raw [0, 1] scale)", "bool")
    crop_scale: list = opt([0.08, 1.0], "RandomResizedCrop area range of the synthesis crops", "pair")
    classwise_batching: bool = opt(True, "a unit is one class's IPC images (false: SRe2L batching)", "bool")
    classwise_supervision: bool = opt(True, "class-wise BN targets (false: the teacher's global statistics)",
                                      "bool")
    init: str = opt("noise", "initial images: noise (randn) or real (random training images of each image's "
                    "class, picked as the paper-001 baseline picks them)", "choice", choices=("noise", "real"))
    select: str = opt("none", "none: synthesise (the papers); random / herding / herding-2x2 / ce-easiest: select "
                      "IPC real training images per class instead (herding on the teacher's features covers each "
                      "class; herding-2x2 tiles 4 herded images at half size into each; no synthesis, same image "
                      "storage)", "choice", choices=("none", "random", "herding", "herding-2x2", "ce-easiest"))
    # Opt-in (not auto): 3x faster passes, but 1.2 points of student accuracy lost in one measured pair
    # (docs/RESULTS.md).
    bf16: Any = opt(False, "bf16 autocast of the teacher passes (auto: where native)", "auto_bool")
    channels_last: Any = opt(AUTO, "NHWC teacher (rounding-level differences only)", "auto_bool", result=False)
    # 100 iterations: ~80 s of the Fashion-MNIST pass on 2 loaded cores
    checkpoint_every: int = opt(100, "iterations between pass checkpoints (0 = off)", "int", lo=0, result=False)
    compile: str = _compile_opt("the iteration's augmentation, teacher forward and loss")


@dataclass(frozen=True)
class RelabelConfig:
    """Stored augmentations + pruned, quantised teacher labels (the label store)."""

    epochs: int = opt(300, "stored epochs of augmented batches", "int", lo=1)
    batch_size: int = opt(50, "images per stored batch (the student's batch size)", "int", lo=1)
    prune_ratio: float = opt(0.0, "fraction of the batches dropped", "float", lo=0, hi=1, hi_open=True)
    label: str = opt("mr", "label encoding (alias: mode)", "choice", choices=_LABEL_MODES)
    k: int = opt(10, "classes kept per label (top-k)", "int", lo=1)
    value_dtype: str = opt("fp16", "storage dtype of the label values", "choice", choices=_VALUE_DTYPES)
    temperature: float = opt(1.0, "temperature of the stored probabilities (ms, topk_norenorm)", "float", lo=0,
                             lo_open=True, hi=math.inf, hi_open=True)
    # Beyond the papers (RDED and CDA choose crops by the teacher's confidence). The scoring pass runs the
    # teacher on every candidate batch, which pruning otherwise avoids: cheap on small sets, not on ImageNet.
    keep: str = opt("random", "which batches pruning keeps: random (the papers), or the K with the highest "
                    "(confident) or lowest (uncertain) mean teacher max-probability, scored over every batch",
                    "choice", choices=("random", "confident", "uncertain"))
    cutmix: bool = opt(False, "CutMix on the stored batches", "bool")
    cutout: bool = opt(False, "Cutout on the stored batches", "bool")
    cutout_factor: float = opt(0.5, "Cutout side as a fraction of the image side", "float", lo=0, lo_open=True,
                               hi=1)
    flip: Any = opt(None, "horizontal flips (default: on unless cutout)", "opt_bool")
    rrc_scale: list = opt([0.08, 1.0], "RandomResizedCrop area range", "pair")
    rrc_ratio: list = opt([3 / 4, 4 / 3], "RandomResizedCrop aspect-ratio range", "pair")
    out_size: Any = opt(None, "stored crop size, int or [h, w] (default: the image size)", "size")
    num_classes: Any = opt(None, "classes of the teacher (default: the dataset's)", "opt_int")


@dataclass(frozen=True)
class TrainConfig:
    """The student trained on the distilled images and stored labels."""

    model: str = opt("convnet-bn", "student architecture (convnet-in: instance norm, the DC/MTT/KIP evaluation "
                     "ConvNet)", "choice", choices=_MODELS)
    epochs: int = opt(300, "training epochs (raising it on a finished run trains on)", "int", lo=1)
    optimizer: str = opt("adamw", "student optimizer", "choice", choices=_OPTIMIZERS)
    lr: float = opt(1e-3, "peak learning rate (warmup, then cosine to 0)", "float", lo=0)
    weight_decay: float = opt(0.01, "weight decay", "float", lo=0)
    momentum: float = opt(0.9, "SGD momentum", "float", lo=0)
    warmup_epochs: int = opt(0, "linear warmup epochs", "int", lo=0)
    pool: str = opt("lpqld", "which stored batches each epoch replays", "choice", choices=("epoch", "lpld", "lpqld"))
    temperature: str = opt("step", "teacher temperature schedule", "choice", choices=("step", "cosine", "constant"))
    t0: float = opt(20.0, "initial teacher temperature", "float", lo=0)
    t_decay: float = opt(0.7, "step schedule: factor per step", "float", lo=0)
    t_step: int = opt(30, "step schedule: epochs per step", "int", lo=1)
    t_floor: float = opt(2.0, "lowest teacher temperature", "float", lo=0)
    calibrate: bool = opt(True, "fit the student temperature every epoch (calibrated alignment)", "bool")
    student_t: Any = opt(1.0, "student temperature when not calibrated: a number, or teacher (= T(e))",
                         "float_or_teacher")
    calibrate_batches: int = opt(1, "last mini-batches the calibration uses", "int", lo=1)
    t2_scale: bool = opt(False, "multiply the KL loss by T^2", "bool")
    ema: float = opt(0.0, "decay per step of an average of the student's weights (0 = off; step n uses at most "
                     "(1+n)/(10+n)); evaluations and student.pt then use the averaged weights", "float", lo=0, hi=1,
                     hi_open=True)
    hard_labels: bool = opt(False, "baseline: one-hot labels of the replayed images, stored labels ignored", "bool")
    # Under heavy pruning the student replays a few hundred stored crops; mixing pairs of them every step makes
    # each step's input new at no storage cost. The target (and calibration's) is the same mix of the two stored
    # labels (the loss is linear in the target), which approximates the teacher's label of the mixed image
    # (relabel.cutmix stores the exact one, at the cost of storing it).
    mix: str = opt("none", "student-side mixing of each replayed batch with a permutation of itself, the loss "
                   "the same mix of the two stored labels", "choice",
                   choices=("none", "cutmix", "mixup"))
    eval_every: int = opt(25, "epochs between evaluations (and the last)", "int", lo=1, result=False)
    # A test pass costs more than the training between two evaluations at small IPC (10,000 test images
    # against 25 epochs x 100 replayed ones): "selected" evaluates the validation split at each evaluation and
    # the test split only for the weights selection keeps and the last ones, which gives the same selected
    # and last accuracies. It changes what train_metrics.json records (no test curve, no best-of-test), so
    # a run cannot switch mid-way: the weights of earlier evaluations would be gone.
    test_eval: str = opt("every", "every: the test split at each evaluation; selected: validation at each, the "
                         "test split for the selected and the last weights only (needs val_size > 0)", "choice",
                         choices=("every", "selected"))
    test_subset: int = opt(0, "evaluate on a fixed class-balanced subset of this many test images", "int", lo=0,
                           note=" (0 = the whole test split)")
    # The student never sees real images, so a fixed split of them (seed 0) can choose the reported evaluation.
    val_size: int = opt(1000, "model selection: a class-balanced split of this many real training images; the "
                        "reported accuracy is the test accuracy at the best validation evaluation", "int", lo=0,
                        note=" (0, or a streamed tree: the last evaluation)", result=False)
    checkpoint_every: int = opt(10, "epochs between resume checkpoints", "int", lo=1, result=False)
    bf16: Any = opt(AUTO, "bf16 autocast (auto: on where the device computes bf16 natively)", "auto_bool")
    channels_last: Any = opt(AUTO, "NHWC student and inputs (auto: on)", "auto_bool", result=False)
    batch_size: Any = opt(None, "must equal the label store's batch size (default: the store's)", "opt_int",
                          result=False)
    # Only the student's forward is captured: the loss takes the temperatures T(e) and the calibrated t_s as
    # floats, which torch.compile would specialise on (a recompile per epoch, then a failure at dynamo's limit).
    compile: str = _compile_opt("the student's forward")


@dataclass(frozen=True)
class RuntimeConfig:
    """Process-wide settings."""

    threads: Any = opt(AUTO, "CPU threads (auto: OMP_NUM_THREADS, else the CPUs this process may use)",
                       "auto_int", lo=1, result=False)


SCHEMA: dict[str, type] = {"squeeze": SqueezeConfig, "recover": RecoverConfig, "relabel": RelabelConfig,
                           "train": TrainConfig, "runtime": RuntimeConfig}
_ALIASES = {"relabel": {"mode": "label"}}


def fields_of(section: str) -> dict[str, dataclasses.Field]:
    if section not in SCHEMA:
        raise ValueError(f"unknown config section {section!r}; sections: {list(SECTIONS)}")
    return {f.name: f for f in dataclasses.fields(SCHEMA[section])}


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else copy.deepcopy(f.default)


def defaults(section: str) -> dict[str, Any]:
    """Every key of ``section`` with its default."""
    return {name: _default(f) for name, f in fields_of(section).items()}


def default_config() -> dict[str, Any]:
    """A whole config of defaults (no dataset chosen)."""
    return {"dataset": None, "data_root": None, **{s: defaults(s) for s in SECTIONS}}


# ----------------------------------------------------------------------------- validation


def _range_text(m: Mapping[str, Any]) -> str:
    lo, hi = m["lo"], m["hi"]
    if hi is None:
        return f"a number {'>' if m['lo_open'] else '>='} {lo:g}" if lo is not None else "a number"
    if hi == math.inf:
        return "a positive number" if lo == 0 and m["lo_open"] else f"a finite number >= {lo:g}"
    return f"a number in {'(' if m['lo_open'] else '['}{lo:g}, {hi:g}{')' if m['hi_open'] else ']'}"


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_float(key: str, v: Any, m: Mapping[str, Any]) -> float:
    ok = _is_number(v) and not math.isnan(float(v))
    if ok:
        x = float(v)
        lo, hi = m["lo"], m["hi"]
        if lo is not None and (x < lo or (m["lo_open"] and x == lo)):
            ok = False
        if hi is not None and (x > hi or (m["hi_open"] and x == hi)):
            ok = False
        if hi is None and math.isinf(x):
            ok = ok and lo is None
    if not ok:
        raise ValueError(f"{key} must be {_range_text(m)}, got {v!r}")
    return float(v)


def _check_int(key: str, v: Any, m: Mapping[str, Any], what: str = "") -> int:
    lo = m["lo"]
    if not _is_int(v) or (lo is not None and v < lo):
        kind = "a positive int" if lo == 1 else f"an int >= {lo:g}" if lo is not None else "an int"
        raise ValueError(f"{key} must be {kind}{what}{m['note']}, got {v!r}")
    return int(v)


def check_value(section: str, key: str, v: Any) -> Any:
    """``v`` as the field ``section.key`` stores it, or a ValueError naming the key and the problem."""
    f = fields_of(section)[key]
    m = f.metadata
    kind = m["kind"]
    name = f"{section}.{key}"
    if kind == "int":
        return _check_int(name, v, m)
    if kind == "float":
        return _check_float(name, v, m)
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be true or false, got {v!r}")
        return v
    if kind == "opt_bool":
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{name} must be true, false or none, got {v!r}")
        return v
    if kind == "auto_bool":
        if v != AUTO and not isinstance(v, bool):
            raise ValueError(f"{name} must be true, false or auto, got {v!r}")
        return v
    if kind == "auto_int":
        return v if v == AUTO else _check_int(name, v, m, " or auto")
    if kind == "opt_int":
        return None if v is None else _check_int(name, v, m, " or none")
    if kind == "choice":
        if v not in m["choices"]:
            raise ValueError(f"{name} must be one of {list(m['choices'])}, got {v!r}")
        return v
    if kind == "str":
        if not isinstance(v, str):
            raise ValueError(f"{name} must be a string, got {v!r}")
        return v
    if kind == "pair":
        try:
            a, b = (float(x) for x in v)
            ok = not any(isinstance(x, bool) or isinstance(x, str) for x in v)
        except (TypeError, ValueError):
            ok = False
        if not ok or not (0 < a <= b) or math.isinf(b):
            raise ValueError(f"{name} must be a pair of numbers lo,hi with 0 < lo <= hi, got {v!r}")
        return [a, b]
    if kind == "size":
        if v is None:
            return None
        s = [v, v] if _is_int(v) else v
        if not isinstance(s, (list, tuple)) or len(s) != 2 or not all(_is_int(x) and x >= 1 for x in s):
            raise ValueError(f"{name} must be a positive int or [height, width], got {v!r}")
        return [int(x) for x in s]
    if kind == "float_or_teacher":
        if v == "teacher":
            return v
        if not _is_number(v) or not float(v) > 0 or math.isinf(float(v)):
            raise ValueError(f"{name} must be a positive number or teacher, got {v!r}")
        return float(v)
    raise AssertionError(kind)


def check_section(section: str, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """A new dict: ``cfg`` validated key by key, aliases resolved and every missing key set to its default.

    Unknown keys are refused (a typo must not be silently ignored), with the closest known key.
    """
    known = fields_of(section)
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"config section {section!r} must be a mapping of settings, got {type(cfg).__name__}")
    cfg = dict(cfg)
    for alias, key in _ALIASES.get(section, {}).items():
        if alias in cfg:
            v = cfg.pop(alias)
            if key in cfg and cfg[key] != v:
                raise ValueError(f"{section} config has both {key}={cfg[key]!r} and {alias}={v!r}")
            cfg[key] = v
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, n=1)) else repr(u)
                 for u in unknown]
        raise ValueError(f"unknown {section} config keys {', '.join(hints)}; known: {sorted(known)}")
    out = {}
    for key, f in known.items():
        out[key] = check_value(section, key, cfg[key]) if key in cfg else _default(f)
    if section == "train" and out["mix"] != "none" and out["hard_labels"]:
        raise ValueError(f"train.mix={out['mix']} mixes stored soft labels; train.hard_labels=true ignores them")
    return out


def check_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A whole config validated: every section filled with defaults; other top-level entries kept."""
    out = dict(config)
    for section in SECTIONS:
        out[section] = check_section(section, config.get(section))
    if out["squeeze"]["width"] is not None and not out["squeeze"]["model"].startswith("convnet"):
        raise ValueError(f"squeeze.width sets a ConvNet teacher's channels; squeeze.model "
                         f"{out['squeeze']['model']!r} has none (leave squeeze.width unset)")
    if out["recover"]["select"] != "none" and out["recover"]["init"] != "noise":
        raise ValueError(f"recover.select={out['recover']['select']!r} selects real images without synthesis; "
                         f"recover.init={out['recover']['init']!r} only applies to synthesis (leave it 'noise')")
    for key in TOP_LEVEL:
        v = out.get(key)
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{key} must be a string, got {v!r}")
    return out


# ----------------------------------------------------------------------------- --set parsing


def _parse_text(name: str, kind: str, text: str) -> Any:
    """The value of ``--set name=text`` for a field of ``kind`` (validated afterwards by check_value)."""
    t = text.strip()
    low = t.lower()
    if kind in ("opt_int", "opt_bool", "size") and low in ("none", "null"):
        return None
    if kind in ("auto_bool", "auto_int") and low == AUTO:
        return AUTO
    if kind in ("bool", "opt_bool", "auto_bool"):
        if low in ("true", "false"):
            return low == "true"
        return t
    if kind in ("int", "auto_int", "opt_int"):
        try:
            return int(t)
        except ValueError:
            return t  # check_value names the key: "recover.ipc must be a positive int, got '2.7'"
    if kind in ("float", "float_or_teacher"):
        if kind == "float_or_teacher" and low == "teacher":
            return "teacher"
        try:
            return float(t)
        except ValueError:
            return t
    if kind in ("pair", "size"):
        inner = t[1:-1] if t.startswith("[") and t.endswith("]") else t
        parts = [p.strip() for p in inner.split(",")] if inner.strip() else []
        vals: list[Any] = []
        for p in parts:
            try:
                vals.append(int(p) if kind == "size" else float(p))
            except ValueError:
                vals.append(p)
        return vals[0] if kind == "size" and len(vals) == 1 else vals
    return t


def parse_override(item: str) -> tuple[str | None, str, Any]:
    """``section.key=value`` (or ``dataset=NAME`` / ``data_root=DIR``) -> (section or None, key, typed value)."""
    if "=" not in item:
        raise ValueError(f"override must look like stage.key=value, got {item!r}")
    path, text = item.split("=", 1)
    path = path.strip()
    if path in TOP_LEVEL:
        return None, path, text.strip() or None
    if "." not in path:
        raise ValueError(f"override must look like stage.key=value, got {item!r}")
    section, key = path.split(".", 1)
    if section not in SCHEMA:
        raise ValueError(f"override {item!r}: unknown stage {section!r} (stages: {list(SECTIONS)}; top-level "
                         f"keys: {list(TOP_LEVEL)})")
    known = fields_of(section)
    key = _ALIASES.get(section, {}).get(key, key)
    if key not in known:
        m = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {m[0]!r}?)" if m else ""
        raise ValueError(f"unknown {section} config keys {key!r}{hint}; known: {sorted(known)}")
    value = _parse_text(f"{section}.{key}", known[key].metadata["kind"], text)
    return section, key, check_value(section, key, value)


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` items in place (each parsed and validated against the schema)."""
    for item in overrides:
        section, key, value = parse_override(item)
        if section is None:
            config[key] = value
        else:
            config.setdefault(section, {})[key] = value
    return config


# ----------------------------------------------------------------------------- auto, reruns, help


def resolve_auto(section: str, cfg: Mapping[str, Any], device: str = "cpu",
                 recorded: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """``cfg`` with every ``auto`` replaced by a concrete value, and one phrase per choice made.

    A setting recorded by an earlier run of the same stage folder is kept (a run continued on other
    hardware keeps its precision); otherwise the hardware decides (lpqld_fast.runtime).
    """
    out = dict(cfg)
    notes: list[str] = []
    for key, f in fields_of(section).items():
        if out.get(key) != AUTO:
            continue
        # compile is chosen afresh: it changes no result, and a recorded cudagraphs cannot go on on a CPU
        if recorded is not None and recorded.get(key, AUTO) != AUTO and key != "compile":
            out[key] = recorded[key]
            notes.append(f"{key}={out[key]} (as recorded)")
            continue
        if key == "bf16":
            out[key], why = runtime.native_bf16(device)
        elif key == "channels_last":
            out[key], why = True, "NHWC"
        elif key == "threads":
            out[key], why = runtime.auto_threads()
        elif key.endswith("_workers"):
            out[key], why = runtime.auto_workers()
        elif key == "compile":
            out[key], why = runtime.auto_compile(device)
        else:
            raise AssertionError(key)
        notes.append(f"{key}={out[key]} (auto: {why})")
    check_device(section, out, device)
    return out, notes


def check_device(section: str, cfg: Mapping[str, Any], device: str) -> None:
    """Refuse settings the device cannot run (``compile=cudagraphs`` without CUDA), naming the key."""
    if "compile" in cfg:
        runtime.check_compile_mode(f"{section}.compile", cfg["compile"], device)


def result_diff(section: str, recorded: Mapping[str, Any], new: Mapping[str, Any],
                ignore: tuple[str, ...] = ()) -> list[str]:
    """``key old -> new`` for each result setting that differs (a key missing from the record counts as its
    default: runs recorded before a setting existed stay comparable)."""
    diffs = []
    for key, f in fields_of(section).items():
        if not f.metadata["result"] or key in ignore:
            continue
        old = recorded.get(key, _default(f))
        cur = new.get(key, _default(f))
        if isinstance(old, (list, tuple)) and isinstance(cur, (list, tuple)):
            same = list(old) == list(cur)
        else:
            same = old == cur
        if not same:
            diffs.append(f"{section}.{key} {old!r} -> {cur!r}")
    return diffs


def refuse_rerun(stage_dir: Any, diffs: list[str]) -> None:
    """The error of a stage rerun on a folder made with other settings."""
    raise ValueError(f"{stage_dir} holds a run made with other settings ({'; '.join(diffs)}); rerun with the "
                     f"recorded settings, or start fresh with another --out (or delete {stage_dir})")


def _kind_text(m: Mapping[str, Any]) -> str:
    kind = m["kind"]
    if kind == "choice":
        return "|".join(m["choices"])
    return {"auto_bool": "bool|auto", "auto_int": "int|auto", "opt_int": "int|none", "opt_bool": "bool|none",
            "pair": "lo,hi", "size": "int|h,w|none", "float_or_teacher": "float|teacher"}.get(kind, kind)


def _show(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def options_help(sections: tuple[str, ...], preset: Mapping[str, Any] | None = None) -> str:
    """The ``--set`` keys of ``sections``: key, type, default (and the preset's value) and meaning."""
    lines = []
    for section in sections:
        lines.append(f"{section} (--set {section}.KEY=VALUE): {SCHEMA[section].__doc__.strip()}")
        for key, f in fields_of(section).items():
            m = f.metadata
            default = _show(_default(f))
            if preset is not None and key in (preset.get(section) or {}) and \
                    _show(preset[section][key]) != default:
                default += f", preset {_show(preset[section][key])}"
            lines.append(f"  {section}.{key} ({_kind_text(m)}, default {default}): {m['help']}")
    return "\n".join(lines)


def announce(stage: str, notes: list[str]) -> None:
    """One line at the start of a stage: the settings chosen for this hardware, and the thread count."""
    if distributed.is_main():
        print(f"{stage}: {', '.join([*notes, f'threads={torch.get_num_threads()}'])}")
