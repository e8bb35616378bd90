"""The command line of t5.py: generate text, write encoder hidden states, print FLOP counts.

    python cli.py generate "spell: 4071"
    python cli.py encode --ckpt CKPT "a photo of a cat" --out hidden.safetensors
    python cli.py flops --ckpt CKPT --batch 8 --src 128 --tgt 32

Every mistake in how it is called is reported in one line, without a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _interrupted_while_loading(*_: object) -> None:
    """Nothing is written yet: exit at once (an exception could be caught by the code being imported)."""
    print("cli.py: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


_sigint = signal.getsignal(signal.SIGINT)  # what main() puts back: Python's, a host's (runpy), or "ignore"
if __name__ == "__main__" and _sigint is not signal.SIG_IGN:  # Ctrl-C while torch loads (seconds): quiet too
    signal.signal(signal.SIGINT, _interrupted_while_loading)

import t5  # noqa: E402 (after the handler above); before torch: t5 imports torch quietly when numpy is absent
import torch
import torch.nn.functional as F
from torch import Tensor

DEMO = Path(__file__).resolve().parent / "demo"
LONG_INPUT = 1024  # tokens: twice the 512 of T5's pre-training; longer prompts get a warning


class CommandLineError(Exception):
    """A mistake in how the command was called: reported in one line, no traceback."""


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CommandLineError(f"--device {name}: unknown device (cpu, cuda, cuda:N)") from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise CommandLineError(f"--device {name}: a CPU has no index but 0")
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandLineError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandLineError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise CommandLineError(f"--device {name}: not a device this machine can run on (cpu"
                           f"{', cuda' if torch.cuda.is_available() else ''})")


def _check_text(text: str, where: str) -> str:
    try:  # undecodable bytes reach Python as lone surrogates
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CommandLineError(f"{where} is not valid UTF-8") from None
    return text


def _prompt_batches(prompts: list[str], batch_size: int | None) -> Iterator[list[str]]:
    """The prompts in batches of `batch_size` (None: 16, or 1 for lines typed at a terminal, each answered
    when it is entered): the arguments, or else stdin read lazily, one prompt per line (CRLF or LF),
    blank lines included, so that outputs line up with inputs."""
    if prompts:
        lines: Iterator[str] = (_check_text(p, f"prompt {i + 1}") for i, p in enumerate(prompts))
    else:
        lines = _stdin_lines()
    if batch_size is None:
        batch_size = 1 if not prompts and sys.stdin is not None and sys.stdin.isatty() else 16
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stdin_lines() -> Iterator[str]:
    if sys.stdin is None:  # started with stdin closed (`<&-`)
        raise CommandLineError("no prompt: give prompts as arguments (stdin is closed)")
    seen = False
    for number, raw in enumerate(sys.stdin.buffer, start=1):
        seen = True
        try:
            yield raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            raise CommandLineError(f"line {number} of stdin is not valid UTF-8") from None
    if not seen:
        raise CommandLineError("no prompt: give prompts as arguments or one per line on stdin")


def _encode_prompts(tokenizer: t5.Tokenizer, texts: list[str], first: int, device: torch.device, *,
                    max_input_tokens: int | None, max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Tokenize a batch (truncated to --max-input-tokens, or padded and truncated to encode's
    --max-length), warning about prompts far longer than T5 models are trained on."""
    limit = max_length or max_input_tokens
    ids, mask = tokenizer.encode_batch(texts, device=device, max_length=limit, truncation=limit is not None,
                                       padding="max_length" if max_length else "longest")
    for i, length in enumerate(mask.sum(dim=1).tolist() if limit is None else []):
        if length > LONG_INPUT:
            print(f"cli.py: warning: prompt {first + i + 1} is {length} tokens long, far past the 512 that T5 "
                  "models are trained on (--max-input-tokens N truncates)", file=sys.stderr)
    return ids, mask


def _has_decoder(ckpt: Path) -> bool:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
            return any(key.startswith("decoder.") for key in f.keys())
    except SafetensorError as error:
        raise CommandLineError(f"{ckpt / 'model.safetensors'}: not a readable safetensors file ({error})") from None


