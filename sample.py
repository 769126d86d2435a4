"""Sample from a trained run with the cached (stateful) decode path.

    python sample.py --run runs/hybrid-... --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 50

Teacher traces: complete every prompt of a jsonl ({"prompt": ...} or {"messages": [...]}) through the
run's chat template (or a transformers model folder's, with --hf), writing SFT-ready jsonl:
    python sample.py --run runs/teacher --prompts prompts.jsonl --out traces.jsonl --temperature 0
    python sample.py --hf path/to/Qwen2.5-0.5B-Instruct --prompts prompts.jsonl --out traces.jsonl --num-samples 4

Chat with a run through its chat template (replies streamed, the conversation kept):
    python sample.py --run runs/sft-... --chat --system "You are terse."

Diffusion runs (--arch diffusion) fill the new tokens by iterative unmasking instead:
    python sample.py --run runs/diffusion-... --max-new-tokens 128 --diffusion-steps 64 --block-length 32

A long --prompts job writes OUT.partial as it goes; after Ctrl-C the same command with --resume continues it.
A flag the chosen mode has no use for (--prompt with --prompts, --batch-size without --hf, ...) is an error.
"""
from __future__ import annotations

import argparse
import math
import sys

from slmlab.cli import run_cli
from slmlab.errors import ConfigError

# --prompt, --batch-size, --top-k and --seed default to None so that check_args can tell a given flag
# from an absent one (--batch-size 8 is refused without --hf as much as --batch-size 2); these fill
# them in afterwards.
DEFAULT_PROMPT, DEFAULT_BATCH_SIZE, DEFAULT_TOP_K, DEFAULT_SEED = "def ", 8, 50, 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory written by train.py")
    src.add_argument("--hf", help="with --prompts: a transformers model folder to generate with (transformers generate)")
    p.add_argument("--chat", action="store_true",
                   help="talk to the run through its chat template: a reply per line typed, streamed, the "
                        "conversation kept (/reset starts over, /quit or Ctrl-D ends)")
    p.add_argument("--system", default=None, help="with --chat: a system message to start every conversation with")
    p.add_argument("--prompts", help="jsonl of {\"prompt\": str} or {\"messages\": [...]}: complete each one "
                                     "(through the chat template) and write --out")
    p.add_argument("--out", help="with --prompts: the SFT-ready jsonl written ({prompt, completion} or messages)")
    p.add_argument("--force", action="store_true", help="with --prompts: replace an existing --out (and OUT.partial)")
    p.add_argument("--resume", action="store_true",
                   help="with --prompts: continue a stopped job from the completions OUT.partial holds (same flags)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"--hf --prompts: prompts generated together (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--prompt", default=None,
                   help=f"the text to continue (default {DEFAULT_PROMPT!r}); not with --prompts")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8,
                   help="0 = greedy (deterministic: --top-k, --seed and several --num-samples are refused, "
                        "except --seed/--num-samples with a diffusion run's --sampler mdlm)")
    p.add_argument("--top-k", type=int, default=None, help=f"sample from the k likeliest tokens; 0 = all "
                                                            f"(default {DEFAULT_TOP_K})")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: of the --top-k tokens, the fewest likeliest whose probabilities sum to "
                        "at least p, in (0, 1] (default 1: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--seed", type=int, default=None, help=f"the sampling generator's seed (default {DEFAULT_SEED})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decode step (costs seconds up front; pays off on long samples); "
                        "autoregressive runs, without --prompts")
    d = p.add_argument_group("diffusion runs")
    d.add_argument("--diffusion-steps", type=int, default=None,
                   help="denoising steps (default: one per new token; llada rounds it to a multiple of the blocks, "
                        "at most one per token, with a note)")
    d.add_argument("--block-length", type=int, default=None,
                   help="llada: semi-autoregressive block length; must divide --max-new-tokens (default 32 or a divisor)")
    d.add_argument("--sampler", default=None, choices=["llada", "mdlm"],
                   help="llada (default): low-confidence remasking, block by block; mdlm: ancestral sampling")
    return p.parse_args(argv)


