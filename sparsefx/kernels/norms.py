"""Group norm on kept norm groups: ``sparsefx::group_norm``.

A GroupNorm on a compact tensor holds only its kept norm groups, whose number changes with
every mask. ``aten.group_norm`` takes that number as an ``int`` (not a ``SymInt``), so a
traced graph specialises it and Inductor recompiled at every new count. This op takes the
channels per group instead, which are fixed. Traced (torch.compile, torch.export) it
decomposes into an instance norm of each group and the affine parameters (no fixed count
anywhere). Eager programs (`passes.call_ops_directly`) call `group_norm_direct`, the
native kernel with the count read off the tensor: in the instance-norm form the norm's
forward and backward took 2-4 times as long on CPU (benchmarks/group_norm.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_norm_direct"]

aten = torch.ops.aten

torch.library.define(
    "sparsefx::group_norm",
    "(Tensor input, int per_group, Tensor? weight, Tensor? bias, float eps, bool cudnn_enabled)"
    " -> Tensor",
)


@torch.library.impl("sparsefx::group_norm", "CompositeImplicitAutograd")
def _group_norm_of_instance_norms(
    x: Tensor,
    per_group: int,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    cudnn_enabled: bool,
) -> Tensor:
    """Each norm group as one instance of an instance norm (channels unflattened to
    (group, channel in it)), then the per-channel affine; the result in the input's dtype,
    as group_norm's. Under CUDA autocast group_norm runs in float32, so this does too."""
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        x, weight, bias = (None if t is None else t.float() for t in (x, weight, bias))
    groups = x.unflatten(1, (-1, per_group))
    args = (None, None, None, None, True, 0.0, eps, cudnn_enabled)  # no affine, no statistics
    out = aten.instance_norm(groups, *args).flatten(1, 2)
    channels = [-1] + [1] * (x.dim() - 2)
    if weight is not None:
        out = out * weight.view(channels)
    if bias is not None:
        out = out + bias.view(channels)
    return out.to(x.dtype)


def group_norm_direct(x: Tensor, per_group: int, *args: object) -> Tensor:
    """``sparsefx::group_norm`` for eager programs: the native group norm of the kept
    groups (weight, bias, eps and cudnn_enabled as the op takes them), with its own
    autograd and autocast."""
    return aten.group_norm(x, x.shape[1] // per_group, *args)
