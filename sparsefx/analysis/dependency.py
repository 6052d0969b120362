"""The channel dependency graph: which channel dims must share one index set.

One forward walk over the captured graph gives every tensor that carries pruned channels a
:class:`Layout` in terms of *spaces* (one per prunable producer: the output channels of a
linear/conv/embedding). Each op either reads its compact inputs as they are (channel-wise ops,
consumers that gather weight columns, joins) or needs them at full width (a scatter, exact
because dropped channels are zero there). Joins record edges between spaces in a networkx
graph: a residual ``add``/``sub``, a gating ``mul`` or a ``cat`` along another dim ties two
spaces to one index set; a ``cat`` along the channel dim does not (it concatenates index
sets with offsets). The coupling groups are the connected components (see groups.py).

Each value is also tracked for the reference semantics (DESIGN §2): inside a producer's
chain of channel-wise ops (single users, the parts of a split, or branches that all meet
again) dropped channels still hold values (*pending*); the chain's last node is the space's
**mask point**, after which they are exactly zero. An op
that is not zero-preserving (BatchNorm's shift, sigmoid) may run compactly inside a chain
only; past the mask point it reads a full-width scatter instead.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx
from torch.export.graph_signature import InputKind

from sparsefx.analysis import ops
from sparsefx.analysis.layout import Layout, Piece
from sparsefx.analysis.sizes import same_size, static_size

__all__ = ["DenseOp", "Member", "Propagation", "Space", "propagate"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DenseOp:
    """A linear/conv/embedding left dense, or a compact tensor scattered to full width, and why."""

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
    grain: int = 1
    """Features of the producer's output per channel (a head's width, for attention)."""
    members: list[Member] = field(default_factory=list)
    mask_point: str | None = None


@dataclass
class _Flow:
    layout: Layout
    zero: bool | None
    """Dropped channels are exact zeros here (True), hold values that a later op must zero
    (False), or are inside a producer's chain (None)."""
    origins: frozenset[str] = frozenset()
    """Where non-zero values in dropped channels came from (ops past a mask point that are
    not zero-preserving)."""
    parts: list[Layout] | None = None
    """For a split: the layout of each output."""
    region: fx.Node | None = None
    """Inside a chain: the fork whose branches it is on, until they rejoin."""


@dataclass
class Refinements:
    """What the walk learnt it must do differently, for the next walk (groups.py loops)."""

    parts: dict[str, list[int]] = field(default_factory=dict)
    """Space -> channel counts of the sub-spaces a split cuts it into (q, k, v of a fused
    projection)."""
    grain: dict[str, int] = field(default_factory=dict)
    """Space -> features per channel (an attention head's features are one channel)."""
    scatter_at: set[str] = field(default_factory=set)
    """Ops past a mask point that must read a scatter: their non-zero output in dropped
    channels reaches an op that needs zeros."""
    dense: dict[str, str] = field(default_factory=dict)
    """Space -> why its producer is left dense, on its own and not its component (a per-head
    bias that several attentions read, each at its own kept heads)."""
    forks: set[str] = field(default_factory=set)
    """Nodes inside a chain whose branches did not all stay in it until they rejoined: the
    chain ends at them."""

    def update(self, other: Refinements) -> bool:
        """Merge `other` in; whether anything was new. A walk that learnt new parts or
        grains made its scatter requests on spaces the next walk cuts differently (Swin's
        attention, refused while its q, k and v were not yet cut into heads, asked for its
        bias at full width), so they are dropped: the next walk asks again where needed."""
        cut = (
            any(self.parts.get(k) != v for k, v in other.parts.items())
            or any(self.grain.get(k) != v for k, v in other.grain.items())
            or not other.dense.keys() <= self.dense.keys()
        )
        self.parts.update(other.parts)
        self.grain.update(other.grain)
        self.dense.update(other.dense)
        if cut:
            return True
        new = not (other.scatter_at <= self.scatter_at and other.forks <= self.forks)
        self.scatter_at |= other.scatter_at
        self.forks |= other.forks
        return new


@dataclass
class _Op:
    """How an op reads its compact inputs, when it can."""

    layout: Layout | None
    zero_preserving: bool
    zero_when: str | int = "all"
    """Past the mask point the output is zero in dropped channels when "all" compact inputs
    are (element-wise ops, add, cat), "any" is (mul, matmul) or the one at this index is
    (attention: probabilities times v, whatever its per-head bias holds)."""
    chainable: bool = False
    """Channel-wise in its one compact input (others read whole or at the kept channels):
    may extend a producer's chain (before its mask point)."""
    full_width: dict[fx.Node, str] = field(default_factory=dict)
    """Compact inputs the op reads at full width (a scatter), with why; it reads the rest
    compactly (attention with pruned query heads reads k and v whole)."""
    members: list[tuple[str, Member]] = field(default_factory=list)
    couplings: list[tuple[str, str, str]] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    parts: list[Layout] | None = None


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
    refine: Refinements = field(default_factory=Refinements)


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


def propagate(
    gm: fx.GraphModule, view: GraphView, dense: dict[str, str], refined: Refinements
) -> Propagation:
    """Walk `gm` once; producers with a space in `dense` are left dense with that reason.
    The result's ``refine`` holds what a next walk must apply (empty when none is needed)."""
    return _Walk(view, dense, refined).run(gm)


# --------------------------------------------------------------------------------------------


