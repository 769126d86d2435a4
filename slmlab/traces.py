"""Teacher traces (sample.py --prompts): complete every prompt of a jsonl with a run (slmlab's
decode) or a transformers model folder (transformers generate), and write SFT-ready jsonl: the
sequence-level distillation path (teacher replies -> student SFT), which works across tokenizers.

A job can take hours, so completions go to OUT.partial as they finish (a header line with the
settings that decide the replies, then one record per line), a status line shows the progress, and
`--resume` continues a stopped job from what OUT.partial holds. Every prompt (a run's) or batch
(--hf's) draws from a generator seeded by --seed and its index, so a resumed job writes the replies
the uninterrupted one would have. OUT itself is published whole at the end.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .checkpoint import publish
from .errors import ConfigError, DataError

PARTIAL = ".partial"  # OUT + this: the completions so far
HEADER = "slmlab_traces"  # the key of OUT.partial's first line
# The settings in OUT.partial's header, by the flag that gives them: a resume must give the same.
SETTINGS = {"source": "--run/--hf", "prompts_sha256": "--prompts (its contents)", "max_new_tokens": "--max-new-tokens",
            "temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "num_samples": "--num-samples",
            "seed": "--seed", "batch_size": "--batch-size"}


def read_prompts(path) -> list[list[dict]]:
    """Each line's conversation to complete: {"prompt": str} is one user turn; {"messages": [...]}
    is completed after its last message, less a final assistant turn (a reference reply) if it has one."""
    from .data import jsonl_records
    from .sft import as_messages, prompt_turns

    out = []
    for where, rec in jsonl_records(path):
        if isinstance(rec, dict) and "prompt" in rec:
            msgs = as_messages({**rec, "completion": ""}, "prompt_completion", where)[:1]
        else:
            msgs = prompt_turns(as_messages(rec, "chat", where))
        out.append(msgs)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def trace_record(msgs: list[dict], completion: str, pairs: bool) -> dict:
    if pairs:
        return {"prompt": msgs[0]["content"], "completion": completion}
    return {"messages": msgs + [{"role": "assistant", "content": completion}]}


def write_traces(args, device) -> int:
    from .export import check_out
    from .progress import Progress

    prompts, out = Path(args.prompts).expanduser(), Path(args.out).expanduser()
    partial = out.with_name(out.name + PARTIAL)
    if not prompts.is_file():
        raise ConfigError(f"--prompts {args.prompts}: no such file")
    if out.resolve() == prompts.resolve():  # even with --force: the traces would replace their own prompts
        raise ConfigError(f"--out {args.out} is the --prompts file; write the traces elsewhere")
    if args.resume and out.exists():
        raise ConfigError(f"--resume: {args.out} is finished already (--force without --resume redoes it)")
    if not args.resume:  # before the (slow) load, as convert.py and eval.py do
        check_out(out, args.force, is_dir=False)
        if partial.exists() and not args.force:
            raise ConfigError(f"{partial} holds the completions of an unfinished job: --resume continues it, "
                              "--force starts over")
    convs = read_prompts(args.prompts)
    settings = job_settings(args, prompts)
    lines = resume_lines(partial, settings, args) if args.resume else []
    with publish(partial) as tmp:  # the header and what a resume keeps, then appended to in place
        tmp.write_text(json.dumps({HEADER: settings}) + "\n" + "".join(lines), encoding="utf-8")
    start = len(lines) // args.num_samples
    # One format for the whole file (SFT reads it by its first record): pairs when every prompt is one user turn.
    pairs = all(len(m) == 1 and m[0]["role"] == "user" for m in convs)
    gen = hf_completions if args.hf else run_completions
    progress = Progress(len(convs), start=start, unit="prompt")
    with open(partial, "a", encoding="utf-8") as f:
        try:
            for done, completions in gen(args, convs, device, start):  # a prompt's (--hf: a batch's) at a time
                f.write("".join(json.dumps(trace_record(m, c, pairs)) + "\n" for m, c in completions))
                f.flush()
                progress.update_count(done)
        except KeyboardInterrupt:
            progress.write("")
            raise KeyboardInterrupt(f"stopped: {count_records(partial)} completions kept in {partial}; "
                                    "the same command with --resume continues") from None
    records = partial.read_text(encoding="utf-8").splitlines(keepends=True)[1:]
    with publish(out) as tmp:
        tmp.write_text("".join(records), encoding="utf-8")
    partial.unlink()
    print(f"{len(records)} completions of {len(convs)} prompts written to {args.out}")
    return 0


def count_records(partial: Path) -> int:
    return max(len(partial.read_bytes().splitlines()) - 1, 0)


def job_settings(args, prompts: Path) -> dict:
    """What decides the replies, for OUT.partial's header: a resume with other settings would mix two jobs."""
    source = f"hf:{Path(args.hf).expanduser().resolve()}" if args.hf else f"run:{Path(args.run).expanduser().resolve()}"
    return {"source": source, "prompts_sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "num_samples": args.num_samples, "seed": args.seed,
            "batch_size": args.batch_size if args.hf else None}


