"""The public API: training protocol, state, freezing, statistics and clear errors."""

from __future__ import annotations

import copy
import io
import re
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import sparsefx
from sparsefx.policy import round_group_counts


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)
    )


class LossModel(nn.Module):
    """Returns a scalar loss when given targets, as Hugging Face and nanoGPT models do."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x, y):
        return F.cross_entropy(self.net(x), y)


def data(n: int = 12):
    return torch.randn(n, 8), torch.randint(0, 3, (n,))


def _wrapped(model: nn.Module) -> tuple[nn.Module, Callable[..., Tensor], Tensor, Tensor]:
    """`model` transformed at density 0.5, its wrapped cross-entropy, and a batch."""
    sparse = sparsefx.transform(model, torch.randn(4, 8), density=0.5)
    return sparse, sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss()), *data()


def test_groups_members_and_dense_report():
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    groups = sparsefx.groups(sparse)
    assert [(g.name, g.size) for g in groups] == [("0", 16), ("2", 16)]
    assert groups[0].members == [("0.weight", 0), ("0.bias", 0), ("2.weight", 1)]
    assert groups[1].members == [("2.weight", 0), ("2.bias", 0), ("4.weight", 1)]
    (dense,) = sparse.analysis.dense
    assert dense.node == "linear_2" and dense.reason.startswith("output layer")


def test_cnn_groups_cover_batch_norm_and_flattened_consumer():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2)
    )
    sparse = sparsefx.transform(model, torch.randn(2, 3, 6, 6), density=0.5)
    (group,) = sparsefx.groups(sparse)
    assert group.members == [
        ("0.weight", 0),
        ("0.bias", 0),
        ("1.weight", 0),
        ("1.bias", 0),
        ("4.weight", 1),
    ]


def test_scalar_loss_model_trains_with_an_unmodified_loop():
    torch.manual_seed(0)
    model = LossModel()
    sparse = sparsefx.transform(model, data(), density=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = sparsefx.probabilities(sparse)
    x, y = data()
    for _ in range(3):
        loss = sparse(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sparse(x, y)  # applies the last pending structure update
    after = sparsefx.probabilities(sparse)
    assert any(not torch.equal(before[k], after[k]) for k in before), "s must be trained"
    stats = sparsefx.stats(sparse)
    assert stats["expected_density"] == pytest.approx(0.5, abs=1e-5)


def test_logits_model_needs_wrap_loss_and_says_so():
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    with pytest.raises(sparsefx.MissingLossError, match=r"sparsefx\.wrap_loss"):
        sparse(torch.randn(4, 8))


def test_wrap_loss_trains_structure_and_weights():
    torch.manual_seed(0)
    model = mlp()
    sparse, criterion, x, y = _wrapped(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model[0].weight.detach().clone()
    loss = criterion(sparse(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert sparse.structure.pending is not None, "backward commits the structure gradient"
    assert not torch.equal(weight, model[0].weight)
    sparse(x)
    assert sparse.structure.pending is None, "the next forward applies it"


def test_eval_uses_deterministic_top_budget_mask():
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.25)
    sparse.eval()
    x = torch.randn(5, 8)
    torch.testing.assert_close(sparse(x), sparse(x), rtol=0, atol=0)
    mask = sparse.structure.deterministic_mask()
    assert int(mask.sum()) == 8  # 25% of the 32 prunable channels


def test_the_original_models_eval_switch_is_the_sparse_models():
    """The loop holds `model` (its optimizer does): `model.eval()` used to leave the sparse
    model sampling random masks, applying pending updates, in what the user meant as eval."""
    model = mlp()
    sparse = sparsefx.transform(model, torch.randn(4, 8), density=0.25)
    sparsefx.wrap_loss(sparse, F.cross_entropy)
    x = torch.randn(5, 8)
    model.eval()
    assert not sparse.training
    step = int(sparse.structure.step)
    torch.testing.assert_close(sparse(x), sparse(x), rtol=0, atol=0)
    assert int(sparse.structure.step) == step, "an eval forward samples no mask"
    model.train()
    assert sparse.training
    sparse(x)
    assert int(sparse.structure.step) == step + 1
    sparse.eval()
    assert not model.training


def _bn_dropout_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
        nn.ReLU(), nn.Linear(16, 4),
    )  # fmt: skip


def test_changed_dropout_p_and_batch_norm_momentum_are_captured_anew():
    """A capture holds them as constants: a Dropout switched off (p = 0) kept dropping and a
    new BatchNorm momentum was ignored, silently."""
    torch.manual_seed(0)
    model = _bn_dropout_net()
    x = torch.randn(6, 8)
    sparse = sparsefx.transform(model, x, density=0.5)
    sparsefx.set_masks(
        sparse, {g.name: torch.ones(g.size, dtype=torch.bool) for g in sparse.groups}
    )
    model[3].p = 0.0
    torch.testing.assert_close(sparse(x), sparse(x), rtol=0, atol=0)
    model[1].momentum = 1.0
    with torch.no_grad():
        sparse(x)
    torch.testing.assert_close(model[1].running_mean, model[0](x).mean(0))


def test_a_setting_that_changes_every_step_keeps_a_bounded_number_of_graphs():
    """Each value captures anew; the programs of the oldest are dropped past a bound (a
    per-step Dropout schedule grew them without limit), with one warning."""
    model = _bn_dropout_net().eval()
    x = torch.randn(6, 8)
    sparse = sparsefx.transform(model, x, density=0.5)
    with pytest.warns(UserWarning, match="changes every step"):
        for step in range(18):
            model[1].momentum = 0.1 + 0.01 * step
            sparse(x)
    assert len(sparse._programs) == 16


def test_a_replaced_submodule_is_the_one_that_trains():
    """The training graph read the parameters of the module it was captured with: a new head
    (fine-tuning) was ignored in training while eval, captured later, used it."""
    torch.manual_seed(0)
    model = _bn_dropout_net()
    x = torch.randn(6, 8)
    sparse = sparsefx.transform(model, x, density=0.5)
    sparsefx.set_masks(
        sparse, {g.name: torch.ones(g.size, dtype=torch.bool) for g in sparse.groups}
    )
    sparse(x)
    model[6] = nn.Linear(16, 5)
    out = sparse(x)
    assert out.shape == (6, 5)
    out.sum().backward()
    assert model[6].weight.grad is not None


def test_a_cumulative_batch_norm_in_training_is_refused():
    """momentum=None (torch.optim.swa_utils.update_bn sets it) averages with 1 / batches
    seen, which a captured graph would hold at the capture step's value."""
    model = _bn_dropout_net()
    model[1].momentum = None
    with pytest.raises(sparsefx.CaptureError, match=r"BatchNorm 1 .*momentum=None"):
        sparsefx.transform(model, torch.randn(6, 8), density=0.5)
    sparsefx.transform(model.eval(), torch.randn(6, 8), density=0.5)  # eval: no average


