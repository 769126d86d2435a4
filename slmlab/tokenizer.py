"""Byte-level BPE tokenizer (HF `tokenizers`) with reserved special tokens.

Ids 0..3 are always the special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>``, ``<|mask|>``; ids 4..259 are the
256 byte symbols, so any text encodes (no unknown token); merges follow. ``encode`` never adds special tokens and
treats special-token strings that occur in the text as ordinary text, so ``decode(encode(s)) == s`` for any ``s``.

The saved file is a plain HF ``tokenizer.json``: ``tokenizers.Tokenizer.from_file`` and
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` both load it.

A foreign ``tokenizer.json`` (an imported model's: Llama's ``<s>``, GPT-2's ``<|endoftext|>``, ...) works too:
its bos/eos/pad/mask tokens are named by a ``tokenizer_config.json`` beside it (the file transformers
writes, and the one ``save`` writes for such tokenizers), or else found among the usual names (ROLE_NAMES).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import ConfigError, DataError

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK)
N_BYTES = 256
MIN_VOCAB_SIZE = N_BYTES + len(SPECIAL_TOKENS)  # 260
ROLES = ("bos", "eos", "pad", "mask")
# Names each role goes by in the tokenizers people import, tried in order when no config names it.
ROLE_NAMES = {"bos": (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>"),
              "eos": (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"),
              "pad": (PAD, "<pad>", "<|finetune_right_pad_id|>"), "mask": (MASK, "<mask>")}
SIDECAR = "tokenizer_config.json"
# SentencePiece byte-fallback pieces (Llama-2, Mistral, Gemma): each stands for exactly one byte.
_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>\Z")


def _byte_level_chars() -> dict[str, int]:
    """The ByteLevel (GPT-2) alphabet: vocabulary character -> the byte it stands for."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    out, n = {chr(b): b for b in keep}, 0
    for b in range(256):
        if b not in keep:
            out[chr(256 + n)] = b
            n += 1
    return out


BYTE_LEVEL_CHARS = _byte_level_chars()


def _pipeline_steps(d) -> list[dict]:
    """A tokenizer.json ``decoder`` (or normalizer, pre_tokenizer) as a flat list (Sequences unrolled)."""
    if not isinstance(d, dict):
        return []
    if d.get("type") == "Sequence":
        inner = d.get("decoders") or d.get("normalizers") or d.get("pretokenizers") or []
        return [s for x in inner for s in _pipeline_steps(x)]
    return [d]


def _local_normalizer(step: dict) -> bool:
    """A normalizer step that maps characters without looking at their neighbours or making whitespace."""
    if step.get("type") in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase"):
        return True
    if step.get("type") != "Replace":
        return False
    pattern, content = step.get("pattern", {}).get("String"), step.get("content", "")
    return isinstance(pattern, str) and "\n" not in pattern and not any(c.isspace() for c in content)


# Text either side of a newline that split_exact cuts after (non-whitespace next to it): letters, digits,
# punctuation, contractions, CJK, emoji, a combining mark, runs of each.
_PROBES_BEFORE = ["a", "Ab", "7", "123", ".", "a.", "...", "'", "'s", "中", "🙂", "e\u0301", "▁", "_", " a", "a\n.b"]
_PROBES_AFTER = ["a", "Ab", "7", "1234", ".", ".a", "'", "'s", "'ll", "中", "🙂", "\u0301", "▁", "_", "a b", "a\n", "a\nb"]


def _cuttable(token: str) -> bool:
    """Whether ``split_exact`` could cut inside an added token: it holds a newline that is not its last character
    and has non-whitespace after it, and non-whitespace (or the text before the token) before it."""
    return any(c == "\n" and j + 1 < len(token) and not token[j + 1].isspace()
               and (j == 0 or not token[j - 1].isspace()) for j, c in enumerate(token))


