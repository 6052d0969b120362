"""`sparsefx.diff`: what sparsefx does to a model, and why.

`diff` captures a model exactly as one entry point would (`transform`, or the torch.compile
backend) and reports every graph it rewrote. In compile mode the model is a deep copy run
once under Dynamo with a backend that records sparsefx's graphs and then runs Dynamo's
graph eagerly: the report needs the graphs, not Inductor's code, and the user's model stays
untouched (no entry in the backend's registry, no BatchNorm statistics updated).
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from sparsefx import compiled
from sparsefx.capture import CaptureError, capture_failure
from sparsefx.config import SparseConfig, resolve_config
from sparsefx.runtime import DensityError, GraphRecord, SparseModule, SparseRuntime
from sparsefx.tools.report import Report, build_report

__all__ = ["MODES", "diff"]

MODES = ("transform", "compile")


def diff(
    model: nn.Module,
    example_inputs: Any = (),
    *,
    density: float | None = None,
    config: SparseConfig | None = None,
    mode: str = "transform",
    example_kwargs: dict[str, Any] | None = None,
) -> Report:
    """Capture `model` as ``sparsefx.transform`` (``mode="transform"``) or
    ``torch.compile(backend="sparsefx")`` (``mode="compile"``) would, and report what
    sparsefx does to it. ``print(report)`` shows the diff; ``report.save_html(path)``
    writes the HTML report. Example::

        report = sparsefx.diff(model, (torch.randn(2, 3, 32, 32),), density=0.25)
        print(report.text(context=1))
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its module
    if not isinstance(model, nn.Module):
        raise TypeError(f"diff expects an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    config = resolve_config(density, config)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if mode == "transform":
        runtime = SparseModule(model, args, kwargs, config).runtime
        records: Sequence[GraphRecord] = runtime.graphs
    else:
        runtime, records = _compiled_records(model, args, kwargs, config)
    return build_report(type(model).__name__, mode, config, runtime, records)


def _compiled_records(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], config: SparseConfig
) -> tuple[SparseRuntime | None, list[GraphRecord]]:
    """Run a copy of `model` once under Dynamo with the sparsefx backend, recording its
    graphs; then drop what Dynamo cached for the frames it compiled, so repeated reports do
    not use up its recompile limit (the model's own compiled code recompiles on next use)."""
    twin = copy.deepcopy(model)
    graphs: list[compiled.CompiledGraph] = []
    frames: set[types.CodeType] = set()
    options = dataclasses.asdict(config)

    def record(gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        frames.add(InstructionTranslator.current_tx().f_code)
        graphs.append(compiled.backend(gm, example_inputs, options))
        return gm.forward

    try:
        torch.compile(twin, backend=record)(*args, **kwargs)
    except CaptureError:
        raise
    except Exception as error:
        if isinstance(getattr(error, "inner_exception", None), DensityError):
            raise error.inner_exception from None  # the backend's, not a capture failure
        raise capture_failure(model, args, kwargs, error) from error
    finally:
        for code in frames:
            torch._C._dynamo.eval_frame.reset_code(code)
    if not graphs:
        raise CaptureError(
            f"torch.compile captured no graph of {type(model).__name__}: Dynamo skipped its "
            "forward (past torch._dynamo.config.recompile_limit, or called under a "
            "TorchDispatchMode). torch._dynamo.reset() clears Dynamo's caches; "
            'mode="transform" does not use Dynamo.'
        )
    return compiled.runtime_of(twin), [r for graph in graphs for r in graph.records]