@pytest.mark.parametrize("case", ["cumulative-batch-norm", "not-compiled"])
def test_wrap_loss_refuses_a_training_loss_of_a_model_sparsefx_never_received(case):
    """Compiled with momentum=None, Dynamo runs the forward eagerly (BatchNorm reads its
    batch count with .item()) and never calls the backend; a model never compiled never
    reaches it either. Both trained dense without a word."""
    model = _bn_dropout_net()
    run = model
    if case == "cumulative-batch-norm":
        model[1].momentum = None
        run = torch.compile(model, backend="sparsefx", options={"density": 0.5})
    criterion = sparsefx.wrap_loss(run, nn.functional.cross_entropy)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    with pytest.raises(RuntimeError, match=r"ran without sparsefx.*explain"):
        criterion(run(x), y)
    model.eval()  # an evaluation loss trains nothing
    criterion(run(x), y)


class _Holder(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


@pytest.mark.parametrize("compiled", ["backbone", "wrapper"])
def test_wrap_loss_accepts_a_model_compiled_as_part_of_another(compiled):
    """The check above looked for graphs rooted at the model itself: a compiled backbone
    inside the model given to wrap_loss, or a compiled wrapper around it (a Lightning-style
    module), raised although they train sparse."""
    net = _bn_dropout_net()
    options = {"density": 0.5, "seed": 0}
    if compiled == "backbone":
        model = _Holder(net)
        model.inner = torch.compile(net, backend="sparsefx", options=options)
        run = model
    else:
        model = net
        run = torch.compile(_Holder(net), backend="sparsefx", options=options)
    criterion = sparsefx.wrap_loss(model, nn.functional.cross_entropy)
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    loss = criterion(run(x), y)
    loss.backward()
    assert sparsefx.compiled.runtime_of(
        net if compiled == "backbone" else run
    ).structure.pending_steps


def _train(sparse, model, opt, criterion, batches):
    losses, masks = [], []
    for x, y in batches:
        loss = criterion(sparse(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        masks.append(torch.cat(list(sparsefx.masks(sparse).values())))
    return torch.stack(losses), torch.stack(masks)


@pytest.mark.parametrize("budget_warmup", [0, 4], ids=["tight", "warmup-across-the-save"])
def test_state_dict_round_trip_resumes_with_the_same_next_steps(budget_warmup):
    torch.manual_seed(0)
    batches = [data() for _ in range(6)]
    model = mlp()
    config = sparsefx.SparseConfig(density=0.5, seed=7, budget_warmup=budget_warmup)
    sparse = sparsefx.transform(model, batches[0][0], config=config)
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(sparse, model, opt, criterion, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": sparse.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = _train(sparse, model, opt, criterion, batches[3:])

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    torch.manual_seed(123)  # a different process state: nothing may depend on it
    fresh = mlp()
    resumed = sparsefx.transform(fresh, batches[0][0], config=config)
    resumed.load_state_dict(checkpoint["model"])
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fresh_opt.load_state_dict(checkpoint["opt"])
    got = _train(
        resumed, fresh, fresh_opt, sparsefx.wrap_loss(resumed, nn.CrossEntropyLoss()), batches[3:]
    )
    assert torch.equal(got[1], expected[1]), "same masks"
    assert torch.equal(got[0], expected[0]), "same losses, bitwise"


def test_budget_warmup_shrinks_the_budget_from_the_whole_model_to_the_density():
    """budget_warmup=4: s starts at 1 (the first step keeps every channel), each step's s is
    projected onto 8 + 24 (1 - t/4)^3 channels (t: steps sampled so far), and from step 4 on
    onto the density's 8; freeze() refuses to cut the budget short."""
    torch.manual_seed(0)
    config = sparsefx.SparseConfig(density=0.25, seed=0, budget_warmup=4)
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), config=config)
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    structure = sparse.structure
    assert torch.equal(structure.probabilities, torch.ones(32))
    for t in range(6):
        x, y = data()
        criterion(sparse(x), y).backward()  # applies the pending update at budget(t), samples
        expected = 8 + 24 * max(0.0, 1 - t / 4) ** 3
        # kept channels expected in the sampled masks: s, plus what the minimum adds
        used = float(structure.probabilities.sum() + structure.top_up_cost())
        assert used <= expected + 1e-4
        if t == 0:
            assert all(bool(m.all()) for m in sparsefx.masks(sparse).values())
        if t == 2:
            assert used == pytest.approx(expected, abs=1e-4)
            following = 8 + 24 * (1 - 3 / 4) ** 3  # the budget the next step projects onto
            assert sparsefx.stats(sparse)["budget_density"] == pytest.approx(following / 32)
            with pytest.raises(RuntimeError, match="warm-up"):
                sparsefx.freeze(sparse)
    assert structure.budget == 8
    sparsefx.freeze(sparse)
    assert sum(int(m.sum()) for m in sparsefx.masks(sparse).values()) == 8
    with pytest.raises(ValueError, match="budget_warmup"):
        sparsefx.SparseConfig(density=0.5, budget_warmup=-1)


def test_freeze_topk_fixes_masks_and_unfreeze_resumes_sampling():
    torch.manual_seed(0)
    model = mlp()
    sparse, criterion, x, y = _wrapped(model)
    sparsefx.freeze(sparse, "topk")
    s = sparse.structure.probabilities.clone()
    for _ in range(3):
        criterion(sparse(x), y).backward()
        frozen = sparsefx.masks(sparse)
    assert torch.equal(sparse.structure.probabilities, s), "frozen: no structure update"
    assert all(int(m.sum()) > 0 for m in frozen.values())
    assert sparsefx.stats(sparse)["frozen"] == 1.0
    sparsefx.unfreeze(sparse)
    criterion(sparse(x), y).backward()
    assert sparse.structure.pending is not None


def test_masks_after_freeze_are_the_frozen_ones_before_the_next_forward():
    """masks() right after freeze() or set_masks() already reports the fixed masks (what the
    next forward runs), not the last sampled ones."""
    torch.manual_seed(0)
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    x, y = data()
    criterion(sparse(x), y).backward()
    sampled = torch.cat(list(sparsefx.masks(sparse).values()))
    sparsefx.freeze(sparse, "topk")
    frozen = torch.cat(list(sparsefx.masks(sparse).values()))
    assert not torch.equal(frozen, sampled)  # this seed samples a mask other than the top budget
    criterion(sparse(x), y).backward()
    assert torch.equal(torch.cat(list(sparsefx.masks(sparse).values())), frozen)
    fixed = {g.name: torch.arange(g.size) < 2 for g in sparsefx.groups(sparse)}
    sparsefx.set_masks(sparse, fixed)
    assert all(torch.equal(sparsefx.masks(sparse)[n], m) for n, m in fixed.items())


def test_freeze_rounds_group_counts_to_multiples_within_the_budget():
    """freeze(multiple=8): each group's top-budget count becomes a multiple of 8 within the
    budget (down, then up by largest remainder while it fits), keeping the channels of
    highest s; training then runs those counts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU())
    model.append(nn.Linear(48, 3))
    sparse = sparsefx.transform(model, torch.randn(4, 8), density=0.25)  # budget: 28
    probabilities = sparse.structure.probabilities
    probabilities.copy_(torch.rand(112) * 0.5)
    probabilities[:13] = 1.0  # the first group's top budget: 13 of 64
    probabilities[64:79] = 0.9  # the second's: 15 of 48
    sparsefx.freeze(sparse, "topk")
    assert [int(m.sum()) for m in sparsefx.masks(sparse).values()] == [13, 15]
    sparsefx.freeze(sparse, "topk", multiple=8)
    frozen = sparsefx.masks(sparse)
    assert [int(m.sum()) for m in frozen.values()] == [8, 16]  # remainder 7 > 5; 32 > 28
    by_s = probabilities[64:].argsort(descending=True)[:16]
    assert set(frozen["2"].nonzero().squeeze(1).tolist()) == set(by_s.tolist())
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    criterion(sparse(torch.randn(5, 8)), torch.randint(0, 3, (5,))).backward()
    assert model[0].weight.grad[~frozen["0"]].abs().sum() == 0
    assert sparsefx.stats(sparse)["channel_density"] == 24 / 112
    with pytest.raises(ValueError, match="multiple must be an int >= 1"):
        sparsefx.freeze(sparse, multiple=0)


def test_freeze_best_picks_the_lowest_loss_sample():
    torch.manual_seed(0)
    sparse = sparsefx.transform(LossModel(), data(), density=0.5)
    x, y = data(32)
    sparsefx.freeze(sparse, "best", batches=[(x, y)], num_samples=6)
    chosen = sparse.structure.fixed.clone()
    sparse.eval()
    with torch.no_grad():
        best = float(sparse(x, y))
    candidates = sparse.structure.split(chosen)
    assert all(c.any() for c in candidates)
    # every other sampled candidate scores no better: re-draw the same candidates
    sparse.structure.step -= 1
    draws = sparse.structure.sample(6)
    sparse.structure.fixed = None
    for mask in draws:
        sparse.structure.fixed = mask
        with torch.no_grad():
            assert float(sparse(x, y)) >= best - 1e-6
    assert any(torch.equal(mask, chosen) for mask in draws)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batches": []}, ValueError, "no batches"),
        ({"batches": None}, ValueError, "held-out `batches`"),
        ({"batches": "pairs"}, TypeError, r"batches=\[\(x_val, y_val\)\]"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_samples": 0}, ValueError, "num_samples"),
    ],
    ids=repr,
)
def test_freeze_best_checks_its_arguments_before_changing_anything(kwargs, error, match):
    torch.manual_seed(0)
    sparse = sparsefx.transform(LossModel(), data(), density=0.5)
    x, y = data()
    sparse(x, y).backward()  # a pending structure gradient, which a refused call keeps
    pending, step = sparse.structure.pending.clone(), int(sparse.structure.step)
    if kwargs.get("batches") == "pairs":
        kwargs = {"batches": (x, y)}  # the tensors themselves, not a list of (x, y) tuples
    with pytest.raises(error, match=match):
        sparsefx.freeze(sparse, "best", **{"batches": [(x, y)], **kwargs})
    assert torch.equal(sparse.structure.pending, pending)
    assert int(sparse.structure.step) == step and sparse.structure.fixed is None


def test_freeze_best_takes_keyword_batches_of_a_model_that_returns_its_loss():
    """A Hugging Face model trained with ``labels=`` is scored on keyword batches; only
    positional tuples were accepted, so its labels could not be passed by name. Dict and
    tuple batches of the same data pick the same sample."""

    def build():
        torch.manual_seed(0)
        return sparsefx.transform(LossModel(), data(), config=sparsefx.SparseConfig(0.5, seed=0))

    by_position, by_name = build(), build()
    x, y = data(32)
    sparsefx.freeze(by_position, "best", batches=[(x, y)], num_samples=6)
    sparsefx.freeze(by_name, "best", batches=[{"x": x, "y": y}], num_samples=6)
    assert torch.equal(by_name.structure.fixed, by_position.structure.fixed)


def test_freeze_best_rounds_the_chosen_sample_to_multiples():
    """freeze("best", multiple=4) picks the same sample as without `multiple` (same sampler
    state), then rounds its counts exactly as `round_group_counts` does."""

    def build():
        torch.manual_seed(0)
        model = LossModel()
        return sparsefx.transform(model, data(), config=sparsefx.SparseConfig(0.5, seed=0))

    sparse, twin = build(), build()
    x, y = data(32)
    sparsefx.freeze(sparse, "best", batches=[(x, y)], num_samples=6)
    sparsefx.freeze(twin, "best", batches=[(x, y)], num_samples=6, multiple=4)
    chosen, rounded = sparse.structure.fixed, twin.structure.fixed
    structure = twin.structure
    counts = [int(m.sum()) for m in structure.split(chosen)]
    assert any(k % 4 for k in counts), counts  # the rounding has something to do
    expected = round_group_counts(
        chosen, structure.probabilities, structure.offsets, 4, structure.costs, structure.budget
    )
    assert torch.equal(rounded, expected)
    assert all(int(m.sum()) % 4 == 0 for m in structure.split(rounded))


def _assert_same_next_step(sparse, criterion, twin, x: Tensor, y: Tensor) -> None:
    """`twin` (a copy of `sparse` in the same state) takes the same next step: loss, masks and
    gradients, on parameters of its own."""
    twin_criterion = sparsefx.wrap_loss(twin, nn.CrossEntropyLoss())
    sparse.zero_grad()
    losses = [criterion(sparse(x), y), twin_criterion(twin(x), y)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    masks, twin_masks = sparsefx.masks(sparse), sparsefx.masks(twin)
    assert masks.keys() == twin_masks.keys()
    assert all(torch.equal(masks[k], twin_masks[k]) for k in masks)
    for p, q in zip(sparse.parameters(), twin.parameters(), strict=True):
        assert p is not q and torch.equal(p.grad, q.grad)


def test_deepcopy_is_an_independent_model_in_the_same_state():
    """copy.deepcopy mid-training (an EMA copy, a snapshot): the copy takes the same next
    step (masks, loss, gradients) and owns its parameters and structure state."""
    torch.manual_seed(0)
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), config=sparsefx.SparseConfig(0.5, seed=0))
    x, y = data()
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    criterion(sparse(x), y).backward()  # leaves a pending structure gradient
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quietly: nothing deprecated is copied
        twin = copy.deepcopy(sparse)
    assert len(twin.runtime.graphs) == len(sparse.runtime.graphs)  # copied, not re-captured
    _assert_same_next_step(sparse, criterion, twin, x, y)
    assert twin.structure.probabilities is not sparse.structure.probabilities
    twin.structure.probabilities.zero_()
    assert sparse.structure.probabilities.sum() > 0


def test_torch_save_and_load_of_the_whole_model_resume_training():
    """torch.save(smodel) mid-training, then torch.load: the loaded model takes the same
    next step (it captures its graphs again on that forward) and explains itself after it."""
    torch.manual_seed(0)
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), config=sparsefx.SparseConfig(0.5, seed=0))
    x, y = data()
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    criterion(sparse(x), y).backward()  # leaves a pending structure gradient
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with pytest.raises(RuntimeError, match="run one forward"):
        sparsefx.explain(loaded)
    _assert_same_next_step(sparse, criterion, loaded, x, y)
    assert torch.equal(sparse.structure.probabilities, loaded.structure.probabilities)
    assert sparsefx.explain(loaded) == sparsefx.explain(sparse)


def test_set_masks_validates_its_input():
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    full = {g.name: torch.ones(g.size, dtype=torch.bool) for g in sparsefx.groups(sparse)}
    with pytest.raises(KeyError, match="missing"):
        sparsefx.set_masks(sparse, {"0": full["0"]})
    with pytest.raises(ValueError, match=r"shape \(16,\)"):
        sparsefx.set_masks(sparse, {**full, "0": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="bool"):
        sparsefx.set_masks(sparse, {**full, "0": torch.ones(16)})
    with pytest.raises(ValueError, match="at least one"):
        sparsefx.set_masks(sparse, {**full, "0": torch.zeros(16, dtype=torch.bool)})


def test_stats_follow_the_cost_model():
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    masks = {"0": torch.arange(16) < 4, "2": torch.arange(16) < 8}
    sparsefx.set_masks(sparse, masks)
    stats = sparsefx.stats(sparse)
    dense = 8 * 16 + 16 * 16 + 16 * 3
    assert stats["flops_fraction"] == pytest.approx((8 * 4 + 4 * 8 + 8 * 3) / dense)
    assert stats["sampled_density"] == pytest.approx(12 / 32)
    assert stats["density"] == 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"density": 0.0}, ValueError, r"\(0, 1\]"),
        ({"density": 1.5}, ValueError, r"\(0, 1\]"),
        ({"density": "0.1"}, TypeError, "density"),
        ({}, TypeError, "density="),
        ({"density": 0.5, "config": sparsefx.SparseConfig(density=0.2)}, ValueError, "conflicts"),
    ],
)
def test_bad_density_is_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        sparsefx.transform(mlp(), torch.randn(4, 8), **kwargs)


def test_config_rejects_bad_options_naming_the_valid_ones():
    with pytest.raises(ValueError, match="samples"):
        sparsefx.SparseConfig(density=0.5, samples=1)
    with pytest.raises(ValueError, match=r"\['channels', 'params', 'flops'\]"):
        sparsefx.SparseConfig(density=0.5, budget="neurons")
    with pytest.raises(TypeError, match="valid options"):
        sparsefx.SparseConfig.from_options({"density": 0.5, "sample": 2})


@pytest.mark.parametrize(
    ("option", "error"),
    [
        ({"score_lr": float("inf")}, ValueError),
        ({"score_lr": float("nan")}, ValueError),
        ({"score_lr": "0.1"}, TypeError),
        ({"score_lr": True}, TypeError),
        ({"score_eps": None}, TypeError),
        ({"samples": 2.0}, TypeError),
        ({"seed": "abc"}, TypeError),
        ({"seed": 1.5}, TypeError),
        ({"seed": -(2**64)}, ValueError),
        ({"seed": 2**64}, ValueError),
        ({"prune_streams": "no"}, TypeError),
        ({"sparse_gradients": 1}, TypeError),
        ({"conv_channel_multiple": 8.0}, TypeError),
        ({"budget_warmup": -1}, ValueError),
    ],
    ids=repr,
)
def test_config_rejects_bad_values_naming_the_option(option, error):
    """Every option is checked when the config is built, and the error names it; bad values
    used to pass and fail steps later (an infinite score lr turned s NaN) or fail in torch
    without naming the option (a string seed)."""
    (name,) = option
    with pytest.raises(error, match=name):
        sparsefx.SparseConfig(density=0.5, **option)


def test_mismatched_example_inputs_are_a_clear_error():
    with pytest.raises(sparsefx.CaptureError, match="example inputs"):
        sparsefx.transform(mlp(), torch.randn(4, 9), density=0.5)


def test_uncapturable_model_is_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    with pytest.raises(sparsefx.CaptureError, match="DataDependent"):
        sparsefx.transform(DataDependent(), torch.randn(2, 4), density=0.5)


def test_uninitialised_lazy_modules_are_a_clear_error_that_changes_nothing():
    """A LazyLinear used to fail with "cannot be traced", and the failure's eager check
    initialised it as a side effect; now transform names the lazy module and what to do."""
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(sparsefx.CaptureError, match=r"0 \(LazyLinear\).*Run the model once"):
        sparsefx.transform(model, torch.randn(2, 8), density=0.5)
    assert model[0].has_uninitialized_params()
    with torch.no_grad():
        model(torch.randn(2, 8))
    smodel = sparsefx.transform(model, torch.randn(2, 8), density=0.5)
    assert [g.size for g in sparsefx.groups(smodel)] == [16]


def test_api_functions_reject_plain_modules():
    with pytest.raises(TypeError, match=r"sparsefx\.transform"):
        sparsefx.stats(mlp())
    with pytest.raises(TypeError, match=r"nn\.Module"):
        sparsefx.transform(lambda x: x, torch.randn(2), density=0.5)


def test_wrap_loss_on_the_original_model_names_the_mix_up():
    model = mlp()
    sparsefx.transform(model, torch.randn(4, 8), density=0.5)
    with pytest.raises(TypeError, match=r"sparsefx\.wrap_loss\(smodel, criterion\)"):
        sparsefx.wrap_loss(model, nn.CrossEntropyLoss())


def test_a_diff_of_a_model_then_compiling_it_trains_with_wrap_loss():
    """The diff tool transforms a model for the report only: the model stays the user's,
    so wrap_loss for a compiled closure over it is not the transform mix-up."""
    model = mlp()
    x, y = data()
    sparsefx.diff(model, (x,), density=0.5)
    step = torch.compile(lambda x: model(x), backend="sparsefx", options={"density": 0.5})
    criterion = sparsefx.wrap_loss(model, nn.CrossEntropyLoss())
    criterion(step(x), y).backward()
    assert sparsefx.api._runtime(model).structure.pending is not None


def test_a_compiled_transformed_model_is_the_transformed_model_to_the_api():
    """torch.compile(smodel) (any backend) trains smodel: wrap_loss and the inspection
    functions reach it through the compile wrapper."""
    torch.manual_seed(0)
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    compiled = torch.compile(sparse, backend="eager")
    criterion = sparsefx.wrap_loss(compiled, nn.CrossEntropyLoss())
    x, y = data()
    criterion(compiled(x), y).backward()
    assert sparse.structure.pending is not None
    assert sparsefx.groups(compiled) == sparsefx.groups(sparse)
    assert sparsefx.stats(compiled) == sparsefx.stats(sparse)


def test_transform_shares_parameters_with_the_original_model():
    model = mlp()
    sparse = sparsefx.transform(model, torch.randn(4, 8), density=0.5)
    ids = {id(p) for p in model.parameters()}
    assert {id(p) for p in sparse.parameters()} == ids
    assert "structure.probabilities" in sparse.state_dict()
    assert copy.deepcopy(sparse.state_dict()).keys() == sparse.state_dict().keys()


def test_parameters_replaced_after_transform_are_the_ones_it_reads():
    """load_state_dict(assign=True), FSDP2 and hand edits swap Parameter objects: the sparse
    model reads its state from the modules at every call, not from a copy."""
    model = mlp()
    sparse = sparsefx.transform(model, torch.randn(4, 8), density=0.5).eval()
    sparsefx.set_masks(
        sparse, {g.name: torch.ones(g.size, dtype=torch.bool) for g in sparsefx.groups(sparse)}
    )
    x = torch.randn(4, 8)
    state = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    model[2].bias = nn.Parameter(torch.randn(16))
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x))


@pytest.mark.parametrize("budget", ["params", "flops"])
def test_cost_weighted_budget_trains_within_budget(budget):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 3))
    config = sparsefx.SparseConfig(density=0.3, budget=budget, score_lr=0.1, seed=0)
    sparse = sparsefx.transform(model, torch.randn(4, 8), config=config)
    structure = sparse.structure
    costs = structure.split(structure.costs)
    # marginal cost of a channel at k = density * size (cost model, DESIGN §3): the first group
    # pays its weight row + bias + the next layer's column at 30% of 8 channels
    k2 = 0.3 * 8
    expected = {"params": 8 + 1 + k2, "flops": 2 * (8 + k2)}[budget]
    assert float(costs[0][0]) == pytest.approx(expected)
    assert len(set(costs[0].tolist())) == 1
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data(16)
    for _ in range(5):
        loss = criterion(sparse(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sparse(x)  # applies the pending update: s moves, then is projected onto the budget
    used = float(structure.costs.double() @ structure.probabilities.double())
    used += float(structure.top_up_cost())  # what the two-channel minimum adds
    assert used <= structure.budget * (1 + 1e-6)
    expected = sparsefx.stats(sparse)["expected_density"]
    assert expected == pytest.approx(used / structure.total_cost, rel=1e-6)
    assert 0.2 < expected <= 0.3 * (1 + 1e-6)


def test_each_groups_two_channel_minimum_is_paid_from_the_budget():
    """A 4-channel group at density 0.25 keeps two channels, and the 64-channel group pays for
    the second: the eval mask and the sampled masks' mean cost stay within the budget."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3))
    sparse = sparsefx.transform(model, torch.randn(4, 8), density=0.25)
    structure = sparse.structure
    assert structure.budget == 17.0
    # the first step's masks too: s starts at the density's projection less the reserve
    assert float(structure.costs @ structure.probabilities + structure.top_up_cost()) <= 17.0
    mask = structure.deterministic_mask()
    assert [int(m.sum()) for m in structure.split(mask)] == [2, 15]
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    x, y = data(16)
    for _ in range(10):
        criterion(sparse(x), y).backward()
    sparse(x)  # applies the last update
    expected = float(structure.costs @ structure.probabilities + structure.top_up_cost())
    assert expected <= 17.0 * (1 + 1e-6)
    assert sparsefx.stats(sparse)["expected_density"] == pytest.approx(expected / 68)
    cost = structure.sample(4000).float() @ structure.costs  # channels kept per sample
    assert abs(cost.mean() - expected) <= 4 * cost.std() / 4000**0.5


def test_a_density_below_the_groups_minimum_raises():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(sparsefx.DensityError, match=r"2 groups need a density of at least 0\.5 "):
        sparsefx.transform(model, torch.randn(2, 8), density=0.25)


def test_a_cost_weighted_density_below_the_minimum_names_the_lowest_that_holds_it():
    """FLOPs costs are marginal at the density, so the lowest density is found by search."""
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 1))
    x = torch.randn(4, 1)
    with pytest.raises(sparsefx.DensityError) as error:
        sparsefx.transform(model, x, config=sparsefx.SparseConfig(density=0.03, budget="flops"))
    least = float(re.search(r"at least ([0-9.]+) ", str(error.value)).group(1))
    sparsefx.transform(model, x, config=sparsefx.SparseConfig(density=least, budget="flops"))
    with pytest.raises(sparsefx.DensityError):
        config = sparsefx.SparseConfig(density=least - 2e-4, budget="flops")
        sparsefx.transform(model, x, config=config)


