"""sparsefx.export: a frozen sparse model becomes a compact torch.export program with
physically sliced parameters, equal to the frozen model's eval output, with the parameter
count and FLOPs of the cost model, and no sparsefx op or channel gather left."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sparsefx
from tests.test_coupling import DenseNetStyle, MobileNetV2Style, ResNetStyle

transformers = pytest.importorskip("transformers")


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 5),
    )  # fmt: skip


def _cnn_instance_norm() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.InstanceNorm2d(16, affine=True, track_running_stats=True),
        nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1), nn.InstanceNorm2d(24), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip


def _cnn_group_norm() -> nn.Module:
    """GroupNorms of two channels per group (the conv before it pruned in pairs) and of a
    group per channel, with and without affine parameters."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(8, 16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.GroupNorm(24, 24, affine=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    )  # fmt: skip


def _cnn_adaptive_max_pool() -> nn.Module:
    """Adaptive max pooling reads its input at full width, so the exported program scatters
    the compact channels back (the scatter decomposed into aten ops)."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )  # fmt: skip


def _hf_resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        layer_type="basic", embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], num_labels=3
    )
    return transformers.ResNetForImageClassification(config)


MODELS = {  # builder, options, input size
    "cnn": (_cnn, {}, 16),
    "cnn-scatter": (_cnn_adaptive_max_pool, {}, 8),
    "cnn-instance-norm": (_cnn_instance_norm, {}, 8),
    "cnn-group-norm": (_cnn_group_norm, {}, 8),
    "resnet-style": (ResNetStyle, {}, 16),
    "resnet-style-streams": (ResNetStyle, {"prune_streams": True}, 16),
    "mobilenet-v2-style": (MobileNetV2Style, {}, 16),
    "densenet-style": (DenseNetStyle, {}, 4),
    "hf-resnet": (_hf_resnet, {}, 16),
}


def _frozen(build, options: dict, x: torch.Tensor) -> nn.Module:
    """A sparse model trained for two steps (weights, BN statistics and s all move), then
    frozen to its top-budget mask."""
    model = build()
    config = sparsefx.SparseConfig(density=0.4, seed=0, score_lr=0.1, **options)
    sparse = sparsefx.transform(model, (x,), config=config)
    hf = isinstance(model, transformers.PreTrainedModel)

    def cross_entropy(output, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(output.logits if hf else output, target)

    criterion = sparsefx.wrap_loss(sparse, cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    target = torch.randint(0, 3, (x.shape[0],))
    for _ in range(2):
        optimizer.zero_grad()
        loss = criterion(sparse(x), target)
        loss.backward()
        optimizer.step()
    sparsefx.freeze(sparse)
    return sparse.eval()


def _outputs(value) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_program_equals_the_frozen_model_and_is_compact(name, tmp_path):
    build, options, size = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(4, 3, size, size)
    sparse = _frozen(build, options, x)
    with torch.no_grad():
        expected = _outputs(sparse(x))
    program = sparsefx.export(sparse, (x,))
    actual = _outputs(program.module()(x))
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)

    path = tmp_path / "compact.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    for a, e in zip(_outputs(loaded.module()(x)), expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)

    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if "sparsefx" in str(t)}, targets
    assert torch.ops.aten.index_select.default not in targets

    runtime = sparse.runtime
    kept = [float(m.sum()) for m in runtime.structure.split(runtime.structure.fixed)]
    cost = runtime.cost_model
    params = sum(program.state_dict[n].numel() for n in program.graph_signature.parameters)
    dense_params = sum(p.numel() for p in sparse.model.parameters())
    assert params == cost.evaluate("params", kept) < dense_params
    with FlopCounterMode(display=False) as flops:
        program.module()(x)
    assert flops.get_total_flops() == pytest.approx(x.shape[0] * cost.evaluate("flops", kept))
    assert sparsefx.stats(sparse)["params_fraction"] == pytest.approx(
        params / cost.evaluate("params", cost.sizes)
    )


def test_export_of_a_compiled_model():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    model = _cnn()
    compiled = torch.compile(copy.deepcopy(model), backend="sparsefx", options={"density": 0.5})
    compiled.eval()(x)  # the compiled model has its sparsefx runtime after a first call
    sparsefx.set_masks(
        compiled, {g.name: torch.arange(g.size) % 2 == 0 for g in sparsefx.groups(compiled)}
    )
    with torch.no_grad():
        expected = compiled(x)
    program = sparsefx.export(compiled, (x,))
    torch.testing.assert_close(program.module()(x), expected, atol=1e-5, rtol=1e-5)
    conv = next(v for k, v in program.state_dict.items() if k.endswith("0_weight_kept"))
    assert conv.shape == (8, 3, 3, 3)


def test_export_needs_frozen_masks():
    x = torch.randn(2, 3, 8, 8)
    sparse = sparsefx.transform(_cnn(), (x,), density=0.5)
    with pytest.raises(RuntimeError, match=r"sparsefx.freeze\(model\)"):
        sparsefx.export(sparse, (x,))
    with pytest.raises(TypeError, match=r"returned by sparsefx\.transform"):
        sparsefx.export(_cnn(), (x,))


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 3),
    )  # fmt: skip


def _depthwise() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 8 * 8, 3),
    )  # fmt: skip


@pytest.mark.parametrize(
    "build",
    [_cnn, _mlp, _depthwise, _cnn_instance_norm, _cnn_group_norm],
    ids=["cnn", "mlp", "depthwise", "instance-norm", "group-norm"],
)
def test_compact_module_has_smaller_layers_and_the_same_output(build):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    sparse = _frozen(build, {}, x)
    small = sparsefx.compact_module(sparse).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), sparse(x), atol=1e-5, rtol=1e-5)
    runtime = sparse.runtime
    kept = [float(m.sum()) for m in runtime.structure.split(runtime.structure.fixed)]
    assert sum(p.numel() for p in small.parameters()) == runtime.cost_model.evaluate("params", kept)
    assert type(small) is type(sparse.model) and len(small) == len(sparse.model)
    assert sum(p.numel() for p in small.parameters()) < sum(
        p.numel() for p in sparse.model.parameters()
    )


def test_compact_module_refuses_what_it_cannot_rebuild():
    x = torch.randn(2, 3, 8, 8)
    sparse = sparsefx.transform(ResNetStyle(), (x,), density=0.5)
    sparsefx.freeze(sparse)
    with pytest.raises(TypeError, match=r"sparsefx\.export"):
        sparsefx.compact_module(sparse)
    sparse = sparsefx.transform(_cnn(), (x,), density=0.5)
    with pytest.raises(RuntimeError, match=r"sparsefx\.freeze"):
        sparsefx.compact_module(sparse)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.f, self.g = nn.Linear(8, 32), nn.Linear(32, 4)

    def forward(self, a, b):
        return self.g(torch.relu(self.f(a))) + b.sum(-1, keepdim=True)


def test_an_example_tensor_passed_for_two_inputs_stays_two_inputs():
    """``labels=input_ids`` as the example: torch.export made one placeholder of the one
    tensor, and the program read `b` for `a` too (a language model embedded its labels)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    sparse = sparsefx.transform(TwoInputs(), (x, x), density=0.5)
    sparsefx.freeze(sparse)
    program = sparsefx.export(sparse.eval(), (x, x))
    a, b = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(a, b), sparse(a, b))
