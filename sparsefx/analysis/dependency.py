"""The channel dependency graph: which channel dims must share one index set.

One forward walk over the captured graph gives every tensor that carries pruned channels a
:class:`Layout` in terms of *spaces* (one per prunable producer: the output channels of a
linear/conv). Each op either reads its compact inputs as they are (channel-wise ops,
consumers that gather weight columns, joins) or needs them at full width (a scatter, exact
because dropped channels are zero there). Joins record edges between spaces in a networkx
graph: a residual ``add``/``sub``, a gating ``mul`` or a ``cat`` along another dim ties two
spaces to one index set; a ``cat`` along the channel dim does not (it concatenates index
sets with offsets). The coupling groups are the connected components (see groups.py).

Each value is also tracked for the reference semantics (DESIGN §2): inside a producer's
single-user chain of channel-wise ops dropped channels still hold values (*pending*); the
chain's last node is the space's **mask point**, after which they are exactly zero. An op
that is not zero-preserving (BatchNorm's shift, sigmoid) may run compactly inside a chain
only; past the mask point it reads a full-width scatter instead.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx
from torch.export.graph_signature import InputKind

from sparsefx.analysis import ops
from sparsefx.analysis.layout import Layout, Piece

__all__ = ["DenseOp", "Member", "Propagation", "Space", "propagate"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DenseOp:
    """A linear/conv left dense, or a compact tensor scattered to full width, and why."""

    node: str
    op: str
    reason: str


@dataclass(frozen=True)
class Member:
    """A parameter dim indexed by a space: channel c owns features
    ``offset + c*block .. offset + c*block + block - 1`` of `dim` (of size `extent`)."""

    fqn: str
    dim: int
    offset: int
    block: int
    extent: int


@dataclass
class Space:
    """The output channels of one prunable producer."""

    name: str
    weight: str
    size: int
    members: list[Member] = field(default_factory=list)
    mask_point: str | None = None


@dataclass
class _Flow:
    layout: Layout
    zero: bool | None
    """Dropped channels are exact zeros here; None inside a producer's chain."""


