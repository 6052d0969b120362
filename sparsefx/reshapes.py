"""Capture-time normalisation of reshapes into the unflatten, permute and flatten steps they
are made of, which the analysis follows one dim at a time.

A reshape that splits one dim and merges others at once is not a flatten or an unflatten,
so a compact tensor could not pass it. ``nn.MultiheadAttention`` writes its heads that way:
``q.view(T, B * H, D).transpose(0, 1).view(B, H, T, D)`` merges the batch with the heads
only to split them again, and ``permute(2, 0, 1, 3).reshape(T * B, E)`` merges two pairs of
dims. Both are rewritten here as the same values computed by steps on *atoms*: the coarsest
sizes that both shapes of a reshape are products of (T, B, H, D above). Sizes may be
symbolic (a dynamic batch); a quotient counts only where it is whole for every value of the
symbols.

A ``bmm`` or ``baddbmm`` over heads merged into the batch (DeBERTa's ``probs.view(B * H,
T, T) @ v.view(B * H, T, d)``, BLOOM's alibi scores) becomes a matmul of the unmerged
tensors, for the same reason: the heads keep a dim of their own.
"""

from __future__ import annotations

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._sympy.functions import FloorDiv, Mod

from sparsefx.analysis.ops import eliminate_dead_code
from sparsefx.analysis.sizes import equal, folded, proves, whole_quotient

__all__ = ["traced_call", "unmerged_batch_matmuls", "unmerged_reshapes"]

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_PERMUTES = (aten.permute.default, aten.transpose.int)


def unmerged_reshapes(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each ``reshape -> permute -> reshape`` whose first reshape merges dims that
    the permute keeps together and the second splits again computed as ``unflatten ->
    permute -> flatten`` on atoms, and each other reshape that changes several dims as one
    unflatten or flatten per changed dim."""
    for rewrite in (_rewrite_chain, _rewrite_reshape):  # chains first: they hold reshapes
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in _RESHAPES and node.users:
                rewrite(gm, node)
        eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm


def unmerged_batch_matmuls(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each ``bmm`` or ``baddbmm`` of two tensors that merge the same two leading
    dims into their batch dim (DeBERTa's ``probs.view(B * H, T, T) @ v.view(B * H, T, D)``,
    BLOOM's ``alibi.baddbmm(q.reshape(B * H, T, D), k.reshape(B * H, D, T))``) computed as a
    matmul of the unmerged tensors, and its merged result by a flatten of that matmul, which
    an unflatten of the same two dims reads directly: the heads a merge hides in the batch
    stay a dim of their own, where the analysis can keep them compact."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _BATCH_MATMULS:
            continue
        added = node.target is aten.baddbmm.default
        sources = [_merge_source(arg) for arg in node.args[added : added + 2]]
        if None in sources:
            continue
        (x, _), (y, _) = sources
        env = _shape_env(x, y, node)
        leading = _sizes(x)[:2]
        if not all(equal(a, b, env) for a, b in zip(leading, _sizes(y)[:2], strict=True)):
            continue
        if added and not _unflattens_by(node.args[0], leading, env):
            continue
        with gm.graph.inserting_before(node):
            x, y = (_emit(gm, node, source, steps) for source, steps in sources)
            product = traced_call(gm, node, aten.matmul.default, (x, y))
            if added:
                product = _scaled_sum(gm, node, product, int(leading[1]))
            merged = traced_call(gm, node, aten.flatten.using_ints, (product, 0, 1))
        node.replace_all_uses_with(merged)
        for user in list(merged.users):
            if _splits(user, product, env):
                user.replace_all_uses_with(product)
    eliminate_dead_code(gm.graph)
    gm.recompile()
    return gm


_BATCH_MATMULS = (aten.bmm.default, aten.baddbmm.default)


def _unflattens_by(added: object, leading: list[sympy.Expr], env: ShapeEnv | None) -> bool:
    """Whether baddbmm's added tensor has the merged batch dim (a static count of heads
    inside it), so that unflattening it gives the unmerged product's leading dims."""
    sizes = _sizes(added)
    return (
        len(sizes) == 3 and leading[1].is_Integer and equal(sizes[0], leading[0] * leading[1], env)
    )


