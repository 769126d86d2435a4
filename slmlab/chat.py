"""sample.py --chat: a conversation with a run, through its chat template, each reply streamed as it
is generated and kept in the history the next turn is prompted with."""
from __future__ import annotations

import sys

import torch

from .errors import ConfigError

HELP = "/reset starts the conversation over, /quit (or Ctrl-D) ends it; Ctrl-C stops a reply"


class EndOfTurn(Exception):
    """Raised from generate's on_token once the reply's end-of-turn marker is complete: generation stops."""


class ReplyPrinter:
    """Prints a reply as its tokens arrive: the whole reply decoded again each token (a decoder may drop
    a first token's leading space or join bytes into a character), less the template's reply prefix,
    holding back a character still incomplete and any tail that may begin the end-of-turn marker
    (ChatML over a byte-level tokenizer spells <|im_end|> in several ordinary tokens)."""

    def __init__(self, tok, prefix: str, end: str, out=None):
        self.tok, self.prefix, self.end, self.out = tok, prefix, end, out or sys.stdout
        self.ids, self.shown, self.ended = [], "", False

    def text(self) -> str:
        """The reply so far: up to the marker, without the prefix, stripped at the start."""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.end and self.end in text:
            text, self.ended = text.split(self.end, 1)[0], True
        text = text.lstrip()
        if self.prefix and text.startswith(self.prefix):
            text = text[len(self.prefix):].lstrip()
        elif self.prefix and self.prefix.startswith(text) and not self.ended:
            text = ""  # still inside what may be the prefix
        return text

    def add(self, token: int):
        self.ids.append(int(token))
        text = self.text()
        if self.ended:
            self._show(text)
            raise EndOfTurn
        hold = len(self.end) - 1 if self.end else 0
        if text.endswith("\ufffd"):  # a character's bytes still coming
            hold = max(hold, len(text) - len(text.rstrip("\ufffd")))
        self._show(text[:max(len(text) - hold, len(self.shown))] if hold else text)

    def _show(self, text: str):
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def finish(self) -> str:
        """Print what was held back (the reply ended without its marker) and return the reply."""
        text = self.text().rstrip()
        self._show(text)
        self.out.write("\n")
        self.out.flush()
        return text


def read_turn() -> str:
    """The next line typed (a terminal's with line editing and a "> " prompt on stderr), EOFError at the end.
    Piped input is read plainly, so stdout holds the replies only."""
    if sys.stdin.isatty():
        sys.stderr.write("> ")
        sys.stderr.flush()
        return input()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat(args, device) -> int:
    from .rundir import RunDir
    from .sft import CHATML, ChatTemplate

    run = RunDir.open(args.run)
    cfg, model, tok = run.load(device)
    if getattr(model, "mask_id", None) is not None:
        raise ConfigError(f"--chat decodes autoregressively; {args.run} is a diffusion run")
    template = ChatTemplate.for_tokenizer(run.path, tok)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    g = torch.Generator(device=device).manual_seed(args.seed)
    which = "ChatML: the run has no chat template of its own" if template.source == CHATML else template.where
    print(f"chatting with {args.run} ({which}); {HELP}", file=sys.stderr)
    while True:
        try:
            line = read_turn()
        except EOFError:
            return 0
        if line.strip() in ("/quit", "/exit"):
            return 0
        if line.strip() == "/reset":
            messages = list(system)
            print("(a new conversation)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = template.prompt_ids(messages)
        left = model.room(len(ids))
        if left is not None and left < 1:
            messages.pop()
            print(f"(the conversation fills model.max_positions={cfg.model.max_positions}: /reset to go on)",
                  file=sys.stderr)
            continue
        n = args.max_new_tokens if left is None else min(args.max_new_tokens, left)
        printer = ReplyPrinter(tok, template.prefix, template.end)
        try:
            model.generate(torch.tensor([ids], device=device), n, temperature=args.temperature,
                           top_k=args.top_k or None, top_p=args.top_p, generator=g, eos_id=tok.eos_id,
                           compile=args.compile, on_token=printer.add)
        except (EndOfTurn, KeyboardInterrupt):  # the marker, or Ctrl-C: the reply so far joins the conversation
            pass
        messages.append({"role": "assistant", "content": printer.finish()})
