"""Budget projection of the structure probabilities and the deterministic top-budget mask.

The feasible set is {s : 0 <= s <= 1, costs @ s <= budget}. Its Euclidean projection is
s_i = clamp(z_i - v c_i, 0, 1) with v >= 0 the smallest multiplier meeting the budget, where
f(v) = costs @ clamp(z - v costs, 0, 1) is continuous, non-increasing and linear between the
2n breakpoints (z_i - 1)/c_i (channel i leaves 1) and z_i/c_i (channel i reaches 0).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["group_minimum", "project_to_budget", "round_group_counts", "top_budget_mask"]

# Safeguarded Newton steps that narrow the bracket before the exact sort. They only decide how
# many breakpoints are left to sort (torch's CPU sort costs ~0.1 us per element, so sorting all
# 2n would dominate); the result is exact for any number of steps.
_BRACKET_STEPS = 16


def _validate(name: str, x: Tensor, costs: Tensor, budget: float) -> None:
    """Raise ValueError, saying what to change, unless x and costs are matching 1-D vectors."""
    if x.dim() != 1 or costs.shape != x.shape:
        raise ValueError(
            f"{name} and costs must be 1-D tensors of the same shape, got {name} of shape "
            f"{tuple(x.shape)} and costs of shape {tuple(costs.shape)}; pass one value per channel"
        )
    if not 0 < budget < float("inf"):
        raise ValueError(f"budget must be a finite number > 0, got {budget!r}")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x)  # NaN propagates, so the comparisons below also reject NaN
    if not -float("inf") < lo.item() <= hi.item() < float("inf"):
        raise ValueError(f"{name} must be finite; it contains NaN or inf entries")
    lo, hi = torch.aminmax(costs)
    if not 0 < lo.item() <= hi.item() < float("inf"):
        raise ValueError(
            "costs must be finite and > 0 for every channel (leave a free channel out of the "
            f"budget instead), got min {lo.item():.6g} and max {hi.item():.6g}"
        )


def _states(z: Tensor, c: Tensor, v: float) -> tuple[Tensor, Tensor, Tensor]:
    """At multiplier v: s = clamp(z - v c, 0, 1), and as 0/1 floats [s > 0] and [s == 1].

    Floats, not bools: on CPU, comparisons and bool casts cost ~4x a fused arithmetic op.
    """
    s = z.add(c, alpha=-v).clamp_(0.0, 1.0)
    return s, s.ceil(), s.floor()


def _multiplier(z: Tensor, c: Tensor, budget: float, s0: Tensor, f0: float) -> float:
    """The smallest v >= 0 with f(v) <= budget, exactly, given s0 = s(0) and f0 = f(0) > budget."""
    c2 = c * c
    # 1. Bracket: lo < hi with f(lo) > budget >= f(hi), narrowed by Newton steps on the piece
    # through the current point (doubled while they crawl from one side, as on convex stretches
    # of f), with regula falsi when a step leaves the bracket. Each step overshoots by a relative
    # 1e-9, so a step that lands on the root's piece leaves a bracket that holds (almost surely)
    # no breakpoint, and the loop stops there.
    lo, f_lo, pos_lo, one_lo = 0.0, f0, s0.ceil(), s0.floor()
    hi, f_hi, pos_hi, one_hi = (z / c).max().item(), 0.0, torch.zeros_like(z), torch.zeros_like(z)
    v, f, pos, one, crawling = lo, f_lo, pos_lo, one_lo, False
    for _ in range(_BRACKET_STEPS):
        q = (c2 @ (pos - one)).item()
        step = (f - budget) / q if q > 0 else hi - v
        nudge = math.copysign(1e-9 * (abs(step) + abs(v)), step)
        v_new = v + step * (2.0 if crawling else 1.0) + nudge
        if not lo < v_new < hi:
            v_new = lo + (f_lo - budget) * (hi - lo) / (f_lo - f_hi)
            if not lo < v_new < hi:
                break
        s, pos, one = _states(z, c, v_new)
        f_new = (c @ s).item()
        if f_new > budget:
            lo, f_lo, pos_lo, one_lo = v_new, f_new, pos, one
        else:
            hi, f_hi, pos_hi, one_hi = v_new, f_new, pos, one
        if abs(f_new - budget) <= 2 * abs(nudge) * q + 1e-12 * budget:
            break
        crawling = (f_new > budget) == (f > budget) and abs(f_new - budget) > abs(f - budget) / 8
        v, f = v_new, f_new
    # 2. Sort the breakpoints left in [lo, hi]: channel i leaves 1 there iff one_lo - one_hi = 1,
    # at (z_i-1)/c_i, freeing it (slope Q += c_i^2), and reaches 0 there iff pos_lo - pos_hi = 1,
    # at z_i/c_i (Q -= c_i^2). Find the piece between consecutive knots that crosses the budget.
    leaves, zeroes = one_lo - one_hi, pos_lo - pos_hi
    idx = (leaves + zeroes).nonzero().squeeze(1)
    left, right = lo, hi
    if idx.numel():
        zi, ci, c2i = z[idx], c[idx], c2[idx]
        t, order = torch.sort(torch.cat(((zi - 1) / ci, zi / ci)).clamp_(lo, hi))
        d_q = torch.cat((c2i * leaves[idx], -c2i * zeroes[idx]))[order]
        # Knots lo, t..., hi; Q on each piece between them; f at each knot by integrating -Q.
        slopes = (c2 @ (pos_lo - one_lo)) + torch.cat((d_q.new_zeros(1), torch.cumsum(d_q, 0)))
        knots = torch.cat((t.new_tensor([lo]), t, t.new_tensor([hi])))
        f_knots = f_lo - torch.cat((d_q.new_zeros(1), torch.cumsum(knots.diff() * slopes, 0)))
        # f(lo) > budget >= f(hi): the root's piece starts at the last knot with f > budget
        # (f(hi) left out: rounding in the running sums can leave it a hair above budget).
        j = int((f_knots[:-1] > budget).sum().item()) - 1
        left, right = knots[j].item(), knots[j + 1].item()
    # 3. Re-derive that piece's line f(w) = A - w Q from the channels' states at its midpoint:
    # direct sums carry no rounding from channels crossed on the way, unlike the running sums.
    _, pos, one = _states(z, c, (left + right) / 2)
    free = pos - one
    a, q_piece = (c @ one + (c * z) @ free).item(), (c2 @ free).item()
    return min(max((a - budget) / q_piece, left), right) if q_piece > 0 else left


def project_to_budget(z: Tensor, costs: Tensor, budget: float) -> Tensor:
    """Euclidean projection of z onto {s : 0 <= s <= 1, costs @ s <= budget} (costs > 0).

    s = clamp(z - v costs, 0, 1) with the multiplier v found exactly: safeguarded Newton steps
    bracket it, the breakpoints left in the bracket are sorted, and the linear piece of f that
    crosses the budget is solved. O(n log n) worst case. Computed in float64; returns z's dtype
    and device. Reads a few scalars back from the device (one or two per Newton step).
    """
    _validate("z", z, costs, budget)
    zd, c = z.to(torch.float64), costs.to(torch.float64)
    s0 = zd.clamp(0.0, 1.0)
    f0 = (c @ s0).item()
    if f0 <= budget:
        return s0.to(z.dtype)
    v = _multiplier(zd, c, budget, s0, f0)
    return zd.add(c, alpha=-v).clamp_(0.0, 1.0).to(z.dtype)


def group_minimum(values: Tensor, offsets: Tensor) -> Tensor:
    """Bool mask of each group's min(2, size) largest values (ties: lower index first); the
    groups lie at `offsets` ([G + 1] int64, on values' device). Two sorts, no host read."""
    n = values.shape[0]
    group = torch.bucketize(torch.arange(n, device=values.device), offsets[1:], right=True)
    order = torch.sort(values, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    rank = torch.arange(n, device=values.device) - offsets[group[order]]
    return torch.empty(n, dtype=torch.bool, device=values.device).scatter_(0, order, rank < 2)


def top_budget_mask(
    s: Tensor, costs: Tensor, budget: float, pinned: Tensor | None = None
) -> Tensor:
    """Deterministic bool mask: the `pinned` channels (bool, optional), then channels by
    decreasing s (ties: lower index first) kept while the cumulative cost stays <= budget.

    The eval-time and frozen mask; cumulative costs are summed in float64 so an exactly
    representable budget (e.g. a channel count) is met exactly. Pinned channels are kept
    even past the budget.
    """
    _validate("s", s, costs, budget)
    order = torch.sort(s, descending=True, stable=True).indices
    if pinned is not None:
        order = order[torch.sort(pinned[order].byte(), descending=True, stable=True).indices]
    keep = torch.cumsum(costs.to(torch.float64)[order], 0) <= budget
    mask = torch.empty_like(keep).scatter_(0, order, keep)
    return mask if pinned is None else mask | pinned


def _cost(counts: Sequence[int], unit: Sequence[float]) -> float:
    return sum(k * c for k, c in zip(counts, unit, strict=True))


def round_group_counts(
    mask: Tensor,
    s: Tensor,
    offsets: Sequence[int],
    multiple: int,
    costs: Tensor,
    budget: float,
) -> Tensor:
    """`mask` with each group's kept count (groups at `offsets`) a multiple of `multiple`,
    within the budget: every group first drops to the multiple below its count, then groups
    round up to the next one, largest remainder first (Hamilton's apportionment; ties:
    earlier group), while `costs @ mask` fits `budget`.

    A group keeping fewer than `multiple` channels keeps its count (one block at any count;
    rounding it up could pass the budget, down would empty it), as does a group no larger
    than `multiple`; such exact-count groups give up channels (most costly first, never
    below two) when that lets a rounded group round up and they give up fewer channels than
    its rounding down took: 9/16/31 channels in a budget of 56 become 8/16/32, not 9/16/16.
    Channels by s: a group losing channels drops its kept channels of lowest s, one gaining
    adds its dropped channels of highest s (ties: lower index first).
    CPU convolutions (oneDNN) run channels in blocks of the vector width, 16 floats on
    AVX-512, so a count just past a multiple costs a whole block; `freeze(..., multiple=16)`
    uses this.
    """
    spans = list(itertools.pairwise(offsets))
    counts = [int(mask[a:b].sum()) for a, b in spans]
    unit = [float(costs[a:b].double().mean()) if b > a else 0.0 for a, b in spans]
    exact = [min(k, b - a) <= multiple for (a, b), k in zip(spans, counts, strict=True)]
    targets = [k if e else k // multiple * multiple for k, e in zip(counts, exact, strict=True)]
    limit = budget * (1 + 1e-9)
    for g in sorted(range(len(spans)), key=lambda g: targets[g] - counts[g]):
        rounded_off = counts[g] - targets[g]
        if not rounded_off:
            continue
        trial = list(targets)
        trial[g] = min(targets[g] + multiple, spans[g][1] - spans[g][0])
        freed = 0  # channels the exact-count groups give up, the most costly first
        for e in sorted((e for e in range(len(spans)) if exact[e]), key=lambda e: -unit[e]):
            while _cost(trial, unit) > limit and trial[e] > min(2, counts[e]):
                if freed == rounded_off - 1:
                    break
                trial[e], freed = trial[e] - 1, freed + 1
        if _cost(trial, unit) <= limit:
            targets = trial
    rounded = mask.clone()
    for (start, end), kept, target in zip(spans, counts, targets, strict=True):
        if target != kept:  # rank by s (ties: lower index first), kept channels first
            order = torch.sort(s[start:end], descending=True, stable=True).indices
            kept_first = torch.sort(mask[start:end][order].byte(), descending=True, stable=True)
            rounded[start:end] = False
            rounded[start + order[kept_first.indices[:target]]] = True
    return rounded
