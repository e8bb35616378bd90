"""Convert a Hugging Face T5 checkpoint (T5 v1.0/v1.1, Flan-T5, mT5, UMT5/Pile-T5, ByT5) into
t5.py's layout: OUT/config.json (our T5Config), OUT/model.safetensors (fused weights) and the
tokenizer files; and back (--to-hf).

    python convert_hf.py SRC OUT [--dtype bfloat16] [--encoder-only] [--force]
    python convert_hf.py t5xxl_fp8_e4m3fn.safetensors OUT --tokenizer tokenizer_2/
    python convert_hf.py --to-hf OURS OUT [--dtype float32]

SRC is a local folder (config.json with model.safetensors, a sharded *.safetensors.index.json,
or pytorch_model.bin, read with torch.load(weights_only=True), or one variant of them such as
model.fp16.safetensors); a diffusers pipeline folder or
its text_encoder_N/ folder (tokenizer from tokenizer_N/); a single .safetensors file with
transformers' key names under any prefix and no config (read off the shapes); or a hub id when
huggingface_hub is installed and the network allows. transformers is not needed: the raw
config.json fields are read here, not a library's reinterpretation of them.

The whole mapping is the tables below: each of our tensors names the Hugging Face tensors it is
made of (several = concatenated, that is where the projections are fused); --to-hf splits them
back through the same tables. Tensors are read one at a time and streamed into the output, so
converting t5-11b does not need 45 GB of RAM. fp8 weights (float8_e4m3fn, with or without
per-weight scales) stay fp8, with a float32 scale per output row (--weights float8_e4m3fn makes
them from any source); --weights int8 stores linear weights in int8 with a bfloat16 scale per row.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple


def _interrupted_while_loading(*_: object) -> None:
    """Nothing is written yet: exit at once (an exception could be caught by the code being imported)."""
    print("convert_hf.py: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


_sigint = signal.getsignal(signal.SIGINT)  # what main() puts back: Python's, a host's (runpy), or "ignore"
if __name__ == "__main__" and _sigint is not signal.SIG_IGN:  # Ctrl-C while torch loads (seconds): quiet too
    signal.signal(signal.SIGINT, _interrupted_while_loading)

with warnings.catch_warnings():  # torch >= 2.12 warns at import when numpy (unused here) is absent
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
from einops import rearrange
from torch import Tensor, nn

from t5 import (DTYPES, SAFETENSORS_DTYPES, SENTINEL, T5, TOKENIZER_FILES, Float8Linear, Int8Linear, Linear, T5Config,
                T5Encoder, dequantize_weight, is_our_config, quantize_int8, scalable_blocks)
from t5 import write_safetensors as t5_write_safetensors

SUPPORTED_MODEL_TYPES = ("t5", "mt5", "umt5")
UNSUPPORTED_MODEL_TYPES = {  # look alike, but not the same architecture
    "longt5": "LongT5 uses local / transient-global attention",
    "switch_transformers": "SwitchTransformers has mixture-of-experts feed-forward layers",
    "t5gemma": "T5Gemma is a Gemma-style encoder-decoder (RoPE, GQA), not T5",
    "t5gemma2": "T5Gemma 2 is a Gemma-style encoder-decoder (RoPE, GQA), not T5",
}
FFN_FROM_HF = {"relu": "relu", "gated-gelu": "gated-gelu"}  # feed_forward_proj -> T5Config.ffn
# Defaults of each model_type, for fields an old config.json leaves out.
HF_DEFAULTS = {
    "t5": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"),
    "mt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                feed_forward_proj="gated-gelu"),
    "umt5": dict(vocab_size=250112, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                 feed_forward_proj="gated-gelu"),
}
OUR_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)  # all this tool writes, all --force replaces
WRITER = {"writer": "convert_hf.py"}  # in the metadata of every model.safetensors this tool writes
CALIBRATION_TEXTS = [  # what --calibrate runs the model on when not given a file: varied, T5-style prompts
    "translate English to German: The house is wonderful, and the garden is even better.",
    "summarize: The city council met on Tuesday to discuss the new budget, which includes funding for "
    "schools, roads and a public library. After a long debate the proposal passed by seven votes to two.",
    "question: What is the capital of France? context: Paris is the capital and largest city of France.",
    "cola sentence: The book was written by her in 1998 quickly.",
    "stsb sentence1: A man is playing a guitar. sentence2: A person plays an instrument.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2,718 and symbols: # $ % & * ( ) [ ] { } < > = + - / \\",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "A photograph of an astronaut riding a horse on the moon, highly detailed, 8k, dramatic lighting.",
    "Le renard brun rapide saute par-dessus le chien paresseux. Der schnelle braune Fuchs. El zorro marrón.",
    "<extra_id_0> walks in <extra_id_1> park. The <extra_id_2> was sunny and the children <extra_id_3>.",
]
TORCH_DTYPES = {**{name: dtype for dtype, name in SAFETENSORS_DTYPES.items() if dtype != torch.int64}, "F64": torch.float64,
                "F8_E5M2": torch.float8_e5m2}  # a safetensors header's dtype names
FP8 = torch.float8_e4m3fn
FP8_KINDS = (FP8, torch.float8_e5m2)  # what fp8 files hold; e5m2 is read (dequantized), never kept
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# --weights: how linear weights are stored, as the layer `t5.load` makes of them (its weight_dtype and
# scale_dtype); None: as --dtype says
WEIGHTS = {"dense": None, "float8_e4m3fn": Float8Linear, "int8": Int8Linear}
# Tensors of fp8 files made for diffusion tools (ComfyUI's "scaled fp8"): X.scale_weight scales
# X.weight (a scalar, or one value per output row); scaled_fp8 is an empty marker tensor. Some also
# carry X.scale_input: the scale an fp8 matmul kernel divides the activations by before casting them
# to fp8. We compute in the activation dtype (the weight is dequantized), so it does not apply: ignored.
SCALE_SUFFIX, FP8_MARKER, INPUT_SCALE_SUFFIX = "scale_weight", "scaled_fp8", "scale_input"
# The tensors of a T5 in transformers' names: in a single file, anything else is another model's (ignored)
T5_KEY = re.compile(r"(shared|lm_head)\.\w+|scaled_fp8"
                    r"|(encoder|decoder)\.(block\.\d+|final_layer_norm|embed_tokens)\..+")


class ConversionError(ValueError):
    """The checkpoint cannot be converted: unsupported, or tensors missing / unexpected."""


class Source(NamedTuple):
    """How one of our tensors is made from Hugging Face tensors."""

    keys: tuple[str, ...]  # concatenated along `dim`; a single key is a rename
    dim: int = 0
    scale: float = 1.0  # applied in float32 (T5 v1.0's output embedding: d_model**-0.5)


# Per-layer tables: our name (under encoder.layers.{i}. / decoder.layers.{i}.) -> Hugging Face
# names under encoder.block.{i}. / decoder.block.{i}.; "{ffn}" is that stack's feed-forward sublayer.
ENCODER_LAYER = {
    "attn_norm.weight": ("layer.0.layer_norm.weight",),
    "attn.qkv.weight": ("layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight",
                        "layer.0.SelfAttention.v.weight"),
    "attn.out.weight": ("layer.0.SelfAttention.o.weight",),
    "ffn_norm.weight": ("{ffn}.layer_norm.weight",),
    "ffn.wo.weight": ("{ffn}.DenseReluDense.wo.weight",),
}
DECODER_LAYER = {
    "self_attn_norm.weight": ("layer.0.layer_norm.weight",),
    "self_attn.qkv.weight": ("layer.0.SelfAttention.q.weight", "layer.0.SelfAttention.k.weight",
                             "layer.0.SelfAttention.v.weight"),
    "self_attn.out.weight": ("layer.0.SelfAttention.o.weight",),
    "cross_attn_norm.weight": ("layer.1.layer_norm.weight",),
    "cross_attn.q.weight": ("layer.1.EncDecAttention.q.weight",),
    "cross_attn.kv.weight": ("layer.1.EncDecAttention.k.weight", "layer.1.EncDecAttention.v.weight"),
    "cross_attn.out.weight": ("layer.1.EncDecAttention.o.weight",),
    "ffn_norm.weight": ("{ffn}.layer_norm.weight",),
    "ffn.wo.weight": ("{ffn}.DenseReluDense.wo.weight",),
}
FFN_IN = {  # T5Config.ffn -> the Hugging Face tensors of our fused `ffn.wi` ([gate; up] when gated)
    "relu": ("{ffn}.DenseReluDense.wi.weight",),
    "gated-gelu": ("{ffn}.DenseReluDense.wi_0.weight", "{ffn}.DenseReluDense.wi_1.weight"),
}
BIAS_TABLE = "block.{i}.layer.0.SelfAttention.relative_attention_bias.weight"
EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # tied copies


########################################################################################
# Config
########################################################################################


def config_from_hf(hf: Mapping, tokenizer_config: Mapping | None = None) -> tuple[T5Config, bool]:
    """A raw Hugging Face config.json dict (and tokenizer_config.json, when there is one) ->
    (our T5Config, whether lm_head is scaled by d_model**-0.5)."""
    model_type = hf.get("model_type")
    if model_type in UNSUPPORTED_MODEL_TYPES:
        raise ConversionError(f"unsupported architecture {model_type!r}: {UNSUPPORTED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(f"unsupported architecture {model_type!r} (architectures={hf.get('architectures')}); "
                              f"supported model_type: {', '.join(SUPPORTED_MODEL_TYPES)}")
    for arch in hf.get("architectures") or []:
        if not any(arch.startswith(p) for p in ("T5", "MT5", "UMT5")) or "ForQuestionAnswering" in arch \
                or "ForSequenceClassification" in arch or "ForTokenClassification" in arch:
            raise ConversionError(f"unsupported architecture {arch!r}: only the T5 encoder-decoder "
                                  "(…ForConditionalGeneration, …Model, …EncoderModel) is supported")
    fields = {**HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None}}
    proj = fields["feed_forward_proj"]
    if proj not in FFN_FROM_HF:
        raise ConversionError(f"unsupported feed_forward_proj {proj!r}: real T5 checkpoints use {sorted(FFN_FROM_HF)}")
    eos = fields.get("eos_token_id", 1)
    pad = fields.get("pad_token_id", 0)
    tokenizer_config = tokenizer_config or {}
    # ByT5 reads UTF-8 bytes; its folders say so in tokenizer_config.json or config.json (the hub's
    # google/byt5-*), or have only its vocabulary size
    is_bytes = "ByT5Tokenizer" in (tokenizer_config.get("tokenizer_class"), hf.get("tokenizer_class")) or (
        not tokenizer_config and fields["vocab_size"] == 384)
    config = T5Config(
        vocab_size=fields["vocab_size"], d_model=fields["d_model"], d_kv=fields["d_kv"], d_ff=fields["d_ff"],
        num_heads=fields["num_heads"], num_encoder_layers=fields["num_layers"],
        num_decoder_layers=fields.get("num_decoder_layers") or fields["num_layers"],
        ffn=FFN_FROM_HF[proj], bias_per_layer=model_type == "umt5", scale_qk=False,
        num_buckets=fields.get("relative_attention_num_buckets", 32),
        max_distance=fields.get("relative_attention_max_distance", 128),
        eps=fields.get("layer_norm_epsilon", 1e-6), pad_token_id=pad,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        decoder_start_token_id=fields.get("decoder_start_token_id", pad),
        tokenizer="bytes" if is_bytes else "sentencepiece",
        dropout=fields.get("dropout_rate", 0.1),
        extra_ids=sentinel_count(tokenizer_config, 125 if is_bytes else 100),
    )
    return config, scales_decoder_output(model_type, hf)


def sentinel_count(tokenizer_config: Mapping, default: int) -> int:
    """How many sentinels (<extra_id_N>) a tokenizer has. transformers 5 keeps them as added tokens
    ("added_tokens_decoder", "extra_special_tokens"), and its ByT5 folders write "extra_ids": 0."""
    added = [token.get("content") for token in (tokenizer_config.get("added_tokens_decoder") or {}).values()]
    for field in ("extra_special_tokens", "additional_special_tokens"):
        listed = tokenizer_config.get(field) or []
        added += list(listed.values()) if isinstance(listed, dict) else list(listed)
    sentinels = {token for token in added if isinstance(token, str) and SENTINEL.fullmatch(token)}
    return len(sentinels) or tokenizer_config.get("extra_ids", default)


def scales_decoder_output(model_type: str, hf: Mapping) -> bool:
    """Whether transformers multiplies the decoder output by d_model**-0.5 before lm_head, read the
    way transformers 5 reads a config.json of each model_type:
      - t5, umt5: "scale_decoder_outputs" when the file has it (transformers 5 writes it, and then
        always writes "tie_word_embeddings": true); otherwise "tie_word_embeddings" decides, as in
        the hub's files: v1.0 says true (scaled), v1.1 / Flan / ByT5 / UMT5 say false.
      - mt5: never. MT5Config ignores "tie_word_embeddings" and MT5 has no output scale, so an mT5
        folder written by transformers 5 ("tie_word_embeddings": true) is still unscaled."""
    if model_type == "mt5":
        return False
    return bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True) is not False))


########################################################################################
# The mapping
########################################################################################


def make_plan(config: T5Config, *, embedding: str, lm_head: bool, scale_lm_head: bool, encoder_only: bool,
              own_embeddings: Iterable[str] = ()) -> dict[str, Source]:
    """{our name: Source} for a config: `embedding` is the Hugging Face name of the shared
    embedding, `lm_head` whether there is a separate lm_head.weight; a stack whose own copy is in
    `own_embeddings` (encoder.embed_tokens.weight, ...) reads it, as transformers does when they differ."""
    plan: dict[str, Source] = {}
    own_embeddings = set(own_embeddings)
    stacks = [("encoder", ENCODER_LAYER, config.num_encoder_layers, "layer.1")]
    if not encoder_only:
        stacks.append(("decoder", DECODER_LAYER, config.num_decoder_layers, "layer.2"))
    for stack, layer_table, depth, ffn in stacks:
        own = f"{stack}.embed_tokens.weight"
        plan[f"{stack}.embedding.weight"] = Source((own if own in own_embeddings else embedding,))
        tables = range(depth) if config.bias_per_layer else range(1)
        plan[f"{stack}.position_bias.embedding.weight"] = Source(
            tuple(f"{stack}.{BIAS_TABLE.format(i=i)}" for i in tables), dim=1)  # UMT5: (buckets, (l h))
        for i in range(depth):
            for ours, theirs in {**layer_table, "ffn.wi.weight": FFN_IN[config.ffn]}.items():
                plan[f"{stack}.layers.{i}.{ours}"] = Source(
                    tuple(f"{stack}.block.{i}.{key.format(ffn=ffn)}" for key in theirs))
        plan[f"{stack}.final_norm.weight"] = Source((f"{stack}.final_layer_norm.weight",))
    if not encoder_only:
        head = "lm_head.weight" if lm_head else embedding
        plan["lm_head.weight"] = Source((head,), scale=config.d_model**-0.5 if scale_lm_head else 1.0)
    return plan


def plan_conversion(hf_config: Mapping, hf_keys: Iterable[str], *, encoder_only: bool = False,
                    tokenizer_config: Mapping | None = None) -> tuple[T5Config, dict[str, Source], bool]:
    """Decide how every one of our tensors is made. Returns (config, {our name: Source},
    encoder_only). A checkpoint without decoder tensors (…EncoderModel) converts encoder-only.
    Raises ConversionError naming every missing or unexpected Hugging Face tensor."""
    config, scale_lm_head = config_from_hf(hf_config, tokenizer_config)
    hf_keys = set(hf_keys)
    if not any(k.startswith("decoder.") for k in hf_keys):
        encoder_only = True
    embedding = next((k for k in EMBEDDINGS if k in hf_keys), EMBEDDINGS[0])
    plan = make_plan(config, embedding=embedding, lm_head="lm_head.weight" in hf_keys, scale_lm_head=scale_lm_head,
                     encoder_only=encoder_only, own_embeddings=hf_keys)
    used = {key for source in plan.values() for key in source.keys}
    used |= {scale_key(key) for key in used} & hf_keys  # fp8 files: the scales of the weights used
    missing = sorted(used - hf_keys)
    if missing:
        raise ConversionError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:10])}"
                              f"{' ...' if len(missing) > 10 else ''}")
    dropped = {*EMBEDDINGS, *map(scale_key, EMBEDDINGS), FP8_MARKER}  # unused embedding copies; fp8 marker
    dropped |= {key.removesuffix("weight") + INPUT_SCALE_SUFFIX for key in used} & hf_keys  # fp8 kernels' input scales
    if encoder_only:  # a full checkpoint converted --encoder-only: its decoder is left behind
        dropped |= {k for k in hf_keys if k.startswith("decoder.") or k.startswith("lm_head.")}
    unexpected = sorted(hf_keys - used - dropped)
    if unexpected:
        raise ConversionError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:10])}"
                              f"{' ...' if len(unexpected) > 10 else ''}")
    return config, plan, encoder_only


def scale_key(key: str) -> str:
    """The scale tensor of an fp8 weight in a diffusion tool's file: X.weight -> X.scale_weight."""
    return key.removesuffix("weight") + SCALE_SUFFIX


