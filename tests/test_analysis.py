"""Analysis and passes: which channels are pruned, where tensors stay compact, what stays
dense and why, and that joins sparsefx does not understand get exact full-width scatters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsefx


class JoinWithInput(nn.Module):
    """fc2's output joins the model input, which no group covers: added (a residual stream
    from an unpruned source) or multiplied (a gate)."""

    def __init__(self, join):
        super().__init__()
        self.join = join
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x, masks=None):
        m = masks or {}
        h = F.relu(self.fc1(x)) * m.get("fc1", 1)
        return self.head(F.relu(self.join(self.fc2(h) * m.get("fc2", 1), x)))


def test_add_into_an_unpruned_stream_keeps_the_writer_dense():
    sparse = sparsefx.transform(JoinWithInput(torch.add), torch.randn(4, 6), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["fc1"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "residual stream from an unpruned source" in reasons["linear_1"]
    assert not sparse.analysis.scatters


def test_a_join_with_a_whole_read_of_its_own_channels_names_the_reader():
    """fc1's output added to its own flip: the other operand is full width because flip read
    fc1's channels whole, not a stream from an unpruned source (RoFormer's rotary embedding
    was reported so: the reason pointed at the wrong place)."""
    flipped = JoinWithInput(lambda h, x: h + h.flip(-1))
    sparse = sparsefx.transform(flipped, torch.randn(4, 6), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["fc1"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert reasons["linear_1"].startswith(
        "add.Tensor (add) joins it with a full-width tensor made from compact channels that "
        "flip.default (flip) reads whole (flip.default mixes channels"
    )


def test_gate_by_an_unpruned_tensor_is_scattered_to_full_width_and_exact():
    torch.manual_seed(0)
    model = JoinWithInput(torch.mul)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 6)
    sparse = sparsefx.transform(model, x, density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["fc1", "fc2"]
    (scatter,) = sparse.analysis.scatters
    assert scatter.op == "mul.Tensor" and "not pruned alongside" in scatter.reason

    masks = {"fc1": torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)}
    masks["fc2"] = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool)
    sparsefx.set_masks(sparse, masks)
    out = sparse(x)
    out.sum().backward()
    expected = reference(x, masks)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    code = sparse.runtime.graphs[0].compact.code  # the op graph (programs call op bodies)
    assert code.count("sparsefx.scatter_channels") == 1  # fc2's output, into the mul


class SizeScalars(nn.Module):
    """``where`` and ``mul`` with the batch size as the scalar operand: under dynamic shapes
    a node of a SymInt, not a tensor."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer(
            "cond", torch.rand(1, 5, 1, generator=torch.Generator().manual_seed(0)) > 0.4
        )

    def forward(self, x):
        h = torch.relu(self.fc1(x)) * x.shape[0]
        return self.fc2(torch.where(self.cond, h, x.shape[0]))


def test_a_symbolic_size_is_a_scalar_operand_of_mul_and_where():
    """The analysis read a SymInt node's shape and raised AttributeError."""
    torch.manual_seed(0)
    model = SizeScalars()
    x = torch.randn(2, 5, 6)
    sparse = sparsefx.transform(model, x, density=0.5)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    sparsefx.set_masks(sparse, {"fc1": mask})
    for batch in (2, 3):
        x = torch.randn(batch, 5, 6)
        h = torch.relu(model.fc1(x)) * mask * batch
        torch.testing.assert_close(sparse(x), model.fc2(torch.where(model.cond, h, batch)))


