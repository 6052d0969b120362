"""The torch.compile backend: the same capture, analysis, passes and runtime as `transform`,
then AOTAutograd + Inductor.

Dynamo hands the backend one FX graph per captured region, with every parameter and buffer
as a graph input whose *source* names it (``L['self']._modules['fc1']._parameters['weight']``).
The backend normalises that graph into sparsefx's IR (`capture_graph`: torch.export's aten
training IR, parameter inputs marked as parameters), analyses and rewrites it exactly as
`transform` does, and compiles two graphs with Inductor: the compact training graph (indices
of kept channels are inputs with dynamic lengths, so new masks do not recompile) and, lazily,
the score graph (pure forward, only the loss as output) for masks 2..K.

One `SparseRuntime` per model is kept in a weak registry keyed by the model, so that every
graph of the model (training and eval, new shapes, the loss graph after a graph break) shares
one structure, and `sparsefx.groups(compiled_model)` finds it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import sys
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.export.graph_signature import InputKind
from torch.fx._lazy_graph_module import _LazyGraphModule

from sparsefx.analysis import Analysis, DenseOp, analyze, build_cost_model
from sparsefx.capture import CapturedGraph, CaptureError, TensorSignature, capture_graph
from sparsefx.config import SparseConfig
from sparsefx.passes import (
    copy_graph_module,
    keep_outputs,
    rewrite_compact,
    rounds_convolutions,
    score_graph,
    shared_noise_count,
)
from sparsefx.runtime import (
    DensityError,
    GraphRecord,
    RecurringCounts,
    SampledStep,
    SparseRuntime,
    StructureState,
    check_same_groups,
    counterparts,
    detached,
    fail_unless_resolved,
    missing_loss_message,
    register_counterparts,
    samples_agree,
    split_noises,
    unseen_loss_message,
    warn_if_nothing_to_prune,
)

__all__ = ["CompiledGraph", "backend", "records_of", "runtime_of", "set_criterion"]

log = logging.getLogger("sparsefx")

_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, SparseRuntime] = weakref.WeakKeyDictionary()
"""Model -> its runtime, created when the first graph with prunable groups is compiled."""
_CRITERIA: weakref.WeakKeyDictionary[nn.Module, Callable[..., Tensor]] = weakref.WeakKeyDictionary()
"""Model -> criterion registered by wrap_loss (possibly before the first compile)."""
_BREAKS: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()
"""Model -> where Dynamo broke its graphs, for error messages."""
_RECORDS: weakref.WeakKeyDictionary[nn.Module, list[GraphRecord]] = weakref.WeakKeyDictionary()
"""Model -> every graph the backend rewrote for it, with or without groups (`explain`)."""
_PENDING_STATE: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
"""Model -> structure state loaded before its first compile, applied when its runtime exists."""
_LIMIT_HITS: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()
"""Model -> the functions inside it where Dynamo hit its recompile limit (they now run eagerly)."""
_FUNCTION_LIMIT_HITS: list[str] = []
"""Functions compiled with sparsefx, called outside any sparse model's forward (a compiled
training step), where Dynamo hit its recompile limit."""
_EMPTY_RUNTIMES: weakref.WeakKeyDictionary[nn.Module, SparseRuntime] = weakref.WeakKeyDictionary()
"""Model whose compiled graphs all stayed dense -> a runtime without groups (`empty_runtime_of`)."""
_LOSS_AFTER_BREAK: weakref.WeakSet[SparseRuntime] = weakref.WeakSet()
"""Runtimes whose loss a graph after a graph break has computed (from outputs' counterparts)."""


def backend(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """``torch.compile(model, backend="sparsefx", options={"density": 0.1, ...})``.

    `options` takes exactly the fields of `SparseConfig`, or a `SparseConfig`. Registered as
    the entry point ``torch_dynamo_backends: sparsefx``, so ``backend="sparsefx"`` works
    without importing sparsefx first; ``backend=sparsefx.backend`` is the same function.
    """
    config = SparseConfig.from_options(options or {})
    _watch_recompile_limit()
    frame = _DynamoFrame.current(gm, list(example_inputs))
    captured = capture_graph(gm, list(example_inputs), frame.inputs, frame.dropped, frame.scalars)
    analysis = analyze(captured.gm, captured.inputs, prune_streams=config.prune_streams)
    if frame.graph_break is not None:
        _warn_dense_at_break(frame, analysis.dense)
    runtime = _runtime_for(frame, captured, analysis, config)
    log.info("sparsefx: compiled graph of %s with %d groups", frame.name, len(analysis.groups))
    return CompiledGraph(
        gm, frame, captured, analysis, runtime if analysis.groups else None, config
    )


def runtime_of(model: Any) -> SparseRuntime | None:
    """The runtime of a model compiled with the sparsefx backend (the OptimizedModule or the
    model itself), or None if no graph of it has been compiled yet."""
    return _RUNTIMES.get(_unwrap(model))


def empty_runtime_of(model: Any) -> SparseRuntime | None:
    """A runtime without groups for a model whose compiled graphs all stayed dense (None if
    none compiled yet), so that `sparsefx.groups`, `stats`, `freeze` and the rest read as they
    do for a transformed model with nothing to prune: a training loop written for one entry
    point runs on the other."""
    model = _unwrap(model)
    records = _RECORDS.get(model)
    if not records or model in _RUNTIMES:
        return None
    if model not in _EMPTY_RUNTIMES:
        first = records[0]
        assert first.config is not None and not first.analysis.groups
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        cost_model = build_cost_model(first.captured.gm, first.captured.inputs, [])
        _EMPTY_RUNTIMES[model] = SparseRuntime(first.analysis, cost_model, first.config, device)
    return _EMPTY_RUNTIMES[model]


def records_of(model: Any) -> list[GraphRecord]:
    """The graphs the backend rewrote for a model (the OptimizedModule or the model)."""
    return list(_RECORDS.get(_unwrap(model), []))


def set_criterion(model: Any, criterion: Callable[..., Tensor]) -> None:
    """Register wrap_loss's criterion for a model compiled (now or later) with sparsefx."""
    model = _unwrap(model)
    _CRITERIA[model] = criterion
    if model in _RUNTIMES:
        _RUNTIMES[model].criterion = criterion


def checked_criterion(model: Any, criterion: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`criterion`, refusing a training loss of a model whose graphs the sparsefx backend
    never received: Dynamo ran its forward eagerly (a graph break it could not split, such
    as BatchNorm's ``.item()`` with ``momentum=None``), or it was never compiled, and it
    would train dense without a word. Once a graph of it (or of a module it contains or is
    part of: a compiled backbone, a compiled wrapper or DDP) was received, it checks no
    more."""
    target = weakref.ref(_unwrap(model))
    received = False

    def sparse_criterion(output: Any, *args: Any, **kwargs: Any) -> Tensor:
        nonlocal received
        model = target()
        if not received and model is not None and model.training:
            received = received_graph_of(model)
            if not received:
                raise RuntimeError(
                    f"{type(model).__name__} ran without sparsefx: the sparsefx backend never "
                    "received a graph of it (Dynamo ran its forward eagerly, or it is not "
                    'compiled with backend="sparsefx"), so it would train dense. '
                    "torch._dynamo.explain(model)(*inputs) says why Dynamo skipped it; "
                    "sparsefx.transform(model, example_inputs) does not depend on Dynamo"
                )
        return criterion(output, *args, **kwargs)

    return sparse_criterion


def received_graph_of(model: nn.Module) -> bool:
    """Whether the backend rewrote a graph rooted at `model`, at a module inside it, or at
    one that holds it."""
    inside = set(map(id, model.modules()))
    return any(
        records and (id(root) in inside or any(m is model for m in root.modules()))
        for root, records in list(_RECORDS.items())
    )


def load_structure_state_later(model: Any, state: dict) -> None:
    """Keep a structure state for a compiled model whose runtime does not exist yet (no call
    so far): its first compile with groups loads it, so a resumed run's first step already
    samples from the checkpoint's state."""
    _PENDING_STATE[_unwrap(model)] = state


def _unwrap(model: Any) -> Any:
    return getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule


# -- Dynamo's recompile limit ---------------------------------------------------------------------

_LIMIT_RECORD = re.compile(r"^torch._dynamo hit (config\.\w+ \(\d+\))\n\s*function: (.*)$", re.M)


class _RecompileLimitFilter(logging.Filter):
    """Reads Dynamo's warning that a function hit its recompile limit, which is the only
    trace of it: from then on Dynamo runs every call of that function that none of its
    cached graphs fits eagerly, so inside a sparse model that call is the original model,
    dense, and never reaches sparsefx. Passes every record on unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            if (
                isinstance(record.msg, str)
                and record.msg.startswith("torch._dynamo hit config.")
                and (found := _LIMIT_RECORD.search(record.getMessage())) is not None
            ):
                _recompile_limit_hit(*found.groups(), _compiling_backend(sys._getframe(1)))
        except Exception as error:  # warnings as errors: say it without breaking Dynamo
            log.warning("%s", error)
        return True


@functools.cache
def _watch_recompile_limit() -> None:
    """Install the filter once, on the logger of Dynamo's module that warns (its name and
    message are the same in torch 2.11 to 2.13; a user who silences Dynamo's warnings
    silences this too)."""
    logging.getLogger("torch._dynamo.convert_frame").addFilter(_RecompileLimitFilter())


def _compiling_backend(frame: Any) -> Callable[..., Any] | None:
    """The backend Dynamo was compiling the refused frame for: the innermost of the
    `compiler_fn` that Dynamo's ``_compile`` holds (torch 2.11 to 2.13), unwrapped from
    torch.compile's wrapper of a named backend; None where it cannot be found."""
    from torch._dynamo.eval_frame import innermost_backend

    while frame is not None:
        if frame.f_code.co_filename.endswith("convert_frame.py") and callable(
            compiler_fn := frame.f_locals.get("compiler_fn")
        ):
            inner = innermost_backend(compiler_fn)
            return getattr(inner, "compiler_fn", inner)  # _TorchCompileWrapper's backend
        frame = frame.f_back
    return None


def _recompile_limit_hit(
    limit: str, function: str, compiling_backend: Callable[..., Any] | None = None
) -> None:
    """Warn once per function and sparse model when the limit was hit inside one, or on a
    function compiled with sparsefx outside any (a compiled training step): the model is
    found as the `self` of a module call on the stack (the frame Dynamo refused to compile
    has not started, so its callers are what is there), the backend in Dynamo's frame
    (`_compiling_backend`; a hit under another backend is not sparsefx's). Not where
    Dynamo raises instead (`fail_on_recompile_limit_hit`), nor for sparsefx's own compiles
    of its graphs (FX code, which run with fullgraph=True and raise too)."""
    if torch._dynamo.config.fail_on_recompile_limit_hit or "<eval_with_key>" in function:
        return
    if compiling_backend is not None and compiling_backend is not backend:
        return
    model = _sparse_model_on_stack(sys._getframe(1))
    if model is None and compiling_backend is None:
        return
    hits = _FUNCTION_LIMIT_HITS if model is None else _LIMIT_HITS.setdefault(model, [])
    if function in hits:
        return
    hits.append(function)
    where = "" if f"{Path(torch.__file__).parent}" in function else f" on {function}"
    inside = "," if model is None else f" inside {type(model).__name__},"
    warnings.warn(
        f"torch._dynamo hit {limit}{where}{inside} compiled "
        "with sparsefx: from now on a call that none of its cached graphs fits runs eagerly "
        "and dense, without sparsefx, so such training steps update every channel and train "
        "no structure. Raise torch._dynamo.config.recompile_limit (each combination of "
        "train/eval, grad mode and input structure compiles its own graph; "
        'TORCH_LOGS="recompiles" lists them), or make the limit an error with '
        "torch._dynamo.config.fail_on_recompile_limit_hit = True",
        stacklevel=2,
    )


def _limit_hits_around(module: nn.Module) -> list[str]:
    """The recompile-limit hits inside models that hold `module` (not those on compiled
    functions outside any model: which models such a function calls is not recorded)."""
    return [
        hit
        for model, hits in list(_LIMIT_HITS.items())
        if any(m is module for m in model.modules())
        for hit in hits
    ]


def _sparse_model_on_stack(frame: Any) -> nn.Module | None:
    """The model with a sparsefx runtime that the innermost module call on the stack belongs
    to (its root, a module inside it, or torch.compile's wrapper of it), or None (also where
    that module belongs to no such model, as a plain model called inside a sparse one)."""
    roots = list(_RUNTIMES.keys())
    while frame is not None and roots:
        caller = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(caller, nn.Module):
            caller = _unwrap(caller)
            return next((r for r in roots if any(m is caller for m in r.modules())), None)
        frame = frame.f_back
    return None


# -- what Dynamo tells us about the graph --------------------------------------------------------

_STATE_SOURCE = re.compile(
    r"^(?P<root>[LG])\['(?P<name>[^']+)'\](?P<index>(?:\[\d+\])*)"
    r"(?P<path>(?:\._modules\['[^']+'\])*)"
    r"\._(?P<kind>parameters|buffers)\['(?P<leaf>[^']+)'\]$"
)
"""A parameter or buffer reached from a frame's local or global: ``L['self']`` or, in a
forward wrapped by a ``*args`` decorator (transformers' ``deprecate_kwarg`` on Llama's),
``L['args'][0]``; then submodules, then the tensor."""
_INDEX = re.compile(r"\[(\d+)\]")
_MODULE_STEP = re.compile(r"\._modules\['([^']+)'\]")


@dataclass
class _DynamoFrame:
    """The Dynamo graph's inputs as sparsefx sees them, and the frame they came from."""

    inputs: list[tuple[InputKind, str]]
    """(kind, name) of each kept graph input: parameters and buffers by their FQN."""
    dropped: list[int]
    """Positions of SymInt inputs (sizes of tensor inputs, recomputed inside the graph)."""
    scalars: list[int]
    """Positions of Python floats passed as 0-d tensors (a Dropout's p that changed between
    calls), inlined as constants: one program per value (`CompiledGraph._program`)."""
    roots: list[nn.Module]
    """The models whose parameters the graph reads (several for a closure): the compiled
    model where the frame is one of its submodules' (`_compiled_model_holding`)."""
    modules: list[nn.Module]
    """The modules the frame itself reads parameters from (their train/eval flag counts)."""
    name: str
    graph_break: str | None
    """Where the graph ends at a graph break ("file:line (reason)"), None if it does not."""
    broken_off: str | None
    """Where a submodule's frame, compiled on its own after a break, starts (same form)."""

    @classmethod
    def current(cls, gm: fx.GraphModule, example_inputs: list[Any]) -> _DynamoFrame:
        """Read the graph inputs' sources and the frame being compiled from Dynamo."""
        if any(True for _ in gm.parameters()):
            raise CaptureError(
                "sparsefx needs parameters as graph inputs; keep "
                "torch._dynamo.config.inline_inbuilt_nn_modules=True (the default)"
            )
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        scopes = {"L": tx.f_locals, "G": tx.f_globals}
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        matches = [_STATE_SOURCE.match(_source_name(node)) for node in placeholders]
        roots: dict[tuple[str, str, str], nn.Module] = {}
        for node, match in zip(placeholders, matches, strict=True):
            if match is not None:
                key = (match["root"], match["name"], match["index"])
                if key not in roots:
                    root = scopes[key[0]][key[1]]
                    for i in _INDEX.findall(key[2]):
                        root = root[int(i)]
                    roots[key] = root
                    _guard_identity(node.meta["grapharg"].source, _INDEX.findall(key[2]))
        frame_modules = [r for r in roots.values() if isinstance(r, nn.Module)]
        owners = {key: _compiled_model_holding(root) for key, root in roots.items()}
        broken_off = None
        for key, owner in owners.items():
            if owner is not None:
                broken_off = (
                    f"{tx.f_code.co_filename}:{tx.f_code.co_firstlineno} "
                    f"({type(roots[key]).__name__}'s forward, which Dynamo compiles on its "
                    "own after a graph break)"
                )
                roots[key] = owner[0]
        prefix = len({id(r) for r in roots.values()}) > 1  # several models: qualify names
        inputs, dropped, scalars = [], [], []
        for position, (node, match, value) in enumerate(
            zip(placeholders, matches, example_inputs, strict=True)
        ):
            if isinstance(value, torch.SymInt | int) and not isinstance(value, bool):
                dropped.append(position)
            elif getattr(node.meta.get("grapharg"), "pass_arg_as_tensor", False):
                scalars.append(position)
            elif match is None:
                inputs.append((InputKind.USER_INPUT, node.name))
            else:
                parts = [*_MODULE_STEP.findall(match["path"]), match["leaf"]]
                owner = owners[(match["root"], match["name"], match["index"])]
                if owner is not None and owner[1]:
                    parts.insert(0, owner[1])
                if prefix:
                    parts.insert(0, match["name"] + "".join(_INDEX.findall(match["index"])))
                kind = InputKind.PARAMETER if match["kind"] == "parameters" else InputKind.BUFFER
                inputs.append((kind, ".".join(parts)))
        reason = getattr(tx.output, "compile_subgraph_reason", None)
        graph_break = None
        if reason is not None and reason.graph_break:
            where = reason.user_stack[-1] if reason.user_stack else None
            location = f"{where.filename}:{where.lineno}" if where else "unknown location"
            graph_break = f"{location} ({str(reason.reason).strip().splitlines()[0]})"
        module_roots = list({id(r): r for r in roots.values() if isinstance(r, nn.Module)}.values())
        name = type(module_roots[0]).__name__ if module_roots else tx.f_code.co_name
        return cls(
            inputs, dropped, scalars, module_roots, frame_modules, name, graph_break, broken_off
        )


def _compiled_model_holding(module: Any) -> tuple[nn.Module, str] | None:
    """The model that torch.compile wrapped and `module`'s path in it, where `module` is a
    submodule whose frame Dynamo compiles on its own (after a graph break inside its
    forward, such as the ``ContextVar.get`` of transformers' output-capturing hooks): read
    from the innermost compiled model whose call is on the Python stack, or in a compiled
    function (a training step), the outermost module that holds it inside the function's
    compiled call. Its graph then belongs to that model, so its layers count in the model's
    one budget and structure; taken as a model of its own, it got a second structure that
    `sparsefx.groups`, `set_masks` and `freeze` on the compiled model never reached."""
    if not isinstance(module, nn.Module):
        return None
    from torch._dynamo.eval_frame import OptimizedModule

    outermost = None
    frame = sys._getframe(1)
    while frame is not None:
        caller = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(caller, OptimizedModule):
            if caller._orig_mod is module:
                return None
            if (found := _path_to(caller._orig_mod, module)) is not None:
                return found
        elif _compile_entry(frame):
            break
        elif isinstance(caller, nn.Module) and caller is not module:
            outermost = _path_to(caller, module) or outermost
        frame = frame.f_back
    return outermost


def _path_to(model: nn.Module, module: nn.Module) -> tuple[nn.Module, str] | None:
    path = next((p for p, m in model.named_modules(remove_duplicate=False) if m is module), None)
    return None if path is None else (model, path)


def _compile_entry(frame: Any) -> bool:
    """Whether `frame` is where a `torch.compile`d callable starts (its ``compile_wrapper``,
    torch 2.11 to 2.13): a model calling the function compiled with sparsefx, from outside,
    is not the function's model. A compiled training step reads its model from a closure,
    so the outermost module on the stack inside the entry is the step's model."""
    code = frame.f_code
    return code.co_name == "compile_wrapper" and code.co_filename.endswith(
        os.path.join("_dynamo", "eval_frame.py")
    )


def _guard_identity(state_source: Any, indices: list[str]) -> None:
    """Make Dynamo's cache entry for this graph hold only for this very root module.

    With `inline_inbuilt_nn_modules` Dynamo guards a module's structure, not its identity,
    and `torch.compile` backends with equal options compare equal: a second instance of the
    same model class would reuse the first one's compiled graph, and with it the first
    one's structure state (its probabilities and masks). An ID_MATCH guard on the root
    (``L['self']``, or ``L['args'][0]`` behind a ``*args`` decorator: not on the ``args``
    tuple, which is new at every call) makes each instance compile its own graphs."""
    from torch._dynamo.guards import GuardBuilder, install_guard

    chain = [state_source]
    while getattr(chain[-1], "base", None) is not None:
        chain.append(chain[-1].base)
    install_guard(chain[-1 - len(indices)].make_guard(GuardBuilder.ID_MATCH))


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return source.name if isinstance(getattr(source, "name", None), str) else ""


def _warn_dense_at_break(frame: _DynamoFrame, dense: list[DenseOp]) -> None:
    """Layers whose output leaves the graph at a break look like output layers: say so."""
    cut = [d.node for d in dense if d.reason.startswith("output layer")]
    if cut:
        warnings.warn(
            f"sparsefx keeps {cut} of {frame.name} dense: their outputs leave the compiled "
            f"graph at a graph break ({frame.graph_break}), so they count as output layers. "
            "If they feed further layers rather than the loss, removing the break may let "
            "sparsefx prune them (torch._dynamo.explain lists breaks; layers writing into a "
            "dense residual stream stay dense either way).",
            stacklevel=2,
        )


def _runtime_for(
    frame: _DynamoFrame, captured: CapturedGraph, analysis: Any, config: SparseConfig
) -> SparseRuntime | None:
    """The model's runtime: shared by all its graphs, created by the first one with groups."""
    for root in frame.roots:
        for where in (frame.graph_break, frame.broken_off):
            if where is not None and where not in _BREAKS.setdefault(root, []):
                _BREAKS[root].append(where)
    breaks = list(dict.fromkeys(b for r in frame.roots for b in _BREAKS.get(r, [])))
    existing = next((_RUNTIMES[r] for r in frame.roots if r in _RUNTIMES), None)
    if not analysis.groups:
        if existing is None and analysis.dense:
            warn_if_nothing_to_prune(frame.name, analysis, graph=True)
        return existing
    if existing is not None:
        if existing.config != config:
            raise CaptureError(
                f"{frame.name} is already compiled with sparsefx options {existing.config}; "
                f"compile each model with one set of options (got {config})"
            )
        if breaks and not {g.name for g in analysis.groups} & {g.name for g in existing.groups}:
            raise CaptureError(
                f"a graph break splits {frame.name}'s prunable layers over several graphs "
                f"(break at {'; '.join(breaks)}). sparsefx samples one structure per step "
                "from one graph: remove the break (torch._dynamo.explain(model)(*inputs) "
                "lists them), or use sparsefx.transform(model, example_inputs)"
            )
        check_same_groups(analysis.groups, existing.groups)
        return existing
    device = next((p.device for r in frame.roots for p in r.parameters()), torch.device("cpu"))
    cost_model = build_cost_model(captured.gm, captured.inputs, analysis.groups)
    try:
        runtime = SparseRuntime(analysis, cost_model, config, device)
    except DensityError as error:
        if not breaks:
            raise
        raise DensityError(
            f"{error}. It counted only the layers of one of {frame.name}'s graphs, which a "
            f"graph break ({'; '.join(breaks)}) separates from the others: if the break splits "
            "its prunable layers, remove it (torch._dynamo.explain(model)(*inputs) lists "
            "breaks), or use sparsefx.transform(model, example_inputs)"
        ) from error
    for root in frame.roots:
        _RUNTIMES[root] = runtime
        if root in _CRITERIA:
            runtime.criterion = _CRITERIA[root]
        carried = root.__dict__.get(_CARRIED)
        if root in _PENDING_STATE:
            runtime.structure.load_state_dict(_PENDING_STATE.pop(root))
        elif carried is not None:  # a copy's: copy.deepcopy, AveragedModel, torch.load
            _load_carried(runtime.structure, carried, frame.name)
        root.__dict__[_CARRIED] = runtime.structure
    return runtime


def _load_carried(structure: StructureState, carried: StructureState, name: str) -> None:
    """Load a copied model's structure snapshot if it was trained under the same options and
    groups; otherwise the copy starts afresh, and says so."""
    if carried.config == structure.config and carried.group_sizes == structure.group_sizes:
        structure.load_state_dict(carried.state_dict())
        return
    warnings.warn(
        f"{name} carries the structure state of the model it was copied from, trained with "
        f"other sparsefx options or groups ({carried.config}); its compile with "
        f"{structure.config} starts a new structure",
        stacklevel=2,
    )


_MANY_PROGRAMS = 8
"""Programs of one compiled graph after which a new float value warns (`_program`)."""

_CARRIED = "_sparsefx_structure"
"""The model attribute (a plain one: not a submodule, so not in its state_dict) holding its
live structure state, so that ``copy.deepcopy(model)``, ``AveragedModel`` and a pickled
``torch.save(model)`` carry a snapshot of it; the registry above holds no copies, and the
copy's first compile loads the snapshot into its new runtime."""


# -- the compiled graph ------------------------------------------------------------------------


@dataclass
class _Program:
    """One static signature of a Dynamo graph: the compact graph and its score graph, each
    compiled by Inductor on first use."""

    captured: CapturedGraph
    graph: fx.GraphModule
    loss_index: int | None
    """Position of the loss among the graph outputs (first floating-point scalar), None where
    the graph returns no loss or wrap_loss's criterion computes it."""
    noises: int
    """Trailing outputs of `graph` that are dropout noise for the score graph to reuse."""
    exact: fx.GraphModule | None = None
    """The exact-count twin of a graph that rounds CPU conv counts (else None): for one
    fixed or eval mask (one shape: the zero channels would be pure cost), and for sampled
    masks whose kept counts recur (`exact_counts_pay`)."""
    pure: fx.GraphModule | None = None
    """The score graph: the pure forward of masks 2..K (built when first needed)."""
    _train: Callable[..., Any] | None = field(default=None, repr=False)
    _train_exact: Callable[..., Any] | None = field(default=None, repr=False)
    _score: Callable[..., Any] | None = field(default=None, repr=False)
    _recurring: RecurringCounts = field(default_factory=RecurringCounts)

    def arguments(self, flat: Sequence[Any], indices: Sequence[Tensor]) -> list[Any]:
        """The compiled graphs' arguments, the user inputs' dynamic dims marked as such."""
        values = iter(flat)
        args = [
            self.captured.constants[target] if kind == InputKind.CONSTANT_TENSOR else next(values)
            for kind, target in self.captured.inputs
        ]
        for position, dims in self._dynamic_dims:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(args[position], dim)
        return args + list(indices)

    @functools.cached_property
    def _dynamic_dims(self) -> list[tuple[int, list[int]]]:
        """(argument position, dims) of each input with sizes Dynamo made dynamic (the
        signatures cover every non-constant input: Dynamo passes parameters as inputs too).
        Marked, the inner compile starts with them symbolic; from concrete first sizes it
        compiled once more at the next new shape (seconds to a minute)."""
        positions = [
            i
            for i, (kind, _) in enumerate(self.captured.inputs)
            if kind != InputKind.CONSTANT_TENSOR
        ]
        return [
            (position, dims)
            for position, signature in zip(positions, self.captured.user_values, strict=True)
            if isinstance(signature, TensorSignature) and (dims := signature.dynamic_dims)
        ]

    def exact_counts_pay(self, indices: Sequence[Tensor]) -> bool:
        """Whether a sampled mask with these kept indices runs `exact` (`RecurringCounts`)."""
        return self.exact is not None and self._recurring.recur(indices)

    def train(self, exact: bool = False) -> Callable[..., Any]:
        """The compact training graph (also the eval graph: mask from the runtime), or with
        `exact` its exact-count twin where there is one; each compiled on first use."""
        if exact and self.exact is not None:
            if self._train_exact is None:
                self._train_exact = _inductor(self.exact)
            return self._train_exact
        if self._train is None:
            self._train = _inductor(self.graph)
        return self._train

    def score(self) -> Callable[..., Any]:
        """The score graph, compiled for inference."""
        if self._score is None:
            self._score = _inductor(self.pure_forward())
        return self._score

    def take_loss_from_criterion(self) -> bool:
        """wrap_loss's criterion computes this graph's loss, not a scalar among its outputs
        (a logits model may return an auxiliary scalar as well), unless that scalar is the
        only output: the score graph then returns every output. Whether this changed it."""
        (output,) = self.graph.graph.find_nodes(op="output")
        if self.loss_index is None or len(output.args[0]) - self.noises == 1:
            return False
        self.loss_index, self.pure, self._score = None, None, None
        return True

    def reused(self, outputs: Sequence[Any]) -> list[Any]:
        """What the score graph returns, from the training graph's `outputs`: the score of
        a mask equal to mask 1 (`samples_agree`)."""
        if self.loss_index is not None:
            return [outputs[self.loss_index].detach()]
        return detached(outputs)

    def pure_forward(self) -> fx.GraphModule:
        """The score graph: only the loss as output when the graph computes one, no
        running-stat updates."""
        if self.pure is None:
            graph = score_graph(self.graph, self.captured.inputs)
            if self.loss_index is not None:
                graph = keep_outputs(graph, [self.loss_index])
            self.pure = graph
        return self.pure


class CompiledGraph:
    """What the backend returns to Dynamo for one graph: runs the sparsefx step protocol.

    With groups: masks for this forward, the compact training graph with mask 1, the score
    graph with masks 2..K, and the structure gradient from the loss output, or counterparts
    for a loss computed later (a criterion from wrap_loss, the next graph after a break).
    Without groups: the graph as Inductor compiles it, plus, when its inputs carry
    counterparts, the same graph under masks 2..K, so a loss computed after a graph break is
    still found.
    """

    def __init__(
        self,
        dynamo_graph: fx.GraphModule,
        frame: _DynamoFrame,
        captured: CapturedGraph,
        analysis: Analysis,
        runtime: SparseRuntime | None,
        config: SparseConfig,
    ):
        self.frame = frame
        self._dynamo_graph = dynamo_graph
        self.runtime = runtime
        self.config = config
        self._roots = [weakref.ref(r) for r in frame.roots]
        self._modules = [weakref.ref(m) for m in frame.modules]
        skipped = {*frame.dropped, *frame.scalars}
        count = len(frame.inputs) + len(skipped)
        self._keep = [i for i in range(count) if i not in skipped]
        self.records: list[GraphRecord] = []
        """What each program rewrote (`sparsefx.explain`, the diff tool)."""
        self._programs: list[_Program] = [self._build(captured, analysis)]

    def _build(self, captured: CapturedGraph, analysis: Analysis) -> _Program:
        groups = self.runtime.groups if self.runtime is not None else []
        on_cpu = self.runtime is not None and self.runtime.structure.probabilities.is_cpu
        multiple = self.config.conv_channel_multiple if on_cpu and captured.training else 1

        def rewrite(conv_channel_multiple: int) -> fx.GraphModule:
            return rewrite_compact(
                copy_graph_module(captured.gm),
                groups,
                sparse_gradients=self.config.sparse_gradients,
                triton_kernels=self.runtime is not None and self.runtime.triton,
                conv_channel_multiple=conv_channel_multiple,
                opaque_convolutions=True,
            )

        graph = rewrite(multiple)
        exact = rewrite(1) if rounds_convolutions(graph) else None
        program = _Program(captured, graph, _loss_index(graph), shared_noise_count(graph), exact)
        record = GraphRecord(
            f"{self.frame.name} graph",
            captured,
            analysis,
            graph,
            program.pure_forward() if self.runtime is not None else None,
            dynamo=self._dynamo_graph,
            graph_break=self.frame.graph_break,
            config=self.config,
        )
        self.records.append(record)
        for root in self.frame.roots:
            _RECORDS.setdefault(root, []).append(record)
        return program

    def _program(self, args: Sequence[Any], flat: list[Any]) -> _Program:
        """The program for these inputs' static shapes and float values. Dynamo's guards
        already hold for them; a dim that export specialised where Dynamo did not, or a new
        value of a float Dynamo passes as a tensor, gets its own capture."""
        spec = self._programs[0].captured.in_spec
        scalars = tuple(float(args[i]) for i in self.frame.scalars)
        for program in self._programs:
            if program.captured.scalars == scalars and program.captured.matches(flat, spec):
                return program
        if len(self._programs) == _MANY_PROGRAMS and scalars:
            warnings.warn(
                f"sparsefx has compiled {_MANY_PROGRAMS} programs of one graph of "
                f"{self.frame.name}, one per value of a float attribute its forward reads (a "
                "Dropout p or BatchNorm momentum that changes every step?): each new value "
                "compiles again",
                stacklevel=2,
            )
        frame = self.frame
        captured = capture_graph(
            self._dynamo_graph, list(args), frame.inputs, frame.dropped, frame.scalars
        )
        analysis = analyze(captured.gm, captured.inputs, prune_streams=self.config.prune_streams)
        if self.runtime is not None:
            check_same_groups(analysis.groups, self.runtime.groups)
        self._programs.append(self._build(captured, analysis))
        return self._programs[-1]

    @property
    def training(self) -> bool:
        modules = [m() for m in self._modules]
        return any(m.training for m in modules if m is not None)

    def __call__(self, *args: Any) -> Any:
        flat = [args[i] for i in self._keep]
        program = self._program(args, flat)
        runtime = self.runtime
        if runtime is None:
            outputs, noises = split_noises(
                program.train()(*program.arguments(flat, [])), program.noises
            )
            self._follow_counterparts(program, flat, outputs, noises)
            return outputs
        masks, step = runtime.masks_for_forward(self.training)
        indices = runtime.structure.indices
        kept = indices(masks[0])
        train = program.train(exact=step is None or program.exact_counts_pay(kept))
        outputs, noises = split_noises(
            train(*program.arguments(flat, _mark_dynamic(kept))), program.noises
        )
        if step is not None:
            if runtime.criterion is not None and program.take_loss_from_criterion():
                # the record shows the score graph the steps run
                self.records[self._programs.index(program)].score = program.pure_forward()
            with torch.no_grad():
                if samples_agree(masks):
                    others = [program.reused(outputs)] * (len(masks) - 1)
                else:
                    score = program.score()
                    others = [
                        score(*program.arguments(flat, _mark_dynamic(indices(m))), *noises)
                        for m in masks[1:]
                    ]
            self._finish(program, step, outputs, others)
        return outputs

    def _finish(
        self, program: _Program, step: SampledStep, outputs: list[Any], others: list[Any]
    ) -> None:
        """Attach the structure gradient to the loss output, else hand the outputs'
        counterparts on, and make a backward that never met the loss fail loudly."""
        if program.loss_index is not None:
            i = program.loss_index
            outputs[i] = step.runtime.attach_structure_gradient(
                step, outputs[i], [o[0] for o in others]
            )
            return
        register_counterparts(step, outputs, others)
        if step.runtime.criterion is not None:
            message = functools.partial(unseen_loss_message, self.frame.name)
        else:
            message = lambda: missing_loss_message(self.frame.name, self._where())  # noqa: E731
        fail_unless_resolved(step, outputs, message)

    def _follow_counterparts(
        self, program: _Program, flat: list[Any], outputs: list[Any], noises: list[Tensor]
    ) -> None:
        found = counterparts(list(flat))
        if found is None:
            return
        step, other_inputs = found
        with torch.no_grad():
            score = program.score()
            others = [score(*program.arguments(inputs, []), *noises) for inputs in other_inputs]
        if program.loss_index is None:
            register_counterparts(step, outputs, others)
        else:
            i = program.loss_index
            outputs[i] = step.runtime.attach_structure_gradient(
                step, outputs[i], [o[0] for o in others]
            )
            if step.runtime not in _LOSS_AFTER_BREAK:
                _LOSS_AFTER_BREAK.add(step.runtime)

    def _where(self) -> str:
        """Why no loss was found: a graph break, and, where a graph after it computed the
        loss in earlier steps, why it did not this time (Dynamo ran that code eagerly)."""
        roots = [root for r in self._roots if (root := r()) is not None]
        breaks = list(dict.fromkeys(b for root in roots for b in _BREAKS.get(root, [])))
        detail = " from its compiled graph"
        if breaks:
            detail += (
                f" and the loss computed after a graph break ({'; '.join(breaks)}) was not "
                "derived from that graph's outputs"
            )
        if self.runtime not in _LOSS_AFTER_BREAK:
            return detail
        if hits := [hit for root in roots for hit in _limit_hits_around(root)]:
            cause = (
                f"Dynamo hit its recompile limit on {', '.join(dict.fromkeys(hits))} and runs "
                "calls that no cached graph fits eagerly. Raise "
                "torch._dynamo.config.recompile_limit"
            )
        else:
            cause = (
                "Dynamo runs a function eagerly for good once one call of it traced no graph "
                "(pytorch/pytorch#144820), as a call without labels does where the loss code "
                "after the break is all that depends on them. Pass labels in every call (in "
                "eval too), or return logits and compute the loss with sparsefx.wrap_loss"
            )
        return (
            f"{detail}: the graph after the break that computed the loss in earlier steps did "
            f"not run in this one, because {cause}"
        )


def _loss_index(graph: fx.GraphModule) -> int | None:
    """The first floating-point scalar output (the loss by the conventions of Hugging Face,
    nanoGPT and loss closures), or None for a graph that returns logits."""
    (output,) = graph.graph.find_nodes(op="output")
    for i, node in enumerate(output.args[0]):
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
            return i
    return None


def _mark_dynamic(indices: list[Tensor]) -> list[Tensor]:
    """Kept-channel counts change every step: compile their lengths as symbols."""
    for index in indices:
        torch._dynamo.maybe_mark_dynamic(index, 0)
    return indices


def _inductor(graph: fx.GraphModule) -> Callable[..., Any]:
    """AOTAutograd + Inductor on a sparsefx graph, at its first call.

    While Dynamo compiles a frame it marks the code of every GraphModule generated meanwhile
    as never-to-trace (so that it does not trace its own output); a graph rewritten inside the
    backend is such a module, and so are the bodies of its higher-order ops (HF M2M100's
    ``@torch.no_grad()`` positions), so they are regenerated here, outside that compile.

    Layout optimization is off: on CPU Inductor turns it on for any graph with a convolution
    (a dense stem or shortcut), and AOTAutograd then restrides the backward's inputs to the
    forward's concrete strides, which specialises every kept-channel count and recompiles at
    each new mask.

    Every call (Dynamo compiles, and recompiles, inside calls) runs under `ops_cache_tag`.

    The graph's `forward` is compiled, not the module: GraphModule.__call__'s error handler
    walks the traceback with a generator, which under this fullgraph compile's frame hook
    raised "Attempt to trace generator" in place of any error the compiled code raised."""
    _alpha_as_mul(graph)
    _avg_pool_divisors_as_window_counts(graph)
    for module in graph.modules():  # with the bodies of higher-order ops (a no_grad region)
        if isinstance(module, _LazyGraphModule):
            module.real_recompile()  # a lazy module's forward is a function Dynamo skips
        elif isinstance(module, fx.GraphModule):
            module.recompile()
    compiled = torch.compile(
        graph.forward, backend="inductor", fullgraph=True, options={"layout_optimization": False}
    )
    tag = ops_cache_tag()

    def run(*args: Any) -> Any:
        user_tag = torch.compiler.config.cache_key_tag
        with torch.compiler.config.patch(cache_key_tag=f"{user_tag}{tag}"):
            return compiled(*args)

    return run


_WITH_ALPHA = frozenset(
    {
        torch.ops.aten.add.Tensor,
        torch.ops.aten.add_.Tensor,
        torch.ops.aten.sub.Tensor,
        torch.ops.aten.sub_.Tensor,
    }
)


def _alpha_as_mul(graph: fx.GraphModule) -> None:
    """``add``/``sub`` with an alpha other than 1 as the op on ``other * alpha``: Inductor
    on CPU (torch 2.13) compiles ``torch.add(x @ w.T, b, alpha=2.0)`` to wrong values (off
    by ~2 on random inputs, also without sparsefx), so such a model trained silently wrong
    on the compiled path."""
    for node in graph.graph.nodes:
        if node.target not in _WITH_ALPHA:
            continue
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if alpha == 1:
            continue
        with graph.graph.inserting_before(node):
            scaled = graph.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[1], alpha))
        node.args, node.kwargs = (node.args[0], scaled), {}


_AVG_POOLS = {  # the op and its spatial dims
    torch.ops.aten.avg_pool1d.default: 1,
    torch.ops.aten.avg_pool2d.default: 2,
    torch.ops.aten.avg_pool3d.default: 3,
}


def _avg_pool_divisors_as_window_counts(graph: fx.GraphModule) -> None:
    """Average pools with ``ceil_mode`` and ``count_include_pad`` (the pairing that
    `nn.AvgPool2d(k, ceil_mode=True)` defaults to) as ``count_include_pad=False`` pools that
    count the same elements. Inductor's backward divides a window that ceil_mode lets
    overhang the input by the whole kernel instead of the clipped window
    (pytorch/pytorch#198119, torch 2.11 to 2.13, pools of 1 to 3 dims): compiled, HF
    EfficientNet's `AvgPool2d(640, ceil_mode=True)` on an 8x8 map trained on gradients
    6400x too small. Without padding the flag alone changes; a padded pool whose last
    window overhangs pools its explicitly zero-padded input instead
    (`_pool_padded_explicitly`), and one whose windows stay inside the padded input is
    left alone (there the flag would change which elements count)."""
    for node in list(graph.graph.nodes):
        if node.target not in _AVG_POOLS:
            continue
        names = [a.name for a in node.target._schema.arguments]
        args = {a.name: a.default_value for a in node.target._schema.arguments}
        args.update(zip(names, node.args, strict=False), **node.kwargs)
        if not args["ceil_mode"] or not args["count_include_pad"]:
            continue
        if args.get("divisor_override") is not None:
            continue
        if not any(_per_dim(args["padding"], 1)):
            args["count_include_pad"] = False
            node.args, node.kwargs = tuple(args[name] for name in names), {}
            continue
        overhangs = _overhangs(node, args)
        if overhangs is None:
            raise CaptureError(
                f"{node.name}: an average pool with ceil_mode=True, count_include_pad=True and "
                "padding, on sizes that are not fixed: where its last window overhangs the "
                "input Inductor computes its gradient wrong (pytorch/pytorch#198119), and "
                "whether it does depends on the sizes. Use sparsefx.transform(model, "
                "example_inputs), or count_include_pad=False or ceil_mode=False on this pool"
            )
        if overhangs:
            _pool_padded_explicitly(graph.graph, node, args, names)


def _pool_padded_explicitly(
    graph: fx.Graph, node: fx.Node, args: dict[str, Any], names: list[str]
) -> None:
    """Pad with zeros, then pool without padding and without counting padding: the same
    windows, each divided by its part inside the padded input, as the original pool
    divides it. Unpadded pooling may add a last window that starts in the right-hand
    padding (ceil_mode keeps only windows that start inside the input or its left
    padding), never in a dim whose last window overhangs (that window is the first to
    reach past the padded input), but in another dim it can: each dim is sliced to the
    original's size. Checked in float64 against the original's values and gradients for
    the 519 overhanging 1- to 3-d pools of kernels up to 7, strides up to 4 and paddings
    up to k // 2 on sizes up to 11, and 8731 2-d ones with other sizes per dim."""
    dims = _AVG_POOLS[node.target]  # type: ignore[index]
    padding = _per_dim(args["padding"], dims)
    pads = [p for d in reversed(range(dims)) for p in (padding[d], padding[d])]
    args.update(padding=[0] * dims, count_include_pad=False)
    with graph.inserting_before(node):
        result = graph.call_function(
            torch.ops.aten.constant_pad_nd.default, (node.args[0], pads, 0.0)
        )
        result = graph.call_function(node.target, (result, *(args[n] for n in names[1:])))
        for d, size in enumerate(node.meta["val"].shape[-dims:]):
            result = graph.call_function(torch.ops.aten.slice.Tensor, (result, d - dims, 0, size))
    node.replace_all_uses_with(result)
    graph.erase_node(node)


def _per_dim(value: int | Sequence[int], dims: int) -> list[int]:
    """A pool argument per spatial dim (aten takes one value for all)."""
    values = [value] if isinstance(value, int) else list(value)
    return values * dims if len(values) == 1 else values


def _overhangs(node: fx.Node, args: dict[str, Any]) -> bool | None:
    """Whether a ceil_mode pool's last window in some dim reaches past the padded input
    (None where the sizes are not plain ints, or not recorded)."""
    dims = _AVG_POOLS[node.target]  # type: ignore[index]
    kernel = _per_dim(args["kernel_size"], dims)
    stride = _per_dim(args["stride"] or kernel, dims)
    padding = _per_dim(args["padding"], dims)
    values = node.args[0].meta.get("val"), node.meta.get("val")  # type: ignore[union-attr]
    if any(v is None for v in values):
        return None
    inputs, outputs = (v.shape[-dims:] for v in values)
    if not all(isinstance(size, int) for size in (*inputs, *outputs)):
        return None
    return any(
        (outputs[d] - 1) * stride[d] + kernel[d] > inputs[d] + 2 * padding[d] for d in range(dims)
    )


@functools.cache
def ops_cache_tag() -> str:
    """A cache-key tag that changes with the source of sparsefx's custom ops.

    AOTAutograd's cache keys a compiled forward and backward by the forward graph, in which a
    sparsefx op is only a name: the backward its autograd formula traced (and the shapes its
    fake kernel gave) are not in the key. Without this tag a cache written by an older
    sparsefx replays that version's backward, which may call an op that no longer exists."""
    sources = sorted((Path(__file__).parent / "kernels").glob("*.py"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources))
    return f"sparsefx-ops-{digest.hexdigest()[:16]}"
