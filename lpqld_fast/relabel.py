"""Relabel: stored augmentations + teacher soft labels, only for the kept batches (DESIGN 2.3).

Batch ids b in [0, E * floor(N/B)) (the partial last batch of an epoch is
dropped). Batch b belongs to epoch e = b // nb and holds positions
[p*B, (p+1)*B), p = b % nb, of epoch e's permutation of the N images.
Of the E*nb batches, K = int(E*nb*(1 - r)) are kept (chosen at random, sorted;
``relabel.keep`` scores every batch by the teacher's confidence instead) and
only those are generated: for each, the augmentation parameters are drawn
from a generator seeded by (seed, b), the batch is built with
:func:`lpqld_fast.augment.replay_batch`, the teacher runs in float32 under
``torch.no_grad``, and the encoded logits are written to the store slot.

Random streams (all ``torch.Generator`` on CPU, seeded with
:func:`derive_seed`): ``("keep", 0)`` the kept ids = randperm(E*nb)[:K] sorted;
``("epoch", e)`` the image permutation of epoch e; ``("batch", b)`` the
augmentation of batch b, drawn in the order boxes, flips, cutout, cutmix.
A batch's bytes therefore depend only on (seed, b), the images, the teacher
and the config: a killed run resumes (unfinished slots are recomputed) and
ends byte-identical to an uninterrupted one when the teacher forward is
deterministic (CPU, same thread count).

Under torchrun, :func:`run_relabel_sharded` splits the store's slots over the ranks (one store, the same
bytes as one process).
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lpqld_fast import distributed
from lpqld_fast.augment import AugParams, replay_batch, sample_aug_params
from lpqld_fast.config import check_section, defaults, result_diff
from lpqld_fast.seeding import hashed_seed, stream
from lpqld_fast.io_utils import locks_folder, read_json
from lpqld_fast.store.layout import MANIFEST, component_specs, encode_slot
from lpqld_fast.store.manifest import label_store_manifest
from lpqld_fast.store.quantize import EncodedLabels, check_encoding, encode_labels_unchecked, stored_k
from lpqld_fast.store.reader import LabelStore
from lpqld_fast.store.writer import StoreWriter

__all__ = ["normalize_config", "derive_seed", "seeded_generator", "kept_count", "EpochPermutations",
           "select_kept_batch_ids", "select_scored_batch_ids", "batch_confidence", "batch_image_indices",
           "relabel_batch", "run_relabel", "run_relabel_sharded"]


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """The relabel section validated against the schema (lpqld_fast.config.RelabelConfig), defaults filled in
    and ``flip`` decided (default: on, except with cutout: the IN21K recipe stores cutout instead of flips)."""
    cfg = check_section("relabel", config)
    if cfg["flip"] is None:
        cfg["flip"] = not cfg["cutout"]
    return cfg


def derive_seed(seed: int, tag: str, index: int) -> int:
    """A 63-bit seed for the stream (tag, index) of run ``seed``: sha256 of the three, so streams never collide."""
    return hashed_seed("lpqld-relabel", tag, seed, index)


def seeded_generator(seed: int, tag: str, index: int) -> torch.Generator:
    return stream("lpqld-relabel", tag, seed, index)


def kept_count(total_batches: int, prune_ratio: float) -> int:
    """K = int(total * (1 - r)), with a 1e-9 tolerance so that floating error never drops a batch
    (plain int(10 * (1 - 0.9)) is 0)."""
    if not (0.0 <= prune_ratio < 1.0):
        raise ValueError(f"prune_ratio must be in [0, 1), got {prune_ratio!r}")
    return int(math.floor(total_batches * (1.0 - prune_ratio) + 1e-9))


def select_kept_batch_ids(total_batches: int, num_kept: int, seed: int) -> np.ndarray:
    """The kept batch ids, sorted: randperm(total)[:K] of the ("keep", 0) stream (all ids when K == total)."""
    if not (0 < num_kept <= total_batches):
        raise ValueError(f"num_kept must be in [1, {total_batches}], got {num_kept}")
    if num_kept == total_batches:
        return np.arange(total_batches, dtype=np.int64)
    ids = torch.randperm(total_batches, generator=seeded_generator(seed, "keep", 0))[:num_kept]
    return torch.sort(ids).values.numpy().astype(np.int64)


class EpochPermutations:
    """Epoch permutations of the N images, one cached (kept ids are sorted, so epochs come in order)."""

    def __init__(self, num_images: int, seed: int):
        self.n = num_images
        self.seed = seed
        self._epoch = -1
        self._perm: torch.Tensor | None = None

    def __call__(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=seeded_generator(self.seed, "epoch", epoch))
            self._epoch = epoch
        assert self._perm is not None
        return self._perm


def batch_image_indices(batch_id: int, num_images: int, batch_size: int, seed: int,
                        _perms: EpochPermutations | None = None) -> torch.Tensor:
    """Image indices int64 [B] of batch ``batch_id``: positions [p*B, (p+1)*B) of epoch e's permutation."""
    nb = num_images // batch_size
    if nb < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the number of images {num_images}")
    e, p = divmod(int(batch_id), nb)
    perm = (_perms or EpochPermutations(num_images, seed))(e)
    return perm[p * batch_size:(p + 1) * batch_size].clone()


