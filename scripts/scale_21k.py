"""ImageNet-21K-shaped scale run: 10,450 classes on small synthetic images, peak RSS per phase.

Phases (each in its own process, so that its peak RSS is its own):

    python scripts/scale_21k.py stats   --out DIR              # class-wise BN statistics (exact, float64)
    torchrun --standalone --nproc_per_node=2 scripts/scale_21k.py stats --out DIR   # the same on 2 gloo ranks
    python scripts/scale_21k.py relabel --out DIR --epochs E   # a top-k store of E * floor(N/B) batches
    python scripts/scale_21k.py train   --out DIR --epochs E   # one student epoch replayed from that store
    python scripts/scale_21k.py all     --out DIR              # all of the above at two store sizes + a table

Shapes: C = 10,450 classes, 1 x 16 x 16 images, a width-32 ConvNet-BN teacher and student
(random teacher, seeded: the point is size, not accuracy) with a 10,450-way head; statistics over 2 images per class
(20,900), distilled set = 1 image per class (N = 10,450), B = 32 (floor(N/B) = 326 batches
per stored epoch), MR-200 fp16 labels (25.6 KB per stored batch, so store size differences
are visible next to RSS noise). ``all`` runs relabel and train at E = 2 and E = 8 stored
epochs (652 and 2,608 batches) and reports whether peak RSS stays flat in the number of batches.
Each phase prints one ``RESULT {json}`` line; ``all`` prints a markdown table and ``SUMMARY {json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lpqld_fast import distributed  # noqa: E402

NUM_CLASSES = 10_450
IMAGE = 16
STATS_PER_CLASS = 2
WIDTH = 32  # ConvNet width: 3 BN layers of 32 channels, a 128 x 10,450 head (the classes are the point)
BATCH = 32
TOP_K = 200
SEED = 0


def _dataset(split: str, per_class: int):
    from lpqld_fast.data import SyntheticDataset

    return SyntheticDataset(num_classes=NUM_CLASSES, samples_per_class=per_class, in_chans=1, image_size=IMAGE,
                            split=split, seed=SEED)


def _teacher() -> torch.nn.Module:
    from lpqld_fast.models import get_model

    torch.manual_seed(SEED)
    return get_model("convnet-bn", num_classes=NUM_CLASSES, in_chans=1, image_size=IMAGE, width=WIDTH).eval()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_split_mb() -> dict:
    """Current anonymous (heap) and file-backed (mapped store pages, libraries) resident memory."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                key, value = line.split(":")
                out[key.lower().replace("rss", "rss_") + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    return out


class _RssSampler:
    """Peak anonymous and file-backed resident memory, sampled every few ms from a thread.

    ru_maxrss mixes the two: file-backed pages include the memory-mapped store rows the
    kernel maps around each read (fault-around, 64 KB windows), which are reclaimable page
    cache, while anonymous memory is the heap that must stay flat in the number of batches.
    """

    def __init__(self, every_s: float = 0.002) -> None:
        import threading

        self.every_s = every_s
        self.samples: dict[str, list[float]] = {"rss_anon_mb": [], "rss_file_mb": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for k, v in _rss_split_mb().items():
            self.samples[k].append(v)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def fields(self) -> dict:
        """Peak and 95th percentile (the level without millisecond transients) of each kind."""
        out = {}
        for k, v in self.samples.items():
            t = torch.tensor(v)
            out["peak_" + k] = round(float(t.max()), 1)
            out["p95_" + k] = round(float(t.quantile(0.95)), 1)
        return out


def _result(**kw) -> dict:
    kw["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    if distributed.is_main():
        print("RESULT " + json.dumps(kw), flush=True)
    return kw


def phase_stats(out: Path) -> dict:
    """Exact class-wise statistics of every BN input (squeeze.collect_class_stats) over 20,900 images."""
    import lpqld_fast.squeeze as squeeze
    from lpqld_fast.bn_stats import save_bn_stats
    from lpqld_fast.io_utils import sha256_tensors

    distributed.init_from_env("cpu")
    world = distributed.world_size()
    train = _dataset("train", STATS_PER_CLASS)
    teacher = _teacher()
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    cfg = {"stats_mode": "exact", "stats_batch_size": 500, "augment": "crop-flip", "crop_pad": 2}
    stats, layers = squeeze.collect_class_stats(teacher, "synthetic-21k", cfg, SEED, splits=lambda split: train)
    seconds = time.perf_counter() - t0
    channels = sum(stats[f"{n}.mean"].shape[1] for n in layers)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_bn_stats(out / f"bn_stats_w{world}.pt", stats, layers, "exact", sha256_tensors(teacher.state_dict()))
    peak = distributed.all_reduce_scalar(_peak_rss_mb(), "max")
    distributed.barrier()
    res = _result(phase="stats", world=world, classes=NUM_CLASSES, images=len(train), bn_channels=channels,
                  state_mb=round(NUM_CLASSES * channels * 16 / 2**20, 1), seconds=round(seconds, 2),
                  rss_before_mb=round(rss0, 1), max_rank_peak_rss_mb=round(peak, 1))
    distributed.shutdown()
    return res


def _distilled():
    ds = _dataset("train", STATS_PER_CLASS)
    first = torch.zeros(NUM_CLASSES, dtype=torch.int64)
    seen = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    for i, c in enumerate(ds.labels.tolist()):  # one image per class, in class order
        if not seen[c]:
            seen[c] = True
            first[c] = i
    return ds.images[first].clone(), torch.arange(NUM_CLASSES), ds.mean, ds.std


def _write_recover_dir(path: Path, images: torch.Tensor, labels: torch.Tensor, teacher_sha: str) -> str:
    """A minimal recover output (images.pt + manifest) that train's load_recovered accepts."""
    from lpqld_fast.io_utils import atomic_write_json, save_tensors, sha256_tensors

    sha = sha256_tensors({"images": images, "labels": labels})
    if not (path / "manifest.json").exists():
        save_tensors(path / "images.pt", {"images": images, "labels": labels})
        atomic_write_json(path / "manifest.json", {"schema": 1, "images_sha256": sha, "teacher_sha256": teacher_sha,
                                                   "num_images": len(labels), "num_classes": NUM_CLASSES,
                                                   "shape": list(images.shape[1:]), "dataset": "synthetic-21k"})
    return sha


def phase_relabel(out: Path, epochs: int) -> dict:
    from lpqld_fast.io_utils import sha256_tensors
    from lpqld_fast.relabel import run_relabel

    images, labels, mean, std = _distilled()
    teacher = _teacher()
    tsha = sha256_tensors(teacher.state_dict())
    isha = _write_recover_dir(out / "recover", images, labels, tsha)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    cfg = {"epochs": epochs, "batch_size": BATCH, "label": "mr", "k": TOP_K, "value_dtype": "fp16",
           "num_classes": NUM_CLASSES}
    with _RssSampler() as rss:
        store = run_relabel(images, labels, teacher, mean, std, cfg, out / f"store_e{epochs}", SEED,
                            teacher_sha256=tsha, images_sha256=isha, progress=False, commit_every=256)
    seconds = time.perf_counter() - t0
    nbytes = sum(f.stat().st_size for f in (out / f"store_e{epochs}").iterdir())
    return _result(phase="relabel", epochs=epochs, batches=len(store), store_mb=round(nbytes / 2**20, 2),
                   seconds=round(seconds, 2), rss_before_mb=round(rss0, 1), **rss.fields())


def phase_train(out: Path, epochs: int) -> dict:
    from functools import partial

    from lpqld_fast.models import get_model
    from lpqld_fast.train import run_train

    # The 10,450-class test split serves as the test set and as the pool of the validation split (train.val_size).
    test = _dataset("test", 1)
    config = {"dataset": "synthetic-21k", "train": {"model": "convnet-bn", "epochs": 1, "eval_every": 1,
                                                     "checkpoint_every": 1, "optimizer": "adamw", "lr": 1e-3}}
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    with _RssSampler() as rss:
        # Evaluate 10,450-way logits in batches of 200: smaller transient peaks, less RSS noise.
        summary = run_train(config, out / "recover", out / f"store_e{epochs}", out / f"train_e{epochs}", seed=SEED,
                            progress=False, splits=lambda split: test, build_model=partial(get_model, width=WIDTH),
                            eval_batch_size=200)
    metrics = json.loads((out / f"train_e{epochs}" / "train_metrics.json").read_text())
    return _result(phase="train", epochs=epochs, steps=NUM_CLASSES // BATCH, loss=metrics["epochs"][0]["loss"],
                   test_acc=summary["last_acc"], seconds=round(time.perf_counter() - t0, 2),
                   rss_before_mb=round(rss0, 1), **rss.fields())


def _child(args: list[str], torchrun: int = 0) -> dict:
    script = str(Path(__file__).resolve())
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}", script]
           if torchrun else [sys.executable, script]) + args
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT "):])


def phase_all(out: Path, small: int, large: int, world: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    rows = [_child(["stats", "--out", str(out)])]
    if world > 1:
        rows.append(_child(["stats", "--out", str(out)], torchrun=world))
    for e in (small, large):
        rows.append(_child(["relabel", "--out", str(out), "--epochs", str(e)]))
    for e in (small, large):
        rows.append(_child(["train", "--out", str(out), "--epochs", str(e)]))
    summary: dict = {"rows": rows}
    if world > 1:
        a = torch.load(out / "bn_stats_w1.pt")["tensors"]
        b = torch.load(out / f"bn_stats_w{world}.pt")["tensors"]
        summary["stats_max_rel_diff"] = max(float(((a[k].double() - b[k].double()).abs()
                                                    / (b[k].double().abs() + 1e-6)).max()) for k in a)
        summary["stats_bitwise_equal"] = all(torch.equal(a[k], b[k]) for k in a)
    rel = {r["epochs"]: r for r in rows if r["phase"] == "relabel"}
    trn = {r["epochs"]: r for r in rows if r["phase"] == "train"}
    summary["store_growth_mb"] = rel[large]["store_mb"] - rel[small]["store_mb"]
    for name, by in (("relabel", rel), ("train", trn)):
        for key in ("peak_rss_mb", "peak_rss_anon_mb", "p95_rss_anon_mb", "peak_rss_file_mb", "p95_rss_file_mb"):
            summary[f"{name}_{key}_growth"] = round(by[large][key] - by[small][key], 1)
    print("| phase | world | stored epochs | batches (steps) | store MB | seconds | RSS before | peak RSS | "
          "anon p95 / peak | file-backed p95 / peak |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        anon = f"{r['p95_rss_anon_mb']} / {r['peak_rss_anon_mb']}" if "p95_rss_anon_mb" in r else ""
        file = f"{r['p95_rss_file_mb']} / {r['peak_rss_file_mb']}" if "p95_rss_file_mb" in r else ""
        print(f"| {r['phase']} | {r.get('world', 1)} | {r.get('epochs', '')} | {r.get('batches', r.get('steps', ''))} "
              f"| {r.get('store_mb', '')} | {r['seconds']} | {r['rss_before_mb']} | "
              f"{r.get('max_rank_peak_rss_mb', r['peak_rss_mb'])} | {anon} | {file} |")
    print("SUMMARY " + json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    from lpqld_fast.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("phase", choices=["stats", "relabel", "train", "all"])
    p.add_argument("--out", required=True)
    p.add_argument("--epochs", type=int, default=8, help="stored epochs of the store (relabel/train)")
    p.add_argument("--small", type=int, default=2, help="all: stored epochs of the small store")
    p.add_argument("--large", type=int, default=8, help="all: stored epochs of the large store")
    p.add_argument("--world", type=int, default=2, help="all: also run the statistics on this many gloo ranks")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = Path(a.out)
    if a.phase == "stats":
        phase_stats(out)
    elif a.phase == "relabel":
        phase_relabel(out, a.epochs)
    elif a.phase == "train":
        phase_train(out, a.epochs)
    else:
        phase_all(out, a.small, a.large, a.world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
