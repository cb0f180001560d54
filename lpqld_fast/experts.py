"""Experts for soft labels (paper 001): a teacher checkpoint at a chosen epoch, or an ensemble of them.

Squeeze keeps the teacher's weights after every training epoch
(``<squeeze>/checkpoints/epoch_XXX.pt``) next to the final ``teacher.pt``.
Paper 001 finds that the expert's training epoch matters: early-stopped
experts give more informative soft labels for small data budgets than the
converged one. Knobs:

- expert epoch: ``epoch=None`` -> ``teacher.pt`` (the final teacher);
  ``epoch=e`` -> ``checkpoints/epoch_{e:03d}.pt`` (missing -> :class:`ExpertNotFoundError`
  naming the file and listing the epochs present).
- ensemble: ``ensemble=[e1, e2, ...]`` (None inside the list = ``teacher.pt``)
  builds an :class:`ExpertEnsemble` whose forward AVERAGES THE MEMBERS' LOGITS
  (``combine="logits"``, the default, so every store mode and the training
  temperatures keep their meaning) or returns the log of the averaged
  probabilities (``combine="probs"``: ``logsumexp_m log_softmax(z_m) - log M``,
  finite, whose softmax is the mean of the members' softmax at T = 1).
  ``features`` are the first member's.
- temperature: ``relabel.temperature`` is the temperature of the stored
  probabilities of the probability modes ``ms`` and ``topk_norenorm``
  (softmax(z / T_relabel)); the logit modes ``dense``/``mr``/``mrs`` store
  logits and apply the TRAINING temperature (``train.temperature`` schedule,
  ``train.t0``) when decoded.
- label retention: ``relabel.label`` = ``topk_norenorm`` (paper 001: top-k
  probabilities, the rest zero, NOT renormalised), ``mr`` (top-k logits,
  renormalised over the k by the softmax), ``ms`` (top-k probabilities, the
  remaining mass spread uniformly), ``mrs``, ``dense``; ``relabel.k`` = k.

The expert's identity is the sha256 of its state dict (an ensemble's includes
every member, in order, and a ``combine_code`` buffer), recorded in the label
store as ``teacher_sha256``. :func:`relabel_with_expert` mirrors
:func:`lpqld_fast.pipeline.run_relabel_stage` with the expert and a real-image
recover set (see :mod:`lpqld_fast.real_images`).
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lpqld_fast import distributed
from lpqld_fast.data import dataset_info
from lpqld_fast.image_set import bind_real_images, load_recovered
from lpqld_fast.io_utils import atomic_write_json, sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher
from lpqld_fast.records import stage_dirs
from lpqld_fast.relabel import run_relabel_sharded

__all__ = ["COMBINE_MODES", "ExpertNotFoundError", "ExpertEnsemble", "MemoizedExpert", "expert_checkpoint_path",
           "available_epochs", "load_expert", "expert_description", "relabel_with_expert"]

COMBINE_MODES = ("logits", "probs")


class ExpertNotFoundError(FileNotFoundError, ValueError):
    """The requested expert checkpoint does not exist (both a FileNotFoundError and a ValueError)."""


class ExpertEnsemble(nn.Module):
    """Average of several experts: mean logits (``combine="logits"``) or log of mean probabilities ("probs")."""

    def __init__(self, members: Sequence[nn.Module], combine: str = "logits") -> None:
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
        if len(members) < 1:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.combine = combine
        # Part of the state dict, so the ensemble's hash tells the two combine modes apart.
        self.register_buffer("combine_code", torch.tensor([COMBINE_MODES.index(combine)], dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([m(x) for m in self.members])  # [M, B, C]
        if self.combine == "logits":
            return z.mean(0)
        return torch.logsumexp(torch.log_softmax(z.float(), dim=-1), dim=0) - math.log(len(self.members))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.members[0].features(x)


class MemoizedExpert(nn.Module):
    """The expert's forward, memoised in ``cache`` by the exact bytes (and shape/dtype) of the input batch.

    For sweeps that relabel the same images with the same expert and relabel seed under several label modes
    or k: every store draws the same augmented batches, so the expert runs once per batch for all of them.
    The outputs are those of the wrapped expert bit for bit (the forward is deterministic on CPU); the
    store still records the wrapped expert's hash (passed explicitly).
    """

    def __init__(self, expert: nn.Module, cache: dict) -> None:
        super().__init__()
        self.expert = expert
        self.cache = cache
        self.hits = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.detach().contiguous()
        key = (tuple(t.shape), str(t.dtype),
               hashlib.blake2b(t.cpu().view(torch.uint8).numpy().tobytes(), digest_size=20).hexdigest())
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit.to(x.device)
        z = self.expert(x)
        self.cache[key] = z.detach().cpu().clone()
        return z


def _check_epoch(epoch: Any) -> int | None:
    if epoch is None:
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"expert epoch must be a positive int (or None for teacher.pt), got {epoch!r}")
    return int(epoch)


def available_epochs(squeeze_dir: str | Path) -> list[int]:
    """Epochs with a checkpoints/epoch_XXX.pt in ``squeeze_dir``."""
    d = Path(squeeze_dir) / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"epoch_(\d+)\.pt", p.name)))


def expert_checkpoint_path(squeeze_dir: str | Path, epoch: int | None) -> Path:
    """``teacher.pt`` (epoch None) or ``checkpoints/epoch_{epoch:03d}.pt``; ExpertNotFoundError if missing."""
    squeeze_dir = Path(squeeze_dir)
    epoch = _check_epoch(epoch)
    path = squeeze_dir / "teacher.pt" if epoch is None else squeeze_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"
    if not path.is_file():
        have = available_epochs(squeeze_dir)
        what = "final teacher" if epoch is None else f"expert epoch {epoch}"
        raise ExpertNotFoundError(f"{what}: checkpoint {path} not found (epochs with a checkpoint in "
                                  f"{squeeze_dir / 'checkpoints'}: {have or 'none'})")
    return path


def expert_description(epoch: int | None = None, ensemble: Sequence[int | None] | None = None,
                       combine: str = "logits") -> dict[str, Any]:
    """A JSON-able description of the expert (for manifests and results)."""
    if ensemble is not None:
        return {"kind": "ensemble", "epochs": [e if e is not None else "final" for e in ensemble],
                "combine": combine}
    return {"kind": "single", "epoch": epoch if epoch is not None else "final"}


def load_expert(config: dict[str, Any], squeeze_dir: str | Path, epoch: int | None = None,
                ensemble: Sequence[int | None] | None = None, combine: str = "logits",
                device: str | torch.device = "cpu") -> tuple[nn.Module, str]:
    """The expert (eval mode, frozen, on ``device``) and the sha256 of its state dict.

    ``epoch`` and ``ensemble`` are exclusive. The architecture comes from
    ``config["squeeze"]`` and the dataset's metadata, as the squeeze teacher's.
    """
    if epoch is not None and ensemble is not None:
        raise ValueError("give either an expert epoch or an ensemble of epochs, not both")
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {COMBINE_MODES}, got {combine!r}")
    info = dataset_info(config["dataset"], root=config.get("data_root"))

    def one(e: int | None) -> nn.Module:
        return load_teacher(expert_checkpoint_path(squeeze_dir, e), build_teacher(config["squeeze"], info))

    if ensemble is not None:
        if isinstance(ensemble, (str, bytes)) or not isinstance(ensemble, Sequence) or len(ensemble) == 0:
            raise ValueError(f"ensemble must be a non-empty list of epochs, got {ensemble!r}")
        model: nn.Module = ExpertEnsemble([one(_check_epoch(e)) for e in ensemble], combine)
    else:
        model = one(epoch)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha256_tensors(model.state_dict())


def relabel_with_expert(config: dict[str, Any], run: str | Path, seed: int = 0, expert_epoch: int | None = None,
                        ensemble: Sequence[int | None] | None = None, combine: str | None = None,
                        device: str = "cpu", progress: bool = True, logit_cache: dict | None = None):
    """Relabel ``<run>/recover`` with an expert into ``<run>/relabel`` (pipeline.run_relabel_stage's twin).

    Expert selection: the arguments, else ``config["expert"]`` (keys ``epoch``,
    ``ensemble``, ``combine``), else the final teacher. Label mode, k and the
    relabel temperature come from ``config["relabel"]`` (``label``, ``k``,
    ``temperature``). The store records the expert's hash as its teacher.

    A real-image set (manifest ``source == "real"``) is bound to the expert
    (:func:`lpqld_fast.image_set.bind_real_images`), so that
    :func:`lpqld_fast.train.run_train` on ``<run>/recover`` + ``<run>/relabel``
    passes its teacher-hash check; a synthetic set must have been recovered by
    this very expert. Writes ``<run>/expert.json``. Returns the LabelStore.

    ``logit_cache``: a dict shared by calls that relabel the same image set with the same expert, seed and
    relabel batch size / epochs / augmentation (e.g. a sweep over label modes and k): the expert's outputs
    are memoised there (:class:`MemoizedExpert`) and computed once per stored batch.
    """
    defaults = config.get("expert") or {}
    if expert_epoch is None and ensemble is None:
        expert_epoch, ensemble = defaults.get("epoch"), defaults.get("ensemble")
    combine = combine or defaults.get("combine", "logits")
    d = stage_dirs(run)
    expert, expert_hash = load_expert(config, d["squeeze"], expert_epoch, ensemble, combine, device)
    desc = {**expert_description(expert_epoch, ensemble, combine), "sha256": expert_hash}
    images, labels, manifest = load_recovered(d["recover"])
    if manifest["teacher_sha256"] != expert_hash and manifest.get("source") != "real":
        raise ValueError(f"{d['recover']} holds images synthesised with teacher {manifest['teacher_sha256']}, "
                         f"not with this expert ({expert_hash}); relabel real-image sets, or recover with it")
    info = dataset_info(config["dataset"], root=config.get("data_root"))
    relabel_cfg = dict(config["relabel"])
    if relabel_cfg.get("num_classes") is None:  # a preset's config holds the key, set to None
        relabel_cfg["num_classes"] = info.num_classes
    if distributed.is_main():  # one rank re-binds the set and writes the description (torchrun: then a barrier)
        if manifest["teacher_sha256"] != expert_hash:
            bind_real_images(d["recover"], expert_hash, desc)
        atomic_write_json(Path(run) / "expert.json",
                          {**desc, "label": relabel_cfg.get("label", relabel_cfg.get("mode")),
                           "k": relabel_cfg.get("k"), "relabel_temperature": relabel_cfg.get("temperature", 1.0)})
    distributed.barrier()
    # run_relabel for 1 process; under torchrun the store's slots are split over the ranks (as the pipeline's).
    labeller = expert if logit_cache is None else MemoizedExpert(expert, logit_cache).eval()
    return run_relabel_sharded(images, labels, labeller, info.mean, info.std, relabel_cfg, out_dir=d["relabel"],
                               seed=seed, teacher_sha256=expert_hash, images_sha256=manifest["images_sha256"],
                               progress=progress)
