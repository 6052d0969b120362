"""Budget projection against an exact brute force, plus feasibility, idempotence and errors."""

from __future__ import annotations

import itertools
from fractions import Fraction
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefx.policy import (
    expected_top_up,
    group_minimum,
    keep_minimum,
    project_to_budget,
    round_group_counts,
    top_budget_mask,
)
from sparsefx.policy import projection as projection_module

F64 = torch.float64


def brute_force_projection(z: list[float], c: list[float], budget: float) -> list[float]:
    """argmin ||s - z||^2 over {0 <= s <= 1, c @ s <= budget}, in exact rational arithmetic.

    Every active set is tried: each coordinate at 0, at 1 or free, the budget constraint active
    or not; each equality-constrained QP is solved in closed form, and the feasible candidate
    with the smallest objective wins. The optimum's own active set is among them, so this is
    the exact projection.
    """
    zq, cq, bq = [Fraction(x) for x in z], [Fraction(x) for x in c], Fraction(budget)
    n = len(z)
    best, best_obj = None, None
    for states in itertools.product((0, 1, None), repeat=n):
        free = [i for i in range(n) if states[i] is None]
        for active in (False, True):
            s = [Fraction(x) if x is not None else zq[i] for i, x in enumerate(states)]
            if active:
                if not free:
                    continue
                fixed = sum(cq[i] * s[i] for i in range(n) if states[i] is not None)
                lam = (fixed + sum(cq[i] * zq[i] for i in free) - bq) / sum(
                    cq[i] ** 2 for i in free
                )
                for i in free:
                    s[i] = zq[i] - lam * cq[i]
            feasible = (
                all(0 <= x <= 1 for x in s) and sum(a * b for a, b in zip(cq, s, strict=True)) <= bq
            )
            if not feasible:
                continue
            obj = sum((a - b) ** 2 for a, b in zip(s, zq, strict=True))
            if best_obj is None or obj < best_obj:
                best, best_obj = s, obj
    assert best is not None  # s = 0 is always feasible
    return [float(x) for x in best]


def _project64(z: list[float], c: list[float], budget: float) -> torch.Tensor:
    return project_to_budget(torch.tensor(z, dtype=F64), torch.tensor(c, dtype=F64), budget)


# Each projection test runs with the default bracketing and with none, so that every breakpoint
# goes through the exact sort stage too (the bracketing only decides how many are left to sort).
bracket_steps = pytest.mark.parametrize("bracket_steps", [projection_module._BRACKET_STEPS, 0])


def _with_steps(steps: int):
    return mock.patch.object(projection_module, "_BRACKET_STEPS", steps)


# z far outside [0, 1] and exactly on its ends (tied breakpoints); costs equal or up to 1e6 apart;
# budgets from tiny to above sum(costs).
z_values = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(-50, 50))
cost_values = st.one_of(st.just(1.0), st.floats(-3, 3).map(lambda e: 10.0**e))
budget_fractions = st.one_of(st.sampled_from([1e-9, 1e-3, 0.5, 1.0, 2.0]), st.floats(1e-6, 1.5))


@st.composite
def small_problems(draw):
    n = draw(st.integers(1, 4))
    z = draw(st.lists(z_values, min_size=n, max_size=n))
    c = draw(st.lists(cost_values, min_size=n, max_size=n))
    return z, c, draw(budget_fractions) * sum(c)


@bracket_steps
@settings()
@given(small_problems())
def test_matches_brute_force(bracket_steps, problem):
    z, c, budget = problem
    expected = torch.tensor(brute_force_projection(z, c, budget), dtype=F64)
    with _with_steps(bracket_steps):
        actual = _project64(z, c, budget)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9)


