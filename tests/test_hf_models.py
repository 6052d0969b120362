"""Real third-party models (Hugging Face `transformers`, small configs, random weights):
coupling groups found on the unmodified model, compact training equal to the reference
semantics under fixed random masks, and a training loss that falls."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor, nn
from torch._dynamo.utils import counters

import sparsefx
from sparsefx.kernels import attention_with_dropout

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


RESNET_OPTIONS = {"density": 0.5, "prune_streams": True, "seed": 0}


def _resnet_batch() -> tuple[Tensor, Tensor]:
    return torch.randn(16, 3, 16, 16), torch.randint(0, 3, (16,))


def test_hf_resnet_training_loss_falls():
    torch.manual_seed(0)
    model = _resnet()
    x, labels = _resnet_batch()
    config = sparsefx.SparseConfig(**RESNET_OPTIONS)
    sparse = sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, config=config)
    _assert_loss_falls(sparse, model, x, labels, steps=40)


def _assert_loss_falls(
    sparse: nn.Module, model: nn.Module, x: Tensor, labels: Tensor, steps: int
) -> None:
    """`steps` Adam steps on the model's own loss: the last five losses average under 0.8 of
    the first five."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = sparse(x, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def _transformed(model: nn.Module, x: Tensor, labels: Tensor, options: dict) -> nn.Module:
    config = sparsefx.SparseConfig(**options)
    return sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, config=config)


def test_hf_resnet_compiled_with_a_dense_stem_does_not_recompile_for_new_masks():
    """Streams dense: the stem conv stays a dense conv in Inductor's graph. On CPU that turns on
    Inductor's layout optimisation, which must not specialise the kept-channel counts."""
    torch.manual_seed(0)
    model = _resnet()
    model.config.problem_type = "single_label_classification"  # else HF sets it on call 1
    x, labels = torch.randn(8, 3, 16, 16), torch.randint(0, 3, (8,))
    cmodel = torch.compile(model, backend="sparsefx", options={"density": 0.5, "seed": 0})
    counts = []
    for _ in range(6):
        cmodel(x, labels=labels).loss.backward()
        counts.append(counters["stats"]["unique_graphs"])
    groups = sparsefx.groups(model)
    assert any("layer.0.convolution" in g.name for g in groups), [g.name for g in groups]
    # one more graph at most: the exact-count twin, compiled once when kept counts recur
    assert counts[-1] - counts[0] <= 1, f"recompiled as the masks changed: {counts}"


# -- transformers: attention heads and MLP neurons ------------------------------------------

HEAD_DIM = 8


def test_hf_convnext_prunes_mlp_channels_and_keeps_its_layer_scaled_stream_dense():
    """ConvNeXt's blocks end in a layer scale (a per-channel parameter) before the residual
    add. That mul read a scatter, so each block's pwconv2 became a group of its own (the
    stream's features, pruned for no compute saved after it). The scale is channel-wise
    now: the dense stream keeps pwconv2 dense, the MLPs' hidden channels are the groups,
    compact and equal to the reference."""
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, num_labels=4
    )
    model = transformers.ConvNextForImageClassification(config).double()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    sparse = sparsefx.transform(model, (x,), density=0.5)
    groups = sparsefx.groups(sparse)
    assert [g.name for g in groups] == [
        f"convnext.encoder.stages.{stage}.layers.0.pwconv1" for stage in (0, 1)
    ]
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    masks = _random_masks(groups, seed=3)
    sparsefx.set_masks(sparse, masks)
    with _masked_features(reference, masks):
        expected = reference(x).logits
    torch.testing.assert_close(sparse(x).logits, expected)


def _gpt2(dropout: float = 0.0) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=16, use_cache=False,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config)


def _heads(mask: Tensor) -> Tensor:
    return mask.repeat_interleave(HEAD_DIM)