def test_more_samples_run_more_pure_forwards():
    torch.manual_seed(0)
    model = LossModel()
    config = sparsefx.SparseConfig(density=0.5, samples=4, seed=1)
    sparse = sparsefx.transform(model, data(), config=config)
    program = sparse._programs[sparse._modes()][0]
    calls = []
    program.score.register_forward_hook(lambda *_: calls.append(1))
    x, y = data()
    sparse(x, y).backward()
    assert len(calls) == 3  # K - 1 pure forwards
    assert sparse.structure.pending is not None


def _draw(sparse, rows: list[int], samples: int) -> None:
    """`sparse`'s sampler made to return rows `rows` of a real draw of `samples` masks."""
    draws = sparse.structure.sample(samples)
    assert not torch.equal(draws[0], draws[-1])
    sparse.structure.sample = lambda num_samples: draws[rows]


def _step(sparse, x, y) -> tuple[Tensor, int]:
    """One backward: the structure gradient it commits, and the pure forwards it ran."""
    calls = []
    hook = sparse._programs[sparse._modes()][0].score.register_forward_hook(
        lambda *_: calls.append(1)
    )
    sparse(x, y).backward()
    hook.remove()
    return sparse.structure.pending, len(calls)


@pytest.mark.parametrize("samples", [2, 3])
def test_k_equal_masks_run_one_forward_and_give_an_exact_zero_gradient(samples):
    torch.manual_seed(0)
    x, y = data()
    config = sparsefx.SparseConfig(density=0.5, samples=samples, seed=1)
    sparse = sparsefx.transform(LossModel(), (x, y), config=config)
    _draw(sparse, [0] * samples, samples)
    gradient, forwards = _step(sparse, x, y)
    assert forwards == 0
    assert torch.equal(gradient, torch.zeros_like(gradient))


