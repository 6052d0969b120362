"""Dropout with common random numbers: the K forwards of one step share their dropout noise.

VR-PGE compares the losses of K masks on one batch. Dropout noise that differs between those
forwards adds variance to every loss difference and says nothing about the masks. Shared
noise (common random numbers) leaves each forward's noise distributed as before and
independent of the other forwards' masks, so the estimator stays unbiased, and the K-1
score forwards no longer draw it. Only full-width dropouts share: a compact tensor's shape
depends on its forward's mask, so compact dropouts draw their own noise in every forward.

Both kinds draw with `dropout_noise` (float uniforms against p), which on CPU costs half
of aten's ``bernoulli_``; attention that drops its weights on CPU runs in the math form CPU
uses for it anyway, with that noise.
"""

from __future__ import annotations

import torch
from torch import fx

from sparsefx.analysis.groups import META
from sparsefx.kernels import attention_with_dropout, dropout_noise

__all__ = ["reuse_dropout_noise", "sample_dropout_noise", "shared_noise_count"]

aten = torch.ops.aten


def sample_dropout_noise(gm: fx.GraphModule) -> fx.GraphModule:
    """Each training dropout becomes ``x * dropout_noise(x, p)`` (the node keeps its name);
    the noise of each full-width one is also returned, after the captured outputs, for the
    score graph to reuse. Attention with dropout on CPU becomes `attention_with_dropout`."""
    graph = gm.graph
    for node in graph.find_nodes(
        op="call_function", target=aten.scaled_dot_product_attention.default
    ):
        dropout_p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        query = node.args[0].meta.get("val")
        on_cpu = query is not None and query.device.type == "cpu"  # CUDA drops in-kernel
        if dropout_p > 0 and on_cpu and not node.kwargs.get("enable_gqa", False):
            node.target = attention_with_dropout
    shared = []
    for node in list(graph.find_nodes(op="call_function", target=aten.dropout.default)):
        x, p, train = node.args
        if not train or p == 0:
            continue
        with graph.inserting_before(node):
            noise = graph.call_function(dropout_noise, (x, p))
        full_width = x.meta.get(META, {}).get("layout") is None
        noise.meta[META] = {"role": "dropout_noise", "shared": full_width}
        if "val" in node.meta:
            noise.meta["val"] = node.meta["val"]
        node.target, node.args = aten.mul.Tensor, (x, noise)
        if full_width:
            shared.append(noise)
    if shared:
        (output,) = graph.find_nodes(op="output")
        output.args = ((*output.args[0], *shared),)
    return gm


def shared_noise_count(gm: fx.GraphModule) -> int:
    """How many trailing outputs of a training graph are dropout noises to reuse."""
    return len(_shared_noises(gm))


def reuse_dropout_noise(gm: fx.GraphModule) -> fx.GraphModule:
    """Score graph (a copy of a training graph): the shared noises are no longer drawn or
    returned; they become trailing inputs, after the index inputs, in output order."""
    noises = _shared_noises(gm)
    if not noises:
        return gm
    graph = gm.graph
    (output,) = graph.find_nodes(op="output")
    output.args = (tuple(output.args[0][: -len(noises)]),)
    last = list(graph.find_nodes(op="placeholder"))[-1]
    for noise in noises:
        with graph.inserting_after(last):
            last = graph.placeholder(f"{noise.name}_shared")
        last.meta[META] = {"role": "shared_noise"}
        if "val" in noise.meta:
            last.meta["val"] = noise.meta["val"]
        noise.replace_all_uses_with(last)
        graph.erase_node(noise)
    return gm


def _shared_noises(gm: fx.GraphModule) -> list[fx.Node]:
    return [
        n
        for n in gm.graph.find_nodes(op="call_function", target=dropout_noise)
        if n.meta[META]["shared"]
    ]
