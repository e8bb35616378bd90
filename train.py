"""Training with t5.py: the helpers a training loop needs, and the trainer of the demo model in demo/.

Helpers: `shift_right` (labels -> decoder inputs), `packing_masks` (segment ids -> the three 3-dim
masks), `init_weights` (a fresh model's initialization), `sum_embedding_grads` (train the two
input tables as T5's one shared table). t5.py runs models; this file is only needed to train one.

    python train.py                      # a few minutes on 2 CPU cores; writes checkpoints/demo/
    python train.py --out demo --force   # replace the shipped demo/

The demo: "spell: 4071" -> "four thousand seventy-one", for every number below 100,000. The 200
numbers of `held_out()` are never trained on: they measure how well the model generalizes
(test_t5.py asks for at least 95% exact matches). Everything is seeded, so a rerun on the same
machine and versions should reproduce demo/ (not tested: a run takes minutes). Its tokenizer is a
sentencepiece model trained here.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from einops import rearrange
from torch import Tensor, nn

import t5


def shift_right(labels: Tensor, config: t5.T5Config) -> Tensor:
    """Target ids (b, t), -100 where ignored -> decoder inputs (b, t): the decoder start token,
    then the targets shifted one step right (teacher forcing), ignored positions as pad."""
    start = labels.new_full((labels.shape[0], 1), config.decoder_start_token_id)
    shifted = torch.cat([start, labels[:, :-1]], dim=1)
    return shifted.masked_fill(shifted == -100, config.pad_token_id)


def packing_masks(input_segments: Tensor, target_segments: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Segment ids of packed rows (1, 2, ... per example, 0 = padding; input and target side) ->
    (input_mask (b, s, s), decoder_mask (b, t, t), cross_mask (b, t, s)): a position attends only
    within its own example; the decoder adds causality."""
    if input_segments.dim() != 2 or target_segments.dim() != 2 or len(input_segments) != len(target_segments):
        raise ValueError(f"packing_masks takes segment ids (batch, s) and (batch, t), got "
                         f"{tuple(input_segments.shape)} and {tuple(target_segments.shape)}")

    def same(q: Tensor, k: Tensor) -> Tensor:
        pair = rearrange(q, "b q -> b q 1") == rearrange(k, "b k -> b 1 k")
        return pair & rearrange(q > 0, "b q -> b q 1")
    return same(input_segments, input_segments), same(target_segments, target_segments), \
        same(target_segments, input_segments)


def init_weights(model: t5.T5 | t5.T5Encoder | t5.T5Decoder, generator: torch.Generator | None = None) -> None:
    """Initialize every parameter, normal with mean 0 (norms: 1). scale_qk=False (Mesh TensorFlow's
    scheme): q (d_model * d_kv)**-0.5; k, v, cross K/V, FFN wi, bias tables d_model**-0.5; attention
    out inner_dim**-0.5; FFN wo d_ff**-0.5; embeddings and lm_head 1. scale_qk=True: the same, but
    q and lm_head d_model**-0.5. T5 v1.0 (ffn="relu") reads its input table as the output layer,
    times d_model**-0.5: its lm_head starts as that (transformers' tied init), the decoder's table
    as the encoder's. A compiled model is initialized through the model it wraps."""
    model = getattr(model, "_orig_mod", model)
    if any(isinstance(module, t5.Float8Linear) for module in model.modules()):  # Int8Linear is one too
        raise ValueError("init_weights: initialize a dense model (this one has fp8 or int8 layers)")
    config = model.config
    d, e, i, f = config.d_model, config.d_kv, config.inner_dim, config.d_ff
    q_std = d**-0.5 if config.scale_qk else (d * e) ** -0.5

    def normal(weight: Tensor, std: float | list[tuple[int, float]]) -> None:
        """Fill weight; std may be [(rows, std), ...] for a fused matrix made of row blocks."""
        blocks = [(weight.shape[0], std)] if isinstance(std, float) else std
        start = 0
        with torch.no_grad():
            for rows, block_std in blocks:
                weight[start:start + rows].normal_(0.0, block_std, generator=generator)
                start += rows

    for module in model.modules():
        if isinstance(module, t5.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, t5.RelativePositionBias):
            normal(module.embedding.weight, d**-0.5)
        elif isinstance(module, (t5.T5Encoder, t5.T5Decoder)):
            normal(module.embedding.weight, 1.0)
        elif isinstance(module, t5.EncoderSelfAttention):  # DecoderSelfAttention too
            normal(module.qkv.weight, [(i, q_std), (2 * i, d**-0.5)])
            normal(module.out.weight, i**-0.5)
        elif isinstance(module, t5.CrossAttention):
            normal(module.q.weight, q_std)
            normal(module.kv.weight, d**-0.5)
            normal(module.out.weight, i**-0.5)
        elif isinstance(module, (t5.ReluFFN, t5.GegluFFN)):
            normal(module.wi.weight, d**-0.5)
            normal(module.wo.weight, f**-0.5)
        elif isinstance(module, t5.T5):
            normal(module.lm_head.weight, d**-0.5 if config.scale_qk else 1.0)
    if isinstance(model, t5.T5):  # T5 has one input table: both stacks start from the same values
        with torch.no_grad():
            model.decoder.embedding.weight.copy_(model.encoder.embedding.weight)
            if config.ffn == "relu":
                model.lm_head.weight.copy_(model.encoder.embedding.weight * d**-0.5)