def decode_kwargs(args, model) -> dict:
    """model.generate's extra arguments: the diffusion sampler's for a masked-diffusion run, the
    compiled/streaming decode's otherwise; flags of the other kind are an error."""
    if getattr(model, "mask_id", None) is not None:  # a masked-diffusion run
        return diffusion_kwargs(args, model)
    given = [f for f, v in (("--diffusion-steps", args.diffusion_steps), ("--block-length", args.block_length),
                            ("--sampler", args.sampler)) if v is not None]
    if given:
        raise ConfigError(f"{'/'.join(given)} appl{'ies' if len(given) == 1 else 'y'} to diffusion runs; "
                          f"{args.run} is autoregressive")
    if args.compile and not model.supports_static():
        lacking = sorted({layer.kind for layer in model.layers if not layer.mixer.static_state_names})
        print(f"note: --compile compiles the static-state decode step, which {', '.join(lacking)} lack(s) "
              "(docs/blocks.md): decoding eagerly", file=sys.stderr)
    refuse_random_flags_when_greedy(args, "greedy decoding")
    return dict(compile=args.compile, on_token=None)


def diffusion_kwargs(args, model) -> dict:
    n, steps, block = args.max_new_tokens, args.diffusion_steps, args.block_length
    sampler = args.sampler or "llada"
    if args.compile:
        raise ConfigError(f"--compile applies to autoregressive runs (it compiles the one-token decode step); "
                          f"{args.run} is a diffusion run")
    if block is not None and sampler == "mdlm":
        raise ConfigError("--block-length applies to --sampler llada (mdlm unmasks the whole span together)")
    if block is not None and n % block:
        raise ConfigError(f"--block-length {block} must divide --max-new-tokens {n}")
    if sampler == "llada" and n and steps is not None:
        from arch.diffusion import default_block_length

        note_llada_passes(n, steps, block or default_block_length(n, model.block_length))
    if sampler == "llada":  # mdlm reveals random positions at every temperature
        refuse_random_flags_when_greedy(args, "llada's low-confidence remasking")
    return dict(steps=steps, block_length=block, sampler=sampler)


def refuse_random_flags_when_greedy(args, decoder: str):
    """At temperature 0 a decoder that draws nothing makes --seed moot and repeats one output."""
    from arch.model import is_greedy

    if not is_greedy(args.temperature):
        return
    if args.seed_given:
        raise ConfigError(f"--seed has no effect at --temperature {args.temperature:g}: {decoder} draws nothing "
                          "at random; drop it")
    if args.num_samples > 1:
        raise ConfigError(f"--num-samples {args.num_samples} at --temperature {args.temperature:g} repeats one "
                          f"output ({decoder} is deterministic): drop it or give --temperature > 0")


def note_llada_passes(n: int, steps: int, block: int):
    """llada spends the same number of steps on each block, at most one per token, so
    --diffusion-steps is rounded: say to what, as it sets the run time."""
    from arch.diffusion import llada_steps_per_block

    blocks, per_block = n // block, llada_steps_per_block(n, steps, block)
    passes = blocks * per_block
    if passes != steps:
        print(f"note: --diffusion-steps {steps} runs as {passes} denoising passes: {blocks} blocks of {block} tokens, "
              f"{per_block} each (llada gives every block the same steps, at most one per token)", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)

    import torch

    from slmlab.rundir import RunDir
    from slmlab.runtime import resolve_device

    check_args(args)
    device = resolve_device(args.device, flag="--device")
    if args.prompts:
        from slmlab.traces import write_traces

        return write_traces(args, device)
    if args.chat:
        from slmlab.chat import chat

        return chat(args, device)
    cfg, model, tok = RunDir.open(args.run).load(device)
    extra = decode_kwargs(args, model)
    # A prompt with bytes that are not UTF-8 (argv keeps them as surrogates) is read with U+FFFD for them.
    prompt = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    prompt_ids = tok.encode(prompt)
    ids = prompt_ids or [tok.start_id]  # an empty prompt starts where documents start, unprinted
    check_room(args, model, len(ids))
    g = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        idx = torch.tensor([ids], device=device)
        printer = StreamPrinter(tok, prompt_ids, tok.eos_id)
        if "on_token" in extra:  # autoregressive: print each token as it comes (Ctrl-C stops cleanly)
            extra["on_token"] = printer.add
        try:
            out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, generator=g, eos_id=tok.eos_id,
                                 **extra)
        except KeyboardInterrupt:
            print(flush=True)
            return 130
        printer.finish(out[0, len(ids):].tolist())


