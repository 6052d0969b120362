"""Small models for the diff tool's tests (importable as a factory: tests/diff_models.py:tiny)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Tiny(nn.Module):
    """A stem, one residual block (its inner conv is prunable, the stream stays dense), a
    sigmoid gate whose channels are flipped (sparsefx cannot follow a flip, so the gate and
    the tensor it scales are read at full width), and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.gate = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        y = self.conv2(h)
        gate = torch.sigmoid(self.gate(h).mean((2, 3), keepdim=True)).flip(1)
        x = F.relu(x + y * gate)
        return self.fc(x.mean((2, 3)))


def tiny() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return Tiny(), torch.randn(2, 3, 8, 8)


class DataDependent(nn.Module):
    """A forward that branches on a tensor value: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if h.sum() > 0:  # the line the capture error must point at
            return h * 2
        return h


def data_dependent() -> tuple[nn.Module, Tensor]:
    return DataDependent(), torch.randn(2, 4)


def broken() -> nn.Module:
    raise RuntimeError("cannot build this model")


def not_a_model() -> int:
    return 3


@torch.library.custom_op("sparsefx_test::opaque", mutates_args=())
def opaque(x: Tensor) -> Tensor:
    """An op with no fake (meta) implementation: eager runs it, tracing cannot."""
    return x.clone()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(opaque(self.fc(x)))


class BreakBeforeHead(nn.Module):
    """A graph break between the hidden layer and the head: torch.compile makes two graphs."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(torch.relu(self.hidden(x)))
        torch._dynamo.graph_break()
        return self.head(torch.relu(h))