def test_masks_that_agree_only_in_part_run_every_forward():
    """A sample equal to mask 1 among others that differ still runs: its loss may carry
    dropout noise of its own, and it enters the baseline of the others."""
    torch.manual_seed(0)
    x, y = data()
    config = sparsefx.SparseConfig(density=0.5, samples=3, seed=1)
    sparse = sparsefx.transform(LossModel(), (x, y), config=config)
    _draw(sparse, [0, 0, 2], 3)
    gradient, forwards = _step(sparse, x, y)
    assert forwards == 2
    assert gradient.abs().sum() > 0


def test_sparse_gradients_train_exactly_like_dense_gradients_with_sgd():
    torch.manual_seed(0)
    x, y = data(16)
    models, losses = [], []
    for sparse_gradients in (False, True):
        torch.manual_seed(0)
        model = mlp()
        config = sparsefx.SparseConfig(density=0.5, seed=3, sparse_gradients=sparse_gradients)
        sparse = sparsefx.transform(model, x, config=config)
        criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            loss = criterion(sparse(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        models.append(model)
    assert models[1][0].weight.grad.is_sparse and not models[0][0].weight.grad.is_sparse
    torch.testing.assert_close(losses[:3], losses[3:], rtol=0, atol=0)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_sparse_gradients_of_rounded_cpu_convolutions_equal_the_dense_ones():
    """Conv weight gradients come back through the zero-padded (conv_channel_multiple)
    convolution's backward, then the row-sparse gather: they equal the dense-gradient run.
    Sampled masks, since only sampling graphs round counts."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )  # fmt: skip
    x = torch.randn(4, 3, 6, 6)
    grads = []
    for sparse_gradients in (False, True):
        twin = copy.deepcopy(model)
        config = sparsefx.SparseConfig(0.5, seed=0, sparse_gradients=sparse_gradients)
        sparse = sparsefx.transform(twin, x, config=config)
        criterion = sparsefx.wrap_loss(sparse, lambda out, _: out.square().sum())
        criterion(sparse(x), None).backward()
        kept = [int(m.sum()) for m in sparsefx.masks(sparse).values()]
        assert all(k % 8 for k in kept)  # both convs ran rounded counts
        grads.append([p.grad for p in twin.parameters()])
    assert grads[1][0].is_sparse and not grads[0][0].is_sparse
    for dense, sparse_grad in zip(*grads, strict=True):
        torch.testing.assert_close(sparse_grad.to_dense(), dense)


def test_model_with_nothing_to_prune_warns_and_trains_dense():
    model = nn.Linear(8, 3)  # the classifier alone: never pruned
    with pytest.warns(UserWarning, match="nothing to prune"):
        sparse, criterion, x, y = _wrapped(model)
    for _ in range(2):
        criterion(sparse(x), y).backward()
    sparse(x).sum().backward()  # no structure to train: a training forward needs no loss
    sparse.eval()
    torch.testing.assert_close(sparse(x), model(x))
    assert sparsefx.groups(sparse) == []


def test_forward_hooks_on_the_model_run_around_the_sparse_forward():
    """The compact program runs as the model's forward, so the model's hooks see it (FSDP2's
    fully_shard relies on this); the model's own forward is restored afterwards."""
    model = mlp()
    x, y = data()
    sparse = sparsefx.transform(model, (x,), density=0.5)
    criterion = sparsefx.wrap_loss(sparse, nn.functional.cross_entropy)
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append("pre"))
    model.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    criterion(sparse(x), y).backward()
    assert seen == ["pre", torch.Size([12, 3])]
    assert "forward" not in model.__dict__


class SequenceModel(nn.Module):
    """Logits [B, T, V], and optionally an auxiliary scalar beside them (a mixture of
    experts' balance loss), as language models return them."""

    def __init__(self, aux: bool = False):
        super().__init__()
        self.aux = aux
        self.net = nn.Sequential(
            nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5)
        )

    def forward(self, x):
        logits = self.net(x)
        return (logits, 1e-3 * self.net[4].weight.square().sum()) if self.aux else logits


