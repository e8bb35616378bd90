"""T5 in one file: the encoder-decoder of Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer" (arXiv:1910.10683), in plain PyTorch.

Families (weights converted by convert_hf.py): T5 v1.0 (ReLU feed-forward, lm_head pre-scaled);
T5 v1.1, Flan-T5, mT5, ByT5 (gated-GELU, untied lm_head); UMT5 / Pile-T5 (a position bias table
per layer). The `# ====` banners mark the sections; the design choices and their reasons are in
README.md ("How t5.py reads"). Training helpers: train.py. Needs torch >= 2.9, einops, safetensors,
sentencepiece.

Shape legend (einops names used throughout):
  b batch        s encoder (source) positions     t decoder (target) positions
  q queries      k keys                           h heads
  e head width (d_kv)   d model width (d_model)   f feed-forward width (d_ff)
  v vocabulary   l layers (of bias tables or caches)   n beams or samples per input
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import json
import math
import os
import platform
import re
import warnings
import weakref
from pathlib import Path
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Literal, NamedTuple

with warnings.catch_warnings():  # torch >= 2.12 warns at import when numpy (which t5.py never uses) is absent
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange, repeat
from torch import Tensor, nn


# ======== Config ================================================================================

FFN_KINDS = ("relu", "gated-gelu")
FFN_SLICE = 2**22  # elements of each float32 temporary of the gated feed-forward (16 MiB)


def scalable_blocks(config: T5Config) -> list[str]:
    """Every block that can carry a float16 output scale, named as in T5Config.out_scales."""
    return [f"encoder.{i}.{block}" for i in range(config.num_encoder_layers) for block in ("attn", "ffn")] + \
        [f"decoder.{i}.{block}" for i in range(config.num_decoder_layers)
         for block in ("self_attn", "cross_attn", "ffn")]


@dataclasses.dataclass
class T5Config:
    """Everything a real T5 checkpoint needs, and nothing more. Saved as our own config.json."""

    vocab_size: int = 32128  # rows of the embeddings and of lm_head (mT5: 250112, ByT5: 384)
    d_model: int = 512  # width of the residual stream
    d_kv: int = 64  # width of one attention head; num_heads * d_kv may differ from d_model
    d_ff: int = 2048  # hidden width of the feed-forward block
    num_heads: int = 8  # attention heads per layer
    num_encoder_layers: int = 6  # encoder depth
    num_decoder_layers: int = 6  # decoder depth (ByT5: a third of the encoder's)
    ffn: Literal["relu", "gated-gelu"] = "relu"  # v1.0: relu; v1.1/Flan/mT5/UMT5/ByT5: gated-gelu
    bias_per_layer: bool = False  # UMT5 / Pile-T5: every layer has its own position bias table
    scale_qk: bool = False  # scale q.k by d_kv**-0.5 (Google's checkpoints: off, it is in the weights)
    num_buckets: int = 32  # relative position buckets (half per direction in the encoder)
    max_distance: int = 128  # the log-spaced buckets end here: farther keys share the last bucket
    eps: float = 1e-6  # RMSNorm epsilon
    pad_token_id: int = 0  # padding id, also the usual decoder start
    eos_token_id: int = 1  # end of sequence (Pile-T5: 2)
    decoder_start_token_id: int = 0  # first decoder input token
    tokenizer: Literal["sentencepiece", "bytes"] = "sentencepiece"  # ByT5: UTF-8 bytes offset by 3
    extra_ids: int = 100  # sentinels <extra_id_0>.. counted down from the end of the vocabulary (ByT5: 125)
    dropout: float = 0.0  # training only: embeddings, attention weights, FFN hidden, block and stack outputs
    # float16 safety (convert_hf.py --calibrate): block ("encoder.3.ffn", "decoder.0.cross_attn", ...) -> a
    # power of two s in (0, 1]. The block's value rows (attention V, FFN up-projection) are stored times s,
    # so its output comes out s times smaller; it is multiplied by 1/s in float32 as it joins the residual.
    out_scales: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # of its default's type (an int does for a float)
            value = getattr(self, field.name)
            kind = dict if field.name == "out_scales" else type(field.default)
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise ValueError(f"T5Config.{field.name} must be of type {kind.__name__}, got {value!r}")
        rules = [(getattr(self, name) > 0, f"{name} must be a positive int, got {getattr(self, name)!r}")
                 for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                              "num_decoder_layers", "num_buckets", "max_distance")]
        rules += [(self.ffn in FFN_KINDS, f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}"),
                  (self.num_buckets >= 4, f"num_buckets must be at least 4, got {self.num_buckets}"),
                  (self.tokenizer in ("sentencepiece", "bytes"),
                   f"tokenizer must be 'sentencepiece' or 'bytes', got {self.tokenizer!r}"),
                  (0 <= self.extra_ids <= self.vocab_size,
                   f"extra_ids must be in [0, vocab_size], got {self.extra_ids}"),
                  (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
                  (self.eps > 0, f"eps must be positive, got {self.eps!r}")]
        rules += [(0 <= getattr(self, name) < self.vocab_size,
                   f"{name}={getattr(self, name)} is outside [0, {self.vocab_size})")
                  for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id")]
        for key, scale in self.out_scales.items():
            rules += [(key in scalable_blocks(self), f"out_scales: no block {key!r} (see scalable_blocks)"),
                      (isinstance(scale, (int, float)) and 0 < scale <= 1 and math.frexp(scale)[0] == 0.5,
                       f"out_scales[{key!r}] must be a power of two in (0, 1], got {scale}")]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"T5Config.{message}")

    def unscale(self, block: str) -> float:
        """What a block's output is multiplied by when it joins the residual stream: 1 / its scale."""
        return 1.0 / self.out_scales.get(block, 1.0)

    @property
    def inner_dim(self) -> int:
        """Width of all heads together: num_heads * d_kv."""
        return self.num_heads * self.d_kv

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> T5Config:
        """Read a config.json written by `save`; an unknown or missing field is an error."""
        try:
            fields = json.loads(Path(path).read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a JSON config ({error})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: not a T5Config (a JSON {type(fields).__name__}, not an object)")
        if "model_type" in fields or "architectures" in fields:
            raise ValueError(f"{path} is a Hugging Face config (model_type {fields.get('model_type')!r}): "
                             "convert its folder first with convert_hf.py")
        known = {f.name for f in dataclasses.fields(cls)}
        for kind, names in (("unknown", set(fields) - known), ("missing", known - set(fields))):
            if names:
                raise ValueError(f"{path}: {kind} T5Config fields {sorted(names)} (a converted checkpoint?)")
        return cls(**fields)


class T5Output(NamedTuple):
    logits: Tensor  # (b, t, v) in the weight dtype
    loss: Tensor | None  # mean cross-entropy over labels != -100, when labels were given


# ======== Helpers: position buckets, input checks, masks ========================================

def relative_position_bucket(relative_position: Tensor, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Bucket id of each `key_position - query_position` (Mesh TensorFlow's scheme): half the buckets
    per direction when bidirectional (causal: later keys share bucket 0); below `num_buckets // 2` one
    bucket per distance, then log-spaced buckets up to `max_distance`, then the last bucket."""
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
    """Reject anything but a (batch, seq) int64 or int32 tensor (what embeddings take) of ids in [0,
    vocab_size); the range is checked on CPU tensors outside torch.compile (elsewhere: a host sync)."""
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be a (batch, seq) int64 or int32 tensor, got {ids.dtype} of shape "
                         f"{tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(ids.shape)}")
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside [0, {vocab_size})")


def bool_mask(mask: Tensor, batch: int, queries: int, keys: int, name: str) -> Tensor:
    """A padding mask (batch, keys) or a packing mask (batch, queries, keys), nonzero = may attend,
    -> bool (b, q or 1, k). Float masks are refused: additive or multiplicative, a guess fails silently."""
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise ValueError(f"{name} must be bool or integer (nonzero = attend), got {mask.dtype}")
    if mask.dim() == 2 and tuple(mask.shape) == (batch, keys):
        return rearrange(mask != 0, "b k -> b 1 k")
    if mask.dim() == 3 and tuple(mask.shape) == (batch, queries, keys):
        return mask != 0
    raise ValueError(f"{name} must have shape (batch, seq) = ({batch}, {keys}) or (batch, q, k) = "
                     f"({batch}, {queries}, {keys}), got {tuple(mask.shape)}")


def attention_bias(position_bias: Tensor, attend: Tensor | None, dtype: torch.dtype) -> Tensor:
    """One layer's position bias (h, q, k), or zeros (1, 1, 1) for cross-attention, and a bool mask
    (b, q|1, k) -> one additive SDPA mask (b|1, h|1, q, k). Masked logits get the dtype's most negative
    finite value (a Python scalar: no host-to-device copy): a row with nothing to attend to stays finite."""
    bias = rearrange(position_bias, "h q k -> 1 h q k").to(dtype)
    if attend is None:
        return bias
    return torch.where(rearrange(attend, "b q k -> b 1 q k"), bias, torch.finfo(dtype).min)


# ======== Kernels: linear layers, SDPA or FlexAttention =========================================

ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()
CPUINFO = Path("/proc/cpuinfo")  # Linux; elsewhere platform.processor() may name the vendor
INTEL = "GenuineIntel" in (CPUINFO.read_text() if CPUINFO.is_file() else platform.processor())


def compiled_op(name: str, product: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """product(x (..., i), weight (o, i)) -> (..., o), a CPU function, as the op t5::name that
    torch.compile calls as it is."""
    torch.library.define(f"t5::{name}", "(Tensor x, Tensor weight) -> Tensor")
    torch.library.impl(f"t5::{name}", "cpu", product)
    torch.library.register_fake(f"t5::{name}", lambda x, weight: x.new_empty(*x.shape[:-1], weight.shape[0]))
    return getattr(torch.ops.t5, name).default


def onednn_linear(x: Tensor, weight: Tensor) -> Tensor:
    """oneDNN's linear (inductor would lower it only for frozen weights: compiled code calls the op)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


compiled_onednn_linear = compiled_op("onednn_linear", onednn_linear)


def cpu_float32_inference(x: Tensor) -> bool:
    """Where t5.py's CPU kernels replace F.linear: x float32 on CPU, no autograd, autocast or tracing."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled() \
        and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()


def linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., i) @ weight (o, i).T -> (..., o), through oneDNN in float32 CPU inference on x86, except
    for fewer than 4 rows on Intel CPUs, where MKL's F.linear is faster (README: "float32 linear layers
    through oneDNN"; `torch.backends.mkldnn.flags(enabled=False)`: off)."""
    if ONEDNN and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled \
            and cpu_float32_inference(x) and not (INTEL and x.numel() < 4 * x.shape[-1]):
        return (compiled_onednn_linear if torch.compiler.is_compiling() else onednn_linear)(x, weight)
    return F.linear(x, weight)


FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines  # int8 x int8 products on x86 CPUs
_packed: dict[int, tuple[tuple[int, int], object]] = {}  # id(int8 weight) -> (its address, version), packed


def fbgemm_pack(weight: Tensor) -> object:
    """An int8 weight (o, i) as fbgemm takes it: packed, from a quantized tensor (which torch deprecates)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch._make_per_tensor_quantized_tensor(weight, 1.0, 0)
    return torch.ops.quantized.linear_prepack(quantized, None)


@functools.cache
def fbgemm_8bit_inputs() -> bool:
    """Whether fbgemm multiplies 8-bit inputs right on this CPU (VNNI: 32-bit sums); elsewhere its 16-bit
    pair sums saturate (2 * 255 * 127 > 32767), so inputs get 7 bits (reduce_range). Tried once."""
    x = torch.ones(1, 64).index_fill(1, torch.tensor([0]), -1.0)  # range [-1, 1]: the 1s quantize to 255
    weight = fbgemm_pack(torch.full((1, 64), 127, dtype=torch.int8))
    return abs(float(torch.ops.quantized.linear_dynamic(x, weight, False)) - 127 * 62) < 0.02 * 127 * 62


def fbgemm_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x (m, i + extra) float32 @ an int8 weight (o, i).T -> (m, o) through fbgemm, which quantizes x on
    the fly (per tensor, 8 bits, or 7: `fbgemm_8bit_inputs`); x's extra columns meet zeros. The packed
    weight is remade when its address or version changes (what that misses: README, "int8 weights")."""
    stamp = (weight.data_ptr(), 0 if weight.is_inference() else weight._version)
    if id(weight) not in _packed:
        weakref.finalize(weight, _packed.pop, id(weight), None)
    if _packed.get(id(weight), (None,))[0] != stamp:
        _packed[id(weight)] = stamp, fbgemm_pack(F.pad(weight.detach(), (0, x.shape[1] - weight.shape[1])))
    with torch._C.DisableTorchFunctionSubclass():  # skips a __torch_function__ lookup on the packed weight
        return torch.ops.quantized.linear_dynamic(x, _packed[id(weight)][1], not fbgemm_8bit_inputs())


compiled_fbgemm_linear = compiled_op("fbgemm_linear", fbgemm_linear)


class Linear(nn.Linear):
    """nn.Linear without bias, multiplying with `linear`. Same weights, same state dict."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight)


class FlexBias(NamedTuple):
    """What FlexAttention takes instead of an additive (b, h, q, k) mask: the position bias as a
    `score_mod`, padding, packing and causality as a block mask."""

    score_mod: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
    block_mask: object  # torch.nn.attention.flex_attention.BlockMask


FLEX_UNDER_COMPILE = ("attention='flex' cannot run inside torch.compile on CPU (torch 2.13's inductor "
                      "fails on its masks and cached steps there): compile a model loaded with "
                      "attention='sdpa', or run flex uncompiled (it compiles its own kernel)")


@functools.cache
def compiled_flex_attention() -> Callable[..., Tensor]:
    """flex_attention under torch.compile: uncompiled it materializes the scores (and warns)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | FlexBias | None, scale: float,
              dropout: float) -> Tensor:
    """q (b, h, q, e), k and v (b, h, k, e) -> (b, h, q, e), through SDPA with an additive mask (b|1,
    h|1, q, k), or FlexAttention given a FlexBias. Compiled decoding in float32 on CPU (at most e
    queries) writes the product out for inductor to fuse, faster there than SDPA (README)."""
    if isinstance(bias, FlexBias):
        if dropout:
            raise ValueError("FlexAttention has no attention dropout: train with attention='sdpa'")
        if q.requires_grad and q.device.type == "cpu":
            raise ValueError("FlexAttention has no backward on CPU (torch 2.13): run it under "
                             "torch.no_grad() or torch.inference_mode(), or train with attention='sdpa'")
        if torch.compiler.is_compiling():
            if q.device.type == "cpu":
                raise ValueError(FLEX_UNDER_COMPILE)
            from torch.nn.attention.flex_attention import flex_attention as flex
        else:
            flex = compiled_flex_attention()
        width = q.shape[-1]
        if q.device.type == "cpu" and width < 32:  # torch 2.13 erred at 8, 16 (AVX2); zeros add nothing
            q, k, v = (F.pad(t, (0, 32 - width)) for t in (q, k, v))
        return flex(q, k, v, score_mod=bias.score_mod, block_mask=bias.block_mask, scale=scale)[..., :width]
    if torch.compiler.is_compiling() and q.dtype == torch.float32 and q.device.type == "cpu" and not dropout \
            and isinstance(q.shape[-2], int) and q.shape[-2] <= q.shape[-1]:  # SymInt (export): SDPA
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        return torch.matmul((scores if bias is None else scores + bias).softmax(dim=-1), v)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, dropout_p=dropout)


# ======== Norm and relative position bias =======================================================

class RMSNorm(nn.Module):
    """T5's "LayerNorm": root-mean-square norm, no mean, no bias. Reads the float32 residual stream,
    computes in float32, returns the weight dtype (the stream itself stays float32)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), eps=self.eps)
        return normed.to(self.weight.dtype)  # rounded to half precision once, after the weight


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head) added to the attention logits: one table for the stack
    (T5) or one per layer (UMT5), side by side in one embedding; each layer looks up its own."""

    def __init__(self, config: T5Config, *, layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.layers = layers
        self.bucket = functools.partial(relative_position_bucket, bidirectional=bidirectional,
                                        num_buckets=config.num_buckets, max_distance=config.max_distance)
        self.embedding = nn.Embedding(config.num_buckets, layers * config.num_heads)

    def buckets(self, query_positions: Tensor, key_positions: Tensor) -> Tensor:
        """(q,) and (k,) int positions -> bucket ids (q, k)."""
        return self.bucket(rearrange(key_positions, "k -> 1 k") - rearrange(query_positions, "q -> q 1"))

    def table(self, layer: int) -> Tensor:
        """Layer `layer`'s table (buckets, h): its own for UMT5, the shared one for T5."""
        tables = rearrange(self.embedding.weight, "n (l h) -> l n h", l=self.layers)
        return tables[layer if self.layers > 1 else 0]

    def score_mod(self, layer: int, query_positions: Tensor | None = None
                  ) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]:
        """FlexAttention's form of layer `layer`'s bias: a function of one score and its (batch,
        head, query, key) indices that adds the table entry of that pair's bucket. The query sits at
        query_positions[q] (decoding with a cache), or at q."""
        table = self.table(layer)

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
            query = q if query_positions is None else query_positions[q]
            return score + table[self.bucket(k - query), h].to(score.dtype)
        return score_mod

    def forward(self, buckets: Tensor, layer: int) -> Tensor:
        """Bucket ids (q, k) -> layer `layer`'s bias (h, q, k) in the table's dtype."""
        return rearrange(F.embedding(buckets, self.table(layer)), "q k h -> h q k")


# ======== Static KV cache =======================================================================

class KVCache(NamedTuple):
    """Decoder self-attention keys/values for every layer in one preallocated tensor, written in
    place at the step's positions (`update`, `mark`). Nothing grows or is reallocated."""

    kv: Tensor  # (l, 2, b, h, max_len, e)
    attend: Tensor  # bool (b, max_len): False for slots of a left-padded decoder prompt's padding

    def update(self, layer: int, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write layer `layer`'s k and v (b, h, t, e) at positions (t,); return all of its keys and
        values (b, h, max_len, e). One scatter into the cache tensor itself (not into a view of it),
        so that torch.compile updates it in place instead of copying it."""
        layer_index = torch.full((1,), layer, dtype=torch.long, device=self.kv.device)
        new = rearrange(torch.stack([k, v]).to(self.kv.dtype), "two b h t e -> t two b h e")
        torch.ops.aten.index_put_(self.kv, [layer_index, None, None, None, positions], new)  # kv[l,:,:,:,t]
        return self.kv[layer, 0], self.kv[layer, 1]

    def mark(self, positions: Tensor, real: Tensor | None) -> None:
        """Record which slots at positions (t,) hold real tokens: real (b, t) bool, None for all.
        Every call rewrites the slots it writes, so that a cache can be reused."""
        if real is None:
            self.attend.index_fill_(1, positions, True)
        else:
            self.attend.index_copy_(1, positions, real)


def make_cache(config: T5Config, batch: int, max_len: int, *, device: torch.device | str | None = None,
               dtype: torch.dtype = torch.float32, static_address: bool = False) -> KVCache:
    """A zeroed cache for `batch` rows of `max_len` slots, reusable as it is for a new decode of the same
    size. static_address=True marks its tensors static for torch.compile, as CUDA graphs
    (`mode="reduce-overhead"`) need: a graph replays the addresses it captured."""
    kv = torch.zeros((config.num_decoder_layers, 2, batch, config.num_heads, max_len, config.d_kv),
                     device=device, dtype=dtype)
    attend = torch.ones((batch, max_len), dtype=torch.bool, device=device)
    if static_address:
        torch._dynamo.mark_static_address(kv)
        torch._dynamo.mark_static_address(attend)
    return KVCache(kv, attend)


def check_positions(positions: Tensor | None, length: int, cache: KVCache) -> Tensor:
    """The (t,) positions of a cached call; out-of-range ones are an error (checked on CPU tensors,
    and never while compiling; on CUDA an out-of-range write trips a device-side assert)."""
    if not isinstance(positions, Tensor) or positions.shape != (length,) or positions.dtype != torch.long:
        shape = (tuple(positions.shape), positions.dtype) if isinstance(positions, Tensor) else positions
        raise ValueError(f"with a cache, positions must be a ({length},) int64 tensor, got {shape}")
    max_len = cache.kv.shape[-2]
    if positions.device.type == "cpu" and not torch.compiler.is_compiling():
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= max_len:
            raise ValueError(f"decoder position {low if low < 0 else high} is outside the cache's "
                             f"[0, {max_len})")
    return positions


# ======== Attention (x3) and feed-forward (x2) ==================================================

class EncoderSelfAttention(nn.Module):
    """Bidirectional self-attention over the input; no cache (the encoder runs once)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.d_kv**-0.5 if config.scale_qk else 1.0
        self.dropout = config.dropout
        self.qkv = Linear(config.d_model, 3 * config.inner_dim)
        self.out = Linear(config.inner_dim, config.d_model)

    def forward(self, x: Tensor, bias: Tensor | FlexBias) -> Tensor:
        """x (b, s, d), bias (b|1, h, s, s) additive (or a FlexBias) -> (b, s, d)."""
        q, k, v = rearrange(self.qkv(x), "b s (three h e) -> three b h s e", three=3, h=self.num_heads)
        y = attention(q, k, v, bias, self.scale, self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h s e -> b s (h e)"))


class DecoderSelfAttention(EncoderSelfAttention):
    """Causal self-attention over the decoder tokens (the encoder's layout, its own weights). With a
    cache, the new keys/values are written into it in place at `positions` and the queries attend
    over the whole static buffer (the bias masks the slots not yet written)."""

    def forward(self, x: Tensor, bias: Tensor | FlexBias, cache: KVCache | None = None, layer: int = 0,
                positions: Tensor | None = None) -> Tensor:
        """x (b, t, d), bias (b|1, h, t, k) additive (or a FlexBias); with a cache, this layer's
        index in it and the positions (t,) to write -> (b, t, d)."""
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e", three=3, h=self.num_heads)
        if cache is not None:
            k, v = cache.update(layer, positions, k, v)
        y = attention(q, k, v, bias, self.scale, self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t e -> b t (h e)"))


class CrossAttention(nn.Module):
    """Decoder queries over the encoding. Keys/values come from `project_kv`, computed once per
    encoding; `n` decoder rows per encoding (beams, samples) share them: their queries are stacked
    along the query axis instead of copying the keys/values n times."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.scale = config.d_kv**-0.5 if config.scale_qk else 1.0
        self.dropout = config.dropout
        self.q = Linear(config.d_model, config.inner_dim)
        self.kv = Linear(config.d_model, 2 * config.inner_dim)
        self.out = Linear(config.inner_dim, config.d_model)

    def project_kv(self, memory: Tensor) -> Tensor:
        """Encoder output (b, s, d) -> keys and values (2, b, h, s, e)."""
        return rearrange(self.kv(memory), "b s (two h e) -> two b h s e", two=2, h=self.num_heads)

    def forward(self, x: Tensor, kv: Tensor, mask: Tensor | None) -> Tensor:
        """x (b*n, t, d), kv (2, b, h, s, e), mask (b, 1, t|1, s) additive -> (b*n, t, d)."""
        batch = kv.shape[1]
        q = rearrange(self.q(x), "(b n) t (h e) -> b h (n t) e", b=batch, h=self.num_heads)
        if mask is not None and mask.shape[-2] != 1:  # a per-query mask repeats for each of the n rows
            mask = mask.repeat(1, 1, x.shape[0] // batch, 1)
        y = attention(q, kv[0], kv[1], mask, self.scale, self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h (n t) e -> (b n) t (h e)", n=x.shape[0] // batch))


class ReluFFN(nn.Module):
    """T5 v1.0 feed-forward: wo(relu(wi(x)))."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = Linear(config.d_model, config.d_ff)
        self.dropout = nn.Dropout(config.dropout)
        self.wo = Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


class GegluFFN(nn.Module):
    """T5 v1.1 gated feed-forward: wo(gelu_tanh(x W_gate) * (x W_up)), both halves in one `wi`."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.wi = Linear(config.d_model, 2 * config.d_ff)  # rows: [gate; up]
        self.dropout = nn.Dropout(config.dropout)
        self.wo = Linear(config.d_ff, config.d_model)

    def forward(self, x: Tensor) -> Tensor:
        """x (b, t, d) -> (b, t, d). The product is taken in float32 and rounded once, over slices of the
        sequence of at most FFN_SLICE float32 elements (or of one position, where batch * d_ff is more)."""
        def product(g: Tensor, u: Tensor) -> Tensor:
            return (F.gelu(g.float(), approximate="tanh") * u.float()).to(x.dtype)

        gate, up = self.wi(x).chunk(2, dim=-1)
        step = max(1, FFN_SLICE // (gate.shape[0] * gate.shape[-1]))
        if step >= gate.shape[1]:  # small enough at once (decoding, small batches): no split, no cat
            hidden = product(gate, up)
        else:
            pieces = zip(gate.split(step, dim=1), up.split(step, dim=1))
            hidden = torch.cat([product(g, u) for g, u in pieces], dim=1)
        return self.wo(self.dropout(hidden))


# ======== Layers ================================================================================

class EncoderLayer(nn.Module):
    def __init__(self, config: T5Config, index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.eps)
        self.attn = EncoderSelfAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.eps)
        self.ffn = (ReluFFN if config.ffn == "relu" else GegluFFN)(config)
        self.dropout = nn.Dropout(config.dropout)  # on each block's output, before the residual add
        # block -> what its output is multiplied by as it joins the residual (1 unless calibrated for float16)
        self.unscale = {block: config.unscale(f"encoder.{index}.{block}") for block in ("attn", "ffn")}

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        """x: float32 residual stream (b, s, d); bias (b|1, h, s, s)."""
        x = x.add(self.dropout(self.attn(self.attn_norm(x), bias)).float(), alpha=self.unscale["attn"])
        return x.add(self.dropout(self.ffn(self.ffn_norm(x))).float(), alpha=self.unscale["ffn"])


class DecoderLayer(nn.Module):
    def __init__(self, config: T5Config, index: int) -> None:
        super().__init__()
        self.self_attn_norm = RMSNorm(config.d_model, config.eps)
        self.self_attn = DecoderSelfAttention(config)
        self.cross_attn_norm = RMSNorm(config.d_model, config.eps)
        self.cross_attn = CrossAttention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.eps)
        self.ffn = (ReluFFN if config.ffn == "relu" else GegluFFN)(config)
        self.dropout = nn.Dropout(config.dropout)  # on each block's output, before the residual add
        self.index = index  # where this layer's keys/values live in the KV cache
        self.unscale = {block: config.unscale(f"decoder.{index}.{block}")
                        for block in ("self_attn", "cross_attn", "ffn")}

    def forward(self, x: Tensor, self_bias: Tensor, encoded: Tensor, cross_kv: Tensor | None,
                cross_mask: Tensor | None, cache: KVCache | None = None,
                positions: Tensor | None = None) -> Tensor:
        """x: float32 residual stream (b, t, d); encoded (b, s, d), whose cross-attention keys/values
        cross_kv (2, b, h, s, e) are projected here unless precomputed; cache: every layer's."""
        if cross_kv is None:
            cross_kv = self.cross_attn.project_kv(encoded)
        y = self.self_attn(self.self_attn_norm(x), self_bias, cache, self.index, positions)
        x = x.add(self.dropout(y).float(), alpha=self.unscale["self_attn"])
        y = self.cross_attn(self.cross_attn_norm(x), cross_kv, cross_mask)
        x = x.add(self.dropout(y).float(), alpha=self.unscale["cross_attn"])
        return x.add(self.dropout(self.ffn(self.ffn_norm(x))).float(), alpha=self.unscale["ffn"])


# ======== Stacks ================================================================================

class Stack(nn.Module):
    """What the encoder and decoder share: embedding, position bias, layers, final norm, and the
    self-attention kernel, `attention`: the one place the sdpa/flex choice lives (`set_attention`)."""

    def __init__(self, config: T5Config, layer: type[EncoderLayer | DecoderLayer], count: int) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_bias = RelativePositionBias(config, layers=count if config.bias_per_layer else 1,
                                                  bidirectional=layer is EncoderLayer)
        self.layers = nn.ModuleList(layer(config, i) for i in range(count))
        self.final_norm = RMSNorm(config.d_model, config.eps)
        self.dropout = nn.Dropout(config.dropout)
        self.checkpoint_layers = False  # training: recompute each layer in backward instead of storing it
        self.attention: Literal["sdpa", "flex"] = "sdpa"  # self-attention kernel; see `set_attention`

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layers compute in: the embeddings' (fp8 weights are dequantized to it)."""
        return self.embedding.weight.dtype

    def biases(self, query_positions: Tensor, key_positions: Tensor, attend: Tensor | None, batch: int,
               cached: bool = False) -> Iterator[Tensor | FlexBias]:
        """What each layer's self-attention adds to its scores, in layer order, made as the layers
        ask. SDPA: an additive mask (b|1, h, q, k), made once for a shared table (T5), per layer for
        UMT5 (one alive at a time). Flex: a `FlexBias`, its block mask built once for the stack."""
        table = self.position_bias
        if self.attention == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            queries, keys = len(query_positions), len(key_positions)
            full = None if attend is None else attend.expand(batch, queries, keys)  # read at each row's index

            def may_attend(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
                """Without a mask every key, still as a block mask (torch 2.13's CPU kernel was wrong
                without one on AVX2)."""
                return q >= 0 if full is None else full[b, q, k]
            block_mask = create_block_mask(may_attend, batch, None, queries, keys,
                                           device=query_positions.device)
            for layer in range(len(self.layers)):
                yield FlexBias(table.score_mod(layer, query_positions if cached else None), block_mask)
            return
        buckets, bias = table.buckets(query_positions, key_positions), None
        for layer in range(len(self.layers)):
            if bias is None or table.layers > 1:
                bias = None  # UMT5: the previous layer's mask is freed before the next is made
                bias = attention_bias(table(buckets, layer), attend, self.compute_dtype)
            yield bias

    def run_layer(self, layer: nn.Module, *args: Tensor | KVCache | None) -> Tensor:
        """layer(*args), or, when the stack trains with checkpoint_layers, recomputed in backward."""
        if self.checkpoint_layers and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class T5Encoder(Stack):
    """The encoder alone, with its own embedding: what text-to-image pipelines use."""

    def __init__(self, config: T5Config) -> None:
        super().__init__(config, EncoderLayer, config.num_encoder_layers)

    def forward(self, input_ids: Tensor, input_mask: Tensor | None = None) -> Tensor:
        """input_ids (b, s); input_mask (b, s) padding or (b, s, s) packing -> final hidden states
        (b, s, d) in the weight dtype, exactly zero at padding positions."""
        check_token_ids(input_ids, self.config.vocab_size, "input_ids")
        batch, seq = input_ids.shape
        attend = None if input_mask is None else bool_mask(input_mask, batch, seq, seq, "input_mask")
        x = self.dropout(self.embedding(input_ids)).float()  # the residual stream is float32
        positions = torch.arange(seq, device=input_ids.device)
        biases = self.biases(positions, positions, attend, batch)
        for layer in self.layers:
            x = self.run_layer(layer, x, next(biases))
        out = self.dropout(self.final_norm(x))
        if attend is None:
            return out
        real = input_mask != 0 if input_mask.dim() == 2 else attend.any(dim=-1)  # (b, s)
        return out * rearrange(real, "b s -> b s 1").to(out.dtype)


class Memory(NamedTuple):
    """What the decoder reads of one encoding, made by `T5Decoder.memory`."""

    encoded: Tensor  # (b, s, d) encoder output
    cross_mask: Tensor | None  # additive (b, 1, t|1, s): which encoder positions each decoder query may see
    kv: Tensor | None  # (l, 2, b, h, s, e) every layer's cross-attention keys/values, when precomputed


class T5Decoder(Stack):
    """The decoder stack (without lm_head): causal self-attention, cross-attention, feed-forward."""

    def __init__(self, config: T5Config) -> None:
        super().__init__(config, DecoderLayer, config.num_decoder_layers)

    def memory(self, encoded: Tensor, cross_mask: Tensor | None = None, *, precompute: bool = True) -> Memory:
        """An encoding (b, s, d) as the decoder reads it; cross_mask (b, s), or (b, t, s) for packing.
        precompute=True (decoding) projects every layer's cross-attention keys/values once, here;
        False (training) leaves it to each layer's forward (where FSDP has its weights)."""
        batch, seq, _ = encoded.shape
        additive = None
        if cross_mask is not None:  # cross-attention has no position bias: zeros where it may attend
            queries = cross_mask.shape[1] if cross_mask.dim() == 3 else 1
            attend = bool_mask(cross_mask, batch, queries, seq, "cross_mask")
            additive = attention_bias(attend.new_zeros((1, 1, 1)), attend, self.compute_dtype)
        kv = torch.stack([layer.cross_attn.project_kv(encoded) for layer in self.layers]) \
            if precompute else None
        return Memory(encoded, additive, kv)

    def forward(self, input_ids: Tensor, memory: Memory, input_mask: Tensor | None = None,
                cache: KVCache | None = None, positions: Tensor | None = None) -> Tensor:
        """input_ids (b*n, t), n rows per encoding of `memory` -> hidden states (b*n, t, d). input_mask
        (b*n, t) or (b*n, t, t). Without a cache, positions 0..t-1; with a `KVCache`, at `positions`
        (t,), attending over all written slots; a padding mask is recorded in the cache."""
        check_token_ids(input_ids, self.config.vocab_size, "decoder_input_ids")
        batch, length = input_ids.shape
        if batch % memory.encoded.shape[0]:
            raise ValueError(f"decoder batch {batch} is not a multiple of the memory's batch "
                             f"{memory.encoded.shape[0]}")
        if memory.cross_mask is not None and memory.cross_mask.shape[2] not in (1, length):
            raise ValueError(f"cross_mask covers {memory.cross_mask.shape[2]} decoder positions, "
                             f"the input has {length}")
        x = self.dropout(self.embedding(input_ids)).float()
        if cache is None:
            keys = positions = torch.arange(length, device=input_ids.device)
            attend = rearrange(keys, "k -> 1 1 k") <= rearrange(positions, "q -> 1 q 1")  # causal
            if input_mask is not None:
                attend = attend & bool_mask(input_mask, batch, length, length, "decoder_mask")
        else:
            if cache.kv.shape[2] != batch:
                raise ValueError(f"input_ids has {batch} rows but the cache has {cache.kv.shape[2]}")
            positions = check_positions(positions, length, cache)
            keys = torch.arange(cache.kv.shape[-2], device=input_ids.device)
            if input_mask is not None and input_mask.dim() != 2:
                raise ValueError("with a cache, decoder_mask must be a (batch, t) padding mask")
            real = None if input_mask is None else \
                rearrange(bool_mask(input_mask, batch, length, length, "decoder_mask"), "b 1 t -> b t")
            cache.mark(positions, real)
            attend = (rearrange(keys, "k -> 1 1 k") <= rearrange(positions, "q -> 1 q 1")) \
                & rearrange(cache.attend, "b k -> b 1 k")
        biases = self.biases(positions, keys, attend, batch, cached=cache is not None)
        cross_kvs = [None] * len(self.layers) if memory.kv is None else memory.kv
        for layer, cross_kv in zip(self.layers, cross_kvs):
            x = self.run_layer(layer, x, next(biases), memory.encoded, cross_kv, memory.cross_mask, cache,
                               positions)
        return self.dropout(self.final_norm(x))


# ======== Model =================================================================================

class T5(nn.Module):
    """Encoder + decoder + lm_head. No tied or shared weights: v1.0's tied output embedding is a
    separate, pre-scaled `lm_head` after conversion."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = T5Encoder(config)
        self.decoder = T5Decoder(config)
        self.lm_head = Linear(config.d_model, config.vocab_size)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor, input_mask: Tensor | None = None,
                decoder_mask: Tensor | None = None, cross_mask: Tensor | None = None,
                labels: Tensor | None = None) -> T5Output:
        """Teacher-forced forward. input_ids (b, s), decoder_input_ids (b, t); masks 2-dim (padding) or
        3-dim (packing); cross_mask defaults to a 2-dim input_mask; labels (b, t), -100 = no loss."""
        if cross_mask is None and input_mask is not None:
            if input_mask.dim() == 3:
                raise ValueError("a (batch, q, k) packing input_mask needs an explicit cross_mask "
                                 "(batch, t, s)")
            cross_mask = input_mask
        encoded = self.encoder(input_ids, input_mask)
        if decoder_input_ids.dim() == 2 and len(decoder_input_ids) != len(input_ids):
            raise ValueError(f"decoder_input_ids has {len(decoder_input_ids)} rows, input_ids "
                             f"{len(input_ids)}: one target per input")
        memory = self.decoder.memory(encoded, cross_mask, precompute=False)
        logits = self.lm_head(self.decoder(decoder_input_ids, memory, decoder_mask))
        loss = None
        if labels is not None:
            if labels.shape != decoder_input_ids.shape:
                raise ValueError(f"labels must have the decoder's shape {tuple(decoder_input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = F.cross_entropy(rearrange(logits.float(), "b t v -> (b t) v"), labels.flatten().long(),
                                   ignore_index=-100)
        return T5Output(logits, loss)


def set_attention(model: T5 | T5Encoder | T5Decoder, kind: Literal["sdpa", "flex"]) -> nn.Module:
    """Choose the self-attention kernel of every stack of `model` (in place; returns it): "sdpa"
    (one additive (b|1, h, q, k) mask per layer) or "flex" (FlexAttention: bias as a score_mod,
    masks as a block mask; no attention dropout). Cross-attention stays on SDPA."""
    if kind not in ("sdpa", "flex"):
        raise ValueError(f"attention must be 'sdpa' or 'flex', got {kind!r}")
    for module in model.modules():
        if isinstance(module, Stack):
            module.attention = kind
    return model


# ======== FLOPs =================================================================================

class Flops(NamedTuple):
    """Matmul FLOPs of a forward pass by component (a multiply-add counts as 2 FLOPs). Norms,
    softmax, activations and embedding lookups are left out: they are O(tokens * width), not
    O(tokens * width^2), and FlopCounterMode does not count them either."""

    attn_proj: int  # Q/K/V and output projections, self and cross
    attn_scores: int  # q.k scores and the weighted sum of values
    ffn: int  # feed-forward in- and out-projections
    lm_head: int  # output projection to the vocabulary

    @property
    def total(self) -> int:
        return self.attn_proj + self.attn_scores + self.ffn + self.lm_head


def _ffn_flops(config: T5Config, tokens: int) -> int:
    """Per layer: in-projection d -> f (two of them when gated) and out-projection f -> d."""
    return 2 * tokens * config.d_model * config.d_ff * (3 if config.ffn == "gated-gelu" else 2)


def encoder_flops(config: T5Config, batch: int, seq: int) -> Flops:
    """Encoder forward over (batch, seq); scores are dense (padding and masks save no work in SDPA)."""
    tokens, i, layers = batch * seq, config.inner_dim, config.num_encoder_layers
    proj = 2 * tokens * config.d_model * 4 * i  # per layer: QKV (3i) and output (i)
    scores = 2 * 2 * batch * config.num_heads * seq * seq * config.d_kv  # q.k scores, then the sum of values
    return Flops(layers * proj, layers * scores, layers * _ffn_flops(config, tokens), 0)


def decoder_flops(config: T5Config, batch: int, tgt: int, src: int, *, keys: int | None = None,
                  cross_kv: bool = True) -> Flops:
    """Decoder forward of `tgt` tokens per row over `src` encoder positions, plus lm_head; self-attention
    over `keys` (tgt, or a cache's max_len); cross_kv=False (cached steps): no cross K/V projection."""
    keys = tgt if keys is None else keys
    tokens, i, d, layers = batch * tgt, config.inner_dim, config.d_model, config.num_decoder_layers
    # per layer: self QKV and output (4i), cross Q and output (2i); cross K/V (2i) of the src positions
    proj = 2 * tokens * d * 6 * i + (2 * batch * src * d * 2 * i if cross_kv else 0)
    scores = 2 * 2 * batch * config.num_heads * tgt * (keys + src) * config.d_kv  # self and cross
    return Flops(layers * proj, layers * scores, layers * _ffn_flops(config, tokens),
                 2 * tokens * d * config.vocab_size)


def decode_step_flops(config: T5Config, batch: int, src: int, max_len: int) -> Flops:
    """One cached decode step (`decode_step`): one token per row attending over a static cache
    of max_len slots, cross K/V already computed, lm_head on that token."""
    return decoder_flops(config, batch, 1, src, keys=max_len, cross_kv=False)


# ======== Sampler: greedy, sampling, beam search ================================================

class Generation(NamedTuple):
    # n = num_return_sequences rows per input, adjacent
    tokens: Tensor  # (b*n, t) generated ids, decoder start / prompt excluded; pad after a row's EOS
    lengths: Tensor  # (b*n,) tokens generated per row, its EOS included
    scores: Tensor  # (b*n,) sum of the chosen tokens' log-probs (beams: / length**length_penalty)


class GenerationOptions(NamedTuple):
    """How to generate: Hugging Face's names and meanings (except top_k's default: no limit).
    `generate` and `stream` build one from their keyword arguments; a custom loop can too."""

    max_new_tokens: int  # at most this many tokens per row
    min_new_tokens: int = 0  # EOS is forbidden before this many
    do_sample: bool = False  # greedy (or beam search) unless True
    temperature: float = 1.0  # sampling: logits / temperature
    top_k: int | None = None  # sampling: only the k most likely tokens (None or 0: no limit)
    top_p: float | None = None  # sampling: only the smallest set of tokens with this much probability
    num_beams: int = 1  # beam search when > 1
    length_penalty: float = 1.0  # beam search: finished hypotheses score sum / length**length_penalty
    early_stopping: bool | Literal["never"] = False  # beam search: when an input stops (True, False, "never")
    num_return_sequences: int = 1  # samples (or best beams) per input, adjacent in the output
    compile: bool = False  # run the decode step under torch.compile (`compiled_decode_step`)

    def check(self) -> GenerationOptions:
        """These options, or a ValueError naming the first rule they break."""
        for name, kind in dict(max_new_tokens=int, min_new_tokens=int, num_beams=int, top_k=int,
                               do_sample=bool, num_return_sequences=int, compile=bool, temperature=float,
                               top_p=float, length_penalty=float).items():  # an int is a number
            value = getattr(self, name)
            number = kind is float and isinstance(value, (int, float)) and not isinstance(value, bool)
            if type(value) is not kind and not number and not (value is None and name in ("top_k", "top_p")):
                raise ValueError(f"{name} must be {({int: 'an int', bool: 'a bool'}).get(kind, 'a number')}, "
                                 f"got {value!r}")
        beams, n, penalty = self.num_beams, self.num_return_sequences, self.length_penalty
        rules = [(self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
                 (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, "
                  f"max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"),
                 (0 < self.temperature < math.inf, f"temperature must be positive and finite, got "
                  f"{self.temperature} (use do_sample=False for greedy)"),
                 (self.top_k is None or self.top_k >= 0,
                  f"top_k must be positive (or 0 / None for no limit), got {self.top_k}"),
                 (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                 (math.isfinite(penalty), f"length_penalty must be finite, got {penalty}"),
                 (beams >= 1, f"num_beams must be at least 1, got {beams}"),
                 (n >= 1, f"num_return_sequences must be at least 1, got {n}"),
                 (isinstance(self.early_stopping, bool) or self.early_stopping == "never",
                  f"early_stopping must be True, False or 'never', got {self.early_stopping!r}"),
                 (beams <= 1 or not self.do_sample, "beam search is deterministic: do_sample is for sampling "
                  "(num_beams=1)"),
                 (beams != 1 or self.do_sample or n <= 1, f"greedy decoding gives one sequence per input: "
                  f"num_return_sequences={n} needs do_sample=True or num_beams >= it"),
                 (beams <= 1 or n <= beams, f"num_return_sequences={n} beams asked of num_beams={beams}")]
        for ok, message in rules:
            if not ok:
                raise ValueError(message)
        return self


def decode_step(model: T5, tokens: Tensor, memory: Memory, cache: KVCache, positions: Tensor,
                decoder_mask: Tensor | None = None) -> Tensor:
    """One cached decoder call: tokens (b*n, t) at positions (t,) -> next-token logits (b*n, v),
    float32. decoder_mask (b*n, t) is recorded in the cache for later steps. Static shapes, no
    host-device copy: the function to `torch.compile` (see the README for what is verified where)."""
    hidden = model.decoder(tokens, memory, decoder_mask, cache=cache, positions=positions)
    return model.lm_head(hidden[:, -1]).float()


@functools.cache
def compiled_decode_step() -> Callable[..., Tensor]:
    """`decode_step` under torch.compile (whole graph), compiled on first use, without inductor's size
    asserts (its guards check the inputs already). Past torch's recompile limit a new shape runs eagerly,
    with a warning, and is not offered again (torch would log each refusal)."""
    compiled = torch.compile(decode_step, fullgraph=True, options={"size_asserts": False})
    refused: set[tuple] = set()  # (model, shapes) past the limit

    def step(model: T5, tokens: Tensor, memory: Memory, cache: KVCache, *rest: Tensor | None) -> Tensor:
        key = (id(model), tokens.shape, memory.encoded.shape, memory.cross_mask is None, cache.kv.shape)
        if key not in refused:
            try:
                return compiled(model, tokens, memory, cache, *rest)
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # raised before the step runs: nothing written
                refused.add(key)
                warnings.warn("compiled decode step: torch's recompile limit reached, this shape runs eagerly",
                              stacklevel=2)
        return decode_step(model, tokens, memory, cache, *rest)
    return step


def step_function(model: T5, compile: bool) -> Callable[..., Tensor]:
    """`decode_step`, or its compiled form; flex attention cannot be compiled into it on CPU."""
    if compile and model.decoder.attention == "flex" and model.lm_head.weight.device.type == "cpu":
        raise ValueError(FLEX_UNDER_COMPILE)
    return compiled_decode_step() if compile else decode_step


def next_token(logits: Tensor, *, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Logits (b, v) -> token ids (b,): argmax, or a sample after temperature, top-k and top-p
    (in that order, as Hugging Face applies them). Sampling uses the exponential-race trick
    (argmax of p / Exp(1) noise draws from p) so it needs no device sync."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # 0 at the top: never inf
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(dim=-1)
    if top_p is not None and top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


class Prefill(NamedTuple):
    """Everything a decode loop needs after `prefill`."""

    memory: Memory  # the encoding, with every layer's cross-attention keys/values
    cache: KVCache  # written up to `position`
    logits: Tensor  # (b*n, v) float32: the prediction after the decoder prefix
    position: Tensor  # (1,) where the next token goes; advance it in place, one tensor for the whole decode
    length: int  # the prefix length (= position, as a Python number)


def prefill(model: T5, input_ids: Tensor, input_mask: Tensor | None = None, *, max_new_tokens: int,
            decoder_input_ids: Tensor | None = None, decoder_mask: Tensor | None = None, n: int = 1,
            cache: KVCache | None = None) -> Prefill:
    """Start a decode: encode once, project the cross-attention keys/values once (shared by the n
    rows of each input), and run the decoder prefix (start token, or a left-padded prompt with
    decoder_mask) into a cache of prefix + max_new_tokens slots (or into `cache`, reused).
    Then `decode_step(model, tokens, out.memory, out.cache, out.position)` per token."""
    if not isinstance(model, T5):
        hint = ": pass the model itself, and compile=True to compile the decode step"
        raise ValueError(f"generation needs a T5 (encoder and decoder), got {type(model).__name__}"
                         f"{hint if hasattr(model, '_orig_mod') else ''}")
    check_token_ids(input_ids, model.config.vocab_size, "input_ids")
    if input_mask is not None and input_mask.dim() != 2:
        raise ValueError("generation takes a (batch, seq) padding input_mask")
    for name, value, least in (("max_new_tokens", max_new_tokens, 0), ("n", n, 1)):
        if type(value) is not int or value < least:
            raise ValueError(f"{name} must be an int of at least {least}, got {value!r}")
    batch = input_ids.shape[0]
    if decoder_input_ids is None:
        if decoder_mask is not None:
            raise ValueError("decoder_mask without decoder_input_ids")
        decoder_input_ids = input_ids.new_full((batch, 1), model.config.decoder_start_token_id)
    if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != batch:
        raise ValueError(f"decoder_input_ids must be (batch, t) with batch {batch}, "
                         f"got {tuple(decoder_input_ids.shape)}")
    if decoder_mask is not None and decoder_mask.shape == decoder_input_ids.shape \
            and not decoder_mask[:, -1].all():
        raise ValueError("decoder prompts are left-padded: decoder_mask's last column must be 1 in every row")
    memory = model.decoder.memory(model.encoder(input_ids, input_mask), input_mask)
    prompt = decoder_input_ids.repeat_interleave(n, dim=0)
    prompt_mask = None if decoder_mask is None else decoder_mask.repeat_interleave(n, dim=0)
    length, config = prompt.shape[1], model.config
    if cache is None:
        cache = make_cache(config, batch * n, length + max_new_tokens, device=input_ids.device,
                           dtype=memory.encoded.dtype)
    elif cache.kv.shape[2] != batch * n or cache.kv.shape[-2] < length + max_new_tokens:
        raise ValueError(f"the cache holds {cache.kv.shape[2]} rows of {cache.kv.shape[-2]} slots; "
                         f"this decode needs {batch * n} rows of {length + max_new_tokens}")
    elif (cache.kv.dtype, cache.kv.shape[:2], cache.kv.shape[3], cache.kv.shape[-1]) != (
            memory.encoded.dtype, (config.num_decoder_layers, 2), config.num_heads, config.d_kv):
        raise ValueError(f"the cache ({cache.kv.dtype}, shape {tuple(cache.kv.shape)}) was not made for this "
                         f"model ({memory.encoded.dtype}; make_cache(model.config, ..., dtype=...))")
    positions = torch.arange(length, device=prompt.device)
    hidden = model.decoder(prompt, memory, prompt_mask, cache=cache, positions=positions)
    return Prefill(memory, cache, model.lm_head(hidden[:, -1]).float(), positions[-1:] + 1, length)


def _decode(model: T5, input_ids: Tensor, input_mask: Tensor | None, options: GenerationOptions,
            generator: torch.Generator | None, decoder_input_ids: Tensor | None, decoder_mask: Tensor | None
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """The decode loop behind `stream` and `generate`: yields (token (b*n,), its log-prob (b*n,))."""
    step_fn, config = step_function(model, options.compile), model.config
    memory, cache, logits, position, _ = prefill(
        model, input_ids, input_mask, max_new_tokens=options.max_new_tokens,
        decoder_input_ids=decoder_input_ids, decoder_mask=decoder_mask, n=options.num_return_sequences)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    for step in range(options.max_new_tokens):
        if step < options.min_new_tokens:
            logits[:, config.eos_token_id] = -math.inf
        token = next_token(logits, do_sample=options.do_sample, temperature=options.temperature,
                           top_k=options.top_k, top_p=options.top_p, generator=generator)
        logprob = logits.log_softmax(dim=-1).gather(-1, rearrange(token, "b -> b 1"))[:, 0]
        token = token.masked_fill(finished, config.pad_token_id)
        yield token, logprob.masked_fill(finished, 0.0)
        finished |= token == config.eos_token_id
        if step + 1 == options.max_new_tokens or bool(finished.all()):  # one host sync per step
            return
        logits = step_fn(model, rearrange(token, "b -> b 1"), memory, cache, position)
        position += 1


def reorder_cache(cache: KVCache, parents: Tensor, written: int) -> None:
    """Beam search: every row continues its parent row's cache, in place, one layer's keys or values
    of the written slots at a time (extra memory (rows, h, written, e), never a second cache)."""
    for layer_kv in cache.kv:  # (2, b, h, max_len, e)
        for part in layer_kv:
            part[:, :, :written].copy_(part[:, :, :written].index_select(0, parents))
    cache.attend.copy_(cache.attend.index_select(0, parents))


def _beam_search(model: T5, input_ids: Tensor, input_mask: Tensor | None, options: GenerationOptions,
                 decoder_input_ids: Tensor | None, decoder_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Beam search with Hugging Face's semantics: each step every input's beams propose 2*num_beams
    continuations; those ending in EOS (or at max_new_tokens) within the first num_beams finish,
    scored sum / length**length_penalty; the best num_beams others keep running, until
    early_stopping's rule says no running beam can beat the worst finished one. Returns the
    num_return_sequences best: tokens (b*n, max_new_tokens), pad after EOS, and scores (b*n,)."""
    batch, beams, steps = input_ids.shape[0], options.num_beams, options.max_new_tokens
    step_fn, config = step_function(model, options.compile), model.config
    memory, cache, logits, position, written = prefill(model, input_ids, input_mask, max_new_tokens=steps,
                                                       decoder_input_ids=decoder_input_ids,
                                                       decoder_mask=decoder_mask, n=beams)
    device, vocab = logits.device, logits.shape[-1]

    running = torch.full((batch, beams, steps), config.pad_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = -math.inf  # all beams start identical: let only the first one propose
    done = torch.full_like(running, config.pad_token_id)
    done_scores = torch.full((batch, beams), -math.inf, device=device)
    done_full = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, dtype=torch.bool, device=device)
    rank = torch.arange(2 * beams, device=device)
    first = rearrange(torch.arange(batch, device=device) * beams, "b -> b 1")  # each input's first row
    for step in range(steps):
        logprobs = logits.log_softmax(dim=-1)
        if step < options.min_new_tokens:
            logprobs[:, config.eos_token_id] = -math.inf
        totals = rearrange(logprobs, "(b n) v -> b n v", n=beams) + rearrange(running_scores, "b n -> b n 1")
        top_scores, top = rearrange(totals, "b n v -> b (n v)").topk(2 * beams, dim=-1)  # (b, 2n), best first
        parent, token = top // vocab, top % vocab
        candidates = running.gather(1, repeat(parent, "b n -> b n t", t=steps)).clone()
        candidates[:, :, step] = token
        ends = (token == config.eos_token_id) | (step + 1 == steps)

        # finished hypotheses: candidates that end here and rank within the first num_beams
        length = step + 1
        finishing = ends & (rank < beams) & rearrange(improvable, "b -> b 1")
        new_scores = torch.where(finishing, top_scores / length**options.length_penalty, -math.inf)
        done_scores, merged = torch.cat([done_scores, new_scores], dim=1).topk(beams, dim=-1)
        done = torch.cat([done, candidates], dim=1).gather(1, repeat(merged, "b n -> b n t", t=steps))
        done_full = torch.cat([done_full, finishing], dim=1).gather(1, merged)

        # running beams: the best num_beams candidates that did not end
        running_scores, keep = torch.where(ends, -math.inf, top_scores).topk(beams, dim=-1)
        running = candidates.gather(1, repeat(keep, "b n -> b n t", t=steps))

        # can an input's running beams still beat its worst finished hypothesis?
        best_length = steps if options.early_stopping == "never" and options.length_penalty > 0 else length
        best_possible = running_scores[:, 0] / best_length**options.length_penalty
        improvable &= ~done_full.all(dim=1) | (best_possible > done_scores.min(dim=1).values)
        if options.early_stopping is True:  # as Hugging Face: an input with num_beams finished is done
            improvable &= ~done_full.all(dim=1)
        if step + 1 == steps or bool(~improvable.any() | ends.all()):  # one host sync per step
            break
        reorder_cache(cache, rearrange(parent.gather(1, keep) + first, "b n -> (b n)"), written)
        logits = step_fn(model, rearrange(running[:, :, step], "b n -> (b n) 1"), memory, cache, position)
        position += 1
        written += 1

    n = options.num_return_sequences  # finished hypotheses are kept sorted, best first
    return rearrange(done[:, :n], "b n t -> (b n) t"), rearrange(done_scores[:, :n], "b n -> (b n)")


def generation_options(options: GenerationOptions | None, keywords: dict[str, object]) -> GenerationOptions:
    """`options` (or the defaults) with Hugging Face-named keywords applied, checked; an unknown
    keyword is a TypeError that names it."""
    unknown = sorted(set(keywords) - set(GenerationOptions._fields))
    if unknown:
        raise TypeError(f"unknown generation options {unknown}; "
                        f"GenerationOptions has {list(GenerationOptions._fields)}")
    if options is None:
        return GenerationOptions(**keywords).check()  # type: ignore[arg-type]
    return options._replace(**keywords).check()


def stream(model: T5, input_ids: Tensor, input_mask: Tensor | None = None,
           options: GenerationOptions | None = None,
           *, generator: torch.Generator | None = None, decoder_input_ids: Tensor | None = None,
           decoder_mask: Tensor | None = None, **keywords: object) -> Iterator[Tensor]:
    """Greedy decoding or sampling, yielding the next token of every row, (b*n,), as it comes
    (arguments as for `generate`, no beam search); a finished row yields pad."""
    options = generation_options(options, keywords)
    if options.num_beams > 1:
        raise ValueError("stream does not do beam search (num_beams=1): use generate")
    steps = _decode(model, input_ids, input_mask, options, generator, decoder_input_ids, decoder_mask)
    while True:
        with torch.inference_mode():
            item = next(steps, None)
        if item is None:
            return
        yield item[0].clone()  # an ordinary tensor, usable outside inference mode


def generate(model: T5, input_ids: Tensor, input_mask: Tensor | None = None,
             options: GenerationOptions | None = None,
             *, generator: torch.Generator | None = None, decoder_input_ids: Tensor | None = None,
             decoder_mask: Tensor | None = None, **keywords: object) -> Generation:
    """Generate up to max_new_tokens per row as `options` or its fields as Hugging Face-named keywords
    say (`num_beams=4`; given with `options`, they replace its fields): greedy, sampling (do_sample,
    from `generator`) or beam search (num_beams > 1), an input's n = num_return_sequences rows adjacent.
    input_ids, input_mask (b, s); decoder_input_ids (b, t): a prefix from the decoder start token,
    left-padded with decoder_mask (b, t). New tokens only, as ordinary tensors (runs in inference mode)."""
    options = generation_options(options, keywords)
    with torch.inference_mode():
        if options.num_beams > 1:
            tokens, scores = _beam_search(model, input_ids, input_mask, options, decoder_input_ids,
                                          decoder_mask)
        else:
            tokens, logprobs = (torch.stack(column, dim=1) for column in zip(*_decode(
                model, input_ids, input_mask, options, generator, decoder_input_ids, decoder_mask)))
            scores = logprobs.sum(dim=1)
        is_eos = tokens == model.config.eos_token_id  # a row's length: up to its first EOS, or all
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, tokens.shape[1])
        out = Generation(tokens[:, :int(lengths.max())], lengths, scores)
    return Generation(*(tensor.clone() for tensor in out))  # ordinary tensors, not inference ones


# ======== Tokenizers ============================================================================

SENTINEL = re.compile(r"<extra_id_(0|[1-9][0-9]*)>")  # "<extra_id_05>" and "<extra_id_١>" are text
CLEAN_UP = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")  # transformers' clean-up


class Tokenizer:
    """Text <-> ids: sentencepiece pieces (or ByT5's bytes), plus the sentinels `<extra_id_N>` counted
    down from the end of the vocabulary, and `</s>`, `<pad>`, `<unk>` written in text, as
    transformers' T5Tokenizer encodes them; EOS appended by default."""

    def __init__(self, config: T5Config) -> None:
        self.pad_id, self.eos_id, self.extra_ids = config.pad_token_id, config.eos_token_id, config.extra_ids
        self.first_sentinel = config.vocab_size - 1  # <extra_id_0>; subclasses: their vocabulary's end
        self.specials: dict[str, int] = {}  # special tokens as written in text -> id; set by subclasses
        self.strip_specials = False  # ByT5: whitespace around them is dropped (transformers' lstrip/rstrip)
        self.clean_up_spaces = False  # decode drops the spaces of CLEAN_UP's strings (in their order)

    def _encode_text(self, text: str) -> list[int]:  # text without special tokens -> ids
        raise NotImplementedError

    def _decode_text(self, ids: list[int], continues: bool) -> str:  # continues: text was written before
        raise NotImplementedError

    def _special_text(self, i: int) -> str | None:
        """How a special token (pad, EOS, unknown, sentinel) is written; None for other ids."""
        index = self.sentinel_index(i)
        return f"<extra_id_{index}>" if index is not None else \
            {self.pad_id: "<pad>", self.eos_id: "</s>", self.unk_id: "<unk>"}.get(i)

    def sentinel(self, index: int) -> int:
        """The id of <extra_id_{index}>."""
        if not 0 <= index < self.extra_ids:
            raise ValueError(f"<extra_id_{index}> does not exist: this vocabulary has {self.extra_ids} "
                             "sentinels")
        return self.first_sentinel - index

    def sentinel_index(self, i: int) -> int | None:
        index = self.first_sentinel - i
        return index if 0 <= index < self.extra_ids else None

    def encode(self, text: str, *, eos: bool = True) -> list[int]:
        pattern = "|".join([SENTINEL.pattern, *map(re.escape, self.specials)])
        ids: list[int] = []
        start = 0
        for match in re.finditer(pattern, text):
            sentinel = match.group(1)
            if sentinel is not None and int(sentinel) >= self.extra_ids:
                continue  # past this vocabulary's sentinels: plain text
            strip = self.strip_specials and sentinel is None
            before = text[start:match.start()]
            ids += self._encode_text(before.rstrip() if strip else before)
            ids.append(self.sentinel(int(sentinel)) if sentinel is not None else self.specials[match[0]])
            start = len(text) - len(text[match.end():].lstrip()) if strip else match.end()  # past spaces
        ids += self._encode_text(text[start:])
        return ids + [self.eos_id] if eos else ids

    def encode_batch(self, texts: list[str], *, eos: bool = True, device: torch.device | str | None = None,
                     max_length: int | None = None, padding: Literal["longest", "max_length"] = "longest",
                     truncation: bool = False) -> tuple[Tensor, Tensor]:
        """Texts -> ids (b, s) right-padded, and the padding mask (b, s), 1 = real token; padding and
        truncation as transformers' tokenizers mean them (truncation keeps EOS last)."""
        if isinstance(texts, str) or not texts:
            raise ValueError("encode_batch takes a non-empty list of texts")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if (truncation or padding == "max_length") and max_length is None:
            raise ValueError(f"{'truncation' if truncation else 'padding=max_length'} needs max_length")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {max_length}")
        rows = [self.encode(text, eos=eos) for text in texts]
        if truncation:
            tail = [self.eos_id] if eos else []
            rows = [row if len(row) <= max_length else row[:max_length - len(tail)] + tail for row in rows]
        width = max(1, max(len(row) for row in rows), max_length if padding == "max_length" else 0)
        ids = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows], dtype=torch.long)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], dtype=torch.long)
        return ids.to(device), mask.to(device)

    def decode(self, ids: list[int] | Tensor, *, skip_special_tokens: bool = True) -> str:
        """Ids -> text, special tokens (pad, EOS, unknown, sentinels) dropped first as in transformers (the
        text they split joins again); skip_special_tokens=False writes <pad>, </s>, <unk>, <extra_id_N>."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        # ids past the tokenizer's pieces and sentinels decode to nothing (T5: 32100 ids, 32128 logits)
        ids = [i for i in ids if 0 <= i <= self.first_sentinel
               and not (skip_special_tokens and self._special_text(i))]
        parts: list[str] = []
        for special, run in itertools.groupby(ids, lambda i: self._special_text(i) is not None):
            parts += map(self._special_text, run) if special else [self._decode_text([*run], bool(parts))]
        text = "".join(parts)
        for spaced in CLEAN_UP if self.clean_up_spaces else ():
            text = text.replace(spaced, spaced.strip())
        return text


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, config: T5Config, model_file: str | Path) -> None:
        import sentencepiece

        super().__init__(config)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except RuntimeError as error:  # a truncated or foreign file
            raise ValueError(f"{model_file}: not a readable sentencepiece model ({error})") from None
        self.unk_id, pieces = self.sp.unk_id(), self.sp.get_piece_size()
        self.specials = {self.sp.id_to_piece(i): i for i in (self.pad_id, self.eos_id, self.unk_id)
                         if 0 <= i < pieces and (self.sp.is_control(i) or self.sp.is_unknown(i))}
        self.first_sentinel = pieces + self.extra_ids - 1
        if self.first_sentinel >= config.vocab_size:
            raise ValueError(f"{model_file}: {pieces} pieces + {self.extra_ids} sentinels do not fit "
                             f"the model's vocabulary of {config.vocab_size}")

    def _encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode_text(self, ids: list[int], continues: bool) -> str:
        # sentencepiece drops every word-boundary mark before the first character; transformers only the
        # first text's first one (so mid-text, none)
        marks = "".join(map(self.sp.id_to_piece, ids))
        return " " * max(0, len(marks) - len(marks.lstrip("\u2581")) - (not continues)) + self.sp.decode(ids)


class ByteTokenizer(Tokenizer):
    """ByT5: each UTF-8 byte b is id b + 3 (after pad, EOS, unknown); sentinels count down from the
    vocabulary's end as in T5's span corruption (Hugging Face's ByT5Tokenizer numbers them up from 259)."""

    OFFSET = 3

    def __init__(self, config: T5Config) -> None:
        super().__init__(config)
        self.unk_id, self.strip_specials = 2, True
        self.specials = {"<pad>": self.pad_id, "</s>": self.eos_id, "<unk>": self.unk_id}
        if config.vocab_size < 256 + self.OFFSET + self.extra_ids:
            raise ValueError(f"a byte vocabulary needs {256 + self.OFFSET} ids plus sentinels, the model has "
                             f"{config.vocab_size}")

    def _encode_text(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def encode(self, text: str, *, eos: bool = True) -> list[int]:
        """As ByT5Tokenizer: a text ending in </s> gets no second EOS (T5's sentencepiece one adds it)."""
        ids = super().encode(text, eos=False)
        return ids + [self.eos_id] if eos and ids[-1:] != [self.eos_id] else ids

    def _decode_text(self, ids: list[int], continues: bool) -> str:
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET)
        return data.decode("utf-8", errors="ignore")


def load_tokenizer(path: str | Path, config: T5Config | None = None) -> Tokenizer:
    """The tokenizer of a converted checkpoint folder: spiece.model (or tokenizer.model), or bytes for ByT5
    as its config says; decode cleans up spaces where its tokenizer_config.json (transformers') says to."""
    path = Path(path)
    config = config or T5Config.load(path / "config.json")
    model = next((path / n for n in ("spiece.model", "tokenizer.model") if (path / n).is_file()), None)
    if config.tokenizer != "bytes" and model is None:
        raise FileNotFoundError(f"{path}: no spiece.model or tokenizer.model (the sentencepiece model of "
                                "this checkpoint)")
    tokenizer: Tokenizer = ByteTokenizer(config) if config.tokenizer == "bytes" else \
        SentencePieceTokenizer(config, model)
    settings = path / "tokenizer_config.json"  # kept by convert_hf.py
    given = json.loads(settings.read_text()) if settings.is_file() else {}
    tokenizer.clean_up_spaces = isinstance(given, dict) and given.get("clean_up_tokenization_spaces") is True
    return tokenizer


# ======== Loading and saving (fp8 and int8 weights included) ====================================

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by name
TOKENIZER_FILES = ("spiece.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",  # ours and
                   "special_tokens_map.json", "added_tokens.json")  # transformers': a folder's tokenizer
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",  # names in a header
                      torch.float8_e4m3fn: "F8_E4M3", torch.int8: "I8", torch.int64: "I64"}


def write_safetensors(path: str | Path, specs: Mapping[str, tuple[torch.Size, torch.dtype]],
                      tensors: Iterable[tuple[str, Tensor]], metadata: dict[str, str]) -> None:
    """Stream tensors into a safetensors file, each written and freed before the next is made (the header
    needs only `specs`). Ours, not safetensors' writer: that one imports numpy, which t5.py does not need."""
    unknown = sorted({str(dtype) for _, dtype in specs.values() if dtype not in SAFETENSORS_DTYPES})
    if unknown:
        raise ValueError(f"cannot store {unknown[0]} tensors (load reads float32, bf16, float16, fp8, int8)")
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in specs.items():
        nbytes = shape.numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for (name, tensor), expected in zip(tensors, specs, strict=True):  # as many as the header lists
            assert name == expected and (tensor.shape, tensor.dtype) == specs[name], (name, tensor.dtype)
            tensor = tensor.detach().cpu().contiguous()
            f.write(ctypes.string_at(tensor.data_ptr(), tensor.nbytes))
            del tensor  # before the next one is made


def dequantize_weight(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """An fp8 or int8 weight (o, i) with its per-row scale (o,) -> the weight in `dtype`. The
    product is taken in float32 and rounded to `dtype` once: rounding the scale to bfloat16 first
    would round twice, and a small scale could underflow float16 (rows of zeros)."""
    return weight.float().mul_(rearrange(scale.float(), "o -> o 1")).to(dtype)


class Float8Linear(nn.Module):
    """A linear layer whose weight stays in float8_e4m3fn, with a float32 scale per output row; each
    call dequantizes it to the input's dtype, so it computes what convert_hf.dequantize would. `load`
    puts one in place of each Linear whose checkpoint weight is fp8 and has a `weight_scale`."""

    weight_dtype, scale_dtype = torch.float8_e4m3fn, torch.float32

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=self.weight_dtype),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=self.scale_dtype),
                                         requires_grad=False)

    def dense_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Tensor], prefix: str, metadata: dict, strict: bool,
                              missing: list[str], unexpected: list[str], errors: list[str]) -> None:
        """load_state_dict: a weight of another dtype is refused (cast, floats would become small ints);
        int8's packed copy is made again (a write under inference_mode would not show)."""
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != self.weight.dtype:
            errors.append(f"{prefix}weight is {weight.dtype}, the layer's {self.weight.dtype}: not loaded "
                          "(load dense weights into a dense model)")
            return
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, missing, unexpected, errors)
        _packed.pop(id(self.weight), None)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        """What .to(), .cuda(), .half() do to the weight and its scale: they move, but keep their dtypes
        (a model's .half() or .to(torch.bfloat16) would have made fp8 weights 16-bit, rounded the scales)."""
        def keep_dtype(t: Tensor) -> Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)
        return super()._apply(keep_dtype, recurse)

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad and torch.is_grad_enabled():  # fp8 gradients: mostly zeros
            raise ValueError("fp8 weights cannot be trained (requires_grad=False): train a dense model")
        return linear(x, self.dense_weight(x.dtype))


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A weight (o, i) -> (int8 weight, bfloat16 scale (o,)), symmetric per output row: the row's
    largest magnitude maps to 127 (clamped there when rounding the scale to bfloat16 lowered it).
    bfloat16 scales are what the CPU int8 kernel takes; `dequantize_weight` uses the same values."""
    weight = weight.float()
    scale = (weight.abs().amax(dim=1) / 127).bfloat16()
    scale = torch.where(scale > 0, scale, 1.0)  # an all-zero row stays zero
    int8 = (weight / rearrange(scale.float(), "o -> o 1")).round().clamp(-127, 127).to(torch.int8)
    return int8, scale


class Int8Linear(Float8Linear):
    """The weight in int8 with a bfloat16 scale per output row (`quantize_int8`). Which product runs
    (README, int8 weights): on CPU in float32 inference, fbgemm's int8 by int8, each input row quantized on
    the fly as CTranslate2's int8 does (`quantize_inputs = False`: off); on CPU in bfloat16, one weight-only
    kernel (torch 2.13's needs 16-byte aligned rows: in_features a multiple of 16, and `load` copies
    unaligned int8 weights); otherwise the weight dequantized to the input's dtype, as Float8Linear does."""

    weight_dtype, scale_dtype = torch.int8, torch.bfloat16
    quantize_inputs = FBGEMM  # where fbgemm is built in (x86)

    def forward(self, x: Tensor) -> Tensor:
        rows = rearrange(x, "... i -> (...) i")
        if self.quantize_inputs and cpu_float32_inference(x):
            peak = rows.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            product = compiled_fbgemm_linear if torch.compiler.is_compiling() else fbgemm_linear
            # two more columns, -1 and 1, fix fbgemm's range for x (min to max of all rows) at [-1, 1]:
            # each row is quantized as it would be alone, whatever rows run with it
            scaled = torch.cat([rows / peak, x.new_tensor([-1.0, 1.0]).expand(len(rows), 2)], 1)
            y = product(scaled, self.weight) * (peak * self.weight_scale.float())
        elif x.device.type == "cpu" and x.dtype == torch.bfloat16 and self.in_features % 16 == 0 \
                and not torch.is_grad_enabled():  # (the kernel has no backward)
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.weight_scale)
        else:
            return super().forward(x)
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module) -> nn.Module:
    """Every Linear (lm_head included) and fp8 layer -> an Int8Linear of its float32 weight; int8 layers,
    embeddings and norms stay as they are (the model computes in their dtype). In place; returns it."""
    biased = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.bias is not None]
    if biased:  # before any layer is replaced
        raise ValueError(f"{biased[0]}: a Linear with a bias; quantize takes T5's layers, which have none")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) or type(module) is Float8Linear:
            with torch.device("meta"):  # its tensors are assigned below (requires_grad=False kept)
                layer = Int8Linear(module.in_features, module.out_features)
            dense = module.weight if isinstance(module, nn.Linear) else module.dense_weight(torch.float32)
            weight, scale = quantize_int8(dense.detach())
            layer.load_state_dict({"weight": weight, "weight_scale": scale}, assign=True)
            model.set_submodule(name, layer)
    return model


