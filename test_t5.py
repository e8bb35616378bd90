"""Tests: parity with Hugging Face transformers on every T5 family, and everything else t5.py and
convert_hf.py promise. Runs on CPU, and on CUDA as well when it is available.

Reference checkpoints are tiny random models built from transformers' configs, saved the way the
hub ships them, converted with the real command-line path, and compared in float32.

One section per subject, in this order: parity with Hugging Face; loading and saving; bad input;
tokenizers; the converter; decoding; the demo model and the command line; training; half
precision; diffusion pipelines; the README, the benchmark and t5.py's own numbers. Helpers and
fixtures sit before their first user; those that several sections share come first.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import bench_t5
import cli
import convert_hf
import t5
import train

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
HERE = Path(__file__).parent

# Tiny configs with odd sizes (a d_ff of 37 catches shape bugs) and heads of at least 16 wide (the least
# FlexAttention takes on CUDA). `untied` families get their own lm_head weight and
# "tie_word_embeddings": false, as the hub's v1.1 / Flan / mT5 / UMT5 / ByT5 do.
FAMILIES = {
    # v1.0 with num_heads * d_kv != d_model, as in t5-3b / t5-11b
    "t5-v1.0": (transformers.T5Config, dict(vocab_size=101, d_model=32, d_kv=20, d_ff=37, num_layers=2,
                                            num_heads=3, feed_forward_proj="relu"), False),
    # v1.1 / Flan: non-default buckets, max distance and eps, so the test sees them honoured
    "t5-v1.1": (transformers.T5Config, dict(vocab_size=103, d_model=32, d_kv=16, d_ff=37, num_layers=3,
                                            num_decoder_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                                            relative_attention_num_buckets=10, relative_attention_max_distance=13,
                                            layer_norm_epsilon=1e-5), True),
    "mt5": (transformers.MT5Config, dict(vocab_size=107, d_model=24, d_kv=16, d_ff=37, num_layers=2,
                                         num_heads=3, feed_forward_proj="gated-gelu"), True),
    "umt5": (transformers.UMT5Config, dict(vocab_size=109, d_model=32, d_kv=16, d_ff=37, num_layers=3,
                                           num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=12,
                                           relative_attention_max_distance=20), True),
    # ByT5: byte vocabulary, encoder three times deeper than the decoder
    "byt5": (transformers.T5Config, dict(vocab_size=384, d_model=32, d_kv=16, d_ff=37, num_layers=3,
                                         num_decoder_layers=1, num_heads=4, feed_forward_proj="gated-gelu"), True),
}
HF_MODELS = {transformers.T5Config: transformers.T5ForConditionalGeneration,
             transformers.MT5Config: transformers.MT5ForConditionalGeneration,
             transformers.UMT5Config: transformers.UMT5ForConditionalGeneration}
ATOL = 1e-4  # float32; the two implementations sum in different orders (fused vs separate projections)


def build_hf_checkpoint(folder: Path, family: str, seed: int = 0, eos_boost: float = 1.0) -> Path:
    """Save a seeded random Hugging Face model as the hub ships it. eos_boost scales the EOS row of
    the output embedding, so that generation stops rows at different steps."""
    config_cls, kwargs, untied = FAMILIES[family]
    torch.manual_seed(seed)
    model = HF_MODELS[config_cls](config_cls(**kwargs)).eval()
    with torch.no_grad():  # norms are initialised to 1: perturb them so a misplaced norm shows
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    if untied:
        bench_t5.untie_as_on_the_hub(folder)
    if eos_boost != 1.0:
        state = load_file(folder / "model.safetensors")
        state["lm_head.weight" if untied else "shared.weight"][kwargs.get("eos_token_id", 1)] *= eos_boost
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


for _, _kwargs, _ in FAMILIES.values():  # as the hub's config.json files say
    _kwargs.setdefault("decoder_start_token_id", 0)


class Family:
    """A family's Hugging Face reference (reloaded with from_pretrained) and our converted folder."""

    def __init__(self, root: Path, name: str, eos_boost: float = 1.0) -> None:
        self.name = name
        hf_dir = build_hf_checkpoint(root / "hf", name, eos_boost=eos_boost)
        self.ours_dir = root / "ours"
        assert convert_hf.main([str(hf_dir), str(self.ours_dir)]) == 0
        self.hf = HF_MODELS[FAMILIES[name][0]].from_pretrained(hf_dir).eval()
        self.hf_dir = hf_dir
        self.vocab = FAMILIES[name][1]["vocab_size"]
        if FAMILIES[name][2]:  # the trap: make sure the reference really has its own lm_head
            assert not torch.equal(self.hf.lm_head.weight, self.hf.shared.weight)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    return Family(tmp_path_factory.mktemp(request.param), request.param)


def padded_batch(vocab: int, lengths: list[int], seed: int = 1, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never the pad id) right-padded to the longest length, and the padding mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, vocab, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, pad), mask.long()


def assert_close_where(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, atol: float) -> None:
    keep = mask.bool()
    torch.testing.assert_close(ours[keep].cpu(), ref[keep].cpu(), atol=atol, rtol=0)


