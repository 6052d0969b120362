"""Custom ``torch.autograd.Function`` s in a captured model.

``torch.export`` records a Function's forward as ops, so a captured graph differentiates the
forward and never calls the Function's backward. Where that backward is the forward's
gradient (Bloom's GeLU: a hand-written derivative) the two agree, and the forward's ops stay
in the graph, where the analysis sees through them. Where it is not (a straight-through
estimator, a gradient reversal, YOSO's approximate attention gradient) the application
becomes one opaque op, ``sparsefx::autograd_function``, that runs the Function itself: its
forward as the model does, its backward by running the forward again under autograd and
calling the Function's backward through it (what activation checkpointing does). Which case
applies is probed once per application while export traces it, on seeded random inputs of
the traced sizes. An application whose backward differs but that cannot become the op (its
arguments hold objects other than tensors and plain constants, it returns something other
than tensors, it writes into its inputs, or its forward is random) keeps the forward's
ops, and capture warns. The compiled path meets Dynamo's ``autograd_function_apply`` (the
Function's forward and backward as traced graphs) instead: `dynamo_functions` rewrites it
the same way, before the re-export.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, fx
from torch.autograd.function import _SingleLevelFunction
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

__all__ = [
    "autograd_function",
    "custom_functions",
    "dynamo_functions",
    "inlined_autograd_function",
]

_APPLY = torch.autograd.Function.__dict__["apply"]
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]
_AUTOGRAD_FUNCTION_APPLY = torch.ops.higher_order.autograd_function_apply
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, Enum)
_TENSOR = object()
"""Where an application's flattened arguments hold a tensor (an input of the op)."""


@dataclass(frozen=True)
class _FunctionApply:
    """``Function.apply`` of a custom Function class, as torch runs it."""

    function: type[torch.autograd.Function]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _APPLY.__func__(self.function, *args, **kwargs)


