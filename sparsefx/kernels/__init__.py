"""Mask-aware kernels: compact custom ops (``sparsefx::*``) and their plain-torch CPU path."""

from sparsefx.kernels.compact import (
    block_index,
    conv,
    gather_weight,
    layout_index,
    scatter_channels,
)

__all__ = ["block_index", "conv", "gather_weight", "layout_index", "scatter_channels"]
