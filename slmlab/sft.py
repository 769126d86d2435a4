"""Supervised fine-tuning: chat / prompt-completion jsonl -> chat template -> loss on the replies only.

Data is a .jsonl of {"messages": [{"role", "content"}, ...]} or {"prompt", "completion"} (a
prompt/completion pair is the chat [user: prompt, assistant: completion]); data.format picks one
or lets the first record decide. Each conversation is rendered with a chat template (the
tokenizer folder's own `chat_template`, in transformers' apply_chat_template environment, else
ChatML), piece by piece, so every assistant reply's tokens are known exactly: those (and a closing
eos unless the reply ends in it) are the labels, every other position is -1, which LM.loss ignores.

Batches are padded, not packed. Packing several examples into one sequence needs a document mask
through every mixer (a block-diagonal attention mask, the short conv's and LIF's state reset at
each boundary), which LM.forward does not take. Measured on the docs/finetune.md tool-call data
(examples/toolcall.py under its vocab-1024 stdlib tokenizer: 102-140 tokens, median 119),
random batches of 16 padded to their longest example hold 11.6% pad positions (2,000 batches
drawn), so packing could save at most ~12% of the compute on CPU: not worth a document mask
through every block. Data of very uneven lengths (chat logs of 20 to 2,000 tokens) would be.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import jsonl_records
from .errors import ConfigError, DataError
from .evaluate import score, token_byte_lengths
from .init_from import with_added_tokens
from .phases import eval_shape
from .rundir import CHAT_TEMPLATE
from .runtime import rng_state, root_gathered, set_rng_state, to_device
from .tokenizer import SIDECAR, Tokenizer
from .trainer import Trainer

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
FORMATS = ("chat", "prompt_completion")
IGNORE = -1  # LM.loss's ignore_index


# ---- reading ----
def detect_format(spec: str, fmt: str = "auto") -> str | None:
    """"chat" / "prompt_completion" when `spec` is SFT data (by data.format, or by the first record's
    fields when it is auto), None for pretraining text."""
    if fmt == "text":
        return None
    path = Path(spec).expanduser()
    if not (path.suffix == ".jsonl" and path.is_file()):
        if fmt in FORMATS:
            raise DataError(f"data.format={fmt} needs a .jsonl file as data.spec, got {spec!r}")
        return None
    if fmt in FORMATS:
        return fmt
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    try:
        rec = json.loads(first) if first else {}
    except json.JSONDecodeError:
        return None  # iter_documents reports the bad line
    if isinstance(rec, dict) and "messages" in rec:
        return "chat"
    if isinstance(rec, dict) and "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    return None


def read_examples(path, fmt: str) -> list[tuple[str, list[dict]]]:
    """("path:line", conversation) for every record of `path` (a conversation is a list of messages
    with at least "role" and "content"); DataError naming the line for a record that is not one or
    that has no assistant turn (nothing to learn)."""
    out = []
    for where, rec in jsonl_records(path):
        msgs = as_messages(rec, fmt, where)
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: a chat example without an assistant turn (no tokens to train on)")
        out.append((where, msgs))
    if len(out) < 2:
        raise DataError(f"{path}: {len(out)} examples; SFT needs at least 2 (one held out for validation)")
    return out


def as_messages(rec, fmt: str, where: str) -> list[dict]:
    """The record's messages with all their fields: templates read reasoning_content, tool_calls, name."""
    if fmt == "prompt_completion":
        if not (isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)):
            raise DataError(f"{where}: expected {{\"prompt\": str, \"completion\": str}}")
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                             and (isinstance(m.get("content"), str) or _tool_call(m)) for m in msgs):
        raise DataError(f"{where}: expected {{\"messages\": [{{\"role\": str, \"content\": str}}, ...]}} (content "
                        "may be null only beside tool_calls)")
    return [{**m, "content": m.get("content") or ""} for m in msgs]


def _tool_call(m: dict) -> bool:
    """An assistant turn in OpenAI's tool-call shape: content null (or absent) beside a tool_calls list."""
    return m.get("content") is None and isinstance(m.get("tool_calls"), list) and bool(m["tool_calls"])


def prompt_turns(messages: list[dict]) -> list[dict]:
    """The turns a reply is generated after: all of them but a final assistant turn (that reply itself)."""
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


# ---- the chat template, as transformers' apply_chat_template renders it ----
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' names for a message's reasoning


