"""Coupled structures (DESIGN §2, §4): residual streams, depthwise convolutions and concats
train compact and equal the reference semantics.

Each model here takes the reference masks in its own forward and multiplies them in at the
mask points DESIGN §2 names (the end of each producer's channel-wise chain), so the
reference is written independently of sparsefx's analysis.
"""

from __future__ import annotations

import copy
import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import sparsefx

Masks = dict[str, Tensor] | None


def _m(masks: Masks, name: str, x: Tensor, dim: int = 1) -> Tensor:
    """x with the reference mask of group `name` applied along `dim` (1 if unmasked)."""
    if masks is None or name not in masks:
        return x
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * masks[name].to(x.dtype).view(shape)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, name: str, stream: str):
        super().__init__()
        self.name, self.stream = name, stream
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor, masks: Masks) -> Tensor:
        h = _m(masks, self.name, F.relu(self.bn1(self.conv1(x))))
        h = _m(masks, self.stream, self.bn2(self.conv2(h)))
        residual = x if self.shortcut is None else _m(masks, self.stream, self.shortcut(x))
        return F.relu(h + residual)


class ResNetStyle(nn.Module):
    """Stem, a block on the stem's stream, a downsampling block with a 1x1 shortcut."""

    streams: ClassVar = {"stem": ("stem", "layer1.conv2"), "layer2.conv2": ("layer2.conv2",)}
    internal = ("layer1.conv1", "layer2.conv1")

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.layer1 = BasicBlock(8, 8, 1, "layer1.conv1", "stem")
        self.layer2 = BasicBlock(8, 12, 2, "layer2.conv1", "layer2.conv2")
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        x = _m(masks, "stem", F.relu(self.bn(self.stem(x))))
        x = self.layer2(self.layer1(x, masks), masks)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, name: str, stream: str):
        super().__init__()
        hidden = cin * expand
        self.name, self.stream, self.residual = name, stream, cin == cout
        self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor, masks: Masks) -> Tensor:
        h = F.relu6(self.bn1(self.expand(x)))
        h = _m(masks, self.name, F.relu6(self.bn2(self.depthwise(h))))
        h = _m(masks, self.stream, self.bn3(self.project(h)))
        return x + h if self.residual else h


class MobileNetV2Style(nn.Module):
    """Inverted residual blocks: 1x1 expand, 3x3 depthwise, 1x1 project, residual add."""

    streams: ClassVar = {
        "stem": ("stem",),
        "block1.project": ("block1.project", "block2.project"),
    }
    internal = ("block0.expand", "block1.expand", "block2.expand")

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.block0 = InvertedResidual(6, 6, 2, "block0.expand", "stem")
        self.block1 = InvertedResidual(6, 8, 3, "block1.expand", "block1.project")
        self.block2 = InvertedResidual(8, 8, 3, "block2.expand", "block1.project")
        self.fc = nn.Linear(8, 4)

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        x = _m(masks, "stem", F.relu6(self.bn(self.stem(x))))
        for block in (self.block0, self.block1, self.block2):
            x = block(x, masks)
        return self.fc(x.mean((2, 3)))


class DenseNetStyle(nn.Module):
    """Each layer reads the concat of every earlier output (conv-BN-ReLU, then concat:
    post-activation, so a dropped channel is zero wherever a later layer reads it)."""

    streams: ClassVar[dict[str, tuple[str, ...]]] = {}
    internal = ("stem", "layers.0", "layers.1", "layers.2", "transition")

    def __init__(self, growth: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Conv2d(6 + i * growth, growth, 3, padding=1) for i in range(3)
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(growth) for _ in range(3))
        self.transition = nn.Conv2d(6 + 3 * growth, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 3)

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        features = [_m(masks, "stem", F.relu(self.stem(x)))]
        for i, (conv, norm) in enumerate(zip(self.layers, self.norms, strict=True)):
            h = F.relu(norm(conv(torch.cat(features, 1))))
            features.append(_m(masks, f"layers.{i}", h))
        h = _m(masks, "transition", F.relu(self.transition(torch.cat(features, 1))))
        return self.fc(F.avg_pool2d(h, 2).flatten(1))