def split_exact(text: str, target_chars: int = 1 << 16, own_regex: bool = True) -> Iterator[str]:
    r"""Split ``text`` into pieces of roughly ``target_chars`` without changing its tokenization.

    Cuts are made right after a newline that sits between two non-whitespace characters (``x\ny``). The
    ByteLevel pre-tokenizer never joins anything across such a newline (it is its own pre-token, and the next
    pre-token starts with a non-space character), so encoding the pieces separately and concatenating the ids gives
    exactly ``encode(text)``.

    ``own_regex`` (the GPT-2 regex of slmlab's own tokenizer, ``Tokenizer.own_regex``) also allows, where no such
    newline is found: a cut between ``\r`` and ``\n`` in ``x\r\ny`` (CRLF text: that regex makes ``\r`` and ``\n``
    separate pre-tokens there, while Llama-3's joins them, so this is not done for other tokenizers), and where the
    rest has no newline at all (one huge line), a cut right before whitespace that follows a non-whitespace
    character (every GPT-2 pre-token made of non-space characters ends there). Text with no cut point is yielded
    whole; text without ``\r`` and with newlines is cut exactly as before these two rules.
    """
    n = len(text)
    start = 0
    while n - start > target_chars:
        cut = -1
        pos = start + target_chars
        while True:
            i = text.find("\n", pos, n - 1)
            if i < 0:
                break
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                cut = i + 1
                break
            if (own_regex and text[i - 1] == "\r" and i - 2 >= start and not text[i - 2].isspace()
                    and not text[i + 1].isspace()):
                cut = i
                break
            pos = i + 1
        # Only for a tail without newlines (one huge line), so text with newlines keeps the pieces it always
        # had: training samples of existing corpora, hence their tokenizers, do not change.
        if cut < 0 and own_regex and text.find("\n", start + target_chars, n - 1) < 0:
            m = _SPACE_AFTER_TEXT.search(text, start + target_chars)
            cut = m.start() + 1 if m else -1
        if cut < 0:
            break
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


# Unicode White_Space, what the Rust regex's \s matches (Python's \s also takes \x1c-\x1f, which GPT-2's
# regex treats as punctuation that may join the character before it).
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_SPACE_AFTER_TEXT = re.compile(f"[^{_WS}][{_WS}]")