class StreamPrinter:
    """Prints the prompt and then the text of each token as it arrives, up to (not including) the first
    eos_id. A piece is the decode of the tokens since the last print after the few printed before them,
    less those few's decode: SentencePiece-style decoders drop the leading space of a decode's first
    token, so decoding the new tokens alone glued words together (and decoding the whole sequence per
    token is quadratic in its length). A piece is held back while it ends inside a UTF-8 character."""

    CONTEXT = 4  # tokens decoded before the new ones

    def __init__(self, tok, prompt_ids, eos_id=None):
        self.tok, self.eos_id, self.ids, self.printed, self.fed, self.ended = tok, eos_id, list(prompt_ids), 0, 0, False
        self._flush()

    def add(self, token: int):
        self.fed += 1
        if self.ended or token == self.eos_id:
            self.ended = True
            return
        self.ids.append(int(token))
        self._flush()

    def _flush(self, last: bool = False):
        before = self.ids[max(0, self.printed - self.CONTEXT):self.printed]
        head, text = self.tok.decode(before), self.tok.decode(before + self.ids[self.printed:])
        if not last and text.endswith("\ufffd"):  # inside a character: wait for its other bytes
            return
        if text.startswith(head):
            print(text[len(head):], end="", flush=True)
        else:  # the decoder rewrote the printed tokens' text (a bad byte run turned to U+FFFD): the new ones alone
            print(self.tok.decode(self.ids[self.printed:]), end="", flush=True)
        self.printed = len(self.ids)

    def finish(self, new_ids: list[int]):
        """new_ids: the generated tokens (a diffusion run's all arrive here; streamed ones are skipped)."""
        for t in new_ids[self.fed:]:
            self.add(t)
        self._flush(last=True)
        print(flush=True)


def check_room(args, model, prompt_len: int):
    """Refuse before printing anything a generation the position table cannot hold (model.pos=learned)."""
    left = model.room(prompt_len)
    if left is None or args.max_new_tokens <= left:
        return
    fix = f"use --max-new-tokens {left} or less" if left else f"shorten --prompt below {model.cfg.max_positions} tokens"
    raise ConfigError(f"--prompt is {prompt_len} tokens and --max-new-tokens {args.max_new_tokens}: "
                      f"{prompt_len + args.max_new_tokens} positions, but {args.run} has model.max_positions="
                      f"{model.cfg.max_positions} (model.pos=learned); {fix}")