def _gpt2_points(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Output features zeroed by the reference, per Conv1D module (q, k, v fused)."""
    points = {}
    for layer in range(2):
        h = f"transformer.h.{layer}"
        points[f"{h}.attn.c_attn"] = _heads(masks[f"{h}.attn.c_attn"]).repeat(3)
        points[f"{h}.mlp.c_fc"] = masks[f"{h}.mlp.c_fc"]
    return points


def _encoder_points(
    masks: dict[str, Tensor], layers: str, projections: tuple[str, str, str], mlp: str
) -> dict[str, Tensor]:
    """Output features zeroed by the reference in an encoder: q, k, v rows of each head (the
    group is named after q) and the MLP's hidden neurons, per layer."""
    points = {}
    for layer in range(2):
        a = f"{layers}.{layer}"
        for proj in projections:
            points[f"{a}.{proj}"] = _heads(masks[f"{a}.{projections[0]}"])
        points[f"{a}.{mlp}"] = masks[f"{a}.{mlp}"]
    return points


def _bert_points(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    projections = ("attention.self.query", "attention.self.key", "attention.self.value")
    points = _encoder_points(masks, "bert.encoder.layer", projections, "intermediate.dense")
    return {"bert.pooler.dense": masks["bert.pooler.dense"], **points}


def _vit_points(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    projections = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    return _encoder_points(masks, "vit.layers", projections, "mlp.fc1")


@contextmanager
def _masked_features(model: nn.Module, points: dict[str, Tensor], inputs: bool = False) -> Iterator:
    """The reference semantics for transformers: dropped features zeroed (last dim) at the
    output of each producer (GELU(0) = 0, so this equals masking after the activation), or
    with `inputs` at the input of each consumer in `points`."""

    def zero(mask: Tensor):
        if inputs:
            return lambda module, args: (args[0] * mask.to(args[0].dtype), *args[1:])
        return lambda module, inputs, output: output * mask.to(output.dtype)

    register = "register_forward_pre_hook" if inputs else "register_forward_hook"
    handles = [getattr(model.get_submodule(n), register)(zero(m)) for n, m in points.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _text_inputs() -> tuple[Tensor, Tensor, Tensor]:
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(5))
    return ids, ids, torch.tensor([0, 2, 1])


TRANSFORMERS = {
    "gpt2": (_gpt2, _gpt2_points, lambda: (_text_inputs()[0], _text_inputs()[1]), 4),
    "bert": (_bert, _bert_points, lambda: (_text_inputs()[0], _text_inputs()[2]), 5),
    "vit": (_vit, _vit_points, lambda: (torch.randn(3, 3, 8, 8), _text_inputs()[2]), 4),
}


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_heads_and_mlp_match_reference(name):
    build, points, inputs, num_groups = TRANSFORMERS[name]
    torch.manual_seed(0)
    model = build().double()
    reference = copy.deepcopy(model)
    x, labels = inputs()
    x = x.double() if x.is_floating_point() else x
    sparse = sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, density=0.5)
    groups = sparsefx.groups(sparse)
    assert len(groups) == num_groups, [g.name for g in groups]
    heads = [g for g in groups if g.size == 2]
    assert len(heads) == 2 and all(len(g.producers) == 3 for g in heads)

    masks = _random_masks(groups, seed=4)
    sparsefx.set_masks(sparse, masks)
    out = sparse(x, labels=labels)
    out.loss.backward()
    with _masked_features(reference, points(masks)):
        expected = reference(x, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(out.loss, expected.loss)
    for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=pname)


def test_transformed_gpt2_runs_new_batch_sizes_and_lengths_on_one_graph():
    """Token ids and attention masks are captured with every dim dynamic and float inputs
    with a dynamic batch, also through transformers' ``**kwargs`` forward: new batch sizes
    and sequence lengths (dynamic padding) run the captured graph, under the reference
    semantics, instead of capturing again (seconds each, and one more program kept)."""
    torch.manual_seed(0)
    model = _gpt2().double()
    reference = copy.deepcopy(model)
    x, labels = _text_inputs()[:2]
    mask = _padding_mask(x)
    sparse = sparsefx.transform(
        model, (x,), example_kwargs={"labels": labels, "attention_mask": mask}, density=0.5
    )
    masks = _random_masks(sparsefx.groups(sparse), seed=4)
    sparsefx.set_masks(sparse, masks)
    for batch, length in ((5, 8), (2, 13), (4, 5)):
        ids = torch.randint(0, 64, (batch, length))
        out = sparse(ids, labels=ids, attention_mask=_padding_mask(ids))
        with _masked_features(reference, _gpt2_points(masks)):
            expected = reference(ids, labels=ids, attention_mask=_padding_mask(ids))
        torch.testing.assert_close(out.logits, expected.logits)
    assert [len(programs) for programs in sparse._programs.values()] == [1]


def test_transform_says_it_does_not_apply_gradient_checkpointing():
    model = _gpt2()
    model.gradient_checkpointing_enable()
    x, labels = _text_inputs()[:2]
    with pytest.warns(UserWarning, match="gradient checkpointing enabled, which sparsefx"):
        sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, density=0.5)


def test_transformer_report_keeps_streams_and_tied_head_dense():
    x, labels = TRANSFORMERS["gpt2"][2]()
    sparse = sparsefx.transform(_gpt2(), (x,), example_kwargs={"labels": labels}, density=0.5)
    reasons = [d.reason for d in sparse.analysis.dense]
    # 4 block writers and the position embedding write into the token embedding's stream
    assert sum("residual stream from an unpruned source" in r for r in reasons) == 5
    assert sum("shared weights" in r for r in reasons) == 2  # wte and the lm_head tied to it
    assert sum("normalises across features" in r for r in reasons) == 5  # 2 per block, ln_f
    assert not sparse.analysis.scatters
    (group,) = [g for g in sparsefx.groups(sparse) if g.name == "transformer.h.0.attn.c_attn"]
    kept = {(n, d): m for n, d, m in group.expand(torch.tensor([False, True]))}
    columns = kept[("transformer.h.0.attn.c_attn.weight", 1)]
    assert columns.nonzero().squeeze(1).tolist() == [8 + i for i in range(8)] + [
        off + 8 + i for off in (16, 32) for i in range(8)
    ]


@pytest.mark.parametrize("name", list(TRANSFORMERS))
def test_transformer_training_loss_falls(name):
    build, _, inputs, _ = TRANSFORMERS[name]
    torch.manual_seed(0)
    model = build()
    x, labels = inputs()
    sparse = _transformed(model, x, labels, {"density": 0.5, "seed": 0})
    _assert_loss_falls(sparse, model, x, labels, steps=30)


def test_gpt2_dropouts_on_the_stream_share_noise_and_attention_drops_in_math_form():
    torch.manual_seed(0)
    model = _gpt2(dropout=0.1)
    x, labels = TRANSFORMERS["gpt2"][2]()
    sparse = sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, density=0.5)
    program = sparse._programs[sparse._modes()][0]
    assert program.noises == 5  # embedding dropout, then attention and MLP output per layer
    targets = [n.target for n in program.graph.graph.nodes]
    assert targets.count(attention_with_dropout) == 2
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets


