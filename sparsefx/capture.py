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
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.export import Dim, ExportedProgram
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree

__all__ = ["CaptureError", "CapturedGraph", "capture", "capture_graph"]


class CaptureError(RuntimeError):
    """The model could not be captured into sparsefx's graph IR."""


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
    """Example value of each user input: a fake tensor (symbolic where dynamic) or a constant."""

    def matches(self, flat_inputs: Sequence[Any], spec: pytree.TreeSpec) -> bool:
        """Whether inputs of this structure, dtype and static shape can run this graph."""
        return spec == self.in_spec and all(
            _leaf_matches(expected, value)
            for expected, value in zip(self.user_values, flat_inputs, strict=True)
        )


def _leaf_matches(expected: Any, value: Any) -> bool:
    if not isinstance(value, torch.Tensor):
        return not isinstance(expected, torch.Tensor) and expected == value
    if not isinstance(expected, torch.Tensor) or expected.dtype != value.dtype:
        return False
    if expected.dim() != value.dim() or expected.device.type != value.device.type:
        return False
    return all(
        not isinstance(e, int) or e == v for e, v in zip(expected.shape, value.shape, strict=True)
    )


def capture(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, training: bool
) -> CapturedGraph:
    """Export `model` in train or eval mode on example inputs, batch dimension dynamic."""
    with _mode(model, training):
        ep = _export(model, args, kwargs)
    return _captured(ep, training=training)


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
        gm=ep.graph_module,
        inputs=inputs,
        in_spec=ep.call_spec.in_spec,
        out_spec=ep.call_spec.out_spec,
        training=training,
        constants=dict(ep.constants),
        user_values=[
            node.meta.get("val")
            for node, (kind, _) in zip(
                ep.graph_module.graph.find_nodes(op="placeholder"), inputs, strict=True
            )
            if kind == InputKind.USER_INPUT
        ],
    )


def capture_graph(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    inputs: list[tuple[InputKind, str]],
    size_inputs: Sequence[int],
) -> CapturedGraph:
    """Normalise a torch.compile (Dynamo) graph into the same IR as `capture`.

    Dynamo passes parameters and buffers as ordinary graph inputs; `inputs` says what each
    one is (kind and FQN), in placeholder order without the `size_inputs`: SymInt inputs
    that are sizes of tensor inputs, which the graph recomputes from those tensors. Dims that
    Dynamo made dynamic are exported as dynamic.
    """
    gm = _inline_size_inputs(gm, size_inputs)
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    drop = set(size_inputs)
    args = tuple(value for i, value in enumerate(example_inputs) if i not in drop)
    dynamic = tuple(_dynamic_dims(node.meta.get("example_value")) for node in placeholders)
    try:
        with torch._guards.tracing(None):  # export must not add guards to Dynamo's frame
            ep = torch.export.export(gm, args, dynamic_shapes=dynamic, strict=False)
    except Exception as error:
        raise CaptureError(
            f"sparsefx could not normalise a torch.compile graph: {type(error).__name__}: "
            f"{_first_line(error)}"
        ) from error
    captured = _captured(ep, training=True)
    given = iter(inputs)
    captured.inputs = [
        next(given) if kind == InputKind.USER_INPUT else (kind, target)
        for kind, target in captured.inputs
    ]
    return captured


def _inline_size_inputs(gm: fx.GraphModule, size_inputs: Sequence[int]) -> fx.GraphModule:
    """A copy of `gm` whose SymInt inputs are replaced by the tensor sizes they stand for."""
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
                (tensor, dim)
                for tensor, value in tensors
                for dim, size in enumerate(value.shape)
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
            size = graph.call_function(torch.ops.aten.sym_size.int, source)
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


def _export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExportedProgram:
    name = type(model).__name__
    try:
        return torch.export.export(
            model, args, kwargs, dynamic_shapes=_batch_dynamic(model, args, kwargs), strict=False
        )
    except Exception as first:
        try:  # dynamic batch is an optimisation: retry fully static before giving up
            return torch.export.export(model, args, kwargs, strict=False)
        except Exception as error:
            raise CaptureError(
                f"sparsefx could not capture {name}: {type(error).__name__}: "
                f"{_first_line(error)}\n"
                "Check that the example inputs are ones the model accepts (shapes, dtypes, "
                "devices) and that its forward is traceable by torch.export "
                "(no data-dependent Python control flow)."
            ) from first


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def _batch_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """dynamic_shapes marking dim 0 of every tensor input as Dim.AUTO (None if unbindable)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    if any(
        p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in inspect.signature(model.forward).parameters.values()
    ):
        return None

    def spec(x: Any) -> Any:
        return {0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


@contextlib.contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put every submodule in train/eval mode, then restore each one's own flag."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for module, flag in flags.items():
            module.training = flag
