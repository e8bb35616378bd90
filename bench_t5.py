"""Benchmark t5.py side by side with its peers, in one run, on the same inputs.

    python bench_t5.py                      # encoder + generation tables, float32 on CPU
    python bench_t5.py --quick              # t5-v1_1-small, one shape each, fewer repeats: about 45 s on 2 idle cores
    python bench_t5.py --sections encoder --models t5-v1_1-base --repeats 7
    python bench_t5.py --device cuda --dtype bfloat16

Peers: Hugging Face transformers (eager attention and SDPA; for generation its static cache too)
and, when installed, CTranslate2 (float32, int8 and int8_float32 on CPU) and nai-t5 (float32 eager
generation, v1.1-style shapes), each in a process of its own after the others, as is one more run of
our float32 eager generation ("own process") to compare them with. Our int8 rows are `t5.quantize`
of our model in the run's dtype (float32 on CPU: fbgemm's int8 x int8 products, inputs quantized per
row; bfloat16: weight-only int8; --no-int8 skips them). On CUDA a generation row "CUDA graphs
(experiment)" times greedy decoding with our step compiled with mode="reduce-overhead" over a reused
static cache (`cuda_graph_greedy`: what t5.generate does not do yet). Models are random-weight
models at the real checkpoints' shapes, built with transformers, saved as the hub ships them and
converted with convert_hf.py. Implementations are timed round-robin (one run of each in turn,
`--repeats` times) so that a noisy machine hurts all of them alike; tables give the median with
min-max, and flag a row (`noisy`) whose max is more than NOISY above its min. The matmul peak behind
"% of peak" is the best of several measurements taken before and after the runs: a peak measured
once, on a busy moment of a shared machine, made rows read over 100%.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

import convert_hf
import t5

SHAPES = {  # the hub checkpoints' config.json fields that matter
    "tiny-v1_1": dict(vocab_size=103, d_model=32, d_kv=8, d_ff=37, num_layers=3, num_decoder_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-v1_1-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-v1_1-base": dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_heads=12,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                     feed_forward_proj="relu", tie_word_embeddings=True),
}


NOISY = 0.25  # a row whose slowest run is this much slower than its fastest is flagged


class Timing(NamedTuple):
    median: float  # seconds
    low: float
    high: float

    def flag(self) -> str:
        return " noisy" if self.high > (1 + NOISY) * self.low else ""


def quiet_transformers() -> None:
    """transformers' progress bars and warnings (weight loading, tying) off: they would land in
    the middle of the tables when stdout and stderr share a terminal."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 1) -> dict[str, Timing]:
    """Time each function `repeats` times, taking turns, after `warmup` untimed runs of each."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
    for r in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1] * 1e3:.1f} ms" for n, t in times.items()))
    return {name: Timing(statistics.median(t), min(t), max(t)) for name, t in times.items()}


def gemm_peak(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """This machine's matmul peak in FLOP/s: the best of `repeats` large torch.mm, after two
    untimed ones (the first calls pay for thread start-up and page faults)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class Models(NamedTuple):
    ours: t5.T5
    hf: dict[str, torch.nn.Module]  # attention implementation -> model
    hf_dir: Path
    config: t5.T5Config
    int8: t5.T5 | None  # ours with int8 linear weights (t5.quantize), in the same dtype


def untie_as_on_the_hub(folder: Path) -> None:
    """Make a saved transformers T5 a v1.1-style checkpoint as the hub ships it: its own random
    lm_head weight in model.safetensors and "tie_word_embeddings": false in config.json.
    (transformers 5 builds T5 tied whatever the config says, and unties only on loading a
    checkpoint whose lm_head differs.)"""
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    vocab, width = state["shared.weight"].shape
    state["lm_head.weight"] = torch.randn(vocab, width) * width**-0.5
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (folder / "config.json").write_text(json.dumps(config))


def build_models(name: str, root: Path, device: str, dtype: torch.dtype, int8: bool = False) -> Models:
    """A seeded random model at `name`'s shapes: saved as the hub ships it, converted, loaded both ways
    (and, with int8, ours again with int8 linear weights)."""
    import transformers

    fields = dict(SHAPES[name])
    tied = fields.pop("tie_word_embeddings")
    torch.manual_seed(0)
    hf_dir = root / name
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(decoder_start_token_id=0, **fields))
    model.save_pretrained(hf_dir)
    del model
    if not tied:
        untie_as_on_the_hub(hf_dir)
    convert_hf.convert(str(hf_dir), root / f"{name}-ours", force=True)
    ours = t5.load(root / f"{name}-ours", device=device, dtype=dtype)
    hf = {impl: transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=impl, dtype=dtype)
          .to(device).eval() for impl in ("eager", "sdpa")}
    quantized = t5.quantize(t5.load(root / f"{name}-ours", device=device, dtype=dtype)) if int8 else None
    return Models(ours, hf, hf_dir, ours.config, quantized)


########################################################################################
# Encoder
########################################################################################


