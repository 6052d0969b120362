"""The sparse module: structure state and the per-step VR-PGE protocol (DESIGN §3).

A training forward (1) applies the pending structure update and projects s onto the
budget, (2) samples K masks, (3) runs the compact training graph with mask 1, and (4) runs
K-1 pure forwards with the other masks through the score graph. The structure gradient is
computed from the K losses and committed when the loss's backward runs; the next forward
applies it. Eval mode uses the deterministic top-budget (or frozen) mask.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn
from torch.export.graph_signature import InputKind
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

from sparsefx.analysis import Analysis, CostModel, Group, analyze, build_cost_model
from sparsefx.capture import CapturedGraph, CaptureError, bound_arguments, capture
from sparsefx.config import SparseConfig
from sparsefx.kernels import load_triton_kernels, triton_selected
from sparsefx.passes import (
    call_ops_directly,
    copy_graph_module,
    rewrite_compact,
    rounds_convolutions,
    score_graph,
    shared_noise_count,
)
from sparsefx.policy import (
    expected_top_up,
    group_minimum,
    keep_minimum,
    project_to_budget,
    sample_masks,
    top_budget_mask,
)
from sparsefx.policy.estimator import leave_one_out, score_function

__all__ = [
    "GraphRecord",
    "MissingLossError",
    "SampledStep",
    "SparseModule",
    "SparseRuntime",
    "StructureState",
    "counterparts",
    "find_loss",
    "register_counterparts",
    "wrap_criterion",
]

log = logging.getLogger("sparsefx")


class MissingLossError(RuntimeError):
    """A training forward returned no loss and no criterion was wrapped."""


class DensityError(ValueError):
    """The density's budget cannot hold the two channels every group keeps."""


def _minimum_cost(groups: Sequence[Group], costs: Sequence[float]) -> float:
    """What every group's two-channel minimum (`policy.keep_minimum`) costs."""
    return sum(c * min(2, g.size) for g, c in zip(groups, costs, strict=True))


