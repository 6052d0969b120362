"""Capture-time lowering of two-operand einsums to permutes around one matmul.

The analysis follows a batched matmul's batch dims (attention's heads: `_Walk._matmul`), but
read an einsum as taking its operands whole, so attention written as einsum (torchvision's
MaxViT, Hugging Face CvT and Funnel) scattered q, k and v to full width before it. torch has
no Python decomposition of ``aten.einsum`` to lower it with; this is the sum of products of
two operands that ATen's einsum itself computes with a batched matmul, for the equations
where each role (left free, right free, contracted) has at most one letter, so that no
reshape is needed: ``bhid,bhjd->bhij`` is ``q @ k.transpose(-1, -2)``. Other einsums (an
ellipsis, a diagonal, a letter summed in one operand only, three operands) stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from sparsefx.analysis.sizes import same_size
from sparsefx.reshapes import traced_call

__all__ = ["einsum_matmuls"]

aten = torch.ops.aten


@dataclass(frozen=True)
class _Plan:
    batch: str
    """Letters of both operands and the output: the matmul's batch dims, in a's order."""
    left: str
    """At most one letter of a alone (the matmul's rows)."""
    right: str
    """At most one letter of b alone (its columns)."""
    contracted: str
    """At most one letter of both operands that the output does not have."""
    a: str
    b: str
    out: str


def einsum_matmuls(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each two-operand einsum that `_plan` accepts as permutes, unsqueezes and
    squeezes around ``aten.matmul``."""
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.einsum.default)):
        plan = _plan(node)
        if plan is None:
            continue
        with gm.graph.inserting_before(node):
            lowered = _lower(gm, node, plan)
        node.replace_all_uses_with(lowered)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _plan(node: fx.Node) -> _Plan | None:
    equation, operands = node.args[0], node.args[1]
    if node.kwargs.get("path") is not None or len(operands) != 2 or "." in equation:  # type: ignore[arg-type]
        return None
    if not all(isinstance(t, fx.Node) and "val" in t.meta for t in operands):  # type: ignore[union-attr]
        return None
    equation = equation.replace(" ", "")  # type: ignore[union-attr]
    inputs, arrow, out = equation.partition("->")
    a, _, b = inputs.partition(",")
    if not arrow:  # implicit output: the letters seen once, in alphabetical order
        out = "".join(sorted(c for c in a + b if (a + b).count(c) == 1))
    if any(len(set(s)) != len(s) for s in (a, b, out)) or not set(out) <= set(a + b):
        return None
    shapes = [operand.meta["val"].shape for operand in operands]  # type: ignore[union-attr]
    if len(a) != len(shapes[0]) or len(b) != len(shapes[1]):
        return None
    batch = "".join(c for c in a if c in b and c in out)
    contracted = "".join(c for c in a if c in b and c not in out)
    left = "".join(c for c in a if c not in b)
    right = "".join(c for c in b if c not in a)
    if not set(left + right) <= set(out) or max(len(left), len(right), len(contracted)) > 1:
        return None  # a letter summed in one operand alone, or a role needing a reshape
    for c in batch + contracted:  # no broadcasting of size-1 dims
        if not same_size(shapes[0][a.index(c)], shapes[1][b.index(c)]):
            return None
    return _Plan(batch, left, right, contracted, a, b, out)


def _lower(gm: fx.GraphModule, node: fx.Node, plan: _Plan) -> fx.Node:
    """``matmul(a as [batch, left, contracted], b as [batch, contracted, right])``, a role
    without a letter as a dim of one, then permuted to the output's letters."""
    x, y = node.args[1]  # type: ignore[misc]
    lhs = _arranged(gm, node, x, plan.a, plan.batch, (plan.left, plan.contracted))
    rhs = _arranged(gm, node, y, plan.b, plan.batch, (plan.contracted, plan.right))
    value = traced_call(gm, node, aten.matmul.default, (lhs, rhs))
    n = len(plan.batch)
    if not plan.right:
        value = traced_call(gm, node, aten.squeeze.dim, (value, n + 1))
    if not plan.left:
        value = traced_call(gm, node, aten.squeeze.dim, (value, n))
    letters = plan.batch + plan.left + plan.right
    order = [letters.index(c) for c in plan.out]
    if order != list(range(len(order))):
        value = traced_call(gm, node, aten.permute.default, (value, order))
    return value


def _arranged(
    gm: fx.GraphModule, node: fx.Node, x: fx.Node, letters: str, batch: str, roles: tuple[str, str]
) -> fx.Node:
    """`x` permuted to [batch..., first role, second role], an empty role a new dim of one."""
    order = [letters.index(c) for c in batch + roles[0] + roles[1]]
    if order != list(range(len(order))):
        x = traced_call(gm, node, aten.permute.default, (x, order))
    if not roles[0]:
        x = traced_call(gm, node, aten.unsqueeze.default, (x, len(batch)))
    if not roles[1]:
        x = traced_call(gm, node, aten.unsqueeze.default, (x, len(batch) + 1))
    return x
