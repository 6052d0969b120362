"""Analysis of a captured graph: prunable producers, channel groups, compact layouts, costs."""

from sparsefx.analysis.cost import CostModel, build_cost_model
from sparsefx.analysis.groups import META, Analysis, DenseOp, Group, Layout, analyze

__all__ = [
    "META",
    "Analysis",
    "CostModel",
    "DenseOp",
    "Group",
    "Layout",
    "analyze",
    "build_cost_model",
]
