"""Mask-aware kernels: compact custom ops (``sparsefx::*``) and their plain-torch CPU path."""

from sparsefx.kernels.compact import (
    block_index,
    compact_batch_norm,
    compact_conv,
    compact_linear,
    gather_weight,
    scatter_channels,
    update_running_stats,
)

__all__ = [
    "block_index",
    "compact_batch_norm",
    "compact_conv",
    "compact_linear",
    "gather_weight",
    "scatter_channels",
    "update_running_stats",
]
