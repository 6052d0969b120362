"""Compact custom ops: move between full-size parameters/activations and kept channels.

A compact layer is an ordinary aten op (linear, convolution, batch_norm) on operands that
hold only kept channels, so it gets aten's kernels and native autograd. What sparsefx adds
are the two index moves around it:

* ``sparsefx::gather_weight``: a weight's kept rows (output channels) and columns (input
  channels). Its backward writes the compact weight gradient straight into a full-size zero
  gradient in one pass, so dropped weights get exact zeros and cost no FLOPs; or, with
  ``sparse_grad``, returns a row-sparse COO gradient holding only the kept rows, which spares
  the full-size zero fill and lets a sparse-aware optimizer touch only kept rows.
* ``sparsefx::scatter_channels``: a compact activation back to full width, zeros for dropped
  channels, where a consumer cannot read it compactly.

Both are ``torch.library`` custom ops with fake kernels and autograd, so torch.export,
AOTAutograd and Inductor see them as single ops. The plain-torch bodies are the CPU path and
the reference for the Triton kernels. Indices are sorted, unique int64 vectors; ``None``
means "every channel" on that side.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.flop_counter import conv_backward_flop, conv_flop_count, register_flop_formula

__all__ = [
    "block_index",
    "bucketed_convolution",
    "conv",
    "gather_weight",
    "layout_index",
    "register_autocast_rule",
    "scatter_channels",
]


def _gather_weight(
    weight: Tensor, out_idx: Tensor | None, in_idx: Tensor | None, sparse_grad: bool = False
) -> Tensor:
    """weight[out_idx][:, in_idx] (either side skipped when its index is None)."""
    if out_idx is not None:
        weight = weight.index_select(0, out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    return weight.clone() if out_idx is None and in_idx is None else weight


# each op is registered from its plain body, which eager programs call directly (DIRECT_CALLS)
gather_weight = torch.library.custom_op("sparsefx::gather_weight", mutates_args=())(_gather_weight)


@gather_weight.register_fake
def _(weight, out_idx, in_idx, sparse_grad=False):
    shape = list(weight.shape)
    if out_idx is not None:
        shape[0] = out_idx.shape[0]
    if in_idx is not None:
        shape[1] = in_idx.shape[0]
    return weight.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    weight, out_idx, in_idx, sparse_grad = inputs
    ctx.save_for_backward(out_idx, in_idx)
    ctx.shape, ctx.sparse_grad = weight.shape, sparse_grad


def _gather_backward(ctx, grad_c):
    out_idx, in_idx = ctx.saved_tensors
    return (
        _full_weight_gradient(grad_c, out_idx, in_idx, ctx.shape, ctx.sparse_grad),
        None,
        None,
        None,
    )


def _full_weight_gradient(
    grad_c: Tensor,
    out_idx: Tensor | None,
    in_idx: Tensor | None,
    shape: Sequence[int],
    sparse_grad: bool,
) -> Tensor:
    """The gradient of a full-size weight of `shape` from its kept block's `grad_c`: zeros
    elsewhere, or with `sparse_grad` a row-sparse COO tensor of the kept rows."""
    if sparse_grad and out_idx is not None:
        rows = grad_c
        if in_idx is not None:
            rows = grad_c.new_zeros((grad_c.shape[0], *shape[1:])).index_copy_(1, in_idx, grad_c)
        # kept indices are sorted and unique by construction: coalesced, nothing to check
        return torch.sparse_coo_tensor(
            out_idx[None], rows, shape, is_coalesced=True, check_invariants=False
        )
    grad = grad_c.new_zeros(shape)
    if out_idx is None:
        return grad.index_copy_(1, in_idx, grad_c)
    if in_idx is None:
        return grad.index_copy_(0, out_idx, grad_c)
    # one copy of whole kernels at flat (row, column) positions: no [k_out, in] intermediate,
    # and one index per kernel where index_put_ broadcasts two index tensors over every element
    flat = (out_idx[:, None] * shape[1] + in_idx).reshape(-1)
    grad.view(shape[0] * shape[1], -1).index_copy_(0, flat, grad_c.reshape(flat.numel(), -1))
    return grad


gather_weight.register_autograd(_gather_backward, setup_context=_gather_setup)


def scatter_channels_reference(x: Tensor, idx: Tensor, dim: int, size: int) -> Tensor:
    """Full-width copy of compact `x` along `dim`: x's slices at `idx`, zeros elsewhere."""
    shape = list(x.shape)
    shape[dim] = size
    return x.new_zeros(shape).index_copy_(dim, idx, x)


