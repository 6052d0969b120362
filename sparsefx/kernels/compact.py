"""Compact custom ops: layers that compute only kept channels.

Each op reads its weight's kept rows (output channels, ``out_idx``) and columns (input
channels, ``in_idx``) by index and writes weight gradients straight into a full-size
gradient, so dropped weights get exact zeros and no FLOPs. ``None`` for an index means
"all channels" (that side is dense). Indices are sorted, unique int64 vectors.

These are ``torch.library`` custom ops with fake kernels and autograd, so torch.export,
AOTAutograd and Inductor see through them. The plain-torch bodies here are the CPU path and
the reference for the Triton kernels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

__all__ = [
    "block_index",
    "compact_batch_norm",
    "compact_conv",
    "compact_linear",
    "gather_weight",
    "scatter_channels",
    "update_running_stats",
]


def gather_weight(weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None) -> Tensor:
    """weight[out_idx][:, in_idx], skipping a side whose index is None."""
    if out_idx is not None:
        weight = weight.index_select(0, out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    return weight


def _scatter_weight_grad(
    grad_c: Tensor, like: Tensor, out_idx: Tensor | None, in_idx: Tensor | None
) -> Tensor:
    """Full-size gradient with grad_c at (out_idx, in_idx) and exact zeros elsewhere."""
    if in_idx is not None:
        rows = grad_c.new_zeros((grad_c.shape[0], *like.shape[1:]))
        grad_c = rows.index_copy_(1, in_idx, grad_c)
    if out_idx is not None:
        grad_c = like.new_zeros(like.shape).index_copy_(0, out_idx, grad_c)
    return grad_c


def _scatter_vector_grad(grad_c: Tensor, size: int, idx: Tensor | None) -> Tensor:
    if idx is None:
        return grad_c
    return grad_c.new_zeros(size).index_copy_(0, idx, grad_c)


# --------------------------------------------------------------------------------------------
# linear: y[..., k_out] = x[..., k_in] @ W[out_idx][:, in_idx]^T + b[out_idx]


@torch.library.custom_op("sparsefx::linear", mutates_args=())
def compact_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
) -> Tensor:
    w = gather_weight(weight, out_idx, in_idx)
    b = bias if bias is None or out_idx is None else bias.index_select(0, out_idx)
    return torch.nn.functional.linear(x, w, b)


@compact_linear.register_fake
def _(x, weight, bias, in_idx, out_idx):
    out = weight.shape[0] if out_idx is None else out_idx.shape[0]
    return x.new_empty((*x.shape[:-1], out))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, in_idx, out_idx = inputs
    ctx.save_for_backward(x, weight, in_idx, out_idx)
    ctx.has_bias = bias is not None
    ctx.bias_size = 0 if bias is None else bias.shape[0]


def _linear_backward(ctx, grad_y):
    x, weight, in_idx, out_idx = ctx.saved_tensors
    w = gather_weight(weight, out_idx, in_idx)  # recomputed: cheaper than keeping a copy alive
    grad_x = grad_y @ w if ctx.needs_input_grad[0] else None
    grad_w = grad_b = None
    y2 = _rows(grad_y)
    if ctx.needs_input_grad[1]:
        grad_wc = y2.t() @ _rows(x)
        grad_w = _scatter_weight_grad(grad_wc, weight, out_idx, in_idx)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = _scatter_vector_grad(y2.sum(0), ctx.bias_size, out_idx)
    return grad_x, grad_w, grad_b, None, None


compact_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


def _rows(t: Tensor) -> Tensor:
    """[..., F] -> [rows, F]; explicit sizes, since -1 is ambiguous when F == 0."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# --------------------------------------------------------------------------------------------
# convolution (1d/2d/3d, groups=1): the gathered weight goes through the ordinary conv kernels.


@torch.library.custom_op("sparsefx::conv", mutates_args=())
def compact_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    in_idx: Tensor | None,
    out_idx: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
) -> Tensor:
    w = gather_weight(weight, out_idx, in_idx)
    b = bias if bias is None or out_idx is None else bias.index_select(0, out_idx)
    if w.numel() == 0:  # aten's convolution mis-shapes channel-less inputs
        y = x.new_zeros(_conv_shape(x, w, stride, padding, dilation))
        return y if b is None else y + b.view(-1, *[1] * (y.dim() - 2))
    return torch.ops.aten.convolution(x, w, b, stride, padding, dilation, False, [0], 1)


