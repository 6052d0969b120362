"""Cost model: FLOPs and parameters as sympy expressions of the kept channel counts.

Every linear/conv contributes 2 * positions * c_out * c_in * kernel FLOPs per example and
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
import torch
from torch import fx
from torch.export.graph_signature import InputKind

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


def build_cost_model(
    gm: fx.GraphModule, inputs: Sequence[tuple[InputKind, str]], groups: list[Group]
) -> CostModel:
    """Symbolic costs of an annotated graph (after analysis, before rewriting); `inputs`
    says which placeholders are the user's (the first one's dim 0 is the batch)."""
    batch = _batch(gm, inputs)
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
                flops += (
                    2 * _positions(node, weight_shape[where.out_dim], batch) * c_out * c_in * kernel
                )
            if weight not in counted:
                params += c_out * c_in * kernel
            if bias is not None and bias not in counted:
                params += c_out
            counted.update(t for t in (weight, bias) if isinstance(t, fx.Node))
        elif node.target in ops.CHANNEL_NORMS or node.target is torch.ops.aten.group_norm.default:
            weight_at = 1 if node.target in ops.CHANNEL_NORMS else 2  # after num_groups
            affine = sum(arg is not None for arg in node.args[weight_at : weight_at + 2])
            channels = node.meta["val"].shape[1]
            params += affine * width(meta.get("layout"), int(channels))
    return CostModel(symbols, sympy.expand(flops), sympy.expand(params), [g.size for g in groups])


def _batch(gm: fx.GraphModule, inputs: Sequence[tuple[InputKind, str]]) -> int:
    """Dim 0 of the first user input that is a tensor with dims (1 if there is none)."""
    for node, (kind, _) in zip(gm.graph.find_nodes(op="placeholder"), inputs, strict=False):
        value = node.meta.get("val")
        if kind == InputKind.USER_INPUT and isinstance(value, torch.Tensor) and value.dim():
            return _hint(value.shape[0])
    return 1


def _positions(node: fx.Node, channels: int, batch: int) -> sympy.Rational:
    """Output positions per example: the output's elements per channel over the batch. So
    a layer run on a tensor whose batch was merged with other dims (GPT-2's Conv1D, OPT's
    ``view(-1, C)``, Swin's windows) counts every row, and one run once per batch (on a
    parameter) is spread over the batch's examples."""
    elements = math.prod(_hint(d) for d in node.meta["val"].shape)
    return sympy.Rational(elements // channels, batch)


def _hint(size: int | torch.SymInt) -> int:
    """A size's example value: a symbolic size's is read without adding a guard (which would
    specialise the graph's dynamic dims for every later reader). A data-dependent size (the
    rows a bool mask selects) has none; its upper bound stands in for it."""
    if isinstance(size, int):
        return size
    if size.node.hint is not None:
        return int(size.node.hint)
    bound = size.node.shape_env.bound_sympy(size.node.expr).upper
    if not bound.is_finite:
        raise ValueError(
            f"sparsefx cannot estimate the cost of a layer whose size {size} depends on data "
            "without a bound; give the op that makes it a known size (index with integer "
            "positions rather than a bool mask)"
        )
    return int(bound)
