"""sparsefx: train unmodified PyTorch models with structured sparsity, really faster."""

from sparsefx.api import (
    freeze,
    groups,
    masks,
    probabilities,
    set_masks,
    stats,
    transform,
    unfreeze,
    wrap_loss,
)
from sparsefx.capture import CaptureError
from sparsefx.compiled import backend
from sparsefx.config import SparseConfig
from sparsefx.runtime import MissingLossError, SparseModule

__all__ = [
    "CaptureError",
    "MissingLossError",
    "SparseConfig",
    "SparseModule",
    "backend",
    "freeze",
    "groups",
    "masks",
    "probabilities",
    "set_masks",
    "stats",
    "transform",
    "unfreeze",
    "wrap_loss",
]
