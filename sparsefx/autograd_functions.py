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
ops, and capture warns.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["autograd_function", "custom_functions", "inlined_autograd_function"]

_APPLY = torch.autograd.Function.__dict__["apply"]
_CONSTANTS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, Enum)
_TENSOR = object()
"""Where an application's flattened arguments hold a tensor (an input of the op)."""


@dataclass(frozen=True)
class _Application:
    """One way a model applies a Function: the class, the tree of its arguments, and the
    constants among them (`_TENSOR` where the op passes a tensor)."""

    function: type[torch.autograd.Function]
    arguments: pytree.TreeSpec
    leaves: tuple[Any, ...]
    outputs: pytree.TreeSpec

    @property
    def holds_constants_only(self) -> bool:
        """Whether the op may hold the arguments that are not tensors: an object (a module,
        a context) could hold tensors the op would not see as its inputs."""
        return all(leaf is _TENSOR or isinstance(leaf, _CONSTANTS) for leaf in self.leaves)

    def __call__(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        given = iter(tensors)
        leaves = [next(given) if leaf is _TENSOR else leaf for leaf in self.leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self.arguments)
        with _applying_unwrapped():
            return pytree.tree_leaves(_APPLY.__func__(self.function, *args, **kwargs))


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
        return [_unaliased(out, tensors) for out in _application(key)(tensors)]


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
    """A custom op may not return a view of its inputs (an identity forward does)."""
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
        if getattr(_local, "unwrapped", False) or cls.__module__.startswith(
            ("torch.", "sparsefx.")
        ):
            return _APPLY.__func__(cls, *args, **kwargs)
        leaves, arguments = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        if not any(t.requires_grad for t in tensors):  # its backward never runs
            return _APPLY.__func__(cls, *args, **kwargs)
        application = _traced_application(cls, arguments, leaves, tensors)
        if application is not None:
            verdict = _probe(application, tensors)
            if verdict is _Verdict.EXACT:
                return _APPLY.__func__(cls, *args, **kwargs)
            if verdict is _Verdict.OTHER and application.holds_constants_only:
                outputs = autograd_function(tensors, _key(application))
                return pytree.tree_unflatten(outputs, application.outputs)
        inlined.add(f"{cls.__module__}.{cls.__qualname__}")
        return _APPLY.__func__(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(applying)  # type: ignore[method-assign, assignment]
    try:
        yield inlined
    finally:
        torch.autograd.Function.apply = _APPLY  # type: ignore[method-assign]


def _traced_application(
    cls: type[torch.autograd.Function],
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
            outputs, spec = pytree.tree_flatten(_APPLY.__func__(cls, *args, **kwargs))
    except Exception:
        return None
    if not outputs or not all(isinstance(out, Tensor) for out in outputs):
        return None
    if [t._version for t in tensors] != versions:
        return None
    return _Application(cls, arguments, constants, spec)


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
    forward_ops = make_fx(lambda *tensors: application(tensors))(*inputs)
    given, outputs = _run(application, inputs, wrt)
    cotangents = [_drawn(out, generator) for out in outputs]
    backward = _gradients(given, outputs, wrt, cotangents)
    given_again, outputs_again = _run(lambda tensors: forward_ops(*tensors), inputs, wrt)
    forward = _gradients(given_again, outputs_again, wrt, cotangents)
    if all(map(_close, outputs, outputs_again)) and all(map(_close, backward, forward)):
        return _Verdict.EXACT
    torch.manual_seed(1)
    if not all(map(_close, outputs, application([t.detach() for t in inputs]))):
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
