"""Export passes: a compact eval graph with frozen masks becomes a standalone inference graph
whose parameters are physically sliced to the kept channels; a Sequential of standard layers
can instead be rebuilt with smaller layers.

With the masks fixed, the index inputs are constants, so every gather of a parameter, bias
or running statistic depends only on constants: folding those subgraphs leaves the compact
weights themselves as the graph's state, and nothing that selects channels at run time except
the scatters to full width that the analysis kept (plain ``index_copy`` with a constant index
after decomposition).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn
from torch.export.graph_signature import InputKind

from sparsefx.analysis.ops import eliminate_dead_code

__all__ = ["fold_constants", "inline_state", "rebuild_sequential", "unsupported_layers"]


def inline_state(
    gm: fx.GraphModule,
    inputs: list[tuple[InputKind, str]],
    state: dict[str, Tensor],
    indices: dict[str, Tensor],
) -> fx.GraphModule:
    """Replace the placeholders of parameters, buffers and constants (`state`, by FQN) and
    the trailing index inputs (`indices`, by group) by attributes of the module, parameters
    staying parameters; user inputs stay inputs."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    names = [(kind, target) for kind, target in inputs]
    names += [(None, f"kept {group}") for group in indices]
    for node, (kind, target) in zip(placeholders, names, strict=True):
        if kind == InputKind.USER_INPUT:
            continue
        value = state[target] if kind is not None else indices[target.removeprefix("kept ")]
        name = _attribute_name(gm, target)
        if kind == InputKind.PARAMETER:
            gm.register_parameter(name, _inference_parameter(value))
        else:
            gm.register_buffer(name, value.detach())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        constant.meta = dict(node.meta)
        node.replace_all_uses_with(constant)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def _inference_parameter(value: Tensor) -> torch.nn.Parameter:
    """A parameter of the inference program: it does not require grad. Where it did, a
    per-head attention bias derived from one required grad at run time, CPU attention
    picked another kernel than the one the trace saw, and a view the trace had emitted on
    its output's strides failed (Swin)."""
    return torch.nn.Parameter(value.detach(), requires_grad=False)


def fold_constants(gm: fx.GraphModule) -> fx.GraphModule:
    """Evaluate every call whose inputs are all constants (get_attr nodes or folded values)
    and make each folded tensor a module attribute, named after the state it comes from: a
    parameter when it derives from a parameter (a kept slice of a weight), else a buffer.
    Non-tensor results (sizes) become literals; attributes nothing reads any more (the
    full-size state the slices replace) are dropped."""
    graph = gm.graph
    values: dict[fx.Node, object] = {}
    from_parameter: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            values[node] = getattr(gm, node.target)
            if isinstance(values[node], torch.nn.Parameter):
                from_parameter.add(node)
        elif node.op == "call_function" and _foldable(node, values):
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
            values[node] = node.target(*args, **kwargs)
            if any(n in from_parameter for n in node.all_input_nodes):
                from_parameter.add(node)
    for node in list(graph.nodes):
        if node not in values or node.op == "get_attr":
            continue
        if not any(user not in values for user in node.users):
            continue  # only feeds other folded nodes
        value = values[node]
        if isinstance(value, Tensor):
            source = next(n for n in _constant_sources(node, values))
            name = _attribute_name(gm, f"{source.target}_kept")
            if node in from_parameter:
                gm.register_parameter(name, _inference_parameter(value.clone()))
            else:
                gm.register_buffer(name, value.detach().clone())
            with graph.inserting_before(node):
                constant = graph.get_attr(name)
            constant.meta = dict(node.meta)
            node.replace_all_uses_with(constant)
        else:
            node.replace_all_uses_with(value)  # type: ignore[arg-type]
    eliminate_dead_code(graph)
    for name, _ in list(gm.named_buffers(recurse=False)) + list(gm.named_parameters(recurse=False)):
        if not graph.find_nodes(op="get_attr", target=name):
            delattr(gm, name)  # the full-size state the folded slices replaced
    graph.lint()
    gm.recompile()
    return gm