class StructureState(nn.Module):
    """Probabilities s of every channel (one flat vector, groups at offsets), the score
    optimizer, the sampler and the masks, all saved in ``state_dict``.

    Sampling draws from a generator seeded by (seed, step), so the sampler's whole state is
    two integers: checkpoints resume exactly and data-parallel ranks agree.
    """

    def __init__(
        self,
        groups: list[Group],
        costs: list[float],
        config: SparseConfig,
        seed: int,
        *,
        triton: bool = False,
    ):
        super().__init__()
        self.config = config
        self.triton = triton
        """Sample and project with the fused Triton kernels (SparseConfig.kernels)."""
        self.offsets = [0]
        for group in groups:
            self.offsets.append(self.offsets[-1] + group.size)
        self.group_sizes = [(group.name, group.size) for group in groups]
        """(name, size) of each group: a checkpoint of another model's state is refused."""
        self.register_buffer("group_offsets", torch.tensor(self.offsets), persistent=False)
        channel_costs = torch.cat(
            [
                torch.full((g.size,), c, dtype=torch.float64)
                for g, c in zip(groups, costs, strict=True)
            ]
            or [torch.zeros(0, dtype=torch.float64)]
        )
        # with a warm-up the budget starts at the whole model, and so does s
        start = 1.0 if config.budget_warmup else config.density
        self.register_buffer("probabilities", torch.full((self.offsets[-1],), start))
        self.register_buffer("costs", channel_costs.float(), persistent=False)
        group_costs = torch.tensor(costs, dtype=torch.float64).reshape(-1)
        self.register_buffer("group_costs", group_costs, persistent=False)
        # ties in s are broken by relative position within the group, so that equal
        # probabilities (as at initialisation) spread the budget over groups proportionally
        relative = torch.cat(
            [(torch.arange(g.size) + 0.5) / g.size for g in groups] or [torch.zeros(0)]
        )
        self.register_buffer("tie_order", relative.argsort(stable=True), persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.total_cost = float(channel_costs.sum())
        self.minimum_cost = _minimum_cost(groups, costs)
        """The cost of every group's two-channel minimum (`policy.keep_minimum`)."""
        self.target_budget = config.density * self.total_cost
        """The budget of the density; `budget` reaches it after the warm-up."""
        self.pending: Tensor | None = None
        """Structure gradient of the last backward, applied at the next training forward."""
        self.pending_steps: Tensor | None = None
        """How many steps' losses in `pending` had a nonzero weight (0: nothing to apply)."""
        self.fixed: Tensor | None = None
        """Masks fixed by freeze/set_masks (bool [N]); None while sampling."""
        self.last: Tensor | None = None
        """Mask used by the last training forward."""
        self._optimizer: torch.optim.Optimizer | None = None
        self._optimizer_state: dict | None = None
        self._eval_cache: tuple[tuple[int, float], Tensor] | None = None
        self._sampled: tuple[Tensor, list[list[Tensor]], Tensor] | None = None
        """The Triton sampler's last masks, with their per-group indices and score terms."""
        if self.probabilities.numel():  # the first step's masks pay their top-up too
            self.probabilities.copy_(self._project(self.probabilities, triton=False))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> StructureState:
        """`.to(device)`, `.cuda()` move the state with the model; `.half()`, `.double()`,
        `.to(dtype)` do not cast it: s and its score optimizer stay in float32 (in float16
        Adam's step overflows and s turns NaN; `stats` would mix dtypes)."""
        for name, buffer in self._buffers.items():
            if buffer is not None:
                device = fn(buffer.new_empty(0)).device
                self._buffers[name] = buffer.to(device)
        return self

    # -- the score optimizer is bound to the buffer lazily: .to() replaces buffers ----------

    def optimizer(self) -> torch.optim.Optimizer:
        s = self.probabilities
        if self._optimizer is None or self._optimizer.param_groups[0]["params"][0] is not s:
            state = self._optimizer.state_dict() if self._optimizer else self._optimizer_state
            cls = torch.optim.Adam if self.config.score_optimizer == "adam" else torch.optim.SGD
            self._optimizer = cls([s], lr=self.config.score_lr)
            if state is not None:
                self._optimizer.load_state_dict(state)
            self._optimizer_state = None
        return self._optimizer

    @property
    def budget(self) -> float:
        """The budget of the next sampled step: the density's, or during
        `SparseConfig.budget_warmup` a cubic descent to it from the whole model's cost (the
        gradual-pruning schedule of Zhu and Gupta, 2017), by the sampler's step count."""
        warmup = self.config.budget_warmup
        remaining = max(0.0, 1.0 - int(self.step) / warmup) ** 3 if warmup else 0.0
        return self.target_budget + (self.total_cost - self.target_budget) * remaining

    def warming_up(self) -> bool:
        """Whether the budget is still above the density's (SparseConfig.budget_warmup)."""
        warmup = self.config.budget_warmup
        return warmup > 0 and int(self.step) < warmup

    @torch.no_grad()
    def apply_pending(self) -> None:
        """Score optimizer step on s, then exact projection onto the budget set (during the
        warm-up also without a pending update: the budget shrinks every step)."""
        steps = self.pending_steps
        if self.pending is not None and steps is not None and not float(steps):
            self.pending = None  # only losses weighted zero: not a step
        self.pending_steps = None
        if not self.probabilities.numel() or (self.pending is None and not self.warming_up()):
            self.pending = None  # nothing to prune, or no structure update to apply
            return
        s = self.probabilities
        if self.pending is not None:
            s.grad = self.pending.to(s.dtype)
            self.optimizer().step()
            s.grad = None
        s.copy_(self._project(s, triton=self.triton))
        self.pending = None

    def _project(self, z: Tensor, *, triton: bool) -> Tensor:
        """z projected onto the budget less a reserve r for what `keep_minimum` adds to masks
        of the result, whose expected cost g(r) grows with r (a smaller budget lowers s).
        Eager: r = g(r) by regula falsi (Illinois), from the reserve of clamp(z) and the
        whole minimum's cost, to 1e-6 of the budget, ending on a point with g(r) <= r (at
        most seven projections; one where no group can fall short). Triton: the same
        iteration on the device (`_project_on_device`)."""
        s = z.clamp(0.0, 1.0)
        if triton:
            return self._project_on_device(z, s)

        def excess(reserve: float) -> tuple[float, Tensor]:
            """g(r) - r, and s at r."""
            s = project_to_budget(z, self.costs, max(self.budget - reserve, 1e-6 * self.budget))
            return float(self.top_up_cost(s)) - reserve, s

        tolerance = 1e-6 * self.budget
        lo = float(self.top_up_cost(s))
        h_lo, s = excess(lo)
        if h_lo <= tolerance:
            return s
        hi = self.minimum_cost
        h_hi, s_hi = excess(hi)  # <= 0: no group adds more than its minimum
        for _ in range(5):
            r = (lo * h_hi - hi * h_lo) / (h_hi - h_lo)
            h, s = excess(r)
            if -tolerance <= h <= 0.0:
                return s
            if h > 0.0:
                lo, h_lo, h_hi = r, h, h_hi / 2
            else:
                hi, h_hi, s_hi, h_lo = r, h, s, h_lo / 2
        return s_hi

    def _project_on_device(self, z: Tensor, s: Tensor) -> Tensor:
        """`_project`'s regula falsi without a host read (but the step's, once, during a
        budget warm-up): every round runs (seven projections), a converged or
        bracketed-out round changes nothing, and the result is the last s with g(r) <= r
        (at the whole minimum's reserve if no round found one)."""
        project = load_triton_kernels().project_budget
        budget = self.budget  # during a budget warm-up, a host read of the step
        floor = 1e-6 * budget

        def excess(reserve: Tensor) -> tuple[Tensor, Tensor]:
            s = project(z, self.costs, (budget - reserve).clamp(min=floor))
            return self.top_up_cost(s) - reserve, s

        lo = self.top_up_cost(s)
        h_lo, s_lo = excess(lo)
        hi = torch.full_like(lo, self.minimum_cost)
        h_hi, s = excess(hi)  # <= 0: no group adds more than its minimum
        done = h_lo <= floor
        s = torch.where(done, s_lo, s)
        for _ in range(5):
            r = (lo * h_hi - hi * h_lo) / (h_hi - h_lo).clamp(max=-1e-300)
            h, s_r = excess(r)
            below = h <= 0.0
            s = torch.where(~done & below, s_r, s)
            lo, h_lo, h_hi = (
                torch.where(done | below, a, b) for a, b in ((lo, r), (h_lo, h), (h_hi, h_hi / 2))
            )
            hi, h_hi, h_lo = (
                torch.where(~done & below, b, a) for a, b in ((hi, r), (h_hi, h), (h_lo, h_lo / 2))
            )
            done = done | (below & (h >= -floor))
        return s

    def expected_counts(self) -> list[float]:
        """Expected kept channels of each group in masks sampled from s (what
        `keep_minimum` adds included)."""
        top_up = expected_top_up(self.probabilities, self.group_offsets).tolist()
        parts = self.split(self.probabilities.detach())
        return [float(p.sum()) + t for p, t in zip(parts, top_up, strict=True)]

    def top_up_cost(self, s: Tensor | None = None) -> Tensor:
        """Expected cost of the channels `keep_minimum` adds to masks sampled from s (the
        probabilities by default; 0-d float64): with it, ``costs @ s`` plus this is the
        sampled masks' expected cost."""
        top_up = expected_top_up(self.probabilities if s is None else s, self.group_offsets)
        return self.group_costs @ top_up

    def sample(self, num_samples: int) -> Tensor:
        """K masks, bool [K, N], from the (seed, step) generator; advances the step."""
        seed = _mix(int(self.seed), int(self.step))
        self.step += 1
        if self.triton:
            return self._sample_fused(num_samples, seed)
        generator = torch.Generator(device=self.probabilities.device)
        generator.manual_seed(seed)
        masks = sample_masks(self.probabilities, num_samples, generator)
        return keep_minimum(masks, self.probabilities, self.offsets)

    def _sample_fused(self, num_samples: int, seed: int) -> Tensor:
        """One Triton launch: masks (keep-minimum rule included), every group's sorted kept
        indices and the score terms; one host read of the kept counts slices the indices."""
        masks, packed, counts, psi = load_triton_kernels().sample_compact(
            self.probabilities,
            self.group_offsets,
            num_samples,
            seed,
            exact=self.config.score_form == "exact",
            eps=self.config.score_eps,
        )
        starts = self.offsets[:-1]
        indices = [
            [row[a : a + n] for a, n in zip(starts, kept, strict=True)]
            for row, kept in zip(packed, counts.tolist(), strict=True)
        ]
        self._sampled = (masks, indices, psi)
        return masks

    def deterministic_mask(self) -> Tensor:
        """The frozen mask, else the top-budget mask by s (cached while s and the budget are
        unchanged)."""
        if self.fixed is not None:
            return self.fixed
        if not self.probabilities.numel():
            return torch.zeros(0, dtype=torch.bool, device=self.probabilities.device)
        key = self.probabilities._version, self.budget
        if self._eval_cache is None or self._eval_cache[0] != key:
            order = self.tie_order
            pinned = group_minimum(self.probabilities, self.group_offsets)[order]
            ordered = top_budget_mask(self.probabilities[order], self.costs[order], key[1], pinned)
            mask = torch.empty_like(ordered).scatter_(0, order, ordered)
            self._eval_cache = (key, mask)
        return self._eval_cache[1]

    def commit(self, gradient: Tensor, steps: Tensor | None = None) -> None:
        """Add one step's structure gradient; `steps` (a 0-d tensor: 1, or 0 for a loss
        weighted zero) is counted without a host read until the update is applied."""
        self.pending = gradient if self.pending is None else self.pending + gradient
        if steps is not None:
            self.pending_steps = steps if self.pending_steps is None else self.pending_steps + steps

    def split(self, mask: Tensor) -> list[Tensor]:
        """Per-group slices of a flat [N] vector."""
        return [mask[a:b] for a, b in zip(self.offsets, self.offsets[1:], strict=False)]

    def indices(self, mask: Tensor) -> list[Tensor]:
        """Sorted kept channel indices of each group (a row of the fused sampler's last
        masks reuses the indices it compacted: no nonzero, no host sync per group)."""
        if self._sampled is not None and mask._base is self._sampled[0]:
            return self._sampled[1][mask.storage_offset() // max(mask.numel(), 1)]
        return [part.nonzero().squeeze(1) for part in self.split(mask)]

    def score_terms(self, masks: Tensor) -> Tensor:
        """psi(m, s) [K, N] of the score form, in float32 (from the fused sampler if it
        drew these masks)."""
        if self._sampled is not None and masks is self._sampled[0]:
            return self._sampled[2]
        s = self.probabilities.float()
        return score_function(masks, s, self.config.score_form, self.config.score_eps)

    def get_extra_state(self) -> dict:
        optimizer = self.optimizer().state_dict() if self._optimizer else self._optimizer_state
        return {
            "groups": list(self.group_sizes),
            "optimizer": clone_tensors(optimizer),
            "pending": clone_tensors(self.pending),
            "pending_steps": clone_tensors(self.pending_steps),
            "fixed": clone_tensors(self.fixed),
            "last": clone_tensors(self.last),
        }

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """Refuse another model's structure state before any of it is loaded."""
        extra = state_dict.get(prefix + "_extra_state", {})
        groups = [tuple(g) for g in extra.get("groups", self.group_sizes)]  # older: no groups
        if groups != self.group_sizes:
            raise ValueError(
                "this structure state is another model's: its groups (name, size) are "
                f"{groups}, this model's {self.group_sizes}"
            )
        super()._load_from_state_dict(state_dict, prefix, *args)

    def set_extra_state(self, state: dict) -> None:
        device = self.probabilities.device
        self._optimizer, self._optimizer_state = None, state["optimizer"]
        self.pending, self.pending_steps, self.fixed, self.last = (
            None if state.get(k) is None else state[k].to(device)
            for k in ("pending", "pending_steps", "fixed", "last")
        )
        self._eval_cache = None


def _mix(seed: int, step: int) -> int:
    """A per-step seed; splitmix-style so nearby (seed, step) pairs give unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def clone_tensors(value: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, value)


def find_loss(output: Any) -> Tensor | None:
    """The scalar loss in a model's output: the output itself, its "loss" entry, or the first
    scalar element of a tuple (Hugging Face puts the loss first, nanoGPT returns
    ``(logits, loss)``); None for a model that returns logits."""
    if isinstance(output, dict) or hasattr(output, "keys"):
        candidates = [output.get("loss")] if "loss" in output else []
    elif isinstance(output, list | tuple):
        candidates = list(output)
    else:
        candidates = [output]
    return next((value for value in candidates if _is_scalar_loss(value)), None)


def _is_scalar_loss(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point()


@dataclass
class SampledStep:
    """The K masks of one training forward, waiting for the loss under each of them."""

    runtime: SparseRuntime
    masks: Tensor
    resolved: bool = False
    """Set once the structure gradient of this step is attached to a loss."""
    receiver: Tensor | None = None
    """The leaf its losses' structure gradients accumulate into (`_StructureGradient`)."""


@dataclass
class Counterparts:
    """An output of a training forward under mask 1, and the same output under masks 2..K."""

    step: SampledStep
    values: list[Any]


_COUNTERPARTS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Tensor -> Counterparts, for the tensors that a sampled forward returned without a loss.

A criterion wrapped by `wrap_loss`, or the next compiled graph after a graph break, looks its
inputs up here to compute the loss under the other masks. Entries die with their tensors."""


_VIEWED: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Base tensor -> (layout, Counterparts) of each registered output that is a view of it. A
graph output often is one (a linear on [B, T, C] returns a view of its matmul), and a view
the user takes of it (``out.view(-1, V)``) has that same ``_base``, not the output, which
may be gone by the criterion's call: ``criterion(model(x).view(-1, V), y)`` keeps only the
base alive, so entries are kept by the base and remember the output by its layout."""


_KEPT_MODES = 16
"""Mode keys (`SparseModule._modes`) whose programs a sparse model keeps, most recently used
last."""

_KEPT_SIGNATURES = 16
"""Programs (input signatures) a sparse model keeps per mode key, most recently used last."""

_KEPT_RECORDS = 64
"""Graph records (`explain`, `diff`) a sparse model keeps besides its first capture's."""

_VIEWS_PER_BASE = 8
"""Registered views kept per base: the outputs of the last few steps."""


class _Layout(NamedTuple):
    """Where a tensor lies in its storage."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int

    @classmethod
    def of(cls, t: Tensor) -> _Layout:
        return cls(tuple(t.shape), t.stride(), t.storage_offset())

    def span(self) -> tuple[int, int]:
        """First and last storage element addressed."""
        last = sum((n - 1) * stride for n, stride in zip(self.shape, self.stride, strict=True))
        return self.offset, self.offset + last


def register_counterparts(
    step: SampledStep, outputs: Sequence[Any], others: list[Sequence[Any]]
) -> None:
    """Remember, for each tensor in `outputs`, its values under masks 2..K."""
    for i, value in enumerate(outputs):
        if isinstance(value, Tensor):
            entry = Counterparts(step, [other[i] for other in others])
            _COUNTERPARTS[value] = entry
            if value._is_view():  # newest first; a long-lived base (a buffer) keeps a few
                entries = _VIEWED.setdefault(value._base, [])
                entries.insert(0, (_Layout.of(value), entry))
                del entries[_VIEWS_PER_BASE:]


def _counterparts_of(value: Any) -> Counterparts | None:
    """The counterparts of a sampled forward's output, or of a view of one (``out.view(-1,
    V)``, ``out.permute(0, 2, 1)``, ``out[:, -1]``): the same view of each counterpart."""
    if not isinstance(value, Tensor):
        return None
    entry = _COUNTERPARTS.get(value)
    if entry is not None or not value._is_view():
        return entry
    base = value._base
    candidates = [(_Layout.of(base), _COUNTERPARTS.get(base)), *_VIEWED.get(base, ())]
    for layout, entry in candidates:
        if entry is not None and _inside(value, layout):
            views = [_same_view(value, layout, other) for other in entry.values]
            if all(view is not None for view in views):
                return Counterparts(entry.step, views)
    return None


def _inside(view: Tensor, output: _Layout) -> bool:
    (first, last), (start, end) = _Layout.of(view).span(), output.span()
    return view.numel() > 0 and start <= first and last <= end


def _same_view(view: Tensor, output: _Layout, other: Any) -> Tensor | None:
    """`view` (a view of the output's elements) taken of `other`, a counterpart of the
    output with its sizes and strides; None where the layouts differ."""
    if not isinstance(other, Tensor) or (tuple(other.shape), other.stride()) != (
        output.shape,
        output.stride,
    ):
        return None
    offset = other.storage_offset() + view.storage_offset() - output.offset
    return other.as_strided(view.shape, view.stride(), offset)


def counterparts(tree: Any) -> tuple[SampledStep, list[Any]] | None:
    """`tree` rebuilt under masks 2..K (tensors without counterparts kept as they are), or None
    if no tensor in it came from a sampled forward."""
    leaves, spec = pytree.tree_flatten(tree)
    found = [_counterparts_of(leaf) for leaf in leaves]
    step = next((entry.step for entry in found if entry is not None), None)
    if step is None:
        return None
    others = [
        pytree.tree_unflatten(
            [
                leaf if entry is None else entry.values[j]
                for leaf, entry in zip(leaves, found, strict=True)
            ],
            spec,
        )
        for j in range(step.masks.shape[0] - 1)
    ]
    return step, others


@dataclass
class GraphRecord:
    """One graph sparsefx rewrote for a model, as `sparsefx.explain` and the diff tool show it."""

    title: str
    captured: CapturedGraph
    """The captured graph, analysed (``node.meta["sparsefx"]``) and not rewritten."""
    analysis: Analysis
    """This graph's analysis (a graph after a Dynamo graph break has its own dense report)."""
    compact: fx.GraphModule
    score: fx.GraphModule | None
    """The pure-forward graph of masks 2..K (training graphs only)."""
    dynamo: fx.GraphModule | None = None
    """The graph Dynamo captured (torch.compile only)."""
    graph_break: str | None = None
    """Where Dynamo broke the graph after this one ("file:line (reason)")."""
    config: SparseConfig | None = None
    """The options it was rewritten with."""


def _check_density(
    groups: list[Group], cost_model: CostModel, config: SparseConfig, costs: list[float]
) -> None:
    """DensityError unless the density's budget holds the two channels every group keeps
    (`policy.keep_minimum`), naming the lowest density that does (found by bisection: a
    cost-weighted budget's channel costs move with the density)."""

    def minimum_share(costs: list[float]) -> float:
        total = sum(c * g.size for g, c in zip(groups, costs, strict=True))
        return _minimum_cost(groups, costs) / total

    def holds(density: float) -> bool:
        costs = cost_model.channel_costs(config.budget, density)
        return minimum_share(costs) <= density * (1 + 1e-9)

    if not groups or minimum_share(costs) <= config.density * (1 + 1e-9):
        return
    infeasible, feasible = config.density, 1.0
    for _ in range(30):
        mid = (infeasible + feasible) / 2
        infeasible, feasible = (infeasible, mid) if holds(mid) else (mid, feasible)
    least = math.ceil(feasible * 1e4 - 1e-3) / 1e4  # 4 digits, not past the bisection's error
    least = least if holds(least) else least + 1e-4
    plural = "s" if len(groups) > 1 else ""
    raise DensityError(
        f"density={config.density} cannot hold the two channels every group keeps "
        f"(`policy.keep_minimum`): this model's {len(groups)} group{plural} need a density of "
        f"at least {least:.4g} (budget={config.budget!r})"
    )


class SparseRuntime:
    """What both entry points share for one model: its groups and costs, the structure state
    and the per-step protocol (which masks a forward uses, the structure gradient from the K
    losses). `SparseModule` owns one; the torch.compile backend keeps one per compiled model."""

    def __init__(
        self, analysis: Analysis, cost_model: CostModel, config: SparseConfig, device: torch.device
    ):
        self.analysis = analysis
        self.cost_model = cost_model
        self.config = config
        seed = config.seed if config.seed is not None else int(torch.randint(2**62, ()).item())
        costs = cost_model.channel_costs(config.budget, config.density)
        _check_density(analysis.groups, cost_model, config, costs)
        self.triton = triton_selected(config.kernels, device)
        """The compact graphs, sampler and projection run the Triton kernels."""
        self.structure = StructureState(
            analysis.groups, costs, config, seed, triton=self.triton
        ).to(device)
        self.criterion: Callable[..., Tensor] | None = None
        """The criterion registered by wrap_loss, for a model that returns logits."""
        self.graphs: list[GraphRecord] = []
        """Every graph rewritten for this model so far, in capture order."""
        self._ranks_checked = False

    @property
    def groups(self) -> list[Group]:
        return self.analysis.groups

    def current_mask(self) -> Tensor:
        """The fixed (frozen) mask; else the mask of the last training forward, else the
        deterministic (eval) mask."""
        structure = self.structure
        if structure.fixed is None and structure.last is not None:
            return structure.last
        return structure.deterministic_mask()

    def masks_for_forward(self, training: bool) -> tuple[Tensor, SampledStep | None]:
        """Masks [K, N] for one forward, and the sampled step when the structure trains.

        Training samples K masks (after applying the pending structure update); eval mode,
        frozen masks and a model with nothing to prune use the deterministic mask, K = 1."""
        structure = self.structure
        if training and structure.fixed is None and self.groups:
            if not self._ranks_checked:
                check_ranks_agree(structure)
                self._ranks_checked = True
            structure.apply_pending()
            masks = structure.sample(self.config.samples)
            step: SampledStep | None = SampledStep(self, masks)
        else:
            masks, step = structure.deterministic_mask()[None], None
        if training:
            structure.last = masks[0]
        return masks, step

    def attach_structure_gradient(
        self, step: SampledStep, loss: Tensor, others: Sequence[Tensor | None]
    ) -> Tensor:
        """`loss` (the tensor to hand to the user in its place) carrying the VR-PGE gradient
        of the K losses, committed when a backward accumulates through it
        (`_StructureGradient`)."""
        if not _is_scalar_loss(loss) or any(not _is_scalar_loss(o) for o in others):
            raise ValueError(
                "the loss must be a floating-point scalar to train the structure, got "
                f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}"
            )
        step.resolved = True
        if not loss.requires_grad:
            return loss
        losses = torch.stack([loss.detach(), *(o.detach() for o in others)]).float()  # type: ignore[union-attr]
        losses = average_over_ranks(losses)
        structure = self.structure
        psi = structure.score_terms(step.masks)
        gradient = leave_one_out(losses, psi)
        # An overflowing step (inf/NaN losses, as float16 gives before GradScaler backs off)
        # must not poison s: its structure gradient is zero (a select, no host sync).
        finite = torch.isfinite(losses).all()
        gradient = torch.where(finite, gradient, torch.zeros_like(gradient))
        gradient = gradient.to(structure.probabilities.dtype)
        if step.receiver is None:
            step.receiver = gradient.new_zeros(gradient.numel() + 1, requires_grad=True)
            step.receiver.register_post_accumulate_grad_hook(functools.partial(_commit, structure))
        return _StructureGradient.apply(loss, step.receiver, gradient)