def check_args(args):
    """Ranges, and one line for each flag the chosen mode has no use for; then the defaults of the
    flags that are None until given."""
    from arch.model import is_greedy
    from slmlab.coerce import Range

    if bool(args.prompts) != bool(args.out):
        raise ConfigError("--prompts and --out go together (prompts in, traces out)")
    if args.hf and not args.prompts:
        raise ConfigError("--hf generates traces: give --prompts FILE.jsonl and --out FILE.jsonl")
    check_mode_flags(args)
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    for flag, v in (("--top-k", args.top_k), ("--top-p", args.top_p)):
        if v is not None and is_greedy(args.temperature):
            raise ConfigError(f"{flag} has no effect at --temperature {args.temperature:g}: greedy decoding takes "
                              "the likeliest token; drop it")
    # A static decode state holds the whole context; 100k new tokens keep it well under a GB at these sizes.
    Range(0, 100_000).check("--max-new-tokens", args.max_new_tokens)
    if args.top_k is not None:
        Range(0, None).check("--top-k", args.top_k)
    Range(0, 1, lo_open=True).check("--top-p", args.top_p)
    Range(1, 10_000).check("--num-samples", args.num_samples)
    if args.seed is not None:
        Range(0, 2 ** 63 - 1).check("--seed", args.seed)
    if args.batch_size is not None:
        Range(1, 4096).check("--batch-size", args.batch_size)
    for flag, v in (("--diffusion-steps", args.diffusion_steps), ("--block-length", args.block_length)):
        if v is not None and v <= 0:
            raise ConfigError(f"{flag} must be > 0, got {v}")
    args.prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    args.batch_size = DEFAULT_BATCH_SIZE if args.batch_size is None else args.batch_size
    args.top_k = DEFAULT_TOP_K if args.top_k is None else args.top_k
    args.seed_given, args.seed = args.seed is not None, DEFAULT_SEED if args.seed is None else args.seed
    if args.prompts or args.chat:  # these decode autoregressively (or with transformers generate)
        refuse_random_flags_when_greedy(args, "greedy decoding")


def check_chat_flags(args):
    """--chat converses with one run, one reply at a time: what it has no use for is refused."""
    given = [f for f, v in (("--prompts", args.prompts), ("--hf", args.hf), ("--prompt", args.prompt is not None),
                            ("--diffusion-steps", args.diffusion_steps), ("--block-length", args.block_length),
                            ("--sampler", args.sampler)) if v]
    if args.num_samples != 1:
        given.append("--num-samples")
    if given:
        raise ConfigError(f"--chat takes the prompts you type, one reply each, from an autoregressive run: "
                          f"drop {'/'.join(given)}")


def check_mode_flags(args):
    """Refuse what the mode (sampling a run; traces from a run; traces from --hf) would ignore. Whether
    a run is a diffusion run is known only once it loads: decode_kwargs checks the diffusion flags there."""
    if args.force and not args.out:
        raise ConfigError("--force applies to --prompts with --out (it replaces an existing --out); drop it")
    if args.system is not None and not args.chat:
        raise ConfigError("--system applies to --chat (the conversation's system message); drop it")
    if args.chat:
        check_chat_flags(args)
    if args.resume and not args.out:
        raise ConfigError("--resume applies to --prompts with --out (it continues a stopped traces job); "
                          "train.py --resume continues training")
    if args.resume and args.force:
        raise ConfigError("--resume continues the job writing --out and --force starts it over: give one of them")
    if args.batch_size is not None and not args.hf:
        one = "--run --prompts completes" if args.prompts else "sampling a run decodes"
        raise ConfigError(f"--batch-size applies to --hf --prompts (transformers generate's batches); {one} "
                          "one prompt at a time: drop it")
    if not args.prompts:
        return
    if args.prompt is not None:
        raise ConfigError("--prompt and --prompts conflict: --prompts completes every prompt of its file; drop --prompt")
    if args.compile:
        raise ConfigError("--compile applies to sampling a run without --prompts (traces decode uncompiled); drop it")
    given = [f for f, v in (("--diffusion-steps", args.diffusion_steps), ("--block-length", args.block_length),
                            ("--sampler", args.sampler)) if v is not None]
    if given:
        how = "--prompts --hf generates with transformers" if args.hf else "--prompts completes with autoregressive runs"
        raise ConfigError(f"{'/'.join(given)} appl{'ies' if len(given) == 1 else 'y'} to sampling a diffusion run; "
                          f"{how}: drop {'it' if len(given) == 1 else 'them'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