def _conv_shape(x: Tensor, w: Tensor, stride, padding, dilation) -> torch.Size:
    """Output shape of a convolution, computed on the meta device."""
    x_meta = torch.empty(x.shape[0], w.shape[1] or 1, *x.shape[2:], device="meta")
    w_meta = torch.empty(w.shape[0], w.shape[1] or 1, *w.shape[2:], device="meta")
    return torch.ops.aten.convolution(
        x_meta, w_meta, None, stride, padding, dilation, False, [0], 1
    ).shape


@compact_conv.register_fake
def _(x, weight, bias, in_idx, out_idx, stride, padding, dilation):
    w_shape = list(weight.shape)
    if out_idx is not None:
        w_shape[0] = out_idx.shape[0]
    if in_idx is not None:
        w_shape[1] = in_idx.shape[0]
    w = weight.new_empty(w_shape)
    return torch.ops.aten.convolution(x, w, None, stride, padding, dilation, False, [0], 1)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, in_idx, out_idx, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight, in_idx, out_idx)
    ctx.conv_args = (stride, padding, dilation)
    ctx.has_bias = bias is not None
    ctx.bias_size = 0 if bias is None else bias.shape[0]


def _conv_backward(ctx, grad_y):
    x, weight, in_idx, out_idx = ctx.saved_tensors
    stride, padding, dilation = ctx.conv_args
    w = gather_weight(weight, out_idx, in_idx)
    need = ctx.needs_input_grad
    bias_sizes = [w.shape[0]] if ctx.has_bias else None
    output_mask = [need[0], need[1], ctx.has_bias and need[2]]
    if w.numel() == 0:
        spatial = [0, *range(2, grad_y.dim())]
        grad_x, grad_wc, grad_bc = torch.zeros_like(x), torch.zeros_like(w), grad_y.sum(spatial)
    else:
        grad_x, grad_wc, grad_bc = torch.ops.aten.convolution_backward(
            grad_y, x, w, bias_sizes, stride, padding, dilation, False, [0], 1, output_mask
        )
    grad_w = _scatter_weight_grad(grad_wc, weight, out_idx, in_idx) if need[1] else None
    grad_b = _scatter_vector_grad(grad_bc, ctx.bias_size, out_idx) if output_mask[2] else None
    return grad_x, grad_w, grad_b, None, None, None, None, None


compact_conv.register_autograd(_conv_backward, setup_context=_conv_setup)


# --------------------------------------------------------------------------------------------
# batch norm over kept channels, split as aten's native_batch_norm is: a functional op with
# autograd that returns the batch statistics, and a mutating op that folds them into the
# running stats of kept channels only (dropped channels keep theirs, DESIGN §2). The score
# graph simply leaves the update out.