@pytest.mark.parametrize("mode", ["transform", "compile"])
def test_gpt2_with_dropout_training_loss_falls(mode):
    torch.manual_seed(0)
    model = _gpt2(dropout=0.1)
    x, labels = TRANSFORMERS["gpt2"][2]()
    options = {"density": 0.5, "seed": 0}
    if mode == "transform":
        sparse = _transformed(model, x, labels, options)
    else:
        sparse = torch.compile(model, backend="sparsefx", options=options)
    _assert_loss_falls(sparse, model, x, labels, steps=30)


KV_HEADS, QUERY_HEADS_PER_KV, LLAMA_HEAD_DIM = 4, 2, 4


def _decoder(family: str = "llama", attention: str = "sdpa") -> nn.Module:
    """Grouped-query attention: 8 query heads share 4 key/value heads. Qwen2 has q, k, v
    biases; Gemma scales its embeddings and norms by (1 + w); Qwen3 normalises q and k per
    head (RMSNorm over head_dim); Phi-3 fuses q, k, v into one projection and gate and up
    into another (split by slicing and by chunk); Nemotron's MLP is relu(up)² (no gate);
    Cohere interleaves its rotary halves (stride-2 slices, then stack) and runs attention and
    MLP in parallel. Gemma 2 and 3 normalise each block's output before the stream
    (post-norms); Gemma 2 soft-caps its attention logits, Gemma 3 normalises q and k per head."""
    sizes = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=KV_HEADS * QUERY_HEADS_PER_KV, num_key_value_heads=KV_HEADS,
        max_position_embeddings=16, use_cache=False, attn_implementation=attention,
    )  # fmt: skip
    if family in ("llama", "mistral", "qwen2", "cohere"):
        prefix = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "cohere": "Cohere"}
        prefix = prefix[family]
        config = getattr(transformers, f"{prefix}Config")(**sizes)
        return getattr(transformers, f"{prefix}ForCausalLM")(config)
    if family in ("qwen3", "gemma", "gemma2", "nemotron"):
        prefix = {"qwen3": "Qwen3", "gemma": "Gemma", "gemma2": "Gemma2", "nemotron": "Nemotron"}
        prefix = prefix[family]
        config = getattr(transformers, f"{prefix}Config")(head_dim=LLAMA_HEAD_DIM, **sizes)
        return getattr(transformers, f"{prefix}ForCausalLM")(config)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(head_dim=LLAMA_HEAD_DIM, **sizes)
        return transformers.Gemma3ForCausalLM(config)
    config = transformers.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **sizes)
    return transformers.Phi3ForCausalLM(config)


def _decoder_points(family: str, masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Output features zeroed by the reference: a dropped kv head's k and v rows and the q
    rows of every query head it serves; the MLP's hidden neurons at gate and up."""
    points = {}
    for layer in range(2):
        a = f"model.layers.{layer}"
        fused = family == "phi3"
        heads = masks[f"{a}.self_attn.{'qkv_proj' if fused else 'q_proj'}"]
        mlp = {"phi3": ("gate_up_proj",), "nemotron": ("up_proj",)}.get(family)
        neurons = masks[f"{a}.mlp.{mlp[0] if mlp else 'gate_proj'}"]
        q = heads.repeat_interleave(QUERY_HEADS_PER_KV * LLAMA_HEAD_DIM)
        kv = heads.repeat_interleave(LLAMA_HEAD_DIM)
        if fused:
            points[f"{a}.self_attn.qkv_proj"] = torch.cat([q, kv, kv])
            points[f"{a}.mlp.gate_up_proj"] = torch.cat([neurons, neurons])
            continue
        points[f"{a}.self_attn.q_proj"] = q
        for proj in ("k_proj", "v_proj"):
            points[f"{a}.self_attn.{proj}"] = kv
        for proj in mlp or ("gate_proj", "up_proj"):
            points[f"{a}.mlp.{proj}"] = neurons
    return points


@pytest.mark.parametrize(
    ("family", "attention", "padded"),
    [
        ("llama", "sdpa", False),
        ("llama", "sdpa", True),
        ("llama", "eager", True),
        ("mistral", "sdpa", True),
        ("qwen2", "sdpa", False),
        ("gemma", "sdpa", False),
        ("gemma2", "eager", False),
        ("gemma3", "sdpa", True),
        ("qwen3", "sdpa", False),
        ("phi3", "sdpa", False),
        ("nemotron", "sdpa", False),
        ("cohere", "sdpa", False),
    ],
    ids=[
        "llama-sdpa-enable_gqa",
        "llama-sdpa-repeat_kv",
        "llama-eager-repeat_kv-matmul",
        "mistral-padded",
        "qwen2-biases",
        "gemma",
        "gemma2-post-norms-softcap",
        "gemma3-post-norms-head-norms",
        "qwen3-head-norms",
        "phi3-fused",
        "nemotron-relu-squared",
        "cohere-interleaved-rotary",
    ],
)
def test_grouped_query_attention_prunes_kv_heads_with_their_query_heads(family, attention, padded):
    """transformers runs grouped-query attention as sdpa with enable_gqa (no mask), as
    repeat_kv then sdpa (a padding mask) or repeat_kv then matmul/softmax (eager). Each was
    three groups (q, k, v) with k and v scattered to full width; each is now one group of kv
    heads per layer, compact through attention, equal to the reference. Qwen3's per-head
    norms (rsqrt), Phi-3's chunked gate/up, Nemotron's square and Cohere's interleaved
    rotary halves (stack) were scattered too. Gemma 2/3's post-norms (written out) made the
    layers before them groups of their own; they stay dense now, like Llama's."""
    torch.manual_seed(0)
    model = _decoder(family, attention).double()
    reference = copy.deepcopy(model)
    ids = _text_inputs()[0]
    kwargs = {"labels": ids}
    if padded:
        kwargs["attention_mask"] = (torch.arange(8) < torch.tensor([[8], [6], [7]])).long()
    sparse = sparsefx.transform(model, (ids,), example_kwargs=kwargs, density=0.5)
    groups = sparsefx.groups(sparse)
    heads = [g for g in groups if "self_attn" in g.name]
    assert len(groups) == 4 and len(heads) == 2, [g.name for g in groups]
    assert all(g.size == KV_HEADS for g in heads)
    assert not sparse.analysis.scatters, sparse.analysis.scatters

    masks = _random_masks(groups, seed=4)
    sparsefx.set_masks(sparse, masks)
    out = sparse(ids, **kwargs)
    out.loss.backward()
    with _masked_features(reference, _decoder_points(family, masks)):
        expected = reference(ids, **kwargs)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits)
    for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=pname)


