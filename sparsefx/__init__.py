"""sparsefx: train unmodified PyTorch models with structured sparsity, really faster."""

from sparsefx.api import (
    compact_module,
    explain,
    export,
    freeze,
    groups,
    load_structure_state,
    masks,
    probabilities,
    set_masks,
    stats,
    structure_state,
    transform,
    unfreeze,
    wrap_loss,
)
from sparsefx.capture import CaptureError
from sparsefx.compiled import backend
from sparsefx.config import SparseConfig
from sparsefx.runtime import DensityError, MissingLossError, SparseModule
from sparsefx.tools.diff import diff
from sparsefx.tools.report import Report

__all__ = [
    "CaptureError",
    "DensityError",
    "MissingLossError",
    "Report",
    "SparseConfig",
    "SparseModule",
    "backend",
    "compact_module",
    "diff",
    "explain",
    "export",
    "freeze",
    "groups",
    "load_structure_state",
    "masks",
    "probabilities",
    "set_masks",
    "stats",
    "structure_state",
    "transform",
    "unfreeze",
    "wrap_loss",
]