@torch.library.custom_op("sparsefx::batch_norm", mutates_args=())
def compact_batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    idx: Tensor,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, batch mean, batch inverse std) in training; (y, empty, empty) in eval."""
    w = None if weight is None else weight.index_select(0, idx)
    b = None if bias is None else bias.index_select(0, idx)
    mean = var = None
    if not training:
        mean, var = running_mean.index_select(0, idx), running_var.index_select(0, idx)
    return tuple(torch.ops.aten.native_batch_norm(x, w, b, mean, var, training, 0.0, eps))


@compact_batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, idx, training, eps):
    stats = idx.shape[0] if training else 0
    return torch.empty_like(x), x.new_empty(stats), x.new_empty(stats)


def _bn_setup(ctx, inputs, output):
    x, weight, _, running_mean, running_var, idx, training, eps = inputs
    _, save_mean, save_invstd = output
    ctx.mark_non_differentiable(save_mean, save_invstd)
    stats = (save_mean, save_invstd) if training else (running_mean, running_var)
    ctx.save_for_backward(x, weight, idx, *stats)
    ctx.training, ctx.eps = training, eps
    ctx.has_bias = inputs[2] is not None


def _bn_backward(ctx, grad_y, _grad_mean, _grad_invstd):
    x, weight, idx, stat_a, stat_b = ctx.saved_tensors
    w = None if weight is None else weight.index_select(0, idx)
    if ctx.training:
        running, saved = (None, None), (stat_a, stat_b)
    else:
        running, saved = (stat_a.index_select(0, idx), stat_b.index_select(0, idx)), (None, None)
    need = ctx.needs_input_grad
    grad_x, grad_wc, grad_bc = torch.ops.aten.native_batch_norm_backward(
        grad_y,
        x,
        w,
        *running,
        *saved,
        ctx.training,
        ctx.eps,
        [need[0], weight is not None and need[1], ctx.has_bias and need[2]],
    )
    size = 0 if weight is None else weight.shape[0]
    grad_w = None if grad_wc is None else _scatter_vector_grad(grad_wc, size, idx)
    grad_b = None if grad_bc is None else _scatter_vector_grad(grad_bc, size, idx)
    return grad_x, grad_w, grad_b, None, None, None, None, None


compact_batch_norm.register_autograd(_bn_backward, setup_context=_bn_setup)


@torch.library.custom_op(
    "sparsefx::update_running_stats", mutates_args=("running_mean", "running_var")
)
def update_running_stats(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    idx: Tensor,
    save_mean: Tensor,
    save_invstd: Tensor,
    momentum: float,
    eps: float,
) -> None:
    """running = (1 - momentum) * running + momentum * batch stat, at kept channels only."""
    count = x.numel() // max(x.shape[1], 1)
    unbiased_var = (save_invstd.pow(-2) - eps) * (count / max(count - 1, 1))
    for running, batch in ((running_mean, save_mean), (running_var, unbiased_var)):
        kept = running.index_select(0, idx).lerp_(batch.to(running.dtype), momentum)
        running.index_copy_(0, idx, kept)


@update_running_stats.register_fake
def _(x, running_mean, running_var, idx, save_mean, save_invstd, momentum, eps):
    return None


# --------------------------------------------------------------------------------------------
# scatter to full width: where a consumer cannot gather, dropped channels become exact zeros.


@torch.library.custom_op("sparsefx::scatter_channels", mutates_args=())
def scatter_channels(x: Tensor, idx: Tensor, dim: int, size: int) -> Tensor:
    shape = list(x.shape)
    shape[dim] = size
    return x.new_zeros(shape).index_copy_(dim, idx, x)


@scatter_channels.register_fake
def _(x, idx, dim, size):
    shape = list(x.shape)
    shape[dim] = size
    return x.new_empty(shape)


def _scatter_setup(ctx, inputs, output):
    _, idx, dim, _ = inputs
    ctx.save_for_backward(idx)
    ctx.dim = dim


def _scatter_backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return grad.index_select(ctx.dim, idx), None, None, None


scatter_channels.register_autograd(_scatter_backward, setup_context=_scatter_setup)


def block_index(idx: Tensor, block: int) -> Tensor:
    """Feature indices of channels `idx` after flattening, where channel c owns block c*block..+block."""
    if block == 1:
        return idx
    offsets = torch.arange(block, device=idx.device, dtype=idx.dtype)
    return (idx.unsqueeze(1) * block + offsets).reshape(-1)


# --------------------------------------------------------------------------------------------
# FLOP formulas: torch.utils.flop_counter does not see inside a custom op's forward, so the
# compact ops declare theirs (their backward is made of aten ops, which it counts itself).


@register_flop_formula(torch.ops.sparsefx.linear)
def _linear_flops(x_shape, weight_shape, bias_shape, in_idx_shape, out_idx_shape, out_shape):
    return 2 * math.prod(x_shape) * out_shape[-1]


@register_flop_formula(torch.ops.sparsefx.conv)
def _conv_flops(x_shape, weight_shape, bias_shape, in_idx_shape, out_idx_shape, *conv, out_shape):
    kept_weight = [out_shape[1], x_shape[1], *weight_shape[2:]]
    return conv_flop_count(list(x_shape), kept_weight, list(out_shape), transposed=False)
