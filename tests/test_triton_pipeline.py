"""SparseConfig(kernels="triton"): the compact graphs run the Triton ops, the structure update
the fused sampler and projection, and training matches kernels="torch" (the reference).

On CUDA when a GPU is present, else on CPU tensors under Triton's interpreter
(tests/conftest.py)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import sparsefx
from tests.conftest import triton_device

DEVICE = triton_device()  # skips the module, naming the hardware, before the Triton imports

from sparsefx.kernels import triton_selected  # noqa: E402
from sparsefx.kernels.triton_ops import compact_linear, gather_block  # noqa: E402

TRITON_OPS = {compact_linear._opoverload, gather_block._opoverload}


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 5)
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 10, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(10, 4),
    )


class _Conv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2's linears): addmm(bias, x, W) with W [in, out]."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out) / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight)


def _addmm_mlp() -> nn.Module:
    return nn.Sequential(_Conv1D(20, 48), nn.ReLU(), _Conv1D(48, 40), nn.GELU(), nn.Linear(40, 5))


def _pair(model: nn.Module, x: torch.Tensor, **options):
    """The same model transformed with each kernel choice, sharing a seed."""
    models = {}
    for kernels in ("torch", "triton"):
        config = sparsefx.SparseConfig(density=0.5, seed=3, kernels=kernels, **options)
        models[kernels] = sparsefx.transform(copy.deepcopy(model).to(DEVICE), (x,), config=config)
    return models


def _targets(sparse: nn.Module) -> set:
    graph = sparse.runtime.graphs[0].compact.graph
    return {n.target for n in graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("build", [_mlp, _addmm_mlp, _cnn], ids=["mlp", "addmm-mlp", "cnn"])
@pytest.mark.parametrize("sparse_gradients", [False, True])
def test_triton_graph_matches_reference_under_fixed_masks(build, sparse_gradients):
    torch.manual_seed(0)
    x = (
        torch.randn(2, 3, 6, 6, device=DEVICE)
        if build is _cnn
        else torch.randn(6, 20, device=DEVICE)
    )
    target = torch.randint(0, 4, (x.shape[0],), device=DEVICE)
    models = _pair(build(), x, sparse_gradients=sparse_gradients)
    groups = models["torch"].groups
    masks = {g.name: torch.rand(g.size) < 0.5 for g in groups}
    for mask in masks.values():
        mask[:2] = True
    results = {}
    for kernels, sparse in models.items():
        sparsefx.set_masks(sparse, masks)
        loss = nn.functional.cross_entropy(sparse(x)[:, :4], target)
        loss.backward()
        grads = {n: p.grad.to_dense() for n, p in sparse.named_parameters() if p.grad is not None}
        results[kernels] = (loss.detach(), grads)
    assert TRITON_OPS & _targets(models["triton"])
    assert not TRITON_OPS & _targets(models["torch"])
    torch.testing.assert_close(results["triton"][0], results["torch"][0])
    assert results["triton"][1].keys() == results["torch"][1].keys()
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, msg=name)


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_triton_linears_follow_autocast_like_the_reference(build):
    """Under float16 autocast the Triton compact linear computes in float16, as aten.linear
    (the torch kernels' path) does: a half-type input from an autocast conv meets the float32
    weight (which tl.dot refused), and a float32 input is cast; weight gradients stay
    float32 and match the torch kernels' within half precision."""
    torch.manual_seed(0)
    x = (
        torch.randn(6, 20, device=DEVICE)
        if build is _mlp
        else torch.randn(2, 3, 6, 6, device=DEVICE)
    )
    models = _pair(build(), x)
    masks = {g.name: torch.rand(g.size) < 0.5 for g in models["torch"].groups}
    for mask in masks.values():
        mask[:2] = True
    results = {}
    for kernels, sparse in models.items():
        sparsefx.set_masks(sparse, masks)
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = sparse(x)
        out.float().square().mean().backward()
        grads = {n: p.grad for n, p in sparse.named_parameters() if p.grad is not None}
        results[kernels] = (out, grads)
    assert TRITON_OPS & _targets(models["triton"])
    for kernels, (out, grads) in results.items():
        assert out.dtype == torch.float16, kernels
        assert all(g.dtype == torch.float32 for g in grads.values()), kernels
    torch.testing.assert_close(results["triton"][0], results["torch"][0], atol=1e-2, rtol=1e-2)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][name], grad, atol=1e-2, rtol=1e-2, msg=name)