def scatter_channels_functional(x: Tensor, idx: Tensor, dim: int, size: int) -> Tensor:
    """scatter_channels in functional aten ops: the decomposition an exported compact model
    runs (`run_decompositions` needs a graph without in-place ops)."""
    shape = list(x.shape)
    shape[dim] = size
    return x.new_zeros(shape).index_copy(dim, idx, x)


scatter_channels = torch.library.custom_op("sparsefx::scatter_channels", mutates_args=())(
    scatter_channels_reference
)


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


def _bucketed_convolution(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    multiple: int,
    full_in: int | None,
    full_out: int | None,
) -> Tensor:
    """A convolution (groups=1) run on channel counts rounded up to `multiple` with zero
    channels, then cut back: exact, since padded inputs are zero and padded weights too.
    `full_in`/`full_out` are the dense counts, which rounding never passes (None: that
    side is not compact and keeps its count).

    oneDNN creates (JIT-compiles) a primitive for every new convolution shape, 0.3-1.5 ms
    each on CPU, and compact channel counts change with every mask; rounded counts repeat,
    so after a few steps every shape, forward and backward, is in oneDNN's primitive cache.
    The padding costs at most `multiple - 1` zero channels per side; dropped channels are
    never computed. A custom op, so that symbolic shape propagation (the diff tool) sees
    the exact output shape and not the data-dependent padding."""
    x, weight, bias = _autocast_operands(x, weight, bias)  # the no-grad score graph calls this
    extra_in, extra_out = _bucket_padding(
        x.shape, weight.shape, stride, padding, dilation, multiple, full_in, full_out
    )
    weight = _pad_weight(weight, extra_in, extra_out)
    return _rounded_convolution(x, weight, bias, stride, padding, dilation, extra_in, extra_out)


bucketed_convolution = torch.library.custom_op("sparsefx::bucketed_convolution", mutates_args=())(
    _bucketed_convolution
)


def _rounded_convolution(
    x: Tensor,
    padded_weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    extra_in: int,
    extra_out: int,
) -> Tensor:
    """The convolution of `x` and `bias` padded with zero channels to `padded_weight`'s
    counts, cut back to the exact output channels, in the memory format the unpadded
    convolution would return (its fake kernel's: a channels-last input gives a
    channels-last output, which the padding's copy would lose)."""
    bias = None if bias is None else _pad_channels(bias, 0, extra_out)
    y = _convolution(
        _pad_channels(x, 1, extra_in), padded_weight, bias, stride, padding, dilation, 1
    )
    if not (extra_in or extra_out):
        return y
    if not extra_out:  # y itself where it is in that format: a view would break in-place ops
        return y.contiguous(memory_format=_memory_format(x))
    return y[:, : y.shape[1] - extra_out].clone(memory_format=_memory_format(x))


def _memory_format(x: Tensor) -> torch.memory_format:
    """Channels-last where `x` is (and is not also plainly contiguous), else contiguous."""
    if x.is_contiguous():
        return torch.contiguous_format
    for fmt, dims in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
        if x.dim() == dims and x.is_contiguous(memory_format=fmt):
            return fmt
    return torch.contiguous_format


@bucketed_convolution.register_fake
def _(x, weight, bias, stride, padding, dilation, multiple, full_in, full_out):
    return _convolution(x, weight, bias, stride, padding, dilation, 1)


