"""Teacher traces (sample.py --prompts): complete every prompt of a jsonl with a run (slmlab's
decode) or a transformers model folder (transformers generate), and write SFT-ready jsonl: the
sequence-level distillation path (teacher replies -> student SFT), which works across tokenizers."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import publish
from .errors import ConfigError, DataError


def read_prompts(path) -> list[list[dict]]:
    """Each line's conversation to complete: {"prompt": str} is one user turn; {"messages": [...]}
    is completed after its last message, less a final assistant turn (a reference reply) if it has one."""
    from .sft import as_messages, jsonl_records, prompt_turns

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

    prompts, out = Path(args.prompts).expanduser(), Path(args.out).expanduser()
    if not prompts.is_file():
        raise ConfigError(f"--prompts {args.prompts}: no such file")
    if out.resolve() == prompts.resolve():  # even with --force: the traces would replace their own prompts
        raise ConfigError(f"--out {args.out} is the --prompts file; write the traces elsewhere")
    check_out(out, args.force, is_dir=False)  # before the (slow) load, as convert.py and eval.py do
    convs = read_prompts(args.prompts)
    gen = hf_completions if args.hf else run_completions
    # One format for the whole file (SFT reads it by its first record): pairs when every prompt is one user turn.
    pairs = all(len(m) == 1 and m[0]["role"] == "user" for m in convs)
    records = [trace_record(m, c, pairs) for m, c in gen(args, convs, device)]
    with publish(out) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} completions of {len(convs)} prompts written to {args.out}")
    return 0


def run_completions(args, convs, device):
    """(conversation, reply) per prompt and sample, from a run through its chat template."""
    from .rundir import RunDir
    from .sft import ChatTemplate

    run = RunDir.open(args.run)
    cfg, model, tok = run.load(device)
    if getattr(model, "mask_id", None) is not None:
        raise ConfigError(f"--prompts completes with autoregressive runs; {args.run} is a diffusion run")
    template = ChatTemplate.for_tokenizer(run.path, tok)
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [template.prompt_ids(msgs) or [tok.start_id] for msgs in convs]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    left = None if longest is None else model.room(len(prompts[longest]))
    if left is not None and args.max_new_tokens > left:  # before any reply is generated, not mid-job
        raise ConfigError(f"--prompts example {longest + 1} is {len(prompts[longest])} tokens: with --max-new-tokens "
                          f"{args.max_new_tokens} it exceeds model.max_positions={cfg.model.max_positions} of "
                          f"{args.run} (model.pos=learned); use --max-new-tokens {left} or less, or shorter prompts")
    for msgs, ids in zip(convs, prompts):
        for _ in range(args.num_samples):
            out = model.generate(torch.tensor([ids], device=device), args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k or None, top_p=args.top_p, generator=g, eos_id=tok.eos_id)
            yield msgs, template.reply(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))


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


def hf_completions(args, convs, device):
    """(conversation, reply) per prompt and sample, from a transformers folder: its tokenizer's
    chat template, left-padded batches, transformers generate."""
    from arch.model import is_greedy

    from .sft import cut_reply, reply_frame

    tok, model = load_hf_folder(args.hf, device, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    only_ids(model, args.hf)
    torch.manual_seed(args.seed)
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
    for i in range(0, len(texts), args.batch_size):
        enc = tok(texts[i:i + args.batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=not tok.chat_template).to(device)
        sample = not is_greedy(args.temperature)
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             num_return_sequences=args.num_samples, pad_token_id=tok.pad_token_id,
                             **({"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p or 1.0}
                                if sample else {}))
        replies = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for j, reply in enumerate(replies):
            yield convs[i + j // args.num_samples], cut_reply(reply, prefix, end)  # at the end-of-turn marker


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
