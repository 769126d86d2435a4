"""Curriculum tools: per-document quality scores and an ordered (low -> high) document stream.

Quality ordering: documents of a phase are concatenated in ascending score order and cut into
consecutive windows, placed so that the phase ends on its best text. Selective repetition: a phase with
top_frac < 1 streams only the top fraction of documents (by score), wrapping around when it runs
out, so late phases repeat the best data (e.g. top 50% / 30% / 10% in phases 3-5).

Scores come from a jsonl field (`train.quality_score: FIELD`; the data spec must be one .jsonl
file, whose train split is its first documents) or a built-in function (`fn:NAME`, SCORERS).
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError


def _unique_ratio(doc: np.ndarray) -> float:
    """Distinct tokens / tokens: low for repetitive boilerplate, high for varied text."""
    return len(np.unique(doc)) / max(1, len(doc))


def _length(doc: np.ndarray) -> float:
    return float(len(doc))


SCORERS = {"unique_ratio": _unique_ratio, "length": _length}


def document_spans(tokens: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """[start, end) of each document in a token file (eos included; a trailing partial document too)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id) + 1
    starts = np.concatenate([[0], ends[:-1]]) if len(ends) else np.array([0])
    spans = list(zip(starts.tolist(), ends.tolist()))
    last = spans[-1][1] if spans else 0
    if last < len(tokens):
        spans.append((last, len(tokens)))
    return spans


def jsonl_scores(spec: str, field: str, n_docs: int) -> list[float]:
    """`field` of the first n_docs non-empty documents of a .jsonl file (the train split)."""
    path = Path(spec).expanduser()
    if not (path.is_file() and path.suffix.lower() == ".jsonl"):
        raise ConfigError(f"train.quality_score={field!r} reads a jsonl field, so the data spec must be one "
                          f".jsonl file (got {spec!r}); or use a built-in scorer: "
                          + ", ".join(f"fn:{k}" for k in SCORERS))
    from .data import jsonl_records

    scores = []
    for where, obj in jsonl_records(path, fields=()):  # its text was read (and checked) as the data
        if not obj.get("text"):  # the data layer drops empty documents too
            continue
        value = _finite(obj.get(field))  # argsort puts NaN last: it would rank as the best text
        if value is None:
            raise ConfigError(f"{where}: quality score field {field!r} missing or not a finite number"
                              + (f" ({obj[field]})" if isinstance(obj.get(field), float) else ""))
        scores.append(value)
        if len(scores) == n_docs:
            break
    if len(scores) < n_docs:
        raise ConfigError(f"{path}: {len(scores)} scores for {n_docs} training documents")
    return scores


def _finite(v) -> float | None:
    """A JSON number as a finite float; None for anything else (a bool, a string, NaN, inf, an integer
    too large for a float: 1e400 written out in digits)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        v = float(v)
    except OverflowError:
        return None
    return v if math.isfinite(v) else None


def score_documents(tokens: np.ndarray, spans, score: str, spec: str) -> np.ndarray:
    if score.startswith("fn:"):
        name = score[3:]
        if name not in SCORERS:
            raise ConfigError(f"unknown quality scorer {score!r}; built-in: {', '.join('fn:' + k for k in SCORERS)}")
        return np.array([SCORERS[name](np.asarray(tokens[a:b])) for a, b in spans], dtype=np.float64)
    return np.array(jsonl_scores(spec, score, len(spans)), dtype=np.float64)


class OrderedStream:
    """Documents in ascending score order (optionally only the top fraction), as one token stream
    cut into consecutive seq_len + 1 windows; the position is one integer (the cursor). `reads`, the
    tokens the phase will take, places the start so that the last window ends on the stream's last
    token, the best text: a phase shorter than the stream reads its best part, a longer one wraps
    and still ends there. (Started at 0, a short phase read only the worst-scored documents.)"""

    def __init__(self, tokens: np.ndarray, spans, scores: np.ndarray, top_frac: float = 1.0, reads: int = 0):
        order = np.argsort(scores, kind="stable")
        # the fraction as written (0.14, not the float just above it): 0.14 * 50 is 7.000000000000001 in floats
        keep = max(1, math.ceil(Fraction(repr(float(top_frac))) * len(order)))
        order = order[len(order) - keep:]
        self.tokens = tokens
        # The stream as its documents' spans, not a token index: an int64 per streamed token was 8 bytes a
        # token in RAM (80 GB for a 10B-token phase) beside the memory-mapped 2-4 of the tokens themselves.
        spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)[order]
        self.doc_starts = spans[:, 0]  # where each streamed document is in `tokens`
        self.offsets = np.concatenate([[0], np.cumsum(spans[:, 1] - spans[:, 0])])  # ... and in the stream
        self.n_docs = keep
        self.cursor = self.start_for(reads) if reads else 0

    def __len__(self) -> int:
        """Tokens in the stream (before it wraps)."""
        return int(self.offsets[-1])

    def take(self, pos: np.ndarray) -> np.ndarray:
        """The token ids at stream positions `pos` (any shape, each in [0, len))."""
        doc = np.searchsorted(self.offsets, pos, side="right") - 1
        return np.asarray(self.tokens[self.doc_starts[doc] + (pos - self.offsets[doc])])

    def start_for(self, reads: int) -> int:
        """The cursor from which `reads` more tokens end on the stream's last token (- 1: the last
        window's extra target)."""
        return (-reads - 1) % len(self)

    def next(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        pos = (self.cursor + np.arange(batch_size)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]) % n
        self.cursor = (self.cursor + batch_size * seq_len) % n
        w = torch.from_numpy(self.take(pos).astype(np.int64))
        return w[:, :-1], w[:, 1:]