def sum_embedding_grads(model: t5.T5 | t5.T5Encoder | t5.T5Decoder) -> None:
    """Call after `backward()`, before the optimizer step: each of the two input tables gets the sum
    of both gradients, which is T5's shared table's gradient, so tables that start equal stay equal
    and the result exports (`--to-hf`). Gradient clipping after it counts the table twice. With
    gradient accumulation, call it once, after the last micro-batch's backward: each call adds the
    other table's gradient again. A T5Encoder or T5Decoder alone has one table: nothing to do."""
    model = getattr(model, "_orig_mod", model)  # torch.compile(model): the model itself
    if not isinstance(model, t5.T5):
        return
    encoder, decoder = model.encoder.embedding.weight, model.decoder.embedding.weight
    # one table already (tied by the user: autograd summed both uses), or both frozen: nothing to sum
    if encoder is decoder or not (encoder.requires_grad or decoder.requires_grad):
        return
    if not (encoder.requires_grad and decoder.requires_grad):
        frozen = "encoder" if decoder.requires_grad else "decoder"
        raise ValueError(f"sum_embedding_grads: both embeddings must be trained, or neither (the {frozen}'s has "
                         "requires_grad=False)")
    if encoder.grad is None or decoder.grad is None:
        raise ValueError("sum_embedding_grads: both embeddings need a gradient (call it after backward)")
    total = encoder.grad + decoder.grad
    encoder.grad.copy_(total)
    decoder.grad.copy_(total)