def _commit(structure: StructureState, receiver: Tensor) -> None:
    """Commit what one backward accumulated into a step's receiver: sum(w_i g_i) over its
    losses, and sum(|w_i|) last; their ratio, without a host read."""
    total, receiver.grad = receiver.grad, None
    weighted, weight = total[:-1], total[-1]
    active = weight > 0
    gradient = torch.where(active, weighted / weight.clamp_min(torch.finfo(total.dtype).tiny), 0)
    structure.commit(gradient, active.to(total.dtype))


class _StructureGradient(torch.autograd.Function):
    """The loss, unchanged, with an edge to its step's receiver: a leaf that accumulates
    w * g (g the step's structure gradient, w the loss's gradient in what is
    backpropagated) and |w|, committed as sum(w g) / sum(|w|).

    A leaf, not a hook on the loss: autograd accumulates into it only in a backward that
    accumulates (``loss.backward()``), as into the parameters, not in
    ``torch.autograd.grad(loss, x)`` (an adversarial input step, a gradient-norm probe).
    Normalised by the weights: several losses of one step count as weighted (mixup's
    ``lam * l_a + (1 - lam) * l_b``), ``(-loss).backward()`` ascends, a loss weighted 0
    is no step, and an overall factor (GradScaler's scale, 1/n for accumulation) cancels:
    s is not in the user's optimizer, so nothing else would unscale it."""

    @staticmethod
    def forward(ctx, loss: Tensor, receiver: Tensor, gradient: Tensor) -> Tensor:
        ctx.gradient = gradient
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        g = grad.to(ctx.gradient.dtype)
        return grad, torch.cat([g * ctx.gradient, g.abs().reshape(1)]), None


