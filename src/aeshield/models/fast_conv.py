"""Input gradients of thin convolutions on the CPU, computed as one matmul and a fold.

An attack (and adversarial training, whose inner attack and whose loss both flow back to the
image) differentiates a classifier with respect to its input. For a convolution with few input
channels, such as the first layer of every MNIST model here, oneDNN's input gradient on the CPU
is the largest single cost of a PGD step: mnist-b's first layer at batch 256, one thread, 95 ms
against 10 ms for the layer's forward. The same gradient written as ``fold(W^T @ grad_out)``
(the transpose of im2col) takes 10 ms. Wider layers keep the default path, which is faster for
them (:data:`MAX_IN_CHANNELS`).

:func:`fast_input_gradients` turns this on for the convolutions run inside it. The values are
the same gradient up to float rounding (the sum runs in another order); the weight and bias
gradients, when asked for, come from PyTorch's own convolution backward, and double backward
(DBP's penalty on the input gradient) still works, because the backward is written with
differentiable operations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# At and below this many input channels the fold beats oneDNN's input gradient. Measured on
# this project's 2-core CPU, one thread, the backward alone: 1 channel 4-9x (MNIST layers, batch
# 256), 3 -> 64 channels 3x (CIFAR's first layer, batch 128); at 6 channels they are even, and
# at 32 oneDNN is 2x faster.
MAX_IN_CHANNELS = 3


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    return v * 2 if len(v) == 1 else v


class _Conv2dFoldGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, has_bias = ctx.geometry
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            n, c_out = grad_out.shape[:2]
            cols = weight.reshape(c_out, -1).t() @ grad_out.reshape(n, c_out, -1)
            grad_x = F.fold(cols, x.shape[-2:], weight.shape[-2:], dilation=dilation,
                            padding=padding, stride=stride)
        if need_w or (need_b and has_bias):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out, x, weight, [weight.shape[0]] if has_bias else None, list(stride),
                list(padding), list(dilation), False, [0, 0], 1, [False, need_w, need_b and has_bias])
        return grad_x, grad_w if need_w else None, grad_b if need_b else None, None, None, None


def _foldable(x, weight, padding, groups) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.requires_grad and groups == 1
            and x.dtype in (torch.float32, torch.float64) and weight.dtype == x.dtype
            and weight.shape[1] <= MAX_IN_CHANNELS and not isinstance(padding, str)
            and torch.is_grad_enabled()
            # Under autocast the convolution runs in bfloat16 after this check; oneDNN's own
            # bfloat16 backward then serves it.
            and not torch.is_autocast_enabled("cpu"))


class _FoldGradMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            given = dict(zip(names, args)) | kwargs
            x, weight = given["input"], given["weight"]
            stride, padding, dilation = (given.get(k, d) for k, d in (("stride", 1), ("padding", 0),
                                                                      ("dilation", 1)))
            if _foldable(x, weight, padding, given.get("groups", 1)):
                return _Conv2dFoldGrad.apply(x, weight, given.get("bias"), _pair(stride),
                                             _pair(padding), _pair(dilation))
        return func(*args, **kwargs)


def has_thin_conv(model: object) -> bool:
    """Whether ``model`` may run a convolution the fold speeds up: a module holding a
    ``Conv2d`` with at most :data:`MAX_IN_CHANNELS` input channels, or anything not a module
    (which may call ``conv2d`` itself)."""
    if not isinstance(model, nn.Module):
        return True
    return any(isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels <= MAX_IN_CHANNELS
               for m in model.modules())


@contextlib.contextmanager
def fast_input_gradients(model: object = None) -> Iterator[None]:
    """Inside, every 2-D convolution on the CPU with at most :data:`MAX_IN_CHANNELS` input
    channels, whose input needs a gradient, computes that gradient as a matmul and a fold
    (module docstring). Other operations, and convolutions elsewhere, are untouched. Given a
    ``model`` without such a convolution (:func:`has_thin_conv`), it does nothing, so that a
    model without one does not pay the mode's few microseconds per operation."""
    if model is not None and not has_thin_conv(model):
        yield
        return
    with _FoldGradMode():
        yield


__all__ = ["MAX_IN_CHANNELS", "fast_input_gradients", "has_thin_conv"]
