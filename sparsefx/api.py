"""The public functions of sparsefx (re-exported by ``sparsefx/__init__.py``)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from sparsefx import compiled
from sparsefx.analysis import Group, analyze
from sparsefx.autograd_functions import autograd_function, inlined_autograd_function
from sparsefx.capture import capture, distinct_inputs, eval_mode
from sparsefx.config import SparseConfig, check_int, resolve_config
from sparsefx.kernels import compact, group_norm_direct
from sparsefx.passes import copy_graph_module, rewrite_compact
from sparsefx.passes.export import (
    fold_constants,
    inline_state,
    rebuild_sequential,
    unsupported_layers,
)
from sparsefx.policy import round_group_counts
from sparsefx.runtime import (
    TRANSFORMED,
    SparseModule,
    SparseRuntime,
    check_same_groups,
    clone_tensors,
    find_loss,
    wrap_criterion,
)
from sparsefx.tools.report import build_report

__all__ = [
    "compact_module",
    "explain",
    "export",
    "freeze",
    "groups",
    "load_structure_state",
    "masks",
    "probabilities",
    "set_masks",
    "stats",
    "structure_state",
    "transform",
    "unfreeze",
    "wrap_loss",
]


def transform(
    model: nn.Module,
    example_inputs: Any,
    *,
    density: float | None = None,
    config: SparseConfig | None = None,
    example_kwargs: dict[str, Any] | None = None,
) -> SparseModule:
    """Capture `model` and return a module that trains it with structured sparsity.

    The result shares `model`'s parameters, so an optimizer built on ``model.parameters()``
    keeps working. Example::

        smodel = sparsefx.transform(model, (torch.randn(8, 512),), density=0.1)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"transform expects an nn.Module, got {type(model).__name__}")
    config = resolve_config(density, config)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise TypeError("example_kwargs must be a dict of keyword arguments for forward")
    _warn_if_checkpointing(model)
    sparse = SparseModule(model, args, dict(example_kwargs or {}), config)
    TRANSFORMED.add(model)
    return sparse


def _warn_if_checkpointing(model: nn.Module) -> None:
    """Export traces through activation checkpointing, so the captured graph saves every
    activation: say so rather than lose the memory saving silently. Found by transformers'
    flag (`gradient_checkpointing_enable()` sets it on the layers that checkpoint)."""
    if any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules()):
        warnings.warn(
            f"{type(model).__name__} has gradient checkpointing enabled, which "
            "sparsefx.transform does not apply: the captured graph saves every activation "
            "(compact ones where channels are pruned), so it saves no memory. Call "
            "model.gradient_checkpointing_disable() before transform to silence this.",
            stacklevel=3,
        )