def _is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2's fully_shard has sharded `model`'s parameters."""
    if not dist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_over_ranks(losses: Tensor) -> Tensor:
    """The K losses averaged over data-parallel ranks (the default process group), so every
    rank computes the structure gradient of the global batch: VR-PGE is linear in the
    losses, and a mean loss over equal local batches averages to the global batch's."""
    if not _distributed():
        return losses
    losses = losses.clone()
    dist.all_reduce(losses)  # SUM: gloo has no AVG
    return losses / dist.get_world_size()


def check_ranks_agree(structure: StructureState) -> None:
    """Raise unless every rank holds the same sampler seed, step and probabilities: each
    rank then samples the same masks with no communication per step."""
    if not _distributed():
        return
    summary = torch.stack(
        [structure.seed.double(), structure.step.double(), structure.probabilities.double().sum()]
    )
    low, high = summary.clone(), summary.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise RuntimeError(
            "data-parallel ranks disagree on the sparsefx structure (sampler seed, step or "
            f"probabilities; min {low.tolist()}, max {high.tolist()}), so they would sample "
            "different masks: pass the same SparseConfig(seed=...) on every rank (or seed "
            "torch identically before transform), and load the same checkpoint on every rank"
        )


def fail_unless_resolved(
    step: SampledStep, outputs: Sequence[Any], message: Callable[[], str]
) -> None:
    """Make a backward through `outputs` raise MissingLossError(message()) if no loss of
    this step was found by then: the structure would otherwise silently not train. The
    message is built only then (it can search the model for its cause)."""

    def check(grad: Tensor) -> None:
        if not step.resolved:
            raise MissingLossError(message())

    for value in outputs:
        if isinstance(value, Tensor) and value.requires_grad:
            value.register_hook(check)