def test_llama_stream_read_by_its_written_out_rms_norm_stays_dense_under_prune_streams():
    """Llama's RMSNorm is pow, mean and rsqrt: with `prune_streams` its stream was a group
    that every norm read through a scatter (exact, not faster). The mean over the features
    now blocks it, as `rms_norm` and `layer_norm` block GPT-2's and BERT's."""
    ids = _text_inputs()[0]
    config = sparsefx.SparseConfig(density=0.5, prune_streams=True)
    sparse = sparsefx.transform(_decoder(), (ids,), example_kwargs={"labels": ids}, config=config)
    assert not any(g.stream for g in sparsefx.groups(sparse))
    reasons = {d.node: d.reason for d in sparse.analysis.dense}
    assert "normalised across features by a decomposed norm" in reasons["embedding"], reasons


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"new_decoder_architecture": True, "num_kv_heads": 2},
        {"multi_query": False, "bias": True},
        {"multi_query": False, "alibi": True},
    ],
    ids=["multi-query", "grouped-query", "multi-head-biases", "alibi"],
)
def test_falcon_layers_written_as_matmuls_train_sparse_and_match_reference(options):
    """Falcon's `FalconLinear` computes ``x @ W.T (+ b)``: sparsefx found nothing to prune
    and trained Falcon dense. Its MLP neurons are groups now (bias folded in), and its
    heads are pruned in the fused qkv projection, compact through attention (its split of
    q, k and v is an ``unbind``/``select`` of another dim). With a single kv head, its query
    heads were pruned in the projection only: rotary q ended their chain, and attention read
    q at full width. The chain now goes through rotary's branches to where they meet, and
    on through attention (`test_gpt_bigcode_prunes_query_heads_through_multi_query_attention`).
    ALiBi's per-head bias (a dense mask of every head) is read at the kept heads."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        use_cache=False, **options,
    )  # fmt: skip
    model, reference, ids, sparse = _transformed_lm(transformers.FalconForCausalLM(config))
    groups = sparsefx.groups(sparse)
    mlp = [g for g in groups if g.name.endswith("dense_h_to_4h")]
    assert len(mlp) == 2 and all(g.size == 128 for g in mlp)
    assert all(g.name.split("#")[0].endswith("query_key_value") for g in groups if g not in mlp)
    assert (("transformer.h.0.mlp.dense_h_to_4h.bias", 0) in mlp[0].members) == ("bias" in options)
    heads = [g for g in groups if ("transformer.h.0.self_attention.dense.weight", 1) in g.members]
    assert len(heads) == 1  # the first layer's query heads prune its output projection
    # one kv head (no options) is cut from the projection as a part of one channel: dense
    # features of its layout (until 2026-12-07 a group that kept it, scattered at a reshape)
    assert not sparse.analysis.scatters, sparse.analysis.scatters

    _assert_lm_matches_reference(sparse, model, reference, ids)


@pytest.mark.parametrize("multi_query", [True, False], ids=["multi-query", "multi-head"])
def test_gpt_bigcode_prunes_query_heads_through_multi_query_attention(multi_query):
    """GPTBigCode (StarCoder) computes one k and v head that every query head reads. Its
    query heads were pruned in the fused c_attn only: zero at q, a dropped head still
    output the mean of v, so attention read q at full width and c_proj stayed dense. Each
    output head is a function of its own q head, so attention now continues q's chain: the
    mask point is c_proj's input, and the query heads' group prunes c_proj's columns. k and
    v's features are groups of their own, read at full width by attention."""
    torch.manual_seed(0)
    config = transformers.GPTBigCodeConfig(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, use_cache=False,
        multi_query=multi_query, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model, reference, ids, sparse = _transformed_lm(transformers.GPTBigCodeForCausalLM(config))
    groups = sparsefx.groups(sparse)
    heads = [g for g in groups if any(m[0].endswith("attn.c_proj.weight") for m in g.members)]
    assert [g.size for g in heads] == [4, 4]
    assert len(groups) == (8 if multi_query else 4)  # + k's and v's features with one kv head
    reads = {s.reason for s in sparse.analysis.scatters}
    assert reads == (
        {"attention reads k and v whole: only its query heads are pruned"} if multi_query else set()
    )

    masks = _random_masks(groups, seed=3)
    sparsefx.set_masks(sparse, masks)
    points = _producer_points(groups, masks)
    with _masked_features(reference, _consumer_points(groups, masks), inputs=True):
        _assert_classifier_matches_and_exports(sparse, model, reference, (ids, ids), points)


def test_llama_with_one_kv_head_prunes_query_heads_with_o_proj():
    """Llama with one key/value head (multi-query): rotary q's two branches meet again and
    attention continues the query heads' chain, so `o_proj`'s columns are theirs. The single
    k head's rotary halves are pruned per feature and read at full width (it was so before)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=16,
        use_cache=False,
    )  # fmt: skip
    model, reference, ids, sparse = _transformed_lm(transformers.LlamaForCausalLM(config))
    groups = sparsefx.groups(sparse)
    (heads,) = [g for g in groups if ("model.layers.0.self_attn.o_proj.weight", 1) in g.members]
    assert heads.name == "model.layers.0.self_attn.q_proj" and heads.size == 4
    _assert_lm_matches_reference(sparse, model, reference, ids)


@pytest.mark.parametrize(
    ("family", "attention"), [("Olmo2", "sdpa"), ("Olmo3", "sdpa"), ("Olmo2", "eager")]
)
def test_olmo_prunes_value_heads_with_o_proj_while_its_normalised_q_and_k_stay_dense(
    family, attention
):
    """OLMo 2 and 3 normalise q and k across all heads (an RMSNorm over the projection's
    features), so q and k cannot be pruned by head, and attention tied v's heads to them:
    the whole attention was dense. q and k are now left dense on their own and attention
    is pruned by v's heads (read at them in q and k after repeat_kv, or in the
    probabilities of the eager matmul form), with o_proj's columns."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
        use_cache=False, attn_implementation=attention,
    )  # fmt: skip
    lm = getattr(transformers, f"{family}ForCausalLM")(config)
    model, reference, ids, sparse = _transformed_lm(lm)
    groups = {g.name: g for g in sparsefx.groups(sparse)}
    for layer in range(2):
        block = f"model.layers.{layer}.self_attn"
        heads = groups[f"{block}.v_proj"]
        assert heads.size == 2 and (f"{block}.o_proj.weight", 1) in heads.members
    dense = {op.node: op.reason for op in sparse.analysis.dense}
    assert "left dense on its own" in dense["linear"]  # q_proj
    assert not sparse.analysis.scatters
    _assert_lm_matches_reference(sparse, model, reference, ids)


