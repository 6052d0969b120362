"""Capture: an nn.Module becomes one normalised graph.

The IR is the aten *training* IR that ``torch.export.export(strict=False)`` produces: one
flat FX graph of aten ops, not functionalised (BatchNorm updates its running stats in place),
with every parameter and buffer lifted to a placeholder. Lifting is what lets the runtime
pass the user's own parameter objects on every call (so their optimizer keeps working) and
lets the torch.compile backend, which also sees parameters as graph inputs, reuse the passes.
The batch dimension is captured as dynamic where the model allows it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import sysconfig
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import CodeType
from typing import Any

import torch
from torch import fx, nn
from torch._ops import OpOverload
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP, is_concrete_int
from torch.nn.modules.lazy import LazyModuleMixin
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from sparsefx.analysis.ops import IN_PLACE_DROPOUT, aliases_input, eliminate_dead_code
from sparsefx.autograd_functions import custom_functions, dynamo_functions
from sparsefx.einsums import einsum_matmuls
from sparsefx.reshapes import traced_call, unmerged_batch_matmuls, unmerged_reshapes

__all__ = [
    "CaptureError",
    "CapturedGraph",
    "capture",
    "capture_failure",
    "capture_graph",
    "distinct_inputs",
    "first_line",
    "where",
]


class CaptureError(RuntimeError):
    """The model could not be captured into sparsefx's graph IR."""


@dataclass(frozen=True)
class TensorSignature:
    """What a tensor input must have to run a captured graph: dtype, device type, rank and
    the range of each size. Kept instead of the example's fake tensor, which cannot be
    deep-copied, so that a transformed model can be (`copy.deepcopy`)."""

    dtype: torch.dtype
    device_type: str
    ranges: tuple[tuple[float, float], ...]
    """(min, max) of each dim: its size where static, else the range export traced it under
    (a branch on a sequence length bounds it; sizes 0 and 1 are outside it)."""

    @classmethod
    def of(cls, example: torch.Tensor, ranges: dict[Any, Any] | None = None) -> TensorSignature:
        """The signature of an export's example input; `ranges` is its range_constraints.
        A size export specialised is a SymInt of constant value: static."""
        bounds = []
        for size in example.shape:
            if is_concrete_int(size):
                bounds.append((int(size), int(size)))
                continue
            traced = (ranges or {}).get(size.node.expr)
            low, high = (traced.lower, traced.upper) if traced is not None else (2, None)
            bounds.append((_bound(low, 2), _bound(high, math.inf)))
        return cls(example.dtype, example.device.type, tuple(bounds))

    @property
    def dynamic_dims(self) -> list[int]:
        return [d for d, (low, high) in enumerate(self.ranges) if low != high]

    def matches(self, value: Any) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.dtype == self.dtype
            and value.device.type == self.device_type
            and value.dim() == len(self.ranges)
            and all(
                low <= v <= high for (low, high), v in zip(self.ranges, value.shape, strict=True)
            )
        )


def _bound(value: Any, unbounded: float) -> float:
    """An export range's end as a number (`unbounded` for torch's int_oo, or none)."""
    try:
        return int(value)
    except (TypeError, AttributeError, OverflowError):
        return unbounded