def test_relu_after_a_compact_linear_is_fused():
    sparse = _pair(_mlp(), torch.randn(4, 20, device=DEVICE))["triton"]
    graph = sparse.runtime.graphs[0].compact.graph
    fused = [n for n in graph.nodes if n.target is compact_linear._opoverload]
    assert [n.args[5] for n in fused] == [True, False, False]  # ReLU fused, GELU not
    assert not graph.find_nodes(op="call_function", target=torch.ops.aten.relu.default)


def test_training_with_the_fused_sampler_and_projection():
    """Sampling, the score terms and the projection come from the Triton kernels: masks keep
    every group non-trivial, s stays on the budget, and the loss falls."""
    torch.manual_seed(0)
    x, target = torch.randn(64, 20, device=DEVICE), torch.randint(0, 5, (64,), device=DEVICE)
    config = sparsefx.SparseConfig(density=0.4, seed=5, kernels="triton", score_lr=0.05)
    sparse = sparsefx.transform(_mlp().to(DEVICE), (x,), config=config)
    criterion = sparsefx.wrap_loss(sparse, nn.functional.cross_entropy)
    structure = sparse.structure
    assert structure.triton
    optimizer = torch.optim.Adam(sparse.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = criterion(sparse(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        masks = structure._sampled[0]
        for indices, mask in zip(structure._sampled[1][0], structure.split(masks[0]), strict=True):
            assert torch.equal(indices, mask.nonzero().squeeze(1))
            assert len(indices) >= 2
    s = structure.probabilities
    expected = (s.double() @ structure.costs.double() + structure.top_up_cost()).item()
    assert expected <= structure.budget * (1 + 1e-6)
    assert not torch.equal(s, torch.full_like(s, 0.4)), "the structure never moved"
    assert sum(losses[-3:]) < sum(losses[:3])


def test_compiled_model_with_triton_kernels():
    """On a GPU Inductor compiles the kernels in; under the CPU interpreter the traced op
    bodies take the reference path, and the run still matches eager."""
    torch.manual_seed(0)
    x, target = torch.randn(8, 20, device=DEVICE), torch.randint(0, 5, (8,), device=DEVICE)
    model = _mlp().to(DEVICE)
    options = {"density": 0.5, "seed": 2, "kernels": "triton"}
    compiled = torch.compile(copy.deepcopy(model), backend="sparsefx", options=options)
    eager = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**options))
    compiled.eval()(x)  # the compiled model has its sparsefx runtime after a first call
    criterion = nn.functional.cross_entropy
    results = []
    for sparse in (compiled, eager):
        sparsefx.set_masks(sparse, {g.name: torch.arange(g.size) % 3 != 1 for g in eager.groups})
        loss = criterion(sparse.train()(x), target)
        loss.backward()
        results.append((loss.detach(), sparse.get_submodule("" if sparse is compiled else "model")))
    torch.testing.assert_close(results[0][0], results[1][0])
    for (name, p), q in zip(model.named_parameters(), results[0][1].parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="kernels must be one of"):
        sparsefx.SparseConfig(density=0.5, kernels="cuda")
    assert not triton_selected("auto", torch.device("cpu"))
    assert not triton_selected("torch", torch.device(DEVICE))
    assert triton_selected("triton", torch.device(DEVICE))


def test_compiled_conv_net_with_triton_kernels_does_not_recompile_per_mask():
    """Convolutions on Triton-gathered weights (sparsefx::gather_block) still reach Inductor
    as the opaque sparsefx::conv, whose channel counts stay symbolic: Inductor's own conv
    lowering guards each kept count, so every new mask recompiled and the 9th hit Dynamo's
    recompile limit (found by tracing with a fake sm_90 driver; the same on CPU)."""
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, device=DEVICE), torch.randint(0, 4, (4,), device=DEVICE)
    model = _cnn().to(DEVICE)
    options = {"density": 0.5, "seed": 3, "kernels": "triton"}
    compiled = torch.compile(model, backend="sparsefx", options=options)
    criterion = sparsefx.wrap_loss(compiled, nn.functional.cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    counts = set()
    for _ in range(10):
        optimizer.zero_grad()
        criterion(compiled(x), y).backward()
        optimizer.step()
        counts.add(tuple(int(m.sum()) for m in sparsefx.masks(compiled).values()))
    assert len(counts) > 3, counts  # the masks' kept counts did change
    # before the fix: 14 graphs in these 10 steps. CPU compiles 3, an H200 compiled 4 (the fourth not
    # yet explained: no GPU time was left to look)
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_diff_report_says_what_the_triton_ops_read():
    """The graph-diff tool notes the Triton ops as it notes the aten path's gathers."""
    x = torch.randn(4, 3, 8, 8, device=DEVICE)
    config = sparsefx.SparseConfig(density=0.5, kernels="triton")
    conv = sparsefx.diff(_cnn().to(DEVICE), (x,), config=config).text(context=1000)
    assert "sparsefx.gather_block(p_0_weight" in conv
    assert "# kept rows/columns of 0.weight" in conv
    mlp = sparsefx.diff(_mlp().to(DEVICE), (x.new_zeros(4, 20),), config=config).text(context=1000)
    assert "Triton gather-GEMM on kept rows/columns of 2.weight" in mlp


def _real_model_cases() -> dict[str, tuple]:
    from tests import test_coupling, test_hf_models

    ids = torch.randint(0, 64, (2, 8))
    label = {"labels": torch.tensor([0, 2])}
    cases = {
        cls.__name__: (cls, (test_coupling._inputs(cls, 2),), {})
        for cls in (test_coupling.ResNetStyle, test_coupling.DenseNetStyle)
    }
    cases["gpt2"] = (test_hf_models._gpt2, (), {"input_ids": ids, "labels": ids})
    cases["bert"] = (test_hf_models._bert, (), {"input_ids": ids, **label})
    cases["vit"] = (test_hf_models._vit, (torch.randn(2, 3, 8, 8),), label)
    return cases


@pytest.mark.parametrize("name", ["ResNetStyle", "DenseNetStyle", "gpt2", "bert", "vit"])
def test_real_models_on_the_triton_ops_match_the_reference(name):
    """The coupled models and Hugging Face transformers run their Triton ops (GPT-2's
    Conv1D linears are addmms) and match kernels="torch" under the same fixed masks."""
    torch.manual_seed(0)
    build, args, kwargs = _real_model_cases()[name]
    base = build().to(DEVICE)
    args = tuple(a.to(DEVICE) for a in args)
    kwargs = {k: v.to(DEVICE) for k, v in kwargs.items()}
    results, masks = {}, None
    for kernels in ("torch", "triton"):
        model = copy.deepcopy(base)
        config = sparsefx.SparseConfig(density=0.5, seed=0, kernels=kernels)
        sparse = sparsefx.transform(model, args, example_kwargs=kwargs, config=config)
        if masks is None:
            generator = torch.Generator().manual_seed(1)
            masks = {g.name: torch.rand(g.size, generator=generator) < 0.6 for g in sparse.groups}
            for mask in masks.values():
                mask[:2] = True
        sparsefx.set_masks(sparse, masks)
        out = sparse(*args, **kwargs)
        loss = out.loss if kwargs else out.square().mean()
        loss.backward()
        grads = {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}
        results[kernels] = (loss.detach(), grads, _targets(sparse))
    assert TRITON_OPS & results["triton"][2]
    torch.testing.assert_close(results["triton"][0], results["torch"][0])
    assert results["triton"][1].keys() == results["torch"][1].keys()
    for param, grad in results["torch"][1].items():
        torch.testing.assert_close(results["triton"][1][param], grad, msg=param)


def test_the_projection_reserves_the_minimum_within_the_budget_on_the_device():
    """Six groups of four channels at density 0.3: the top-up to two channels costs a good
    part of the budget. The device's projection (no host read) ends where the
    expected cost with the top-up is within the budget, as the eager one does, and close
    to it rather than far below. (Three fixed-point rounds ended 2.7% over.)"""
    torch.manual_seed(0)
    widths = [8, 4, 4, 4, 4, 4, 4, 40]
    layers = [m for a, b in itertools.pairwise(widths) for m in (nn.Linear(a, b), nn.ReLU())]
    model = nn.Sequential(*layers, nn.Linear(40, 3))
    x = torch.randn(16, 8, device=DEVICE)
    z = torch.rand(64, generator=torch.Generator().manual_seed(5)) * 1.4 - 0.3
    results = []
    for kernels in ("triton", "torch"):
        config = sparsefx.SparseConfig(density=0.3, seed=3, kernels=kernels)
        structure = sparsefx.transform(
            copy.deepcopy(model).to(DEVICE), (x,), config=config
        ).structure
        s = structure._project(
            z.to(DEVICE, structure.probabilities.dtype), triton=kernels == "triton"
        )
        results.append(float(structure.costs.double() @ s.double() + structure.top_up_cost(s)))
    on_device, eager = results
    assert on_device <= structure.budget * (1 + 1e-6)
    assert on_device == pytest.approx(eager, abs=1e-3 * structure.budget)
