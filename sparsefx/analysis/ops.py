"""What sparsefx knows about aten ops, matched on overloads (never on names or modules).

Three roles matter for channel sparsity:

* producers/consumers: linear and convolution with a parameter weight. A producer's output
  channels can be pruned; a consumer gathers the input columns of its weight instead of
  reading a full-width activation.
* channel-wise ops: they act on each channel independently, so they run unchanged on a
  compact tensor that holds only the kept channels.
* zero-preserving ops: channel-wise with f(0) = 0, so they may also sit *after* a mask point
  (a zero channel stays zero, and skipping it is exact).
"""

from __future__ import annotations

import torch
from torch._ops import OpOverload

aten = torch.ops.aten

LINEAR: frozenset[OpOverload] = frozenset({aten.linear.default})
CONVS: frozenset[OpOverload] = frozenset(
    {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
)
BATCH_NORM: frozenset[OpOverload] = frozenset({aten.batch_norm.default})

POOLS: dict[OpOverload, int] = {
    aten.max_pool1d.default: 1,
    aten.max_pool2d.default: 2,
    aten.max_pool3d.default: 3,
    aten.avg_pool1d.default: 1,
    aten.avg_pool2d.default: 2,
    aten.avg_pool3d.default: 3,
    aten.adaptive_avg_pool1d.default: 1,
    aten.adaptive_avg_pool2d.default: 2,
    aten.adaptive_avg_pool3d.default: 3,
}
"""Pooling ops (single-output overloads) and how many trailing dims they pool; all f(0) = 0."""

ZERO_PRESERVING_UNARY: frozenset[OpOverload] = frozenset(
    {
        aten.relu.default,
        aten.relu_.default,
        aten.gelu.default,
        aten.gelu_.default,
        aten.silu.default,
        aten.silu_.default,
        aten.leaky_relu.default,
        aten.leaky_relu_.default,
        aten.tanh.default,
        aten.tanh_.default,
        aten.hardtanh.default,
        aten.hardtanh_.default,
        aten.relu6.default,
        aten.hardswish.default,
        aten.hardswish_.default,
        aten.mish.default,
        aten.elu.default,
        aten.selu.default,
        aten.dropout.default,
        aten.feature_dropout.default,
        aten.alpha_dropout.default,
        aten.clone.default,
        aten.contiguous.default,
    }
)
"""Channel-wise and f(0) = 0, with the tensor as the first argument."""

OTHER_CHANNELWISE_UNARY: frozenset[OpOverload] = frozenset(
    {
        aten.sigmoid.default,
        aten.sigmoid_.default,
        aten.hardsigmoid.default,
        aten.softplus.default,
    }
)
"""Channel-wise but f(0) != 0: allowed only before the mask point."""

SCALAR_BINARY: frozenset[OpOverload] = frozenset(
    {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
)
"""x * c and x / c with a Python scalar c: zero-preserving."""

FLATTEN: frozenset[OpOverload] = frozenset({aten.flatten.using_ints})
RESHAPE: frozenset[OpOverload] = frozenset({aten.view.default, aten.reshape.default})


def is_conv(target: object) -> bool:
    return target in CONVS


def is_weight_op(target: object) -> bool:
    """linear or convolution: the ops whose weight channels sparsefx prunes."""
    return target in LINEAR or target in CONVS