def _scaled_sum(gm: fx.GraphModule, node: fx.Node, product: fx.Node, heads: int) -> fx.Node:
    """baddbmm's ``beta * added + alpha * product`` on unmerged dims."""
    alpha, beta = node.kwargs.get("alpha", 1), node.kwargs.get("beta", 1)
    if alpha != 1:
        product = traced_call(gm, node, aten.mul.Tensor, (product, alpha))
    if beta == 0:  # the added tensor is ignored (torch.empty in GPT-2's upcast path)
        return product
    added = traced_call(gm, node, aten.unflatten.int, (node.args[0], 0, [-1, heads]))
    if beta != 1:
        added = traced_call(gm, node, aten.mul.Tensor, (added, beta))
    return traced_call(gm, node, aten.add.Tensor, (added, product))


def _merge_source(node: object) -> tuple[fx.Node, list[tuple]] | None:
    """The rank-4 tensor a reshape or flatten `node` merges the first two dims of into one,
    and the steps that `node` takes after the merge, to be taken on the unmerged tensor
    instead: a transpose of the last two dims (``k.reshape(B * H, T, D).transpose(-1, -2)``)
    and a scaling by a scalar (DeBERTa's ``k.T / sqrt(d)``)."""
    if not isinstance(node, fx.Node):
        return None
    if node.target is aten.transpose.int and {d % 3 for d in node.args[1:3]} == {1, 2}:  # type: ignore[operator]
        merged = _merge_source(node.args[0])
        if merged is None or any(step[0] is aten.transpose.int for step in merged[1]):
            return None
        return merged[0], [*merged[1], (aten.transpose.int, -2, -1)]
    if node.target in _SCALINGS and _is_scalar(node.args[1]):
        merged = _merge_source(node.args[0])
        return None if merged is None else (merged[0], [*merged[1], (node.target, node.args[1])])
    if node.target is aten.flatten.using_ints and tuple(node.args[1:]) != (0, 1):
        return None
    if node.target not in (*_RESHAPES, aten.flatten.using_ints):
        return None
    source, sizes = node.args[0], _sizes(node)
    source_sizes = _sizes(source)
    if len(source_sizes) != 4 or len(sizes) != 3:
        return None
    env = _shape_env(source, node)
    merged = [source_sizes[0] * source_sizes[1], *source_sizes[2:]]
    if not all(equal(a, b, env) for a, b in zip(merged, sizes, strict=True)):
        return None
    return source, []  # type: ignore[return-value]


_SCALINGS = (aten.mul.Tensor, aten.div.Tensor, aten.mul.Scalar, aten.div.Scalar)


def _is_scalar(value: object) -> bool:
    """A Python number or a 0-d tensor: it scales a merged tensor as it scales the unmerged."""
    if isinstance(value, (int, float)):
        return True
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _splits(node: fx.Node, product: fx.Node, env: ShapeEnv | None) -> bool:
    """Whether reshape `node` of `product`'s flatten gives `product`'s sizes back."""
    sizes, product_sizes = _sizes(node), _sizes(product)
    return (
        node.target in _RESHAPES
        and len(sizes) == len(product_sizes)
        and all(equal(a, b, env) for a, b in zip(sizes, product_sizes, strict=True))
    )


