"""Multi-process runs with ``torch.distributed``: the process group, collectives and sharding.

This is the bottom layer: it imports nothing else of the package. What builds on it lives with its user:
DDP and synchronised BatchNorm in :mod:`lpqld_fast.ddp`, the sharded evaluations in
:mod:`lpqld_fast.evaluation`, the sharded relabel in :mod:`lpqld_fast.relabel`.

Launch (docs/LAUNCH.md has every stage and the multi-node form)::

    torchrun --standalone --nproc_per_node=2 -m lpqld_fast.cli squeeze --out RUN ...
    torchrun --standalone --nproc_per_node=8 -m lpqld_fast.cli distill --device cuda --out RUN ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
:func:`init_from_env` (called by the CLI) starts the default process group
when WORLD_SIZE > 1: gloo for CPU devices, NCCL for CUDA (each rank on
``cuda:LOCAL_RANK``). Without torchrun (or WORLD_SIZE=1) every helper here is
a no-op and the stages run exactly as before. The run directory must be on a
filesystem that every rank sees (one node: any local path; several nodes:
a shared one): ranks exchange unit files, store slots and checkpoints through it.

How each stage splits its work, and why it equals one process:
- squeeze, class statistics: batch b of the global (seeded) order goes to rank
  b % world and its augmentation comes from a generator seeded by (seed, b), so
  every image is seen once with the same pixels whatever the world size; the
  per-rank exact float64 (count, mean, M2) are combined by
  :func:`all_reduce_moments_` (see there for the numerics).
- squeeze, teacher training / train, student: DDP. Every rank draws the same
  global batch and keeps its contiguous slice (:func:`batch_share`); BatchNorm
  is synchronised (:func:`lpqld_fast.ddp.ddp_model`: torch.nn.SyncBatchNorm on CUDA,
  :class:`lpqld_fast.ddp.CPUSyncBatchNorm` on CPU/gloo, where torch's refuses CPU tensors) and
  each rank's mean loss is weighted by world * n_local / B, so the averaged
  gradient is the 1-process full-batch gradient up to float summation order.
- recover: groups of classes (the same groups 1 process forms) round-robin over ranks.
- relabel: contiguous ranges of store slots, one store (:func:`lpqld_fast.relabel.run_relabel_sharded`).
- writes of shared files (configs, checkpoints, metrics, manifests) happen on
  rank 0 only, with barriers where another rank reads them.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "env_world_size", "init_from_env", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main",
    "barrier", "all_reduce_", "all_reduce_scalar", "all_reduce_min_int", "shard_slice", "shard_range", "batch_share",
    "gather_rows", "all_reduce_moments_", "on_main",
]

DEFAULT_TIMEOUT = timedelta(minutes=30)


# --------------------------------------------------------------------------- process group


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 without it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu", backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> str:
    """Start the default process group from torchrun's variables when WORLD_SIZE > 1; return this rank's device.

    ``device`` "cuda" becomes ``cuda:LOCAL_RANK`` (and the current CUDA device);
    the backend defaults to NCCL for CUDA and gloo otherwise. Idempotent.
    """
    ws = env_world_size()
    dev = torch.device(device)
    if ws <= 1:
        return device
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was given but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if not is_initialized():
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE={ws} but {var} is not set: launch with torchrun "
                                 "(see docs/LAUNCH.md)")
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {"backend": backend, "init_method": "env://", "timeout": timeout}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return str(dev)


def shutdown() -> None:
    """Destroy the default process group (if any)."""
    if is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where tensors must live for collectives: the current CUDA device under NCCL, else CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of ``t`` (any device; copied through the backend's device if needed)."""
    if world_size() == 1:
        return t
    red = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op]
    dev = _comm_device()
    if t.device == dev and t.is_contiguous():
        dist.all_reduce(t, op=red)
        return t
    buf = t.detach().contiguous().to(dev)
    dist.all_reduce(buf, op=red)
    t.copy_(buf)
    return t


def all_reduce_scalar(value: float, op: str = "sum") -> float:
    """A Python float reduced over ranks in float64 (identity for 1 process)."""
    if world_size() == 1:
        return value
    return float(all_reduce_(torch.tensor([value], dtype=torch.float64), op)[0])