@dataclass
class _Op:
    """How an op reads its compact inputs, when it can."""

    layout: Layout | None
    zero_preserving: bool
    chainable: bool = False
    """A unary channel-wise op: may extend a producer's chain (before its mask point)."""
    members: list[tuple[str, Member]] = field(default_factory=list)
    couplings: list[tuple[str, str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Propagation:
    spaces: dict[str, Space]
    couplings: nx.Graph
    """Nodes: space names; an edge ties two spaces, with the join ops as ``kinds``."""
    blocked: dict[str, list[str]]
    """Why a space cannot be pruned (its whole component stays dense)."""
    meta: dict[fx.Node, dict]
    dense: list[DenseOp]
    scatters: list[DenseOp]


class GraphView:
    """Lookups over a captured graph: which placeholders are parameters and buffers."""

    def __init__(self, graph: fx.Graph, inputs: list[tuple[InputKind, str]]):
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self.state = {
            n: (kind, target)
            for n, (kind, target) in zip(placeholders, inputs, strict=True)
            if kind in (InputKind.PARAMETER, InputKind.BUFFER)
        }
        self.output = next(n for n in graph.nodes if n.op == "output")

    def param(self, arg: object) -> str | None:
        """FQN if `arg` is a parameter placeholder."""
        entry = self.state.get(arg)  # type: ignore[arg-type]
        return entry[1] if entry and entry[0] == InputKind.PARAMETER else None

    def state_fqn(self, arg: object) -> str | None:
        entry = self.state.get(arg)  # type: ignore[arg-type]
        return entry[1] if entry else None

    def own_param(self, arg: object) -> str | None:
        """FQN if `arg` is a parameter that this one op uses."""
        fqn = self.param(arg)
        return fqn if fqn is not None and len(arg.users) == 1 else None  # type: ignore[union-attr]


def propagate(gm: fx.GraphModule, view: GraphView, dense: dict[str, str]) -> Propagation:
    """Walk `gm` once; producers whose space is in `dense` are left dense with that reason."""
    return _Walk(view, dense).run(gm)


# --------------------------------------------------------------------------------------------


class _Walk:
    def __init__(self, view: GraphView, dense: dict[str, str]):
        self.view = view
        self.dense_spaces = dense
        self.flows: dict[fx.Node, _Flow] = {}
        self.result = Propagation({}, nx.Graph(), {}, {}, [], [])

    def run(self, gm: fx.GraphModule) -> Propagation:
        for node in gm.graph.nodes:
            compact = [a for a in dict.fromkeys(_flat_args(node)) if a in self.flows]
            if node.op == "output":
                for arg in compact:
                    self._full_width(arg, node, "model output")
            elif node.op == "call_function":
                self._visit(node, compact)
        return self.result

    def _meta(self, node: fx.Node) -> dict:
        return self.result.meta.setdefault(node, {})

    def _visit(self, node: fx.Node, compact: list[fx.Node]) -> None:
        op = self._decide(node, compact) if compact else None
        if isinstance(op, str):
            for arg in compact:
                self._end_chain(arg)
                self._full_width(arg, node, op)
            op = None
        elif op is not None:
            chained = op.chainable and len(compact) == 1 and self.flows[compact[0]].zero is None
            if not chained:
                for arg in compact:
                    self._end_chain(arg)
            if not (chained or op.zero_preserving):
                for arg in compact:
                    self._full_width(
                        arg,
                        node,
                        f"{_op_name(node)} is not zero-preserving and reads channels "
                        "past their mask point (dropped channels are zeros it would change)",
                    )
                op = None
            else:
                self._accept(node, op, zero=None if chained else True)
        if ops.is_weight_op(node.target) and not _is_depthwise(node):
            self._source(node)
        if node in self.flows and len(node.users) != 1:
            self._end_chain(node)

    def _accept(self, node: fx.Node, op: _Op, *, zero: bool | None) -> None:
        for space, member in op.members:
            self.result.spaces[space].members.append(member)
        for a, b, kind in op.couplings:
            self.result.couplings.add_edge(a, b)
            self.result.couplings.edges[a, b].setdefault("kinds", set()).add(kind)
        meta = self._meta(node)
        meta.update(op.meta)
        if op.layout is not None:
            meta.setdefault("role", "channelwise")
            meta["layout"] = op.layout
            self.flows[node] = _Flow(op.layout, zero)

    def _end_chain(self, node: fx.Node) -> None:
        """`node` is the last of its producer's chain: the mask point of its space."""
        flow = self.flows[node]
        if flow.zero is None:
            flow.zero = True
            (space,) = flow.layout.groups
            self.result.spaces[space].mask_point = node.name
            self._meta(node)["mask_point"] = space

    def _full_width(self, node: fx.Node, user: fx.Node, reason: str) -> None:
        self._meta(node).setdefault("full_width_users", []).append(user.name)
        self.result.scatters.append(DenseOp(user.name, _op_name(user), reason))

    def _block(self, node: fx.Node, reason: str) -> None:
        for space in self.flows[node].layout.groups:
            self.result.blocked.setdefault(space, []).append(reason)

    # -- sources -------------------------------------------------------------------------

    def _source(self, node: fx.Node) -> None:
        """A linear/conv's output channels become a space, unless it is left dense."""
        reason = _source_blocker(node, self.view) or self.dense_spaces.get(node.name)
        if reason is not None:
            self.result.dense.append(DenseOp(node.name, _op_name(node), reason))
            self._meta(node)["dense_reason"] = reason
            return
        weight, bias = _weight_args(node)
        dim = _channel_dim(node)
        size = int(_shape(node)[dim])
        space = Space(node.name, self.view.param(weight), size)  # type: ignore[arg-type]
        space.members.append(Member(space.weight, 0, 0, 1, size))
        if bias is not None:
            space.members.append(Member(self.view.param(bias), 0, 0, 1, size))  # type: ignore[arg-type]
        self.result.spaces[node.name] = space
        self.result.couplings.add_node(node.name)
        layout = Layout.of(node.name, dim, size)
        self._meta(node).update(role="producer", group=node.name, layout=layout)
        self.flows[node] = _Flow(layout, None)

    # -- what each op does with compact inputs -------------------------------------------

    def _decide(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        target = node.target
        first = node.args[0] if node.args else None
        if target in ops.BINARY:
            return self._binary(node, compact)
        if target in ops.CAT:
            return self._cat(node, compact)
        if target in ops.NORMS:
            for arg in compact:
                self._block(arg, f"normalised across features by {_op_name(node)} ({node.name})")
            return f"{_op_name(node)} normalises across all features and reads them at full width"
        if compact != [first] or not isinstance(first, fx.Node):
            return f"{_op_name(node)} reads the compact tensor as a weight or extra argument"
        layout = self.flows[first].layout
        if ops.is_weight_op(target):
            return self._weight_op(node, layout)
        if target in ops.BATCH_NORM:
            return self._batch_norm(node, layout)
        if target in ops.POOLS:
            if layout.dim >= len(_shape(first)) - ops.POOLS[target]:  # type: ignore[index]
                return "pooling over the channel dim"
            return _Op(layout, zero_preserving=True, chainable=True)
        if target in ops.ZERO_PRESERVING_UNARY:
            return _Op(layout, zero_preserving=True, chainable=True)
        if target in ops.OTHER_CHANNELWISE_UNARY:
            return _Op(layout, zero_preserving=False, chainable=True)
        if target in ops.VIEWS:
            return _view(node, first, layout)
        if target in ops.PERMUTES:
            return _permute(node, layout)
        if target in ops.REDUCTIONS:
            return _reduction(node, layout)
        return f"{_op_name(node)} mixes channels or is not supported on compact tensors"

    def _weight_op(self, node: fx.Node, layout: Layout) -> _Op | str:
        weight, bias = _weight_args(node)
        ndim = len(_shape(node.args[0]))  # type: ignore[arg-type]
        if _is_depthwise(node):
            if self.view.own_param(weight) is None or (
                bias is not None and self.view.own_param(bias) is None
            ):
                return "depthwise convolution whose weight is not a parameter used by it alone"
            if layout.dim != 1 or any(p.block != 1 for p in layout.pieces):
                return "depthwise convolution channels are not the compact dim"
            members = self._members(layout, [(weight, 0), (bias, 0)])
            return _Op(
                layout, zero_preserving=bias is None, chainable=True, members=members,
                meta={"depthwise": True},
            )  # fmt: skip
        if self.view.own_param(weight) is None:
            return f"{_op_name(node)} weight is not a parameter used by this op alone"
        if ops.is_conv(node.target):
            if _conv_groups(node) != 1:
                return "grouped convolution reads these channels"
            if layout.dim != ndim - (len(_shape(weight)) - 2) - 1 or any(
                p.block != 1 for p in layout.pieces
            ):
                return "convolution input channels are not the compact dim"
        elif layout.dim != ndim - 1:
            return "linear input features are not the compact dim"
        meta = {"in_layout": layout, "role": "consumer"}
        return _Op(
            None, zero_preserving=True, members=self._members(layout, [(weight, 1)]), meta=meta
        )

    def _batch_norm(self, node: fx.Node, layout: Layout) -> _Op | str:
        if layout.dim != 1 or any(p.block != 1 for p in layout.pieces):
            return "batch_norm normalises a dim other than the compact one"
        state = node.args[1:5]  # weight, bias, running_mean, running_var
        for arg in state:
            if arg is not None and (self.view.state_fqn(arg) is None or len(arg.users) > 1):  # type: ignore[union-attr]
                return "batch_norm parameters are not module state used by this op alone"
        params = [(arg, 0) for arg in state[:2] if arg is not None]
        return _Op(
            layout, zero_preserving=False, chainable=True, members=self._members(layout, params)
        )

    def _members(self, layout: Layout, args: list[tuple[object, int]]) -> list[tuple[str, Member]]:
        """(space, member) for each parameter dim that `layout`'s pieces index."""
        found = []
        for arg, dim in args:
            fqn = self.view.param(arg)
            if fqn is None:
                continue
            for piece, offset in zip(layout.pieces, layout.offsets(), strict=True):
                if piece.group is not None:
                    member = Member(fqn, dim, offset, piece.block, layout.full)
                    found.append((piece.group, member))
        return found

    def _binary(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        name = _op_name(node)
        a, b = node.args[0], node.args[1]
        if len(compact) == 2:
            la, lb = self.flows[a].layout, self.flows[b].layout  # type: ignore[index]
            if _shape(a) != _shape(b) or not la.same_shape(lb):  # type: ignore[arg-type]
                return f"{name} joins tensors whose channels are laid out differently"
            if node.target in ops.DIV:
                return f"{name} divides by a compact tensor"
            kind = "gate" if node.target in ops.MUL else "residual"
            pairs = zip(la.pieces, lb.pieces, strict=True)
            couplings = [(p.group, q.group, kind) for p, q in pairs if p.group and q.group]
            return _Op(la, zero_preserving=True, couplings=couplings)  # type: ignore[arg-type]
        (x,) = compact
        layout = self.flows[x].layout
        other = b if x is a else a
        if _shape(x) != _shape(node):
            return f"{name} broadcasts the compact tensor to a larger shape"
        if isinstance(other, fx.Node):
            shape = _shape(other)
            other_dim = layout.dim - (len(_shape(x)) - len(shape))
            if other_dim >= 0 and int(shape[other_dim]) != 1:
                return f"{name} with a full-width tensor that is not pruned alongside"
        elif not isinstance(other, int | float) or isinstance(other, bool):
            return f"{name} with an argument sparsefx does not understand"
        if node.target in ops.MUL:
            zero_preserving = True
        elif node.target in ops.DIV:
            if x is not a:
                return f"{name} divides by a compact tensor"
            zero_preserving = True
        else:
            zero_preserving = False
        return _Op(layout, zero_preserving=zero_preserving, chainable=True)

    def _cat(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        tensors = node.args[0]
        out_ndim = len(_shape(node))
        dim = _arg(node, 1, "dim", 0) % out_ndim  # type: ignore[operator]
        layouts = [self.flows[t].layout if t in compact else None for t in tensors]  # type: ignore[union-attr]
        if any(layout is not None and layout.dim == dim for layout in layouts):
            pieces: list[Piece] = []
            for tensor, layout in zip(tensors, layouts, strict=True):  # type: ignore[arg-type]
                if layout is None:
                    pieces.append(Piece(None, int(_shape(tensor)[dim])))
                elif layout.dim != dim:
                    return "cat of tensors whose channels are on different dims"
                else:
                    pieces.extend(layout.pieces)
            return _Op(Layout(dim, tuple(pieces)), zero_preserving=True)
        first = layouts[0]
        if first is None or any(la is None or not first.same_shape(la) for la in layouts):
            return "cat of compact and dense tensors along another dim"
        couplings = [
            (p.group, q.group, "concat")
            for la in layouts[1:]
            for p, q in zip(first.pieces, la.pieces, strict=True)  # type: ignore[union-attr]
            if p.group and q.group
        ]
        return _Op(first, zero_preserving=True, couplings=couplings)  # type: ignore[arg-type]


# -- layout transfer of shape ops ---------------------------------------------------------------


def _view(node: fx.Node, x: fx.Node, layout: Layout) -> _Op | str:
    """flatten and unflatten keep channels as blocks; other reshapes are not understood."""
    in_shape, out_shape = _shape(x), _shape(node)
    span = _merged_span(in_shape, out_shape)
    if span is not None:
        start, end = span
        d = layout.dim
        if d < start:
            moved = layout
        elif d > end:
            moved = layout.at(d - (end - start))
        elif d == start:
            moved = layout.scaled(_static_prod(in_shape[start + 1 : end + 1]))  # type: ignore[arg-type]
        else:
            return f"{_op_name(node)} merges the channel dim into an outer dim"
        return _Op(
            moved, zero_preserving=True, chainable=True, meta={"view": ("flatten", start, end)}
        )
    span = _merged_span(out_shape, in_shape)
    if span is None:
        return f"{_op_name(node)} reshapes channels in a way other than flattening"
    start, end = span
    d = layout.dim
    inner = [int(s) for s in out_shape[start + 1 : end + 1]]
    if d < start:
        moved = layout
    elif d > start:
        moved = layout.at(d + (end - start))
    else:
        divided = layout.divided(_static_prod(inner))
        if divided is None:
            return f"{_op_name(node)} splits a channel across dims"
        moved = divided
    return _Op(
        moved,
        zero_preserving=True,
        chainable=True,
        meta={"view": ("unflatten", start, [-1, *inner])},
    )


def _permute(node: fx.Node, layout: Layout) -> _Op:
    ndim = len(_shape(node))
    if node.target is aten.permute.default:
        order = [d % ndim for d in node.args[1]]  # type: ignore[union-attr]
        new_dim = order.index(layout.dim)
    else:
        a, b = (int(d) % ndim for d in node.args[1:3]) if len(node.args) > 2 else (0, 1)  # type: ignore[call-overload]
        new_dim = {a: b, b: a}.get(layout.dim, layout.dim)
    return _Op(layout.at(new_dim), zero_preserving=True, chainable=True)


def _reduction(node: fx.Node, layout: Layout) -> _Op | str:
    ndim = len(_shape(node.args[0]))  # type: ignore[arg-type]
    dims = node.args[1] if len(node.args) > 1 else None
    if dims is None:
        return f"{_op_name(node)} reduces over every dim"
    dims = [int(d) % ndim for d in ([dims] if isinstance(dims, int) else dims)]  # type: ignore[union-attr]
    if layout.dim in dims:
        return f"{_op_name(node)} reduces over the channel dim"
    keepdim = bool(_arg(node, 2, "keepdim", False))
    new_dim = layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims)
    return _Op(layout.at(new_dim), zero_preserving=True, chainable=True)


# -- helpers ---------------------------------------------------------------------------------------


def _source_blocker(node: fx.Node, view: GraphView) -> str | None:
    """Why this linear/conv cannot be a pruned producer, or None if it can."""
    weight, bias = _weight_args(node)
    if view.param(weight) is None:
        return "weight is not a parameter of the model"
    if view.own_param(weight) is None:
        return "weight is used by several ops (shared weights are not pruned yet)"
    if bias is not None and view.own_param(bias) is None:
        return "bias is not a parameter used by this op alone"
    if ops.is_conv(node.target) and _conv_groups(node) != 1:
        return "grouped convolution (only depthwise convolutions follow their input's channels)"
    if _reaches_output(node, view):
        return "output layer: its channels reach the model output or loss"
    return None


def _reaches_output(node: fx.Node, view: GraphView) -> bool:
    """Whether `node` reaches the graph output without passing another linear/conv that
    mixes channels (a depthwise conv does not)."""
    seen, frontier = {node}, [node]
    while frontier:
        for user in frontier.pop().users:
            if user is view.output:
                return True
            mixes = ops.is_weight_op(user.target) and not _is_depthwise(user)
            if user in seen or (user.op == "call_function" and mixes):
                continue
            seen.add(user)
            frontier.append(user)
    return False


def _is_depthwise(node: fx.Node) -> bool:
    """A convolution whose every output channel reads only the same input channel."""
    if not ops.is_conv(node.target):
        return False
    groups = _conv_groups(node)
    out_channels, in_per_group = _shape(node.args[1])[:2]  # type: ignore[arg-type]
    return groups > 1 and int(in_per_group) == 1 and int(out_channels) == groups


def _merged_span(in_shape: tuple, out_shape: tuple) -> tuple[int, int] | None:
    """(start, end) if out_shape is in_shape with dims start..end merged into one."""
    merged = len(in_shape) - len(out_shape)
    if merged < 0:
        return None
    for start in range(len(out_shape)):
        end = start + merged
        same_prefix = [str(d) for d in in_shape[:start]] == [str(d) for d in out_shape[:start]]
        same_suffix = [str(d) for d in in_shape[end + 1 :]] == [
            str(d) for d in out_shape[start + 1 :]
        ]
        dims = in_shape[start : end + 1]
        static = all(isinstance(d, int) for d in dims)
        if same_prefix and same_suffix and static and _static_prod(dims) == out_shape[start]:
            return start, end
    return None


def _static_prod(sizes: tuple | list) -> int:
    product = 1
    for size in sizes:
        product *= int(size)
    return product


def _flat_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _arg(node: fx.Node, position: int, name: str, default: object) -> object:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _op_name(node: fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    return str(getattr(node.target, "__name__", node.target))


def _shape(node: object) -> tuple:
    return tuple(node.meta["val"].shape)  # type: ignore[attr-defined]


def _channel_dim(node: fx.Node) -> int:
    """Dim of a linear/conv output that holds its output channels."""
    ndim = len(_shape(node))
    if ops.is_conv(node.target):
        return ndim - (len(_shape(node.args[1])) - 2) - 1
    return ndim - 1


def _weight_args(node: fx.Node) -> tuple[object, object]:
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return node.args[1], bias


def _conv_groups(node: fx.Node) -> int:
    return int(_arg(node, 6, "groups", 1))  # type: ignore[call-overload]