LIMIT = 100_000
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def spell(n: int) -> str:
    """English words for 0 <= n < 1,000,000: 4071 -> 'four thousand seventy-one'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else "")
    if n < 1000:
        return ONES[n // 100] + " hundred" + (" " + spell(n % 100) if n % 100 else "")
    return spell(n // 1000) + " thousand" + (" " + spell(n % 1000) if n % 1000 else "")


def prompt(n: int) -> str:
    return f"spell: {n}"


def held_out() -> list[int]:
    """The 200 numbers kept out of training."""
    return sorted(random.Random(2024).sample(range(LIMIT), 200))


def small_numbers() -> list[int]:
    """The training numbers below 1000: uniform draws almost never show the model the few below 100
    ("spell: 0" was answered with nothing), so an eighth of every batch comes from these."""
    test = set(held_out())
    return [n for n in range(1000) if n not in test]


def demo_config(vocab_size: int) -> t5.T5Config:
    return t5.T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_heads=4, num_encoder_layers=3,
                       num_decoder_layers=3, ffn="gated-gelu", scale_qk=True, num_buckets=16, max_distance=32)


def train_tokenizer(folder: Path, numbers: list[int]) -> None:
    """A sentencepiece model with T5's special pieces (pad 0, EOS 1, unknown 2, no BOS); digits are
    single pieces so that every number is read digit by digit."""
    import sentencepiece

    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"{prompt(n)}\n{spell(n)}" for n in numbers))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=64, split_digits=True, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, minloglevel=2, num_threads=1, seed_sentencepiece_size=100_000)
    corpus.unlink()
    (folder / "spiece.vocab").unlink()


def evaluate(model: t5.T5, tokenizer: t5.Tokenizer, numbers: list[int]) -> float:
    """Fraction of numbers spelled exactly right by greedy decoding."""
    ids, mask = tokenizer.encode_batch([prompt(n) for n in numbers])
    out = t5.generate(model, ids, mask, max_new_tokens=32)
    right = sum(tokenizer.decode(row) == spell(n) for row, n in zip(out.tokens, numbers))
    return right / len(numbers)


def lr_factor(step: int, steps: int) -> float:
    """The learning rate's multiplier at `step`: a linear warmup over the first 5% of the steps (at
    least one), then a cosine decay to 0 at `steps`."""
    warmup = max(1, steps // 20)
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def train(out: Path, *, steps: int, batch: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    test = set(held_out())
    numbers = [n for n in range(LIMIT) if n not in test]
    small = small_numbers()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train_tokenizer(folder, numbers)
        pieces = t5.SentencePieceTokenizer(t5.T5Config(vocab_size=4096), folder / "spiece.model").sp.get_piece_size()
        config = demo_config(vocab_size=pieces + 100)  # + T5's 100 sentinels
        tokenizer = t5.load_tokenizer(folder, config)
        model = t5.T5(config)
        init_weights(model, torch.Generator().manual_seed(seed))
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
        start = time.time()
        model.train()
        for step in range(steps):
            chosen = rng.sample(numbers, batch - batch // 8) + rng.sample(small, batch // 8)
            ids, mask = tokenizer.encode_batch([prompt(n) for n in chosen])
            labels, label_mask = tokenizer.encode_batch([spell(n) for n in chosen])
            labels = labels.masked_fill(label_mask == 0, -100)
            decoder_ids = shift_right(labels, config)
            loss = model(ids, decoder_ids, input_mask=mask, decoder_mask=label_mask, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sum_embedding_grads(model)  # one input table, as T5 trains it: the result exports to transformers
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            rate = schedule.get_last_lr()[0]  # this step's (after schedule.step(): the next one's)
            optimizer.step()
            schedule.step()
            if step % 250 == 0 or step == steps - 1:
                print(f"step {step:5d}  loss {loss.item():.4f}  lr {rate:.2e}  "
                      f"{time.time() - start:.0f}s", flush=True)
        model.eval()
        accuracy = evaluate(model, tokenizer, sorted(test))
        print(f"held-out exact match: {accuracy:.1%} of {len(test)}")
        t5.save(model, out, tokenizer)  # config.json, model.safetensors, spiece.model (--force: replaced)
        print(f"wrote {out}")
    return accuracy


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "checkpoints" / "demo",
                        help="output folder (default: checkpoints/demo beside train.py; the shipped model is demo/)")
    parser.add_argument("--force", action="store_true", help="save over --out if it exists (t5.save: files of its own stay)")
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps (default: 1500)")
    parser.add_argument("--batch", type=int, default=128, help="examples per step (default: 128)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything random (default: 0)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    most = 8 * len(small_numbers()) + 7  # an eighth of a batch: distinct numbers below 1000
    for ok, message in ((args.steps >= 1, f"--steps must be at least 1, got {args.steps}"),
                        (1 <= args.batch <= most, f"--batch must be in [1, {most}], got {args.batch}"),
                        (0 <= args.lr < math.inf, f"--lr must be a finite number of at least 0, got {args.lr}"),
                        (-2**63 <= args.seed < 2**64, f"--seed must be in [-2**63, 2**64), got {args.seed}")):
        if not ok:
            print(f"train.py: error: {message}", file=sys.stderr)
            return 2
    below = next(p for p in (args.out, *args.out.absolute().parents) if os.path.lexists(p))  # t5.save's folder
    if not below.is_dir():  # a file, a dangling link, or a path under a file: t5.save would fail after training
        print(f"train.py: error: --out {args.out}: {below} is not a folder", file=sys.stderr)
        return 2
    if args.out.exists() and not args.force:
        print(f"train.py: error: {args.out} exists; pass --force to replace it", file=sys.stderr)
        return 2
    if (args.out / "config.json").exists() and not t5.is_our_config(args.out / "config.json"):
        print(f"train.py: error: {args.out / 'config.json'} is not ours (t5.save would refuse it after training): "
              "choose another --out", file=sys.stderr)
        return 2
    torch.set_num_threads(min(2, torch.get_num_threads()))  # the reference run: 2 CPU cores
    try:
        train(args.out, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    except KeyboardInterrupt:
        torn = (args.out / "model.safetensors").exists() and not (args.out / "config.json").exists()
        print(f"train.py: interrupted ({args.out} " + ("lost its config.json: t5.save was renaming, train again)"
                                                      if torn else "unchanged)"), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
