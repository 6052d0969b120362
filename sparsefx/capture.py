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

__all__ = ["CaptureError", "CapturedGraph", "capture"]


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
