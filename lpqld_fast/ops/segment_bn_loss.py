"""Fused segmented BN-statistics matching loss (recover with many classes per forward pass).

For x [N, C, *spatial], segment_ids [N] in [0, S) and constant targets
target_mean, target_var [S, C], per segment s:

    mu_s  = mean of x over (samples of segment s, spatial)         [C]
    var_s = BIASED variance over the same elements                  [C]
    loss_s = ||target_mean[s] - mu_s||_2 + ||target_var[s] - var_s||_2

with plain (not squared) L2 norms over the channels (DESIGN 2.2, Eq. 6 of
paper 002 per class segment). Returns loss [S]: float32, or float64 for
float64 x; an empty segment gives 0 and no gradient.

Forward: one pass over x for the per-segment moments (per (sample, channel)
row an exact mean/M2 while the row is in cache, rows combined per segment in
float64), the loss from the [S, C] moments. Backward: one elementwise pass,

    dloss_s/dx[n, c, l] = (mu - tm)[c] / ||mu - tm|| / n_s
                        + 2 (var - tv)[c] / ||var - tv|| * (x - mu[c]) / n_s

for n in segment s, n_s = (samples in s) * spatial size; a norm that is
exactly 0 contributes a zero gradient (the convention of
torch.linalg.vector_norm). Computation is in float32 for float16/bfloat16/
float32 x (float64 moments) and float64 for float64 x.

The targets are constants: they are detached and get no gradient (a target
with requires_grad=True is allowed; its .grad stays untouched). Double
backward is not supported. The CPU kernel reads a channels_last x in place
(and returns its gradient channels_last); other non-contiguous inputs, and
any non-contiguous input of the GPU kernels, are copied to contiguous first.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path

import torch

from lpqld_fast.ops import _validate as V
from lpqld_fast.ops._dispatch import native_has_kernel, resolve_backend
from lpqld_fast.ops._layout import is_nlc, kernel_x3
from lpqld_fast.ops.reference import segment_bn_loss as ref

OP = "segment_bn_loss"
NATIVE_OP = "segment_bn_loss_fwd"  # lpqld::<schema> of the C++/CUDA forward (the backward ships with it)

__all__ = ["segment_bn_loss", "bn_eval_segment_loss", "bn_eval_act", "OP", "NATIVE_OP"]


def _check_inputs(x: object, segment_ids: object, target_mean: object, target_var: object,
                  validate: bool = True) -> None:
    """Structural checks always (no device work); with ``validate`` also the data checks (finite targets,
    segment ids in range), which on a GPU wait for the device (one sync each)."""
    V.check_tensor("x", x, ndim=range(2, 8), dtypes=V.FLOAT_DTYPES)
    assert isinstance(x, torch.Tensor)
    if x.shape[1] < 1 or any(d < 1 for d in x.shape[2:]):
        raise ValueError(f"x must have at least one channel and non-empty spatial dims, got shape {tuple(x.shape)}")
    V.check_tensor("segment_ids", segment_ids, ndim=1, dtypes=V.INDEX_DTYPES, device=x.device)
    assert isinstance(segment_ids, torch.Tensor)
    if segment_ids.shape[0] != x.shape[0]:
        raise ValueError(f"segment_ids has {segment_ids.shape[0]} entries but x has {x.shape[0]} samples")
    V.check_tensor("target_mean", target_mean, ndim=2, dtypes=V.FLOAT_DTYPES, device=x.device)
    assert isinstance(target_mean, torch.Tensor)
    num_segments, channels = target_mean.shape
    if num_segments < 1:
        raise ValueError(f"target_mean must hold at least one segment, got shape {tuple(target_mean.shape)}")
    if channels != x.shape[1]:
        raise ValueError(f"target_mean has {channels} channels but x has {x.shape[1]} (x is [N, C, ...])")
    V.check_tensor("target_var", target_var, ndim=2, dtypes=V.FLOAT_DTYPES, device=x.device)
    assert isinstance(target_var, torch.Tensor)
    V.check_shape("target_var", target_var, tuple(target_mean.shape))
    if validate:
        check_segment_data(segment_ids, target_mean, target_var)


def check_segment_data(segment_ids: torch.Tensor, target_mean: torch.Tensor, target_var: torch.Tensor) -> None:
    """The data checks of segment_bn_loss: finite targets, segment ids in [0, S). Callers that reuse the same
    ids and targets for many calls (recover's passes) run this once and call the ops with validate=False."""
    V.check_finite("target_mean", target_mean)
    V.check_finite("target_var", target_var)
    V.check_index_range("segment_ids", segment_ids, target_mean.shape[0], what="segment id")


@functools.lru_cache(maxsize=None)
def _triton_module():
    """lpqld_fast.kernels.segment_bn_loss, also from a source checkout that is not installed."""
    try:
        return importlib.import_module("lpqld_fast.kernels.segment_bn_loss")
    except ImportError:
        pass
    path = Path(__file__).resolve().parents[2] / "kernels" / "segment_bn_loss.py"
    if not path.is_file():
        raise RuntimeError(f"{OP}: the Triton kernel is not installed (looked for lpqld_fast.kernels and {path})")
    spec = importlib.util.spec_from_file_location("_lpqld_kernels_segment_bn_loss", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _kernel_targets(segment_ids: torch.Tensor, target_mean: torch.Tensor,
                    target_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """segment ids as contiguous int64 and the targets as contiguous float64 constants."""
    return (segment_ids.to(torch.int64).contiguous(), target_mean.detach().to(torch.float64).contiguous(),
            target_var.detach().to(torch.float64).contiguous())


class _SegmentBNLoss(torch.autograd.Function):
    """The Triton kernels' forward/backward (cpp and cuda run the lpqld::segment_bn_loss op); targets are
    constants."""

    @staticmethod
    def forward(ctx, x, segment_ids, target_mean, target_var):  # type: ignore[override]
        x3 = kernel_x3(x, keep_nlc=False)
        seg, tm, tv = _kernel_targets(segment_ids, target_mean, target_var)
        loss, mean, var, count = _triton_module().segment_bn_loss_fwd(x3, seg, tm, tv)
        ctx.x_shape = x.shape
        # Hand the gradient back in x's layout (as the native op does).
        ctx.channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(x3, seg, tm, tv, mean, var, count)
        return loss.to(ref.out_dtype_for(x.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        x3, seg, tm, tv, mean, var, count = ctx.saved_tensors
        g = grad_loss.to(torch.float64).contiguous()
        grad = _triton_module().segment_bn_loss_bwd(g, x3, seg, tm, tv, mean, var, count).view(ctx.x_shape)
        if ctx.channels_last:
            grad = grad.contiguous(memory_format=torch.channels_last)
        return grad, None, None, None


def segment_bn_loss(
    x: torch.Tensor,
    segment_ids: torch.Tensor,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Per-segment BN-statistics matching loss [S]; differentiable w.r.t. x only.

    x [N, C, *spatial] float32/float16/bfloat16/float64; segment_ids [N]
    integer in [0, S); target_mean, target_var [S, C] finite floats (constants,
    no gradient). loss[s] = ||target_mean[s] - mu_s|| + ||target_var[s] - var_s||
    with mu_s / var_s the mean / biased variance of x over (samples of segment
    s, spatial); 0 for empty segments. ``backend`` forces "reference", "cpp",
    "cuda" or "triton" (default: by device, see lpqld_fast.ops._dispatch). ``validate=False`` skips the
    data checks (check_segment_data: a device sync each on a GPU) for ids and targets checked before.
    """
    _check_inputs(x, segment_ids, target_mean, target_var, validate)
    chosen = resolve_backend(OP, x.device, backend, NATIVE_OP)
    if chosen == "reference":
        return ref.segment_bn_loss(x, segment_ids, target_mean, target_var)
    # targets are constants: detached, so a target with requires_grad does not make the loss require grad
    if chosen == "triton":
        return _SegmentBNLoss.apply(x, segment_ids, target_mean.detach(), target_var.detach())
    return torch.ops.lpqld.segment_bn_loss(x, segment_ids, target_mean.detach(), target_var.detach())


def _check_affine(x: torch.Tensor, scale: object, shift: object, pool: object, validate: bool = True) -> None:
    for name, t in (("scale", scale), ("shift", shift)):
        V.check_tensor(name, t, ndim=1, dtypes=V.FLOAT_DTYPES, device=x.device)
        assert isinstance(t, torch.Tensor)
        if t.shape[0] != x.shape[1]:
            raise ValueError(f"{name} has {t.shape[0]} channels but x has {x.shape[1]} (x is [N, C, ...])")
        if validate:
            V.check_finite(name, t)
    if pool not in (1, 2):
        raise ValueError(f"pool must be 1 (none) or 2 (2x2 average), got {pool!r}")
    if pool == 2 and (x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2):
        raise ValueError(f"pool=2 needs x [N, C, H, W] with H, W >= 2, got shape {tuple(x.shape)}")


def _torch_bn_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, relu: bool, pool: int) -> torch.Tensor:
    """The same map with torch's elementwise / pool kernels, for the backends without a fused kernel: the
    affine in float32 at least (float64 for float64 x), y in x's dtype and layout. (Not batch_norm with
    mean 0, var 1, eps 0: torch refuses eps = 0 on some versions, caught by the GPU tests.)"""
    acc = ref.out_dtype_for(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = torch.addcmul(shift.to(acc).view(shape), x.to(acc), scale.to(acc).view(shape)).to(x.dtype)
    if relu:
        y = torch.relu(y)
    return torch.nn.functional.avg_pool2d(y, 2) if pool == 2 else y


def _native_bn_act(x: torch.Tensor, x3: torch.Tensor, s: torch.Tensor, b: torch.Tensor, relu: bool,
                   pool: int) -> torch.Tensor:
    """y of the CPU kernels, allocated in its final shape so that it is not a view (autograd refuses in-place
    ops such as a ResNet's ReLU(inplace=True) or ``out += identity`` on view outputs of a Function)."""
    n, c = x.shape[0], x.shape[1]
    if pool == 2:  # channels-last [N, C, H/2, W/2]; its [N, C, L/4] view has the kernel's strides
        y = torch.empty((n, c, x.shape[2] // 2, x.shape[3] // 2), dtype=x.dtype, device=x.device,
                        memory_format=torch.channels_last)
        torch.ops.lpqld.bn_eval_act_pool2(x3, s, b, relu, x.shape[-1], y.view(n, c, -1))
        return y
    y = torch.empty_like(x)  # x's layout: x3's too (a view of x, or contiguous)
    y3 = y.view(x3.shape)
    if any(d > 1 and sy != sx for d, sy, sx in zip(x3.shape, y3.stride(), x3.stride())):
        y3 = torch.empty_like(x3)  # a layout empty_like(x) does not reproduce: x3's, then a copy (rare)
        torch.ops.lpqld.bn_eval_act(x3, s, b, relu, y3)
        return y3.view(x.shape).clone()
    torch.ops.lpqld.bn_eval_act(x3, s, b, relu, y3)
    return y


def bn_eval_segment_loss(
    x: torch.Tensor,
    segment_ids: torch.Tensor,
    target_mean: torch.Tensor,
    target_var: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    relu: bool = False,
    pool: int = 1,
    backend: str | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm (+ the ReLU and 2x2 average pool after it) that also returns segment_bn_loss of x.

    Returns (y, loss): y = relu?(x * scale[c] + shift[c]) in x's dtype (computed in float32, float64 for
    float64 x), i.e. BatchNorm in eval mode with scale = weight / sqrt(running_var + eps) and shift = bias -
    running_mean * scale; with ``pool=2`` (x [N, C, H, W]) followed by avg_pool2d(y, 2) (floor mode);
    loss = segment_bn_loss(x, segment_ids, target_mean, target_var). Differentiable w.r.t. x through both
    outputs. On CPU with the extension the forward is two passes over x (moments; y, pooled without
    writing the full-size map for a channels-last x) and the backward one (loss gradient + the BN path's
    gradient, masked by the ReLU, spread over the pool window), instead of autograd's pool, ReLU, BN and
    loss backwards and the sum of the two gradients; other backends compose torch's BN / ReLU / pool with
    their segment_bn_loss (same values up to rounding). ``validate=False``: as in segment_bn_loss, and the
    affine is not checked for NaN/inf either.
    """
    _check_inputs(x, segment_ids, target_mean, target_var, validate)
    _check_affine(x, scale, shift, pool, validate)
    chosen = resolve_backend(OP, x.device, backend, NATIVE_OP)
    if chosen == "cpp" and native_has_kernel("bn_eval_act_pool2", "CPU"):
        # The pooled kernel reads a channels-last x; other layouts pool with torch after the op.
        fused_pool = pool == 1 or x.shape[1] == 1 or (
            x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        y, loss = torch.ops.lpqld.bn_eval_segment_loss(x, segment_ids, target_mean.detach(), target_var.detach(),
                                                       scale.detach(), shift.detach(), bool(relu),
                                                       pool if fused_pool else 1)
        return (y, loss) if fused_pool else (torch.nn.functional.avg_pool2d(y, 2), loss)
    bn_act = ref.bn_eval_act if chosen == "reference" else _torch_bn_act
    y = bn_act(x, scale.detach(), shift.detach(), bool(relu), pool)
    return y, segment_bn_loss(x, segment_ids, target_mean, target_var, backend=chosen, validate=False)


def bn_eval_act(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, *, relu: bool = False, pool: int = 1,
                backend: str | None = None, validate: bool = True) -> torch.Tensor:
    """Eval-mode BatchNorm (+ ReLU, + 2x2 average pool) for inference: y as in bn_eval_segment_loss, no loss.

    The CPU kernel (one read of x, only the pooled map written for a channels-last x) runs when nothing
    needs a gradient; with autograd recording, or on other devices, torch's BatchNorm / ReLU / pool kernels
    (backend "reference": the float oracle). ``validate=False`` skips the NaN/inf check of scale and shift
    (a device sync on a GPU, a graph break under torch.compile).
    """
    V.check_tensor("x", x, ndim=range(2, 8), dtypes=V.FLOAT_DTYPES)
    _check_affine(x, scale, shift, pool, validate)
    chosen = resolve_backend(OP, x.device, backend, NATIVE_OP)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or shift.requires_grad)
    if chosen == "cpp" and not needs_grad and native_has_kernel("bn_eval_act_pool2", "CPU"):
        c = x.shape[1]
        x3 = kernel_x3(x, keep_nlc=True)
        acc = ref.out_dtype_for(x.dtype)
        s, b = scale.detach().to(acc).contiguous(), shift.detach().to(acc).contiguous()
        if pool == 1 or is_nlc(x3) or c == 1:
            return _native_bn_act(x, x3, s, b, bool(relu), pool)
        return torch.nn.functional.avg_pool2d(_native_bn_act(x, x3, s, b, bool(relu), 1), 2)
    return (ref.bn_eval_act if chosen == "reference" else _torch_bn_act)(x, scale, shift, bool(relu), pool)
