"""Rewrite passes: the analysed dense graph becomes a compact one.

Each pass is a function ``(gm, ...) -> gm`` that edits the graph in place and keeps the
node metadata of untouched nodes. They read the annotations written by
:func:`sparsefx.analysis.analyze` (``node.meta["sparsefx"]``, see README.md beside this file).
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from sparsefx.analysis import ops
from sparsefx.analysis.groups import META, Group
from sparsefx.analysis.layout import Layout
from sparsefx.kernels import layout_index

__all__ = [
    "add_index_inputs",
    "bucket_convolutions",
    "extract_score_graph",
    "insert_scatters",
    "opaque_compact_convolutions",
    "rewrite_attention_scales",
    "rewrite_channel_norms",
    "rewrite_gathered_args",
    "rewrite_splits",
    "rewrite_views",
    "rewrite_weight_ops",
]

aten = torch.ops.aten
gather = torch.ops.sparsefx.gather_weight.default
select = aten.index_select.default


class _Indices:
    """Index nodes of each group, and the kept-feature indices of each layout, created once
    per graph (an earlier pass's are reused)."""

    def __init__(self, gm: fx.GraphModule):
        self.graph = gm.graph
        self.inputs: dict[str, fx.Node] = {
            n.meta[META]["index_of"]: n
            for n in gm.graph.nodes
            if n.op == "placeholder" and "index_of" in n.meta.get(META, {})
        }
        self._layouts: dict[tuple, fx.Node] = {
            _layout_key(*n.args): n  # type: ignore[arg-type]
            for n in gm.graph.find_nodes(op="call_function", target=layout_index)
        }

    def of(self, layout: Layout | None) -> fx.Node | None:
        """Kept feature indices along a compact layout's dim (None: the tensor is dense)."""
        if layout is None:
            return None
        (first, *rest) = layout.pieces
        if not rest and first.block == 1:
            return self.inputs[first.group]  # type: ignore[index]
        groups = [None if p.group is None else self.inputs[p.group] for p in layout.pieces]
        shapes = [(p.size, p.block) for p in layout.pieces]
        key = _layout_key(groups, shapes)
        if key not in self._layouts:
            last_input = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
            with self.graph.inserting_after(last_input):
                self._layouts[key] = self.graph.call_function(layout_index, (groups, shapes))
        return self._layouts[key]


def _layout_key(groups: list[fx.Node | None], shapes: list[tuple[int, int]]) -> tuple:
    return tuple(groups), tuple(tuple(shape) for shape in shapes)


def add_index_inputs(gm: fx.GraphModule, groups: list[Group]) -> fx.GraphModule:
    """Append one placeholder per group: its sorted kept channel indices (int64). A graph
    may have no inputs (one between graph breaks that builds a tensor from Python ints):
    there they come first."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    last = placeholders[-1] if placeholders else None
    for group in groups:
        # fx: inserting_before(None) inserts at the graph's start, inserting_after(None) at its end
        where = gm.graph.inserting_after(last) if last else gm.graph.inserting_before(None)
        with where:
            last = gm.graph.placeholder(f"idx_{_identifier(group.name)}")
        last.meta[META] = {"index_of": group.name}
    return gm


def rewrite_weight_ops(gm: fx.GraphModule, *, sparse_gradients: bool = False) -> fx.GraphModule:
    """linear/conv with a compact input or output read their weight through
    sparsefx::gather_weight (and their bias through index_select): the op itself is
    unchanged and computes only kept channels, with aten's kernels and autograd. A grouped
    (or depthwise) convolution on a compact tensor gathers the rows of its kept conv groups
    and runs with one group per kept conv group. `sparse_gradients` makes pruned producers' weight gradients row-sparse."""
    indices = _Indices(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        meta = node.meta.get(META, {})
        if node.op != "call_function" or not ops.is_weight_op(node.target):
            continue
        grouped = meta.get("grouped")
        out_layout = meta.get("layout") if meta.get("role") == "producer" or grouped else None
        if out_layout is None and "in_layout" not in meta:
            continue
        in_idx, out_idx = indices.of(meta.get("in_layout")), indices.of(out_layout)
        _, weight, bias = ops.weight_args(node)
        where = ops.weight_operands(node)
        by_dim = {where.out_dim: out_idx, where.in_dim: in_idx}
        with graph.inserting_before(node):
            gathered = graph.call_function(gather, (weight, by_dim[0], by_dim[1], sparse_gradients))
            node.update_arg(where.weight, gathered)
            if bias is not None and out_idx is not None:
                kept_bias = graph.call_function(select, (bias, 0, out_idx))
                if len(node.args) > where.bias:
                    node.update_arg(where.bias, kept_bias)
                else:
                    node.update_kwarg("bias", kept_bias)
            if grouped:
                kept = graph.call_function(aten.sym_size.int, (out_idx, 0))
                if grouped > 1:  # output channels per conv group
                    kept = graph.call_function(operator.floordiv, (kept, grouped))
                _set_arg(node, 6, "groups", kept)
    return gm


def rewrite_splits(gm: fx.GraphModule) -> fx.GraphModule:
    """A split or slice of the compact channel dim takes compact sizes and bounds, which
    change with the masks: sums of kept counts (sym_size of the index inputs) times blocks."""
    indices = _Indices(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        meta = node.meta.get(META, {})
        if meta.get("split"):
            parts = meta["split"]
            with graph.inserting_before(node):
                sizes = [_compact_size(graph, indices, part) for part in parts]
            _replace(node, aten.split_with_sizes.default, (node.args[0], sizes, parts[0].dim))
        elif "slice" in meta:
            before, kept = meta["slice"]
            with graph.inserting_before(node):
                start = 0 if before is None else _compact_size(graph, indices, before)
                size = _compact_size(graph, indices, kept)
                end = graph.call_function(operator.add, (start, size)) if start else size
            _replace(node, aten.slice.Tensor, (node.args[0], kept.dim, start, end))
    return gm


def _compact_size(graph: fx.Graph, indices: _Indices, layout: Layout) -> object:
    """The size of a layout's dim in compact form, as an int or a graph node."""
    total: object = None
    for piece in layout.pieces:
        if piece.group is None:
            size: object = piece.size
        else:
            kept = graph.call_function(aten.sym_size.int, (indices.inputs[piece.group], 0))
            size = graph.call_function(operator.mul, (kept, piece.block))
        total = size if total is None else graph.call_function(operator.add, (total, size))
    return total


_SPATIAL_DIMS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


def opaque_compact_convolutions(gm: fx.GraphModule) -> fx.GraphModule:
    """Convolutions on gathered weights become sparsefx::conv, for Inductor only: its conv
    lowering fixes channel counts at compile time, and compact channel counts change with
    every mask (`rewrite_compact(opaque_convolutions=True)`, for the torch.compile backend)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not ops.is_conv(node.target):
            continue
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.target is gather):
            continue
        args = (node.args[0], weight, *_conv_args(node), _arg(node, 6, "groups", 1))
        _replace(node, torch.ops.sparsefx.conv.default, args)
    return gm


def bucket_convolutions(gm: fx.GraphModule, multiple: int) -> fx.GraphModule:
    """Convolutions (groups=1) on gathered weights run on compact channel counts rounded up
    to `multiple` (kernels.compact.bucketed_convolution): for eager CPU programs, where
    oneDNN builds a primitive per new shape. Grouped convolutions keep their exact counts
    (their group count is the kept count), and so do unbatched ones (``conv2d`` of one
    (C, H, W) example: the rounding pads and cuts a batched tensor's dim 1)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not ops.is_conv(node.target):
            continue
        weight = node.args[1]
        groups = _arg(node, 6, "groups", 1)
        if not (isinstance(weight, fx.Node) and weight.target is gather) or groups != 1:
            continue
        full_weight = weight.args[0].meta["val"]  # type: ignore[union-attr]
        if node.meta["val"].dim() < full_weight.dim():  # unbatched
            continue
        full_out, full_in = (int(d) for d in full_weight.shape[:2])
        out_size = full_out if weight.args[1] is not None else None
        in_size = full_in if weight.args[2] is not None else None
        args = (node.args[0], weight, *_conv_args(node), multiple, in_size, out_size)
        _replace(node, torch.ops.sparsefx.bucketed_convolution.default, args)
    return gm


def rewrite_channel_norms(gm: fx.GraphModule) -> fx.GraphModule:
    """A per-channel norm on a compact tensor runs on gathered parameters: BatchNorm and
    InstanceNorm (`ops.CHANNEL_NORMS`) on gathered running statistics too, whose updated
    values are copied back for kept channels only in training; a group norm on its kept
    norm groups (`_group_norm`)."""
    indices = _Indices(gm)
    graph = gm.graph
    for node in list(graph.nodes):
        layout = node.meta.get(META, {}).get("layout")
        if layout is None:
            continue
        if node.target is aten.group_norm.default:
            _group_norm(gm, node, indices.of(layout))
            continue
        if node.target not in ops.CHANNEL_NORMS:
            continue
        idx = indices.of(layout)
        state = node.args[1:5]  # weight, bias, running_mean, running_var
        with graph.inserting_before(node):
            kept = _kept(graph, state, idx)
        node.args = (node.args[0], *kept, *node.args[5:])
        running, kept_running = state[2:], kept[2:]
        if node.args[5] and running[0] is not None:  # training with running statistics
            with graph.inserting_after(node):
                for full, compact in zip(running, kept_running, strict=True):
                    graph.call_function(aten.index_copy_.default, (full, 0, idx, compact))
    return gm


def _group_norm(gm: fx.GraphModule, node: fx.Node, idx: fx.Node | None) -> None:
    """A group norm on its kept norm groups: ``sparsefx::group_norm``, which takes the
    channels per group, fixed, where ``aten.group_norm`` takes the number of groups, which
    changes with the masks (`kernels.norms`)."""
    norm = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
    per_group = int(node.meta["val"].shape[1]) // norm["num_groups"]
    with gm.graph.inserting_before(node):
        weight, bias = _kept(gm.graph, (norm["weight"], norm["bias"]), idx)
    node.target = torch.ops.sparsefx.group_norm.default
    node.args = (norm["input"], per_group, weight, bias, norm["eps"], norm["cudnn_enabled"])
    node.kwargs = {}


def _kept(graph: fx.Graph, tensors: Sequence[object], idx: fx.Node | None) -> list[object]:
    """Each per-channel tensor read at the kept channels (None stays None)."""
    return [None if t is None else graph.call_function(select, (t, 0, idx)) for t in tensors]


def rewrite_gathered_args(gm: fx.GraphModule) -> fx.GraphModule:
    """A full-width argument of a compact op is read at its kept channels: a per-channel
    parameter (a layer scale, a bias added after a bias-free layer), attention's dense
    per-head bias (T5's shared position bias, as SDPA's mask or added to explicit scores),
    multi-query attention's k and v where expanded to every query head (GPTBigCode), a
    dense q and k where attention is pruned by v's heads (OLMo 2), or a batched matmul's
    dense operand (its explicit form)."""
    indices = _Indices(gm)
    for node in list(gm.graph.nodes):
        meta = node.meta.get(META, {})
        # across a contraction, at the summed channels; elsewhere at the op's own
        layout = meta.get("contracted") or meta.get("layout")
        for position, dim in meta.get("gathered_args", ()):
            arg = node.args[position] if isinstance(position, int) else node.kwargs[position]
            with gm.graph.inserting_before(node):
                kept = gm.graph.call_function(select, (arg, dim, indices.of(layout)))
            if isinstance(position, int):
                node.update_arg(position, kept)
            else:
                node.update_kwarg(position, kept)
    return gm


def rewrite_attention_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """Attention over compact features (one head's q and k pruned per feature) would scale
    its scores by 1/sqrt of the kept width: it is given the dense one (meta ``scale``)."""
    for node in gm.graph.nodes:
        scale = node.meta.get(META, {}).get("scale")
        if scale is not None:
            node.update_kwarg("scale", scale)
    return gm


def rewrite_views(gm: fx.GraphModule) -> fx.GraphModule:
    """A view/reshape of a compact tensor was captured with dense sizes: it becomes the
    flatten or unflatten it is, which take their sizes from the tensor; an expand keeps the
    channel dim's own size (-1); ``squeeze()`` names the dims it removed in the dense graph
    (a kept count of one must stay). A dynamic size of
    an unflatten is the captured graph's own size node, found here by name (this graph is
    a copy of the analysed one)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for node in list(gm.graph.nodes):
        meta = node.meta.get(META, {})
        if "layout" not in meta or "view" not in meta:
            continue
        kind, dim, extra = meta["view"]
        if kind == "expand":
            sizes = list(node.args[1])
            sizes[dim] = -1
            node.args = (node.args[0], sizes, *node.args[2:])
        elif kind == "squeeze":
            _replace(node, aten.squeeze.dims, (node.args[0], extra))
        elif kind == "flatten":
            _replace(node, aten.flatten.using_ints, (node.args[0], dim, extra))
        else:
            sizes = [by_name[s.name] if isinstance(s, fx.Node) else s for s in extra]
            _replace(node, aten.unflatten.int, (node.args[0], dim, sizes))
    return gm


def insert_scatters(gm: fx.GraphModule) -> fx.GraphModule:
    """Scatter a compact tensor to full width (zeros for dropped channels) for users that
    cannot read it compactly; one scatter per tensor, shared by those users."""
    indices = _Indices(gm)
    for node in list(gm.graph.nodes):
        meta = node.meta.get(META, {})
        users = meta.get("full_width_users")
        if not users:
            continue
        layout: Layout = meta["layout"]
        with gm.graph.inserting_after(node):
            full = gm.graph.call_function(
                torch.ops.sparsefx.scatter_channels.default,
                (node, indices.of(layout), layout.dim, layout.full),
            )
        full.meta[META] = {"role": "scatter", "groups": layout.groups}
        for user in list(node.users):
            if user.name in users:
                user.replace_input_with(node, full)
    return gm


def extract_score_graph(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> fx.GraphModule:
    """The pure-forward graph for the structure gradient (DESIGN §3 step 3): same compute
    with batch statistics, but no running-statistics update (batch and instance norms, which
    update theirs in place without declaring it) and no buffer mutation."""
    buffers = {
        n
        for n, (kind, _) in zip(_placeholders(gm), inputs, strict=False)
        if kind == InputKind.BUFFER
    }
    _drop_statistics_updates(gm, buffers)
    return gm


_REGIONS = frozenset(
    {torch.ops.higher_order.wrap_with_set_grad_enabled, torch.ops.higher_order.wrap_with_autocast}
)
"""Higher-order ops that export makes of ``no_grad`` and autocast regions: their body is
their one module argument, and its operands follow it."""


def _drop_statistics_updates(gm: fx.GraphModule, buffers: set[fx.Node]) -> None:
    """`extract_score_graph`'s edit, in place, into the regions' bodies too: a training
    BatchNorm under ``no_grad`` updated its statistics in every score forward. A body is
    copied before its edit, since the training graph runs the same module."""
    for node in list(gm.graph.nodes):
        if ops.writes_running_statistics(node):
            node.update_arg(3, None)
            node.update_arg(4, None)
        elif _mutates_buffer(node, buffers) and not node.users:
            gm.graph.erase_node(node)
        elif node.target in _REGIONS:
            position = next(
                i
                for i, arg in enumerate(node.args)
                if isinstance(arg, fx.Node) and arg.op == "get_attr"
            )
            target = str(node.args[position].target)  # type: ignore[union-attr]
            body = copy.deepcopy(getattr(gm, target))
            operands = node.args[position + 1 :]
            inner = {
                p for p, arg in zip(_placeholders(body), operands, strict=False) if arg in buffers
            }
            _drop_statistics_updates(body, inner)
            body.recompile()
            setattr(gm, target, body)


def _mutates_buffer(node: fx.Node, buffers: set[fx.Node]) -> bool:
    schema = getattr(node.target, "_schema", None)
    return bool(
        schema is not None
        and schema.is_mutable
        and any(
            arg.alias_info is not None and arg.alias_info.is_write and value in buffers
            for arg, value in zip(schema.arguments, node.args, strict=False)
        )
    )


# --------------------------------------------------------------------------------------------


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _arg(node: fx.Node, position: int, name: str, default: object) -> object:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(name, default)


def _conv_args(node: fx.Node) -> list[object]:
    """(bias, stride, padding, dilation) of a conv node, each list as long as its spatial dims
    (aten.convolution's form)."""
    spatial = _SPATIAL_DIMS[node.target]  # type: ignore[index]
    args = [_arg(node, 2, "bias", None)]
    for position, name, default in ((3, "stride", 1), (4, "padding", 0), (5, "dilation", 1)):
        value = _arg(node, position, name, default)
        value = list(value) if isinstance(value, list | tuple) else [value]
        args.append(value * spatial if len(value) == 1 else value)
    return args


def _set_arg(node: fx.Node, position: int, name: str, value: object) -> None:
    if len(node.args) > position:
        node.update_arg(position, value)
    else:
        node.update_kwarg(name, value)


def _replace(node: fx.Node, target: object, args: tuple) -> None:
    """Turn `node` into a call of `target` in place: name, users and metadata stay."""
    node.target = target
    node.args, node.kwargs = args, {}
    node.meta.pop("val", None)  # stale: the new op's output is compact


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
