"""Mask sampling from the structure probabilities."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sample_masks"]


def sample_masks(s: Tensor, num_samples: int, generator: torch.Generator) -> Tensor:
    """K independent Bernoulli(s) masks, bool [K, N], drawn from `generator` only (reproducible, never the global RNG).

    m = (u < s) with u ~ U[0, 1) gives P(m_i = 1) = s_i; u is drawn in float32 or better so
    low-precision s is not quantised further by the uniforms.
    """
    if s.dim() != 1:
        raise ValueError(f"s must be a 1-D vector of probabilities, got shape {tuple(s.shape)}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    dtype = torch.promote_types(s.dtype, torch.float32)
    u = torch.rand((num_samples, s.shape[0]), generator=generator, dtype=dtype, device=s.device)
    return u < s.to(dtype)