@bracket_steps
@pytest.mark.parametrize("seed", range(150))
def test_matches_brute_force_seeded_sweep(bracket_steps, seed):
    """A wider deterministic sweep than the hypothesis budget, biased towards hard cases."""
    g = torch.Generator().manual_seed(seed)
    n = 1 + seed % 4
    scale = [0.3, 3.0, 40.0][seed % 3]
    z = (torch.randn(n, generator=g, dtype=F64) * scale + 0.5).tolist()
    if seed % 5 == 0:  # ties at the box ends
        z = [float(round(x)) if i % 2 else x for i, x in enumerate(z)]
    c = (10 ** (torch.rand(n, generator=g, dtype=F64) * 6 - 3)).tolist() if seed % 2 else [1.0] * n
    budget = float(10 ** (torch.rand((), generator=g) * 6 - 5)) * sum(c)
    expected = torch.tensor(brute_force_projection(z, c, budget), dtype=F64)
    with _with_steps(bracket_steps):
        actual = _project64(z, c, budget)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-9)


@bracket_steps
@settings()
@given(
    n=st.integers(1, 2000),
    seed=st.integers(0, 2**31 - 1),
    z_scale=st.floats(0.01, 100.0),
    z_shift=st.floats(-2.0, 3.0),
    cost_decades=st.floats(0.0, 6.0),
    budget_fraction=budget_fractions,
)
def test_always_feasible(bracket_steps, n, seed, z_scale, z_shift, cost_decades, budget_fraction):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=F64) * z_scale + z_shift
    c = 10 ** (torch.rand(n, generator=g, dtype=F64) * cost_decades - cost_decades / 2)
    budget = budget_fraction * float(c.sum())
    with _with_steps(bracket_steps):
        s = project_to_budget(z, c, budget)
    assert s.dtype == F64 and s.shape == z.shape
    assert bool(((s >= 0) & (s <= 1)).all())
    assert float(c @ s) <= budget * (1 + 1e-12) + 1e-12
    # Optimality in KKT form: s = clamp(z - v c, 0, 1) for one v >= 0, v > 0 only if tight.
    free = (s > 0) & (s < 1)
    if bool(free.any()):
        v = ((z - s)[free] / c[free]).mean()
        torch.testing.assert_close(s, (z - v * c).clamp(0, 1), rtol=0, atol=1e-9 * (1 + z_scale))
        assert v >= -1e-9
        if v > 1e-9:  # tight, up to the rounding of z - v c (about 1e-16 |z| per channel)
            assert float(c @ s) == pytest.approx(budget, abs=1e-14 * float(c @ z.abs()) + 1e-12)


@settings()
@given(small_problems())
def test_idempotent(problem):
    z, c, budget = problem
    s = _project64(z, c, budget)
    again = project_to_budget(s, torch.tensor(c, dtype=F64), budget)
    torch.testing.assert_close(again, s, rtol=0, atol=1e-12)


@bracket_steps
def test_tight_budget_lands_on_budget(bracket_steps):
    g = torch.Generator().manual_seed(0)
    z = torch.rand(10_000, generator=g, dtype=F64) * 1.2
    c = torch.rand(10_000, generator=g, dtype=F64) * 10 + 0.1
    budget = 0.1 * float(c.sum())
    assert float(c @ z.clamp(0, 1)) > 5 * budget  # the constraint binds
    with _with_steps(bracket_steps):
        s = project_to_budget(z, c, budget)
    assert float(c @ s) == pytest.approx(budget, rel=1e-12)


def test_slack_budget_is_plain_clamp():
    z = torch.tensor([-0.5, 0.25, 0.75, 3.0], dtype=F64)
    s = project_to_budget(z, torch.ones(4, dtype=F64), 10.0)
    torch.testing.assert_close(s, z.clamp(0, 1), rtol=0, atol=0)


@bracket_steps
def test_flat_piece_at_budget_takes_smallest_multiplier(bracket_steps):
    # f(v) = 1 + clamp(0.5 - v, 0, 1) for v in [0, 2]: it reaches budget 1 at v = 0.5, stays
    # flat up to v = 2; the smallest multiplier keeps channel 0 at 1.
    with _with_steps(bracket_steps):
        s = _project64([3.0, 0.5], [1.0, 1.0], 1.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-12)


def test_keeps_dtype_and_device_and_matches_float64():
    g = torch.Generator().manual_seed(1)
    z = torch.rand(1000, generator=g) * 1.5 - 0.25
    c = torch.rand(1000, generator=g) + 0.5
    s = project_to_budget(z, c, 100.0)
    assert s.dtype == torch.float32 and s.device == z.device
    torch.testing.assert_close(s, project_to_budget(z.double(), c.double(), 100.0).float())