def is_linear(name: str) -> bool:
    """Our linear-layer weights (what fp8 applies to); embeddings and norms stay in the compute dtype."""
    return not name.endswith(("norm.weight", "embedding.weight"))


def read_part(tensors: Mapping[str, Tensor], key: str) -> tuple[Tensor, Tensor | None]:
    """One Hugging Face tensor, with its per-row float32 scale when it is a float8_e4m3fn matrix; other
    tensors with a scale (a norm's weight, an e5m2 file's weights, a layer a file keeps dense) come back
    in float32, their scales applied."""
    tensor = tensors[key]
    if tensor.dtype not in FP8_KINDS and scale_key(key) not in tensors:
        return tensor, None
    scale = tensors[scale_key(key)].float().reshape(-1) if scale_key(key) in tensors else torch.ones(1)
    if scale.numel() not in (1, tensor.shape[0]):
        raise ConversionError(f"{scale_key(key)}: {scale.numel()} scales for a weight of {tensor.shape[0]} rows")
    if tensor.dtype != FP8 or tensor.dim() == 1:
        return tensor.float() * (scale if tensor.dim() == 1 else rearrange(scale, "o -> o 1")), None
    return tensor, scale.expand(tensor.shape[0]).clone()


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """float weight (o, i) -> (fp8 weight, float32 scale (o,)): each row scaled so that its
    largest magnitude lands on fp8's largest finite value, 448."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    return (weight / rearrange(scale, "o -> o 1")).to(FP8), scale


QUANTIZE = {FP8: quantize_rows, torch.int8: quantize_int8}  # stored weight dtype -> (weight, row scale)


CONVERT_WIDER = "convert with --dtype bfloat16 or float32"


def cast(tensor: Tensor, dtype: torch.dtype, name: str, advice: str) -> Tensor:
    """A new contiguous copy of `tensor` in `dtype`; finite values past float16's range are refused by
    name (with `advice`) instead of written as inf."""
    result = tensor.to(dtype, memory_format=torch.contiguous_format, copy=True)
    if dtype == torch.float16 and not torch.isfinite(result).all() and torch.isfinite(tensor).all():
        raise ConversionError(f"{name}: a value of {float(tensor.abs().max()):g} is past float16's range: {advice}")
    return result


def build(source: Source, tensors: Mapping[str, Tensor], dtype: torch.dtype | None, stored: torch.dtype | None = None
          ) -> tuple[Tensor, Tensor | None]:
    """Make one of our tensors from its Source; fusion (concatenation) happens here only. Returns
    (tensor, None), or (fp8 or int8 weight, its row scale) when `stored` is FP8 or int8. fp8 parts with
    their scales are concatenated as they are (no second rounding); anything else is computed in float32.
    The result is always a new tensor: the encoder's and decoder's embeddings, both made from
    shared.weight, must not share memory (that would tie them again)."""
    parts = [read_part(tensors, key) for key in source.keys]
    if stored == FP8 and all(scale is not None for _, scale in parts):
        weight = torch.cat([part for part, _ in parts], dim=source.dim)
        return weight.clone() if len(parts) == 1 else weight, torch.cat([scale for _, scale in parts]) * source.scale
    exact = [part if scale is None else part.float() * rearrange(scale, "o -> o 1") for part, scale in parts]
    tensor = exact[0] if len(exact) == 1 else torch.cat(exact, dim=source.dim)
    if source.scale != 1.0:
        tensor = tensor.float() * source.scale
    if stored in QUANTIZE:
        return QUANTIZE[stored](tensor)
    return cast(tensor, dtype or exact[0].dtype, " + ".join(source.keys), CONVERT_WIDER), None


class ReadOnce(Mapping):
    """`tensors`, each read once: one that several of ours are made from (shared.weight makes both
    embeddings, and v1.0's lm_head) is kept from its first use to its last, `uses` telling how many."""

    def __init__(self, tensors: Mapping[str, Tensor], uses: Mapping[str, int]) -> None:
        self._tensors, self._uses, self._held = tensors, dict(uses), {}

    def __getitem__(self, key: str) -> Tensor:
        tensor = self._held.pop(key) if key in self._held else self._tensors[key]
        self._uses[key] = self._uses.get(key, 1) - 1
        if self._uses[key] > 0:
            self._held[key] = tensor
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors


def build_all(plan: Mapping[str, Source], tensors: Mapping[str, Tensor], dtype: torch.dtype | None,
              specs: Mapping[str, tuple[torch.Size, torch.dtype]]) -> Iterator[tuple[str, Tensor]]:
    """Our tensors one at a time, in the order of `specs`, each checked against its shape; an fp8
    weight is followed by its `weight_scale`, as `specs` lists them. Each source tensor is read once."""
    uses: dict[str, int] = {}
    for name in specs:
        for key in plan[name].keys if name in plan else ():
            for read in (key, scale_key(key)):
                uses[read] = uses.get(read, 0) + 1
    tensors = ReadOnce(tensors, uses)
    for name, (shape, stored) in specs.items():
        if name.endswith(".weight_scale"):
            continue  # yielded right after its weight
        tensor, scale = build(plan[name], tensors, dtype, stored)
        if tensor.shape != shape:
            raise ConversionError(f"{name}: made a {tuple(tensor.shape)} tensor from {plan[name].keys}, "
                                  f"the config needs {tuple(shape)}")
        yield name, tensor
        if scale is not None:
            yield name + "_scale", scale
        del tensor, scale  # before the next one is read


def expected_shapes(config: T5Config, encoder_only: bool) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = T5Encoder(config) if encoder_only else T5(config)
    prefix = "encoder." if encoder_only else ""
    return {prefix + k: v.shape for k, v in model.state_dict().items()}


def output_specs(config: T5Config, encoder_only: bool, dtype: torch.dtype, weights: str
                 ) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor of our file with its shape and dtype: fp8 and int8 linear weights are each
    followed by a `weight_scale` of one value per output row (float32 for fp8, bfloat16 for int8)."""
    specs: dict[str, tuple[torch.Size, torch.dtype]] = {}
    for name, shape in expected_shapes(config, encoder_only).items():
        layer = WEIGHTS[weights]
        if layer is not None and is_linear(name):
            specs[name] = (shape, layer.weight_dtype)
            specs[name + "_scale"] = (torch.Size([shape[0]]), layer.scale_dtype)
        else:
            specs[name] = (shape, dtype)
    return specs


def convert_state_dict(hf_config: Mapping, hf_state: Mapping[str, Tensor], *, encoder_only: bool = False,
                       dtype: torch.dtype | None = None, tokenizer_config: Mapping | None = None
                       ) -> tuple[T5Config, dict[str, Tensor]]:
    """A Hugging Face config dict + state dict -> (our T5Config, our state dict), in memory."""
    config, plan, encoder_only = plan_conversion(hf_config, hf_state.keys(), encoder_only=encoder_only,
                                                 tokenizer_config=tokenizer_config)
    first = hf_state[plan[next(iter(plan))].keys[0]].dtype
    specs = output_specs(config, encoder_only, dtype or first, "dense")
    return config, dict(build_all(plan, hf_state, dtype, specs))


########################################################################################
# Reading Hugging Face folders
########################################################################################


class CheckpointTensors(Mapping):
    """The tensors of a Hugging Face folder or of one safetensors file, read one at a time on
    access. With a prefix, only the keys under it are seen, and without it (SD3-style single files
    keep the T5 encoder under "text_encoders.t5xxl.transformer.", beside other models)."""

    def __init__(self, path: Path, prefix: str = "", keep: re.Pattern | None = None) -> None:
        self._files: dict[str, object] = {}  # key -> an open safetensors file, or a loaded state dict
        self._prefix = prefix
        self.paths = [path] if path.is_file() else [path / shard for shard in weight_files(path)]
        for shard in self.paths:
            if shard.name.endswith(".safetensors"):
                handle = open_safetensors(shard)
                keys: Iterable[str] = handle.keys()
            else:  # weights_only: a pickle may hold tensors and nothing that runs code
                try:  # mapped, unless saved in torch's format before 1.6 (not a zip), which cannot be
                    mmap = zipfile.is_zipfile(shard)
                    handle = torch.load(shard, map_location="cpu", weights_only=True, mmap=mmap)
                except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors
                    raise ConversionError(f"{shard}: not a readable PyTorch checkpoint ({error})") from None
                keys = handle
            self._files.update({key: handle for key in keys if key.startswith(prefix)
                                and (keep is None or keep.fullmatch(key[len(prefix):]))})

    def __getitem__(self, key: str) -> Tensor:
        source = self._files[self._prefix + key]
        return source[self._prefix + key] if isinstance(source, dict) else source.get_tensor(self._prefix + key)

    def shape(self, key: str) -> tuple[int, ...]:
        source = self._files[self._prefix + key]
        return tuple(source[self._prefix + key].shape) if isinstance(source, dict) else \
            tuple(source.get_slice(self._prefix + key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        """Read from the file's header, not from the tensor."""
        source = self._files[self._prefix + key]
        if isinstance(source, dict):
            return source[self._prefix + key].dtype
        name = source.get_slice(self._prefix + key).get_dtype()
        if name not in TORCH_DTYPES:
            raise ConversionError(f"{key}: a {name} tensor; T5 checkpoints are floating point")
        return TORCH_DTYPES[name]

    def __iter__(self) -> Iterator[str]:
        return (key[len(self._prefix):] for key in self._files)

    def __len__(self) -> int:
        return len(self._files)


def open_safetensors(path: Path):  # -> safetensors' safe_open handle
    """A safetensors file opened for reading one tensor at a time; a truncated or foreign file is one
    error line naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as error:
        raise ConversionError(f"{path}: not a readable safetensors file ({error})") from None


def read_json(path: Path) -> dict:
    """A JSON object from a source folder; a broken file is one error line naming it."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return value


def shard_names(index: Path) -> list[str]:
    """The files a sharded checkpoint's index names."""
    shards = read_json(index).get("weight_map", {})
    if not isinstance(shards, dict) or not all(isinstance(name, str) for name in shards.values()):
        raise ConversionError(f"{index}: its weight_map is not an object of tensor -> file name")
    return sorted(set(shards.values()))


def weight_files(folder: Path) -> list[str]:
    """The weight files of a Hugging Face folder: one file, or the shards its index names; else its one
    variant (`save_pretrained(variant="fp16")`: model.fp16.safetensors, model.safetensors.index.fp16.json)."""
    for index_name, weights in (("model.safetensors.index.json", "model.safetensors"),
                                ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / weights).is_file():
            return [weights]
        if (folder / index_name).is_file():
            return shard_names(folder / index_name)
    variants = sorted(folder.glob("model.safetensors.index.*.json")) or \
        [path for path in sorted(folder.glob("model.*.safetensors")) if "-of-" not in path.name]
    if len(variants) > 1:
        raise ConversionError(f"{folder}: weights in {len(variants)} variants ({', '.join(p.name for p in variants)}): "
                              "convert a folder with one of them")
    if variants:
        return shard_names(variants[0]) if variants[0].suffix == ".json" else [variants[0].name]
    raise FileNotFoundError(f"{folder}: no model.safetensors, *.safetensors.index.json or pytorch_model.bin")


class Guess(NamedTuple):
    """What the tensor shapes of a single file cannot tell (flags, with the standard defaults)."""

    max_distance: int = 128  # --max-distance
    eps: float = 1e-6  # --eps
    scale_decoder_output: bool | None = None  # --scale-decoder-output; None: no lm_head.weight, or a tied copy


ANCHOR = "encoder.block.0.layer.0.SelfAttention.q.weight"  # every T5 has it: where the prefix shows


def find_prefix(path: Path, keys: Iterable[str], prefix: str | None) -> str:
    """The prefix before transformers' key names in a single file ("" for a plain T5 file)."""
    found = sorted({key[:-len(ANCHOR)] for key in keys if key.endswith(ANCHOR)})
    if prefix is not None:
        if prefix not in found:
            raise ConversionError(f"{path}: no T5 tensors under prefix {prefix!r} (found: {found or 'none'})")
        return prefix
    if not found:
        raise ConversionError(f"{path}: no T5 tensors found (no key ends in {ANCHOR!r}); is this a T5 checkpoint "
                              "with transformers' key names?")
    if len(found) > 1:
        raise ConversionError(f"{path}: several T5 models in one file, under prefixes {found}; choose one with --prefix")
    return found[0]


def same_tensor(tensors: CheckpointTensors, a: str, b: str) -> bool:
    """Whether two tensors hold the same bytes: a tied weight that a tool saved twice."""
    first, second = tensors[a], tensors[b]
    return (first.dtype, first.shape) == (second.dtype, second.shape) and \
        torch.equal(first.contiguous().view(torch.uint8), second.contiguous().view(torch.uint8))


def config_from_shapes(tensors: CheckpointTensors, guess: Guess) -> dict:
    """A Hugging Face config dict for a single file that has none, read off its tensor shapes:
    vocabulary and width from the embedding, heads and buckets from the position bias table,
    head width from the query projection, d_ff and gating from the feed-forward, depths from the
    block numbers, UMT5 from a second layer's own bias table."""
    keys = set(tensors)

    def shape(key: str) -> tuple[int, ...]:
        if key not in keys:
            raise ConversionError(f"these tensors fit no T5: {key} is missing")
        return tensors.shape(key)

    embedding = next((k for k in EMBEDDINGS if k in keys), EMBEDDINGS[0])
    vocab, d_model = shape(embedding)
    buckets, heads = shape(f"encoder.{BIAS_TABLE.format(i=0)}")
    inner, width = shape(ANCHOR)
    if width != d_model or inner % heads:
        raise ConversionError(f"these tensors fit no T5: query projection {(inner, width)} with d_model {d_model} "
                              f"and {heads} heads")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in keys
    d_ff = shape(f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight")[0]

    def depth(stack: str) -> int:
        return 1 + max((int(k.split(".")[2]) for k in keys if k.startswith(f"{stack}.block.")), default=-1)

    decoder = depth("decoder")
    scale = guess.scale_decoder_output
    if scale is None:  # v1.0 ties lm_head to the embedding (and scales); v1.1 and later do not
        if decoder > 0 and gated and "lm_head.weight" not in keys:
            raise ConversionError("a gated (v1.1-style) file without lm_head.weight: the embedding is its output "
                                  "layer, scaled if its config said tie_word_embeddings (transformers 5 saves both "
                                  "this way): pass --scale-decoder-output yes or no")
        scale = decoder > 0 and ("lm_head.weight" not in keys or same_tensor(tensors, "lm_head.weight", embedding))
    return dict(model_type="umt5" if f"encoder.{BIAS_TABLE.format(i=1)}" in keys else "t5", vocab_size=vocab,
                d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_heads=heads, num_layers=depth("encoder"),
                num_decoder_layers=decoder or depth("encoder"), feed_forward_proj="gated-gelu" if gated else "relu",
                relative_attention_num_buckets=buckets, relative_attention_max_distance=guess.max_distance,
                layer_norm_epsilon=guess.eps, scale_decoder_outputs=scale, decoder_start_token_id=0)


class Checkpoint(NamedTuple):
    """A source as the converter reads it, whatever its layout."""

    hf_config: dict  # config.json fields (inferred from the shapes for a single file)
    tensors: CheckpointTensors  # transformers' key names, prefix stripped
    tokenizer: Path | None  # a folder holding tokenizer files, or a sentencepiece model file
    tokenizer_config: dict | None


def find_tokenizer(path: Path | None) -> tuple[Path | None, dict | None]:
    """A --tokenizer argument (or a folder found beside the weights) -> (path, tokenizer_config)."""
    if path is None:
        return None, None
    if path.is_file():
        if path.suffix != ".model":
            raise ConversionError(f"--tokenizer {path}: give a sentencepiece .model file or a tokenizer folder")
        return path, None
    if not path.is_dir():
        raise FileNotFoundError(f"--tokenizer {path}: no such file or folder")
    if not any((path / name).is_file() for name in ("spiece.model", "tokenizer.model", "tokenizer.json",
                                                     "tokenizer_config.json")):
        raise ConversionError(f"--tokenizer {path}: no spiece.model, tokenizer.json or tokenizer_config.json there")
    config = path / "tokenizer_config.json"
    return path, read_json(config) if config.is_file() else None


def diffusers_encoder(root: Path) -> Path:
    """The T5 text encoder folder of a diffusers pipeline (text_encoder_2/ in Flux, text_encoder_3/
    in SD3), chosen by its config's model_type."""
    found = []
    for folder in sorted(root.glob("text_encoder*")):
        config = folder / "config.json"
        if config.is_file() and read_json(config).get("model_type") in SUPPORTED_MODEL_TYPES:
            found.append(folder)
    if len(found) != 1:
        raise ConversionError(f"{root}: a diffusers pipeline with {len(found)} T5 text encoders "
                              f"({', '.join(f.name for f in found) or 'none'}); pass the one to convert")
    return found[0]


def open_checkpoint(src: str, *, tokenizer: str | None = None, prefix: str | None = None,
                    guess: Guess = Guess()) -> Checkpoint:
    """Any source the converter reads: a transformers folder (or hub id); a diffusers pipeline
    folder or its text_encoder_N/ folder, with the tokenizer from tokenizer_N/ beside it; or a
    single .safetensors file with transformers' key names under any prefix, and no config."""
    path = Path(src)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ConversionError(f"{src}: a single-file checkpoint must be a .safetensors file")
        if re.search(r"-\d+-of-\d+\.safetensors$", path.name) and any(path.parent.glob("*.safetensors.index*.json")):
            raise ConversionError(f"{src} is one shard of a sharded checkpoint: convert its folder {path.parent}")
        tensors = CheckpointTensors(path)
        tensors = CheckpointTensors(path, find_prefix(path, tensors, prefix), keep=T5_KEY)  # other models' ignored
        return Checkpoint(config_from_shapes(tensors, guess), tensors, *find_tokenizer(
            Path(tokenizer) if tokenizer else None))
    folder = fetch(src)
    if prefix is not None or guess != Guess():  # a folder's config.json says what these guess
        raise ConversionError("--prefix, --max-distance, --eps and --scale-decoder-output are for single "
                              f".safetensors files; {src} is not one")
    if (folder / "model_index.json").is_file():  # a diffusers pipeline: its T5 text encoder
        folder = diffusers_encoder(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    if is_our_config(config_path):
        raise ConversionError(f"{src} is converted already (t5.load reads it; --to-hf exports it)")
    hf_config = read_json(config_path)
    named = Path(os.path.abspath(folder))  # "." or "text_encoder_2/..": the folder's own name
    beside = named.parent / named.name.replace("text_encoder", "tokenizer")  # where diffusers keeps it
    if tokenizer:
        tokenizer_path: Path | None = Path(tokenizer)
    elif named.name.startswith("text_encoder") and beside.is_dir():
        tokenizer_path = beside
    else:
        tokenizer_path = folder if any((folder / name).is_file() for name in TOKENIZER_FILES) else None
    tokenizer_path, tokenizer_config = find_tokenizer(tokenizer_path)
    config_from_hf(hf_config, tokenizer_config)  # unsupported architectures fail before any tensor is read
    return Checkpoint(hf_config, CheckpointTensors(folder), tokenizer_path, tokenizer_config)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name; a path that exists is never one


def fetch(src: str) -> Path:
    """A local folder as is; otherwise a hub id (owner/name), downloaded with huggingface_hub (of a
    diffusers pipeline, its T5 text encoder and that one's tokenizer only)."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise FileNotFoundError(f"{src} is not a folder")
    if not HUB_ID.fullmatch(src) or ".." in src:
        raise FileNotFoundError(f"{src}: no such folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{src}: no such folder (and huggingface_hub, to fetch it as a hub id, is not "
                                "installed)") from None
    def download(patterns: list[str]) -> Path:
        try:
            return Path(snapshot_download(src, allow_patterns=patterns))
        except Exception as error:  # offline, no such repository, gated, ...: hub errors run over many lines
            first = next((line for line in str(error).splitlines() if line.strip()), "")
            raise FileNotFoundError(f"{src}: no such folder, and as a hub id it could not be fetched "
                                    f"({type(error).__name__}: {first.strip()})") from None

    folder = download(["*.json"])  # the configs first: a diffusers pipeline's T5 is all it needs of it
    if (folder / "model_index.json").is_file():
        encoder = diffusers_encoder(folder).name  # (a pattern's * matches "/": "*.safetensors" takes all)
        folder = download([f"{encoder}/*.safetensors", f"{encoder.replace('text_encoder', 'tokenizer')}/*"])
        return folder if list((folder / encoder).glob("*.safetensors")) else download([f"{encoder}/*.bin"])
    folder = download(["*.json", "*.model", "*.safetensors"])
    return folder if list(folder.glob("*.safetensors")) else download(["*.json", "*.model", "*.bin"])


########################################################################################
# Tokenizer: tokenizer.json (Unigram) -> spiece.model
########################################################################################
# Folders written by transformers 5 carry only tokenizer.json. T5's is sentencepiece's Unigram
# model in another file format: the pieces with their scores, sentencepiece's own normalization
# table (the "precompiled_charsmap") and the whitespace rules. We write those back into a
# sentencepiece ModelProto, so t5.py keeps needing sentencepiece alone. The protobuf wire format
# is simple enough to write by hand (field numbers from sentencepiece_model.proto), which spares
# the converter a protobuf dependency.

PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_BYTE = 1, 2, 3, 6  # SentencePiece.Type
UNIGRAM = 1  # TrainerSpec.ModelType


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 64-bit two's complement
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _field(number: int, value: int | bool | float | str | bytes) -> bytes:
    """One protobuf field: ints, bools and enums as varints, floats as fixed32, str/bytes (and
    nested messages, already encoded) length-delimited."""
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, (bool, int)):
        return _varint(number << 3) + _varint(int(value))
    data = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _walk(node: object) -> Iterator[dict]:
    """Every dict inside a tokenizer.json component (Sequence components nest them in lists)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
    """The varint that starts at data[i], and the index after it."""
    value = shift = 0
    while True:
        byte = data[i]
        value, shift, i = value | (byte & 0x7F) << shift, shift + 7, i + 1
        if byte < 0x80:
            return value, i


def _fields(message: bytes) -> Iterator[tuple[int, int | bytes, bytes]]:
    """Each field of a protobuf message: (its number, its value: an int for a varint, the payload of
    a length-delimited field, the raw bytes of a fixed one, and the field's whole encoding)."""
    i = 0
    while i < len(message):
        start = i
        key, i = _varint_at(message, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint_at(message, i)
        elif wire == 2:
            size, i = _varint_at(message, i)
            value, i = message[i:i + size], i + size
        elif wire in (1, 5):
            value, i = message[i:i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        else:
            raise ConversionError(f"not a sentencepiece model (protobuf wire type {wire})")
        yield key >> 3, value, message[start:i]


def without_byte_fallback(model: bytes) -> bytes:
    """A sentencepiece model with byte fallback turned off (TrainerSpec.byte_fallback false, byte
    pieces such as <0xE6> made normal pieces): characters it does not know become <unk>, not their
    UTF-8 bytes. That is how transformers 5 reads mT5's and UMT5's tokenizers (its T5Tokenizer builds
    their Unigram model without byte fallback from any file). The model as it is when it has none."""
    fields = list(_fields(model))
    spec = next((value for number, value, _ in fields if number == 2), b"")
    if not any(number == 35 and value for number, value, _ in _fields(spec)):
        return model
    out = []
    for number, value, raw in fields:
        if number == 1:  # a piece: (1) its text, (2) score, (3) type
            raw = _field(1, b"".join(_field(3, PIECE_NORMAL) if n == 3 and v == PIECE_BYTE else r
                                     for n, v, r in _fields(value)))
        elif number == 2:  # the trainer spec: (35) byte_fallback
            raw = _field(2, b"".join(_field(35, False) if n == 35 else r for n, _, r in _fields(value)))
        out.append(raw)
    return b"".join(out)


def sentencepiece_from_tokenizer_json(tokenizer: Mapping, path: str = "tokenizer.json") -> bytes:
    """A T5 tokenizer.json (Unigram model, sentinels as trailing added tokens) -> the bytes of the
    equivalent spiece.model, without the sentinels (t5.py numbers those itself)."""
    model = tokenizer.get("model") or {}
    if model.get("type") != "Unigram":
        raise ConversionError(f"{path}: a {model.get('type')!r} tokenizer; T5's is a sentencepiece Unigram model")
    added = {token["content"] for token in tokenizer.get("added_tokens", []) if token.get("special")}
    vocab = [(piece, float(score)) for piece, score in model["vocab"]]
    while vocab and vocab[-1][0] in added and re.fullmatch(r"<extra_id_\d+>", vocab[-1][0]):
        vocab.pop()  # the sentinels: t5.py counts them down from the end of the vocabulary
    unk_id = model.get("unk_id")
    byte_fallback = bool(model.get("byte_fallback"))
    pieces = b""
    for i, (piece, score) in enumerate(vocab):
        kind = PIECE_UNKNOWN if i == unk_id else PIECE_CONTROL if piece in added else \
            PIECE_BYTE if byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else PIECE_NORMAL
        pieces += _field(1, _field(1, piece) + _field(2, score) + _field(3, kind))
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    trainer = (_field(3, UNIGRAM) + _field(4, len(vocab)) + _field(35, byte_fallback)
               + _field(40, -1 if unk_id is None else unk_id) + _field(41, -1)
               + _field(42, ids.get("</s>", -1)) + _field(43, ids.get("<pad>", -1)))
    normalizers = list(_walk(tokenizer.get("normalizer")))
    pretokenizers = list(_walk(tokenizer.get("pre_tokenizer")))
    charsmap = next((base64.b64decode(n["precompiled_charsmap"]) for n in normalizers if n.get("type") == "Precompiled"
                     and n.get("precompiled_charsmap")), b"")
    metaspace = next((p for p in pretokenizers if p.get("type") == "Metaspace"), None)
    if metaspace is None:
        raise ConversionError(f"{path}: no Metaspace pre-tokenizer; this is not a sentencepiece tokenizer")
    dummy_prefix = metaspace.get("prepend_scheme", "always") != "never" and metaspace.get("add_prefix_space", True)
    # sentencepiece's remove_extra_whitespaces: transformers writes it as a WhitespaceSplit
    # pre-tokenizer (transformers 5) or a Replace of " {2,}" by " " (earlier versions)
    collapse = any(p.get("type") == "WhitespaceSplit" for p in pretokenizers) or any(
        n.get("type") == "Replace" and (n.get("pattern") or {}).get("Regex") == " {2,}" for n in normalizers)
    normalizer = (_field(1, "nmt_nfkc" if charsmap else "identity") + (_field(2, charsmap) if charsmap else b"")
                  + _field(3, bool(dummy_prefix)) + _field(4, collapse) + _field(5, True))
    return pieces + _field(2, trainer) + _field(3, normalizer)


def added_tokens(folder: Path) -> dict[int, str]:
    """The tokens a transformers tokenizer folder adds to its model's vocabulary, by id: special
    tokens, sentinels, and any added with `add_tokens` (tokenizer.json, tokenizer_config.json's
    added_tokens_decoder, or an older added_tokens.json)."""
    found: dict[int, str] = {}
    if (folder / "tokenizer.json").is_file():
        tokens = read_json(folder / "tokenizer.json").get("added_tokens", [])
        found.update({token["id"]: token["content"] for token in tokens})
    if (folder / "tokenizer_config.json").is_file():
        decoder = read_json(folder / "tokenizer_config.json").get("added_tokens_decoder") or {}
        found.update({int(i): token["content"] for i, token in decoder.items()})
    if (folder / "added_tokens.json").is_file():
        found.update({i: content for content, i in read_json(folder / "added_tokens.json").items()})
    return found


def check_tokenizer(folder: Path, config: T5Config, source: Path | None) -> bool:
    """Load the tokenizer written into `folder` as t5.py will, and refuse one that t5.py would read
    differently from transformers: unreadable, larger than the model's vocabulary, or with tokens
    added to it (`add_tokens`; t5.py's tokenizer is the sentencepiece model, or bytes, plus the
    sentinels and the special tokens). Returns False when there is no tokenizer at all."""
    from t5 import load_tokenizer

    if config.tokenizer == "sentencepiece" and not any((folder / n).is_file()
                                                       for n in ("spiece.model", "tokenizer.model")):
        return False
    try:
        tokenizer = load_tokenizer(folder, config)
    except ValueError as error:
        raise ConversionError(f"the tokenizer of {source}: {str(error).replace(str(folder) + os.sep, '')}") from None
    unsupported = []
    for i, content in sorted(added_tokens(folder).items()):
        sentinel = SENTINEL.fullmatch(content)
        if sentinel and int(sentinel[1]) < tokenizer.extra_ids and (
                config.tokenizer == "bytes" or i == tokenizer.sentinel(int(sentinel[1]))):
            continue  # (ByT5Tokenizer numbers its sentinels up from 259, t5.py down from the end: see README)
        sp = getattr(tokenizer, "sp", None)
        own_piece = sp is not None and i < sp.get_piece_size() and sp.id_to_piece(i) == content  # e.g. a BOS <s>
        if tokenizer.specials.get(content) != i and not own_piece:
            unsupported.append(f"{content!r} (id {i})")
    if unsupported:
        raise ConversionError(f"the tokenizer of {source} has {len(unsupported)} added token(s) t5.py does not "
                              f"support: {', '.join(unsupported[:5])}{' ...' if len(unsupported) > 5 else ''}; "
                              "t5.py reads the sentencepiece model (or bytes), its sentinels and special tokens only")
    return True


def write_tokenizer(source: Path | None, out: Path, config: T5Config) -> None:
    """Copy the tokenizer files of a Hugging Face folder (or a sentencepiece model file) into OUT;
    when it has only tokenizer.json (as transformers 5 saves T5 tokenizers), write the spiece.model
    that t5.py reads."""
    if source is None:
        return
    if source.is_file():
        shutil.copyfile(source, out / "spiece.model")
    else:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
    if config.tokenizer != "sentencepiece":
        return
    models = [out / n for n in ("spiece.model", "tokenizer.model") if (out / n).is_file()]
    if not models and (out / "tokenizer.json").is_file():
        models = [out / "spiece.model"]
        models[0].write_bytes(sentencepiece_from_tokenizer_json(read_json(out / "tokenizer.json"),
                                                                str(source / "tokenizer.json")))
    import sentencepiece

    for path in models:  # transformers 5's T5 tokenizers have no byte fallback, whatever their files say
        data = path.read_bytes()
        try:
            sentencepiece.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            continue  # unreadable (truncated, foreign): check_tokenizer refuses it by name
        model = without_byte_fallback(data)
        if model != data:
            path.write_bytes(model)
            print(f"convert_hf.py: note: {path.name}'s byte fallback turned off, as transformers reads it (a "
                  "character outside the vocabulary is <unk>, not its bytes)", file=sys.stderr)


########################################################################################
# Writing
########################################################################################


def write_safetensors(path: Path, specs: Mapping[str, tuple[torch.Size, torch.dtype]],
                      tensors: Iterable[tuple[str, Tensor]]) -> None:
    """t5.write_safetensors, with this tool's mark in the metadata (WRITER)."""
    t5_write_safetensors(path, specs, tensors, {"format": "pt", **WRITER})


FLOAT16_MAX = 65504.0


def value_rows(config: T5Config, block: str) -> tuple[str, slice]:
    """The tensor and rows that a float16 output scale of `block` ("encoder.3.ffn", ...) multiplies:
    the rows a block's output follows linearly, attention V and the FFN up-projection (all of wi
    for ReLU, which is positively homogeneous). Used by `apply_out_scales` and `export_hf`."""
    stack, index, kind = block.split(".")
    layer, inner = f"{stack}.layers.{index}", config.inner_dim
    if kind in ("attn", "self_attn"):
        return f"{layer}.{kind}.qkv.weight", slice(2 * inner, None)
    if kind == "cross_attn":
        return f"{layer}.cross_attn.kv.weight", slice(inner, None)
    return f"{layer}.ffn.wi.weight", slice(config.d_ff, None) if config.ffn == "gated-gelu" else slice(None)


def stacks(model: T5 | T5Encoder) -> dict[str, nn.Module]:
    """A model's stacks by the name its blocks carry in T5Config.out_scales."""
    return {"encoder": model.encoder, "decoder": model.decoder} if isinstance(model, T5) else {"encoder": model}


@torch.no_grad()
def calibrate_float16(model: T5 | T5Encoder, input_ids: Tensor, input_mask: Tensor | None = None,
                      decoder_input_ids: Tensor | None = None, *, headroom: float = 4.0) -> dict[str, float]:
    """Which blocks would overflow float16, and the power-of-two scale each needs.

    Runs the model as it is (float32 or bfloat16: their range is wide) on the calibration inputs
    and records, per attention and feed-forward block, the largest magnitude on its value path:
    V and the attention output before and after the out-projection; the FFN up-projection, the
    hidden after the gate and the FFN output. Each scale starts at 1 and is halved until the
    block's largest value times the scale is at most 65504 / headroom. Returns the blocks that
    need a scale below 1 (to give to `apply_out_scales`). decoder_input_ids default to the inputs."""
    if stacks(model)["encoder"].embedding.weight.dtype == torch.float16:
        raise ValueError("calibrate a float32 or bfloat16 model: float16 values have already overflowed")
    config = model.config
    peaks: dict[str, float] = {}
    hooks = []

    def watch(key: str, module: nn.Module, rows: slice | None = None) -> None:
        def hook(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            values = [output if rows is None else output[..., rows]] + ([] if rows is not None else [inputs[0]])
            peaks[key] = max([peaks.get(key, 0.0)] + [float(v.detach().abs().max()) for v in values])
        hooks.append(module.register_forward_hook(hook))

    for stack, module in stacks(model).items():
        for index, layer in enumerate(module.layers):
            for block in ("attn",) if stack == "encoder" else ("self_attn", "cross_attn"):
                key, attention = f"{stack}.{index}.{block}", getattr(layer, block)
                projection = attention.qkv if block != "cross_attn" else attention.kv
                width = projection.weight.shape[0]
                watch(key, projection, slice(width - config.inner_dim, width))  # V
                watch(key, attention.out)  # attention output and the block's output
            key = f"{stack}.{index}.ffn"
            watch(key, layer.ffn.wi, slice(config.d_ff, None) if config.ffn == "gated-gelu" else slice(None))
            watch(key, layer.ffn.wo)  # the hidden after the gate, and the block's output
    try:
        if isinstance(model, T5):
            decoder_ids = input_ids if decoder_input_ids is None else decoder_input_ids
            model(input_ids, decoder_ids, input_mask=input_mask)
        else:
            model(input_ids, input_mask)
    finally:
        for hook in hooks:
            hook.remove()
    scales = {}
    for key, peak in peaks.items():
        if not math.isfinite(peak):
            raise ValueError(f"block {key} overflows even in float32 (a value of {peak}): no scale can fix it")
        scale = 1.0
        while peak * scale > FLOAT16_MAX / headroom:
            scale /= 2
        if scale < 1.0:
            scales[key] = scale
    return scales


@torch.no_grad()
def apply_out_scales(model: T5 | T5Encoder, scales: dict[str, float]) -> None:
    """Fold float16 output scales into the weights, in place (exact: powers of two), make each
    scaled block's output be multiplied back in float32 as it joins the residual stream, and record
    the scales in model.config.out_scales (saved with it in config.json)."""
    config = model.config
    model_stacks = stacks(model)
    merged = {key: config.out_scales.get(key, 1.0) * scale for key, scale in scales.items()}
    dataclasses.replace(config, out_scales=config.out_scales | merged)  # checks every scale before any is applied
    absent = [key for key in scales if key.split(".")[0] not in model_stacks]  # an encoder-only model's decoder
    if absent:
        raise ValueError(f"no block {absent[0]!r} in this model")
    for key, scale in scales.items():
        stack, index, block = key.split(".")
        name, rows = value_rows(config, key)
        layer = model_stacks[stack].get_submodule(name.removeprefix(f"{stack}.").removesuffix(".weight"))
        # an fp8 or int8 layer's rows are scaled through their per-row scales (exact too)
        (layer.weight_scale if isinstance(layer, Float8Linear) else layer.weight)[rows].mul_(scale)
        config.out_scales[key] = merged[key]
        model_stacks[stack].layers[int(index)].unscale[block] = config.unscale(key)


def calibrate(folder: Path, dtype: torch.dtype, texts: list[str] | None = None, *, encoder_only: bool = False
              ) -> dict[str, float]:
    """float16 calibration of a converted folder, in place: run it in float32 on `texts` (or
    CALIBRATION_TEXTS; random ids when the folder has no tokenizer), find the blocks that would
    overflow float16, fold their scales into the weights and record them in config.json."""
    from t5 import load, load_tokenizer

    model = load(folder, encoder_only=encoder_only, dtype=torch.float32)
    try:
        ids, mask = load_tokenizer(folder, model.config).encode_batch(texts or CALIBRATION_TEXTS)
    except FileNotFoundError:
        ids = torch.randint(3, model.config.vocab_size, (8, 64), generator=torch.Generator().manual_seed(0))
        mask = None
    scales = calibrate_float16(model, ids, mask)
    if scales:
        apply_out_scales(model, scales)
        prefix = "encoder." if encoder_only else ""
        state = {prefix + key: tensor for key, tensor in model.state_dict().items()}
        staged = folder / ".model.safetensors.calibrated"  # float32 tensors are still the mapped file's
        write_safetensors(staged, {k: (v.shape, dtype) for k, v in state.items()},
                          ((k, cast(v, dtype, k, CONVERT_WIDER)) for k, v in state.items()))
        staged.replace(folder / "model.safetensors")
        model.config.save(folder / "config.json")
    return scales


def convert(src: str, out: str | Path, *, dtype: torch.dtype | None = None, encoder_only: bool = False,
            force: bool = False, calibrate_texts: list[str] | None = None, weights: str | None = None,
            tokenizer: str | None = None, prefix: str | None = None, guess: Guess = Guess()) -> Path:
    """Convert SRC (see `open_checkpoint`) into OUT. Everything is written into a temporary folder
    beside OUT and renamed into place at the end: a failure leaves OUT as it was.
    dtype: of everything but fp8 weights (default: the embedding's; bfloat16 for an fp8 source, and
    for a float16 one unless calibrating). weights: "dense", "float8_e4m3fn" (linear weights in fp8
    with a float32 scale per row; the default when the source's weights are fp8) or "int8" (int8
    weights, a bfloat16 scale per row).
    calibrate_texts (a list, possibly empty for the built-in prompts) runs `calibrate` before that."""
    out = Path(out)
    check_out(out, force, Path(src))
    checkpoint = open_checkpoint(src, tokenizer=tokenizer, prefix=prefix, guess=guess)
    check_sources(out, [*checkpoint.tensors.paths, *filter(None, [checkpoint.tokenizer])])  # what is read
    tensors = checkpoint.tensors
    config, plan, encoder_only = plan_conversion(checkpoint.hf_config, tensors.keys(), encoder_only=encoder_only,
                                                 tokenizer_config=checkpoint.tokenizer_config)
    embedding = plan["encoder.embedding.weight"].keys[0]
    stored = tensors.dtype(embedding)  # dtypes from the file's header: no tensor is read for them
    source_fp8 = tensors.dtype(plan["encoder.layers.0.attn.qkv.weight"].keys[0]) == FP8
    as_stored = weights is None and source_fp8  # fp8 as the file has it: the layers it keeps dense stay dense
    weights = weights or ("float8_e4m3fn" if source_fp8 else "dense")
    if weights not in WEIGHTS:
        raise ConversionError(f"--weights must be one of {tuple(WEIGHTS)}, got {weights!r}")
    if dtype is None and stored == torch.float16 and calibrate_texts is None:
        # v1.1 / Flan XL and XXL overflow float16 without calibration (t5xxl_fp16 files are common)
        dtype = torch.bfloat16
        print(f"convert_hf.py: note: {src} is float16; storing bfloat16, which cannot overflow (keep float16 with "
              "--dtype float16 --calibrate)", file=sys.stderr)
    dtype = dtype or (torch.bfloat16 if stored in FP8_KINDS or source_fp8 else stored)
    if dtype not in DTYPES.values():
        raise ConversionError(f"cannot compute in {dtype}; use --dtype float32, bfloat16 or float16")
    if calibrate_texts is not None and weights != "dense":
        raise ConversionError(f"--calibrate is for float16 weights; it does not combine with --weights {weights}")
    specs = output_specs(config, encoder_only, dtype, weights)
    if as_stored:
        for name in [name for name in specs if name + "_scale" in specs]:
            if any(tensors.dtype(key) != FP8 for key in plan[name].keys):  # a layer the file keeps dense
                del specs[name + "_scale"]
                specs[name] = (specs[name][0], dtype)
    # the tensors made from the shared embedding first, one after the other: it is held only that long
    made_from_embedding = {name for name, source in plan.items() if embedding in source.keys}
    order = sorted(specs, key=lambda name: name.removesuffix("_scale") not in made_from_embedding)
    specs = {name: specs[name] for name in order}

    with staged_folder(out) as tmp:
        write_tokenizer(checkpoint.tokenizer, tmp, config)  # first: a tokenizer we refuse fails fast
        if not check_tokenizer(tmp, config, checkpoint.tokenizer):
            if tokenizer:  # asked for by name: a wrong folder (CLIP's tokenizer/ beside tokenizer_2/?)
                raise ConversionError(f"--tokenizer {tokenizer}: no T5 tokenizer there (a spiece.model, "
                                      "tokenizer.model or sentencepiece tokenizer.json)")
            print(f"convert_hf.py: warning: no tokenizer found for {src}; {out} runs on token ids only (pass "
                  "--tokenizer with a tokenizer folder or a spiece.model to include one)", file=sys.stderr)
        write_safetensors(tmp / "model.safetensors", specs, build_all(plan, tensors, dtype, specs))
        config.save(tmp / "config.json")
        if calibrate_texts is not None:
            scales = calibrate(tmp, dtype, calibrate_texts, encoder_only=encoder_only)
            print(f"float16 calibration: {len(scales)} block(s) scaled" + "".join(
                f"\n  {key}: {scale}" for key, scale in scales.items()))
    return out


def written_here(folder: Path) -> bool:
    """Whether a folder's config.json and model.safetensors are what this tool writes: our config
    (a conversion, or t5.save, of any version), or weights carrying WRITER (a --to-hf export)."""
    if is_our_config(folder / "config.json"):
        return True
    try:
        with open_safetensors(folder / "model.safetensors") as f:
            return (f.metadata() or {}).get("writer") == WRITER["writer"]
    except (OSError, ConversionError):
        return False


def check_sources(out: Path, sources: Iterable[Path]) -> None:
    """None of the sources (paths read) is OUT or inside it."""
    for src in sources:
        if src.exists() and (src.resolve() == out.resolve() or out.resolve() in src.resolve().parents):
            where = "is OUT" if src.resolve() == out.resolve() else f"is inside OUT {out}"
            raise ConversionError(f"{src} {where}: writing OUT would destroy the source; choose another OUT")


def check_out(out: Path, force: bool, src: Path) -> None:
    """OUT is a folder or absent, not the current folder, and does not hold SRC (`check_sources`). An
    existing OUT is replaced only with --force, and only when it holds nothing but the files this tool
    writes (OUR_FILES), written by it (`written_here`): nothing else is ever deleted."""
    check_sources(out, [src])
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; OUT must be a folder (or absent), and this is "
                              "left untouched")
    if not out.exists():
        return
    if out.resolve() == Path.cwd().resolve():
        raise ConversionError(f"{out} is the current folder, which replacing would pull from under this shell: "
                              "name OUT from its parent")
    ours = sorted(p.name for p in out.iterdir() if p.name in OUR_FILES and p.is_file())
    others = sorted(p.name for p in out.iterdir() if p.name not in ours)
    if others or (ours and not written_here(out)):
        what = f"what this tool did not write ({', '.join(others[:5])}{' ...' if len(others) > 5 else ''})" \
            if others else f"{', '.join(ours)} that this tool did not write (a transformers or another tool's folder)"
        raise FileExistsError(f"{out} exists and holds {what}; it is left untouched, even with --force (which "
                              "replaces only a converted folder): choose another OUT")
    if not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it (replaces its {', '.join(ours)})"
                              if ours else f"{out} exists; pass --force to write into it (it is empty)")


def running(pid: int) -> bool:
    """Whether process `pid` is alive (or cannot be told: not POSIX, where signal 0 tests it)."""
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


@contextlib.contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """A temporary folder beside OUT to write into. When the block succeeds it becomes OUT (an
    existing OUT is moved aside first and deleted only once the new one is in place); when the
    block fails it is deleted: OUT is never half-written. The temporary folders of killed runs go first."""
    out = out.resolve()  # a link to a folder: its target is replaced, beside itself; "a/b/.." is "a"
    tmp, old = out.parent / f".{out.name}.tmp-{os.getpid()}", out.parent / f".{out.name}.old-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):  # of a run killed (SIGTERM, out of memory)
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rename(old)
        try:
            tmp.rename(out)
        except BaseException:
            if old.exists() and not out.exists():
                old.rename(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


########################################################################################
# Back to transformers: --to-hf (and back to dense weights in memory)
########################################################################################

def dequantize(model: nn.Module) -> nn.Module:
    """Replace every t5.Float8Linear and t5.Int8Linear by a t5.Linear holding its dequantized
    weight, in the dtype of the model's embeddings (the dtype it computes in): the model computes
    what it did, except where Int8Linear quantizes its inputs too (float32 on x86 CPUs): there it
    computes the weight-only result. In place; returns the model."""
    dtype = next(m for m in model.modules() if isinstance(m, nn.Embedding)).weight.dtype
    for name, module in list(model.named_modules()):
        if isinstance(module, Float8Linear):
            with torch.device("meta"):
                dense = Linear(module.in_features, module.out_features)
            dense.weight = nn.Parameter(module.dense_weight(dtype), requires_grad=False)
            model.set_submodule(name, dense)
    return model


HF_ARCHITECTURES = {  # model_type -> (encoder-decoder class, encoder-only class)
    "t5": ("T5ForConditionalGeneration", "T5EncoderModel"),
    "mt5": ("MT5ForConditionalGeneration", "MT5EncoderModel"),
    "umt5": ("UMT5ForConditionalGeneration", "UMT5EncoderModel"),
}


def hf_config_for(config: T5Config, model_type: str, encoder_only: bool, tied: bool) -> dict:
    """The config.json transformers needs for our config, in the form the hub's files use."""
    return {
        "architectures": [HF_ARCHITECTURES[model_type][encoder_only]], "model_type": model_type,
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff,
        "num_heads": config.num_heads, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "feed_forward_proj": config.ffn,
        "relative_attention_num_buckets": config.num_buckets, "relative_attention_max_distance": config.max_distance,
        "layer_norm_epsilon": config.eps, "dropout_rate": config.dropout, "initializer_factor": 1.0,
        "pad_token_id": config.pad_token_id, "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id, "is_encoder_decoder": not encoder_only,
        "use_cache": True, "tie_word_embeddings": tied,
    }


def export_hf(src: str | Path, out: str | Path, *, force: bool = False, model_type: str | None = None,
              dtype: torch.dtype | None = None) -> Path:
    """Our folder -> a transformers folder: config.json, model.safetensors with transformers' key
    names (each fused tensor split back into its parts), the tokenizer files. The inverse of
    `convert`, through the same tables: transformers -> ours -> transformers is bit-exact. Streamed:
    each tensor is read once and written before the next is read, but for the shared embedding,
    held while the decoder's and lm_head are read to compare with it.

    model_type: "t5", "mt5" or "umt5" (default: umt5 for per-layer position bias, mt5 for mT5's
    vocabulary of 250112, t5 otherwise; the tensors are the same for t5 and mt5). T5 v1.0's
    lm_head (the embedding scaled by d_model**-0.5, folded by `convert`) goes back to being the
    tied embedding when it still is exactly that; a lm_head trained apart is written as its own
    tensor with no output scale, which computes the same logits. fp8 weights are dequantized to the
    embeddings' dtype, as t5.Float8Linear computes. A float16-calibrated checkpoint's out_scales
    are undone exactly (powers of two, in float32): a value that then no longer fits float16 is
    refused, naming the tensor (export it with dtype float32 or bfloat16). dtype: of the written
    tensors (default: the embeddings'; float32 for a float16-calibrated checkpoint)."""
    src, out = Path(src), Path(out)
    check_out(out, force, src)
    config = T5Config.load(src / "config.json")
    if not (src / "model.safetensors").is_file():
        raise FileNotFoundError(f"{src / 'model.safetensors'} not found (is {src} a folder written by convert_hf.py?)")
    model_type = model_type or ("umt5" if config.bias_per_layer else "mt5" if config.vocab_size == 250112 else "t5")
    if model_type not in HF_ARCHITECTURES:
        raise ConversionError(f"--model-type must be one of {sorted(HF_ARCHITECTURES)}, got {model_type!r}")
    if (model_type == "umt5") != config.bias_per_layer:
        raise ConversionError(f"model_type {model_type!r} does not fit this checkpoint: UMT5 and only UMT5 has "
                              "a position bias table per layer")
    # our tensor -> [(rows, factor, why)]: float16 output scales to undo (exact: powers of two), and
    # with scale_qk the attention scale, which transformers' T5 expects burned into the queries
    rescale: dict[str, list[tuple[slice, float, str]]] = {}
    for block, scale in config.out_scales.items():
        name, rows = value_rows(config, block)
        rescale.setdefault(name, []).append((rows, 1 / scale, f"undoing the float16 scale {scale} of {block}"))
    if config.scale_qk:
        for name in expected_shapes(config, False):
            if name.endswith(("attn.qkv.weight", "cross_attn.q.weight")):
                rescale.setdefault(name, []).append((slice(0, config.inner_dim), config.d_kv**-0.5,
                                                     "folding the attention scale into the queries"))

    with open_safetensors(src / "model.safetensors") as f:
        encoder_only = not any(key.startswith("decoder.") for key in f.keys())
        for name, shape in expected_shapes(config, encoder_only).items():  # from the header: nothing read yet
            if name not in f.keys() or f.get_slice(name).get_shape() != list(shape):
                raise ConversionError(f"{src / 'model.safetensors'}: {name} is missing or not {tuple(shape)}, as "
                                      "config.json says")
        compute = TORCH_DTYPES[f.get_slice("encoder.embedding.weight").get_dtype()]  # what the model computes in
        if dtype is None and compute == torch.float16 and config.out_scales:
            dtype = torch.float32  # transformers' T5 has no output scales: in float16 it would overflow again
            print("convert_hf.py: a float16-calibrated checkpoint exports in float32 (transformers would run the "
                  "unscaled weights in float16 and overflow); --dtype float16 keeps float16", file=sys.stderr)
        dtype = dtype or compute

        def read(name: str, dtype: torch.dtype) -> Tensor:
            """One of our tensors as transformers computes with it, in `dtype`."""
            tensor = f.get_tensor(name)
            if name + "_scale" in f.keys():  # an fp8 or int8 weight and its row scales
                tensor = dequantize_weight(tensor, f.get_tensor(name + "_scale"), compute)
            if name not in rescale:
                return cast(tensor, dtype, name, "export with --dtype float32 or bfloat16")
            tensor = tensor.to(torch.float32, copy=True)
            for rows, factor, _ in rescale[name]:
                tensor[rows] *= factor
            result = tensor.to(dtype)
            if not torch.isfinite(result).all():
                kind = str(dtype).removeprefix("torch.")
                raise ConversionError(f"{name}: {' and '.join(why for _, _, why in rescale[name])} gives values past "
                                      f"{kind}'s range: export with --dtype float32 or bfloat16")
            return result

        shared = read("encoder.embedding.weight", compute)
        if not encoder_only and not torch.equal(shared, read("decoder.embedding.weight", compute)):
            raise ConversionError("the encoder and decoder embeddings differ: transformers' T5 has one shared "
                                  "embedding")
        first = {"encoder.embedding.weight": shared}  # read already: written first, then let go
        tied = False
        if not encoder_only and model_type != "mt5":  # v1.0: is lm_head still the scaled embedding?
            first["lm_head.weight"] = read("lm_head.weight", compute)
            tied = torch.equal(first["lm_head.weight"], (shared.float() * config.d_model**-0.5).to(shared.dtype))
            if tied:
                del first["lm_head.weight"]  # transformers ties it to shared.weight and applies the scale itself
        del shared
        plan = make_plan(config, embedding="shared.weight", lm_head=not tied, scale_lm_head=tied,
                         encoder_only=encoder_only)
        skip = {"decoder.embedding.weight"} | ({"lm_head.weight"} if tied else set())  # both are shared.weight
        names = [*first, *(name for name in plan if name not in first and name not in skip)]
        specs = {}
        for name in names:
            source, shape = plan[name], list(f.get_slice(name).get_shape())
            shape[source.dim] //= len(source.keys)
            specs.update({key: (torch.Size(shape), dtype) for key in source.keys})

        def tensors() -> Iterator[tuple[str, Tensor]]:
            for name in names:
                source = plan[name]
                tensor = first.pop(name).to(dtype) if name in first else read(name, dtype)
                for key, part in zip(source.keys, tensor.chunk(len(source.keys), dim=source.dim)):
                    yield key, part
                del tensor, part  # before the next one is read

        with staged_folder(out) as tmp:
            write_safetensors(tmp / "model.safetensors", specs, tensors())
            hf_config = hf_config_for(config, model_type, encoder_only, tied)
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            names = [name for name in TOKENIZER_FILES if (src / name).is_file()]
            if not tokenizer_json_matches(src):  # transformers would read tokenizer.json, not spiece.model
                print(f"convert_hf.py: warning: {src / 'tokenizer.json'} is another tokenizer than "
                      f"spiece.model's: exporting spiece.model's alone", file=sys.stderr)
                names = [name for name in names if name in ("spiece.model", "tokenizer.model")]
            for name in names:
                shutil.copyfile(src / name, tmp / name)
            source = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
            settings = source if "tokenizer_config.json" in names else {  # left out: its clean-up flag still holds
                key: value for key, value in source.items() if key == "clean_up_tokenization_spaces"}
            if "tokenizer_class" not in settings:  # none, or t5.save's clean-up flag alone: transformers' fields too
                kind = "ByT5Tokenizer" if config.tokenizer == "bytes" else "T5Tokenizer"
                (tmp / "tokenizer_config.json").write_text(json.dumps(
                    {"tokenizer_class": kind, "extra_ids": config.extra_ids, "eos_token": "</s>", "unk_token": "<unk>",
                     "pad_token": "<pad>", **settings}, indent=2) + "\n")
            if hf_config["model_type"] == "umt5" and (tmp / "spiece.model").is_file() \
                    and not (tmp / "tokenizer.json").is_file():
                write_tokenizer_json(tmp)
    return out


def tokenizer_json_matches(folder: Path) -> bool:
    """Whether a folder's tokenizer.json holds the pieces of its spiece.model (True where either is
    missing, or tokenizer.json is no sentencepiece tokenizer: nothing to compare). t5.save keeps a
    folder's tokenizer.json when it has no spiece.model to compare it with."""
    import sentencepiece

    model = next((folder / n for n in ("spiece.model", "tokenizer.model") if (folder / n).is_file()), None)
    if model is None or not (folder / "tokenizer.json").is_file():
        return True
    try:
        other = sentencepiece_from_tokenizer_json(read_json(folder / "tokenizer.json"))
    except (ConversionError, KeyError, TypeError, ValueError):
        return True
    a, b = (sentencepiece.SentencePieceProcessor(model_proto=proto) for proto in (model.read_bytes(), other))
    return [a.id_to_piece(i) for i in range(len(a))] == [b.id_to_piece(i) for i in range(len(b))]


def write_tokenizer_json(folder: Path) -> None:
    """transformers 5 reads a UMT5 tokenizer from tokenizer.json only (T5's and mT5's spiece.model it
    converts itself): make one from the folder's spiece.model with transformers' converter, when installed."""
    try:
        from transformers import T5Tokenizer
    except ImportError:
        print("convert_hf.py: note: no tokenizer.json written (transformers is not installed here); "
              "transformers' AutoTokenizer needs one for UMT5", file=sys.stderr)
        return
    T5Tokenizer.from_pretrained(folder).save_pretrained(folder)


def summary(out: Path) -> str:
    """What a converted folder holds, in one line: its stacks, width and feed-forward."""
    config = T5Config.load(out / "config.json")
    with open_safetensors(out / "model.safetensors") as f:
        decoder = any(key.startswith("decoder.") for key in f.keys())
    layers = f"{config.num_encoder_layers} encoder" + (f" + {config.num_decoder_layers} decoder" if decoder else "")
    return f"{layers} layers, d_model {config.d_model}, ffn {config.ffn}" + \
        (", per-layer bias" if config.bias_per_layer else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("src", help="a transformers folder or hub id, a diffusers pipeline or text_encoder_N/ folder, "
                        "or a single .safetensors file (with --to-hf: one of our folders)")
    parser.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store weights (fp8 checkpoints: all but the fp8 "
                        "weights; with --to-hf: all) in this dtype (default: as the checkpoint; bfloat16 for an fp8 "
                        "source, and for a float16 one unless --calibrate)")
    parser.add_argument("--weights", choices=tuple(WEIGHTS), help="float8_e4m3fn: linear weights in fp8 with a float32 "
                        "scale per row; int8: int8 weights with a bfloat16 scale per row (symmetric); embeddings "
                        "and norms in --dtype (default: fp8 when the source's are, else dense)")
    parser.add_argument("--encoder-only", action="store_true", help="keep only the encoder (text encoders of diffusion "
                        "models) (default: everything the source has)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists and holds only what this tool "
                        "wrote: config.json, model.safetensors, tokenizer files (default: refuse)")
    parser.add_argument("--tokenizer", help="where the tokenizer is: a folder (diffusers' tokenizer_2/, a transformers "
                        "tokenizer folder) or a spiece.model (default: the source folder; for diffusers, tokenizer_N/ "
                        "beside text_encoder_N/)")
    parser.add_argument("--calibrate", nargs="?", const="", metavar="TEXT_FILE",
                        help="find the blocks whose outputs would overflow float16 (on the lines of TEXT_FILE, or "
                             "built-in prompts) and store power-of-two scales for them: use with --dtype float16 "
                             "(default: off)")
    single = parser.add_argument_group("single .safetensors files (no config.json): what the shapes cannot tell")
    single.add_argument("--prefix", help="the prefix before transformers' key names, e.g. text_encoders.t5xxl.transformer. "
                        "(default: found in the file)")
    single.add_argument("--max-distance", type=int, default=128, help="relative_attention_max_distance (default: 128)")
    single.add_argument("--eps", type=float, default=1e-6, help="layer_norm_epsilon (default: 1e-6)")
    single.add_argument("--scale-decoder-output", choices=("yes", "no"), help="T5 v1.0's d_model**-0.5 before lm_head "
                        "(default: yes when the file has no lm_head.weight, as v1.0 files do, or one equal to the "
                        "embedding; no otherwise; a gated file without lm_head.weight needs it)")
    back = parser.add_argument_group("back to transformers")
    back.add_argument("--to-hf", action="store_true", help="SRC is one of our folders: write a transformers folder "
                      "(default: off)")
    back.add_argument("--model-type", choices=sorted(HF_ARCHITECTURES), help="with --to-hf (default: umt5 for per-layer "
                      "position bias, mt5 for a 250112 vocabulary, t5 otherwise)")
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, _sigint)  # the one before (Python's: a KeyboardInterrupt, caught below)
    args = parser.parse_args(argv)
    converting = ("encoder_only", "weights", "calibrate", "tokenizer", "prefix", "max_distance", "eps",
                  "scale_decoder_output")  # options of the import only
    given = [f"--{name.replace('_', '-')}" for name in converting if getattr(args, name) != parser.get_default(name)]
    if args.to_hf and given:
        print(f"convert_hf.py: error: {', '.join(given)}: not for --to-hf, which exports SRC as it is", file=sys.stderr)
        return 2
    if args.model_type and not args.to_hf:
        print("convert_hf.py: error: --model-type is for --to-hf", file=sys.stderr)
        return 2
    try:
        if args.to_hf:
            out = export_hf(args.src, args.out, force=args.force, model_type=args.model_type,
                            dtype=DTYPES.get(args.dtype))
            print(f"wrote {out} ({json.loads((out / 'config.json').read_text())['architectures'][0]})")
            return 0
        texts = None
        if args.calibrate is not None:
            texts = Path(args.calibrate).read_text().splitlines() if args.calibrate else []
        guess = Guess(args.max_distance, args.eps, None if args.scale_decoder_output is None
                      else args.scale_decoder_output == "yes")
        out = convert(args.src, args.out, dtype=DTYPES.get(args.dtype), encoder_only=args.encoder_only,
                      force=args.force, calibrate_texts=texts, weights=args.weights, tokenizer=args.tokenizer,
                      prefix=args.prefix, guess=guess)
    except (ConversionError, OSError, ValueError) as error:
        print(f"convert_hf.py: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the temporary folder is gone already (staged_folder); OUT is as it was
        print("convert_hf.py: interrupted", file=sys.stderr)
        return 130
    try:
        print(f"wrote {out} ({summary(out)})")
    except KeyboardInterrupt:  # OUT is written already: only its summary is missing
        print(f"convert_hf.py: interrupted (after writing {out})", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