def load(path: str | Path, *, encoder_only: bool = False, device: torch.device | str | None = None,
         dtype: torch.dtype | None = None, attention: Literal["sdpa", "flex"] = "sdpa") -> T5 | T5Encoder:
    """Load a folder written by `convert_hf.py` (config.json + model.safetensors) into a model built on the
    meta device (nothing allocated twice); a missing or unexpected tensor is an error naming it. encoder_only:
    the encoder's tensors only, a `T5Encoder`. fp8 and int8 weights stay so; `dtype` applies to the rest."""
    from safetensors import SafetensorError, safe_open

    path, where = Path(path), torch.device(device or "cpu")
    if dtype not in (None, *DTYPES.values()):  # float64 would compute at float32's precision (the stream's)
        raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype!r}")
    if where.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: CUDA is not available on this machine")
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} not found (convert_hf.py writes it)")
    config = T5Config.load(path / "config.json")
    with torch.device("meta"):
        model: T5 | T5Encoder = T5Encoder(config) if encoder_only else T5(config)
    prefix = "encoder." if encoder_only else ""
    try:
        weights = safe_open(str(path / "model.safetensors"), framework="pt",
                            device="cpu" if where.type == "cpu" else str(where))  # it refuses "cpu:0"
    except SafetensorError as error:  # a truncated or foreign file
        raise ValueError(f"{path / 'model.safetensors'}: not a readable safetensors file ({error})") from None
    state = {}
    with weights as f:
        present = set(f.keys())
        modules = dict(model.named_modules())
        for key in sorted(present):  # fp8 and int8 weights: their layers become Float8Linear, Int8Linear
            if key.endswith(".weight_scale") and key.startswith(prefix):
                name = key[len(prefix):-len(".weight_scale")]
                linear = modules.get(name)
                if not isinstance(linear, nn.Linear):
                    raise ValueError(f"{path}: unexpected tensor {key} (no linear layer {name})")
                weight = key.removesuffix("_scale")
                if weight not in present:
                    continue  # the layer stays a Linear: its weight is reported missing below
                stored = f.get_slice(weight).get_dtype()
                quantized = {"I8": Int8Linear, "F8_E4M3": Float8Linear}.get(stored)
                if quantized is None:
                    raise ValueError(f"{path}: tensor {key} scales a weight of {stored}, not int8 or fp8")
                with torch.device("meta"):
                    model.set_submodule(name, quantized(linear.in_features, linear.out_features))
        wanted = {prefix + key: tensor for key, tensor in model.state_dict().items()}
        missing = sorted(set(wanted) - present)
        unexpected = sorted(k for k in present - set(wanted) if k.startswith(prefix))  # encoder_only: its own
        hint = " (an encoder-only checkpoint? load it with encoder_only=True)" \
            if not encoder_only and any(k.startswith("decoder.") for k in missing) else ""
        for kind, keys in ("missing", missing), ("unexpected", unexpected):  # the hint: "" unless missing
            if keys:
                raise ValueError(f"{path}: {kind} tensors {keys[:8]}{' ...' if len(keys) > 8 else ''}{hint}")
        for key, expected in wanted.items():
            tensor = f.get_tensor(key)
            if tensor.dtype in (torch.float8_e4m3fn, torch.int8) and tensor.dtype != expected.dtype:
                raise ValueError(f"{path}: tensor {key} is {tensor.dtype} without its scale {key}_scale")
            if tensor.dtype == torch.int8 and tensor.data_ptr() % 64:  # mapped from the file as it lies:
                tensor = tensor.clone()  # aligned (64 bytes), as Int8Linear's bfloat16 kernel needs (16)
            if tensor.shape != expected.shape:
                raise ValueError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, config says "
                                 f"{tuple(expected.shape)}")
            keep = expected.dtype in (torch.float8_e4m3fn, torch.int8) or key.endswith(".weight_scale")
            state[key[len(prefix):]] = tensor if dtype is None or keep else tensor.to(dtype)
            if not keep and state[key[len(prefix):]].dtype != next(iter(state.values())).dtype:  # embedding's
                raise ValueError(f"{path}: tensor {key} is {tensor.dtype}, the embeddings "
                                 f"{next(iter(state.values())).dtype}: load it with a dtype= for all")
    model.load_state_dict(state, assign=True, strict=True)  # assign keeps Float8Linear's requires_grad=False
    return set_attention(model, attention).eval()


