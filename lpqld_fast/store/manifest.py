"""The manifest of a label store: what relabel stored, from which images, teacher and settings.

:func:`label_store_manifest` builds it from the resolved relabel settings; the writer records it in
``manifest.json`` (with ``complete`` and ``files`` added) and a resumed run must rebuild it identically.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lpqld_fast import __version__
from lpqld_fast.store.quantize import index_dtype_for

__all__ = ["AUGMENT_ORDER", "KEPT_IDS_RULE", "SCORED_IDS_RULE", "RNG_RULE", "label_store_manifest"]

# How relabel draws its random streams, recorded so that a store can be regenerated without this code.
KEPT_IDS_RULE = ("all ids if K == total, else sorted(torch.randperm(total, "
                 "generator=seeded_generator(seed, 'keep', 0))[:K])")
SCORED_IDS_RULE = ("relabel.keep=confident|uncertain: every batch id drawn and labelled as stored, scored by the "
                   "mean over its rows of the teacher's max softmax probability; the K ids of highest (confident) "
                   "or lowest (uncertain) score, ties by lower id, sorted")
RNG_RULE = ("torch.Generator().manual_seed(derive_seed(seed, tag, index)), derive_seed = low 63 bits of the "
            "first 8 bytes (little endian) of sha256('lpqld-relabel/{tag}/{seed}/{index}'); tags: keep/0 kept "
            "ids, epoch/e image permutation randperm(N) of epoch e, batch/b augmentation of batch id b drawn "
            "as boxes, flips, cutout, cutmix")
AUGMENT_ORDER = "gather, crop_resize_flip (0..255), cutout, (x/255-mean)/std, cutmix"


def label_store_manifest(cfg: dict[str, Any], *, seed: int, teacher_sha256: str, images_sha256: str,
                         num_images: int, image_shape: Sequence[int], out_size: Sequence[int], mean: list[float],
                         std: list[float], num_classes: int, batches_per_epoch: int, num_kept: int,
                         stored_k: int, labeller_sha256: str | None = None) -> dict[str, Any]:
    """The manifest of a store of ``num_kept`` of ``cfg["epochs"] * batches_per_epoch`` batches.

    ``cfg``: the normalised relabel section (relabel.normalize_config); ``num_images`` images of
    ``image_shape`` [C, H, W]; ``stored_k``: values stored per sample. The key order is part of the manifest's bytes.
    ``labeller_sha256``: the hash of the model that labelled, when it is not the teacher (an ensemble); the key
    is absent otherwise, so stores labelled by the teacher keep their manifest.
    """
    epochs = cfg["epochs"]
    labeller = {} if labeller_sha256 is None else {"labeller_sha256": labeller_sha256}
    return {
        "code_version": __version__,
        "config": cfg,
        "seed": seed,
        "teacher_sha256": teacher_sha256,
        **labeller,
        "images_sha256": images_sha256,
        "num_images": num_images,
        "image_shape": list(image_shape),
        "out_size": list(out_size),
        "mean": mean,
        "std": std,
        "num_classes": num_classes,
        "batch_size": cfg["batch_size"],
        "epochs": epochs,
        "batches_per_epoch": batches_per_epoch,
        "total_batches": epochs * batches_per_epoch,
        "prune_ratio": cfg["prune_ratio"],
        "num_kept": num_kept,
        "kept_batch_ids": {"count": num_kept, "component": "batch_ids",
                           "rule": KEPT_IDS_RULE if cfg.get("keep", "random") == "random" else SCORED_IDS_RULE},
        "label": {"mode": cfg["label"], "k": cfg["k"], "stored_k": stored_k, "value_dtype": cfg["value_dtype"],
                  "index_dtype": None if cfg["label"] == "dense" else str(index_dtype_for(num_classes)),
                  "temperature": cfg["temperature"]},
        "augment": {"rrc_scale": cfg["rrc_scale"], "rrc_ratio": cfg["rrc_ratio"], "flip": cfg["flip"],
                    "cutmix": cfg["cutmix"], "cutout": cfg["cutout"], "cutout_factor": cfg["cutout_factor"],
                    "order": AUGMENT_ORDER},
        "rng": RNG_RULE,
    }
