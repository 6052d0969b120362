"""Mask-aware kernels: compact custom ops (``sparsefx::*``) and their plain-torch CPU path."""

from sparsefx.kernels.compact import (
    attention_with_dropout,
    block_index,
    conv,
    dropout_noise,
    gather_weight,
    layout_index,
    scatter_channels,
)

__all__ = [
    "attention_with_dropout",
    "block_index",
    "conv",
    "dropout_noise",
    "gather_weight",
    "layout_index",
    "scatter_channels",
]