def test_empty_input():
    assert project_to_budget(torch.zeros(0), torch.zeros(0), 1.0).shape == (0,)


@pytest.mark.parametrize(
    ("z", "costs", "budget", "message"),
    [
        (torch.zeros(2, 3), torch.ones(2, 3), 1.0, "1-D tensors of the same shape"),
        (torch.zeros(3), torch.ones(4), 1.0, "1-D tensors of the same shape"),
        (torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), 1.0, "costs must be finite and > 0"),
        (torch.zeros(3), torch.tensor([1.0, -2.0, 1.0]), 1.0, "costs must be finite and > 0"),
        (torch.zeros(3), torch.tensor([1.0, float("nan"), 1.0]), 1.0, "costs must be finite"),
        (torch.zeros(3), torch.tensor([1.0, float("inf"), 1.0]), 1.0, "costs must be finite"),
        (torch.tensor([0.0, float("nan"), 0.0]), torch.ones(3), 1.0, "z must be finite"),
        (torch.tensor([0.0, float("inf"), 0.0]), torch.ones(3), 1.0, "z must be finite"),
        (torch.zeros(3), torch.ones(3), 0.0, "budget must be a finite number > 0"),
        (torch.zeros(3), torch.ones(3), -1.0, "budget must be a finite number > 0"),
        (torch.zeros(3), torch.ones(3), float("inf"), "budget must be a finite number > 0"),
        (torch.zeros(3), torch.ones(3), float("nan"), "budget must be a finite number > 0"),
    ],
)
def test_bad_inputs_raise(z, costs, budget, message):
    with pytest.raises(ValueError, match=message):
        project_to_budget(z, costs, budget)


# --------------------------------------------------------------------------------------------
# each group's two-channel minimum: the eval mask's pins, the sampler's top-up and its cost


def test_group_minimum_marks_each_groups_two_largest_values():
    generator = torch.Generator().manual_seed(0)
    sizes = [1, 2, 3, 7, 40]
    offsets = torch.tensor([0, *itertools.accumulate(sizes)])
    values = torch.randint(0, 4, (sum(sizes),), generator=generator).float()  # many ties
    pinned = group_minimum(values, offsets)
    for a, b in itertools.pairwise(offsets.tolist()):
        top = sorted(range(a, b), key=lambda i: (-float(values[i]), i))[:2]
        assert pinned[a:b].nonzero().squeeze(1).add(a).tolist() == sorted(top)


def test_keep_minimum_tops_short_groups_up_to_two_with_their_most_probable_channels():
    s = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.7, 0.2])
    masks = torch.tensor(
        [
            [False, False, False, False, False, True],  # one kept, not the most probable
            [False, True, False, False, False, False],
            [True, False, False, False, False, False],  # the only channel of its group
            [False, False, False, True, False, True],  # kept two: unchanged
        ]
    )
    kept = keep_minimum(masks.clone(), s, [0, 1, 6])
    assert kept.tolist() == [
        [True, False, False, False, True, True],
        [True, True, False, False, True, False],
        [True, False, True, False, True, False],
        [True, False, False, True, False, True],
    ]


def test_expected_top_up_is_the_mean_of_what_keep_minimum_adds():
    """Exactly, by enumerating every mask of small groups with its probability."""
    sizes = [1, 2, 3, 5]
    offsets = [0, *itertools.accumulate(sizes)]
    s = torch.tensor([0.3, 0.2, 0.9, 0.1, 0.5, 1.0, 0.0, 0.3, 0.6, 0.05, 0.25], dtype=F64)
    masks = torch.tensor(list(itertools.product([False, True], repeat=len(s))))
    weights = torch.where(masks, s, 1 - s).prod(1)
    added = keep_minimum(masks.clone(), s, offsets).double() - masks.double()
    expected = [float(weights @ added[:, a:b].sum(1)) for a, b in itertools.pairwise(offsets)]
    actual = expected_top_up(s, torch.tensor(offsets))
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), atol=1e-12, rtol=0)