def _raise(msg):
    from jinja2.exceptions import TemplateError

    raise TemplateError(msg)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: jinja2's own escapes <, >, & and non-ASCII, which templates write as text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    from datetime import datetime

    return datetime.now().strftime(fmt)


def _compile(source: str, where: str):
    """The template in transformers' environment (utils/chat_template_utils.py); ConfigError naming
    `where` and the line for a syntax error."""
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError("SFT chat templates need jinja2: pip install -e '.[finetune]'") from None

    class Generation(Extension):
        # transformers' {% generation %} marks assistant text for its assistant-token masks; the labels
        # here come from rendering prefixes, so the tag renders its body unchanged.
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{where}: line {e.lineno} of the chat template: {e.message}") from None


def as_transformers_passes(messages: list[dict]) -> list[dict]:
    """Messages as apply_chat_template hands them to the template: None values dropped, a reasoning
    under any of REASONING_FIELDS under reasoning_content and thinking too."""
    out = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        r = next((m[k] for k in REASONING_FIELDS if k in m), None)
        out.append(m if r is None else {"thinking": r, **m, "reasoning_content": r})
    return out


class ChatTemplate:
    """A jinja2 chat template rendered as transformers renders it (its environment, the tokenizer's
    special-token names, the messages' own fields), and the token ids and labels of a conversation."""

    def __init__(self, source: str, tok: Tokenizer, where: str = "chat template"):
        self.source, self.tok, self.where = source, tok, where
        self.template = _compile(source, where)
        # A tokenizer's own template writes its special tokens (<|im_start|> as one id); ChatML over
        # slmlab's byte-level tokenizer spells its markers in ordinary tokens.
        self.specials_in_text = source != CHATML
        self.names = {f"{role}_token": name for role, name in tok.specials.items()}  # transformers passes these
        self.prefix, self.end = self._reply_frame()

    @classmethod
    def for_tokenizer(cls, folder: Path | None, tok: Tokenizer) -> "ChatTemplate":
        """The template found next to the tokenizer (template_file), else ChatML."""
        found = template_file(folder)
        return cls(found[0], tok, found[1]) if found else cls(CHATML, tok)

    def render(self, messages, add_generation_prompt: bool = False, where: str = "") -> str:
        from jinja2.exceptions import TemplateError

        try:
            return self.template.render(messages=as_transformers_passes(messages),
                                        add_generation_prompt=add_generation_prompt, **self.names)
        except TemplateError as e:
            raise DataError(f"{where + ': ' if where else ''}{self.where}: {e}") from None

    def encode_text(self, text: str) -> list[int]:
        if not self.specials_in_text:
            return self.tok.encode(text)
        hf = self.tok.hf
        old, hf.encode_special_tokens = hf.encode_special_tokens, False
        try:
            return hf.encode(text, add_special_tokens=False).ids
        finally:
            hf.encode_special_tokens = old

    def turn(self, messages, i: int, where: str = "") -> tuple[str, str]:
        """(the conversation before assistant turn i with the generation prompt, the conversation up to
        and including turn i); DataError showing where they part when the first does not begin the second."""
        before, upto = self.render(messages[:i], True, where), self.render(messages[:i + 1], where=where)
        if not upto.startswith(before):
            k = len(os.path.commonprefix([before, upto]))
            at = f"{where}: " if where else ""
            raise DataError(f"{at}{self.where} renders message {i + 1} (assistant) not as its generation prompt "
                            f"followed by the reply: after {before[max(0, k - 30):k]!r} the prompt has "
                            f"{before[k:k + 30]!r}, the turn {upto[k:k + 30]!r}")
        return before, upto

    def segments(self, messages, where: str = "") -> list[list[tuple[str, bool]]]:
        """The conversation as token sequences of (text, is_reply) pieces. One sequence, cut where each
        assistant turn starts and ends, when the template renders the turns as prefixes of the whole;
        else (Qwen3 writes an empty think block in the last turn only) one per assistant turn: its
        generation prompt, then the turn, as a model generating it sees them."""
        turns = [self.turn(messages, i, where) for i, m in enumerate(messages) if m["role"] == "assistant"]
        pieces, done = [], ""
        for before, upto in turns:
            if not before.startswith(done):
                return [[(before, False), (upto[len(before):], True)] for before, upto in turns]
            pieces += [(before[len(done):], False), (upto[len(before):], True)]
            done = upto
        return [pieces + [(self.render(messages, where=where)[len(done):], False)]]

    def encode(self, messages, where: str = "") -> list[tuple[list[int], list[int]]]:
        """(ids, labels) per sequence of segments(): labels are the ids on reply tokens and on a closing
        eos, IGNORE elsewhere. The eos is left out when the last reply already ends in it (an eos that is
        the end-of-turn token, as Qwen's <|im_end|>): the model learns to stop where the turn ends."""
        out = []
        for seq in self.segments(messages, where):
            ids, labels = [], []
            for text, reply in seq:
                piece = self.encode_text(text)
                ids += piece
                labels += piece if reply else [IGNORE] * len(piece)
            last = next(text for text, reply in reversed(seq) if reply)
            if self.tok.eos_id is not None and not last.rstrip().endswith(self.names["eos_token"]):
                ids.append(self.tok.eos_id)
                # learned only right after the last reply: after a trailing user turn it would teach the
                # model to stop once a user has spoken
                after = seq[-1][0] if not seq[-1][1] else ""
                labels.append(self.tok.eos_id if not after.strip() else IGNORE)
            out.append((ids, labels))
        return out

    def prompt_ids(self, messages) -> list[int]:
        """prompt_turns(messages), ending in the generation prompt."""
        return self.encode_text(self.render(prompt_turns(messages), True))

    def reference(self, messages) -> tuple[str, int]:
        """(the final, assistant, message as exact match compares it, the tokens a perfect model generates
        up to its end-of-turn marker): the turn as labelled, read as a generated reply is (reply())."""
        before, upto = self.turn(messages, len(messages) - 1)
        text = upto[len(before):]
        ids = self.encode_text(text.split(self.end, 1)[0] if self.end else text)
        return self.reply(self.tok.decode(ids, skip_special_tokens=True)), len(ids)

    def _reply_frame(self) -> tuple[str, str]:
        return reply_frame(self.render)

    def reply(self, generated: str) -> str:
        return cut_reply(generated, self.prefix, self.end)