def _rewrite_chain(gm: fx.GraphModule, last: fx.Node) -> bool:
    permute = last.args[0]
    if not (isinstance(permute, fx.Node) and permute.target in _PERMUTES):
        return False
    first = permute.args[0]
    if not (isinstance(first, fx.Node) and first.target in _RESHAPES):
        return False
    if len(permute.users) != 1 or len(first.users) != 1:
        return False
    source = first.args[0]
    if not _aliases(first, source):
        return False  # the merge copied: the rewrite, all views, would alias the source
    env = _shape_env(source, first, last)
    refined = _refine(_sizes(source), _sizes(first), env)
    if refined is None:
        return False
    atoms, of_source, of_first = refined
    if all(len(group) == 1 for group in of_first):
        return False  # the first reshape merges nothing: the analysis follows it as it is
    order = [atom for dim in _order(permute) for atom in of_first[dim]]
    permuted = _refine([atoms[a] for a in order], _sizes(last), env)
    if permuted is None or any(len(group) != 1 for group in permuted[1]):
        return False  # the last reshape splits an atom: not the inverse of a merge
    steps = _unflattens(atoms, of_source, _size_args(first, of_first))
    if steps is None:
        return False
    with gm.graph.inserting_before(last):
        value = _emit(gm, last, source, steps)
        value = traced_call(gm, last, aten.permute.default, (value, order))
        value = _emit(gm, last, value, _flattens(permuted[2]))
    last.replace_all_uses_with(value)
    return True


def _rewrite_reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    source = node.args[0]
    refined = _refine(_sizes(source), _sizes(node), _shape_env(source, node))
    if refined is None:
        return False
    atoms, of_source, of_node = refined
    changed = sum(len(g) > 1 for g in of_source) + sum(len(g) > 1 for g in of_node)
    if changed < 2:
        return False  # a flatten, an unflatten or a no-op: the analysis reads it directly
    steps = _unflattens(atoms, of_source, _size_args(node, of_node))
    if steps is None:
        return False
    with gm.graph.inserting_before(node):
        value = _emit(gm, node, _emit(gm, node, source, steps), _flattens(of_node))
    node.replace_all_uses_with(value)
    return True


def _unflattens(
    atoms: list[sympy.Expr], groups: list[list[int]], known: dict[int, object]
) -> list[tuple] | None:
    """The unflattens that split the source's dims into atoms, last dim first (so that
    earlier dims keep their index). A symbolic atom's size is the reshape's own size
    argument where it has one (`known`), else -1; None where a dim would need two -1s."""
    steps = []
    for dim in reversed(range(len(groups))):
        group = groups[dim]
        if len(group) == 1:
            continue
        sizes = [int(atoms[a]) if atoms[a].is_Integer else known.get(a, -1) for a in group]
        if sizes.count(-1) > 1:
            return None
        steps.append((aten.unflatten.int, dim, sizes))
    return steps


def _size_args(reshape: fx.Node, groups: list[list[int]]) -> dict[int, object]:
    """Atom -> the reshape's size argument (an int or a size node) for each of its dims that
    is one atom alone."""
    sizes = list(reshape.args[1]) if len(reshape.args) > 1 else []  # type: ignore[arg-type]
    return {
        group[0]: size
        for group, size in zip(groups, sizes, strict=False)
        if len(group) == 1 and not (isinstance(size, int) and size < 0)
    }


def _flattens(groups: list[list[int]]) -> list[tuple]:
    """The flattens that merge consecutive atoms into the dims of `groups`, last first."""
    return [
        (aten.flatten.using_ints, group[0], group[-1])
        for group in reversed(groups)
        if len(group) > 1
    ]


def _emit(gm: fx.GraphModule, origin: fx.Node, value: fx.Node, steps: list[tuple]) -> fx.Node:
    for target, *args in steps:
        value = traced_call(gm, origin, target, (value, *args))
    return value


def traced_call(gm: fx.GraphModule, origin: fx.Node, target: object, args: tuple) -> fx.Node:
    """A new node with its fake value (the analysis reads shapes from it) and the source
    location of the reshape it replaces (reports name it)."""
    node = gm.graph.call_function(target, args)  # type: ignore[arg-type]
    values = fx.node.map_arg(args, lambda arg: arg.meta["val"])  # sizes as SymInts
    node.meta["val"] = target(*values)  # type: ignore[operator]
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack"):
        if key in origin.meta:
            node.meta[key] = origin.meta[key]
    return node