class ViewFlatten(nn.Module):
    """Flattens with x.view(x.size(0), -1): captured with concrete sizes, must be rewritten."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc1 = nn.Linear(6 * 3 * 3, 7)
        self.fc2 = nn.Linear(7, 2)

    def forward(self, x):
        h = F.relu(self.conv(x))
        return self.fc2(F.relu(self.fc1(h.view(h.size(0), -1))))


def test_view_flatten_keeps_channels_compact_as_blocks():
    torch.manual_seed(0)
    model = ViewFlatten()
    x = torch.randn(3, 2, 5, 5)
    sparse = sparsefx.transform(model, x, density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["conv", "fc1"]
    assert not sparse.analysis.scatters
    conv_mask = torch.tensor([1, 0, 0, 1, 1, 0], dtype=torch.bool)
    fc1_mask = torch.tensor([1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    sparsefx.set_masks(sparse, {"conv": conv_mask, "fc1": fc1_mask})
    h = F.relu(model.conv(x)) * conv_mask.view(1, -1, 1, 1)
    h = F.relu(model.fc1(h.flatten(1))) * fc1_mask
    torch.testing.assert_close(sparse(x), model.fc2(h))
    assert "flatten.using_ints" in sparse._programs[sparse._modes()][0].graph.code


def test_loss_inside_the_model_makes_the_last_layer_the_classifier():
    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(4, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x, y):
            return F.cross_entropy(self.head(torch.tanh(self.hidden(x))), y)

    sparse = sparsefx.transform(WithLoss(), (torch.randn(2, 4), torch.tensor([0, 2])), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["hidden"]
    assert [d.node for d in sparse.analysis.dense] == ["linear_1"]


def test_branch_keeps_non_zero_preserving_users_exact():
    """After a branch, sigmoid(0) != 0 must see the dropped zeros: it gets a scatter."""

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(4, 2)
            self.c = nn.Linear(4, 2)

        def forward(self, x):
            h = F.relu(self.a(x))
            return self.b(h) + self.c(torch.sigmoid(h))

    torch.manual_seed(0)
    model = Branch()
    x = torch.randn(5, 3)
    sparse = sparsefx.transform(model, x, density=0.5)
    assert [s.op for s in sparse.analysis.scatters] == ["sigmoid.default"]
    mask = torch.tensor([1, 0, 1, 0], dtype=torch.bool)
    sparsefx.set_masks(sparse, {"a": mask})
    h = F.relu(model.a(x)) * mask
    torch.testing.assert_close(sparse(x), model.b(h) + model.c(torch.sigmoid(h)))


def _step_flops(module: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        module(x).sum().backward()
    return counter.get_total_flops()


def test_flop_counter_sees_full_masks_as_dense_and_shrinks_with_kept_channels():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )
    x = torch.randn(4, 3, 8, 8)
    sparse = sparsefx.transform(model, x, density=0.5)  # fixed masks: exact conv counts
    groups = sparsefx.groups(sparse)
    sparsefx.set_masks(sparse, {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups})
    dense = _step_flops(model, x)
    assert _step_flops(sparse, x) == dense

    masks = {g.name: torch.arange(g.size) < g.size // 4 for g in groups}
    sparsefx.set_masks(sparse, masks)
    sparse_flops = _step_flops(sparse, x)
    assert sparse_flops < dense / 6  # consecutive pruned layers shrink as d^2
    # forward FLOPs match the cost model exactly (it counts linear/conv per example)
    with FlopCounterMode(display=False) as counter:
        sparse(x)
    expected = sparsefx.stats(sparse)["flops_fraction"] * sparse.cost_model.evaluate(
        "flops", sparse.cost_model.sizes
    )
    assert counter.get_total_flops() == round(expected * x.shape[0])


class MergedBatch(nn.Module):
    """An MLP run on rows whose batch is merged with the tokens (OPT's ``view(-1, C)``) or
    with windows (Swin's partition), and a projection of a parameter that runs once per
    batch."""

    def __init__(self, merge: str):
        super().__init__()
        self.merge = merge
        self.fc1, self.fc2, self.head = nn.Linear(8, 32), nn.Linear(32, 8), nn.Linear(8, 3)
        self.table = nn.Parameter(torch.randn(6, 4))
        self.bias_mlp = nn.Linear(4, 8)

    def forward(self, x):  # x: [batch, tokens=6, 8]
        b = x.shape[0]
        rows = x.reshape(-1, 8) if self.merge == "tokens" else x.reshape(b * 2, 3, 8)
        h = self.fc2(F.relu(self.fc1(rows))).reshape(b, 6, 8)
        return self.head((x + h + self.bias_mlp(self.table)).mean(1))


@pytest.mark.parametrize("merge", ["tokens", "windows"])
def test_cost_model_counts_layers_on_batch_merged_rows_per_example(merge):
    """FLOPs were per row of dim 0, which for merged rows is 1/6 (tokens) or 1/3 (windows)
    of an example: such layers were undercounted by that much, and a "flops" budget
    mispriced them. Forward FLOPs now equal the cost model times the batch."""
    torch.manual_seed(0)
    x = torch.randn(4, 6, 8)
    sparse = sparsefx.transform(MergedBatch(merge), x, density=0.5)
    groups = sparsefx.groups(sparse)
    for fraction in (1.0, 0.3):
        kept = [max(2, int(g.size * fraction)) for g in groups]
        masks = {g.name: torch.arange(g.size) < k for g, k in zip(groups, kept, strict=True)}
        sparsefx.set_masks(sparse, masks)
        with FlopCounterMode(display=False) as counter:
            sparse(x)
        expected = sparse.cost_model.evaluate("flops", kept) * x.shape[0]
        assert counter.get_total_flops() == round(expected)


def test_unsupported_layers_with_weights_are_listed_dense_with_the_reason():
    """A transposed convolution is a layer sparsefx does not prune: the dense report names
    it (its compact input is scattered back to full width, which the scatter report says)."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 6, 2, stride=2),
        nn.ReLU(), nn.Conv2d(6, 2, 1),
    )  # fmt: skip
    sparse = sparsefx.transform(model, torch.randn(2, 3, 6, 6), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["0"]
    reasons = {d.op: d.reason for d in sparse.analysis.dense}
    assert reasons["conv_transpose2d.input"].startswith("unsupported op")
    assert [d.op for d in sparse.analysis.scatters] == ["conv_transpose2d.input"]


class InstanceNormed(nn.Module):
    """conv -> InstanceNorm (affine, running statistics) -> ReLU -> conv -> classifier;
    `masks` applies the reference semantics (DESIGN §2) at the end of each chain."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.norm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x, masks=None):
        m = {name: mask.view(1, -1, 1, 1) for name, mask in (masks or {}).items()}
        h = F.relu(self.norm(self.conv1(x))) * m.get("conv1", 1)
        h = F.relu(self.conv2(h)) * m.get("conv2", 1)
        return self.head(h.mean((2, 3)))


def test_instance_norm_runs_on_the_kept_channels_and_updates_their_statistics_only():
    """InstanceNorm normalises each channel of each example on its own, as BatchNorm each
    channel: it is channel-wise, with its parameters and running statistics in the group.
    It used to be read at full width, behind a scatter."""
    torch.manual_seed(0)
    model, x = InstanceNormed().double(), torch.randn(4, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():  # statistics that differ from a fresh batch's
        model.norm.running_mean.uniform_(-1, 1)
        model.norm.running_var.uniform_(0.5, 2)
    reference = copy.deepcopy(model)
    sparse = sparsefx.transform(model, x, density=0.5)
    groups = sparsefx.groups(sparse)
    assert [g.name for g in groups] == ["conv1", "conv2"]
    assert ("norm.weight", 0) in groups[0].members and ("norm.bias", 0) in groups[0].members
    assert not sparse.analysis.scatters
    masks = {"conv1": torch.tensor([1, 0, 1, 1, 0, 0, 1, 0.0]), "conv2": torch.ones(6)}
    masks = {name: mask.double() for name, mask in masks.items()}
    sparsefx.set_masks(sparse, {name: mask.bool() for name, mask in masks.items()})
    dropped = ~masks["conv1"].bool()
    before = [model.norm.running_mean.clone(), model.norm.running_var.clone()]

    out = sparse(x)
    out.square().mean().backward()
    expected = reference(x, masks)
    expected.square().mean().backward()
    with torch.no_grad():  # the reference updated every channel's statistics
        for statistic, old in zip(("running_mean", "running_var"), before, strict=True):
            getattr(reference.norm, statistic)[dropped] = old[dropped]
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for statistic in ("running_mean", "running_var"):
        got, want = getattr(model.norm, statistic), getattr(reference.norm, statistic)
        torch.testing.assert_close(got, want, msg=statistic)
    assert torch.equal(model.norm.running_mean[dropped], before[0][dropped])
    sparse.eval()
    reference.eval()
    torch.testing.assert_close(sparse(x), reference(x, masks))


class GroupNormed(nn.Module):
    """wav2vec2's first feature-encoder block: conv -> GroupNorm -> GELU, then a conv and
    a classifier; `masks` applies the reference semantics (DESIGN §2)."""

    def __init__(self, groups: int):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 5, stride=2)
        self.norm = nn.GroupNorm(groups, 8)
        self.conv2 = nn.Conv1d(8, 6, 3)
        self.head = nn.Linear(6, 3)

    def forward(self, x, masks=None):
        m = {name: mask.view(1, -1, 1) for name, mask in (masks or {}).items()}
        h = F.gelu(self.norm(self.conv1(x))) * m.get("conv1", 1)
        h = F.gelu(self.conv2(h)) * m.get("conv2", 1)
        return self.head(h.mean(2))


@pytest.mark.parametrize(
    ("groups", "kept_groups"),
    [(8, [1, 0, 1, 1, 0, 0, 1, 0]), (4, [1, 0, 0, 1])],
    ids=["a-group-per-channel", "two-channels-per-group"],
)
def test_group_norm_runs_on_the_kept_norm_groups(groups, kept_groups):
    """A group norm normalises each of its groups with that group's statistics: the conv
    before it is pruned in whole norm groups (its group counts norm groups), and the norm
    runs on the kept ones. It used to keep that conv dense (the first conv of wav2vec2,
    HuBERT, SEW, UniSpeech and WavLM, a group per channel)."""
    torch.manual_seed(0)
    model, x = GroupNormed(groups).double(), torch.randn(4, 1, 40, dtype=torch.float64)
    with torch.no_grad():  # not the identity affine of a fresh GroupNorm
        model.norm.weight.uniform_(0.5, 2)
        model.norm.bias.uniform_(-1, 1)
    reference = copy.deepcopy(model)
    sparse = sparsefx.transform(model, x, density=0.5)
    norm_groups, conv2 = sparsefx.groups(sparse)
    assert (norm_groups.name, norm_groups.size, conv2.name) == ("conv1", groups, "conv2")
    assert ("norm.weight", 0) in norm_groups.members and ("norm.bias", 0) in norm_groups.members
    assert not sparse.analysis.scatters
    assert f"kept norm groups, {8 // groups} channels each" in sparsefx.explain(sparse)
    kept = torch.tensor(kept_groups, dtype=torch.bool)
    sparsefx.set_masks(sparse, {"conv1": kept, "conv2": torch.ones(6, dtype=torch.bool)})
    masks = {"conv1": kept.repeat_interleave(8 // groups).double()}

    out = sparse(x)
    out.square().mean().backward()
    expected = reference(x, masks)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


class SplitNormGroups(nn.Module):
    """Two convs of 3 and 5 channels concatenated into a GroupNorm of two groups of 4: the
    first norm group holds channels of both."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv1d(1, 3, 3), nn.Conv1d(1, 5, 3)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(F.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1))).mean(2))


@pytest.mark.parametrize(
    ("build", "pruned", "normalised"),
    [(lambda: GroupNormed(1), ["conv2"], 1), (SplitNormGroups, [], 2)],
    ids=["one-group", "groups-across-producers"],
)
def test_a_group_norm_whose_groups_cannot_be_kept_whole_keeps_its_input_dense(
    build, pruned, normalised
):
    """One group over every channel normalises each with all the others' statistics, as a
    layout whose pieces split norm groups does: none of those channels can be dropped."""
    sparse = sparsefx.transform(build(), torch.randn(4, 1, 40), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == pruned
    reasons = [d.reason for d in sparse.analysis.dense if d.op == "conv1d.default"]
    blocked = [r for r in reasons if "normalised across features by group_norm" in r]
    assert len(blocked) == len(reasons) == normalised


def _padded_convs(first, second) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=first), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=second, dilation=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )  # fmt: skip


def test_string_padding_convolutions_are_pruned_as_their_integer_twins():
    """padding="same"/"valid" is its own aten overload, which the analysis did not read:
    such convolutions (EfficientNet's) stayed dense with no reason in the report. Symmetric
    ones now prune exactly as the integer padding they stand for."""
    torch.manual_seed(0)
    strings, integers = _padded_convs("same", "valid"), _padded_convs(1, 0)
    integers.load_state_dict(strings.state_dict())
    x = torch.randn(2, 3, 9, 9)
    config = sparsefx.SparseConfig(density=0.5, seed=0)
    sparse, twin = (sparsefx.transform(m, x, config=config) for m in (strings, integers))
    assert [g.name for g in sparsefx.groups(sparse)] == ["0", "2"]
    assert sparse.analysis.dense == twin.analysis.dense
    for model in (sparse, twin):
        sparsefx.wrap_loss(model, F.cross_entropy)
    for _ in range(2):  # sampled masks: the same groups and seed draw the same ones
        torch.testing.assert_close(sparse(x), twin(x), rtol=0, atol=0)


def test_same_padding_with_an_even_kernel_is_reported_unsupported():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 2, padding="same"), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 3),
    )  # fmt: skip
    sparse = sparsefx.transform(model, torch.randn(2, 3, 5, 5), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["0"]
    reasons = {d.op: d.reason for d in sparse.analysis.dense}
    assert reasons["conv2d.padding"].startswith("unsupported op")


class TiedLanguageModel(nn.Module):
    """An embedding whose table is also the output layer's weight (a tied LM head)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(self.proj(F.relu(self.fc(self.embed(tokens)))))


def test_a_tied_weight_counts_once_in_the_cost_model():
    """Counted at every use, an LM head tied to its embedding doubled the table's share of
    the dense parameters, and every params fraction with it."""
    model = TiedLanguageModel()
    sparse = sparsefx.transform(model, torch.randint(0, 20, (2, 5)), density=0.5)
    dense = sparse.cost_model.evaluate("params", [g.size for g in sparse.groups])
    assert dense == sum(p.numel() for p in model.parameters())


class IndexedTable(nn.Module):
    """A parameter table read with ``table[idx]`` (Swin's relative-position bias), with
    negative indices, as a model may."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(5, 4))
        self.register_buffer("idx", torch.tensor([[-1, 0], [2, -5]]))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x + self.table[self.idx].sum(1))


def test_a_table_read_by_indexing_keeps_negative_indices():
    """Capture reads ``table[idx]`` as an embedding lookup, so that the analysis can prune
    the table's columns; embedding refuses negative indices, which indexing counts from the
    end, so the lookup shifts them."""
    torch.manual_seed(0)
    model = IndexedTable().eval()
    x = torch.randn(2, 4)
    with pytest.warns(UserWarning, match="nothing to prune"):
        sparse = sparsefx.transform(model, (x,), density=0.5)
    torch.testing.assert_close(sparse(x), model(x))
    expected = torch.autograd.grad(model(x).sum(), model.table)[0]
    torch.testing.assert_close(torch.autograd.grad(sparse(x).sum(), model.table)[0], expected)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, half go through a branch, and a channel
    shuffle (view [B, 2, C/2, ...], transpose, view) interleaves them, so each half is read
    as one block of C/2 features: one channel."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        h = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
            nn.Conv2d(h, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(c, 3)

    def forward(self, x, masks=None):
        m = masks or {}
        x1, x2 = self.stem(x).chunk(2, dim=1)
        x2 = x2 * m.get("stem", 1)
        b = self.branch[6:](self.branch[5](self.branch[:5](x2) * m.get("branch.0", 1)))
        y = torch.cat((x1, b), dim=1)
        y = y.view(y.shape[0], 2, -1, *y.shape[2:]).transpose(1, 2).reshape(y.shape)
        return self.head(y.mean((2, 3)))


def test_a_one_channel_component_is_left_dense_and_a_one_channel_part_of_a_producer_too():
    """The branch's last conv is one channel (a view reads its features as one block): as a
    group the sampler would always keep it, so it is dense. The stem's first half is one
    channel too, and its second half a group that prunes: it was a group of one channel,
    read at full width by the shuffle, since leaving a part dense left its whole producer
    dense. It is now dense features of the stem's layout, always kept, and the second half
    prunes alone: nothing is scattered."""
    torch.manual_seed(0)
    model = ShuffleUnit().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 6, 6)
    sparse = sparsefx.transform(model, (x,), density=0.6)
    assert [(g.name, g.size) for g in sparsefx.groups(sparse)] == [("stem", 4), ("branch.0", 4)]
    one_channel = [
        (d.op, d.reason.split(": ", 1)[0])
        for d in sparse.analysis.dense
        if "one channel: policy.keep_minimum" in d.reason
    ]
    # the stem's first half, then the branch's last conv, of the groups above
    assert one_channel == [("conv2d.default", "features 0..3"), ("conv2d.default", "one channel")]
    assert not sparse.analysis.scatters

    masks = {"stem": torch.tensor([1, 0, 0, 1]).bool()}
    masks["branch.0"] = torch.tensor([0, 1, 1, 0]).bool()
    sparsefx.set_masks(sparse, masks)
    out = sparse(x)
    out.sum().backward()
    expected = reference(x, {k: v[:, None, None].float() for k, v in masks.items()})
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


class GatedBias(nn.Module):
    """WavLM's gated relative-position bias: a Linear(d, 8) read as two gates of 4 summed
    features, ``a * (b * c - 1) + 2`` multiplying the hidden state."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.fc = nn.Linear(12, d)
        self.gate = nn.Linear(d, 8)
        self.scale = nn.Parameter(torch.ones(1, 1, 1))
        self.head = nn.Linear(d, 3)

    def forward(self, x, masks=None):
        h = self.fc(x) * (masks or {}).get("fc", 1)
        a, b = self.gate(h).view(*h.shape[:-1], 2, 4).sum(-1).sigmoid().chunk(2, dim=-1)
        return self.head(h * (a * (b * self.scale - 1.0) + 2.0))


def test_a_one_channel_gate_split_in_two_is_left_dense_and_not_scattered():
    """Both halves of the gate are one channel, coupled in one component: it was a group of
    size 1 that the sampler always kept and whose ``+ 2`` scattered it to full width."""
    torch.manual_seed(0)
    model = GatedBias()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 5, 12)
    sparse = sparsefx.transform(model, (x,), density=0.5)
    assert [g.name for g in sparsefx.groups(sparse)] == ["fc"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert reasons["linear_1"].startswith("one channel: policy.keep_minimum")
    assert not sparse.analysis.scatters

    masks = {"fc": torch.arange(16) % 3 == 0}
    sparsefx.set_masks(sparse, masks)
    out = sparse(x)
    out.sum().backward()
    expected = reference(x, {"fc": masks["fc"].float()})
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
