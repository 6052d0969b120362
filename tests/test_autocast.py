"""Mixed precision: training under torch.autocast (bfloat16 on CPU; float16 with GradScaler
on CUDA) behaves as float32 training within low-precision tolerances, the structure gradient
is computed in float32 from the K losses, and a non-finite loss does not poison s."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsefx
from tests.reference import masked

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4),
    ).to(DEVICE)  # fmt: skip


def _train(model, mode: str, dtype: torch.dtype | None, steps: int = 6, scaler=None):
    """Losses of `steps` steps and the final s, under autocast to `dtype` (None: float32)."""
    torch.manual_seed(1)
    x = torch.randn(16, 3, 8, 8, device=DEVICE)
    y = torch.randint(0, 4, (16,), device=DEVICE)
    options = {"density": 0.5, "seed": 4, "score_lr": 0.05}
    if mode == "compile":
        sparse = torch.compile(model, backend="sparsefx", options=options)
    else:
        sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**options))
    criterion = sparsefx.wrap_loss(sparse, nn.functional.cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.autocast(DEVICE, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = criterion(sparse(x), y)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        losses.append(loss.item())
    s = torch.cat(list(sparsefx.probabilities(sparse).values()))
    return torch.tensor(losses), s


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_bfloat16_autocast_trains_like_float32(mode):
    model = _model()
    losses32, s32 = _train(copy.deepcopy(model), mode, None)
    losses16, s16 = _train(model, mode, torch.bfloat16)
    torch.testing.assert_close(losses16, losses32, rtol=0.05, atol=0.02)
    assert s16.dtype == torch.float32
    torch.testing.assert_close(s16, s32, rtol=0, atol=0.05)
    assert losses16[-1] < losses16[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 GradScaler needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_float16_with_grad_scaler_trains_like_float32(mode):
    model = _model()
    losses32, s32 = _train(copy.deepcopy(model), mode, None)
    scaler = torch.amp.GradScaler("cuda")
    losses16, s16 = _train(model, mode, torch.float16, scaler=scaler)
    torch.testing.assert_close(losses16, losses32, rtol=0.02, atol=0.01)
    torch.testing.assert_close(s16, s32, rtol=0, atol=0.05)


def test_non_finite_loss_leaves_the_structure_finite():
    model = _model()
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(density=0.5, seed=0))
    criterion = sparsefx.wrap_loss(sparse, lambda out, y: (out * y).sum())
    scale = torch.tensor(float("inf"), device=DEVICE)
    criterion(sparse(x), scale).backward()  # an overflowing step: inf losses
    sparse(x)  # the next training forward applies the pending structure update
    s = sparse.structure.probabilities
    assert torch.isfinite(s).all()


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_sampled_compact_convolutions_compute_in_the_autocast_dtype(mode):
    """A sampled step's compact convolutions (on CPU rounded up to channel blocks, which calls
    aten.convolution, not the conv2d that autocast's policy lists) compute in bfloat16 under
    bfloat16 autocast, as the dense model's do, and match the reference semantics run under
    the same autocast; weight gradients stay float32."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
        nn.Conv2d(12, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # keeps the conv's dtype
    ).to(DEVICE)  # fmt: skip
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6, device=DEVICE)
    options = {"density": 0.5, "seed": 3}  # about 6 of 12 kept: not a multiple of 8
    if mode == "compile":
        sparse = torch.compile(model, backend="sparsefx", options=options)
    else:
        sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**options))
    criterion = sparsefx.wrap_loss(sparse, lambda out: out.float().square().mean())
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = sparse(x)
        loss = criterion(out)
    loss.backward()
    masks = list(sparsefx.masks(sparse).values())
    if DEVICE == "cpu":  # CPU rounds kept counts up to 8 (CUDA keeps exact counts)
        assert all(0 < int(m.sum()) < 12 and int(m.sum()) % 8 for m in masks), "not rounded"
    with masked(reference, [1, 3], masks), torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = reference(x)
        expected.float().square().mean().backward()
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, atol=3e-2, rtol=3e-2, msg=f"gradient of {name}")


class FloatLogits(nn.Module):
    """Casts its logits to float32, as Hugging Face losses do (``logits.float()``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x))).float()


def test_a_transformed_model_that_casts_its_outputs_runs_under_autocast_and_without():
    """Export writes a dtype assert before each ``.to``: captured in float32, the graph
    failed under autocast ("Tensor dtype mismatch") where eager casts bfloat16 logits."""
    torch.manual_seed(0)
    model = FloatLogits().to(DEVICE)
    x, y = torch.randn(8, 8, device=DEVICE), torch.randint(0, 4, (8,), device=DEVICE)
    sparse = sparsefx.transform(model, (x,), density=0.5)
    criterion = sparsefx.wrap_loss(sparse, nn.functional.cross_entropy)
    for enabled in (True, False):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=enabled):
            logits = sparse(x)
            loss = criterion(logits, y)
        assert logits.dtype == torch.float32
        loss.backward()
        assert torch.isfinite(loss)