def test_top_budget_mask_keeps_pinned_channels_first_and_past_the_budget():
    s = torch.tensor([0.9, 0.2, 0.8, 0.1])
    pinned = torch.tensor([False, True, False, True])
    assert top_budget_mask(s, torch.ones(4), 3.0, pinned).tolist() == [True, True, False, True]
    assert top_budget_mask(s, torch.ones(4), 1.0, pinned).tolist() == [False, True, False, True]


# --------------------------------------------------------------------------------------------
# top_budget_mask


@settings()
@given(
    st.integers(1, 40).flatmap(
        lambda n: st.tuples(
            st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), min_size=n, max_size=n),
            st.lists(st.sampled_from([0.5, 1.0, 2.0, 7.0]), min_size=n, max_size=n),
        )
    ),
    st.floats(0.5, 60.0),
)
def test_top_budget_mask_greedy_prefix(values, budget):
    s, c = torch.tensor(values[0]), torch.tensor(values[1])
    mask = top_budget_mask(s, c, budget)
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert float(c[mask].sum()) <= budget
    # The kept channels are a prefix of the order (s descending, lower index first on ties) ...
    order = sorted(range(len(s)), key=lambda i: (-float(s[i]), i))
    kept = [bool(mask[i]) for i in order]
    k = sum(kept)
    assert kept == [True] * k + [False] * (len(s) - k)
    # ... that stops only where the next channel would break the budget.
    if k < len(s):
        assert float(c[mask].sum()) + float(c[order[k]]) > budget


def test_top_budget_mask_tie_break_by_index():
    mask = top_budget_mask(torch.full((6,), 0.5), torch.ones(6), 3.0)
    assert mask.tolist() == [True, True, True, False, False, False]
    s = torch.tensor([0.2, 0.9, 0.2, 0.9, 0.2])
    assert top_budget_mask(s, torch.ones(5), 3.0).tolist() == [True, True, False, True, False]


def test_top_budget_mask_stops_at_first_overflow():
    # The cheap channel after an expensive one that does not fit is not taken: a strict prefix.
    s = torch.tensor([0.9, 0.8, 0.7])
    c = torch.tensor([1.0, 5.0, 1.0])
    assert top_budget_mask(s, c, 3.0).tolist() == [True, False, False]


def test_top_budget_mask_validates():
    with pytest.raises(ValueError, match="costs must be finite and > 0"):
        top_budget_mask(torch.ones(3), torch.zeros(3), 1.0)


# round_group_counts


