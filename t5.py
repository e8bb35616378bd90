"""T5 in one file: the encoder-decoder of Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer" (arXiv:1910.10683), in plain PyTorch.

One model class covers every public T5 family once its weights are converted with
`convert_hf.py`:
  - T5 v1.0 (t5-small ... t5-11b): ReLU feed-forward, output embedding tied to the input one and
    rescaled by d_model**-0.5 (the converter folds the scale into a separate `lm_head`).
  - T5 v1.1, Flan-T5, mT5, ByT5: gated-GELU feed-forward (tanh approximation), untied `lm_head`;
    ByT5 has a deeper encoder than decoder.
  - UMT5 / Pile-T5: every layer owns its relative position bias table.

Notable choices:
  - No absolute positions: a learned scalar per (head, distance bucket) is added to the attention
    logits. It is computed once per stack (all UMT5 layers in one lookup), not once per layer.
  - No attention scale by default: Google burned d_kv**-0.5 into the query weights
    (`T5Config.scale_qk`).
  - The residual stream is float32 whatever the weight dtype; RMSNorm reads it and hands the
    layer its input in the weight dtype, and each block's output is added back in float32.
  - Fused projections: QKV in self-attention, KV in cross-attention, both halves of the gated
    feed-forward in one matrix.
  - Attention through `torch.nn.functional.scaled_dot_product_attention`, with the position bias
    and the masks folded into one additive `attn_mask` per stack.
  - Three attention classes for three jobs: the encoder's (no cache), the decoder's causal
    self-attention (writes a static cache in place) and cross-attention (reads keys/values
    computed once per encoding).
  - Padding never leaks: a prompt's encoder output at its real tokens does not depend on the
    padding after it or on the other rows of the batch, and padded positions come out as zeros.

Shape legend (einops names used throughout):
  b batch        s encoder (source) positions     t decoder (target) positions
  q queries      k keys                           h heads
  e head width (d_kv)   d model width (d_model)   f feed-forward width (d_ff)
  v vocabulary   l layers (of bias tables or caches)   n beams or samples per input
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

FFN_KINDS = ("relu", "gated-gelu")


########################################################################################
# Config
########################################################################################


@dataclass
class T5Config:
    """Everything a real T5 checkpoint needs, and nothing more. Saved as our own config.json."""

    vocab_size: int = 32128  # rows of the embeddings and of lm_head (mT5: 250112, ByT5: 384)
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head; num_heads * d_kv may differ from d_model
    d_ff: int = 2048  # hidden width of the feed-forward block
    num_heads: int = 8  # attention heads per layer
    num_encoder_layers: int = 6  # encoder depth
    num_decoder_layers: int = 6  # decoder depth (ByT5: 12 encoder layers, 4 decoder layers)
    ffn: Literal["relu", "gated-gelu"] = "relu"  # v1.0: relu; v1.1/Flan/mT5/UMT5/ByT5: gated-gelu
    bias_per_layer: bool = False  # UMT5 / Pile-T5: every layer has its own position bias table
    scale_qk: bool = False  # scale q.k by d_kv**-0.5 (Google's checkpoints: off, it is in the weights)
    num_buckets: int = 32  # relative position buckets (half per direction in the encoder)
    max_distance: int = 128  # distances at or past this share the last bucket
    eps: float = 1e-6  # RMSNorm epsilon
    pad_token_id: int = 0  # padding id, also the usual decoder start
    eos_token_id: int = 1  # end of sequence (Pile-T5: 2)
    decoder_start_token_id: int = 0  # first decoder input token

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                     "num_decoder_layers", "num_buckets", "max_distance"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"T5Config.ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.num_buckets < 4:
            raise ValueError(f"T5Config.num_buckets must be at least 4, got {self.num_buckets}")
        if not self.eps > 0:
            raise ValueError(f"T5Config.eps must be positive, got {self.eps!r}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"T5Config.{name}={value} is outside [0, {self.vocab_size})")

    @property
    def inner_dim(self) -> int:
        """Width of all heads together: num_heads * d_kv."""
        return self.num_heads * self.d_kv

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> T5Config:
        """Read a config.json written by `save`; an unknown or missing field is an error."""
        fields = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{path}: unknown T5Config fields {unknown} (is this a converted checkpoint?)")
        missing = sorted(known - set(fields))
        if missing:
            raise ValueError(f"{path}: missing T5Config fields {missing}")
        return cls(**fields)


########################################################################################
# Outputs
########################################################################################


class T5Output(NamedTuple):
    logits: Tensor  # (b, t, v) in the weight dtype
    loss: Tensor | None  # mean cross-entropy over labels != -100, when labels were given


########################################################################################
# Helpers: position buckets, input checks, masks
########################################################################################


def relative_position_bucket(relative_position: Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Bucket id of each `key_position - query_position` (Mesh TensorFlow's scheme).

    Bidirectional (encoder): half of the buckets are for keys after the query, half for keys
    before. Causal (decoder): keys after the query all fall in bucket 0 (they are masked anyway).
    Within a direction, distances below `max_exact = buckets // 2` get a bucket each; larger ones
    share log-spaced buckets up to `max_distance`, and everything farther shares the last bucket.
    """
    if bidirectional:
        num_buckets //= 2
        bucket = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        bucket = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # The float32 operations in this order reproduce the reference buckets exactly.
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    far = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, far)