class EncoderRow(NamedTuple):
    name: str
    batch: int
    seq: int
    impl: str
    time: Timing
    flops: int
    hf_best: float  # seconds, the faster transformers median

    def format(self, peak: float) -> str:
        t, tokens = self.time, self.batch * self.seq
        return (f"| {self.name} | {self.batch}x{self.seq} | {self.impl} | {t.median * 1e3:.1f} ({t.low * 1e3:.1f}-"
                f"{t.high * 1e3:.1f}){t.flag()} | {tokens / t.median:,.0f} | {self.flops / t.median / 1e9:.1f} | "
                f"{self.flops / t.median / peak:.0%} | {self.hf_best / t.median:.2f}x |")


def bench_encoder(models: Models, name: str, batch: int, seq: int, args: argparse.Namespace) -> list[EncoderRow]:
    ids = torch.randint(2, models.config.vocab_size, (batch, seq), device=args.device)
    mask = torch.ones_like(ids)
    encoder = models.ours.encoder
    fns: dict[str, Callable[[], object]] = {"t5.py eager": lambda: encoder(ids, mask)}
    if models.int8 is not None:
        fns["t5.py int8 eager"] = lambda: models.int8.encoder(ids, mask)
    if not args.no_compile:
        compiled = torch.compile(encoder, fullgraph=True, dynamic=False)
        log(f"  compiling the encoder for {batch}x{seq} ...")
        with torch.inference_mode():
            compiled(ids, mask)
        fns["t5.py compiled"] = lambda: compiled(ids, mask)
    for impl, hf in models.hf.items():
        fns[f"HF {impl}"] = (lambda hf=hf: hf.encoder(input_ids=ids, attention_mask=mask))
    with torch.inference_mode():
        times = round_robin(fns, args.repeats, args.device)
    flops = t5.encoder_flops(models.config, batch, seq).total
    hf_best = min(t.median for n, t in times.items() if n.startswith("HF"))
    return [EncoderRow(name, batch, seq, impl, t, flops, hf_best) for impl, t in times.items()]


########################################################################################
# Generation
########################################################################################


CT2_TYPES = {"float32": "CTranslate2 fp32", "int8": "CTranslate2 int8", "int8_float32": "CTranslate2 int8_float32"}


def ctranslate2_model(hf_dir: Path, folder: str) -> list[str]:
    """Convert a transformers T5 folder into a CTranslate2 model in `folder`, in memory, with a
    stand-in vocabulary that names tokens by id (no tokenizer needed); returns that vocabulary."""
    import transformers
    from ctranslate2.converters.converter import Converter
    from ctranslate2.converters.transformers import T5Loader

    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    # CTranslate2 reads tie_word_embeddings (always True in transformers 5) to decide the v1.0 output
    # rescale; give it the checkpoint's own answer so that its log-probs are right as well.
    hf.config.tie_word_embeddings = bool(json.loads((hf_dir / "config.json").read_text()).get("tie_word_embeddings", True))
    vocab = [f"t{i}" for i in range(hf.config.vocab_size)]
    vocab[0], vocab[1], vocab[2] = "<pad>", "</s>", "<unk>"

    class Vocabulary:  # what CTranslate2's T5 loader asks of a tokenizer
        pad_token, eos_token, unk_token = "<pad>", "</s>", "<unk>"

        def get_vocab(self) -> dict[str, int]:
            return {token: i for i, token in enumerate(vocab)}

        def convert_ids_to_tokens(self, i: int) -> str:
            return vocab[i]

    class InMemory(Converter):
        def _load(self) -> object:
            return T5Loader()(hf, Vocabulary())

    InMemory().convert(folder, force=True)
    return vocab


def ctranslate2_worker(hf_dir: Path, ids: list[list[int]], new_tokens: int, repeats: int, out: Path) -> None:
    """Time CTranslate2 on CPU in each of CT2_TYPES (runs in its own process: see `run_peer`)."""
    import ctranslate2

    with tempfile.TemporaryDirectory() as tmp:
        vocab = ctranslate2_model(hf_dir, tmp)
        source = [[vocab[i] for i in row] for row in ids]
        runs = {}
        for compute_type, label in CT2_TYPES.items():  # each converts the float32 weights as it loads them
            translator = ctranslate2.Translator(tmp, device="cpu", compute_type=compute_type,
                                                intra_threads=torch.get_num_threads())
            runs[label] = (lambda t=translator: t.translate_batch(source, beam_size=1, max_decoding_length=new_tokens,
                                                                  min_decoding_length=new_tokens))
        times = round_robin(runs, repeats, "cpu")
        index = {token: i for i, token in enumerate(vocab)}
        tokens = [[index[token] for token in result.hypotheses[0]] for result in runs[CT2_TYPES["float32"]]()]
    out.write_text(json.dumps({"times": {label: timing._asdict() for label, timing in times.items()}, "tokens": tokens}))