def _structure_gradient(entry: str, model: nn.Module, criterion, loss_of) -> Tensor:
    """The structure gradient that one training step of `model` commits: the loss is
    `loss_of(output, wrapped criterion, targets)`."""

    def backward(sparse, wrapped, x, y):
        loss_of(sparse(x), wrapped, y).backward()

    pending = _pending_after(entry, model, backward, criterion)
    assert pending is not None, "the step committed no structure gradient"
    return pending


def _pending_after(
    entry: str, model: nn.Module, backward, criterion=F.cross_entropy
) -> Tensor | None:
    """The structure gradient pending after `backward(sparse, wrapped criterion, x, y)` ran
    on one sampled step's loss (None: nothing committed)."""
    torch.manual_seed(1)
    x, y = torch.randn(4, 6, 8), torch.randint(0, 5, (4, 6))
    options = {"density": 0.5, "seed": 0}
    if entry == "transform":
        sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**options))
    else:
        sparse = torch.compile(model, backend="sparsefx", options=options)
    backward(sparse, sparsefx.wrap_loss(sparse, criterion), x, y)
    return sparsefx.api._runtime(sparse).structure.pending


ENTRIES = ["transform", "compile"]
VIEWS = {
    "view": lambda out, y: (out.view(-1, 5), y.view(-1)),
    "permute": lambda out, y: (out.permute(0, 2, 1), y),
    "slice": lambda out, y: (out[:, -1], y[:, -1]),
}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("view", VIEWS)
def test_wrapped_criterion_follows_views_of_the_output(entry, view):
    """The usual language-model loss, criterion(logits.view(-1, V), y.view(-1)), trains the
    structure as the same loss does when the criterion takes the view itself."""
    take = VIEWS[view]
    torch.manual_seed(0)
    model = SequenceModel()
    twin = copy.deepcopy(model)
    got = _structure_gradient(
        entry, model, F.cross_entropy, lambda out, crit, y: crit(*take(out, y))
    )
    expected = _structure_gradient(
        entry,
        twin,
        lambda out, y: F.cross_entropy(*take(out, y)),
        lambda out, crit, y: crit(out, y),
    )
    torch.testing.assert_close(got, expected)


