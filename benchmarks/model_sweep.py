"""Model coverage sweep: Hugging Face `transformers` architectures (text encoders,
encoder-decoders, audio, vision), each built tiny with random weights, through sparsefx:
what the analysis makes of each, and whether the transformed model computes what the model
computes.

    python benchmarks/model_sweep.py [--cases bert,vit] [--list] [--structure-only]
        [--dtype float32] [--compiled] [--json OUT.json] [--compare OLD.json] [--log LOG]

Each case runs in a child process of its own, so that a crash or a hang (`--timeout`) costs
that case only:

1. structure: ``sparsefx.transform(model, (), example_kwargs={**inputs, "labels": labels},
   density=0.5)``; the groups (name, size, residual stream), the scatters and the ops left
   dense, with the analysis' reasons.
2. eval: every mask all ones (`sparsefx.set_masks`), eval mode: the logits equal the model's.
3. grads: every mask all ones, train mode: the logits and every parameter's gradient of
   ``logits.square().mean()`` equal the model's.
4. dropped: random masks: the features a group owns and its mask drops get exactly zero
   gradient, and perturbing them leaves the logits bitwise unchanged.
5. train: 3 SGD steps on the model's own loss under sampled masks give finite losses.
6. compiled (`--compiled`): ``torch.compile(backend="sparsefx")`` under the random masks of
   check 4 equals the transformed model, logits and gradients. One Inductor compile per model,
   minutes on a CPU, so off by default; past `--compile-limit` seconds the check is skipped.

Float64 by default, which tells float32 rounding from real mismatches: "equal" means within
a relative 1e-9 (float64) or 1e-4 (`--dtype float32`) of the reference tensor's largest
magnitude (for gradients, of that parameter's). Every model is built from a tiny config with
random init (nothing is downloaded), its dropout-like config fields zeroed (two
training-mode runs would otherwise draw different noise), and fed inputs from a seeded
generator, so a sweep is deterministic. A case that the installed `transformers` cannot build
(an optional dependency missing, a config field renamed) is reported as such; the few models
that cannot run in float64 run in float32, which the table shows beside their name. Models
that compute some ops in float32 whatever the dtype (BLOOM, ESM, XLNet, ModernBERT:
`Case.float32_inside`) meet float32's tolerance in the compiled check only, where Inductor's
kernels for those ops round differently from the model's own; the JSON records each compiled
check's `rtol`.

`--json OUT` writes every result; `--compare OLD.json` prints, per model, what changed in
groups, scatters, dense reasons and check results against an earlier `--json`: run
`--structure-only --json before.json` (the analysis alone), change the analysis, then
`--structure-only --compare before.json` to see every model it affects. On a 2-core VM the
73 cases take about 12 minutes, 10 with `--structure-only`: starting each case's process
(importing torch, transformers and sparsefx) is most of a case's time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from common import environment, format_table
from torch import Tensor, nn

import sparsefx

SPARSEFX_DIR = Path(sparsefx.__file__).resolve().parent
DENSITY = 0.5
SGD_STEPS = 3
# Equal within RTOL[dtype] of the reference tensor's largest magnitude.
RTOL = {"float64": 1e-9, "float32": 1e-4}

B, NUM_LABELS, T_ENC, T_DEC, VOCAB = 4, 4, 12, 8, 99
LENGTHS = [12, 9, 6, 12]  # attention_mask rows: real lengths (the rest padding zeros)
AUDIO_SAMPLES = 800  # (800-10)/5+1 = 159 -> (159-3)/2+1 = 79 frames

Kind = Literal["text", "seq2seq", "audio", "whisper", "ast", "vision"]


@dataclass(frozen=True)
class Case:
    """A `transformers` model type: its head and inputs (`kind`) and its tiny config."""

    kind: Kind
    config: dict[str, Any]
    image_size: int = 32
    model_class: str | None = None
    """The class to build, where the auto class of `kind` does not give the classifier."""
    float32_only: bool = False
    """Runs in float32 whatever `--dtype` says: the model cannot run in float64."""
    float32_inside: str = ""
    """Where the model computes in float32 whatever the dtype. The compiled check runs those
    ops with Inductor's kernels against the model's own, so under float64 it holds the case
    to float32's tolerance; the other checks run the model's own kernels and keep float64's."""
    decoder_inputs: bool = False
    """Pass `decoder_input_ids` (the labels shifted right) and `decoder_attention_mask`, as a
    training loop may: the model derives them otherwise through a branch on data that
    torch.export cannot trace (FSMT's ``if not padding_mask.any()``, ProphetNet's
    ``assert torch.all(...).item()``)."""


_enc = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
_s2s = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    max_position_embeddings=64,
    use_cache=False,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
_w2v = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(16, 16),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    classifier_proj_size=16,
    apply_spec_augment=False,
)
_vit = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
_pyramid = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    hidden_sizes=[16, 32],
    patch_sizes=[7, 3],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
)  # PVT, PVTv2 and SegFormer: two stages of one block
_swin = dict(
    image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=2
)