def is_our_config(path: str | Path) -> bool:
    """Whether a config.json is one `save` or convert_hf.py wrote, of this or an earlier version: a JSON
    object with our field names and none of transformers'. What either may replace."""
    try:
        fields = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(fields, dict) and "num_encoder_layers" in fields and "model_type" not in fields


def save(model: T5 | T5Encoder, folder: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write `model` as `load` reads it (config.json, model.safetensors, a sentencepiece tokenizer's
    spiece.model, the tokenizer's clean-up flag in tokenizer_config.json); files are staged beside their
    place and renamed once all are written, config.json last: a save interrupted while renaming leaves
    none (load refuses the folder), not a mix."""
    folder, model = Path(folder), getattr(model, "_orig_mod", model)  # torch.compile(model): the model itself
    dataclasses.replace(model.config)  # checked again: it may have been changed since it was made
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} exists and is not a folder")
    if (folder / "config.json").exists() and not is_our_config(folder / "config.json"):  # a transformers one?
        raise FileExistsError(f"{folder / 'config.json'} is not ours (kept): save elsewhere")
    spiece = tokenizer.sp.serialized_model_proto() if isinstance(tokenizer, SentencePieceTokenizer) else None
    if spiece and tokenizer.sp.get_piece_size() + model.config.extra_ids > model.config.vocab_size:
        raise ValueError(f"the tokenizer ({tokenizer.sp.get_piece_size()} pieces + {model.config.extra_ids} "
                         f"sentinels) does not fit the model's vocabulary of {model.config.vocab_size}")
    made = [path for path in (folder, *folder.parents) if not path.exists()]  # innermost first
    folder.mkdir(parents=True, exist_ok=True)
    # another tokenizer's files go (transformers would read them): beside another spiece.model, or of the
    # other kind (ByT5 has no tokenizer.json; one without spiece.model is compared with ours by --to-hf)
    old = next((folder / n for n in ("spiece.model", "tokenizer.model") if (folder / n).is_file()), None)
    same = tokenizer is None or (old.read_bytes() == spiece if old else
                                 bool(spiece) == (folder / "tokenizer.json").is_file())
    files = {"spiece.model": spiece} if spiece else {}  # tokenizer files written beside the weights
    settings = folder / "tokenizer_config.json"  # its clean-up flag: where load_tokenizer reads it
    kept = json.loads(settings.read_text()) if tokenizer is not None and same and settings.is_file() else {}
    kept, clean = kept if isinstance(kept, dict) else {}, getattr(tokenizer, "clean_up_spaces", False)
    if clean != (kept.get("clean_up_tokenization_spaces") is True):  # written where it would read otherwise
        files[settings.name] = json.dumps({**kept, "clean_up_tokenization_spaces": clean}).encode()
    staged = {n: folder / f".{n}.tmp-{os.getpid()}" for n in ["model.safetensors", *files, "config.json"]}
    stale = [] if same else [folder / name for name in TOKENIZER_FILES
                             if name not in staged and (folder / name).is_file()]
    try:
        prefix = "encoder." if isinstance(model, T5Encoder) else ""
        state = {prefix + k: t for k, t in model.state_dict().items()}  # tensors tied together: each written
        write_safetensors(staged["model.safetensors"], {k: (t.shape, t.dtype) for k, t in state.items()},
                          state.items(), {"format": "pt"})
        model.config.save(staged["config.json"])  # written by Python: the permissions the umask gives
        os.chmod(staged["model.safetensors"], staged["config.json"].stat().st_mode & 0o777)  # not 0600
        for name, data in files.items():
            staged[name].write_bytes(data)
        (folder / "config.json").unlink(missing_ok=True)
        for name, path in staged.items():
            path.replace(folder / name)
        for path in stale:
            path.unlink()
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
        for path in made:  # a failed save leaves no folder it made
            if not any(path.iterdir()):
                path.rmdir()
    return folder


if __name__ == "__main__":  # the command line moved out (README, Renames)
    raise SystemExit('t5.py is the library; the command line is cli.py: python cli.py generate "spell: 4071"')