def criterion_loss_expected(output: Any, criterion: Callable[..., Tensor] | None) -> bool:
    """Whether wrap_loss's criterion, not a scalar in the output, gives this step's loss: a
    registered criterion does unless the output is the loss itself (a logits model may also
    return an auxiliary scalar, which is not the loss)."""
    return criterion is not None and not _is_scalar_loss(output)


def unseen_loss_message(model_name: str) -> str:
    """What to do when wrap_loss's criterion never saw a sampled forward's output."""
    return (
        f"backward ran through an output of {model_name} that the criterion returned by "
        "sparsefx.wrap_loss was not called on, so sparsefx cannot compute the structure "
        "gradient. Call that criterion on the output itself or on a view of it (out.view(-1, "
        "V), out.permute(...), out[:, -1]); a copy (out.float(), out.contiguous(), torch.cat) "
        "hides the output from it. A model that returns its own loss needs no wrap_loss."
    )


def missing_loss_message(model_name: str, detail: str = "") -> str:
    """What to do when a training forward's loss cannot be found (both entry points)."""
    return (
        f"{model_name} returned no scalar loss{detail}, so sparsefx cannot compute the "
        "structure gradient. Add one line at set-up: `criterion = sparsefx.wrap_loss(model, "
        "criterion)` and compute the loss with it; or freeze the masks (sparsefx.freeze) to "
        "train weights only."
    )


