"""The rewrite pipeline: analysed dense graph -> compact training/eval graph + score graph."""

from __future__ import annotations

import torch
from torch import fx
from torch.export.graph_signature import InputKind

from sparsefx.analysis.groups import Group
from sparsefx.analysis.ops import eliminate_dead_code
from sparsefx.passes.compact import (
    add_index_inputs,
    bucket_convolutions,
    extract_score_graph,
    insert_scatters,
    opaque_compact_convolutions,
    rewrite_attention_scales,
    rewrite_channel_norms,
    rewrite_gathered_args,
    rewrite_splits,
    rewrite_views,
    rewrite_weight_ops,
)
from sparsefx.passes.dropout import reuse_dropout_noise, sample_dropout_noise, shared_noise_count
from sparsefx.passes.kernels import call_ops_directly, use_triton_kernels

__all__ = [
    "call_ops_directly",
    "copy_graph_module",
    "keep_outputs",
    "opaque_compact_convolutions",
    "rewrite_compact",
    "rounds_convolutions",
    "score_graph",
    "shared_noise_count",
]


def rewrite_compact(
    gm: fx.GraphModule,
    groups: list[Group],
    *,
    sparse_gradients: bool = False,
    triton_kernels: bool = False,
    conv_channel_multiple: int = 1,
    opaque_convolutions: bool = False,
) -> fx.GraphModule:
    """Run the compact-rewrite passes in order. The graph gains one index input per group,
    and a training graph one output per full-width dropout (its noise, for the score graph).
    `conv_channel_multiple` > 1 rounds compact convolutions' channel counts up to it;
    `opaque_convolutions` (for Inductor) makes the other compact ones sparsefx::conv;
    `triton_kernels` swaps the gathers for the Triton-backed ops (passes/kernels.py), last,
    since the convolution passes find their convolutions by the gather_weight they read."""
    gm = add_index_inputs(gm, groups)
    for rewrite in (
        insert_scatters, rewrite_views, rewrite_splits, rewrite_channel_norms,
        rewrite_gathered_args, rewrite_attention_scales,
    ):  # fmt: skip
        gm = rewrite(gm)
    gm = rewrite_weight_ops(gm, sparse_gradients=sparse_gradients)
    if conv_channel_multiple > 1:
        gm = bucket_convolutions(gm, conv_channel_multiple)
    if opaque_convolutions:  # those left: grouped, or not on CPU
        gm = opaque_compact_convolutions(gm)
    if triton_kernels:
        gm = use_triton_kernels(gm, sparse_gradients=sparse_gradients)
    return _finalize(sample_dropout_noise(gm))


def rounds_convolutions(gm: fx.GraphModule) -> bool:
    """Whether `gm` runs a convolution on rounded channel counts (`bucket_convolutions`):
    only then does an exact-count twin of it differ from it."""
    bucketed = torch.ops.sparsefx.bucketed_convolution.default
    return any(node.target is bucketed for node in gm.graph.nodes)


def score_graph(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> fx.GraphModule:
    """A copy of a compact training graph for the K-1 pure forward passes. It takes the
    training forward's shared dropout noises as trailing inputs (`shared_noise_count`)."""
    return _finalize(reuse_dropout_noise(extract_score_graph(copy_graph_module(gm), inputs)))


def keep_outputs(gm: fx.GraphModule, positions: list[int]) -> fx.GraphModule:
    """Only the outputs at `positions`, and only the nodes they need (in place): a score
    graph that returns the loss alone keeps no other activation alive."""
    (output,) = gm.graph.find_nodes(op="output")
    values = output.args[0]
    output.args = (tuple(values[i] for i in positions),)
    return _finalize(gm)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph (node metadata copied shallowly) and the same node names:
    `graph_copy` renames nodes named like Python builtins (nn.Sequential's ``input``), and
    the diff tool matches nodes across graphs by name (codegen renames them itself)."""
    graph, copies = fx.Graph(), {}
    graph.output(graph.graph_copy(gm.graph, copies))
    for node, copy in copies.items():
        copy.name = node.name
    return fx.GraphModule(gm, graph)


def _finalize(gm: fx.GraphModule) -> fx.GraphModule:
    eliminate_dead_code(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm
