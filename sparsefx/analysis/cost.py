"""Cost model: FLOPs and parameters as sympy expressions of the kept channel counts.

Every linear/conv contributes 2 * spatial * c_out * c_in * kernel FLOPs per example and
c_out * c_in * kernel (+ bias) parameters, where c_out is the symbol k_g of its group if it
is a pruned producer and c_in is k_h * block if its input is compact; an embedding adds
vocab * c_out parameters and no FLOPs; BatchNorm adds its affine parameters. A layer between
two pruned groups is therefore bilinear in their counts, which is why consecutive sparse
layers save d^2. Only linear/conv FLOPs are counted:
element-wise work is memory-bound and small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import sympy
from torch import fx

from sparsefx.analysis import ops
from sparsefx.analysis.groups import META, Group
from sparsefx.analysis.layout import Layout

__all__ = ["CostModel", "build_cost_model"]


@dataclass
class CostModel:
    symbols: list[sympy.Symbol]
    """k_g, one per group, in group order."""
    flops: sympy.Expr
    """Forward linear/conv FLOPs per example."""
    params: sympy.Expr
    sizes: list[int]
    _compiled: dict[str, object] = field(default_factory=dict, repr=False)

    def evaluate(self, which: str, kept: Sequence[float]) -> float:
        """`which` ("flops" or "params") at kept counts `kept` (one per group)."""
        if which not in self._compiled:
            self._compiled[which] = sympy.lambdify(self.symbols, getattr(self, which))
        return float(self._compiled[which](*kept))  # type: ignore[operator]

    def fraction(self, which: str, kept: Sequence[float]) -> float:
        """Cost at `kept` relative to the dense model."""
        dense = self.evaluate(which, self.sizes)
        return self.evaluate(which, kept) / dense if dense else 1.0

    def channel_costs(self, budget: str, density: float) -> list[float]:
        """Per-channel cost c_g of each group for the budget constraint (DESIGN §3).

        Costs are bilinear in the kept counts, so a cost-weighted budget uses the marginal
        cost of one channel at the target operating point k = density * size.
        """
        if budget == "channels":
            return [1.0] * len(self.symbols)
        expr = getattr(self, budget)
        point = {k: density * n for k, n in zip(self.symbols, self.sizes, strict=True)}
        return [max(float(sympy.diff(expr, k).subs(point)), 1e-12) for k in self.symbols]


def build_cost_model(gm: fx.GraphModule, groups: list[Group]) -> CostModel:
    """Symbolic costs of an annotated graph (after analysis, before rewriting)."""
    index = {g.name: i for i, g in enumerate(groups)}
    symbols = [sympy.Symbol(f"k_{i}", positive=True) for i in range(len(groups))]
    flops: sympy.Expr = sympy.Integer(0)
    params: sympy.Expr = sympy.Integer(0)

    def width(layout: Layout | None, dense: int) -> sympy.Expr:
        if layout is None:
            return sympy.Integer(dense)
        return sum(
            (
                sympy.Integer(p.size) if p.group is None else symbols[index[p.group]] * p.block
                for p in layout.pieces
            ),
            sympy.Integer(0),
        )

    counted: set[fx.Node] = set()  # a tied weight (an embedding and its LM head) counts once
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        meta = node.meta.get(META, {})
        if ops.is_weight_op(node.target):
            _, weight, bias = ops.weight_args(node)
            where = ops.weight_operands(node)
            weight_shape = tuple(weight.meta["val"].shape)  # type: ignore[attr-defined]
            compact_out = meta.get("role") == "producer" or bool(meta.get("grouped"))
            c_out = width(meta.get("layout") if compact_out else None, weight_shape[where.out_dim])
            c_in = width(meta.get("in_layout"), weight_shape[where.in_dim])
            kernel = math.prod(weight_shape[2:])
            if node.target not in ops.EMBEDDING:  # a lookup: parameters, no FLOPs
                flops += 2 * _spatial(node) * c_out * c_in * kernel
            if weight not in counted:
                params += c_out * c_in * kernel
            if bias is not None and bias not in counted:
                params += c_out
            counted.update(t for t in (weight, bias) if isinstance(t, fx.Node))
        elif node.target in ops.BATCH_NORM:
            affine = sum(arg is not None for arg in node.args[1:3])
            channels = node.meta["val"].shape[1]
            params += affine * width(meta.get("layout"), int(channels))
    return CostModel(symbols, sympy.expand(flops), sympy.expand(params), [g.size for g in groups])


def _spatial(node: fx.Node) -> int:
    """Output positions per example: every dim but batch and channels."""
    shape = tuple(node.meta["val"].shape)
    if node.target in ops.ADDMM:  # rows are flattened (batch, positions): see the view
        x = node.args[1]
        if x.op == "call_function" and x.target in ops.VIEWS:  # type: ignore[union-attr]
            shape = (*tuple(x.args[0].meta["val"].shape)[:-1], shape[-1])  # type: ignore[union-attr]
        else:
            return 1
    if ops.is_conv(node.target):
        spatial_dims = len(node.args[1].meta["val"].shape) - 2
        return math.prod(int(d) for d in shape[len(shape) - spatial_dims :])
    return math.prod(int(d) for d in shape[1:-1]) if len(shape) > 2 else 1
