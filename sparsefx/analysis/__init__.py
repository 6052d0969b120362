"""Analysis of a captured graph: channel dependency graph, coupling groups, compact layouts,
costs."""

from sparsefx.analysis.cost import CostModel, build_cost_model
from sparsefx.analysis.groups import META, Analysis, DenseOp, Group, analyze
from sparsefx.analysis.layout import Layout, Piece

__all__ = [
    "META",
    "Analysis",
    "CostModel",
    "DenseOp",
    "Group",
    "Layout",
    "Piece",
    "analyze",
    "build_cost_model",
]
