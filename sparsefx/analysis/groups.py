"""Find prunable producers, their channel groups and where each tensor is compact.

For each linear/conv whose weight is a parameter, the channels it produces form one group.
Its output is followed forward: through the channel-wise chain (bias, BatchNorm,
activation, dropout, pooling, flatten) the tensor stays *compact* (only kept channels);
the chain ends at the group's **mask point**, where the reference semantics zero dropped
channels (DESIGN §2). Past a branch only zero-preserving ops stay compact. A consumer
(linear/conv) gathers its weight's kept input columns; any other user gets a scatter back
to full width, which is exact because dropped channels are zero there.

Results are written to ``node.meta["sparsefx"]`` (keys documented in passes/README.md) and
returned as an :class:`Analysis`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx
from torch.export.graph_signature import InputKind

from sparsefx.analysis import ops

__all__ = ["META", "Analysis", "DenseOp", "Group", "Layout", "analyze"]

META = "sparsefx"


@dataclass(frozen=True)
class Layout:
    """Where a compact tensor keeps its channels: `dim` holds `block` features per channel."""

    group: str
    dim: int
    block: int
    full: int
    """Full (dense) size of `dim`."""


@dataclass
class Group:
    """One channel index space that is kept or dropped together (DESIGN §2)."""

    name: str
    size: int
    members: list[tuple[str, int]]
    """(parameter FQN in the original model, dim) for every parameter the channels index."""
    producer: str
    mask_point: str
    """Node after which dropped channels are exactly zero in the reference semantics."""


@dataclass(frozen=True)
class DenseOp:
    """A linear/conv left dense, or a compact tensor scattered to full width, and why."""

    node: str
    op: str
    reason: str


@dataclass
class Analysis:
    groups: list[Group] = field(default_factory=list)
    dense: list[DenseOp] = field(default_factory=list)
    scatters: list[DenseOp] = field(default_factory=list)


def analyze(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> Analysis:
    """Annotate `gm` with groups and compact layouts; see the module docstring."""
    graph = _GraphView(gm.graph, inputs)
    result = Analysis()
    for node in gm.graph.nodes:
        node.meta.pop(META, None)
    for node in gm.graph.nodes:
        if node.op != "call_function" or not ops.is_weight_op(node.target):
            continue
        reason = _producer_blocker(node, graph)
        if reason is not None:
            result.dense.append(DenseOp(node.name, _op_name(node), reason))
            _meta(node)["dense_reason"] = reason
            continue
        result.groups.append(_follow_group(node, graph, result))
    return result


# --------------------------------------------------------------------------------------------


class _GraphView:
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


def _meta(node: fx.Node) -> dict:
    return node.meta.setdefault(META, {})


def _op_name(node: fx.Node) -> str:
    return str(getattr(node.target, "__name__", node.target))


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


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
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


def _producer_blocker(node: fx.Node, graph: _GraphView) -> str | None:
    """Why this linear/conv cannot be a pruned producer, or None if it can."""
    weight, bias = _weight_args(node)
    if graph.param(weight) is None:
        return "weight is not a parameter of the model"
    if len(weight.users) > 1:  # type: ignore[union-attr]
        return "weight is used by several ops (shared weights are not pruned yet)"
    if bias is not None and (graph.param(bias) is None or len(bias.users) > 1):  # type: ignore[union-attr]
        return "bias is not a parameter used by this op alone"
    if ops.is_conv(node.target) and _conv_groups(node) != 1:
        return "grouped or depthwise convolution (channel coupling not supported yet)"
    if _reaches_output(node, graph):
        return "output layer: its channels reach the model output or loss"
    return None


def _reaches_output(node: fx.Node, graph: _GraphView) -> bool:
    """Whether `node` reaches the graph output without passing another linear/conv."""
    seen, frontier = {node}, [node]
    while frontier:
        for user in frontier.pop().users:
            if user is graph.output:
                return True
            if user in seen or (user.op == "call_function" and ops.is_weight_op(user.target)):
                continue
            seen.add(user)
            frontier.append(user)
    return False


def _group_name(weight_fqn: str) -> str:
    return weight_fqn.removesuffix(".weight")


def _follow_group(producer: fx.Node, graph: _GraphView, result: Analysis) -> Group:
    """Mark every node whose output is compact in this producer's group."""
    weight, bias = _weight_args(producer)
    weight_fqn = graph.param(weight)
    assert weight_fqn is not None
    name = _group_name(weight_fqn)
    dim = _channel_dim(producer)
    size = int(_shape(producer)[dim])
    group = Group(name, size, [(weight_fqn, 0)], producer.name, producer.name)
    if bias is not None:
        group.members.append((graph.param(bias), 0))  # type: ignore[arg-type]
    meta = _meta(producer)
    meta.update(role="producer", group=name, layout=Layout(name, dim, 1, size))

    mask_point = producer
    # worklist of (compact node, its layout, still in the single-user chain?)
    work = [(producer, meta["layout"], True)]
    while work:
        node, layout, in_chain = work.pop()
        users = list(node.users)
        single = in_chain and len(users) == 1
        chain_continued = False
        for user in users:
            step = _classify_user(user, node, layout, graph, in_chain=single)
            if isinstance(step, _Consume):
                _meta(user)["in_layout"] = layout
                _meta(user).setdefault("role", "consumer")
                group.members.append((graph.param(user.args[1]), 1))  # type: ignore[arg-type]
            elif isinstance(step, _Continue):
                _meta(user).update(role="channelwise", layout=step.layout, **step.extra)
                group.members.extend((fqn, 0) for fqn in step.members)
                work.append((user, step.layout, single))
                chain_continued = single
            else:
                _meta(node).setdefault("full_width_users", []).append(user.name)
                result.scatters.append(DenseOp(user.name, _op_name(user), step))
        if in_chain and not chain_continued:
            mask_point = node
    group.mask_point = mask_point.name
    _meta(mask_point)["mask_point"] = name
    return group


