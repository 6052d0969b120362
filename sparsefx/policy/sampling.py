"""Mask sampling from the structure probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["expected_top_up", "keep_minimum", "sample_masks"]


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


def keep_minimum(masks: Tensor, s: Tensor, offsets: Sequence[int]) -> Tensor:
    """Top each group (at `offsets`) up to two kept channels, its only one in a 1-channel
    group, with its most probable dropped channels by s, where a mask keeps fewer; in place
    on bool [..., N] masks.

    An empty group disconnects the network (layer collapse) and several aten ops reject
    zero-channel tensors; a single kept channel is a shape that torch.compile specialises
    (sizes 0 and 1 always are), so allowing it would recompile the compiled graphs for every
    group that reaches it. The runtime pays for what this adds from the budget
    (`expected_top_up`).
    """
    starts, ends = list(offsets[:-1]), list(offsets[1:])
    if not starts:
        return masks
    kept = torch.nn.functional.pad(masks.cumsum(-1), (1, 0))  # one count per group at once
    counts = kept[..., ends] - kept[..., starts]
    need = torch.tensor(ends).sub(torch.tensor(starts)).clamp(max=2).to(counts.device)
    short = (counts < need).reshape(-1, len(starts)).any(0)
    for g in short.nonzero().flatten().tolist():  # groups whose s makes a short mask likely
        a, b = starts[g], ends[g]
        top = a + torch.sort(s[a:b], descending=True, stable=True).indices[: min(2, b - a)]
        for channel in top.unbind():  # the most probable first (ties: lower index), while short
            masks[..., channel] |= masks[..., a:b].sum(-1) < min(2, b - a)
    return masks


def expected_top_up(s: Tensor, offsets: Tensor) -> Tensor:
    """Expected channels `keep_minimum` adds to each group (at `offsets`, [G + 1] int64) of
    a mask m ~ Bernoulli(s), float64 [G], O(N) and without a host read: a group short of its
    minimum by one gains a channel when no uncertain channel is kept, short by two gains two
    then and one when exactly one is. Channels at s = 1 are counted as kept, not clamped:
    their odds s / (1 - s) would swamp the sums."""
    sizes = offsets.diff()
    group = torch.repeat_interleave(
        torch.arange(sizes.shape[0], device=s.device), sizes, output_size=s.shape[0]
    )
    p = s.to(torch.float64).clamp(0.0, 1.0)
    certain = p >= 1.0 - 1e-9
    q = torch.where(certain, 0.0, p)

    def sums(x: Tensor) -> Tensor:
        return torch.zeros(sizes.shape, dtype=torch.float64, device=s.device).index_add_(
            0, group, x
        )

    none = sums(q.neg().log1p()).exp()  # P(no uncertain channel kept)
    one = none * sums(q / (1 - q))  # P(exactly one kept)
    short = sizes.clamp(max=2) - sums(certain.double())
    return torch.where(short >= 2, 2 * none + one, torch.where(short == 1, none, 0.0))