def run_peer(flag: str, models: Models, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict | None:
    """Run this file with a peer's worker `flag` in a child process, timed after the PyTorch
    implementations (CTranslate2's idle worker threads keep spinning: in the same process, or
    interleaved, they halve everyone's speed); what the worker wrote, or None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "job.json"
        spec.write_text(json.dumps({"hf_dir": str(models.hf_dir), "ids": ids.tolist(), "new_tokens": new_tokens,
                                    "repeats": repeats, "out": str(Path(tmp) / "out.json")}))
        if subprocess.run([sys.executable, __file__, flag, str(spec)]).returncode:
            log(f"  {flag}: the peer failed (its traceback is above); its rows are left out")
            return None
        return json.loads((Path(tmp) / "out.json").read_text())


def own_process_rows(module: str, name: str, flag: str, models: Models, ids: torch.Tensor, new_tokens: int,
                     repeats: int) -> dict[str, Timing]:
    """The rows a worker timed in its own process (`run_peer`), if `module` is installed, the worker ran
    and its greedy tokens equal ours (an implementation that decoded something else would not count);
    otherwise none, said."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        log(f"  {name} rows: {module} is not installed")
        return {}
    result = run_peer(flag, models, ids, new_tokens, repeats)
    if result is None:
        return {}
    ours = t5.generate(models.ours, ids, torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if not torch.equal(torch.tensor(result["tokens"]), ours.tokens.cpu()):
        log(f"  {name}: its greedy tokens differ from ours: its rows are left out")
        return {}
    return {f"{label} (own process, after)": Timing(**timing) for label, timing in result["times"].items()}


def nai_t5_worker(hf_dir: Path, ids: list[list[int]], new_tokens: int, repeats: int, out: Path) -> None:
    """Time NovelAI's nai-t5 (the founding implementation; `pip install --no-deps nai-t5==1.0.10`),
    float32 eager on CPU, greedy with its preallocated KV cache, in its own process (as CTranslate2).
    Its tokens are checked against ours: a peer that decoded something else would not count."""
    import nai_t5
    import transformers

    hf = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    config = nai_t5.to_based_config(hf.config)
    model = nai_t5.T5(config).eval()
    model.load_state_dict(nai_t5.hf_to_based_t5_state(hf.state_dict(), config))
    del hf
    source = torch.tensor(ids)
    mask = torch.ones_like(source, dtype=torch.bool)

    def run() -> torch.Tensor:  # its T5.make_bound_forward, written out (1.0.10's reads a config field it lacks)
        encoding = model.encoder(source, input_mask=mask)
        cache = model.decoder.get_kv_cache(batch_size=len(source), length=new_tokens, dtype=encoding.dtype)
        cross_kv = model.decoder.get_cross_kv(encoding)
        tokens = source.new_full((len(source), 1), config.decoder_start_token_id)
        for step in range(new_tokens):
            hidden = model.decoder(input_embeds=model.encoder.vocab_embed(tokens[:, -1:]), encoding=encoding,
                                   self_past_kv=cache[:, :, :, :, :step + 1],
                                   cross_kv=cross_kv)
            tokens = torch.cat([tokens, model.lm_head(hidden)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return tokens[:, 1:]

    with torch.inference_mode():
        times = round_robin({"nai-t5 fp32 eager": run}, repeats, "cpu")
        tokens = run()
    out.write_text(json.dumps({"times": {label: t._asdict() for label, t in times.items()}, "tokens": tokens.tolist()}))


def ours_worker(hf_dir: Path, ids: list[list[int]], new_tokens: int, repeats: int, out: Path) -> None:
    """Time t5.py float32 eager (the converted folder beside `hf_dir`) in its own process, as the peers
    run: in the main process it runs beside transformers' models (on one Xeon the two differed by 5-10%
    at batch 1, either way: README)."""
    model = t5.load(hf_dir.parent / f"{hf_dir.name}-ours")
    source = torch.tensor(ids)

    def run() -> torch.Tensor:
        return t5.generate(model, source, torch.ones_like(source), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens).tokens

    times = round_robin({"t5.py fp32 eager": run}, repeats, "cpu")
    out.write_text(json.dumps({"times": {label: t._asdict() for label, t in times.items()}, "tokens": run().tolist()}))


def cuda_graph_greedy(model: t5.T5, ids: torch.Tensor, mask: torch.Tensor, new: int) -> Callable[[], torch.Tensor]:
    """Greedy decoding of exactly `new` tokens with the decode step compiled with
    mode="reduce-overhead" (CUDA graphs on CUDA) over one static-address cache that every call
    reuses: an experiment for the GPU table (t5.generate does not do this), checked to give
    t5.generate's tokens before it is timed."""
    def graph_step(*args: object) -> torch.Tensor:  # a frame of its own: its own recompile count
        return t5.decode_step(*args)

    step = torch.compile(graph_step, mode="reduce-overhead", fullgraph=True)
    dtype = model.encoder.compute_dtype
    cache = t5.make_cache(model.config, ids.shape[0], 1 + new, device=ids.device, dtype=dtype, static_address=True)
    eos = model.config.eos_token_id

    def run() -> torch.Tensor:
        memory, _, logits, position, _ = t5.prefill(model, ids, mask, max_new_tokens=new, cache=cache)
        tokens = []
        for i in range(new):
            logits[:, eos] = -math.inf  # min_new_tokens = new, as in the other rows
            tokens.append(t5.next_token(logits))  # greedy, as t5.generate picks
            if i + 1 < new:
                logits = step(model, tokens[-1][:, None], memory, cache, position).clone()
                position += 1
        return torch.stack(tokens, dim=1)

    with torch.inference_mode():
        for _ in range(3):  # compile, warm up, record
            got = run()
        expected = t5.generate(model, ids, mask, max_new_tokens=new, min_new_tokens=new).tokens
    if not torch.equal(got, expected):
        raise ValueError("its tokens differ from t5.generate's")
    return run


def bench_generate(models: Models, name: str, batch: int, args: argparse.Namespace) -> list[str]:
    new = args.new_tokens
    ids = torch.randint(3, models.config.vocab_size, (batch, args.input_tokens), device=args.device)
    mask = torch.ones_like(ids)
    ours = models.ours
    fns: dict[str, Callable[[], object]] = {}
    torch._dynamo.reset()  # torch compiles one function at most 8 times: each table starts a fresh count
    t5.compiled_decode_step.cache_clear()  # (and forgets the shapes it ran eagerly)
    for label, model in [("t5.py", ours)] + ([("t5.py int8", models.int8)] if models.int8 is not None else []):
        fns[f"{label} eager"] = (lambda m=model: t5.generate(m, ids, mask, max_new_tokens=new, min_new_tokens=new))
        if not args.no_compile:
            log(f"  compiling the decode step ({label}) ...")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t5.generate(model, ids, mask, max_new_tokens=new, min_new_tokens=new, compile=True)
            if any("recompile limit" in str(warning.message) for warning in caught):
                log(f"  {label}: the decode step ran eagerly (torch's recompile limit): no compiled row")
            else:
                fns[f"{label} compiled step"] = (lambda m=model: t5.generate(m, ids, mask, max_new_tokens=new,
                                                                             min_new_tokens=new, compile=True))
        if not args.no_compile and args.device == "cuda":
            log(f"  compiling the decode step with CUDA graphs ({label}) ...")
            try:
                fns[f"{label} CUDA graphs (experiment)"] = cuda_graph_greedy(model, ids, mask, new)
            except Exception as error:  # an experiment: its failure is reported, not fatal
                log(f"  {label} CUDA graphs (experiment) left out: {type(error).__name__}: {error}")
    for impl, hf in models.hf.items():
        fns[f"HF {impl}"] = (lambda hf=hf: hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                       max_new_tokens=new, min_new_tokens=new))
    fns["HF sdpa static cache"] = lambda: models.hf["sdpa"].generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new,
        cache_implementation="static")
    with torch.inference_mode():
        times = round_robin(fns, args.repeats, args.device)
    if args.no_ctranslate2:
        log("  own-process rows (t5.py again, CTranslate2, nai-t5): skipped (--no-ctranslate2)")
    elif args.device != "cpu" or ours.lm_head.weight.dtype != torch.float32:
        log("  own-process rows (t5.py again, CTranslate2, nai-t5): float32 on CPU only")
    else:
        times.update(own_process_rows("t5", "t5.py (own process)", "--ours-worker", models, ids, new, args.repeats))
        times.update(own_process_rows("ctranslate2", "CTranslate2 (float32)", "--ctranslate2-worker", models, ids,
                                      new, args.repeats))
        config = models.config  # nai-t5 converts v1.1-style checkpoints with as many decoder as encoder layers
        if config.ffn == "gated-gelu" and config.num_decoder_layers == config.num_encoder_layers:
            # its tokens must equal ours, which forbid EOS until the last step: nai-t5 has no such option, and
            # random weights seldom prefer EOS (a disagreement leaves its row out, with a message)
            times.update(own_process_rows("nai_t5", "nai-t5", "--nai-t5-worker", models, ids, new, args.repeats))
        else:
            log(f"  nai-t5 rows: not for {name} (nai-t5 converts gated models of equal depths only)")
    hf_best = min(t.median for n, t in times.items() if n.startswith("HF"))
    rows = []
    for impl, t in times.items():
        rows.append(f"| {name} | {batch} | {impl} | {t.median / new * 1e3:.2f} ({t.low / new * 1e3:.2f}-"
                    f"{t.high / new * 1e3:.2f}){t.flag()} | {batch * new / t.median:,.0f} | {hf_best / t.median:.2f}x |")
    return rows


########################################################################################
# int8 quality
########################################################################################


def int8_quality() -> list[str]:
    """Log-prob errors of int8 weights against the same implementation in float32, ours and
    CTranslate2's, on the trained demo model: the 200 held-out prompts, teacher-forced on their right
    answers (log-probs near 0) and on another prompt's answer (log-probs far from 0, where errors
    show). CTranslate2 scores the demo exported with --to-hf; its float32 must match ours first."""
    import ctranslate2
    import train

    demo = Path(__file__).parent / "demo"
    model, tokenizer = t5.load(demo), t5.load_tokenizer(demo)
    numbers = train.held_out()
    ids, mask = tokenizer.encode_batch([train.prompt(n) for n in numbers])
    answers = tokenizer.encode_batch([train.spell(n) for n in numbers])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        assert convert_hf.main(["--to-hf", str(demo), f"{tmp}/hf", "--dtype", "float32"]) == 0
        vocab = ctranslate2_model(Path(tmp) / "hf", f"{tmp}/ct2")
        translators = {ct: ctranslate2.Translator(f"{tmp}/ct2", device="cpu", compute_type=ct) for ct in CT2_TYPES}
        int8 = t5.quantize(t5.load(demo))
        ours = {"float32": model, "int8, float32 compute, inputs quantized (fbgemm)": int8,
                "int8, float32 compute, weight-only": int8,
                "int8, bfloat16 compute": t5.quantize(t5.load(demo, dtype=torch.bfloat16)),
                "bfloat16 (no int8)": t5.load(demo, dtype=torch.bfloat16)}
        for targets, (labels, label_mask) in [("right answers", answers),
                                              ("another prompt's answer", tuple(t.roll(1, 0) for t in answers))]:
            real = label_mask.bool()
            decoder_ids = train.shift_right(labels.masked_fill(~real, -100), model.config)
            logprobs = {}
            try:
                for name, m in ours.items():
                    t5.Int8Linear.quantize_inputs = t5.FBGEMM and "weight-only" not in name
                    with torch.no_grad():
                        logprobs[name] = m(ids, decoder_ids, input_mask=mask, decoder_mask=label_mask).logits \
                            .float().log_softmax(-1).gather(-1, labels[..., None])[..., 0][real]
            finally:  # the class default back, also when a row fails
                t5.Int8Linear.quantize_inputs = t5.FBGEMM
            source = [[vocab[i] for i in row[keep].tolist()] for row, keep in zip(ids, mask.bool())]
            target = [[vocab[i] for i in row[keep].tolist()][:-1] for row, keep in zip(labels, real)]  # CT2 adds EOS
            ct2 = {ct: torch.tensor([p for r in t.score_batch(source, target) for p in r.log_probs])
                   for ct, t in translators.items()}
            rows.append(f"| {targets} | CTranslate2 float32 vs t5.py float32 | "
                        f"{(ct2['float32'] - logprobs['float32']).abs().max():.2e} | "
                        f"{(ct2['float32'] - logprobs['float32']).abs().mean():.2e} |")
            for name in list(ours)[1:]:
                error = (logprobs[name] - logprobs["float32"]).abs()
                rows.append(f"| {targets} | t5.py {name} | {error.max():.2e} | {error.mean():.2e} |")
            for ct in list(CT2_TYPES)[1:]:
                error = (ct2[ct] - ct2["float32"]).abs()
                rows.append(f"| {targets} | CTranslate2 {ct} | {error.max():.2e} | {error.mean():.2e} |")
    return rows


########################################################################################
# Precision
########################################################################################

QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999)


def encoder_error_quantiles(ours_dir: Path, hf_dir: Path, dtype: torch.dtype, ids: torch.Tensor,
                            mask: torch.Tensor) -> tuple[list[float], list[float]]:
    """|encoder output in `dtype` - the same implementation's float32 output| over the real tokens,
    at QUANTILES: (ours, Hugging Face's). Both load the same converted / original checkpoint."""
    import transformers

    keep = mask.bool()
    q = torch.tensor(QUANTILES, dtype=torch.float64)
    errors = []
    with torch.inference_mode():
        ref = t5.load(ours_dir, encoder_only=True)(ids, mask)
        half = t5.load(ours_dir, encoder_only=True, dtype=dtype)(ids, mask).float()
        errors.append((half - ref)[keep])
        hf_class = transformers.AutoModelForSeq2SeqLM
        ref = hf_class.from_pretrained(hf_dir).eval().encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        hf = hf_class.from_pretrained(hf_dir, dtype=dtype).eval()
        half = hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        errors.append((half - ref)[keep])
    ours, theirs = (torch.quantile(e.abs().flatten().double(), q).tolist() for e in errors)
    return ours, theirs


def bench_precision(models: Models, name: str, root: Path) -> list[str]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([64, 50, 37, 23])
    ids = torch.randint(3, models.config.vocab_size, (4, 64), generator=g)
    mask = (torch.arange(64)[None] < lengths[:, None]).long()
    rows = []
    ours_dir = root / f"{name}-ours"
    for dtype in (torch.bfloat16, torch.float16):
        ours, theirs = encoder_error_quantiles(ours_dir, models.hf_dir, dtype, ids * mask, mask)
        for impl, values in (("t5.py", ours), ("HF", theirs)):
            rows.append(f"| {name} | {str(dtype).removeprefix('torch.')} | {impl} | "
                        + " | ".join(f"{v:.2e}" for v in values) + " |")
        wins = sum(a < b for a, b in zip(ours, theirs))
        rows.append(f"| {name} | {str(dtype).removeprefix('torch.')} | t5.py closer at | {wins} of {len(QUANTILES)} "
                    f"quantiles |" + " |" * (len(QUANTILES) - 1))
    return rows


########################################################################################
# fp8 weights: resident memory while encoding
########################################################################################

XXL_WIDTH = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, ffn="gated-gelu")  # T5 v1.1 XXL