def reply_frame(render) -> tuple[str, str]:
    """(what a template writes before a reply's text, its end-of-turn marker), stripped, from a probe;
    `render(messages, add_generation_prompt)` renders the template (DataError where it cannot)."""
    probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "\x01"}]
    try:
        reply = render(probe, False)[len(render(probe[:1], True)):]
    except DataError:
        return "", ""
    head, mark, tail = reply.partition("\x01")
    return (head.strip(), tail.strip()) if mark else ("", "")


def cut_reply(generated: str, prefix: str, end: str) -> str:
    """A reply's text as exact match compares it: up to the end-of-turn marker `end`, without the `prefix` the
    template writes before every reply (Qwen3's empty think block), stripped."""
    text = (generated.split(end, 1)[0] if end else generated).strip()
    return text[len(prefix):].strip() if prefix and text.startswith(prefix) else text


def template_file(folder: Path | None) -> tuple[str, str] | None:
    """(the chat template next to a tokenizer, the file it is in): chat_template.jinja, else
    tokenizer_config.json's chat_template as transformers saves it; None when there is none."""
    if folder is None:
        return None
    if (folder / CHAT_TEMPLATE).is_file():
        return (folder / CHAT_TEMPLATE).read_text(encoding="utf-8"), str(folder / CHAT_TEMPLATE)
    cfg = folder / SIDECAR
    if cfg.is_file():
        try:
            t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            return None
        if isinstance(t, list):  # named templates: transformers uses "default"
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return (t, str(cfg)) if isinstance(t, str) else None
    return None


def find_template(folder: Path | None) -> str | None:
    found = template_file(folder)
    return found[0] if found else None


# ---- data, batches, evaluation ----
@dataclass
class SFTData:
    train: list  # (ids, labels) per example
    val: list
    val_messages: list  # the held-out conversations, for exact match of greedy replies
    template: ChatTemplate


def has_reply_within(example, seq_len: int) -> bool:
    """Whether pad_batch's first seq_len positions of `example` score any reply token."""
    return any(lab != IGNORE for lab in example[1][1:seq_len + 1])


