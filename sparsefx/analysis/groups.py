"""Coupling groups: the connected components of the channel dependency graph.

:func:`sparsefx.analysis.dependency.propagate` finds every prunable producer's channel space,
the edges that tie spaces together (residual adds, gating muls, concats along other dims)
and the reasons a space cannot be pruned. A group is one connected component: its channels
are kept or dropped together in every member. A component stays dense, with its reason in
the report, when one of its spaces is blocked (an output layer, a norm across features),
when it is one channel that the sampler would always keep (a part of a producer whose
other parts prune is left dense as features of its layout), or when it is a residual stream
and streams are not pruned (the default: a stream touches every block, and pruning it is a
separate choice, ``SparseConfig(prune_streams=True)``).
Removing a component can change what its neighbours read, so the walk is repeated until
the set of dense components is stable (at most once per component).

Results are written to ``node.meta["sparsefx"]`` (keys documented in passes/README.md) and
returned as an :class:`Analysis`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import Tensor, fx
from torch.export.graph_signature import InputKind

from sparsefx.analysis import ops
from sparsefx.analysis.dependency import (
    DenseOp,
    GraphView,
    Member,
    Propagation,
    Refinements,
    propagate,
)
from sparsefx.analysis.layout import Layout, Piece

__all__ = ["META", "Analysis", "DenseOp", "Group", "analyze"]

META = "sparsefx"


@dataclass
class Group:
    """One channel index space that is kept or dropped together (DESIGN §2)."""

    name: str
    size: int
    members: list[tuple[str, int]]
    """(parameter FQN in the original model, dim) for every parameter the channels index."""
    producers: list[str]
    """The linear/conv/embedding nodes whose output channels are this group."""
    mask_points: list[str]
    """Per producer, the node after which dropped channels are exactly zero (DESIGN §2)."""
    stream: bool = False
    """Joined by residual adds: the group is a residual stream."""
    slices: list[Member] = field(default_factory=list, repr=False)

    def expand(self, mask: Tensor) -> list[tuple[str, int, Tensor]]:
        """For a bool mask over this group's channels, each member parameter's kept slices:
        ``(parameter name, dim, bool mask over that dim)``, on the mask's device (a CUDA
        model's `sparsefx.masks` are CUDA tensors). Features of the dim that this group does
        not own (k and v rows of a fused qkv weight, for q's group) are False too: what the
        group owns is what an all-true mask keeps."""
        mask = torch.as_tensor(mask)
        if mask.shape != (self.size,) or mask.dtype != torch.bool:
            raise ValueError(
                f"expand needs a bool mask of shape ({self.size},) for group {self.name!r}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        kept = mask.nonzero().squeeze(1)
        found: dict[tuple[str, int], Tensor] = {}
        for member in self.slices:
            key = (member.fqn, member.dim)
            if key not in found:
                found[key] = torch.zeros(member.extent, dtype=torch.bool, device=mask.device)
            blocks = torch.arange(member.block, device=mask.device)
            features = kept[:, None] * member.block + blocks
            found[key][member.offset + features.reshape(-1)] = True
        return [(fqn, dim, dims) for (fqn, dim), dims in found.items()]


@dataclass
class Analysis:
    groups: list[Group] = field(default_factory=list)
    dense: list[DenseOp] = field(default_factory=list)
    """Ops left dense, and why: linear/conv/addmm/embedding that are not pruned, norms across features."""
    scatters: list[DenseOp] = field(default_factory=list)
    """Users that read a compact tensor at full width, and why."""
    couplings: nx.Graph = field(default_factory=nx.Graph, repr=False)
    """The dependency graph between producers' channel spaces (nodes: producer names; edges
    labelled with the joins' ``kinds``), including components that were kept dense."""


def analyze(
    gm: fx.GraphModule, inputs: list[tuple[InputKind, str]], *, prune_streams: bool = False
) -> Analysis:
    """Annotate `gm` with groups and compact layouts; see the module docstring."""
    view = GraphView(gm.graph, inputs)
    dense: dict[str, str] = {}
    dense_couplings = nx.Graph()
    refined = Refinements()
    computing = _computing_weights(gm, view)
    while True:
        walk = propagate(gm, view, dense, refined)
        if refined.update(walk.refine):
            continue
        blocked = _dense_components(walk, prune_streams, computing)
        if not blocked:
            break
        dense_couplings.update(walk.couplings.subgraph(blocked))
        dense.update(blocked)
    groups, names = _groups(gm, walk)
    _annotate(gm, walk, names)
    couplings = nx.compose(dense_couplings, walk.couplings)
    return Analysis(groups, walk.dense, walk.scatters, couplings)


def _components(walk: Propagation) -> list[list[str]]:
    """Connected components of the dependency graph, each in graph order."""
    order = list(walk.spaces)
    return sorted(
        (sorted(c, key=order.index) for c in nx.connected_components(walk.couplings)),
        key=lambda c: order.index(c[0]),
    )


def _is_stream(walk: Propagation, component: list[str]) -> bool:
    edges = walk.couplings.subgraph(component).edges(data="kinds")
    return any("residual" in kinds for _, _, kinds in edges)


def _computing_weights(gm: fx.GraphModule, view: GraphView) -> set[str]:
    """Weights of the linear and convolution layers: a group saves compute only where one
    of them is its member (an embedding's table is a lookup)."""
    return {
        fqn
        for node in gm.graph.nodes
        if ops.is_weight_op(node.target) and node.target not in ops.EMBEDDING
        if (fqn := view.param(ops.weight_args(node)[1])) is not None
    }


_ONE_CHANNEL = (
    "one channel: policy.keep_minimum always keeps a group's first channel, so as a group it "
    "would spend budget and prune nothing"
)


def _dense_components(
    walk: Propagation, prune_streams: bool, computing: set[str]
) -> dict[str, str]:
    """Spaces whose component must stay dense, with the reason. One-channel components go
    first, on their own: a part of a producer left dense is read as dense features, so what
    the walk blocked because it met one of them as a group (a gate of one channel scattered
    where it multiplied a context: FocalNet) is walked again."""
    dense: dict[str, str] = {}
    one_channel = {
        space: _ONE_CHANNEL
        for component in _components(walk)
        if walk.spaces[component[0]].size == 1
        and not any(walk.blocked.get(space) for space in component)
        for space in component
    }
    if one_channel:
        return one_channel
    for component in _components(walk):
        reasons = [r for space in component for r in walk.blocked.get(space, [])]
        members = [m.fqn for space in component for m in walk.spaces[space].members]
        if not reasons and not computing.intersection(members):
            reasons = [
                "no linear or convolution reads its channels (such as a table read as an "
                "attention bias): pruning it would spend the budget and save no compute"
            ]
        if len(component) > 1:
            producers = ", ".join(component)
            reasons = [f"{r} (coupled with {producers})" for r in reasons]
        if not reasons and _is_stream(walk, component) and not prune_streams:
            reasons = [
                f"writes into a residual stream ({', '.join(component)}), kept dense by "
                "default; SparseConfig(prune_streams=True) prunes it as one group"
            ]
        if reasons:
            dense.update(dict.fromkeys(component, reasons[0]))
    return dense


def _groups(gm: fx.GraphModule, walk: Propagation) -> tuple[list[Group], dict[str, str]]:
    groups, names = [], {}
    components = _components(walk)
    bases = [walk.spaces[c[0]].weight.removesuffix(".weight") for c in components]
    for i, component in enumerate(components):
        spaces = [walk.spaces[s] for s in component]
        name = bases[i]
        if bases.count(name) > 1:  # sub-spaces of one weight in separate groups (a slice)
            name += f"#{bases[:i].count(name)}"
        slices = [m for space in spaces for m in space.members]
        members = list(dict.fromkeys((m.fqn, m.dim) for m in slices))
        group = Group(
            name,
            spaces[0].size,
            members,
            producers=[s.name for s in spaces],
            mask_points=[s.mask_point or s.name for s in spaces],
            stream=_is_stream(walk, component),
            slices=slices,
        )
        groups.append(group)
        names.update(dict.fromkeys(component, name))
    return groups, names


def _annotate(gm: fx.GraphModule, walk: Propagation, names: dict[str, str]) -> None:
    """Write the walk's per-node decisions into node.meta, spaces renamed to groups."""
    for node in gm.graph.nodes:
        node.meta.pop(META, None)
    for node, meta in walk.meta.items():
        renamed = {}
        for key, value in meta.items():
            if isinstance(value, Layout):
                value = value.renamed(names)  # type: ignore[arg-type]
            elif key == "split" and value is not None:
                value = [_renamed(part, names) for part in value]
            elif key == "slice":
                before, kept = value
                value = (before and _renamed(before, names), _renamed(kept, names))
            elif key == "group":
                value = names[value]
            elif key == "mask_point":
                value = list(dict.fromkeys(names[space] for space in value))
            renamed[key] = value
        node.meta[META] = renamed


def _renamed(layout: Layout, names: dict[str, str]) -> Layout:
    """`layout` renamed to groups, where one of dense features only stays a layout: a split
    or slice still needs its size along the dim (rewrite_splits)."""
    return layout.renamed(names) or Layout(layout.dim, (Piece(None, layout.full),))  # type: ignore[arg-type]