class SliceStyle(nn.Module):
    """One producer's channels read in two ranges (``h[:, :5]`` and ``narrow``) by two
    branches that are added: the slice bounds cut its space into two groups."""

    streams: ClassVar = {"a": ("a", "b")}
    internal = ("conv#0", "conv#1")

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(5, 6, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        h = F.relu(self.bn(self.conv(x)))
        first, second = _m(masks, "conv#0", h[:, :5]), _m(masks, "conv#1", h.narrow(1, 5, 3))
        y = F.relu(_m(masks, "a", self.a(first)) + _m(masks, "b", self.b(second)))
        return self.fc(y.mean((2, 3)))


class ResNeXtStyle(nn.Module):
    """A bottleneck whose 3x3 conv is grouped (4 conv groups of 3 channels in, 6 out): the
    reduce conv is pruned in whole conv groups, which the grouped conv and the BatchNorms
    after it follow, and the expand conv gathers."""

    streams: ClassVar = {"stem": ("stem", "expand")}
    internal = ("reduce",)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.reduce = nn.Conv2d(8, 12, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.grouped = nn.Conv2d(12, 24, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(24)
        self.expand = nn.Conv2d(24, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        x = _m(masks, "stem", F.relu(self.bn(self.stem(x))))
        h = F.relu(self.bn2(self.grouped(F.relu(self.bn1(self.reduce(x))))))
        if masks is not None and "reduce" in masks:  # one mask entry per conv group
            h = _m({"reduce": masks["reduce"].repeat_interleave(6)}, "reduce", h)
        x = F.relu(x + _m(masks, "stem", self.bn3(self.expand(h))))
        return self.fc(x.mean((2, 3)))


class SqueezeExcite(nn.Module):
    """A conv whose channels a squeeze-excitation gate scales (`h * s`, s shaped [B, C, 1, 1]):
    the excitation conv is coupled to the conv it scales, the squeeze conv is its own group."""

    streams: ClassVar[dict[str, tuple[str, ...]]] = {}
    internal = ("conv", "squeeze", "head")

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        h = _m(masks, "conv", F.relu(self.bn(self.conv(x))))
        pooled = h.mean((2, 3), keepdim=True)
        s = _m(masks, "squeeze", F.relu(self.squeeze(pooled)))
        h = h * _m(masks, "conv", torch.sigmoid(self.excite(s)))
        h = _m(masks, "head", F.relu(self.head(h)))
        return self.fc(h.mean((2, 3)))


class EmbeddingStream(nn.Module):
    """Token and position embeddings start a residual stream that MLP blocks write into,
    with no norm across features, so a pruned stream covers the embeddings' columns. The
    input is an image of tokens (one per pixel) so that it shares this file's harness."""

    streams: ClassVar = {"tokens": ("tokens", "positions", "blocks.0.1", "blocks.1.1")}
    internal = ("blocks.0.0", "blocks.1.0")

    def __init__(self, vocab: int = 7, width: int = 8):
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(16, width)
        self.blocks = nn.ModuleList(
            nn.ModuleList([nn.Linear(width, 2 * width), nn.Linear(2 * width, width)])
            for _ in range(2)
        )
        self.fc = nn.Linear(width, 3)

    @staticmethod
    def inputs(batch: int) -> Tensor:
        return torch.randint(0, 7, (batch, 3, 4, 4), generator=torch.Generator().manual_seed(5))

    def forward(self, x: Tensor, masks: Masks = None) -> Tensor:
        tokens = x[:, 0].flatten(1)  # [B, 16]
        h = _m(masks, "tokens", self.tokens(tokens), 2)
        h = h + _m(masks, "positions", self.positions(torch.arange(16)), 1)  # broadcast over B
        for i, (up, down) in enumerate(self.blocks):
            inner = _m(masks, f"blocks.{i}.0", F.relu(up(h)), 2)
            h = h + _m(masks, f"blocks.{i}.1", down(inner), 2)
        return self.fc(h.amax(1))


MODELS = [
    ResNetStyle,
    MobileNetV2Style,
    DenseNetStyle,
    SliceStyle,
    ResNeXtStyle,
    SqueezeExcite,
    EmbeddingStream,
]


def _inputs(model_cls, batch: int, dtype: torch.dtype = torch.float32) -> Tensor:
    if hasattr(model_cls, "inputs"):
        return model_cls.inputs(batch)
    return torch.randn(batch, 3, 4, 4, dtype=dtype)


def _random_masks(groups, generator: torch.Generator) -> dict[str, Tensor]:
    masks = {}
    for group in groups:
        mask = torch.rand(group.size, generator=generator) < 0.5
        mask[torch.randint(group.size, (1,), generator=generator)] = True
        masks[group.name] = mask
    return masks


def _reference_masks(model_cls, groups, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's own mask names: a pruned stream's mask applies to each of its writers."""
    ref = dict(masks)
    for name, writers in model_cls.streams.items():
        for writer in writers:
            if name in masks:
                ref[writer] = masks[name]
    return ref


@pytest.mark.parametrize("prune_streams", [False, True], ids=["streams-dense", "streams-pruned"])
@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_training_step_matches_reference(model_cls, prune_streams):
    torch.manual_seed(0)
    model = model_cls().double()
    reference = copy.deepcopy(model)
    x = _inputs(model_cls, 3, torch.float64)
    config = sparsefx.SparseConfig(density=0.5, prune_streams=prune_streams, seed=0)
    sparse = sparsefx.transform(model, (x,), config=config)
    groups = sparsefx.groups(sparse)
    expected_names = list(model_cls.internal) + (list(model_cls.streams) if prune_streams else [])
    assert sorted(g.name for g in groups) == sorted(expected_names)

    masks = _random_masks(groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    out = sparse(x)
    out.square().mean().backward()
    expected = reference(x, _reference_masks(model_cls, groups, masks))
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
        if name.endswith("running_mean") or name.endswith("running_var"):
            kept = _kept_channels(groups, masks, name.rsplit(".", 1)[0])
            torch.testing.assert_close(b[kept], c[kept], msg=name)

    sparse.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            sparse(x), reference(x, _reference_masks(model_cls, groups, masks))
        )


def _kept_channels(groups, masks, module: str) -> Tensor:
    """Channels of a BatchNorm whose running statistics sparsefx updated this step (a
    BatchNorm may be shared by several groups, each covering a range of its channels)."""
    kept = None
    for group in groups:
        for fqn, dim, dims in group.expand(masks[group.name]):
            if fqn == f"{module}.weight" and dim == 0:
                kept = dims if kept is None else kept | dims
    return slice(None) if kept is None else kept  # a dense BatchNorm: every channel


def test_resnet_report_says_streams_stay_dense_and_why():
    sparse = sparsefx.transform(ResNetStyle(), torch.randn(2, 3, 4, 4), density=0.5)
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert reasons.pop("linear").startswith("output layer")
    assert len(reasons) == 4  # stem, layer1.conv2, layer2.conv2, layer2's shortcut
    assert all("residual stream" in r and "prune_streams=True" in r for r in reasons.values())
    assert not sparse.analysis.scatters


def test_pruned_stream_is_one_group_over_every_writer_and_reader():
    sparse = sparsefx.transform(
        ResNetStyle(),
        torch.randn(2, 3, 4, 4),
        config=sparsefx.SparseConfig(0.5, prune_streams=True),
    )
    (stream,) = [g for g in sparsefx.groups(sparse) if g.name == "layer2.conv2"]
    assert stream.stream and len(stream.producers) == 2
    assert ("layer2.shortcut.0.weight", 0) in stream.members
    assert ("layer2.bn2.weight", 0) in stream.members
    assert ("fc.weight", 1) in stream.members
    (stem,) = [g for g in sparsefx.groups(sparse) if g.name == "stem"]
    readers = {fqn for fqn, dim in stem.members if dim == 1}
    assert readers == {"layer1.conv1.weight", "layer2.conv1.weight", "layer2.shortcut.0.weight"}
    edges = sparse.analysis.couplings.edges(data="kinds")
    assert any("residual" in kinds for _, _, kinds in edges)


def test_embeddings_feeding_a_pruned_stream_gather_their_columns():
    x = EmbeddingStream.inputs(2)
    dense = sparsefx.transform(EmbeddingStream(), x, density=0.5)
    reasons = {d.node: d.reason for d in dense.analysis.dense}
    assert "residual stream" in reasons["embedding"] and "residual stream" in reasons["embedding_1"]

    config = sparsefx.SparseConfig(0.5, prune_streams=True)
    sparse = sparsefx.transform(EmbeddingStream(), x, config=config)
    (stream,) = [g for g in sparsefx.groups(sparse) if g.name == "tokens"]
    assert {("tokens.weight", 1), ("positions.weight", 1), ("fc.weight", 1)} <= set(stream.members)
    mask = torch.tensor([True, False] * 4)
    expanded = {(n, d): m for n, d, m in stream.expand(mask)}
    torch.testing.assert_close(expanded[("positions.weight", 1)], mask)
    assert not sparse.analysis.scatters
    # the lookups read the kept columns of their tables (one gather per table)
    code = sparse.runtime.graphs[0].compact.code  # the op graph (programs call op bodies)
    assert code.count("gather_weight.default(p_tokens_weight, None, idx_tokens") == 1
    # an embedding costs vocab * kept parameters and no FLOPs
    k = sparse.cost_model.symbols[[g.name for g in sparsefx.groups(sparse)].index("tokens")]
    params = sparse.cost_model.params
    assert params.coeff(k).subs({s: 0 for s in sparse.cost_model.symbols}) == 7 + 16 + 3 + 2


def test_squeeze_excitation_gate_is_coupled_to_the_channels_it_scales():
    sparse = sparsefx.transform(SqueezeExcite(), torch.randn(2, 3, 4, 4), density=0.5)
    (group,) = [g for g in sparsefx.groups(sparse) if g.name == "conv"]
    assert {("excite.weight", 0), ("excite.bias", 0), ("squeeze.weight", 1)} <= set(group.members)
    assert ("head.weight", 1) in group.members
    assert not sparse.analysis.scatters
    kinds = sparse.analysis.couplings.edges(data="kinds")
    assert any("gate" in k for _, _, k in kinds)


def test_sparse_embedding_stays_dense_and_says_why():
    model = EmbeddingStream()
    model.tokens.sparse = True
    config = sparsefx.SparseConfig(0.5, prune_streams=True)
    sparse = sparsefx.transform(model, EmbeddingStream.inputs(2), config=config)
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "sparse=True" in reasons["embedding"]
    assert "tokens" not in [g.name for g in sparsefx.groups(sparse)]


def test_grouped_convolution_prunes_whole_conv_groups():
    sparse = sparsefx.transform(ResNeXtStyle(), torch.randn(2, 3, 4, 4), density=0.5)
    (group,) = sparsefx.groups(sparse)
    assert (group.name, group.size) == ("reduce", 4)  # 12 channels in 4 conv groups
    kept = {
        name: dims for name, dim, dims in group.expand(torch.tensor([True, False, False, True]))
    }
    assert kept["reduce.weight"].nonzero().squeeze(1).tolist() == [0, 1, 2, 9, 10, 11]
    assert kept["grouped.weight"].nonzero().squeeze(1).tolist() == [*range(6), *range(18, 24)]
    assert ("expand.weight", 1) in group.members and ("bn2.weight", 0) in group.members
    assert "grouped" not in [d.node for d in sparse.analysis.dense]


class GroupedConvWithGate(nn.Module):
    """RegNetY's block: a grouped conv (conv groups of 4 channels) whose output a
    squeeze-and-excitation gate of one channel per feature multiplies."""

    def __init__(self):
        super().__init__()
        self.reduce = nn.Conv2d(3, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.expand = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.grouped(F.relu(self.reduce(x))))
        gate = self.excite(F.relu(self.squeeze(h.mean((2, 3), keepdim=True)))).sigmoid()
        return self.fc(F.relu(self.expand(h * gate)).mean((2, 3)))


def test_a_gate_of_finer_channels_than_what_it_multiplies_is_cut_alike():
    """The gate's channels are single features, the grouped conv's are conv groups of 4:
    the multiply joined two layouts that did not line up, and both were scattered to full
    width. The gate's conv is now pruned in blocks of 4, in the conv groups' group."""
    torch.manual_seed(0)
    model, x = GroupedConvWithGate(), torch.randn(2, 3, 6, 6)
    sparse = _compiled_matches_transform(copy.deepcopy(model), x)
    sparse = _transformed_as_zeroed(model, x)
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    (conv_groups,) = [g for g in sparse.groups if g.name == "reduce"]
    assert conv_groups.size == 4 and ("excite.weight", 0) in conv_groups.members
    kept = {n: dims for n, dim, dims in conv_groups.expand(torch.tensor([1, 0, 0, 1]).bool())}
    assert kept["excite.weight"].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA mask needs a CUDA GPU")
def test_expand_keeps_a_cuda_mask_on_its_device():
    sparse = sparsefx.transform(ResNeXtStyle(), torch.randn(2, 3, 4, 4), density=0.5)
    (group,) = sparsefx.groups(sparse)
    mask = torch.tensor([True, False, False, True])
    on_cpu = group.expand(mask)
    on_gpu = group.expand(mask.cuda())
    assert [(n, d) for n, d, _ in on_gpu] == [(n, d) for n, d, _ in on_cpu]
    for (_, _, gpu), (_, _, cpu) in zip(on_gpu, on_cpu, strict=True):
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


def test_depthwise_convolution_follows_its_input_channels():
    sparse = sparsefx.transform(MobileNetV2Style(), torch.randn(2, 3, 4, 4), density=0.5)
    (group,) = [g for g in sparsefx.groups(sparse) if g.name == "block1.expand"]
    assert group.size == 18
    assert ("block1.depthwise.weight", 0) in group.members
    assert ("block1.bn2.weight", 0) in group.members
    assert ("block1.project.weight", 1) in group.members
    assert "block1.depthwise" not in [d.node for d in sparse.analysis.dense]
    code = sparse._programs[sparse._modes()][0].graph.code
    assert "sym_size" in code  # the depthwise conv runs with one group per kept channel


def test_concat_consumer_gathers_columns_of_every_piece_at_its_offset():
    sparse = sparsefx.transform(DenseNetStyle(), torch.randn(2, 3, 4, 4), density=0.5)
    groups = {g.name: g for g in sparsefx.groups(sparse)}
    mask = torch.tensor([True, False, False, True])
    expanded = {(n, d): m for n, d, m in groups["layers.0"].expand(mask)}
    # layers.0's channels are columns 6..9 of every later reader's weight
    column = torch.zeros(18, dtype=torch.bool)
    column[[6, 9]] = True
    torch.testing.assert_close(expanded[("transition.weight", 1)], column)
    torch.testing.assert_close(expanded[("layers.2.weight", 1)], column[:14])
    assert not sparse.analysis.scatters


def test_expand_maps_a_flattened_channel_to_its_block_of_features():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4, 2))
    sparse = sparsefx.transform(model, torch.randn(1, 2, 4, 4), density=0.7)
    (group,) = sparsefx.groups(sparse)
    expanded = {(n, d): m for n, d, m in group.expand(torch.tensor([False, True, False]))}
    assert expanded[("0.weight", 0)].tolist() == [False, True, False]
    assert expanded[("3.weight", 1)].nonzero().squeeze(1).tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"bool mask of shape \(3,\)"):
        group.expand(torch.ones(4, dtype=torch.bool))


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_cost_model_counts_the_compact_step(model_cls):
    """Forward FLOPs of the compact graph equal the sympy cost model at the kept counts
    (fixed masks run the exact conv counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    x = _inputs(model_cls, 2)
    config = sparsefx.SparseConfig(density=0.5, prune_streams=True)
    sparse = sparsefx.transform(model_cls(), (x,), config=config)
    masks = _random_masks(sparsefx.groups(sparse), torch.Generator().manual_seed(2))
    sparsefx.set_masks(sparse, masks)
    with FlopCounterMode(display=False) as counter:
        sparse(x)
    kept = [float(masks[g.name].sum()) for g in sparsefx.groups(sparse)]
    assert counter.get_total_flops() == round(sparse.cost_model.evaluate("flops", kept) * 2)


def _fit_random_labels(sparse: nn.Module, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """60 Adam steps of compact training of the whole structure (streams pruned too) on random
    labels: the loss falls and the sampled masks stay sparse."""
    criterion = sparsefx.wrap_loss(sparse, nn.CrossEntropyLoss())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = criterion(sparse(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5, losses
    assert sparsefx.stats(sparse)["sampled_density"] < 0.75


def _labelled(model_cls) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    model = model_cls()
    x = _inputs(model_cls, 16)
    return model, x, torch.randint(0, model.fc.out_features, (16,))


OPTIONS = {"density": 0.5, "prune_streams": True, "seed": 0}


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_training_loss_falls(model_cls):
    model, x, y = _labelled(model_cls)
    sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**OPTIONS))
    _fit_random_labels(sparse, model, x, y)


@pytest.mark.parametrize("model_cls", MODELS, ids=lambda c: c.__name__)
def test_compiled_fits_random_labels_then_matches_transform(model_cls):
    """The compiled model, sampling masks, fits random labels as `test_training_loss_falls`
    does; then, with the trained weights and fixed masks, its gradients are the transformed
    model's. One test, in this order, so that Inductor compiles each model twice (the
    sampled step, the fixed-mask step): a cold compile is most of the suite's time."""
    model, x, y = _labelled(model_cls)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="sparsefx", options=OPTIONS)
    _fit_random_labels(compiled, twin, x, y)
    eager = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**OPTIONS))
    model.load_state_dict(twin.state_dict())
    masks = _random_masks(sparsefx.groups(eager), torch.Generator().manual_seed(3))
    sparsefx.set_masks(eager, masks)
    sparsefx.set_masks(compiled, masks)
    twin.zero_grad()
    eager(x).square().mean().backward()
    compiled(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, msg=name, atol=1e-5, rtol=1e-4)


def test_cpu_convolutions_run_on_rounded_counts_so_shapes_repeat_across_masks(monkeypatch):
    """conv_channel_multiple=8 (the default): while masks are sampled, kept counts 9..16 of
    a conv all run one shape, and the step equals the one with exact counts, which is what
    fixed masks (set_masks) run."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()
    )
    model.append(nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 4)))
    x = torch.randn(2, 3, 4, 4)
    exact = copy.deepcopy(model)
    rounded = sparsefx.transform(model, (x,), density=0.5)
    criterion = sparsefx.wrap_loss(rounded, lambda out, _: out.square().sum())
    reference = sparsefx.transform(exact, (x,), density=0.5)
    flops, exact_flops = set(), []
    for first, second in [(9, 14), (16, 10), (12, 12)]:
        masks = {"0": torch.arange(32) < first, "2": torch.arange(32) >= 32 - second}
        sampled = torch.cat(list(masks.values()))
        monkeypatch.setattr(rounded.structure, "sample", lambda k, m=sampled: m.expand(k, -1))
        sparsefx.set_masks(reference, masks)
        with FlopCounterMode(display=False) as counter:
            out = rounded(x)
        flops.add(counter.get_total_flops() - 2 * 2 * 4 * 16 * second)  # the linear: exact
        with FlopCounterMode(display=False) as counter:
            expected = reference(x)
        exact_flops.append(counter.get_total_flops())
        torch.testing.assert_close(out, expected)
        criterion(out, None).backward()
        expected.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), exact.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert exact_flops == [  # 2 x batch 2 x 16 positions x (conv1, conv2, the linear)
        2 * 2 * 16 * (27 * k1 + 9 * k1 * k2 + 4 * k2) for k1, k2 in [(9, 14), (16, 10), (12, 12)]
    ]
    assert flops == {2 * 2 * 16 * (16 * 3 + 16 * 16) * 9}  # one shape: 16 channels each
    rounded.eval()  # eval keeps one mask, so it runs the exact counts too
    sparsefx.set_masks(rounded, masks)
    rounded(x)  # captures the eval graph outside the counter
    with FlopCounterMode(display=False) as counter:
        rounded(x)
    assert counter.get_total_flops() == exact_flops[-1]


def test_sampled_counts_that_recur_run_exact_convolution_shapes(monkeypatch):
    """Kept counts sampled twice before run the exact conv shapes (their oneDNN primitives
    compile once), with the same outputs and gradients as the rounded ones; new counts run
    rounded again."""
    from torch.utils.flop_counter import FlopCounterMode

    from sparsefx import runtime

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 3))
    x = torch.randn(2, 3, 4, 4)
    sparse = sparsefx.transform(model, (x,), density=0.5)
    criterion = sparsefx.wrap_loss(sparse, lambda out, _: out.square().sum())
    conv_flops: dict[int, list[int]] = {}
    first: list[torch.Tensor] = []
    for kept in (12, 12, 12, 12, 13, 12):
        mask = torch.arange(32) < kept
        monkeypatch.setattr(sparse.structure, "sample", lambda k, m=mask: m.expand(k, -1))
        with FlopCounterMode(display=False) as counter:
            out = sparse(x)
        conv_flops.setdefault(kept, []).append(counter.get_total_flops())
        model.zero_grad()
        criterion(out, None).backward()
        if kept == 12:  # rounded (the first two) and exact: the same output and gradients
            results = [out.detach(), *(p.grad.clone() for p in model.parameters())]
            first = first or results
            for got, want in zip(results, first, strict=True):
                torch.testing.assert_close(got, want)

    def flops(k: int) -> int:  # 2 x batch 2 x (conv1 16 positions, conv2 4)
        return 2 * 2 * (16 * 27 * k + 4 * 9 * k * 4)

    rounded, exact = flops(16), flops(12)
    assert runtime.RECURRING == 2
    assert conv_flops == {12: [rounded, rounded, exact, exact, exact], 13: [flops(16)]}


def _zeroed(model: nn.Module, groups, masks: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` with every slice that `Group.expand` says is dropped zeroed: the
    reference semantics wherever a dropped channel's every weight and bias is in its group
    (no normalisation or gate after it)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for group in groups:
            # a group may own part of a dim only (q of a fused qkv): its features are the
            # ones an all-true mask keeps
            owned = group.expand(torch.ones(group.size, dtype=torch.bool))
            kept = group.expand(masks[group.name])
            for (name, dim, mine), (_, _, keep) in zip(owned, kept, strict=True):
                dropped = (mine & ~keep).nonzero()[:, 0]
                reference.get_parameter(name).index_fill_(dim, dropped, 0.0)
    return reference


def _transformed_as_zeroed(model: nn.Module, x: Tensor) -> nn.Module:
    """`model` transformed (a copy), checked under random masks against `_zeroed`."""
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    torch.testing.assert_close(sparse(x), _zeroed(model, sparse.groups, masks)(x))
    return sparse


class BiasedAttention(nn.Module):
    """Attention with a learned per-head additive bias of every head (a parameter, as an
    ALiBi buffer or T5's shared position bias would be: nothing prunes it with the heads),
    as SDPA's mask or added to explicit scores (``explicit``, T5's and BLOOM's eager form)."""

    heads, dim, tokens = 4, 8, 6

    def __init__(self, explicit: bool = False):
        super().__init__()
        self.explicit = explicit
        width = self.heads * self.dim
        self.q, self.k, self.v = (nn.Linear(32, width) for _ in range(3))
        self.o = nn.Linear(width, 32)
        self.bias = nn.Parameter(torch.randn(1, self.heads, self.tokens, self.tokens))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        b, t = x.shape[:2]

        def split(h: Tensor) -> Tensor:
            return h.view(b, t, self.heads, self.dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.explicit:
            scores = q @ k.transpose(-2, -1) / self.dim**0.5 + self.bias
            a = scores.float().softmax(-1).type_as(scores) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit"])
def test_attention_with_a_dense_per_head_bias_reads_it_at_the_kept_heads(explicit):
    """Heads were compacted while the bias kept all of them: the step failed with a shape
    mismatch whenever a head was dropped; then attention ran at full width (explicit scores:
    the bias's add was refused as a join with a full-width tensor, and q, k and v stayed
    dense). Now it runs on the kept heads and reads the bias at them (a dropped head's output
    is zero whatever its bias: its probabilities times a zero v), exactly what zeroing those
    weights gives."""
    torch.manual_seed(0)
    model = BiasedAttention(explicit)
    x = torch.randn(2, BiasedAttention.tokens, 32)
    sparse = _transformed_as_zeroed(model, x)
    assert [g.name for g in sparse.groups] == ["q"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    graph = sparse.runtime.graphs[0].compact.graph
    reads = [n for n in graph.nodes if n.target is torch.ops.aten.index_select.default]
    (bias,) = [n for n in reads if n.args[0].name == "p_bias"]
    reader = (
        torch.ops.aten.add.Tensor
        if explicit
        else torch.ops.aten.scaled_dot_product_attention.default
    )
    assert [u.target for u in bias.users] == [reader]
    sparse(x).sum().backward()
    (bias,) = [p for name, p in sparse.named_parameters() if name.endswith("bias") and p.ndim == 4]
    dropped = ~sparsefx.masks(sparse)["q"]
    assert bias.grad[:, dropped].abs().sum() == 0 < bias.grad.abs().sum()


class UnprunedValues(BiasedAttention):
    """Explicit scores plus a per-head bias, whose probabilities weigh the input's own heads:
    no v zeros a dropped head's probabilities."""

    def __init__(self):
        super().__init__(explicit=True)
        self.q, self.k = (nn.Linear(32, 32) for _ in range(2))

    def forward(self, x):
        b, t = x.shape[:2]
        q, k, v = (
            h.view(b, t, self.heads, self.dim).transpose(1, 2) for h in (self.q(x), self.k(x), x)
        )
        scores = q @ k.transpose(-2, -1) + self.bias
        a = scores.softmax(-1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_a_bias_added_to_scores_that_no_v_zeros_reads_the_scores_at_full_width():
    """A dropped head's probabilities are softmax(bias), not zero, and they weigh a v that
    nothing pruned: the scores are scattered before the bias's add, which reads it whole."""
    torch.manual_seed(0)
    model = UnprunedValues()
    x = torch.randn(2, UnprunedValues.tokens, 32)
    sparse = _transformed_as_zeroed(model, x)
    assert [g.name for g in sparse.groups] == ["q"]
    assert [s.op for s in sparse.analysis.scatters] == ["add.Tensor"], sparse.analysis.scatters
    graph = sparse.runtime.graphs[0].compact.graph
    assert not any(
        n.args[0].name == "p_bias"
        for n in graph.nodes
        if n.target is torch.ops.aten.index_select.default
    )


class TableBiasedAttention(nn.Module):
    """A relative-position bias read from a table (T5's, Swin's) by a pruned attention and
    by an attention over the input's own heads, which nothing prunes."""

    heads, dim, tokens = 4, 4, 5

    def __init__(self):
        super().__init__()
        width = self.heads * self.dim
        self.table = nn.Embedding(6, self.heads)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.o = nn.Linear(width, width)
        self.head = nn.Linear(width, 3)
        position = torch.arange(self.tokens)
        self.register_buffer("buckets", (position[None] - position[:, None]).clamp(-2, 3) + 2)

    def forward(self, x):
        b, t = x.shape[:2]

        def split(h: Tensor) -> Tensor:
            return h.view(b, t, self.heads, self.dim).transpose(1, 2)

        def merge(h: Tensor) -> Tensor:
            return h.transpose(1, 2).reshape(b, t, -1)

        bias = self.table(self.buckets).permute(2, 0, 1)[None]
        pruned = F.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=bias
        )
        raw = split(x)
        dense = F.scaled_dot_product_attention(raw, raw, raw, attn_mask=bias)
        return self.head(x + self.o(merge(pruned)) + merge(dense))


def test_a_table_bias_that_an_unpruned_attention_also_reads_stays_dense():
    """Pruned with the first attention's heads, the table's dropped columns were zero in the
    other attention's bias too (exact against masking the table's output, but a structure
    nobody asked for). The table stays dense, and the pruned attention reads its kept heads."""
    torch.manual_seed(0)
    model = TableBiasedAttention()
    x = torch.randn(2, TableBiasedAttention.tokens, 16)
    sparse = _transformed_as_zeroed(model, x)
    (group,) = sparse.groups
    assert group.name == "q" and not any(name == "table.weight" for name, _ in group.members)
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "several attentions read" in reasons["embedding"], reasons


class TablePlusParameterBias(TableBiasedAttention):
    """The table's bias where a padding mask holds, plus a learned bias of every head, then
    one attention: the sum reads the table's heads at full width, so nothing prunes them
    with q's."""

    def __init__(self):
        super().__init__()
        self.extra = nn.Parameter(torch.randn(1, self.heads, 1, self.tokens))
        self.register_buffer("keep", torch.arange(self.tokens) > 0)

    def forward(self, x):
        b, t = x.shape[:2]
        q, k, v = (
            p(x).view(b, t, self.heads, self.dim).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        bias = torch.where(self.keep, self.table(self.buckets).permute(2, 0, 1)[None], -1e4)
        bias = bias + self.extra
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_a_table_that_no_layer_reads_compactly_is_not_a_group():
    """The table became a group of its own: its kept columns saved no compute, cost budget,
    and zeroed bias heads that the attention's own mask did not drop. A component with no
    linear or convolution among its members now stays dense."""
    torch.manual_seed(0)
    model = TablePlusParameterBias()
    x = torch.randn(2, TablePlusParameterBias.tokens, 16)
    sparse = _transformed_as_zeroed(model, x)
    assert [g.name for g in sparse.groups] == ["q"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "no linear or convolution reads its channels" in reasons["embedding"], reasons


class SharedTableBias(nn.Module):
    """Two attention layers that read one relative-position bias, where a padding mask holds
    (T5's, computed once for every layer): the first as SDPA's mask, the second added to
    explicit scores (T5's eager form)."""

    heads, dim, tokens = 4, 4, 5

    def __init__(self):
        super().__init__()
        width = self.heads * self.dim
        self.table = nn.Embedding(6, self.heads)
        self.layers = nn.ModuleList(
            nn.ModuleDict({p: nn.Linear(width, width) for p in "qkvo"}) for _ in range(2)
        )
        self.head = nn.Linear(width, 3)
        position = torch.arange(self.tokens)
        self.register_buffer("buckets", (position[None] - position[:, None]).clamp(-2, 3) + 2)
        self.register_buffer("keep", position > 0)

    def forward(self, x):
        b, t = x.shape[:2]
        bias = torch.where(self.keep, self.table(self.buckets).permute(2, 0, 1)[None], -1e4)
        for explicit, layer in enumerate(self.layers):
            q, k, v = (layer[p](x).view(b, t, self.heads, self.dim).transpose(1, 2) for p in "qkv")
            if explicit:
                a = (q @ k.transpose(-2, -1) + bias).softmax(-1) @ v
            else:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + layer["o"](a.transpose(1, 2).reshape(b, t, -1))
        return self.head(x)


def test_a_shared_table_bias_compiles_to_what_transform_computes():
    """Each layer prunes its own heads and reads the shared bias at them, compiled as in
    `transform` (tests/test_hf_models.py checks T5 itself against the reference)."""
    torch.manual_seed(0)
    eager = _compiled_matches_transform(
        SharedTableBias(), torch.randn(2, SharedTableBias.tokens, 16)
    )
    assert [g.name for g in eager.groups] == ["layers.0.q", "layers.1.q"]
    assert not eager.analysis.scatters, eager.analysis.scatters


def _compiled_matches_transform(model: nn.Module, x: Tensor) -> nn.Module:
    """`model` compiled with the sparsefx backend computes what `transform` does under the
    same random masks, every gradient included; returns the transformed one."""
    twin = copy.deepcopy(model)
    options = {"density": 0.5, "seed": 0}
    eager = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**options))
    compiled = torch.compile(twin, backend="sparsefx", options=options)
    compiled(x)  # compiles, so the runtime exists for set_masks
    masks = _random_masks(eager.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(eager, masks)
    sparsefx.set_masks(compiled, masks)
    out, expected = compiled(x), eager(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    out.square().mean().backward()
    expected.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name, atol=1e-5, rtol=1e-4)
    return eager


class RotaryAttention(BiasedAttention):
    """Rotary position embedding on q and k, with Llama's rotate_half: cat(-x2, x1)."""

    def forward(self, x):
        b, t = x.shape[:2]
        angle = torch.arange(t, dtype=x.dtype)[:, None] * torch.arange(self.dim, dtype=x.dtype)
        cos, sin = angle.cos(), angle.sin()

        def split(h: Tensor) -> Tensor:
            return h.view(b, t, self.heads, self.dim).transpose(1, 2)

        v = self.v(x)
        q, k = (split(h) * cos + self.rotated(split(h)) * sin for h in (self.q(x), self.k(x)))
        a = F.scaled_dot_product_attention(q, k, split(v))
        return self.head(x + self.o(self.merged(a, v)))

    @staticmethod
    def rotated(h: Tensor) -> Tensor:
        half = h.shape[-1] // 2
        return torch.cat([-h[..., half:], h[..., :half]], dim=-1)

    @staticmethod
    def merged(a: Tensor, v: Tensor) -> Tensor:
        return a.transpose(1, 2).flatten(2)


class InterleavedRotaryAttention(RotaryAttention):
    """RoFormer's rotary embedding: rotates pairs of adjacent features, ``stack((-x[1::2],
    x[::2]), -1).reshape_as(x)``, and joins the heads back with ``view_as``."""

    @staticmethod
    def rotated(h: Tensor) -> Tensor:
        return torch.stack([-h[..., 1::2], h[..., ::2]], dim=-1).reshape_as(h)

    @staticmethod
    def merged(a: Tensor, v: Tensor) -> Tensor:
        return a.transpose(1, 2).contiguous().view_as(v)


class EinsumAttention(BiasedAttention):
    """Attention written as einsum: torchvision MaxViT's (spaces between letters), then
    Funnel's (heads at dim 2 of q and k, dim 1 of the scores), probabilities times v."""

    def forward(self, x):
        b, t = x.shape[:2]

        def split(h: Tensor) -> Tensor:
            return h.view(b, t, self.heads, self.dim)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.einsum("bind,bjnd->bnij", q, k) / self.dim**0.5
        a = torch.einsum("B H I J, B J H D -> B I H D", scores.softmax(-1), v)
        return self.head(x + self.o(a.reshape(b, t, -1)))


class SpatialPadding(nn.Module):
    """TF-style explicit spatial padding before a depthwise and a pointwise convolution
    (Hugging Face MobileNetV2's default ``tf_padding``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.depthwise = nn.Conv2d(8, 8, 3, groups=8)
        self.pointwise = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.pad(F.relu(self.stem(x)), (1, 1, 1, 1))
        h = F.relu(self.depthwise(nn.functional.pad(h, (0, 1, 0, 1), mode="replicate")))
        return self.head(F.relu(self.pointwise(h)).mean((2, 3)))


def test_spatial_padding_keeps_channels_compact_and_exact():
    """A pad of the spatial dims was 'not supported on compact tensors': every padded
    tensor was scattered to full width, and MobileNetV2's depthwise convolutions ran dense."""
    torch.manual_seed(0)
    model = SpatialPadding()
    x = torch.randn(2, 3, 9, 9)
    sparse = _transformed_as_zeroed(model, x)
    assert not [d for d in sparse.analysis.scatters if "pad" in d.op], sparse.analysis.scatters


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention (Llama, Mistral, Qwen2 with fewer kv heads): each key/value
    head serves `heads // kv` consecutive query heads, through ``repeat_kv`` (unsqueeze,
    expand, reshape) into sdpa or an explicit matmul/softmax, or sdpa's ``enable_gqa``."""

    heads, kv, dim, tokens = 8, 4, 4, 6

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q = nn.Linear(32, self.heads * self.dim)
        self.k, self.v = (nn.Linear(32, self.kv * self.dim) for _ in range(2))
        self.o = nn.Linear(self.heads * self.dim, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        b, t = x.shape[:2]
        q = self.q(x).view(b, t, self.heads, self.dim).transpose(1, 2)
        k, v = (p(x).view(b, t, self.kv, self.dim).transpose(1, 2) for p in (self.k, self.v))
        if self.form == "enable_gqa":
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            repeat = self.heads // self.kv
            k, v = (
                h[:, :, None].expand(b, self.kv, repeat, t, self.dim).reshape(b, -1, t, self.dim)
                for h in (k, v)
            )
            if self.form == "repeat_kv":
                a = F.scaled_dot_product_attention(q, k, v)
            else:
                a = (q @ k.transpose(2, 3) / self.dim**0.5).softmax(-1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("form", ["repeat_kv", "matmul", "enable_gqa"])
def test_grouped_query_attention_prunes_a_kv_head_with_its_query_heads(form):
    """q, k and v were separate groups and the attention read k and v at full width (the
    unsqueeze of repeat_kv was not understood; enable_gqa's and the matmul's head counts
    differ): a channel is now a kv head with its query heads, compact through attention.
    The reference zeroes q's rows of the kv head's query heads and k's and v's rows of it."""
    torch.manual_seed(0)
    model = GroupedQueryAttention(form).double()
    x = torch.randn(2, GroupedQueryAttention.tokens, 32, dtype=torch.float64, requires_grad=True)
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    (heads,) = sparse.groups
    assert heads.size == GroupedQueryAttention.kv
    names = {"q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias", "o.weight"}
    assert {name for name, _ in heads.members} == names
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    mask = torch.tensor([True, False, True, False])
    sparsefx.set_masks(sparse, {heads.name: mask})
    reference = copy.deepcopy(model)
    dim, repeat = GroupedQueryAttention.dim, GroupedQueryAttention.heads // GroupedQueryAttention.kv
    with torch.no_grad():
        for proj, rows in ((reference.q, dim * repeat), (reference.k, dim), (reference.v, dim)):
            dropped = (~mask).repeat_interleave(rows)
            proj.weight[dropped] = 0.0
            proj.bias[dropped] = 0.0
    out, expected = sparse(x), reference(x)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])


class EmptySlice(nn.Module):
    """Phi-3's partial rotary split ``x[..., :rotary_dim]``, ``x[..., rotary_dim:]`` where the
    rotary part is all of x: the second slice is empty."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        rotated, passed = h[..., :16], h[..., 16:]
        return self.head(F.relu(self.fc2(torch.cat([rotated.neg(), passed], dim=-1))))


def test_an_empty_slice_of_a_compact_tensor_is_read_at_full_width():
    """It crashed the analysis with an IndexError (Phi-3 with one key/value head)."""
    torch.manual_seed(0)
    _transformed_as_zeroed(EmptySlice(), torch.randn(4, 8))


class Stacks(nn.Module):
    """stack along a new dim after the channels (rotary halves interleaved along the last
    dim, from stride-2 slices of the tokens: two features per channel) and along one before
    them (summed away)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(32, 8)
        self.fc3, self.fc4, self.head = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = F.relu(self.fc2(torch.stack([-h[:, 1::2], h[:, ::2]], dim=-1).flatten(-2)))
        g = F.relu(self.fc3(h))
        return self.head(F.relu(self.fc4(torch.stack([g, 2 * g]).sum(0))))


def test_stack_keeps_the_channels_of_same_layout_inputs():
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(Stacks(), torch.randn(3, 4, 8))
    assert [g.name for g in sparse.groups] == ["fc1", "fc2", "fc3", "fc4"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class Squeezes(nn.Module):
    """squeeze of size-1 dims before and after the channels (a token dim, a pooled dim), and
    one that names the channel dim (read at full width)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: [B, 1, 8]
        h = F.relu(self.fc1(x)).squeeze(1)  # [B, 16]: channels from dim 2 to 1
        g = F.relu(self.fc2(h)).unsqueeze(-1).squeeze(-1)  # a trailing size-1 dim
        k = F.relu(self.fc3(g)).unsqueeze(1)  # [B, 1, 6]
        return self.head(k.squeeze(2).squeeze(1))  # names fc3's channel dim (6 wide)


def test_squeeze_shifts_the_channel_dim_and_refuses_to_name_it():
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(Squeezes(), torch.randn(4, 1, 8))
    assert [g.name for g in sparse.groups] == ["fc1", "fc2", "fc3"]
    assert [(s.node, s.reason) for s in sparse.analysis.scatters] == [
        ("squeeze_2", "squeeze that names the channel dim")
    ]


class SqueezeAll(nn.Module):
    """``squeeze()`` of a pooled conv output ([B, C, 1, 1] to [B, C]: a hand-written CNN
    head), and of a linear layer's output with a trailing size-1 dim."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1 = nn.Conv2d(3, 8, 3), nn.Linear(8, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).squeeze()
        return self.head(F.relu(self.fc1(h)).unsqueeze(-1).squeeze())


def test_squeeze_of_every_size_one_dim_keeps_the_channels_compact():
    """It was read at full width (a scatter of the conv's channels); compact, it removes
    the dims the dense graph had of size one, also where a fixed mask keeps one channel."""
    torch.manual_seed(0)
    model, x = SqueezeAll(), torch.randn(4, 3, 6, 6)
    sparse = _transformed_as_zeroed(model, x)
    assert [g.name for g in sparse.groups] == ["conv", "fc1"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    one = {g.name: torch.arange(g.size) == 2 for g in sparse.groups}  # one channel each
    sparsefx.set_masks(sparse, one)
    torch.testing.assert_close(sparse(x), _zeroed(model, sparse.groups, one)(x))


class HeadNormTypeAs(BiasedAttention):
    """A per-head RMSNorm of q and k computed in float32 and cast back with ``type_as``
    (Gemma 3's q/k norms)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(self.dim) + 0.5)

    def forward(self, x):
        b, t = x.shape[:2]

        def heads(h: Tensor) -> Tensor:
            return h.view(b, t, self.heads, self.dim).transpose(1, 2)

        def norm(h: Tensor) -> Tensor:
            wide = h.float()
            wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)
            return wide.type_as(h) * self.scale

        q, k = norm(heads(self.q(x))), norm(heads(self.k(x)))
        a = F.scaled_dot_product_attention(q, k, heads(self.v(x)))
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize(
    "model_cls",
    [RotaryAttention, InterleavedRotaryAttention, HeadNormTypeAs, EinsumAttention],
    ids=lambda c: c.__name__,
)
def test_heads_stay_compact_through_rotary_embeddings_head_norms_and_einsum(model_cls):
    """``neg`` was not known to preserve zeros: rotate_half's cat(-x2, x1) scattered q and
    k to full width and left q_proj and k_proj dense with a wrong reason (a residual
    stream). ``type_as`` (a per-head norm's cast back) was read as taking its second
    argument as a weight, ``reshape_as``/``view_as`` (RoFormer's interleaved rotation) as
    reading theirs whole (they read only its shape), and einsum as reading its operands
    whole (it is a batched matmul over the heads). In each, q, k, v and o now share one head
    group, in eager and compiled training."""
    torch.manual_seed(0)
    x = torch.randn(2, model_cls.tokens, 32)
    _compiled_matches_transform(model_cls(), x)
    sparse = _transformed_as_zeroed(model_cls(), x)
    (heads,) = [g for g in sparse.groups if g.size == model_cls.heads]
    assert {name for name, _ in heads.members} >= {"q.weight", "k.weight", "v.weight", "o.weight"}
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class PostNorm(nn.Module):
    """A block whose output is RMS-normalised before it joins the stream (Gemma 2/3's
    post-attention and post-MLP norms), the norm written out as Gemma writes it (pow, mean,
    rsqrt, times 1 + w) or as ``F.rms_norm``."""

    def __init__(self, decomposed: bool):
        super().__init__()
        self.decomposed = decomposed
        self.inner, self.out, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 4)
        self.scale = nn.Parameter(torch.rand(16))

    def forward(self, x):
        y = self.out(self.inner(x).relu())
        if self.decomposed:
            wide = y.float()
            wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + 1e-6)
            y = (wide * (1.0 + self.scale.float())).type_as(y)
        else:
            y = F.rms_norm(y, (16,), 1.0 + self.scale, eps=1e-6)
        return self.head(x + y)


@pytest.mark.parametrize("prune_streams", [False, True], ids=["streams-dense", "streams-pruned"])
@pytest.mark.parametrize("decomposed", [True, False], ids=["decomposed", "rms_norm"])
def test_a_norm_written_out_keeps_the_features_it_normalises_dense_like_rms_norm(
    decomposed, prune_streams
):
    """A mean over the channel dim that keeps it is a norm's statistic: the layer it reads
    stays dense, as under ``F.rms_norm``. It was read at full width: the layer before
    Gemma 2's post-norms became a group of its own (the stream's features, pruned with a
    scatter, so not faster) with ``prune_streams`` off."""
    torch.manual_seed(0)
    model, x = PostNorm(decomposed), torch.randn(3, 5, 16)
    config = sparsefx.SparseConfig(0.5, prune_streams=prune_streams)
    sparse = sparsefx.transform(copy.deepcopy(model), x, config=config)
    assert [g.name for g in sparse.groups] == ["inner"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "normalised across features" in reasons["linear_1"], reasons
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    torch.testing.assert_close(sparse(x), _zeroed(model, sparse.groups, masks)(x))


class LayerScale(nn.Module):
    """Learned per-channel factors (ConvNeXt's and CaiT's layer scale): one on a block's
    hidden channels (shaped [C, 1, 1]), one on what the block adds into its stream (shaped
    [C], unsqueezed twice as PoolFormer's), and one on a linear's features (shaped [C],
    channels last)."""

    def __init__(self):
        super().__init__()
        self.stem, self.expand = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.project, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 12)
        self.head = nn.Linear(12, 3)
        self.hidden = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.block = nn.Parameter(torch.rand(8) + 0.5)
        self.features = nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        scale = self.block.unsqueeze(-1).unsqueeze(-1)
        h = h + scale * self.project(F.relu(self.expand(h)) * self.hidden)
        return self.head(F.relu(self.fc(h.mean((2, 3)))) * self.features)


@pytest.mark.parametrize("prune_streams", [False, True], ids=["streams-dense", "streams-pruned"])
def test_layer_scales_are_gathered_with_the_channels_they_scale(prune_streams):
    """A per-channel parameter multiplied in was read at full width (a scatter before it),
    and a block writing into a dense stream through one became a group of its own (until
    2026-12-07 still so where the parameter was unsqueezed first: PoolFormer). It is now a
    member of its channels' group: gathered, compact, and the stream decides whether the
    block's last layer is pruned."""
    torch.manual_seed(0)
    model, x = LayerScale(), torch.randn(4, 3, 6, 6)
    twin = copy.deepcopy(model)
    config = sparsefx.SparseConfig(0.5, prune_streams=prune_streams)
    sparse = sparsefx.transform(twin, x, config=config)
    members = {g.name: set(g.members) for g in sparse.groups}
    assert ("hidden", 0) in members["expand"] and ("features", 0) in members["fc"]
    if prune_streams:
        assert {("block", 0), ("project.weight", 0), ("fc.weight", 1)} <= members["stem"]
    else:
        assert set(members) == {"expand", "fc"}
        reasons = {d.node: d.reason for d in sparse.analysis.dense}
        assert "residual stream" in reasons["conv2d_2"], reasons
    assert not sparse.analysis.scatters, sparse.analysis.scatters

    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    reference = _zeroed(model, sparse.groups, masks)
    out, expected = sparse(x), reference(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for name in ("hidden", "block", "features"):
        got, want = twin.get_parameter(name).grad, reference.get_parameter(name).grad
        torch.testing.assert_close(got, want, msg=name)

    # the compiled backend gathers them too, and export slices them to the kept channels
    compiled = torch.compile(copy.deepcopy(model), backend="sparsefx", options=config)
    compiled.eval()
    compiled(x)
    sparsefx.set_masks(compiled, masks)
    torch.testing.assert_close(compiled(x), expected)
    sparse.eval()
    exported = sparsefx.export(sparse, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    state = exported.state_dict
    kept = int(masks["expand"].sum())
    assert any(tuple(t.shape) == (kept, 1, 1) for t in state.values()), list(state)


class MatmulLayers(nn.Module):
    """Layers written as ``x @ W.T (+ b)`` (Falcon's `FalconLinear`), with ``.t()`` and
    with ``.T``."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16))
        self.w2 = nn.Parameter(torch.randn(12, 16))
        self.head = nn.Linear(12, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(x @ self.w1.t() + self.b1)
        return self.head(F.relu(h @ self.w2.T))


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_matmuls_by_a_transposed_parameter_are_pruned_as_linear_layers(mode):
    """They were matmuls the analysis does not prune, with no reason in the report (a
    Falcon trained dense); capture now writes them as `linear`, and the bias added after
    one is its member."""
    torch.manual_seed(0)
    model, x = MatmulLayers(), torch.randn(5, 8)
    twin = copy.deepcopy(model)
    if mode == "transform":
        sparse = sparsefx.transform(twin, x, density=0.5)
    else:
        sparse = torch.compile(twin, backend="sparsefx", options={"density": 0.5})
        sparse.eval()
        sparse(x)
    groups = {g.name: set(g.members) for g in sparsefx.groups(sparse)}
    assert groups == {
        "w1": {("w1", 0), ("b1", 0), ("w2", 1)},
        "w2": {("w2", 0), ("head.weight", 1)},
    }, groups
    masks = _random_masks(sparsefx.groups(sparse), torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    reference = _zeroed(model, sparsefx.groups(sparse), masks)
    torch.testing.assert_close(sparse(x), reference(x))
    # the bias stays an add (gathered), not linear's bias: under autocast the bfloat16
    # product plus a float32 bias is float32, as in eager
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(sparse(x), reference(x), atol=0, rtol=0)


class FusedHeads(nn.Module):
    """One projection computes q, k and v laid out per head (Falcon, BLOOM, GPT-NeoX):
    ``view(b, t, heads, 3, dim)``, then ``unbind`` or ``select`` of the 3."""

    heads, dim, tokens = 4, 8, 6

    def __init__(self, split: str):
        super().__init__()
        self.split = split
        self.qkv = nn.Linear(32, 3 * self.heads * self.dim)
        self.o, self.head = nn.Linear(self.heads * self.dim, 32), nn.Linear(32, 4)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        fused = self.qkv(x).view(b, t, self.heads, 3, self.dim)
        if self.split == "unbind":
            q, k, v = fused.unbind(3)
        else:
            q, k, v = (fused.select(3, i) for i in range(3))
        a = F.scaled_dot_product_attention(*(h.transpose(1, 2) for h in (q, k, v)))
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


class TimmAttention(FusedHeads):
    """timm's ViT attention: the fused projection is q, k and v one after the other, each
    laid out per head: ``reshape(b, t, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)``;
    or indexed ``fused[:, :, i]`` without the permute; or split into q, k and v first and
    each viewed per head. ``qk_norm``: a LayerNorm over each head's features of q and k."""

    def __init__(self, split: str, qk_norm: bool = False):
        super().__init__(split)
        norm = (lambda: nn.LayerNorm(self.dim)) if qk_norm else nn.Identity
        self.q_norm, self.k_norm = norm(), norm()

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape[:2]
        if self.split == "views":
            q, k, v = self.qkv(x).view(b, t, 3, -1).unbind(2)
            q, k, v = (h.view(b, t, self.heads, self.dim).transpose(1, 2) for h in (q, k, v))
        elif self.split == "index":
            fused = self.qkv(x).reshape(b, t, 3, self.heads, self.dim)
            q, k, v = (fused[:, :, i].transpose(1, 2) for i in range(3))
        else:
            fused = self.qkv(x).reshape(b, t, 3, self.heads, self.dim).permute(2, 0, 3, 1, 4)
            q, k, v = fused.unbind(0) if self.split == "unbind" else (fused[i] for i in range(3))
        a = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("split", ["unbind", "select"])
def test_a_fused_projection_split_per_head_keeps_its_heads_compact(split):
    """``unbind``/``select`` of a dim other than the channel dim were not understood, so a
    fused qkv split that way (Falcon) was scattered to full width before attention."""
    torch.manual_seed(0)
    model = FusedHeads(split)
    sparse = _transformed_as_zeroed(model, torch.randn(2, model.tokens, 32))
    (heads,) = sparse.groups
    assert heads.size == model.heads
    assert {name for name, _ in heads.members} == {"qkv.weight", "qkv.bias", "o.weight"}
    assert not sparse.analysis.scatters, sparse.analysis.scatters


@pytest.mark.parametrize(
    ("split", "qk_norm"),
    [("unbind", False), ("select", False), ("index", False), ("views", False), ("unbind", True)],
    ids=["unbind", "select", "index", "views", "qk-norm"],
)
def test_a_fused_projection_of_q_then_k_then_v_prunes_heads_across_all_three(split, qk_norm):
    """timm's layout made the "3" of q, k, v the outer dim, so its channels were q, k and v
    themselves (a group of three). The projection's output is now cut into q, k and v, which
    share one index set: a channel is a head, its rows dropped from each third of qkv. Split
    first and viewed per head, q's head grain did not reach k and v, coupled at feature grain
    (a crash); a LayerNorm over head_dim left qkv dense. A dropped head's normalised q is
    not zero, but its v is, so attention still gives it zero."""
    torch.manual_seed(0)
    model = TimmAttention(split, qk_norm).double()
    x = torch.randn(2, model.tokens, 32, dtype=torch.float64, requires_grad=True)
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    (heads,) = sparse.groups
    assert heads.size == model.heads
    assert {name for name, _ in heads.members} == {"qkv.weight", "qkv.bias", "o.weight"}
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    assert len(set(heads.mask_points)) == 1 and "#" not in heads.mask_points[0]  # one node
    mask = torch.tensor([False, True, True, False])
    sparsefx.set_masks(sparse, {heads.name: mask})
    reference = copy.deepcopy(model)
    with torch.no_grad():
        dropped = (~mask).repeat_interleave(model.dim).repeat(3)  # the heads of q, k and v
        reference.qkv.weight[dropped] = 0.0
        reference.qkv.bias[dropped] = 0.0
    out, expected = sparse(x), reference(x)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])
    if split == "unbind" and not qk_norm:  # one compile: a symbolic batch reaches the view
        compiled = torch.compile(copy.deepcopy(model), backend="sparsefx", options={"density": 0.5})
        compiled(x)
        sparsefx.set_masks(compiled, {g.name: mask for g in sparsefx.groups(compiled)})
        torch.testing.assert_close(compiled(x), expected)


class OneHeadTimmAttention(TimmAttention):
    heads, dim = 1, 16


def test_a_fused_projection_of_one_head_stays_dense():
    """With one head there is nothing to prune per head. Cut into q, k and v regrained to
    one head each, the three were single-channel groups that density 0.8 could not hold;
    then the fused projection was one group of three channels, q, k and v themselves, read
    through a scatter at their unbind, so a mask could drop all of k. An unbind or select
    of the channel dim reads each channel as a tensor of its own (a role, not one of a set
    of interchangeable channels), so it now keeps the projection dense."""
    torch.manual_seed(0)
    model = OneHeadTimmAttention("unbind")
    x = torch.randn(2, model.tokens, 32)
    with pytest.warns(UserWarning, match=r"nothing to prune .*unbind.int of the channel dim"):
        sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.8)
    assert not sparse.groups
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert (
        reasons["linear"]
        == "each channel read as a tensor of its own by unbind.int of the channel dim"
    )
    torch.testing.assert_close(sparse(x), model(x))


class ConcatUnflattened(nn.Module):
    """A flattened conv (4 channels of 4 features) and a linear (16 features) concatenated,
    then unflattened to [2, 16] and summed: feature j of one meets feature j of the other."""

    def __init__(self):
        super().__init__()
        self.conv, self.linear, self.head = (
            nn.Conv2d(3, 4, 3, padding=1),
            nn.Linear(5, 16),
            nn.Linear(16, 3),
        )

    def forward(self, image: Tensor, v: Tensor) -> Tensor:
        a, b = F.relu(self.conv(image)).flatten(1), F.relu(self.linear(v))
        return self.head(torch.cat([a, b], 1).unflatten(1, (2, 16)).sum(1))


def test_equal_pieces_of_different_blocks_coarsen_before_they_couple():
    """The unflatten couples its two pieces; they had equal features but not equal channel
    counts (4 of block 4, 16 of block 1), and the coupled group crashed at run time. The
    linear's features now group by four, so a channel is one conv channel and four of its
    features."""
    torch.manual_seed(0)
    model = ConcatUnflattened()
    inputs = (torch.randn(2, 3, 2, 2), torch.randn(2, 5))
    sparse = sparsefx.transform(copy.deepcopy(model), inputs, density=0.5)
    (group,) = sparse.groups
    assert group.size == 4
    masks = {group.name: torch.tensor([False, True, True, True])}
    sparsefx.set_masks(sparse, masks)
    torch.testing.assert_close(sparse(*inputs), _zeroed(model, sparse.groups, masks)(*inputs))


class SpatialAttention(nn.Module):
    """CBAM's spatial attention (timm's `SpatialAttn`): the channels' mean and max, kept as
    a dim, are features of a conv whose sigmoid gates every channel."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(2, 1, 7, padding=3)
        self.head, self.fc = nn.Conv2d(8, 8, 3), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x))
        stats = torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], 1)
        h = h * torch.sigmoid(self.gate(stats))
        return self.fc(F.relu(self.head(h)).mean((2, 3)))


def test_channel_statistics_that_feed_a_layer_are_read_not_taken_for_a_norm():
    """A reduction over the channel dim that keeps it blocks its spaces only when it comes
    back onto them within a few ops (a norm); here a conv reads it first, so `conv` stays
    prunable (through a scatter into the statistics). The gate's one output channel is no
    group (`policy.keep_minimum` would always keep it): it gates `conv` from a dense tensor."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(SpatialAttention(), torch.randn(2, 3, 8, 8))
    assert {g.name for g in sparse.groups} == {"conv", "head"}
    assert not [d for d in sparse.analysis.dense if "norm" in d.reason], sparse.analysis.dense


class WholeTensorStatistic(nn.Module):
    """``h * h.mean(dim=[], keepdim=True)``: an empty dim list reduces every dim."""

    def __init__(self, keepdim: bool):
        super().__init__()
        self.keepdim = keepdim
        self.a, self.b, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        return self.head(F.relu(self.b(h * torch.mean(h, dim=[], keepdim=self.keepdim))))


@pytest.mark.parametrize("keepdim", [True, False])
def test_a_reduction_over_an_empty_dim_list_reduces_every_dim(keepdim):
    """It was read as a reduction over no dim: channel-wise, so the compact tensor's mean
    (kept channels only) replaced the whole tensor's, a wrong result; without keepdim the
    scatter's shape failed at the first call. Now the statistic reads a scatter, or, kept
    as a dim and applied back to its features, blocks them like a norm."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(WholeTensorStatistic(keepdim), torch.randn(3, 8))
    assert ("a" in {g.name for g in sparse.groups}) is not keepdim


def test_a_bias_shared_by_two_layers_keeps_them_dense_and_says_so():
    """The reason read as if the layer wrote into a residual stream from the input."""

    class SharedBias(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(16, 8))
            self.b, self.head = nn.Parameter(torch.randn(16)), nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(F.relu(x @ self.w1.T + self.b) + F.relu(x @ self.w2.T + self.b))

    with pytest.warns(UserWarning, match="found nothing to prune"):
        sparse = sparsefx.transform(SharedBias(), torch.randn(4, 8), density=0.5)
    reasons = [d.reason for d in sparse.analysis.dense if not d.reason.startswith("output")]
    assert len(reasons) == 2 and all("joins it with parameter b," in r for r in reasons), reasons


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoderLayer``: ``nn.MultiheadAttention`` views q, k and v as
    ``[T, B * heads, head_dim]`` before splitting batch and heads again."""

    heads, dim, tokens = 4, 8, 6

    def __init__(self, batch_first: bool):
        super().__init__()
        width = self.heads * self.dim
        self.layer = nn.TransformerEncoderLayer(width, self.heads, 48, 0.0, batch_first=batch_first)
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
def test_torch_multihead_attention_prunes_heads_compact_through_attention(batch_first):
    """The merge of batch and heads was not a flatten, so the fused in-projection's q, k and
    v were pruned per feature and scattered to full width before attention. Capture now
    computes that view as an unflatten and a permute: a channel is a head of q, k and v,
    with the out-projection's columns, and attention runs on the kept heads."""
    torch.manual_seed(0)
    model = TorchEncoder(batch_first).double()
    x = torch.randn(2, model.tokens, 32, dtype=torch.float64, requires_grad=True)
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    heads = next(g for g in sparse.groups if g.name.endswith("in_proj_weight"))
    assert heads.size == model.heads
    assert {name for name, _ in heads.members} == {
        "layer.self_attn.in_proj_weight", "layer.self_attn.in_proj_bias",
        "layer.self_attn.out_proj.weight",
    }  # fmt: skip
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(4))
    masks[heads.name] = torch.tensor([True, False, False, True])
    sparsefx.set_masks(sparse, masks)
    reference = _zeroed(
        model, sparse.groups, {**masks, heads.name: torch.ones(4, dtype=torch.bool)}
    )
    with torch.no_grad():
        dropped = (~masks[heads.name]).repeat_interleave(model.dim).repeat(3)
        reference.layer.self_attn.in_proj_weight[dropped] = 0.0
        reference.layer.self_attn.in_proj_bias[dropped] = 0.0
    out, expected = sparse(x), reference(x)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])
    one = x[:1].detach()  # captured again at a batch of one: the same heads (it once was not)
    torch.testing.assert_close(sparse(one), reference(one))
    if batch_first:  # one compile: a new batch size and sequence length make both symbolic
        compiled = torch.compile(copy.deepcopy(model), backend="sparsefx", options={"density": 0.5})
        compiled(x)
        sparsefx.set_masks(compiled, masks)
        wider = torch.randn(3, 5, 32, dtype=torch.float64)
        torch.testing.assert_close(compiled(wider), reference(wider))
        assert sparsefx.groups(compiled) == sparse.groups


class PerChannelRows(nn.Module):
    """A linear's channels through a softsign (divided by a compact 1 + |h|), rows read by
    an index tensor (``h[rows]``), and F.normalize over the rows (a norm over another dim
    than the channels, clamped, expanded and divided by), then a consumer."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("rows", torch.tensor([2, 0, 1, 1, 3]))

    def forward(self, x):
        h = self.fc1(x)
        h = h / (1 + h.abs())
        return self.fc2(F.normalize(h[self.rows], dim=0))


def test_division_row_index_and_a_norm_over_other_dims_are_channel_wise():
    """Each of these scattered (a division by a compact tensor, ``index``,
    ``linalg_vector_norm`` and ``expand_as`` were not understood); now the channels stay
    compact through them, exactly as zeroing the dropped weights gives."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(PerChannelRows(), torch.randn(4, 6))
    assert [g.name for g in sparse.groups] == ["fc1"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class OtherDimOps(nn.Module):
    """F.normalize over the channel dim, and an index tensor that reads channels."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)
        self.register_buffer("cols", torch.tensor([7, 0, 1, 1, 3, 2, 4, 5]))

    def forward(self, x):
        a = F.normalize(self.fc1(x), dim=-1)
        b = F.relu(self.fc2(x))[:, self.cols]
        return self.fc3(a + b)


def test_a_norm_over_channels_keeps_them_dense_and_an_index_of_channels_scatters():
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(OtherDimOps(), torch.randn(4, 6))
    assert [g.name for g in sparse.groups] == ["fc2"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "decomposed norm: linalg_vector_norm" in reasons["linear"], reasons
    (scatter,) = sparse.analysis.scatters
    assert scatter.op == "index.Tensor" and "index along the channel dim" in scatter.reason


class DivisionByZeros(nn.Module):
    """A linear's output divided by a function of itself that is zero where it is."""

    def __init__(self, denominator):
        super().__init__()
        self.denominator = denominator
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h / self.denominator(h))


@pytest.mark.parametrize(
    "denominator",
    [
        F.relu,
        lambda h: h.abs().clamp_min(0.0),
        lambda h: h.exp() - 1,
        lambda h: torch.add(h.abs(), 1, alpha=-1) + 1,  # 1 + (|h| - 1)
    ],
    ids=["relu", "clamp_min(0)", "exp-1", "alpha"],
)
def test_division_by_a_tensor_that_may_be_zero_in_dropped_channels_is_read_at_full_width(
    denominator,
):
    """0 / 0 is NaN in the reference, which the compact division would not compute: it is
    compact only where the denominator is positive by construction (review: a flag that
    said "dropped channels may hold values" was read as "hold no zeros")."""
    torch.manual_seed(0)
    model = DivisionByZeros(denominator)
    x = torch.randn(4, 6)
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    assert "div.Tensor" in [s.op for s in sparse.analysis.scatters]
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    expected = _zeroed(model, sparse.groups, masks)(x)
    assert expected.isnan().all()  # the dropped channels' 0 / 0 reaches every output
    torch.testing.assert_close(sparse(x), expected, equal_nan=True)


def _rotate_half(h: Tensor) -> Tensor:
    h1, h2 = h.chunk(2, -1)
    return torch.cat((-h2, h1), -1)


class ExplicitScores(nn.Module):
    """Explicit attention (4 heads of 8) whose scores ``q @ k.T`` a `variant` changes before
    the softmax: rotary q and k over as many tokens as a head has features, plus a table
    bias (``rope``); two tables added in turn (``tables``); DeBERTa's position terms
    ``q @ pk.T`` and ``k @ pq.T`` (``deberta``); ``s + s`` (``self``); a dense bias and
    a temperature from a statistic of all the scores (``global``)."""

    heads, dim, tokens = 4, 8, 8

    def __init__(self, variant: str):
        super().__init__()
        self.variant = variant
        width = self.heads * self.dim
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.pq, self.pk = nn.Linear(16, width), nn.Linear(16, width)
        self.tables = nn.ModuleList(nn.Embedding(11, self.heads) for _ in range(2))
        self.head = nn.Linear(width, 3)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer(
            "buckets", torch.randint(0, 11, (self.tokens,) * 2, generator=generator)
        )
        self.register_buffer("positions", torch.randn(self.tokens, 16, generator=generator))
        self.register_buffer("angles", torch.randn(self.tokens, self.dim, generator=generator))
        self.register_buffer(
            "bias", torch.randn(1, self.heads, self.tokens, self.tokens, generator=generator)
        )

    def forward(self, x):
        b, t = x.shape[:2]

        def split(h: Tensor) -> Tensor:
            return h.view(h.shape[0], t, self.heads, self.dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if self.variant == "rope":
            cos, sin = self.angles.cos(), self.angles.sin()
            q, k = (h * cos + _rotate_half(h) * sin for h in (q, k))
        s = q @ k.transpose(-2, -1)
        if self.variant in ("rope", "tables"):
            for table in self.tables[: 2 if self.variant == "tables" else 1]:
                s = s + table(self.buckets).permute(2, 0, 1)
        elif self.variant == "deberta":
            pq, pk = split(self.pq(self.positions)[None]), split(self.pk(self.positions)[None])
            s = s + q @ pk.transpose(-2, -1)
            s = s + k @ pq.transpose(-2, -1)
        elif self.variant == "self":
            s = s + s
        elif self.variant == "global":
            s = s + self.bias
            s = s * s.square().mean().rsqrt()
        a = s.softmax(-1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize(
    ("variant", "groups"),
    [
        ("rope", ["q"]),
        ("tables", ["q"]),
        ("deberta", ["q"]),
        ("self", ["q"]),
        ("global", ["q", "v"]),
    ],
)
def test_what_explicit_scores_pass_before_their_softmax(variant, groups):
    """Found in review of the score-bias rule: rotary q whose last dim matched the scores'
    (tokens = head features) counted as scores, and the table's add then found q's heads
    read by "several attentions" and left them dense; so did a second term added to the
    scores (another table, DeBERTa's ``q @ pk.T``); ``s + s`` gathered the compact scores
    as if they were a dense bias, and crashed; a 0-d statistic of the scores crashed the
    analysis. Now the scores are what a matmul produced, a term that is itself such a product
    is no shared bias, and the global statistic reads the scores at full width."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(ExplicitScores(variant), torch.randn(3, 8, 32))
    assert [g.name for g in sparse.groups] == groups
    if variant != "global":
        assert not sparse.analysis.scatters, sparse.analysis.scatters


class SpatialSoftmax(nn.Module):
    """A conv residual stream, then a softmax over the last (spatial) dim: no attention."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.pool, self.fc = nn.Conv2d(8, 4, 1), nn.Linear(4 * 6, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(h + self.c2(F.relu(self.c1(h))))
        return self.fc(self.pool(h).softmax(-1).sum(-1).flatten(1))


def test_a_residual_stream_that_reaches_a_softmax_is_still_a_stream():
    """A stream whose channel dim is not last and that reaches a softmax over its last dim
    within a few ops was taken for attention scores: pruned though streams are dense by
    default. Scores are a matmul's output."""
    sparse = sparsefx.transform(SpatialSoftmax(), torch.randn(2, 3, 6, 6), density=0.5)
    assert [g.name for g in sparse.groups] == ["c1", "pool"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "writes into a residual stream" in reasons["conv2d"], reasons


class FeatureSoftmax(nn.Module):
    """``mid``'s features go through a softmax or log-softmax over them (a router's, an
    attention pool's); a conv's channels through a log-softmax over its width, pooled."""

    def __init__(self, norm: str):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 3)
        self.pool = nn.Sequential(nn.LogSoftmax(-1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.norm = getattr(torch, norm)

    def forward(self, x, image):
        routed = self.down(self.norm(self.mid(F.relu(self.up(x))), -1))
        return routed + self.fc(self.pool(self.conv(image)))


@pytest.mark.parametrize("norm", ["softmax", "log_softmax"])
def test_a_softmax_over_the_features_keeps_what_it_reads_dense(norm):
    """A softmax over the channel dim normalises across the channels as a LayerNorm does:
    a dropped channel's exp(0) stays in every kept channel's denominator. It read its
    producer through a scatter, a group that saved only the producer's rows (a router's,
    while changing its routing); the producer now stays dense with that reason, as before
    a LayerNorm. A log-softmax over another dim was refused and scattered; it is
    channel-wise now, as softmax there is (not zero-preserving: the conv's mask point is
    after it, where the reference zeroes the pooled channels)."""
    torch.manual_seed(0)
    model, x, image = FeatureSoftmax(norm), torch.randn(4, 6), torch.randn(4, 3, 2, 5)
    sparse = sparsefx.transform(copy.deepcopy(model), (x, image), density=0.5)
    assert sorted(g.name for g in sparse.groups) == ["conv", "up"]
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert reasons["linear_1"] == f"normalised across features by {norm}.int ({norm})"
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    reference = _zeroed(model, sparse.groups, masks)
    reference.pool.register_forward_hook(lambda m, a, out: out * masks["conv"])
    torch.testing.assert_close(sparse(x, image), reference(x, image))


class MaskedRows(nn.Module):
    """Bool masks as indices: over (tokens, channels), which reads channels, and over
    (height, width) after an index of the batch dim, not adjacent to it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(1, 3)
        self.conv, self.fc3 = nn.Conv2d(3, 8, 1), nn.Linear(8, 3)
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("tokens", torch.rand(5, 8, generator=generator) > 0.4)
        self.register_buffer("pixels", torch.rand(5, 4, generator=generator) > 0.4)
        self.register_buffer("first", torch.tensor([1]))

    def forward(self, x, image):
        a = self.fc2(F.relu(self.fc1(x))[:, self.tokens].sum(-1, keepdim=True))
        return a + self.fc3(F.relu(self.conv(image))[self.first, :, self.pixels].sum(0))


def test_a_bool_mask_index_counts_the_dims_it_indexes():
    """A bool mask of k dims indexes k dims: one over the channel dim went unnoticed, and a
    non-adjacent one moved the channel dim to the wrong place; both crashed at the first
    step. Now the first scatters and the second stays compact."""
    torch.manual_seed(0)
    x, image = torch.randn(3, 5, 6), torch.randn(3, 3, 5, 4)
    sparse = sparsefx.transform(copy.deepcopy(model := MaskedRows()), (x, image), density=0.5)
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    torch.testing.assert_close(sparse(x, image), _zeroed(model, sparse.groups, masks)(x, image))
    assert [s.reason for s in sparse.analysis.scatters] == ["index along the channel dim"]


class BoolRowsIntoLayers(nn.Module):
    """Rows a bool mask selects (a data-dependent count) read by further layers."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        keep = torch.rand(5, generator=torch.Generator().manual_seed(0)) > 0.4
        self.register_buffer("keep", keep)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x))[:, self.keep])))


@pytest.mark.parametrize("budget", ["channels", "flops"])
def test_layers_after_a_bool_mask_index_are_costed_by_the_masks_bound(budget):
    """The cost model read the example size of every dim, and a data-dependent one has
    none: transform failed with a TypeError. Its upper bound stands in for it."""
    torch.manual_seed(0)
    model, x = BoolRowsIntoLayers(), torch.randn(3, 5, 6)
    config = sparsefx.SparseConfig(density=0.5, budget=budget)
    sparse = sparsefx.transform(copy.deepcopy(model), x, config=config)
    assert [g.name for g in sparse.groups] == ["fc1", "fc2"]
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    torch.testing.assert_close(sparse(x), _zeroed(model, sparse.groups, masks)(x))


class _TwoLinears(nn.Module):
    """fc1 (6 -> 8) and fc2 (8 -> 3), for a forward to put channel-wise ops between."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)


class GatedChunk(_TwoLinears):
    """One layer's output chunked in two, one half through a sigmoid, concatenated again."""

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, -1)
        return self.fc2(torch.cat((a, b.sigmoid()), -1))


def test_each_part_of_a_split_continues_its_own_chain():
    """A split ended its producer's chain, so the sigmoid ran past the mask point, where
    sigmoid(0) = 1/2 in dropped channels: it read a scatter. Each part of a split of the
    channel dim is its own chain now, and the mask point is after the sigmoid (DESIGN §2:
    after the activation)."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(GatedChunk(), torch.randn(4, 6))
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    assert [(g.name, g.mask_points) for g in sparse.groups] == [
        ("fc1#0", ["getitem"]),
        ("fc1#1", ["sigmoid"]),
    ]
    assert all(("fc2.weight", 1) in g.members for g in sparse.groups)


class UnreadPart(nn.Module):
    """A three-way split of one layer's output whose third part nothing reads."""

    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(6, 12), nn.Linear(4, 3)

    def forward(self, x):
        p, q, _ = self.fc(x).split([4, 4, 4], -1)
        return self.out(p.sigmoid() * q)


def test_a_split_part_that_nothing_reads_ends_its_chain_at_the_split():
    """Its chain never ended, so its group named a mask point that is no node of the graph
    (review: the space's own name)."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(UnreadPart(), torch.randn(5, 6))
    nodes = {n.name for n in sparse.runtime.graphs[0].captured.gm.graph.nodes}
    assert [(g.name, g.mask_points) for g in sparse.groups] == [
        ("fc#0", ["sigmoid", "getitem_1"]),
        ("fc#1", ["split_with_sizes"]),
    ]
    assert {p for g in sparse.groups for p in g.mask_points} <= nodes


class MultiQueryAttention(nn.Module):
    """Four query heads of 8 features read one key and value head: broadcast over the
    heads (``broadcast``), by ``enable_gqa``, expanded to every head (``expand``,
    GPTBigCode's form), after rotary q (``rotary``: two branches of q that meet again), or
    with q also read by a layer (``leaky``: a third branch, which leaves q's chain)."""

    heads, dim = 4, 8

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q, self.o = nn.Linear(32, self.heads * self.dim), nn.Linear(self.heads * self.dim, 32)
        self.k, self.v = nn.Linear(32, self.dim), nn.Linear(32, self.dim)
        self.head, self.side = nn.Linear(32, 4), nn.Linear(self.heads * self.dim, 32)

    def forward(self, x):
        b, t = x.shape[:2]
        q = self.q(x).view(b, t, self.heads, self.dim).transpose(1, 2)
        if self.form == "leaky":
            x = x + self.side(q.transpose(1, 2).reshape(b, t, -1))
        k, v = (p(x).view(b, t, 1, self.dim).transpose(1, 2) for p in (self.k, self.v))
        if self.form == "expand":
            k, v = k.expand(-1, self.heads, -1, -1), v.expand(-1, self.heads, -1, -1)
        if self.form in ("rotary", "leaky"):
            angle = torch.arange(t, dtype=x.dtype)[:, None] / self.dim
            q = q * angle.cos() + _rotate_half(q) * angle.sin()
        gqa = self.form == "enable_gqa"
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


@pytest.mark.parametrize("form", ["broadcast", "enable_gqa", "expand", "rotary"])
def test_multi_query_attention_prunes_query_heads_with_the_output_columns(form):
    """A zero q head outputs the mean of v, so with the mask point at q, attention read q at
    full width and the output projection stayed dense. Each output head is a function of
    its own q head, so attention continues q's chain: the mask point is its output, the
    query heads' group prunes `o`'s columns, and k and v are read whole (at the kept heads
    where expanded to every head). k's and v's features are groups of their own, scattered
    for attention. Rotary q's two branches (``q * cos`` and ``rotate_half(q) * sin``) ended
    the chain where they forked; it now goes on to the add where they meet."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 32)
    sparse = _transformed_as_zeroed(MultiQueryAttention(form), x)
    groups = {g.name: g for g in sparse.groups}
    assert sorted(groups) == ["k", "q", "v"]
    assert ("o.weight", 1) in groups["q"].members
    assert groups["q"].mask_points == ["reshape"]
    reason = "attention reads k and v whole: only its query heads are pruned"
    assert [(s.op, s.reason) for s in sparse.analysis.scatters] == [
        ("scaled_dot_product_attention.default", reason)
    ] * 2
    graph = sparse.runtime.graphs[0].compact.graph
    reads = [n for n in graph.nodes if n.target is torch.ops.aten.index_select.default]
    gathered = [n for n in reads if n.args[1] == 1]  # k and v at q's kept heads
    assert len(gathered) == (2 if form == "expand" else 0)
    sparse(x).sum().backward()


@pytest.mark.parametrize("form", ["expand", "rotary"])
def test_multi_query_attention_compiles_to_what_transform_computes(form):
    torch.manual_seed(0)
    eager = _compiled_matches_transform(MultiQueryAttention(form), torch.randn(2, 6, 32))
    assert ("o.weight", 1) in next(g for g in eager.groups if g.name == "q").members


def test_a_chain_whose_branch_leaves_before_they_meet_ends_at_the_fork():
    """q is also read by a layer: the chain cannot run through every branch of q to where
    they meet, so the next walk ends it where q forks, and attention reads q at full width,
    saying why."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(MultiQueryAttention("leaky"), torch.randn(2, 6, 32))
    q = next(g for g in sparse.groups if g.name == "q")
    assert ("o.weight", 1) not in q.members and ("side.weight", 1) in q.members
    assert q.mask_points == ["transpose"]
    reasons = {s.reason for s in sparse.analysis.scatters}
    assert any("q's chain has ended" in r for r in reasons), reasons


class NormalisedQueryAttention(nn.Module):
    """Attention whose q is normalised across all heads by a written-out RMSNorm (OLMo 2's
    q norm; ``qk``: k too, by layer_norm; ``k``: k alone, written out), optionally with a
    dense per-head mask (``qk-mask``), with k and v read from a learned memory without a
    batch dim (``memory``), or with eight query heads that ``enable_gqa`` shares among four
    k and v heads (``gqa``); ``-explicit``: as matmul, softmax, matmul."""

    kv_heads, dim, tokens = 4, 8, 6

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        width = self.kv_heads * self.dim
        q_width = 2 * width if form == "gqa" else width
        self.q, self.o = nn.Linear(32, q_width), nn.Linear(q_width, 32)
        self.k, self.v = nn.Linear(32, width), nn.Linear(32, width)
        self.bias = nn.Parameter(torch.randn(1, self.kv_heads, self.tokens, self.tokens))
        self.memory = nn.Parameter(torch.randn(5, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        b, t = x.shape[:2]
        source = self.memory if self.form == "memory" else x
        q, k, v = self.q(x), self.k(source), self.v(source)
        if self.form == "k":
            k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6)
        else:
            q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        if self.form.startswith("qk"):
            k = F.layer_norm(k, k.shape[-1:])
        q, k, v = (h.unflatten(-1, (-1, self.dim)).transpose(-3, -2) for h in (q, k, v))
        mask = self.bias if self.form == "qk-mask" else None
        if self.form.endswith("explicit"):
            a = (q @ k.transpose(-1, -2) / self.dim**0.5).softmax(-1) @ v
        else:
            gqa = self.form == "gqa"
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


# form: (the group's name, its producers, the producer left dense on its own, gathers of
# a dense operand along the heads dim)
NORMALISED_FORMS = {
    "q": ("k", ["k", "v"], "q", 1),
    "k": ("q", ["q", "v"], "k", 1),
    "qk": ("v", ["v"], "q", 2),
    "qk-mask": ("v", ["v"], "q", 3),
    "memory": ("k", ["k", "v"], "q", 1),
    "q-explicit": ("k", ["k", "v"], "q", 1),
    "qk-explicit": ("v", ["v"], "q", 1),
}


@pytest.mark.parametrize("form", list(NORMALISED_FORMS))
def test_attention_with_a_normalised_q_is_pruned_by_v_heads(form):
    """A q normalised across all heads cannot be pruned by head, and attention tied v's
    heads (and k's) to it, so the whole attention stayed dense. q (and k where normalised
    too) is now left dense on its own, saying why, and attention is pruned by v's heads
    with `o`'s columns: output head h is a function of v's head h, zero where v's is. A
    dense q or k, or a per-head mask, is read at v's kept heads (in the explicit form: q
    at k's, or the probabilities at v's); one that is not normalised is pruned with v.
    (Gradients against the reference: the OLMo tests in test_hf_models.py.)"""
    torch.manual_seed(0)
    name, producers, left, gathers = NORMALISED_FORMS[form]
    x = torch.randn(2, NormalisedQueryAttention.tokens, 32)
    sparse = _transformed_as_zeroed(NormalisedQueryAttention(form), x)
    (group,) = sparse.groups
    assert group.name == name and ("o.weight", 1) in group.members
    rows = {
        fqn.removesuffix(".weight") for fqn, dim in group.members if fqn.endswith("t") and not dim
    }
    assert rows == set(producers)
    assert not sparse.analysis.scatters
    graph = sparse.runtime.graphs[0].compact.graph
    layers = {
        n.args[1].name: n.name for n in graph.nodes if n.target is torch.ops.aten.linear.default
    }
    reasons = {op.node: op.reason for op in sparse.analysis.dense}
    alone = [node for node, reason in reasons.items() if "left dense on its own" in reason]
    assert alone == [layers[f"p_{left}_weight"]]
    reads = [n for n in graph.nodes if n.target is torch.ops.aten.index_select.default]
    assert len([n for n in reads if n.args[1] == 1]) == gathers  # the heads dim
    sparse(x).sum().backward()


def test_attention_with_a_normalised_q_is_pruned_by_v_heads_when_compiled():
    torch.manual_seed(0)
    x = torch.randn(2, NormalisedQueryAttention.tokens, 32)
    eager = _compiled_matches_transform(NormalisedQueryAttention("qk-mask"), x)
    assert [g.name for g in eager.groups] == ["v"]


def test_attention_with_a_normalised_q_and_fewer_kv_heads_stays_dense():
    """With enable_gqa, q has more heads than v: one gather at v's kept heads cannot read
    it, so q is not left dense on its own (k and v would be pruned only to be read at full
    width): the whole attention stays dense with the norm's reason, as before."""
    torch.manual_seed(0)
    x = torch.randn(2, NormalisedQueryAttention.tokens, 32)
    sparse = sparsefx.transform(NormalisedQueryAttention("gqa"), x, density=0.5)
    assert not sparse.groups and not sparse.analysis.scatters
    reasons = {op.reason for op in sparse.analysis.dense if op.op == "linear.default"}
    assert all("left dense on its own" not in r for r in reasons)
    assert any(r.startswith("normalised across features by a decomposed norm") for r in reasons)


class SelfProduct(nn.Module):
    """A batched matmul of a compact tensor with itself (square feature maps)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c2(h @ h)


def test_a_matmul_of_a_compact_tensor_with_itself_is_channel_wise():
    """``h @ h`` has one compact input, read twice: it was taken for a compact operand times
    a dense one and the "dense" h gathered again, out of bounds. Each channel's product is
    its own, so it runs compact and c2 reads its kept columns."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(SelfProduct(), torch.randn(2, 3, 5, 5))
    (group,) = sparse.groups
    assert ("c2.weight", 1) in group.members and not sparse.analysis.scatters


class WrittenOutSwish(_TwoLinears):
    """``h * sigmoid(h)`` written out (two branches of h that meet again), then a sigmoid."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2((h * h.sigmoid()).sigmoid())


def test_a_chain_goes_through_branches_that_meet_again():
    """The chain ended where h forked, so the last sigmoid ran past the mask point (1/2 in
    dropped channels) and read a scatter. Every path from h meets again at the product, so
    the chain now goes on to the last sigmoid, the mask point (DESIGN §2: after the
    activation), and fc2 reads its kept columns."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(WrittenOutSwish(), torch.randn(4, 6))
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    (group,) = sparse.groups
    assert group.mask_points == ["sigmoid_1"]
    assert ("fc2.weight", 1) in group.members


class CastBack(_TwoLinears):
    """A layer's output cast to float for an activation and back with ``type_as`` of it
    (Gemma's norms): the second reader of h reads only its dtype."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h.float().sigmoid().type_as(h))


def test_a_value_read_only_for_its_dtype_is_not_a_branch_of_its_chain():
    """`type_as(h)` counted h as a compact input that stayed in its chain for good, so the
    cast looked non-zero where no scatter could fix it, and the step crashed (review). The
    dtype is not an input: the chain runs on to the cast, and fc2 reads its kept columns."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(CastBack(), torch.randn(5, 6))
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    assert [g.mask_points for g in sparse.groups] == [["type_as"]]
    sparse(torch.randn(5, 6)).sum().backward()


class OneHeadAttention(nn.Module):
    """Attention with one head (the first stage of CvT, PVT and SegFormer), as SDPA or as
    matmul, softmax, matmul (``explicit``); ``dense-k``: k is a slice of the input, which
    no group prunes; ``normalised-q``: q normalised across its features (a qk norm);
    ``shared-qk``: k is q (Reformer's shared-QK attention)."""

    tokens, width = 6, 16

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.q, self.k, self.v = (nn.Linear(32, self.width) for _ in range(3))
        self.o, self.head = nn.Linear(self.width, 32), nn.Linear(32, 4)

    def forward(self, x):
        b, t = x.shape[:2]
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.form == "dense-k":
            k = x[..., : self.width]
        if self.form == "normalised-q":
            q = F.layer_norm(q, q.shape[-1:])
        q, k, v = (h.view(b, t, 1, self.width).transpose(1, 2) for h in (q, k, v))
        if self.form == "shared-qk":
            k = q
        if self.form == "explicit":
            a = (q @ k.transpose(-2, -1) / self.width**0.5).softmax(-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


# form: the scores' group and the producers whose rows it prunes
ONE_HEAD_FORMS = {
    "sdpa": ("q", {"q", "k"}),
    "explicit": ("q", {"q", "k"}),
    "dense-k": ("q", {"q"}),
    "normalised-q": ("k", {"k"}),
    "shared-qk": ("q", {"q"}),
}


@pytest.mark.parametrize("form", list(ONE_HEAD_FORMS))
def test_one_head_attention_prunes_the_features_its_scores_sum_over(form):
    """With one head, q, k and v are compact along each head's features, and attention
    scattered all three to full width ("matmul over the channel dim", or "q is not compact
    along the heads dim" for SDPA): the projections were pruned, attention was not. The
    scores sum over q's and k's features, so q and k are now one group and attention runs
    on the kept features (a dense k, or a q normalised across them and left dense, is read
    at the other's kept features); each output feature is v's alone, so v is pruned with
    o's columns. SDPA is given the dense width's scale. Forward and gradients equal zeroing
    the dropped rows."""
    torch.manual_seed(0)
    model = OneHeadAttention(form).double()
    x = torch.randn(2, model.tokens, 32, dtype=torch.float64, requires_grad=True)
    sparse = sparsefx.transform(copy.deepcopy(model), x, density=0.5)
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    rows = {
        g.name: {
            fqn.removesuffix(".weight") for fqn, dim in g.members if fqn.endswith("t") and not dim
        }
        for g in sparse.groups
    }
    scores, producers = ONE_HEAD_FORMS[form]
    assert rows == {scores: producers, "v": {"v"}}
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    reference = _zeroed(model, sparse.groups, masks)
    out, expected = sparse(x), reference(x)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])
    graph = sparse.runtime.graphs[0].compact.graph
    if form != "explicit":
        (attention,) = graph.find_nodes(
            op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default
        )
        assert attention.kwargs["scale"] == model.width**-0.5
    reads = [n for n in graph.nodes if n.target is torch.ops.aten.index_select.default]
    gathered = [n for n in reads if n.args[1] == 3]  # the features dim of q or k
    assert len(gathered) == (form in ("dense-k", "normalised-q"))


def test_one_head_attention_compiles_to_what_transform_computes():
    torch.manual_seed(0)
    x = torch.randn(2, OneHeadAttention.tokens, 32)
    eager = _compiled_matches_transform(OneHeadAttention("sdpa"), x)
    assert [g.name for g in eager.groups] == ["q", "v"]


class GraphConvolution(nn.Module):
    """Two graph convolutions (Kipf & Welling): features mixed by a layer, then nodes by the
    adjacency matrix, ``adj @ h`` (``rows``: ``(h.T @ adj.T).T``, the features as rows)."""

    nodes = 5

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.layer1, self.layer2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: Tensor, adj: Tensor) -> Tensor:
        h = self.layer1(x)
        if self.form == "rows":
            h = (h.transpose(1, 2) @ adj.transpose(1, 2)).transpose(1, 2)
        else:
            h = adj @ h
        return self.layer2(torch.relu(h))


@pytest.mark.parametrize("form", ["columns", "rows"])
def test_a_matmul_keeps_the_channels_of_its_left_rows_or_right_columns(form):
    """A matmul with compact channels in a matrix dim was read at full width ("matmul over
    the channel dim"). Each output column of ``adj @ h`` is ``adj`` times h's column, so
    channels in the right operand's columns (or the left one's rows) stay compact, and the
    next layer reads its kept columns."""
    torch.manual_seed(0)
    model = GraphConvolution(form)
    x, adj = torch.randn(2, model.nodes, 8), torch.rand(2, model.nodes, model.nodes)
    sparse = sparsefx.transform(copy.deepcopy(model), (x, adj), density=0.5)
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    (group,) = sparse.groups
    assert ("layer2.weight", 1) in group.members
    masks = _random_masks(sparse.groups, torch.Generator().manual_seed(1))
    sparsefx.set_masks(sparse, masks)
    torch.testing.assert_close(sparse(x, adj), _zeroed(model, sparse.groups, masks)(x, adj))


class FocalModulation(nn.Module):
    """FocalNet's modulation: one projection computes q, a context and one gate per focal
    level (plus a global one), split along the channels; each level's context, gated by its
    one-channel gate, is summed from 0; the global context (a mean over pixels) is gated
    too; q times a 1x1 conv of the sum is the output."""

    dim, levels = 8, 2

    def __init__(self):
        super().__init__()
        d = self.dim
        self.projection_in = nn.Conv2d(3, 2 * d + self.levels + 1, 1)
        self.focal = nn.ModuleList(
            nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False) for _ in range(self.levels)
        )
        self.context, self.head = nn.Conv2d(d, d, 1), nn.Conv2d(d, 3, 1)

    def forward(self, x):
        q, ctx, gates = self.projection_in(x).split((self.dim, self.dim, self.levels + 1), 1)
        ctx_all = 0
        for level, focal in enumerate(self.focal):
            ctx = F.gelu(focal(ctx))
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_global = F.gelu(ctx.mean(2, keepdim=True).mean(3, keepdim=True))
        ctx_all = ctx_all + ctx_global * gates[:, self.levels :]
        return self.head(q * self.context(ctx_all))


def test_one_channel_parts_of_a_producer_are_dense_features_of_its_layout():
    """The gates were groups of one channel that the sampler always kept, and each gate's
    multiply (one channel broadcast over the context's) was refused as a join of tensors
    laid out differently, so the context and the gates were scattered at every level.
    A part of one channel is now left dense on its own, as features of the projection's
    layout that are always kept, while q and the context prune; a gate read from them is a
    dense tensor broadcast over the channels, the global context (one value per channel)
    broadcast over the pixels is channel-wise too, and a sum that starts from 0 keeps the
    dropped channels zero."""
    torch.manual_seed(0)
    model = FocalModulation()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    sparse = _transformed_as_zeroed(model, x)
    reference = _zeroed(model, sparse.groups, sparsefx.masks(sparse))
    (grad,) = torch.autograd.grad(sparse(x).square().sum(), x)
    torch.testing.assert_close(grad, torch.autograd.grad(reference(x).square().sum(), x)[0])
    assert [(g.name, g.size) for g in sparse.groups] == [
        ("projection_in#0", FocalModulation.dim), ("projection_in#1", FocalModulation.dim),
    ]  # fmt: skip
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    reasons = [d.reason.split(": policy")[0] for d in sparse.analysis.dense if d.node == "conv2d"]
    assert reasons == [f"features {i}..{i}: one channel" for i in (16, 17, 18)]  # the gates


class SeparableAttention(nn.Module):
    """MobileViTv2's separable self-attention: a 1x1 conv computes one query channel, k and
    v; the query's softmax over the patches weights k into a context vector, which
    ``expand_as(v)`` broadcasts to gate v; a 1x1 conv projects the result."""

    dim = 8

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Conv2d(3, 1 + 2 * self.dim, 1), nn.Conv2d(self.dim, 3, 1)

    def forward(self, x):
        query, key, value = self.qkv(x).split((1, self.dim, self.dim), 1)
        scores = query.softmax(-1)
        context = (key * scores).sum(-1, keepdim=True)
        return self.out(F.relu(value) * context.expand_as(value))


def test_a_context_expanded_as_values_it_gates_couples_them():
    """``expand_as`` took its second argument for a compact input, and refused k's context
    expanded as v (pruned by another group): both were scattered, and the query was a group
    of one channel. expand_as is now an expand to v's sizes, so k and v share one group
    through the gate, and the query is dense features of the projection."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5)
    sparse = _transformed_as_zeroed(SeparableAttention(), x)
    assert [(g.name, g.size) for g in sparse.groups] == [("qkv", SeparableAttention.dim)]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class Patches(nn.Module):
    """Feature maps unfolded into patches (``F.unfold``: each channel's patch is a block of
    features), scaled per patch position, and folded back (``F.fold``)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1)
        self.position = nn.Parameter(torch.randn(9))

    def forward(self, x):
        h = F.relu(self.conv1(x))
        patches = F.unfold(h, 2, stride=2)  # [B, 8 * 4, L]
        patches = patches * self.position.sigmoid()  # one weight per patch
        return self.conv2(F.fold(patches, h.shape[-2:], 2, stride=2))


def test_unfold_and_fold_keep_each_channels_patch_as_its_block():
    """im2col and col2im were not understood and read their input at full width. Channel
    c's patch is features ``c*k .. c*k+k-1`` of the unfolded dim, so both are channel-wise:
    the layout's blocks grow by the kernel's size, and shrink back."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    sparse = _transformed_as_zeroed(Patches(), x)
    assert [g.name for g in sparse.groups] == ["conv1"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class PerChannelGather(nn.Module):
    """``torch.gather`` along positions with an index expanded to every channel (DeBERTa's
    relative positions, gathered per head)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(3, 8, 1), nn.Conv1d(8, 3, 1)
        self.register_buffer("order", torch.tensor([[[3, 0, 4, 1, 2, 2]]]))

    def forward(self, x):
        h = F.relu(self.conv1(x))
        return self.conv2(torch.gather(h, -1, self.order.expand(h.shape[0], h.shape[1], -1)))


def test_a_gather_along_positions_reads_its_index_at_the_kept_channels():
    """gather was not understood and read its input at full width. Along another dim than
    the channels, each channel picks among its own values: the gather runs compact, with
    its index read at the kept channels."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(PerChannelGather(), torch.randn(2, 3, 5))
    assert [g.name for g in sparse.groups] == ["conv1"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    graph = sparse.runtime.graphs[0].compact.graph
    (gather,) = graph.find_nodes(op="call_function", target=torch.ops.aten.gather.default)
    assert gather.args[2].target is torch.ops.aten.index_select.default


class RelativeScores(nn.Module):
    """DeBERTa's disentangled attention: scores of q against relative-position keys and of
    k against relative-position queries (per head), each gathered along the positions into
    scores of tokens (``torch.gather`` with an index expanded to every head), added to
    ``q @ k.T``."""

    heads, dim, tokens = 4, 4, 5

    def __init__(self):
        super().__init__()
        width = self.heads * self.dim
        self.q, self.k, self.v, self.o = (nn.Linear(16, width) for _ in range(4))
        self.o = nn.Linear(width, 16)
        self.pos_k, self.pos_q = nn.Linear(16, width), nn.Linear(16, width)
        self.positions = nn.Parameter(torch.randn(1, 2 * self.tokens - 1, 16))
        t = torch.arange(self.tokens)
        self.register_buffer("relative", (t[:, None] - t[None, :] + self.tokens - 1)[None, None])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        b, t = x.shape[:2]

        def split(h: Tensor) -> Tensor:
            return h.view(h.shape[0], h.shape[1], self.heads, self.dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        pos_k, pos_q = split(self.pos_k(self.positions)), split(self.pos_q(self.positions))
        index = self.relative.expand(b, self.heads, t, t)
        c2p = torch.gather(q @ pos_k.transpose(-1, -2), -1, index)
        p2c = torch.gather(k @ pos_q.transpose(-1, -2), -1, index).transpose(-1, -2)
        scores = q @ k.transpose(-1, -2) + (c2p + p2c)
        a = scores.softmax(-1) @ v
        return self.head(x + self.o(a.transpose(1, 2).reshape(b, t, -1)))


def test_relative_position_scores_gathered_per_head_prune_with_the_heads():
    """Each gather read its scores at full width, so the relative-position projections were
    pruned by head only to be scattered; read compact, the sum of the two gathered scores
    was taken for a residual stream (a join not known to be scores), which left the whole
    attention dense. A product gathered along its last dim is still scores: q, k, v, both
    position projections and o's columns are one group of heads, with no scatter."""
    torch.manual_seed(0)
    model = RelativeScores()
    sparse = _transformed_as_zeroed(model, torch.randn(2, model.tokens, 16))
    (heads,) = sparse.groups
    assert heads.size == model.heads
    rows = {
        fqn.removesuffix(".weight") for fqn, dim in heads.members if fqn.endswith("t") and not dim
    }
    assert rows == {"q", "k", "v", "pos_k", "pos_q"}
    assert not sparse.analysis.scatters, sparse.analysis.scatters


def test_relative_position_scores_compile_to_what_transform_computes():
    torch.manual_seed(0)
    eager = _compiled_matches_transform(RelativeScores(), torch.randn(2, RelativeScores.tokens, 16))
    assert [g.name for g in eager.groups] == ["q"]


class AliasedOps(nn.Module):
    """Two layers gated by ``torch.multiply`` and negated by ``torch.negative`` (ConvBERT
    gates its convolution's key with ``torch.multiply``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.negative(torch.multiply(self.fc1(x), self.fc2(x))))


def test_aliases_of_element_wise_ops_are_read_as_the_ops_they_alias():
    """Export keeps ATen's aliases (``multiply``, ``negative``), which the analysis did not
    know: the gate read both layers at full width. Capture now writes them as the ops they
    alias, so the gate couples the two layers into one group."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(AliasedOps(), torch.randn(4, 6))
    assert [g.producers for g in sparse.groups] == [["linear", "linear_1"]]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class PooledByMax(nn.Module):
    """Max and min over positions written as reductions that also return indices (Hiera
    pools its query and its stage transition with ``view(...).max(dim=1).values``)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 1), nn.Conv1d(8, 3, 1)

    def forward(self, x):
        h = self.conv1(x)
        pooled = h.max(dim=-1).values + torch.min(h, dim=-1, keepdim=True).values.squeeze(-1)
        return self.conv2(pooled)


def test_max_and_min_over_positions_with_their_indices_are_channel_wise():
    """``max.dim`` and ``min.dim`` were not understood and read their input at full width.
    Over another dim than the channels they are reductions like ``amax``: their values
    (and indices) stay compact."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(PooledByMax(), torch.randn(2, 3, 4, 5))
    assert [g.name for g in sparse.groups] == ["conv1"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class WrittenOutErfGelu(_TwoLinears):
    """GELU written with erf, as ESM writes it: ``x * 0.5 * (1 + erf(x / sqrt(2)))``."""

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * 0.5 * (1.0 + torch.erf(h / math.sqrt(2.0))))


def test_erf_is_channel_wise():
    """erf was not among the element-wise ops the analysis knows, so ESM's GELU read its
    intermediate layer at full width; erf is channel-wise and zero at zero."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(WrittenOutErfGelu(), torch.randn(4, 6))
    assert [g.name for g in sparse.groups] == ["fc1"]
    assert not sparse.analysis.scatters, sparse.analysis.scatters


class SlicedGate(nn.Module):
    """A projection whose last feature is a gate, sliced off (``h[..., -1:]``) rather than
    split: the slice keeps only that one-channel part."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 9), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h[..., :-1] * torch.sigmoid(h[..., -1:]))


def test_a_slice_that_keeps_only_dense_features_reads_them_at_their_compact_offset():
    """The gate is a part of one channel, left dense: a slice keeping only it was refused
    ("keeps no pruned channel") and read the projection at full width. It is now a dense
    tensor, sliced at the compact offset after the kept channels before it."""
    torch.manual_seed(0)
    sparse = _transformed_as_zeroed(SlicedGate(), torch.randn(4, 6))
    assert [(g.name, g.size) for g in sparse.groups] == [("fc1", 8)]
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    graph = sparse.runtime.graphs[0].compact.graph
    slices = graph.find_nodes(op="call_function", target=torch.ops.aten.slice.Tensor)
    (gate,) = [n for n in slices if [u.target for u in n.users] == [torch.ops.aten.sigmoid.default]]
    assert isinstance(gate.args[2], torch.fx.Node)  # starts after the kept channels
