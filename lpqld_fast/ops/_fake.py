"""Fake (meta) implementations of the lpqld::* native ops, for torch.compile, opcheck and FakeTensor.

Each returns empty tensors with the shape, dtype, device and strides the real CPU/CUDA kernel returns
(torch.compile plans memory from them), or None for the ops that write into their arguments. They work
on symbolic sizes. The extension names this module in its schemas (set_python_module), so torch imports
it when a fake tensor first meets an lpqld op; lpqld_fast.ops imports it when it loads the extension.
Ops missing from the loaded extension (an older build) are skipped.
"""
from __future__ import annotations

import torch

from lpqld_fast.ops._layout import kernel_x3

_LIB = "lpqld"


def _acc(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation / loss dtype, float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register() -> None:
    def reg(name: str):
        if hasattr(torch.ops.lpqld, name.split("::")[1]):
            return torch.library.register_fake(name)
        return lambda fn: fn

    @reg(f"{_LIB}::soft_label_kl_fwd")
    def _soft_label_kl_fwd(logits, values, indices, fill, scale, offset, mode, T, t_s, grad_scale):
        b, c = logits.shape
        return logits.new_empty((b,), dtype=_acc(logits.dtype)), logits.new_empty((b, c))

    @reg(f"{_LIB}::soft_label_kl")
    def _soft_label_kl(logits, values, indices, fill, scale, offset, mode, T, t_s, grad_scale):
        return logits.new_empty((), dtype=_acc(logits.dtype))

    @reg(f"{_LIB}::classwise_moments_accumulate_")
    def _classwise_moments_accumulate_(x, labels, count, mean, m2):
        return None

    @reg(f"{_LIB}::segment_bn_loss_fwd")
    def _segment_bn_loss_fwd(x, segment_ids, target_mean, target_var):
        s, c = target_mean.shape
        f64 = dict(dtype=torch.float64, device=x.device)
        return (torch.empty((s,), **f64), torch.empty((s, c), **f64), torch.empty((s, c), **f64),
                torch.empty((s,), dtype=torch.int64, device=x.device))

    @reg(f"{_LIB}::segment_bn_loss_bwd")
    def _segment_bn_loss_bwd(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count):
        return torch.empty_like(x)  # the kernels keep x's (contiguous or channels-last) strides

    @reg(f"{_LIB}::segment_bn_loss_bwd_bn_eval")
    def _segment_bn_loss_bwd_bn_eval(grad_loss, x, segment_ids, target_mean, target_var, mean, var, count, grad_y,
                                     scale, shift, relu, width, pool):
        return torch.empty_like(x)

    @reg(f"{_LIB}::bn_eval_act")
    def _bn_eval_act(x, scale, shift, relu, out):
        return None

    @reg(f"{_LIB}::bn_eval_act_pool2")
    def _bn_eval_act_pool2(x, scale, shift, relu, width, out):
        return None

    @reg(f"{_LIB}::segment_bn_loss")
    def _segment_bn_loss(x, segment_ids, target_mean, target_var):
        return x.new_empty((target_mean.shape[0],), dtype=_acc(x.dtype))

    @reg(f"{_LIB}::bn_eval_segment_loss")
    def _bn_eval_segment_loss(x, segment_ids, target_mean, target_var, scale, shift, relu, pool):
        loss = x.new_empty((target_mean.shape[0],), dtype=_acc(x.dtype))
        if pool == 2:
            n, c, h, w = x.shape
            return torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, device=x.device,
                               memory_format=torch.channels_last), loss
        x3 = kernel_x3(x, keep_nlc=x.device.type == "cpu")  # the layout csrc/segment_bn_loss.cpp gives y
        return torch.empty_strided(x3.shape, x3.stride(), dtype=x.dtype, device=x.device).view(x.shape), loss

    @reg(f"{_LIB}::crop_resize_flip")
    def _crop_resize_flip(x, boxes, flips, out_h, out_w):
        dtype = torch.float32 if x.dtype == torch.uint8 else x.dtype
        return x.new_empty((x.shape[0], x.shape[1], out_h, out_w), dtype=dtype)

    @reg(f"{_LIB}::crop_resize_flip_backward")
    def _crop_resize_flip_backward(grad_out, boxes, flips, in_h, in_w):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], in_h, in_w))

    @reg(f"{_LIB}::batched_roll")
    def _batched_roll(x, shifts):
        return x.new_empty(x.shape)


_register()
