"""Mask sampling and the VR-PGE structure gradient, checked by exact enumeration."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsefx.policy import sample_masks, score_function, structure_gradient

F64 = torch.float64
EPS = 1e-6


# --------------------------------------------------------------------------------------------
# sample_masks


def test_sample_masks_reproducible_from_generator():
    s = torch.linspace(0.0, 1.0, 50)
    a = sample_masks(s, 4, torch.Generator().manual_seed(123))
    b = sample_masks(s, 4, torch.Generator().manual_seed(123))
    c = sample_masks(s, 4, torch.Generator().manual_seed(124))
    assert a.dtype == torch.bool and a.shape == (4, 50)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_masks_draws_are_independent_across_rows():
    masks = sample_masks(torch.full((1000,), 0.5), 2, torch.Generator().manual_seed(0))
    assert not torch.equal(masks[0], masks[1])


def test_sample_masks_mean_approaches_s():
    s = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0])
    masks = sample_masks(s, 20_000, torch.Generator().manual_seed(7))
    mean = masks.double().mean(0)
    torch.testing.assert_close(mean, s.double(), rtol=0, atol=0.015)
    assert not masks[:, 0].any() and masks[:, -1].all()  # s = 0 never, s = 1 always


def test_sample_masks_leaves_global_rng_alone():
    state = torch.get_rng_state()
    sample_masks(torch.rand(100, generator=torch.Generator()), 3, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_sample_masks_accepts_float_dtypes(dtype):
    masks = sample_masks(torch.full((8,), 0.5, dtype=dtype), 2, torch.Generator().manual_seed(0))
    assert masks.dtype == torch.bool and masks.shape == (2, 8)


def test_sample_masks_validates():
    g = torch.Generator()
    with pytest.raises(ValueError, match="1-D"):
        sample_masks(torch.rand(2, 3), 2, g)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        sample_masks(torch.rand(3), 0, g)


# --------------------------------------------------------------------------------------------
# structure_gradient: unbiasedness by exact enumeration

ALL_MASKS = torch.tensor(list(itertools.product([False, True], repeat=3)))  # [8, 3]


def _mask_probabilities(s: torch.Tensor) -> torch.Tensor:
    """P(m) under independent Bernoulli(s), for every row m of ALL_MASKS (differentiable in s)."""
    m = ALL_MASKS.to(s.dtype)
    return (m * s + (1 - m) * (1 - s)).prod(dim=1)


def _exact_gradient(s: torch.Tensor, loss_table: torch.Tensor) -> torch.Tensor:
    """d/ds E_{m ~ Bern(s)}[L(m)], by autograd through the enumerated expectation."""
    s = s.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_mask_probabilities(s) @ loss_table, s)
    return grad


def _expected_estimate(s: torch.Tensor, loss_table: torch.Tensor, k: int, form: str):
    """E[g] over every K-tuple of masks, each weighted by its probability."""
    p = _mask_probabilities(s)
    expected = torch.zeros_like(s)
    for tuple_idx in itertools.product(range(len(ALL_MASKS)), repeat=k):
        idx = torch.tensor(tuple_idx)
        g = structure_gradient(loss_table[idx], ALL_MASKS[idx], s, form, EPS)
        expected += p[idx].prod() * g
    return expected


LOSS_TABLE = torch.randn(8, generator=torch.Generator().manual_seed(3), dtype=F64) * 2 + 5
S_VALUES = torch.tensor([0.2, 0.55, 0.9], dtype=F64)


@pytest.mark.parametrize("k", [2, 3])
def test_exact_form_is_unbiased(k):
    expected = _expected_estimate(S_VALUES, LOSS_TABLE, k, "exact")
    torch.testing.assert_close(expected, _exact_gradient(S_VALUES, LOSS_TABLE), rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [2, 3])
def test_paper_form_is_gradient_scaled_by_std(k):
    expected = _expected_estimate(S_VALUES, LOSS_TABLE, k, "paper")
    scaled = _exact_gradient(S_VALUES, LOSS_TABLE) * (S_VALUES * (1 - S_VALUES)).sqrt()
    torch.testing.assert_close(expected, scaled, rtol=0, atol=1e-10)


def test_unbiased_for_other_probabilities_and_losses():
    g = torch.Generator().manual_seed(11)
    s = torch.tensor([0.05, 0.5, 0.97], dtype=F64)
    table = torch.randn(8, generator=g, dtype=F64) * 100
    torch.testing.assert_close(
        _expected_estimate(s, table, 2, "exact"), _exact_gradient(s, table), rtol=0, atol=1e-10
    )


# --------------------------------------------------------------------------------------------
# structure_gradient: properties


@settings()
@given(
    k=st.integers(2, 6),
    n=st.integers(1, 20),
    seed=st.integers(0, 2**31 - 1),
    shift=st.floats(-1e3, 1e3),
    form=st.sampled_from(["exact", "paper"]),
)
def test_leave_one_out_is_invariant_to_constant_loss_shift(k, n, seed, shift, form):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, generator=g, dtype=F64) * 0.98 + 0.01
    masks = sample_masks(s, k, g)
    losses = torch.randn(k, generator=g, dtype=F64)
    base = structure_gradient(losses, masks, s, form, EPS)
    shifted = structure_gradient(losses + shift, masks, s, form, EPS)
    torch.testing.assert_close(shifted, base, rtol=0, atol=1e-10 * (1 + abs(shift)))


def test_matches_formula_by_hand():
    s = torch.tensor([0.25, 0.5], dtype=F64)
    masks = torch.tensor([[True, False], [False, False], [True, True]])
    losses = torch.tensor([1.0, 2.0, 6.0], dtype=F64)
    centred = losses - 3.0
    psi = (masks.double() - s) / (s * (1 - s))
    expected = (centred[:, None] * psi).sum(0) / 2
    torch.testing.assert_close(structure_gradient(losses, masks, s, "exact", EPS), expected)


def test_dtypes_low_precision_losses_and_s():
    s = torch.tensor([0.3, 0.6, 0.9], dtype=torch.bfloat16)
    masks = torch.tensor([[True, False, True], [False, True, True]])
    losses = torch.tensor([1.5, 0.5], dtype=torch.float16)
    g = structure_gradient(losses, masks, s, "exact", EPS)
    assert g.dtype == torch.bfloat16
    reference = structure_gradient(losses.double(), masks, s.double(), "exact", EPS)
    torch.testing.assert_close(g.double(), reference, rtol=1e-2, atol=1e-2)
    assert structure_gradient(losses.double(), masks, s.float(), "exact", EPS).dtype == (
        torch.float32
    )


def test_score_function_values_and_clamp():
    s = torch.tensor([0.25, 0.0, 1.0])
    masks = torch.tensor([[True, True, False], [False, False, True]])
    exact = score_function(masks, s, "exact", 1e-3)
    torch.testing.assert_close(exact[0, 0], torch.tensor(1 / 0.25))
    torch.testing.assert_close(exact[1, 0], torch.tensor(-1 / 0.75))
    assert torch.isfinite(exact).all()  # s at 0 or 1 is clamped to [eps, 1 - eps]
    torch.testing.assert_close(exact[0, 1], torch.tensor((1 - 1e-3) / (1e-3 * (1 - 1e-3))))
    paper = score_function(masks, s, "paper", 1e-3)
    torch.testing.assert_close(paper[0, 0], torch.tensor(0.75 / (0.25 * 0.75) ** 0.5))
    assert paper.shape == (2, 3) and paper.dtype == torch.float32


@pytest.mark.parametrize(
    ("losses", "masks", "s", "form", "eps", "message"),
    [
        (torch.ones(1), torch.ones(1, 3, dtype=torch.bool), torch.rand(3), "exact", EPS, "K >= 2"),
        (torch.ones(3), torch.ones(2, 3, dtype=torch.bool), torch.rand(3), "exact", EPS, "K >= 2"),
        (torch.ones(2), torch.ones(2, 3), torch.rand(3), "exact", EPS, "bool"),
        (torch.ones(2), torch.ones(2, 3, dtype=torch.bool), torch.rand(4), "exact", EPS, "\\[N\\]"),
        (torch.ones(2), torch.ones(3, dtype=torch.bool), torch.rand(3), "exact", EPS, "K >= 2"),
        (torch.ones(2), torch.ones(2, 3, dtype=torch.bool), torch.rand(3), "sqrt", EPS, "form"),
        (torch.ones(2), torch.ones(2, 3, dtype=torch.bool), torch.rand(3), "exact", 0.0, "eps"),
        (torch.ones(2), torch.ones(2, 3, dtype=torch.bool), torch.rand(3), "exact", 0.5, "eps"),
    ],
)
def test_structure_gradient_validates(losses, masks, s, form, eps, message):
    with pytest.raises(ValueError, match=message):
        structure_gradient(losses, masks, s, form, eps)


def test_channels_every_sample_agrees_on_get_an_exact_zero_gradient():
    """Rounding in the centred losses must not reach channels whose psi is the same in every
    sample: Adam would turn that noise into steps of about its lr."""
    losses = torch.tensor([0.1, 0.7, 0.3], dtype=torch.float32)
    s = torch.tensor([0.3, 0.6, 0.9, 0.5])
    masks = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)
    gradient = structure_gradient(losses, masks, s, "paper", 1e-3)
    assert gradient[0] == 0 and gradient[1] == 0  # kept / dropped by all three samples
    assert gradient[2] != 0 and gradient[3] != 0
    psi = score_function(masks, s, "paper", 1e-3)
    plain = (losses - losses.mean()) @ psi / 2  # the textbook sum keeps the rounding
    assert plain[0] != 0 and plain[1] != 0, "the example must have rounding to cancel"