@pytest.mark.parametrize("family", ["Olmoe", "Qwen2Moe"])
def test_moe_routers_and_one_channel_gates_stay_dense(family):
    """A router's softmax over the experts normalises across them like a LayerNorm (a
    dropped expert's logit 0 stays in the denominator and may still win the top-k): the
    router was a group of its own that saved only its rows and changed the routing; it
    now stays dense with that reason. Qwen2-MoE's shared-expert gate (one output channel)
    was a group that could never drop its channel, and its per-token broadcast made the
    shared expert's down_proj scatter into the stream as a group of its own; the gate is
    dense now, so down_proj stays dense like any stream writer."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, use_cache=False,
        experts_implementation="batched_mm",  # grouped_mm (the default) has no float64
    )  # fmt: skip
    lm = getattr(transformers, f"{family}ForCausalLM")(config)
    model, reference, ids, sparse = _transformed_lm(lm)
    names = sorted(g.name for g in sparsefx.groups(sparse))
    layers = ("model.layers.0", "model.layers.1")
    if family == "Olmoe":  # q and k normalised across heads: attention pruned by v's heads
        assert names == [f"{a}.self_attn.v_proj" for a in layers]
    else:
        assert names == [
            f"{a}.{p}" for a in layers for p in ("mlp.shared_expert.gate_proj", "self_attn.q_proj")
        ]
    reasons = [op.reason for op in sparse.analysis.dense]
    assert sum(r.startswith("normalised across features by softmax") for r in reasons) == 2
    assert (
        sum(r.startswith("one channel: policy.keep_minimum") for r in reasons)
        == (family == "Qwen2Moe") * 2
    )
    assert not sparse.analysis.scatters
    _assert_lm_matches_reference(sparse, model, reference, ids)


def _transformed_lm(model: nn.Module) -> tuple[nn.Module, nn.Module, Tensor, nn.Module]:
    """A causal LM in float64, its reference copy, token ids, and it transformed with
    `labels=` at density 0.5."""
    model = model.double()
    reference = copy.deepcopy(model)
    ids = _text_inputs()[0]
    sparse = sparsefx.transform(model, (ids,), example_kwargs={"labels": ids}, density=0.5)
    return model, reference, ids, sparse


def _assert_lm_matches_reference(
    sparse: nn.Module, model: nn.Module, reference: nn.Module, ids: Tensor
) -> None:
    """A causal LM's sparse step under random masks against `reference` zeroed at its
    producers' outputs and its consumers' inputs: logits and every gradient."""
    groups = sparsefx.groups(sparse)
    masks = _random_masks(groups, seed=3)
    sparsefx.set_masks(sparse, masks)
    out = sparse(ids, labels=ids)
    out.loss.backward()
    with (
        _masked_features(reference, _producer_points(groups, masks)),
        _masked_features(reference, _consumer_points(groups, masks), inputs=True),
    ):
        expected = reference(ids, labels=ids)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits)
    for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=pname)


def _producer_points(groups: list[sparsefx.Group], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each producer's kept output features, over the groups that own parts of them (q, k
    and v of a fused projection): the reference zeroes the rest at the producer's output."""
    return _kept_features(groups, masks, inputs=False)