class Tokenizer:
    """Thin wrapper around ``tokenizers.Tokenizer`` with the project's conventions."""

    def __init__(self, hf_tokenizer, specials: dict | None = None):
        """specials: role (bos, eos, pad, mask) -> token string; roles left out are looked up in ROLE_NAMES."""
        self._tok = hf_tokenizer
        # Text that happens to contain "<|eos|>" etc. is encoded as bytes, not as the special id. User tokens
        # added with `with_added` are not special, so they still match as single tokens.
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True
        specials = {k: v for k, v in (specials or {}).items() if v is not None}
        for role in ROLES:
            if role not in specials:
                specials[role] = next((n for n in ROLE_NAMES[role] if self._tok.token_to_id(n) is not None), None)
        self.specials = {r: n for r, n in specials.items() if n is not None and self._tok.token_to_id(n) is not None}
        self._ids = {r: self._tok.token_to_id(n) for r, n in self.specials.items()}

    @property
    def is_own(self) -> bool:
        """slmlab's own layout (specials 0..3 under our names): no tokenizer_config.json needed."""
        return all(self._tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))

    @property
    def special_tokens(self) -> set[str]:
        """Control tokens: the roles' and every added token marked special (they stand for no text)."""
        added = [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]
        return set(added) | set(self.specials.values())

    def fingerprint(self) -> str:
        """What fixes the token ids a text becomes, documents' eos included (data cache keys)."""
        return self.to_json() if self.is_own else self.to_json() + json.dumps(self.specials, sort_keys=True)

    def with_added(self, tokens) -> "Tokenizer":
        """A copy with `tokens` appended as single, non-special tokens (ones already in the vocabulary keep
        their id), e.g. ``<think>`` or ``TOOL_USE[`` for fine-tuning data. ConfigError for a string that is
        only the spelling of a byte-level vocabulary symbol standing for other text (``é`` is the symbol of
        byte 0xE9): `tokenizers` would reuse that id, so the string would still not be one token."""
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_str(self.to_json())
        special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        for t in tokens:
            if t in special:  # data text never encodes to a special id (encode_special_tokens), so it would stay text
                raise ConfigError(f"added token {t!r} is already special token {special[t]} of this tokenizer: text "
                                  "holding it encodes as plain text (only a chat template places special tokens), "
                                  "and adding it changes nothing; remove it from data.added_tokens")
        if self.byte_level:
            model_vocab = tok.get_vocab(with_added_tokens=False)
            added = {t.content for t in tok.get_added_tokens_decoder().values()}
            for t in dict.fromkeys(tokens):
                i = model_vocab.get(t)
                if i is not None and t not in added and tok.decode([i]) != t:
                    raise ConfigError(
                        f"added token {t!r} cannot be added: it is the spelling of vocabulary entry {i}, which "
                        f"stands for the bytes {bytes(BYTE_LEVEL_CHARS[c] for c in t)!r} in this byte-level "
                        f"tokenizer, and tokenizers would reuse that id; remove it from the added tokens (as text "
                        f"it already encodes, as {len(self.encode(t))} tokens)")
        new = [t for t in dict.fromkeys(tokens) if tok.token_to_id(t) is None]
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
        for t in new:  # the decoder reads an added token's text as vocabulary symbols: ByteLevel's é is byte 0xE9
            back = tok.decode([tok.token_to_id(t)], skip_special_tokens=False)
            if back != t:
                raise ConfigError(f"added token {t!r} would decode as {back!r}: this tokenizer's decoder reads its "
                                  "characters as vocabulary symbols (byte-level ones such as é, ü, Ā stand for single "
                                  "bytes); remove it from data.added_tokens or spell it without them")
        return Tokenizer(tok, self.specials)

    @property
    def byte_level(self) -> bool:
        """Whether the decoder is ByteLevel: every vocabulary character stands for one byte."""
        return any(d.get("type") == "ByteLevel" for d in _pipeline_steps(json.loads(self.to_json()).get("decoder")))

    @property
    def cuts_exactly(self) -> bool:
        """Whether a long document may be encoded in pieces cut after a newline between two non-spaces
        (``split_exact``) with the tokens of the whole: only where the normalizer works character by character
        (none, Unicode forms, lowercase, a replace that makes no whitespace) and the pre-tokenizer ends a
        pre-token at such a newline, which the model (BPE, WordPiece, Unigram) never looks past: ByteLevel's
        GPT-2 regex, Llama-3-style Split regexes. Checked on probes of every kind of character around the
        newline. Not: without a pre-tokenizer (Gemma: BPE merges across the newline, ``.\nThe▁``), a Metaspace
        one (it splits at spaces only), or one that puts a ``▁`` (Prepend, Metaspace) or a space before every text
        it is given (Llama-2, Mistral), which each cut would add once more; nor an added token a cut could split."""
        if any(_cuttable(t.content) for t in self._tok.get_added_tokens_decoder().values() if not t.special):
            return False  # a cut after its newline would split the added token (data text never holds special ones)
        spec = json.loads(self.to_json())
        if not all(_local_normalizer(s) for s in _pipeline_steps(spec.get("normalizer"))):
            return False
        norm, pre = self._tok.normalizer, self._tok.pre_tokenizer
        if pre is None:
            return False

        def pieces(text: str) -> list[str]:
            text = norm.normalize_str(text) if norm is not None else text
            return [p for p, _ in pre.pre_tokenize_str(text)]

        return all(pieces(a + "\n" + b) == pieces(a + "\n") + pieces(b) for a in _PROBES_BEFORE for b in _PROBES_AFTER)

    @property
    def own_regex(self) -> bool:
        """Pre-tokenized by exactly slmlab's ByteLevel GPT-2 regex (ours, GPT-2's): ``split_exact`` may then cut
        CRLF text and long lines (see there)."""
        spec = json.loads(self.to_json())
        pre = spec.get("pre_tokenizer") or {}
        # added tokens are matched before pre-tokenization: a cut at whitespace could split one holding a space
        return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel"
                and pre.get("use_regex", True) and not pre.get("add_prefix_space")
                and not any(re.search(r"\s", t.content) for t in self._tok.get_added_tokens_decoder().values()))

    def token_byte_lengths(self) -> list[int]:
        """UTF-8 bytes of text each token id stands for (control tokens: 0), from the decoder: ByteLevel pieces
        count one byte per character; ``<0xNN>`` byte-fallback pieces one byte; otherwise the piece after the
        decoder's Metaspace/Replace steps (``▁`` -> space) in UTF-8. Added tokens match their content in raw
        text, so they count its UTF-8 bytes. Exact for byte-level tokenizers; SentencePiece-style ones count
        the ``▁`` they prepend to each text, and normalizers (NFKC, lowercasing) change bytes, so there it is
        close, not exact (prepare_data compares the validation split's sum with its real byte count)."""
        spec = json.loads(self.to_json())
        steps = _pipeline_steps(spec.get("decoder"))
        byte_level = any(d.get("type") == "ByteLevel" for d in steps)
        fallback = (any(d.get("type") == "ByteFallback" for d in steps)
                    or bool((spec.get("model") or {}).get("byte_fallback")))

        def piece_bytes(s: str) -> int:
            if byte_level and all(c in BYTE_LEVEL_CHARS for c in s):
                return len(s)
            if fallback and _BYTE_FALLBACK.match(s):
                return 1
            for d in steps:
                if d.get("type") == "Metaspace":
                    s = s.replace(d.get("replacement") or "▁", " ")
                elif d.get("type") == "Replace" and isinstance(d.get("pattern"), dict) and "String" in d["pattern"]:
                    s = s.replace(d["pattern"]["String"], d.get("content") or "")
            return len(s.encode("utf-8", "surrogatepass"))

        special = self.special_tokens
        vocab = self._tok.get_vocab(with_added_tokens=False)
        added = self._tok.get_added_tokens_decoder()
        out = [0] * (max([*vocab.values(), *added.keys()], default=-1) + 1)
        for s, i in vocab.items():
            if s not in special:
                out[i] = piece_bytes(s)
        for i, t in added.items():
            out[i] = 0 if t.special or t.content in special else len(t.content.encode("utf-8", "surrogatepass"))
        return out

    # ---- encoding -------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, computed in parallel by the Rust backend."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (a list/array/tensor of ints). Special tokens are kept as their strings unless skipped."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---- properties -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._ids.get("bos")

    @property
    def eos_id(self) -> int | None:
        return self._ids.get("eos")

    @property
    def start_id(self) -> int | None:
        """The token a text starts after, as documents did in training: what generation starts from when
        the prompt is empty, and what eval.py puts before each context. slmlab's data joins documents
        with eos and never writes bos, so with its own tokenizer a model has only ever seen documents
        start after eos (bos's embedding row never trained). An imported tokenizer's models were
        trained by their makers with bos first, or eos where there is no bos (Qwen2.5)."""
        if self.is_own or self.bos_id is None:
            return self.eos_id
        return self.bos_id

    @property
    def pad_id(self) -> int | None:
        return self._ids.get("pad")

    @property
    def mask_id(self) -> int | None:
        return self._ids.get("mask")

    @property
    def hf(self):
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def to_json(self) -> str:
        """Serialized ``tokenizer.json`` content (deterministic for a given tokenizer)."""
        return self._tok.to_str()

    # ---- persistence ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write a single HF-compatible ``tokenizer.json``. A directory path gets ``tokenizer.json`` inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        from .checkpoint import publish

        with publish(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")
        if not self.is_own:  # a foreign tokenizer's roles, in the file transformers reads them from
            with publish(path.parent / SIDECAR) as tmp:
                tmp.write_text(json.dumps({f"{r}_token": n for r, n in self.specials.items()}, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a ``tokenizer.json`` (or a directory containing one). DataError if missing or corrupt."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        specials = sidecar_specials(path.parent / SIDECAR)
        try:
            return cls(HFTokenizer.from_file(str(path)), specials)
        except Exception as e:  # tokenizers raises a plain Exception on bad JSON
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"tokenizer file is corrupt or not a tokenizer.json: {path} ({msg})") from None

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


def sidecar_specials(path: Path) -> dict:
    """role -> token string from a transformers tokenizer_config.json ({} if absent; strings or
    {"content": ...} entries, as transformers versions write them)."""
    if not path.is_file():
        return {}
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not JSON ({e})") from None
    out = {}
    for role in ROLES:
        v = conf.get(f"{role}_token") if isinstance(conf, dict) else None
        v = v.get("content") if isinstance(v, dict) else v
        if isinstance(v, str):
            out[role] = v
    return out


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries (specials + 256 bytes + merges).

    Uses every text it is given (callers cap the amount; ``slmlab.data`` does). Training is deterministic: the same
    texts in the same order give an identical ``tokenizer.json``. If the texts are too small to learn
    ``vocab_size - 260`` merges the vocabulary comes out smaller; use ``Tokenizer.vocab_size`` for the model.
    Long texts are split at tokenization-neutral newlines so the trainer sees manageable pieces.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise DataError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size {vocab_size} is too small: the minimum is {MIN_VOCAB_SIZE} "
            f"({N_BYTES} byte tokens + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if vocab_size > 2**32 - 1:
        raise DataError(f"vocab_size {vocab_size} is too large (max {2**32 - 1})")

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )

    def pieces():
        for t in texts:
            yield from split_exact(t)

    tok.train_from_iterator(pieces(), trainer=trainer)
    out = Tokenizer(tok)
    got = [out._ids[r] for r in ROLES]
    assert got == list(range(len(SPECIAL_TOKENS))), f"special token ids {got}"
    return out

