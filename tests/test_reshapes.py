"""Capture's reshape normalisation (`sparsefx.reshapes`): reshapes that split and merge at
once become unflatten, permute and flatten steps that compute the same values."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim
from torch.utils._sympy.functions import FloorDiv

import sparsefx
from sparsefx.analysis.sizes import whole_quotient
from sparsefx.reshapes import _refine, unmerged_reshapes

aten = torch.ops.aten


class Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _normalised(fn, x: torch.Tensor, dynamic: int | None = None) -> torch.fx.GraphModule:
    """`fn` exported on `x` (dim `dynamic` symbolic), normalised, checked against eager on
    `x` and on an input whose dynamic dim is larger."""
    shapes = ({dynamic: Dim("n", min=2)},) if dynamic is not None else None
    gm = torch.export.export(Lambda(fn), (x,), dynamic_shapes=shapes).module()
    gm = unmerged_reshapes(gm)
    torch.testing.assert_close(gm(x), fn(x), atol=0, rtol=0)
    if dynamic is not None:
        wider = torch.randn(*[s + 3 if d == dynamic else s for d, s in enumerate(x.shape)])
        torch.testing.assert_close(gm(wider), fn(wider), atol=0, rtol=0)
    return gm


def _targets(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_multihead_attentions_batch_and_heads_merge_becomes_a_permute():
    """nn.MultiheadAttention's ``q.view(T, B*H, D).transpose(0, 1).view(B, H, T, D)``, with
    the batch dynamic: the heads never share a dim with the batch."""
    t, b, h, d = 5, 2, 4, 3

    def heads(q):
        return q.view(t, q.shape[1] * h, d).transpose(0, 1).view(q.shape[1], h, t, d)

    gm = _normalised(heads, torch.randn(t, b, h * d), dynamic=1)
    assert _targets(gm) == [aten.unflatten.int, aten.permute.default]


def test_a_reshape_merging_two_pairs_of_dims_becomes_two_flattens():
    gm = _normalised(lambda a: a.permute(2, 0, 1, 3).reshape(-1, 12), torch.randn(2, 4, 5, 3), 0)
    assert _targets(gm) == [aten.permute.default] + [aten.flatten.using_ints] * 2


def test_reshapes_without_common_factors_or_with_one_change_are_left_alone():
    gm = _normalised(lambda a: a.reshape(4, 6) * 2, torch.randn(6, 4))  # 6 and 4: no common atom
    assert aten.flatten.using_ints not in _targets(gm)
    gm = _normalised(lambda a: a.view(2, 12), torch.randn(2, 3, 4))  # a flatten already
    assert _targets(gm) == [aten.view.default]


@given(atoms=st.lists(st.integers(1, 4), min_size=3, max_size=5), data=st.data())
def test_any_split_merge_permute_chain_computes_the_same_values(atoms, data):
    """Group random atoms into an input shape and a reshaped one, permute that, and reshape
    to a grouping of the permuted atoms: the normalised graph gives the eager values."""

    def grouping(sizes: list[int]) -> list[list[int]]:
        bounds = data.draw(st.sets(st.integers(1, len(sizes) - 1))) if len(sizes) > 1 else ()
        edges = [0, *sorted(bounds), len(sizes)]
        return [sizes[lo:hi] for lo, hi in itertools.pairwise(edges)]

    def shape(groups: list[list[int]]) -> list[int]:
        return [math.prod(group) for group in groups]

    first = grouping(atoms)
    order = data.draw(st.permutations(range(len(first))))
    last = grouping([a for dim in order for a in first[dim]])

    def chain(a):
        return a.reshape(shape(first)).permute(order).reshape(shape(last))

    _normalised(chain, torch.randn(*shape(grouping(atoms))))


def test_symbolic_sizes_factor_only_where_the_quotient_is_whole_for_every_value():
    s = sympy.Symbol("s0", positive=True, integer=True)
    half = FloorDiv(s, 2)
    atoms, of_input, of_view = _refine([sympy.Integer(6), s, sympy.Integer(32)], [6 * s, 4, 8])
    assert (
        atoms == [6, s, 4, 8] and of_input == [[0], [1], [2, 3]] and of_view == [[0, 1], [2], [3]]
    )
    assert _refine([s, sympy.Integer(8)], [sympy.Integer(4), 2 * s]) is None  # s / 4 is not whole
    assert _refine([half * 4], [half, sympy.Integer(4)]) is not None  # (4 * half) / half = 4
    assert _refine([half * 4], [sympy.Integer(2), half * 2]) is not None  # a floor division
    # is an opaque size: 2 * half is whole
    t = sympy.Symbol("s1", positive=True, integer=True)
    assert _refine([s * (t - 1), sympy.Integer(32)], [s, t - 1, 4, 8]) is not None  # T - 1
    assert whole_quotient(s, sympy.Integer(0)) is None  # not zoo


def test_a_dim_of_size_one_factors_as_any_other_size():
    """A batch of one merged with the heads: refused, the view stayed and the analysis found
    other groups than at batch two, so a model that met both batch sizes failed."""
    t, h, d = sympy.Integer(6), sympy.Integer(4), sympy.Integer(8)
    for batch in (sympy.Integer(1), sympy.Integer(2)):
        atoms, of_input, of_view = _refine([t, batch, h * d], [t, batch * h, d])
        assert atoms == [t, batch, h, d]
        assert of_input == [[0], [1], [2, 3]] and of_view == [[0], [1, 2], [3]]


def test_a_merge_that_copies_is_not_turned_into_a_view():
    """``reshape`` of a transposed tensor copies; the chain rewritten as views aliased the
    source, and an in-place op on the result then changed it (the review's repro)."""

    def chain(x):
        h = x * 1
        merged = h.transpose(0, 1).reshape(-1, x.shape[2]).permute(1, 0)
        y = merged.reshape(x.shape[2], x.shape[1], x.shape[0])
        y.mul_(0)
        return h + 1, y

    gm = _normalised(chain, torch.randn(3, 2, 4))
    assert aten.permute.default in _targets(gm) and aten.reshape.default in _targets(gm)


class ShiftedHeads(nn.Module):
    """Attention over all tokens but the first: ``view(B, T - 1, heads, head_dim)`` of a
    ``[B * (T - 1), E]`` projection, whose size quotient ``T - 1`` has a negative term."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.head = nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)[:, 1:]
        b, t, width = h.shape
        x = h.reshape(-1, width)

        def heads(p: torch.Tensor) -> torch.Tensor:
            return p.view(b, t, 4, 8).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        )
        return self.head(h + self.o(a.transpose(1, 2).reshape(b, t, width)))


@pytest.mark.parametrize("batches", [(1, 2), (2, 1)])
def test_groups_do_not_depend_on_whether_a_batch_of_one_made_a_size_static(batches):
    """At batch one ``T - 1`` factored (the batch was static), at a dynamic batch it did
    not (a negative coefficient was refused): other groups, and the second call failed."""
    torch.manual_seed(0)
    model = ShiftedHeads().eval()  # forward passes only: no loss needed
    sparse = sparsefx.transform(model, torch.randint(0, 50, (batches[0], 6)), density=0.5)
    (heads,) = sparsefx.groups(sparse)
    assert heads.size == 4
    out = sparse(torch.randint(0, 50, (batches[1], 6)))
    assert out.shape == (batches[1], 5, 50) and sparsefx.groups(sparse) == [heads]


class WindowMLP(nn.Module):
    """Swin's window partition, an MLP on each window, and the partition's reverse, written
    as the HF models do (``view(B, H // 2, 2, W // 2, 2, C)``, permute, merge)."""

    def __init__(self, contiguous: bool):
        super().__init__()
        self.contiguous = contiguous
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        windows = self.fc1(x).view(b, h // 2, 2, w // 2, 2, 16).permute(0, 1, 3, 2, 4, 5)
        if self.contiguous:
            windows = windows.contiguous()
        windows = self.fc2(torch.nn.functional.gelu(windows.reshape(-1, 4, 16)))
        back = windows.view(b, h // 2, w // 2, 2, 2, 8).permute(0, 1, 3, 2, 4, 5)
        return self.head(x + back.reshape(b, h, w, 8))


@pytest.mark.parametrize(("contiguous", "dynamic"), [(False, None), (True, True)])
def test_a_window_partition_stays_compact_when_the_image_size_turns_dynamic(contiguous, dynamic):
    """Once H and W were dynamic (a second image size, or ``dynamic=True``), the window
    sizes read ``H // (H // 2)`` and the merges ``2 * (H // 2)``: equal to 2 and H only by
    the guards the views added. Read without them, the partition scattered where the
    static first call was compact, and the second call failed with "groups changed"."""
    torch.manual_seed(0)
    model = WindowMLP(contiguous).eval()
    compiled = torch.compile(
        copy.deepcopy(model), backend="sparsefx", options={"density": 0.5}, dynamic=dynamic
    )
    eager = sparsefx.transform(model, torch.randn(2, 4, 4, 8), density=0.5)
    (fc1,) = sparsefx.groups(eager)
    assert ("fc2.weight", 1) in fc1.members  # compact through the partition
    compiled(torch.randn(2, 4, 4, 8))
    masks = {"fc1": torch.arange(16) % 3 != 0}
    sparsefx.set_masks(eager, masks)
    sparsefx.set_masks(compiled, masks)
    for size in (6, 8):
        x = torch.randn(2, size, size, 8)
        torch.testing.assert_close(compiled(x), eager(x))
        assert [(g.name, g.members) for g in sparsefx.groups(compiled)] == [("fc1", fc1.members)]


class BatchMergedAttention(nn.Module):
    """DeBERTa's attention: heads merged into the batch (``view(B * H, T, d)``) for each bmm,
    the scores split back to add a mask and softmax, merged again for ``probs @ v``. The
    scores come from the input (DeBERTa's q and k are dense: their weights also project the
    relative positions), so v's heads are the only group."""

    def __init__(self):
        super().__init__()
        self.v, self.o, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def merged(y):
            return y.view(b, t, 4, 2).permute(0, 2, 1, 3).contiguous().view(-1, t, 2)

        q = merged(x)
        scores = torch.bmm(q, q.transpose(-1, -2)).view(-1, 4, t, t) + mask
        probs = torch.softmax(scores, -1).view(-1, t, t)
        context = torch.bmm(probs, merged(self.v(x))).view(-1, 4, t, 2)
        return self.head(x + self.o(context.permute(0, 2, 1, 3).reshape(b, t, 8)))


def test_a_bmm_over_heads_merged_into_the_batch_keeps_the_heads_compact():
    """``probs.view(B * H, T, T) @ v.view(B * H, T, d)`` merged v's kept heads with the batch,
    where a layout cannot hold them: v was scattered to full width for the bmm (DeBERTa-v2
    and v3, 2 scatters in two layers). Capture now computes the bmm as a matmul of the
    unmerged tensors, whose split result the analysis reads as attention's ``probs @ v``:
    no scatter, and the values of the masked dense model."""
    torch.manual_seed(0)
    model = BatchMergedAttention().eval()
    x, mask = torch.randn(3, 5, 8), torch.zeros(3, 1, 5, 5)
    mask[0, ..., 3:] = -1e4
    sparse = sparsefx.transform(copy.deepcopy(model), (x, mask), density=0.5)
    (heads,) = sparsefx.groups(sparse)
    assert heads.name == "v" and heads.size == 4 and not sparse.analysis.scatters
    kept = torch.tensor([True, False, False, True])
    compiled = torch.compile(copy.deepcopy(model), backend="sparsefx", options={"density": 0.5})
    compiled(x, mask)
    assert sparsefx.groups(compiled) == [heads]
    for smodel in (sparse, compiled):
        sparsefx.set_masks(smodel, {"v": kept})
    model.v.register_forward_hook(lambda m, i, out: out * kept.repeat_interleave(2))
    x = torch.randn(4, 6, 8)  # another batch and length: the sizes stay symbolic
    mask = torch.zeros(4, 1, 6, 6)
    torch.testing.assert_close(sparse(x, mask), model(x, mask))
    torch.testing.assert_close(compiled(x, mask), model(x, mask))


class _ProjectedAttention(nn.Module):
    """q, k and v projections of 4 heads of 2 features, an output projection and a head."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.o, self.head = nn.Linear(8, 8), nn.Linear(8, 3)


class AlibiAttention(_ProjectedAttention):
    """BLOOM's attention: ``alibi.baddbmm(q, k)`` with the heads merged into the batch and k
    transposed after its merge (``k.reshape(B * H, T, d).transpose(-1, -2)``)."""

    def forward(self, x: torch.Tensor, alibi: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y):
            return y.view(b, t, 4, 2).transpose(1, 2)

        q = heads(self.q(x)).reshape(b * 4, t, 2)
        k = heads(self.k(x)).reshape(b * 4, t, 2).transpose(-1, -2)
        scores = alibi.baddbmm(q, k, beta=1.0, alpha=0.5).view(b, 4, t, t)
        context = torch.softmax(scores, -1) @ heads(self.v(x))
        return self.head(x + self.o(context.transpose(1, 2).reshape(b, t, 8)))


def test_a_baddbmm_over_heads_merged_into_the_batch_keeps_the_heads_compact():
    """q and k merged their heads into the batch for ``alibi.baddbmm``, so both scattered
    (BLOOM: 6 scatters in two layers, with the ``probs @ v`` bmm). Capture now computes it
    as ``alibi.unflatten(0, (-1, H)) + alpha * (q @ k.T)`` on unmerged dims: q, k and v
    prune their heads together, compactly, with the masked dense model's values."""
    torch.manual_seed(0)
    example = (torch.randn(3, 5, 8), torch.randn(12, 1, 5))
    _prunes_heads_together(AlibiAttention(), example, (torch.randn(2, 7, 8), torch.randn(8, 1, 7)))


def _prunes_heads_together(model: _ProjectedAttention, example: tuple, inputs: tuple) -> None:
    """q, k and v of `model` form one group of 4 heads with no scatter, and with two heads
    kept the transformed model computes the dense model's values with the dropped heads'
    q, k and v zeroed, on `inputs` of other sizes than `example`."""
    model.eval()
    sparse = sparsefx.transform(copy.deepcopy(model), example, density=0.5)
    (heads,) = sparsefx.groups(sparse)
    assert heads.size == 4 and ("k.weight", 0) in heads.members and not sparse.analysis.scatters
    kept = torch.tensor([False, True, True, False])
    sparsefx.set_masks(sparse, {heads.name: kept})
    for layer in (model.q, model.k, model.v):
        layer.register_forward_hook(lambda m, i, out: out * kept.repeat_interleave(2))
    torch.testing.assert_close(sparse(*inputs), model(*inputs))


class MaskedScoresAttention(_ProjectedAttention):
    """DeBERTa without relative attention: ``bmm(q, k.T / s)`` on heads merged into the
    batch, split back and masked by ``masked_fill``, merged again for ``probs @ v``."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def merged(y):
            return y.view(b, t, 4, 2).permute(0, 2, 1, 3).contiguous().view(-1, t, 2)

        k = merged(self.k(x)).transpose(-1, -2) / math.sqrt(2)
        scores = torch.bmm(merged(self.q(x)), k).view(-1, 4, t, t)
        probs = torch.softmax(scores.masked_fill(~mask, torch.finfo(x.dtype).min), -1)
        context = torch.bmm(probs.view(-1, t, t), merged(self.v(x))).view(-1, 4, t, 2)
        return self.head(x + self.o(context.permute(0, 2, 1, 3).reshape(b, t, 8)))


def test_a_scaled_transposed_merge_and_a_masked_fill_keep_the_heads_compact():
    """DeBERTa-v2 without relative attention: ``k.T / s`` after the merge kept the bmm
    merged (q and k scattered at their merges, 4 scatters in two layers), and the mask's
    ``masked_fill`` was not known to be channel-wise. Now q, k and v prune heads together
    with no scatter, with the masked dense model's values."""
    torch.manual_seed(0)
    example = torch.ones(3, 1, 5, 5, dtype=torch.bool)
    example[0, ..., 3:] = False
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True
    model = MaskedScoresAttention()
    _prunes_heads_together(model, (torch.randn(3, 5, 8), example), (torch.randn(2, 6, 8), mask))
