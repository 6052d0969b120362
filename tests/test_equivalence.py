"""Compact execution equals the reference semantics (DESIGN §2) on generated MLPs and CNNs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparsefx
from tests.reference import Spec, build, example_input, masked

TOLERANCE = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-4},
    torch.float64: {"atol": 1e-10, "rtol": 1e-9},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}

widths = st.integers(1, 12)
specs = st.builds(
    Spec,
    in_features=st.integers(1, 6),
    conv_widths=st.lists(widths, max_size=2).map(tuple),
    linear_widths=st.lists(widths, min_size=0, max_size=3).map(tuple),
    classes=st.integers(2, 5),
    activation=st.sampled_from(["relu", "gelu", "silu", "tanh"]),
    batch_norm=st.booleans(),
    pool=st.booleans(),
    image_size=st.sampled_from([4, 6, 8]),
).filter(lambda s: s.conv_widths or s.linear_widths)


def _masks(draw, sizes: list[int]) -> list[torch.Tensor]:
    """Random masks with at least one kept channel per block (sparsefx's invariant): a
    block of one channel always keeps it, as sparsefx leaves such a layer dense."""
    masks = [torch.tensor(draw(st.lists(st.booleans(), min_size=n, max_size=n))) for n in sizes]
    for mask in masks:
        mask[draw(st.integers(0, mask.numel() - 1))] = True
    return masks


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64, torch.bfloat16)):
    spec = draw(specs)
    dtype = draw(st.sampled_from(dtypes))
    batch = draw(st.integers(2, 5))
    sizes = [*spec.conv_widths, *spec.linear_widths]
    return spec, dtype, batch, _masks(draw, sizes), draw(st.integers(0, 2**16))


def _pair(spec: Spec, dtype: torch.dtype, batch: int, seed: int):
    torch.manual_seed(seed)
    model, ends = build(spec)
    model = model.to(dtype)
    reference = copy.deepcopy(model)
    x = example_input(spec, batch, dtype)
    # 0.5, or more where the groups' two-channel minimum (policy.keep_minimum) costs more
    # (counting the one-channel layers, which are no groups, only raises it)
    widths = [*spec.conv_widths, *spec.linear_widths]
    density = max(0.5, sum(min(2, w) for w in widths) / sum(widths))
    config = sparsefx.SparseConfig(density=density, seed=seed)
    sparse = sparsefx.transform(model, (x,), config=config)
    return model, reference, ends, sparse, x


def _pruned(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The masks of the blocks that are groups: a layer of one output channel is none."""
    return [m for m in masks if m.numel() > 1]


@given(cases())
def test_training_step_matches_reference(case):
    spec, dtype, batch, masks, seed = case
    model, reference, ends, sparse, x = _pair(spec, dtype, batch, seed)
    groups = sparsefx.groups(sparse)
    assert [g.size for g in groups] == [m.numel() for m in _pruned(masks)]
    sparsefx.set_masks(sparse, {g.name: m for g, m in zip(groups, _pruned(masks), strict=True)})

    out = sparse(x)
    out.float().square().mean().backward()
    with masked(reference, ends, masks):  # backward inside: BN saved its running stats
        expected = reference(x)
        expected.float().square().mean().backward()

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, **tol)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=f"gradient of {name}")
    for (name, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, c, **tol, msg=f"buffer {name}")


@given(cases(dtypes=(torch.float32,)))
def test_dropped_weights_get_exactly_zero_gradient(case):
    spec, dtype, batch, masks, seed = case
    model, _, _, sparse, x = _pair(spec, dtype, batch, seed)
    groups = sparsefx.groups(sparse)
    sparsefx.set_masks(sparse, {g.name: m for g, m in zip(groups, _pruned(masks), strict=True)})
    sparse(x).sum().backward()
    params = dict(model.named_parameters())
    for group, mask in zip(groups, _pruned(masks), strict=True):
        for name, dim in group.members:
            grad = params[name].grad
            dropped = grad.index_select(dim, (~mask).nonzero().squeeze(1)) if dim == 0 else None
            if dim == 1:  # consumer columns; a flattened consumer owns a block per channel
                block = grad.shape[1] // mask.numel()
                columns = (~mask).repeat_interleave(block)
                dropped = grad[:, columns]
            assert torch.count_nonzero(dropped) == 0, f"{name} dim {dim}"