RECURRING = 2
"""Sampled kept counts seen this many times before run exact conv shapes."""
ONEDNN_CACHE_CAPACITY = 1024
"""oneDNN's default primitive cache capacity (ONEDNN_PRIMITIVE_CACHE_CAPACITY)."""


@dataclass
class RecurringCounts:
    """Which sampled masks run a program's exact-count graph: those whose kept counts were
    sampled `RECURRING` times before. oneDNN caches one primitive per convolution shape, so
    counts that recur compile once and then run without the rounding's zero channels and
    padding copies; counts seen once or never run the rounded graph, whose shapes are cached
    already. Once the search polarises s, the sampled counts hardly change and nearly every
    step runs exact (13% less time a step on the Fashion-MNIST wide CNN,
    benchmarks/cpu_channels.py). At most oneDNN's cache capacity of count vectors are
    remembered, least recently seen dropped first. Eager and compiled programs share it."""

    seen: OrderedDict[tuple[int, ...], int] = field(default_factory=OrderedDict)
    """How often each vector of kept counts was sampled (least recently seen first)."""

    def recur(self, indices: Sequence[Tensor]) -> bool:
        """Count this mask's kept counts; whether they were sampled `RECURRING` times before."""
        counts = tuple(int(i.numel()) for i in indices)
        seen = self.seen.pop(counts, 0)
        self.seen[counts] = seen + 1
        if len(self.seen) > ONEDNN_CACHE_CAPACITY:
            self.seen.popitem(last=False)
        return seen >= RECURRING


@dataclass
class _Program:
    """One captured mode and input signature, rewritten to compact form."""

    captured: CapturedGraph
    graph: fx.GraphModule
    fixed_graph: fx.GraphModule
    """`graph` with exact conv counts (no bucketing): for masks fixed by freeze/set_masks,
    and for sampled masks whose kept counts recur (`exact_counts_pay`)."""
    score: fx.GraphModule | None
    noises: int
    """Trailing outputs of `graph` that are dropout noise for `score` to reuse."""
    _owners: list[tuple[dict[str, Any], str] | None] | None = None
    _recurring: RecurringCounts = field(default_factory=RecurringCounts)

    def exact_counts_pay(self, indices: Sequence[Tensor]) -> bool:
        """Whether a sampled mask with these kept indices runs `fixed_graph`
        (`RecurringCounts`)."""
        return self.fixed_graph is not self.graph and self._recurring.recur(indices)

    def arguments(self, model: nn.Module, flat: Sequence[Any], indices: list[Tensor]) -> list:
        """Graph inputs in placeholder order: state, user inputs, group indices.

        Parameters and buffers are read from their owning modules' ``_parameters`` and
        ``_buffers`` at every call (so a tensor replaced by FSDP2's unshard or
        ``load_state_dict(assign=True)`` is seen), but the owners are resolved once:
        ``get_parameter`` walks the module path per call, milliseconds per step on a model
        with a hundred deep-named tensors."""
        if self._owners is None:
            self._owners = [_owner(model, kind, target) for kind, target in self.captured.inputs]
        user = iter(flat)
        args: list[Any] = []
        for (kind, target), owner in zip(self.captured.inputs, self._owners, strict=True):
            if owner is not None:
                table, name = owner
                args.append(table[name])
            elif kind == InputKind.CONSTANT_TENSOR:
                args.append(self.captured.constants[target])
            else:
                args.append(next(user))
        return args + indices


def _direct_calls(gm: fx.GraphModule, record_gradients: bool = True) -> fx.GraphModule:
    """A copy of `gm` that calls the compact ops' bodies directly (passes.call_ops_directly):
    what the eager runtime runs (the score graph runs under no_grad only). The graph
    records keep the ops, which the report and the diff tool read."""
    return call_ops_directly(copy_graph_module(gm), record_gradients=record_gradients)


def _owner(model: nn.Module, kind: InputKind, target: str) -> tuple[dict[str, Any], str] | None:
    """(the owning module's parameter or buffer table, the name in it) of a state input."""
    if kind not in (InputKind.PARAMETER, InputKind.BUFFER):
        return None
    path, _, name = target.rpartition(".")
    module = model.get_submodule(path)
    table = module._parameters if kind == InputKind.PARAMETER else module._buffers
    if name not in table:
        raise AttributeError(f"{type(module).__name__} ({path or 'the model'}) has no {target}")
    return table, name


TRANSFORMED: weakref.WeakSet[nn.Module] = weakref.WeakSet()
"""The models `sparsefx.transform` wrapped in a SparseModule (for errors that name the mix-up;
the diff tool's SparseModules are not the user's)."""


