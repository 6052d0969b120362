"""Max pooling for the eager CPU programs: computed channels-last, returned as laid out.

ATen's CPU ``max_pool2d`` on a contiguous (NCHW) tensor runs a scalar loop per output
element; on a channels-last tensor it vectorises across channels. On a 2-core AVX-512 VM
the HF ResNet stem's pool (32×16×16×16, 3×3 stride 2) took 1.0 ms NCHW and 0.1 ms
channels-last, 0.2 ms with the two layout copies around it: a few percent of a compact
ResNet step, whose other ops shrank with the kept channels. The backward runs ATen's NCHW
kernel on the contiguous indices (the same flat H×W offsets in either layout), which
scatters faster than the channels-last one.

Both layouts pick the first maximum of a window and let NaN win, so values and indices are
identical (tests/test_kernels.py compares them on ties and NaN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["max_pool2d_direct"]

aten = torch.ops.aten


def _runs_channels_last(x: Tensor) -> bool:
    """Where the detour pays: a contiguous NCHW CPU tensor (a channels-last one is pooled
    fast as it is, and CUDA's kernels have no such cliff)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous()
        and not x.is_contiguous(memory_format=torch.channels_last)  # e.g. 1×1 maps
    )


def _pool_channels_last(
    x: Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool
) -> tuple[Tensor, Tensor]:
    """(values, indices) of ``max_pool2d_with_indices``, both contiguous NCHW."""
    values, indices = aten.max_pool2d_with_indices(
        x.contiguous(memory_format=torch.channels_last),
        kernel_size, stride, padding, dilation, ceil_mode,
    )  # fmt: skip
    return values.contiguous(), indices


class _ChannelsLastMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        values, indices = _pool_channels_last(x, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x, indices)
        ctx.pool = (kernel_size, stride, padding, dilation, ceil_mode)
        return values

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        grad_x = aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, *ctx.pool, indices.contiguous()
        )
        return grad_x, None, None, None, None, None


def max_pool2d_direct(
    x: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int] = (),
    padding: Sequence[int] = (0,),
    dilation: Sequence[int] = (1,),
    ceil_mode: bool = False,
) -> Tensor:
    """``aten.max_pool2d`` with its autograd, pooled channels-last where that pays."""
    if not _runs_channels_last(x):
        return aten.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    if not (x.requires_grad and torch.is_grad_enabled()):  # the score forwards
        return _pool_channels_last(x, kernel_size, stride, padding, dilation, ceil_mode)[0]
    return _ChannelsLastMaxPool.apply(x, kernel_size, stride, padding, dilation, ceil_mode)