CASES: dict[str, Case] = {
    # text encoders: sequence classification
    "bert": Case("text", dict(_enc)),
    "bloom": Case(
        "text",
        dict(
            vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=2, pad_token_id=0, use_cache=False
        ),
        float32_inside="its attention softmax",
    ),
    "roberta": Case("text", dict(_enc, pad_token_id=1)),
    "distilbert": Case(
        "text",
        dict(
            vocab_size=VOCAB,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=64,
        ),
    ),
    "albert": Case("text", dict(_enc, embedding_size=16)),
    "electra": Case("text", dict(_enc, embedding_size=16)),
    "deberta": Case(
        "text",
        dict(_enc, relative_attention=True, pos_att_type=["c2p", "p2c"], max_relative_positions=-1),
    ),
    "deberta-v2": Case(
        "text",
        dict(
            _enc,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            position_buckets=8,
            max_relative_positions=16,
            norm_rel_ebd="layer_norm",
            share_att_key=True,
        ),
    ),
    "xlm-roberta": Case("text", dict(_enc, pad_token_id=1)),
    "mpnet": Case("text", dict(_enc, pad_token_id=1)),
    "funnel": Case(
        "text",
        dict(
            vocab_size=VOCAB,
            block_sizes=[1, 1],
            block_repeats=[1, 1],
            num_decoder_layers=1,
            d_model=32,
            n_head=2,
            d_head=16,
            d_inner=64,
            max_position_embeddings=64,
        ),
    ),
    "esm": Case(
        "text",
        dict(_enc, pad_token_id=1, mask_token_id=2, position_embedding_type="rotary"),
        float32_inside="its rotary embedding (q.float())",
    ),
    "xlnet": Case(
        "text",
        dict(vocab_size=VOCAB, d_model=32, n_layer=2, n_head=2, d_inner=64),
        float32_inside="its sinusoidal position embedding",
    ),
    "big_bird": Case("text", dict(_enc, attention_type="original_full")),
    "canine": Case(
        "text",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            downsampling_rate=2,
            num_hash_buckets=64,
            num_hash_functions=2,
            local_transformer_stride=4,
        ),
        # its attention mask is float32 times float64's min: -inf, and 0 * -inf = NaN logits
        float32_only=True,
    ),
    "rembert": Case("text", dict(_enc, input_embedding_size=16, output_embedding_size=16)),
    # its attention computes in float32 (q, k, v cast), then meets float64 weights
    "mra": Case("text", dict(_enc, max_position_embeddings=66), float32_only=True),
    "yoso": Case("text", dict(_enc, use_expectation=True)),
    "convbert": Case(
        "text",
        dict(
            _enc,
            embedding_size=32,
            num_attention_heads=4,
            head_ratio=2,
            conv_kernel_size=3,
            num_groups=1,
        ),
    ),
    "squeezebert": Case(
        "text",
        dict(
            _enc,
            embedding_size=32,
            q_groups=2,
            k_groups=2,
            v_groups=2,
            post_attention_groups=2,
            intermediate_groups=4,
            output_groups=4,
        ),
    ),
    "mobilebert": Case(
        "text",
        dict(
            _enc,
            embedding_size=16,
            intermediate_size=32,
            intra_bottleneck_size=16,
            true_hidden_size=16,
            num_feedforward_networks=2,
        ),
    ),
    "roformer": Case("text", dict(_enc, embedding_size=32)),
    # HF 5.x: the Nystrom (landmark) path adds a 4-D (B,1,T,T) mask to (B,H,landmarks,T)
    # scores: it raises with any attention_mask, and under torch.export even without one
    # (HF materialises the all-ones mask when tracing). num_landmarks == seq len takes the
    # exact-attention path (the depthwise conv on values is still there).
    "nystromformer": Case(
        "text",
        dict(_enc, num_landmarks=T_ENC, segment_means_seq_len=T_ENC, conv_kernel_size=3),
    ),
    "megatron-bert": Case("text", dict(_enc)),
    "camembert": Case("text", dict(_enc, pad_token_id=1)),
    "ernie": Case("text", dict(_enc)),
    "modernbert": Case(
        "text",
        dict(
            _enc,
            global_attn_every_n_layers=2,
            local_attention=8,
            pad_token_id=0,
            bos_token_id=3,
            eos_token_id=4,
            cls_token_id=3,
            sep_token_id=4,
        ),
        float32_inside="its attention softmax and rotary embedding",
    ),
    # encoder-decoders: LM head, loss on the decoder's labels
    "bart": Case("seq2seq", dict(_s2s)),
    "mbart": Case("seq2seq", dict(_s2s)),
    "marian": Case(
        "seq2seq",
        dict(_s2s, pad_token_id=98, decoder_start_token_id=98, eos_token_id=0, bos_token_id=None),
    ),
    "pegasus": Case(
        "seq2seq",
        dict(_s2s, pad_token_id=0, eos_token_id=1, bos_token_id=None, decoder_start_token_id=0),
    ),
    "blenderbot-small": Case("seq2seq", dict(_s2s)),
    "m2m_100": Case("seq2seq", dict(_s2s)),
    "fsmt": Case(
        "seq2seq",
        dict(
            {k: v for k, v in _s2s.items() if k != "vocab_size"},
            langs=["en", "de"],
            src_vocab_size=VOCAB,
            tgt_vocab_size=VOCAB,
        ),
        float32_only=True,  # HF's fill_with_neg_inf fills a float32 mask with float64's min
        decoder_inputs=True,
    ),
    "prophetnet": Case(
        "seq2seq",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            num_encoder_layers=2,
            num_decoder_layers=2,
            num_encoder_attention_heads=2,
            num_decoder_attention_heads=2,
            ngram=2,
            num_buckets=32,
            relative_max_distance=64,
            max_position_embeddings=64,
            use_cache=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=0,
        ),
        # its softmax casts scores to float32, where float64's min (the mask) is -inf: NaN
        float32_only=True,
        decoder_inputs=True,
    ),
    "led": Case(
        "seq2seq",
        dict(
            _s2s,
            attention_window=[4, 4],
            max_encoder_position_embeddings=64,
            max_decoder_position_embeddings=64,
        ),
    ),
    "plbart": Case("seq2seq", dict(_s2s)),
    # audio: sequence classification
    "wav2vec2": Case("audio", dict(_w2v)),
    "hubert": Case("audio", dict(_w2v)),
    "wavlm": Case("audio", dict(_w2v, num_buckets=32, max_bucket_distance=80)),
    "data2vec-audio": Case("audio", dict(_w2v, num_conv_pos_embeddings=5, conv_pos_kernel_size=5)),
    "sew": Case("audio", dict(_w2v, squeeze_factor=2)),
    "unispeech": Case("audio", dict(_w2v)),
    "whisper": Case(
        "whisper",
        dict(
            {k: v for k, v in _s2s.items() if k != "max_position_embeddings"},
            num_mel_bins=16,
            max_source_positions=16,
            max_target_positions=32,
            classifier_proj_size=16,
            decoder_start_token_id=0,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        ),
        model_class="WhisperForAudioClassification",
    ),
    "audio-spectrogram-transformer": Case(
        "ast",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=16,
            frequency_stride=10,
            time_stride=10,
            max_length=64,
            num_mel_bins=32,
        ),
    ),
    # vision: image classification
    "resnet": Case(
        "vision",
        dict(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck"),
    ),
    "convnext": Case("vision", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    "convnextv2": Case("vision", dict(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)),
    "regnet": Case(
        "vision",
        dict(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, layer_type="y"
        ),
    ),
    "mobilenet_v1": Case("vision", dict(depth_multiplier=0.25, min_depth=8, image_size=32)),
    "mobilenet_v2": Case("vision", dict(depth_multiplier=0.25, min_depth=8, image_size=32)),
    "efficientnet": Case(
        "vision",
        dict(
            image_size=32,
            width_coefficient=0.5,
            depth_coefficient=1.0,
            kernel_sizes=[3, 5],
            in_channels=[32, 16],
            out_channels=[16, 24],
            strides=[1, 2],
            num_block_repeats=[1, 2],
            expand_ratios=[1, 4],
            hidden_dim=640,
            num_hidden_layers=12,
        ),
    ),
    "vit": Case("vision", dict(_vit, intermediate_size=64)),
    # the auto mapping holds a (plain, with-teacher) tuple for DeiT and LeViT
    "deit": Case(
        "vision", dict(_vit, intermediate_size=64), model_class="DeiTForImageClassification"
    ),
    "beit": Case("vision", dict(_vit, intermediate_size=64, use_relative_position_bias=True)),
    "data2vec-vision": Case(
        "vision", dict(_vit, intermediate_size=64, use_relative_position_bias=True)
    ),
    "swin": Case("vision", dict(_swin, mlp_ratio=2.0)),
    "swinv2": Case("vision", dict(_swin, mlp_ratio=2.0)),
    "dinov2": Case("vision", dict(_vit, mlp_ratio=2)),
    "levit": Case(
        "vision",
        dict(
            image_size=64,
            hidden_sizes=[32, 48],
            num_attention_heads=[2, 3],
            depths=[1, 1],
            key_dim=[8, 8],
            mlp_ratio=[2, 2],
            attention_ratio=[2, 2],
            down_ops=[["Subsample", 8, 32 // 8, 4, 2, 2]],
        ),
        image_size=64,
        model_class="LevitForImageClassification",
    ),
    "poolformer": Case(
        "vision",
        dict(
            hidden_sizes=[16, 32],
            depths=[1, 1],
            num_encoder_blocks=2,
            patch_sizes=[7, 3],
            strides=[4, 2],
            padding=[2, 1],
            mlp_ratio=2.0,
        ),
    ),
    "pvt": Case(
        "vision",
        dict(_pyramid, image_size=32, sequence_reduction_ratios=[2, 1], patch_sizes=[4, 2]),
    ),
    "pvt_v2": Case("vision", dict(_pyramid, image_size=32, sr_ratios=[2, 1])),
    "segformer": Case("vision", dict(_pyramid, sr_ratios=[2, 1], decoder_hidden_size=32)),
    "focalnet": Case(
        "vision",
        dict(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            hidden_sizes=[32, 32],
            depths=[1, 1],
            focal_levels=[2, 2],
            focal_windows=[3, 3],
            mlp_ratio=2.0,
        ),
    ),
    "cvt": Case(
        "vision",
        dict(
            patch_sizes=[7, 3],
            patch_stride=[4, 2],
            patch_padding=[2, 1],
            embed_dim=[16, 32],
            num_heads=[1, 2],
            depth=[1, 2],  # HF bug: depth[1]=1 IndexErrors
            mlp_ratio=[2.0, 2.0],
            qkv_bias=[True, True],
            cls_token=[False, True],
            qkv_projection_method=["dw_bn", "dw_bn"],
            kernel_qkv=[3, 3],
            padding_kv=[1, 1],
            stride_kv=[2, 2],
            padding_q=[1, 1],
            stride_q=[1, 1],
        ),
    ),
    "bit": Case(
        "vision",
        dict(
            embedding_size=16,
            hidden_sizes=[32, 64],
            depths=[1, 1],
            num_groups=4,
            layer_type="preactivation",
        ),
    ),
    "dinat": Case(
        "vision",
        dict(
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 4],
            kernel_size=3,
            dilations=[[1], [1]],
            mlp_ratio=2.0,
        ),
    ),
    "mobilevit": Case(
        "vision",
        dict(
            image_size=64,
            hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 16, 16, 24, 24, 32, 64],
            num_attention_heads=2,
        ),
        image_size=64,
    ),
    "mobilevitv2": Case(
        "vision",
        dict(
            image_size=64,
            width_multiplier=0.25,
            n_attn_blocks=[1, 1, 1],
            base_attn_unit_dims=[16, 24, 32],
        ),
        image_size=64,
    ),
    "hiera": Case(
        "vision",
        dict(
            embed_dim=16,
            image_size=[32, 32],
            patch_size=[3, 3],
            patch_stride=[2, 2],
            patch_padding=[1, 1],
            depths=[1, 1],
            num_heads=[1, 2],
            mlp_ratio=2.0,
            num_query_pool=1,
            query_stride=[2, 2],
            masked_unit_size=[4, 4],
            masked_unit_attention=[True, False],
        ),
    ),
    "swiftformer": Case(
        "vision", dict(depths=[1, 1], embed_dims=[16, 32], downsamples=[True, True], mlp_ratio=2)
    ),
    "hgnet_v2": Case(
        "vision",
        dict(
            embedding_size=16,
            depths=[1, 1],
            hidden_sizes=[32, 64],
            stem_channels=[3, 8, 16],
            stage_in_channels=[16, 32],
            stage_mid_channels=[8, 16],
            stage_out_channels=[32, 64],
            stage_num_blocks=[1, 1],
            stage_downsample=[False, True],
            stage_downsample_strides=[2, 2],
            stage_light_block=[False, True],
            stage_kernel_size=[3, 5],
            stage_numb_of_layers=[2, 2],
        ),
    ),
}

AUTO_CLASSES: dict[Kind, str] = {
    "text": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "audio": "AutoModelForAudioClassification",
    "ast": "AutoModelForAudioClassification",
    "vision": "AutoModelForImageClassification",
}
DROPOUT_WORDS = (
    "dropout",
    "layerdrop",
    "drop_path",
    "drop_rate",
    "drop_connect",
    "mask_time_prob",
    "mask_feature_prob",
)


# -- building a case ---------------------------------------------------------------------------


def zero_dropout(config: Any) -> None:
    """Zero every number (or list of numbers) in a config field named like a dropout, drop
    path, layer drop or spec-augment probability: the checks compare two training-mode runs,
    which would draw different noise."""
    for key, value in config.to_dict().items():
        if not any(word in key for word in DROPOUT_WORDS):
            continue
        if isinstance(value, list) and all(_is_number(v) for v in value):
            setattr(config, key, [type(v)(0) for v in value])
        elif _is_number(value):
            setattr(config, key, type(value)(0))  # strict configs check int against float


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def build(name: str, dtype: str) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    """The model in train mode and `dtype` ("float64"), its inputs and labels, all seeded."""
    import transformers

    case = CASES[name]
    config = transformers.AutoConfig.for_model(name, num_labels=NUM_LABELS, **case.config)
    zero_dropout(config)
    if case.kind != "seq2seq":
        config.problem_type = "single_label_classification"  # else HF sets it on the first call
    torch.manual_seed(0)
    if case.model_class is not None:
        model = getattr(transformers, case.model_class)(config)
    else:
        model = getattr(transformers, AUTO_CLASSES[case.kind]).from_config(config)
    model.train()
    generator = torch.Generator().manual_seed(1)
    inputs, labels = _inputs(name, config, generator)
    _warm_batch_norms(model, inputs, generator)
    model.to(getattr(torch, dtype))
    inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():  # the model itself works: a failure past here is sparsefx's
        if not logits_of(copy.deepcopy(model)(**inputs, labels=labels)).isfinite().all():
            raise FloatingPointError(f"the model's own logits are not finite in {dtype}")
    return model, inputs, labels


def logits_of(out: Any) -> Tensor:
    """The logits of a `transformers` model output (or tuple)."""
    return out.logits if hasattr(out, "logits") else out[0]


def _inputs(name: str, config: Any, generator: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """The keyword inputs of the case's kind, and its labels (class indices, or target tokens
    with one padded row)."""
    kind = CASES[name].kind
    if kind == "vision":
        size = CASES[name].image_size
        pixels = torch.randn(B, 3, size, size, generator=generator)
        return {"pixel_values": pixels}, torch.randint(0, NUM_LABELS, (B,), generator=generator)
    labels = torch.randint(0, NUM_LABELS, (B,), generator=generator)
    if kind == "audio":
        return {"input_values": torch.randn(B, AUDIO_SAMPLES, generator=generator)}, labels
    if kind == "whisper":
        shape = (B, config.num_mel_bins, 2 * config.max_source_positions)
        return {"input_features": torch.randn(shape, generator=generator)}, labels
    if kind == "ast":
        shape = (B, config.max_length, config.num_mel_bins)
        return {"input_values": torch.randn(shape, generator=generator)}, labels
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    ids = torch.randint(5, VOCAB - 2, (B, T_ENC), generator=generator)
    mask = torch.zeros(B, T_ENC, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    inputs = {"input_ids": ids.masked_fill(mask == 0, pad), "attention_mask": mask}
    if kind == "seq2seq":
        labels = torch.randint(5, VOCAB - 2, (B, T_DEC), generator=generator)
        labels[2, T_DEC - 3 :] = -100  # a padded target row
        if CASES[name].decoder_inputs:
            start = torch.full((B, 1), config.decoder_start_token_id)
            shifted = torch.cat([start, labels[:, :-1]], dim=1)
            padded = shifted == -100
            inputs["decoder_input_ids"] = shifted.masked_fill(padded, pad)
            inputs["decoder_attention_mask"] = (~padded).long()
    return inputs, labels


def _warm_batch_norms(
    model: nn.Module, inputs: dict[str, Tensor], generator: torch.Generator
) -> None:
    """Give BatchNorms the running statistics of a few random batches (a cumulative average),
    so that the eval check compares logits of a sensible scale rather than ~1e-30."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    with torch.no_grad():  # EfficientNet inits BN gamma ~ N(0, 0.02): logits ~1e-13, checks moot
        for m in norms:
            if m.weight is not None and m.weight.abs().mean() < 0.1:
                m.weight.fill_(1.0)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            model(
                **{
                    k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                    for k, v in inputs.items()
                }
            )
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum


# -- the checks --------------------------------------------------------------------------------


@dataclass
class Subject:
    """A built case: the model (which the transformed model shares parameters with), an
    untouched copy of it as the reference, and the batch."""

    model: nn.Module
    reference: nn.Module
    inputs: dict[str, Tensor]
    labels: Tensor
    rtol: float

    def logits(self, module: nn.Module) -> Tensor:
        return logits_of(module(**self.inputs, labels=self.labels))

    def backward(self, module: nn.Module, owner: nn.Module) -> Tensor:
        """`module`'s logits, after backpropagating ``logits.square().mean()`` into the
        gradients of `owner`'s parameters (reset first): a loss that reads every logit,
        unlike the model's own."""
        owner.zero_grad(set_to_none=True)
        logits = self.logits(module)
        logits.square().mean().backward()
        return logits


def relative_difference(got: Tensor, expected: Tensor) -> float:
    """max |got - expected| relative to max |expected|."""
    scale = expected.abs().max().item()
    diff = (got - expected).abs().max().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def gradient_difference(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """The worst gradient difference over parameters (a gradient left None reads as zeros):
    absolute, and relative to that parameter's largest reference gradient. A parameter whose
    gradient is all but zero is measured against a millionth of the model's largest gradient
    rather than against its own rounding noise."""
    pairs = []
    for (name, p), (_, q) in zip(
        model.named_parameters(), reference.named_parameters(), strict=True
    ):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        expected = q.grad if q.grad is not None else torch.zeros_like(q)
        pairs.append((name, (got - expected).abs().max().item(), expected.abs().max().item()))
    floor = 1e-6 * max((scale for _, _, scale in pairs), default=0.0)
    worst_abs = max(pairs, key=lambda t: t[1], default=("-", 0.0, 0.0))
    rel = [(d / max(s, floor) if max(s, floor) > 0 else float(d > 0), n) for n, d, s in pairs]
    worst_rel = max(rel, default=(0.0, "-"))
    return {
        "grad_abs": worst_abs[1],
        "grad_abs_param": worst_abs[0],
        "grad_rel": worst_rel[0],
        "grad_rel_param": worst_rel[1],
    }


def verdict(ok: bool, mismatch: str, **numbers: Any) -> dict[str, Any]:
    """A check's record: `mismatch` says what differs when it is not `ok`."""
    return {"status": "ok" if ok else "mismatch", "summary": "" if ok else mismatch, **numbers}


def equal_verdict(logits_rel: float, grads: dict[str, Any], rtol: float) -> dict[str, Any]:
    """The record of a check that logits and every gradient equal a reference's."""
    ok = logits_rel <= rtol and grads["grad_rel"] <= rtol
    summary = f"grad rel {grads['grad_rel']:.1e} at {grads['grad_rel_param']}"
    return verdict(ok, f"{summary}, logits rel {logits_rel:.1e}", logits_rel=logits_rel, **grads)


def all_ones(groups: list[Any]) -> dict[str, Tensor]:
    """Masks that keep every channel: the transformed model must be the model."""
    return {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}


def random_masks(groups: list[Any], seed: int = 5) -> dict[str, Tensor]:
    """About half of every group, at least two channels."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for group in groups:
        mask = torch.rand(group.size, generator=generator) < 0.5
        if mask.sum() < 2:
            mask[torch.randperm(group.size, generator=generator)[:2]] = True
        masks[group.name] = mask
    return masks


def check_eval(subject: Subject, sparse: nn.Module, groups: list[Any]) -> dict[str, Any]:
    """All-ones masks in eval mode compute the model's logits."""
    sparsefx.set_masks(sparse, all_ones(groups))
    subject.model.eval()
    subject.reference.eval()
    with torch.no_grad():
        rel = relative_difference(subject.logits(sparse), subject.logits(subject.reference))
    return verdict(rel <= subject.rtol, f"logits rel {rel:.1e}", logits_rel=rel)


def check_grads(subject: Subject, sparse: nn.Module, groups: list[Any]) -> dict[str, Any]:
    """All-ones masks in train mode compute the model's logits and parameter gradients."""
    sparsefx.set_masks(sparse, all_ones(groups))
    subject.model.train()
    subject.reference.train()
    got = subject.backward(sparse, subject.model)
    rel = relative_difference(got, subject.backward(subject.reference, subject.reference))
    return equal_verdict(rel, gradient_difference(subject.model, subject.reference), subject.rtol)


def check_dropped(
    subject: Subject, sparse: nn.Module, groups: list[Any], masks: dict[str, Tensor]
) -> dict[str, Any]:
    """Under random masks, the parameter features that a group owns and its mask drops get
    exactly zero gradient, and perturbing them leaves the logits bitwise unchanged: no
    reference needed, and no tolerance."""
    if not groups:
        return {"status": "skipped", "summary": "no groups"}
    sparsefx.set_masks(sparse, masks)
    subject.model.train()
    subject.backward(sparse, subject.model)
    params = dict(subject.model.named_parameters(remove_duplicate=False))
    nonzero, dropped_total = [], 0
    dropped: dict[str, list[tuple[int, Tensor]]] = {}
    for group in groups:
        owned = group.expand(torch.ones(group.size, dtype=torch.bool))
        kept = group.expand(masks[group.name])
        for (fqn, dim, mine), (_, _, keep) in zip(owned, kept, strict=True):
            index = (mine & ~keep).nonzero().squeeze(1)
            if not len(index):
                continue
            dropped_total += len(index)
            dropped.setdefault(fqn, []).append((dim, index))
            grad = params[fqn].grad
            if grad is not None and grad.index_select(dim, index).abs().max() > 0:
                worst = grad.index_select(dim, index).abs().max().item()
                nonzero.append(f"{fqn}[dim {dim}] grad {worst:.1e}")
    generator = torch.Generator().manual_seed(9)
    saved = {fqn: params[fqn].detach().clone() for fqn in dropped}
    with torch.no_grad():
        before = subject.logits(sparse)
        try:
            for fqn, parts in dropped.items():
                p = params[fqn]
                for dim, index in parts:
                    shape = p.index_select(dim, index).shape
                    noise = torch.randn(shape, generator=generator, dtype=p.dtype)
                    p.index_add_(dim, index, noise)
            after = subject.logits(sparse)
        finally:
            for fqn, value in saved.items():
                params[fqn].copy_(value)
    moved = (after - before).abs().max().item()
    unmoved = torch.equal(after, before)
    problems = []
    if nonzero:
        problems.append(f"{len(nonzero)} dropped grads nonzero ({', '.join(nonzero[:3])})")
    if not unmoved:
        problems.append(f"perturbing them moves logits by {moved:.1e}")
    return verdict(
        not nonzero and unmoved,
        "; ".join(problems),
        dropped_features=dropped_total,
        nonzero_dropped_grads=nonzero,
        logits_moved=moved,
    )


def check_train(subject: Subject, sparse: nn.Module) -> dict[str, Any]:
    """A few SGD steps on the model's own loss, masks sampled, give finite losses."""
    sparsefx.unfreeze(sparse)
    subject.model.train()
    opt = torch.optim.SGD(subject.model.parameters(), lr=0.01)
    losses = []
    for _ in range(SGD_STEPS):
        opt.zero_grad()
        loss = sparse(**subject.inputs, labels=subject.labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    ok = all(math.isfinite(v) for v in losses)
    return verdict(ok, f"losses {losses}", losses=losses)


class CompileTimeout(Exception):
    """The compiled check ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise CompileTimeout in this (main) thread after `seconds`."""

    def expire(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"compiled check took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_compiled(
    subject: Subject,
    sparse: nn.Module,
    twin: nn.Module,
    groups: list[Any],
    masks: dict[str, Tensor],
    limit: int,
    rtol: float,
) -> dict[str, Any]:
    """``torch.compile(twin, backend="sparsefx")`` (twin: another untouched copy of the
    model) under the same masks computes the transformed model's logits and gradients,
    within `rtol`."""
    subject.model.train()
    twin.train()
    sparsefx.set_masks(sparse, masks)
    expected = subject.backward(sparse, subject.model)
    compiled = torch.compile(twin, backend="sparsefx", options={"density": DENSITY})
    try:
        with time_limit(limit):
            compiled(**subject.inputs, labels=subject.labels)  # compiles, creating the runtime
            if groups:  # a compiled model with nothing to prune has no groups to read
                found = [(g.name, g.size) for g in sparsefx.groups(compiled)]
                if found != [(g.name, g.size) for g in groups]:
                    return verdict(False, f"{len(found)} groups, {len(groups)} in transform")
                sparsefx.set_masks(compiled, masks)
            got = subject.backward(compiled, twin)
    except Exception as e:
        if any(isinstance(x, CompileTimeout) for x in _chain(e)):  # Inductor wraps it
            return {"status": "skipped", "summary": f"compile > {limit} s"}
        raise
    rel = relative_difference(got, expected)
    return equal_verdict(rel, gradient_difference(twin, subject.model), rtol)


# -- one case, in the child process ------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """What a sweep runs: the command line's choices, as a child process gets them."""

    dtype: str = "float64"
    checks: bool = True
    compiled: bool = False
    compile_limit: int = 240


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or while handling."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def sparsefx_frame(exc: BaseException) -> str | None:
    """The innermost frame inside the sparsefx package, in `exc` or the exceptions it was
    raised from (torch.compile wraps a backend's error): where to start reading."""
    found = None
    for e in _chain(exc):
        for frame in traceback.extract_tb(e.__traceback__):
            path = Path(frame.filename).resolve()
            if path.is_relative_to(SPARSEFX_DIR):
                found = f"{path.relative_to(SPARSEFX_DIR.parent)}:{frame.lineno} in {frame.name}"
    return found


def failure(exc: BaseException) -> dict[str, Any]:
    """A stage's record of the exception that ended it."""
    cause = exc.__cause__
    kind = type(exc).__name__ + (f" from {type(cause).__name__}" if cause is not None else "")
    lines = str(exc).strip().splitlines()
    return {
        "status": "fail",
        "error": {
            "type": kind,
            "message": lines[0][:300] if lines else "",
            "frame": sparsefx_frame(exc),
            "traceback": "".join(traceback.format_exception(exc)).splitlines()[-15:],
        },
    }


@contextlib.contextmanager
def stage(
    result: dict[str, Any], key: str, save: Callable[[dict[str, Any]], None]
) -> Iterator[dict[str, Any]]:
    """Record a stage's outcome under ``result["stages"][key]``: the body fills in the dict
    it is given; an exception is recorded as the stage's failure, and the sweep goes on. Until
    the body ends the stage reads "crash", which is what the parent finds if the process
    dies in it."""
    entry: dict[str, Any] = {"status": "crash"}
    result["stages"][key] = entry
    save(result)
    try:
        yield entry
    except Exception as e:
        result["stages"][key] = failure(e)
    save(result)


def run_case(
    name: str, options: Options, save: Callable[[dict[str, Any]], None] = lambda result: None
) -> dict[str, Any]:
    """Build one case and run the stages the options ask for; `save` is called whenever the
    result changed, so a process that dies still leaves what it found."""
    dtype = "float32" if CASES[name].float32_only else options.dtype
    result: dict[str, Any] = {"model": name, "kind": CASES[name].kind, "dtype": dtype}
    result["stages"] = {}
    built = None
    with stage(result, "build", save) as entry:
        model, inputs, labels = build(name, dtype)
        entry.update(status="ok", model_class=type(model).__name__)
        entry["params"] = sum(p.numel() for p in model.parameters())
        reference = copy.deepcopy(model)
        twin = copy.deepcopy(model) if options.compiled else None
        built = Subject(model, reference, inputs, labels, RTOL[dtype])
    if built is None:
        return result
    sparse = None
    with stage(result, "structure", save) as entry:
        start = time.perf_counter()
        sparse = sparsefx.transform(
            model, (), example_kwargs={**inputs, "labels": labels}, density=DENSITY
        )
        groups = sparsefx.groups(sparse)
        analysis = sparse.analysis
        entry.update(
            status="ok",
            seconds=round(time.perf_counter() - start, 1),
            groups=[[g.name, g.size, g.stream] for g in groups],
            scatters=[[d.node, d.op, d.reason] for d in analysis.scatters],
            dense=[[d.node, d.op, d.reason] for d in analysis.dense],
        )
    if sparse is None or not options.checks:
        return result
    masks = random_masks(groups)
    with stage(result, "eval", save) as entry:
        entry.update(check_eval(built, sparse, groups))
    with stage(result, "grads", save) as entry:
        entry.update(check_grads(built, sparse, groups))
    with stage(result, "dropped", save) as entry:
        entry.update(check_dropped(built, sparse, groups, masks))
    if twin is not None:  # before training changes the weights
        with stage(result, "compiled", save) as entry:
            rtol = RTOL["float32"] if CASES[name].float32_inside else built.rtol
            limit = options.compile_limit
            entry.update(check_compiled(built, sparse, twin, groups, masks, limit, rtol))
            entry["rtol"] = rtol
    with stage(result, "train", save) as entry:
        entry.update(check_train(built, sparse))
    return result


def child_main(name: str, options: Options, path: Path) -> None:
    """Run one case, keeping its result in `path`, rewritten whole after every stage."""
    torch.set_num_threads(1)  # reproducible reductions; the sweep runs beside other work

    def save(result: dict[str, Any]) -> None:
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(result, default=str))
        partial.replace(path)

    save(run_case(name, options, save))


# -- the sweep, in the parent process ----------------------------------------------------------

CHECKS = ("eval", "grads", "dropped", "train", "compiled")
STATUSES = ("ok", "mismatch", "fail", "crash", "skipped")


def run_in_child(name: str, args: argparse.Namespace, log: Path | None) -> dict[str, Any]:
    """`run_case` in a child process: its result, the stage it was in when it died or ran out
    of time marked "crash"."""
    with tempfile.TemporaryDirectory() as tmp:
        path, output = Path(tmp) / "result.json", Path(tmp) / "output.txt"
        command = [sys.executable, __file__, "--child", name, "--result", str(path)]
        command += ["--dtype", args.dtype, "--compile-limit", str(args.compile_limit)]
        command += ["--structure-only"] * args.structure_only + ["--compiled"] * args.compiled
        # Inductor compiles in the child's main thread, where the compile limit's alarm lands
        env = {"OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1", **os.environ}
        with output.open("w") as out:
            try:
                code = subprocess.run(
                    command, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=args.timeout
                ).returncode
                ended = f"exit code {code}"
            except subprocess.TimeoutExpired:
                ended = f"timeout after {args.timeout} s"
        text = output.read_text(errors="replace")
        if log is not None:
            with log.open("a") as f:
                f.write(f"\n{'=' * 30} {name} ({ended}) {'=' * 30}\n{text}")
        if path.exists():
            result = json.loads(path.read_text())
        else:  # died before its first stage
            result = {"model": name, "kind": CASES[name].kind, "dtype": args.dtype}
            result["stages"] = {"build": {"status": "crash"}}
    tail = text.strip().splitlines()[-15:]
    for entry in result["stages"].values():
        if entry["status"] == "crash":
            entry["error"] = {"type": ended, "message": "", "frame": None, "traceback": tail}
    return result


def cell(entry: dict[str, Any] | None) -> str:
    """A stage's outcome in a few words: ok, MISMATCH and what differs, FAIL with the
    exception type and the innermost sparsefx frame."""
    if entry is None:
        return "-"
    status = entry["status"]
    if status == "ok":
        return "ok"
    if status == "mismatch":
        return f"MISMATCH {entry['summary']}"
    if status == "skipped":
        return f"skipped ({entry['summary']})"
    error = entry["error"]
    if status == "crash":
        return f"CRASH ({error['type']})"
    return f"FAIL {error['type']} @ {error['frame'] or 'no sparsefx frame'}"


def transform_cell(result: dict[str, Any]) -> str:
    """The structure stage's outcome, or why the model could not be built."""
    build = result["stages"]["build"]
    if build["status"] == "fail":
        error = build["error"]
        return f"cannot build: {error['type']}: {error['message'][:60]}"
    if build["status"] != "ok":
        return cell(build)
    return cell(result["stages"].get("structure"))


def short_reason(reason: str) -> str:
    """A reason without its particulars: the op and node it names, the feature range and
    the parentheses, up to its first colon or semicolon."""
    reason = re.sub(r"^features \d+\.\.\d+: ", "", reason)
    reason = re.sub(r"^[\w.]+ \([\w.]+\) ", "", reason)  # "add.Tensor (add_3) joins" -> "joins"
    reason = re.split(r"[:;]", reason)[0]
    return re.sub(r" \([^)]*\)", "", reason).strip()


def dense_line(structure: dict[str, Any]) -> str:
    """Counts of the ops left dense (by op and reason) and of the scatters (by reason)."""
    dense = Counter(f"{op.split('.')[0]}: {short_reason(r)}" for _, op, r in structure["dense"])
    scatters = Counter(short_reason(r) for _, _, r in structure["scatters"])
    line = "dense: " + ("; ".join(f"{n}x {r}" for r, n in dense.most_common()) or "none")
    if scatters:
        line += " | scatters: " + "; ".join(f"{n}x {r}" for r, n in scatters.most_common())
    return line


def report(results: dict[str, dict[str, Any]], options: Options) -> str:
    """The table, one row per model, then each model's dense and scatter reasons, the
    failures' messages and the counts."""
    checks = [c for c in CHECKS if options.checks and (c != "compiled" or options.compiled)]
    headers = ["model", "kind", "transform", "groups", "scatters", "dense", *checks]
    rows, reasons, failures = [], [], []
    for name, result in results.items():
        stages = result["stages"]
        structure = stages.get("structure", {})
        counts = ["-"] * 3
        if structure.get("status") == "ok":
            counts = [str(len(structure[k])) for k in ("groups", "scatters", "dense")]
            reasons.append(f"{name}: {dense_line(structure)}")
        cells = [cell(stages.get(c)) for c in checks]
        label = name if result["dtype"] == options.dtype else f"{name} ({result['dtype']})"
        rows.append([label, result["kind"], transform_cell(result), *counts, *cells])
        failures += [
            f"{name} {key}: {e['type']}: {e['message']} @ {e['frame'] or 'no sparsefx frame'}"
            for key, entry in stages.items()
            if entry["status"] == "fail" and key != "build"
            for e in [entry["error"]]
        ]
    lines = [format_table(headers, rows)]
    if reasons:
        lines += ["", "dense ops and scatters by reason:", *reasons]
    if failures:
        lines += ["", "failures:", *failures]
    return "\n".join([*lines, "", summary(results, checks)])


def summary(results: dict[str, dict[str, Any]], checks: list[str]) -> str:
    """How many models built and transformed, and each check's outcomes."""
    stages = [r["stages"] for r in results.values()]

    def outcomes(key: str) -> str:
        count = Counter(s[key]["status"] for s in stages if key in s)
        found = [f"{count[status]} {status}" for status in STATUSES if count[status]]
        return ", ".join(found) or "none run"

    built = sum(s["build"]["status"] == "ok" for s in stages)
    lines = [f"{len(stages)} models, {built} built; of those, by stage:"]
    lines += [f"  {key}: {outcomes(key)}" for key in ["structure", *checks]]
    return "\n".join(lines)


def compare(old: dict[str, dict[str, Any]], new: dict[str, dict[str, Any]]) -> str:
    """Per model of `new`, what changed against `old` (two `--json` files' "models"): the
    transform's outcome, the groups, the scatters and dense ops (by node, op and short
    reason), and the outcome of the checks both ran."""
    lines, unchanged = [], 0
    for name, now in new.items():
        before = old.get(name)
        changes = _changes(before, now) if before is not None else ["not in the old sweep"]
        if changes:
            lines += [f"{name}:", *(f"  {c}" for c in changes)]
        else:
            unchanged += 1
    return "\n".join([*lines, f"{unchanged} of {len(new)} models unchanged"])


def _changes(before: dict[str, Any], now: dict[str, Any], most: int = 10) -> list[str]:
    """One model's changes, at most `most` lines of each kind and sign."""
    changes = []
    if transform_cell(before) != transform_cell(now):
        changes.append(f"transform: {transform_cell(before)} -> {transform_cell(now)}")
    a, b = before["stages"].get("structure", {}), now["stages"].get("structure", {})
    if a.get("status") == b.get("status") == "ok":
        for key, show in [
            ("groups", lambda g: f"{g[0]} ({g[1]}{', stream' * g[2]})"),
            ("scatters", lambda d: f"{d[0]} ({d[1]}): {short_reason(d[2])}"),
            ("dense", lambda d: f"{d[0]} ({d[1]}): {short_reason(d[2])}"),
        ]:
            old, new = (Counter(show(x) for x in s[key]) for s in (a, b))
            lost, gained = sorted((old - new).elements()), sorted((new - old).elements())
            for sign, items in (("-", lost), ("+", gained)):
                changes += [f"{key} {sign} {item}" for item in items[:most]]
                if len(items) > most:
                    changes.append(f"{key} {sign} ... and {len(items) - most} more")
    for key in CHECKS:
        x, y = before["stages"].get(key), now["stages"].get(key)
        if x is not None and y is not None and cell(x) != cell(y):
            changes.append(f"{key}: {cell(x)} -> {cell(y)}")
    return changes


def header(names: list[str], options: Options) -> str:
    """What was run, and on what: the versions and the machine the results depend on."""
    env = environment()
    version = importlib.metadata.version("transformers")
    checks = (
        "structure only"
        if not options.checks
        else "checks " + ", ".join(c for c in CHECKS if c != "compiled" or options.compiled)
    )
    return (
        f"sparsefx model sweep: {len(names)} transformers models, density {DENSITY}, "
        f"{options.dtype}, {checks}\n"
        f"torch {env['torch']} | transformers {version} | one thread per case | CPU: "
        f"{env['cpu']} ({env['cores']} logical cores) | load at start: {env['load_avg']}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", help="comma-separated model types (default: all; --list)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--structure-only", action="store_true", help="the analysis alone")
    parser.add_argument("--dtype", choices=sorted(RTOL), default="float64")
    parser.add_argument("--compiled", action="store_true", help="also check torch.compile")
    parser.add_argument("--compile-limit", type=int, default=240, help="seconds per model")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per case")
    parser.add_argument("--json", type=Path, help="write every result here")
    parser.add_argument("--compare", type=Path, help="an earlier --json to compare with")
    parser.add_argument("--log", type=Path, help="append every case's output here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    options = Options(args.dtype, not args.structure_only, args.compiled, args.compile_limit)
    if args.child:
        child_main(args.child, options, args.result)
        return
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; --list lists them")
    if args.list:
        print("\n".join(f"{name:32} {CASES[name].kind}" for name in names))
        return
    old = json.loads(args.compare.read_text())["models"] if args.compare else None
    print(header(names, options), flush=True)
    results = {}
    for i, name in enumerate(names, 1):
        start = time.perf_counter()
        results[name] = run_in_child(name, args, args.log)
        seconds = time.perf_counter() - start
        print(f"[{i}/{len(names)}] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    print(report(results, options))
    if args.json:
        env = {**environment(), "transformers": importlib.metadata.version("transformers")}
        data = {"environment": env, "options": asdict(options), "models": results}
        args.json.write_text(json.dumps(data, indent=1, default=str))
    if old is not None:
        print(f"\nchanges against {args.compare}:\n{compare(old, results)}")


if __name__ == "__main__":
    main()