@given(cases(dtypes=(torch.float32, torch.float64)))
def test_eval_matches_reference_with_deterministic_mask(case):
    spec, dtype, batch, _, seed = case
    _, reference, ends, sparse, x = _pair(spec, dtype, batch, seed)
    sparse.eval()
    reference.eval()
    out = sparse(x)
    chosen = list(sparsefx.probabilities(sparse))
    mask = sparse.structure.deterministic_mask()
    pruned = iter(sparse.structure.split(mask))
    assert len(sparse.structure.split(mask)) == len(chosen)
    widths = [*spec.conv_widths, *spec.linear_widths]
    masks = [next(pruned) if w > 1 else torch.ones(1, dtype=torch.bool) for w in widths]
    with masked(reference, ends, masks):
        expected = reference(x)
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def test_sampled_training_step_uses_first_mask_and_matches_reference():
    spec = Spec(3, (6,), (10,), 4, "relu", batch_norm=True, pool=True)
    model, reference, ends, sparse, x = _pair(spec, torch.float64, 4, 0)
    target = torch.randint(0, 4, (4,))
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    loss = criterion(sparse(x), target)
    loss.backward()
    masks = list(sparsefx.masks(sparse).values())
    with masked(reference, ends, masks):
        expected = nn.functional.cross_entropy(reference(x), target)
        expected.backward()
    torch.testing.assert_close(loss, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    for b, c in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("batch", [3, 7])
def test_batch_size_can_change_between_calls(batch):
    spec = Spec(2, (4,), (5,), 3, "relu", batch_norm=True, pool=False)
    _, reference, ends, sparse, _ = _pair(spec, torch.float64, 4, 1)
    masks = [
        torch.tensor([1, 0, 1, 1], dtype=torch.bool),
        torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool),
    ]
    sparsefx.set_masks(
        sparse, {g.name: m for g, m in zip(sparsefx.groups(sparse), masks, strict=True)}
    )
    x = example_input(spec, batch, torch.float64)
    with masked(reference, ends, masks):
        expected = reference(x)
    torch.testing.assert_close(sparse(x), expected)
    assert len(sparse._programs[sparse._modes()]) == 1, "a new batch size needs no new capture"


class NormsOfTheInput(nn.Module):
    """A BatchNorm, an InstanceNorm and a BatchNorm under ``no_grad`` of the input: their
    statistics do not depend on the masks, so a training step updates them as one eager
    forward does."""

    def __init__(self):
        super().__init__()
        self.batch_norm = nn.BatchNorm1d(8)
        self.instance_norm = nn.InstanceNorm1d(2, track_running_stats=True)
        self.norm_without_grad = nn.BatchNorm1d(8)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x, y):
        h = self.batch_norm(x) + self.instance_norm(x.view(-1, 2, 4)).flatten(1)
        with torch.no_grad():
            h = h + self.norm_without_grad(x)
        return F.cross_entropy(self.head(torch.relu(self.fc(h))), y)


@pytest.mark.parametrize("samples", [2, 4])
def test_score_forwards_leave_running_statistics_alone(samples):
    """The K-1 score forwards normalise with batch statistics and update no running ones
    (DESIGN §3 step 3). An InstanceNorm tracking running statistics updated them in every
    score forward too, and so did a BatchNorm inside a ``no_grad`` region (a body of its own
    in the graph): the score graph cleared top-level BatchNorms' only."""
    torch.manual_seed(0)
    model, x, y = NormsOfTheInput(), torch.randn(6, 8), torch.randint(0, 3, (6,))
    eager = copy.deepcopy(model)
    eager(x, y)
    config = sparsefx.SparseConfig(density=0.5, samples=samples, seed=0)
    sparse = sparsefx.transform(model, (x, y), config=config)
    sparse(x, y).backward()
    for norm in ("batch_norm", "instance_norm", "norm_without_grad"):
        for statistic in ("running_mean", "running_var"):
            torch.testing.assert_close(
                getattr(getattr(model, norm), statistic),
                getattr(getattr(eager, norm), statistic),
                msg=f"{norm}.{statistic}",
            )


def test_submodules_in_eval_inside_a_training_model_match_reference():
    """A BatchNorm frozen in eval (running statistics used, not updated) inside a training
    model is captured as such, and so is the model once it is unfrozen again."""
    spec = Spec(3, (6,), (10,), 4, "relu", batch_norm=True, pool=True)
    model, reference, ends, sparse, x = _pair(spec, torch.float64, 4, 0)
    masks = [torch.rand(6) < 0.6, torch.rand(10) < 0.6]
    for mask in masks:
        mask[0] = True
    sparsefx.set_masks(
        sparse, {g.name: m for g, m in zip(sparsefx.groups(sparse), masks, strict=True)}
    )
    norms = [i for i, m in enumerate(model) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for i in norms:  # statistics that differ from a fresh batch's
        model[i].running_mean.uniform_(-1, 1)
        model[i].running_var.uniform_(0.5, 2)
        reference[i].load_state_dict(model[i].state_dict())
    for frozen in (True, False):
        sparse.train()
        reference.train()
        for i in norms:
            model[i].train(not frozen)
            reference[i].train(not frozen)
        before = [model[i].running_mean.clone() for i in norms]
        out = sparse(x)
        out.square().mean().backward()
        with masked(reference, ends, masks):
            expected = reference(x)
            expected.square().mean().backward()
        torch.testing.assert_close(out, expected)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
        for b, c in zip(model.buffers(), reference.buffers(), strict=True):
            torch.testing.assert_close(b, c)
        unchanged = all(
            torch.equal(b, model[i].running_mean) for b, i in zip(before, norms, strict=True)
        )
        assert unchanged == frozen
        assert all(model[i].training is not frozen for i in norms), "flags are the user's"
        model.zero_grad()
        reference.zero_grad()
