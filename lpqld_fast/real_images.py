"""Recover mode "real": SELECT real training images instead of synthesising them (paper 001 baseline).

Paper 001 ("A Label is Worth a Thousand Images") shows that randomly chosen
real training images plus an expert's soft labels match far more elaborate
distillation methods. In this pipeline that is "recover = real images",
everything downstream (relabel, train, report) unchanged: the output directory
has exactly the layout of :func:`lpqld_fast.recover.run_recover`, written by
the same :func:`lpqld_fast.image_set.finalize_recover`::

    images.pt       {"images": uint8 [N, C, H, W], "labels": int64 [N]}, class-major
    png/<class>/<i>.png, grid.png
    manifest.json   schema, recover config, dataset, seed, teacher_sha256, images_sha256, ...
    units/          one file per class (images, labels, dataset indices), as run_recover's units
    indices.pt      {"indices": int64 [N]}: the train-set index of every row of images.pt
    recover_state.json

Strategies (``strategy``), per class c with n_c training images:

- ``"random"``: IPC images drawn uniformly without replacement, seeded per
  (seed, class) (independent of the other classes and of IPC's ordering: the
  first IPC of one permutation, so a larger IPC extends a smaller one).
- ``"ce-easiest"``: the IPC images with the LOWEST cross-entropy under the
  scoring teacher (paper 001 appendix: training images ranked by the expert's
  CE, quantile 1 = easiest helps a little, the hardest hurt). Ties are broken
  by train-set index. Deterministic (seed unused).
- ``"ce-quantile"``: IPC images drawn at random (seeded) from quantile
  ``quantile`` (1 = easiest) of ``num_quantiles`` CE quantiles of the class,
  as in the appendix figure (ten quantiles).
- ``"herding"``: herding on the scoring teacher's penultimate features
  (L2-normalised, float64; Welling 2009, as iCaRL picks exemplars): each pick
  keeps the running mean of the picked features closest to the class mean, so
  the set covers the class as a whole rather than its easiest or a random
  corner. Deterministic (seed unused); ties go to the lower train-set index.
- ``"herding-2x2"``: 4 x IPC images per class picked by herding, each
  downsampled by 2 (area average, rounded) and tiled 2 x 2 into IPC images of
  the full size, in herding order (RDED's patch mosaics, Sun et al. 2024,
  with herding instead of its confidence-ranked crops): four times the real
  content per class in the same image storage, each at half the resolution.
  ``indices.pt`` then holds [N, 4] (row-major tiles) instead of [N]. Needs an
  even image height and width.

Scoring teacher (CE strategies and herding): by default the FINAL teacher
``<squeeze>/teacher.pt``; ``score_epoch=e`` scores with the expert checkpoint
``<squeeze>/checkpoints/epoch_{e:03d}.pt`` instead. CE is computed in eval mode
on the un-augmented, normalised image (``(x/255 - mean)/std``), float32, one
value per training image.

Hashes: ``teacher_sha256`` in the manifest is the hash of the final teacher
(``teacher.pt``), the default labeller, so :func:`lpqld_fast.pipeline.run_relabel_stage`
works on a real-image set unchanged. Real images are not made by a teacher;
to label them with another expert use :func:`lpqld_fast.experts.relabel_with_expert`,
which re-binds the set to the expert's hash (:func:`lpqld_fast.image_set.bind_real_images`). The
manifest also records ``source = "real"`` and, for CE strategies, the scoring
teacher's hash (``recover.score_teacher_sha256``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lpqld_fast.data import get_dataset, require_in_memory
from lpqld_fast.data.transforms import normalize
from lpqld_fast.experts import expert_checkpoint_path, load_expert
from lpqld_fast.image_set import Unit, class_stream, finalize_recover, random_class_pick
from lpqld_fast.io_utils import atomic_write_json, load_tensors, read_json, save_tensors, sha256_tensors
from lpqld_fast.models.teacher import build_teacher, load_teacher

__all__ = ["STRATEGIES", "select_real_images", "teacher_cross_entropy", "teacher_features", "select_indices",
           "herding_order", "mosaic", "load_real_indices"]

STRATEGIES = ("random", "ce-easiest", "ce-quantile", "herding", "herding-2x2")
TILES = {"herding-2x2": 2}  # strategies that tile k x k downsampled images into one
HERDING = ("herding", "herding-2x2")  # the strategies that pick by the teacher's features


@torch.no_grad()
def _per_image(teacher: torch.nn.Module, images_uint8: torch.Tensor, mean, std, batch_size: int,
               device: str | torch.device, fn) -> list[torch.Tensor]:
    """``fn(teacher, x, rows)`` on each batch of normalised, un-augmented images, teacher in eval mode."""
    was_training = teacher.training
    teacher.eval()
    out = []
    try:
        for s in range(0, len(images_uint8), batch_size):
            x = normalize(images_uint8[s:s + batch_size], mean, std).to(device)
            out.append(fn(teacher, x, slice(s, s + batch_size)).float().cpu())
    finally:
        teacher.train(was_training)
    return out


def teacher_cross_entropy(teacher: torch.nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor,
                          mean, std, batch_size: int = 500, device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-image CE (float32 [N]) of ``teacher`` (eval mode) on the un-augmented, normalised images."""
    out = _per_image(teacher, images_uint8, mean, std, batch_size, device, lambda t, x, rows: F.cross_entropy(
        t(x).float(), labels[rows].to(x.device), reduction="none"))
    return torch.cat(out) if out else torch.zeros(0)