def _sequence_loss(sparse, crit, x, y) -> Tensor:
    return crit(sparse(x).permute(0, 2, 1), y)


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_structure_gradient_follows_the_losss_weight_up_to_a_positive_factor(entry):
    """The hook that committed the structure gradient ignored the loss's gradient:
    ``(-loss).backward()`` trained s to raise the loss and ``(0 * loss)`` trained it fully.
    A positive factor (GradScaler's scale, 1/n accumulation) leaves it as it is."""
    torch.manual_seed(0)
    model = SequenceModel()

    def weighted(w: float) -> Tensor | None:
        run = lambda sparse, crit, x, y: (w * _sequence_loss(sparse, crit, x, y)).backward()  # noqa: E731
        return _pending_after(entry, copy.deepcopy(model), run)

    plain = weighted(1.0)
    assert plain is not None and plain.abs().sum() > 0
    torch.testing.assert_close(weighted(1024.0), plain)
    torch.testing.assert_close(weighted(-0.5), -plain)
    torch.testing.assert_close(weighted(0.0), torch.zeros_like(plain))


@pytest.mark.parametrize("entry", ENTRIES)
def test_weighted_losses_of_one_step_train_the_structure_as_weighted(entry):
    """Mixup's ``lam * l(y_a) + (1 - lam) * l(y_b)``: lam g_a + (1 - lam) g_b, not g_a + g_b."""
    torch.manual_seed(0)
    model = SequenceModel()
    other = lambda y: (y + 1) % 5  # noqa: E731

    def mixed(lam: float):
        def run(sparse, crit, x, y):
            out = sparse(x).permute(0, 2, 1)
            (lam * crit(out, y) + (1 - lam) * crit(out, other(y))).backward()

        return run

    only_a = _pending_after(entry, copy.deepcopy(model), mixed(1.0))
    only_b = _pending_after(entry, copy.deepcopy(model), mixed(0.0))
    torch.testing.assert_close(
        _pending_after(entry, model, mixed(0.9)), 0.9 * only_a + 0.1 * only_b
    )


