"""Convert a Hugging Face T5 checkpoint (T5 v1.0/v1.1, Flan-T5, mT5, UMT5/Pile-T5, ByT5) into
t5.py's layout: OUT/config.json (our T5Config), OUT/model.safetensors (fused weights) and the
tokenizer files.

    python convert_hf.py SRC OUT [--dtype bfloat16] [--encoder-only] [--force]

SRC is a local folder (config.json with model.safetensors, a sharded *.safetensors.index.json,
or pytorch_model.bin, read with torch.load(weights_only=True)), or a hub id when huggingface_hub
is installed and the network allows. transformers is not needed: the raw config.json fields are
read here, not a library's reinterpretation of them.

The whole mapping is the tables below: each of our tensors names the Hugging Face tensors it is
made of (several = concatenated, that is where the projections are fused). Tensors are read one
at a time and streamed into the output, so converting t5-11b does not need 45 GB of RAM.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from t5 import DTYPES, T5, T5Config, T5Encoder

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
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
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
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


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
    # ByT5 reads UTF-8 bytes; its folders say so in tokenizer_config.json (or have only its vocabulary size)
    is_bytes = tokenizer_config.get("tokenizer_class") == "ByT5Tokenizer" or (
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
        extra_ids=tokenizer_config.get("extra_ids", 125 if is_bytes else 100),
    )
    return config, scales_decoder_output(model_type, hf)


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
    plan: dict[str, Source] = {}
    stacks = [("encoder", ENCODER_LAYER, config.num_encoder_layers, "layer.1")]
    if not encoder_only:
        stacks.append(("decoder", DECODER_LAYER, config.num_decoder_layers, "layer.2"))
    for stack, layer_table, depth, ffn in stacks:
        plan[f"{stack}.embedding.weight"] = Source((embedding,))
        tables = range(depth) if config.bias_per_layer else range(1)
        plan[f"{stack}.position_bias.embedding.weight"] = Source(
            tuple(f"{stack}.{BIAS_TABLE.format(i=i)}" for i in tables), dim=1)  # UMT5: (buckets, (l h))
        for i in range(depth):
            for ours, theirs in {**layer_table, "ffn.wi.weight": FFN_IN[config.ffn]}.items():
                plan[f"{stack}.layers.{i}.{ours}"] = Source(
                    tuple(f"{stack}.block.{i}.{key.format(ffn=ffn)}" for key in theirs))
        plan[f"{stack}.final_norm.weight"] = Source((f"{stack}.final_layer_norm.weight",))
    if not encoder_only:
        head = "lm_head.weight" if "lm_head.weight" in hf_keys else embedding
        plan["lm_head.weight"] = Source((head,), scale=config.d_model**-0.5 if scale_lm_head else 1.0)

    used = {key for source in plan.values() for key in source.keys}
    missing = sorted(used - hf_keys)
    if missing:
        raise ConversionError(f"checkpoint is missing {len(missing)} tensor(s): {', '.join(missing[:10])}"
                              f"{' ...' if len(missing) > 10 else ''}")
    dropped = set(EMBEDDINGS)  # tied copies of the embedding
    if encoder_only:  # a full checkpoint converted --encoder-only: its decoder is left behind
        dropped |= {k for k in hf_keys if k.startswith("decoder.") or k == "lm_head.weight"}
    unexpected = sorted(hf_keys - used - dropped)
    if unexpected:
        raise ConversionError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:10])}"
                              f"{' ...' if len(unexpected) > 10 else ''}")
    return config, plan, encoder_only


def build(source: Source, tensors: Mapping[str, Tensor], dtype: torch.dtype | None) -> Tensor:
    """Make one of our tensors from its Source; fusion (concatenation) happens here only. The
    result is always a new tensor: the encoder's and decoder's embeddings, both made from
    shared.weight, must not share memory (that would tie them again)."""
    parts = [tensors[key] for key in source.keys]
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=source.dim)
    if source.scale != 1.0:
        tensor = tensor.float() * source.scale
    return tensor.to(dtype or parts[0].dtype, memory_format=torch.contiguous_format, copy=True)


def build_all(plan: Mapping[str, Source], tensors: Mapping[str, Tensor], dtype: torch.dtype | None,
              shapes: Mapping[str, torch.Size]) -> Iterator[tuple[str, Tensor]]:
    """Our tensors one at a time, in the order of `shapes`, each checked against its shape."""
    for name, shape in shapes.items():
        tensor = build(plan[name], tensors, dtype)
        if tensor.shape != shape:
            raise ConversionError(f"{name}: made a {tuple(tensor.shape)} tensor from {plan[name].keys}, "
                                  f"the config needs {tuple(shape)}")
        yield name, tensor


def expected_shapes(config: T5Config, encoder_only: bool) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = T5Encoder(config) if encoder_only else T5(config)
    prefix = "encoder." if encoder_only else ""
    return {prefix + k: v.shape for k, v in model.state_dict().items()}


def convert_state_dict(hf_config: Mapping, hf_state: Mapping[str, Tensor], *, encoder_only: bool = False,
                       dtype: torch.dtype | None = None, tokenizer_config: Mapping | None = None
                       ) -> tuple[T5Config, dict[str, Tensor]]:
    """A Hugging Face config dict + state dict -> (our T5Config, our state dict), in memory."""
    config, plan, encoder_only = plan_conversion(hf_config, hf_state.keys(), encoder_only=encoder_only,
                                                 tokenizer_config=tokenizer_config)
    return config, dict(build_all(plan, hf_state, dtype, expected_shapes(config, encoder_only)))


########################################################################################
# Reading Hugging Face folders
########################################################################################


class CheckpointTensors(Mapping):
    """The tensors of a Hugging Face folder, read one at a time on access."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self._files: dict[str, object] = {}  # key -> an open safetensors file, or a loaded state dict
        for index_name, weights in (("model.safetensors.index.json", "model.safetensors"),
                                    ("pytorch_model.bin.index.json", "pytorch_model.bin")):
            if (folder / weights).is_file():
                shards = [weights]
            elif (folder / index_name).is_file():
                shards = sorted(set(json.loads((folder / index_name).read_text())["weight_map"].values()))
            else:
                continue
            for shard in shards:
                path = folder / shard
                if shard.endswith(".safetensors"):
                    handle = safe_open(str(path), framework="pt")
                    self._files.update({key: handle for key in handle.keys()})
                else:  # weights_only: a pickle may hold tensors and nothing that runs code
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                    self._files.update({key: state for key in state})
            return
        raise FileNotFoundError(f"{folder}: no model.safetensors, *.safetensors.index.json or pytorch_model.bin")

    def __getitem__(self, key: str) -> Tensor:
        source = self._files[key]
        return source[key] if isinstance(source, dict) else source.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def fetch(src: str) -> Path:
    """A local folder as is; otherwise a hub id, downloaded with huggingface_hub."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists() or src.startswith((".", "/")):
        raise FileNotFoundError(f"{src} is not a folder")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{src} is not a local folder, and huggingface_hub is not installed to fetch it "
                                "from the hub") from None
    folder = Path(snapshot_download(src, allow_patterns=["*.json", "*.model", "*.safetensors"]))
    if not list(folder.glob("*.safetensors")):
        folder = Path(snapshot_download(src, allow_patterns=["*.json", "*.model", "*.bin"]))
    return folder


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


def write_tokenizer(folder: Path, out: Path, config: T5Config) -> None:
    """Copy the tokenizer files of a Hugging Face folder into OUT; when it has only tokenizer.json
    (as transformers 5 saves T5 tokenizers), write the spiece.model that t5.py reads."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    if config.tokenizer == "sentencepiece" and not any((out / n).is_file() for n in ("spiece.model", "tokenizer.model")) \
            and (out / "tokenizer.json").is_file():
        model = sentencepiece_from_tokenizer_json(json.loads((out / "tokenizer.json").read_text()),
                                                  str(folder / "tokenizer.json"))
        (out / "spiece.model").write_bytes(model)