class SparseModule(nn.Module):
    """An nn.Module that trains `model` with VR-PGE through compact graphs.

    It shares `model`'s parameters (an optimizer on ``model.parameters()`` keeps working)
    and adds the structure state, so ``state_dict`` holds both.
    """

    def __init__(
        self,
        model: nn.Module,
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        config: SparseConfig,
    ):
        super().__init__()
        self.model = model
        self.config = config
        self._programs: dict[tuple[Any, ...], list[_Program]] = {}
        captured = capture(model, example_args, example_kwargs, training=model.training)
        analysis = analyze(captured.gm, captured.inputs, prune_streams=config.prune_streams)
        warn_if_nothing_to_prune(type(model).__name__, analysis)
        device = next(iter(model.parameters()), torch.empty(0)).device
        self._on_cpu = device.type == "cpu"
        self.runtime = SparseRuntime(
            analysis,
            build_cost_model(captured.gm, captured.inputs, analysis.groups),
            config,
            device,
        )
        self.structure = self.runtime.structure
        self._programs[self._modes()] = [self._compile(captured, analysis)]

    @property
    def training(self) -> bool:  # type: ignore[override]
        """The model's own flag: ``model.eval()`` and ``smodel.eval()`` are one switch (the
        optimizer and the user's loop hold `model`, and its flag is what capture records)."""
        model = self.__dict__.get("_modules", {}).get("model")
        return True if model is None else model.training

    @training.setter
    def training(self, mode: bool) -> None:
        model = self.__dict__.get("_modules", {}).get("model")  # none in nn.Module.__init__
        if model is not None:
            model.training = mode

    @property
    def groups(self) -> list[Group]:
        return self.runtime.groups

    @property
    def analysis(self) -> Analysis:
        return self.runtime.analysis

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (`torch.save(smodel)`, multiprocessing) without its programs: torch.fx
        rebuilds a pickled graph module by re-tracing it with the tracer that made it, and
        export's tracer cannot be rebuilt that way, so such a file would save and then fail
        to load. Everything else (model, structure state, groups, costs) pickles, and the
        first forward after loading captures again, as for any new input signature."""
        runtime = copy.copy(self.runtime)  # the same structure state, no graph records
        runtime.graphs = []
        return {**self.__dict__, "_programs": {}, "runtime": runtime}

    def __deepcopy__(self, memo: dict[int, Any]) -> SparseModule:
        """A copy with its programs (no capture on the copy's first forward)."""
        twin = memo[id(self)] = object.__new__(type(self))
        twin.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return twin

    @property
    def cost_model(self) -> CostModel:
        return self.runtime.cost_model

    # -- programs ------------------------------------------------------------------------

    def _compile(self, captured: CapturedGraph, analysis: Analysis) -> _Program:
        """The compact program; conv counts are bucketed only where masks are sampled (a
        training graph on CPU), and a training graph gets an exact-count twin for fixed
        masks: one mask is one shape, so rounding would only add zero channels."""
        multiple = self.config.conv_channel_multiple if self._on_cpu and captured.training else 1
        graph = self._rewrite(captured, analysis, multiple)
        fixed = self._rewrite(captured, analysis, 1) if rounds_convolutions(graph) else graph
        score = score_graph(graph, captured.inputs) if captured.training else None
        mode = "training" if captured.training else "eval"
        record = GraphRecord(f"{mode} graph", captured, analysis, graph, score, config=self.config)
        self.runtime.graphs.append(record)
        del self.runtime.graphs[1:-_KEPT_RECORDS]  # the first capture's, and the latest
        noises = shared_noise_count(graph)
        run = _direct_calls(graph)
        run_fixed = run if fixed is graph else _direct_calls(fixed)
        run_score = None if score is None else _direct_calls(score, record_gradients=False)
        return _Program(captured, run, run_fixed, run_score, noises)

    def _rewrite(
        self, captured: CapturedGraph, analysis: Analysis, conv_channel_multiple: int
    ) -> fx.GraphModule:
        return rewrite_compact(
            copy_graph_module(captured.gm),
            analysis.groups,
            sparse_gradients=self.config.sparse_gradients,
            triton_kernels=self.runtime.triton,
            conv_channel_multiple=conv_channel_multiple,
        )

    def _modes(self) -> tuple[Any, ...]:
        """What programs are kept by besides their inputs: each of the model's modules, with
        its train/eval flag and the settings a capture bakes into the graph
        (`_captured_settings`). The model's own flag decides whether masks are sampled; a
        BatchNorm frozen in eval or a Dropout disabled inside a training model is captured
        as such; a replaced submodule (a new head) or a changed Dropout p or BatchNorm
        momentum is a new graph, where the old one would read the old module or value."""
        return tuple((m, m.training, *_captured_settings(m)) for m in self.model.modules())

    def _program(self, flat: list[Any], spec: pytree.TreeSpec) -> _Program:
        """The compiled program for these modes and input signature, capturing a new one if
        none matches (a new mode, structure, dtype, static shape or size outside what the
        graph was traced for)."""
        modes = self._modes()
        programs = self._programs.setdefault(modes, [])
        if next(reversed(self._programs)) != modes:  # least recently used first, as the
            self._programs[modes] = self._programs.pop(modes)  # bounds drop those
        arguments = functools.cache(
            lambda: bound_arguments(self.model, *pytree.tree_unflatten(flat, spec))
        )
        for i, program in enumerate(programs):
            if program.captured.matches(flat, spec) and program.captured.guards_hold(arguments):
                if i != len(programs) - 1:
                    programs.append(programs.pop(i))
                return program
        args, kwargs = pytree.tree_unflatten(flat, spec)
        mode = "training" if self.training else "eval"
        if _is_sharded(self.model):
            raise CaptureError(
                f"sparsefx needs a new {mode} graph for these inputs, but "
                f"{type(self.model).__name__} is already sharded by fully_shard, and capture "
                "needs the whole parameters: run one forward in each mode you will use (train "
                "and eval) with inputs of the final shapes before calling fully_shard"
            )
        log.info("sparsefx: capturing %s graph", mode)
        captured = capture(self.model, tuple(args), dict(kwargs), training=self.training)
        analysis = analyze(captured.gm, captured.inputs, prune_streams=self.config.prune_streams)
        check_same_groups(analysis.groups, self.groups)
        program = self._compile(captured, analysis)
        programs.append(program)
        name = type(self.model).__name__
        if len(programs) > _KEPT_SIGNATURES:  # float inputs of a new shape every step
            del programs[0]
            self._warn_once(
                "signatures",
                f"sparsefx has captured {name} for more than {_KEPT_SIGNATURES} input "
                "signatures in one mode; each new one captures again, which takes seconds. "
                "Sizes are captured as dynamic in every dim of integer and bool inputs (token "
                "ids, masks) and in the batch dim of the others: pad floating-point inputs to "
                "a few shapes, or keep their dtype and structure fixed",
            )
        if len(self._programs) > _KEPT_MODES:  # a setting that changes every step
            del self._programs[next(iter(self._programs))]  # the least recently used
            self._warn_once(
                "modes",
                f"sparsefx has captured {name} for more than {_KEPT_MODES} combinations of "
                "module modes and settings (a Dropout p or BatchNorm momentum that changes "
                "every step?); each change captures again, which takes seconds",
            )
        return program

    def _warn_once(self, kind: str, message: str) -> None:
        """Warn about re-captures of one kind once per sparse model: they recur every step."""
        warned = self.__dict__.setdefault("_warned", set())
        if kind not in warned:
            warned.add(kind)
            warnings.warn(message, stacklevel=4)

    # -- the step ------------------------------------------------------------------------

    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The compact programs, run as the model's own forward (`model(...)` with its
        forward swapped for this call), so hooks registered on the model run around them:
        FSDP2's `fully_shard` gathers the parameters before and reduce-scatters their
        gradients after, and a user's forward hooks see the sparse forward.

        Never traced by Dynamo: `torch.compile(smodel)` or a compiled function calling
        smodel runs it as here. Sampling, host reads of kept counts and the counterpart
        registry are not graph material, and torch 2.11's Dynamo failed on the forward swap
        (`torch.compile(model, backend="sparsefx")` is the compiled entry point)."""
        flat, spec = pytree.tree_flatten((args, kwargs))
        program = self._program(flat, spec)  # a new capture traces the model's own forward
        model = self.model
        shadowed = model.__dict__.get("forward")
        # an instance attribute shadows the class's forward; hooks that replace the inputs
        # are not followed (the program runs on the inputs given here)
        model.forward = lambda *_args, **_kwargs: self._sparse_forward(program, flat)
        try:
            return model(*args, **kwargs)
        finally:
            if shadowed is None:
                del model.forward
            else:
                model.forward = shadowed

    def _sparse_forward(self, program: _Program, flat: list[Any]) -> Any:
        runtime = self.runtime
        masks, step = runtime.masks_for_forward(self.training)
        indices = self.structure.indices(masks[0])
        inputs = program.arguments(self.model, flat, indices)
        exact = step is None or program.exact_counts_pay(indices)
        graph = program.fixed_graph if exact else program.graph
        outputs, noises = split_noises(graph(*inputs), program.noises)
        output = pytree.tree_unflatten(outputs, program.captured.out_spec)
        if step is None:
            return output
        others = self._pure_forwards(program, flat, masks, noises, outputs)
        name = type(self.model).__name__
        loss = None if criterion_loss_expected(output, runtime.criterion) else find_loss(output)
        if loss is not None:
            spec_ = program.captured.out_spec
            losses = [find_loss(pytree.tree_unflatten(o, spec_)) for o in others]
            attached = runtime.attach_structure_gradient(step, loss, losses)
            output = pytree.tree_unflatten([attached if o is loss else o for o in outputs], spec_)
        elif runtime.criterion is not None:
            register_counterparts(step, outputs, others)
            fail_unless_resolved(step, outputs, functools.partial(unseen_loss_message, name))
        else:
            raise MissingLossError(missing_loss_message(name))
        return output

    @torch.no_grad()
    def _pure_forwards(
        self,
        program: _Program,
        flat: list[Any],
        masks: Tensor,
        noises: list[Tensor],
        outputs: list[Any],
    ) -> list[Any]:
        """Flat outputs of the score graph for masks 2..K: no autograd, no running-stat
        update, the training forward's dropout noise; mask 1's `outputs` again when every
        mask is mask 1 (`samples_agree`)."""
        assert program.score is not None
        if samples_agree(masks):
            return [detached(outputs)] * (len(masks) - 1)
        return [
            program.score(
                *program.arguments(self.model, flat, self.structure.indices(mask)), *noises
            )
            for mask in masks[1:]
        ]


def _captured_settings(module: nn.Module) -> tuple[Any, ...]:
    """The attributes of `module` that a capture reads as constants and a training loop may
    change (a Dropout schedule, a BatchNorm momentum)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return (module.p,)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (module.momentum, module.eps, module.track_running_stats)
    return ()