@register_flop_formula(torch.ops.sparsefx.bucketed_convolution)
def _bucketed_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the convolution at the rounded counts it runs (FlopCounterMode does not look
    inside a custom op)."""
    extra_in, extra_out = _bucket_padding(x_shape, w_shape, *args[1:7])
    w_shape = _counted_weight_shape(x_shape, w_shape, *args[1:4], 1)
    x_shape = [x_shape[0], x_shape[1] + extra_in, *x_shape[2:]]
    w_shape = [w_shape[0] + extra_out, w_shape[1] + extra_in, *w_shape[2:]]
    out_shape = [out_shape[0], out_shape[1] + extra_out, *out_shape[2:]]
    return conv_flop_count(x_shape, w_shape, out_shape)


def _bucket_padding(
    x_shape: Sequence[int],
    weight_shape: Sequence[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    multiple: int,
    full_in: int | None,
    full_out: int | None,
) -> tuple[int, int]:
    """Zero channels that round (input, output) counts up to `multiple`, within the dense;
    none for a single output pixel, which runs as GEMMs with no primitive to cache."""
    if _single_output_window(x_shape, weight_shape, stride, padding, dilation, 1) is not None:
        return 0, 0
    k_out, k_in = weight_shape[0], weight_shape[1]
    extra_in = 0 if full_in is None else min(-k_in % multiple, full_in - k_in)
    extra_out = 0 if full_out is None else min(-k_out % multiple, full_out - k_out)
    return extra_in, extra_out


def _pad_weight(weight: Tensor, extra_in: int, extra_out: int) -> Tensor:
    """`weight` with `extra_out` zero rows and `extra_in` zero columns, in one copy."""
    if not (extra_in or extra_out):
        return weight
    return torch.constant_pad_nd(weight, [0, 0] * (weight.dim() - 2) + [0, extra_in, 0, extra_out])


def _pad_channels(t: Tensor, dim: int, extra: int) -> Tensor:
    """`t` with `extra` zero slices appended along `dim`."""
    if not extra:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, t.new_zeros(shape)], dim)


def _bucketed_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, multiple, full_in, full_out = inputs
    _save_conv(ctx, x, weight, bias, (stride, padding, dilation, 1, multiple, full_in, full_out))


def _single_output_window(
    x_shape: Sequence, w_shape: Sequence, stride, padding, dilation, groups: int
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(input slices, kernel-tap slices), per spatial dim, of the one window a convolution
    reads where its output is a single pixel, else None.

    Such a convolution is a linear layer on that window: the taps that fall on padding
    multiply zeros. oneDNN runs it as a convolution over the padding, slowly: an HF ResNet on
    32×32 images has its last stage on 1×1 maps (three 3×3 convolutions reading one tap) and
    reaches them from 2×2 maps by stride 2 (a 3×3 reading 2×2 taps, a 1×1 shortcut reading
    one pixel). As convolutions, the three one-tap ones took ~2 ms of a 38 ms compact step
    and the two stride-2 ones ~1.8 ms (profiled); as GEMMs the step is ~1 ms faster than with
    the one-tap GEMMs alone (benchmarks/RESULTS.md). Static (int) sizes only."""
    if (
        groups != 1
        or len(x_shape) != len(w_shape)
        or any(not isinstance(c, int) or c < 1 for c in w_shape[:2])  # aten's errors, if any
    ):
        return None
    if any(type(v) is not int for v in (*stride, *padding, *dilation)):
        return None  # aten's checks (a float padding would equal an int in the cache's key)
    key = tuple(x_shape[2:]), tuple(w_shape[2:]), tuple(stride), tuple(padding), tuple(dilation)
    try:
        hash(key)
    except TypeError:  # symbolic sizes (SymInts are unhashable): not static
        return None
    return _spatial_window(*key)