def resume_lines(partial: Path, settings: dict, args) -> list[str]:
    """The records of OUT.partial a resume keeps: its whole lines, down to whole prompts (--hf: whole
    batches, which seed as a unit); one-line errors for a missing or foreign partial file."""
    if not partial.is_file():
        raise ConfigError(f"--resume: no {partial} to continue (a job writes it as it goes); run without --resume")
    lines = partial.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    try:
        saved = json.loads(lines[0])[HEADER]
    except (IndexError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--resume: {partial} does not start with a traces header; --force starts over") from None
    differ = [f"{SETTINGS.get(k, k)} {saved.get(k)!r} there, {settings[k]!r} now" for k in settings
              if saved.get(k) != settings[k]]
    if differ:
        raise ConfigError(f"--resume: {partial} was made with other settings ({'; '.join(differ)}): give the same, "
                          "or --force to start over")
    whole = [ln for ln in lines[1:] if ln.endswith("\n")]  # a killed write leaves its last line cut
    unit = args.num_samples * (args.batch_size if args.hf else 1)
    return whole[:len(whole) // unit * unit]


def job_seed(seed: int, index: int) -> int:
    """The seed of prompt (or batch) `index`: independent streams for each (seed, index), which seed + index
    would not give (seed 0's second prompt would draw as seed 1's first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") >> 1


def run_completions(args, convs, device, start: int = 0):
    """(conversation, reply) per prompt and sample, from a run through its chat template."""
    from .rundir import RunDir
    from .sft import ChatTemplate

    run = RunDir.open(args.run)
    cfg, model, tok = run.load(device)
    if getattr(model, "mask_id", None) is not None:
        raise ConfigError(f"--prompts completes with autoregressive runs; {args.run} is a diffusion run")
    template = ChatTemplate.for_tokenizer(run.path, tok)
    g = torch.Generator(device=device)
    prompts = [template.prompt_ids(msgs) or [tok.start_id] for msgs in convs]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    left = None if longest is None else model.room(len(prompts[longest]))
    if left is not None and args.max_new_tokens > left:  # before any reply is generated, not mid-job
        raise ConfigError(f"--prompts example {longest + 1} is {len(prompts[longest])} tokens: with --max-new-tokens "
                          f"{args.max_new_tokens} it exceeds model.max_positions={cfg.model.max_positions} of "
                          f"{args.run} (model.pos=learned); use --max-new-tokens {left} or less, or shorter prompts")
    for i in range(start, len(convs)):
        g.manual_seed(job_seed(args.seed, i))
        replies = []
        for _ in range(args.num_samples):
            out = model.generate(torch.tensor([prompts[i]], device=device), args.max_new_tokens,
                                 temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p,
                                 generator=g, eos_id=tok.eos_id)
            replies.append((convs[i], template.reply(tok.decode(out[0, len(prompts[i]):].tolist(),
                                                                 skip_special_tokens=True))))
        yield i + 1, replies


def load_hf_folder(path, device, **tokenizer_kwargs):
    """(tokenizer, causal LM in eval mode on `device`) of a transformers model folder, given as --hf;
    one-line ConfigErrors for a missing transformers, a folder without its files, or one it cannot load."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ConfigError("--hf needs transformers: pip install -e '.[finetune]'") from None
    from .export.hf import hf_folder_files

    path = Path(path).expanduser()
    hf_folder_files(path, label="--hf ")  # one-line errors where transformers would raise tracebacks
    try:  # the folder is untrusted: transformers' errors are tracebacks whose type varies by version
        tok = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True).to(device).eval()
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--hf {path}: transformers cannot load it: {msg}") from None
    return tok, model


def hf_completions(args, convs, device, start: int = 0):
    """(prompts done, [(conversation, reply) per prompt and sample]) a batch at a time, from prompt
    `start` (a multiple of --batch-size) on, from a transformers folder: its tokenizer's chat
    template, left-padded batches, transformers generate (which draws from torch's global RNG)."""
    from arch.model import is_greedy

    from .sft import cut_reply, reply_frame

    tok, model = load_hf_folder(args.hf, device, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    only_ids(model, args.hf)
    if tok.chat_template:
        prefix, end = reply_frame(lambda m, gen: hf_render(tok, m, gen))
        texts = [hf_render(tok, m, True) for m in convs]
    else:  # the text itself, with the tokenizer's own BOS (a template writes the BOS it wants itself)
        many = next((i for i, m in enumerate(convs) if len(m) > 1), None)
        if many is not None:
            raise ConfigError(f"--prompts example {many + 1} has {len(convs[many])} messages, but --hf {args.hf} has no "
                              "chat template to render them: use one-turn prompts ({\"prompt\": ...}) or a folder "
                              "with a chat template")
        prefix, end, texts = "", "", [m[0]["content"] for m in convs]
    for i in range(start, len(texts), args.batch_size):
        torch.manual_seed(job_seed(args.seed, i))
        enc = tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=not tok.chat_template).to(device)
        sample = not is_greedy(args.temperature)
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             num_return_sequences=args.num_samples, pad_token_id=tok.pad_token_id,
                             **({"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p or 1.0}
                                if sample else {}))
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        yield min(i + args.batch_size, len(texts)), [(convs[i + j // args.num_samples], cut_reply(reply, prefix, end))
                                                      for j, reply in enumerate(replies)]  # at the end-of-turn marker


def hf_render(tok, messages, add_generation_prompt: bool) -> str:
    """A transformers tokenizer's chat template rendered; DataError where it cannot render `messages`."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError, a template's raise_exception, a KeyError...: all one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"the chat template cannot render a {len(messages)}-message conversation: {msg}") from None


def only_ids(model, folder):
    """The folder's generation_config.json keeps its token ids (an instruct model's eos list) and drops
    the rest: transformers fills every setting generate is not given from it, so an instruct model's
    repetition_penalty / top_p applied even at --temperature 0, and its top_k where --top-k 0 means all."""
    import sys

    from transformers import GenerationConfig

    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    gc = model.generation_config
    quiet = ("transformers_version", "use_cache", "return_dict_in_generate", "_", "output_")  # no effect on the text
    dropped = {k: v for k, v in gc.to_diff_dict().items() if k not in ids and not k.startswith(quiet)}
    if dropped:
        print(f"note: --hf {folder}: its generation_config.json's "
              f"{', '.join(f'{k}={v}' for k, v in sorted(dropped.items()))} not used (sample.py's flags decide)",
              file=sys.stderr)
    model.generation_config = GenerationConfig(**{k: getattr(gc, k, None) for k in ids})
