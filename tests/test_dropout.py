"""Dropout in compact graphs: the noise has dropout's distribution, attention drops its
weights as the math backend does, and the K forwards of a step share full-width noise
(common random numbers)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsefx
import sparsefx.compiled
import sparsefx.runtime
from sparsefx.kernels import attention_with_dropout, dropout_noise
from sparsefx.runtime import StructureState


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_noise_is_bernoulli_keep_scaled(p, dtype):
    n = 1 << 16
    noise = dropout_noise(torch.empty(n, dtype=dtype), p)
    assert noise.dtype == dtype
    scale = torch.tensor(1 / (1 - p), dtype=dtype)
    assert set(noise.unique().tolist()) == {0.0, scale.item()}
    dropped = (noise == 0).double().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / n) ** 0.5


def test_dropout_noise_at_zero_and_one():
    x = torch.randn(4, 5)
    assert torch.equal(dropout_noise(x, 0.0), torch.ones_like(x))
    assert torch.equal(dropout_noise(x, 1.0), torch.zeros_like(x))


ATTENTION_OPTIONS = {
    "plain": {},
    "causal": {"is_causal": True},
    "bool-mask": {"attn_mask": torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.3},
    "float-mask": {"attn_mask": torch.randn(2, 1, 5, 5, dtype=torch.float64)},
    "negative-scale": {"scale": -0.2},
}


@pytest.mark.parametrize("options", ATTENTION_OPTIONS.values(), ids=list(ATTENTION_OPTIONS))
def test_attention_without_dropout_equals_sdpa(options):
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    torch.testing.assert_close(attention_with_dropout(q, k, v, **options), expected)


def test_attention_drops_weights_as_the_math_backend_does():
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(1)
    out = attention_with_dropout(q, k, v, dropout_p=0.3, is_causal=True)
    torch.manual_seed(1)  # the same draw: the noise is the only random number drawn
    keep = dropout_noise(torch.empty(2, 3, 5, 5, dtype=torch.float64), 0.3) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Dropout mask should only be used for testing"
        expected, _ = torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, None, 0.3, True, dropout_mask=keep
        )
    torch.testing.assert_close(out, expected)
    assert not torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_low_precision_attention_is_computed_in_float32():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    out = attention_with_dropout(*(t.bfloat16() for t in (q, k, v)), is_causal=True)
    assert out.dtype == torch.bfloat16
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)


class DropoutNet(nn.Module):
    """A residual block: a dropout inside it (compact: after the pruned hidden layer) and
    one on what it writes into the dense stream (full width)."""

    def __init__(self, hidden_p: float, inplace: bool = False):
        super().__init__()
        self.inp, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.hidden_dropout = nn.Dropout(hidden_p, inplace=inplace)
        self.stream_dropout = nn.Dropout(0.5, inplace=inplace)

    def forward(self, x, y):
        h = self.inp(x)
        block = self.fc2(self.hidden_dropout(F.relu(self.fc1(h))))
        return F.cross_entropy(self.head(h + self.stream_dropout(block)), y)


def _data():
    return torch.randn(16, 8), torch.randint(0, 3, (16,))


def _program(hidden_p: float, inplace: bool = False):
    x, y = _data()
    sparse = sparsefx.transform(DropoutNet(hidden_p, inplace), (x, y), density=0.5)
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    program = sparse._programs[sparse._modes()][0]
    mask = sparse.structure.sample(1)[0]
    args = program.arguments(sparse.model, [x, y], sparse.structure.indices(mask))
    return program, args


def test_full_width_noise_is_returned_and_reused_by_the_score_graph():
    program, args = _program(hidden_p=0.0)
    assert program.noises == 1  # the stream's; p = 0 dropouts are left alone
    placeholders = [n for n in program.score.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(args) + 1
    loss, noise = program.graph(*args)
    assert set(noise.unique().tolist()) == {0.0, 2.0}
    with torch.no_grad():
        (same,) = program.score(*args, noise)
        (other,) = program.score(*args, dropout_noise(noise, 0.5))
    assert torch.equal(same, loss.detach())  # same mask, same noise: the same loss
    assert not torch.equal(other, loss.detach())  # the noise does matter


@pytest.mark.parametrize("inplace", [False, True], ids=["dropout", "dropout_"])
def test_compact_dropout_draws_its_own_noise_in_every_forward(inplace):
    """``nn.Dropout(inplace=True)`` (Hugging Face MobileNetV2's classifier) was not known:
    its compact input was scattered to full width and its noise never shared."""
    program, args = _program(hidden_p=0.5, inplace=inplace)
    assert program.noises == 1  # only the stream's is shared
    noise_nodes = program.graph.graph.find_nodes(op="call_function", target=dropout_noise)
    shared = [n.meta["sparsefx"]["shared"] for n in noise_nodes]
    assert sorted(shared) == [False, True]
    loss, noise = program.graph(*args)
    with torch.no_grad():
        (score,) = program.score(*args, noise)
    assert not torch.equal(score, loss.detach())


class ReadAfterDropout(nn.Module):
    """In-place dropout of a tensor, or of a view of it, that is read again afterwards: the
    later read sees the dropped values."""

    def __init__(self, read_later: str, p: float = 0.5):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(16, 8)
        self.head, self.read_later, self.p = nn.Linear(8, 2), read_later, p

    def forward(self, x):
        if self.read_later == "chunk":  # a piece of a tensor that needs no grad
            features = x * 2
            F.dropout(features.chunk(2, dim=-1)[0], self.p, training=True, inplace=True)
            return self.head(self.fc3(F.relu(self.fc1(features))))
        h = F.relu(self.fc1(x))
        if self.read_later == "flat":  # a view the analysis does not follow (a scatter)
            F.dropout(h.view(-1), self.p, training=True, inplace=True)
            return self.head(self.fc3(h))
        view = h.view(-1, 4, 4)  # read after the dropout only in "view"
        target = view if self.read_later == "base" else h
        dropped = F.dropout(target, self.p, training=True, inplace=True).view(-1, 16)
        out = self.fc2(dropped)
        if self.read_later in ("tensor", "base"):
            out = out + self.fc3(h)
        elif self.read_later == "view":
            out = out + self.fc3(view.view(-1, 16))
        return self.head(out)


@pytest.mark.parametrize("read_later", ["nothing", "tensor"])
def test_in_place_dropout_is_captured_out_of_place(read_later):
    """Export reads the dropped tensor's later uses from the dropout's output already."""
    from sparsefx.capture import capture

    captured = capture(ReadAfterDropout(read_later), (torch.randn(2, 8),), {}, training=True)
    targets = [n.target for n in captured.gm.graph.nodes]
    assert torch.ops.aten.dropout_.default not in targets
    assert targets.count(torch.ops.aten.dropout.default) == 1


@pytest.mark.parametrize("read_later", ["base", "view", "chunk", "flat"])
def test_in_place_dropout_of_a_tensor_whose_alias_is_read_later_keeps_its_input_dense(
    read_later,
):
    """The mutation must reach the base the dropped view (or chunk) was taken of, or a view
    taken of the dropped tensor before: a scatter (or the out-of-place op) would take it
    instead, and fc3 would read h undropped. p = 1 makes the dropout deterministic."""
    torch.manual_seed(0)
    model = ReadAfterDropout(read_later, p=1.0)
    x = torch.randn(2, 8)
    sparse = sparsefx.transform(model, x, density=0.5)
    if read_later != "chunk":  # h is compact: it is read in place, at full width
        reasons = [d.reason for d in sparse.analysis.dense if d.node == "linear"]
        assert any("in-place dropout_" in r for r in reasons), sparse.analysis.dense
        assert not sparse.analysis.scatters, sparse.analysis.scatters
    sparsefx.set_masks(
        sparse, {g.name: torch.ones(g.size, dtype=torch.bool) for g in sparse.groups}
    )
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(sparse(x), expected)
        if read_later in ("base", "view"):  # h is all dropped: only the biases are left
            biases = model.head(model.fc2.bias + model.fc3.bias).expand(2, -1)
            torch.testing.assert_close(expected, biases)


@pytest.mark.parametrize("mode", ["transform", "compile"])
@pytest.mark.parametrize("hidden_p", [0.0, 0.5], ids=["shared-only", "with-compact"])
def test_the_k_losses_of_a_step_share_full_width_noise(monkeypatch, mode, hidden_p):
    """With K equal masks the K losses differ only through unshared noise (the score
    forwards forced: a step whose masks all agree skips them, its gradient being zero)."""
    sample = StructureState.sample
    monkeypatch.setattr(StructureState, "sample", lambda self, k: sample(self, 1).expand(k, -1))
    for module in (sparsefx.runtime, sparsefx.compiled):
        monkeypatch.setattr(module, "samples_agree", lambda masks: False)
    losses = []

    def recording(values, psi):
        losses.append(values)
        return leave_one_out(values, psi)

    leave_one_out = sparsefx.runtime.leave_one_out
    monkeypatch.setattr(sparsefx.runtime, "leave_one_out", recording)
    model = DropoutNet(hidden_p)
    if mode == "transform":
        run = sparsefx.transform(model, _data(), density=0.5)
    else:
        run = torch.compile(model, backend="sparsefx", options={"density": 0.5})
    for _ in range(2):
        run(*_data()).backward()
    assert len(losses) == 2
    for values in losses:
        assert len(values) == 2
        assert (values[0] == values[1]).item() is (hidden_p == 0.0)


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_frozen_training_forward_returns_only_the_model_outputs(mode):
    """Without a structure step there is no score forward, and the noise outputs are still
    stripped: the caller gets the loss, and dropout still drops."""
    model = DropoutNet(hidden_p=0.5)
    x, y = _data()
    if mode == "transform":
        run = sparsefx.transform(model, (x, y), density=0.5)
    else:
        run = torch.compile(model, backend="sparsefx", options={"density": 0.5})
        run(x, y).backward()  # the compiled structure exists after the first call
    sparsefx.freeze(run)
    losses = [run(x, y) for _ in range(2)]
    assert all(isinstance(loss, torch.Tensor) and loss.dim() == 0 for loss in losses)
    assert not torch.equal(losses[0], losses[1])  # same mask, fresh dropout noise


class AlphaDropoutNet(nn.Module):
    """Alpha dropout past a mask point (h has two readers): it maps a dropped channel's
    zeros to non-zero values, which fc2 reads."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x):
        h = F.selu(self.fc1(x))
        return self.fc2(F.alpha_dropout(h, 0.5, training=True)) + self.fc3(h)


def test_alpha_dropout_is_not_taken_for_zero_preserving():
    """It was listed with dropout as zero-preserving, so it ran compactly and fc2 missed
    the values it gives dropped channels. It now reads a full-width scatter, drawing what
    the dense model draws from aten's generator."""
    torch.manual_seed(0)
    model = AlphaDropoutNet()
    x = torch.randn(4, 8)
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    (group,) = sparse.groups
    mask = torch.arange(16) % 3 != 0
    sparsefx.set_masks(sparse, {group.name: mask})
    with torch.no_grad():
        model.fc1.weight[~mask] = 0.0
        model.fc1.bias[~mask] = 0.0
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(sparse(x), expected)