def test_a_loss_weighted_zero_is_no_structure_step():
    """It committed a zero gradient, and the next forward's Adam step moved s by momentum."""
    torch.manual_seed(0)
    model = mlp()
    sparse, criterion, x, y = _wrapped(model)
    criterion(sparse(x), y).backward()
    (0 * criterion(sparse(x), y)).backward()  # applies the first step's update
    before = sparse.structure.probabilities.clone()
    sparse(x)
    torch.testing.assert_close(sparse.structure.probabilities, before, rtol=0, atol=0)


@pytest.mark.parametrize("entry", ENTRIES)
def test_only_a_backward_that_accumulates_commits_the_structure_gradient(entry):
    """torch.autograd.grad(loss, x) (an adversarial input step) accumulates into no
    parameter and committed a structure gradient; a gradient probe before the backward
    committed it twice."""
    torch.manual_seed(0)
    model = SequenceModel()

    def input_gradient(sparse, crit, x, y):
        x = x.requires_grad_()
        torch.autograd.grad(_sequence_loss(sparse, crit, x, y), x)

    def probe_then_backward(sparse, crit, x, y):
        loss = _sequence_loss(sparse, crit, x, y)
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        loss.backward()

    single = _pending_after(entry, copy.deepcopy(model), lambda *a: _sequence_loss(*a).backward())
    assert _pending_after(entry, copy.deepcopy(model), input_gradient) is None
    # AOTAutograd's donated buffers refuse retain_graph, with or without sparsefx
    with torch._functorch.config.patch(donated_buffer=False):
        torch.testing.assert_close(_pending_after(entry, model, probe_then_backward), single)


@pytest.mark.parametrize("entry", ENTRIES)
def test_the_criterion_follows_a_view_of_an_output_it_never_held(entry):
    """``criterion(model(x).view(-1, V), y.view(-1))`` in one line: the output (itself a view
    of its matmul) is gone by the criterion's call, only its base lives; this raised
    MissingLossError while the two-line form trained."""
    torch.manual_seed(0)
    model = SequenceModel()

    def one_line(sparse, crit, x, y):
        crit(sparse(x).view(-1, 5), y.view(-1)).backward()

    def two_lines(sparse, crit, x, y):
        out = sparse(x)
        crit(out.view(-1, 5), y.view(-1)).backward()

    expected = _pending_after(entry, copy.deepcopy(model), two_lines)
    torch.testing.assert_close(_pending_after(entry, model, one_line), expected)


def test_a_negated_model_loss_ascends_the_structure_gradient():
    """The model-returned loss takes the same path as wrap_loss's."""

    def pending(sign: float) -> Tensor:
        torch.manual_seed(0)
        model = LossModel()
        sparse = sparsefx.transform(model, data(), config=sparsefx.SparseConfig(density=0.5))
        (sign * sparse(*data())).backward()
        return sparse.structure.pending

    torch.testing.assert_close(pending(-1.0), -pending(1.0))


class WithPrior(nn.Module):
    """Logits, and a slice of a buffer: an output that is a view of a long-lived tensor."""

    def __init__(self):
        super().__init__()
        self.net = mlp()
        self.register_buffer("table", torch.randn(64, 4))

    def forward(self, x):
        return self.net(x), self.table[: x.shape[0]]


def test_outputs_viewing_a_long_lived_tensor_keep_a_bounded_registry():
    """Each step registered another entry under the buffer, for the model's life."""
    model = WithPrior()
    sparse, criterion, x, y = _wrapped(model)
    for _ in range(12):
        logits, _prior = sparse(x)
        criterion(logits, y).backward()
    assert len(sparsefx.runtime._VIEWED[model.table]) == sparsefx.runtime._VIEWS_PER_BASE


@pytest.mark.parametrize("entry", ENTRIES)
def test_backward_past_the_wrapped_criterion_is_a_clear_error(entry):
    """A copy of the output hides it from the criterion: the step's backward says so rather
    than leave the structure silently untrained."""
    with pytest.raises(sparsefx.MissingLossError, match="was not called on"):
        _structure_gradient(
            entry,
            SequenceModel(),
            F.cross_entropy,
            lambda out, crit, y: crit(out.permute(0, 2, 1).contiguous(), y),
        )


@pytest.mark.parametrize("entry", ENTRIES)
def test_wrapped_criterion_takes_precedence_over_an_auxiliary_scalar(entry):
    """With wrap_loss the criterion's loss trains the structure, not a scalar that the model
    returns beside its logits (here one that no mask changes: its gradient would be 0)."""
    torch.manual_seed(0)
    plain, with_aux = SequenceModel(), SequenceModel(aux=True)
    with_aux.load_state_dict(plain.state_dict())
    expected = _structure_gradient(
        entry, plain, F.cross_entropy, lambda out, crit, y: crit(out.permute(0, 2, 1), y)
    )
    got = _structure_gradient(
        entry,
        with_aux,
        F.cross_entropy,
        lambda out, crit, y: crit(out[0].permute(0, 2, 1), y) + out[1],
    )
    assert expected.abs().sum() > 0
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_casting_the_sparse_model_keeps_the_structure_state_in_float32(dtype):
    """`smodel.half()` and the like cast the model's weights, not s: in float16 the score
    optimizer's step overflowed and s turned NaN for good."""
    torch.manual_seed(0)
    model = mlp()
    sparse, criterion, x, y = _wrapped(model)
    criterion(sparse(x), y).backward()  # a structure gradient pending across the cast
    before = sparse.structure.probabilities.clone()
    sparse.to(dtype)
    assert model[0].weight.dtype == dtype
    for _ in range(3):
        criterion(sparse(x.to(dtype)), y).backward()
    structure = sparse.structure
    assert structure.probabilities.dtype == structure.costs.dtype == torch.float32
    assert torch.isfinite(structure.probabilities).all()
    assert not torch.equal(before, structure.probabilities)
    assert 0 < sparsefx.stats(sparse)["flops_fraction"] < 1


def test_a_capture_inside_flop_counter_mode_is_not_counted():
    """The README counts FLOPs on the transformed model: the first call in a new mode
    captures a graph, and that capture's tracing must not add to the caller's count."""
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(8, 8)
    sparse = sparsefx.transform(model, (x,), density=0.5)
    sparsefx.freeze(sparse)
    sparse.eval()  # a mode the model was not captured in
    counts = []
    for _ in range(2):
        with FlopCounterMode(display=False) as flops:
            sparse(x)
        counts.append(flops.get_total_flops())
    with FlopCounterMode(display=False) as flops:
        model(x)
    assert (
        counts[0]
        == counts[1]
        == round(sparsefx.stats(sparse)["flops_fraction"] * flops.get_total_flops())
    )


def _two_layer(hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, out), nn.ReLU(),
                         nn.Linear(out, 3))  # fmt: skip