def all_reduce_min_int(value: int) -> int:
    if world_size() == 1:
        return int(value)
    return int(all_reduce_(torch.tensor([int(value)], dtype=torch.int64), "min")[0])


def on_main(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` on rank 0 only, then barrier (other ranks may then read what it wrote); its result on rank 0."""
    out = fn(*args, **kwargs) if is_main() else None
    barrier()
    return out


# --------------------------------------------------------------------------- sharding


def shard_slice(n: int, r: int | None = None, ws: int | None = None) -> slice:
    """Rank ``r``'s contiguous part of n items, split like ``torch.tensor_split(n, ws)``."""
    r = rank() if r is None else r
    ws = world_size() if ws is None else ws
    q, rem = divmod(n, ws)
    start = r * q + min(r, rem)
    return slice(start, start + q + (1 if r < rem else 0))


def shard_range(n: int, r: int | None = None, ws: int | None = None) -> range:
    s = shard_slice(n, r, ws)
    return range(s.start, s.stop)


def batch_share(batch: int) -> tuple[slice, float]:
    """This rank's rows of a global batch and the weight world * n_local / batch of its mean loss.

    DDP averages gradients over ranks, so mean_local_loss * weight on every rank
    averages to the full-batch mean loss, also for uneven splits. The weight is
    exactly 1.0 in one process (and for even splits).
    """
    ws = world_size()
    if ws == 1:
        return slice(0, batch), 1.0
    if batch < ws:
        raise ValueError(f"batch size {batch} is smaller than the number of ranks {ws}: every rank needs samples")
    sl = shard_slice(batch)
    return sl, ws * (sl.stop - sl.start) / batch


def gather_rows(local: torch.Tensor, batch: int) -> torch.Tensor:
    """Inverse of :func:`batch_share`: the full [batch, ...] tensor from every rank's rows, in rank order."""
    ws = world_size()
    if ws == 1:
        return local
    sizes = [shard_slice(batch, r, ws) for r in range(ws)]
    most = max(s.stop - s.start for s in sizes)
    dev = _comm_device()
    buf = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=dev)
    buf[:local.shape[0]] = local.detach().to(dev)
    parts = [torch.empty_like(buf) for _ in range(ws)]
    dist.all_gather(parts, buf)
    return torch.cat([p[:s.stop - s.start] for p, s in zip(parts, sizes)]).to(local.device)


# --------------------------------------------------------------------------- class-wise moments


def all_reduce_moments_(count: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor,
                        samples: torch.Tensor | None = None) -> None:
    """Combine every rank's class-wise float64 (count [K], mean [K, C], M2 [K, C]) in place, identically on all ranks.

    Two all-reduces of sums of nonnegative or well-conditioned terms:
    1. N = sum_r n_r and S = sum_r n_r * mean_r, so mu = S / N;
    2. M2 = sum_r (M2_r + n_r * (mean_r - mu)^2)  (Chan's merge, centred at the global mean).
    Every term of the second sum is >= 0, so nothing cancels, unlike the one-pass
    form sum_r (M2_r + n_r mean_r^2) - N mu^2, which loses about log10(mu^2 / var)
    digits (BN inputs with |mean| >> std). Compared with all-gathering the states
    and merging them in rank order (equally exact), it needs no world-sized buffers:
    for ImageNet-21K and ResNet-18 (20 BN layers, 4,800 channels) the state is
    10,450 x 4,800 x (mean, M2) x 8 B = 0.8 GB per rank, and the all-gather would hold
    world times that, while this holds 3 temporaries of one layer ([K, C_l]). Every
    rank ends with the same bits. The result equals 1 process up to float64 rounding
    (relative ~1e-15), so the float32 statistics almost always match bit for bit.
    Empty classes stay count 0, mean 0, M2 0.
    """
    if world_size() == 1:
        return
    n = all_reduce_(count.clone())
    s = all_reduce_(mean * count[:, None])
    mu = s / n.clamp_min(1.0)[:, None]
    del s
    d = mean - mu
    part = m2 + count[:, None] * d * d
    del d
    all_reduce_(part)
    mean.copy_(mu)
    m2.copy_(part)
    count.copy_(n)
    if samples is not None:
        all_reduce_(samples)