def samples_agree(masks: Tensor) -> bool:
    """Whether all K masks are equal: the step then needs no forward beyond mask 1's.

    Exact: equal masks have equal score terms, so the VR-PGE gradient (`leave_one_out`) is
    zero whatever the K losses are, even where dropout gives each forward noise of its own;
    mask 1's outputs stand in for the others. Once the search has polarised s (a score lr of
    0.3 does within tens of steps) most steps draw K equal masks and cost one forward instead
    of K. One host read of a bool."""
    return bool((masks[1:] == masks[0]).all())


def detached(outputs: Sequence[Any]) -> list[Any]:
    """`outputs` with tensors detached: mask 1's outputs standing in for an equal mask's."""
    return [o.detach() if isinstance(o, Tensor) else o for o in outputs]


def split_noises(outputs: Sequence[Any], count: int) -> tuple[list[Any], list[Tensor]]:
    """A training graph's outputs, and the dropout noises it returns after them."""
    outputs = list(outputs)
    if not count:
        return outputs, []
    return outputs[:-count], outputs[-count:]


def warn_if_nothing_to_prune(model_name: str, analysis: Analysis, *, graph: bool = False) -> None:
    """Warn that a model (or, with `graph`, one of its compiled graphs: a graph break may
    leave the prunable layers to a later graph) trains dense, and why."""
    if not analysis.groups:
        reasons = "; ".join(f"{d.node}: {d.reason}" for d in analysis.dense)
        where = f"a compiled graph of {model_name}" if graph else model_name
        what = "its layers train" if graph else "it will train"
        warnings.warn(
            f"sparsefx found nothing to prune in {where} ({reasons or 'no linear/conv'}); "
            f"{what} dense",
            stacklevel=4,
        )


def check_same_groups(found: list[Group], expected: list[Group]) -> None:
    """A re-captured graph (new mode or input signature) must prune the same groups."""
    found_ = [(g.name, g.size) for g in found]
    expected_ = [(g.name, g.size) for g in expected]
    if found_ != expected_:
        raise CaptureError(
            f"the model's prunable groups changed with its inputs or mode: {found_} vs "
            f"{expected_}; sparsefx needs the same layers on every call"
        )


def wrap_criterion(criterion: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The criterion of a logits model, extended with the loss under masks 2..K: an output
    of a sampled forward carries its counterparts (`register_counterparts`)."""

    def sparse_criterion(output: Any, *args: Any, **kwargs: Any) -> Tensor:
        loss = criterion(output, *args, **kwargs)
        found = counterparts(output)
        if found is not None:
            step, others = found
            with torch.no_grad():
                other_losses = [criterion(o, *args, **kwargs) for o in others]
            return step.runtime.attach_structure_gradient(step, loss, other_losses)
        return loss

    return sparse_criterion