def prepare_sft(spec: str, fmt: str, template: ChatTemplate, val_frac: float, seq_len: int,
                eval_len: int | None = None) -> SFTData:
    """Examples split (a fixed shuffle) and encoded; train examples whose reply starts beyond
    seq_len, and held-out ones whose reply starts beyond eval_len (default seq_len), are dropped
    (they would add no loss), with a line saying how many. DataError when none is left on either side:
    a validation loss over no tokens would read as a perfect 0.0."""
    eval_len = eval_len or seq_len
    convs = read_examples(spec, fmt)
    random.Random(0).shuffle(convs)
    n_val = min(len(convs) - 1, max(1, round(len(convs) * val_frac)))
    per_conv = [template.encode(m, where) for where, m in convs]
    split = sum(len(seqs) > 1 for seqs in per_conv)
    enc = [e for seqs in per_conv[n_val:] for e in seqs]
    kept = [e for e in enc if has_reply_within(e, seq_len)]
    if not kept:
        raise DataError(f"{spec}: no training example has a reply within train.seq_len={seq_len} tokens")
    val_enc = [e for seqs in per_conv[:n_val] for e in seqs]
    val_kept = [e for e in val_enc if has_reply_within(e, eval_len)]
    if not val_kept:
        raise DataError(f"{spec}: no held-out example (of {len(val_enc)}) has a reply within the {eval_len}-token "
                        f"evaluation length, so the validation loss would score nothing: raise train.eval_seq_len "
                        f"(unset, it is the last phase's seq_len)")
    lens = sorted(len(e[0]) for e in enc)
    notes = []
    if len(kept) < len(enc):
        notes.append(f"{len(enc) - len(kept)} train dropped: reply beyond seq_len {seq_len}")
    cut = sum(len(ids) > seq_len + 1 for ids, _ in kept)  # pad_batch keeps seq_len + 1 tokens
    if cut:
        notes.append(f"{cut} train truncated to seq_len {seq_len}: the rest of their reply and its closing eos "
                     "are not learned")
    if len(val_kept) < len(val_enc):
        notes.append(f"{len(val_enc) - len(val_kept)} val dropped: reply beyond eval length {eval_len}")
    if split:
        notes.append(f"{split} conversations are one example per assistant turn: the chat template renders "
                       f"earlier turns differently once a later one follows")
    print(f"data: {spec} ({fmt})  {len(kept)} train / {len(val_kept)} val examples  tokens per example: median "
          f"{lens[len(lens) // 2]}, max {lens[-1]}" + (f"  ({'; '.join(notes)})" if notes else ""))
    return SFTData(kept, val_kept, [m for _, m in convs[:n_val]], template)


def pad_batch(examples: list, seq_len: int, pad_id: int):
    """(x, y) [B, T] with T = the longest example (at most seq_len): y is the labels shifted by one,
    IGNORE on padding, which goes on the right (causal positions never see it)."""
    rows = [(ids[:seq_len + 1], labels[:seq_len + 1]) for ids, labels in examples]
    T = max(len(ids) for ids, _ in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor(labels[1:])
    return x, y


class SFTBatches:
    """Training batches of SFT examples drawn with replacement from a seeded generator; every rank
    draws the same global batch and keeps its rows (as BatchSource does)."""

    def __init__(self, examples: list, pad_id: int, dist, seed: int):
        self.examples, self.pad_id, self.dist = examples, pad_id, dist
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, ph, batch_size: int, device):
        pick = torch.randint(len(self.examples), (batch_size * self.dist.world,), generator=self.gen)
        mine = pick[self.dist.rank * batch_size:(self.dist.rank + 1) * batch_size].tolist()
        x, y = pad_batch([self.examples[i] for i in mine], ph.seq_len, self.pad_id)
        return to_device(x, device), to_device(y, device)

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.gen), "streams": {}}

    def load_state_dict(self, state: dict, phases):
        set_rng_state(state["rng"], self.gen)


def masked_val_loss(model, examples: list, pad_id: int, seq_len: int, batch_size: int, device, byte_lengths,
                    precision: str = "auto") -> dict:
    """evaluate.score over the reply tokens of `examples`; DataError when none is within seq_len."""
    batches = (pad_batch(examples[i:i + batch_size], seq_len, pad_id) for i in range(0, len(examples), batch_size))
    out = score(model, batches, device, byte_lengths, ignore_index=IGNORE, precision=precision)
    if not out:  # a mean over nothing would read as a perfect 0.0
        raise DataError(f"no reply token within the first {seq_len} tokens of the {len(examples)} held-out "
                        f"example(s): no validation loss to report")
    return out


@torch.no_grad()
def greedy_reply(model, template: ChatTemplate, messages, device, max_new_tokens: int) -> str:
    """The model's greedy reply to prompt_turns(messages), as text; at most
    max_new_tokens, and no more than model.max_positions leaves after the prompt (model.pos=learned)."""
    tok = template.tok
    ids = template.prompt_ids(messages) or [tok.start_id]
    left = model.room(len(ids))
    if left is not None:
        max_new_tokens = min(max_new_tokens, left)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
    return template.reply(tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True))


