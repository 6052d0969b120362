"""VR-PGE structure-gradient estimator: Bernoulli score functions and the leave-one-out baseline."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

__all__ = ["ScoreForm", "leave_one_out", "score_function", "structure_gradient"]

ScoreForm = Literal["exact", "paper"]


def score_function(masks: Tensor, s: Tensor, form: ScoreForm, eps: float) -> Tensor:
    """psi(m, s) per sample, [K, N]: exact = (m - s)/(s(1-s)) (unbiased score function of Bernoulli); paper = (m - s)/sqrt(s(1-s)) (the VR-PGE code's form). s clamped to [eps, 1-eps] inside psi.

    The clamp keeps psi finite for channels whose probability was projected to 0 or 1.
    Computed in float32 or better; returns s's dtype.
    """
    if form not in get_args(ScoreForm):
        raise ValueError(f"form must be one of {get_args(ScoreForm)}, got {form!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must lie in (0, 0.5), got {eps!r}")
    if masks.dtype != torch.bool or masks.dim() != 2 or s.shape != masks.shape[1:]:
        raise ValueError(
            "masks must be a bool [K, N] tensor and s a [N] vector, got masks "
            f"{masks.dtype} {tuple(masks.shape)} and s {tuple(s.shape)}"
        )
    dtype = torch.promote_types(s.dtype, torch.float32)
    sc = s.to(dtype).clamp(eps, 1.0 - eps)
    var = sc * (1.0 - sc)
    psi = (masks.to(dtype) - sc) / (var if form == "exact" else var.sqrt())
    return psi.to(s.dtype)


def structure_gradient(
    losses: Tensor, masks: Tensor, s: Tensor, form: ScoreForm, eps: float
) -> Tensor:
    """VR-PGE with the leave-one-out baseline: g = 1/(K-1) * sum_j (L_j - mean_k L_k) * psi(m^j, s); K >= 2.

    Equal to 1/K sum_j (L_j - mean_{k != j} L_k) psi_j, so the baseline is independent of sample
    j and the estimator stays unbiased. Computed in float32 or better; returns s's dtype.
    """
    num = masks.shape[0] if masks.dim() == 2 else -1
    if losses.shape != (num,) or num < 2:
        raise ValueError(
            "need K >= 2 samples with losses of shape [K] matching masks [K, N], got losses "
            f"{tuple(losses.shape)} and masks {tuple(masks.shape)}; sample at least 2 masks"
        )
    dtype = torch.promote_types(torch.promote_types(s.dtype, losses.dtype), torch.float32)
    psi = score_function(masks, s.to(dtype), form, eps)
    return leave_one_out(losses.to(dtype), psi).to(s.dtype)


def leave_one_out(losses: Tensor, psi: Tensor) -> Tensor:
    """1/(K-1) * sum_j (L_j - mean_k L_k) * psi_j for score terms psi [K, N] computed already
    (the fused Triton sampler returns them with the masks).

    Computed as sum_j (L_j - mean) (psi_j - psi_0), equal since the centred losses sum to 0,
    so that a channel kept (or dropped) by every sample gets exactly 0 rather than rounding
    noise of the centred sum: Adam normalises any nonzero gradient to a step of about its
    lr, which would move such channels at random (and differently on each data-parallel
    rank or between compiled and eager losses)."""
    return (losses - losses.mean()) @ (psi - psi[0]) / (losses.shape[0] - 1)