class _Walk:
    def __init__(self, view: GraphView, dense: dict[str, str], refined: Refinements):
        self.view = view
        self.dense_spaces = dense
        self.refined = refined
        self.flows: dict[fx.Node, _Flow] = {}
        self.result = Propagation({}, nx.Graph(), {}, {}, [], [])
        self.bias_readers: dict[str, fx.Node] = {}
        """Per-head bias space -> the attention whose heads it was pruned with."""
        self.post_dominators: dict[fx.Node, fx.Node] | None = None
        self.read_whole: dict[fx.Node, str] = {}
        """Ops that read a compact input at full width, with why: a join of a compact
        tensor with their (full-width) output names them (`_into_dense`)."""

    def run(self, gm: fx.GraphModule) -> Propagation:
        for node in gm.graph.nodes:
            args = dict.fromkeys(_flat_args(node))
            compact = [a for a in args if a in self.flows and not _dtype_only(node, a)]
            if node.op == "output":
                for arg in compact:
                    self._full_width(arg, node, "model output")
            elif node.op == "call_function":
                self._visit(node, compact)
                if node.target in ops.NORMS and node not in self.flows:
                    reason = "normalises across features, so the features it reads stay dense"
                    self.result.dense.append(DenseOp(node.name, _op_name(node), reason))
                elif node.target in ops.UNSUPPORTED_WEIGHT_OPS:
                    reason = "unsupported op: sparsefx does not prune its channels"
                    self.result.dense.append(DenseOp(node.name, _op_name(node), reason))
        return self.result

    def _meta(self, node: fx.Node) -> dict:
        return self.result.meta.setdefault(node, {})

    def _visit(self, node: fx.Node, compact: list[fx.Node]) -> None:
        if node.target in ops.IN_PLACE_DROPOUT:
            self._block_aliases(node)
        op = self._decide(node, compact) if compact else None
        if isinstance(op, str):
            self.read_whole[node] = op
            for arg in compact:
                self._end_chain(arg)
                self._full_width(arg, node, op)
        elif op is not None:
            for arg, reason in op.full_width.items():
                self.read_whole[node] = reason
                self._end_chain(arg)
                self._full_width(arg, node, reason)
            compact = [a for a in compact if a not in op.full_width]
            chained = self._chained(op, compact)
            if not chained:
                for arg in compact:
                    if _reads_values(node, arg):
                        self._end_chain(arg)
            if not (chained or op.zero_preserving) and node.name in self.refined.scatter_at:
                for arg in compact:
                    self._full_width(
                        arg,
                        node,
                        f"{_op_name(node)} is not zero-preserving and its output in dropped "
                        "channels is read by an op that needs them zero",
                    )
            elif not op.meta.keys() & {"in_layout", "contracted"} or self._zero(compact):
                self._accept(node, op, chained, compact)
            # else: a weight consumer reading non-zero dropped channels; the refinement pass
            # put a scatter upstream of it, so it is not a compact consumer
        if ops.is_weight_op(node.target) and not _is_grouped(node):
            self._source(node)
        elif _is_grouped(node) and node not in self.flows:
            reason = (
                "grouped convolution whose input is dense: it is pruned in whole conv groups "
                "with its input's channels, not as a producer of its own"
            )
            self.result.dense.append(DenseOp(node.name, _op_name(node), reason))
        if node in self.flows and self.flows[node].parts and self.flows[node].zero is None:
            self._end_unread_parts(node)
        if node in self.flows and len(node.users) != 1 and not self._split_into_parts(node):
            self._fork(node)

    def _end_unread_parts(self, node: fx.Node) -> None:
        """A part of a split in a chain that no op reads ends its chain at the split."""
        taken = {u.args[1] for u in node.users if u.target is operator.getitem}
        unread = [
            space
            for i, part in enumerate(self.flows[node].parts)  # type: ignore[arg-type]
            if i not in taken
            for space in part.groups
        ]
        if unread:
            self._mask_point(node, unread)

    def _chained(self, op: _Op, compact: list[fx.Node]) -> bool:
        """Whether `op` continues a chain: channel-wise in one pending input, or joining
        branches of one fork (rotary's ``q * cos + rotate_half(q) * sin``) in a layout
        they all share."""
        flows = [self.flows[a] for a in compact]
        if not flows or any(f.zero is not None for f in flows):
            return False
        if len(flows) == 1:
            return op.chainable
        first = flows[0]
        return (
            first.region is not None
            and op.layout is not None
            and op.layout.pieces == first.layout.pieces
            and all(f.region is first.region and f.layout == first.layout for f in flows)
        )

    def _fork(self, node: fx.Node) -> None:
        """A chain's value with several users (or none). Where every path from it meets
        again at one node (its immediate post-dominator), the chain goes on through the
        branches to that join, which is then its mask point; if a branch leaves the chain
        first, `_end_chain` records the fork and the next walk ends the chain here."""
        flow = self.flows[node]
        if flow.zero is not None:
            return
        if flow.region is None:
            if node.name in self.refined.forks or self._join(node) is None or not node.users:
                self._end_chain(node)
                return
            flow.region = node
        elif not node.users:
            self._end_chain(node)

    def _join(self, node: fx.Node) -> fx.Node | None:
        """Where every path from `node` to the graph's output meets again (None: only at
        the output). Reading a size or dtype is not a path."""
        if self.post_dominators is None:
            graph = nx.DiGraph()
            for n in node.graph.nodes:
                graph.add_node(n)
                for user in n.users:
                    if _reads_values(user, n):
                        graph.add_edge(user, n)
            self.post_dominators = nx.immediate_dominators(graph, self.view.output)
        join = self.post_dominators.get(node)
        return None if join is None or join is self.view.output else join

    def _split_into_parts(self, node: fx.Node) -> bool:
        """A split of the channel dim whose users each take a part of their own: the parts
        hold disjoint spaces, so each part's chain goes on alone (q of a fused projection
        to its attention, k and v to theirs)."""
        parts = self.flows[node].parts
        if parts is None or node.target not in ops.SPLITS:
            return False
        taken = [u.args[1] for u in node.users if u.target is operator.getitem]
        if len(taken) != len(node.users) or len(set(taken)) != len(taken):
            return False
        spaces = [parts[i].groups for i in taken]  # type: ignore[index]
        return len(set().union(*spaces)) == sum(len(s) for s in spaces)

    def _block_aliases(self, node: fx.Node) -> None:
        """An in-place dropout that capture left in place: a tensor sharing its input's
        storage is read after it, so that storage must be the dense tensor itself. Every
        compact tensor its input is a view of stays dense (even where the input itself reads
        a full-width scatter, which would take the mutation instead)."""
        reason = f"in-place {_op_name(node)} ({node.name}) must reach a tensor read after it"
        tensor = node.args[0]
        while isinstance(tensor, fx.Node):
            if tensor in self.flows:
                self._block(tensor, reason)
            if not ops.aliases_input(tensor):
                break
            tensor = tensor.args[0]

    def _zero(self, compact: list[fx.Node]) -> bool:
        """Whether dropped channels are zero in every input; if not, ask for scatters where
        they stopped being zero."""
        origins = frozenset().union(*(self.flows[a].origins for a in compact))
        self.refine.scatter_at |= origins
        return not origins

    def _accept(self, node: fx.Node, op: _Op, chained: bool, compact: list[fx.Node]) -> None:
        for space, member in op.members:
            self.result.spaces[space].members.append(member)
        for a, b, kind in op.couplings:
            if a == b:
                continue  # a join of a tensor with a function of itself ties nothing
            self.result.couplings.add_edge(a, b)
            self.result.couplings.edges[a, b].setdefault("kinds", set()).add(kind)
        meta = self._meta(node)
        meta.update(op.meta)
        if op.layout is None:
            return
        meta.setdefault("role", "channelwise")
        meta["layout"] = op.layout
        if chained:
            region = self.flows[compact[0]].region
            if region is not None and self._join(region) is node:
                region = None  # the branches have met again
            self.flows[node] = _Flow(op.layout, None, parts=op.parts, region=region)
            return
        flows = [self.flows[a] for a in compact]
        zeros = [f.zero for f in flows]
        if isinstance(op.zero_when, int):
            zero = zeros[op.zero_when]
        else:
            zero = all(zeros) if op.zero_when == "all" else any(zeros)
        zero = zero and op.zero_preserving
        origins: frozenset[str] = frozenset()
        if not zero:
            if isinstance(op.zero_when, int):
                flows = [flows[op.zero_when]]
            origins = frozenset().union(*(f.origins for f in flows))
            if not op.zero_preserving or not origins:
                origins |= {node.name}
        self.flows[node] = _Flow(op.layout, zero, origins, op.parts)

    def _end_chain(self, node: fx.Node) -> None:
        """`node` is the last of its producer's chain: the mask point of its spaces."""
        flow = self.flows[node]
        if flow.zero is None and flow.region is not None:
            self.refine.forks.add(flow.region.name)  # a branch left before the join
        if flow.zero is None:
            flow.zero = True
            self._mask_point(node, flow.layout.groups)

    def _mask_point(self, node: fx.Node, spaces: list[str]) -> None:
        couplings = self.result.couplings
        for space in spaces:
            fused = [
                other
                for other, edge in couplings.adj[space].items()
                if "fused projection" in edge.get("kinds", ())
            ]  # k and v of a fused layout that names q's space only
            for each in (space, *fused):
                self.result.spaces[each].mask_point = node.name
        self._meta(node)["mask_point"] = spaces

    def _full_width(self, node: fx.Node, user: fx.Node, reason: str) -> None:
        if not self._zero([node]):
            return
        self._meta(node).setdefault("full_width_users", []).append(user.name)
        self.result.scatters.append(DenseOp(user.name, _op_name(user), reason))

    def _block(self, node: fx.Node, reason: str) -> None:
        for space in self.flows[node].layout.groups:
            self.result.blocked.setdefault(space, []).append(reason)

    @property
    def refine(self) -> Refinements:
        return self.result.refine

    # -- sources -------------------------------------------------------------------------

    def _source(self, node: fx.Node) -> None:
        """A weight op's output channels become a space (or several, where a split cuts
        them), unless it is left dense. A part left dense while others are not (a gate of
        one channel cut from a projection whose other parts prune) is a dense piece of the
        producer's layout: its features are always kept."""
        leaves = self._leaves(node.name, int(_shape(node)[_channel_dim(node)]))
        dense = self.dense_spaces | self.refined.dense
        reason = _source_blocker(node, self.view)
        if reason is None and all(name in dense for name, _, _ in leaves):
            reason = dense[leaves[0][0]]
        if reason is not None:
            self.result.dense.append(DenseOp(node.name, _op_name(node), reason))
            self._meta(node)["dense_reason"] = reason
            return
        _, weight, bias = ops.weight_args(node)
        out_dim = ops.weight_operands(node).out_dim
        pieces, offset, full = [], 0, int(_shape(node)[_channel_dim(node)])
        for name, size, grain in leaves:
            if name in dense:  # a part left dense: features of the layout always kept
                part = f"features {offset}..{offset + size * grain - 1}: {dense[name]}"
                self.result.dense.append(DenseOp(node.name, _op_name(node), part))
                pieces.append(Piece(None, size * grain))
                offset += size * grain
                continue
            space = Space(name, self.view.param(weight), size, grain)  # type: ignore[arg-type]
            space.members.append(Member(space.weight, out_dim, offset, grain, full))
            if bias is not None:
                space.members.append(Member(self.view.param(bias), 0, offset, grain, full))  # type: ignore[arg-type]
            self.result.spaces[name] = space
            self.result.couplings.add_node(name)
            pieces.append(Piece(name, size, grain))
            offset += size * grain
        layout = Layout(_channel_dim(node), tuple(pieces))
        self._meta(node).update(role="producer", group=layout.groups[0], layout=layout)
        self.flows[node] = _Flow(layout, None)

    def _leaves(self, name: str, features: int, grain: int = 1) -> list[tuple[str, int, int]]:
        """(space, channels, features per channel) of a producer's output, in order."""
        grain = self.refined.grain.get(name, grain)
        parts = self.refined.parts.get(name)
        if parts is None:
            return [(name, features // grain, grain)]
        leaves = []
        for i, size in enumerate(parts):
            leaves.extend(self._leaves(f"{name}#{i}", size * grain, grain))
        return leaves

    # -- what each op does with compact inputs -------------------------------------------

    def _decide(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        target = node.target
        first = node.args[0] if node.args else None
        if target in ops.BINARY:
            return self._binary(node, compact)
        if target in ops.CAT:
            return self._cat(node, compact)
        if target is ops.AUTOGRAD_FUNCTION:
            return "a custom autograd.Function, run whole for its own backward, reads its inputs"
        if ops.is_weight_op(target):
            x = ops.weight_args(node)[0]
            if compact != [x]:
                return f"{_op_name(node)} reads the compact tensor as a weight or bias"
            return self._weight_op(node, self.flows[x].layout)  # type: ignore[index]
        if target in ops.ATTENTION:
            return self._attention(node, compact)
        if target in ops.MATMUL:
            return self._matmul(node, compact)
        if target is operator.getitem and node.args[0] in compact:
            flow = self.flows[node.args[0]]  # type: ignore[index]
            if flow.parts is None:
                return "getitem of a compact tensor"
            part = flow.parts[node.args[1]]  # type: ignore[index]
            if not part.groups:  # dense pieces only: a dense tensor
                return _Op(None, zero_preserving=True)
            return _Op(part, zero_preserving=True, chainable=True)
        if target in ops.IN_PLACE_DROPOUT:  # _visit blocked what it aliases
            return f"in-place {_op_name(node)} ({node.name}) must reach a tensor read after it"
        if target in ops.NORMS:
            per_channel = self._whole_norm_groups(node, compact)
            per_channel = per_channel or self._norm_within_channels(node, compact)
            if per_channel is not None:
                return per_channel
            return self._normalises_across_features(node, compact)
        if target in ops.WHERE:
            return self._where(node, compact)
        if target in ops.MASKED_FILL:
            return self._masked_fill(node, compact)
        if target in ops.TYPE_AS:  # the other tensor's dtype is not a compact input (run)
            return _Op(self.flows[first].layout, zero_preserving=True, chainable=True)  # type: ignore[index]
        if compact != [first] or not isinstance(first, fx.Node):
            return f"{_op_name(node)} reads the compact tensor as a weight or extra argument"
        layout = self.flows[first].layout
        if target in ops.CHANNEL_NORMS:
            return self._channel_norm(node, layout)
        if target in ops.POOLS:
            if layout.dim >= len(_shape(first)) - ops.POOLS[target]:  # type: ignore[index]
                return "pooling over the channel dim"
            return _Op(layout, zero_preserving=True, chainable=True)
        if target in ops.ZERO_PRESERVING_UNARY:
            return _Op(layout, zero_preserving=True, chainable=True)
        if target in ops.OTHER_CHANNELWISE_UNARY:
            return _Op(layout, zero_preserving=False, chainable=True)
        if target in ops.VIEWS:
            return self._view(node, first, layout)
        if target in ops.UNSQUEEZES:
            return _unsqueeze(node, layout)
        if target in ops.SQUEEZES:
            return _squeeze(node, first, layout)
        if target in ops.EXPANDS:
            return _expand(node, first, layout)
        if target in ops.PERMUTES:
            return _permute(node, layout)
        if target in ops.REDUCTIONS:
            op = _reduction(node, layout)
            if isinstance(op, str) and self._normalises(node, layout):
                self._block(first, _DECOMPOSED_NORM.format(op=_op_name(node), node=node.name))
            return op
        if target in ops.SOFTMAX:
            if int(node.args[1]) % len(_shape(node)) == layout.dim:  # type: ignore[call-overload]
                return self._normalises_across_features(node, [first])  # type: ignore[list-item]
            return _Op(layout, zero_preserving=False, chainable=True)
        if target in ops.POW:
            exponent = node.args[1]
            positive = isinstance(exponent, int | float) and exponent > 0
            return _Op(layout, zero_preserving=positive, chainable=True)
        if target in ops.INDEX:
            return _index(node, layout)
        if target is aten.sym_size.int:  # a size a bool mask's index made data-dependent
            if int(node.args[1]) % len(_shape(first)) == layout.dim:  # type: ignore[call-overload]
                return "the size of the channel dim"
            return _Op(None, zero_preserving=True)
        if target in ops.PADS:
            return _pad(node, layout)
        if target in ops.SPLITS:
            return self._split(node, layout)
        if target in ops.SLICES:
            return self._slice(node, layout)
        if target in ops.SELECTS:
            op = _select(node, layout)
            if isinstance(op, str):  # each channel a tensor of its own: roles, not a set
                self._block(first, f"each channel read as a tensor of its own by {op}")
            return op
        if target is aten.gather.default:
            return _gather(node, layout)
        if target in (aten.im2col.default, aten.col2im.default):
            return _patches(node, layout)
        if target is aten.roll.default:  # Swin's shifted windows roll the spatial dims
            dims = [int(d) % len(_shape(first)) for d in _arg(node, 2, "dims", [])]  # type: ignore[union-attr]
            if dims and layout.dim not in dims:
                return _Op(layout, zero_preserving=True, chainable=True)
        return f"{_op_name(node)} mixes channels or is not supported on compact tensors"

    def _normalises_across_features(self, node: fx.Node, tensors: list[fx.Node]) -> str:
        """A norm (or a softmax) over the channel dim needs every feature it reads: blocks
        them (their producers stay dense next walk), and reads them at full width."""
        for tensor in tensors:
            self._block(tensor, f"normalised across features by {_op_name(node)} ({node.name})")
        return f"{_op_name(node)} normalises across all features and reads them at full width"

    def _norm_within_channels(self, node: fx.Node, compact: list[fx.Node]) -> _Op | None:
        """A layer_norm or rms_norm over dims after the channel dim (timm's per-head q and k
        norm over head_dim) normalises each channel on its own: channel-wise, with a weight
        and bias that every channel shares. None where it normalises over the channel dim."""
        x = node.args[0]
        if node.target not in _PER_CHANNEL_NORMS or compact != [x]:
            return None
        layout = self.flows[x].layout  # type: ignore[index]
        if layout.dim >= len(_shape(x)) - len(node.args[1]):  # type: ignore[arg-type]
            return None
        bias = _arg(node, 3, "bias", None) if node.target is aten.layer_norm.default else None
        return _Op(layout, zero_preserving=bias is None, chainable=True)

    def _normalises(self, reduction: fx.Node, layout: Layout) -> bool:
        """Whether a reduction over the channel dim is a norm's statistic: it keeps the dim,
        and within a few ops that are not layers it meets a compact tensor of the spaces it
        summarises (RMSNorm's ``x * rsqrt(mean(x²) + eps)``, LayerNorm's ``x - mean``).
        A statistic that feeds a layer first (CBAM's channel mean and max into a conv) is
        a feature, read through a scatter."""
        if not _reduced(reduction)[1]:
            return False
        spaces = set(layout.groups)
        frontier = list(reduction.users)
        for _ in range(_NORM_REACH):
            ops_reached = [n for n in frontier if n.op == "call_function"]
            for user in ops_reached:
                if any(
                    arg in self.flows and spaces & set(self.flows[arg].layout.groups)
                    for arg in _flat_args(user)
                ):
                    return True
            frontier = [u for n in ops_reached if not ops.is_weight_op(n.target) for u in n.users]
        return False

    def _weight_op(self, node: fx.Node, layout: Layout) -> _Op | str:
        x, weight, _ = ops.weight_args(node)
        ndim = len(_shape(x))
        if _is_grouped(node):
            return self._grouped_conv(node, layout)
        if self.view.own_param(weight) is None:
            return f"{_op_name(node)} weight is not a parameter used by this op alone"
        if node.target in ops.ADDMM and not ops.is_plain_addmm(node):
            return "addmm that is not a linear layer (scaled, or not a bias vector)"
        if ops.is_conv(node.target):
            if layout.dim != ndim - (len(_shape(weight)) - 2) - 1:
                return "convolution input channels are not the compact dim"
        elif layout.dim != ndim - 1:
            return "linear input features are not the compact dim"
        meta = {"in_layout": layout, "role": "consumer"}
        in_dim = ops.weight_operands(node).in_dim
        members = self._members(layout, [(weight, in_dim)])
        return _Op(None, zero_preserving=True, members=members, meta=meta)

    def _grouped_conv(self, node: fx.Node, layout: Layout) -> _Op | str:
        """A grouped convolution (depthwise included) maps each conv group's input channels
        to that group's output channels only. When every channel of its input covers whole
        conv groups, it runs channel-wise: on the kept conv groups, with its weight rows (and
        bias) as members of its input's groups. A finer input space is coarsened to conv
        groups (the next walk prunes the producer in conv groups, like attention heads)."""
        _, weight, bias = ops.weight_args(node)
        if self.view.own_param(weight) is None or (
            bias is not None and self.view.own_param(bias) is None
        ):
            return "grouped convolution whose weight is not a parameter used by it alone"
        if layout.dim != 1:
            return "grouped convolution channels are not the compact dim"
        out_channels, per_group = (int(size) for size in _shape(weight)[:2])
        out_per_group = out_channels // _conv_groups(node)
        pieces, waits = [], False
        for piece, offset in zip(layout.pieces, layout.offsets(), strict=True):
            if offset % per_group or piece.features % per_group:
                return f"grouped convolution: its input's layout splits conv groups of {per_group}"
            if piece.group is None:
                pieces.append(Piece(None, piece.features // per_group * out_per_group))
            elif piece.block % per_group == 0:
                pieces.append(
                    Piece(piece.group, piece.size, piece.block // per_group * out_per_group)
                )
            elif per_group % piece.block == 0 and piece.size % (per_group // piece.block) == 0:
                space = self.result.spaces[piece.group]
                self.refine.grain[piece.group] = space.grain * (per_group // piece.block)
                waits = True
            else:
                return f"grouped convolution: a channel of its input does not cover whole conv groups of {per_group}"
        if waits:
            return "grouped convolution waits for its input's channels to cover whole conv groups"
        out = Layout(1, tuple(pieces))
        members = self._members(out, [(weight, 0), (bias, 0)])
        return _Op(
            out, zero_preserving=bias is None, chainable=True, members=members,
            meta={"grouped": out_per_group},
        )  # fmt: skip

    def _channel_norm(self, node: fx.Node, layout: Layout) -> _Op | str:
        """Batch or instance norm: channel-wise on the compact channels, its parameters and
        running statistics read at them (`passes.compact.rewrite_channel_norms`)."""
        if layout.dim != 1:
            return f"{_op_name(node)} normalises a dim other than the compact one"
        weight, bias, running_mean, running_var = node.args[1:5]
        return self._norm_of_own_state(node, layout, [weight, bias], [running_mean, running_var])

    def _whole_norm_groups(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str | None:
        """A group norm normalises each of its groups of channels with that group's own
        statistics, and a group per channel (the first conv of wav2vec2's feature encoder)
        normalises each channel on its own, as InstanceNorm does. So when every channel of
        its input covers whole norm groups it is channel-wise, with its weight and bias in
        the group (`passes.compact.rewrite_channel_norms` runs it on the kept norm groups).
        A finer input space is coarsened to norm groups, as for a grouped convolution: the
        next walk prunes the producer in blocks of a norm group's channels. None for one
        group over all channels (a LayerNorm over channels and positions), an ``(N, C)``
        input (instance norm refuses one value per group), and a layout that splits norm
        groups: they normalise across features."""
        x = node.args[0]
        if node.target is not aten.group_norm.default or compact != [x] or len(_shape(x)) < 3:
            return None
        layout = self.flows[x].layout  # type: ignore[index]
        groups = int(_arg(node, 1, "num_groups", 1))  # type: ignore[call-overload]
        if layout.dim != 1 or groups == 1:
            return None
        per_group, waits = layout.full // groups, False
        for piece, offset in zip(layout.pieces, layout.offsets(), strict=True):
            if offset % per_group or piece.features % per_group:
                return None
            if piece.group is None or piece.block % per_group == 0:
                continue
            if per_group % piece.block or piece.size % (per_group // piece.block):
                return None
            space = self.result.spaces[piece.group]
            self.refine.grain[piece.group] = space.grain * (per_group // piece.block)
            waits = True
        if waits:
            return f"group_norm waits for its input's channels to cover whole groups of {per_group}"
        affine = [_arg(node, 2, "weight", None), _arg(node, 3, "bias", None)]
        return self._norm_of_own_state(node, layout, affine, [], zero_preserving=affine[1] is None)

    def _norm_of_own_state(
        self,
        node: fx.Node,
        layout: Layout,
        affine: list[object],
        statistics: list[object],
        zero_preserving: bool = False,
    ) -> _Op | str:
        """A per-channel norm whose affine parameters join the group and whose running
        statistics are read at the kept channels: both must be module state that only this
        op uses."""
        for arg in affine + statistics:
            if arg is not None and (self.view.state_fqn(arg) is None or len(arg.users) > 1):  # type: ignore[union-attr]
                return f"{_op_name(node)} parameters are not module state used by this op alone"
        params = [(arg, 0) for arg in affine if arg is not None]
        members = self._members(layout, params)
        return _Op(layout, zero_preserving=zero_preserving, chainable=True, members=members)

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
            layout = _joined(node, self.flows[a].layout, self.flows[b].layout)  # type: ignore[index]
            if layout is None and self._cut_alike(node):
                return f"{name} waits for its operands' channels to be cut alike"
            if layout is None:
                return f"{name} joins tensors whose channels are laid out differently"
            divide = node.target in ops.DIV
            if divide and not _positive(b):  # type: ignore[arg-type]
                return f"{name} divides by a tensor that may be zero in dropped channels"
            gate = divide or node.target in ops.MUL
            scores = not gate and _scores(node, layout.dim)
            if scores:  # a compact per-head bias (a table, ALiBi) added to attention scores
                for bias in compact:
                    if _product_of_matmul(bias):
                        continue  # the scores themselves, or another q @ k.T term (DeBERTa's)
                    if (shared := self._shared_bias(node, bias)) is not None:
                        return shared
            kind = "gate" if gate else "attention" if scores else "residual"
            pieces = zip(self.flows[a].layout.pieces, self.flows[b].layout.pieces, strict=True)  # type: ignore[index]
            couplings = [(p.group, q.group, kind) for p, q in pieces if p.group and q.group]
            zero_when = 0 if divide else "any" if gate else "all"
            return _Op(layout, zero_preserving=True, zero_when=zero_when, couplings=couplings)
        (x,) = compact
        layout = self.flows[x].layout
        if a is b:  # x + x, x * x: a function of x alone
            if node.target in ops.DIV:
                return f"{name} divides a compact tensor by itself (0 / 0 in dropped channels)"
            return _Op(layout, zero_preserving=True, chainable=True)
        other = b if x is a else a
        if _is_tensor(other):
            shape = _shape(other)
            other_dim = layout.dim - len(_shape(x)) + len(shape)
            if other_dim >= 0 and int(shape[other_dim]) != 1:
                op = self._channel_parameter(node, x, other, other_dim)
                if op is None:
                    op = _gathered_operand(node, x, layout, other_dim)
                if op is not None:
                    return op
                if node.target not in ops.MUL and node.target not in ops.DIV:
                    fqn = self.view.state_fqn(other)
                    if fqn is None:
                        reason = self._into_dense(name, node, x, [other])
                    else:
                        kind = "parameter" if self.view.param(other) else "buffer"
                        reason = _STATE_INTO_DENSE.format(
                            op=name, node=node.name, state=f"{kind} {fqn}"
                        )
                    self._block(x, reason)
                return f"{name} with a full-width tensor that is not pruned alongside"
        elif not _is_scalar(other):
            return f"{name} with an argument sparsefx does not understand"
        if _shape(x) != _shape(node):
            # the other tensor has one value per channel position: each output channel is
            # this channel's, broadcast (FocalNet's global context times a per-pixel gate)
            layout = layout.at(layout.dim + len(_shape(node)) - len(_shape(x)))
            if node.target not in ops.MUL and node.target not in ops.DIV:
                # a sum (Swin's window mask added to a per-head bias) is not zero-preserving
                return _Op(layout, zero_preserving=False)
        if node.target in ops.MUL:
            zero_preserving = True
        elif node.target in ops.DIV:
            if x is not a:
                return f"{name} divides by a compact tensor"
            zero_preserving = True
        else:  # a sum that starts from 0 (FocalNet's ``ctx_all = 0; ctx_all + ...``)
            zero_preserving = isinstance(other, int | float) and other == 0
        return _Op(layout, zero_preserving=zero_preserving, chainable=True)

    def _cut_alike(self, node: fx.Node) -> bool:
        """Whether the element-wise join `node` of two compact tensors whose pieces cover
        the same features, one cut into finer channels than the other, coarsened the finer
        spaces to the other's channels for the next walk (RegNetY's squeeze-and-excitation
        gate, one channel per feature, times a grouped conv's output pruned in conv groups:
        both were scattered; now the gate is pruned in the conv's groups, which it joins)."""
        a, b = node.args[0], node.args[1]
        la, lb = self.flows[a].layout, self.flows[b].layout  # type: ignore[index]
        if la.dim - len(_shape(a)) != lb.dim - len(_shape(b)) or len(la.pieces) != len(lb.pieces):
            return False
        cuts = {}
        for p, q in zip(la.pieces, lb.pieces, strict=True):
            if p.features != q.features:
                return False
            if p.block == q.block:
                continue
            fine, coarse = sorted((p, q), key=lambda piece: piece.block)
            if fine.group is None or coarse.group is None or fine.group == coarse.group:
                return False
            factor, rest = divmod(coarse.block, fine.block)
            if rest or self.result.spaces[fine.group].size % factor:
                return False
            cuts[fine.group] = self.result.spaces[fine.group].grain * factor
        self.refine.grain.update(cuts)
        return bool(cuts)

    def _where(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """``where(cond, x, y)`` with one compact value, and a condition and other value of
        one per channel position: channel-wise on the output's dims (T5's position bias
        where the attention mask holds, -inf elsewhere); zero-preserving if y is 0."""
        cond, *values = node.args[:3]
        if len(compact) != 1 or cond in compact:
            return "where with a compact condition or two compact values"
        (x,) = compact
        layout = self.flows[x].layout
        ndim = len(_shape(node))
        dim = layout.dim + ndim - len(_shape(x))
        other = values[1] if values[0] is x else values[0]
        for arg in (cond, other):
            shape = _shape(arg) if _is_tensor(arg) else ()
            at = dim - ndim + len(shape)
            if at >= 0 and not same_size(shape[at], 1):
                return "where with a full-width condition or other value"
        zero = isinstance(other, int | float) and other == 0
        return _Op(layout.at(dim), zero_preserving=zero)

    def _masked_fill(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """``x.masked_fill(mask, value)`` of a compact x with a mask of one value per channel
        position: channel-wise, as `_where` (DeBERTa's attention mask on its per-head
        scores); zero-preserving if the value is 0."""
        x, mask, value = node.args[:3]
        if compact != [x]:
            return "masked_fill with a compact mask or value"
        layout = self.flows[x].layout
        shape = _shape(mask)
        at = layout.dim - len(_shape(x)) + len(shape)
        if at >= 0 and not same_size(shape[at], 1):
            return "masked_fill with a full-width mask"
        return _Op(layout, zero_preserving=isinstance(value, int | float) and value == 0)

    def _channel_parameter(self, node: fx.Node, x: fx.Node, param: fx.Node, dim: int) -> _Op | None:
        """``x * p``, ``x / p``, ``x + p`` or ``x - p`` with a parameter of one value per
        channel is channel-wise: a layer scale (ConvNeXt, CaiT, DINOv2) or a bias added
        after a bias-free layer (Falcon's ``x @ W.T + b``). The parameter is a member,
        gathered to the kept channels (meta ``gathered_args``: its argument position and
        channel dim), so the result stays compact and reaches what it joins (a stream, which
        decides its fate). Adding a bias is not zero-preserving, like BatchNorm's shift.
        The parameter may be unsqueezed to the channel dim first (PoolFormer's
        ``layer_scale.unsqueeze(-1).unsqueeze(-1) * x``)."""
        shape = _shape(param)
        source, source_dim = _unsqueezed(param, dim)
        if (
            (node.target in ops.DIV and param is not node.args[1])
            or self.view.own_param(source) is None
            or any(int(size) != 1 for d, size in enumerate(shape) if d != dim)
            or _shape(x) != _shape(node)
        ):
            return None
        layout = self.flows[x].layout
        return _Op(
            layout, zero_preserving=node.target in ops.MUL or node.target in ops.DIV,
            chainable=True, members=self._members(layout, [(source, source_dim)]),
            meta={"gathered_args": [(node.args.index(param), dim)]},
        )  # fmt: skip

    def _cat(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """Along the channel dim, the inputs' pieces in order; along another dim (or a new
        one: stack), inputs of one layout, whose groups it couples."""
        tensors = node.args[0]
        stack = node.target is aten.stack.default
        out_ndim = len(_shape(node))
        dim = _arg(node, 1, "dim", 0) % out_ndim  # type: ignore[operator]
        layouts = [self.flows[t].layout if t in compact else None for t in tensors]  # type: ignore[union-attr]
        if not stack and any(layout is not None and layout.dim == dim for layout in layouts):
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
        name = "stack" if stack else "cat"
        if first is None or any(la is None or not first.same_shape(la) for la in layouts):
            dense = [t for t in tensors if t not in compact]  # type: ignore[union-attr]
            for tensor in compact:
                self._block(tensor, self._into_dense(name, node, tensor, dense))
            return f"{name} of compact and dense tensors along another dim"
        couplings = [
            (p.group, q.group, "concat")
            for la in layouts[1:]
            for p, q in zip(first.pieces, la.pieces, strict=True)  # type: ignore[union-attr]
            if p.group and q.group
        ]
        out = first.at(first.dim + (dim <= first.dim)) if stack else first
        return _Op(out, zero_preserving=True, couplings=couplings)

    def _into_dense(self, op: str, node: fx.Node, x: fx.Node, dense: list[fx.Node]) -> str:
        """Why compact `x` joined with `dense` full-width tensors stays dense: they are a
        stream from an unpruned source, or were made from x's own channels by an op that
        read them whole (Wav2Vec2 adds its feature projection to a positional convolution
        of it whose weight is computed), which names what to support."""
        groups = set(self.flows[x].layout.groups)
        seen, frontier = set(dense), list(dense)
        for _ in range(_WHOLE_REACH):
            for tensor in frontier:
                read = [a for a in tensor.all_input_nodes if a in self.flows]
                if tensor in self.read_whole and any(
                    groups.intersection(self.flows[a].layout.groups) for a in read
                ):
                    return _FROM_WHOLE.format(
                        op=op, node=node.name, reader=_op_name(tensor), at=tensor.name,
                        why=self.read_whole[tensor],
                    )  # fmt: skip
            frontier = [a for t in frontier for a in t.all_input_nodes if a not in seen]
            seen.update(frontier)
        return _INTO_DENSE.format(op=op, node=node.name)

    def _attention(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """scaled_dot_product_attention: heads (dim -3 of q, k, v) are independent, so q,
        k and v share one head index set; a head whose v is zero outputs zero, whatever its
        mask or bias holds. A per-head bias is pruned with the heads where it is compact and
        this attention's alone (Swin's table), and read at the kept heads where it is dense
        (T5's, which every layer reads; ALiBi's)."""
        q, k, v = node.args[:3]
        mask_at: int | str = 3 if len(node.args) > 3 else "attn_mask"
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        per_head = isinstance(mask, fx.Node) and mask in self.flows
        if all(self.flows[t].layout.dim == len(_shape(t)) - 1 for t in compact):
            return self._head_features(node, compact)
        if per_head and (shared := self._shared_bias(node, mask)) is not None:  # type: ignore[arg-type]
            return shared
        # a k or v of one head that a group holds (cut from a fused projection) is a group
        # of one channel, never pruned: attention prunes by q's heads alone
        by_head = [self._heads_compact(t) and not same_size(_shape(t)[-3], 1) for t in (k, v)]
        if q in compact and not per_head and not any(by_head):
            return self._query_heads(node, compact)
        if (
            v in compact
            and not per_head
            and _per_head_args(node, (0, 1), _shape(v)[-3]) is not None
        ):
            pruned = [t for t in (q, k) if t in compact]
            if self._leave_blocked_dense(pruned, v):  # type: ignore[arg-type]
                return "attention waits for its blocked q and k to be left dense"
            if len(pruned) < 2:
                return self._value_heads(node, compact)
        if compact != [q, k, v, mask][: 4 if per_head else 3]:
            return "attention with q, k and v not all from pruned heads"
        heads = len(_shape(q)) - 3
        shape = _shape(mask) if isinstance(mask, fx.Node) else ()
        gathered = not per_head and len(shape) >= 3 and not same_size(shape[-3], 1)
        if gathered and not same_size(shape[-3], _shape(q)[heads]):
            return "attention with a mask whose heads dim is neither one nor q's heads"
        layouts = [self.flows[t].layout for t in compact]  # type: ignore[index]
        if any(la.dim != len(_shape(t)) - 3 for la, t in zip(layouts, compact, strict=True)):
            return "attention whose q, k, v or bias are not compact along the heads dim"
        # enable_gqa: each k/v head serves `ratio` consecutive q heads
        ratio = int(_shape(q)[heads]) // int(_shape(k)[heads])  # type: ignore[arg-type]
        pairs = [(layouts[0], layouts[1], ratio), (layouts[1], layouts[2], 1)]
        if per_head:  # a per-head bias: one per q head
            pairs.append((layouts[0], layouts[3], 1))
        for la, lb, r in pairs:
            reason = self._heads_aligned(la, lb, r)
            if reason is not None:
                return f"attention: {reason}"
        first = layouts[0]
        couplings = [
            (p.group, r.group, "attention")
            for la in layouts[1:]
            for p, r in zip(first.pieces, la.pieces, strict=True)
            if p.group and r.group
        ]
        # a dense per-head mask is read at q's kept heads (rewrite_gathered_args)
        meta = {"gathered_args": [(mask_at, len(shape) - 3)]} if gathered else {}
        # zeros follow v (compact[2]): a dropped head's probabilities times a zero v
        layout = first.at(len(_shape(node)) - 3)  # q, k or v may broadcast over batch dims
        return _Op(layout, zero_preserving=True, zero_when=2, couplings=couplings, meta=meta)

    def _head_features(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """scaled_dot_product_attention with q, k or v compact along each head's features
        (dim -1: one-head attention, whose projections are pruned per feature). The scores
        sum over q's and k's features (`_contraction`); each output feature is a function of
        v's alone, so the output is compact where v is, and zero in its dropped features.
        SDPA's default scale, 1/sqrt(E), is given at the dense E (meta ``scale``). Where
        another input is compact along the heads (multi-query attention's q, against k and
        v of one head) this does not apply: attention prunes by q's heads alone."""
        q, k, v = node.args[:3]
        if any(t not in (q, k, v) for t in compact):
            return "attention with a mask compact along its last dim"
        scored = [t for t in compact if t is not v]
        couplings: list[tuple[str, str, str]] = []
        meta: dict = {}
        if scored:
            if len(scored) == 2 and any(
                self._leave_blocked_dense([x], y) for x, y in (scored, scored[::-1])
            ):
                return "attention waits for its blocked q or k to be left dense"
            summed = {t: len(_shape(t)) - 1 for t in (q, k)}
            contraction = self._contraction(node, summed, scored)  # type: ignore[arg-type]
            if isinstance(contraction, str):
                return contraction
            couplings, meta = contraction
            width = static_size(_shape(q)[-1])
            if not isinstance(width, int):
                return "attention over features whose dense width is symbolic"
            if node.kwargs.get("scale") is None:
                meta["scale"] = 1 / math.sqrt(width)
        if v not in compact:
            return _Op(None, zero_preserving=True, couplings=couplings, meta=meta)
        layout = self.flows[v].layout.at(len(_shape(node)) - 1)  # type: ignore[index]
        return _Op(
            layout, zero_preserving=True, zero_when=compact.index(v), chainable=not scored,  # type: ignore[arg-type]
            couplings=couplings, meta=meta,
        )  # fmt: skip

    def _heads_compact(self, t: object) -> bool:
        """Whether `t` is compact along attention's heads dim."""
        return t in self.flows and self.flows[t].layout.dim == len(_shape(t)) - 3  # type: ignore[index]

    def _query_heads(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """Attention with pruned query heads and k, v that no group prunes by head
        (multi-query attention: one k/v head serves every q head). Each output head is a
        function of its q head alone, so attention continues q's chain: its mask point moves
        to the attention's output, where a dropped head is zero (at q it would output the
        mean of v). k and v are read whole, at q's kept heads where they have one per q
        head; features of theirs that a group prunes are scattered first."""
        q = node.args[0]
        if not self._heads_compact(q):
            return "attention whose q is not compact along the heads dim"
        if self.flows[q].zero is not None:
            return (
                "attention with pruned query heads and k, v that no group prunes by head, "
                "where q's chain has ended (another op reads q on a branch that does not "
                "reach attention): a head zero in q outputs the mean of v, so q is read at "
                "full width"
            )
        gathered = _per_head_args(node, (1, 2, 3), _shape(q)[-3])
        if gathered is None:
            return "attention whose k, v or mask heads are neither one nor q's heads"
        reason = "attention reads k and v whole: only its query heads are pruned"
        full_width = {t: reason for t in compact if t is not q}
        meta = {"gathered_args": gathered} if gathered else {}
        layout = self.flows[q].layout.at(len(_shape(node)) - 3)
        return _Op(layout, zero_preserving=False, chainable=True, full_width=full_width, meta=meta)

    def _leave_blocked_dense(self, tensors: list[fx.Node], other: fx.Node) -> bool:
        """Whether attention or a batched matmul meets `tensors` whose heads are blocked
        (OLMo 2 normalises q and k across all heads) and `other` whose heads are not:
        coupled, they would keep `other` dense too. The blocked spaces are left dense on
        their own for the next walk, which prunes by `other`'s heads (`_value_heads`, or
        `_matmul` reading the dense operand at them). Only a block found before this op
        counts: a statistic later in the graph still keeps the whole component dense."""
        if self._blocked(other):
            return False
        blocked = self._blocked(*tensors)
        for space, reason in blocked.items():
            self.refine.dense[space] = (
                f"{reason}; left dense on its own, not with the heads that attention or a "
                "matmul ties it to"
            )
        return bool(blocked)

    def _blocked(self, *tensors: fx.Node) -> dict[str, str]:
        """The blocked spaces, with a reason, of the components `tensors` belong to so far."""
        spaces = {space for t in tensors for space in self.flows[t].layout.groups}
        reached = set().union(
            *(nx.node_connected_component(self.result.couplings, s) for s in spaces)
        )
        return {s: self.result.blocked[s][0] for s in reached if s in self.result.blocked}

    def _value_heads(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """Attention with pruned v heads and a q or k that no group prunes (left dense where
        normalised across heads, `_leave_blocked_dense`). Output head h is a function of
        v's head h, weighted by q's and k's head h: channel-wise in v's heads, and zero
        where v is. A dense q or k, or a mask with one head per v head, is read at v's kept
        heads; one pruned by the same heads as v is read compact, coupled with v."""
        v = node.args[2]
        if any(not self._heads_compact(t) for t in compact):
            return "attention whose q, k or v is not compact along the heads dim"
        layout = self.flows[v].layout  # type: ignore[index]
        couplings = []
        for t in compact:
            reason = self._heads_aligned(self.flows[t].layout, layout, 1)
            if reason is not None:
                return f"attention: {reason}"
            pairs = zip(self.flows[t].layout.pieces, layout.pieces, strict=True)
            couplings += [(p.group, r.group, "attention") for p, r in pairs if p.group and r.group]
        gathered = _per_head_args(node, (0, 1, 3), _shape(v)[-3], read_compact=compact)
        if gathered is None:
            return "attention whose mask heads are neither one nor v's heads"
        meta = {"gathered_args": gathered} if gathered else {}
        return _Op(
            layout.at(len(_shape(node)) - 3), zero_preserving=True,
            zero_when=compact.index(v), chainable=True, couplings=couplings, meta=meta,  # type: ignore[arg-type]
        )  # fmt: skip

    def _shared_bias(self, node: fx.Node, bias: fx.Node) -> str | None:
        """A compact per-head bias that a second attention reads (T5 computes one for every
        layer) would tie the layers' heads into one group, or, where that attention is not
        pruned, zero its bias in the first one's dropped heads: its producer is left dense
        for the next walk, and each attention reads its own kept heads of it."""
        shared = False
        for space in self.flows[bias].layout.groups:
            first = self.bias_readers.setdefault(space, node)
            if first is not node:
                shared = True
                self.refine.dense[space] = (
                    f"a per-head attention bias that several attentions read ({first.name}, "
                    f"{node.name}): left dense, and each reads it at its own kept heads"
                )
        return "attention with a per-head bias that another attention reads" if shared else None

    def _heads_aligned(self, a: Layout, b: Layout, ratio: int) -> str | None:
        """None if channel c of `a` is channel c of `b` piece by piece, where each feature
        (head) of `b` serves `ratio` of `a`'s. Grouped-query attention breaks this until the
        query heads are grouped by key/value head: `repeat_kv` makes a kv channel span
        n_rep heads, which q's space then learns (as a grain, for the next walk)."""
        if len(a.pieces) != len(b.pieces):
            return "q, k and v are not compact along the heads dim alike"
        aligned = True
        for p, r in zip(a.pieces, b.pieces, strict=True):
            if (p.group is None) != (r.group is None) or p.features != r.features * ratio:
                return "q, k and v are not compact along the heads dim alike"
            if p.group is None or (p.size, p.block) == (r.size, r.block * ratio):
                continue
            finer, coarser = (p, r) if p.size > r.size else (r, p)
            if finer.size % coarser.size:
                return "q, k and v are not compact along the heads dim alike"
            aligned = False
            factor = finer.size // coarser.size
            self.refine.grain[finer.group] = self.result.spaces[finer.group].grain * factor  # type: ignore[index]
        return None if aligned else "waits for the query heads to be grouped by key/value head"

    def _matmul(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """A batched matmul is channel-wise in a batch dim (attention's explicit form). A
        dense operand with one batch per channel is read at the kept channels (probabilities
        of q and k normalised across heads, times v's pruned heads: `_value_heads`'s
        explicit form)."""
        a, b = node.args[:2]
        ndim = len(_shape(node))
        if len(_shape(a)) != ndim or len(_shape(b)) != ndim:  # type: ignore[arg-type]
            return "matmul that broadcasts its operands"
        layouts = [self.flows[t].layout for t in compact]
        dim = layouts[0].dim
        if all(la.dim >= ndim - 2 for la in layouts):
            return self._matrix_dims(node, compact)
        if dim >= ndim - 2 or any(la.dim != dim for la in layouts):
            return "matmul over the channel dim of one operand and a batch dim of the other"
        if len(compact) == 2:
            for x, y in (compact, compact[::-1]):
                if self._leave_blocked_dense([x], y):
                    return "matmul waits for its blocked operand to be left dense"
        reason = self._heads_aligned(layouts[0], layouts[-1], 1)
        if reason is not None:
            return f"matmul: {reason}"
        if len(compact) == 1 and a is not b:  # h @ h: one compact input, read twice
            position = 1 if compact == [a] else 0
            if int(_shape(node.args[position])[dim]) != 1:  # type: ignore[arg-type]
                meta = {"gathered_args": [(position, dim)]}
                return _Op(layouts[0], zero_preserving=True, meta=meta)
        couplings = [
            (p.group, r.group, "attention")
            for p, r in zip(layouts[0].pieces, layouts[-1].pieces, strict=True)
            if p.group and r.group
        ]
        return _Op(layouts[0], zero_preserving=True, zero_when="any", couplings=couplings)

    def _matrix_dims(self, node: fx.Node, compact: list[fx.Node]) -> _Op | str:
        """A matmul with channels in its operands' matrix dims (one-head attention: ``q @
        k.T``, then ``probs @ v``). Channels in the rows of `a` or the columns of `b` stay
        the output's, each row or column computed from its own: channel-wise, zero where
        the operand is. Channels across the contraction are summed over, so the output is
        dense: compact on both sides they are coupled (q's and k's features share one
        mask) and the kept ones alone give the sum; a dense operand across from a compact
        one is read at its kept channels."""
        a, b = node.args[:2]
        ndim = len(_shape(node))
        if a is b:
            return "matmul of a tensor with itself over its channel dim"
        # per operand: its matrix dim that the matmul sums over
        summed = {a: ndim - 1, b: ndim - 2}
        contracted = [t for t in compact if self.flows[t].layout.dim == summed[t]]
        if not contracted:
            if len(compact) == 2:
                return "matmul whose rows and columns are both compact channels"
            return _Op(self.flows[compact[0]].layout, zero_preserving=True, chainable=True)
        if len(contracted) != len(compact):
            return "matmul that sums over the channels of one operand and keeps the other's"
        if len(compact) == 2:
            for x, y in (compact, compact[::-1]):
                if self._leave_blocked_dense([x], y):
                    return "matmul waits for its blocked operand to be left dense"
        contraction = self._contraction(node, summed, compact)
        if isinstance(contraction, str):
            return contraction
        couplings, meta = contraction
        return _Op(None, zero_preserving=True, couplings=couplings, meta=meta)

    def _contraction(
        self, node: fx.Node, summed: dict[fx.Node, int], compact: list[fx.Node]
    ) -> tuple[list[tuple[str, str, str]], dict] | str:
        """Couplings and meta of an op that sums over the channels of its two operands
        `summed` (operand -> the dim it sums over; attention's q and k, a matmul's a and b),
        one or both of them `compact` there (one tensor read as both: shared-QK attention).
        Both compact, they are coupled piece by piece; one dense, it is read at the other's
        kept channels (`gathered_args`). Dropped channels must be zero (meta
        ``contracted``, which `_visit` checks)."""
        layout = self.flows[compact[0]].layout
        meta: dict = {"contracted": layout}
        if len(summed) == 1:
            return [], meta
        if len(compact) == 1:
            (dense,) = [t for t in summed if t is not compact[0]]
            meta["gathered_args"] = [(node.args.index(dense), summed[dense])]
            return [], meta
        other = self.flows[compact[1]].layout
        reason = self._heads_aligned(layout, other, 1)
        if reason is not None:
            return f"{_op_name(node)} over channels: {reason}"
        pairs = zip(layout.pieces, other.pieces, strict=True)
        return [(p.group, r.group, "contraction") for p, r in pairs if p.group and r.group], meta

    def _split(self, node: fx.Node, layout: Layout) -> _Op | str:
        """A split along the channel dim hands each output its pieces; a boundary inside a
        piece cuts that space into sub-spaces (the next walk creates them)."""
        ndim = len(_shape(node.args[0]))  # type: ignore[arg-type]
        dim = int(_arg(node, 2, "dim", 0)) % ndim  # type: ignore[call-overload]
        full = int(_shape(node.args[0])[dim])  # type: ignore[arg-type]
        sizes = node.args[1]
        if node.target is aten.chunk.default:  # `sizes` chunks: split by their size
            sizes = -(-full // sizes)  # type: ignore[operator]
        if isinstance(sizes, int):
            sizes = [min(sizes, full - start) for start in range(0, full, sizes)]
        if dim != layout.dim:
            parts = [layout for _ in sizes]  # type: ignore[union-attr]
            meta = {"split": None}
            return _Op(layout, zero_preserving=True, chainable=True, parts=parts, meta=meta)
        bounds = [sum(sizes[:i]) for i in range(1, len(sizes))]  # type: ignore[index]
        pieces = _cut(layout, bounds)
        if isinstance(pieces, dict):
            for space, cut in pieces.items():
                self.refine.parts[space] = cut
            return "split waits for its spaces to be cut at the split's boundaries"
        parts = [Layout(dim, chunk) for chunk in pieces]
        meta = {"split": parts}
        return _Op(layout, zero_preserving=True, chainable=True, parts=parts, meta=meta)

    def _slice(self, node: fx.Node, layout: Layout) -> _Op | str:
        """A range of the channel dim keeps the pieces inside it, like one output of a split
        (a bound inside a piece cuts its space); a range of another dim keeps the layout."""
        x = node.args[0]
        ndim = len(_shape(x))
        dim = int(_arg(node, 1, "dim", 0)) % ndim  # type: ignore[call-overload]
        if dim != layout.dim:
            return _Op(layout, zero_preserving=True, chainable=True)
        full = int(_shape(x)[dim])
        if node.target is aten.narrow.default:
            start, length = int(node.args[2]), int(node.args[3])  # type: ignore[call-overload]
            start, end, step = start % full, start % full + length, 1
        else:
            start, end, step = (_arg(node, i, k, d) for i, k, d in _SLICE_ARGS)
            start, end = slice(start, end).indices(full)[:2]  # type: ignore[arg-type]
        if step != 1:
            return "a strided slice of the channel dim"
        if start >= end:  # Phi-3's x[..., rotary_dim:] where the rotary part is all of x
            return "an empty slice of the channel dim"
        bounds = [b for b in (start, end) if 0 < b < full]
        pieces = _cut(layout, bounds)
        if isinstance(pieces, dict):
            for space, cut in pieces.items():
                self.refine.parts[space] = cut
            return "slice waits for its spaces to be cut at the slice's bounds"
        if not pieces:
            return "a slice of the channel dim that cuts a channel or a dense stretch"
        before, kept = (pieces[0], pieces[1]) if start > 0 else ((), pieces[0])
        slice_ = (Layout(dim, before) if before else None, Layout(dim, kept))
        if all(p.group is None for p in kept):  # dense features, at their compact offset
            return _Op(None, zero_preserving=True, meta={"slice": slice_})
        return _Op(Layout(dim, kept), zero_preserving=True, meta={"slice": slice_})

    def _view(self, node: fx.Node, x: fx.Node, layout: Layout) -> _Op | str:
        op = _view(node, x, layout)
        if not isinstance(op, int):
            return op
        (whole, *others), out_shape = layout.pieces, _shape(node)
        outer, heads = out_shape[layout.dim], out_shape[layout.dim + 1]
        fused = not others and whole.group is not None and isinstance(outer, int) and outer > 1
        if (
            fused
            and whole.size % outer == 0
            and not same_size(heads, 1)  # one head each: nothing left to prune per head
            and _indexed(node, layout.dim)
        ):
            self.refine.parts[whole.group] = [whole.size // outer] * outer  # type: ignore[index]
            return f"{_op_name(node)} waits for its space to be cut into the {outer} it fuses"
        for piece in layout.pieces:  # a channel spans several features of the new inner dims
            if piece.group is not None and op % piece.block == 0:
                factor = op // piece.block
                if piece.size % factor == 0:
                    grain = self.result.spaces[piece.group].grain * factor
                    self.refine.grain[piece.group] = grain
        return f"{_op_name(node)} splits a channel across dims"


_SLICE_ARGS = ((2, "start", None), (3, "end", None), (4, "step", 1))
_PER_CHANNEL_NORMS = (aten.layer_norm.default, aten.rms_norm.default)

_INTO_DENSE = (
    "{op} ({node}) joins it with a full-width tensor no group covers (a residual stream "
    "from an unpruned source such as the input or an embedding): pruning it would zero "
    "features of that stream"
)
_FROM_WHOLE = (
    "{op} ({node}) joins it with a full-width tensor made from compact channels that "
    "{reader} ({at}) reads whole ({why}): the join needs every channel"
)
_WHOLE_REACH = 6
"""Ops a join's full-width operand is traced back through for a whole read (Wav2Vec2's
positional convolution reaches its add through a slice, gelu and transpose)."""
_STATE_INTO_DENSE = (
    "{op} ({node}) joins it with {state}, which is not gathered with its channels (only a "
    "parameter of one value per channel, used by this op alone and not broadcasting the "
    "tensor to a larger shape, is)"
)
_NORM_REACH = 6
"""Ops a norm's statistic passes before it scales its features (LayerNorm's variance: sub,
pow, mean, add, rsqrt, mul)."""
_SHAPE_OPS = ops.VIEWS | ops.EXPANDS | ops.UNSQUEEZES | ops.SQUEEZES | ops.PERMUTES
"""Ops that move or repeat values without changing any (their sign included)."""
_SCORES_REACH = 6
"""Ops between attention scores and their softmax (GPT-2's: a scale, the causal ``where``,
the padding mask's add, a cast; Swinv2's shifted windows: a view into windows, the window
mask's add, which it repeats, and a view back)."""
_DECOMPOSED_NORM = (
    "normalised across features by a decomposed norm: {op} ({node}) reduces over the channel "
    "dim and keeps it, a statistic the features are scaled by, like layer_norm's"
)


def _cut(layout: Layout, bounds: list[int]) -> list[tuple[Piece, ...]] | dict[str, list[int]]:
    """The pieces between feature `bounds`, or the cuts of spaces that those bounds need
    (empty if a bound falls inside a channel or a dense stretch)."""
    chunks: list[list[Piece]] = [[] for _ in range(len(bounds) + 1)]
    cuts: dict[str, list[int]] = {}
    for piece, start in zip(layout.pieces, layout.offsets(), strict=True):
        end = start + piece.features
        inside = [b for b in bounds if start < b < end]
        if inside:
            if piece.group is None or any((b - start) % piece.block for b in inside):
                return {}
            edges = [0, *((b - start) // piece.block for b in inside), piece.size]
            cuts[piece.group] = [hi - lo for lo, hi in itertools.pairwise(edges)]
        chunks[sum(b <= start for b in bounds)].append(piece)
    return cuts or [tuple(chunk) for chunk in chunks]


# -- layout transfer of shape ops ---------------------------------------------------------------


def _joined(node: fx.Node, la: Layout, lb: Layout) -> Layout | None:
    """The layout of an element-wise join of two compact tensors, or None if their channels
    do not line up: same pieces on the same dim counted from the end, other dims broadcast
    (token + position embeddings: [B, T, C] + [T, C])."""
    a, b = node.args[0], node.args[1]
    ndim = len(_shape(node))
    if la.dim - len(_shape(a)) != lb.dim - len(_shape(b)):
        return None
    moved = [la.at(la.dim + ndim - len(_shape(a))), lb.at(lb.dim + ndim - len(_shape(b)))]
    if not moved[0].same_shape(moved[1]):
        return None
    return moved[0]


def _per_head_args(
    attention: fx.Node, positions: tuple[int, ...], heads: object, read_compact: list = ()
) -> list[tuple[int | str, int]] | None:
    """Attention's dense arguments at `positions` (3: the mask) with one head per kept
    head, each to be read at the kept heads (`gathered_args`: position or keyword, heads
    dim); arguments in `read_compact`, or with no heads dim or one head, are read as they
    are. None if one has a number of heads other than one or `heads` (enable_gqa's q
    against pruned k and v heads)."""
    gathered: list[tuple[int | str, int]] = []
    for position in positions:
        t = (
            _arg(attention, position, "attn_mask", None)
            if position == 3
            else attention.args[position]
        )
        shape = _shape(t) if isinstance(t, fx.Node) and t not in read_compact else ()
        if len(shape) < 3 or same_size(shape[-3], 1):
            continue
        if not same_size(shape[-3], heads):  # type: ignore[arg-type]
            return None
        at = position if len(attention.args) > position else "attn_mask"
        gathered.append((at, len(shape) - 3))
    return gathered


def _reads_values(user: fx.Node, arg: fx.Node) -> bool:
    """Whether `user` reads `arg`'s values, not only its size or dtype."""
    return user.target is not aten.sym_size.int and not _dtype_only(user, arg)


def _dtype_only(user: fx.Node, arg: fx.Node) -> bool:
    """``x.type_as(arg)`` reads only arg's dtype: arg is not one of its compact inputs."""
    return user.target in ops.TYPE_AS and user.args[0] is not arg


def _scores(node: fx.Node, dim: int) -> bool:
    """Whether the element-wise `node` computes attention scores, with heads at `dim`: an
    input is a product ``q @ k.T`` (`_product_of_matmul`), and within a few ops that keep
    the last dim (a scale, a mask, a cast, Swinv2's view into windows) it reaches a softmax
    over that last dim. A head dropped from q, k and v outputs softmax(...) @ 0 = 0 whatever
    was added to its scores, so a per-head bias added here is read at the kept heads only,
    and the add does not join a residual stream."""
    shape = _shape(node)
    if not shape or dim == len(shape) - 1:
        return False
    inputs = [arg for arg in _flat_args(node) if _is_tensor(arg)]
    if not any(_product_of_matmul(arg) for arg in inputs):
        return False
    return any(
        n.target in ops.SOFTMAX and int(n.args[1]) % len(_shape(n)) == len(_shape(n)) - 1  # type: ignore[call-overload]
        for n in _along_last_dim(node, shape[-1], lambda n: list(n.users))
    )


def _product_of_matmul(node: fx.Node) -> bool:
    """Whether `node` is, within a few ops that keep its last dim, a matmul's output, or
    one gathered along that dim (DeBERTa's scores of relative positions, gathered into
    scores of keys)."""
    last = _shape(node)[-1] if _shape(node) else None
    return last is not None and any(
        n.target in ops.MATMUL
        or (n.target is aten.gather.default and _product_of_matmul(n.args[0]))  # type: ignore[arg-type]
        for n in [node, *_along_last_dim(node, last, lambda n: _flat_args(n))]
    )


def _along_last_dim(start: fx.Node, last: object, step) -> list[fx.Node]:
    """Tensors within `_SCORES_REACH` steps of `start` (its users or inputs, by `step`) that
    keep a last dim of size `last`, not past a matmul: those attention scores pass on their
    way from ``q @ k.T`` to the softmax."""
    reached, frontier = [], [start]
    for _ in range(_SCORES_REACH):
        frontier = [
            n
            for f in frontier
            if f is start or f.target not in ops.MATMUL
            for n in step(f)
            if _is_tensor(n) and _shape(n) and same_size(_shape(n)[-1], last)
        ]
        reached += frontier
    return reached


def _gathered_operand(node: fx.Node, x: fx.Node, layout: Layout, other_dim: int) -> _Op | None:
    """Compact scores `x` plus a dense per-head bias (T5's, which every layer reads; ALiBi;
    the zeros of a cross-attention), or times a per-head temperature (Swinv2's), whose
    heads are `other_dim` of the other tensor: that tensor is read at the kept heads (meta
    ``gathered_args``). A product is zero in dropped heads, as is the other tensor's
    gradient there. A sum is not zero-preserving: a dropped head holds its bias until v
    zeros it, and where nothing does the walk asks for a scatter instead. (Outside scores,
    a gate by a full-width tensor reads a scatter: read compactly, it would block a
    producer that writes into an unpruned stream through it.)"""
    other = node.args[1] if node.args[0] is x else node.args[0]
    dim = layout.dim + len(_shape(node)) - len(_shape(x))
    product = node.target in ops.MUL or (node.target in ops.DIV and other is node.args[1])
    if (node.target in ops.DIV and not product) or not _scores(node, dim):
        return None
    meta = {"gathered_args": [(node.args.index(other), other_dim)]}
    return _Op(layout.at(dim), zero_preserving=product, meta=meta)


def _positive(node: fx.Node, strict: bool = True) -> bool:
    """Whether `node` is > 0 (`strict`) or >= 0 everywhere, by how it is computed: exp or
    sigmoid; a clamp_min to a positive bound (F.normalize's eps); a positive constant plus
    something non-negative (a softsign's 1 + |x|); through shape ops. A compact tensor
    divided by another (F.normalize's ``x / norm(x).clamp_min(eps)``) is zero where the
    numerator is only if the reference never divides by zero there: where the denominator
    may hold 0 in dropped channels, the quotient is NaN and the division reads a scatter."""
    while node.target in _SHAPE_OPS:
        node = node.args[0]  # type: ignore[assignment]
    if node.target in ops.POSITIVE or (not strict and node.target in ops.NONNEGATIVE):
        return True
    if node.target is aten.clamp_min.default:
        bound = node.args[1]
        return isinstance(bound, int | float) and (bound > 0 or (not strict and bound == 0))
    if node.target is aten.add.Tensor and len(node.args) == 2 and not node.kwargs:  # no alpha
        a, b = node.args
        constant, term = (a, b) if _is_scalar(a) else (b, a)
        if isinstance(constant, int | float) and _is_tensor(term):
            return constant > 0 and _positive(term, strict=False)  # type: ignore[arg-type]
    return False


def _view(node: fx.Node, x: fx.Node, layout: Layout) -> _Op | str | int:
    """flatten and unflatten keep channels as blocks; other reshapes are not understood.
    An int: the unflatten would split a channel, whose features must group by that many."""
    in_shape, out_shape = _shape(x), _shape(node)
    span = _merged_span(in_shape, out_shape)
    if span is not None:
        start, end = span
        d = layout.dim
        if d < start:
            moved = layout
        elif d > end:
            moved = layout.at(d - (end - start))
        elif d == start and _static(in_shape[start + 1 : end + 1]):
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
    inner = _unflattened_sizes(node, out_shape, start, end)
    if inner is None:
        return f"{_op_name(node)} reshapes channels in a way other than flattening"
    if d < start:
        moved = layout
    elif d > start:
        moved = layout.at(d + (end - start))
    elif not _static(inner):
        return f"{_op_name(node)} splits the channel dim by a dynamic size"
    else:
        divided = layout.divided(_static_prod(inner))
        if divided is None:
            return _fused(layout, out_shape[start], inner)
        moved = divided
    return _Op(
        moved,
        zero_preserving=True,
        chainable=True,
        meta={"view": ("unflatten", start, [-1, *inner])},
    )


def _fused(layout: Layout, outer: object, inner: list) -> _Op | int:
    """An unflatten to ``[r, *inner]`` of r pieces of one shape, such as the q, k and v
    sub-spaces of a fused projection viewed as ``[3, heads, head_dim]``: the new outer dim
    indexes the pieces and their channels move to the next dim, so the pieces must share one
    index set (a head is one channel of q, k and v). An int where that is not so: the
    features a channel must span (`_Walk._view` regrains the spaces, or an unflatten whose
    outer dim is not indexed like this keeps the channel outer)."""
    within = _static_prod(inner[1:])
    pieces = layout.pieces
    if (
        outer != len(pieces)
        or len(pieces) < 2
        or any(p.group is None or p.features != pieces[0].features for p in pieces)
    ):
        return _static_prod(inner)
    if any(p.block % within for p in pieces):
        return within
    first = pieces[0]
    if any((p.size, p.block) != (first.size, first.block) for p in pieces):
        return max(p.block for p in pieces)  # a later view coarsened one: coarsen them all
    return _Op(
        Layout(layout.dim + 1, (Piece(first.group, first.size, first.block // within),)),
        zero_preserving=True,
        chainable=True,
        couplings=[(first.group, p.group, "fused projection") for p in pieces[1:]],  # type: ignore[misc]
        meta={"view": ("unflatten", layout.dim, [outer, -1, *inner[1:]])},
    )


def _indexed(node: fx.Node, dim: int) -> bool:
    """Whether every use of `node` ends, past permutes, unsqueezes, squeezes, zero-preserving
    unary ops and slices of other dims, in a select or unbind of `dim`: timm's
    ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``, or ``kv[:, :, 0]``
    (a full slice of dim 0, then a select)."""
    for user in node.users:
        probe = Layout(dim, ())
        if user.target in ops.SELECTS:
            if int(_arg(user, 1, "dim", 0)) % len(_shape(node)) != dim:  # type: ignore[call-overload]
                return False
            continue
        if user.target in ops.SLICES:
            moved: _Op | str = _slice_of_another_dim(user, probe)
        elif user.target in ops.PERMUTES:
            moved = _permute(user, probe)
        elif user.target in ops.UNSQUEEZES:
            moved = _unsqueeze(user, probe)
        elif user.target in ops.SQUEEZES:
            moved = _squeeze(user, node, probe)
        elif user.target in ops.ZERO_PRESERVING_UNARY:
            moved = _Op(probe, zero_preserving=True)
        else:
            return False
        if isinstance(moved, str) or not _indexed(user, moved.layout.dim):  # type: ignore[union-attr]
            return False
    return bool(node.users)


def _slice_of_another_dim(node: fx.Node, layout: Layout) -> _Op | str:
    """A slice that keeps every index of the layout's dim (it slices another, or all of it)."""
    ndim = len(_shape(node.args[0]))  # type: ignore[arg-type]
    if int(_arg(node, 1, "dim", 0)) % ndim != layout.dim:  # type: ignore[call-overload]
        return _Op(layout, zero_preserving=True)
    start, end, step = (_arg(node, i, k, d) for i, k, d in _SLICE_ARGS)
    size = _shape(node.args[0])[layout.dim]  # type: ignore[arg-type]
    whole = (
        node.target is aten.slice.Tensor
        and start in (None, 0)
        and step == 1
        and (end is None or (isinstance(end, int) and same_size(min(end, size), size)))
    )  # an end that is a size node: not known to be whole
    return _Op(layout, zero_preserving=True) if whole else "a slice of the dim"


def _unsqueezed(node: fx.Node, dim: int) -> tuple[fx.Node, int]:
    """What `node` unsqueezes (through unsqueezes that only it reads), and which of its dims
    is `node`'s `dim`."""
    while node.target in ops.UNSQUEEZES and len(node.users) == 1:
        inserted = int(node.args[1]) % len(_shape(node))  # type: ignore[call-overload]
        if inserted == dim:
            break
        node, dim = node.args[0], dim - (inserted < dim)  # type: ignore[assignment]
    return node, dim


def _unsqueeze(node: fx.Node, layout: Layout) -> _Op:
    dim = int(node.args[1]) % len(_shape(node))  # type: ignore[call-overload]
    return _Op(layout.at(layout.dim + (dim <= layout.dim)), zero_preserving=True, chainable=True)


def _squeeze(node: fx.Node, x: fx.Node, layout: Layout) -> _Op | str:
    """Removing size-1 dims other than the channel dim shifts it down past them. Naming the
    channel dim is refused even where it is wider than one: a kept count of one (a fixed
    mask) would remove it from the compact tensor. ``squeeze()`` names every dim of size
    one in the dense graph, and the rewrite names them explicitly (`rewrite_views`)."""
    shape = _shape(x)
    if node.target == ops.aten.squeeze.default:
        removed = [d for d, size in enumerate(shape) if same_size(size, 1)]
        if layout.dim in removed:
            return "squeeze of a channel dim of size one"
        shift = sum(d < layout.dim for d in removed)
        return _Op(
            layout.at(layout.dim - shift),
            zero_preserving=True,
            chainable=True,
            meta={"view": ("squeeze", layout.dim - shift, removed)},
        )
    dims = node.args[1] if isinstance(node.args[1], list | tuple) else [node.args[1]]
    named = {int(d) % len(shape) for d in dims}  # type: ignore[call-overload]
    if layout.dim in named:
        return "squeeze that names the channel dim"
    shift = sum(d < layout.dim for d in named if same_size(shape[d], 1))
    return _Op(layout.at(layout.dim - shift), zero_preserving=True, chainable=True)


def _expand(node: fx.Node, x: fx.Node, layout: Layout) -> _Op | str:
    """Broadcasting other dims keeps the channels; the rewrite gives the channel dim the
    compact tensor's own size (-1), as the captured sizes are dense."""
    dim = layout.dim + len(_shape(node)) - len(_shape(x))
    if not same_size(_shape(node)[dim], _shape(x)[layout.dim]):
        return "expand of the channel dim"
    return _Op(
        layout.at(dim), zero_preserving=True, chainable=True, meta={"view": ("expand", dim, None)}
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


def _index(node: fx.Node, layout: Layout) -> _Op | str:
    """``x[idx]``: index tensors on other dims than the channel dim move it as advanced
    indexing moves dims (the index's dims replace consecutive indexed dims, or come first).
    A bool mask indexes as many dims as it has."""
    x, indices = node.args[:2]
    indexed: list[int] = []
    dim = 0
    for index in indices:  # type: ignore[union-attr]
        span = 1
        if _is_tensor(index) and index.meta["val"].dtype in (torch.bool, torch.uint8):  # type: ignore[union-attr]
            span = index.meta["val"].ndim  # type: ignore[union-attr]
        if index is not None:
            indexed += range(dim, dim + span)
        dim += span
    if layout.dim in indexed:
        return "index along the channel dim"
    if not indexed:  # every index None: the tensor itself
        return _Op(layout, zero_preserving=True, chainable=True)
    index_dims = len(_shape(node)) - (len(_shape(x)) - len(indexed))
    if indexed == list(range(indexed[0], indexed[-1] + 1)):
        dim = layout.dim if layout.dim < indexed[0] else layout.dim - len(indexed) + index_dims
    else:
        dim = index_dims + layout.dim - sum(d < layout.dim for d in indexed)
    return _Op(layout.at(dim), zero_preserving=True, chainable=True)


def _gather(node: fx.Node, layout: Layout) -> _Op | str:
    """``torch.gather(x, dim, index)`` along another dim than the channels picks, in each
    channel, among that channel's own values (DeBERTa's relative positions, per head): its
    index, one row per channel, is read at the kept channels."""
    x, dim, index = node.args[:3]
    ndim = len(_shape(x))
    if int(dim) % ndim == layout.dim:  # type: ignore[call-overload]
        return "gather along the channel dim"
    if ndim != len(_shape(index)) or not same_size(
        _shape(index)[layout.dim], _shape(x)[layout.dim]
    ):
        return "gather whose index does not cover every channel"
    meta = {"gathered_args": [(2, layout.dim)]}
    return _Op(layout, zero_preserving=True, chainable=True, meta=meta)


def _patches(node: fx.Node, layout: Layout) -> _Op | str:
    """``F.unfold`` (im2col) lays each channel's patch out as its block of ``prod(kernel)``
    features, channel after channel; ``F.fold`` (col2im) sums each block back into its
    channel's positions (MobileViT's patches). Both are channel-wise and zero-preserving."""
    x = node.args[0]
    unfold = node.target is aten.im2col.default
    spatial = 2 if unfold else 1  # dims after the channel dim: [H, W] in, [L] out
    if layout.dim != len(_shape(x)) - 1 - spatial:
        return f"{_op_name(node)} over the channel dim"
    kernel = math.prod(node.args[1 if unfold else 2])  # type: ignore[arg-type]
    out = layout.scaled(kernel) if unfold else layout.divided(kernel)
    if out is None:
        return "col2im of channels that do not hold whole patches"
    return _Op(out, zero_preserving=True, chainable=True)


def _pad(node: fx.Node, layout: Layout) -> _Op | str:
    """A pad of other dims is channel-wise (MobileNet's TF-style spatial padding); it keeps a
    dropped channel zero unless it pads with a nonzero constant."""
    ndim = len(_shape(node.args[0]))
    widths = list(node.args[1])  # type: ignore[arg-type]
    padded = {ndim - 1 - i // 2 for i, width in enumerate(widths) if width}
    if layout.dim in padded:
        return "pad of the channel dim"
    if node.target is aten.constant_pad_nd.default:
        value = _arg(node, 2, "value", 0)
    else:
        mode = _arg(node, 2, "mode", "constant")
        value = _arg(node, 3, "value", None) if mode == "constant" else 0
    return _Op(layout, zero_preserving=not value, chainable=True)


def _select(node: fx.Node, layout: Layout) -> _Op | str:
    """Indexing a dim before or after the channel dim removes it (the channel dim shifts
    down past it); indexing the channel dim picks one channel's features, not understood."""
    ndim = len(_shape(node.args[0]))  # type: ignore[arg-type]
    dim = int(_arg(node, 1, "dim", 0)) % ndim  # type: ignore[call-overload]
    if dim == layout.dim:
        return f"{_op_name(node)} of the channel dim"
    out = layout.at(layout.dim - (dim < layout.dim))
    if node.target is aten.unbind.int:
        parts = [out for _ in range(int(_shape(node.args[0])[dim]))]  # type: ignore[arg-type]
        return _Op(layout, zero_preserving=True, parts=parts)
    return _Op(out, zero_preserving=True, chainable=True)


def _reduced(node: fx.Node) -> tuple[object, bool]:
    """A reduction's ``dim`` and ``keepdim`` arguments."""
    at = ops.REDUCTIONS[node.target]  # type: ignore[index]
    return _arg(node, at, "dim", None), bool(_arg(node, at + 1, "keepdim", False))


def _reduction(node: fx.Node, layout: Layout) -> _Op | str:
    ndim = len(_shape(node.args[0]))  # type: ignore[arg-type]
    dims, keepdim = _reduced(node)
    if dims is None or (isinstance(dims, list | tuple) and not dims):  # [] reduces every dim
        return f"{_op_name(node)} reduces over every dim"
    dims = [int(d) % ndim for d in ([dims] if isinstance(dims, int) else dims)]  # type: ignore[union-attr]
    if layout.dim in dims:
        return f"{_op_name(node)} reduces over the channel dim"
    out = layout.at(layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims))
    # values and indices alike: a dropped channel's zeros have their max (and its index) 0
    parts = [out, out] if node.target in ops.WITH_INDICES else None
    return _Op(out, zero_preserving=True, chainable=True, parts=parts)


# -- helpers ---------------------------------------------------------------------------------------


def _source_blocker(node: fx.Node, view: GraphView) -> str | None:
    """Why this linear/conv/addmm/embedding cannot be a pruned producer, or None if it can."""
    _, weight, bias = ops.weight_args(node)
    if node.target in ops.ADDMM and not ops.is_plain_addmm(node):
        return "addmm that is not a linear layer (scaled, or not a bias vector)"
    if node.target in ops.EMBEDDING and _arg(node, 4, "sparse", False):
        return "embedding with sparse=True: its sparse gradient's rows would become dense"
    if view.param(weight) is None:
        return "weight is not a parameter of the model"
    if view.own_param(weight) is None:
        return "weight is used by several ops (shared weights are not pruned yet)"
    if bias is not None and view.own_param(bias) is None:
        return "bias is not a parameter used by this op alone"
    if _reaches_output(node, view):
        return "output layer: its channels reach the model output or loss"
    return None


def _reaches_output(node: fx.Node, view: GraphView) -> bool:
    """Whether `node` reaches the graph output without passing another linear/conv that
    mixes channels (a grouped conv follows its input's groups)."""
    seen, frontier = {node}, [node]
    while frontier:
        for user in frontier.pop().users:
            if user is view.output:
                return True
            mixes = ops.is_weight_op(user.target) and not _is_grouped(user)
            if user in seen or (user.op == "call_function" and mixes):
                continue
            seen.add(user)
            frontier.append(user)
    return False


def _is_grouped(node: fx.Node) -> bool:
    """A convolution with groups > 1 (depthwise included): output channels of a conv group
    read only that group's input channels."""
    return ops.is_conv(node.target) and _conv_groups(node) > 1


def _merged_span(in_shape: tuple, out_shape: tuple) -> tuple[int, int] | None:
    """(start, end) if out_shape is in_shape with dims start..end merged into one. Sizes may
    be symbolic (a compiled graph after a batch or sequence length change: GPT-2's
    ``view(-1, C)`` merges [s0, s1] into s0*s1); their product must equal the merged size
    for every value of the symbols."""
    merged = len(in_shape) - len(out_shape)
    if merged < 0:
        return None
    for start in range(len(out_shape)):
        end = start + merged
        same_prefix = all(map(same_size, in_shape[:start], out_shape[:start]))
        same_suffix = all(map(same_size, in_shape[end + 1 :], out_shape[start + 1 :]))
        if (
            same_prefix
            and same_suffix
            and same_size(math.prod(in_shape[start : end + 1]), out_shape[start])
        ):
            return start, end
    return None


def _static(sizes: tuple | list) -> bool:
    return all(isinstance(size, int) for size in sizes)


def _unflattened_sizes(node: fx.Node, out_shape: tuple, start: int, end: int) -> list | None:
    """The sizes of an unflatten's inner dims (start+1..end of its output) for the rewrite:
    ints where static or where the graph's size argument is an int (a fake unflatten may
    give a literal 2 back as ``W // (W // 2)``), else the graph's own size arguments
    (symbolic-size nodes); None where a dynamic size has no such argument (a -1)."""
    sizes = out_shape[start + 1 : end + 1]
    if _static(sizes):
        return [int(size) for size in sizes]
    if node.target is aten.unflatten.int:
        args = list(node.args[2])[1:]
    else:
        args = list(node.args[1])[start + 1 : end + 1]
    if len(args) != len(sizes):
        return None
    inner = []
    for size, arg in zip(sizes, args, strict=True):
        if isinstance(size, int):
            inner.append(size)
        elif (isinstance(arg, int) and arg >= 0) or isinstance(arg, fx.Node):
            inner.append(arg)
        else:
            return None
    return inner


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


def _is_tensor(arg: object) -> bool:
    """A node whose value is a tensor (not a symbolic scalar such as ``x.shape[0]``)."""
    return isinstance(arg, fx.Node) and isinstance(arg.meta.get("val"), torch.Tensor)


def _is_scalar(arg: object) -> bool:
    """A number, or a node of a symbolic one (a size read from an input under dynamic
    shapes): a scalar operand of an element-wise op."""
    if isinstance(arg, fx.Node):
        return isinstance(arg.meta.get("val"), torch.SymInt | torch.SymFloat)
    return isinstance(arg, int | float) and not isinstance(arg, bool)


def _shape(node: object) -> tuple:
    """The node's sizes, with SymInts of a constant value as ints (`static_size`): the layout
    rules read ints as static sizes."""
    return tuple(static_size(size) for size in node.meta["val"].shape)  # type: ignore[attr-defined]


def _channel_dim(node: fx.Node) -> int:
    """Dim of a linear/conv output that holds its output channels."""
    ndim = len(_shape(node))
    if ops.is_conv(node.target):
        return ndim - (len(_shape(node.args[1])) - 2) - 1
    return ndim - 1


def _conv_groups(node: fx.Node) -> int:
    return int(_arg(node, 6, "groups", 1))  # type: ignore[call-overload]
