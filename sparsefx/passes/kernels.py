"""Kernel selection: on CUDA the compact graph's weight gathers become Triton-backed ops;
eager programs call the compact ops' bodies directly."""

from __future__ import annotations

import torch
from torch import fx

from sparsefx.analysis import ops
from sparsefx.kernels.compact import (
    ATEN_CONVOLUTIONS,
    DIRECT_CALLS,
    convolution_direct,
    gathered_bucketed_convolution_direct,
)
from sparsefx.kernels.norms import group_norm_direct
from sparsefx.kernels.pooling import max_pool2d_direct

__all__ = ["call_ops_directly", "use_triton_kernels"]

aten = torch.ops.aten
bucketed = torch.ops.sparsefx.bucketed_convolution.default
gather = torch.ops.sparsefx.gather_weight.default
select = aten.index_select.default


def use_triton_kernels(gm: fx.GraphModule, *, sparse_gradients: bool = False) -> fx.GraphModule:
    """A linear (or linear-style addmm) on a gathered weight becomes one
    ``sparsefx::compact_linear``, which reads the weight by index and takes the full bias,
    with the ReLU that is its only user fused in; every other gather becomes
    ``sparsefx::gather_block`` (one kernel each way around cuDNN's convolution)."""
    import sparsefx.kernels.triton_ops  # noqa: F401  (registers the ops; imports triton)

    compact_linear = torch.ops.sparsefx.compact_linear.default
    graph = gm.graph
    for node in list(graph.nodes):
        linear = _compact_linear_args(node, sparse_gradients)
        if linear is None:
            continue
        x, weight, bias, out_idx, in_idx = linear
        users = list(node.users)
        relu = len(users) == 1 and users[0].target is aten.relu.default
        last = users[0] if relu else node
        with graph.inserting_before(node):
            if node.target is not aten.linear.default:  # addmm's weight is [in, out]
                weight = graph.call_function(aten.t.default, (weight,))
            fused = graph.call_function(
                compact_linear,
                (x, weight, bias, out_idx, in_idx, relu, sparse_gradients),
            )
        fused.meta = dict(node.meta)
        last.replace_all_uses_with(fused)
        for dead in (last, node) if relu else (node,):
            graph.erase_node(dead)
    for node in graph.find_nodes(op="call_function", target=gather):
        node.target = torch.ops.sparsefx.gather_block.default
    ops.eliminate_dead_code(graph)
    gm.recompile()
    return gm


def _compact_linear_args(node: fx.Node, sparse_gradients: bool) -> tuple | None:
    """(x, full weight [out, in] or [in, out], full bias, out_idx, in_idx) of a linear or
    plain addmm whose weight is gathered (and only used there), else None."""
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default:
        x, weight, bias = ops.weight_args(node)
        out_pos, in_pos = 1, 2
    elif node.target is aten.addmm.default and ops.is_plain_addmm(node) and not sparse_gradients:
        x, weight, bias = ops.weight_args(node)
        out_pos, in_pos = 2, 1  # gather_weight(W [in, out], in_idx, out_idx)
    else:
        return None
    if not (isinstance(weight, fx.Node) and weight.target is gather and len(weight.users) == 1):
        return None
    out_idx, in_idx = weight.args[out_pos], weight.args[in_pos]
    if isinstance(bias, fx.Node) and bias.target is select and bias.args[2] is out_idx:
        bias = bias.args[0]  # the op reads kept bias entries by index itself
    elif bias is not None and out_idx is not None:
        return None
    return x, weight.args[0], bias, out_idx, in_idx


def call_ops_directly(gm: fx.GraphModule, *, record_gradients: bool = True) -> fx.GraphModule:
    """Calls of sparsefx's compact ops become direct Python calls of the same computation
    (kernels.compact.DIRECT_CALLS): an autograd.Function where the graph may record
    gradients, else the plain body; where it may record gradients, a weight gathered for one
    bucketed convolution alone is gathered inside it (one autograd node, the weight padded
    once). ``aten.conv{1,2,3}d`` becomes `convolution_direct` (GEMMs for one output pixel),
    and ``aten.max_pool2d`` `kernels.pooling`'s, which pools a CPU tensor channels-last
    (ATen's NCHW CPU kernel is scalar); ``sparsefx::group_norm`` the native group norm
    (`kernels.norms`). For graphs the eager runtime runs and nothing traces."""
    graph = gm.graph
    for node in graph.find_nodes(op="call_function", target=bucketed):
        weight = node.args[1]
        if record_gradients and _gathered_once(weight):
            x, _, *conv = _positional(node)
            node.args = (x, *_positional(weight), *conv)
            node.target = gathered_bucketed_convolution_direct
            graph.erase_node(weight)
    for op, (function, body) in DIRECT_CALLS.items():
        for node in graph.find_nodes(op="call_function", target=op):
            node.args, node.kwargs = _positional(node), {}  # Function.apply takes no kwargs
            node.target = function if record_gradients else body
    for conv in ATEN_CONVOLUTIONS.values():
        for node in graph.find_nodes(op="call_function", target=conv):
            node.target = convolution_direct
    for node in graph.find_nodes(op="call_function", target=aten.max_pool2d.default):
        node.target = max_pool2d_direct
    for node in graph.find_nodes(op="call_function", target=torch.ops.sparsefx.group_norm.default):
        node.target = group_norm_direct
    gm.recompile()
    return gm


def _gathered_once(weight: object) -> bool:
    return isinstance(weight, fx.Node) and weight.target is gather and len(weight.users) == 1


def _positional(node: fx.Node) -> tuple:
    """The op call's arguments, every one positional (defaults filled in)."""
    given = dict(zip((a.name for a in node.target._schema.arguments), node.args, strict=False))
    given.update(node.kwargs)
    return tuple(given.get(a.name, a.default_value) for a in node.target._schema.arguments)