@dataclass(frozen=True)
class _DynamoApply:
    """Dynamo's ``autograd_function_apply``: a custom Function's forward and backward as the
    graphs Dynamo traced them (the compiled path), called eagerly."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    options: tuple[tuple[str, Any], ...]

    def __call__(self, *tensors: Tensor) -> Any:
        return _AUTOGRAD_FUNCTION_APPLY(self.forward, self.backward, *tensors, **dict(self.options))

    def forward_ops(self) -> fx.GraphModule:
        """The forward graph as ops that record gradients, returning the outputs alone (Dynamo
        traced it under no_grad, returning ``(outputs, saved tensors)``)."""
        gm = fx.GraphModule(self.forward, copy.deepcopy(self.forward.graph))
        for node in list(gm.graph.nodes):
            if node.target is torch._C._set_grad_enabled:
                gm.graph.erase_node(node)
        (output,) = gm.graph.find_nodes(op="output")
        output.args = (output.args[0][0],)
        gm.recompile()
        return gm


@dataclass(frozen=True)
class _Application:
    """One way a model applies a Function: how to apply it, the tree of its arguments, and
    the constants among them (`_TENSOR` where the op passes a tensor)."""

    function: _FunctionApply | _DynamoApply
    arguments: pytree.TreeSpec
    leaves: tuple[Any, ...]
    outputs: pytree.TreeSpec
    read: tuple[int, ...] | None = None
    """The outputs the model reads, where it does not read them all (torch 2.11's Dynamo
    returns the forward's intermediates after its outputs)."""

    @property
    def holds_constants_only(self) -> bool:
        """Whether the op may hold the arguments that are not tensors: an object (a module,
        a context) could hold tensors the op would not see as its inputs."""
        return all(leaf is _TENSOR or isinstance(leaf, _CONSTANTS) for leaf in self.leaves)

    def forward_ops(self, inputs: list[Tensor]) -> Callable[[list[Tensor]], list[Tensor]]:
        """The forward as the ops a captured graph would differentiate."""
        if isinstance(self.function, _DynamoApply):
            gm = self.function.forward_ops()
            return lambda tensors: list(gm(*tensors))
        traced = make_fx(lambda *tensors: self(tensors))(*inputs)
        return lambda tensors: traced(*tensors)

    def __call__(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        given = iter(tensors)
        leaves = [next(given) if leaf is _TENSOR else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.arguments)
        with _applying_unwrapped():
            return pytree.tree_leaves(self.function(*args, **kwargs))


_APPLICATIONS: list[_Application] = []
"""Every application that became the op in this process, the op's ``key`` indexing it."""


def _key(application: _Application) -> int:
    if application not in _APPLICATIONS:
        _APPLICATIONS.append(application)
    return _APPLICATIONS.index(application)


def _application(key: int) -> _Application:
    if not 0 <= key < len(_APPLICATIONS):
        raise RuntimeError(
            f"sparsefx::autograd_function {key} is not known to this process: a graph that "
            "calls a custom autograd.Function runs only in the process that captured it. "
            "Transform the model again here."
        )
    return _APPLICATIONS[key]


@torch.library.custom_op("sparsefx::autograd_function", mutates_args=())
def autograd_function(tensors: list[Tensor], key: int) -> list[Tensor]:
    """The application `key` of a custom Function to `tensors`: the Function's forward, and
    in backward its own backward (`_backward`)."""
    with torch.no_grad():
        outputs = _application(key)(tensors)
    return [_unaliased(out, [*tensors, *outputs[:i]]) for i, out in enumerate(outputs)]


@autograd_function.register_fake
def _(tensors: list[Tensor], key: int) -> list[Tensor]:
    with torch.no_grad():
        return [out.clone() for out in _application(key)(tensors)]


@torch.library.custom_op("sparsefx::autograd_function_backward", mutates_args=())
def autograd_function_backward(
    tensors: list[Tensor], grads: list[Tensor], key: int
) -> list[Tensor]:
    """The gradients the Function's backward gives `tensors` (zeros where it gives none),
    through its forward run again under autograd."""
    inputs = [t.detach().requires_grad_(_differentiable(t)) for t in tensors]
    with torch.enable_grad():
        outputs = _application(key)(inputs)
    wrt = [t for t in inputs if t.requires_grad]
    pairs = [(out, grad) for out, grad in zip(outputs, grads, strict=True) if out.requires_grad]
    found = iter(
        torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
        if pairs and wrt
        else [None] * len(wrt)
    )
    gradients = [next(found) if t.requires_grad else None for t in inputs]
    return [
        torch.zeros_like(t) if g is None else _unaliased(g, [*tensors, *grads])
        for t, g in zip(tensors, gradients, strict=True)
    ]


@autograd_function_backward.register_fake
def _(tensors: list[Tensor], grads: list[Tensor], key: int) -> list[Tensor]:
    return [torch.empty_like(t) for t in tensors]


def _setup(ctx: Any, inputs: tuple[list[Tensor], int], output: list[Tensor]) -> None:
    tensors, ctx.key = inputs
    ctx.save_for_backward(*tensors)


def _backward(ctx: Any, grads: list[Tensor]) -> tuple[list[Tensor | None], None]:
    tensors = list(ctx.saved_tensors)
    found = autograd_function_backward(tensors, list(grads), ctx.key)
    return [g if _differentiable(t) else None for g, t in zip(found, tensors, strict=True)], None


autograd_function.register_autograd(_backward, setup_context=_setup)


def inlined_autograd_function(tensors: list[Tensor], key: int) -> list[Tensor]:
    """The op as the Function's forward ops (a decomposition for inference programs, where
    no backward runs and the op's process-local key must not remain)."""
    return _application(key)(tensors)


def _differentiable(t: Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _unaliased(out: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """A custom op may not return a view of its inputs (an identity forward does) or of
    another of its outputs."""
    storage = out.untyped_storage().data_ptr()
    if any(t.untyped_storage().data_ptr() == storage for t in tensors):
        return out.clone()
    return out


_local = threading.local()


@contextlib.contextmanager
def _applying_unwrapped() -> Iterator[None]:
    """Apply Functions as torch does, inside the op and the probe."""
    previous = getattr(_local, "unwrapped", False)
    _local.unwrapped = True
    try:
        yield
    finally:
        _local.unwrapped = previous


@contextlib.contextmanager
def custom_functions() -> Iterator[set[str]]:
    """While export traces a model: each custom Function (not torch's or sparsefx's) whose
    backward is not its forward's gradient becomes `autograd_function`. Yields the names of
    those that keep their forward's ops anyway (capture warns about them)."""
    inlined: set[str] = set()

    def applying(cls: type[torch.autograd.Function], *args: Any, **kwargs: Any) -> Any:
        torch_apply = _C_APPLY.__get__(None, cls)
        if getattr(_local, "unwrapped", False) or cls.__module__.startswith(
            ("torch.", "sparsefx.")
        ):
            return torch_apply(*args, **kwargs)
        leaves, arguments = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        if not any(t.requires_grad for t in tensors):  # its backward never runs
            return torch_apply(*args, **kwargs)
        application = _traced_application(_FunctionApply(cls), arguments, leaves, tensors)
        if application is not None:
            verdict = _probe(application, tensors)
            if verdict is _Verdict.EXACT:
                return torch_apply(*args, **kwargs)
            if verdict is _Verdict.OTHER and application.holds_constants_only:
                outputs = autograd_function(tensors, _key(application))
                return pytree.tree_unflatten(outputs, application.outputs)
        inlined.add(f"{cls.__module__}.{cls.__qualname__}")
        return torch_apply(*args, **kwargs)

    # Function.apply ends in super().apply, which finds this before torch's C apply: it sees
    # an apply bound before capture (``ste = StraightThrough.apply`` at import) too
    previous = _SingleLevelFunction.__dict__.get("apply")
    _SingleLevelFunction.apply = classmethod(applying)  # type: ignore[attr-defined]
    try:
        yield inlined
    finally:
        if previous is None:
            del _SingleLevelFunction.apply  # type: ignore[attr-defined]
        else:
            _SingleLevelFunction.apply = previous  # type: ignore[attr-defined]


def _traced_application(
    function: _FunctionApply,
    arguments: pytree.TreeSpec,
    leaves: list[Any],
    tensors: list[Tensor],
) -> _Application | None:
    """The application as the op would run it, from a run on the traced (fake) tensors that
    export does not record; None where the op cannot run it: an output that is not a
    tensor, or an input the forward writes into (``mark_dirty``)."""
    constants = tuple(_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in leaves)
    versions = [t._version for t in tensors]
    try:
        with _disable_current_modes(), _applying_unwrapped(), torch.no_grad():
            args, kwargs = pytree.tree_unflatten(leaves, arguments)
            outputs, spec = pytree.tree_flatten(function(*args, **kwargs))
    except Exception:
        return None
    if not outputs or not all(isinstance(out, Tensor) for out in outputs):
        return None
    if [t._version for t in tensors] != versions:
        return None
    return _Application(function, arguments, constants, spec)


class _Verdict(Enum):
    EXACT = "the backward gives the forward's gradient"
    OTHER = "the backward gives another gradient, or the probe could not tell"
    RANDOM = "the forward draws random numbers, which a backward run again would redraw"


def _probe(application: _Application, traced: list[Tensor]) -> _Verdict:
    """Compare the Function's backward with its forward's gradient on seeded random inputs
    of the traced sizes, without touching the caller's random state (a mask as random bits).
    Integer inputs cannot be drawn meaningfully (indices): such a Function is not probed,
    and becomes the op, as does one whose forward's ops autograd cannot differentiate (an
    in-place write into a saved output: SEW-D's XSoftmax)."""
    if not all(t.is_floating_point() or t.dtype is torch.bool for t in traced):
        return _Verdict.OTHER
    devices = sorted({t.device.index or 0 for t in traced if t.device.type == "cuda"})
    with (
        _disable_current_modes(),
        _applying_unwrapped(),
        torch.random.fork_rng(devices=devices, device_type="cuda"),
    ):
        generator = torch.Generator().manual_seed(0)
        inputs = [_drawn(t, generator) for t in traced]
        try:
            return _compare(application, traced, inputs, generator)
        except Exception:
            return _Verdict.OTHER


def _compare(
    application: _Application,
    traced: list[Tensor],
    inputs: list[Tensor],
    generator: torch.Generator,
) -> _Verdict:
    wrt = [i for i, t in enumerate(traced) if t.requires_grad]
    torch.manual_seed(0)
    forward_ops = application.forward_ops(inputs)
    given, outputs = _run(application, inputs, wrt)
    read = range(len(outputs)) if application.read is None else application.read
    cotangents = [
        _drawn(out, generator) if i in read else torch.zeros_like(out)
        for i, out in enumerate(outputs)
    ]
    backward = _gradients(given, outputs, wrt, cotangents)
    given_again, outputs_again = _run(forward_ops, inputs, wrt)
    forward = _gradients(given_again, outputs_again, wrt, cotangents)
    if all(_close(outputs[i], outputs_again[i]) for i in read) and all(
        map(_close, backward, forward)
    ):
        return _Verdict.EXACT
    torch.manual_seed(1)
    redrawn = application([t.detach() for t in inputs])
    if not all(_close(outputs[i], redrawn[i]) for i in read):
        return _Verdict.RANDOM
    return _Verdict.OTHER


def _run(
    run: Callable[[list[Tensor]], list[Tensor]], inputs: list[Tensor], wrt: list[int]
) -> tuple[list[Tensor], list[Tensor]]:
    """`run` on fresh leaves of `inputs` (those at `wrt` requiring grad), from seed 0."""
    given = [t.detach().requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    torch.manual_seed(0)
    with torch.enable_grad():
        return given, run(given)


def _gradients(
    given: list[Tensor], outputs: list[Tensor], wrt: list[int], cotangents: list[Tensor]
) -> list[Tensor]:
    """The gradients of the inputs at `wrt` (zeros where none reaches them)."""
    pairs = [(out, c) for out, c in zip(outputs, cotangents, strict=True) if out.requires_grad]
    leaves = [given[i] for i in wrt]
    found = (
        torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], allow_unused=True)
        if pairs
        else [None] * len(leaves)
    )
    return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, found, strict=True)]


def _drawn(traced: Tensor, generator: torch.Generator) -> Tensor:
    """A random tensor like a traced one: normal values, or random bits for a mask."""
    shape = [_example_size(size) for size in traced.shape]
    if traced.dtype is torch.bool:
        drawn = torch.rand(shape, generator=generator) < 0.5
    else:
        drawn = torch.randn(shape, generator=generator, dtype=traced.dtype)
    return drawn.to(traced.device)


def _example_size(size: int | torch.SymInt) -> int:
    """A traced size's example value, read without adding a guard."""
    if isinstance(size, int):
        return size
    if size.node.hint is None:
        raise ValueError(f"size {size} depends on data")
    return int(size.node.hint)


def _close(actual: Tensor, expected: Tensor) -> bool:
    """Equal up to the rounding of two formulas for one derivative."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    tolerance = max(1e-3, 16 * torch.finfo(expected.dtype).eps)
    return torch.allclose(actual, expected, rtol=tolerance, atol=tolerance * scale + 1e-12)


def dynamo_functions(gm: fx.GraphModule) -> list[str]:
    """Rewrite each ``autograd_function_apply`` of a Dynamo graph (a custom Function, as the
    compiled path sees it) as `custom_functions` does at export: the forward's ops where the
    backward is their gradient, else `autograd_function`. Returns the names of those it
    cannot rewrite: a forward that draws random numbers, one that writes in place (torch
    2.11's Dynamo returns the written tensor twice, and its backward then misreads them),
    an operand that is not a tensor."""
    refused = []
    for node in list(gm.graph.find_nodes(op="call_function", target=_AUTOGRAD_FUNCTION_APPLY)):
        forward, backward = (getattr(gm, arg.target) for arg in node.args[:2])  # type: ignore[union-attr, arg-type]
        operands = list(node.args[2:])
        traced = [getattr(arg, "meta", {}).get("example_value") for arg in operands]
        outputs = node.meta.get("example_value")
        if (
            not all(isinstance(t, Tensor) for t in traced)
            or not isinstance(outputs, tuple)
            or _writes_in_place(forward)
        ):
            refused.append(node.name)
            continue
        function = _DynamoApply(forward, backward, tuple(node.kwargs.items()))
        read = [user.args[1] for user in node.users if user.target is operator.getitem]
        application = _Application(
            function, pytree.tree_flatten((tuple(traced), {}))[1], (_TENSOR,) * len(traced),
            pytree.tree_flatten(outputs)[1],
            tuple(read) if len(read) == len(node.users) else None,  # type: ignore[arg-type]
        )  # fmt: skip
        verdict = _Verdict.EXACT if not any(t.requires_grad for t in traced) else None
        verdict = verdict or _probe(application, traced)  # type: ignore[arg-type]
        if verdict is _Verdict.RANDOM:
            refused.append(node.name)
            continue
        with gm.graph.inserting_before(node):
            if verdict is _Verdict.EXACT:
                name = f"{node.args[0].target}_forward_ops"  # type: ignore[union-attr]
                gm.add_submodule(name, function.forward_ops())
                replacement = gm.graph.call_module(name, tuple(operands))
            else:
                replacement = gm.graph.call_function(
                    autograd_function._opoverload, (operands, _key(application))
                )
        bodies = node.args[:2]
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        for body in bodies:  # not a dead-code pass: Dynamo's in-place ops look dead
            if not body.users:  # type: ignore[union-attr]
                gm.graph.erase_node(body)  # type: ignore[arg-type]
        gm.recompile()
    return refused


def _writes_in_place(forward: fx.GraphModule) -> bool:
    """Whether Dynamo's traced forward calls an in-place method or function (``x.add_``)."""
    return any(
        (node.op == "call_method" and str(node.target).endswith("_"))
        or (node.op == "call_function" and getattr(node.target, "__name__", "").endswith("_"))
        for node in forward.graph.nodes
        if not str(getattr(node.target, "__name__", node.target)).startswith("_")
    )
