"""Mask-aware kernels: compact custom ops (``sparsefx::*``) and their plain-torch CPU path;
the Triton kernels (``triton_kernels``, ``triton_ops``) are imported only where selected."""

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from sparsefx.kernels.compact import (
    attention_with_dropout,
    block_index,
    bucketed_convolution,
    conv,
    dropout_noise,
    gather_weight,
    layout_index,
    scatter_channels,
)
from sparsefx.kernels.norms import group_norm_direct

__all__ = [
    "attention_with_dropout",
    "block_index",
    "bucketed_convolution",
    "conv",
    "dropout_noise",
    "gather_weight",
    "group_norm_direct",
    "interpreting",
    "layout_index",
    "load_triton_kernels",
    "scatter_channels",
    "triton_selected",
]


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_triton_kernels() -> ModuleType:
    """``sparsefx.kernels.triton_kernels``, imported on first use (it imports triton)."""
    return importlib.import_module("sparsefx.kernels.triton_kernels")


def triton_selected(choice: str, device: torch.device) -> bool:
    """Whether the compact ops, sampler and projection of a model on `device` run the
    Triton kernels for ``SparseConfig.kernels == choice`` (raising where "triton" cannot)."""
    if choice == "torch":
        return False
    installed = importlib.util.find_spec("triton") is not None
    runs = device.type == "cuda" or (device.type == "cpu" and interpreting())
    if choice == "auto":
        return installed and device.type == "cuda"
    if not installed:
        raise ImportError("kernels='triton' needs triton: pip install 'triton>=3.6'")
    if not runs:
        raise ValueError(
            f"kernels='triton' runs on CUDA tensors, or on CPU tensors under Triton's "
            f"interpreter (TRITON_INTERPRET=1 set before torch is imported); the model is on "
            f"{device}. Use kernels='auto' or 'torch' there."
        )
    return True