@functools.lru_cache(maxsize=1024)  # ~100 calls a ResNet step, on a handful of keys
def _spatial_window(
    sizes: tuple, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """`_single_output_window` of the spatial dims."""
    if not len(stride) == len(padding) == len(dilation) == len(kernel):
        return None
    inputs, taps = [], []
    for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation, strict=True):
        if not (isinstance(n, int) and isinstance(k, int)) or s < 1 or d < 1 or p < 0:
            return None
        if not 0 <= n + 2 * p - d * (k - 1) - 1 < s:
            return None  # more than one output pixel (or none: aten's error)
        first, last = -(-p // d), min(k - 1, (n - 1 + p) // d)  # taps landing on the input
        if first > last:
            return None  # every tap on padding: the bias alone, left to aten
        inputs.append(slice(first * d - p, last * d - p + 1, d))
        taps.append(slice(first, last + 1))
    return tuple(inputs), tuple(taps)


def _without_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off where it is on: the GEMMs stand in for aten.convolution and its
    backward, which autocast leaves alone (callers cast the operands as conv2d would)."""
    device = x.device.type
    if _autocast_on(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` (never for one it does not know: meta)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _counted_weight_shape(x_shape, w_shape, stride, padding, dilation, groups: int) -> list:
    """The weight shape whose convolution FLOPs are those computed: the window's taps where
    `_single_output_window` runs a GEMM."""
    window = _single_output_window(x_shape, w_shape, stride, padding, dilation, groups)
    if window is None:
        return list(w_shape)
    return [*w_shape[:2], *(t.stop - t.start for t in window[1])]  # taps step by one


def _tap_index(weight: Tensor, taps: tuple[slice, ...]) -> Tensor | None:
    """Flat indices of the window's taps among a kernel's, None where it is the whole kernel.

    The window is gathered (and its gradient written back) with index_select/index_copy_
    on the flattened kernel: a strided copy of a [out, in, 2, 2] window of a 3×3 kernel
    moves two elements per inner loop and took ~6x as long."""
    kernel = weight.shape[2:]
    if all(t.stop - t.start == k for t, k in zip(taps, kernel, strict=True)):
        return None
    return torch.arange(math.prod(kernel), device=weight.device).view(kernel)[taps].flatten()


def _kernel_window(weight: Tensor, taps: tuple[slice, ...], index: Tensor | None) -> Tensor:
    """`weight[..., *taps]`, contiguous, as [out, in, window taps] (`index`: `_tap_index`)."""
    if index is None:
        return weight.flatten(2)
    return weight.flatten(2).index_select(2, index)


def _convolution(
    x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int
) -> Tensor:
    """aten.convolution of a plain (not transposed) convolution; a GEMM on the window read
    where the output is a single pixel (`_single_output_window`). An unbatched input
    (``conv2d`` takes one, aten.convolution does not) runs as a batch of one."""
    if x.dim() == weight.dim() - 1:
        return _convolution(x.unsqueeze(0), weight, bias, stride, padding, dilation, groups)[0]
    window = _single_output_window(x.shape, weight.shape, stride, padding, dilation, groups)
    if window is not None and (bias is None or bias.shape == weight.shape[:1]):  # else aten's error
        inputs, taps = window
        w_window = _kernel_window(weight, taps, _tap_index(weight, taps))
        with _without_autocast(x):
            y = torch.nn.functional.linear(x[(..., *inputs)].flatten(1), w_window.flatten(1), bias)
        # a copy, not a view: an in-place op may follow an autograd.Function's output
        return y.view(*y.shape, *[1] * len(taps)).clone()
    return torch.ops.aten.convolution(
        x, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups
    )


def _convolution_backward(
    grad: Tensor, x: Tensor, weight: Tensor, options: tuple, output_mask: list[bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """aten.convolution_backward of a plain (not transposed) convolution; `options` are
    (has_bias, stride, padding, dilation, groups). GEMMs on the window where `_convolution`
    ran one (the input's other pixels and the weight's other taps get zero gradients)."""
    has_bias, stride, padding, dilation, groups = options
    if x.dim() == weight.dim() - 1:  # unbatched, as `_convolution` ran it
        grads = _convolution_backward(grad[None], x[None], weight, options, output_mask)
        return grads[0] if grads[0] is None else grads[0][0], *grads[1:]  # type: ignore[return-value]
    window = _single_output_window(x.shape, weight.shape, stride, padding, dilation, groups)
    if window is not None:
        inputs, taps = window
        index = _tap_index(weight, taps)
        grad_2d, x_window = grad.flatten(1), x[(..., *inputs)]
        grad_x = grad_w = grad_b = None
        with _without_autocast(x):
            if output_mask[0]:
                w_window = _kernel_window(weight, taps, index)
                grad_x = (grad_2d @ w_window.flatten(1)).view(x_window.shape)
                if grad_x.shape != x.shape:  # pixels outside the window: zero gradients
                    window_grad, grad_x = grad_x, grad_x.new_zeros(x.shape)
                    grad_x[(..., *inputs)] = window_grad
            if output_mask[1]:
                grad_window = (grad_2d.t() @ x_window.flatten(1)).view(*weight.shape[:2], -1)
                if index is not None:  # the other taps: zero gradients
                    full = grad_window.new_zeros(weight.flatten(2).shape)
                    grad_window = full.index_copy_(2, index, grad_window)
                grad_w = grad_window.view(weight.shape)
            if output_mask[2] and has_bias:
                grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b
    bias_sizes = [weight.shape[0]] if has_bias else None
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups,
        [*output_mask[:2], output_mask[2] and has_bias],  # no bias: no bias gradient
    )  # fmt: skip


def _autocast_operands(x: Tensor, weight: Tensor, bias: Tensor | None) -> tuple:
    """(x, weight, bias) in the autocast dtype where autocast is on for x's device, as it
    casts ``aten.conv2d``: the compact convolutions call ``aten.convolution``, which
    autocast's CPU policy does not list, so without this they would run in float32 under
    bfloat16 autocast where the dense model's convolutions run in bfloat16."""
    device_type = x.device.type
    if not _autocast_on(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in (x, weight, bias))


@torch.library.custom_op("sparsefx::conv", mutates_args=())
def conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> Tensor:
    """aten.convolution, opaque to Inductor.

    Inductor's convolution lowering specialises on channel counts, and a compact conv's
    channel counts change every step: as a custom op it is an extern call with symbolic
    shapes, so a compiled training graph does not recompile per mask. Only the torch.compile
    backend uses it; its backward is aten's convolution_backward."""
    return _convolution(x, weight, bias, stride, padding, dilation, groups)


@conv.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    return _convolution(x, weight, bias, stride, padding, dilation, groups)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups = inputs
    _save_conv(ctx, x, weight, bias, (stride, padding, dilation, groups, 1, None, None))


def _save_conv(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, options: tuple) -> None:
    """What `_conv_backward` needs: the operands and conv_backward's options after has_bias
    (stride, padding, dilation, groups, multiple, full_in, full_out)."""
    ctx.save_for_backward(x, weight)
    ctx.options = (bias is not None, *options)


def _conv_backward_through(gradients: Callable[..., tuple[Tensor, ...]]) -> Callable:
    """The backward of `conv` and of `bucketed_convolution`: one `gradients` call
    (`conv_backward`, or its body in eager programs) for the gradients autograd needs."""

    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        grads = gradients(grad, x, weight, *ctx.options, needs)
        rest = [None] * (len(ctx.needs_input_grad) - 3)  # the non-tensor arguments
        return *(g if need else None for g, need in zip(grads, needs, strict=True)), *rest

    return backward


def _conv_gradients(
    grad: Tensor,
    x: Tensor,
    weight: Tensor,
    has_bias: bool,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    multiple: int,
    full_in: int | None,
    full_out: int | None,
    output_mask: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """aten.convolution_backward for `conv` (multiple 1) and for `bucketed_convolution` (on
    its rounded shapes, so their primitives are cached too, cut back to the exact ones).
    Gradients `output_mask` leaves out, and the bias's without a bias, are empty tensors. An
    opaque op, so a compiled graph's backward is one extern call with symbolic channel
    counts that never reasons about the padding's sizes."""
    extra_in, extra_out = _bucket_padding(
        x.shape, weight.shape, stride, padding, dilation, multiple, full_in, full_out
    )
    k_out, k_in = weight.shape[0], weight.shape[1]
    grad_x, grad_w, grad_b = _convolution_backward(
        _pad_channels(grad, 1, extra_out),
        _pad_channels(x, 1, extra_in),
        _pad_weight(weight, extra_in, extra_out),
        (has_bias, stride, padding, dilation, groups),
        output_mask,
    )
    return (
        grad.new_empty(0) if grad_x is None else grad_x[:, : x.shape[1]].contiguous(),
        grad.new_empty(0) if grad_w is None else grad_w[:k_out, :k_in].contiguous(),
        grad.new_empty(0) if grad_b is None else grad_b[:k_out].contiguous(),
    )  # distinct empties: a custom op's outputs may not alias each other


conv_backward = torch.library.custom_op("sparsefx::conv_backward", mutates_args=())(_conv_gradients)


@conv_backward.register_fake
def _(
    grad, x, weight, has_bias, stride, padding, dilation, groups, multiple, full_in, full_out,
    output_mask,
):  # fmt: skip
    need_x, need_w, need_b = output_mask
    return (
        x.new_empty(x.shape) if need_x else grad.new_empty(0),
        weight.new_empty(weight.shape) if need_w else grad.new_empty(0),
        grad.new_empty((weight.shape[0],)) if need_b and has_bias else grad.new_empty(0),
    )


@register_flop_formula(torch.ops.sparsefx.conv)
def _conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, _counted_weight_shape(x_shape, w_shape, *args[1:5]), out_shape)


@register_flop_formula(torch.ops.sparsefx.conv_backward)
def _conv_backward_flops(grad_shape, x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the gradients it computes, at the rounded counts it runs."""
    _, stride, padding, dilation, groups, multiple, full_in, full_out, output_mask = args
    extra_in, extra_out = _bucket_padding(
        x_shape, w_shape, stride, padding, dilation, multiple, full_in, full_out
    )
    w_shape = _counted_weight_shape(x_shape, w_shape, stride, padding, dilation, groups)
    grad_shape = [grad_shape[0], grad_shape[1] + extra_out, *grad_shape[2:]]
    x_shape = [x_shape[0], x_shape[1] + extra_in, *x_shape[2:]]
    w_shape = [w_shape[0] + extra_out, w_shape[1] + extra_in, *w_shape[2:]]
    return conv_backward_flop(
        grad_shape, x_shape, w_shape, None, stride, padding, dilation, False, None, groups,
        output_mask, out_val=(x_shape, w_shape, w_shape[:1]),
    )  # fmt: skip


conv.register_autograd(_conv_backward_through(conv_backward), setup_context=_conv_setup)
bucketed_convolution.register_autograd(
    _conv_backward_through(conv_backward), setup_context=_bucketed_setup
)


_AUTOCAST = torch.library.Library("sparsefx", "IMPL")


def register_autocast_rule(
    op: torch._library.custom_ops.CustomOpDef, cast: Callable[..., tuple]
) -> None:
    """Autocast for a compact op whose first three arguments are (x, weight, bias), where
    graphs call the op itself (torch.compile, torch.export), on CPU and CUDA: those operands
    as `cast` returns them, then the op below autocast. ``torch.library.register_autocast``
    fixes one dtype per device; `cast` follows the region's."""
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        _AUTOCAST.impl(op._name, _below_autocast(op, cast, key), key, with_keyset=True)


def _below_autocast(op: Callable[..., Tensor], cast: Callable[..., tuple], key: str) -> Callable:
    below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(_keys, x: Tensor, weight: Tensor, bias: Tensor | None, *options) -> Tensor:
        operands = cast(x, weight, bias)
        with torch._C._ExcludeDispatchKeyGuard(below):
            return op(*operands, *options)

    return kernel


register_autocast_rule(conv, _autocast_operands)
register_autocast_rule(bucketed_convolution, _autocast_operands)


class _GatherWeight(torch.autograd.Function):
    forward = staticmethod(_gather_weight)
    setup_context = staticmethod(_gather_setup)
    backward = staticmethod(_gather_backward)


class _ScatterChannels(torch.autograd.Function):
    forward = staticmethod(scatter_channels_reference)
    setup_context = staticmethod(_scatter_setup)
    backward = staticmethod(_scatter_backward)


class _BucketedConvolution(torch.autograd.Function):
    forward = staticmethod(_bucketed_convolution)
    setup_context = staticmethod(_bucketed_setup)
    backward = staticmethod(_conv_backward_through(_conv_gradients))


class _GatheredBucketedConvolution(torch.autograd.Function):
    """gather_weight feeding bucketed_convolution as one autograd node: the kept weight is
    padded once and saved padded, and the backward writes the rounded weight gradient's
    kept block straight into the full-size gradient (no exact-size copy of it)."""

    @staticmethod
    def forward(
        ctx, x, weight, out_idx, in_idx, sparse_grad, bias, stride, padding, dilation,
        multiple, full_in, full_out,
    ):  # fmt: skip
        kept = _gather_weight(weight, out_idx, in_idx)
        extra_in, extra_out = _bucket_padding(
            x.shape, kept.shape, stride, padding, dilation, multiple, full_in, full_out
        )
        x, padded_weight, bias = _autocast_operands(x, _pad_weight(kept, extra_in, extra_out), bias)
        ctx.save_for_backward(x, weight, padded_weight, out_idx, in_idx)
        ctx.kept, ctx.extra = kept.shape[:2], (extra_in, extra_out)
        ctx.full_shape, ctx.sparse_grad, ctx.dtype = weight.shape, sparse_grad, weight.dtype
        ctx.conv = (bias is not None, stride, padding, dilation, 1)
        return _rounded_convolution(
            x, padded_weight, bias, stride, padding, dilation, extra_in, extra_out
        )

    @staticmethod
    def backward(ctx, grad):
        x, weight, padded_weight, out_idx, in_idx = ctx.saved_tensors
        (extra_in, extra_out), (k_out, k_in) = ctx.extra, ctx.kept
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph: the saved copy has no path to `weight`
            kept = _pad_weight(_gather_weight(weight, out_idx, in_idx), extra_in, extra_out)
            padded_weight = kept.to(padded_weight.dtype)
        grad_x, grad_w, grad_b = _convolution_backward(
            _pad_channels(grad, 1, extra_out),
            _pad_channels(x, 1, extra_in),
            padded_weight,
            ctx.conv,
            [needs[0], needs[1], needs[5]],
        )
        if grad_x is not None and extra_in:
            grad_x = grad_x[:, :k_in].contiguous()
        if grad_w is not None:  # in the weight's dtype before the full-size write (autocast)
            kept = grad_w[:k_out, :k_in].to(ctx.dtype)
            grad_w = _full_weight_gradient(kept, out_idx, in_idx, ctx.full_shape, ctx.sparse_grad)
        if grad_b is not None:
            grad_b = grad_b[:k_out]
        return grad_x, grad_w, None, None, None, grad_b, *[None] * 6


ATEN_CONVOLUTIONS = {
    3: torch.ops.aten.conv1d.default,
    4: torch.ops.aten.conv2d.default,
    5: torch.ops.aten.conv3d.default,
}


def convolution_direct(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
    groups: int = 1,
) -> Tensor:  # fmt: skip
    """``aten.conv{1,2,3}d`` for eager programs (passes.call_ops_directly): GEMMs on the
    window read where the output is a single pixel (`_single_output_window`: exact-count
    compact convolutions after `freeze`, and dense ones), else the aten op itself."""
    spatial = weight.dim() - 2
    stride, padding, dilation = (  # aten expands an int, or a one-element list, to every dim
        [v] * spatial if isinstance(v, int) else list(v) * spatial if len(v) == 1 else v
        for v in (stride, padding, dilation)
    )
    window = _single_output_window(x.shape, weight.shape, stride, padding, dilation, groups)
    if window is None:  # also unbatched inputs, to which the aten op adds the batch dim
        conv = ATEN_CONVOLUTIONS[weight.dim()]
        return conv(x, weight, bias, stride, padding, dilation, groups)
    x, weight, bias = _autocast_operands(x, weight, bias)  # as autocast casts conv2d
    return _convolution(x, weight, bias, stride, padding, dilation, groups)


# what eager programs call (passes.call_ops_directly); fx's generated code names them
def gathered_bucketed_convolution_direct(x: Tensor, weight: Tensor, *args) -> Tensor:
    # x is cast for autocast out here, so that a backward with create_graph differentiates
    # through the cast (the weight is re-gathered and cast inside for that, see backward)
    x = _autocast_operands(x, weight, None)[0]
    return _GatheredBucketedConvolution.apply(x, weight, *args)


def gather_weight_direct(*args) -> Tensor:
    return _GatherWeight.apply(*args)


def scatter_channels_direct(*args) -> Tensor:
    return _ScatterChannels.apply(*args)


def bucketed_convolution_direct(x, weight, bias, *options) -> Tensor:
    return _BucketedConvolution.apply(*_autocast_operands(x, weight, bias), *options)


DIRECT_CALLS: dict[torch._ops.OpOverload, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {
    torch.ops.sparsefx.gather_weight.default: (gather_weight_direct, _gather_weight),
    torch.ops.sparsefx.scatter_channels.default: (
        scatter_channels_direct,
        scatter_channels_reference,
    ),
    torch.ops.sparsefx.bucketed_convolution.default: (
        bucketed_convolution_direct,
        _bucketed_convolution,
    ),
}
"""For each compact op an eager program calls: (the same computation and autograd as an
autograd.Function, for graphs that may record gradients; the plain body, for the no-grad
score graph). A custom op called eagerly passes the dispatcher and torch.library's Python
autograd wrapper, 50-100 µs a call, and a sampled step of a ResNet-18 calls them about 140
times (forward, backward and the score forward); torch.export and Inductor need the ops
themselves, so only eager programs call these."""


def block_index(idx: Tensor, block: int) -> Tensor:
    """Feature indices of channels `idx` after flattening, channel c owning c*block..+block."""
    if block == 1:
        return idx
    offsets = torch.arange(block, device=idx.device, dtype=idx.dtype)
    return (idx.unsqueeze(1) * block + offsets).reshape(-1)


def layout_index(groups: list[Tensor | None], pieces: list[tuple[int, int]]) -> Tensor:
    """Kept feature indices along a dim made of pieces (see analysis/layout.py): for each
    piece (size, block), its group's kept channels as blocks, or every feature of a dense
    piece (`groups` entry None), at the piece's offset."""
    device = next(idx for idx in groups if idx is not None).device
    parts, offset = [], 0
    for idx, (size, block) in zip(groups, pieces, strict=True):
        if idx is None:
            parts.append(torch.arange(offset, offset + size, device=device))
        else:
            parts.append(block_index(idx, block) + offset)
        offset += size * block
    return torch.cat(parts)


def dropout_noise(x: Tensor, p: float) -> Tensor:
    """The inverted-dropout multiplier for `x`: 0 with probability `p`, else 1/(1-p).

    The same distribution as ``aten.dropout``'s Bernoulli(1-p) noise, drawn as float32
    uniforms compared with `p` (exact for low-precision `x` too), which on CPU costs half of
    ``bernoulli_``. Plain torch, so Inductor lowers it to its own fused RNG."""
    if p >= 1:
        return torch.zeros_like(x)
    keep = torch.rand_like(x, dtype=torch.float32).ge_(p)
    return keep.to(x.dtype).mul_(1 / (1 - p))


def attention_with_dropout(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    scale: float | None = None,
) -> Tensor:
    """``scaled_dot_product_attention`` in the math form that CPU runs when it drops
    attention weights (low precision computed in float32, fully masked rows zero), with
    `dropout_noise` for its dropout."""
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):
        query, key, value = query.float(), key.float(), value.float()
    scale = query.size(-1) ** -0.5 if scale is None else scale
    root = abs(scale) ** 0.5  # scaling both factors, as aten does, keeps products in range
    scores = (query * root) @ (key * math.copysign(root, scale)).transpose(-2, -1)
    if is_causal:
        length, source = query.size(-2), key.size(-2)
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(
            attn_mask.logical_not(), float("-inf")
        )
    if attn_mask is not None:
        scores = scores + attn_mask
    weights = torch.ops.aten._safe_softmax(scores, -1)
    return ((weights * dropout_noise(weights, dropout_p)) @ value).to(dtype)