def _check_sha(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a non-empty hex string, got {v!r}")
    return v


def _as_list(name: str, v: Sequence[float] | torch.Tensor, channels: int) -> list[float]:
    vals = [float(x) for x in torch.as_tensor(v, dtype=torch.float64).flatten().tolist()]
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise ValueError(f"{name} has {len(vals)} values but the images have {channels} channels")
    return vals


def config_stored_k(cfg: dict[str, Any], num_classes: int) -> int:
    """Values stored per sample under the relabel section ``cfg``; a k above the class count names the key."""
    if cfg["label"] != "dense" and isinstance(cfg["k"], int) and cfg["k"] > num_classes:
        raise ValueError(f"relabel.k {cfg['k']} exceeds the teacher's {num_classes} classes (label "
                         f"{cfg['label']!r} stores k of them per sample)")
    return stored_k(cfg["label"], cfg["k"], num_classes)


def relabel_batch(teacher: nn.Module, images_uint8: torch.Tensor, aug: AugParams, mean: torch.Tensor,
                  std: torch.Tensor, device: torch.device, num_classes: int, label: str, k: int, value_dtype: str,
                  temperature: float) -> tuple[EncodedLabels, torch.Tensor]:
    """One stored batch: replay ``aug`` on the image set, run the teacher, encode its logits as stored.

    Returns the encoded rows (on the teacher's device) and the checks that
    :func:`lpqld_fast.store.quantize.check_encoding` tests once the rows are on the host. The image indices
    and std are checked once per store by the caller; nothing here reads a value back (no host sync, no
    branch on tensor values): it compiles with ``torch.compile(fullgraph=True)`` (tests/test_relabel_step.py).
    """
    x = replay_batch(images_uint8, aug, mean, std, validate=False)
    with torch.no_grad():
        z = teacher(x.to(device))
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != x.shape[0]:
        raise ValueError(f"teacher must return logits [batch, C], got {getattr(z, 'shape', type(z).__name__)}")
    if z.shape[1] != num_classes:
        raise ValueError(f"teacher returned {z.shape[1]} classes, expected num_classes={num_classes}")
    return encode_labels_unchecked(z.to(torch.float32), mode=label, k=k, value_dtype=value_dtype,
                                   temperature=temperature)


def _to_cpu(enc: EncodedLabels) -> EncodedLabels:
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    return EncodedLabels(cpu(enc.values), cpu(enc.indices), cpu(enc.fill), cpu(enc.scale), cpu(enc.offset))


def _check_inputs(images_uint8: Any, image_labels: Any, teacher: Any, seed: Any) -> None:
    """run_relabel's argument checks (before anything is written)."""
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dim() != 4 or images_uint8.dtype != torch.uint8:
        raise ValueError("images_uint8 must be a uint8 tensor [N, C, H, W]")
    n = images_uint8.shape[0]
    if not isinstance(image_labels, torch.Tensor) or image_labels.shape != (n,) or image_labels.is_floating_point():
        raise ValueError(f"image_labels must be an integer tensor of shape [{n}], got "
                         f"{getattr(image_labels, 'shape', type(image_labels).__name__)}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
    if any(mod.training for mod in teacher.modules()):
        raise ValueError("teacher must be in eval mode (call teacher.eval()): training-mode BatchNorm/dropout "
                         "would make the labels depend on batch composition and change the teacher")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")


def _probe_num_classes(teacher: nn.Module, device: torch.device, shape: tuple[int, int, int]) -> int:
    """The teacher's class count from one forward of a blank image (checking that it returns logits)."""
    with torch.no_grad():
        z = teacher(torch.zeros((1, *shape), dtype=torch.float32, device=device))
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != 1:
        raise ValueError(f"teacher must return logits [batch, C], got {getattr(z, 'shape', type(z).__name__)}")
    return int(z.shape[1])


def _batch_aug(bid: int, shape: Sequence[int], cfg: dict[str, Any], seed: int, out_size: tuple[int, int],
               perms: EpochPermutations) -> AugParams:
    """The stored augmentation of batch ``bid``: its images and parameters, from the batch's own stream."""
    n, c_img, h, w = shape
    idx = batch_image_indices(bid, n, cfg["batch_size"], seed, perms)
    return sample_aug_params(idx, h, w, c_img, out_size, seeded_generator(seed, "batch", bid),
                             scale=cfg["rrc_scale"], ratio=cfg["rrc_ratio"], flip=cfg["flip"], cutmix=cfg["cutmix"],
                             cutout=cfg["cutout"], cutout_factor=cfg["cutout_factor"])


@torch.no_grad()
def batch_confidence(teacher: nn.Module, images_uint8: torch.Tensor, cfg: dict[str, Any], seed: int,
                     out_size: tuple[int, int], mean: Sequence[float], std: Sequence[float], device: torch.device,
                     total: int, progress: bool = True, ids: Sequence[int] | None = None) -> torch.Tensor:
    """float64 [total]: per batch id, the mean over its rows of the teacher's max softmax probability on the
    batch as it would be stored (relabel.keep scores). ``ids``: score only these (the others are 0), as a rank
    does for its share."""
    perms = EpochPermutations(images_uint8.shape[0], seed)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images_uint8.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=images_uint8.device)
    scores = torch.zeros(total, dtype=torch.float64)
    todo = range(total) if ids is None else ids
    for bid in tqdm(todo, desc="relabel: scoring every batch", unit="batch", disable=not progress):
        aug = _batch_aug(bid, images_uint8.shape, cfg, seed, out_size, perms)
        x = replay_batch(images_uint8, aug.to(images_uint8.device), mean_t, std_t, validate=False)
        z = teacher(x.to(device)).float()
        scores[bid] = float(torch.softmax(z, dim=1).amax(dim=1).double().mean())
    return scores


def select_scored_batch_ids(scores: torch.Tensor, num_kept: int, keep: str) -> np.ndarray:
    """The ``num_kept`` ids of highest (``keep="confident"``) or lowest ("uncertain") score, ties by the lower
    id, sorted."""
    if keep not in ("confident", "uncertain"):
        raise ValueError(f"keep must be 'confident' or 'uncertain', got {keep!r}")
    key = -scores if keep == "confident" else scores
    order = torch.sort(key, stable=True).indices  # stable: equal scores keep the lower id first
    return torch.sort(order[:num_kept]).values.numpy().astype(np.int64)


def _write_slots(writer: StoreWriter, slots: Sequence[int], kept: np.ndarray,
                 images_uint8: torch.Tensor, teacher: nn.Module, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, num_classes: int, cfg: dict[str, Any], seed: int, out_size: tuple[int, int],
                 progress: bool) -> None:
    """Each store slot in ``slots``: its batch's augmentation drawn from the batch's own seed, replayed,
    labelled by the teacher and encoded; the rows come back to the host once, where the encoding checks run."""
    specs = component_specs(writer.manifest)
    perms = EpochPermutations(images_uint8.shape[0], seed)
    # Once per store, on the images' device: the batches' checks of the image indices (a permutation of the
    # images) and of std (checked by the caller) are not repeated per batch.
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images_uint8.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=images_uint8.device)
    for slot in tqdm(slots, desc="relabel", unit="batch", disable=not progress):
        bid = int(kept[slot])
        aug = _batch_aug(bid, images_uint8.shape, cfg, seed, out_size, perms)
        enc, checks = relabel_batch(teacher, images_uint8, aug.to(images_uint8.device), mean_t, std_t, device,
                                    num_classes, cfg["label"], cfg["k"], cfg["value_dtype"], cfg["temperature"])
        enc = _to_cpu(enc)  # the store's rows, on the host: the batch's one transfer back
        check_encoding(checks, cfg["label"], cfg["value_dtype"])
        writer.write_slot(slot, encode_slot(writer.manifest, specs, aug, enc))