@settings()
@given(
    st.lists(st.tuples(st.integers(1, 40), st.sampled_from([1.0, 2.0, 3.0])), min_size=1,
             max_size=4).flatmap(
        lambda groups: st.tuples(
            st.just(groups),
            st.lists(st.booleans(), min_size=sum(g[0] for g in groups),
                     max_size=sum(g[0] for g in groups)),
            st.lists(st.floats(0.0, 1.0), min_size=sum(g[0] for g in groups),
                     max_size=sum(g[0] for g in groups)),
        )
    ),
    st.integers(1, 17),
    st.floats(1.0, 150.0),
)  # fmt: skip
def test_round_group_counts_rounds_by_s_within_the_budget(case, multiple, budget):
    groups, kept, values = case
    offsets = [0, *itertools.accumulate(size for size, _ in groups)]
    costs = torch.cat([torch.full((size,), cost) for size, cost in groups])
    mask, s = torch.tensor(kept), torch.tensor(values)
    rounded = round_group_counts(mask, s, offsets, multiple, costs, budget)
    total = float(costs @ rounded.float())
    spans = list(itertools.pairwise(offsets))
    before = [int(mask[a:b].sum()) for a, b in spans]
    after = [int(rounded[a:b].sum()) for a, b in spans]
    exact = [min(k, size) <= multiple for k, (size, _) in zip(before, groups, strict=True)]
    floors = [k if e else k // multiple * multiple for k, e in zip(before, exact, strict=True)]
    given_up = sum(k - n for k, n, e in zip(before, after, exact, strict=True) if e)
    rounded_off = 0  # what rounding down took from the groups that then rounded up
    for (a, b), (size, cost), k, count, floor, e in zip(
        spans, groups, before, after, floors, exact, strict=True
    ):
        old, new, group_s = mask[a:b], rounded[a:b], s[a:b]
        if e:  # an exact-count group: as is, or gave up channels (never below two)
            assert min(2, k) <= count <= k
        else:
            assert count in (floor, min(floor + multiple, size))
            rounded_off += k - floor if count > floor else 0
        if count == floor < k and not given_up:  # its block did not fit the final budget
            assert total + (min(floor + multiple, size) - floor) * cost > budget * (1 + 1e-9)
        if count <= k:  # kept channels dropped from the lowest s
            assert bool((new <= old).all())
            if (old & ~new).any():
                assert group_s[new].min() >= group_s[old & ~new].max()
        else:  # dropped channels added from the highest s
            assert bool((new >= old).all())
            if (~new).any():
                assert group_s[new & ~old].min() >= group_s[~new].max()
    assert given_up == 0 or given_up < rounded_off  # fewer channels than the rounding restored
    assert total <= max(budget * (1 + 1e-9), float(costs @ mask.float()) + 1e-6)


def test_round_group_counts_examples():
    searched = torch.tensor([True] * 18 + [False] * 46 + [True] * 31 + [False] * 97)
    searched = torch.cat([searched, torch.arange(256) < 63])  # 18, 31, 63: 112 channels
    offsets, costs = [0, 64, 192, 448], torch.ones(448)
    s = torch.linspace(1.0, 0.0, 448)
    rounded = round_group_counts(searched, s, offsets, 16, costs, 112.0)
    assert [int(rounded[a:b].sum()) for a, b in itertools.pairwise(offsets)] == [16, 32, 64]
    assert rounded[:16].all() and not rounded[16:64].any()  # the two of lowest s dropped
    assert rounded[64:96].all()  # 31 kept, then the dropped one of highest s
    # at most the budget: 20 and 8 (28) cannot round 20 up to 24 (32 > 28)
    mask = torch.tensor([True] * 20 + [False] * 44 + [True] * 8 + [False] * 40)
    rounded = round_group_counts(mask, s[:112], [0, 64, 112], 8, torch.ones(112), 28.0)
    assert [int(rounded[:64].sum()), int(rounded[64:].sum())] == [16, 8]
    # one block fits: the larger remainder (and on ties the earlier group) rounds up
    mask = torch.tensor([True] * 13 + [False] * 51 + [True] * 15 + [False] * 33)
    rounded = round_group_counts(mask, s[:112], [0, 64, 112], 8, torch.ones(112), 28.0)
    assert [int(rounded[:64].sum()), int(rounded[64:].sum())] == [8, 16]
    small = torch.ones(3, dtype=torch.bool)  # a group no larger than the multiple: as is
    assert round_group_counts(small, s[:3], [0, 3], 16, torch.ones(3), 1.0).all()
    few = torch.arange(64) < 8  # 8 of 64 kept: one block already, so 8 stay 8
    assert int(round_group_counts(few, s[:64], [0, 64], 16, torch.ones(64), 8.0).sum()) == 8
    assert torch.equal(round_group_counts(searched, s, offsets, 1, costs, 112.0), searched)
    # exact-count groups give up a channel so that a block fits: 9/16/31 in 56 -> 8/16/32
    offsets, costs = [0, 32, 96, 224], torch.ones(224)
    mask = torch.cat([torch.arange(32) < 9, torch.arange(64) < 16, torch.arange(128) < 31])
    rounded = round_group_counts(mask, s[:224], offsets, 16, costs, 56.0)
    assert [int(rounded[a:b].sum()) for a, b in itertools.pairwise(offsets)] == [8, 16, 32]
    assert rounded[:8].all() and not rounded[8:32].any()  # the one of lowest s gave way
    # but not when they give up as many channels as the searched count lost: 9/4/17 in 42
    # (17 -> 32 fits if 9/4 give up 3, more than the one channel 17 -> 16 drops)
    mask = torch.cat([torch.arange(32) < 9, torch.arange(64) < 4, torch.arange(128) < 17])
    rounded = round_group_counts(mask, s[:224], offsets, 16, costs, 42.0)
    assert [int(rounded[a:b].sum()) for a, b in itertools.pairwise(offsets)] == [9, 4, 16]