@dataclass
class CapturedGraph:
    """A captured model: the graph plus how to feed it and read its outputs."""

    gm: fx.GraphModule
    inputs: list[tuple[InputKind, str]]
    """One (kind, target) per placeholder, in call order; target is an FQN for state."""
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    training: bool
    constants: dict[str, torch.Tensor]

    user_values: list[Any]
    """Each user input's signature (tensors) or value (constants)."""
    scalars: tuple[float, ...] = ()
    """The Python floats of a torch.compile graph inlined as constants (`capture_graph`)."""
    size_guards: str = ""
    """Export's guards on input sizes that ranges cannot hold (a branch on ``T % 2 == 0`` or
    ``T != 7``, one input's batch equal to another's), as one Python expression over the
    forward's bound arguments ``L``; empty where there are none (`guards_hold`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> CapturedGraph:
        """A copy that shares the tree specs: they are immutable, and deep-copying one trips
        torch's `LeafSpec` deprecation warning."""
        memo[id(self.in_spec)], memo[id(self.out_spec)] = self.in_spec, self.out_spec
        twin = memo[id(self)] = object.__new__(type(self))
        for field in fields(self):
            setattr(twin, field.name, copy.deepcopy(getattr(self, field.name), memo))
        return twin

    def matches(self, flat_inputs: Sequence[Any], spec: pytree.TreeSpec) -> bool:
        """Whether inputs of this structure, dtype and static shape can run this graph (and
        its sizes' ranges; the other size guards are `guards_hold`'s)."""
        return spec == self.in_spec and all(
            _leaf_matches(expected, value)
            for expected, value in zip(self.user_values, flat_inputs, strict=True)
        )

    def guards_hold(self, arguments: Callable[[], dict[str, Any]]) -> bool:
        """Whether the size guards hold for the bound arguments `arguments` returns (called
        only where there are guards)."""
        return not self.size_guards or _size_guards_hold(self.size_guards, arguments())


def _leaf_matches(expected: Any, value: Any) -> bool:
    if isinstance(expected, TensorSignature):
        return expected.matches(value)
    return not isinstance(value, torch.Tensor) and expected == value


def capture(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, training: bool
) -> CapturedGraph:
    """Export `model` on example inputs, batch dimension dynamic, with each submodule in the
    train/eval mode it is in (a frozen BatchNorm or a disabled Dropout inside a training
    model stays so). `training` marks a training graph, one that samples masks. Runs outside
    the caller's dispatch modes: a FlopCounterMode around a model's first call in a new mode
    would otherwise count export's tracing (symbolic FLOPs) as the model's."""
    _check_initialized(model)
    _check_no_cumulative_batch_norm(model)
    args, kwargs = distinct_inputs(args, kwargs)
    with _disable_current_modes(), custom_functions() as inlined:
        ep, guards = _export(model, args, kwargs)
    if inlined:
        warnings.warn(_FUNCTIONS_TRACED.format(names=", ".join(sorted(inlined))), stacklevel=4)
    captured = replace(_captured(ep, training=training), size_guards=guards)
    captured.gm = _normalised(captured.gm, captured.inputs)
    return captured