def teacher_features(teacher: torch.nn.Module, images_uint8: torch.Tensor, mean, std, batch_size: int = 500,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """Penultimate features (float32 [N, D]) of ``teacher`` (eval mode) on the un-augmented, normalised images."""
    if not hasattr(teacher, "features"):
        raise ValueError(f"herding needs a teacher with a features() method; {type(teacher).__name__} has none")
    out = _per_image(teacher, images_uint8, mean, std, batch_size, device, lambda t, x, rows: t.features(x))
    return torch.cat(out) if out else torch.zeros(0, 0)


def herding_order(features: torch.Tensor, ipc: int) -> torch.Tensor:
    """Positions (int64 [ipc]) into ``features`` [n, D] picked by herding towards their mean.

    Features are L2-normalised in float64; pick t minimises || mu - (s + f_i) / t || over the rows not yet
    picked (s = sum of the picked rows), the first such row on ties.
    """
    f = F.normalize(features.double(), dim=1)
    mu = f.mean(0)
    taken = torch.zeros(len(f), dtype=torch.bool)
    picked = []
    s = torch.zeros_like(mu)
    for t in range(1, ipc + 1):
        d = ((mu - (s + f) / t) ** 2).sum(1)
        d[taken] = float("inf")
        i = int(torch.argmin(d))  # argmin returns the first minimum
        picked.append(i)
        taken[i] = True
        s += f[i]
    return torch.tensor(picked, dtype=torch.int64)


def _check_tile_sides(h: int, w: int, k: int) -> None:
    if h % k or w % k:
        raise ValueError(f"a {k}x{k} mosaic needs image sides divisible by {k}, got {h}x{w}")


def mosaic(images_uint8: torch.Tensor, k: int) -> torch.Tensor:
    """[k*k*M, C, H, W] uint8 -> [M, C, H, W]: each run of k*k images downsampled by k (area average, rounded
    half to even) and tiled row-major into one image."""
    n, c, h, w = images_uint8.shape
    _check_tile_sides(h, w, k)
    if n % (k * k):
        raise ValueError(f"a {k}x{k} mosaic needs a multiple of {k * k} images, got {n}")
    small = F.avg_pool2d(images_uint8.double(), k).round().to(torch.uint8)  # [n, c, h/k, w/k]
    small = small.view(n // (k * k), k, k, c, h // k, w // k)  # [M, row, col, C, h', w']
    return small.permute(0, 3, 1, 4, 2, 5).reshape(n // (k * k), c, h, w).contiguous()


def _class_name(names, c: int) -> str:
    return f"class {c} ({names[c]})" if names is not None and c < len(names) else f"class {c}"


def select_indices(labels: torch.Tensor, num_classes: int, ipc: int, strategy: str = "random", seed: int = 0,
                   scores: torch.Tensor | None = None, quantile: int = 1, num_quantiles: int = 10,
                   class_names=None, features: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per class, the train-set indices (int64) of the selected images, in selection order.

    ``scores`` (float [N], lower = easier) is required by the CE strategies, ``features`` ([N, D]) by herding.
    Raises ValueError naming the class when IPC exceeds what the class (or its
    quantile) holds.
    """
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy in HERDING:
        if features is None or features.dim() != 2 or len(features) != len(labels):
            raise ValueError(f"strategy {strategy!r} needs one feature row per image")
    elif strategy != "random":
        if scores is None or scores.shape != labels.shape:
            raise ValueError(f"strategy {strategy!r} needs one cross-entropy score per image")
    if strategy == "ce-quantile":
        if not (isinstance(num_quantiles, int) and num_quantiles >= 1):
            raise ValueError(f"num_quantiles must be a positive int, got {num_quantiles!r}")
        if not (isinstance(quantile, int) and 1 <= quantile <= num_quantiles):
            raise ValueError(f"quantile must be an int in [1, {num_quantiles}], got {quantile!r}")
    out = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        n = len(idx)
        if ipc > n:
            raise ValueError(f"ipc={ipc} exceeds the {n} training images of {_class_name(class_names, c)}")
        if strategy == "random":
            out.append(random_class_pick(idx, ipc, seed, c))
            continue
        if strategy in HERDING:
            out.append(idx[herding_order(features[idx], ipc)])
            continue
        # Rank by CE ascending, ties by train-set index (idx is ascending, so a stable sort keeps it).
        order = idx[torch.sort(scores[idx].double(), stable=True).indices]
        if strategy == "ce-easiest":
            out.append(order[:ipc])
            continue
        lo, hi = (quantile - 1) * n // num_quantiles, quantile * n // num_quantiles
        bucket = order[lo:hi]
        if ipc > len(bucket):
            raise ValueError(f"ipc={ipc} exceeds the {len(bucket)} images in CE quantile {quantile}/{num_quantiles} "
                             f"of {_class_name(class_names, c)} ({n} images)")
        out.append(bucket[torch.randperm(len(bucket), generator=class_stream(seed, c))[:ipc]])
    return out


def select_real_images(
    config: dict[str, Any],
    squeeze_dir: str | Path,
    out: str | Path,
    seed: int = 0,
    strategy: str = "random",
    ipc: int | None = None,
    *,
    score_epoch: int | None = None,
    quantile: int = 1,
    num_quantiles: int = 10,
    device: str = "cpu",
    data_root: str | None = None,
) -> dict[str, Any]:
    """Write IPC real training images per class into ``out`` in the recover layout; return the manifest.

    ``ipc`` defaults to ``config["recover"]["ipc"]``. Rerunning with the same
    arguments is a no-op; ``out`` holding another recover run is refused.
    """
    if ipc is None:
        ipc = config.get("recover", {}).get("ipc")
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise ValueError(f"ipc must be a positive int, got {ipc!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if score_epoch is not None and strategy == "random":
        raise ValueError("score_epoch only applies to the teacher-scored strategies, not 'random'")
    out, squeeze_dir = Path(out), Path(squeeze_dir)
    t0 = time.perf_counter()
    if data_root is None:
        data_root = config.get("data_root")
    train = require_in_memory(get_dataset(config["dataset"], "train", root=data_root), "real-image selection")
    k = TILES.get(strategy, 1)
    _check_tile_sides(*train.images.shape[-2:], k)  # before any work
    teacher = load_teacher(squeeze_dir / "teacher.pt", build_teacher(config["squeeze"], train))
    teacher_hash = sha256_tensors(teacher.state_dict())
    rec_cfg: dict[str, Any] = {"source": "real", "strategy": strategy, "ipc": ipc}
    scorer = None
    if strategy != "random":
        if score_epoch is None:
            scorer, score_hash, score_name = teacher, teacher_hash, "teacher.pt"
        else:
            scorer, score_hash = load_expert(config, squeeze_dir, epoch=score_epoch)
            score_name = str(expert_checkpoint_path(squeeze_dir, score_epoch).relative_to(squeeze_dir))
        rec_cfg.update({"score_teacher": score_name, "score_teacher_sha256": score_hash})
        if strategy == "ce-quantile":
            rec_cfg.update({"quantile": quantile, "num_quantiles": num_quantiles})
    run_cfg = {"recover": rec_cfg, "dataset": config["dataset"], "seed": seed, "teacher_sha256": teacher_hash,
               "source": "real"}
    state_path = out / "recover_state.json"
    if state_path.exists():
        prev = read_json(state_path, "recover state")
        if prev.get("run") != run_cfg:
            raise ValueError(f"{out} holds a recover run with another config/teacher/seed; use a new out directory")
    if (out / "manifest.json").exists() and (out / "images.pt").exists():
        done = read_json(out / "manifest.json", "recover manifest")
        if all(done.get(k) == v for k, v in run_cfg.items()):
            return done
    scores = feats = None
    if strategy in HERDING:
        feats = teacher_features(scorer.to(device), train.images, train.mean, train.std, device=device)
    elif scorer is not None:
        scores = teacher_cross_entropy(scorer.to(device), train.images, train.labels, train.mean, train.std,
                                       device=device)
    try:
        picked = select_indices(train.labels, train.num_classes, ipc * k * k, strategy, seed, scores, quantile,
                                num_quantiles, getattr(train, "class_names", None), features=feats)
    except ValueError as e:
        if k == 1:
            raise
        raise ValueError(f"{e} ({strategy} tiles {k * k} training images into each of the ipc={ipc})") from None
    if k > 1:
        picked = [idx.view(ipc, k * k) for idx in picked]
    # written once the selection stands: a refused setting (ipc above a class's size) leaves no state behind
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, {"run": run_cfg})
    units = []
    for c, idx in enumerate(picked):
        u = Unit(c, torch.full((ipc,), c, dtype=torch.int64), c)
        images = train.images[idx.flatten()]
        images = mosaic(images, k) if k > 1 else images.clone()
        save_tensors(out / "units" / f"unit_{c:06d}.pt",
                     {"images": images, "labels": u.labels.clone(), "indices": idx.clone()})
        units.append(u)
    save_tensors(out / "indices.pt", {"indices": torch.cat(picked)})  # class-major, as images.pt
    return finalize_recover(out, units, train.num_classes, run_cfg, time.perf_counter() - t0)


def load_real_indices(recover_dir: str | Path) -> torch.Tensor:
    """The train-set index of every row of images.pt of a real-image set ([N, k*k] for a k x k mosaic)."""
    return load_tensors(Path(recover_dir) / "indices.pt", what="real-image indices")["indices"]
