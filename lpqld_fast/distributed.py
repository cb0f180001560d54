"""Multi-process runs with ``torch.distributed``: every stage under torchrun, same results as 1 process.

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
  is synchronised (:func:`ddp_model`: torch.nn.SyncBatchNorm on CUDA,
  :class:`CPUSyncBatchNorm` on CPU/gloo, where torch's refuses CPU tensors) and
  each rank's mean loss is weighted by world * n_local / B, so the averaged
  gradient is the 1-process full-batch gradient up to float summation order.
- recover: groups of classes (the same groups 1 process forms) round-robin over ranks.
- relabel: contiguous ranges of store slots, one store (:func:`run_relabel_sharded`).
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
import torch.nn.functional as F
from torch import nn

__all__ = [
    "env_world_size", "init_from_env", "shutdown", "is_initialized", "rank", "world_size", "local_rank", "is_main",
    "barrier", "all_reduce_", "all_reduce_scalar", "all_reduce_min_int", "shard_slice", "shard_range", "batch_share",
    "gather_rows", "all_reduce_moments_", "CPUSyncBatchNorm", "convert_sync_batchnorm", "ddp_model", "unwrap",
    "evaluate_sharded", "evaluate_sharded_metrics", "run_relabel_sharded", "on_main",
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


# --------------------------------------------------------------------------- synchronised BatchNorm on CPU


class _SyncBNFunction(torch.autograd.Function):
    """Training-mode BatchNorm over the union of every rank's batch (gloo all-reduces of float64 sums)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):  # type: ignore[override]
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        local_n = xf.numel() // max(c, 1)
        xd = xf.double()
        stats = torch.cat([xd.sum(dims), (xd * xd).sum(dims), torch.tensor([float(local_n)], dtype=torch.float64)])
        del xd
        all_reduce_(stats)
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0.0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_((mean * momentum).to(running_mean.dtype))
                unbiased = var * (total / (total - 1)) if float(total) > 1 else var
                running_var.mul_(1 - momentum).add_((unbiased * momentum).to(running_var.dtype))
        shape = [1, c] + [1] * (x.dim() - 2)
        mean_f, invstd_f = mean.float().view(shape), invstd.float().view(shape)
        xhat = (xf - mean_f) * invstd_f
        y = xhat
        if weight is not None:
            y = y * weight.float().view(shape) + bias.float().view(shape)
        ctx.save_for_backward(xf, weight, mean_f, invstd_f)
        ctx.total = float(total)
        ctx.in_dtype = x.dtype
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        xf, weight, mean_f, invstd_f = ctx.saved_tensors
        dims = [0, *range(2, xf.dim())]
        shape = mean_f.shape
        c = xf.shape[1]
        dyf = dy.float()
        xhat = (xf - mean_f) * invstd_f
        sum_dy = dyf.double().sum(dims)
        sum_dy_xhat = (dyf.double() * xhat.double()).sum(dims)
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        red = all_reduce_(torch.cat([sum_dy, sum_dy_xhat]))  # the other ranks' samples depend on these stats too
        g_dy = (red[:c] / ctx.total).float().view(shape)
        g_dyx = (red[c:] / ctx.total).float().view(shape)
        scale = invstd_f if weight is None else invstd_f * weight.float().view(shape)
        dx = (dyf - g_dy - xhat * g_dyx) * scale
        return dx.to(ctx.in_dtype), grad_weight, grad_bias, None, None, None, None


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics span every rank's batch, on CPU (gloo).

    torch.nn.SyncBatchNorm refuses CPU tensors. This one all-reduces float64
    per-channel sums (count, sum, sum of squares) in the forward pass and
    (sum dy, sum dy * xhat) in the backward pass, like SyncBatchNorm; the
    weight/bias gradients stay local (DDP averages them). Eval mode and 1
    process are plain BatchNorm. State-dict compatible with BatchNorm*d.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and world_size() > 1):
            return super().forward(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        rm = self.running_mean if self.track_running_stats else None
        rv = self.running_var if self.track_running_stats else None
        return _SyncBNFunction.apply(input, self.weight, self.bias, rm, rv, self.eps, factor)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm*d in ``module`` by :class:`CPUSyncBatchNorm`, sharing parameters and buffers."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
        new = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def ddp_model(model: nn.Module, device: str | torch.device = "cpu", sync_bn: bool = True) -> nn.Module:
    """``model`` itself for 1 process; else BatchNorm synchronised (in place) and wrapped in DDP.

    Build the optimizer after this call or before it (parameters are shared
    either way); save ``unwrap(net).state_dict()`` (keys without "module.").
    """
    if world_size() == 1:
        return model
    dev = torch.device(device)
    if sync_bn:
        if dev.type == "cuda":
            converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            converted = convert_sync_batchnorm(model)
        if converted is not model:
            raise ValueError("the model itself is a BatchNorm layer; wrap it in a module first")
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Synchronised BN keeps the running stats equal on every rank: no per-forward buffer broadcast needed
    # (buffers are still synced once at construction). Newer torch renamed broadcast_buffers.
    import inspect

    key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters \
        else "broadcast_buffers"
    return DDP(model, device_ids=[dev] if dev.type == "cuda" else None, **{key: not sync_bn})


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def slice_soft_labels(labels: Any, rows: slice) -> Any:
    """A SoftLabels restricted to ``rows`` (every field is batch-first)."""
    from lpqld_fast.store.quantize import SoftLabels

    if rows == slice(0, labels.values.shape[0]):
        return labels
    cut = (lambda t: None if t is None else t[rows])  # noqa: E731
    return SoftLabels(labels.mode, cut(labels.values), cut(labels.indices), cut(labels.fill), cut(labels.scale),
                      cut(labels.offset))


# --------------------------------------------------------------------------- evaluation


def evaluate_sharded(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, mean, std,
                     **kwargs: Any) -> float:
    """:func:`lpqld_fast.engine.evaluate` with the test set split over ranks; the same number on every rank."""
    return evaluate_sharded_metrics(model, images_uint8, labels, mean, std, **kwargs)["acc"]


def evaluate_sharded_metrics(model: nn.Module, images_uint8: torch.Tensor, labels: torch.Tensor, mean, std,
                             **kwargs: Any) -> dict[str, float]:
    """Top-1 accuracy (%) and mean NLL of ``model``, the split shared over ranks; the same on every rank.

    Each rank counts its contiguous part (:func:`lpqld_fast.engine.eval_counts`); the sums are
    all-reduced in float64, so the accuracy equals the 1-process value exactly.
    """
    from lpqld_fast.engine import eval_counts

    model = unwrap(model)
    sl = shard_slice(len(labels)) if world_size() > 1 else slice(0, len(labels))
    if sl.stop > sl.start:
        correct, nll, n = eval_counts(model, images_uint8[sl], labels[sl], mean, std, **kwargs)
    else:
        correct, nll, n = 0, 0.0, 0
    if world_size() > 1:
        sums = torch.tensor([correct, nll, n], dtype=torch.float64)
        all_reduce_(sums)
        correct, nll, n = int(sums[0]), float(sums[1]), int(sums[2])
    return {"acc": 100.0 * correct / max(n, 1), "nll": nll / max(n, 1)}


# --------------------------------------------------------------------------- relabel


def run_relabel_sharded(*args: Any, out_dir: str | os.PathLike, progress: bool = True, **kwargs: Any):
    """:func:`lpqld_fast.relabel.run_relabel` with the store slots split over ranks, one store.

    Protocol (the writer's multi-writer contract): rank 0 creates the store (or
    resumes / finds it complete) writing no slot; barrier; every rank writes its
    contiguous slot range (unfinished slots only, so a killed run resumes);
    barrier; rank 0 checksums and finalises; barrier; every rank opens the store.
    Slot bytes depend only on (seed, batch id), so the finished store is byte for
    byte the 1-process one (same per-process thread count; torchrun's default
    OMP_NUM_THREADS=1 — pin it in both runs when comparing).
    """
    from lpqld_fast.relabel import run_relabel
    from lpqld_fast.store import LabelStore

    if world_size() == 1:
        return run_relabel(*args, out_dir=out_dir, progress=progress, **kwargs)
    from lpqld_fast.io_utils import read_json
    from pathlib import Path

    done = None
    if is_main():
        done = run_relabel(*args, out_dir=out_dir, progress=False, slot_range=range(0), finalize=False, **kwargs)
    barrier()
    manifest = read_json(Path(out_dir) / "manifest.json", "label store manifest")
    if not manifest.get("complete"):
        mine = shard_range(int(manifest["num_kept"]))
        run_relabel(*args, out_dir=out_dir, progress=progress and is_main(), slot_range=mine, finalize=False,
                    **kwargs)
        barrier()
        if is_main():
            done = run_relabel(*args, out_dir=out_dir, progress=False, slot_range=range(0), finalize=True, **kwargs)
    barrier()
    if done is not None:
        return done
    return LabelStore.open(out_dir, expect_teacher_sha256=kwargs["teacher_sha256"],
                           expect_images_sha256=kwargs["images_sha256"], verify="size")