def _aliases(view: fx.Node, source: object) -> bool:
    """Whether `view`'s value shares `source`'s storage (a reshape that did not copy), read
    from the fake values as Inductor's reinplacing pass reads them."""
    values = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in (view, source)]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return False
    return StorageWeakRef(values[0].untyped_storage()) == StorageWeakRef(
        values[1].untyped_storage()
    )


def _order(permute: fx.Node) -> list[int]:
    """The permute's dim order (a transpose's too)."""
    ndim = len(_sizes(permute))
    if permute.target is aten.permute.default:
        return [d % ndim for d in permute.args[1]]  # type: ignore[union-attr]
    a, b = (int(d) % ndim for d in permute.args[1:3])  # type: ignore[call-overload]
    order = list(range(ndim))
    order[a], order[b] = b, a
    return order


def _sizes(node: object) -> list[sympy.Expr]:
    """The node's sizes as sympy expressions, with the constants its shape environment
    proves folded (`folded`)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(value, torch.Tensor):
        return []
    return [
        sympy.Integer(s) if isinstance(s, int) else folded(s.node.expr, s.node.shape_env)
        for s in value.shape
    ]


def _shape_env(*nodes: object) -> ShapeEnv | None:
    """The shape environment of the nodes' symbolic sizes; None where every size is static."""
    for node in nodes:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                if isinstance(size, torch.SymInt):
                    return size.node.shape_env
    return None


def _refine(
    xs: list[sympy.Expr], ys: list[sympy.Expr], env: ShapeEnv | None = None
) -> tuple[list[sympy.Expr], list[list[int]], list[list[int]]] | None:
    """The atoms both shapes are made of, and for each dim of each shape its consecutive
    atoms; None where the shapes do not split into common factors. A dim of size one is an
    atom of its own shape and joins the other shape's current dim (a batch of one merged
    with the heads), so that a size of one factors as any other size does."""
    if not xs or not ys:
        return None
    xs, ys = [sympy.sympify(x) for x in xs], [sympy.sympify(y) for y in ys]
    one = sympy.Integer(1)
    atoms: list[sympy.Expr] = []
    of_x: list[list[int]] = [[]]
    of_y: list[list[int]] = [[]]
    i = j = 0
    rest_x, rest_y = xs[0], ys[0]
    while i < len(xs) or j < len(ys):
        both = i < len(xs) and j < len(ys)
        if both and equal(rest_x, rest_y, env):
            atom, next_x, next_y = rest_y if rest_y.is_Integer else rest_x, True, True
        elif i < len(xs) and rest_x == one:  # a size-one dim: never a remainder
            atom, next_x, next_y = one, True, False
        elif j < len(ys) and rest_y == one:
            atom, next_x, next_y = one, False, True
        elif not both:
            return None
        elif (q := _quotient(rest_y, rest_x, env)) is not None:
            atom, next_x, next_y, rest_y = rest_x, True, False, q
        elif (q := _quotient(rest_x, rest_y, env)) is not None:
            atom, next_x, next_y, rest_x = rest_y, False, True, q
        else:
            return None
        (of_x[-1] if i < len(xs) else of_x[-2]).append(len(atoms))
        (of_y[-1] if j < len(ys) else of_y[-2]).append(len(atoms))
        atoms.append(atom)
        if next_x:
            i += 1
            of_x.append([])
            rest_x = xs[i] if i < len(xs) else one
        if next_y:
            j += 1
            of_y.append([])
            rest_y = ys[j] if j < len(ys) else one
    return atoms, of_x[:-1], of_y[:-1]


def _quotient(a: sympy.Expr, b: sympy.Expr, env: ShapeEnv | None) -> sympy.Expr | None:
    """``a / b`` where it is a whole size other than one for every input the graph admits:
    a polynomial with integer coefficients (``B * (T - 1) / B``), or a floor division that
    `env` proves exact (``H // (H // 2)`` where the graph's guards say H is even)."""
    quotient = whole_quotient(a, b)
    if quotient is None and not (a.is_Integer and b.is_Integer):
        quotient = FloorDiv(a, b) if proves(env, sympy.Eq(Mod(a, b), 0)) else None
    return None if quotient == 1 else quotient