def wrap_loss(model: nn.Module, criterion: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The one set-up line for a model that returns logits (transformed or compiled).

    The returned criterion computes the loss as `criterion` does, and also the loss of the
    same outputs under the other K-1 sampled masks, which the structure gradient needs.
    Example::

        criterion = sparsefx.wrap_loss(smodel, nn.CrossEntropyLoss())
        loss = criterion(smodel(x), y); loss.backward(); opt.step()
    """
    model = _without_ddp(model)
    if isinstance(model, SparseModule):
        model.runtime.criterion = criterion
        return wrap_criterion(criterion)
    if model in TRANSFORMED:
        raise TypeError(
            f"wrap_loss got the {type(model).__name__} that sparsefx.transform wrapped; pass "
            "the sparse model transform returned (`smodel = sparsefx.transform(model, ...)`, "
            "then `sparsefx.wrap_loss(smodel, criterion)` and train with `smodel(x)`)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(
            "wrap_loss expects the model returned by sparsefx.transform or "
            f'torch.compile(model, backend="sparsefx"), got {type(model).__name__}'
        )
    compiled.set_criterion(model, criterion)
    return compiled.checked_criterion(model, wrap_criterion(criterion))


def groups(model: nn.Module) -> list[Group]:
    """The channel groups: each with ``.name``, ``.size`` and ``.members``."""
    return list(_runtime(model).groups)


def probabilities(model: nn.Module) -> dict[str, Tensor]:
    """{group name: keep probabilities s} (copies)."""
    sparse = _runtime(model)
    parts = sparse.structure.split(sparse.structure.probabilities.detach())
    return {g.name: p.clone() for g, p in zip(sparse.groups, parts, strict=True)}


def masks(model: nn.Module) -> dict[str, Tensor]:
    """{group name: bool mask}: the fixed one after :func:`freeze` or :func:`set_masks` (what
    every forward now uses, even before the next one runs), else the mask the last training
    forward sampled."""
    sparse = _runtime(model)
    if not sparse.groups:
        return {}
    structure = sparse.structure
    mask = structure.fixed if structure.fixed is not None else structure.last
    if mask is None:
        raise RuntimeError(
            "no training forward has run yet, so there are no sampled masks; "
            "run one, or fix masks with sparsefx.freeze or sparsefx.set_masks"
        )
    return {g.name: m.clone() for g, m in zip(sparse.groups, structure.split(mask), strict=True)}


def set_masks(model: nn.Module, group_masks: Mapping[str, Tensor]) -> None:
    """Fix every group's mask (bool, one entry per channel) until :func:`unfreeze`."""
    sparse = _runtime(model)
    names = [g.name for g in sparse.groups]
    missing, unknown = set(names) - set(group_masks), set(group_masks) - set(names)
    if missing or unknown:
        raise KeyError(
            f"set_masks needs exactly one mask per group; missing {sorted(missing)}, "
            f"unknown {sorted(unknown)}; groups are {names}"
        )
    parts = []
    for group in sparse.groups:
        mask = torch.as_tensor(group_masks[group.name])
        if mask.shape != (group.size,):
            raise ValueError(
                f"mask of group {group.name!r} must have shape ({group.size},), got {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"mask of group {group.name!r} must be a bool tensor, got {mask.dtype}")
        if not mask.any():
            raise ValueError(
                f"mask of group {group.name!r} keeps no channel; keep at least one per group "
                "(an empty group disconnects the network)"
            )
        parts.append(mask)
    device = sparse.structure.probabilities.device
    sparse.structure.fixed = (
        torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.bool)
    )


def freeze(
    model: nn.Module,
    strategy: str = "topk",
    *,
    batches: Iterable[tuple[Any, ...] | Mapping[str, Any]] | None = None,
    num_samples: int = 8,
    multiple: int = 1,
) -> None:
    """Fix one mask for fine-tuning: "topk" (top-budget by s) or "best" (of `num_samples`
    sampled masks, the one with the lowest mean eval loss on `batches`).

    Each batch is a tuple of forward arguments; with a wrapped criterion its last element is
    the target. A dict is keyword arguments of a forward that returns its loss (a Hugging
    Face model's ``{"input_ids": ids, "labels": ids}``). `multiple` > 1 then makes each
    group's kept count a multiple of it within the budget (down to a multiple, then up by
    largest remainder while the budget allows, groups of fewer than `multiple` channels
    giving up a few for a block where that keeps more of the searched channels; channels by
    s; `policy.round_group_counts`): CPU convolutions run channels in blocks of 16 on
    AVX-512 (8 on AVX2), so one channel past a multiple costs a block, 9-15% of a wide
    Fashion-MNIST CNN step (benchmarks/cpu_channels.py). Example::

        sparsefx.freeze(smodel, "best", batches=[(x_val, y_val)], num_samples=8)
        sparsefx.freeze(smodel, multiple=16)  # top-budget, counts in 16-channel blocks
    """
    check_int("multiple", multiple, 1, "1 keeps the exact counts")
    if strategy not in ("topk", "best"):
        raise ValueError(f'freeze strategy must be "topk" or "best", got {strategy!r}')
    if strategy == "best":
        batches = _held_out_batches(batches, num_samples)
    sparse = _runtime(model)
    structure = sparse.structure
    if structure.warming_up():
        raise RuntimeError(
            f"freeze() during the budget warm-up (sampled step {int(structure.step)} of "
            f"budget_warmup={sparse.config.budget_warmup}) would keep more than the density; "
            "train until the warm-up ends, or use a shorter budget_warmup"
        )
    structure.apply_pending()
    if strategy == "topk":
        structure.fixed = None
        mask = structure.deterministic_mask().clone()
    else:
        candidates = structure.sample(num_samples)
        module = _callable_module(model)
        scores = [_mean_eval_loss(sparse, module, mask, batches) for mask in candidates]
        mask = candidates[int(torch.tensor(scores).argmin())].clone()
    if multiple > 1:
        mask = round_group_counts(
            mask, structure.probabilities, structure.offsets, multiple, structure.costs,
            structure.budget,
        )  # fmt: skip
    structure.fixed = mask


def _held_out_batches(
    batches: Iterable[tuple[Any, ...] | Mapping[str, Any]] | None, num_samples: int
) -> list:
    """freeze("best")'s arguments, checked before anything changes."""
    check_int("num_samples", num_samples, 1, "masks to score")
    if batches is None:
        raise ValueError('freeze(strategy="best") needs held-out `batches` to score masks on')
    batches = list(batches)
    if not batches:
        raise ValueError('freeze(strategy="best") got no batches: every mask would score 0')
    for batch in batches:
        if not isinstance(batch, tuple | list | Mapping):
            raise TypeError(
                "each of freeze's `batches` is a tuple of forward arguments (with a wrapped "
                "criterion, its last element the target), e.g. batches=[(x_val, y_val)], or "
                "a dict of keyword arguments of a forward that returns its loss, e.g. "
                f'[{{"input_ids": ids, "labels": ids}}]; got a {type(batch).__name__}'
            )
    return batches


def unfreeze(model: nn.Module) -> None:
    """Resume sampling masks from the probabilities."""
    _runtime(model).structure.fixed = None


def stats(model: nn.Module) -> dict[str, float]:
    """Density and cost fractions: expected under s, and of the masks last used.

    ``density`` is the budget; ``budget_density`` what the budget allows the next training
    step (the density, or more during ``budget_warmup``); ``expected_density`` the budget
    used by masks sampled from s (the channels every group's two-channel minimum adds
    included); ``sampled_density`` the kept fraction of the last masks in the same units;
    ``flops_fraction``/``params_fraction`` of the last masks, and ``expected_flops_fraction``
    under s, from the cost model (linear/conv FLOPs).
    """
    sparse = _runtime(model)
    structure = sparse.structure
    s = structure.probabilities.detach()
    mask = sparse.current_mask()
    kept = [float(m.sum()) for m in structure.split(mask)]
    expected = structure.expected_counts()
    cost = sparse.cost_model

    def fraction(part: float, whole: float) -> float:
        return part / whole if whole else 1.0  # nothing to prune: every channel is kept

    total = float(structure.costs.sum())
    return {
        "density": sparse.config.density,
        "budget_density": fraction(structure.budget, total),
        "expected_density": fraction(float(structure.costs @ s + structure.top_up_cost()), total),
        "sampled_density": fraction(float(structure.costs @ mask.float()), total),
        "channel_density": fraction(sum(kept), sum(g.size for g in sparse.groups)),
        "flops_fraction": cost.fraction("flops", kept),
        "params_fraction": cost.fraction("params", kept),
        "expected_flops_fraction": cost.fraction("flops", expected),
        "frozen": float(structure.fixed is not None),
    }


def structure_state(model: nn.Module) -> dict[str, Any]:
    """The structure's state of a transformed or compiled model: probabilities s, the
    sampler's seed and step, the score optimizer, the pending structure gradient, frozen and
    last masks. A checkpoint saves it with the model's and the optimizer's state dicts; for a
    transformed model it is also inside ``model.state_dict()`` (under ``structure.``), while a
    compiled model keeps it beside the model. A snapshot: later steps do not change it.
    Example::

        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "structure": sparsefx.structure_state(cmodel)}, path)
    """
    return clone_tensors(_runtime(model).structure.state_dict())


def load_structure_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load what :func:`structure_state` returned. A model compiled with sparsefx that has
    not been called yet keeps it until its first compile, so a resumed run continues with
    the checkpoint's masks from its first step."""
    if hasattr(model, "_orig_mod") and not compiled.records_of(model):
        compiled.load_structure_state_later(model, state)
        return
    _runtime(model).structure.load_state_dict(state)


def export(
    model: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: dict[str, Any] | None = None,
) -> torch.export.ExportedProgram:
    """The frozen sparse model as a compact inference program: a ``torch.export``
    ExportedProgram whose parameters are physically sliced to the kept channels, with no
    masks, gathers or sparsefx ops (activations that must return to full width do so by an
    ``index_copy`` with a constant index). Its output equals the frozen model's eval output;
    ``torch.export.save``/``load`` round-trip it. Shapes are the examples' (static), as in
    sparsefx's own capture. Example::

        sparsefx.freeze(smodel)
        program = sparsefx.export(smodel, (x,))
        logits = program.module()(x)
    """
    runtime, module = _frozen(model, "export")
    structure = runtime.structure
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    args, kwargs = distinct_inputs(args, dict(example_kwargs or {}))
    with eval_mode(module):
        captured = capture(module, args, kwargs, training=False)
    analysis = analyze(captured.gm, captured.inputs, prune_streams=runtime.config.prune_streams)
    check_same_groups(analysis.groups, runtime.groups)
    graph = rewrite_compact(copy_graph_module(captured.gm), analysis.groups)
    state = {
        **dict(module.named_parameters(remove_duplicate=False)),
        **dict(module.named_buffers(remove_duplicate=False)),
        **captured.constants,
    }
    kept = dict(
        zip((g.name for g in runtime.groups), structure.indices(structure.fixed), strict=True)
    )
    graph = fold_constants(inline_state(graph, captured.inputs, state, kept))
    program = torch.export.export(_CompactInference(graph, captured.out_spec), args, kwargs)
    return program.run_decompositions(
        {
            torch.ops.sparsefx.scatter_channels.default: compact.scatter_channels_functional,
            torch.ops.sparsefx.group_norm.default: group_norm_direct,  # shapes are static
            autograd_function._opoverload: inlined_autograd_function,
        }
    )


def compact_module(model: nn.Module) -> nn.Module:
    """The frozen sparse model as an ordinary ``nn.Module`` with smaller layers, for models
    built only from standard layers: Sequential containers of Linear, Conv (plain or
    depthwise), BatchNorm, InstanceNorm, GroupNorm, Flatten, activations, dropout and
    pooling. Its eval output equals the frozen model's and its parameters are the kept
    slices (``sparsefx.export`` covers every other model). Example::

        small = sparsefx.compact_module(smodel)  # Linear(512, 2048) -> Linear(512, k)
    """
    runtime, module = _frozen(model, "compact_module")
    structure = runtime.structure
    unsupported = unsupported_layers(module)
    if unsupported or not isinstance(module, nn.Sequential):
        raise TypeError(
            "compact_module rebuilds nn.Sequential models of standard layers only; "
            f"{type(module).__name__} has {unsupported or ['a custom forward']}. "
            "Use sparsefx.export(model, example_inputs) for this model"
        )
    if runtime.analysis.scatters:
        raise TypeError(
            "compact_module cannot rebuild a model that reads compact tensors at full width "
            f"({[s.node for s in runtime.analysis.scatters]}); use sparsefx.export"
        )
    kept: dict[tuple[str, int], Tensor] = {}
    for group, mask in zip(runtime.groups, structure.split(structure.fixed.cpu()), strict=True):
        for name, dim, part in group.expand(mask):
            kept[(name, dim)] = part | kept[(name, dim)] if (name, dim) in kept else part
    return rebuild_sequential(module, kept)


def _frozen(model: nn.Module, what: str) -> tuple[SparseRuntime, nn.Module]:
    """The runtime and the user's module of a sparse model whose masks are frozen."""
    model = _without_ddp(model)
    runtime = _runtime(model)
    if runtime.structure.fixed is None:
        raise RuntimeError(
            f"{what} needs frozen masks: call sparsefx.freeze(model) (or sparsefx.set_masks) "
            "first; while the structure trains, every step samples different channels"
        )
    module = model.model if isinstance(model, SparseModule) else compiled._unwrap(model)
    return runtime, module


class _CompactInference(nn.Module):
    """The folded compact graph behind the model's own calling convention."""

    def __init__(self, graph: torch.fx.GraphModule, out_spec: pytree.TreeSpec):
        super().__init__()
        self.compact = graph
        self.out_spec = out_spec

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = pytree.tree_leaves((args, kwargs))
        return pytree.tree_unflatten(list(self.compact(*flat)), self.out_spec)


def explain(model: nn.Module) -> str:
    """What sparsefx did to a transformed or compiled model, as text for logs: the groups
    with their probabilities and the masks in use, the costs, the ops left dense and why,
    and every node of each compact graph with its annotation. Example::

        logging.info(sparsefx.explain(smodel))
    """
    if isinstance(model, SparseModule):
        sparse = model.runtime
        if not sparse.graphs:
            raise RuntimeError(
                "this model was unpickled (torch.load) and has not run since, so sparsefx holds "
                "no graphs to explain: run one forward (it captures them again), then explain"
            )
        report = build_report(
            type(model.model).__name__, "transform", sparse.config, sparse, sparse.graphs
        )
        return report.text(diff=False)
    records = compiled.records_of(model) if isinstance(model, nn.Module) else []
    if not records:
        _runtime(model)  # raises the error that says what to do
    name = type(getattr(model, "_orig_mod", model)).__name__
    runtime, config = compiled.runtime_of(model), records[0].config
    return build_report(name, "compile", config, runtime, records).text(diff=False)  # type: ignore[arg-type]


@torch.no_grad()
def _mean_eval_loss(
    sparse: SparseRuntime,
    module: nn.Module,
    mask: Tensor,
    batches: list[tuple[Any, ...] | Mapping[str, Any]],
) -> float:
    structure, was_training = sparse.structure, module.training
    structure.fixed = mask
    module.eval()
    try:
        losses = []
        for batch in batches:
            if isinstance(batch, Mapping):
                loss = find_loss(module(**batch))
            elif sparse.criterion is not None:
                loss = sparse.criterion(module(*batch[:-1]), batch[-1])
            else:
                loss = find_loss(module(*batch))
            if loss is None:
                raise ValueError(
                    "the model returned no loss for a batch of freeze's `batches`: pass its "
                    "target too (a dict with labels=, or a tuple whose last element a "
                    "criterion wrapped with wrap_loss takes)"
                )
            losses.append(float(loss))
        return sum(losses) / max(len(losses), 1)
    finally:
        module.train(was_training)
        structure.fixed = None


def _without_ddp(model: Any) -> Any:
    """The module a DistributedDataParallel wrapper trains, and the transformed model inside
    `torch.compile(smodel)` (any other model as is)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
    return inner if isinstance(inner, SparseModule) else model


def _runtime(model: Any) -> SparseRuntime:
    """The runtime behind a transformed model, or behind a model compiled with sparsefx
    (either possibly wrapped by DistributedDataParallel)."""
    model = _without_ddp(model)
    if isinstance(model, SparseModule):
        return model.runtime
    runtime = compiled.runtime_of(model) if isinstance(model, nn.Module) else None
    if runtime is None and isinstance(model, nn.Module):
        runtime = compiled.empty_runtime_of(model)
    if runtime is not None:
        return runtime
    if hasattr(model, "_orig_mod") and compiled.received_graph_of(model._orig_mod):
        raise RuntimeError(
            f"{type(model._orig_mod).__name__} is compiled with sparsefx but has nothing to "
            "prune: every graph it compiled stayed dense (its first call warned why; "
            "sparsefx.diff(model, example_inputs, mode='compile') shows each layer's reason), "
            "so it has no groups, masks or probabilities"
        )
    if hasattr(model, "_orig_mod"):
        raise RuntimeError(
            f"{type(model._orig_mod).__name__} is compiled but has no sparsefx graph yet: "
            'torch.compile(model, backend="sparsefx") compiles on the first call, so run one '
            "forward before inspecting it"
        )
    raise TypeError(
        f"expected a model returned by sparsefx.transform or compiled with "
        f'torch.compile(model, backend="sparsefx"), got {type(model).__name__}; call '
        "sparsefx.transform(model, example_inputs, density=...) first"
    )


def _callable_module(model: Any) -> nn.Module:
    """The module whose forward runs the sparse graphs (freeze "best" evaluates through it)."""
    if isinstance(model, SparseModule) or hasattr(model, "_orig_mod"):
        return model
    raise TypeError(
        f'freeze("best") evaluates masks through the sparse model; pass the model returned '
        f"by torch.compile or sparsefx.transform, not the plain {type(model).__name__}"
    )