def _consumer_points(groups: list[sparsefx.Group], masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each consumer's kept input features (dim 1 of an ``nn.Linear`` weight that a group
    owns outside its producer): where attention continues a query chain, the reference
    zeroes dropped heads at the output projection's input, not at q."""
    return _kept_features(groups, masks, inputs=True)


def _kept_features(
    groups: list[sparsefx.Group], masks: dict[str, Tensor], inputs: bool
) -> dict[str, Tensor]:
    points: dict[str, Tensor] = {}
    for group in groups:
        producer = group.name.split("#")[0]
        owned = group.expand(torch.ones(group.size, dtype=torch.bool))
        for (name, dim, mine), (_, _, keep) in zip(
            owned, group.expand(masks[group.name]), strict=True
        ):
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and (module != producer) == inputs and dim == inputs:
                points[module] = points.get(module, torch.ones_like(keep)) & (keep | ~mine)
    return points


def _hf_cases() -> dict[str, tuple]:
    """Model factory, (inputs, labels), options and training steps of each real model."""
    cases = {"resnet": (_resnet, _resnet_batch, RESNET_OPTIONS, 40)}
    for name, (build, _, inputs, _) in TRANSFORMERS.items():
        cases[name] = (build, inputs, {"density": 0.5, "seed": 0}, 30)
    cases["llama-gqa"] = (_decoder, TRANSFORMERS["gpt2"][2], {"density": 0.5, "seed": 0}, 30)
    return cases


@pytest.mark.parametrize("name", list(_hf_cases()))
def test_compiled_step_equals_transform_step_then_training_loss_falls(name):
    """torch.compile(backend="sparsefx") computes what `transform` does under the same masks
    (transform equals the reference above), gradients of every parameter included; then,
    sampling again, its training loss falls as `transform`'s does. One test, so that Inductor
    compiles each model's graphs once (a cold compile is most of the suite's time)."""
    build, inputs, options, steps = _hf_cases()[name]
    torch.manual_seed(0)
    model = build()
    twin = copy.deepcopy(model)
    x, labels = inputs()
    eager = _transformed(model, x, labels, options)
    compiled = torch.compile(twin, backend="sparsefx", options=options)
    twin.eval()
    compiled(x, labels=labels)  # compiles, so the runtime exists for set_masks
    twin.train()
    masks = _random_masks(sparsefx.groups(eager), seed=5)
    sparsefx.set_masks(eager, masks)
    sparsefx.set_masks(compiled, masks)
    expected, out = eager(x, labels=labels), compiled(x, labels=labels)
    expected.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-4)
    for (pname, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=pname, atol=1e-5, rtol=1e-4)
    sparsefx.unfreeze(compiled)
    _assert_loss_falls(compiled, twin, x, labels, steps)


def test_compiled_gpt2_follows_batch_and_sequence_length_changes():
    """After a new batch size or sequence length Dynamo recompiles with symbolic sizes, and
    GPT-2's Conv1D (``view(-1, C)``, addmm, ``view(B, T, out)``) merges and splits them:
    the heads and MLP neurons stay prunable groups, and every shape computes what
    `transform` computes under the same masks. With an attention mask, both sizes changing
    at once made the first layer's head split a view to constant SymInts, which read as
    dynamic sizes: its q, k and v became feature groups and the compile failed."""
    torch.manual_seed(0)
    model = _gpt2()
    twin = copy.deepcopy(model)
    x, labels = _text_inputs()[:2]
    options = {"density": 0.5, "seed": 0}
    eager = _transformed(model, x, labels, options)
    compiled = torch.compile(twin, backend="sparsefx", options=options)
    compiled(x, labels=labels, attention_mask=_padding_mask(x))
    masks = _random_masks(sparsefx.groups(eager), seed=5)
    sparsefx.set_masks(eager, masks)
    sparsefx.set_masks(compiled, masks)
    for batch, length, padded in ((5, 12, True), (3, 6, False), (4, 8, False)):
        ids = torch.randint(0, 64, (batch, length))
        kwargs = {"labels": ids, "attention_mask": _padding_mask(ids) if padded else None}
        expected, out = eager(ids, **kwargs), compiled(ids, **kwargs)
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-4)
        covered = [
            [(g.name, g.size, g.members) for g in sparsefx.groups(m)] for m in (compiled, eager)
        ]
        assert covered[0] == covered[1]  # mask points are named per graph