# glibc keeps freed blocks below its (self-raising, up to 32 MiB) mmap threshold in the heap, so
# a process's RSS would remember earlier temporaries; a fixed 64 KiB threshold returns every large
# tensor to the system when it is freed, and the peak measures what was alive at once.
MEASURED_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}


def run_worker(*args: object) -> dict:
    """Run this script's hidden worker mode in a fresh process (glibc threshold fixed, see
    MEASURED_ENV) and return the JSON it prints last."""
    out = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True, check=True,
                         env=MEASURED_ENV).stdout
    return json.loads(out.splitlines()[-1])


def rss_mib(field: str) -> float:
    """VmRSS / VmHWM of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(folder: Path, batch: int, seq: int) -> None:
    """In a fresh process: load an encoder checkpoint, encode batch x seq tokens, print (JSON) the
    memory above what the process held before loading: resident after loading, peak while encoding."""
    torch.set_num_threads(2)
    base = rss_mib("VmRSS")
    encoder = t5.load(folder, encoder_only=True)
    loaded = rss_mib("VmRSS") - base
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    ids = torch.randint(3, encoder.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode():
        encoder(ids, torch.ones_like(ids))
    print(json.dumps({"loaded": loaded, "peak": rss_mib("VmHWM") - base, "seconds": time.perf_counter() - start}))


def random_encoder_tensors(config: t5.T5Config, specs: dict[str, tuple[torch.Size, torch.dtype]]):
    """Seeded random encoder weights at `config`'s shapes, one tensor at a time, stored as `specs`
    says (fp8 and int8 weights quantized per row, followed by their scales)."""
    for i, (name, (shape, dtype)) in enumerate(specs.items()):
        if name.endswith("_scale"):
            continue
        g = torch.Generator().manual_seed(i)
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) == 2 and "embedding" not in name else 1)
        if dtype in convert_hf.QUANTIZE:
            weight, scale = convert_hf.QUANTIZE[dtype](tensor)
            yield name, weight
            yield name + "_scale", scale
        else:
            yield name, tensor.to(dtype)


def bench_fp8_memory(root: Path, layers: int, batch: int, seq: int) -> list[str]:
    """The same random XXL-width encoder stored in bfloat16, with fp8 weights and with int8 weights;
    each loaded and run in its own process."""
    config = t5.T5Config(**XXL_WIDTH, num_encoder_layers=layers, num_decoder_layers=1)
    results = {}
    for weights in ("dense", "float8_e4m3fn", "int8"):
        folder = root / f"xxl-{weights}"
        folder.mkdir()
        specs = convert_hf.output_specs(config, True, torch.bfloat16, weights)
        log(f"writing a {layers}-layer XXL-width encoder, {weights} weights ...")
        convert_hf.write_safetensors(folder / "model.safetensors", specs, random_encoder_tensors(config, specs))
        config.save(folder / "config.json")
        log(f"encoding {batch}x{seq} with it in a fresh process ...")
        results[weights] = run_worker("--memory-worker", folder, batch, seq)
        results[weights]["file"] = (folder / "model.safetensors").stat().st_size / 2**20
        shutil.rmtree(folder)
    dense = results["dense"]
    rows = []
    for weights, label in (("dense", "bfloat16"), ("float8_e4m3fn", "fp8 weights, bfloat16 compute"),
                           ("int8", "int8 weights, bfloat16 compute")):
        r = results[weights]
        rows.append(f"| {layers} x XXL width | {batch}x{seq} | {label} | {r['file']:,.0f} | {r['loaded']:,.0f} | "
                    f"{r['peak']:,.0f} | {r['peak'] / dense['peak']:.2f}x | {r['seconds']:.1f} |")
    return rows


########################################################################################
# Activation memory of one encoder forward
########################################################################################

# XXL's attention (64 heads of 64) and feed-forward width, with a narrow residual and few layers
# so that a CPU can run batch 4 x 512: the balance between FFN temporaries and attention scores
# is XXL's at that batch.
MEMORY_SHAPE = dict(vocab_size=32128, d_model=512, d_kv=64, num_heads=64, d_ff=10240, num_layers=6)


def encoder_memory_worker(family: str, impl: str, batch: int, seq: int) -> None:
    """In a fresh process: build a random bfloat16 encoder, then print (JSON) the peak memory of
    one forward above what the process held just before it (weights already there)."""
    import transformers

    quiet_transformers()
    torch.set_num_threads(2)
    lengths = torch.linspace(seq, seq // 2, batch).long()  # a padded batch: a padding mask is needed
    ids = torch.randint(3, MEMORY_SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    if impl == "HF":
        config_cls, model_cls = {"t5-v1_1": (transformers.T5Config, transformers.T5EncoderModel),
                                 "umt5": (transformers.UMT5Config, transformers.UMT5EncoderModel)}[family]
        model = model_cls(config_cls(feed_forward_proj="gated-gelu", **MEMORY_SHAPE)).to(torch.bfloat16).eval()
        run = lambda: model(input_ids=ids, attention_mask=mask)  # noqa: E731
    else:
        fields = {k: v for k, v in MEMORY_SHAPE.items() if k != "num_layers"}
        config = t5.T5Config(**fields, num_encoder_layers=MEMORY_SHAPE["num_layers"], num_decoder_layers=1,
                             ffn="gated-gelu", bias_per_layer=family == "umt5")
        model = t5.set_attention(t5.T5Encoder(config).to(torch.bfloat16).eval(), impl.split()[-1])
        run = lambda: model(ids, mask)  # noqa: E731
    with torch.inference_mode():
        run()  # warm-up: allocator pools and one-time buffers are not the forward's
        before = rss_mib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        run()
    print(json.dumps({"peak": rss_mib("VmHWM") - before}))


def bench_encoder_memory(batch: int, seq: int) -> list[str]:
    rows = []
    for family in ("t5-v1_1", "umt5"):
        peaks = {}
        for impl in ("t5.py sdpa", "t5.py flex", "HF"):
            log(f"memory {family} {impl} {batch}x{seq} ...")
            peaks[impl] = run_worker("--encoder-memory-worker", family, impl, batch, seq)["peak"]
        for impl, peak in peaks.items():
            rows.append(f"| {family} | {batch}x{seq} | {impl} | {peak:,.0f} | {peak / peaks['HF']:.2f}x |")
    return rows


########################################################################################
# Main
########################################################################################


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sections", default="encoder,generate",
                        help="comma list of: encoder, generate, precision (also --precision)")
    parser.add_argument("--precision", action="store_true", help="only the precision report (float32 on CPU)")
    parser.add_argument("--models", help=f"comma list of: {', '.join(SHAPES)} (default: all but tiny-v1_1; "
                        "--precision: tiny-v1_1 and t5-v1_1-small)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(t5.DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each implementation")
    parser.add_argument("--batches", default="1,8", help="generation batch sizes")
    parser.add_argument("--input-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64, help="exactly this many tokens are generated")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--no-ctranslate2", action="store_true", help="skip the rows timed in their own process "
                        "(t5.py float32 eager again, CTranslate2 and nai-t5 even if installed)")
    parser.add_argument("--no-int8", action="store_true", help="skip the rows of our int8 model (t5.quantize "
                        "of our model in --dtype)")
    parser.add_argument("--quick", action="store_true", help="t5-v1_1-small (or --models), encoder 8x128 and "
                        "generation at batch 1 "
                        "only, 3 repeats, no compile, no int8, no CTranslate2 or nai-t5: about 45 s on 2 idle cores")
    parser.add_argument("--fp8-memory", action="store_true", help="only the fp8 and int8 table: resident memory while encoding, "
                        "bfloat16 vs fp8 vs int8 weights, XXL width (~10 GB of disk in a temp folder, a few minutes)")
    parser.add_argument("--fp8-layers", type=int, default=12, help="encoder layers for --fp8-memory (XXL has 24)")
    parser.add_argument("--ctranslate2-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--nai-t5-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ours-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--int8-quality", action="store_true", help="only the int8 quality table: log-prob errors of "
                        "int8 weights, ours and CTranslate2's (needs ctranslate2), on the demo model")
    parser.add_argument("--memory", action="store_true", help="only the activation-memory table: peak extra memory of "
                        "one bfloat16 encoder forward at XXL's attention and FFN widths, ours vs transformers")
    parser.add_argument("--memory-batch", type=int, default=4, help="batch for --memory (default: 4, of 512 tokens)")
    parser.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--encoder-memory-worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.encoder_memory_worker:
        family, impl, batch, seq = args.encoder_memory_worker
        return encoder_memory_worker(family, impl, int(batch), int(seq))
    if args.memory:
        rows = bench_encoder_memory(args.memory_batch, 512)
        print(f"# t5.py encoder activation memory, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
        print(f"bfloat16, random weights, {MEMORY_SHAPE}, a padded batch (lengths 512 down to 256), padding mask; "
              "MiB of peak RSS above the process before the forward (weights already resident), each in a fresh "
              "process after one warm-up forward.\n")
        print("| family | batch x seq | implementation | peak extra MiB | vs HF |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
        return None
    if args.memory_worker:
        folder, batch, seq = args.memory_worker
        return memory_worker(Path(folder), int(batch), int(seq))
    if args.fp8_memory:
        with tempfile.TemporaryDirectory() as tmp:
            rows = bench_fp8_memory(Path(tmp), args.fp8_layers, 1, 512)
        print(f"# t5.py fp8 memory, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
        print("MiB above the process before loading; each row a fresh process; random weights. safetensors maps "
              "the file: its pages become resident as the forward first reads them, so after-load is small and the "
              "peak holds the weights.\n")
        print("| model | batch x seq | weights | file MiB | resident after load | peak while encoding | "
              "peak vs bfloat16 | encode s |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        return None
    if args.int8_quality:
        rows = int8_quality()
        print(f"# int8 quality, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
        print("|log-prob - the same implementation's float32 log-prob| of each target token, demo model, "
              "200 held-out prompts\n")
        print("| targets | what | max | mean |\n|---|---|---|---|")
        print("\n".join(rows))
        return None
    for job_file, worker in ((args.nai_t5_worker, nai_t5_worker), (args.ctranslate2_worker, ctranslate2_worker),
                             (args.ours_worker, ours_worker)):
        if job_file:
            quiet_transformers()
            job = json.loads(job_file.read_text())
            return worker(Path(job["hf_dir"]), job["ids"], job["new_tokens"], job["repeats"], Path(job["out"]))
    if args.quick:
        args.models, args.repeats, args.no_compile, args.no_ctranslate2 = args.models or "t5-v1_1-small", 3, True, True
        args.no_int8 = True
        args.batches, encoder_shapes = "1", [(8, 128)]
    else:
        encoder_shapes = [(1, 512), (8, 128)]
    if args.precision:
        args.sections, args.device, args.dtype = "precision", "cpu", "float32"
        args.models = args.models or "tiny-v1_1,t5-v1_1-small"
    args.models = args.models or ",".join(name for name in SHAPES if not name.startswith("tiny"))
    dtype = t5.DTYPES[args.dtype] if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    sections = args.sections.split(",")
    for flag, given, known in (("--models", args.models.split(","), SHAPES), ("--sections", sections,
                                                                              ("encoder", "generate", "precision"))):
        if set(given) - set(known):  # before any work: a typo was a traceback, or an empty report
            parser.error(f"{flag}: unknown {sorted(set(given) - set(known))}; choose from {', '.join(known)}")
    import transformers

    quiet_transformers()
    peaks = [gemm_peak(args.device, dtype)]
    encoder_rows: list[EncoderRow] = []
    generate_rows: list[str] = []
    precision_rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.models.split(","):
            log(f"building {name} ...")
            models = build_models(name, root, args.device, dtype, int8=not args.no_int8)
            if "encoder" in sections:
                for batch, seq in encoder_shapes:
                    log(f"encoder {name} {batch}x{seq}")
                    encoder_rows += bench_encoder(models, name, batch, seq, args)
            if "generate" in sections:
                for batch in map(int, args.batches.split(",")):
                    log(f"generate {name} batch {batch}")
                    generate_rows += bench_generate(models, name, batch, args)
            if "precision" in sections:
                log(f"precision {name}")
                precision_rows += bench_precision(models, name, root)
            del models
    peaks.append(gemm_peak(args.device, dtype))
    peak = max(peaks)
    print(f"# t5.py benchmark, {time.strftime('%Y-%m-%d')}\n")
    print(f"device {args.device} ({torch.get_num_threads()} threads), {dtype}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; matmul peak (2048^3 torch.mm, best of 10 before and after): "
          f"{peak / 1e9:.0f} GFLOP/s (before {peaks[0] / 1e9:.0f}, after {peaks[1] / 1e9:.0f})\n")
    if encoder_rows:
        print("## Encoder forward\n")
        print(f"`noisy`: the slowest run took more than {1 + NOISY:.2f}x the fastest; rerun before quoting it.\n")
        print("| model | batch x seq | implementation | ms median (min-max) | tokens/s | GFLOP/s | % of peak | vs best HF |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(row.format(peak) for row in encoder_rows) + "\n")
    if generate_rows:
        print(f"## Generation: {args.input_tokens} input tokens, exactly {args.new_tokens} new tokens, greedy\n")
        print("ms per step = whole generate call (encoder and prefill included) / new tokens.\n")
        print("| model | batch | implementation | ms per step median (min-max) | tokens/s | vs best HF |")
        print("|---|---|---|---|---|---|")
        print("\n".join(generate_rows) + "\n")
    if precision_rows:
        print("## Precision: encoder output in half precision vs the same implementation in float32\n")
        print("|error| over real tokens at each quantile; 4 rows of 64/50/37/23 random tokens.\n")
        print("| model | dtype | implementation | " + " | ".join(f"q{q}" for q in QUANTILES) + " |")
        print("|---|---|---|" + "---|" * len(QUANTILES))
        print("\n".join(precision_rows) + "\n")


if __name__ == "__main__":
    main()
