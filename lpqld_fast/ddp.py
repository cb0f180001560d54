"""DDP wrapping with synchronised BatchNorm, for teacher (squeeze) and student (train) training.

:func:`ddp_model` returns the model itself in one process; under torchrun it synchronises BatchNorm
(torch.nn.SyncBatchNorm on CUDA, :class:`CPUSyncBatchNorm` on CPU/gloo, where torch's refuses CPU tensors)
and wraps the model in DistributedDataParallel. The collectives come from :mod:`lpqld_fast.distributed`.
"""
from __future__ import annotations

import torch
from torch import nn

from lpqld_fast.distributed import all_reduce_, world_size

__all__ = ["CPUSyncBatchNorm", "convert_sync_batchnorm", "ddp_model", "unwrap"]


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