def _padding_mask(ids: Tensor) -> Tensor:
    """An attention mask that hides every sequence's first token (left padding)."""
    return torch.ones_like(ids).index_fill_(1, torch.tensor([0]), 0)


def test_gpt2_with_its_cache_on_says_to_turn_it_off():
    """GPT2Config's default use_cache=True returns a DynamicCache, which torch.export cannot
    flatten: the capture error names the option rather than blaming tracing."""
    config = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(sparsefx.CaptureError, match=r"use_cache=False"):
        sparsefx.transform(
            transformers.GPT2LMHeadModel(config),
            (ids,),
            example_kwargs={"labels": ids},
            density=0.5,
        )


_SWIN_SIZES = dict(
    image_size=16, patch_size=4, embed_dim=16, depths=[2], num_heads=[2], window_size=2,
    mlp_ratio=2.0, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    drop_path_rate=0.0,
)  # fmt: skip
"""One stage of two blocks (the second shifted), two heads, windows of 2x2 patches."""


def _swin() -> nn.Module:
    return transformers.SwinForImageClassification(transformers.SwinConfig(**_SWIN_SIZES))


def _transformed_swin(
    build: Callable[[], nn.Module],
) -> tuple[nn.Module, nn.Module, tuple[Tensor, Tensor], nn.Module]:
    """A float64 Swin-family classifier, an untouched copy for the reference, a batch of
    three images with labels, and the classifier transformed at density 0.5."""
    torch.manual_seed(0)
    model = build().double()
    reference = copy.deepcopy(model)
    x, labels = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 2, 1])
    sparse = sparsefx.transform(model, (x,), example_kwargs={"labels": labels}, density=0.5)
    return model, reference, (x, labels), sparse


def test_swin_prunes_heads_with_their_relative_position_bias():
    """Swin adds a per-head bias to attention, its table read at each pair of window
    positions (``table[index]``), and the shifted block a window mask shared by the heads.
    The bias kept attention at full width; read as an embedding whose columns are heads it
    couples with q, k and v, and attention runs on the kept heads."""
    model, reference, batch, sparse = _transformed_swin(_swin)
    groups = sparsefx.groups(sparse)
    blocks = [f"swin.encoder.layers.0.blocks.{b}.attention" for b in range(2)]
    heads = [g for g in groups if g.size == 2]
    assert len(heads) == 2
    for group, block in zip(heads, blocks, strict=True):
        table = f"{block}.relative_position_bias.relative_position_bias_table"
        assert (table, 1) in group.members and (f"{block}.o_proj.weight", 1) in group.members
        assert {f"{block}.{p}_proj.weight" for p in "qkv"} <= {name for name, _ in group.members}
    assert "read at full width (a scatter before them): none" in sparsefx.explain(sparse)

    masks = _random_masks(groups, seed=4)
    sparsefx.set_masks(sparse, masks)
    points = {}
    for group, block in zip(heads, blocks, strict=True):
        points |= {f"{block}.{p}_proj": _heads(masks[group.name]) for p in "qkv"}
        mlp = block.replace("attention", "mlp.fc1")
        points[mlp] = masks[mlp]
    _assert_classifier_matches_and_exports(sparse, model, reference, batch, points)


def _assert_classifier_matches_and_exports(
    sparse: nn.Module,
    model: nn.Module,
    reference: nn.Module,
    batch: tuple[Tensor, Tensor],
    points: dict[str, Tensor],
) -> None:
    """An image classifier's sparse step (masks set) against `reference` with `points`
    masked: logits and every gradient; then frozen and exported, the program computes the
    frozen model's logits (run with grad enabled, as users call it; a bias read at the kept
    heads is a sliced constant there)."""
    x, labels = batch
    out = sparse(x, labels=labels)
    out.loss.backward()
    with _masked_features(reference, points):
        expected = reference(x, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits)
    for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=pname)
    sparsefx.freeze(sparse)
    program = sparsefx.export(sparse.eval(), (x,))
    with torch.no_grad():
        frozen = sparse(x).logits
    (logits,) = torch.utils._pytree.tree_leaves(program.module()(x))
    torch.testing.assert_close(logits, frozen)


def _swinv2() -> nn.Module:
    return transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**_SWIN_SIZES))


