"""Real third-party models (Hugging Face `transformers`, small configs, random weights):
coupling groups found on the unmodified model, compact training equal to the reference
semantics under fixed random masks, and a training loss that falls."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn

import sparsefx

transformers = pytest.importorskip("transformers")


def _resnet() -> nn.Module:
    config = transformers.ResNetConfig(
        layer_type="basic",
        embedding_size=8,
        hidden_sizes=[8, 12],
        depths=[1, 1],
        num_labels=3,
    )
    return transformers.ResNetForImageClassification(config)


def _resnet_mask_points(groups: list[sparsefx.Group]) -> dict[str, list[str]]:
    """Modules whose outputs the reference masks, per group, read from the model's structure
    (a ResNetConvLayer ends with its activation; a stream's writers are the stem, each
    block's second conv layer and the shortcuts)."""
    points = {}
    for group in groups:
        if group.name == "resnet.embedder.embedder.convolution":
            points[group.name] = ["resnet.embedder", "resnet.encoder.stages.0.layers.0.layer.1"]
        elif group.name.endswith("layer.1.convolution"):
            block = group.name.removesuffix(".layer.1.convolution")
            points[group.name] = [f"{block}.layer.1", f"{block}.shortcut"]
        else:
            points[group.name] = [group.name.removesuffix(".convolution")]
    return points


@contextmanager
def _masked(model: nn.Module, points: dict[str, list[str]], masks: dict[str, Tensor]) -> Iterator:
    """The reference semantics: dropped channels zeroed (dim 1) at the given module outputs."""

    def zero(mask: Tensor):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            return output * mask.to(output.dtype).view(1, -1, *[1] * (output.dim() - 2))

        return hook

    handles = [
        model.get_submodule(name).register_forward_hook(zero(masks[group]))
        for group, names in points.items()
        for name in names
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _random_masks(groups: list[sparsefx.Group], seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for group in groups:
        mask = torch.rand(group.size, generator=generator) < 0.5
        mask[0] = True
        masks[group.name] = mask
    return masks


@pytest.mark.parametrize("prune_streams", [False, True], ids=["streams-dense", "streams-pruned"])
def test_hf_resnet_matches_reference(prune_streams):
    torch.manual_seed(0)
    model = _resnet().double()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1])
    config = sparsefx.SparseConfig(density=0.5, prune_streams=prune_streams)
    sparse = sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, config=config)
    groups = sparsefx.groups(sparse)
    streams = [g.name for g in groups if g.stream]
    assert len(streams) == (2 if prune_streams else 0)
    assert len(groups) - len(streams) == 2  # the first conv layer of each block

    masks = _random_masks(groups, seed=1)
    sparsefx.set_masks(sparse, masks)
    out = sparse(x, labels=labels)
    out.loss.backward()
    with _masked(reference, _resnet_mask_points(groups), masks):
        expected = reference(x, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_hf_resnet_report_names_streams_and_classifier():
    sparse = sparsefx.transform(_resnet(), torch.randn(2, 3, 16, 16), density=0.5)
    reasons = [d.reason for d in sparse.analysis.dense]
    assert sum("residual stream" in r for r in reasons) == 4  # stem, 2 second convs, shortcut
    assert sum(r.startswith("output layer") for r in reasons) == 1
    assert not sparse.analysis.scatters


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_hf_resnet_training_loss_falls(mode):
    torch.manual_seed(0)
    model = _resnet()
    x = torch.randn(16, 3, 16, 16)
    labels = torch.randint(0, 3, (16,))
    config = sparsefx.SparseConfig(density=0.5, prune_streams=True, seed=0)
    if mode == "transform":
        sparse = sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, config=config)
    else:
        options = {f: getattr(config, f) for f in ("density", "prune_streams", "seed")}
        sparse = torch.compile(model, backend="sparsefx", options=options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = sparse(x, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