def test_another_models_structure_state_is_refused_before_anything_loads():
    """Groups of 32 and 16 channels against 16 and 32: the same number of probabilities,
    so only the groups tell the checkpoints apart."""
    x = torch.randn(4, 8)
    a = sparsefx.transform(_two_layer(32, 16), x, density=0.5)
    b = sparsefx.transform(_two_layer(16, 32), x, density=0.5)
    a.structure.probabilities.uniform_()
    before = b.structure.probabilities.clone()
    with pytest.raises(ValueError, match="another model's"):
        sparsefx.load_structure_state(b, sparsefx.structure_state(a))
    assert torch.equal(b.structure.probabilities, before)
    sparsefx.load_structure_state(b, sparsefx.structure_state(b))  # its own still loads


def test_structure_state_is_a_snapshot():
    torch.manual_seed(0)
    sparse = sparsefx.transform(mlp(), torch.randn(4, 8), density=0.5)
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    x, y = data()
    criterion(sparse(x), y).backward()
    state = sparsefx.structure_state(sparse)
    saved = copy.deepcopy(state)
    for _ in range(3):
        criterion(sparse(x), y).backward()
    for key, value in saved.items():
        if isinstance(value, Tensor):
            assert torch.equal(state[key], value), key


def _image_cnn() -> nn.Module:
    """Takes any image size: a new one captures a graph of its own (float inputs are
    captured with a dynamic batch only)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def test_programs_per_mode_are_bounded_and_recapturing_each_shape_warns(monkeypatch):
    """A CNN fed a new image size captures again; the least recently used programs are
    dropped past a bound, with one warning."""
    monkeypatch.setattr(sparsefx.runtime, "_KEPT_SIGNATURES", 2)
    monkeypatch.setattr(sparsefx.runtime, "_KEPT_RECORDS", 1)
    torch.manual_seed(0)
    model = _image_cnn()
    sparse = sparsefx.transform(model, torch.randn(2, 3, 8, 8), density=0.5).eval()
    first = sparse.runtime.graphs[0]
    sparse(torch.randn(2, 3, 8, 8))
    sparse(torch.randn(4, 3, 8, 8))  # a new batch size: the same program
    assert len(sparse._programs[sparse._modes()]) == 1
    sparse(torch.randn(2, 3, 9, 9))
    with pytest.warns(UserWarning, match="more than 2 input signatures in one mode"):
        sparse(torch.randn(2, 3, 10, 10))
    assert len(sparse._programs[sparse._modes()]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse(torch.randn(2, 3, 8, 8))  # dropped, captured again, and said once only
    assert len(sparse.runtime.graphs) == 2 and sparse.runtime.graphs[0] is first


def test_the_programs_dropped_past_the_bounds_are_the_least_recently_used(monkeypatch):
    """Image sizes and mode keys used again stay captured while others come and go (the
    oldest-first order of a first version dropped them)."""
    monkeypatch.setattr(sparsefx.runtime, "_KEPT_SIGNATURES", 2)
    monkeypatch.setattr(sparsefx.runtime, "_KEPT_MODES", 2)
    torch.manual_seed(0)
    model = _image_cnn()
    sparse = sparsefx.transform(model, torch.randn(2, 3, 8, 8), density=0.5)  # training key
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())

    def captures(*calls: tuple[str, int]) -> list[int]:
        counts = []
        for mode, size in calls:
            sparse.train(mode == "train")
            if mode == "eval, relu training":  # a third mode key
                model[1].train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = sparse(torch.randn(2, 3, size, size))
            if sparse.training:
                criterion(out, torch.tensor([0, 1])).backward()
            counts.append(len(sparse.runtime.graphs))
        return counts

    # 10 drops 8 (9 was used since), so the last 9 runs without capturing
    assert captures(*[("eval", size) for size in (9, 8, 9, 10, 9)]) == [2, 3, 3, 4, 4]
    # the third key drops the eval one: the training key was used since
    assert captures(("train", 8), ("eval, relu training", 8), ("train", 8)) == [4, 5, 5]


class _SequenceBranch(nn.Module):
    """Python control flow on the sequence length: branches (export bounds the dynamic size
    to the traced side: a range for ``> 4``, other guards for ``% 2`` and ``!= 7``) and a
    loop (export fixes the size)."""

    def __init__(self, control: str):
        super().__init__()
        self.control = control
        self.emb, self.fc, self.out = nn.Embedding(20, 8), nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.out(F.relu(self.fc(self.emb(ids))))
        length = ids.shape[1]
        if self.control == "loop":
            return sum(h[:, i] for i in range(length))
        traced_side = {"range": length > 4, "parity": length % 2 == 0, "not 7": length != 7}
        return h.sum(1) if traced_side[self.control] else h.mean(1) * 100


@pytest.mark.parametrize(
    ("control", "programs"), [("range", 2), ("parity", 2), ("not 7", 2), ("loop", 4)]
)
def test_a_sequence_length_outside_what_the_graph_was_traced_for_captures_again(control, programs):
    """Token ids are captured with a dynamic length, under the guards export traced it
    with: a length on the other side of a branch, or another one where a loop fixed it,
    gets a graph of its own (it ran the traced branch, or failed in the unrolled loop).
    Guards that are not ranges (``% 2``, ``!= 7``) were dropped until a review found it."""
    torch.manual_seed(0)
    model = _SequenceBranch(control).eval()
    sparse = sparsefx.transform(model, torch.randint(0, 20, (2, 6)), density=1.0).eval()
    for length in (7, 3, 8):
        ids = torch.randint(0, 20, (2, length))
        torch.testing.assert_close(sparse(ids), model(ids))
    assert len(sparse._programs[sparse._modes()]) == programs


def test_mode_keys_are_bounded_and_recapturing_each_setting_warns_once(monkeypatch):
    """A Dropout p that changes every call keys a new program each time: past the bound
    the oldest mode key is dropped, with one warning."""
    monkeypatch.setattr(sparsefx.runtime, "_KEPT_MODES", 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    sparse = sparsefx.transform(model, torch.randn(2, 8), density=0.5).eval()
    with pytest.warns(UserWarning, match="more than 1 combinations of module modes"):
        sparse(torch.randn(2, 8))
    assert len(sparse._programs) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model[2].p = 0.2
        sparse(torch.randn(2, 8))
    assert len(sparse._programs) == 1


class _VarKeyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor, **kwargs: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(x)) * kwargs["gate"])


def test_inputs_bound_to_var_keyword_are_captured_static_in_one_export(monkeypatch):
    """torch.export rejects dynamic shapes for a non-empty ``**kwargs``: the dynamic export
    failed every time and the static one ran after it."""
    exports = []
    export = torch.export.export

    def counted(*args, **kwargs):
        exports.append(kwargs.get("dynamic_shapes"))
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    torch.manual_seed(0)
    model = _VarKeyword()
    x, gate = torch.randn(4, 8), torch.rand(16)
    sparse = sparsefx.transform(model, (x,), example_kwargs={"gate": gate}, density=1.0)
    torch.testing.assert_close(sparse.eval()(x, gate=gate), model.eval()(x, gate=gate))
    assert exports == [None, None]  # the training capture, then the eval one