def _normalised(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> fx.GraphModule:
    """The captured graph in the forms the analysis reads: without dead code, linears,
    embedding lookups, reshapes one dim at a time, and batched matmuls over unmerged dims."""
    gm = embedding_lookups(linear_matmuls(without_dead_code(gm), inputs), inputs)
    return unmerged_batch_matmuls(unmerged_reshapes(gm))


def without_dead_code(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` without the computations no output reads (`ops.has_side_effects` says which
    stay), before the analysis counts their channels."""
    if eliminate_dead_code(gm.graph):
        gm.recompile()
    return gm


_FUNCTIONS_TRACED = (
    "sparsefx.transform traces the custom torch.autograd.Function {names} through its "
    "forward: its backward is not the forward's gradient, and sparsefx cannot run the "
    "Function itself here (an argument that is an object other than a tensor or a plain "
    "constant, an output that is not a tensor, a forward that writes into its inputs or "
    "draws random numbers). Training differentiates the forward's ops and never calls the "
    "Function's backward, so the gradients differ from eager PyTorch's: pass the Function "
    "tensors and constants only, or write it as differentiable ops (a straight-through "
    "estimator as x + (f(x) - x).detach())"
)


def distinct_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example inputs with a tensor passed twice (``labels=input_ids``) cloned at its
    later places: torch.export makes one placeholder of one tensor, and the graph would
    then read that input for both."""
    seen: set[int] = set()

    def distinct(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) in seen:
            return value.clone()
        seen.add(id(value))
        return value

    return pytree.tree_map(distinct, (args, kwargs))


def _check_initialized(model: nn.Module) -> None:
    """Refuse lazy modules whose parameters are not materialised yet: export cannot trace
    them, and running a forward here to materialise them would be a hidden step (and
    `capture_failure`'s eager check would materialise them as a side effect of failing)."""
    lazy = [
        f"{name or '(the model itself)'} ({type(module).__name__})"
        for name, module in model.named_modules()
        if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()
    ]
    if lazy:
        raise CaptureError(
            f"{type(model).__name__} has lazy modules whose parameters are not initialised yet: "
            f"{', '.join(lazy)}. Run the model once on a batch first (for example "
            "`with torch.no_grad(): model(*example_inputs)`) so that they take their shapes, "
            "then transform it."
        )


def _check_no_cumulative_batch_norm(model: nn.Module) -> None:
    """Refuse a training BatchNorm with ``momentum=None``: its averaging factor,
    1 / batches seen, would be captured as the capture step's constant."""
    cumulative = [
        name or "(the model itself)"
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        and module.training
        and module.track_running_stats
        and module.momentum is None
    ]
    if cumulative:
        raise CaptureError(
            f"BatchNorm {', '.join(cumulative)} of {type(model).__name__} has momentum=None "
            "(a cumulative average, which torch.optim.swa_utils.update_bn sets), whose factor "
            "1 / batches seen a captured graph would hold fixed: give it a float momentum "
            "(each new value captures a graph of its own)"
        )


def _captured(ep: ExportedProgram, *, training: bool) -> CapturedGraph:
    inputs = [(spec.kind, _input_target(spec)) for spec in ep.graph_signature.input_specs]
    for kind, target in inputs:
        if kind not in (
            InputKind.PARAMETER,
            InputKind.BUFFER,
            InputKind.CONSTANT_TENSOR,
            InputKind.USER_INPUT,
        ):
            raise CaptureError(f"unsupported graph input {target!r} of kind {kind.name}")
    return CapturedGraph(
        gm=without_metadata_asserts(
            out_of_place_dropout(
                einsum_matmuls(
                    explicit_shapes(explicit_conv_padding(canonical_aliases(ep.graph_module)))
                )
            )
        ),
        inputs=inputs,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        training=training,
        constants=dict(ep.constants),
        user_values=[
            _signature(node.meta.get("val"), ep.range_constraints)
            for node, (kind, _) in zip(
                ep.graph_module.graph.find_nodes(op="placeholder"), inputs, strict=True
            )
            if kind == InputKind.USER_INPUT
        ],
    )


_aten = torch.ops.aten
_ALIASES: dict[OpOverload, OpOverload] = {
    _aten.multiply.Tensor: _aten.mul.Tensor,
    _aten.multiply.Scalar: _aten.mul.Scalar,
    _aten.divide.Tensor: _aten.div.Tensor,
    _aten.divide.Scalar: _aten.div.Scalar,
    _aten.true_divide.Tensor: _aten.div.Tensor,
    _aten.true_divide.Scalar: _aten.div.Scalar,
    _aten.subtract.Tensor: _aten.sub.Tensor,
    _aten.subtract.Scalar: _aten.sub.Scalar,
    _aten.negative.default: _aten.neg.default,
    _aten.absolute.default: _aten.abs.default,
    _aten.clip.default: _aten.clamp.default,
}
"""ATen's aliases (same schema) that export keeps: ``torch.multiply`` (ConvBERT's gate)."""


def canonical_aliases(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with each aliased op as the op it aliases, the only one the analysis reads
    (ConvBERT's ``torch.multiply`` of two compact tensors was read at full width)."""
    for node in [n for n in gm.graph.nodes if n.target in _ALIASES]:
        node.target = _ALIASES[node.target]
    gm.recompile()
    return gm


_EXPLICIT_PADDING: dict[OpOverload, OpOverload] = {
    torch.ops.aten.conv1d.padding: torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.padding: torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.padding: torch.ops.aten.conv3d.default,
}


def explicit_conv_padding(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with ``padding="valid"`` and symmetric ``padding="same"`` convolutions as the
    integer-padding overloads, the only convolutions the analysis reads (EfficientNet's
    convolutions were otherwise left dense without a reason). "same" with an even kernel
    pads one side more and stays as it is (an unsupported weight op)."""
    for node in [n for n in gm.graph.nodes if n.target in _EXPLICIT_PADDING]:
        args = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True).kwargs
        kernel = args["weight"].meta["val"].shape[2:]
        dilation = list(args["dilation"]) * (len(kernel) // len(args["dilation"]))
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        if args["padding"] == "same" and any(total % 2 for total in totals):
            continue
        padding = [total // 2 if args["padding"] == "same" else 0 for total in totals]
        node.target = _EXPLICIT_PADDING[node.target]
        node.args = (args["input"], args["weight"], args["bias"], args["stride"], padding,
                     dilation, args["groups"])  # fmt: skip
        node.kwargs = {}
    gm.recompile()
    return gm


_SHAPED_AS: dict[OpOverload, OpOverload] = {
    torch.ops.aten.reshape_as.default: torch.ops.aten.reshape.default,
    torch.ops.aten.view_as.default: torch.ops.aten.view.default,
    torch.ops.aten.expand_as.default: torch.ops.aten.expand.default,
}


def explicit_shapes(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with ``x.reshape_as(y)``, ``x.view_as(y)`` and ``x.expand_as(y)`` as a reshape,
    view or expand to y's sizes (symbolic ones read with ``sym_size``): y is read for its
    shape only, where the analysis took it for a compact input read whole (RoFormer's rotary
    embedding reshapes a rotated copy of q as q, which left q and k dense; MobileViTv2
    expands its context vector, pruned with k, as v, which scattered both)."""
    for node in [n for n in gm.graph.nodes if n.target in _SHAPED_AS]:
        x, like = node.args
        sizes: list[Any] = []
        with gm.graph.inserting_before(node):
            for i, size in enumerate(like.meta["val"].shape):
                if isinstance(size, torch.SymInt):
                    read = gm.graph.call_function(torch.ops.aten.sym_size.int, (like, i))
                    read.meta["val"] = size
                    size = read
                sizes.append(size)
        node.target = _SHAPED_AS[node.target]
        node.args = (x, sizes)
    gm.recompile()
    return gm


_TRANSPOSES = (torch.ops.aten.numpy_T.default, torch.ops.aten.t.default)


def linear_matmuls(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> fx.GraphModule:
    """`gm` with ``x @ W.T`` of a 2-D parameter (Falcon's `FalconLinear`, hand-written
    layers) as ``linear(x, W)``: the layer the analysis prunes, where the matmul left the
    model dense without a reason. A bias added after it stays an ``add`` (the analysis
    gathers it): folded into linear it would change the sum's dtype under autocast. Called
    once the placeholders' kinds are known (a Dynamo graph's parameters are inputs until
    `capture_graph` names them)."""
    params = _parameters(gm, inputs)
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.matmul.default)):
        x, transposed = node.args
        if not (isinstance(transposed, fx.Node) and transposed.target in _TRANSPOSES):
            continue
        weight = transposed.args[0]
        value = x.meta.get("val") if isinstance(x, fx.Node) else None
        if (
            weight not in params
            or weight.meta["val"].dim() != 2
            or value is None
            or not value.dim()
        ):
            continue
        with gm.graph.inserting_before(node):
            linear = gm.graph.call_function(torch.ops.aten.linear.default, (x, weight))
        linear.meta = dict(node.meta)
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        if not transposed.users:
            gm.graph.erase_node(transposed)
    gm.recompile()
    return gm


def _parameters(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> set[fx.Node]:
    """The placeholders that are parameters."""
    placeholders = gm.graph.find_nodes(op="placeholder")
    return {
        n for n, (kind, _) in zip(placeholders, inputs, strict=True) if kind == InputKind.PARAMETER
    }


def embedding_lookups(gm: fx.GraphModule, inputs: list[tuple[InputKind, str]]) -> fx.GraphModule:
    """`gm` with ``W[idx]`` of a 2-D parameter (Swin's relative position bias table read
    at each pair of window positions) as ``embedding(W, idx + n * (idx < 0))``, the same
    lookup: a producer whose columns the analysis can prune with the heads they bias. The
    shift keeps indexing's negative indices; an index out of range still raises."""
    params = _parameters(gm, inputs)
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.index.Tensor)):
        weight, indices = node.args
        if weight not in params or weight.meta["val"].dim() != 2 or len(indices) != 1:
            continue
        (index,) = indices
        value = index.meta.get("val") if isinstance(index, fx.Node) else None
        if value is None or value.dtype not in (torch.int64, torch.int32):
            continue
        rows = weight.meta["val"].shape[0]
        with gm.graph.inserting_before(node):
            negative = traced_call(gm, node, torch.ops.aten.lt.Scalar, (index, 0))
            shift = traced_call(gm, node, torch.ops.aten.mul.Tensor, (negative, rows))
            index = traced_call(gm, node, torch.ops.aten.add.Tensor, (index, shift))
            lookup = gm.graph.call_function(torch.ops.aten.embedding.default, (weight, index))
        lookup.meta = dict(node.meta)
        node.replace_all_uses_with(lookup)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def without_metadata_asserts(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` without export's ``_assert_tensor_metadata`` (written before each ``.to``): it
    holds the capture's dtype, so a graph captured in float32 and run under autocast (a
    Hugging Face loss's ``logits.float()`` reading bfloat16) failed on it, where eager
    code casts whatever it gets."""
    for node in gm.graph.find_nodes(
        op="call_function", target=torch.ops.aten._assert_tensor_metadata.default
    ):
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def out_of_place_dropout(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with in-place dropout (``nn.Dropout(inplace=True)``, Hugging Face MobileNetV2's
    classifier) as the out-of-place op, which the analysis and the dropout passes know (the
    in-place one scattered its input and drew its own noise in every forward). Export
    already reads the dropped tensor's later uses from the op's output; where another
    tensor sharing its storage is read after it (`_read_later`), or the storage is a graph
    input's, only the in-place op is right, and the analysis keeps what it aliases dense."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in [n for n in gm.graph.nodes if n.target in IN_PLACE_DROPOUT]:
        if not _read_later(node.args[0], node, order):
            node.target = IN_PLACE_DROPOUT[node.target]
    gm.recompile()
    return gm


def _read_later(tensor: Any, node: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether a tensor sharing `tensor`'s storage (itself, what it is a view of, another
    view of that) is read after `node`, or the storage is a graph input's (whose mutation
    the caller sees)."""
    root = tensor
    while aliases_input(root):
        root = root.args[0]
    if not isinstance(root, fx.Node) or root.op != "call_function":
        return True
    aliases, frontier = {root}, [root]
    while frontier:
        for user in frontier.pop().users:
            if user is not node and user not in aliases and aliases_input(user):
                aliases.add(user)
                frontier.append(user)
    return any(order[user] > order[node] for alias in aliases for user in alias.users)


def _signature(example: Any, ranges: dict[Any, Any]) -> Any:
    return TensorSignature.of(example, ranges) if isinstance(example, torch.Tensor) else example


def capture_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    inputs: list[tuple[InputKind, str]],
    size_inputs: Sequence[int],
    scalar_inputs: Sequence[int] = (),
) -> CapturedGraph:
    """Normalise a torch.compile (Dynamo) graph into the same IR as `capture`.

    Dynamo passes parameters and buffers as ordinary graph inputs; `inputs` says what each
    one is (kind and FQN), in placeholder order without the `size_inputs` (SymInt inputs
    that are sizes of tensor inputs, which the graph recomputes from those tensors) and the
    `scalar_inputs` (Python floats passed as 0-d tensors, inlined as constants). Dims that
    Dynamo made dynamic are exported as dynamic.
    """
    refused = dynamo_functions(gm)
    if refused:
        raise CaptureError(
            f"the compiled graph calls a custom torch.autograd.Function ({', '.join(refused)}) "
            "that sparsefx cannot run whole here: its forward draws random numbers (a "
            "backward that ran it again would draw others) or writes in place, or it takes "
            "a non-tensor argument that the graph computes. Use sparsefx.transform(model, "
            "example_inputs), which runs it whole or, where it cannot, differentiates its "
            "forward with a warning"
        )
    scalars = tuple(float(example_inputs[i]) for i in scalar_inputs)
    gm = _inline_scalar_inputs(gm, scalar_inputs, scalars)
    kept = [i for i in range(len(example_inputs)) if i not in set(scalar_inputs)]
    example_inputs = [example_inputs[i] for i in kept]
    size_inputs = [kept.index(i) for i in size_inputs]
    gm = _inline_size_inputs(gm, size_inputs)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    drop = set(size_inputs)
    args = tuple(value for i, value in enumerate(example_inputs) if i not in drop)
    dynamic = tuple(_dynamic_dims(node.meta.get("example_value")) for node in placeholders)
    try:
        with torch._guards.tracing(None):  # export must not add guards to Dynamo's frame
            ep = torch.export.export(gm, args, dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        checkpoint = torch.ops.higher_order.tag_activation_checkpoint
        checkpointed = any(node.target is checkpoint for node in gm.graph.nodes)
        hint = (
            "\nThe graph holds activation checkpointing (torch.utils.checkpoint, Hugging "
            "Face's gradient_checkpointing_enable()), which sparsefx's compiled path does not "
            "support: turn it off, or use sparsefx.transform (which keeps every activation)."
            if checkpointed
            else ""
        )
        raise CaptureError(
            f"sparsefx could not normalise a torch.compile graph: {type(error).__name__}: "
            f"{first_line(error)}{hint}"
        ) from error
    captured = _captured(ep, training=True)
    captured.scalars = scalars
    given = iter(inputs)
    captured.inputs = [
        next(given) if kind == InputKind.USER_INPUT else (kind, target)
        for kind, target in captured.inputs
    ]
    captured.gm = _normalised(captured.gm, captured.inputs)
    return captured


def _inline_scalar_inputs(
    gm: fx.GraphModule, positions: Sequence[int], values: Sequence[Any]
) -> fx.GraphModule:
    """A copy of `gm` with the Python floats at `positions` (which Dynamo passes as 0-d
    tensors and reads back with ``.item()`` once a float attribute such as a Dropout's p or a
    BatchNorm's momentum has changed between calls) inlined as `values`; export would
    otherwise meet a data-dependent float. The compiled graph keeps a program per value
    (`CapturedGraph.scalars`)."""
    if not positions:
        return gm
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    placeholders = list(graph.find_nodes(op="placeholder"))
    for position, value in zip(positions, values, strict=True):
        node = placeholders[position]
        for read in [u for u in node.users if u.op == "call_method" and u.target == "item"]:
            _replace_with_constant(read, value)
            graph.erase_node(read)
        if node.users:
            raise CaptureError(
                f"torch.compile passes the number {node.name} as a tensor, and the graph "
                "computes with it as one; sparsefx inlines such numbers: compile with "
                "dynamic=False"
            )
        graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def _replace_with_constant(node: fx.Node, value: float) -> None:
    """Every use of `node` becomes the literal `value`."""
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda a: value if a is node else a)


def _inline_size_inputs(gm: fx.GraphModule, size_inputs: Sequence[int]) -> fx.GraphModule:
    """A copy of `gm` whose SymInt inputs are replaced by the tensor sizes (or strides: a
    channels-last input after a contiguous one) they stand for."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    placeholders = list(graph.find_nodes(op="placeholder"))
    tensors = [
        (node, node.meta["example_value"])
        for node in placeholders
        if isinstance(node.meta.get("example_value"), torch.Tensor)
    ]
    for position in size_inputs:
        node = placeholders[position]
        expr = node.meta["example_value"].node.expr
        source = next(
            (
                (read, (tensor, dim))
                for read, sizes in (
                    (torch.ops.aten.sym_size.int, lambda t: t.shape),
                    (torch.ops.aten.sym_stride.int, lambda t: t.stride()),
                )
                for tensor, value in tensors
                for dim, size in enumerate(sizes(value))
                if isinstance(size, torch.SymInt) and size.node.expr == expr
            ),
            None,
        )
        if source is None:
            raise CaptureError(
                f"torch.compile made the integer input {node.name} dynamic; sparsefx supports "
                "dynamic tensor sizes only: compile with dynamic=False or pass it as a tensor"
            )
        with graph.inserting_after(placeholders[-1]):
            size = graph.call_function(*source)
        node.replace_all_uses_with(size)
        graph.erase_node(node)
    return fx.GraphModule(gm, graph)


def _dynamic_dims(value: Any) -> dict[int, Any] | None:
    if not isinstance(value, torch.Tensor):
        return None
    dims = {d: Dim.AUTO for d, size in enumerate(value.shape) if isinstance(size, torch.SymInt)}
    return dims or None


def _input_target(spec: Any) -> str:
    return spec.target if spec.target is not None else spec.arg.name


def _export(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[ExportedProgram, str]:
    """The exported program with dynamic sizes, and its size guards (`CapturedGraph`), or a
    fully static one where that fails or its guards cannot be read back on the example."""
    try:
        ep = torch.export.export(
            model, args, kwargs, dynamic_shapes=_dynamic_shapes(model, args, kwargs), strict=False
        )
        guards = " and ".join(f"({guard})" for guard in getattr(ep, "_guards_code", []))
        if guards and not _size_guards_hold(guards, bound_arguments(model, args, kwargs)):
            raise CaptureError(f"export's size guards do not hold on its example: {guards}")
        return ep, guards
    except Exception as first:
        try:  # dynamic sizes are an optimisation: retry fully static before giving up
            return torch.export.export(model, args, kwargs, strict=False), ""
        except Exception as error:
            raise capture_failure(model, args, kwargs, error) from first


def bound_arguments(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
    """The forward's arguments by name, defaults included: what export's guards call ``L``."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


@functools.cache
def _compiled_guards(guards: str) -> CodeType:
    return compile(guards, "<export size guards>", "eval")


def _size_guards_hold(guards: str, arguments: dict[str, Any]) -> bool:
    """Evaluate export's guard expressions (torch prints them as Python over ``L['name']``
    sources, the namespace `ep.module()`'s own check uses) on bound arguments."""
    namespace = {**SYMPY_INTERP, "torch": torch, "math": math, "inf": math.inf, "L": arguments}
    return bool(eval(_compiled_guards(guards), namespace))


def capture_failure(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], error: BaseException
) -> CaptureError:
    """The error for a model that failed to capture with `error`: it blames the inputs when
    the model rejects them without sparsefx too, and names the model's source line and the
    failing op. Both entry points (and the diff tool) raise it."""
    name = type(model).__name__
    rejected = _eager_error(model, args, kwargs)
    if rejected is not None:
        failure = CaptureError(
            f"{name} rejects the example inputs {_describe(args, kwargs)}: "
            f"{type(rejected).__name__}: {first_line(rejected)}{where(rejected)}\n"
            "Pass example inputs that the model's forward accepts (shapes, dtypes, devices): "
            "the model fails on them without sparsefx too."
        )
        failure.__cause__ = rejected
        return failure
    if "in output, which is not a known type" in str(error):
        advice = (
            "The model returns an object that torch.export cannot flatten (a Hugging Face "
            "model's DynamicCache when use_cache is on): train with use_cache=False "
            "(model.config.use_cache = False, or pass use_cache=False), or register the type "
            "with torch.utils._pytree.register_pytree_node."
        )
    else:
        advice = (
            "The model runs on these inputs, but cannot be traced: make its forward traceable "
            "(no Python control flow on tensor values; a custom op needs a fake "
            'implementation, torch.library.register_fake). torch.compile(model, backend="sparsefx") '
            "graph-breaks around Python control flow."
        )
    return CaptureError(
        f"sparsefx could not capture {name}: {type(error).__name__}: "
        f"{first_line(error)}{where(error)}\n{advice}"
    )