@locks_folder("out_dir", "relabel", when=lambda a: a.get("slot_range") is None and distributed.is_main())
def run_relabel(
    images_uint8: torch.Tensor,
    image_labels: torch.Tensor,
    teacher: nn.Module,
    mean: Sequence[float] | torch.Tensor,
    std: Sequence[float] | torch.Tensor,
    config: dict[str, Any],
    out_dir: str | os.PathLike,
    seed: int,
    *,
    teacher_sha256: str,
    images_sha256: str,
    labeller_sha256: str | None = None,
    progress: bool = True,
    slot_range: range | None = None,
    finalize: bool = True,
    commit_every: int = 16,
    kept_only: bool = False,
    kept_ids: np.ndarray | None = None,
) -> LabelStore | np.ndarray | None:
    """Generate the label store of the kept batches in ``out_dir`` (resuming a partial one).

    ``images_uint8`` [N, C, H, W] uint8 (the distilled or real image set),
    ``image_labels`` [N] their classes (validated against the teacher's C),
    ``teacher`` in eval mode: the model that labels, ``teacher_sha256`` the hash of the teacher that made
    the images (what a reader checks the store against); when another model labels them (an ensemble of
    teachers), ``labeller_sha256`` is its hash, recorded in the manifest. ``slot_range`` restricts the work
    to the slots a rank owns (multi-writer); with ``finalize=False`` the store is left incomplete for another
    process to finalise and None is returned.
    Returns the opened :class:`LabelStore`.

    For :func:`run_relabel_sharded`: ``kept_only=True`` checks everything, writes nothing and returns the kept
    batch ids (under torchrun every rank must call it: scored pruning scores each rank's share of the batches
    and all-reduces the scores); ``kept_ids`` hands those ids to the call that creates the store.
    """
    _check_inputs(images_uint8, image_labels, teacher, seed)
    n, c_img, h, w = images_uint8.shape
    teacher_sha256 = _check_sha("teacher_sha256", teacher_sha256)
    if labeller_sha256 is not None:
        labeller_sha256 = _check_sha("labeller_sha256", labeller_sha256)
    images_sha256 = _check_sha("images_sha256", images_sha256)
    cfg = normalize_config(config)
    b_size, epochs = cfg["batch_size"], cfg["epochs"]
    nb = n // b_size
    if nb < 1:
        raise ValueError(f"relabel.batch_size {b_size} exceeds the {n} distilled images")
    total = epochs * nb
    k_slots = kept_count(total, cfg["prune_ratio"])
    if k_slots < 1:
        raise ValueError(f"prune_ratio {cfg['prune_ratio']} keeps no batch of {total}")
    out_size = tuple(cfg["out_size"]) if cfg["out_size"] is not None else (h, w)
    mean_l, std_l = _as_list("mean", mean, c_img), _as_list("std", std, c_img)
    if min(std_l) <= 0:
        raise ValueError(f"std must be positive, got {std_l}")
    try:
        device = next(teacher.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    num_classes = cfg["num_classes"]
    if num_classes is None:
        num_classes = _probe_num_classes(teacher, device, (c_img, *out_size))
    if image_labels.numel() and (int(image_labels.min()) < 0 or int(image_labels.max()) >= num_classes):
        raise ValueError(f"image_labels must lie in [0, {num_classes}) (the teacher's classes)")
    kk = config_stored_k(cfg, num_classes)
    manifest = label_store_manifest(cfg, seed=seed, teacher_sha256=teacher_sha256, images_sha256=images_sha256,
                                    num_images=n, image_shape=(c_img, h, w), out_size=out_size, mean=mean_l,
                                    std=std_l, num_classes=num_classes, batches_per_epoch=nb, num_kept=k_slots,
                                    stored_k=kk, labeller_sha256=labeller_sha256)
    old_manifest = Path(out_dir) / MANIFEST
    if old_manifest.exists():  # name the settings a user changed, before the store's own identity check
        old_cfg = read_json(old_manifest, "label store manifest").get("config", {})
        changed = result_diff("relabel", old_cfg, cfg)
        if changed:
            raise ValueError(f"{out_dir} already holds a label store made with other settings ({', '.join(changed)});"
                             " use another --out, or delete it to relabel")
        # A store written before a setting existed holds that setting at its default: the same store.
        fresh = defaults("relabel")
        manifest["config"] = {k: v for k, v in manifest["config"].items() if k in old_cfg or v != fresh.get(k)}
    if kept_ids is not None:
        kept = kept_ids
    elif cfg["keep"] == "random" or k_slots == total:
        kept = select_kept_batch_ids(total, k_slots, seed)
    else:  # scored once: a resumed (or finished) store of this run holds its ids
        kept = StoreWriter.stored_batch_ids(out_dir, manifest)
        if kept is None:
            shared = kept_only and distributed.world_size() > 1  # every rank is here: split the scoring
            scores = batch_confidence(teacher, images_uint8, cfg, seed, out_size, mean_l, std_l, device, total,
                                      progress, ids=distributed.shard_range(total) if shared else None)
            if shared:
                scores = distributed.all_reduce_(scores)  # each id scored by one rank, 0 elsewhere
            kept = select_scored_batch_ids(scores, k_slots, cfg["keep"])
    if kept_only:
        return kept
    writer = StoreWriter.create_or_resume(out_dir, manifest, kept, commit_every=commit_every)
    if writer is None:  # already complete
        return LabelStore.open(out_dir, expect_teacher_sha256=teacher_sha256, expect_images_sha256=images_sha256)
    try:
        _write_slots(writer, writer.pending_slots(slot_range), kept, images_uint8, teacher, mean_l, std_l, device,
                     num_classes, cfg, seed, out_size, progress)
        writer.commit()
        if not finalize:
            return None
        writer.finalize()
    finally:
        writer.close()
    return LabelStore.open(out_dir, expect_teacher_sha256=teacher_sha256, expect_images_sha256=images_sha256,
                           verify="size")


@locks_folder("out_dir", "relabel", when=lambda a: distributed.is_main())
def run_relabel_sharded(*args: Any, out_dir: str | os.PathLike, progress: bool = True, **kwargs: Any):
    """:func:`run_relabel` with the store slots split over ranks, one store.

    Protocol (the writer's multi-writer contract): every rank takes the kept batch ids (scored pruning: each
    rank scores its share of the batches, the scores are all-reduced); rank 0 creates the store (or
    resumes / finds it complete) writing no slot; barrier; every rank writes its
    contiguous slot range (unfinished slots only, so a killed run resumes);
    barrier; rank 0 checksums and finalises; barrier; every rank opens the store.
    Slot bytes depend only on (seed, batch id), so the finished store is byte for
    byte the 1-process one (same per-process thread count; torchrun's default
    OMP_NUM_THREADS=1 — pin it in both runs when comparing).
    """
    if distributed.world_size() == 1:
        return run_relabel(*args, out_dir=out_dir, progress=progress, **kwargs)
    done = None
    # every rank: the kept ids (scored pruning scores its share); nothing is written yet
    kept = run_relabel(*args, out_dir=out_dir, progress=progress and distributed.is_main(), kept_only=True,
                       **kwargs)
    if distributed.is_main():
        done = run_relabel(*args, out_dir=out_dir, progress=False, slot_range=range(0), finalize=False,
                           kept_ids=kept, **kwargs)
    distributed.barrier()
    manifest = read_json(Path(out_dir) / "manifest.json", "label store manifest")
    if not manifest.get("complete"):
        mine = distributed.shard_range(int(manifest["num_kept"]))
        run_relabel(*args, out_dir=out_dir, progress=progress and distributed.is_main(), slot_range=mine,
                    finalize=False, **kwargs)
        distributed.barrier()
        if distributed.is_main():
            done = run_relabel(*args, out_dir=out_dir, progress=False, slot_range=range(0), finalize=True, **kwargs)
    distributed.barrier()
    if done is not None:
        return done
    return LabelStore.open(out_dir, expect_teacher_sha256=kwargs["teacher_sha256"],
                           expect_images_sha256=kwargs["images_sha256"], verify="size")
