"""Training-step time: dense (eager, compiled) vs the paper's method vs a hand-written compact step vs
sparsefx (eager, compiled).

One VR-PGE step is all of it: sampling K=2 masks, forward+backward with mask 1, the second
sample's work, the structure (score) update and the optimizer step. The four methods:

* dense:    forward + backward + SGD step of the unmodified model.
* paper:    the VR-PGE code of Zhou et al. (2021) as it runs: masks multiply the dense
            weights (before BatchNorm), dense compute, a forward AND a backward for each of
            the K=2 samples (weight gradients averaged), then the score update.
* hand:     what an expert writes by hand for these models: kept indices per layer, weights
            gathered with index_select, BatchNorm on gathered parameters, backward by
            autograd, a no_grad second forward, then the score update. The bar for sparsefx.
* sparsefx: `sparsefx.transform` + `sparsefx.wrap_loss` on the unmodified model.
* sparsefx-sg: the same with ``SparseConfig(sparse_gradients=True)``: row-sparse weight
            gradients, so SGD updates only kept rows (the others keep dense gradients).
* dense-compiled:    ``torch.compile(model)`` (Inductor), the dense bar for compiled training.
* sparsefx-compiled: ``torch.compile(model, backend="sparsefx")`` + ``wrap_loss``.

All methods are timed side by side in one process (see `common.time_interleaved`), so the
ratios compare like with like even on a loaded machine.

Threads default to 1. On a shared machine whose cores are busy with other processes, a
multi-threaded op waits at its barrier for a descheduled worker thread: measured here with two
threads on two busy cores, every small op (a ReLU on 256×205) cost ~7 ms of waiting, the dense
step 2.5x and the compact steps 25x their single-thread time. That cost is per op, not per
FLOP, so it biases the comparison against the sparse methods. One thread has no barrier;
outside load then only time-slices it, which interleaving and medians absorb. On a quiet
machine pass ``--threads 0`` (torch's default) or an explicit count. Run::

    python benchmarks/step_time.py                 # ~10 min on 2 cores
    python benchmarks/step_time.py --quick         # ~1-2 min sanity run
    python benchmarks/step_time.py --models mlp --densities 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from common import (
    MODELS,
    count_flops,
    environment,
    format_table,
    summarize,
    time_interleaved,
)
from torch import Tensor, nn
from torch._dynamo.utils import counters

import sparsefx

LR = 0.01
SAMPLES = 2  # K
SCORE_LR = 1e-2  # Adam on the scores, about the VR-PGE demo's (Adam, lr 1.2e-2)
SCORE_EPS = 1e-3  # s clamped to [eps, 1-eps] inside psi
BISECTION_STEPS = 20  # budget projection of the baselines, as in the paper's code
DENSE_METHODS = ("dense", "dense-compiled")
METHODS = ("paper", "hand", "sparsefx", "sparsefx-sg", "sparsefx-compiled", "sparsefx-compiled-sg")
COMPILED_TWIN = {
    "dense-compiled": "dense",
    "sparsefx-compiled": "sparsefx",
    "sparsefx-compiled-sg": "sparsefx-sg",
}
"""Compiled methods count the FLOPs of their eager twin: FlopCounterMode is a dispatch mode,
and Dynamo runs frames eagerly (dense, for the sparsefx backend) while one is active."""

Step = Callable[[], Tensor]
Producer = nn.Linear | nn.Conv2d


# -- the models as blocks, for the two hand-written baselines ---------------------------------


@dataclass
class Plan:
    """A Sequential of blocks producer → [BatchNorm] → ReLU, channel-preserving tail modules
    (pool to 1×1, flatten) and a final classifier that is never pruned."""

    producers: list[Producer]
    norms: list[nn.BatchNorm2d | None]
    tail: list[nn.Module]
    head: nn.Linear
    names: list[str]
    """Sequential index of each producer: sparsefx names its groups so."""

    @property
    def widths(self) -> list[int]:
        return [p.weight.shape[0] for p in self.producers]


def plan_of(model: nn.Sequential) -> Plan:
    """Read the block structure of a benchmark model; anything unexpected is an error, since the
    hand-written steps below are only valid for exactly this shape of model."""
    *body, head = list(model)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"expected a final nn.Linear classifier, got {type(head).__name__}")
    plan = Plan([], [], [], head, [])
    for i, module in enumerate(body):
        if isinstance(module, nn.Linear | nn.Conv2d) and not plan.tail:
            plan.producers.append(module)
            plan.norms.append(None)
            plan.names.append(str(i))
        elif isinstance(module, nn.BatchNorm2d) and plan.producers:
            plan.norms[-1] = module
        elif isinstance(module, nn.ReLU):
            continue
        elif isinstance(module, nn.Flatten) or (
            isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size in (1, (1, 1))
        ):
            plan.tail.append(module)
        else:
            raise TypeError(f"module {i} ({module}) is not supported by the hand-written steps")
    return plan


def _produce(layer: Producer, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(h, weight, bias, layer.stride, layer.padding, layer.dilation)
    return F.linear(h, weight, bias)


def _channel_view(mask: Tensor, dim: int) -> Tensor:
    """[C] -> [C, 1, ...] for `dim`-D weights, or [1, C, 1, ...] for activations (at_output)."""
    return mask.view(-1, *[1] * (dim - 1))


def masked_forward(plan: Plan, x: Tensor, masks: Sequence[Tensor], at_output: bool) -> Tensor:
    """Dense compute with float channel masks.

    at_output=False is the paper's code: the mask multiplies the weights (and bias), before
    BatchNorm, so a dropped channel still passes its BN shift on. at_output=True is sparsefx's
    reference semantics (DESIGN §2): the block's output is zeroed after its activation.
    """
    h = x
    for layer, norm, mask in zip(plan.producers, plan.norms, masks, strict=True):
        weight, bias = layer.weight, layer.bias
        if not at_output:
            weight = weight * _channel_view(mask, weight.dim())
            bias = None if bias is None else bias * mask
        h = _produce(layer, h, weight, bias)
        h = F.relu(h if norm is None else norm(h))
        if at_output:
            h = h * _channel_view(mask, h.dim() - 1).unsqueeze(0)
    for module in plan.tail:
        h = module(h)
    return plan.head(h)


def compact_forward(plan: Plan, x: Tensor, kept: Sequence[Tensor], update_stats: bool) -> Tensor:
    """The hand-written compact forward: every layer computes only its kept channels, reading
    its weight's kept rows and the previous layer's kept columns by index_select."""
    h, previous = x, None
    for layer, norm, out_idx in zip(plan.producers, plan.norms, kept, strict=True):
        weight = layer.weight.index_select(0, out_idx)
        if previous is not None:
            weight = weight.index_select(1, previous)
        bias = None if layer.bias is None else layer.bias.index_select(0, out_idx)
        h = _produce(layer, h, weight, bias)
        if norm is not None:
            h = _compact_batch_norm(norm, h, out_idx, update_stats)
        h = F.relu(h)
        previous = out_idx
    for module in plan.tail:
        h = module(h)  # pool to 1×1 + flatten keep the channel order
    return F.linear(h, plan.head.weight.index_select(1, previous), plan.head.bias)


def _compact_batch_norm(norm: nn.BatchNorm2d, h: Tensor, idx: Tensor, update_stats: bool) -> Tensor:
    """Training-mode BN over the kept channels; running stats of kept channels only, and none
    at all in the second (score) forward."""
    weight, bias = norm.weight.index_select(0, idx), norm.bias.index_select(0, idx)
    if not update_stats:
        return F.batch_norm(h, None, None, weight, bias, training=True, eps=norm.eps)
    mean, var = norm.running_mean.index_select(0, idx), norm.running_var.index_select(0, idx)
    y = F.batch_norm(h, mean, var, weight, bias, True, norm.momentum, norm.eps)  # updates copies
    with torch.no_grad():
        norm.running_mean.index_copy_(0, idx, mean)
        norm.running_var.index_copy_(0, idx, var)
        norm.num_batches_tracked.add_(1)
    return y


# -- the structure scores, shared by the paper and hand-written steps -------------------------


class Scores:
    """Keep probabilities s of all pruned channels (one flat vector), Adam on s, and the
    VR-PGE gradient with the leave-one-out baseline and the paper's psi."""

    def __init__(self, widths: list[int], density: float, device: torch.device | str = "cpu"):
        self.widths = widths
        self.s = torch.full((sum(widths),), float(density), device=device)
        self.budget = density * sum(widths)
        self.optimizer = torch.optim.Adam([self.s], lr=SCORE_LR)

    def sample(self, k: int) -> Tensor:
        """K Bernoulli(s) masks, bool [K, N]."""
        return torch.rand(k, self.s.shape[0], device=self.s.device) < self.s

    def split(self, mask: Tensor) -> tuple[Tensor, ...]:
        return mask.split(self.widths)

    def indices(self, mask: Tensor) -> list[Tensor]:
        """Kept channel indices per layer; an empty layer keeps its most probable channel (an
        empty layer would disconnect the network)."""
        kept = []
        for part, s in zip(self.split(mask), self.split(self.s), strict=True):
            idx = part.nonzero().squeeze(1)
            kept.append(idx if idx.numel() else s.argmax().view(1))
        return kept

    @torch.no_grad()
    def update(self, losses: Tensor, masks: Tensor) -> None:
        """g = 1/(K-1) Σ_j (L_j - mean L) psi_j, psi = (m - s)/sqrt(s(1-s)); Adam; projection
        onto {0 <= s <= 1, sum s <= budget}."""
        s = self.s.clamp(SCORE_EPS, 1 - SCORE_EPS)
        psi = (masks.float() - s) / (s * (1 - s)).sqrt()
        self.s.grad = (losses - losses.mean()) @ psi / (masks.shape[0] - 1)
        self.optimizer.step()
        self.s.grad = None
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """s = clamp(z - v, 0, 1) with the budget's multiplier v found by bisection, as the
        paper's code does (`solve_v_total`). A plain rescale would do, but it lets the
        density drift further below the budget than sparsefx's projection, and a baseline
        that trains sparser than sparsefx would be timed on fewer FLOPs."""
        clamped = self.s.clamp(0.0, 1.0)
        if float(clamped.sum()) <= self.budget:
            self.s.copy_(clamped)
            return
        lo, hi = 0.0, float(self.s.max())  # at v = max(z) every s is 0
        for _ in range(BISECTION_STEPS):
            v = (lo + hi) / 2
            if float((self.s - v).clamp_(0.0, 1.0).sum()) > self.budget:
                lo = v
            else:
                hi = v
        self.s.sub_(hi).clamp_(0.0, 1.0)  # hi: always within the budget