def exact_match(model, template: ChatTemplate, convs: list, device) -> dict:
    """Share of held-out conversations whose last reply the model reproduces exactly (greedy).
    Under model.pos=learned a conversation whose prompt and reference reply do not fit in
    model.max_positions is left out (exact_n counts those scored): no reply could match there,
    and the miss would be the position table's, not the model's."""
    hits = scored = 0
    for msgs in convs:
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        ref, need = template.reference(msgs[:last + 1])
        left = model.room(len(template.prompt_ids(msgs[:last + 1]) or [template.tok.start_id]))
        if left is not None and left < need:
            continue
        pred = greedy_reply(model, template, msgs[:last + 1], device, need + 16)
        hits += pred == ref
        scored += 1
    return {"exact_match": hits / scored, "exact_n": scored} if scored else {}


class SFTTrainer(Trainer):
    """The Trainer on SFT data: padded example batches with reply-only labels (compute_loss is
    unchanged: LM.loss ignores the -1 labels), evaluation on the held-out replies."""

    token_weighted = True  # a step's loss is the mean over all its reply tokens, however grad_accum splits them

    def setup_data(self):
        cfg, t = self.cfg, self.t
        if cfg.objective.name != "ar":
            raise ConfigError(f"SFT data trains autoregressive models; objective.name is {cfg.objective.name!r}")
        # SFTBatches draws every phase's examples from data.spec at random: a phase's own data or
        # quality order would otherwise be dropped without a word.
        for ph in self.phases:
            if ph.data is not None:
                raise ConfigError(f"train.phases[{ph.index}].data does not apply to SFT data (every phase trains on "
                                  f"data.spec's examples): remove it, or train on {ph.data} in a run of its own")
            if ph.order != "random":
                raise ConfigError(f"train.phases[{ph.index}].order={ph.order} does not apply to SFT data (examples "
                                  f"are drawn at random): remove it")
        src = cfg.data.tokenizer or t.init_from
        if not src:
            raise ConfigError("SFT data needs a tokenizer: set data.tokenizer=RUN_DIR (or train.init_from=RUN_DIR)")
        path = self.tokenizer_source(src)
        self.tok = tok = Tokenizer.load(path)
        if cfg.data.added_tokens:  # as the Trainer does for text: grow the vocabulary (new rows from init_from)
            self.tok = tok = with_added_tokens(cfg, tok, self.say)
        if tok.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
        template = ChatTemplate.for_tokenizer(path if path.is_dir() else path.parent, tok)
        fmt = detect_format(cfg.data.spec, cfg.data.format)
        self.eval_T, self.eval_B = eval_shape(self.phases, t.eval_seq_len, t.grad_accum, self.dist.world)
        self.sft = prepare_sft(cfg.data.spec, fmt, template, cfg.data.val_frac, self.phases[-1].seq_len, self.eval_T)
        self.bundle, self.train_sets = None, {}
        self.byte_lengths = token_byte_lengths(tok)
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id

    def make_batches(self):
        return SFTBatches(self.sft.train, self.pad_id, self.dist, self.t.seed)

    def describe_data(self) -> str:
        return f"SFT: loss on the {len(self.sft.train)} training examples' replies; chat template " + (
            "ChatML" if self.sft.template.source == CHATML else "from the tokenizer folder")

    def baselines(self) -> dict:
        return {}

    def open_run_dir(self, saved):
        super().open_run_dir(saved)
        if self.dist.main:
            self.run.write_text(CHAT_TEMPLATE, self.sft.template.source)

    def evaluate(self, max_tokens, model=None) -> dict:
        """Loss on the held-out replies; exact match of greedy replies on train.sft_eval_examples of them."""
        model = model or self.model
        was_training = model.training
        model.eval()
        with root_gathered(model):  # token_nll is not forward (see Trainer.evaluate)
            out = masked_val_loss(model, self.sft.val, self.pad_id, self.eval_T, self.eval_B, self.device,
                                  self.byte_lengths, self.t.precision)
        out.update(exact_match(model, self.sft.template, self.sft.val_messages[:self.t.sft_eval_examples], self.device))
        out.update(model.extra_metrics())  # as the pretraining eval logs them: MoE loads, spike rates
        model.train(was_training)
        with root_gathered(model):
            out.update(self.task_metrics(model))
        return out
