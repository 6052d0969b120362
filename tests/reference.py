"""The reference semantics of DESIGN §2, written independently of sparsefx's analysis.

Models are Sequentials of "blocks" (a producer followed by its channel-wise chain) and a final
classifier. The reference runs the dense model and, with forward hooks, zeroes each dropped
channel at the end of its block; BatchNorm running statistics of dropped channels are then
restored, since they must not be updated in that step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class Spec:
    """A generated model: conv blocks (if image input) then linear blocks then a classifier."""

    in_features: int
    conv_widths: tuple[int, ...]
    linear_widths: tuple[int, ...]
    classes: int
    activation: str
    batch_norm: bool
    pool: bool
    image_size: int = 8


def build(spec: Spec) -> tuple[nn.Sequential, list[int]]:
    """The model and, per pruned block, the index of its block's last module."""
    layers: list[nn.Module] = []
    ends: list[int] = []
    channels, size = spec.in_features, spec.image_size
    for width in spec.conv_widths:
        layers.append(nn.Conv2d(channels, width, 3, padding=1))
        if spec.batch_norm:
            layers.append(nn.BatchNorm2d(width))
        layers.append(ACTIVATIONS[spec.activation]())
        if spec.pool and size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        ends.append(len(layers) - 1)
        channels = width
    if spec.conv_widths:
        layers.append(nn.Flatten())
        channels = channels * size * size
    for width in spec.linear_widths:
        layers.append(nn.Linear(channels, width))
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[spec.activation]())
        layers.append(nn.Dropout(0.0))
        ends.append(len(layers) - 1)
        channels = width
    layers.append(nn.Linear(channels, spec.classes))
    return nn.Sequential(*layers), ends


def example_input(spec: Spec, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    if spec.conv_widths:
        return torch.randn(batch, spec.in_features, spec.image_size, spec.image_size, dtype=dtype)
    return torch.randn(batch, spec.in_features, dtype=dtype)


@contextlib.contextmanager
def masked(model: nn.Sequential, ends: list[int], masks: list[Tensor]) -> Iterator[None]:
    """Run `model` under the reference semantics for per-block channel masks.

    Dropped channels' running statistics are restored on exit, so run backward inside.
    """
    norms = [
        (module, mask)
        for mask, start, end in zip(masks, [-1, *ends], ends, strict=False)
        for module in list(model)[start + 1 : end + 1]
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    saved = [(m, m.running_mean.clone(), m.running_var.clone()) for m, _ in norms]
    handles = [
        model[end].register_forward_hook(_zero_dropped(mask))
        for end, mask in zip(ends, masks, strict=True)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for (module, mean, var), (_, mask) in zip(saved, norms, strict=True):
            with torch.no_grad():
                module.running_mean[~mask] = mean[~mask]
                module.running_var[~mask] = var[~mask]


def _zero_dropped(mask: Tensor):
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        shape = [1] * output.dim()
        shape[1] = -1
        return output * mask.to(output.dtype).view(shape)

    return hook