def _constant_sources(node: fx.Node, values: dict[fx.Node, object]):
    """The get_attr nodes a folded node derives from."""
    stack, seen, found = [node], set(), []
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr":
            found.append(current)
        stack.extend(n for n in current.all_input_nodes if n in values)
    # name a slice after its parameter, else its buffer, before the kept-index constants
    found.sort(
        key=lambda n: (not isinstance(values[n], torch.nn.Parameter), n.target.startswith("kept_"))
    )
    return found


def _attribute_name(gm: fx.GraphModule, name: str) -> str:
    """A free attribute name derived from an FQN or description."""
    base = "".join(c if c.isalnum() else "_" for c in name).strip("_") or "state"
    candidate, i = base, 1
    while hasattr(gm, candidate):
        candidate, i = f"{base}_{i}", i + 1
    return candidate


def _foldable(node: fx.Node, values: dict[fx.Node, object]) -> bool:
    """Inputs all constant, at least one of them (a factory call stays in the graph), and
    not an op with side effects or randomness."""
    inputs = node.all_input_nodes
    if not inputs or any(n not in values for n in inputs):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return (
            not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
        )
    return True


_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.Hardswish,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
"""Standard layers that act on each channel alone: they keep the channels they receive."""
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm,
)  # fmt: skip
"""Norms with per-channel parameters (a GroupNorm is pruned in whole norm groups)."""


def unsupported_layers(model: nn.Module) -> list[str]:
    """Layers `rebuild_sequential` cannot slice: anything but Sequential containers of
    Linear, Conv (plain or depthwise), BatchNorm, InstanceNorm, GroupNorm, Flatten and
    channel-wise layers."""
    bad = []
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Sequential, nn.Linear, nn.Flatten, *_NORMS, *_PASS_THROUGH)):
            continue
        if isinstance(layer, _CONVS) and layer.groups in (1, layer.in_channels):
            continue
        bad.append(f"{name or 'the model'} ({type(layer).__name__})")
    return bad


def rebuild_sequential(model: nn.Module, kept: dict[tuple[str, int], Tensor]) -> nn.Module:
    """A copy of a Sequential model of standard layers with smaller layers: each weight
    keeps the rows and columns of `kept` ((parameter name, dim) -> bool mask, from the
    groups' `expand`), a norm keeps the channels its input has, and each layer's sizes
    are updated. The chain order of a Sequential is the data flow, so a layer's input
    channels are the previous producer's kept outputs (after Flatten, the Linear's own
    column mask, which maps each channel to its block of features)."""
    model = copy.deepcopy(model)
    channels: Tensor | None = None  # kept channels of the tensor flowing into the next layer
    for name, layer in model.named_modules():
        weight = f"{name}.weight"
        if isinstance(layer, (nn.Linear, *_CONVS)):
            rows = kept.get((weight, 0))
            depthwise = isinstance(layer, _CONVS) and layer.groups > 1
            if depthwise:
                rows = channels if rows is None else rows
                cols = None
            else:
                cols = kept.get((weight, 1), channels)
            w = layer.weight.detach()
            w = w if rows is None else w[rows]
            w = w if cols is None else w[:, cols]
            layer.weight = nn.Parameter(w.clone())
            if layer.bias is not None and rows is not None:
                layer.bias = nn.Parameter(layer.bias.detach()[rows].clone())
            out_size = w.shape[0]
            if isinstance(layer, nn.Linear):
                layer.in_features, layer.out_features = w.shape[1], out_size
            else:
                in_size = out_size if depthwise else w.shape[1]
                layer.in_channels, layer.out_channels = in_size, out_size
                layer.groups = out_size if depthwise else 1
            channels = rows
        elif isinstance(layer, _NORMS):
            mask = kept.get((weight, 0), channels)
            if mask is not None:
                for attr in ("weight", "bias", "running_mean", "running_var"):
                    value = getattr(layer, attr, None)
                    if isinstance(value, nn.Parameter):
                        setattr(layer, attr, nn.Parameter(value.detach()[mask].clone()))
                    elif value is not None:
                        setattr(layer, attr, value[mask].clone())
                if isinstance(layer, nn.GroupNorm):
                    per_group = layer.num_channels // layer.num_groups
                    layer.num_channels = int(mask.sum())
                    layer.num_groups = layer.num_channels // per_group
                else:
                    layer.num_features = int(mask.sum())
        elif isinstance(layer, nn.Flatten):
            channels = None
    return model