@dataclass(frozen=True)
class _Consume:
    pass


@dataclass(frozen=True)
class _Continue:
    layout: Layout
    members: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)


def _classify_user(
    user: fx.Node, node: fx.Node, layout: Layout, graph: _GraphView, *, in_chain: bool
) -> _Consume | _Continue | str:
    """How `user` treats compact `node`: gather it, pass it on compactly, or why not."""
    if user.op != "call_function":
        return "model output" if user.op == "output" else f"{user.op} node"
    target = user.target
    if not _understood(user):
        return f"{_op_name(user)} mixes channels or is not supported on compact tensors"
    first_arg = bool(user.args) and user.args[0] is node
    if not first_arg or any(a is node for a in _flat_args(user)[1:]):
        return f"{_op_name(user)} reads the compact tensor as a weight or extra argument"
    ndim = len(_shape(node))

    if ops.is_weight_op(target):
        if graph.param(user.args[1]) is None:
            return f"{_op_name(user)} weight is not a parameter"
        if ops.is_conv(target):
            if _conv_groups(user) != 1:
                return "grouped or depthwise convolution reads these channels"
            conv_channel_dim = ndim - (len(_shape(user.args[1])) - 2) - 1
            if layout.dim != conv_channel_dim or layout.block != 1:
                return "convolution input channels are not the compact dim"
        elif layout.dim != ndim - 1:
            return "linear input features are not the compact dim"
        return _Consume()

    zero_preserving = (
        target in ops.ZERO_PRESERVING_UNARY or target in ops.POOLS or _is_scalar_scale(user)
    )
    channelwise = zero_preserving or target in ops.OTHER_CHANNELWISE_UNARY
    if target in ops.POOLS and layout.dim >= ndim - ops.POOLS[target]:
        return "pooling over the channel dim"
    if channelwise:
        if not (zero_preserving or in_chain):
            return f"{_op_name(user)} is not zero-preserving and follows a branch"
        return _Continue(layout)
    if target in ops.BATCH_NORM:
        return _batch_norm_step(user, layout, graph, in_chain=in_chain)
    return _flatten_step(user, node, layout)


def _understood(user: fx.Node) -> bool:
    """Whether sparsefx knows how `user` treats channels (see ops.py)."""
    target = user.target
    return (
        ops.is_weight_op(target)
        or target in ops.ZERO_PRESERVING_UNARY
        or target in ops.OTHER_CHANNELWISE_UNARY
        or target in ops.POOLS
        or target in ops.BATCH_NORM
        or target in ops.FLATTEN
        or target in ops.RESHAPE
        or _is_scalar_scale(user)
    )


def _flat_args(node: fx.Node) -> list[object]:
    out: list[object] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    return out


def _is_scalar_scale(user: fx.Node) -> bool:
    return (
        user.target in ops.SCALAR_BINARY
        and len(user.args) == 2
        and isinstance(user.args[1], int | float)
        and not isinstance(user.args[1], bool)
    )


def _batch_norm_step(
    user: fx.Node, layout: Layout, graph: _GraphView, *, in_chain: bool
) -> _Continue | str:
    if not in_chain:
        return "batch_norm follows a branch (its shift would leak into dropped channels)"
    if layout.dim != 1 or layout.block != 1:
        return "batch_norm normalises a dim other than the compact one"
    weight, bias, running_mean, running_var = user.args[1:5]
    members = []
    for arg in (weight, bias, running_mean, running_var):
        if arg is None:
            continue
        if graph.state_fqn(arg) is None or len(arg.users) > 1:  # type: ignore[union-attr]
            return "batch_norm parameters are not module state used by this op alone"
        if graph.param(arg) is not None:
            members.append(graph.param(arg))
    return _Continue(layout, tuple(members))  # type: ignore[arg-type]


def _flatten_step(user: fx.Node, node: fx.Node, layout: Layout) -> _Continue | str:
    """flatten (or a view/reshape that is one) keeps channels as contiguous blocks."""
    in_shape, out_shape = _shape(node), _shape(user)
    span = _flattened_span(in_shape, out_shape)
    if span is None:
        return f"{_op_name(user)} reshapes channels in a way other than flattening"
    start, end = span
    if layout.dim < start:
        return _Continue(layout, extra={"flatten": span})
    if layout.dim > end:
        moved = Layout(layout.group, layout.dim - (end - start), layout.block, layout.full)
        return _Continue(moved, extra={"flatten": span})
    if layout.dim != start:
        return "flatten merges the channel dim into an outer dim"
    block = layout.block * math.prod(int(d) for d in in_shape[start + 1 : end + 1])
    merged = Layout(layout.group, start, block, layout.full * (block // layout.block))
    return _Continue(merged, extra={"flatten": span})


def _flattened_span(in_shape: tuple, out_shape: tuple) -> tuple[int, int] | None:
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
        if same_prefix and same_suffix and static and math.prod(dims) == out_shape[start]:
            return start, end
    return None