# -- one step of each method -------------------------------------------------------------------


def dense_step(model: nn.Sequential, x: Tensor, y: Tensor, density: float) -> Step:
    """Ordinary dense training (density is ignored)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model.train()

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def paper_step(model: nn.Sequential, x: Tensor, y: Tensor, density: float) -> Step:
    """The paper's code: K masked-weight dense forwards AND backwards, then the score update."""
    plan, opt = plan_of(model), torch.optim.SGD(model.parameters(), lr=LR)
    scores = Scores(plan.widths, density)
    model.train()

    def step() -> Tensor:
        masks = scores.sample(SAMPLES)
        opt.zero_grad(set_to_none=True)
        losses = []
        for mask in masks.float():
            loss = F.cross_entropy(masked_forward(plan, x, scores.split(mask), False), y)
            (loss / SAMPLES).backward()  # weight gradients averaged over the samples
            losses.append(loss.detach())
        opt.step()
        scores.update(torch.stack(losses), masks)
        return losses[0]

    return step


def hand_step(model: nn.Sequential, x: Tensor, y: Tensor, density: float) -> Step:
    """The hand-written compact step: compact forward+backward with mask 1, a no_grad compact
    forward with mask 2, then the score update."""
    plan, opt = plan_of(model), torch.optim.SGD(model.parameters(), lr=LR)
    scores = Scores(plan.widths, density)
    model.train()

    def step() -> Tensor:
        masks = scores.sample(SAMPLES)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(compact_forward(plan, x, scores.indices(masks[0]), True), y)
        with torch.no_grad():
            others = [
                F.cross_entropy(compact_forward(plan, x, scores.indices(m), False), y)
                for m in masks[1:]
            ]
        loss.backward()
        opt.step()
        scores.update(torch.stack([loss.detach(), *others]), masks)
        return loss

    return step