def tiny_config(family: str) -> t5.T5Config:
    """Our config for a family of FAMILIES, without building the Hugging Face model."""
    config_cls, kwargs, _ = FAMILIES[family]
    hf_config = config_cls(**kwargs).to_dict()
    hf_config["model_type"] = {"MT5Config": "mt5", "UMT5Config": "umt5"}.get(config_cls.__name__, "t5")
    return convert_hf.config_from_hf(hf_config)[0]


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentencepiece model trained here, with T5's special pieces (pad 0, EOS 1, unknown 2, no BOS)."""
    import random

    import sentencepiece

    folder = tmp_path_factory.mktemp("spiece")
    rng = random.Random(0)
    syllables = ["ka", "to", "ri", "mo", "ne", "su", "la", "pe", "qu", "ix", "ön", "ça", "東", "京", "😀", "ß"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    words += "hello world the fox".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    (folder / "corpus.txt").write_text("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=200, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0,
        minloglevel=2)
    return folder


########################################################################################
# Parity with Hugging Face
########################################################################################


@pytest.mark.parametrize("device", DEVICES)
def test_encoder_parity(family: Family, device: str) -> None:
    """Encoder hidden states match, with a padding mask (unequal lengths) and without one. The
    lengths reach past max_distance so the far, shared buckets are exercised."""
    ours = t5.load(family.ours_dir, encoder_only=True, device=device)
    hf = family.hf.get_encoder().to(device)
    ids, mask = padded_batch(family.vocab, [41, 17, 3])
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
        assert_close_where(out, ref, mask, ATOL)
        assert (out[~mask.bool()] == 0).all(), "padded positions must come out as zeros"
        full = torch.ones_like(mask)
        assert_close_where(ours(ids), hf(input_ids=ids).last_hidden_state, full, ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_seq2seq_parity(family: Family, device: str) -> None:
    """Encoder-decoder logits match for a padded batch with a padded decoder batch."""
    ours = t5.load(family.ours_dir, device=device)
    hf = family.hf.to(device)
    ids, mask = padded_batch(family.vocab, [23, 9, 14], seed=2)
    dec, dec_mask = padded_batch(family.vocab, [11, 4, 16], seed=3)
    ids, mask, dec, dec_mask = (x.to(device) for x in (ids, mask, dec, dec_mask))
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        out = ours(ids, dec, input_mask=mask, decoder_mask=dec_mask)
    assert isinstance(out, t5.T5Output) and out.loss is None
    assert out.logits.shape == ref.shape
    assert_close_where(out.logits, ref, dec_mask, ATOL)


@pytest.mark.parametrize("device", DEVICES)
def test_packing_mask_matches_separate_runs(family: Family, device: str) -> None:
    """Three sequences packed in one row with a block-diagonal (b, q, k) mask give each the same
    encoder output as running it alone; the unused tail is zero."""
    ours = t5.load(family.ours_dir, encoder_only=True, device=device)
    lengths = [7, 12, 5]
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(2, family.vocab, (1, n), generator=g).to(device) for n in lengths]
    packed = torch.zeros(1, 30, dtype=torch.long, device=device)
    segment = torch.zeros(1, 30, dtype=torch.long, device=device)
    start = 0
    for i, seq in enumerate(seqs):
        packed[:, start:start + seq.shape[1]] = seq
        segment[:, start:start + seq.shape[1]] = i + 1
        start += seq.shape[1]
    mask = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] > 0)
    with torch.no_grad():
        out = ours(packed, mask)
        start = 0
        for seq in seqs:
            alone = ours(seq)
            torch.testing.assert_close(out[:, start:start + seq.shape[1]], alone, atol=1e-5, rtol=0)
            start += seq.shape[1]
    assert (out[:, start:] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_flex_attention_matches_sdpa_and_hf(family: Family, device: str) -> None:
    """attention="flex" (compiled FlexAttention: score_mod reading the bucket table, block mask
    for padding, packing and causality) against our SDPA path and transformers, float32, 1e-5:
    encoder with and without a padding mask, a packed encoder row, and encoder-decoder logits
    with a padded decoder batch; greedy decoding gives the same tokens."""
    sdpa = t5.load(family.ours_dir, device=device)
    flex = t5.load(family.ours_dir, device=device, attention="flex")
    assert flex.encoder.attention == flex.decoder.attention == "flex"
    ids, mask = (x.to(device) for x in padded_batch(family.vocab, [41, 17, 3]))
    dec, dec_mask = (x.to(device) for x in padded_batch(family.vocab, [11, 4, 16], seed=3))
    hf = family.hf.to(device)
    segment = torch.tensor([[1] * 7 + [2] * 12 + [3] * 5 + [0] * 17], device=device)  # 3 sequences packed in 41
    packing = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] > 0)
    with torch.no_grad():
        out = flex.encoder(ids, mask)
        assert_close_where(out, sdpa.encoder(ids, mask), mask, 1e-5)
        assert_close_where(out, hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state, mask, 1e-5)
        assert (out[~mask.bool()] == 0).all()
        torch.testing.assert_close(flex.encoder(ids), sdpa.encoder(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(flex.encoder(ids[:1], packing), sdpa.encoder(ids[:1], packing), atol=1e-5, rtol=0)
        logits = flex(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits
        assert_close_where(logits, sdpa(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits, dec_mask, 1e-5)
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        assert_close_where(logits, ref, dec_mask, 1e-5)
        # no decoder mask at batch > 1 (the training call): causality alone, read at every row
        torch.testing.assert_close(flex(ids, dec, input_mask=mask).logits, sdpa(ids, dec, input_mask=mask).logits,
                                   atol=1e-5, rtol=0)
    assert torch.equal(t5.generate(flex, ids, mask, max_new_tokens=6).tokens,
                       t5.generate(sdpa, ids, mask, max_new_tokens=6).tokens)


def test_flex_encoder_where_torchs_cpu_kernel_erred() -> None:
    """Against SDPA, float32, no input mask (the diffusion pipelines' call). torch 2.13's compiled CPU
    flex kernel gave wrong values or NaN at head widths 8 and 16 (in a scan, at lengths 8 past a multiple
    of 16: 8 here) and, without a block mask, at lengths ending inside a 128-key block (200 and 360 in a
    scan, 360 here): t5.py pads CPU heads narrower than 32 with zeros and always passes a block mask.
    Width 64 (released T5s' heads, not padded; the other flex tests' heads are padded) at length 24.
    One compile per length: three lengths."""
    for d_kv, lengths in ((8, (8,)), (16, (360,)), (64, (24,))):
        config = t5.T5Config(vocab_size=64, d_model=32, d_kv=d_kv, d_ff=48, num_heads=2, num_encoder_layers=1,
                             num_decoder_layers=1, ffn="gated-gelu", extra_ids=0, num_buckets=8, max_distance=16)
        sdpa = t5.T5Encoder(config).eval()
        train.init_weights(sdpa, torch.Generator().manual_seed(0))
        flex = t5.set_attention(copy.deepcopy(sdpa), "flex")
        for length in lengths:
            ids = torch.randint(2, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(length))
            with torch.no_grad():
                torch.testing.assert_close(flex(ids), sdpa(ids), atol=1e-5, rtol=0)


def test_saving_needs_no_numpy(tmp_path: Path) -> None:
    """t5.py needs torch, einops, safetensors and sentencepiece only, and a fresh `pip install -r
    requirements.txt` brings no numpy: t5.save and `cli.py encode` write safetensors files themselves
    (safetensors 0.8's writer imports numpy: both failed with ModuleNotFoundError there)."""
    code = """if True:
        import sys
        sys.modules["numpy"] = None  # as where it is not installed: importing it fails
        import runpy, torch, t5
        model = t5.load("demo")
        t5.save(model, sys.argv[1], t5.load_tokenizer("demo"))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), t5.load(sys.argv[1]).state_dict().values()))
        sys.argv = ["cli.py", "encode", "--ckpt", sys.argv[1], "--out", sys.argv[2], "spell: 7"]
        runpy.run_path("cli.py", run_name="__main__")
    """
    out = tmp_path / "hidden.safetensors"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "saved"), str(out)], cwd=HERE,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    from safetensors.torch import load_file

    encoder = t5.load(HERE / "demo", encoder_only=True)
    ids = torch.tensor([t5.load_tokenizer(HERE / "demo").encode("spell: 7")])
    with torch.no_grad():
        assert torch.equal(load_file(out)["hidden"], encoder(ids))


def test_deployment_paths() -> None:
    """How models get embedded elsewhere. torch.export of the encoder with a dynamic length serves lengths
    on both sides of d_kv (the written-out attention for compiled decoding put a guard at d_kv there: an
    encoder exported from a short prompt refused longer ones); torch.jit.trace under no_grad (oneDNN's
    op could not be traced) gives eager's output; int8 inference ignores torch's default dtype (float64
    made fbgemm fail); generate on torch.compile(model) says what to do; a float64 load is refused (the
    residual stream is float32: it would not compute in float64). A trace of an int8 model records the
    dequantized product, as the README says."""
    model = random_model("t5-v1.1").eval()  # d_kv 16
    encoder = model.encoder
    ids, mask = padded_batch(model.config.vocab_size, [5, 3], seed=4)
    seq = torch.export.Dim("seq", min=2, max=256)
    exported = torch.export.export(encoder, (ids, mask), dynamic_shapes=({1: seq}, {1: seq}))
    long_ids, long_mask = padded_batch(model.config.vocab_size, [40, 17], seed=5)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(long_ids, long_mask), encoder(long_ids, long_mask),
                                   atol=1e-5, rtol=0)
        traced = torch.jit.trace(encoder, (ids, mask))
        assert torch.equal(traced(ids, mask), encoder(ids, mask))
    int8 = t5.quantize(copy.deepcopy(model))
    with torch.no_grad():  # README: a trace of int8 records the dequantized product (fbgemm's cannot be traced)
        traced = torch.jit.trace(int8.encoder, (ids, mask), check_trace=False)
        twin = convert_hf.dequantize(copy.deepcopy(int8)).encoder
        torch.testing.assert_close(traced(ids, mask), twin(ids, mask), atol=1e-5, rtol=0)
    expected = t5.generate(int8, ids, mask, max_new_tokens=4).tokens
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(t5.generate(int8, ids, mask, max_new_tokens=4).tokens, expected)
    finally:
        torch.set_default_dtype(default)
    with pytest.raises(ValueError, match="pass the model itself, and compile=True to compile the decode step"):
        t5.generate(torch.compile(model), ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        t5.load(HERE / "demo", dtype=torch.float64)


def test_flex_under_torch_compile_on_cpu() -> None:
    """Inductor cannot lower flex's score_mod inside a larger compiled graph on CPU (torch 2.13):
    generate(compile=True) refuses with a clear message before any work, and torch.compile of a
    flex encoder runs (flex breaks the graph and runs its own compiled kernel) with the same output."""
    config = dataclasses.replace(tiny_config("t5-v1.1"), num_encoder_layers=1, num_decoder_layers=1)
    model = t5.set_attention(t5.T5(config).eval(), "flex")
    train.init_weights(model, torch.Generator().manual_seed(0))
    ids, mask = padded_batch(config.vocab_size, [7, 4], seed=2)
    with pytest.raises(ValueError, match="cannot run inside torch.compile on CPU"):
        t5.generate(model, ids, mask, max_new_tokens=2, compile=True)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model.encoder)
        torch.testing.assert_close(compiled(ids, mask), model.encoder(ids, mask), atol=1e-6, rtol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_ffn_slices_equal_one_pass(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gated FFN's float32 product taken over sequence slices (what large batches do) is
    exactly the one-pass product."""
    config = dataclasses.replace(tiny_config("t5-v1.1"), d_ff=40)
    torch.manual_seed(0)
    ffn = t5.GegluFFN(config).to(dtype).eval()
    x = torch.randn(3, 17, config.d_model).to(dtype)
    with torch.no_grad():
        whole = ffn(x)
        monkeypatch.setattr(t5, "FFN_SLICE", 3 * 40 * 4)  # 4 positions per slice: 5 slices
        assert torch.equal(ffn(x), whole)


def test_attention_choice_errors(family: Family) -> None:
    with pytest.raises(ValueError, match="attention must be 'sdpa' or 'flex'"):
        t5.load(family.ours_dir, attention="xformers")
    model = t5.load(family.ours_dir, attention="flex").train()
    model.encoder.layers[0].attn.dropout = 0.1
    ids, mask = padded_batch(family.vocab, [5, 3])
    with pytest.raises(ValueError, match="FlexAttention has no attention dropout"):
        model.encoder(ids, mask)
    model.encoder.layers[0].attn.dropout = 0.0
    with pytest.raises(ValueError, match=r"no backward on CPU .* under torch.no_grad\(\)"):  # torch 2.13's
        model.encoder(ids, mask)


def test_relative_position_buckets_equal_transformers() -> None:
    """Every bucket of distances -5000..5000, both directions, at the hub's (32, 128) and odd sizes:
    t5.py's float32 operations, in their order, give transformers' buckets exactly."""
    distance = torch.arange(-5000, 5001)
    for buckets, max_distance in ((32, 128), (10, 13), (12, 20), (64, 256), (8, 16), (4, 8)):
        for bidirectional in (True, False):
            ours = t5.relative_position_bucket(distance, bidirectional=bidirectional, num_buckets=buckets,
                                               max_distance=max_distance)
            theirs = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                distance, bidirectional=bidirectional, num_buckets=buckets, max_distance=max_distance)
            assert torch.equal(ours, theirs), (buckets, max_distance, bidirectional)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_invariance(device: str, tmp_path: Path) -> None:
    """A prompt's encoder output at its real tokens does not depend on how much padding follows it
    or on what else is in the batch (the guarantee text-to-image users rely on)."""
    fam = Family(tmp_path, "t5-v1.1")
    ours = t5.load(fam.ours_dir, encoder_only=True, device=device)
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(2, fam.vocab, (1, 19), generator=g).to(device)
    with torch.no_grad():
        alone = ours(prompt)
        for width in (77, 128, 512):
            ids = torch.zeros(1, width, dtype=torch.long, device=device)
            ids[:, :19] = prompt
            mask = (torch.arange(width, device=device) < 19)[None]
            out = ours(ids, mask)
            torch.testing.assert_close(out[:, :19], alone, atol=1e-5, rtol=0)
            assert (out[:, 19:] == 0).all()
        others = torch.randint(2, fam.vocab, (3, 64), generator=g).to(device)
        ids = torch.cat([torch.nn.functional.pad(prompt, (0, 64 - 19)), others])
        mask = torch.ones_like(ids)
        mask[0, 19:] = 0
        torch.testing.assert_close(ours(ids, mask)[:1, :19], alone, atol=1e-5, rtol=0)


########################################################################################
# Loading and saving
########################################################################################


def test_encoder_only_load_reads_no_decoder_tensor(family: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    read: list[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.f = real_open(*args, **kwargs)

        def __enter__(self) -> Spy:
            self.f.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.f.keys()

        def get_tensor(self, key: str) -> torch.Tensor:
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    encoder = t5.load(family.ours_dir, encoder_only=True)
    assert isinstance(encoder, t5.T5Encoder)
    assert read and all(key.startswith("encoder.") for key in read)
    assert len(read) == len(encoder.state_dict())


def test_load_dtype_and_eval(family: Family) -> None:
    model = t5.load(family.ours_dir, dtype=torch.bfloat16)
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_load_errors(family: Family, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="convert_hf.py"):
        t5.load(tmp_path)
    # a tensor missing from the file
    broken = tmp_path / "missing"
    broken.mkdir()
    (broken / "config.json").write_text((family.ours_dir / "config.json").read_text())
    state = load_file(family.ours_dir / "model.safetensors")
    extra = dict(state, **{"decoder.stray.weight": torch.zeros(1)})
    del state["encoder.final_norm.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['encoder.final_norm.weight'\]"):
        t5.load(broken)
    # one tensor of another dtype: refused at load (it would fail at the first matmul), or cast with dtype=
    state["encoder.final_norm.weight"] = torch.ones(family.hf.config.d_model, dtype=torch.float16)
    save_file(state, broken / "model.safetensors")
    for encoder_only in (False, True):
        with pytest.raises(ValueError, match="encoder.final_norm.weight is torch.float16, the embeddings torch.float32"):
            t5.load(broken, encoder_only=encoder_only)
    assert t5.load(broken, dtype=torch.float32).encoder.final_norm.weight.dtype == torch.float32
    # an unexpected tensor
    save_file(extra, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"unexpected tensors \['decoder.stray.weight'\]"):
        t5.load(broken)
    # an int8 weight without its scale (it would load as small integers), a scale beside a dense weight
    del extra["decoder.stray.weight"]
    extra["encoder.layers.0.ffn.wo.weight"] = torch.ones_like(extra["encoder.layers.0.ffn.wo.weight"], dtype=torch.int8)
    save_file(extra, broken / "model.safetensors")
    for dtype in (None, torch.float32):
        with pytest.raises(ValueError, match="ffn.wo.weight is torch.int8 without its scale .*ffn.wo.weight_scale"):
            t5.load(broken, dtype=dtype)
    extra["encoder.layers.0.ffn.wo.weight"] = state["encoder.layers.0.ffn.wo.weight"]
    extra["encoder.layers.0.ffn.wo.weight_scale"] = torch.ones(family.hf.config.d_model)
    save_file(extra, broken / "model.safetensors")
    with pytest.raises(ValueError, match="ffn.wo.weight_scale scales a weight of F32, not int8 or fp8"):
        t5.load(broken)
    # a config field we do not know
    config = json.loads((family.ours_dir / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, rotary=True)))
    with pytest.raises(ValueError, match=r"unknown T5Config fields \['rotary'\]"):
        t5.load(broken)


def test_config_roundtrip_and_validation(tmp_path: Path) -> None:
    config = t5.T5Config(vocab_size=384, num_encoder_layers=12, num_decoder_layers=4, ffn="gated-gelu",
                         num_buckets=16, max_distance=64, eps=1e-5)
    config.save(tmp_path / "config.json")
    assert t5.T5Config.load(tmp_path / "config.json") == config
    with pytest.raises(ValueError, match="ffn must be one of"):
        t5.T5Config(ffn="swiglu")
    with pytest.raises(ValueError, match="num_decoder_layers must be a positive int"):
        t5.T5Config(num_decoder_layers=0)
    with pytest.raises(ValueError, match="eos_token_id=500 is outside"):
        t5.T5Config(vocab_size=384, eos_token_id=500)
    # a hand-edited config.json of the wrong types: ValueError (what the CLI reports in one line), not TypeError
    for field, value, kind in [("eps", "1e-6", "float"), ("dropout", None, "float"), ("d_model", 512.0, "int"),
                               ("scale_qk", 1, "bool"), ("out_scales", [], "dict"), ("ffn", None, "str")]:
        (tmp_path / "config.json").write_text(json.dumps(dict(dataclasses.asdict(config), **{field: value})))
        with pytest.raises(ValueError, match=f"T5Config.{field} must be of type {kind}, got"):
            t5.T5Config.load(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"out_scales\['encoder.0.ffn'\] must be a power of two"):
        t5.T5Config(out_scales={"encoder.0.ffn": "0.5"})
    assert t5.T5Config(eps=1).eps == 1  # an int where a float is asked


def test_save_writes_what_load_reads(spiece_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """t5.save: a model (full or encoder-only) and its tokenizer come back identical from
    t5.load; other files in the folder stay; a file in the way, a failed write, a float64 model and
    a config made invalid after the fact leave things as they were; a save interrupted while renaming
    leaves no config.json (load refuses the folder), never new weights under the old config."""
    model = t5.load(HERE / "demo")
    tokenizer = t5.load_tokenizer(HERE / "demo")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    t5.save(model, folder, tokenizer)
    assert (folder / "notes.txt").read_text() == "mine"
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the umask's, like any file the user writes
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "spiece.model"]
    again = t5.load(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert t5.load_tokenizer(folder).encode("spell: 4071") == tokenizer.encode("spell: 4071")
    t5.save(t5.load(HERE / "demo", encoder_only=True), tmp_path / "enc")
    assert isinstance(t5.load(tmp_path / "enc", encoder_only=True), t5.T5Encoder)
    with pytest.raises(FileExistsError, match="not a folder"):
        t5.save(model, folder / "notes.txt")
    with torch.device("meta"):  # a tokenizer larger than the model's vocabulary: nothing written
        small = t5.T5(dataclasses.replace(model.config, vocab_size=50, extra_ids=0))
    with pytest.raises(ValueError, match="the tokenizer \\(64 pieces \\+ 0 sentinels\\) does not fit .* of 50"):
        t5.save(small, tmp_path / "small", tokenizer)
    assert not (tmp_path / "small").exists()
    older = json.loads((folder / "config.json").read_text())
    del older["dropout"]  # a folder saved by an earlier version (a field fewer) is still ours to replace
    (folder / "config.json").write_text(json.dumps(older))
    t5.save(model, folder, tokenizer)
    assert t5.T5Config.load(folder / "config.json") == model.config
    hf_folder = tmp_path / "hf"  # a transformers folder: its config.json and weights stay
    transformers.T5Config(vocab_size=100).save_pretrained(hf_folder)
    with pytest.raises(FileExistsError, match="config.json is not ours"):
        t5.save(model, hf_folder)
    assert sorted(p.name for p in hf_folder.iterdir()) == ["config.json"]
    before = (folder / "model.safetensors").read_bytes()
    with monkeypatch.context() as patch:  # saving the config fails after the weights were staged
        patch.setattr(t5.T5Config, "save", lambda self, path: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            t5.save(model, folder)
        with pytest.raises(OSError, match="disk full"):  # a failed save into a folder it would make leaves no folder
            t5.save(model, tmp_path / "new" / "ckpt")
    assert not (tmp_path / "new").exists()  # nor the folder above it, which it made too
    with pytest.raises(ValueError, match="cannot store torch.float64 tensors"):
        t5.save(t5.load(HERE / "demo").double(), folder)
    invalid = t5.load(HERE / "demo")
    invalid.config.out_scales["encoder.0.ffn"] = 0.3
    with pytest.raises(ValueError, match="must be a power of two"):
        t5.save(invalid, folder)
    assert (folder / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "notes.txt", "spiece.model"]
    renamed, replace = [], Path.replace
    def interrupted(self: Path, target: Path) -> Path:
        if renamed:
            raise KeyboardInterrupt
        renamed.append(target)
        return replace(self, target)
    with monkeypatch.context() as patch:
        patch.setattr(Path, "replace", interrupted)
        with pytest.raises(KeyboardInterrupt):
            t5.save(t5.quantize(t5.load(HERE / "demo")), folder, tokenizer)
    assert renamed == [folder / "model.safetensors"]
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        t5.load(folder)
    t5.save(model, folder, tokenizer)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), t5.load(folder).state_dict().values()))
    # torch.compile's wrapper saves the model it wraps; tied embeddings are saved as two equal tables
    t5.save(torch.compile(t5.load(HERE / "demo", encoder_only=True)), tmp_path / "compiled")
    assert isinstance(t5.load(tmp_path / "compiled", encoder_only=True), t5.T5Encoder)
    model.decoder.embedding.weight = model.encoder.embedding.weight
    t5.save(model, tmp_path / "tied")
    again = t5.load(tmp_path / "tied")
    assert torch.equal(again.decoder.embedding.weight, model.encoder.embedding.weight)
    assert again.decoder.embedding.weight.data_ptr() != again.encoder.embedding.weight.data_ptr()


########################################################################################
# Bad input
########################################################################################


def test_bad_input_errors(family: Family) -> None:
    model = t5.load(family.ours_dir)
    ids, mask = padded_batch(family.vocab, [6, 4])
    dec = ids[:, :3]
    with pytest.raises(ValueError, match=r"input_mask must have shape \(batch, seq\) = \(2, 6\) or \(batch, q, k\) = \(2, 6, 6\), got \(2, 5\)"):
        model.encoder(ids, mask[:, :5])
    with pytest.raises(ValueError, match=r"got \(1, 6\)"):
        model.encoder(ids, mask[:1])  # would broadcast silently
    with pytest.raises(ValueError, match="must be bool or integer"):
        model.encoder(ids, mask.float())
    with pytest.raises(ValueError, match=f"token id {family.vocab}, outside \\[0, {family.vocab}\\)"):
        model.encoder(ids.masked_fill(mask == 0, family.vocab), mask)
    with pytest.raises(ValueError, match="token id -1"):
        model(ids, dec.clamp(max=0) - 1)
    with pytest.raises(ValueError, match="must be a \\(batch, seq\\) int64 or int32 tensor"):
        model.encoder(ids.float())
    with pytest.raises(ValueError, match="must be a \\(batch, seq\\) int64 or int32 tensor"):
        model.encoder(ids[0])
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.bool):  # the embedding takes int64 and int32 only
        with pytest.raises(ValueError, match=f"int64 or int32 tensor, got {dtype}"):
            model.encoder(ids.to(dtype))
    assert torch.equal(model.encoder(ids.int(), mask), model.encoder(ids, mask))
    with pytest.raises(ValueError, match="decoder_input_ids has 4 rows, input_ids 2"):  # one target per input
        model(ids, dec.repeat(2, 1))
    with pytest.raises(ValueError, match=r"decoder_mask must have shape .* got \(2, 4\)"):
        model(ids, dec, input_mask=mask, decoder_mask=mask[:, :4])
    with pytest.raises(ValueError, match="needs an explicit cross_mask"):
        model(ids, dec, input_mask=mask[:, None, :].expand(2, 6, 6))
    with pytest.raises(ValueError, match=r"labels must have the decoder's shape \(2, 3\)"):
        model(ids, dec, labels=ids)


def test_python_api_mistakes() -> None:
    tokenizer = t5.load_tokenizer(HERE / "demo")
    with pytest.raises(ValueError, match="non-empty list of texts"):
        tokenizer.encode_batch([])
    with pytest.raises(ValueError, match="non-empty list of texts"):
        tokenizer.encode_batch("spell: 1")
    with pytest.raises(ValueError, match="truncation needs max_length"):
        tokenizer.encode_batch(["x"], truncation=True)
    model = t5.load(HERE / "demo")
    ids, mask = tokenizer.encode_batch(["spell: 12"])
    with pytest.raises(ValueError, match="num_return_sequences=3 beams asked of num_beams=2"):
        t5.generate(model, ids, mask, max_new_tokens=4, num_beams=2, num_return_sequences=3)
    # greedy decoding has one answer per input: transformers refuses, and so do we
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        t5.generate(model, ids, mask, max_new_tokens=4, num_return_sequences=2)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=8,
                                                                       num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="num_return_sequences"):
        hf.generate(ids[:, :5] % 40, max_new_tokens=4, num_return_sequences=2)
    assert t5.generate(model, ids, mask, max_new_tokens=4, num_return_sequences=2, do_sample=True).tokens.shape[0] == 2
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16, got 'bfloat16'"):
        t5.load(HERE / "demo", dtype="bfloat16")  # was torch's "Invalid device string: 'bfloat16'"
    if not torch.cuda.is_available():  # was torch's "pin_memory=True requires a CUDA or other accelerator"
        with pytest.raises(ValueError, match="device cuda:0: CUDA is not available on this machine"):
            t5.load(HERE / "demo", device="cuda:0")
    assert t5.load(HERE / "demo", device="cpu:0").lm_head.weight.device.type == "cpu"  # safetensors refused "cpu:0"


########################################################################################
# Tokenizers
########################################################################################


TOKENIZER_TEXTS = ["hello world", "", "  hello   world  ", "kato rimo <extra_id_0> ne", "<extra_id_0>",
                   "a<extra_id_1>b", "hello <extra_id_0> world <extra_id_99>", "東京 😀 straße", "\tfox\n dog",
                   "x  <extra_id_3>  y", "unknown ZZZ ü", "ｆｕｌｌ width ①", "<extra_id_100> is plain text here",
                   "  ", "\n\n"]


def test_sentencepiece_tokenizer_matches_hf(spiece_folder: Path) -> None:
    """Our ids equal transformers' T5Tokenizer (legacy=False) on sentinels, unicode, the empty
    string and whitespace runs; sentinels count down from the end of the vocabulary."""
    hf = transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False)
    config = t5.T5Config(vocab_size=300)
    ours = t5.load_tokenizer(spiece_folder, config)
    assert ours.sentinel(0) == 299 and ours.sentinel(99) == 200
    assert hf.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [299, 200]
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True), text
    assert ours.encode("hello", eos=False) == hf("hello", add_special_tokens=False).input_ids
    space, fox = hf.convert_tokens_to_ids("\u2581"), ours.encode("fox", eos=False)  # a lone word-boundary piece
    for ids in ([space, 299, *fox], [space, 1, *fox], [298, space, 299, *fox]):  # then a skipped special: " fox"
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == " fox", ids
    # what a sampled model may emit: lone word-boundary pieces, specials and sentinels anywhere (sentencepiece
    # drops every mark before a text's first character, transformers only the first; 114 of 6,000 differed)
    rng = random.Random(0)
    pool = [space] * 6 + list(range(3, 200)) + [0, 1, 2, 299, 298, 250]
    for ids in ([rng.choice(pool) for _ in range(rng.randint(1, 6))] for _ in range(1000)):
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (ids, skip)
    ids = ours.encode("hello <extra_id_0> world")
    assert ours.decode(ids, skip_special_tokens=False) == "hello<extra_id_0> world</s>"
    batch, mask = ours.encode_batch(["hello world", "", "fox"])
    assert batch.shape == mask.shape == (3, 3)
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert batch[1].tolist() == [1, 0, 0]


def test_ids_past_the_tokenizer_decode_to_nothing(spiece_folder: Path) -> None:
    """A model's vocabulary can be larger than its tokenizer's (T5: 32128 logits for 32100 ids),
    and a sampled model can emit the extra ids: they decode to nothing, as in transformers."""
    hf = transformers.T5TokenizerFast.from_pretrained(spiece_folder, legacy=False)
    ours = t5.load_tokenizer(spiece_folder, t5.T5Config(vocab_size=320))
    ids = ours.encode("hello world", eos=False)
    mixed = [310, *ids[:1], 300, 319, *ids[1:], 299, 311, 1]
    for skip in (True, False):
        assert ours.decode(mixed, skip_special_tokens=skip) == hf.decode(mixed, skip_special_tokens=skip), skip
    assert ours.decode([305, 306]) == ""


def test_byte_tokenizer_matches_hf_except_sentinel_numbering() -> None:
    """ByT5: bytes offset by 3, as in transformers' ByT5Tokenizer. The one documented difference:
    we number sentinels down from the end of the vocabulary (<extra_id_0> = 383), as T5's span
    corruption did in pre-training; ByT5Tokenizer numbers them up from 259."""
    hf = transformers.ByT5Tokenizer()
    config = t5.T5Config(vocab_size=384, tokenizer="bytes", extra_ids=125)
    ours = t5.load_tokenizer(Path("unused"), config)
    for text in TOKENIZER_TEXTS:
        if "<extra_id_" in text:  # sentinels: the documented difference, checked below
            continue
        assert ours.encode(text) == hf(text).input_ids, text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True), text
    assert ours.encode("a<extra_id_0>b") == [100, 383, 101, 1]
    assert hf("a<extra_id_0>b").input_ids == [100, 259, 101, 1]
    assert ours.decode([100, 383, 101, 1], skip_special_tokens=False) == "a<extra_id_0>b</s>"
    # generated bytes with pad, EOS or unknown inside a character: skipped first, as ByT5Tokenizer does
    split = [b + 3 for b in "é東".encode()]
    for ids in ([split[0], 1, *split[1:]], [*split[:3], 0, 2, *split[3:], 1], [split[0], 383, *split[1:]]):
        assert ours.decode(ids) == "é東" and hf.decode(ids, skip_special_tokens=True) == "é東", ids
        assert ours.decode(ids, skip_special_tokens=False).replace("<extra_id_0>", "") == \
            hf.decode(ids, skip_special_tokens=False).replace("<extra_id_124>", ""), ids


def test_decode_cleans_up_spaces_where_the_folder_says(spiece_folder: Path, tmp_path: Path) -> None:
    """A tokenizer_config.json with "clean_up_tokenization_spaces": true (transformers 4 wrote it into
    the T5 folders it saved until 4.45) makes transformers' decode drop the spaces before punctuation
    and contractions; ours reads the same file, sentencepiece and ByT5. Without it (transformers 5's
    default) both keep them."""
    import sentencepiece

    text = "hello , world . it 's do n't ! you 're a ' b ? we 've i 'm"
    (tmp_path / "corpus.txt").write_text("\n".join([text] * 50))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spiece"), vocab_size=28, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2)
    for clean in (True, False):
        hf_folder, folder = tmp_path / f"hf-{clean}", tmp_path / f"ours-{clean}"
        transformers.T5Tokenizer.from_pretrained(tmp_path, legacy=False, extra_ids=10,
                                                 clean_up_tokenization_spaces=clean).save_pretrained(hf_folder)
        transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=38, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2)).save_pretrained(hf_folder)
        assert convert_hf.main([str(hf_folder), str(folder)]) == 0  # keeps tokenizer_config.json
        hf = transformers.AutoTokenizer.from_pretrained(hf_folder)
        ours = t5.load_tokenizer(folder)
        ids = hf(text).input_ids
        assert ours.encode(text) == ids and 2 not in ids  # every character is a piece
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (clean, skip)
        assert (ours.decode(ids) == "hello, world. it's don't! you're a'b? we've i'm") is clean
        # after fine-tuning: t5.save into a new folder keeps the flag, and so does --to-hf
        t5.save(t5.load(folder), tmp_path / f"saved-{clean}", ours)
        assert t5.load_tokenizer(tmp_path / f"saved-{clean}").decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert convert_hf.main(["--to-hf", str(tmp_path / f"saved-{clean}"), str(tmp_path / f"back-{clean}")]) == 0
        back = transformers.AutoTokenizer.from_pretrained(tmp_path / f"back-{clean}")
        assert back.decode(ids, skip_special_tokens=True) == ours.decode(ids) and back(text).input_ids == ids, clean
        assert back("it 's <extra_id_3>").input_ids == ours.encode("it 's <extra_id_3>"), clean  # its sentinels
        # cli.py's streamed line: the clean-up rewrites text already decoded (" '" then "'s"): held back
        for answer in (ids, hf("we do n ' t").input_ids):  # " n ' t" -> "n't": two rewrites in a row
            with mock.patch.object(t5, "stream", lambda *args, **kwargs: iter(torch.tensor([[i] for i in answer]))):
                result = run_cli("generate", "--ckpt", str(folder), "x")
            assert result.returncode == 0 and result.stdout == hf.decode(answer, skip_special_tokens=True) + "\n"
        t5.save(t5.load(folder), folder, ours)  # into its own folder: transformers' fields stay beside the flag
        assert json.loads((folder / "tokenizer_config.json").read_text())["extra_ids"] == 10
        assert t5.load_tokenizer(folder).clean_up_spaces is clean
        # saved beside another tokenizer's tokenizer.json (kept, not exported): the export keeps the flag
        transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False).save_pretrained(tmp_path / f"f-{clean}")
        t5.save(t5.load(folder), tmp_path / f"f-{clean}", ours)
        assert convert_hf.main(["--to-hf", str(tmp_path / f"f-{clean}"), str(tmp_path / f"f-{clean}-hf")]) == 0
        foreign = transformers.AutoTokenizer.from_pretrained(tmp_path / f"f-{clean}-hf")
        assert foreign.decode(ids, skip_special_tokens=True) == ours.decode(ids), clean
        ours.clean_up_spaces = not clean  # turned the other way and saved into the same folder: read back so
        t5.save(t5.load(folder), folder, ours)
        assert t5.load_tokenizer(folder).clean_up_spaces is (not clean)
        byt5_folder = tmp_path / f"byt5-{clean}"
        transformers.ByT5Tokenizer(clean_up_tokenization_spaces=clean).save_pretrained(byt5_folder)
        byt5 = transformers.AutoTokenizer.from_pretrained(byt5_folder)
        ours = t5.load_tokenizer(byt5_folder, t5.T5Config(vocab_size=384, tokenizer="bytes", extra_ids=125))
        ids = byt5(text).input_ids
        assert ours.encode(text) == ids and ours.decode(ids) == byt5.decode(ids, skip_special_tokens=True), clean


def test_tokenizer_errors(spiece_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no spiece.model"):
        t5.load_tokenizer(tmp_path, t5.T5Config())
    with pytest.raises(ValueError, match="200 pieces \\+ 100 sentinels do not fit"):
        t5.load_tokenizer(spiece_folder, t5.T5Config(vocab_size=250))
    with pytest.raises(ValueError, match="<extra_id_100> does not exist"):
        t5.load_tokenizer(spiece_folder, t5.T5Config(vocab_size=300)).sentinel(100)


def test_encode_batch_equals_t5_tokenizer_fast(spiece_folder: Path, tmp_path: Path) -> None:
    """padding="max_length", max_length and truncation as transformers' fast tokenizer does them,
    on mixed lengths, rows longer than max_length included (EOS stays last)."""
    transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False).save_pretrained(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert isinstance(hf, transformers.T5TokenizerFast)
    ours = t5.load_tokenizer(spiece_folder, t5.T5Config(vocab_size=300))
    texts = ["hello world", "", "kato rimo ne su la pe qu ix hello world the fox <extra_id_0> mo", "fox  the"]
    for max_length in (1, 3, 8, 40):
        for padding in ("longest", "max_length"):
            ids, mask = ours.encode_batch(texts, max_length=max_length, padding=padding, truncation=True)
            ref = hf(texts, max_length=max_length, padding=padding, truncation=True, return_tensors="pt")
            assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask), (max_length, padding)
    # no truncation and a row past max_length: transformers cannot make one tensor; we pad to that row
    ids, mask = ours.encode_batch(texts, max_length=8, padding="max_length")
    assert ids.shape[1] == max(len(row) for row in hf(texts).input_ids) > 8
    assert [row[row != 0].tolist() for row in ids * mask] == [[i for i in row if i] for row in hf(texts).input_ids]


SPECIAL_TEXTS = ["hello </s> world", "<pad>x<unk>", "a </s>b", "a</s>b", "hello  </s>  world", " <pad> ", "x <unk>",
                 "\t</s>\n fox", "</s></s> <pad><extra_id_1> <unk>", "< /s>", "<s>", "<extra_id_05>", "<extra_id_0 >",
                 "x<extra_id_1> </s> y", "<extra_id_007> hello", "<PAD> </S>",
                 "<extra_id_1\u0660>", "a<extra_id_\u0967>", "end </s>", "</s>"]  # Arabic-Indic 0, Devanagari 1: not sentinels


def test_literal_special_tokens_encode_as_transformers(spiece_folder: Path, tmp_path: Path) -> None:
    """</s>, <pad>, <unk> written in text are their ids, as transformers' T5TokenizerFast and
    ByT5Tokenizer give them (ByT5's eat the whitespace around them); "<extra_id_05>" is plain text."""
    transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False).save_pretrained(tmp_path / "tok")
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert isinstance(fast, transformers.T5TokenizerFast)
    ours = t5.load_tokenizer(spiece_folder, t5.T5Config(vocab_size=300))
    for text in SPECIAL_TEXTS:
        assert ours.encode(text) == fast(text).input_ids, text
    assert ours.encode("a </s>b", eos=False)[-3:-1] == [1, ours.encode("b", eos=False)[0]]
    byt5 = transformers.ByT5Tokenizer()
    ours = t5.load_tokenizer(Path("unused"), t5.T5Config(vocab_size=384, tokenizer="bytes", extra_ids=125))
    for text in SPECIAL_TEXTS:
        if re.search(r"<extra_id_[1-9][0-9]*>|<extra_id_0>", text):  # sentinel numbering: the documented difference
            continue
        assert ours.encode(text, eos=False) == byt5(text, add_special_tokens=False).input_ids, text
        assert ours.encode(text) == byt5(text).input_ids, text  # "</s>" at the end: no second EOS
    assert ours.encode("hello </s> world", eos=False) == [107, 104, 111, 111, 114, 1, 122, 114, 117, 111, 103]


########################################################################################
# Converter: hub and transformers 5 folders, single files, fp8, diffusers, --to-hf
########################################################################################


def test_convert_cli_subprocess(family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    """The script runs as a command with the runtime requirements (it never imports transformers).
    For t5-v1.1, `python convert_hf.py SRC OUT` runs as a real process, transformers hidden from
    it: what only a process shows, the script's entry point and its module-level imports, does not
    depend on the family, and a process costs about 4 s of `import torch`. The other families run
    the same argv through its main in this process, transformers unimportable meanwhile, which
    still fails on an import of transformers on any family's path."""
    out = tmp_path / "out"
    argv = [str(family.hf_dir), str(out), "--dtype", "bfloat16"]
    if family.name == "t5-v1.1":
        code = ("import sys, runpy; sys.modules['transformers'] = None; sys.argv = ['convert_hf.py'] + sys.argv[1:]; "
                "runpy.run_path('convert_hf.py', run_name='__main__')")
        result = subprocess.run([sys.executable, "-c", code, *argv], cwd=HERE, capture_output=True, text=True)
    else:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, "transformers", None)
            status = convert_hf.main(argv)
        captured = capsys.readouterr()
        result = subprocess.CompletedProcess(argv, status, captured.out, captured.err)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    state = load_file(out / "model.safetensors")
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    reference = load_file(family.ours_dir / "model.safetensors")
    assert state.keys() == reference.keys()
    for key in state:
        assert torch.equal(state[key], reference[key].to(torch.bfloat16)), key


def test_convert_state_dict_matches_cli(family: Family) -> None:
    config, state = convert_hf.convert_state_dict(json.loads((family.hf_dir / "config.json").read_text()),
                                                  load_file(family.hf_dir / "model.safetensors"))
    assert config == t5.T5Config.load(family.ours_dir / "config.json")
    written = load_file(family.ours_dir / "model.safetensors")
    assert state.keys() == written.keys()
    assert all(torch.equal(state[k], written[k]) for k in state)


def test_convert_v10_folds_output_scale(tmp_path: Path) -> None:
    """T5 v1.0: lm_head is the shared embedding times d_model**-0.5, stored as its own tensor."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.0")
    _, state = convert_hf.convert_state_dict(json.loads((hf_dir / "config.json").read_text()),
                                             load_file(hf_dir / "model.safetensors"))
    shared = load_file(hf_dir / "model.safetensors")["shared.weight"]
    torch.testing.assert_close(state["lm_head.weight"], shared * 32**-0.5)
    # both embeddings come from shared.weight, as separate tensors: nothing is tied after conversion
    assert torch.equal(state["encoder.embedding.weight"], shared) and torch.equal(state["decoder.embedding.weight"], shared)
    pointers = {state[k].untyped_storage().data_ptr() for k in ("encoder.embedding.weight", "decoder.embedding.weight",
                                                                 "lm_head.weight")}
    assert len(pointers) == 3


def test_convert_sharded_and_bin(family: Family, tmp_path: Path) -> None:
    """A sharded safetensors checkpoint and a pytorch_model.bin (also in torch's pre-1.6 format)
    convert to the same tensors."""
    full = load_file(family.hf_dir / "model.safetensors")
    reference = load_file(family.ours_dir / "model.safetensors")
    keys = sorted(full)
    for kind in ("sharded", "bin", "legacy-bin"):  # legacy: torch's format before 1.6, not a zip
        src = tmp_path / kind
        src.mkdir()
        (src / "config.json").write_text((family.hf_dir / "config.json").read_text())
        if kind == "sharded":
            halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
            for name, part in halves.items():
                save_file({k: full[k] for k in part}, src / name, metadata={"format": "pt"})
            index = {"metadata": {}, "weight_map": {k: n for n, part in halves.items() for k in part}}
            (src / "model.safetensors.index.json").write_text(json.dumps(index))
        else:
            torch.save(full, src / "pytorch_model.bin", _use_new_zipfile_serialization=kind == "bin")
        (src / "tokenizer_config.json").write_text('{"tokenizer_class": "%s"}' % (
            "ByT5Tokenizer" if family.name == "byt5" else "T5Tokenizer"))
        out = tmp_path / f"{kind}-out"
        assert convert_hf.main([str(src), str(out)]) == 0
        state = load_file(out / "model.safetensors")
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in state)
        assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    for weight_map in ([], {keys[0]: None}):  # a malformed index: one line (exit 2), not a traceback
        (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        assert convert_hf.main([str(tmp_path / "sharded"), str(tmp_path / "bad")]) == 2
        assert not (tmp_path / "bad").exists()


def test_convert_encoder_only(family: Family, tmp_path: Path) -> None:
    """--encoder-only keeps the encoder; a T5EncoderModel checkpoint converts encoder-only by
    itself; the full loader then says what to do."""
    out = tmp_path / "enc"
    assert convert_hf.main([str(family.hf_dir), str(out), "--encoder-only"]) == 0
    state = load_file(out / "model.safetensors")
    assert state and all(k.startswith("encoder.") for k in state)
    with pytest.raises(ValueError, match="encoder_only=True"):
        t5.load(out)
    encoder = t5.load(out, encoder_only=True)
    ids, mask = padded_batch(family.vocab, [9, 5])
    with torch.no_grad():
        torch.testing.assert_close(encoder(ids, mask), t5.load(family.ours_dir, encoder_only=True)(ids, mask))

    enc_cls = {"mt5": transformers.MT5EncoderModel, "umt5": transformers.UMT5EncoderModel}.get(
        family.name, transformers.T5EncoderModel)
    hf_enc = tmp_path / "hf-enc"
    enc_cls.from_pretrained(family.hf_dir).save_pretrained(hf_enc)
    out2 = tmp_path / "enc2"
    assert convert_hf.main([str(hf_enc), str(out2)]) == 0
    with torch.no_grad():
        torch.testing.assert_close(t5.load(out2, encoder_only=True)(ids, mask), encoder(ids, mask))


def test_encoder_only_outputs_name_only_the_encoder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """convert_hf.py's summary line and `cli.py flops` (their mains, in this process) on an
    encoder-only checkpoint name no decoder."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    assert convert_hf.main([str(hf_dir), str(tmp_path / "full")]) == 0
    capsys.readouterr()
    assert convert_hf.main([str(hf_dir), str(tmp_path / "enc"), "--encoder-only"]) == 0
    out = capsys.readouterr().out
    assert "(3 encoder layers, d_model 32" in out and "decoder" not in out, out
    assert cli.main(["flops", "--ckpt", str(tmp_path / "enc")]) == 0
    out = capsys.readouterr().out
    assert "encoder forward" in out and "decoder" not in out, out
    assert cli.main(["flops", "--ckpt", str(tmp_path / "full")]) == 0
    assert "one cached decode step" in capsys.readouterr().out


def saved_by_transformers(folder: Path, family: str, form: str) -> Path:
    """A family's folder as transformers 5 writes it: `fresh` is a new model's save_pretrained
    (tied, "tie_word_embeddings": true); `resaved` is a hub-style folder loaded and saved again
    (what every fine-tune produces: own lm_head, config rewritten by transformers 5)."""
    config_cls, kwargs, _ = FAMILIES[family]
    model_cls = HF_MODELS[config_cls]
    if form == "fresh":
        torch.manual_seed(5)
        model_cls(config_cls(**kwargs)).save_pretrained(folder)
    else:
        hub = build_hf_checkpoint(folder.parent / f"{folder.name}-hub", family, seed=5)
        model_cls.from_pretrained(hub).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("form", ["fresh", "resaved"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_convert_folders_saved_by_transformers_5(name: str, form: str, tmp_path: Path) -> None:
    """Every family converts right as save_pretrained writes it today, not only as the hub ships
    it: transformers 5 never scales mT5's decoder output, whatever tie_word_embeddings says, and
    a v1.0 config with scale_decoder_outputs still scales. Reference: from_pretrained of the folder."""
    hf_dir = saved_by_transformers(tmp_path / "hf", name, form)
    written = json.loads((hf_dir / "config.json").read_text())
    assert written["tie_word_embeddings"] is True  # what makes this form a trap
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    hf = HF_MODELS[FAMILIES[name][0]].from_pretrained(hf_dir).eval()
    ours = t5.load(tmp_path / "ours")
    ids, mask = padded_batch(FAMILIES[name][1]["vocab_size"], [9, 5], seed=4)
    dec, dec_mask = padded_batch(FAMILIES[name][1]["vocab_size"], [6, 3], seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        assert_close_where(ours(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits, ref, dec_mask, ATOL)


def test_output_scale_rule_per_model_type() -> None:
    """The rule itself, for the configs the hub and transformers 5 write."""
    rule = convert_hf.scales_decoder_output
    assert rule("t5", {"tie_word_embeddings": True}) and not rule("t5", {"tie_word_embeddings": False})
    assert rule("t5", {}) and not rule("t5", {"tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert not rule("umt5", {"tie_word_embeddings": True, "scale_decoder_outputs": False})
    assert not rule("mt5", {"tie_word_embeddings": True}) and not rule("mt5", {"tie_word_embeddings": False})


def test_convert_byt5_folder_saved_by_transformers_5_keeps_its_sentinels(tmp_path: Path) -> None:
    """transformers 5 writes "extra_ids": 0 for ByT5 and keeps the 125 sentinels as added tokens."""
    hf_dir = saved_by_transformers(tmp_path / "hf", "byt5", "fresh")
    transformers.ByT5Tokenizer().save_pretrained(hf_dir)
    assert json.loads((hf_dir / "tokenizer_config.json").read_text())["extra_ids"] == 0  # what makes it a trap
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    config = t5.T5Config.load(tmp_path / "ours" / "config.json")
    assert config.tokenizer == "bytes" and config.extra_ids == 125
    tokenizer = t5.load_tokenizer(tmp_path / "ours")
    assert tokenizer.encode("a<extra_id_0>b<extra_id_124>") == [100, 383, 101, 259, 1]
    # the hub's google/byt5-* name the tokenizer class in config.json, not in tokenizer_config.json
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    hf_config = json.loads((hf_dir / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps(dict(hf_config, tokenizer_class="ByT5Tokenizer")))
    (hub / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 125, "eos_token": "</s>"}))
    assert transformers.AutoTokenizer.from_pretrained(hub).__class__.__name__ == "ByT5Tokenizer"
    assert convert_hf.main([str(hub), str(tmp_path / "ours-hub")]) == 0
    assert t5.T5Config.load(tmp_path / "ours-hub" / "config.json") == config
    assert t5.load_tokenizer(tmp_path / "ours-hub").encode("a<extra_id_0>b") == [100, 383, 101, 1]


def saved_tiny_t5(folder: Path, spiece_folder: Path, model_cls: type = transformers.T5ForConditionalGeneration,
                  config_cls: type = transformers.T5Config, **fields: object) -> torch.nn.Module:
    """A seeded tiny random transformers model with the 300-id test tokenizer, both saved into
    `folder` the way transformers 5 saves them (the tokenizer as tokenizer.json, no spiece.model)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**dict(vocab_size=300, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                                           decoder_start_token_id=0), **fields})).eval()
    model.save_pretrained(folder)
    transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False).save_pretrained(folder)
    return model


def test_save_with_another_tokenizer_drops_the_old_ones_files(spiece_folder: Path, tmp_path: Path) -> None:
    """A converted folder keeps transformers' tokenizer files beside spiece.model. t5.save with the same
    tokenizer keeps them; with another one (train.py's own, into a converted folder) they go, and
    --to-hf exports the new tokenizer (the old tokenizer.json was exported: other ids, wrong answers)."""
    saved_tiny_t5(tmp_path / "hf", spiece_folder)
    ours = tmp_path / "ours"
    assert convert_hf.main([str(tmp_path / "hf"), str(ours)]) == 0
    model, files = t5.load(ours), sorted(p.name for p in ours.iterdir())
    assert "tokenizer.json" in files
    t5.save(model, ours, t5.load_tokenizer(ours))
    assert sorted(p.name for p in ours.iterdir()) == files
    t5.save(model, ours, t5.load_tokenizer(HERE / "demo"))
    assert sorted(p.name for p in ours.iterdir()) == ["config.json", "model.safetensors", "spiece.model"]
    # a folder whose tokenizer is transformers' files alone: nothing to compare with, nothing removed
    transformers.T5Tokenizer.from_pretrained(HERE / "demo", legacy=False).save_pretrained(tmp_path / "tok")
    kept = sorted(p.name for p in (tmp_path / "tok").iterdir())
    t5.save(model, tmp_path / "tok", t5.load_tokenizer(HERE / "demo"))
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted(
        kept + ["config.json", "model.safetensors", "spiece.model"])
    # the same with another tokenizer's files there (kept): --to-hf exports spiece.model's, not theirs
    transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False).save_pretrained(tmp_path / "other")
    t5.save(model, tmp_path / "other", t5.load_tokenizer(HERE / "demo"))
    # a ByT5 folder's files (tokenizer_config.json says ByT5Tokenizer, no spiece.model): they go
    transformers.ByT5Tokenizer().save_pretrained(tmp_path / "byt5")
    t5.save(model, tmp_path / "byt5", t5.load_tokenizer(HERE / "demo"))
    assert sorted(p.name for p in (tmp_path / "byt5").iterdir()) == ["config.json", "model.safetensors", "spiece.model"]
    for folder in (ours, tmp_path / "tok", tmp_path / "other", tmp_path / "byt5"):
        assert convert_hf.main(["--to-hf", str(folder), str(tmp_path / f"{folder.name}-hf")]) == 0
        assert (tmp_path / f"{folder.name}-hf" / "tokenizer.json").exists() == (folder.name == "tok")
        hf = transformers.AutoTokenizer.from_pretrained(tmp_path / f"{folder.name}-hf")
        for text in ["spell: 4071", "kato rimo"]:
            assert hf(text).input_ids == t5.load_tokenizer(folder).encode(text), (folder.name, text)
    # and the other way: a byte tokenizer saved beside transformers' sentencepiece files (no spiece.model)
    transformers.T5Tokenizer.from_pretrained(HERE / "demo", legacy=False).save_pretrained(tmp_path / "to-bytes")
    byte_model = t5.T5(t5.T5Config(vocab_size=384, d_model=8, d_kv=4, d_ff=8, num_heads=2, num_encoder_layers=1,
                                   num_decoder_layers=1, tokenizer="bytes", extra_ids=125))
    t5.save(byte_model, tmp_path / "to-bytes", t5.load_tokenizer(Path("unused"), byte_model.config))
    assert sorted(p.name for p in (tmp_path / "to-bytes").iterdir()) == ["config.json", "model.safetensors"]


def test_convert_tokenizer_json_only_folder(spiece_folder: Path, tmp_path: Path) -> None:
    """transformers 5 saves a T5 tokenizer as tokenizer.json alone: the converter writes the
    equivalent spiece.model, whose ids (and decoded text) equal transformers' on every test text."""
    hf_dir = tmp_path / "hf"
    saved_tiny_t5(hf_dir, spiece_folder)
    assert not (hf_dir / "spiece.model").exists() and (hf_dir / "tokenizer.json").exists()
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    assert (tmp_path / "ours" / "spiece.model").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = t5.load_tokenizer(tmp_path / "ours")
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text) == hf(text).input_ids, text
        assert ours.decode(ours.encode(text)) == hf.decode(hf(text).input_ids, skip_special_tokens=True), text
    # the same pieces, scores and normalizer as the sentencepiece model it came from
    import sentencepiece

    made = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "ours" / "spiece.model"))
    original = sentencepiece.SentencePieceProcessor(model_file=str(spiece_folder / "spiece.model"))
    assert [(made.id_to_piece(i), made.get_score(i)) for i in range(made.get_piece_size())] == \
        [(original.id_to_piece(i), original.get_score(i)) for i in range(original.get_piece_size())]
    # --to-hf takes the tokenizer back: transformers reads it and gets the same ids
    assert convert_hf.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to-hf"]) == 0
    back = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert all(back(text).input_ids == hf(text).input_ids for text in TOKENIZER_TEXTS)
    # a tokenizer.json of another kind is refused by name
    other = json.loads((hf_dir / "tokenizer.json").read_text())
    other["model"] = {"type": "BPE", "vocab": {}, "merges": []}
    with pytest.raises(convert_hf.ConversionError, match="a 'BPE' tokenizer"):
        convert_hf.sentencepiece_from_tokenizer_json(other)


def test_convert_turns_byte_fallback_off_as_transformers_reads_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """mT5's and UMT5's sentencepiece models have byte fallback; transformers 5 reads them without it
    (its T5Tokenizer builds the Unigram model without, whatever the files say): a character the
    vocabulary lacks is <unk>, byte pieces decode as their names. Converted folders as the hub ships
    them (spiece.model and tokenizer.json), as transformers 4 wrote them (spiece.model alone) and with a
    tokenizer.json that says byte fallback: ours encodes and decodes as AutoTokenizer on each."""
    import sentencepiece

    words = ["".join(random.Random(i).choices(["ka", "to", "ri", "mo", "ne"], k=1 + i % 3)) for i in range(60)]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(words[(7 * i + j) % 60] for j in range(8)) for i in range(500)))
    (tmp_path / "sp").mkdir()
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp" / "spiece"), vocab_size=300, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    texts = ["kato ne, 東京 ☃!", "mo <0x41> ri", "ka\u00e9to", "", "ne ne <extra_id_3> ☃☃ to"]
    unknown_is_unk = {}
    for layout in ("hub", "spiece only", "tokenizer.json with byte fallback"):
        hf_dir = tmp_path / layout / "hf"
        saved_tiny_t5(hf_dir, tmp_path / "sp", vocab_size=400)
        (hf_dir / "spiece.model").write_bytes((tmp_path / "sp" / "spiece.model").read_bytes())
        if layout == "spiece only":
            (hf_dir / "tokenizer.json").unlink()
        if layout == "tokenizer.json with byte fallback":
            tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
            tokenizer["model"]["byte_fallback"] = True
            (hf_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
        capsys.readouterr()
        assert convert_hf.main([str(hf_dir), str(tmp_path / layout / "ours")]) == 0
        assert "byte fallback turned off" in capsys.readouterr().err
        hf = transformers.AutoTokenizer.from_pretrained(hf_dir)
        ours = t5.load_tokenizer(tmp_path / layout / "ours")
        assert [ours.encode(text) for text in texts] == [hf(text).input_ids for text in texts], layout
        pieces = list(range(3, 300)) + [2, 1, 297, 5]  # byte pieces <0x00>.. sit after the specials
        assert ours.decode(pieces) == hf.decode(pieces, skip_special_tokens=True), layout
        unknown_is_unk[layout] = ours.encode("東京")[1:-1] == [2]
    assert all(unknown_is_unk.values())
    assert sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp" / "spiece.model")).encode("東京") \
        != [2], "the test's model has byte fallback"


def test_to_hf_writes_the_tokenizer_json_a_umt5_needs(spiece_folder: Path, tmp_path: Path) -> None:
    """A UMT5 saved by `t5.save` (spiece.model only, as after fine-tuning) exports with a tokenizer.json:
    transformers 5's AutoTokenizer reads UMT5's from one only (T5's spiece.model it converts itself).
    Its ids equal the source's on every test text."""
    saved_tiny_t5(tmp_path / "hf", spiece_folder, transformers.UMT5ForConditionalGeneration, transformers.UMT5Config)
    assert convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    t5.save(t5.load(tmp_path / "ours"), tmp_path / "saved", t5.load_tokenizer(tmp_path / "ours"))
    assert not (tmp_path / "saved" / "tokenizer.json").exists()
    for path in (tmp_path / "saved").iterdir():  # read-only files: the copies are written as any new file
        path.chmod(0o444)
    assert convert_hf.main([str(tmp_path / "saved"), str(tmp_path / "back"), "--to-hf"]) == 0
    assert all(path.stat().st_mode & 0o200 for path in (tmp_path / "back").iterdir())
    hf, back = (transformers.AutoTokenizer.from_pretrained(tmp_path / name) for name in ("hf", "back"))
    assert all(back(text).input_ids == hf(text).input_ids for text in TOKENIZER_TEXTS)


def test_convert_refuses_tokens_added_to_the_tokenizer(spiece_folder: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """Tokens added with add_tokens are not in the sentencepiece model t5.py reads: refused by name
    (they used to be dropped silently). The same folder without them converts."""
    hf_dir = tmp_path / "hf"
    saved_tiny_t5(hf_dir, spiece_folder, vocab_size=302)
    assert convert_hf.main([str(hf_dir), str(tmp_path / "plain")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.add_tokens(["<new>", "zzq"]) == 2
    tokenizer.save_pretrained(hf_dir)
    capsys.readouterr()
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 2
    err = capsys.readouterr().err
    assert "2 added token(s) t5.py does not support: '<new>' (id 300), 'zzq' (id 301)" in err, err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ours").exists()


SHAPE_FLAGS = {  # what a single file's shapes cannot tell, for the families' non-default values
    "t5-v1.1": ["--max-distance", "13", "--eps", "1e-5"],
    "umt5": ["--max-distance", "20"],
}
PREFIX = "text_encoders.t5xxl.transformer."  # SD3-style single files


def single_file(family: Family, path: Path, *, prefix: str = "", encoder_only: bool = False,
                extra: dict[str, torch.Tensor] | None = None) -> Path:
    """The family's weights as diffusion tools ship them: one .safetensors file, transformers' key
    names (under a prefix), no config.json, beside other models' tensors."""
    state = load_file(family.hf_dir / "model.safetensors")
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    save_file({prefix + k: v for k, v in state.items()} | (extra or {}), path)
    return path


def test_float16_single_file_defaults_to_bfloat16(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A float16 source (t5xxl_fp16.safetensors) is stored in bfloat16 unless told otherwise: v1.1
    XL / XXL overflow float16 without calibration. --dtype float16 keeps it, --calibrate too."""
    state = load_file(build_hf_checkpoint(tmp_path / "hf", "t5-v1.1") / "model.safetensors")
    src = tmp_path / "t5xxl_fp16.safetensors"
    save_file({k: v.half() for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}, src)
    flags = SHAPE_FLAGS["t5-v1.1"]
    assert convert_hf.main([str(src), str(tmp_path / "default"), *flags]) == 0
    assert "is float16; storing bfloat16" in capsys.readouterr().err
    assert load_file(tmp_path / "default" / "model.safetensors")["encoder.embedding.weight"].dtype == torch.bfloat16
    assert convert_hf.main([str(src), str(tmp_path / "half"), "--dtype", "float16", *flags]) == 0
    assert "storing bfloat16" not in capsys.readouterr().err
    assert load_file(tmp_path / "half" / "model.safetensors")["encoder.embedding.weight"].dtype == torch.float16


def assert_same_checkpoint(a: Path, b: Path) -> None:
    assert t5.T5Config.load(a / "config.json") == t5.T5Config.load(b / "config.json")
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_convert_single_file(family: Family, tmp_path: Path) -> None:
    """A single file with no config converts to exactly what the folder converts to (the config
    read off the shapes, the rest from flags); the encoder matches transformers to 1e-5. v1.0's
    tied lm_head saved as a copy of shared.weight is still tied: scaled (it was 13 off)."""
    src = single_file(family, tmp_path / "t5.safetensors")
    flags = SHAPE_FLAGS.get(family.name, [])
    assert convert_hf.main([str(src), str(tmp_path / "ours"), *flags]) == 0
    assert_same_checkpoint(tmp_path / "ours", family.ours_dir)
    if not FAMILIES[family.name][2]:
        shared = load_file(family.hf_dir / "model.safetensors")["shared.weight"]
        src = single_file(family, tmp_path / "tied.safetensors", extra={"lm_head.weight": shared.clone()})
        assert convert_hf.main([str(src), str(tmp_path / "tied"), *flags]) == 0
        assert_same_checkpoint(tmp_path / "tied", family.ours_dir)
    encoder = t5.load(tmp_path / "ours", encoder_only=True)
    ids, mask = padded_batch(family.vocab, [19, 6])
    with torch.no_grad():
        assert_close_where(encoder(ids, mask), family.hf.get_encoder()(input_ids=ids, attention_mask=mask)
                           .last_hidden_state, mask, 1e-5)


def test_gated_single_file_without_lm_head_needs_the_scale_flag(tmp_path: Path) -> None:
    """transformers 5 saves a gated model built from a config without lm_head.weight, whether its config
    said tie_word_embeddings (logits scaled by d_model**-0.5) or not (v1.1's configs: unscaled): the file
    cannot tell. It was converted scaled (logits 4x too small for the untied one); now the flag is
    asked for, and either answer matches transformers."""
    ids = torch.tensor([[5, 6, 7, 8]])
    for tie in (False, True):
        torch.manual_seed(0)
        hf = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=128, d_model=16, d_kv=4, d_ff=8, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
            tie_word_embeddings=tie, decoder_start_token_id=0)).eval()
        hf.save_pretrained(tmp_path / f"hf-{tie}")
        src = tmp_path / f"hf-{tie}" / "model.safetensors"
        with pytest.raises(convert_hf.ConversionError, match="pass --scale-decoder-output yes or no"):
            convert_hf.convert(src, tmp_path / "never")
        out = tmp_path / f"ours-{tie}"
        assert convert_hf.main([str(src), str(out), "--scale-decoder-output", "yes" if tie else "no"]) == 0
        with torch.no_grad():
            torch.testing.assert_close(t5.load(out)(ids, ids).logits, hf(input_ids=ids, decoder_input_ids=ids).logits,
                                       atol=1e-5, rtol=0)
    assert not (tmp_path / "never").exists()


def test_convert_prefixed_encoder_only_file(family: Family, tmp_path: Path) -> None:
    """SD3-style: the encoder under a prefix, next to another model's tensors (ignored)."""
    other = {"text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 3)}
    src = single_file(family, tmp_path / "sd3.safetensors", prefix=PREFIX, encoder_only=True, extra=other)
    flags = SHAPE_FLAGS.get(family.name, [])
    assert convert_hf.main([str(src), str(tmp_path / "ours"), *flags]) == 0
    assert convert_hf.main([str(src), str(tmp_path / "ours2"), "--prefix", PREFIX, *flags]) == 0
    assert_same_checkpoint(tmp_path / "ours", tmp_path / "ours2")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    reference = load_file(family.ours_dir / "model.safetensors")
    assert ours.keys() == {k for k in reference if k.startswith("encoder.")}
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_convert_a_variant_folder(tmp_path: Path) -> None:
    """A folder saved with `save_pretrained(variant="fp16")`, as diffusers pipelines ship their text
    encoders (model.fp16.safetensors, or model.safetensors.index.fp16.json and its shards), converts as
    the plain folder does; two variants side by side are named, not guessed between; one shard passed
    alone is refused with its folder named (it said "missing tensors" or "no T5 tensors")."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    assert convert_hf.main([str(hf_dir), str(tmp_path / "plain")]) == 0
    model = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "single", variant="fp16")
    model.save_pretrained(tmp_path / "sharded", variant="fp16", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.fp16.json").is_file()
    for folder in ("single", "sharded"):
        assert convert_hf.main([str(tmp_path / folder), str(tmp_path / f"{folder}-ours")]) == 0
        assert_same_checkpoint(tmp_path / f"{folder}-ours", tmp_path / "plain")
    shard = sorted((tmp_path / "sharded").glob("*-of-*.safetensors"))[0]  # one shard alone: its folder, please
    with pytest.raises(convert_hf.ConversionError, match="is one shard of a sharded checkpoint: convert its folder"):
        convert_hf.convert(shard, tmp_path / "never")
    model.save_pretrained(tmp_path / "single", variant="bf16")
    with pytest.raises(convert_hf.ConversionError, match=r"weights in 2 variants \(model.bf16.safetensors, model.fp16"):
        convert_hf.convert(tmp_path / "single", tmp_path / "never")


def test_an_embedding_copy_that_differs_is_its_stacks_own(tmp_path: Path) -> None:
    """A checkpoint whose encoder.embed_tokens.weight differs from shared.weight (trained apart, or
    made so by a tool): the encoder reads its own copy, as transformers does ("will NOT tie them");
    before, the copy was dropped unread and the encoder embedded with shared.weight."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    state = load_file(hf_dir / "model.safetensors")
    state["encoder.embed_tokens.weight"] = state["shared.weight"] * 2
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    ours = t5.load(tmp_path / "ours")
    ids, mask = padded_batch(103, [9, 4])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, ids[:, :5], input_mask=mask).logits,
                                   hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits,
                                   atol=ATOL, rtol=0)
    # a single fp8-style encoder file with both copies, each with a scale_weight: the unused one's goes too
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder.", "lm_head."))}
    encoder["shared.weight"] = encoder["encoder.embed_tokens.weight"].clone()
    scales = {f"{k.removesuffix('weight')}scale_weight": torch.tensor(1.0) for k in ("shared.weight",
                                                                                     "encoder.embed_tokens.weight")}
    save_file(encoder | scales, tmp_path / "t5xxl.safetensors")
    assert convert_hf.main([str(tmp_path / "t5xxl.safetensors"), str(tmp_path / "single"), *SHAPE_FLAGS["t5-v1.1"]]) == 0
    with torch.no_grad():
        assert torch.equal(t5.load(tmp_path / "single", encoder_only=True)(ids, mask), ours.encoder(ids, mask))


def fp8_encoder_file(family: Family, path: Path, *, kind: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """An encoder file as diffusion tools ship fp8 T5s: every linear weight in float8_e4m3fn, cast as it
    is ("plain"), or divided by a per-tensor `scale_weight`, with a `scaled_fp8` marker ("scaled"); "norms
    too": scaled, and the norms' weights cast to float8_e4m3fn, as some all-in-one files ship them; "e5m2":
    scaled, in float8_e5m2; "dense wo": scaled, but the feed-forward's wo kept dense (transformers keeps
    it in float32), stored halved with a scale_weight of 2. Embeddings and position bias left as they
    were. Also returns the dequantized transformers state dict: the exact model that file stands for."""
    fp8 = torch.float8_e5m2 if kind == "e5m2" else torch.float8_e4m3fn
    state = {k: v for k, v in load_file(family.hf_dir / "model.safetensors").items()
             if not k.startswith(("decoder.", "lm_head."))}
    stored, dequantized = {}, {}
    for key, value in state.items():
        if kind == "dense wo" and "DenseReluDense.wo" in key:
            stored[key], stored[key.removesuffix("weight") + "scale_weight"] = value / 2, torch.tensor(2.0)
            dequantized[key] = value
        elif value.dim() == 2 and "DenseReluDense" in key or any(f".{p}.weight" in key for p in "qkvo"):
            scale = value.abs().max() / torch.finfo(fp8).max if kind != "plain" else torch.tensor(1.0)
            stored[key] = (value / scale).to(fp8)
            if kind != "plain":
                stored[key.removesuffix("weight") + "scale_weight"] = scale.reshape(())
            dequantized[key] = stored[key].float() * scale
        elif kind == "norms too" and "layer_norm" in key:
            stored[key] = value.to(torch.float8_e4m3fn)
            dequantized[key] = stored[key].float()
        else:
            stored[key] = dequantized[key] = value
    if kind != "plain":
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(stored, path)
    return path, dequantized


@pytest.mark.parametrize("kind", ["plain", "scaled", "norms too", "e5m2", "dense wo"])
def test_convert_fp8_file_keeps_fp8_and_equals_the_upcast_model(family: Family, kind: str, tmp_path: Path) -> None:
    """Linear weights stay float8_e4m3fn (an e5m2 file's are stored dense, scales applied; so are the
    layers a file keeps dense), and the model is the file's: transformers with the dequantized weights
    (before, an e5m2 file's scales were dropped and fp8 norms refused; a dense wo was quantized to fp8
    and its scale_weight ignored)."""
    src, dequantized = fp8_encoder_file(family, tmp_path / "t5xxl_fp8_e4m3fn.safetensors", kind=kind)
    flags = SHAPE_FLAGS.get(family.name, [])
    assert convert_hf.main([str(src), str(tmp_path / "ours"), "--dtype", "float32", *flags]) == 0
    encoder = t5.load(tmp_path / "ours", encoder_only=True)
    linears = {n: m for n, m in encoder.named_modules() if isinstance(m, (torch.nn.Linear, t5.Float8Linear))}
    assert linears and all(isinstance(m, t5.Float8Linear) == (kind != "e5m2" and not (kind == "dense wo" and
                                                                                    n.endswith("ffn.wo")))
                           for n, m in linears.items())
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in linears.values() if isinstance(m, t5.Float8Linear))
    upcast = convert_hf.dequantize(t5.load(tmp_path / "ours", encoder_only=True))
    assert not any(isinstance(m, t5.Float8Linear) for m in upcast.modules())
    ids, mask = padded_batch(family.vocab, [19, 6])
    with torch.no_grad():
        out = encoder(ids, mask)
        assert torch.equal(out, upcast(ids, mask))  # README: 'tested to be equal'
        # and it is the model the file stands for: transformers with the dequantized weights
        enc_cls = {"mt5": transformers.MT5EncoderModel, "umt5": transformers.UMT5EncoderModel}.get(
            family.name, transformers.T5EncoderModel)
        hf = enc_cls(family.hf.config).eval()
        hf.load_state_dict(dequantized, strict=False)
        assert_close_where(out, hf(input_ids=ids, attention_mask=mask).last_hidden_state, mask, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_dequantize_rounds_once_and_never_underflows(dtype: torch.dtype) -> None:
    """fp8 weight x float32 row scale is rounded to the compute dtype once (the exact float64
    product, rounded), and rows with tiny scales (std 3e-6) do not become zeros in float16."""
    torch.manual_seed(0)
    dense = torch.randn(64, 48) * torch.logspace(-6, 1, 64)[:, None]
    weight, scale = convert_hf.quantize_rows(dense)
    exact = (weight.double() * scale.double()[:, None]).to(dtype)
    got = t5.dequantize_weight(weight, scale, dtype)
    assert got.dtype == dtype and torch.equal(got, exact)
    assert (got[:8].float().abs().amax(dim=1) > 0).all()  # the smallest rows survive
    layer = t5.Float8Linear(48, 64)
    layer.weight.data, layer.weight_scale.data = weight, scale
    x = torch.randn(3, 48).to(dtype)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, exact), rtol=0, atol=0)
    # a model's .to(dtype) (as pipelines call it) leaves the fp8 weight and its float32 scale as they are
    model = torch.nn.Sequential(layer, torch.nn.LayerNorm(64)).to(dtype)
    assert (layer.weight.dtype, layer.weight_scale.dtype, model[1].weight.dtype) == (torch.float8_e4m3fn,
                                                                                     torch.float32, dtype)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, exact), rtol=0, atol=0)
    int8 = t5.quantize(torch.nn.Sequential(torch.nn.Linear(48, 64, bias=False))).half()
    assert (int8[0].weight.dtype, int8[0].weight_scale.dtype) == (torch.int8, torch.bfloat16)


def test_convert_weights_float8_from_a_dense_source(family: Family, tmp_path: Path) -> None:
    """--weights float8_e4m3fn: per-row scales, embeddings and norms kept in --dtype; the result
    runs in fp8 and equals its dequantized twin; transformers -> fp8 -> transformers works too."""
    out = tmp_path / "fp8"
    assert convert_hf.main([str(family.hf_dir), str(out), "--weights", "float8_e4m3fn", "--dtype", "bfloat16"]) == 0
    state = load_file(out / "model.safetensors")
    assert state["encoder.layers.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert state["encoder.layers.0.attn.qkv.weight_scale"].shape == (3 * family.hf.config.num_heads * family.hf.config.d_kv,)
    assert state["encoder.embedding.weight"].dtype == torch.bfloat16
    model = t5.load(out)
    ids, mask = padded_batch(family.vocab, [11, 4])
    dec, dec_mask = padded_batch(family.vocab, [5, 3], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits,
                                   convert_hf.dequantize(t5.load(out))(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits,
                                   rtol=0, atol=0)
    assert t5.generate(model, ids, mask, max_new_tokens=3).tokens.shape[0] == 2
    # t5.quantize of an fp8 model: int8 of the float32 dequantized weights, every layer; again: unchanged
    int8 = t5.quantize(t5.load(out))
    assert all(type(m) is t5.Int8Linear for m in int8.modules() if isinstance(m, (torch.nn.Linear, t5.Float8Linear)))
    upcast = t5.load(out, dtype=torch.float32)
    expected = t5.quantize(convert_hf.dequantize(upcast)).state_dict()
    assert all(torch.equal(a, expected[key]) for key, a in int8.state_dict().items()
               if a.dtype == torch.int8 or key.endswith("weight_scale"))  # embeddings, norms: other dtypes
    again = t5.quantize(int8).state_dict()
    assert all(torch.equal(a, again[key]) for key, a in int8.state_dict().items())


def test_convert_single_file_beside_other_models_and_input_scales(family: Family, tmp_path: Path) -> None:
    """T5 keys at the root of a file that also holds other models' tensors: those are ignored. fp8
    files with per-layer scale_input tensors (activation scales for fp8 kernels) convert, ignoring them."""
    others = {"clip_l.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 3),
              "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2),
              "first_stage_model.encoder.conv_in.weight": torch.zeros(2), "logit_scale": torch.zeros(())}
    src = single_file(family, tmp_path / "all_in_one.safetensors", extra=others)
    flags = SHAPE_FLAGS.get(family.name, [])
    assert convert_hf.main([str(src), str(tmp_path / "ours"), *flags]) == 0
    assert_same_checkpoint(tmp_path / "ours", family.ours_dir)
    path, _ = fp8_encoder_file(family, tmp_path / "fp8.safetensors", kind="scaled")
    assert convert_hf.main([str(path), str(tmp_path / "fp8"), *flags]) == 0
    state = load_file(path)
    inputs = {k.replace("scale_weight", "scale_input"): torch.tensor(0.5) for k in state if k.endswith("scale_weight")}
    assert inputs
    save_file(state | inputs, tmp_path / "fp8_inputs.safetensors")
    assert convert_hf.main([str(tmp_path / "fp8_inputs.safetensors"), str(tmp_path / "fp8-inputs"), *flags]) == 0
    assert_same_checkpoint(tmp_path / "fp8", tmp_path / "fp8-inputs")


def test_convert_diffusers_layout(spiece_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A diffusers pipeline folder: the T5 encoder in text_encoder_2/, its tokenizer in
    tokenizer_2/, a CLIP beside them; the root, the encoder folder (also as ".") and --tokenizer all work."""
    root = tmp_path / "flux"
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    (root / "model_index.json").write_text(json.dumps({"text_encoder": ["transformers", "CLIPTextModel"],
                                                       "text_encoder_2": ["transformers", "T5EncoderModel"],
                                                       "tokenizer_2": ["transformers", "T5TokenizerFast"]}))
    torch.manual_seed(0)
    hf = transformers.T5EncoderModel(transformers.T5Config(vocab_size=300, d_model=16, d_kv=4, d_ff=24, num_layers=2,
                                                           num_heads=2, feed_forward_proj="gated-gelu")).eval()
    hf.save_pretrained(root / "text_encoder_2")
    transformers.T5TokenizerFast.from_pretrained(spiece_folder, legacy=False).save_pretrained(root / "tokenizer_2")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer_2")
    monkeypatch.chdir(root / "text_encoder_2")
    for src, flags in [(root, []), (root / "text_encoder_2", []), (Path("."), []),
                       (root / "text_encoder_2", ["--tokenizer", str(spiece_folder / "spiece.model")])]:
        out = tmp_path / f"ours-{len(flags)}-{src.name or 'dot'}"
        assert convert_hf.main([str(src), str(out), *flags]) == 0
        encoder, tokenizer = t5.load(out, encoder_only=True), t5.load_tokenizer(out)
        texts = ["hello world", "kato rimo <extra_id_0> ne fox"]
        ids, mask = tokenizer.encode_batch(texts)
        ref = hf_tokenizer(texts, padding="longest", return_tensors="pt")
        assert torch.equal(ids, ref.input_ids) and torch.equal(mask, ref.attention_mask)
        with torch.no_grad():
            assert_close_where(encoder(ids, mask), hf(**ref).last_hidden_state, mask, 1e-5)
    # as a hub id: the T5 encoder and its tokenizer are fetched, not the pipeline's other weights
    import fnmatch

    import huggingface_hub

    for name in ("transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                 "text_encoder_2/pytorch_model.bin"):  # (the encoder in another format too)
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(b"weights the conversion does not need")
    cache, fetched = tmp_path / "cache", []

    def snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        for path in root.rglob("*"):
            name = path.relative_to(root).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(name, pattern) for pattern in allow_patterns):
                (cache / name).parent.mkdir(parents=True, exist_ok=True)
                (cache / name).write_bytes(path.read_bytes())
                fetched.append(name)
        return str(cache)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert convert_hf.main(["black-forest-labs/FLUX.1-tiny", str(tmp_path / "from-hub")]) == 0
    assert t5.load(tmp_path / "from-hub", encoder_only=True).config == encoder.config
    assert not [name for name in fetched if name.endswith((".safetensors", ".bin")) and "text_encoder_2/" not in name]
    assert "text_encoder_2/pytorch_model.bin" not in fetched and "text_encoder_2/model.safetensors" in fetched


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_to_hf_round_trip_is_bit_exact(family: Family, tmp_path: Path) -> None:
    """transformers -> ours -> transformers gives back every tensor bit for bit (v1.0's folded
    lm_head scale becomes the tied embedding again), a config transformers loads with no missing
    or unexpected key, and the same logits."""
    back = tmp_path / "back"
    model_type = {"mt5": ["--model-type", "mt5"]}.get(family.name, [])
    assert convert_hf.main([str(family.ours_dir), str(back), "--to-hf", *model_type]) == 0
    original, exported = hf_tensors(family.hf_dir), hf_tensors(back)
    assert original.keys() == exported.keys()
    for key in original:
        assert original[key].dtype == exported[key].dtype and torch.equal(original[key], exported[key]), key
    config = json.loads((back / "config.json").read_text())
    source = json.loads((family.hf_dir / "config.json").read_text())
    assert config["model_type"] == source["model_type"] and config["architectures"] == source["architectures"]
    assert config["feed_forward_proj"] == source["feed_forward_proj"]
    assert config["tie_word_embeddings"] == (family.name == "t5-v1.0")
    model_cls = HF_MODELS[FAMILIES[family.name][0]]
    reloaded, info = model_cls.from_pretrained(back, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids, mask = padded_batch(family.vocab, [13, 6], seed=2)
    dec, dec_mask = padded_batch(family.vocab, [7, 4], seed=3)
    with torch.no_grad():
        kwargs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        assert torch.equal(reloaded.eval()(**kwargs).logits, family.hf(**kwargs).logits)


def test_to_hf_encoder_only_and_refusals(family: Family, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    enc = tmp_path / "enc"
    assert convert_hf.main([str(family.hf_dir), str(enc), "--encoder-only"]) == 0
    back = tmp_path / "back"
    assert convert_hf.main([str(enc), str(back), "--to-hf"]) == 0
    config = json.loads((back / "config.json").read_text())
    expected = {"umt5": "UMT5EncoderModel"}.get(family.name, "T5EncoderModel")
    assert config["architectures"] == [expected] and not config["is_encoder_decoder"]
    enc_cls = getattr(transformers, expected)
    reloaded, info = enc_cls.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids, mask = padded_batch(family.vocab, [9, 5])
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids, attention_mask=mask).last_hidden_state,
                           family.hf.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state)
    # no overwrite without --force; a file is never OUT
    assert convert_hf.main([str(enc), str(back), "--to-hf"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert convert_hf.main([str(enc), str(enc / "model.safetensors"), "--to-hf", "--force"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert convert_hf.main([str(family.hf_dir), str(tmp_path / "x"), "--to-hf"]) == 2
    assert "Hugging Face config" in capsys.readouterr().err
    # options of the import are refused with --to-hf, --model-type without it (they were ignored)
    assert convert_hf.main([str(tmp_path / "back"), str(tmp_path / "x"), "--to-hf", "--encoder-only", "--eps", "1e-5"]) == 2
    assert "--encoder-only, --eps: not for --to-hf" in capsys.readouterr().err
    assert convert_hf.main([str(family.hf_dir), str(tmp_path / "x"), "--model-type", "umt5"]) == 2
    assert "--model-type is for --to-hf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_exports_to_transformers(tmp_path: Path) -> None:
    """The shipped demo (trained with sum_embedding_grads, so its two tables are equal) exports
    with --to-hf; it was trained with scale_qk=True, which the export folds into the queries
    (d_kv**-0.5 = 32**-0.5 is no power of two: float32 rounding, hence 1e-5 of the largest logit),
    and transformers spells the numbers as we do."""
    assert convert_hf.main(["--to-hf", str(HERE / "demo"), str(tmp_path / "hf")]) == 0
    ours, tokenizer = t5.load(HERE / "demo"), t5.load_tokenizer(HERE / "demo")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    ids, mask = tokenizer.encode_batch(["spell: 4071", "spell: 12", "spell: 99999"])
    with torch.no_grad():
        logits = ours(ids, ids, input_mask=mask).logits
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits
        torch.testing.assert_close(logits, ref, atol=1e-5 * float(logits.abs().max()), rtol=0)
        hf_tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=24)
    texts = [tokenizer.decode(row) for row in t5.generate(ours, ids, mask, max_new_tokens=24).tokens]
    assert texts == [tokenizer.decode(row) for row in hf_tokens] == ["four thousand seventy-one", "twelve",
                                                                     "ninety-nine thousand nine hundred ninety-nine"]


def save_ours(model: t5.T5, folder: Path, dtype: torch.dtype) -> Path:
    """One of our folders (config.json + model.safetensors) from a model, weights in `dtype`."""
    folder.mkdir()
    save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    model.config.save(folder / "config.json")
    return folder


def test_to_hf_of_a_calibrated_checkpoint_computes_what_ours_does(tmp_path: Path) -> None:
    """--dtype float16 --calibrate, then --to-hf: the export is float32 (in float16 transformers would
    overflow: its from_pretrained takes the file's dtype), and transformers computes our logits (float32
    from the same float16 file) to 1e-5 of their range; the scales are not dropped. --dtype float16
    still writes float16."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    state = load_file(hf_dir / "model.safetensors")
    state["encoder.block.1.layer.1.DenseReluDense.wo.weight"] *= 3e4
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert convert_hf.main([str(hf_dir), str(tmp_path / "fp16"), "--dtype", "float16", "--calibrate"]) == 0
    assert t5.T5Config.load(tmp_path / "fp16" / "config.json").out_scales
    assert convert_hf.main([str(tmp_path / "fp16"), str(tmp_path / "back"), "--to-hf"]) == 0
    hf = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "back").eval()  # as the file says
    assert {p.dtype for p in hf.parameters()} == {torch.float32}
    assert convert_hf.main([str(tmp_path / "fp16"), str(tmp_path / "half"), "--to-hf", "--dtype", "float16"]) == 0
    assert {t.dtype for t in load_file(tmp_path / "half" / "model.safetensors").values()} == {torch.float16}
    ours = t5.load(tmp_path / "fp16", dtype=torch.float32)
    ids, mask = padded_batch(103, [12, 7], seed=8)
    dec, dec_mask = padded_batch(103, [5, 3], seed=9)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        logits = ours(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits
    assert_close_where(logits, ref, dec_mask, 1e-5 * float(ref.abs().max()))


def test_a_calibrated_block_trains_faster_by_its_scale() -> None:
    """README (Half precision): a calibrated checkpoint computes what the uncalibrated one does but
    does not train like it. A step on a block's scaled-down value rows (scale s = 1/4) moves the
    weights the block computes with 1/s times as far with Adam, 1/s^2 with SGD, and the encoder output
    about 1/s as far with Adam (first order)."""
    model = random_model("t5-v1.0").eval()  # ReLU: all of wi are value rows
    ids, mask = padded_batch(model.config.vocab_size, [7, 4], seed=1)
    for optimizer, lr, ratio in ((torch.optim.Adam, 1e-5, 4.0), (torch.optim.SGD, 1e-2, 16.0)):
        moved = []
        for scale in (1.0, 0.25):
            m = copy.deepcopy(model).requires_grad_(False)
            if scale != 1.0:
                convert_hf.apply_out_scales(m, {"encoder.0.ffn": scale})
            weight = m.encoder.layers[0].ffn.wi.weight.requires_grad_(True)
            start, step = weight.detach() / scale, optimizer([weight], lr=lr)
            with torch.no_grad():
                before = m.encoder(ids, mask)
            m.encoder(ids, mask).square().sum().backward()
            step.step()
            with torch.no_grad():
                moved.append(((weight / scale - start).norm(), (m.encoder(ids, mask) - before).norm()))
        # (Adam: a little over 1/s, as its eps damps the smaller gradients of the uncalibrated rows more)
        torch.testing.assert_close(moved[1][0] / moved[0][0], torch.tensor(ratio), rtol=0.02, atol=0)
        if optimizer is torch.optim.Adam:
            torch.testing.assert_close(moved[1][1] / moved[0][1], torch.tensor(ratio), rtol=0.05, atol=0)


def test_out_scales_fold_into_quantized_layers_exactly(tmp_path: Path) -> None:
    """`apply_out_scales` on fp8 and int8 layers scales their per-row scales (the stored int8 / fp8
    values cannot take a multiply): the model computes what it did, bit for bit in float32 (powers of two)."""
    hf = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    for out, options in (("fp8", ["--weights", "float8_e4m3fn"]), ("plain", [])):
        assert convert_hf.main([str(hf), str(tmp_path / out), "--dtype", "float32", *options]) == 0
    ids, mask = padded_batch(FAMILIES["t5-v1.1"][1]["vocab_size"], [7, 4], seed=3)
    for model in (t5.load(tmp_path / "fp8"), t5.quantize(t5.load(tmp_path / "plain"))):
        with torch.no_grad():
            before = model(ids, ids, input_mask=mask).logits
            convert_hf.apply_out_scales(model, {block: 0.25 for block in t5.scalable_blocks(model.config)})
            assert torch.equal(model(ids, ids, input_mask=mask).logits, before)
        assert model.config.out_scales["decoder.0.cross_attn"] == 0.25


@pytest.mark.parametrize("name", ["t5-v1.0", "t5-v1.1"])
def test_to_hf_undoes_every_kind_of_out_scale_exactly(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Scales on every block (attention V, cross-attention V, FFN up rows: gated and ReLU) export to
    exactly the tensors of the same model without scales; a value that no longer fits float16 once
    unscaled is refused by name, and --dtype float32 exports it exactly."""
    assert convert_hf.main([str(build_hf_checkpoint(tmp_path / "hf", name)), str(tmp_path / "ours")]) == 0
    model = t5.load(tmp_path / "ours")
    with torch.no_grad():  # no float16 subnormals once scaled by 1/4: the comparison below is then bit-exact
        for param in model.parameters():
            param[param.abs() < 2**-10] = 0
    plain = save_ours(model, tmp_path / "plain", torch.float16)
    convert_hf.apply_out_scales(model, {block: 0.25 for block in t5.scalable_blocks(model.config)})
    scaled = save_ours(model, tmp_path / "scaled", torch.float16)
    for folder in (plain, scaled):  # (a calibrated checkpoint exports in float32 unless told otherwise)
        assert convert_hf.main([str(folder), str(tmp_path / f"{folder.name}-hf"), "--to-hf", "--dtype", "float16"]) == 0
    a, b = hf_tensors(tmp_path / "plain-hf"), hf_tensors(tmp_path / "scaled-hf")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(load_file(plain / "model.safetensors")["encoder.layers.0.ffn.wi.weight"],
                           load_file(scaled / "model.safetensors")["encoder.layers.0.ffn.wi.weight"])
    state = load_file(scaled / "model.safetensors")
    state["decoder.layers.0.cross_attn.kv.weight"][-1, 0] = 30000.0  # a V row: 120000 once unscaled
    save_file(state, scaled / "model.safetensors")
    capsys.readouterr()
    assert convert_hf.main([str(scaled), str(tmp_path / "over"), "--to-hf", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "decoder.layers.0.cross_attn.kv.weight" in err and "--dtype float32" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "over").exists()
    assert convert_hf.main([str(scaled), str(tmp_path / "over"), "--to-hf", "--dtype", "float32"]) == 0
    assert hf_tensors(tmp_path / "over")["decoder.block.0.layer.1.EncDecAttention.v.weight"][-1, 0] == 120000.0


@pytest.mark.parametrize("model_type, message", [
    ("longt5", "unsupported architecture 'longt5': LongT5"),
    ("switch_transformers", "unsupported architecture 'switch_transformers'"),
    ("t5gemma", "unsupported architecture 't5gemma'"),
    ("bart", "unsupported architecture 'bart'"),
])
def test_convert_rejects_other_architectures(model_type: str, message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": model_type, "d_model": 32}))
    assert convert_hf.main([str(src), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_rejects_unknown_ffn_and_heads() -> None:
    with pytest.raises(convert_hf.ConversionError, match="unsupported feed_forward_proj 'gated-silu'"):
        convert_hf.config_from_hf({"model_type": "t5", "feed_forward_proj": "gated-silu"})
    with pytest.raises(convert_hf.ConversionError, match="T5ForQuestionAnswering"):
        convert_hf.config_from_hf({"model_type": "t5", "architectures": ["T5ForQuestionAnswering"]})


def test_convert_missing_and_unexpected_tensors(family: Family) -> None:
    hf_config = json.loads((family.hf_dir / "config.json").read_text())
    state = load_file(family.hf_dir / "model.safetensors")
    broken = {k: v for k, v in state.items() if k != "decoder.block.0.layer.1.EncDecAttention.k.weight"}
    with pytest.raises(convert_hf.ConversionError,
                       match=r"missing 1 tensor\(s\): decoder.block.0.layer.1.EncDecAttention.k.weight"):
        convert_hf.convert_state_dict(hf_config, broken)
    extra = dict(state, **{"encoder.block.0.layer.1.DenseReluDense.wi_2.weight": torch.zeros(1)})
    with pytest.raises(convert_hf.ConversionError,
                       match=r"1 unexpected tensor\(s\): encoder.block.0.layer.1.DenseReluDense.wi_2.weight"):
        convert_hf.convert_state_dict(hf_config, extra)
    wrong = dict(state, **{"encoder.final_layer_norm.weight": torch.ones(5)})
    with pytest.raises(convert_hf.ConversionError, match="encoder.final_norm.weight: made a \\(5,\\) tensor"):
        convert_hf.convert_state_dict(hf_config, wrong)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (relative name -> bytes): what "left as it was" compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_convert_refuses_overwrite_and_fails_atomically(family: Family, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    import shutil

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "config.json").write_text("precious")  # a name this tool writes, but not its content
    for force in ([], ["--force"]):
        assert convert_hf.main([str(family.hf_dir), str(precious), *force]) == 2
        assert "config.json that this tool did not write" in capsys.readouterr().err
    assert (precious / "config.json").read_text() == "precious"
    out = tmp_path / "out"
    shutil.copytree(family.ours_dir, out)  # an earlier conversion
    before = files_of(out)
    assert convert_hf.main([str(family.hf_dir), str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    # a checkpoint that fails half-way through writing leaves OUT as it was, and no temp folder
    src = tmp_path / "truncated"
    src.mkdir()
    (src / "config.json").write_text((family.hf_dir / "config.json").read_text())
    state = load_file(family.hf_dir / "model.safetensors")
    state["decoder.final_layer_norm.weight"] = torch.ones(3)  # found wrong only when its turn comes
    save_file(state, src / "model.safetensors")
    assert convert_hf.main([str(src), str(out), "--force"]) == 2
    assert "decoder.final_norm.weight: made a (3,) tensor" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert files_of(out) == before
    # with --force a good conversion replaces it
    assert convert_hf.main([str(family.hf_dir), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert t5.T5Config.load(out / "config.json") == t5.T5Config.load(family.ours_dir / "config.json")
    assert files_of(out) != before


def test_convert_refuses_a_file_as_out(family: Family, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"precious checkpoint")
    assert convert_hf.main([str(family.hf_dir), str(out), "--force"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert out.read_bytes() == b"precious checkpoint" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_convert_ecosystem_errors(family: Family, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each bad source is one line naming what is wrong, and an existing OUT is never touched."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(family.ours_dir, out)  # an earlier conversion, replaceable with --force
    before = files_of(out)
    state = load_file(family.hf_dir / "model.safetensors")
    no_bias = tmp_path / "no_bias.safetensors"
    save_file({k: v for k, v in state.items() if "relative_attention_bias" not in k}, no_bias)
    not_t5 = tmp_path / "clip.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 3)}, not_t5)
    two = tmp_path / "two.safetensors"
    save_file({f"{p}.{k}": v.clone() for p in ("a", "b") for k, v in state.items()}, two)
    plain = single_file(family, tmp_path / "plain.safetensors")
    clip = tmp_path / "tokenizer"  # CLIP's, beside a pipeline's tokenizer_2/: no T5 tokenizer in it
    clip.mkdir()
    for name, text in (("vocab.json", "{}"), ("merges.txt", ""), ("tokenizer_config.json", "{}")):
        (clip / name).write_text(text)
    cases = [([str(no_bias)], "these tensors fit no T5: encoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
             ([str(not_t5)], "no T5 tensors found"),
             ([str(two)], "several T5 models in one file, under prefixes ['a.', 'b.']; choose one with --prefix"),
             ([str(plain), "--prefix", "text_encoders.t5xxl."], "no T5 tensors under prefix 'text_encoders.t5xxl.'"),
             ([str(plain), "--tokenizer", str(tmp_path / "nowhere")], "--tokenizer"),
             ([str(plain), "--tokenizer", str(tmp_path)], "no spiece.model, tokenizer.json or tokenizer_config.json"),
             ([str(family.hf_dir / "config.json")], "must be a .safetensors file"),
             ([str(family.ours_dir)], "is converted already (t5.load reads it; --to-hf exports it)"),
             ([str(family.hf_dir), "--eps", "0.5"], "--scale-decoder-output are for single .safetensors files"),
             ([str(family.hf_dir), "--prefix", "a."], "are for single .safetensors files"),
             ([str(tmp_path / "typo.safetensors"), "--prefix", "a."], "typo.safetensors: no such folder")]
    if family.name != "byt5":  # (ByT5's tokenizer is bytes: no file to look for)
        cases.append(([str(plain), "--tokenizer", str(clip)], f"--tokenizer {clip}: no T5 tokenizer there"))
    for args, message in cases:
        assert convert_hf.main([*args, str(out), "--force"]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert files_of(out) == before
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_convert_unreadable_weights_are_one_line(family: Family, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = (family.hf_dir / "model.safetensors").read_bytes()
    cases = {"truncated": data[:len(data) // 2], "foreign": b"PK\x03\x04 not safetensors at all" * 10}
    for name, content in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((family.hf_dir / "config.json").read_text())
        (folder / "model.safetensors").write_bytes(content)
        (tmp_path / f"{name}.safetensors").write_bytes(content)
        for src in (folder, tmp_path / f"{name}.safetensors"):
            assert convert_hf.main([str(src), str(tmp_path / "out")]) == 2, src
            err = capsys.readouterr().err
            assert "not a readable safetensors file" in err and len(err.splitlines()) == 1, err
            assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("to_hf", [False, True])
def test_ctrl_c_during_a_conversion(family: Family, to_hf: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C half-way through writing: "interrupted", exit 130, OUT as it was, no temporary folder."""
    write = convert_hf.write_safetensors

    def interrupted(path: Path, specs: dict, tensors: object) -> None:
        def some() -> object:
            for i, item in enumerate(tensors):
                if i == 3:
                    raise KeyboardInterrupt
                yield item
        write(path, specs, some())

    import shutil

    monkeypatch.setattr(convert_hf, "write_safetensors", interrupted)
    out = tmp_path / "out"
    shutil.copytree(family.ours_dir, out)  # an earlier conversion, replaceable with --force
    before = files_of(out)
    src = family.ours_dir if to_hf else family.hf_dir
    try:
        code = convert_hf.main([str(src), str(out), "--force", *(["--to-hf"] if to_hf else [])])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C came out of main: a traceback")
    assert code == 130
    err = capsys.readouterr().err  # (after the no-tokenizer warning, for a convert)
    assert err.splitlines()[-1] == "convert_hf.py: interrupted" and "Traceback" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and files_of(out) == before
    if not to_hf:  # Ctrl-C once OUT is in place, while its summary is read (was a traceback)
        def interrupted_summary(out: Path) -> str:
            raise KeyboardInterrupt

        monkeypatch.undo()
        monkeypatch.setattr(convert_hf, "summary", interrupted_summary)
        assert convert_hf.main([str(src), str(out), "--force"]) == 130
        assert f"interrupted (after writing {out})" in capsys.readouterr().err
        assert t5.load(out) is not None


def test_a_killed_conversions_temporary_folder_goes_with_the_next(tmp_path: Path) -> None:
    """A conversion killed by a signal Python cannot catch (SIGTERM, SIGKILL, out of memory) leaves its
    hidden temporary folder, a model's size; the next conversion beside it deletes it, and only it (a
    running conversion's stays, and so does another OUT's)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = [tmp_path / f".out.tmp-{int(dead.stdout)}", tmp_path / f".out.tmp-{os.getppid()}",  # alive
            tmp_path / f".other.tmp-{int(dead.stdout)}"]
    for folder in left:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    assert convert_hf.main(["--to-hf", str(HERE / "demo"), str(tmp_path / "out")]) == 0  # (convert: the same)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", left[1].name, left[2].name])


def test_force_replaces_only_what_the_tool_writes(family: Family, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--force never deletes what the tool did not write: a parent folder of checkpoints, a converted
    folder with the user's notes, the source itself (SRC == OUT or inside OUT, convert and --to-hf;
    for a pipeline, the folder it is read from), a transformers folder whose file names are ours, the
    current folder. It replaces a conversion, a --to-hf export, and a link's target."""
    import shutil

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(family.ours_dir, checkpoints / "sibling")
    (checkpoints / "notes.txt").write_text("mine")
    mine = tmp_path / "mine"
    shutil.copytree(family.ours_dir, mine)
    (mine / "notes.txt").write_text("mine")
    hf_copy = tmp_path / "hf"
    shutil.copytree(family.hf_dir, hf_copy)
    inside = tmp_path / "inside"
    inside.mkdir()
    single_file(family, inside / "t5.safetensors")
    ours = tmp_path / "ours"
    shutil.copytree(family.ours_dir, ours)
    pipeline = tmp_path / "pipeline"  # a diffusers pipeline, whose T5 (an export of ours) is read from text_encoder_2/
    assert convert_hf.main([str(family.ours_dir), str(pipeline / "text_encoder_2"), "--to-hf"]) == 0
    (pipeline / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "T5EncoderModel"]}))
    hf_named = tmp_path / "hf-named"  # a transformers folder holding only file names this tool writes
    hf_named.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(family.hf_dir / name, hf_named / name)
    shutil.copytree(family.ours_dir, tmp_path / "here")
    before = files_of(tmp_path)
    cases = [([str(pipeline), str(pipeline / "text_encoder_2"), "--force"], "model.safetensors is inside OUT"),
             ([str(family.hf_dir), str(hf_named), "--force"], "config.json, model.safetensors that this tool did not "
                                                              "write"),
             ([str(ours), str(hf_named), "--force", "--to-hf"], "that this tool did not write"),
             ([str(family.hf_dir), ".", "--force"], "is the current folder"),([str(family.hf_dir), str(checkpoints), "--force"], "holds what this tool did not write (notes.txt, sibling)"),
             ([str(family.hf_dir), str(mine), "--force"], "holds what this tool did not write (notes.txt)"),
             ([str(hf_copy), str(hf_copy), "--force"], "is OUT: writing OUT would destroy the source"),
             ([str(inside / "t5.safetensors"), str(inside), "--force"], "is inside OUT"),
             ([str(ours), str(ours), "--force", "--to-hf"], "is OUT: writing OUT would destroy the source"),
             ([str(ours), str(tmp_path), "--force", "--to-hf"], "is inside OUT"),
             ([str(family.hf_dir), str(ours)], "exists; pass --force to overwrite it (replaces its config.json, "
                                                "model.safetensors)")]
    monkeypatch.chdir(tmp_path / "here")  # a converted folder, but the current one
    for args, message in cases:
        assert convert_hf.main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert files_of(tmp_path) == before
    monkeypatch.chdir(tmp_path)
    assert convert_hf.main([str(family.hf_dir), str(ours), "--force"]) == 0  # a converted folder is replaced
    older = json.loads((ours / "config.json").read_text())
    del older["dropout"]  # as an earlier version of this tool wrote it: still ours to replace
    (ours / "config.json").write_text(json.dumps(older))
    assert convert_hf.main([str(family.hf_dir), str(ours), "--force"]) == 0
    for _ in range(2):  # a --to-hf export is replaced by the next one
        assert convert_hf.main([str(ours), str(tmp_path / "exported"), "--force", "--to-hf"]) == 0
    # through a link: the folder it points to is replaced, the link stays, nothing else is left
    (tmp_path / "link").symlink_to(ours)
    assert convert_hf.main([str(family.hf_dir), str(tmp_path / "link"), "--force", "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "link").is_symlink() and t5.load(ours).lm_head.weight.dtype == torch.bfloat16
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


class CountingSafetensors:
    """safetensors.safe_open that counts the reads of each tensor and the bytes of the tensors read
    and still alive (peak: what the reader holds at once)."""

    opener: object = None  # the real safe_open
    reads: dict[str, int] = {}
    live = peak = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._file = type(self).opener(*args, **kwargs)

    @classmethod
    def track(cls, key: str, tensor: torch.Tensor) -> torch.Tensor:
        import weakref

        cls.reads[key] = cls.reads.get(key, 0) + 1
        cls.live += tensor.nbytes
        cls.peak = max(cls.peak, cls.live)
        weakref.finalize(tensor, lambda n=tensor.nbytes: setattr(cls, "live", cls.live - n))
        return tensor

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.track(key, self._file.get_tensor(key))

    def get_slice(self, key: str) -> object:
        inner, track = self._file.get_slice(key), self.track

        class Slice:
            get_dtype, get_shape = inner.get_dtype, inner.get_shape

            def __getitem__(self, index: object) -> torch.Tensor:
                return track(key, inner[index])
        return Slice()

    def __enter__(self) -> CountingSafetensors:
        self._file.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.__exit__(*exc)

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)


def test_convert_and_to_hf_read_each_tensor_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert reads no tensor twice (not the shared embedding that makes both embeddings and v1.0's
    lm_head, not a weight for its dtype); --to-hf reads each tensor once, streaming: it never holds
    more than two tensors' bytes (the embedding beside lm_head, to tell whether they are tied)."""
    import safetensors
    import safetensors.torch

    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.0")
    real = safetensors.safe_open
    monkeypatch.setattr(CountingSafetensors, "opener", real)
    for module in (safetensors, safetensors.torch):
        monkeypatch.setattr(module, "safe_open", CountingSafetensors)
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    with real(str(hf_dir / "model.safetensors"), framework="pt") as f:
        sizes = {key: f.get_tensor(key).nbytes for key in f.keys()}
    assert CountingSafetensors.reads == {key: 1 for key in sizes}
    assert CountingSafetensors.peak <= 2 * max(sizes.values()), (CountingSafetensors.peak, max(sizes.values()))
    for name, value in [("reads", {}), ("live", 0), ("peak", 0)]:
        monkeypatch.setattr(CountingSafetensors, name, value)
    assert convert_hf.main([str(tmp_path / "ours"), str(tmp_path / "back"), "--to-hf"]) == 0
    with real(str(tmp_path / "ours" / "model.safetensors"), framework="pt") as f:
        sizes = {key: f.get_tensor(key).nbytes for key in f.keys()}
    assert CountingSafetensors.reads == {key: 1 for key in sizes}
    assert sum(sizes.values()) > 6 * max(sizes.values())  # so that holding everything would show
    assert CountingSafetensors.peak <= 2 * max(sizes.values()), (CountingSafetensors.peak, max(sizes.values()))


def test_convert_papercuts_are_one_line(spiece_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    """A mistyped local path, a hub id that cannot be fetched, a broken config.json, a tokenizer
    larger than the model's vocabulary: one line each, exit 2. No tokenizer at all: converted, with
    a one-line warning naming --tokenizer. A spiece.model cut short: one line naming it."""
    import huggingface_hub

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.\n\nMore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "t5",')
    too_big = tmp_path / "too_big"
    saved_tiny_t5(too_big, spiece_folder, vocab_size=250)
    capsys.readouterr()
    cases = [(["./chekpoints/x"], "./chekpoints/x: no such folder"),
             (["path/that/does/not/exist"], "path/that/does/not/exist: no such folder"),
             (["chekpoints/x"], "chekpoints/x: no such folder, and as a hub id it could not be fetched (OSError: "
                                "We couldn't connect to 'https://huggingface.co'.)"),
             ([str(broken)], f"{broken / 'config.json'}: not valid JSON"),
             ([str(too_big)], "200 pieces + 100 sentinels do not fit the model's vocabulary of 250")]
    for args, message in cases:
        assert convert_hf.main([*args, str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (message, err)
        assert not (tmp_path / "out").exists()
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    capsys.readouterr()
    assert convert_hf.main([str(hf_dir), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: no tokenizer" in err and "--tokenizer" in err and len(err.splitlines()) == 1, err
    assert t5.load(tmp_path / "out").config.vocab_size == 103
    data = (spiece_folder / "spiece.model").read_bytes()  # truncated inside the trainer spec's length
    fields = list(convert_hf._fields(data))
    spec = [number for number, _, _ in fields].index(2)  # ModelProto's field 2: the trainer spec
    assert len(fields[spec][1]) >= 128  # so that its length takes two bytes or more
    cut = sum(len(raw) for _, _, raw in fields[:spec]) + 2
    (hf_dir / "spiece.model").write_bytes(data[:cut])
    assert convert_hf.main([str(hf_dir), str(tmp_path / "cut")]) == 2
    err = capsys.readouterr().err
    assert "spiece.model: not a readable sentencepiece model" in err and len(err.splitlines()) == 1, err


########################################################################################
# Decoding: cache, greedy, beams, sampling, FLOPs, compile, custom loops, CUDA graphs
########################################################################################


GENERATION_FAMILIES = ["t5-v1.0", "t5-v1.1", "umt5", "byt5"]


@pytest.fixture(scope="module", params=GENERATION_FAMILIES)
def gen_family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Family:
    """A family whose EOS row of lm_head is scaled up x3, so rows stop at different steps."""
    return Family(tmp_path_factory.mktemp(f"gen-{request.param}"), request.param, eos_boost=3.0)


def greedy_with_cache(model: t5.T5, ids: torch.Tensor, mask: torch.Tensor, steps: int,
                      max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decode through the low-level pieces; returns (decoder inputs (b, steps), logits (b, steps, v))."""
    memory = model.decoder.memory(model.encoder(ids, mask), mask)
    cache = t5.make_cache(model.config, ids.shape[0], max_len or steps, device=ids.device)
    token = torch.full((ids.shape[0], 1), model.config.decoder_start_token_id, device=ids.device)
    inputs, logits = [], []
    for step in range(steps):
        inputs.append(token)
        logits.append(t5.decode_step(model, token, memory, cache, torch.tensor([step], device=ids.device)))
        token = logits[-1].argmax(-1, keepdim=True)
    return torch.cat(inputs, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["t5-v1.0", "t5-v1.1", "umt5"])
def test_cached_logits_match_uncached(name: str, device: str, tmp_path: Path) -> None:
    """32 greedy steps through the static cache give the same logits at every step as one
    uncached teacher-forced pass over the same tokens (padded batch)."""
    fam = Family(tmp_path, name)
    model = t5.load(fam.ours_dir, device=device)
    ids, mask = (x.to(device) for x in padded_batch(fam.vocab, [15, 6, 22], seed=8))
    with torch.no_grad():
        inputs, cached = greedy_with_cache(model, ids, mask, 32)
        uncached = model(ids, inputs, input_mask=mask).logits
    torch.testing.assert_close(cached, uncached, atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_matches_hf(gen_family: Family, device: str) -> None:
    """Greedy tokens equal Hugging Face generate(do_sample=False) on a padded batch of 4, rows
    stopping at their own EOS."""
    model = t5.load(gen_family.ours_dir, device=device)
    ids, mask = (x.to(device) for x in padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7))
    with torch.no_grad():
        ref = gen_family.hf.to(device).generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=32)
    out = t5.generate(model, ids, mask, max_new_tokens=32)
    assert isinstance(out, t5.Generation)
    assert out.tokens.shape == (4, ref.shape[1] - 1)
    for row in range(4):
        n = int(out.lengths[row])
        assert out.tokens[row, :n].tolist() == ref[row, 1:n + 1].tolist()
        assert (out.tokens[row, n:] == model.config.pad_token_id).all()


BEAM_SETTINGS = [(False, 1.0), (True, 1.0), ("never", 2.0), (False, -1.0)]


@pytest.mark.parametrize("early_stopping, length_penalty", BEAM_SETTINGS)
def test_beam_search_matches_hf(gen_family: Family, early_stopping: bool | str, length_penalty: float) -> None:
    """num_beams=4 returns Hugging Face's best sequences and scores, for each early_stopping mode."""
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7)
    with torch.no_grad():
        ref = gen_family.hf.cpu().generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=24,
                                           num_beams=4, early_stopping=early_stopping, length_penalty=length_penalty,
                                           output_scores=True, return_dict_in_generate=True)
    out = t5.generate(model, ids, mask, max_new_tokens=24, num_beams=4, early_stopping=early_stopping,
                      length_penalty=length_penalty)
    for row in range(4):
        n = int(out.lengths[row])
        assert out.tokens[row, :n].tolist() == ref.sequences[row, 1:n + 1].tolist()
    # scores are sums of float32 log-probs, divided by length**length_penalty
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-3, rtol=1e-5)


def test_beam_search_num_return_sequences_matches_hf(gen_family: Family) -> None:
    """num_beams=4, num_return_sequences=3: the 3 best beams of each input, best first, as HF."""
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [13, 7, 20], seed=7)
    with torch.no_grad():
        ref = gen_family.hf.cpu().generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=16,
                                           num_beams=4, num_return_sequences=3, output_scores=True,
                                           return_dict_in_generate=True)
    out = t5.generate(model, ids, mask, max_new_tokens=16, num_beams=4, num_return_sequences=3)
    assert out.tokens.shape[0] == 9 and ref.sequences.shape[0] == 9
    for row in range(9):
        n = int(out.lengths[row])
        assert out.tokens[row, :n].tolist() == ref.sequences[row, 1:n + 1].tolist(), row
    torch.testing.assert_close(out.scores, ref.sequences_scores, atol=1e-3, rtol=1e-5)


def test_generation_stops_rows_at_eos(gen_family: Family) -> None:
    """The EOS-prone models really do stop rows at different steps, so the tests above see it."""
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7)
    greedy = t5.generate(model, ids, mask, max_new_tokens=32)
    beams = t5.generate(model, ids, mask, max_new_tokens=24, num_beams=4, early_stopping=True)
    assert len(set(greedy.lengths.tolist()) | set(beams.lengths.tolist())) > 1


def test_min_new_tokens(gen_family: Family) -> None:
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7)
    out = t5.generate(model, ids, mask, max_new_tokens=12, min_new_tokens=12)
    assert out.tokens.shape == (4, 12) and (out.lengths == 12).all()
    assert (out.tokens[:, :11] != model.config.eos_token_id).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_reproducible_and_top_k_1_is_greedy(gen_family: Family, device: str) -> None:
    model = t5.load(gen_family.ours_dir, device=device)
    ids, mask = (x.to(device) for x in padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7))

    def sample(seed: int, **kwargs: object) -> t5.Generation:
        g = torch.Generator(device).manual_seed(seed)
        return t5.generate(model, ids, mask, max_new_tokens=16, do_sample=True, generator=g, **kwargs)

    first, again, other = sample(0, temperature=1.5), sample(0, temperature=1.5), sample(1, temperature=1.5)
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    greedy = t5.generate(model, ids, mask, max_new_tokens=16)
    assert torch.equal(sample(3, top_k=1).tokens, greedy.tokens)
    assert torch.equal(sample(4, top_p=1e-6).tokens, greedy.tokens)  # only the most likely token survives
    assert torch.equal(sample(6, temperature=1e-39).tokens, greedy.tokens)  # logits / temperature: no inf, NaN
    many = sample(5, num_return_sequences=3, top_k=20, top_p=0.9)
    assert many.tokens.shape[0] == 12 and many.lengths.shape == (12,)
    assert len({tuple(row.tolist()) for row in many.tokens[:3]}) > 1  # three samples of one input differ


def test_top_k_top_p_filtering() -> None:
    """next_token never draws outside the top-k set or the top-p nucleus."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    g = torch.Generator().manual_seed(0)
    draw = lambda **kw: t5.next_token(logits, do_sample=True, temperature=1.0, generator=g, **{"top_k": None, "top_p": None, **kw})
    assert set(draw(top_k=2).tolist()) == {0, 1}
    assert set(draw(top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draw(top_p=0.81).tolist()) == {0, 1, 2}
    # at the boundary, as transformers' TopPLogitsWarper: the more likely tokens reach top_p, this one goes
    exact = torch.log(torch.tensor([[0.5, 0.25, 0.1875, 0.0625]])).expand(2000, 4)  # sums exact in binary
    for top_p, kept in [(0.5, {0}), (0.75, {0, 1}), (0.9375, {0, 1, 2})]:
        assert set(t5.next_token(exact, do_sample=True, top_p=top_p, generator=g).tolist()) == kept
        hf = transformers.TopPLogitsWarper(top_p)(None, exact[:1])
        assert set(torch.nonzero(hf[0] > -math.inf).flatten().tolist()) == kept
    counts = torch.bincount(draw(), minlength=4) / 2000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04, rtol=0)


def test_stream_yields_what_generate_returns(gen_family: Family) -> None:
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7)
    streamed = torch.stack(list(t5.stream(model, ids, mask, max_new_tokens=20)), dim=1)
    assert torch.equal(streamed, t5.generate(model, ids, mask, max_new_tokens=20).tokens)


def test_generation_options_once() -> None:
    """generate and stream take a GenerationOptions or its fields as Hugging Face-named keywords
    (keywords replace the options' fields); an unknown keyword is named."""
    model, tokenizer = t5.load(HERE / "demo"), t5.load_tokenizer(HERE / "demo")
    ids, mask = tokenizer.encode_batch(["spell: 12", "spell: 300"])
    by_keywords = t5.generate(model, ids, mask, max_new_tokens=8, num_beams=2)
    options = t5.GenerationOptions(max_new_tokens=3, num_beams=2)
    by_options = t5.generate(model, ids, mask, options, max_new_tokens=8)
    assert torch.equal(by_keywords.tokens, by_options.tokens)
    with pytest.raises(TypeError, match="max_tokens"):
        t5.generate(model, ids, mask, max_new_tokens=8, max_tokens=3)
    with pytest.raises(TypeError, match="beams"):
        next(t5.stream(model, ids, mask, max_new_tokens=8, beams=3))
    with pytest.raises(ValueError, match="num_beams must be at least 1"):
        t5.generate(model, ids, mask, options, num_beams=0)
    with pytest.raises(ValueError, match="stream does not do beam search"):
        next(t5.stream(model, ids, mask, options))


@pytest.mark.parametrize("device", DEVICES)
def test_left_padded_decoder_prompts_and_chunked_prefill(gen_family: Family, device: str) -> None:
    """Decoder prompts of different lengths, left-padded in one batch and prefilled in one call,
    continue exactly as each prompt does alone; T5's positions are relative, so the left padding
    changes nothing once it is masked."""
    model = t5.load(gen_family.ours_dir, device=device)
    ids, mask = (x.to(device) for x in padded_batch(gen_family.vocab, [13, 7, 20], seed=9))
    g = torch.Generator().manual_seed(10)
    start = model.config.decoder_start_token_id
    prompts = [torch.randint(2, gen_family.vocab, (n,), generator=g) for n in (5, 1, 3)]
    width = max(len(p) for p in prompts) + 1
    batch = torch.zeros(3, width, dtype=torch.long)
    batch_mask = torch.zeros(3, width, dtype=torch.long)
    for row, p in enumerate(prompts):
        batch[row, width - len(p) - 1:] = torch.cat([torch.tensor([start]), p])
        batch_mask[row, width - len(p) - 1:] = 1
    together = t5.generate(model, ids, mask, max_new_tokens=10, min_new_tokens=10,
                           decoder_input_ids=batch.to(device), decoder_mask=batch_mask.to(device))
    for row, p in enumerate(prompts):
        alone = t5.generate(model, ids[row:row + 1, :int(mask[row].sum())], max_new_tokens=10, min_new_tokens=10,
                            decoder_input_ids=torch.cat([torch.tensor([start]), p])[None].to(device))
        assert torch.equal(together.tokens[row], alone.tokens[0])
        torch.testing.assert_close(together.scores[row], alone.scores[0], atol=1e-4, rtol=0)
    # right-padded (or empty) prompts would continue from a pad slot: refused, for beams too
    for flipped in (batch_mask.flip(1), torch.zeros_like(batch_mask)):
        with pytest.raises(ValueError, match="decoder prompts are left-padded"):
            t5.generate(model, ids, mask, max_new_tokens=2, num_beams=2, decoder_input_ids=batch.to(device),
                        decoder_mask=flipped.to(device))


def peak_bytes(fn: object) -> int:
    """Peak of the bytes allocated (and not yet freed) while fn runs, from the profiler's memory
    records on CPU (each allocation's bytes, each free's as negative bytes, in time order), or the
    CUDA allocator's statistics. The raw records, not `prof.events()`: building those per-op events
    costs about 0.1 ms each, seconds for a few dozen decode steps."""
    if torch.cuda.is_available() and getattr(fn, "device", "cpu") == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda record: record.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("device", DEVICES)
def test_decode_memory_is_flat(family: Family, device: str) -> None:
    """Once the cache exists, decoding 64 tokens needs no more memory than decoding 8: nothing
    grows with the generated length."""
    model = t5.load(family.ours_dir, device=device)
    ids, mask = (x.to(device) for x in padded_batch(family.vocab, [13, 7], seed=11))
    with torch.inference_mode():
        memory = model.decoder.memory(model.encoder(ids, mask), mask)
        cache = t5.make_cache(model.config, 2, 64, device=device)

        def decode(steps: int) -> object:
            def run() -> None:
                token = torch.zeros(2, 1, dtype=torch.long, device=device)
                position = torch.zeros(1, dtype=torch.long, device=device)
                for _ in range(steps):
                    token = t5.decode_step(model, token, memory, cache, position).argmax(-1, keepdim=True)
                    position += 1
            run.device = device
            return run

        short, long = peak_bytes(decode(8)), peak_bytes(decode(64))
    assert 0 < long <= short


def test_cache_errors(family: Family) -> None:
    model = t5.load(family.ours_dir)
    ids, mask = padded_batch(family.vocab, [5, 3])
    memory = model.decoder.memory(model.encoder(ids, mask), mask)
    cache = t5.make_cache(model.config, 2, 4)
    token = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match=r"decoder position 4 is outside the cache's \[0, 4\)"):
        t5.decode_step(model, token, memory, cache, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"positions must be a \(1,\) int64 tensor"):
        t5.decode_step(model, token, memory, cache, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="not a multiple of the memory's batch 2"):
        t5.decode_step(model, torch.zeros(3, 1, dtype=torch.long), memory, cache, torch.tensor([0]))
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        t5.generate(model, ids, mask, max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        t5.generate(model, ids, mask, max_new_tokens=3, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="early_stopping must be"):
        t5.generate(model, ids, mask, max_new_tokens=3, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="temperature must be positive and finite, got inf"):  # NaN rows past EOS bans
        t5.generate(model, ids, mask, max_new_tokens=3, min_new_tokens=2, do_sample=True, temperature=math.inf)
    # a step of fewer rows than the cache's would write its rows into every row of the cache
    with pytest.raises(ValueError, match="input_ids has 1 rows but the cache has 2"):
        t5.decode_step(model, token[:1], model.decoder.memory(memory.encoded[:1]), cache, torch.tensor([0]))
    for count, value, kind in [("max_new_tokens", 4.0, "an int"), ("max_new_tokens", None, "an int"),
                               ("num_beams", 2.0, "an int"), ("top_k", 2.0, "an int"),
                               ("num_return_sequences", True, "an int"), ("min_new_tokens", 1.0, "an int"),
                               ("do_sample", "False", "a bool"), ("compile", 1, "a bool"),
                               ("temperature", "0.7", "a number"), ("top_p", True, "a number")]:
        with pytest.raises(ValueError, match=f"{count} must be {kind}, got {value!r}"):  # "False" sampled
            t5.generate(model, ids, mask, **{"max_new_tokens": 3, "do_sample": True, count: value})
    t5.generate(model, ids, mask, max_new_tokens=2, do_sample=True, temperature=2, top_p=1)  # ints for floats
    with pytest.raises(ValueError, match=r"input_mask must have shape \(batch, seq\)"):  # not "packing ... cross_mask"
        model(ids, ids, input_mask=mask[0])
    with pytest.raises(ValueError, match="the cache .* was not made for this model"):  # another dtype
        t5.prefill(model, ids, mask, max_new_tokens=3, cache=t5.make_cache(model.config, 2, 4, dtype=torch.bfloat16))
    other = dataclasses.replace(model.config, num_heads=model.config.num_heads + 1)
    with pytest.raises(ValueError, match="the cache .* was not made for this model"):  # another model's
        t5.prefill(model, ids, mask, max_new_tokens=3, cache=t5.make_cache(other, 2, 4))
    for name, value in [("max_new_tokens", -1), ("max_new_tokens", 2.0), ("n", 0), ("n", -1)]:
        with pytest.raises(ValueError, match=f"{name} must be an int of at least ., got {value}"):
            t5.prefill(model, ids, mask, **{"max_new_tokens": 3, name: value})
    with pytest.raises(ValueError, match="decoder position -1 is outside"):  # not "past max_len"
        t5.decode_step(model, token, memory, cache, torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"positions must be a \(1,\) int64 tensor, got 1"):  # a Python int
        t5.decode_step(model, token, memory, cache, 1)
    with pytest.raises(ValueError, match="decoder_input_ids holds token id"):  # not input_ids, which are fine
        t5.generate(model, ids, mask, max_new_tokens=2, decoder_input_ids=torch.full((2, 1), family.vocab))
    for name, value in [("length_penalty", math.nan), ("length_penalty", "1.0"), ("early_stopping", 1)]:
        with pytest.raises(ValueError, match=f"{name} must be"):  # NaN scores; 1 would act as False
            t5.generate(model, ids, mask, max_new_tokens=3, num_beams=2, **{name: value})
    with pytest.raises(ValueError, match="input_ids must be a \\(batch, seq\\) int64 or int32 tensor"):  # not "decoder_.."
        t5.generate(model, ids[0], max_new_tokens=2, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="generation needs a T5 .* got T5Encoder"):
        t5.generate(model.encoder, ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_flop_counter_matches_flop_counter_mode(name: str) -> None:
    """The analytic count equals torch's FlopCounterMode over the real forward, exactly, for the
    encoder, the teacher-forced encoder-decoder and one cached decode step. SDPA runs under the MATH
    backend and linear layers through F.linear (oneDNN off): FlopCounterMode counts 0 FLOPs for the
    CPU flash kernel and for oneDNN's linear op, which do the same matmuls."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny_config(name)
    torch.manual_seed(0)
    model = t5.T5(config).eval()
    ids = torch.randint(0, config.vocab_size, (3, 17))
    dec = torch.randint(0, config.vocab_size, (3, 6))

    def counted(fn: object) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.backends.mkldnn.flags(enabled=False):
        assert counted(lambda: model.encoder(ids)) == t5.encoder_flops(config, 3, 17).total
        full = t5.encoder_flops(config, 3, 17).total + t5.decoder_flops(config, 3, 6, 17).total
        assert counted(lambda: model(ids, dec)) == full
        memory = model.decoder.memory(model.encoder(ids), None)
        cache = t5.make_cache(config, 3, 21)
        step = t5.decode_step_flops(config, 3, 17, 21)
        assert counted(lambda: t5.decode_step(model, dec[:, :1], memory, cache, torch.tensor([4]))) == step.total
    assert step.lm_head == 2 * 3 * config.d_model * config.vocab_size and step.attn_proj > 0 and step.ffn > 0


def test_flop_formulas_at_real_shapes() -> None:
    """t5-v1_1-base encoder, 8 x 128 tokens: the components add up as the docstrings derive them."""
    config = t5.T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_heads=12, num_encoder_layers=12,
                         num_decoder_layers=12, ffn="gated-gelu")
    flops = t5.encoder_flops(config, 8, 128)
    tokens = 8 * 128
    assert flops.attn_proj == 12 * 2 * tokens * 768 * 4 * 768
    assert flops.attn_scores == 12 * 4 * 8 * 12 * 128 * 128 * 64
    assert flops.ffn == 12 * 2 * tokens * 768 * 2048 * 3
    assert flops.lm_head == 0 and flops.total == sum(flops)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_encoder_and_decode_step_fullgraph(device: str) -> None:
    """torch.compile(fullgraph=True) of the encoder and of the cached decode step: no graph
    breaks anywhere in the layers, and the same numbers as eager, with masks and at batch 1 without."""
    config = tiny_config("umt5")
    torch.manual_seed(0)
    model = t5.T5(config).eval().to(device)
    ids, mask = (x.to(device) for x in padded_batch(config.vocab_size, [9, 5], seed=12))
    torch._dynamo.reset()
    with torch.inference_mode():
        encoder = torch.compile(model.encoder, fullgraph=True, dynamic=False)
        torch.testing.assert_close(encoder(ids, mask), model.encoder(ids, mask), atol=1e-5, rtol=1e-5)
        step = torch.compile(t5.decode_step, fullgraph=True, dynamic=False)

        def steps_match(memory: t5.Memory, count: int) -> None:
            """`count` cached steps from the decoder start, compiled and eager: same logits, same cache."""
            batch = memory.encoded.shape[0]
            eager_cache, compiled_cache = (t5.make_cache(config, batch, 8, device=device) for _ in range(2))
            token = torch.zeros(batch, 1, dtype=torch.long, device=device)
            position = torch.zeros(1, dtype=torch.long, device=device)
            for _ in range(count):  # the position tensor advances in place: no recompilation
                expected = t5.decode_step(model, token, memory, eager_cache, position)
                torch.testing.assert_close(step(model, token, memory, compiled_cache, position), expected,
                                           atol=1e-5, rtol=1e-5)
                token = expected.argmax(-1, keepdim=True)
                position += 1
            torch.testing.assert_close(compiled_cache.kv, eager_cache.kv, atol=1e-5, rtol=1e-5)

        steps_match(model.decoder.memory(model.encoder(ids, mask), mask), 3)
        # batch 1 without a mask: no cross mask in the step (on CPU its attention is written out)
        steps_match(model.decoder.memory(model.encoder(ids[:1])), 2)


def test_compiled_generate_survives_many_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """15 mixes of shapes users make with compile=True in one process: batch 1 after batch 2,
    source length 1, beams 2-4 after greedy, then sampling. Each of those variants is a compile
    of its own; past torch's recompile limit the step must run eagerly (with a warning) instead of
    failing, and every call gives eager's tokens; a shape refused once is not offered to torch
    again (torch logs each refusal: before, it did so at every step). The limit is lowered from 8
    to 3 so that the test reaches it after three compiles (about 7 s each here) rather than eight."""
    import logging

    import torch._dynamo

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    dynamo_log = logging.getLogger("torch._dynamo")
    monkeypatch.setattr(dynamo_log, "handlers", [*dynamo_log.handlers, handler])  # detached at teardown
    # torch's own patch: after monkeypatch.setattr restored it, torch 2.9 no longer knew the name
    with torch._dynamo.config.patch(recompile_limit=3):
        torch._dynamo.reset()
        t5.compiled_decode_step.cache_clear()
        config = dataclasses.replace(tiny_config("t5-v1.1"), num_encoder_layers=1, num_decoder_layers=1)
        model = t5.T5(config).eval()
        train.init_weights(model, torch.Generator().manual_seed(0))
        # (batch, source length, new tokens, beams)
        shapes = [(2, 5, 4, 1), (1, 7, 6, 1), (3, 1, 3, 1), (1, 1, 5, 1), (2, 9, 4, 2), (1, 6, 3, 3), (4, 12, 5, 1),
                  (2, 4, 6, 4), (5, 8, 2, 1), (1, 13, 7, 2), (3, 17, 4, 3), (6, 3, 3, 1), (2, 1, 4, 2), (7, 10, 3, 1),
                  (8, 11, 6, 1)]
        fallbacks = 0

        def compiled_generate(*args: torch.Tensor, **options: object) -> t5.Generation:
            nonlocal fallbacks
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                out = t5.generate(model, *args, compile=True, **options)
            fallbacks += any("recompile limit" in str(w.message) for w in caught)
            return out

        for batch, src, new, beams in shapes:
            ids, mask = padded_batch(config.vocab_size, [src] + [max(1, src - 3)] * (batch - 1), seed=batch + src)
            options = dict(max_new_tokens=new, min_new_tokens=new, num_beams=beams)
            compiled = compiled_generate(ids, mask, **options)
            eager = t5.generate(model, ids, mask, **options)
            assert torch.equal(compiled.tokens, eager.tokens), (batch, src, new, beams)
        sample = dict(max_new_tokens=4, do_sample=True, top_k=5)
        ids, mask = padded_batch(config.vocab_size, [6, 2], seed=5)
        compiled = compiled_generate(ids, mask, generator=torch.Generator().manual_seed(1), **sample)
        eager = t5.generate(model, ids, mask, generator=torch.Generator().manual_seed(1), **sample)
        assert torch.equal(compiled.tokens, eager.tokens)
        assert fallbacks > 0  # the limit was reached, and survived
        assert 0 < sum("recompile_limit" in record.getMessage() for record in records) <= fallbacks  # once a shape
    torch._dynamo.reset()
    t5.compiled_decode_step.cache_clear()


def test_reused_cache_equals_fresh_cache(gen_family: Family) -> None:
    """A cache used for a left-padded request, then reused for another request, gives the logits
    a fresh cache gives (the padding slots of the first request do not leak)."""
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [9, 4], seed=21)
    start = model.config.decoder_start_token_id
    prompt = torch.tensor([[start, 5, 6, 7], [0, 0, start, 8]])
    prompt_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with torch.inference_mode():
        first = t5.prefill(model, ids, mask, max_new_tokens=6, decoder_input_ids=prompt, decoder_mask=prompt_mask)
        for _ in range(2):
            t5.decode_step(model, first.logits.argmax(-1, keepdim=True), first.memory, first.cache, first.position)
            first.position.add_(1)
        assert not first.cache.attend.all()  # the first request left padding slots behind
        other = torch.tensor([[start, 9, 10, 11], [start, 12, 13, 14]])
        reused = t5.prefill(model, ids, mask, max_new_tokens=6, decoder_input_ids=other, cache=first.cache)
        fresh = t5.prefill(model, ids, mask, max_new_tokens=6, decoder_input_ids=other)
        torch.testing.assert_close(reused.logits, fresh.logits, atol=1e-6, rtol=0)
        token = fresh.logits.argmax(-1, keepdim=True)
        for _ in range(3):
            a = t5.decode_step(model, token, reused.memory, reused.cache, reused.position)
            b = t5.decode_step(model, token, fresh.memory, fresh.cache, fresh.position)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            token = b.argmax(-1, keepdim=True)
            reused.position.add_(1)
            fresh.position.add_(1)
    with pytest.raises(ValueError, match="holds 2 rows of 10 slots; this decode needs 2 rows of 11"):
        t5.prefill(model, ids, mask, max_new_tokens=7, decoder_input_ids=other, cache=first.cache)


def test_custom_loop_with_public_names_equals_generate(gen_family: Family) -> None:
    """prefill + decode_step + next_token (with its defaults) is greedy `generate`, left-padded
    decoder prompt included."""
    model = t5.load(gen_family.ours_dir)
    ids, mask = padded_batch(gen_family.vocab, [11, 6], seed=23)
    start = model.config.decoder_start_token_id
    prompt, prompt_mask = torch.tensor([[start, 5, 6], [0, start, 7]]), torch.tensor([[1, 1, 1], [0, 1, 1]])
    reference = t5.generate(model, ids, mask, max_new_tokens=5, min_new_tokens=5, decoder_input_ids=prompt,
                            decoder_mask=prompt_mask)
    tokens = []
    with torch.inference_mode():
        state = t5.prefill(model, ids, mask, max_new_tokens=5, decoder_input_ids=prompt, decoder_mask=prompt_mask)
        logits = state.logits
        for _ in range(5):
            logits[:, model.config.eos_token_id] = -math.inf  # as min_new_tokens does
            token = t5.next_token(logits)
            tokens.append(token)
            logits = t5.decode_step(model, token[:, None], state.memory, state.cache, state.position,
                                    torch.ones(2, 1, dtype=torch.long))
            state.position.add_(1)
    assert torch.equal(torch.stack(tokens, dim=1), reference.tokens)


def test_generate_returns_ordinary_tensors(gen_family: Family) -> None:
    """generate's output feeds training directly (it ran under inference mode, it is not an
    inference tensor), and so do stream's tokens."""
    model = t5.load(gen_family.ours_dir).train()
    ids, mask = padded_batch(gen_family.vocab, [7, 5], seed=24)
    for out in (t5.generate(model, ids, mask, max_new_tokens=4), t5.generate(model, ids, mask, max_new_tokens=4, num_beams=2)):
        assert not any(tensor.is_inference() for tensor in out)
        labels = out.tokens
        loss = model(ids, train.shift_right(labels, model.config), input_mask=mask, labels=labels).loss
        loss.backward()
    assert not any(token.is_inference() for token in t5.stream(model, ids, mask, max_new_tokens=3))


def test_beam_reorder_needs_no_second_cache() -> None:
    """Reordering beams copies one layer's keys or values of the written slots at a time: the
    extra memory is bounded by that, not by the cache (6 layers, 64 slots, 5 written)."""
    config = dataclasses.replace(tiny_config("t5-v1.1"), num_decoder_layers=6)
    cache = t5.make_cache(config, 8, 64)
    cache.kv.normal_()
    parents = torch.tensor([1, 1, 0, 3, 3, 3, 6, 7])
    expected = cache.kv.clone()
    expected[..., :5, :] = cache.kv[:, :, parents, :, :5]
    one_slice = cache.kv[0, 0, :, :, :5].numel() * cache.kv.element_size()
    peak = peak_bytes(lambda: t5.reorder_cache(cache, parents, 5))
    assert peak <= one_slice + 1024 < cache.kv.numel() * cache.kv.element_size() / 50
    assert torch.equal(cache.kv, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (this runs wherever one is)")
def test_decode_step_captures_in_a_cuda_graph() -> None:
    """A manual torch.cuda.CUDAGraph capture of decode_step, replayed after updating its inputs
    in place, gives eager's logits; torch.compile(mode="reduce-overhead") with a static-address
    cache does too."""
    config = tiny_config("umt5")
    torch.manual_seed(0)
    model = t5.T5(config).eval().cuda()
    ids, mask = (x.cuda() for x in padded_batch(config.vocab_size, [9, 5], seed=12))
    with torch.inference_mode():
        memory = model.decoder.memory(model.encoder(ids, mask), mask)
        eager_cache = t5.make_cache(config, 2, 8, device="cuda")
        graph_cache = t5.make_cache(config, 2, 8, device="cuda")
        token = torch.zeros(2, 1, dtype=torch.long, device="cuda")
        position = torch.zeros(1, dtype=torch.long, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            t5.decode_step(model, token, memory, graph_cache, position)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = t5.decode_step(model, token, memory, graph_cache, position)
        eager_token = token.clone()
        for step in range(3):
            position.fill_(step)
            graph.replay()
            expected = t5.decode_step(model, eager_token, memory, eager_cache, position)
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
            token.copy_(expected.argmax(-1, keepdim=True))
            eager_token = token.clone()
        static_cache = t5.make_cache(config, 2, 8, device="cuda", static_address=True)
        step_fn = torch.compile(t5.decode_step, mode="reduce-overhead", fullgraph=True)
        check_cache = t5.make_cache(config, 2, 8, device="cuda")
        token = torch.zeros(2, 1, dtype=torch.long, device="cuda")
        for step in range(4):
            position = torch.full((1,), step, dtype=torch.long, device="cuda")
            got = step_fn(model, token, memory, static_cache, position).clone()
            expected = t5.decode_step(model, token, memory, check_cache, position)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            token = expected.argmax(-1, keepdim=True)


########################################################################################
# The demo model and the command line: cli.py, its mistakes
########################################################################################


def test_demo_model_spells_held_out_numbers() -> None:
    """The model shipped in demo/ spells at least 95% of the 200 held-out numbers exactly."""
    model = t5.load(HERE / "demo")
    tokenizer = t5.load_tokenizer(HERE / "demo", model.config)
    numbers = train.held_out()
    assert len(numbers) == 200
    accuracy = train.evaluate(model, tokenizer, numbers)
    assert accuracy >= 0.95, accuracy
    assert train.spell(4071) == "four thousand seventy-one" and train.spell(90_019) == "ninety thousand nineteen"


def run_cli(*args: str | bytes, stdin: str | bytes | None = None) -> subprocess.CompletedProcess:
    """`cli.py ARGS` run in the repository folder: its return code, stdout and stderr, as text
    unless an argument or stdin is bytes.

    In this process (a new interpreter costs about 4 s of `import torch` here, the command itself
    a fraction of a second): `cli.main(argv)` with stdin, stdout and stderr swapped for in-memory
    files encoded as a real run's (UTF-8; surrogateescape on stdout, backslashreplace on stderr;
    text read back with universal newlines, as subprocess does). Bytes arguments become str as
    Python makes them of a real argv (`os.fsdecode`). argparse's SystemExit (2 for its errors, 0
    for --help) and an uncaught exception (its traceback on stderr, exit 1) become the return code
    the interpreter would give. Warnings are printed on the captured stderr under a fresh
    interpreter's filters (pytest would otherwise record them and hide them from the one-line
    checks). COLUMNS is 80 unless set, as for a real run's piped stdout (argparse wraps --help to
    the terminal). The working folder, the environment, the warnings filters and torch's random
    state are restored afterwards; cli.py changes nothing else global (no thread settings, and
    --compile, whose cached compiled step would outlive the call, is not run here).

    What needs a process runs in one, without this helper:
      - test_cli_broken_pipe_ctrl_c_and_batches_as_lines_arrive: two `python cli.py generate`
        processes, end to end through stdin and stdout: lines answered while stdin is still open,
        Ctrl-C (SIGINT), a reader that leaves (a closed pipe), and the exit status a shell sees
        through `sys.exit(main())` (130, 141);
      - test_cli_is_quiet_without_numpy: what importing torch prints, numpy hidden before anything
        is imported; cli.py run as __main__, exit status 0 and its answer on stdout.
    The converter's command runs as a process in test_convert_cli_subprocess."""
    text = not isinstance(stdin, bytes) and not any(isinstance(arg, bytes) for arg in args)
    argv = [os.fsdecode(arg) for arg in args]
    data = stdin.encode() if isinstance(stdin, str) else stdin or b""
    fake_in = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="surrogateescape")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape")
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: object = None,
             line: str | None = None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    real_stdin, cwd = sys.stdin, os.getcwd()
    # argparse wraps --help to the terminal's width: a real run's stdout is a pipe (80 columns)
    width = mock.patch.dict(os.environ, {"COLUMNS": os.environ.get("COLUMNS", "80")})
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(), contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err), width:
        warnings.resetwarnings()  # a fresh interpreter's filters (no -W, no dev mode)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__|cli")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category, append=True)
        warnings.showwarning = show
        sys.stdin = fake_in
        os.chdir(HERE)
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
            if not isinstance(exit.code, (int, type(None))):
                print(exit.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(cwd)
            sys.stdin = real_stdin
            out.flush()
            err.flush()
    streams = [stream.buffer.getvalue() for stream in (out, err)]
    if text:
        streams = [s.decode().replace("\r\n", "\n").replace("\r", "\n") for s in streams]
    return subprocess.CompletedProcess(["cli.py", *argv], code, *streams)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    assert result.returncode != 0, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_demo_spells_small_numbers_and_train_keeps_demo(tmp_path: Path) -> None:
    result = run_cli("generate", *[f"spell: {n}" for n in range(21)])
    assert result.stdout.splitlines() == [train.spell(n) for n in range(21)]
    out = tmp_path / "kept"
    out.mkdir()
    assert train.main(["--out", str(out), "--steps", "1"]) == 2  # refused before any training
    for flag, value in (("--steps", "0"), ("--batch", "7992"), ("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"),
                        ("--seed", str(2**64))):  # a traceback, or (--lr inf) a NaN model saved
        assert train.main(["--out", str(tmp_path / "new"), flag, value]) == 2, (flag, value)
    assert not (tmp_path / "new").exists()
    assert all(0 < train.lr_factor(step, steps) <= 1 for steps in (1, 19, 20, 1500) for step in range(steps))
    assert list(out.iterdir()) == []
    transformers.T5Config(vocab_size=100).save_pretrained(out)  # a transformers folder: refused before, too
    assert train.main(["--out", str(out), "--steps", "1", "--force"]) == 2
    assert [p.name for p in out.iterdir()] == ["config.json"]
    (tmp_path / "file").write_text("mine")  # a file: refused before training (t5.save refused it after)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for bad in ("file", "file/model", "dangling"):
        assert train.main(["--out", str(tmp_path / bad), "--steps", "1", "--force"]) == 2, bad
    assert (tmp_path / "file").read_text() == "mine"
    default = next(a for a in train.parser()._actions if a.dest == "out").default
    assert default.resolve() != (HERE / "demo").resolve()


def test_train_interrupted_while_saving_says_what_it_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """Ctrl-C between t5.save's renames leaves no config.json (never new weights under an old config):
    train.py says so, where it said the folder was unchanged."""
    replace, calls = Path.replace, []

    def interrupted(self: Path, target: Path) -> Path:
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(self, target)
    monkeypatch.setattr(Path, "replace", interrupted)
    assert train.main(["--out", str(tmp_path / "out"), "--steps", "1", "--batch", "8"]) == 130
    assert "lost its config.json" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_cli_generate_stream_batch_and_stdin() -> None:
    one = run_cli("generate", "spell: 4071")
    assert one.returncode == 0, one.stderr
    assert one.stdout == "four thousand seventy-one\n" and "tokens/s" in one.stderr
    many = run_cli("generate", "--num-beams", "2", "--max-new-tokens", "20", stdin="spell: 12\nspell: 300\n")
    assert many.returncode == 0, many.stderr
    assert many.stdout.splitlines() == ["twelve", "three hundred"]
    sampled = [run_cli("generate", "spell: 4071", "--temperature", "1.5", "--seed", "3").stdout for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0].strip()


def test_cli_streams_what_it_prints_in_a_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """A streamed answer (one prompt) equals the batched one (stdin) with a byte-fallback vocabulary
    (UMT5's kind), whose characters arrive one byte piece at a time; control characters a model
    makes print as spaces; closed stdin or stdout is an error, not silence."""
    import random

    import sentencepiece

    words = ["".join(random.Random(i).choices(["ka", "to", "ri", "mo", "ne"], k=1 + i % 3)) for i in range(60)]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(words[(7 * i + j) % 60] for j in range(8)) for i in range(500)))
    sentencepiece.SentencePieceTrainer.train(
        input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "spiece"), vocab_size=300, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, byte_fallback=True, character_coverage=1.0, minloglevel=2)
    config = t5.T5Config(vocab_size=400, d_model=32, d_kv=8, d_ff=48, num_heads=2, num_encoder_layers=1,
                         num_decoder_layers=1, ffn="gated-gelu")
    tokenizer = t5.load_tokenizer(tmp_path, config)
    torch.manual_seed(0)
    t5.save(t5.T5(config), tmp_path / "ckpt", tokenizer)
    answers = []
    for seed in range(6):
        flags = ["--ckpt", str(tmp_path / "ckpt"), "--temperature", "3", "--seed", str(seed), "--max-new-tokens", "24"]
        streamed, batched = run_cli("generate", "kato ne", *flags), run_cli("generate", *flags, stdin="kato ne\n")
        assert streamed.stdout == batched.stdout and streamed.stdout.count("\n") == 1, (seed, streamed, batched)
        answers.append(streamed.stdout)
    assert any(ord(ch) > 127 and ch != "\ufffd" for ch in "".join(answers))  # characters made of byte pieces
    assert cli._one_line("a\rb\x00c\x1bd\u2028e\x85f\tg") == "a b c d e f\tg"
    for closed, args in (("stdin", ["generate"]), ("stdout", ["generate", "spell: 7"]), ("stdout", ["flops"])):
        with monkeypatch.context() as patch:
            patch.setattr(sys, closed, None)
            assert cli.main(args) == 2
        assert f"{closed} is closed" in capsys.readouterr().err


def test_cli_encode_and_flops(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "hidden.safetensors"
    result = run_cli("encode", "spell: 7", "spell: 1234", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = load_file(out)
    encoder = t5.load(HERE / "demo", encoder_only=True)
    with torch.no_grad():
        torch.testing.assert_close(saved["hidden"], encoder(saved["input_ids"], saved["mask"]))
    flops = run_cli("flops", "--batch", "2", "--src", "32", "--tgt", "8")
    assert flops.returncode == 0 and "encoder forward (2 x 32)" in flops.stdout
    config = t5.T5Config.load(HERE / "demo" / "config.json")
    assert f"{t5.encoder_flops(config, 2, 32).total / 1e9:12.4f}" in flops.stdout
    # a decode step of `generate`: the start token and 8 new ones in the cache (the source is not in it)
    step = t5.decode_step_flops(config, 2, 32, 9).total
    assert "one cached decode step (cache of 9, over 32)" in flops.stdout and f"{step / 1e9:12.4f}" in flops.stdout


def test_cli_stdin_lines_stay_aligned() -> None:
    """Blank lines get blank answers in their place; CRLF line ends are stripped."""
    result = run_cli("generate", "--batch-size", "2", stdin="spell: 12\r\n\n  \nspell: 300\r\nspell: 5\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n") == ["twelve", "", "", "three hundred", "five", ""]
    for blank in ("", "  "):  # the same rule for a blank prompt given as an argument
        result = run_cli("generate", blank)
        assert result.returncode == 0 and result.stdout == "\n", (result.stdout, result.stderr)


def test_cli_max_input_tokens_and_long_input_warning(tmp_path: Path) -> None:
    out = tmp_path / "h.safetensors"
    result = run_cli("encode", "spell: 123456789", "spell: 1", "--max-input-tokens", "5", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = load_file(out)
    tokenizer = t5.load_tokenizer(HERE / "demo")
    assert saved["input_ids"].shape == (2, 5) and saved["input_ids"][0, -1] == tokenizer.eos_id
    assert saved["input_ids"][0].tolist() == tokenizer.encode("spell: 123456789")[:4] + [tokenizer.eos_id]
    length = len(tokenizer.encode("spell: " + "7" * 1100))
    assert length > cli.LONG_INPUT
    long = run_cli("encode", "spell: " + "7" * 1100, "--out", str(out), "--force")
    assert long.returncode == 0 and f"prompt 1 is {length} tokens long" in long.stderr, long.stderr
    assert "--max-input-tokens" in long.stderr
    short = run_cli("encode", "spell: " + "7" * 1100, "--out", str(out), "--force", "--max-input-tokens", "512")
    assert short.returncode == 0 and "warning" not in short.stderr and load_file(out)["input_ids"].shape == (1, 512)


def test_cli_stdin_encode_in_batches_equals_one_batch(tmp_path: Path) -> None:
    lines = "spell: 7\nspell: 123\n\nspell: 99999\n"
    one, many = tmp_path / "one.safetensors", tmp_path / "many.safetensors"
    assert run_cli("encode", "--out", str(one), stdin=lines).returncode == 0
    assert run_cli("encode", "--out", str(many), "--batch-size", "1", stdin=lines).returncode == 0
    a, b = load_file(one), load_file(many)
    assert a["input_ids"].shape[0] == 4
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["mask"], b["mask"])
    torch.testing.assert_close(a["hidden"], b["hidden"], atol=1e-5, rtol=0)  # padding-invariant encoder


def test_cli_encode_fixed_length_without_mask(tmp_path: Path) -> None:
    """`encode --max-length N --no-mask`: the Flux / SD3 call from the command line."""
    out = tmp_path / "h.safetensors"
    result = run_cli("encode", "spell: 7", "spell: 98765", "--max-length", "12", "--no-mask", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = load_file(out)
    tokenizer, encoder = t5.load_tokenizer(HERE / "demo"), t5.load(HERE / "demo", encoder_only=True)
    ids, mask = tokenizer.encode_batch(["spell: 7", "spell: 98765"], max_length=12, padding="max_length", truncation=True)
    assert torch.equal(saved["input_ids"], ids) and torch.equal(saved["mask"], mask) and ids.shape == (2, 12)
    with torch.no_grad():
        torch.testing.assert_close(saved["hidden"], encoder(ids))
        assert not torch.allclose(saved["hidden"], encoder(ids, mask))  # the mask would have mattered
    assert_one_line_error(run_cli("encode", "x", "--max-length", "8", "--max-input-tokens", "4", "--out", str(out),
                                  "--force"), "--max-length already truncates")


def test_cli_dtype_defaults_to_the_checkpoint(tmp_path: Path) -> None:
    """A bfloat16 checkpoint runs in bfloat16 unless --dtype says otherwise (no silent upcast)."""
    import shutil

    ckpt = tmp_path / "bf16"
    shutil.copytree(HERE / "demo", ckpt)
    state = load_file(ckpt / "model.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, ckpt / "model.safetensors")
    out = tmp_path / "h.safetensors"
    assert run_cli("encode", "spell: 7", "--ckpt", str(ckpt), "--out", str(out)).returncode == 0
    assert load_file(out)["hidden"].dtype == torch.bfloat16
    assert run_cli("encode", "spell: 7", "--ckpt", str(ckpt), "--out", str(out), "--force",
                   "--dtype", "float32").returncode == 0
    assert load_file(out)["hidden"].dtype == torch.float32


def test_cli_temperature_zero_is_greedy() -> None:
    assert run_cli("generate", "spell: 4071", "--temperature", "0").stdout == "four thousand seventy-one\n"


@pytest.mark.parametrize("command, options", [
    ("generate", ["--ckpt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--num-beams", "--seed",
                  "--dtype", "--device", "--compile"]),
    ("encode", ["--ckpt", "--out", "--dtype", "--device"]),
    ("flops", ["--ckpt", "--batch", "--src", "--tgt"]),
])
def test_cli_help(command: str, options: list[str]) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0
    assert all(option in result.stdout for option in options)


def test_cli_every_option_has_help_with_its_default() -> None:
    import argparse

    commands = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (name, action.dest)
            if not action.required:
                assert "default" in action.help, (name, action.dest, action.help)
            if action.default not in (None, False, cli.DEMO, str(cli.DEMO), []):
                assert f"default: {action.default}" in action.help, (name, action.dest, action.help)
    text = run_cli("generate", "--help").stdout
    assert "(default: 64)" in text and "(default: 0)" in text


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--ckpt", "no/such/dir"], "--ckpt no/such/dir: no converted checkpoint there"),
    (["generate", "x", "--device", "cuda:7"] if not torch.cuda.is_available() else ["generate", "x", "--device", "nope"],
     "CUDA is not available" if not torch.cuda.is_available() else "unknown device"),
    (["generate", "x", "--num-beams", "2", "--top-k", "3"], "does not combine"),
    (["generate", "x", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "x", "--device", "mps"], "--device mps: not a device this machine can run on"),
    (["generate", "x", "--device", "meta"], "--device meta: not a device this machine can run on"),
    (["generate", "x", "--num-beams", "0"], "--num-beams must be at least 1"),
    (["generate", "x", "--num-beams", "-2"], "--num-beams must be at least 1"),
    (["generate", "x", "--temperature", "0", "--top-k", "3"], "--temperature 0 is greedy decoding"),
    (["generate", "x", "--temperature", "0", "--top-p", "0.5"], "--temperature 0 is greedy decoding"),
    (["generate", "x", "--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["generate", "x", "--temperature", "nan"], "--temperature must be 0 (greedy) or positive and finite, got nan"),
    (["generate", "x", "--temperature", "inf"], "--temperature must be 0 (greedy) or positive and finite, got inf"),
    (["generate", "x", "--temperature", "1", "--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    (["generate", "x", "--device", "cpu:1"], "--device cpu:1: a CPU has no index but 0"),
    (["encode", "x", "--out", "/proc/hidden.safetensors"], "--out /proc/hidden.safetensors: cannot write in folder"),
    (["generate", "x", "--top-k", "0"], "--top-k must be at least 1"),
    (["generate", "x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["generate", "x", "--seed", "3"], "--seed only matters when sampling"),
    (["generate", "x", "--num-beams", "2", "--seed", "3"], "--seed only matters when sampling"),
    (["generate", "x", "--min-new-tokens", "9", "--max-new-tokens", "4"], "--min-new-tokens must be in [0, --max-new-tokens=4]"),
    (["generate", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["encode", "x", "--out", "unused.safetensors", "--max-input-tokens", "0"], "--max-input-tokens must be at least 1"),
    (["encode", "x", "--out", "unused.safetensors", "--no-mask"], "--no-mask needs --max-length N"),
    (["flops", "--batch", "0"], "--batch must be at least 1"),
    (["flops", "--src", "-5"], "--src must be at least 1"),
    (["flops", "--ckpt", "README.md"], "README.md: not a JSON config"),
    (["flops", "--ckpt", "no/such/dir"], "--ckpt no/such/dir: no checkpoint folder or config.json there"),
    (["flops", "--ckpt", "demo/model.safetensors"], "demo/model.safetensors: not a JSON config"),
])
def test_cli_mistakes_are_one_line(args: list[str], message: str) -> None:
    assert_one_line_error(run_cli(*args), message)


def test_cli_argparse_errors_have_one_error_line(tmp_path: Path) -> None:
    """argparse's own mistakes (usage, then one error line); the rest are in the table of CLI mistakes."""
    result = run_cli("generate", "x", "--dtype", "float8")
    assert result.returncode != 0
    assert "invalid choice: 'float8'" in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
    typo = run_cli("generate", "--num-beans", "4", "x")  # the command's parser says it, not the top one's
    assert typo.returncode == 2 and "cli.py generate: error: unrecognized arguments: --num-beans" in typo.stderr
    # options between prompts, as argparse takes them elsewhere
    mixed = run_cli("generate", "spell: 4071", "--max-new-tokens", "20", "spell: 12")
    assert mixed.returncode == 0 and mixed.stdout == "four thousand seventy-one\ntwelve\n", mixed.stderr
    dashed = run_cli("generate", "--max-new-tokens", "20", "--", "-x", "--help")  # after "--", prompts only
    assert dashed.returncode == 0 and len(dashed.stdout.splitlines()) == 2, dashed
    dashed = run_cli("generate", "spell: 4071", "--max-new-tokens", "20", "--", "spell: 12")  # options before it too
    assert dashed.returncode == 0 and dashed.stdout == "four thousand seventy-one\ntwelve\n", dashed
    # more than the machine holds (a cache of ~3 TB): one line, not torch's traceback
    assert_one_line_error(run_cli("generate", "spell: 12", "--max-new-tokens", str(10**9)), "out of memory")
    huge = run_cli("encode", "spell: 12", "--max-length", str(10**12), "--out", str(tmp_path / "x.safetensors"))
    assert_one_line_error(huge, "out of memory (MemoryError)")  # padding lists Python cannot hold


def test_cli_encode_out_is_checked_first_and_never_clobbered(tmp_path: Path) -> None:
    """--out problems are reported before the model loads (here --ckpt is bad too, and it is the
    --out error that comes); an existing file needs --force; the file gets ordinary permissions."""
    import shutil

    for out, message in [(tmp_path / "missing" / "x.safetensors", "does not exist"), (tmp_path, "is a folder"),
                         (f"{tmp_path / 'new'}/", "is a folder")]:  # a folder by its slash: no file "new" is made
        assert_one_line_error(run_cli("encode", "x", "--out", str(out), "--ckpt", "no/such/dir"), message)
    out = tmp_path / "hidden.safetensors"
    out.write_bytes(b"keep me")
    assert_one_line_error(run_cli("encode", "spell: 7", "--out", str(out)), "exists; pass --force")
    assert out.read_bytes() == b"keep me"
    result = run_cli("encode", "spell: 7", "--out", str(out), "--force")
    assert result.returncode == 0, result.stderr
    assert load_file(out)["hidden"].shape[0] == 1
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hidden.safetensors"]
    # a link: a dangling one "exists" too; with --force the file it points to is written, the link stays
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.safetensors")
    assert_one_line_error(run_cli("encode", "spell: 7", "--out", str(tmp_path / "dangling")), "exists; pass --force")
    (tmp_path / "link").symlink_to(out)
    assert run_cli("encode", "spell: 7", "spell: 8", "--out", str(tmp_path / "link"), "--force").returncode == 0
    assert (tmp_path / "link").is_symlink() and load_file(out)["hidden"].shape[0] == 2
    shutil.copytree(HERE / "demo", tmp_path / "demo")  # a file of the checkpoint read: never replaced
    assert_one_line_error(run_cli("encode", "x", "--ckpt", str(tmp_path / "demo"), "--force", "--out",
                                  str(tmp_path / "demo" / "model.safetensors")), "is a file of --ckpt")
    assert files_of(tmp_path / "demo") == files_of(HERE / "demo")
    shutil.rmtree(tmp_path / "demo")
    os.mkfifo(tmp_path / "fifo")  # not a file to replace, even with --force
    assert_one_line_error(run_cli("encode", "x", "--out", str(tmp_path / "fifo"), "--force"), "not a regular file")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli_encode_keeps_an_out_that_appears_while_encoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Without --force, --out is checked before the work and linked into place after it: a file that
    appeared in between is kept, and the error says so (a rename replaced it)."""
    out, write = tmp_path / "hidden.safetensors", t5.write_safetensors

    def write_as_another_writes_out(*args: object) -> None:
        out.write_bytes(b"theirs")
        write(*args)

    monkeypatch.setattr(t5, "write_safetensors", write_as_another_writes_out)
    assert cli.main(["encode", "spell: 7", "--out", str(out)]) == 2
    assert "appeared while encoding (kept)" in capsys.readouterr().err
    assert out.read_bytes() == b"theirs" and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_cli_non_utf8_prompts() -> None:
    assert_one_line_error(run_cli("generate", b"spell: \xff12"), "prompt 1 is not valid UTF-8")
    assert_one_line_error(run_cli("generate", stdin=b"spell: 1\nspell: \xff\n"), "line 2 of stdin is not valid UTF-8")


def test_cli_bad_checkpoints(tmp_path: Path) -> None:
    """A corrupt model.safetensors, a transformers folder, an encoder-only folder asked to generate:
    one line each, naming the file or saying what to do."""
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(HERE / "demo", corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[:len(data) // 2])
    assert_one_line_error(run_cli("generate", "x", "--ckpt", str(corrupt)),
                          f"{corrupt / 'model.safetensors'}: not a readable safetensors file")
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    assert_one_line_error(run_cli("generate", "x", "--ckpt", str(hf_dir)), "convert its folder first with convert_hf.py")
    encoder_only = tmp_path / "enc"
    shutil.copytree(HERE / "demo", encoder_only)
    state = load_file(encoder_only / "model.safetensors")
    save_file({k: v for k, v in state.items() if k.startswith("encoder.")}, encoder_only / "model.safetensors")
    result = run_cli("generate", "x", "--ckpt", str(encoder_only))
    assert_one_line_error(result, "holds only an encoder: it can `encode`, not `generate`")
    assert "encoder_only=True" not in result.stderr


def test_cli_truncated_sentencepiece_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`cli.py generate --ckpt X` (its main, in this process) with a truncated spiece.model."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(HERE / "demo", broken)
    data = (broken / "spiece.model").read_bytes()
    (broken / "spiece.model").write_bytes(data[:len(data) // 3])
    assert cli.main(["generate", "spell: 7", "--ckpt", str(broken)]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'spiece.model'}: not a readable sentencepiece model" in err and len(err.splitlines()) == 1, err


def test_cli_broken_pipe_ctrl_c_and_batches_as_lines_arrive() -> None:
    """Typed at a terminal (stdin a pty), each line is answered when it is entered (before, a batch of
    --batch-size lines was awaited); a reader that goes away (| head) and Ctrl-C end it quietly, without
    a traceback, Ctrl-C also while torch is still being imported (cli.py and convert_hf.py). Real
    processes (signals, pipes, the exit status a shell sees), started together so that their imports of
    torch overlap."""
    import pty
    import select
    import signal
    import time

    def start(*args: str, stdin: int = subprocess.PIPE, ignore_ctrl_c: bool = False) -> subprocess.Popen:
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_ctrl_c else None  # as `cmd &`
        return subprocess.Popen([sys.executable, *args], cwd=HERE, text=True, stdin=stdin, preexec_fn=ignore,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    terminal, typed = pty.openpty()
    early = [start("cli.py", "generate", "spell: 1"), start("convert_hf.py", "demo", "unused-out")]
    ignoring = start("cli.py", "generate", "spell: 2", ignore_ctrl_c=True)  # an ignored Ctrl-C stays ignored
    interrupted, left = start("cli.py", "generate", stdin=typed), start("cli.py", "generate", "--batch-size", "1")
    old = start("t5.py", "generate", "spell: 1")  # the command line's old place says where it went
    os.close(typed)
    for process in [*early, ignoring]:  # once torch's library is loaded: importing torch, after the handler
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline \
                and "libtorch" not in Path(f"/proc/{process.pid}/maps").read_text():
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
    os.write(terminal, b"spell: 12\n")
    lines = "".join(f"spell: {n}\n" for n in range(1, 200))
    left.stdin.write(lines)
    left.stdin.close()
    assert left.stdout.readline() == "one\n"
    left.stdout.close()  # the reader leaves, as `head -1` does
    err = left.stderr.read()
    left.wait(timeout=60)
    assert left.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert select.select([interrupted.stdout], [], [], 60)[0], "no answer while the terminal is open"
    assert interrupted.stdout.readline() == "twelve\n"  # the line was answered alone
    interrupted.send_signal(signal.SIGINT)
    _, err = interrupted.communicate(timeout=60)
    assert interrupted.returncode == 130 and "Traceback" not in err and "interrupted" in err
    os.close(terminal)
    for process in early:
        out, err = process.communicate(timeout=60)
        assert process.returncode == 130 and err.endswith("interrupted\n") and not out, err
    assert not (HERE / "unused-out").exists()
    assert ignoring.communicate(timeout=60)[0] == "two\n" and ignoring.returncode == 0
    out, err = old.communicate(timeout=60)
    assert old.returncode == 1 and not out and "the command line is cli.py" in err, err


def test_cli_run_as_main_puts_back_the_callers_ctrl_c_handler(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture) -> None:
    """cli.py run as __main__ in a host process (runpy, IPython's %run) holds Ctrl-C while torch loads,
    then puts back the host's handler (it put Python's default)."""
    import runpy
    import signal

    def mine(*_: object) -> None:
        pass

    previous = signal.signal(signal.SIGINT, mine)
    try:
        monkeypatch.setattr(sys, "argv", ["cli.py", "flops"])
        with pytest.raises(SystemExit) as exit:
            runpy.run_path(str(HERE / "cli.py"), run_name="__main__")
        assert exit.value.code == 0 and signal.getsignal(signal.SIGINT) is mine
        assert "GFLOP" in capsys.readouterr().out
    finally:
        signal.signal(signal.SIGINT, previous)


def test_cli_is_quiet_without_numpy() -> None:
    """The minimal requirements have no numpy; torch >= 2.12 then warns at import. The command line
    says nothing a user did not cause (numpy is hidden from the child process here)."""
    code = "import runpy, sys; sys.modules['numpy'] = None; sys.argv = ['cli.py', 'generate', 'spell: 12']; " \
           "runpy.run_path('cli.py', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert result.returncode == 0 and result.stdout == "twelve\n", result.stderr
    assert "NumPy" not in result.stderr and "Warning" not in result.stderr, result.stderr


########################################################################################
# Training: loss, packing, init, dropout, checkpointing, fine-tuning, FSDP2
########################################################################################


def random_model(name: str, seed: int = 0, **overrides: object) -> t5.T5:
    import dataclasses

    config = dataclasses.replace(tiny_config(name), **overrides)
    model = t5.T5(config)
    train.init_weights(model, torch.Generator().manual_seed(seed))
    return model


def test_loss_matches_hf_and_shift_right(family: Family) -> None:
    """labels= gives Hugging Face's loss (-100 ignored); shift_right makes its decoder inputs."""
    ours = t5.load(family.ours_dir)
    ids, mask = padded_batch(family.vocab, [12, 7, 9], seed=13)
    labels, label_mask = padded_batch(family.vocab, [6, 3, 5], seed=14)
    labels = labels.masked_fill(label_mask == 0, -100)
    with torch.no_grad():
        ref = family.hf.cpu()(input_ids=ids, attention_mask=mask, labels=labels)
        decoder_ids = train.shift_right(labels, ours.config)
        out = ours(ids, decoder_ids, input_mask=mask, labels=labels)
    assert torch.equal(decoder_ids, family.hf._shift_right(labels))
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["t5-v1.1", "umt5"])
def test_packed_batch_equals_unpacked(name: str) -> None:
    """Three examples packed into one row (3-dim masks from packing_masks) give the same logits
    and the same loss as the three run as an ordinary padded batch."""
    model = random_model(name).eval()
    config = model.config
    g = torch.Generator().manual_seed(15)
    sources = [torch.randint(3, config.vocab_size, (n,), generator=g) for n in (7, 4, 9)]
    targets = [torch.randint(3, config.vocab_size, (n,), generator=g) for n in (3, 6, 2)]
    packed_ids = torch.cat(sources)[None]
    packed_labels = torch.cat(targets)[None]
    packed_decoder = torch.cat([train.shift_right(t[None], config)[0] for t in targets])[None]
    input_segments = torch.cat([torch.full((len(s),), i + 1) for i, s in enumerate(sources)])[None]
    target_segments = torch.cat([torch.full((len(t),), i + 1) for i, t in enumerate(targets)])[None]
    input_mask, decoder_mask, cross_mask = train.packing_masks(input_segments, target_segments)
    # one padded slot at the end of each side: packing pads too, and padding must not leak
    pad = lambda x, value: torch.nn.functional.pad(x, (0, 1), value=value)
    input_mask, decoder_mask, cross_mask = train.packing_masks(pad(input_segments, 0), pad(target_segments, 0))
    with torch.no_grad():
        packed = model(pad(packed_ids, 0), pad(packed_decoder, 0), input_mask=input_mask, decoder_mask=decoder_mask,
                       cross_mask=cross_mask, labels=pad(packed_labels, -100))
        ids, mask = torch.nn.utils.rnn.pad_sequence(sources, batch_first=True), \
            torch.nn.utils.rnn.pad_sequence([torch.ones_like(s) for s in sources], batch_first=True)
        labels = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=-100)
        unpacked = model(ids, train.shift_right(labels, config), input_mask=mask, labels=labels)
    start = 0
    for row, target in enumerate(targets):
        n = len(target)
        torch.testing.assert_close(packed.logits[0, start:start + n], unpacked.logits[row, :n], atol=1e-5, rtol=1e-5)
        start += n
    torch.testing.assert_close(packed.loss, unpacked.loss, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("scale_qk", [False, True])
def test_init_weights_stds(scale_qk: bool) -> None:
    """Every parameter's std matches its formula (init_weights' docstring); norms are ones."""
    config = t5.T5Config(vocab_size=512, d_model=96, d_kv=24, d_ff=160, num_heads=5, num_encoder_layers=2,
                         num_decoder_layers=2, ffn="gated-gelu", scale_qk=scale_qk, bias_per_layer=True)
    model = t5.T5(config)
    train.init_weights(model, torch.Generator().manual_seed(0))
    d, e, i, f = 96, 24, 120, 160
    q = d**-0.5 if scale_qk else (d * e) ** -0.5
    expected = {"position_bias.embedding.weight": d**-0.5, "embedding.weight": 1.0, "attn.out.weight": i**-0.5,
                "cross_attn.q.weight": q, "cross_attn.kv.weight": d**-0.5, "ffn.wi.weight": d**-0.5,
                "ffn.wo.weight": f**-0.5, "lm_head.weight": d**-0.5 if scale_qk else 1.0}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("attn.qkv.weight"):  # fused [q; k; v]
            torch.testing.assert_close(param[:i].std().item(), q, rtol=0.05, atol=0)
            torch.testing.assert_close(param[i:].std().item(), d**-0.5, rtol=0.05, atol=0)
        else:
            std = next(v for k, v in expected.items() if name.endswith(k))
            tolerance = 0.15 if param.numel() < 1000 else 0.05  # the bias tables are small samples
            torch.testing.assert_close(param.std().item(), std, rtol=tolerance, atol=0, msg=name)
            assert abs(param.mean().item()) < 3 * std / param.numel() ** 0.5 + 1e-6, name
    again = t5.T5(config)
    train.init_weights(torch.compile(again), torch.Generator().manual_seed(0))  # through the model it wraps
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    # v1.0 (relu): lm_head starts as the input table times d**-0.5, transformers' tied output layer
    relu = t5.T5(dataclasses.replace(config, ffn="relu"))
    train.init_weights(relu, torch.Generator().manual_seed(0))
    assert torch.equal(relu.lm_head.weight, relu.encoder.embedding.weight * d**-0.5)
    assert torch.equal(relu.decoder.embedding.weight, relu.encoder.embedding.weight)
    with pytest.raises(ValueError, match="initialize a dense model"):  # a raw "normal_kernel_cpu" error
        train.init_weights(t5.quantize(relu))


def test_dropout_and_gradient_checkpointing() -> None:
    """Dropout acts in training only; checkpointed layers give the same loss and gradients."""
    model = random_model("t5-v1.1", dropout=0.3)
    ids, mask = padded_batch(model.config.vocab_size, [9, 6], seed=16)
    labels = torch.randint(3, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(17))
    decoder_ids = train.shift_right(labels, model.config)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, decoder_ids, mask).logits, model(ids, decoder_ids, mask).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids, decoder_ids, mask).logits, model(ids, decoder_ids, mask).logits)
    plain = random_model("t5-v1.1", dropout=0.0).train()  # no dropout: an exact comparison
    grads = []
    for checkpointing in (False, True):
        plain.encoder.checkpoint_layers = plain.decoder.checkpoint_layers = checkpointing
        plain.zero_grad()
        loss = plain(ids, decoder_ids, mask, labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in plain.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=0, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["t5-v1.1", "umt5"])
def test_finetune_matches_hf_then_saves_and_exports(name: str, tmp_path: Path) -> None:
    """Fine-tune, save, --to-hf: from the same converted weights, 5 AdamW steps (weight decay on,
    every parameter trained, embeddings included) on the same padded batches give transformers'
    loss at every step (1e-5: float32, different summation orders); `sum_embedding_grads` keeps
    our two input tables equal (transformers trains one shared table); `t5.save` writes the
    result, `convert_hf.py --to-hf` exports it, and transformers computes our logits from it."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", name)
    assert convert_hf.main([str(hf_dir), str(tmp_path / "ours")]) == 0
    ours = t5.load(tmp_path / "ours")  # eval(): no dropout in either, so the two runs can be compared
    hf = HF_MODELS[FAMILIES[name][0]].from_pretrained(hf_dir).eval()
    vocab = FAMILIES[name][1]["vocab_size"]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01) for m in (ours, hf)]
    for step in range(5):
        ids, mask = padded_batch(vocab, [9, 5, 7], seed=step)
        labels, label_mask = padded_batch(vocab, [4, 6, 3], seed=100 + step)
        labels = labels.masked_fill(label_mask == 0, -100)
        loss = ours(ids, train.shift_right(labels, ours.config), input_mask=mask, labels=labels).loss
        hf_loss = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert abs(loss.item() - hf_loss.item()) < 1e-5, (step, loss.item(), hf_loss.item())
        loss.backward()
        hf_loss.backward()
        train.sum_embedding_grads(ours)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    assert torch.equal(ours.encoder.embedding.weight, ours.decoder.embedding.weight)
    torch.testing.assert_close(ours.encoder.embedding.weight, hf.shared.weight, atol=1e-5, rtol=0)
    t5.save(ours, tmp_path / "finetuned")
    assert convert_hf.main(["--to-hf", str(tmp_path / "finetuned"), str(tmp_path / "back")]) == 0
    back = HF_MODELS[FAMILIES[name][0]].from_pretrained(tmp_path / "back").eval()
    ids, mask = padded_batch(vocab, [8, 3], seed=50)
    dec, dec_mask = padded_batch(vocab, [5, 2], seed=51)
    with torch.no_grad():
        logits = ours(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits
        exported = back(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        assert_close_where(logits, exported.logits, dec_mask, ATOL)
        reloaded = t5.load(tmp_path / "finetuned")(ids, dec, input_mask=mask, decoder_mask=dec_mask).logits
        assert torch.equal(reloaded, logits)


def test_sum_embedding_grads_frozen_or_tied_tables() -> None:
    """A frozen decoder table has no gradient for another reason than a missing backward: said so;
    both frozen, nothing to sum. Tables the user tied are one parameter, whose gradient autograd has
    summed already: left as it is; so is an encoder's one table. packing_masks refuses shapes it cannot pair; int32 labels work."""
    model = t5.T5(t5.T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=24, num_heads=2, num_encoder_layers=1,
                              num_decoder_layers=1, extra_ids=0))
    model.decoder.embedding.weight.requires_grad_(False)
    ids = torch.randint(0, 64, (2, 5))
    model(ids, ids, labels=ids).loss.backward()
    with pytest.raises(ValueError, match="both embeddings must be trained, or neither .the decoder's"):
        train.sum_embedding_grads(model)
    model.encoder.embedding.weight.requires_grad_(False)  # both frozen (fine-tuning the rest): nothing to sum
    model.zero_grad()
    model(ids, ids, labels=ids).loss.backward()
    train.sum_embedding_grads(model)
    model.encoder.embedding.weight.requires_grad_(True)
    model.decoder.embedding = model.encoder.embedding  # tied by the user: its gradient is already the sum
    model.zero_grad()
    model(ids, ids, labels=ids).loss.backward()
    grad = model.encoder.embedding.weight.grad.clone()
    train.sum_embedding_grads(model)
    assert torch.equal(model.encoder.embedding.weight.grad, grad)
    train.sum_embedding_grads(model.encoder)  # one table alone: nothing to sum (an AttributeError)
    assert torch.equal(model.encoder.embedding.weight.grad, grad)
    with pytest.raises(ValueError, match=r"segment ids \(batch, s\) and \(batch, t\), got \(5,\)"):
        train.packing_masks(torch.ones(5), torch.ones(1, 5))
    with pytest.raises(ValueError, match="packing_masks takes segment ids"):  # 2 inputs, 3 targets
        train.packing_masks(torch.ones(2, 5), torch.ones(3, 5))
    loss = model(ids, ids, labels=ids).loss  # int32 labels (as int32 ids): the same loss, not a RuntimeError
    assert torch.equal(model(ids.int(), ids.int(), labels=ids.int()).loss, loss)


def test_training_reduces_loss() -> None:
    """A tiny model (one layer each side) learns to reverse 8 random tokens given with the EOS that
    ends every T5 input (the anchor that makes the task quick to learn: output i is the input token
    i places before EOS): 200 AdamW steps, one-cycle learning rate, take the loss on the 8 tokens
    from above ln(21) = 3.0 to below 0.1 (it reaches about 0.02, and at most 0.045 over ten seeds).
    One thread: a model this small runs several times slower on 2 threads when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        config = t5.T5Config(vocab_size=24, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=1,
                             num_decoder_layers=1, ffn="gated-gelu", scale_qk=True, extra_ids=0, num_buckets=16,
                             max_distance=16)
        model = t5.T5(config)
        train.init_weights(model, torch.Generator().manual_seed(0))
        steps = 200
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=steps)
        g = torch.Generator().manual_seed(1)
        eos = torch.full((64, 1), config.eos_token_id)
        losses = []
        for _ in range(steps):
            tokens = torch.randint(3, 24, (64, 8), generator=g)
            ids, labels = torch.cat([tokens, eos], dim=1), tokens.flip(1)
            loss = model(ids, train.shift_right(labels, config), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[0] > 3.0
    assert sum(losses[-20:]) / 20 < 0.1, losses[-20:]


def two_ranks(worker: object, *args: object) -> None:
    """Run worker(rank, 2, *args) in two processes and wait for both. Not forked from this process:
    a child of a process that ran autograd may not run it (with Python 3.13 and torch 2.13's CUDA
    build, both FSDP tests failed so in two full runs). Without CUDA, forked from a server that
    imported this module once (5 to 10 s here); spawned where CUDA is present (an import per rank:
    the server's import asks CUDA for its devices, and a forked child cannot use a CUDA so touched)."""
    import multiprocessing

    import torch.multiprocessing as mp

    if torch.cuda.is_available():
        mp.start_processes(worker, args=(2, *args), nprocs=2, start_method="spawn")
        return
    multiprocessing.get_context("forkserver").set_forkserver_preload([__name__])
    mp.start_processes(worker, args=(2, *args), nprocs=2, start_method="forkserver")


def _fsdp_batch(config: t5.T5Config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(18)
    return (torch.randint(3, config.vocab_size, (4, 11), generator=g),
            torch.randint(3, config.vocab_size, (4, 6), generator=g))


def _fsdp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One FSDP2 rank: shard every layer and the root, run half of the batch, save the loss and
    the gathered gradients (rank 0)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)  # first: a forked rank must not enter its parent's OpenMP threads
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = random_model("t5-v1.1", dropout=0.0).train()
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        fully_shard(layer)
    fully_shard(model)
    ids, labels = _fsdp_batch(model.config)
    half = slice(rank * 2, rank * 2 + 2)
    loss = model(ids[half], train.shift_right(labels[half], model.config), labels=labels[half]).loss
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save({"loss": mean_loss / world, "grads": grads}, out)
    dist.barrier()
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: about one run in 40, torch's gloo/FSDP threads abort
    # the process at exit ("terminate called without an active exception"), after all the work above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_fsdp2_two_processes_match_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 over two gloo processes on CPU: the mean loss and the gathered gradients equal a
    single-process run on the whole batch within 1e-5."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback: no dependence on how the host name resolves

    out = tmp_path / "fsdp.pt"
    two_ranks(_fsdp_worker, str(tmp_path / "init"), str(out))
    sharded = torch.load(out)
    model = random_model("t5-v1.1", dropout=0.0).train()
    ids, labels = _fsdp_batch(model.config)
    loss = model(ids, train.shift_right(labels, model.config), labels=labels).loss
    loss.backward()
    torch.testing.assert_close(sharded["loss"], loss.detach(), atol=1e-5, rtol=0)
    for name, param in model.named_parameters():
        torch.testing.assert_close(sharded["grads"][name], param.grad, atol=1e-5, rtol=0, msg=name)


########################################################################################
# Half precision: bfloat16, float16 and its calibration
########################################################################################


@pytest.mark.parametrize("name", ["tiny-v1_1", "t5-v1_1-small"])
def test_half_precision_closer_to_float32_than_hf(name: str, tmp_path: Path) -> None:
    """Encoder output in bfloat16 and float16, against the same implementation in float32: our
    error is below Hugging Face's at every quantile [0.5 ... 0.9999], on a random tiny model and a
    t5-v1_1-small-shaped one (the inputs of bench_t5.py --precision)."""
    models = bench_t5.build_models(name, tmp_path, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([64, 50, 37, 23])
    mask = (torch.arange(64)[None] < lengths[:, None]).long()
    ids = torch.randint(3, models.config.vocab_size, (4, 64), generator=g) * mask
    for dtype in (torch.bfloat16, torch.float16):
        ours, theirs = bench_t5.encoder_error_quantiles(tmp_path / f"{name}-ours", models.hf_dir, dtype, ids, mask)
        assert all(a < b for a, b in zip(ours, theirs)), (dtype, ours, theirs)


def inflated_model() -> tuple[t5.T5, torch.Tensor]:
    """A tiny model whose encoder layer 1 and decoder layer 0 FFNs put out values past 65504 (as
    T5 v1.1 XL/XXL do), with inputs that show it."""
    model = random_model("t5-v1.1", dropout=0.0).eval()
    with torch.no_grad():
        model.encoder.layers[1].ffn.wo.weight.mul_(3e4)
        model.decoder.layers[0].ffn.wo.weight.mul_(3e4)
    ids, _ = padded_batch(model.config.vocab_size, [12, 12], seed=19)
    return model, ids


def test_float16_overflow_needs_calibration_and_calibration_fixes_it() -> None:
    """Uncalibrated, the inflated model overflows in float16 (inf/NaN); with the scales from
    calibrate_float16 folded in, its encoder output and logits are finite and within 2% of the
    float32 values' range (float16 has 11 significant bits; the errors of 5 layers add up)."""
    import copy

    model, ids = inflated_model()
    with torch.no_grad():
        encoded, logits = model.encoder(ids), model(ids, ids).logits
        assert model.encoder.layers[1].ffn(model.encoder.layers[1].ffn_norm(
            torch.randn(2, 12, model.config.d_model))).abs().max() > 65504  # really past float16
        plain = copy.deepcopy(model).half()
        assert not torch.isfinite(plain.encoder(ids)).all() and not torch.isfinite(plain(ids, ids).logits).all()
        scales = convert_hf.calibrate_float16(model, ids)
        assert set(scales) == {"encoder.1.ffn", "decoder.0.ffn"}
        convert_hf.apply_out_scales(model, scales)
        torch.testing.assert_close(model.encoder(ids), encoded, atol=1e-5, rtol=1e-5)  # exact rescaling in float32
        half = model.half()
        encoded16, logits16 = half.encoder(ids).float(), half(ids, ids).logits.float()
    assert torch.isfinite(encoded16).all() and torch.isfinite(logits16).all()
    assert (encoded16 - encoded).abs().max() <= 0.02 * encoded.abs().max()
    assert (logits16 - logits).abs().max() <= 0.02 * logits.abs().max()


def test_convert_calibrate_writes_scales(tmp_path: Path) -> None:
    """convert_hf.py --dtype float16 --calibrate on a checkpoint that overflows float16: the scales
    land in config.json and the float16 model loads and runs finite, close to float32."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    state = load_file(hf_dir / "model.safetensors")
    state["encoder.block.1.layer.1.DenseReluDense.wo.weight"] *= 3e4
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert convert_hf.main([str(hf_dir), str(tmp_path / "fp32")]) == 0
    assert convert_hf.main([str(hf_dir), str(tmp_path / "fp16"), "--dtype", "float16", "--calibrate"]) == 0
    config = t5.T5Config.load(tmp_path / "fp16" / "config.json")
    assert config.out_scales and set(config.out_scales) >= {"encoder.1.ffn"}
    ids, mask = padded_batch(config.vocab_size, [20, 11], seed=20)
    with torch.no_grad():
        reference = t5.load(tmp_path / "fp32", encoder_only=True)(ids, mask)
        half = t5.load(tmp_path / "fp16", encoder_only=True)(ids, mask)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - reference).abs().max() <= 0.02 * reference.abs().max()
    # float32 calibrated: the weights it rewrites are mapped from the file it writes (it died of SIGBUS)
    assert convert_hf.main([str(hf_dir), str(tmp_path / "fp32c"), "--dtype", "float32", "--calibrate"]) == 0
    assert t5.T5Config.load(tmp_path / "fp32c" / "config.json").out_scales == config.out_scales
    with torch.no_grad():
        torch.testing.assert_close(t5.load(tmp_path / "fp32c", encoder_only=True)(ids, mask), reference)


def test_values_past_float16_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A weight float16 cannot hold is a one-line error naming it, whether converting (calibrated or
    not) or exporting to float16 (they wrote inf); a block that overflows even in float32 cannot be
    calibrated (its scale came out 0, then a ZeroDivisionError)."""
    hf_dir = build_hf_checkpoint(tmp_path / "hf", "t5-v1.1")
    state = load_file(hf_dir / "model.safetensors")
    state["encoder.block.0.layer.1.DenseReluDense.wo.weight"][0, 0] = 1e5
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    assert convert_hf.main([str(hf_dir), str(tmp_path / "fp32")]) == 0
    runs = [([str(hf_dir), str(tmp_path / "out"), "--dtype", "float16"], "wo.weight: a value of 100000 is past"),
            ([str(hf_dir), str(tmp_path / "out"), "--dtype", "float16", "--calibrate"], "wo.weight: a value of 100000"),
            ([str(tmp_path / "fp32"), str(tmp_path / "out"), "--to-hf", "--dtype", "float16"], "ffn.wo.weight: a val")]
    state["encoder.block.0.layer.1.DenseReluDense.wo.weight"][0, 0] = 3e38
    save_file(state, tmp_path / "huge.safetensors", metadata={"format": "pt"})
    runs.append(([str(tmp_path / "huge.safetensors"), str(tmp_path / "out"), "--dtype", "float32", "--calibrate",
                  *SHAPE_FLAGS["t5-v1.1"]], "block encoder.0.ffn overflows even in float32"))
    capsys.readouterr()
    for args, message in runs:
        assert convert_hf.main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and len([line for line in err.splitlines() if "warning" not in line]) == 1, err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_out_scales_validation() -> None:
    with pytest.raises(ValueError, match="no block 'encoder.9.ffn'"):
        t5.T5Config(num_encoder_layers=2, out_scales={"encoder.9.ffn": 0.5})
    with pytest.raises(ValueError, match="must be a power of two"):
        t5.T5Config(out_scales={"encoder.0.ffn": 0.3})
    model = random_model("t5-v1.1")
    with pytest.raises(ValueError, match="no block 'decoder.0.attn'"):
        convert_hf.apply_out_scales(model, {"decoder.0.attn": 0.5})
    before = copy.deepcopy(model.state_dict())
    for scales in ({"encoder.0.ffn": 0.5, "encoder.1.ffn": 0.3}, {"encoder.0.ffn": 0.5, "decoder.0.ffn": 0.5}):
        encoder = model.encoder if "decoder.0.ffn" in scales else model  # an encoder has no decoder blocks
        with pytest.raises(ValueError, match="must be a power of two|no block 'decoder.0.ffn'"):
            convert_hf.apply_out_scales(encoder, scales)  # checked before anything changes
        assert model.config.out_scales == {} and model.encoder.layers[0].unscale["ffn"] == 1.0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="calibrate a float32 or bfloat16 model"):
        convert_hf.calibrate_float16(model.half(), torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_greedy_matches_float32(gen_family: Family, dtype: torch.dtype) -> None:
    """Greedy tokens in bfloat16 / float16 (weights loaded in that dtype, no autocast) equal
    float32's, except where float32 itself nearly ties: random tiny models often put two tokens
    within a few hundredths of a logit of each other, and half precision may then pick the other.
    So a row may diverge only at a step where float32's two best logits are closer than 1% (float16)
    or 4% (bfloat16: 8 significant bits) of the largest logit's magnitude; it must agree before,
    and at least half of the rows agree all the way."""
    ids, mask = padded_batch(gen_family.vocab, [13, 7, 20, 3], seed=7)
    model = t5.load(gen_family.ours_dir)
    reference = t5.generate(model, ids, mask, max_new_tokens=16).tokens
    half = t5.generate(t5.load(gen_family.ours_dir, dtype=dtype), ids, mask, max_new_tokens=16).tokens
    tolerance = 0.01 if dtype == torch.float16 else 0.04
    width = min(reference.shape[1], half.shape[1])
    with torch.no_grad():
        logits = model(ids, train.shift_right(reference, model.config), input_mask=mask).logits
    diverged = 0
    for row in range(4):
        differ = (reference[row, :width] != half[row, :width]).nonzero()
        if len(differ):
            step = int(differ[0])
            top2 = logits[row, step].topk(2).values
            assert top2[0] - top2[1] < tolerance * top2.abs().max(), (row, step, top2)
            diverged += 1
    assert diverged <= 2, f"{diverged} of 4 rows diverged"


########################################################################################
# CPU kernels: oneDNN's float32 linear; weight-only int8
########################################################################################


def linear_ops(fn: Callable[[], object]) -> set[str]:
    """The names of the matmul ops `fn` runs."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if e.key in ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")}


def test_linear_kernel_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """t5.linear: oneDNN's op only in float32 on an x86 CPU with autograd and autocast off (and mkldnn
    enabled), F.linear otherwise, so gradients still flow while training and autocast still casts;
    both agree to float32 rounding (the two kernels sum in different orders), for 2- and 3-dim inputs
    of 1 and several rows, a non-contiguous weight and input. The whole model under no_grad takes the
    oneDNN op too, and so does a compiled function (the op is `t5::onednn_linear` to inductor). On an
    Intel CPU, fewer than 4 rows take F.linear (MKL's GEMV is faster there)."""
    monkeypatch.setattr(t5, "INTEL", False)
    torch.manual_seed(0)
    weight = torch.randn(96, 64).t().contiguous().t()  # (96, 64), column-major
    layer = t5.Linear(64, 96)
    for x in (torch.randn(1, 64), torch.randn(5, 64), torch.randn(2, 3, 64), torch.randn(3, 2, 64).transpose(0, 1)):
        for w in (weight, layer.weight):
            with torch.no_grad():
                torch.testing.assert_close(t5.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
                ops = linear_ops(lambda: t5.linear(x, w))
                assert (ops == {"mkldnn::_linear_pointwise"}) if t5.ONEDNN else ("mkldnn::_linear_pointwise" not in ops)
                with torch.backends.mkldnn.flags(enabled=False):
                    assert "mkldnn::_linear_pointwise" not in linear_ops(lambda: t5.linear(x, w))
                    assert torch.equal(t5.linear(x, w), F.linear(x, w))
    assert "mkldnn::_linear_pointwise" not in linear_ops(lambda: layer(torch.randn(4, 64)).sum().backward())
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        bf16 = torch.randn(2, 64, dtype=torch.bfloat16)
        assert "mkldnn::_linear_pointwise" not in linear_ops(lambda: t5.linear(bf16, weight.bfloat16()))
        x = torch.randn(2, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's bfloat16 matmul, as F.linear gives
            assert torch.equal(t5.linear(x, weight), F.linear(x, weight)) and t5.linear(x, weight).dtype == torch.bfloat16
        model = t5.T5(tiny_config("t5-v1.1")).eval()
        ops = linear_ops(lambda: model(torch.tensor([[3, 4, 5]]), torch.tensor([[0, 6]])))
        assert (ops == {"mkldnn::_linear_pointwise"}) if t5.ONEDNN else ("mkldnn::_linear_pointwise" not in ops)
        compiled = torch.compile(lambda x: t5.linear(x, weight).relu(), fullgraph=True)  # the op survives inductor
        x = torch.randn(3, 64)
        torch.testing.assert_close(compiled(x), F.linear(x, weight).relu(), atol=1e-5, rtol=1e-5)
        assert ("mkldnn::_linear_pointwise" in linear_ops(lambda: compiled(x))) == t5.ONEDNN
        monkeypatch.setattr(t5, "INTEL", True)
        for x, rows in ((torch.randn(1, 64), 1), (torch.randn(3, 1, 64), 3), (torch.randn(2, 2, 64), 4)):
            torch.testing.assert_close(t5.linear(x, weight), F.linear(x, weight), atol=1e-5, rtol=1e-5)
            assert ("mkldnn::_linear_pointwise" in linear_ops(lambda: t5.linear(x, weight))) == (t5.ONEDNN and rows >= 4)


def test_quantize_int8_rows() -> None:
    """Symmetric per output row: each row's largest magnitude becomes +-127 (or 126-127 when the
    bfloat16 scale rounded up), the scale is a bfloat16 number, an all-zero row stays zero, and no
    weight moves by more than half a step (plus the step lost when the scale rounded down)."""
    torch.manual_seed(0)
    dense = torch.randn(64, 48) * torch.logspace(-6, 1, 64)[:, None]
    dense[5] = 0
    weight, scale = t5.quantize_int8(dense)
    assert weight.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (64,)
    peaks = weight.abs().amax(dim=1)
    assert peaks[5] == 0 and ((peaks >= 126) | (torch.arange(64) == 5)).all() and peaks.max() == 127
    back = t5.dequantize_weight(weight, scale, torch.float32)
    assert ((back - dense).abs() <= scale.float()[:, None] * 1.01).all()
    assert torch.equal(back[5], torch.zeros(48))


@pytest.mark.parametrize("device", DEVICES)
def test_int8_equals_its_dequantized_twin_and_round_trips(family: Family, device: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """t5.quantize: every linear layer (lm_head included) becomes an Int8Linear. Weight-only in float32
    (quantize_inputs off) it computes exactly what its dequantized twin does (the same float32
    weights); in bfloat16 on CPU the int8 kernel takes the row scales after the sum, so it differs from
    a twin whose weights were rounded to bfloat16 by less than that rounding: within bfloat16 error of
    the float32 result. With its inputs quantized too (float32 on CPU, fbgemm) it is within 12x the
    error of plain bfloat16 weights (7- or 8-bit steps of each row's peak against bfloat16's 8 bits of
    each value; measured 3.3-5.1x on these models with 7). save -> load gives the same tensors back;
    convert_hf.py --weights int8 gives the same model."""
    dense = t5.load(family.ours_dir, device=device)
    int8 = t5.quantize(t5.load(family.ours_dir, device=device))
    linears = [m for m in int8.modules() if isinstance(m, (torch.nn.Linear, t5.Float8Linear))]
    assert linears and all(type(m) is t5.Int8Linear and m.weight.dtype == torch.int8 for m in linears)
    assert type(int8.lm_head) is t5.Int8Linear
    twin = convert_hf.dequantize(t5.quantize(t5.load(family.ours_dir, device=device)))
    assert not any(isinstance(m, t5.Float8Linear) for m in twin.modules())
    ids, mask = padded_batch(family.vocab, [9, 5])
    ids, mask = ids.to(device), mask.to(device)
    decoder_ids = ids[:, :6]
    with torch.no_grad():
        dynamic = int8(ids, decoder_ids, input_mask=mask).logits
        monkeypatch.setattr(t5.Int8Linear, "quantize_inputs", False)
        logits = int8(ids, decoder_ids, input_mask=mask).logits
        assert torch.equal(logits, twin(ids, decoder_ids, input_mask=mask).logits)
        reference = dense(ids, decoder_ids, input_mask=mask).logits
        bf16 = t5.quantize(t5.load(family.ours_dir, device=device, dtype=torch.bfloat16))
        bf16_logits = bf16(ids, decoder_ids, input_mask=mask).logits.float()
        # bfloat16 alone (no int8) is the yardstick: the int8 bfloat16 model is within 3x its error
        plain_bf16 = t5.load(family.ours_dir, device=device, dtype=torch.bfloat16)
        bf16_error = (plain_bf16(ids, decoder_ids, input_mask=mask).logits.float() - reference).abs().max()
        assert (bf16_logits - logits).abs().max() <= 3 * bf16_error
        quantized_inputs = device == "cpu" and t5.FBGEMM
        assert torch.equal(dynamic, logits) != quantized_inputs
        assert (dynamic - reference).abs().max() <= 12 * bf16_error
        monkeypatch.undo()
    # with autograd on (fine-tuning around frozen int8 weights) the weights are dequantized: backward runs
    trained = bf16(ids, decoder_ids, input_mask=mask).logits.float()
    trained.sum().backward()
    assert bf16.encoder.embedding.weight.grad is not None and (trained - bf16_logits).abs().max() <= 3 * bf16_error
    t5.save(int8, tmp_path / "saved")
    again = t5.load(tmp_path / "saved", device=device)
    assert type(again.lm_head) is t5.Int8Linear
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), int8.state_dict().values()))
    assert convert_hf.main([str(family.hf_dir), str(tmp_path / "converted"), "--weights", "int8",
                            "--dtype", "float32"]) == 0
    converted = t5.load(tmp_path / "converted", device=device)
    assert converted.state_dict().keys() == int8.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), int8.state_dict().values()))
    # the encoder alone (what pipelines load): converted with --encoder-only, or quantized in memory
    assert convert_hf.main([str(family.hf_dir), str(tmp_path / "encoder"), "--weights", "int8", "--encoder-only",
                            "--dtype", "float32"]) == 0
    encoder = t5.load(tmp_path / "encoder", encoder_only=True, device=device)
    assert all(type(m) is t5.Int8Linear for m in encoder.modules() if isinstance(m, (torch.nn.Linear, t5.Float8Linear)))
    with torch.no_grad():
        assert torch.equal(encoder(ids, mask), int8.encoder(ids, mask))
        assert torch.equal(encoder(ids[:1]), int8.encoder(ids[:1]))  # batch 1, no mask
    # and back to transformers: the dequantized weights
    assert convert_hf.main(["--to-hf", str(tmp_path / "converted"), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    hf = HF_MODELS[FAMILIES[family.name][0]].from_pretrained(tmp_path / "hf").eval().to(device)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                                   logits, atol=ATOL, rtol=0)


def test_int8_on_the_demo_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trained demo model with int8 weights: held-out accuracy as in float32, every greedy
    prediction of the held-out targets the same, and the logits' error no more than 2x (float32
    compute, weight-only; 0.122 on every CPU), 2x (bfloat16 compute) and 15x (float32 on CPU with inputs
    quantized too) the error of plain bfloat16 weights (measured on AMD: 0.12, 0.15 and 0.81 vs 0.086 of
    logits up to 21; bfloat16's own error depends on the CPU's kernel: 0.081 on an AMX Xeon).
    Beam search agrees with the dequantized twin (weight-only), and in tokens with inputs quantized."""
    model, tokenizer = t5.load(HERE / "demo"), t5.load_tokenizer(HERE / "demo")
    numbers = train.held_out()[:32]
    ids, mask = tokenizer.encode_batch([train.prompt(n) for n in numbers])
    labels, label_mask = tokenizer.encode_batch([train.spell(n) for n in numbers])
    decoder_ids = train.shift_right(labels.masked_fill(label_mask == 0, -100), model.config)
    real = label_mask.bool()
    with torch.no_grad():
        reference = model(ids, decoder_ids, input_mask=mask, decoder_mask=label_mask).logits

        def error(m: t5.T5) -> torch.Tensor:
            logits = m(ids, decoder_ids, input_mask=mask, decoder_mask=label_mask).logits.float()
            assert torch.equal(logits.argmax(-1)[real], reference.argmax(-1)[real])
            return (logits - reference).abs()[real].max()

        bf16_error = error(t5.load(HERE / "demo", dtype=torch.bfloat16))
        int8 = t5.quantize(t5.load(HERE / "demo"))
        int8_bf16 = t5.quantize(t5.load(HERE / "demo", dtype=torch.bfloat16))
        assert error(int8) <= 15 * bf16_error and error(int8_bf16) <= 2 * bf16_error
    accuracy = train.evaluate(model, tokenizer, numbers)
    assert train.evaluate(int8, tokenizer, numbers) == accuracy == train.evaluate(int8_bf16, tokenizer, numbers)
    twin = convert_hf.dequantize(t5.quantize(t5.load(HERE / "demo")))
    beams = t5.generate(int8, ids[:4], mask[:4], max_new_tokens=12, num_beams=3, num_return_sequences=2)
    monkeypatch.setattr(t5.Int8Linear, "quantize_inputs", False)
    with torch.no_grad():
        assert error(int8) <= 2 * bf16_error
    assert train.evaluate(int8, tokenizer, numbers) == accuracy
    expected = t5.generate(twin, ids[:4], mask[:4], max_new_tokens=12, num_beams=3, num_return_sequences=2)
    assert torch.equal(beams.tokens, expected.tokens)
    weight_only = t5.generate(int8, ids[:4], mask[:4], max_new_tokens=12, num_beams=3, num_return_sequences=2)
    assert torch.equal(weight_only.tokens, expected.tokens) and torch.equal(weight_only.scores, expected.scores)


def test_int8_bfloat16_kernel_gets_aligned_rows_only(tmp_path: Path) -> None:
    """torch 2.13's bfloat16 int8 kernel (`_weight_int8pack_mm`) returns NaN or segfaults on weight rows
    that do not start 16-byte aligned (seen on an AMX Xeon: in_features 24, 40; weights mapped from a
    file at 8 mod 16). A layer whose in_features is not a multiple of 16 dequantizes instead, and `load`
    copies the int8 weights its file holds unaligned, wherever the header's length puts them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.seen.add(str(func))
            return func(*args, **(kwargs or {}))

    for width in (24, 32):
        layer = t5.quantize(torch.nn.Sequential(t5.Linear(width, 40)).bfloat16())[0]
        x = torch.randn(3, width, dtype=torch.bfloat16)
        with torch.no_grad(), Ops() as ops:
            y = layer(x)
        assert ("aten._weight_int8pack_mm.default" in ops.seen) == (width % 16 == 0), width
        ops.seen.clear()
        torch.testing.assert_close(y.float(), x.float() @ layer.dense_weight(torch.float32).T, atol=0.1, rtol=0.02)
    t5.save(t5.quantize(t5.load(HERE / "demo")), tmp_path / "int8")
    file = tmp_path / "int8" / "model.safetensors"
    tensors = {key: tensor.clone() for key, tensor in load_file(file).items()}  # not views of the file rewritten
    ids = torch.randint(0, 164, (3, 7))
    with torch.no_grad():
        expected = t5.load(tmp_path / "int8", encoder_only=True, dtype=torch.bfloat16)(ids)
    for pad in (0, 8):  # the file's data starts 8 bytes later: every tensor moves from 0 to 8 mod 16, or back
        specs = {key: (tensor.shape, tensor.dtype) for key, tensor in tensors.items()}
        t5.write_safetensors(file, specs, tensors.items(), {"format": "pt", "pad": "x" * pad})
        model = t5.load(tmp_path / "int8", encoder_only=True, dtype=torch.bfloat16)
        weights = [m.weight for m in model.modules() if isinstance(m, t5.Int8Linear)]
        assert weights and all(w.data_ptr() % 16 == 0 for w in weights), pad
        with torch.no_grad():
            assert torch.equal(model(ids), expected)


def test_int8_quantized_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Int8Linear in float32 on CPU under no_grad: fbgemm's int8 x int8 op (`quantized::linear_dynamic`),
    each input row scaled to its own peak first, so a row of tiny values keeps its precision next to a
    huge one: every output within the rounding bound, (row peak / 255) * sum |w| (8-bit steps over
    [-peak, peak], where fbgemm's sums do not saturate: rows of +-1 against weights of one sign show
    it) or (row peak / 127) * sum |w| (7 bits elsewhere), and equal to the row's result alone; a zero row gives zeros. With autograd on or quantize_inputs off: the dequantized
    product exactly; under CPU autocast, autocast's bfloat16 product. fbgemm's packed copy follows an
    in-place write and is dropped with the weight."""
    if not t5.FBGEMM:
        assert not t5.Int8Linear.quantize_inputs  # nothing to test: the layer multiplies weight-only
        return
    torch.manual_seed(0)
    dense = torch.nn.Linear(48, 40, bias=False)
    layer = t5.quantize(torch.nn.Sequential(dense))[0]
    weight = t5.dequantize_weight(layer.weight, layer.weight_scale, torch.float32)
    x = torch.randn(2, 3, 48) * torch.tensor([1e-3, 1.0, 1e3, 0.0, 5.0, 1e-6]).view(2, 3, 1)  # x[1, 0] = 0
    with torch.no_grad():
        y = layer(x)
        with torch.profiler.profile() as prof:
            layer(x[:, :1])
        assert "quantized::linear_dynamic" in {e.key for e in prof.key_averages()}
        steps = 255 if t5.fbgemm_8bit_inputs() else 127
        for inputs, out in ((x, y), (torch.sign(weight[:4]) * 3.0, layer(torch.sign(weight[:4]) * 3.0))):
            exact = F.linear(inputs.double(), weight.double())
            bound = inputs.abs().amax(dim=-1, keepdim=True).double() / steps * weight.abs().sum(dim=1).double()
            assert ((out - exact).abs() <= bound * 1.01 + 1e-6 * exact.abs()).all(), steps
        assert y.shape == (2, 3, 40)
        assert torch.equal(y[1, 0], torch.zeros(40)) and not torch.equal(y, F.linear(x, weight))
        # a row's result is its own, whatever rows run with it (a batch's answers do not depend on each other)
        rows = torch.randn(5, 48)
        rows[0] = rows[0].abs()  # all positive: fbgemm's per-tensor range from this row alone would be [0, 1]
        assert torch.equal(layer(rows), torch.cat([layer(row[None]) for row in rows]))
        monkeypatch.setattr(t5.Int8Linear, "quantize_inputs", False)
        assert torch.equal(layer(x), t5.linear(x, weight))
        monkeypatch.undo()
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:  # autocast's matmul
            assert layer(x).dtype == torch.bfloat16
        assert "quantized::linear_dynamic" not in {e.key for e in prof.key_averages()}
        layer.weight.mul_(-1)  # an in-place write: the packed copy is made again
        torch.testing.assert_close(layer(x), -y)
    assert torch.equal(layer(x), F.linear(x, -weight))  # autograd on: weight-only
    key = id(layer.weight)
    assert key in t5._packed
    del layer
    gc.collect()
    assert key not in t5._packed


def test_quantized_layers_load_state_dict_and_refusals() -> None:
    """load_state_dict into int8 layers under inference_mode (which keeps no version count) is seen:
    the packed copy is made again; a dense state dict is refused before any int8 weight is cast (it
    was truncated to small ints); quantize refuses a Linear with a bias (it was dropped); an fp8
    layer asked to train says it cannot (its gradients were fp8: mostly zeros)."""
    torch.manual_seed(0)
    dense, other = torch.nn.Linear(48, 40, bias=False), torch.nn.Linear(48, 40, bias=False)
    x = torch.randn(3, 48)
    with torch.inference_mode():
        layer = t5.quantize(torch.nn.Sequential(copy.deepcopy(dense)))
        before = layer(x)
        layer.load_state_dict(t5.quantize(torch.nn.Sequential(other)).state_dict())
        assert torch.equal(layer(x), t5.quantize(torch.nn.Sequential(other))(x)) and not torch.equal(layer(x), before)
    kept = layer.state_dict()
    with pytest.raises(RuntimeError, match=r"0.weight is torch.float32, the layer's torch.int8: not loaded"):
        layer.load_state_dict(torch.nn.Sequential(dense).state_dict(), strict=False)
    assert all(torch.equal(kept[k], v) for k, v in layer.state_dict().items())
    mixed = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="1: a Linear with a bias"):
        t5.quantize(mixed)
    assert type(mixed[0]) is torch.nn.Linear  # refused before any layer was replaced
    fp8 = t5.Float8Linear(48, 40)
    fp8.load_state_dict({"weight": dense.weight.detach().to(torch.float8_e4m3fn), "weight_scale": torch.ones(40)})
    fp8.requires_grad_(True)
    with pytest.raises(ValueError, match="fp8 weights cannot be trained"):
        fp8(x)
    with torch.no_grad():  # nothing is trained there (generate runs so): it computes
        assert torch.equal(fp8(x), t5.linear(x, fp8.dense_weight(x.dtype)))
    int8 = t5.quantize(torch.nn.Sequential(copy.deepcopy(dense))).train()  # README: frozen in training
    with pytest.raises(RuntimeError, match="floating point dtype can require gradients"):
        int8.requires_grad_(True)
    inputs = x.clone().requires_grad_(True)
    int8(inputs).sum().backward()  # the gradient reaches the inputs, not the weight
    assert inputs.grad is not None and int8[0].weight.grad is None and not int8[0].weight.requires_grad


def test_int8_compiled_decode_step() -> None:
    """The CPU int8 kernels inside the compiled decode step: fbgemm's in float32 (an op of its own to
    inductor, `t5::fbgemm_linear`), int8pack's in bfloat16 (widths that are multiples of 8, so the kernel
    is used): the same tokens as eager. A tiny one-layer model: compiling is the cost."""
    config = dataclasses.replace(tiny_config("t5-v1.1"), num_encoder_layers=1, num_decoder_layers=1, d_ff=40)
    ids, mask = padded_batch(config.vocab_size, [7, 4], seed=3)
    for dtype in (torch.float32, torch.bfloat16):
        model = t5.T5(config).eval()
        train.init_weights(model, torch.Generator().manual_seed(0))
        model = t5.quantize(model.to(dtype))
        eager = t5.generate(model, ids, mask, max_new_tokens=5, min_new_tokens=5)
        with torch.profiler.profile() as prof:
            compiled = t5.generate(model, ids, mask, max_new_tokens=5, min_new_tokens=5, compile=True)
        assert torch.equal(compiled.tokens, eager.tokens)
        assert ("t5::fbgemm_linear" in {e.key for e in prof.key_averages()}) == (dtype == torch.float32 and t5.FBGEMM)


def test_cli_weights_int8() -> None:
    """--weights int8 quantizes after loading: the demo spells as it does in float32."""
    for extra in ([], ["--dtype", "bfloat16"]):
        result = run_cli("generate", "spell: 4071", "spell: 90019", "--weights", "int8", *extra)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["four thousand seventy-one", "ninety thousand nineteen"]
    result = run_cli("generate", "spell: 1", "--weights", "int4")
    assert result.returncode == 2 and "invalid choice: 'int4'" in result.stderr


########################################################################################
# Diffusion pipelines: the README's recipes and adapter in real pipelines
########################################################################################


def python_blocks(heading: str) -> list[str]:
    """The ```python blocks of a README section (up to the next heading of any level)."""
    text = (HERE / "README.md").read_text()
    section = re.split(r"\n#{2,3} ", text.split(heading + "\n", 1)[1], maxsplit=1)[0]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


def test_readme_pipeline_recipes_equal_transformers(spiece_folder: Path, tmp_path: Path) -> None:
    """Each recipe block of the README, as written, against transformers' encoder called the way
    that pipeline calls it (Flux/SD3: fixed length, no mask; PixArt: mask; Wan: UMT5, masked,
    rows trimmed to their tokens and zero-padded)."""
    blocks = python_blocks("### Text encoders of diffusion pipelines")
    assert len(blocks) == 3
    transformers.T5Tokenizer.from_pretrained(spiece_folder, legacy=False).save_pretrained(tmp_path / "tok")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    prompts = ["hello world the fox", "kato rimo " * 200]  # the second is longer than every max_length
    for block, (config_cls, model_cls), masked in zip(
            blocks, [(transformers.T5Config, transformers.T5EncoderModel)] * 2
            + [(transformers.UMT5Config, transformers.UMT5EncoderModel)], [False, True, True]):
        folder = tmp_path / f"hf-{model_cls.__name__}"
        hf = saved_tiny_t5(folder, spiece_folder, model_cls, config_cls, num_layers=2, feed_forward_proj="gated-gelu")
        ours = tmp_path / f"ours-{model_cls.__name__}"
        if not ours.exists():
            assert convert_hf.main([str(folder), str(ours)]) == 0
        scope = dict(t5=t5, torch=torch, prompts=prompts, device="cpu", encoder=t5.load(ours, encoder_only=True),
                     tokenizer=t5.load_tokenizer(ours))
        with torch.no_grad():
            exec(compile(block, "README.md", "exec"), scope)
            length = scope["ids"].shape[1]
            ref_in = hf_tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            assert torch.equal(scope["ids"], ref_in.input_ids)
            if not masked:  # Flux / SD3: text_encoder_2(ids)[0]
                torch.testing.assert_close(scope["hidden"], hf(ref_in.input_ids)[0], atol=1e-5, rtol=0)
                continue
            ref = hf(ref_in.input_ids, attention_mask=ref_in.attention_mask).last_hidden_state
            keep = ref_in.attention_mask.bool()
            if model_cls is transformers.UMT5EncoderModel:  # Wan: trim to the real tokens, zero-pad back
                ref = torch.where(keep[..., None], ref, torch.zeros(()))
                torch.testing.assert_close(scope["hidden"], ref, atol=1e-5, rtol=0)
            else:  # PixArt: the pipeline masks padding out downstream
                torch.testing.assert_close(scope["hidden"][keep], ref[keep], atol=1e-5, rtol=0)


# Mixed case, spaces around, a tab, an HTML entity, and one prompt longer than every max_length:
# what PixArt (lowercase, strip) and Wan (unescape, collapse whitespace) change before tokenizing.
PIPELINE_PROMPTS = ["  A Photo of THE Fox  ", "Hello\t World &amp; KATO rimo kaÃ¶n ", "Kato RIMO " * 200]
# float32 rounding: at 512 tokens each encoder is ~1.3e-5 from a float64 run of transformers' (the
# softmax sums 512 terms), and the two differ by up to ~6e-6 here
EMBED_ATOL = 3e-5
# images in [0, 1] after 2 float32 steps of tiny models: measured differences 2e-7 to 5e-7, while
# another prompt's embeddings change them by more than 1e-3 (asserted below)
IMAGE_ATOL = 1e-5


@dataclasses.dataclass
class TinyPipelines:
    """Real diffusers pipelines with tiny random components, built from configs as diffusers' own
    tests build them, each with transformers' encoder; ours are converted from the same weights."""

    t5_encoder: t5.T5Encoder
    umt5_encoder: t5.T5Encoder
    tokenizer: t5.Tokenizer
    flux_parts: dict
    pixart_parts: dict
    flux_folder: Path
    hf_umt5: torch.nn.Module
    hf_tokenizer: object


def clip_tokenizer(folder: Path) -> object:
    """A byte-level CLIP tokenizer without merges: one token per character (`</w>` ends a word)."""
    folder.mkdir()
    chars = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    chars += [chr(256 + i) for i in range(256 - len(chars))]  # GPT-2's printable stand-ins for bytes
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": 256 + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)


@pytest.fixture(scope="module")
def tiny_pipelines(spiece_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyPipelines:
    import diffusers

    root = tmp_path_factory.mktemp("pipelines")
    encoders = {}
    for name, model_cls, config_cls in [("t5", transformers.T5EncoderModel, transformers.T5Config),
                                        ("umt5", transformers.UMT5EncoderModel, transformers.UMT5Config)]:
        saved_tiny_t5(root / f"hf-{name}", spiece_folder, model_cls, config_cls, d_model=32, num_layers=2,
                      feed_forward_proj="gated-gelu")
        assert convert_hf.main([str(root / f"hf-{name}"), str(root / name)]) == 0
        encoders[name] = model_cls.from_pretrained(root / f"hf-{name}").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(root / "hf-t5")
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, projection_dim=32, max_position_embeddings=77)).eval()
    vae = dict(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, norm_num_groups=1,
               sample_size=32, use_quant_conv=False, use_post_quant_conv=False)
    flux_parts = dict(
        transformer=diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        vae=diffusers.AutoencoderKL(latent_channels=1, shift_factor=0.0609, scaling_factor=1.5035, **vae),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder=clip,
        tokenizer=clip_tokenizer(root / "clip"), text_encoder_2=encoders["t5"], tokenizer_2=hf_tokenizer)
    pixart_parts = dict(
        transformer=diffusers.PixArtTransformer2DModel(
            sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
            caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True,
            activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
            norm_elementwise_affine=False, norm_eps=1e-6),
        vae=diffusers.AutoencoderKL(latent_channels=4, **vae), scheduler=diffusers.DDIMScheduler(),
        text_encoder=encoders["t5"], tokenizer=hf_tokenizer)
    diffusers.FluxPipeline(**flux_parts).save_pretrained(root / "flux")
    return TinyPipelines(t5.load(root / "t5", encoder_only=True), t5.load(root / "umt5", encoder_only=True),
                         t5.load_tokenizer(root / "t5"), flux_parts, pixart_parts, root / "flux", encoders["umt5"],
                         hf_tokenizer)


def pipeline_images(pipe: object, **inputs: object) -> torch.Tensor:
    """2 denoising steps of an 8 x 8 image per prompt, seeded, as a (b, 3, 8, 8) tensor in [0, 1]."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=2, height=8, width=8, output_type="pt", generator=torch.Generator().manual_seed(0),
                **inputs).images


def run_block(block: str, **scope: object) -> dict:
    with torch.no_grad():
        exec(compile(block, "README.md", "exec"), scope)
    return scope


def test_readme_recipes_equal_the_pipelines_own_prompt_encoding(tiny_pipelines: TinyPipelines) -> None:
    """Each recipe block of the README, run as written on mixed-case, space-padded prompts, gives
    what the real diffusers pipeline computes itself from the same prompts (its encode_prompt with
    transformers' encoder): Flux and SD3 take the text as it is, PixArt lowercases and strips it,
    Wan unescapes HTML, fixes mojibake with ftfy (installed by requirements-dev.txt, as users of Wan
    have it: "kaÃ¶n" -> "kaön") and collapses whitespace. For PixArt and Wan the cleaning changes
    these prompts' ids, so a recipe without it (ftfy's part included) fails here."""
    import html

    import diffusers
    import ftfy

    p = tiny_pipelines
    flux_block, pixart_block, wan_block = python_blocks("### Text encoders of diffusion pipelines")
    scope = lambda encoder: dict(torch=torch, tokenizer=p.tokenizer, encoder=encoder, device="cpu",
                                 prompts=list(PIPELINE_PROMPTS))
    raw_ids = {n: p.tokenizer.encode_batch(PIPELINE_PROMPTS, max_length=n, padding="max_length", truncation=True)[0]
               for n in (120, 512)}
    with torch.no_grad():
        # Flux: encode_prompt's T5 states (the first output); SD3's T5 part at the same length
        flux = run_block(flux_block, **scope(p.t5_encoder))
        assert flux["prompts"] == PIPELINE_PROMPTS
        ref = diffusers.FluxPipeline(**p.flux_parts).encode_prompt(PIPELINE_PROMPTS, PIPELINE_PROMPTS)[0]
        torch.testing.assert_close(flux["hidden"], ref, atol=EMBED_ATOL, rtol=0)
        sd3 = diffusers.StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, text_encoder_3=p.flux_parts["text_encoder_2"], tokenizer_3=p.hf_tokenizer)
        ref = sd3._get_t5_prompt_embeds(PIPELINE_PROMPTS, max_sequence_length=512, dtype=torch.float32)
        torch.testing.assert_close(flux["hidden"], ref, atol=EMBED_ATOL, rtol=0)
        # PixArt: the same mask, the same states at the real tokens (padding is masked downstream)
        pixart = run_block(pixart_block, **scope(p.t5_encoder))
        assert not torch.equal(pixart["ids"], raw_ids[120])
        ref, ref_mask, _, _ = diffusers.PixArtAlphaPipeline(**p.pixart_parts).encode_prompt(
            PIPELINE_PROMPTS, do_classifier_free_guidance=False, clean_caption=False)
        assert torch.equal(pixart["mask"], ref_mask)
        keep = ref_mask.bool()
        torch.testing.assert_close(pixart["hidden"][keep], ref[keep], atol=EMBED_ATOL, rtol=0)
        # Wan: the whole (b, 512, d) tensor, zeros past each prompt's tokens included
        wan = run_block(wan_block, **scope(p.umt5_encoder))
        assert not torch.equal(wan["ids"], raw_ids[512])
        unescaped = html.unescape(PIPELINE_PROMPTS[1])
        assert p.tokenizer.encode(ftfy.fix_text(unescaped)) != p.tokenizer.encode(unescaped)
        ref, _ = diffusers.WanPipeline(tokenizer=p.hf_tokenizer, text_encoder=p.hf_umt5, vae=None, scheduler=None
                                       ).encode_prompt(PIPELINE_PROMPTS, do_classifier_free_guidance=False,
                                                       max_sequence_length=512)
        torch.testing.assert_close(wan["hidden"], ref, atol=EMBED_ATOL, rtol=0)


def test_pipelines_give_the_same_images_with_our_embeddings(tiny_pipelines: TinyPipelines) -> None:
    """A real FluxPipeline and PixArtAlphaPipeline given our embeddings (`prompt_embeds=`, from the
    README's recipes) paint the images they paint with transformers' encoder (same seed), to
    IMAGE_ATOL; the embeddings of other prompts change the images by far more than that."""
    import diffusers

    p = tiny_pipelines
    flux_block, pixart_block, _ = python_blocks("### Text encoders of diffusion pipelines")
    encode = lambda block, prompts: run_block(block, torch=torch, tokenizer=p.tokenizer, encoder=p.t5_encoder,
                                              device="cpu", prompts=list(prompts))
    flux = diffusers.FluxPipeline(**p.flux_parts)
    with torch.no_grad():
        pooled = flux.encode_prompt(PIPELINE_PROMPTS, PIPELINE_PROMPTS)[1]  # from its CLIP, unchanged
    reference = pipeline_images(flux, prompt=PIPELINE_PROMPTS)
    ours = pipeline_images(flux, prompt_embeds=encode(flux_block, PIPELINE_PROMPTS)["hidden"],
                           pooled_prompt_embeds=pooled)
    torch.testing.assert_close(ours, reference, atol=IMAGE_ATOL, rtol=0)
    other = pipeline_images(flux, prompt_embeds=encode(flux_block, ["the fox"] * 3)["hidden"],
                            pooled_prompt_embeds=pooled)
    assert (other - reference).abs().max() > 1e-3

    pixart = diffusers.PixArtAlphaPipeline(**p.pixart_parts)  # guidance 4.5: the negative prompt "" too
    reference = pipeline_images(pixart, prompt=PIPELINE_PROMPTS, clean_caption=False, use_resolution_binning=False)
    negative = encode(pixart_block, [""] * 3)
    embeds = lambda prompts: dict(prompt_embeds=(run := encode(pixart_block, prompts))["hidden"],
                                  prompt_attention_mask=run["mask"], negative_prompt=None,
                                  negative_prompt_embeds=negative["hidden"],
                                  negative_prompt_attention_mask=negative["mask"], use_resolution_binning=False)
    ours = pipeline_images(pixart, **embeds(PIPELINE_PROMPTS))
    torch.testing.assert_close(ours, reference, atol=IMAGE_ATOL, rtol=0)
    other = pipeline_images(pixart, **embeds(["the fox"] * 3))
    assert (other - reference).abs().max() > 1e-3


def test_pipeline_encoder_adapter_in_real_pipelines(tiny_pipelines: TinyPipelines) -> None:
    """The README's PipelineEncoder, as written, is accepted as `text_encoder_2=` by
    FluxPipeline.from_pretrained and as `text_encoder=` by PixArtAlphaPipeline: same images as the
    stock pipelines with transformers' encoder (same seed, IMAGE_ATOL). Wan's encode_prompt (which
    reads `.last_hidden_state`) and SD3's T5 encoding give the stock embeddings."""
    import diffusers

    p = tiny_pipelines
    (block,) = python_blocks("### Our encoder as a pipeline's text encoder")
    scope = run_block(block, torch=torch, diffusers=diffusers, folder=p.flux_folder, encoder=p.t5_encoder)
    adapter = scope["PipelineEncoder"]
    assert isinstance(scope["pipe"].text_encoder_2, adapter)
    ours = pipeline_images(scope["pipe"], prompt=PIPELINE_PROMPTS)
    reference = pipeline_images(diffusers.FluxPipeline(**p.flux_parts), prompt=PIPELINE_PROMPTS)
    torch.testing.assert_close(ours, reference, atol=IMAGE_ATOL, rtol=0)

    pixart = {**p.pixart_parts, "text_encoder": adapter(p.t5_encoder)}
    inputs = dict(prompt=PIPELINE_PROMPTS, clean_caption=False, use_resolution_binning=False)
    torch.testing.assert_close(pipeline_images(diffusers.PixArtAlphaPipeline(**pixart), **inputs),
                               pipeline_images(diffusers.PixArtAlphaPipeline(**p.pixart_parts), **inputs),
                               atol=IMAGE_ATOL, rtol=0)

    with torch.no_grad():
        wan = lambda encoder: diffusers.WanPipeline(tokenizer=p.hf_tokenizer, text_encoder=encoder, vae=None,
                                                    scheduler=None).encode_prompt(
            PIPELINE_PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)[0]
        torch.testing.assert_close(wan(adapter(p.umt5_encoder)), wan(p.hf_umt5), atol=EMBED_ATOL, rtol=0)
        sd3 = lambda encoder: diffusers.StableDiffusion3Pipeline(
            transformer=None, scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
            tokenizer_2=None, text_encoder_3=encoder, tokenizer_3=p.hf_tokenizer)._get_t5_prompt_embeds(
            PIPELINE_PROMPTS, max_sequence_length=256, dtype=torch.float32)
        torch.testing.assert_close(sd3(adapter(p.t5_encoder)), sd3(p.flux_parts["text_encoder_2"]), atol=EMBED_ATOL,
                                   rtol=0)
    wrapped = adapter(p.t5_encoder)
    assert (wrapped.device, wrapped.dtype) == (torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="last hidden state only"):
        wrapped(torch.ones(1, 3, dtype=torch.long), output_hidden_states=True)


########################################################################################
# The README, the benchmark and t5.py's own numbers
########################################################################################


def test_readme_python_block_runs_as_pasted(spiece_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The "Use from Python" block, unchanged, in a folder holding the checkpoints it names
    (tiny random ones, converted from transformers folders), on this machine's device."""
    (block,) = python_blocks("## Use from Python")
    for name, kwargs in [("t5-xxl-enc", dict(feed_forward_proj="gated-gelu")), ("flan-t5-base", {})]:
        hf_dir = tmp_path / "hf" / name
        saved_tiny_t5(hf_dir, spiece_folder, **kwargs)
        assert convert_hf.main([str(hf_dir), str(tmp_path / "checkpoints" / name)]) == 0
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    # the custom decode loop, run after it as a reader would, is greedy decoding
    (loop,) = python_blocks("### Static KV cache and custom decode loops")
    exec(compile(loop, "README.md", "exec"), scope)
    greedy = t5.generate(scope["model"], scope["ids"], scope["mask"], max_new_tokens=32)
    width = int(greedy.lengths.max())
    assert torch.equal(torch.stack(scope["tokens"], dim=1)[:, :width], greedy.tokens)
    # fine-tune, save, --to-hf: transformers computes the fine-tuned model's logits
    train_block = next(b for b in python_blocks("## Training") if "t5.save(" in b)
    vocab = scope["model"].config.vocab_size
    batches = [padded_batch(vocab, [7, 4], seed=seed) for seed in range(3)]
    scope["my_loader"] = [(ids, mask, labels.masked_fill(mask == 0, -100)) for (ids, mask), (labels, _) in
                          zip(batches, batches[1:] + batches[:1])]
    exec(compile(train_block, "README.md", "exec"), scope)
    assert convert_hf.main(["--to-hf", "checkpoints/my-finetune", "hf/my-finetune"]) == 0
    finetuned = t5.load("checkpoints/my-finetune")
    assert not torch.equal(finetuned.lm_head.weight, t5.load("checkpoints/flan-t5-base").lm_head.weight)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained("hf/my-finetune").eval()
    ids, mask = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(finetuned(ids, ids, input_mask=mask).logits,
                                   hf(input_ids=ids, attention_mask=mask, decoder_input_ids=ids).logits, atol=ATOL, rtol=0)


def _readme_fsdp_worker(rank: int, world: int, folder: str, port: int, out: str) -> None:
    """One rank of the README's FSDP2 script, run as written (gloo on CPU) in a folder holding the
    checkpoint it names; reports the last loss and whether the two input tables are still equal."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.chdir(folder)
    torch.set_num_threads(1)
    (block,) = [b for b in python_blocks("## Training") if "fully_shard" in b]
    vocab = t5.T5Config.load(Path(folder) / "checkpoints" / "flan-t5-base" / "config.json").vocab_size
    ids, mask = padded_batch(vocab, [6, 3], seed=rank)
    labels, label_mask = padded_batch(vocab, [4, 2], seed=10 + rank)
    scope = {"my_loader": [(ids, mask, labels.masked_fill(label_mask == 0, -100))] * 2}
    block = block.replace("dist.destroy_process_group()", "")  # read the result first
    exec(compile(block, "README.md", "exec"), scope)
    model = scope["model"]
    tables = [model.encoder.embedding.weight.full_tensor(), model.decoder.embedding.weight.full_tensor()]
    if rank == 0:
        torch.save({"loss": scope["loss"].item(), "equal": torch.equal(*tables)}, out)
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as _fsdp_worker: no interpreter teardown with gloo threads alive


def test_readme_fsdp_script_runs_as_written(spiece_folder: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's FSDP2 script, as written, on two gloo ranks (two_ranks)."""
    import socket

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    saved_tiny_t5(tmp_path / "hf", spiece_folder, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    assert convert_hf.main([str(tmp_path / "hf"), str(tmp_path / "checkpoints" / "flan-t5-base")]) == 0
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    two_ranks(_readme_fsdp_worker, str(tmp_path), port, str(out))
    result = torch.load(out)
    assert math.isfinite(result["loss"]) and result["equal"]


def test_every_readme_python_block_is_run() -> None:
    """Each ```python block of the README belongs to a section whose blocks a test executes as
    written; a new block elsewhere fails this until a test runs it."""
    tested = {"## Use from Python": 1, "### Text encoders of diffusion pipelines": 3,
              "### Our encoder as a pipeline's text encoder": 1, "### Static KV cache and custom decode loops": 1,
              "## Training": 2}
    assert sum(len(python_blocks(heading)) for heading in tested) == sum(tested.values())
    assert (HERE / "README.md").read_text().count("```python\n") == sum(tested.values())


def test_readme_tables_render() -> None:
    """Markdown renders a table only when a |---| row follows its header: every table of the README has one."""
    lines = (HERE / "README.md").read_text().splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith("|") and not lines[i - 1].startswith("|")]
    assert headers and not [lines[i] for i in headers if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1])]


def test_readme_states_install_and_suite_time() -> None:
    text = (HERE / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text  # the CPU-only install
    assert "python -m pytest -q test_t5.py" in text and "minutes on 2 CPU cores" in text
    # the CPU-build note comes before the first command that would pull the CUDA build
    assert text.index("--index-url https://download.pytorch.org/whl/cpu") < text.index("pip install -r requirements")
    # one truth for the quick benchmark's time: the README, bench_t5.py's docstring and its --help
    quick = re.search(r"--quick` gives a first look in (about \d+ s)", text).group(1)
    bench = (HERE / "bench_t5.py").read_text()
    assert bench.count(f"{quick} on 2 idle cores") == 2, quick


def test_oldest_releases_said_alike() -> None:
    """One floor per requirement: requirements.txt's, the README's line and (torch) t5.py's header, which
    a vendoring user reads instead (.ci/oldest installs requirements.txt's floors); this torch meets it."""
    floors = dict(re.findall(r"^([a-z]+)>=([0-9.]+)", (HERE / "requirements.txt").read_text(), re.M))
    assert set(floors) == {"torch", "einops", "safetensors", "sentencepiece"}
    said = ", ".join(f"{name} {version}" for name, version in floors.items())
    assert f"Oldest releases: {said} (`requirements.txt`)." in (HERE / "README.md").read_text()
    assert f"Needs torch >= {floors['torch']}," in (HERE / "t5.py").read_text()
    assert torch.__version__ >= floors["torch"]  # a TorchVersion: compared as a version, not as text


def test_bench_quiet_and_noisy_flag(capsys: pytest.CaptureFixture) -> None:
    """The benchmark's table flags rows whose runs spread widely, and silences transformers; an unknown
    model or section is refused before any work (it was a traceback after a matmul timing, or an empty
    report)."""
    for flag, value in (("--models", "t5-smal"), ("--sections", "encodr"), ("--quick --models", "nope")):
        with pytest.raises(SystemExit):
            bench_t5.main([*flag.split(), value])
        assert f"{flag.split()[-1]}: unknown ['{value}']" in capsys.readouterr().err
    assert bench_t5.Timing(1.0, 0.9, 1.1).flag() == "" and bench_t5.Timing(1.0, 0.9, 1.2).flag() == " noisy"
    import logging

    bench_t5.quiet_transformers()
    assert logging.getLogger("transformers").getEffectiveLevel() >= logging.ERROR
    assert not transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()


def t5_sections() -> list[tuple[str, int, int]]:
    """t5.py's sections as (title, first line, last line), from its `# ======== Title ===` banners."""
    lines = (HERE / "t5.py").read_text().splitlines()
    starts = [(i + 1, re.match(r"# =+ (.+?) =+$", line)[1]) for i, line in enumerate(lines)
              if re.match(r"# =+ (.+?) =+$", line)]
    ends = [start - 1 for start, _ in starts[1:]] + [len(lines)]
    return [("Header and imports", 1, starts[0][0] - 1)] + [(title, start, end) for (start, title), end in
                                                           zip(starts, ends)]


def test_t5_py_acceptance_numbers() -> None:
    """Issue 16's acceptance numbers for t5.py, so that they cannot regress: no argparse, no forward
    reference between top-level definitions (as the README says; the issue allows 5; uses inside
    annotations excluded: they are lazy under `from __future__ import annotations`), at most 10 lines over 110 columns, `generate`
    with at most 8 parameters written in its signature, and a line count held where it is (the
    issue asks for 1,300; this ratchet holds what was reached; the session notes account for each
    change of it: issue 17's kernels and the fixes of the paths beside the tested ones added lines).
    The README's map of sections gives their current line ranges."""
    import ast

    source = (HERE / "t5.py").read_text()
    tree = ast.parse(source)
    defined = {}
    for index, node in enumerate(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined[node.name] = index
        elif isinstance(node, ast.Assign):
            defined.update({target.id: index for target in node.targets if isinstance(target, ast.Name)})
    forward = []
    for index, node in enumerate(tree.body):
        if not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
            continue
        in_annotations = {id(name) for sub in ast.walk(node) for field in ("returns", "annotation")
                          if getattr(sub, field, None) is not None for name in ast.walk(getattr(sub, field))}
        forward += [(getattr(node, "name", "="), name.id) for name in ast.walk(node)
                    if isinstance(name, ast.Name) and id(name) not in in_annotations
                    and defined.get(name.id, -1) > index]
    assert not forward, forward
    assert "argparse" not in source
    lines = source.splitlines()
    assert len(lines) <= 1614, len(lines)
    assert sum(len(line) > 110 for line in lines) <= 10
    generate = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "generate")
    args = generate.args
    assert len(args.posonlyargs + args.args + args.kwonlyargs) + bool(args.vararg) + bool(args.kwarg) <= 8
    readme = (HERE / "README.md").read_text()
    for title, first, last in t5_sections():
        assert f"| {title} | {first}-{last} |" in readme, (title, first, last)