def test_swinv2_cosine_attention_prunes_heads_with_their_bias_mlp():
    """Swinv2 normalises q and k per head (F.normalize: a norm over each head's features,
    clamped, expanded and divided by), scales the scores by a per-head temperature, and adds
    a per-head bias that an MLP computes and a table index reads. Each step scattered: q, k
    and v were separate groups read at full width, and the MLP's output layer a group of its
    own. Now the attention's heads are one group with the bias MLP's output rows, the
    temperature is read at the kept heads, and nothing scatters."""
    model, reference, batch, sparse = _transformed_swin(_swinv2)
    groups = sparsefx.groups(sparse)
    blocks = [f"swinv2.encoder.layers.0.blocks.{b}.attention" for b in range(2)]
    heads = [g for g in groups if g.size == 2]
    assert [g.name for g in heads] == [f"{b}.self.query" for b in blocks]
    for group, block in zip(heads, blocks, strict=True):
        members = {name for name, _ in group.members}
        bias_mlp = f"{block}.self.continuous_position_bias_mlp.2.weight"
        assert {f"{block}.self.{p}.weight" for p in ("query", "key", "value")} <= members
        assert {bias_mlp, f"{block}.output.dense.weight"} <= members
    assert not sparse.analysis.scatters, sparse.analysis.scatters

    masks = _random_masks(groups, seed=4)
    sparsefx.set_masks(sparse, masks)
    points = {}
    for group, block in zip(heads, blocks, strict=True):
        points |= {
            f"{block}.self.{p}": _heads(masks[group.name]) for p in ("query", "key", "value")
        }
        mlp = block.replace("attention", "intermediate.dense")
        bias_mlp = f"{block}.self.continuous_position_bias_mlp.0"
        points |= {mlp: masks[mlp], bias_mlp: masks[bias_mlp]}
    _assert_classifier_matches_and_exports(sparse, model, reference, batch, points)


def _t5(layers: int, attention: str = "sdpa") -> nn.Module:
    config = transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=HEAD_DIM, d_ff=32, num_layers=layers,
        num_decoder_layers=layers, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0,
        attn_implementation=attention,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


def _t5_inputs() -> tuple[Tensor, Tensor, Tensor]:
    """Encoder ids, decoder labels of another length, and a padding mask for the ids."""
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    return ids, labels, _padding_mask(ids)


def _t5_attentions(layers: int) -> list[str]:
    encoder = [f"encoder.block.{b}.layer.0.SelfAttention" for b in range(layers)]
    decoder = [
        f"decoder.block.{b}.layer.{i}.{kind}"
        for b in range(layers)
        for i, kind in enumerate(("SelfAttention", "EncDecAttention"))
    ]
    return encoder + decoder


@pytest.mark.parametrize(("layers", "attention"), [(2, "sdpa"), (1, "sdpa"), (2, "eager")])
def test_t5_prunes_each_layers_heads_with_its_relative_position_bias(layers, attention):
    """T5's first layer computes a relative-position bias, a table lookup whose columns are
    heads, and every layer of its stack adds it to the attention scores (SDPA's mask, where
    the padding mask holds; an ``add`` to explicit scores in the eager form); cross-attention
    adds zeros of that shape. The bias became a group of its own, q, k and v separate groups,
    and attention ran at full width (eager: the add joined q and k to the table as a residual
    stream, kept dense). Now q, k, v and o are one group per attention: a bias that several
    layers read stays dense and each reads its own kept heads of it; one read by a single
    attention is pruned with its heads."""
    torch.manual_seed(0)
    model = _t5(layers, attention).double()
    reference = copy.deepcopy(model)
    ids, labels, padding = _t5_inputs()
    kwargs = {"labels": labels, "attention_mask": padding}
    sparse = sparsefx.transform(model, (ids,), example_kwargs=kwargs, density=0.5)
    groups = sparsefx.groups(sparse)
    attentions = _t5_attentions(layers)
    heads = [g for g in groups if g.size == 4]
    assert [g.name for g in heads] == [f"{a}.q" for a in attentions]
    for group, attention in zip(heads, attentions, strict=True):
        members = {(f"{attention}.{p}.weight", 0) for p in "qkv"} | {(f"{attention}.o.weight", 1)}
        if layers == 1 and attention.endswith("SelfAttention"):  # the bias, one reader
            members.add((f"{attention}.relative_attention_bias.weight", 1))
        assert set(group.members) == members
    assert not sparse.analysis.scatters, sparse.analysis.scatters
    shared = [op.node for op in sparse.analysis.dense if "several attentions read" in op.reason]
    assert len(shared) == (2 if layers > 1 else 0)  # the encoder's bias and the decoder's

    masks = _random_masks(groups, seed=4)
    sparsefx.set_masks(sparse, masks)
    out = sparse(ids, **kwargs)
    out.loss.backward()
    points = {f"{a}.{p}": _heads(masks[f"{a}.q"]) for a in attentions for p in "qkv"}
    points |= {g.name: masks[g.name] for g in groups if g.name.endswith("DenseReluDense.wi")}
    with _masked_features(reference, points):
        expected = reference(ids, **kwargs)
    expected.loss.backward()
    torch.testing.assert_close(out.logits, expected.logits)
    for (pname, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=pname)

    sparsefx.freeze(sparse)  # the exported program reads the bias at the frozen heads too
    inference = {"decoder_input_ids": labels, "attention_mask": padding}
    program = sparsefx.export(sparse.eval(), (ids,), example_kwargs=inference)
    with torch.no_grad():
        frozen = sparse(ids, **inference).logits
    (logits, *_) = torch.utils._pytree.tree_leaves(program.module()(ids, **inference))
    torch.testing.assert_close(logits, frozen)