def _load(ckpt: Path, device: str | None, dtype: str | None, weights: str | None = None, *, encoder_only: bool = False
          ) -> tuple[t5.T5 | t5.T5Encoder, t5.Tokenizer]:
    """The model and tokenizer of --ckpt, its linear weights made int8 when asked (--weights int8);
    `t5.load` checks the files (its errors are one line)."""
    if not (ckpt / "config.json").is_file() or not (ckpt / "model.safetensors").is_file():
        raise CommandLineError(f"--ckpt {ckpt}: no converted checkpoint there (config.json and model.safetensors); "
                               "convert one with convert_hf.py")
    torch_device = _device(device)
    tokenizer = t5.load_tokenizer(ckpt)
    try:
        model = t5.load(ckpt, encoder_only=encoder_only, device=torch_device, dtype=t5.DTYPES.get(dtype))
    except ValueError:  # missing tensors: say it plainly when they are the decoder's (only then is the header read)
        if not encoder_only and not _has_decoder(ckpt):
            raise CommandLineError(f"--ckpt {ckpt} holds only an encoder: it can `encode`, not `generate`") from None
        raise
    return (t5.quantize(model) if weights == "int8" else model), tokenizer


def _sampling(args: argparse.Namespace) -> tuple[t5.GenerationOptions, torch.Generator | None]:
    """Check the generation flags (before the model is loaded) and turn them into `generate`'s
    options. The rules of the flags themselves are here (--temperature 0 is greedy, sampling is
    on when a sampling flag is given, --seed needs sampling); `GenerationOptions.check` does the rest."""
    if args.temperature is not None and not 0 <= args.temperature < math.inf:  # nan too
        raise CommandLineError(f"--temperature must be 0 (greedy) or positive and finite, got {args.temperature}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise CommandLineError(f"--seed must be in [0, 2**63), got {args.seed}")
    if args.top_k is not None and args.top_k < 1:
        raise CommandLineError(f"--top-k must be at least 1, got {args.top_k}")
    filters = args.top_k is not None or args.top_p is not None
    if args.temperature == 0 and filters:
        raise CommandLineError("--temperature 0 is greedy decoding: it does not combine with --top-k/--top-p")
    sample = bool(args.temperature) or filters
    if sample and args.num_beams > 1:
        raise CommandLineError("--num-beams is beam search: it does not combine with --temperature/--top-k/--top-p")
    if args.seed is not None and not sample:
        raise CommandLineError("--seed only matters when sampling (--temperature, --top-k or --top-p)")
    options = t5.GenerationOptions(args.max_new_tokens, args.min_new_tokens, do_sample=sample,
                                   temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                                   num_beams=args.num_beams, compile=args.compile)
    try:
        options.check()
    except ValueError as error:  # in the flags' names: --max-new-tokens, not max_new_tokens
        raise CommandLineError(_flag_names(str(error))) from None
    seeded = sample and args.seed is not None
    return options, torch.Generator(_device(args.device)).manual_seed(args.seed) if seeded else None


def _flag_names(message: str) -> str:
    """A GenerationOptions error in the command line's words."""
    for name in ("max_new_tokens", "min_new_tokens", "num_beams", "top_p", "top_k", "temperature"):
        message = message.replace(name, "--" + name.replace("_", "-"))
    return message


def _check_batching(batch_size: int | None, max_input_tokens: int | None, max_length: int | None = None,
                    no_mask: bool = False) -> None:
    if batch_size is not None and batch_size < 1:
        raise CommandLineError(f"--batch-size must be at least 1, got {batch_size}")
    for flag, value in (("--max-input-tokens", max_input_tokens), ("--max-length", max_length)):
        if value is not None and value < 1:
            raise CommandLineError(f"{flag} must be at least 1, got {value}")
    if no_mask and not max_length:
        raise CommandLineError("--no-mask needs --max-length N: without the mask every row attends to its padding, "
                               "so its states would depend on the batch it was padded with (Flux: 512, SD3: 256)")
    if max_length and max_input_tokens:
        raise CommandLineError("--max-length already truncates: it does not combine with --max-input-tokens")


def _one_line(text: str) -> str:
    """Generated text as one output line: line breaks (\\r, \\n, U+2028, ...) and other control
    characters (a byte-level model can make any) become spaces; tabs stay."""
    return re.sub(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]", " ", text)


def cli_generate(args: argparse.Namespace) -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`): print would drop every answer
        raise CommandLineError("stdout is closed: nowhere to write the answers")
    options, generator = _sampling(args)
    _check_batching(args.batch_size, args.max_input_tokens)
    model, tokenizer = _load(Path(args.ckpt), args.device, args.dtype, args.weights)
    device = model.lm_head.weight.device
    busy, count, done = 0.0, 0, 0  # busy: time spent on the prompts, not waiting for them
    for texts in _prompt_batches(args.prompts, args.batch_size):
        start = time.perf_counter()
        ids, mask = _encode_prompts(tokenizer, texts, done, device, max_input_tokens=args.max_input_tokens)
        if len(args.prompts) == 1 and options.num_beams == 1 and texts[0].strip():  # stream one prompt
            tokens: list[int] = []
            shown = text = ""
            # decode's clean-up (a folder that asks for it) may still drop a space among the last characters:
            # as far back as its longest rewrite, " n ' t" -> "n't" (two of its patterns in a row), reaches
            hold = len(" n ' t") - 1 if tokenizer.clean_up_spaces else 0
            for token in t5.stream(model, ids, mask, options, generator=generator):
                tokens.append(int(token[0]))
                text = _one_line(tokenizer.decode(tokens))
                # a character whose bytes are not all there yet decodes as one U+FFFD per byte: held back
                ready = text.rstrip("\ufffd")
                ready = ready[:max(len(shown), len(ready) - hold)]
                print(ready[len(shown):], end="", flush=True)
                shown = ready
            print(text[len(shown):])
            count += len(tokens)
        else:
            real = [i for i, text in enumerate(texts) if text.strip()]  # blank lines answer blank lines
            lines = [""] * len(texts)
            if real:
                out = t5.generate(model, ids[real], mask[real], options, generator=generator)
                for i, row in zip(real, out.tokens):
                    lines[i] = _one_line(tokenizer.decode(row))
                count += int(out.lengths.sum())
            print("\n".join(lines), flush=True)
        done += len(texts)
        busy += time.perf_counter() - start
    print(f"{count} tokens in {busy:.2f} s: {count / max(busy, 1e-9):.1f} tokens/s", file=sys.stderr)


def _check_out(name: str, force: bool, ckpt: Path) -> Path:
    """The --out of `encode`, checked before any work is done -> the path to write (a link's target)."""
    out = Path(name)  # which drops a trailing slash: "name/" means a folder
    if out.is_dir() or name.endswith(("/", os.sep)):
        raise CommandLineError(f"--out {name} is a folder; name a .safetensors file")
    if not out.parent.is_dir():
        raise CommandLineError(f"--out {out}: folder {out.parent} does not exist")
    if os.path.lexists(out) and not force:  # a dangling link too
        raise CommandLineError(f"--out {out} exists; pass --force to overwrite it")
    target = Path(os.path.realpath(out))
    if target.exists() and not target.is_file():
        raise CommandLineError(f"--out {out} is not a regular file (a device, a pipe?); name a .safetensors file")
    if target in {(ckpt / name).resolve() for name in ("config.json", "model.safetensors", "spiece.model",
                                                        "tokenizer.model")}:
        raise CommandLineError(f"--out {out} is a file of --ckpt {ckpt}, which this command reads")
    try:  # a file can be made there (os.access would say yes to root anywhere)
        probe = target.parent / f".t5-encode-{os.getpid()}.tmp"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise CommandLineError(f"--out {out}: cannot write in folder {target.parent} ({error.strerror})") from None
    return target


def cli_encode(args: argparse.Namespace) -> None:
    out = _check_out(args.out, args.force, Path(args.ckpt))
    _check_batching(args.batch_size, args.max_input_tokens, args.max_length, args.no_mask)
    encoder, tokenizer = _load(Path(args.ckpt), args.device, args.dtype, args.weights, encoder_only=True)
    device = encoder.embedding.weight.device
    batches, done = [], 0
    with torch.inference_mode():
        for texts in _prompt_batches(args.prompts, args.batch_size):
            ids, mask = _encode_prompts(tokenizer, texts, done, device, max_input_tokens=args.max_input_tokens,
                                        max_length=args.max_length)
            batches.append((ids.cpu(), mask.cpu(), encoder(ids, None if args.no_mask else mask).cpu()))
            done += len(texts)
    width = max(ids.shape[1] for ids, _, _ in batches)  # batches pad to their longest row: pad them all alike
    pad = tokenizer.pad_id

    def widen(x: Tensor, value: float) -> Tensor:
        return F.pad(x, (0, 0, 0, width - x.shape[1]) if x.dim() == 3 else (0, width - x.shape[1]), value=value)

    hidden = torch.cat([widen(h, 0.0) for _, _, h in batches]).contiguous()
    mask = torch.cat([widen(m, 0) for _, m, _ in batches])
    tensors = {"hidden": hidden, "mask": mask, "input_ids": torch.cat([widen(i, pad) for i, _, _ in batches])}
    tmp = out.parent / f".t5-encode-{os.getpid()}.tmp"
    try:  # written beside --out and moved into place: never half a file
        specs = {name: (tensor.shape, tensor.dtype) for name, tensor in tensors.items()}
        t5.write_safetensors(tmp, specs, tensors.items(), {"format": "pt"})
        if args.force:
            tmp.replace(out)
        else:
            try:  # a hard link fails, replacing nothing, if --out appeared while encoding
                os.link(tmp, out)
            except FileExistsError:
                raise CommandLineError(f"--out {args.out} appeared while encoding (kept); pass --force "
                                       "to overwrite it") from None
            except OSError:  # a filesystem without hard links
                tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {args.out}: hidden {tuple(hidden.shape)} {hidden.dtype}, mask {tuple(mask.shape)}", file=sys.stderr)


def cli_flops(args: argparse.Namespace) -> None:
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        raise CommandLineError("stdout is closed: nowhere to write the table")
    for flag in ("batch", "src", "tgt"):
        if getattr(args, flag) < 1:
            raise CommandLineError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    path = Path(args.ckpt)
    if not (path / "config.json" if path.is_dir() else path).is_file():
        raise CommandLineError(f"--ckpt {args.ckpt}: no checkpoint folder or config.json there")
    config = t5.T5Config.load(path / "config.json" if path.is_dir() else path)
    b, s, t = args.batch, args.src, args.tgt
    rows = [(f"encoder forward ({b} x {s})", t5.encoder_flops(config, b, s)),
            (f"decoder forward, {t} tokens over {s} (prefill)", t5.decoder_flops(config, b, t, s)),
            (f"one cached decode step (cache of {1 + t}, over {s})", t5.decode_step_flops(config, b, s, 1 + t))]
    if path.is_dir() and (path / "model.safetensors").is_file() and not _has_decoder(path):
        rows = rows[:1]  # an encoder-only checkpoint
    print(f"{'':50} {'attn proj':>12} {'attn scores':>12} {'ffn':>12} {'lm_head':>12} {'total':>12}  GFLOP")
    for name, f in rows:
        print(f"{name:50} " + " ".join(f"{x / 1e9:12.4f}" for x in (*f, f.total)))


def parser() -> argparse.ArgumentParser:
    """The command line; every option says its default."""
    top = argparse.ArgumentParser(prog="cli.py", description="T5 from the command line. With no --ckpt, the "
                                  "demo model in demo/ (it spells out numbers: 'spell: 4071').")
    commands = top.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("prompts", nargs="*", help="prompts (default: one per line on stdin, blank lines included; "
                       "output lines match input lines)")
        p.add_argument("--ckpt", default=str(DEMO), help="a folder written by convert_hf.py (default: the demo model)")
        p.add_argument("--dtype", choices=sorted(t5.DTYPES), help="compute in this dtype (default: as stored in --ckpt)")
        p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
        p.add_argument("--weights", choices=["int8"], help="int8: make the linear weights int8 after loading "
                       "(t5.quantize; on a CPU in float32 fbgemm multiplies int8 by int8: README, 'Which dtype when') "
                       "(default: as stored in --ckpt)")
        p.add_argument("--batch-size", type=int, help="prompts run together (default: 16; 1 for lines typed at a "
                       "terminal, each answered when it is entered)")
        p.add_argument("--max-input-tokens", type=int, help="truncate prompts to this many tokens, EOS kept last "
                       f"(default: no limit; prompts over {LONG_INPUT} tokens get a warning)")

    g = commands.add_parser("generate", help="generate text for prompts (greedy unless told otherwise)")
    common(g)
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens generated per prompt (default: 64)")
    g.add_argument("--min-new-tokens", type=int, default=0, help="EOS is forbidden before this many (default: 0)")
    g.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy; 0 is greedy too)")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens (default: no limit)")
    g.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this much probability "
                   "(default: 1, no limit)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default: 1, none)")
    g.add_argument("--seed", type=int, help="seed of the sampling generator: same seed, same prompts and --batch-size, "
                   "same text (default: random)")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step (default: off)")
    g.set_defaults(run=cli_generate)
    e = commands.add_parser("encode", help="write encoder hidden states (and mask) of prompts to a safetensors file")
    common(e)
    e.add_argument("--out", required=True, help="output .safetensors file (required): hidden (b, s, d), "
                   "mask and input_ids (b, s)")
    e.add_argument("--force", action="store_true", help="overwrite --out if it exists (default: refuse)")
    e.add_argument("--no-mask", action="store_true", help="run the encoder without the padding mask, as Flux / SD3 "
                   "pipelines do; needs --max-length (default: masked)")
    e.add_argument("--max-length", type=int, help="pad (and truncate, EOS kept last) every prompt to this many tokens, "
                   "as diffusion pipelines do: Flux 512, SD3 256, PixArt-alpha 120 (default: pad to the longest)")
    e.set_defaults(run=cli_encode)
    f = commands.add_parser("flops", help="print the FLOP breakdown of a config for given sizes")
    f.add_argument("--ckpt", default=str(DEMO), help="a checkpoint folder or a config.json (default: the demo model)")
    f.add_argument("--batch", type=int, default=1, help="rows (default: 1)")
    f.add_argument("--src", type=int, default=512, help="encoder tokens per row (default: 512)")
    f.add_argument("--tgt", type=int, default=64, help="decoder tokens per row (default: 64)")
    f.set_defaults(run=cli_flops)
    return top


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, its options and prompts in any order (`generate "a" --num-beams 2 "b"`); a
    mistake after the command is reported by the command's parser (`cli.py generate: error: ...`)."""
    top, argv = parser(), sys.argv[1:] if argv is None else argv
    command = top.parse_known_args(argv)[0].command  # exits on --help, or on a mistake in the command's name
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    cut = argv.index("--") if "--" in argv else len(argv)  # after it, prompts only (intermixed parsing ignores it)
    args = sub.parse_intermixed_args(argv[1:cut], argparse.Namespace(command=command))
    if cut < len(argv):
        if not hasattr(args, "prompts"):  # flops takes none
            sub.error(f"unrecognized arguments: {' '.join(argv[cut:])}")
        args.prompts += argv[cut + 1:]
    return args


def main(argv: list[str] | None = None) -> int:
    if signal.getsignal(signal.SIGINT) is _interrupted_while_loading:
        signal.signal(signal.SIGINT, _sigint)  # the one before (Python's: a KeyboardInterrupt, caught below)
    args = parse(argv)
    try:
        args.run(args)
    except BrokenPipeError:  # `cli.py ... | head -2`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141  # what a shell reports for SIGPIPE
    except (CommandLineError, OSError, ValueError) as error:  # OSError: FileNotFoundError, PermissionError, ...
        print(f"cli.py {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cli.py {args.command}: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as error:  # torch's CPU allocator, CUDA's (torch.OutOfMemoryError), Python's
        if not isinstance(error, (torch.OutOfMemoryError, MemoryError)) and "DefaultCPUAllocator" not in str(error):
            raise
        reason = (str(error) or type(error).__name__).splitlines()[0]  # Python's MemoryError has no text
        print(f"cli.py {args.command}: error: out of memory ({reason}): ask for less "
              "(--max-new-tokens, --max-length, --max-input-tokens, --batch-size)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