def sparsefx_step(
    model: nn.Sequential, x: Tensor, y: Tensor, density: float, sparse_gradients: bool = False
) -> Step:
    """sparsefx as a user writes it: transform, wrap the loss, an ordinary training loop.

    With `sparse_gradients` ("sparsefx-sg") pruned weights get row-sparse gradients, which
    torch's SGD applies to kept rows only: no full-size gradient, no full-size update.
    """
    config = sparsefx.SparseConfig(density=density, sparse_gradients=sparse_gradients)
    return _wrapped_loss_step(sparsefx.transform(model, (x,), config=config), model, x, y)


def _wrapped_loss_step(sparse: nn.Module, model: nn.Module, x: Tensor, y: Tensor) -> Step:
    """The user's loop for a sparse logits model: wrap_loss once, then ordinary steps."""
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sparse.train()

    def step() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = criterion(sparse(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def dense_compiled_step(model: nn.Sequential, x: Tensor, y: Tensor, density: float) -> Step:
    """Dense training through torch.compile's default backend (Inductor)."""
    return dense_step(torch.compile(model), x, y, density)  # type: ignore[arg-type]


def sparsefx_compiled_step(
    model: nn.Sequential, x: Tensor, y: Tensor, density: float, sparse_gradients: bool = False
) -> Step:
    """sparsefx through torch.compile: the model compiled with backend="sparsefx", the loss
    wrapped as in eager mode, an ordinary loop."""
    options = {"density": density, "sparse_gradients": sparse_gradients}
    cmodel = torch.compile(model, backend="sparsefx", options=options)
    return _wrapped_loss_step(cmodel, model, x, y)  # type: ignore[arg-type]


BUILDERS: dict[str, Callable[[nn.Sequential, Tensor, Tensor, float], Step]] = {
    "dense": dense_step,
    "dense-compiled": dense_compiled_step,
    "sparsefx-compiled": sparsefx_compiled_step,
    "paper": paper_step,
    "hand": hand_step,
    "sparsefx": sparsefx_step,
    "sparsefx-sg": functools.partial(sparsefx_step, sparse_gradients=True),
    "sparsefx-compiled-sg": functools.partial(sparsefx_compiled_step, sparse_gradients=True),
}


# -- correctness of the baselines ---------------------------------------------------------------


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def _loss_and_grads(
    model: nn.Module, forward: Callable[[], Tensor], y: Tensor
) -> tuple[Tensor, list[Tensor]]:
    out = forward()
    F.cross_entropy(out, y).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.parameters()]
    return out.detach(), grads


def check_baselines(model: nn.Sequential, x: Tensor, y: Tensor, tol: float = 1e-9) -> dict:
    """Relative max errors of the baselines against each other; raises if any exceeds `tol`.

    Run in float64: float32 rounding, amplified by BatchNorm's backward through six layers,
    reaches ~1e-2 relative on a few gradient entries, which would hide a real mismatch.

    * full masks: the paper's and the hand-written forwards equal the dense model;
    * a random mask (d=0.5): the hand-written compact step equals the reference semantics
      (dense, outputs zeroed after each block), logits and every weight gradient, and sparsefx
      with the same fixed mask equals the hand-written step.
    """
    torch.manual_seed(1)
    model, x = copy.deepcopy(model).double(), x.double()
    plan = plan_of(model)
    dense = model(x).detach()
    errors = {
        "paper_full_mask": _relative_error(
            masked_forward(plan, x, [x.new_ones(w) for w in plan.widths], False).detach(), dense
        ),
        "hand_full_mask": _relative_error(
            compact_forward(plan, x, [torch.arange(w) for w in plan.widths], False).detach(), dense
        ),
    }
    masks = [torch.rand(w) < 0.5 for w in plan.widths]
    kept = [m.nonzero().squeeze(1) for m in masks]
    ref_model, hand_model, sfx_model = (copy.deepcopy(model) for _ in range(3))
    ref_out, ref_grads = _loss_and_grads(
        ref_model,
        lambda: masked_forward(plan_of(ref_model), x, [m.double() for m in masks], True),
        y,
    )
    hand_out, hand_grads = _loss_and_grads(
        hand_model, lambda: compact_forward(plan_of(hand_model), x, kept, True), y
    )
    smodel = sparsefx.transform(sfx_model, (x,), density=0.5)
    sparsefx.set_masks(smodel, dict(zip(plan.names, masks, strict=True)))
    smodel.train()
    sfx_out, sfx_grads = _loss_and_grads(sfx_model, lambda: smodel(x), y)
    errors["hand_vs_reference_logits"] = _relative_error(hand_out, ref_out)
    errors["hand_vs_reference_grads"] = max(map(_relative_error, hand_grads, ref_grads))
    errors["sparsefx_vs_hand_logits"] = _relative_error(sfx_out, hand_out)
    errors["sparsefx_vs_hand_grads"] = max(map(_relative_error, sfx_grads, hand_grads))
    bad = {k: v for k, v in errors.items() if not v <= tol}
    if bad:
        raise AssertionError(f"baseline check failed (relative error > {tol}): {bad}")
    return errors


# -- the benchmark -----------------------------------------------------------------------------


@dataclass
class Result:
    """One row: times in ms, FLOPs per whole step, and the ratios derived from them."""

    model: str
    density: float | None
    method: str
    ms: float
    ms_p25: float
    ms_p75: float
    gflop: float
    speedup: float
    flop_ratio: float
    efficiency: float
    vs_hand: float | None
    vs_hand_rounds: list[float]
    """T_hand / T_sparsefx within each round (paired), for the noise of vs_hand."""
    vs_inductor: float
    """T_dense-compiled / T: speedup over dense training compiled by Inductor."""
    vs_eager: float | None
    """For compiled methods, T_eager-twin / T."""
    first_step_s: float
    """The first step's seconds (compile time, for compiled methods)."""
    graphs: int
    """Graphs Dynamo compiled in the first step (outer, training and score graphs)."""
    late_graphs: int
    step_ms: list[float]


def _label(method: str, density: float | None) -> str:
    return method if density is None else f"{method}@{density:g}"


def build_steps(name: str, densities: list[float], seed: int) -> dict[str, Step]:
    """Every method's step on its own deep copy of one seeded model, dense first."""
    model, x, y = MODELS[name].make(seed)
    configs = [(m, None) for m in DENSE_METHODS] + [(m, d) for d in densities for m in METHODS]
    return {
        _label(m, d): BUILDERS[m](copy.deepcopy(model), x, y, 1.0 if d is None else d)
        for m, d in configs
    }


def bench_model(name: str, densities: list[float], args: argparse.Namespace) -> list[Result]:
    """Warm up, count FLOPs, time round-robin; one Result per (method, density)."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{name} {time.perf_counter() - start:6.1f}s] {message}", file=sys.stderr)

    log(f"building {1 + len(METHODS) * len(densities)} steps")
    steps = build_steps(name, densities, args.seed)
    log(f"warm-up ({args.warmup} steps each; the first step of a compiled method compiles)")
    compiles: dict[str, tuple[float, int]] = {}
    for label, step in steps.items():
        graphs, start_step = counters["stats"]["unique_graphs"], time.perf_counter()
        step()
        compiles[label] = (
            time.perf_counter() - start_step,
            counters["stats"]["unique_graphs"] - graphs,
        )
        for _ in range(args.warmup - 1):
            step()
    uncompiled = [
        label
        for label, (_, graphs) in compiles.items()
        if label.split("@")[0] in COMPILED_TWIN and not graphs
    ]
    if uncompiled:
        raise RuntimeError(f"Dynamo compiled nothing for {uncompiled}: they would run eagerly")
    log("counting FLOPs")
    flops = {
        label: count_flops(step, args.flop_steps, args.flop_seconds)
        for label, step in steps.items()
        if label.split("@")[0] not in COMPILED_TWIN
    }
    for label in steps:
        method, _, density = label.partition("@")
        if method in COMPILED_TWIN:
            flops[label] = flops[_label(COMPILED_TWIN[method], float(density) if density else None)]
    log(f"timing {args.rounds} rounds × {args.steps} steps")
    graphs_before = counters["stats"]["unique_graphs"]
    times = time_interleaved(steps, args.rounds, args.steps, progress=log)
    late = counters["stats"]["unique_graphs"] - graphs_before
    measured = Measured(times, flops, args.steps, compiles, late)
    results = [measured.result(name, m, None) for m in DENSE_METHODS]
    for d in densities:
        results += [measured.result(name, m, d) for m in METHODS]
    return results


@dataclass
class Measured:
    """Step times (seconds, in timing order) and FLOPs per step of every method of one model."""

    times: dict[str, list[float]]
    flops: dict[str, float]
    steps_per_round: int
    compiles: dict[str, tuple[float, int]]
    """Seconds of each method's first step and graphs Dynamo compiled during it."""
    late_graphs: int
    """Graphs compiled while timing, by any method (recompiles: should be 0)."""

    def median_ms(self, label: str) -> float:
        return summarize(self.times[label]).median_ms

    def round_ratios(self, faster: str, slower: str) -> list[float]:
        """T_slower / T_faster per round, from each round's medians: paired within a round, so
        load that drifts between rounds cancels; their spread shows how noisy the ratio is."""
        n, ratios = self.steps_per_round, []
        a, b = self.times[faster], self.times[slower]
        for i in range(0, len(a), n):
            ratios.append(summarize(b[i : i + n]).median_ms / summarize(a[i : i + n]).median_ms)
        return ratios

    def result(self, model: str, method: str, density: float | None) -> Result:
        label = _label(method, density)
        summary = summarize(self.times[label])
        speedup = self.median_ms("dense") / summary.median_ms
        flop_ratio = self.flops["dense"] / self.flops[label]
        vs_hand, rounds = None, []
        if method.startswith("sparsefx"):
            hand = _label("hand", density)
            vs_hand = self.median_ms(hand) / summary.median_ms
            rounds = self.round_ratios(label, hand)
        vs_eager = None
        if method in COMPILED_TWIN:
            vs_eager = self.median_ms(_label(COMPILED_TWIN[method], density)) / summary.median_ms
        first_step_s, graphs = self.compiles[label]
        return Result(
            model=model,
            density=density,
            method=method,
            ms=summary.median_ms,
            ms_p25=summary.p25_ms,
            ms_p75=summary.p75_ms,
            gflop=self.flops[label] / 1e9,
            speedup=speedup,
            flop_ratio=flop_ratio,
            efficiency=speedup / flop_ratio,
            vs_hand=vs_hand,
            vs_hand_rounds=rounds,
            vs_inductor=self.median_ms("dense-compiled") / summary.median_ms,
            vs_eager=vs_eager,
            first_step_s=first_step_s,
            graphs=graphs,
            late_graphs=self.late_graphs,
            step_ms=[round(1e3 * t, 4) for t in self.times[label]],
        )


def header(env: dict, args: argparse.Namespace) -> str:
    load = " ".join(f"{v:.2f}" for v in env["load_avg"])
    return "\n".join(
        [
            "sparsefx step time: one full training step per method, timed side by side in one run",
            f"torch {env['torch']} | {env['threads']} threads | CPU: {env['cpu']} "
            f"({env['cores']} logical cores) | load average at start: {load}",
            f"optimizer: SGD(lr={LR}) without momentum: the same full-size update for every method",
            "dense = fwd+bwd+opt step; sparse steps add sampling, K=2 samples and the score update",
            "  paper: masked dense weights (before BN), fwd+bwd for both samples (Zhou et al. code)",
            "  hand: hand-written compact step; sparsefx: sparsefx.transform + wrap_loss",
            "  sparsefx-sg: sparsefx with sparse_gradients=True (row-sparse weight gradients)",
            f"timing: {args.warmup} warm-up steps each, then {args.rounds} rounds × {args.steps} "
            "steps round-robin; ms = median per step, IQR% = interquartile range / median",
            "speedup = T_dense/T; FLOP× = F_dense/F (matmul+conv FLOPs of a whole step, "
            "FlopCounterMode); eff = speedup/FLOP×; vs hand = T_hand/T_sparsefx (bar: >= 0.9)",
            "per round = range of vs hand over rounds (each round's medians, paired in time)",
            "dense-compiled: torch.compile(model) (Inductor); sparsefx-compiled: "
            'torch.compile(model, backend="sparsefx") + wrap_loss',
            "vs inductor = T_dense-compiled/T; vs eager = T_eager/T_compiled of the same method; "
            "compile = first step's seconds / graphs Dynamo compiled in it",
        ]
    )


def table(results: list[Result]) -> str:
    headers = ["model", "density", "method", "ms/step", "IQR%", "speedup", "vs inductor"]
    headers += ["GFLOP/step", "FLOP×", "eff", "vs hand", "per round", "vs eager", "compile"]
    rows = [
        [
            r.model,
            "-" if r.density is None else f"{r.density:g}",
            r.method,
            f"{r.ms:.1f}",
            f"{100 * (r.ms_p75 - r.ms_p25) / r.ms:.0f}",
            f"{r.speedup:.2f}x",
            f"{r.vs_inductor:.2f}x",
            f"{r.gflop:.2f}",
            f"{r.flop_ratio:.1f}",
            f"{r.efficiency:.2f}",
            "" if r.vs_hand is None else f"{r.vs_hand:.2f}",
            _range(r.vs_hand_rounds),
            "" if r.vs_eager is None else f"{r.vs_eager:.2f}",
            f"{r.first_step_s:.0f}s/{r.graphs}g" if r.graphs else "",
        ]
        for r in results
    ]
    return format_table(headers, rows)


def _range(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--densities", default="1.0,0.5,0.2,0.1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per method per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method")
    parser.add_argument(
        "--flop-steps",
        type=int,
        default=2,
        help="min steps averaged for FLOPs (untimed, after warm-up)",
    )
    parser.add_argument(
        "--flop-seconds", type=float, default=1.0, help="min seconds of steps averaged for FLOPs"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 0 keeps torch's default (see the module docstring)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 rounds × 2 steps, 1 warm-up")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all numbers here")
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse Inductor's on-disk cache (default: a fresh one, so compile times are cold)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.flop_steps, args.flop_seconds = 2, 2, 1, 1, 0.3
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sparsefx-bench-")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    # Every compiled method compiles its own copy of the same nn.Sequential class, and Dynamo
    # caches frames per code object: past `recompile_limit` (8) copies it would silently run
    # the rest eagerly (dense, uncompiled). Each copy needs its own entry here.
    torch._dynamo.config.recompile_limit = 64
    begin = time.perf_counter()
    env = environment()
    print(header(env, args), flush=True)
    densities = [float(d) for d in args.densities.split(",")]
    results, checks = [], {}
    for name in args.models.split(","):
        model, x, y = MODELS[name].make(args.seed)
        checks[name] = check_baselines(model, x, y)
        worst = max(checks[name].values())
        print(f"{name}: baselines checked (max relative error {worst:.1e})", flush=True)
        results += bench_model(name, densities, args)
    print()
    print(table(results))
    wall = time.perf_counter() - begin
    end_load = [round(v, 2) for v in environment()["load_avg"]]  # type: ignore[union-attr]
    late = sum({r.model: r.late_graphs for r in results}.values())
    print(f"graphs compiled while timing (recompiles): {late}")
    print(f"\nwall time {wall:.0f} s; load average at end: {' '.join(map(str, end_load))}")
    if args.json:
        payload = {
            "environment": env,
            "load_avg_end": end_load,
            "wall_s": wall,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "checks": checks,
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=True)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