def _eager_error(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Exception | None:
    """What the model raises on these inputs when run eagerly (eval mode, without autograd:
    BatchNorm statistics do not move), which puts the blame on the inputs, not on tracing."""
    with eval_mode(model), torch.no_grad():
        try:
            model(*args, **kwargs)
        except Exception as error:  # any failure here is the inputs' fault
            return error
    return None


def _describe(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Inputs by dtype and shape: ``[float32[2, 3, 32, 32]] with {'mask': bool[2, 32]}``."""

    def describe(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"{str(x.dtype).removeprefix('torch.')}{list(x.shape)}"
        if isinstance(x, list | tuple):
            return f"[{', '.join(describe(v) for v in x)}]"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in x.items()) + "}"
        return repr(x)

    return describe(list(args)) + (f" with {describe(kwargs)}" if kwargs else "")


def where(error: BaseException) -> str:
    """The source line in the model's code where `error` arose, the op that failed when the
    error names one, and the root cause when it was re-raised; "" when none is known."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__  # type: ignore[assignment]
    text = ""
    frame = next((f for e in reversed(chain) if (f := _model_frame(e)) is not None), None)
    if frame is not None:
        text += (
            f"\n  at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}"
        )
    op = next((e.func for e in chain if isinstance(getattr(e, "func", None), OpOverload)), None)
    if op is not None:
        text += f"\n  op: {op}"
    if len(chain) > 1 and first_line(chain[-1]) != first_line(chain[0]):
        text += f"\n  caused by {type(chain[-1]).__name__}: {first_line(chain[-1])}"
    return text


def _model_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The innermost frame of `error` in the model's code: from the traceback (the model's
    Python ran), or from Dynamo's record of the user code it was tracing."""
    frames = getattr(error, "real_stack", None) or traceback.extract_tb(error.__traceback__)
    return next((f for f in reversed(frames) if not _library_file(f.filename)), None)


_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) for p in (Path(torch.__file__).parent, Path(__file__).parent)
)
_STDLIB = str(Path(sysconfig.get_paths()["stdlib"]).resolve())


def _library_file(filename: str) -> bool:
    if filename.startswith("<"):  # <string>, <frozen ...>: generated code
        return True
    path = str(Path(filename).resolve())
    installed = "site-packages" in path or "dist-packages" in path
    return path.startswith(_LIBRARY_DIRS) or (path.startswith(_STDLIB) and not installed)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """dynamic_shapes marking as Dim.AUTO dim 0 of every tensor input (the batch), and
    every dim of integer and bool ones (token ids, attention masks, positions: batch and
    sequence lengths), so that new batch sizes and sequence lengths run the same graph;
    export specialises the dims the model fixes. None (fully static) if the inputs do not
    bind to the signature, or if some bind to a ``**kwargs`` parameter (every transformers
    model's forward has one, usually unused): torch 2.11 to 2.13's export rejects any
    dynamic_shapes for a non-empty one."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    if any(
        signature.parameters[name].kind == inspect.Parameter.VAR_KEYWORD and value
        for name, value in bound.arguments.items()
    ):
        return None

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        indices = x.dtype == torch.bool or not (x.is_floating_point() or x.is_complex())
        return dict.fromkeys(range(x.dim()) if indices else [0], Dim.AUTO)

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
