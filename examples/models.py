"""Model factories for ``sparsefx diff`` (random weights, nothing downloaded)::

    sparsefx diff examples/models.py:mobilenet_v2 --density 0.25
    sparsefx diff examples/models.py:hf_resnet --html resnet.html
    sparsefx diff examples/models.py:gpt2 --mode compile

A factory returns a model, or ``(model, example_inputs)`` where the inputs are a tensor, a
tuple of forward arguments, or a dict of keyword arguments; ``--input-shape`` or
``--inputs FILE.pt`` on the command line override them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual add."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 images (CIFAR strides): inverted residuals with depthwise
    convolutions, the coupling issue's MobileNetV2-style net at a realistic depth."""

    # expansion, output channels, blocks, first stride
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 2, 2), (6, 96, 1, 1))

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        )
        blocks, cin = [], 32
        for expand, cout, n, stride in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Conv2d(cin, 320, 1, bias=False), nn.BatchNorm2d(320), nn.ReLU6()
        )
        self.classifier = nn.Linear(320, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


def mobilenet_v2() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return MobileNetV2(), torch.randn(2, 3, 32, 32)


def hf_resnet_model() -> nn.Module:
    """Hugging Face ResNet-18 layout (basic blocks, 64..512 channels), 10 labels: the issue's
    model, shared with benchmarks/real_models.py."""
    import transformers

    config = transformers.ResNetConfig(
        layer_type="basic",
        embedding_size=64,
        hidden_sizes=[64, 128, 256, 512],
        depths=[2, 2, 2, 2],
        num_labels=10,
        problem_type="single_label_classification",  # HF sets it on the first call otherwise
    )
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(config)


def gpt2_model() -> nn.Module:
    """A small Hugging Face GPT-2 (vocab 512, 4 layers, 8 heads, n_embd 256, context 128):
    the issue's model, shared with benchmarks/real_models.py."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=512, n_embd=256, n_layer=4, n_head=8, n_positions=128, use_cache=False
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def gpt_bigcode_model() -> nn.Module:
    """A small Hugging Face GPTBigCode (StarCoder's architecture) sized like `gpt2_model`:
    multi-query attention, 8 query heads reading one key/value head."""
    import transformers

    config = transformers.GPTBigCodeConfig(
        vocab_size=512, n_embd=256, n_layer=4, n_head=8, n_positions=128, use_cache=False,
        multi_query=True, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.GPTBigCodeForCausalLM(config)


DECODER_SIZES = dict(
    vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, use_cache=False,
)  # fmt: skip
"""The Llama-style decoders' sizes: 8 query heads on 4 key/value heads, hidden 256, MLP 704."""


def llama_model() -> nn.Module:
    """A small Hugging Face Llama with grouped-query attention (8 query heads share 4
    key/value heads), sized like `gpt2_model`: vocab 512, hidden 256, MLP 704, 4 layers."""
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**DECODER_SIZES))


def olmo2_model() -> nn.Module:
    """A small Hugging Face OLMo 2 sized like `llama_model`: q and k normalised across all
    heads (an RMSNorm over each projection), so attention is pruned by v's heads."""
    import transformers

    torch.manual_seed(0)
    return transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**DECODER_SIZES))


def gemma2_model() -> nn.Module:
    """A small Hugging Face Gemma 2 sized like `llama_model` (head dim 32): its blocks
    normalise their outputs before the stream (post-norms) and soft-cap attention logits,
    which needs its eager attention."""
    import transformers

    config = transformers.Gemma2Config(head_dim=32, attn_implementation="eager", **DECODER_SIZES)
    torch.manual_seed(0)
    return transformers.Gemma2ForCausalLM(config)


def falcon_model(multi_query: bool = False) -> nn.Module:
    """A small Hugging Face Falcon (its newer layout: 8 query heads share 4 key/value heads
    in one fused projection; with `multi_query`, Falcon-7B's layout: one key/value head)
    sized like `llama_model`, its MLP 4x the hidden size; its layers compute ``x @ W.T``."""
    import transformers

    layout = {"num_kv_heads": 4, "new_decoder_architecture": True}
    if multi_query:
        layout = {"multi_query": True}
    config = transformers.FalconConfig(
        vocab_size=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
        use_cache=False, **layout,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.FalconForCausalLM(config)


def t5_model(attention: str = "sdpa") -> nn.Module:
    """A small Hugging Face T5 (encoder-decoder) sized like `gpt2_model`: 4 + 4 layers of
    width 256, 8 heads of 32, ReLU MLP 1024, each stack's relative-position bias shared by
    its layers; ``attention="eager"`` adds the bias to explicit scores."""
    import transformers

    config = transformers.T5Config(
        vocab_size=512, d_model=256, d_kv=32, d_ff=1024, num_layers=4, num_heads=8,
        dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0,
        attn_implementation=attention,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


def swinv2_model() -> nn.Module:
    """A small Hugging Face Swinv2 for 32x32 images: patches of 2, width 64 then 128, 2 + 2
    blocks (every second one shifted) with 4 then 8 heads, windows of 4 positions, cosine
    attention whose per-head bias an MLP computes; 10 labels."""
    import transformers

    config = transformers.Swinv2Config(
        image_size=32, patch_size=2, embed_dim=64, depths=[2, 2], num_heads=[4, 8],
        window_size=4, num_labels=10, drop_path_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.Swinv2ForImageClassification(config)


class LanguageModelOutput(NamedTuple):
    loss: Tensor
    logits: Tensor


class TorchEncoderLM(nn.Module):
    """A causal language model built from PyTorch's own layers, sized like `gpt2_model`:
    token and position embeddings, ``nn.TransformerEncoder`` (4 post-norm layers of
    ``nn.MultiheadAttention`` with 8 heads and a ReLU MLP of 1024), a linear head; called
    as ``model(input_ids, labels=ids)`` like a Hugging Face model."""

    def __init__(self, vocab: int = 512, width: int = 256, context: int = 128):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: Tensor, labels: Tensor) -> LanguageModelOutput:
        length = input_ids.shape[1]
        h = self.tokens(input_ids) + self.positions(torch.arange(length))
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        logits = self.head(self.encoder(h, mask=causal, is_causal=True))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return LanguageModelOutput(loss, logits)


def torch_encoder_model() -> nn.Module:
    torch.manual_seed(0)
    return TorchEncoderLM()


def hf_resnet() -> tuple[nn.Module, Tensor]:
    model = hf_resnet_model()
    return model, torch.randn(2, 3, 32, 32)


def gpt2() -> tuple[nn.Module, dict[str, Any]]:
    """GPT-2 with its LM loss (``labels=``) on 2 sequences of 64 tokens."""
    model = gpt2_model()
    ids = torch.randint(0, 512, (2, 64))
    return model, {"input_ids": ids, "labels": ids}


def torch_encoder() -> tuple[nn.Module, dict[str, Any]]:
    """`TorchEncoderLM` (nn.TransformerEncoder) with its LM loss on 2 sequences of 64
    tokens: ``sparsefx diff examples/models.py:torch_encoder`` shows its heads pruned."""
    model = torch_encoder_model()
    ids = torch.randint(0, 512, (2, 64))
    return model, {"input_ids": ids, "labels": ids}


def llama() -> tuple[nn.Module, dict[str, Any]]:
    """Llama (grouped-query attention) with its LM loss on 2 sequences of 64 tokens."""
    model = llama_model()
    ids = torch.randint(0, 512, (2, 64))
    return model, {"input_ids": ids, "labels": ids}