########################################################################################
# Writing
########################################################################################


def write_safetensors(path: Path, shapes: Mapping[str, torch.Size], dtype: torch.dtype,
                      tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Stream tensors into a safetensors file: the header (names, shapes, offsets) is known from
    the shapes and the dtype alone, so each tensor is written and freed before the next is made."""
    size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        nbytes = shape.numel() * size
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, tensor), expected in zip(tensors, shapes):
            assert name == expected and tensor.dtype == dtype and tensor.shape == shapes[name], name
            tensor = tensor.contiguous()
            f.write(ctypes.string_at(tensor.data_ptr(), tensor.nbytes))


def calibrate(folder: Path, dtype: torch.dtype, texts: list[str] | None = None, *, encoder_only: bool = False
              ) -> dict[str, float]:
    """float16 calibration of a converted folder, in place: run it in float32 on `texts` (or
    CALIBRATION_TEXTS; random ids when the folder has no tokenizer), find the blocks that would
    overflow float16, fold their scales into the weights and record them in config.json."""
    from t5 import apply_out_scales, calibrate_float16, load, load_tokenizer

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
        write_safetensors(folder / "model.safetensors", {k: v.shape for k, v in state.items()}, dtype,
                          ((k, v.to(dtype)) for k, v in state.items()))
        model.config.save(folder / "config.json")
    return scales


def convert(src: str, out: str | Path, *, dtype: torch.dtype | None = None, encoder_only: bool = False,
            force: bool = False, calibrate_texts: list[str] | None = None) -> Path:
    """Convert SRC (folder or hub id) into OUT. Everything is written into a temporary folder
    beside OUT and renamed into place at the end: a failure leaves OUT as it was.
    calibrate_texts (a list, possibly empty for the built-in prompts) runs `calibrate` before that."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; OUT must be a folder (or absent), and this is "
                              "left untouched")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    folder = fetch(src)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found")
    hf_config = json.loads(config_path.read_text())
    tokenizer_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_path.read_text()) if tokenizer_path.is_file() else None
    config_from_hf(hf_config, tokenizer_config)  # unsupported architectures fail before any tensor is read
    tensors = CheckpointTensors(folder)
    config, plan, encoder_only = plan_conversion(hf_config, tensors.keys(), encoder_only=encoder_only,
                                                 tokenizer_config=tokenizer_config)
    shapes = expected_shapes(config, encoder_only)
    dtype = dtype or tensors[next(iter(plan.values())).keys[0]].dtype  # default: the embedding's dtype
    if dtype not in SAFETENSORS_DTYPES:
        raise ConversionError(f"cannot store {dtype}; use --dtype float32, bfloat16 or float16")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", shapes, dtype, build_all(plan, tensors, dtype, shapes))
        config.save(tmp / "config.json")
        write_tokenizer(folder, tmp, config)
        if calibrate_texts is not None:
            scales = calibrate(tmp, dtype, calibrate_texts, encoder_only=encoder_only)
            print(f"float16 calibration: {len(scales)} block(s) scaled" + "".join(
                f"\n  {key}: {scale}" for key, scale in scales.items()))
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="Hugging Face folder, or hub id (needs huggingface_hub and network)")
    parser.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="store weights in this dtype (default: as the checkpoint)")
    parser.add_argument("--encoder-only", action="store_true", help="keep only the encoder (text encoders of diffusion models)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--calibrate", nargs="?", const="", metavar="TEXT_FILE",
                        help="find the blocks whose outputs would overflow float16 (on the lines of TEXT_FILE, or "
                             "built-in prompts) and store power-of-two scales for them: use with --dtype float16")
    args = parser.parse_args(argv)
    try:
        texts = None
        if args.calibrate is not None:
            texts = Path(args.calibrate).read_text().splitlines() if args.calibrate else []
        out = convert(args.src, args.out, dtype=DTYPES.get(args.dtype), encoder_only=args.encoder_only,
                      force=args.force, calibrate_texts=texts)
    except (ConversionError, FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"convert_hf.py: error: {error}", file=sys.stderr)
        return 1
    config = T5Config.load(out / "config.json")
    print(f"wrote {out} ({config.num_encoder_layers} encoder + {config.num_decoder_layers} decoder layers, "
          f"d_model {config.d_model}, ffn {config.ffn}{', per-layer bias' if config.bias_per_layer else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