def check_token_ids(ids: Tensor, vocab_size: int, name: str) -> None:
    """Reject anything but a (batch, seq) integer tensor of ids in [0, vocab_size).

    The range check runs on CPU tensors only: on CUDA it would cost a device sync per call, and an
    out-of-range id there trips the embedding's device-side assert instead (an opaque CUDA error).
    """
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must be a (batch, seq) integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(ids.shape)}")
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds token id {bad}, outside [0, {vocab_size})")


def check_mask(mask: Tensor, batch: int, queries: int, keys: int, name: str) -> Tensor:
    """A padding mask (batch, keys) or a packing mask (batch, queries, keys) -> bool (b, q or 1, k).

    True (or nonzero) means "may attend". Float masks are refused: additive and multiplicative
    conventions are both common and a wrong guess fails silently.
    """
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool or integer (nonzero = attend), got {mask.dtype}")
    if mask.dim() == 2 and tuple(mask.shape) == (batch, keys):
        return rearrange(mask != 0, "b k -> b 1 k")
    if mask.dim() == 3 and tuple(mask.shape) == (batch, queries, keys):
        return mask != 0
    raise ValueError(f"{name} must have shape (batch, seq) = ({batch}, {keys}) or (batch, q, k) = "
                     f"({batch}, {queries}, {keys}), got {tuple(mask.shape)}")


def attention_bias(position_bias: Tensor, attend: Tensor | None, dtype: torch.dtype) -> Tensor:
    """Fold the position bias (l, h, q, k) and a bool mask (b, q|1, k) into one additive
    SDPA mask (l, b|1, h, q, k). Masked logits get the dtype's most negative finite value, so a
    row with nothing to attend to stays finite, and masked keys get a weight of exactly 0."""
    bias = rearrange(position_bias, "l h q k -> l 1 h q k").to(dtype)
    if attend is None:
        return bias
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=bias.device)
    return torch.where(rearrange(attend, "b q k -> 1 b 1 q k"), bias, blocked)


