"""Capture's einsum lowering (`sparsefx.einsums`): a two-operand einsum with at most one
letter per role becomes permutes around one matmul that computes the same values."""

from __future__ import annotations

import string

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

from sparsefx.einsums import einsum_matmuls

aten = torch.ops.aten


class Einsum(nn.Module):
    def __init__(self, equation: str):
        super().__init__()
        self.equation = equation

    def forward(self, a, b):
        return torch.einsum(self.equation, a, b)


def _lowered(equation: str, a: torch.Tensor, b: torch.Tensor, dynamic: str | None = None):
    """The einsum exported (the dims of letter `dynamic` symbolic), lowered, checked against
    eager, also on inputs three larger in that letter."""
    letters = equation.replace(" ", "").split("->")[0].split(",")
    shapes = None
    if dynamic is not None:
        n = Dim("n", min=2)
        shapes = tuple({s.index(dynamic): n} if dynamic in s else None for s in letters)
    gm = torch.export.export(Einsum(equation), (a, b), dynamic_shapes=shapes).module()
    gm = einsum_matmuls(gm)
    torch.testing.assert_close(gm(a, b), torch.einsum(equation, a, b))
    if dynamic is not None:
        a, b = (
            torch.randn(*[n + 3 if c == dynamic else n for c, n in zip(s, t.shape, strict=True)])
            for s, t in zip(letters, (a, b), strict=True)
        )
        torch.testing.assert_close(gm(a, b), torch.einsum(equation, a, b))
    return gm


def _einsums(gm: torch.fx.GraphModule) -> int:
    return len(gm.graph.find_nodes(op="call_function", target=aten.einsum.default))


@st.composite
def equations(draw):
    """Random letters for each role (batch 0-2, left, right and contracted 0-1), in random
    orders in each operand and in the output, with random sizes."""
    letters = iter(draw(st.permutations(string.ascii_lowercase[:8])))
    batch = [next(letters) for _ in range(draw(st.integers(0, 2)))]
    left, right, contracted = ([next(letters)] * draw(st.integers(0, 1)) for _ in range(3))
    a = draw(st.permutations(batch + left + contracted))
    b = draw(st.permutations(batch + contracted + right))
    out = draw(st.permutations(batch + left + right))
    sizes = {c: draw(st.integers(1, 4)) for c in batch + left + right + contracted}
    return f"{''.join(a)},{''.join(b)}->{''.join(out)}", sizes


@given(equations(), st.integers(0, 2**16))
def test_a_two_operand_einsum_becomes_a_matmul_of_the_same_values(case, seed):
    equation, sizes = case
    a_letters, b_letters = equation.split("->")[0].split(",")
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn([sizes[c] for c in a_letters], dtype=torch.float64, generator=generator)
    b = torch.randn([sizes[c] for c in b_letters], dtype=torch.float64, generator=generator)
    gm = _lowered(equation, a, b)
    assert _einsums(gm) == 0


def test_attention_einsums_with_spaces_and_a_dynamic_batch_lower_to_matmuls():
    """torchvision MaxViT's (spaces between letters) and Funnel's (heads at another dim of
    the operands than of the output), the batch dynamic."""
    q, k = torch.randn(2, 3, 4, 5, 8), torch.randn(2, 3, 4, 6, 8)
    gm = _lowered("B G H I D, B G H J D -> B G H I J", q, k, dynamic="B")
    assert aten.matmul.default in [n.target for n in gm.graph.nodes]
    assert _einsums(gm) == 0
    q, k = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 4, 8)
    assert _einsums(_lowered("bind,bjnd->bnij", q, k, dynamic="b")) == 0
    assert _einsums(_lowered("ij,jk", torch.randn(3, 4), torch.randn(4, 5))) == 0  # implicit


def test_einsums_that_need_more_than_one_matmul_stay_einsums():
    """An ellipsis, a diagonal, a letter summed in one operand alone, two letters in one
    role (a reshape), a size-1 dim broadcast against another: left for the analysis to read
    whole, as before."""
    x = torch.randn(3, 3)
    cases = [
        ("...ij,...jk->...ik", torch.randn(2, 3, 4), torch.randn(2, 4, 5)),
        ("ii,ij->ij", x, x),
        ("ij,jk->i", torch.randn(3, 4), torch.randn(4, 5)),
        ("abc,cd->abd", torch.randn(2, 3, 4), torch.randn(4, 5)),
        ("bij,bjk->bik", torch.randn(1, 3, 4), torch.randn(2, 4, 5)),
    ]
    for equation, a, b in cases:
        assert _einsums(_lowered(equation, a, b)) == 1, equation