def cross_attention_bias(attend: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool cross mask (b, t|1, s) -> additive SDPA mask (b, 1, t|1, s); cross-attention has no
    position bias."""
    if attend is None:
        return None
    zeros = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
    return rearrange(zeros.masked_fill(~attend, torch.finfo(dtype).min), "b t s -> b 1 t s")


########################################################################################
# Modules, in data-flow order
########################################################################################


class RMSNorm(nn.Module):
    """Root-mean-square norm without mean or bias (T5's "LayerNorm").

    Reads the float32 residual stream, normalizes in float32, then casts to the weight dtype and
    multiplies by the weight: the layer after it runs in the weight dtype, the stream stays float32.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(self.weight.dtype)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head) added to the attention logits, for `layers` tables at
    once (1 for T5, every layer for UMT5): one embedding lookup gives all of them."""

    def __init__(self, config: T5Config, *, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.layers = layers
        self.bidirectional = bidirectional
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        self.embedding = nn.Embedding(config.num_buckets, layers * config.num_heads)

    def forward(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(q,) and (k,) int positions -> bias (l, h, q, k) in the table's dtype."""
        relative = rearrange(key_positions, "k -> 1 k") - rearrange(query_positions, "q -> q 1")
        buckets = relative_position_bucket(relative, bidirectional=self.bidirectional,
                                           num_buckets=self.num_buckets, max_distance=self.max_distance)
        return rearrange(self.embedding(buckets), "q k (l h) -> l h q k", l=self.layers)


class EncoderSelfAttention(nn.Module):
    """Bidirectional self-attention over the input; no cache (the encoder runs once)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.d_kv**-0.5 if config.scale_qk else 1.0
        self.qkv = nn.Linear(config.d_model, 3 * config.inner_dim, bias=False)
        self.out = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x (b, s, d), bias (b|1, h, s, s) additive -> (b, s, d)."""
        q, k, v = rearrange(self.qkv(x), "b s (three h e) -> three b h s e", three=3, h=self.num_heads)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.out(rearrange(y, "b h s e -> b s (h e)"))


class DecoderSelfAttention(nn.Module):
    """Causal self-attention over the decoder tokens. With a cache, the new keys/values are
    written into it in place at `positions` and the queries attend over the whole static buffer
    (the bias masks the slots not yet written); without one, over the tokens of this call."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.d_kv**-0.5 if config.scale_qk else 1.0
        self.qkv = nn.Linear(config.d_model, 3 * config.inner_dim, bias=False)
        self.out = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def forward(self, x: Tensor, bias: Tensor, cache: Tensor | None = None,
                positions: Tensor | None = None) -> Tensor:
        """x (b, t, d), bias (b|1, h, t, k) additive, cache (2, b, h, k, e), positions (t,) -> (b, t, d)."""
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.num_heads)
        if cache is not None:
            cache[0].index_copy_(2, positions, k.to(cache.dtype))
            cache[1].index_copy_(2, positions, v.to(cache.dtype))
            k, v = cache[0], cache[1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.out(rearrange(y, "b h t e -> b t (h e)"))


class CrossAttention(nn.Module):
    """Decoder queries over the encoding. Keys/values come from `project_kv`, computed once per
    encoding; `n` decoder rows per encoding (beams, samples) share them: their queries are stacked
    along the query axis instead of copying the keys/values n times."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.d_kv**-0.5 if config.scale_qk else 1.0
        self.q = nn.Linear(config.d_model, config.inner_dim, bias=False)
        self.kv = nn.Linear(config.d_model, 2 * config.inner_dim, bias=False)
        self.out = nn.Linear(config.inner_dim, config.d_model, bias=False)

    def project_kv(self, memory: Tensor) -> Tensor:
        """Encoder output (b, s, d) -> keys and values (2, b, h, s, e)."""
        return rearrange(self.kv(memory), "b s (two h e) -> two b h s e", two=2, h=self.num_heads)

    def forward(self, x: Tensor, kv: Tensor, bias: Tensor | None) -> Tensor:
        """x (b*n, t, d), kv (2, b, h, s, e), bias (b, 1, t|1, s) additive -> (b*n, t, d)."""
        batch = kv.shape[1]
        q = rearrange(self.q(x), "(b n) t (h e) -> b h (n t) e", b=batch, h=self.num_heads)
        if bias is not None and bias.shape[-2] != 1:  # a per-query mask repeats for each of the n rows
            bias = bias.repeat(1, 1, x.shape[0] // batch, 1)
        y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias, scale=self.scale)
        return self.out(rearrange(y, "b h (n t) e -> (b n) t (h e)", n=x.shape[0] // batch))


class ReluFFN(nn.Module):
    """T5 v1.0 feed-forward: wo(relu(wi(x)))."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(F.relu(self.wi(x)))


class GegluFFN(nn.Module):
    """T5 v1.1 gated feed-forward: wo(gelu_tanh(x W_gate) * (x W_up)), both halves in one `wi`."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, 2 * config.d_ff, bias=False)  # rows: [gate; up]
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.wi(x).chunk(2, dim=-1)
        return self.wo(F.gelu(gate, approximate="tanh") * up)


def make_ffn(config: T5Config) -> ReluFFN | GegluFFN:
    return ReluFFN(config) if config.ffn == "relu" else GegluFFN(config)


class EncoderLayer(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.eps)
        self.attn = EncoderSelfAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.eps)
        self.ffn = make_ffn(config)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x: float32 residual stream (b, s, d); bias (b|1, h, s, s)."""
        x = x + self.attn(self.attn_norm(x), bias).float()
        return x + self.ffn(self.ffn_norm(x)).float()


class DecoderLayer(nn.Module):
    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.eps)
        self.self_attn = DecoderSelfAttention(config)
        self.cross_attn_norm = RMSNorm(config.d_model, config.eps)
        self.cross_attn = CrossAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.eps)
        self.ffn = make_ffn(config)

    def forward(self, x: Tensor, self_bias: Tensor, cross_kv: Tensor, cross_bias: Tensor | None,
                cache: Tensor | None = None, positions: Tensor | None = None) -> Tensor:
        """x: float32 residual stream (b, t, d); see the attention classes for the rest."""
        x = x + self.self_attn(self.self_attn_norm(x), self_bias, cache, positions).float()
        x = x + self.cross_attn(self.cross_attn_norm(x), cross_kv, cross_bias).float()
        return x + self.ffn(self.ffn_norm(x)).float()


########################################################################################
# Stacks
########################################################################################


class T5Encoder(nn.Module):
    """The encoder alone, with its own embedding: what text-to-image pipelines use."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        layers = config.num_encoder_layers
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_bias = RelativePositionBias(config, layers=layers if config.bias_per_layer else 1,
                                                  bidirectional=True)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(layers))
        self.final_norm = RMSNorm(config.d_model, config.eps)

    def forward(self, input_ids: Tensor, input_mask: Tensor | None = None) -> Tensor:
        """input_ids (b, s); input_mask (b, s) padding or (b, s, s) packing, True = real token.

        Returns the final hidden states (b, s, d) in the weight dtype. Positions that are padding
        (mask False, or a packing-mask row with nothing to attend to) are exactly zero.
        """
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        batch, seq = input_ids.shape
        attend = None if input_mask is None else check_mask(input_mask, batch, seq, seq, "input_mask")
        x = self.embedding(input_ids).float()  # the residual stream is float32
        positions = torch.arange(seq, device=input_ids.device)
        bias = attention_bias(self.position_bias(positions, positions), attend, x_dtype(self))
        for layer, layer_bias in zip(self.layers, bias.expand(len(self.layers), *bias.shape[1:])):
            x = layer(x, layer_bias)
        out = self.final_norm(x)
        if attend is None:
            return out
        real = input_mask != 0 if input_mask.dim() == 2 else attend.any(dim=-1)  # (b, s)
        return out * rearrange(real, "b s -> b s 1").to(out.dtype)


class Memory(NamedTuple):
    """What the decoder reads of one encoding: every layer's cross-attention keys/values, computed
    once (by `T5Decoder.remember`) and shared by all beams or samples of an input."""

    kv: Tensor  # (l, 2, b, h, s, e)
    attend: Tensor | None  # bool (b, t|1, s): which encoder positions each decoder query may see


class T5Decoder(nn.Module):
    """The decoder stack (without lm_head): causal self-attention, cross-attention, feed-forward."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        layers = config.num_decoder_layers
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_bias = RelativePositionBias(config, layers=layers if config.bias_per_layer else 1,
                                                  bidirectional=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(layers))
        self.final_norm = RMSNorm(config.d_model, config.eps)

    def remember(self, encoded: Tensor, cross_mask: Tensor | None = None) -> Memory:
        """Project an encoding (b, s, d) into every layer's keys/values (l, 2, b, h, s, e), once.

        cross_mask: (b, s) which encoder positions are real, or (b, t, s) per decoder position
        (packed sequences)."""
        batch, seq, _ = encoded.shape
        attend = None
        if cross_mask is not None:
            queries = cross_mask.shape[1] if cross_mask.dim() == 3 else 1
            attend = check_mask(cross_mask, batch, queries, seq, "cross_mask")
        return Memory(torch.stack([layer.cross_attn.project_kv(encoded) for layer in self.layers]), attend)

    def forward(self, input_ids: Tensor, memory: Memory, input_mask: Tensor | None = None,
                cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """input_ids (b*n, t), n rows per encoding of `memory`; returns hidden states (b*n, t, d).

        input_mask: (b*n, t) padding or (b*n, t, t) packing mask, combined with causality.
        Without a cache the tokens sit at positions 0..t-1. With a `KVCache`, they sit at
        `positions` (t,) (one position tensor for the whole batch), their keys/values are written
        there, and they attend over everything written so far; a padding mask is recorded in the
        cache so later steps skip those slots too (left-padded decoder prompts)."""
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        batch, length = input_ids.shape
        if memory.kv.shape[2] == 0 or batch % memory.kv.shape[2]:
            raise ValueError(f"decoder batch {batch} is not a multiple of the memory's batch {memory.kv.shape[2]}")
        if memory.attend is not None and memory.attend.shape[1] not in (1, length):
            raise ValueError(f"cross_mask covers {memory.attend.shape[1]} decoder positions, the input has {length}")
        x = self.embedding(input_ids).float()
        dtype = x_dtype(self)
        if cache is None:
            positions = torch.arange(length, device=input_ids.device)
            keys = positions
            attend = rearrange(keys, "k -> 1 1 k") <= rearrange(positions, "q -> 1 q 1")  # causal
            if input_mask is not None:
                attend = attend & check_mask(input_mask, batch, length, length, "decoder_mask")
            layer_caches: list[Tensor | None] | Tensor = [None] * len(self.layers)
        else:
            positions = check_positions(positions, length, cache)
            keys = torch.arange(cache.kv.shape[-2], device=input_ids.device)
            if input_mask is not None:
                if input_mask.dim() != 2:
                    raise ValueError("with a cache, decoder_mask must be a (batch, t) padding mask")
                cache.attend.index_copy_(1, positions, rearrange(check_mask(input_mask, batch, length, length,
                                                                            "decoder_mask"), "b 1 t -> b t"))
            attend = (rearrange(keys, "k -> 1 1 k") <= rearrange(positions, "q -> 1 q 1")) \
                & rearrange(cache.attend, "b k -> b 1 k")
            layer_caches = cache.kv
        self_bias = attention_bias(self.position_bias(positions, keys), attend, dtype)
        cross_bias = cross_attention_bias(memory.attend, dtype)
        layers = zip(self.layers, self_bias.expand(len(self.layers), *self_bias.shape[1:]), memory.kv, layer_caches)
        for layer, layer_bias, cross_kv, layer_cache in layers:
            x = layer(x, layer_bias, cross_kv, cross_bias, layer_cache, positions)
        return self.final_norm(x)


def x_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layers compute in: that of the weights."""
    return module.embedding.weight.dtype


########################################################################################
# Model
########################################################################################


class T5(nn.Module):
    """Encoder + decoder + lm_head. No tied or shared weights: v1.0's tied output embedding is a
    separate, pre-scaled `lm_head` after conversion."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = T5Encoder(config)
        self.decoder = T5Decoder(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, input_mask: Tensor | None = None,
                decoder_mask: Tensor | None = None, cross_mask: Tensor | None = None,
                labels: Tensor | None = None) -> T5Output:
        """Teacher-forced forward pass.

        input_ids (b, s), decoder_input_ids (b, t); input_mask (b, s) or packing (b, s, s);
        decoder_mask (b, t) or packing (b, t, t); cross_mask (b, s) or packing (b, t, s), derived
        from a 2-dim input_mask when not given (a packing input_mask needs an explicit one).
        labels (b, t): target ids, -100 where no loss is wanted.
        """
        if cross_mask is None and input_mask is not None:
            if input_mask.dim() != 2:
                raise ValueError("a (batch, q, k) packing input_mask needs an explicit cross_mask (batch, t, s)")
            cross_mask = input_mask
        encoded = self.encoder(input_ids, input_mask)
        memory = self.decoder.remember(encoded, cross_mask)
        logits = self.lm_head(self.decoder(decoder_input_ids, memory, decoder_mask))
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"labels must have the decoder's shape {tuple(decoder_input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), labels.flatten(), ignore_index=-100)
        return T5Output(logits, loss)


########################################################################################
# Static KV cache
########################################################################################


class KVCache(NamedTuple):
    """Decoder self-attention keys/values for every layer in one preallocated tensor, written in
    place by `T5Decoder.forward` at the step's positions. Nothing grows or is reallocated."""

    kv: Tensor  # (l, 2, b, h, max_len, e)
    attend: Tensor  # bool (b, max_len): False for slots of a left-padded decoder prompt's padding


def make_cache(config: T5Config, batch: int, max_len: int, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32) -> KVCache:
    kv = torch.zeros((config.num_decoder_layers, 2, batch, config.num_heads, max_len, config.d_kv),
                     device=device, dtype=dtype)
    return KVCache(kv, torch.ones((batch, max_len), dtype=torch.bool, device=device))


def check_positions(positions: Tensor | None, length: int, cache: KVCache) -> Tensor:
    """The (t,) positions of a cached call; out-of-range ones are an error (checked on CPU tensors,
    and never while compiling; on CUDA an out-of-range write trips a device-side assert)."""
    if positions is None or positions.dim() != 1 or positions.shape[0] != length or positions.dtype != torch.long:
        shape = None if positions is None else (tuple(positions.shape), positions.dtype)
        raise ValueError(f"with a cache, positions must be a ({length},) int64 tensor, got {shape}")
    max_len = cache.kv.shape[-2]
    if positions.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(positions.min()) < 0 or int(positions.max()) >= max_len:
            raise ValueError(f"decoder position {int(positions.max())} is past the cache's max_len {max_len}")
    return positions


########################################################################################
# Loading
########################################################################################


def load(path: str | Path, *, encoder_only: bool = False, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None) -> T5 | T5Encoder:
    """Load a folder written by `convert_hf.py` (config.json + model.safetensors).

    encoder_only=True reads only the encoder's tensors from the file (safetensors reads lazily, so
    the decoder's bytes are never touched) and returns a `T5Encoder`. The model is built on the
    meta device and takes the loaded tensors as they are: nothing is allocated twice. Any missing
    or unexpected tensor is an error that names it.
    """
    from safetensors import safe_open

    path = Path(path)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found (convert a checkpoint with convert_hf.py first)")
    config = T5Config.load(path / "config.json")
    with torch.device("meta"):
        model: T5 | T5Encoder = T5Encoder(config) if encoder_only else T5(config)
    prefix = "encoder." if encoder_only else ""
    wanted = {prefix + key: shape for key, shape in ((k, v.shape) for k, v in model.state_dict().items())}
    state = {}
    with safe_open(str(path / "model.safetensors"), framework="pt", device=str(torch.device(device or "cpu"))) as f:
        present = set(f.keys())
        missing = sorted(set(wanted) - present)
        if missing:
            hint = " (an encoder-only checkpoint? load it with encoder_only=True)" \
                if not encoder_only and any(k.startswith("decoder.") for k in missing) else ""
            raise ValueError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}{hint}")
        unexpected = sorted(k for k in present - set(wanted) if not (encoder_only and not k.startswith(prefix)))
        if unexpected:
            raise ValueError(f"{path}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        for key, shape in wanted.items():
            tensor = f.get_tensor(key)
            if tensor.shape != shape:
                raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, config says {tuple(shape)}")
            state[key[len(prefix):]] = tensor if dtype is None else tensor.to(dtype)
    model.load_state_dict(state, assign=True, strict=True)
    return model.eval()
