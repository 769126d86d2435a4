"""Corpora, tokenization into cached memory-mapped token files, and batching.

Data specs (strings):

* ``stdlib`` (default): the ``.py`` sources of the running interpreter's standard library
  (``sysconfig.get_paths()["stdlib"]``) minus test suites, ``site-packages`` and ``__pycache__``. Split by file:
  files are ranked by the SHA-256 of their relative path and taken in that order into validation until it holds
  at least ``val_frac`` of the bytes (2% ~ 240 KB for CPython 3.11), skipping
  files too big to fit. Nothing is downloaded; the same Python
  version gives the same corpus and split on every machine. (A local directory literally named ``stdlib`` is
  reached as ``./stdlib``.)
* a local path: a file or a directory (searched recursively) of ``.txt``/``.md`` (one document per file),
  ``.jsonl`` (one document per line, ``text`` field) or ``.parquet`` (``text`` column; needs pyarrow). A single
  file is split by taking its last ``val_frac`` of documents; a single-document file (any ``.txt``) is cut at a
  newline near the ``1 - val_frac`` point. A directory is split by file like ``stdlib`` (a directory with one file
  is split like that file). In a directory, hidden names (``.*``, and all under a hidden directory), other file
  types, symlinked directories (symlinked files are read), non-regular files and files with no text (empty or
  whitespace only) are left out; the summary line counts them by reason.
* ``hf:NAME[:CONFIG][@SPLIT]``: ``datasets.load_dataset(NAME, CONFIG, split=SPLIT)`` (SPLIT defaults to
  ``train``), ``text`` column; the last ``val_frac`` of documents is the validation split.

Token files hold the documents' ids back to back with ``eos_id`` after every document. The tokenizer is trained
on the train split only, on at most ``tokenizer_train_bytes`` (default 32 MiB) of it: when the train split is
bigger, an evenly strided, deterministic sample of ~64K-character pieces is used.

A split is a `Docs`: its documents are read as each pass iterates them (a .jsonl line by line, a .parquet by
row batches, a directory file by file, an hf: dataset from its column), so a corpus need not fit in memory; what
is held is the validation split, the tokenizer's sample and a document at a time (a .txt or .md is one).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import lzma
import math
import os
import platform
import re
import sys
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from .checkpoint import discard, publish, remove_stale
from .errors import ConfigError, DataError
from .fmt import count
from .tokenizer import Tokenizer, split_exact, train_tokenizer

FORMAT_VERSION = 1
# How a given tokenizer (data.tokenizer) encodes long documents, in the cache key of its token files.
# 2: cut at newlines only where Tokenizer.cuts_exactly shows the cut changes no id (SentencePiece-style
# prepends, Gemma-like tokenizers without a pre-tokenizer and added tokens holding a newline encode
# whole); caches written before could hold the cut ids. A tokenizer trained here always cut exactly.
GIVEN_TOKENIZER_ENCODING = 2
DEFAULT_VAL_FRAC = 0.02
DEFAULT_TOKENIZER_TRAIN_BYTES = 32 * 2**20
TEXT_SUFFIXES = (".txt", ".md")
SUPPORTED_SUFFIXES = (".txt", ".md", ".jsonl", ".parquet")
_STDLIB_SKIP_DIRS = {"test", "tests", "testing", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_ENCODE_BATCH_CHARS = 4 * 2**20


# ================================================================================================================
# Sources
# ================================================================================================================


def _read_text_file(path: Path) -> str:
    try:  # utf-8-sig: a leading byte-order mark (Windows editors) is no text, as .jsonl reading drops it
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


# JSON's \uD800-\uDFFF escapes decode to lone surrogates when unpaired: not Unicode, so no UTF-8 exists for them.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _surrogate_error(where: str, text: str, what_to_do: str, field: str = "text") -> DataError:
    i = _SURROGATE.search(text).start()
    return DataError(f"{where}: {field!r} holds a lone UTF-16 surrogate (\\u{ord(text[i]):04x} at character {i}), which "
                     f"is not valid Unicode and cannot be tokenized: {what_to_do}")


def jsonl_records(path, fields: tuple[str, ...] | None = None):
    """("path:line", record) for each non-blank line of a .jsonl: the one reader of JSON lines (training
    text, SFT examples, --prompts, task rows). A leading byte-order mark is dropped, as text files drop it.
    DataError naming the line that is not UTF-8 (never silently replaced) or not JSON, or whose strings
    hold a lone surrogate escape ("\\ud800"): every string of the record, or only those under `fields`."""
    try:
        f = open(Path(path).expanduser(), "rb")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x}: {e.reason}); save the file "
                                "as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
            if "\\u" in line:  # only a \u escape makes one (the line was decoded strictly): most skip the scan
                scanned = rec if fields is None or not isinstance(rec, dict) else {k: rec.get(k) for k in fields}
                bad = next(((k, v) for k, v in _strings(scanned) if _SURROGATE.search(v)), None)
                if bad:
                    raise _surrogate_error(f"{path}:{n}", bad[1], "fix or drop that line", field=bad[0])
            yield f"{path}:{n}", rec


def _strings(rec, key: str = "text"):
    """(the key it is under, string) for every string in a JSON value, keys included."""
    if isinstance(rec, str):
        yield key, rec
    elif isinstance(rec, list):
        for v in rec:
            yield from _strings(v, key)
    elif isinstance(rec, dict):
        for k, v in rec.items():
            yield from _strings(k, k)
            yield from _strings(v, k)


def _iter_jsonl(path: Path) -> Iterator[str]:
    for where, obj in jsonl_records(path, fields=("text",)):  # other fields (metadata) are never read
        if not isinstance(obj, dict) or "text" not in obj:
            raise DataError(f"{where}: expected a JSON object with a 'text' field")
        text = obj["text"]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: 'text' must be a string, got {type(text).__name__}")
        yield text


def _iter_parquet(path: Path) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow (pip install pyarrow)") from None
    try:
        schema = pq.read_schema(path)
    except Exception as e:
        raise DataError(f"cannot read parquet file {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if "text" not in schema.names:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not _is_string_type(kind):
        raise DataError(f"{path}: the 'text' column holds {kind}, not strings")
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096, columns=["text"]):
            yield from (t for t in batch.column(0).to_pylist() if t is not None)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: the 'text' column is not valid UTF-8 ({e.reason} at byte {e.start} of a "
                        "value)") from None


def _is_string_type(kind) -> bool:
    import pyarrow.types as pt

    if pt.is_dictionary(kind):
        kind = kind.value_type
    return pt.is_string(kind) or pt.is_large_string(kind) or getattr(pt, "is_string_view", lambda _: False)(kind)


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of one supported file (empty documents dropped), read as they are asked for: a .jsonl line
    by line, a .parquet 4096 rows at a time, a .txt/.md whole (it is one document)."""
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        docs = [_read_text_file(path)]
    elif suffix == ".jsonl":
        docs = _iter_jsonl(path)
    elif suffix == ".parquet":
        docs = _iter_parquet(path)
    else:
        raise DataError(f"unsupported data file type {suffix or '(none)'!r}: {path} "
                        f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return (d for d in docs if d)


def _nonempty_text(path: Path) -> list[str]:
    """A text file as one document, or none when it is empty (the stdlib's .py files)."""
    text = _read_text_file(path)
    return [text] if text else []


class Docs:
    """One split's documents, read part by part on every pass over them, so that a corpus larger than memory is
    never held whole: each part is a callable giving an iterable of documents (one file's, or a range of a
    file's or a dataset's; a list, for a lone document cut in two). `stats()` is (documents, characters), from a
    pass unless the source counted them already. Measured with bench/data_memory.py (10 MB .jsonl shards):
    when every split was a list of all its documents, the peak RSS grew by 1.25 bytes per byte of text (727 MB
    at 50 MB, 977 MB at 250 MB); read this way, by 0.22 (684 MB, 728 MB), in the same time (README, Data)."""

    def __init__(self, parts: list[Callable[[], Iterable[str]]], stats: tuple[int, int] | None = None):
        self.parts = parts
        self._stats = stats

    @classmethod
    def held(cls, docs: list[str]) -> "Docs":
        return cls([lambda: docs], (len(docs), sum(map(len, docs))))

    def __iter__(self) -> Iterator[str]:
        for part in self.parts:
            yield from part()

    def stats(self) -> tuple[int, int]:
        if self._stats is None:
            n = chars = 0
            for d in self:
                n, chars = n + 1, chars + len(d)
            self._stats = n, chars
        return self._stats


def _islice(documents: Callable[[], Iterator[str]], start: int, stop: int | None) -> Iterator[str]:
    return itertools.islice(documents(), start, stop)


def split_stream(documents: Callable[[], Iterator[str]], val_frac: float) -> tuple[Docs, Docs]:
    """split_documents' split of the documents that each call of `documents` reads again, never holding them
    all: a pass counts them (8 bytes a document: their lengths), and each split reads its own range. A lone
    document is held, to be cut in two."""
    lengths = np.fromiter(map(len, documents()), dtype=np.int64)
    n = len(lengths)
    if n <= 1:
        return tuple(map(Docs.held, split_documents(list(documents()), val_frac)))
    n_train = n - _n_val(n, val_frac)
    return (Docs([partial(_islice, documents, 0, n_train)], (n_train, int(lengths[:n_train].sum()))),
            Docs([partial(_islice, documents, n_train, None)], (n - n_train, int(lengths[n_train:].sum()))))


def _cut_text(text: str, val_frac: float) -> tuple[str, str]:
    """Split one text into (train, val) at a newline near the (1 - val_frac) point."""
    target = int(len(text) * (1.0 - val_frac))
    target = min(max(target, 1), len(text) - 1) if len(text) >= 2 else len(text)
    i = text.find("\n", target)
    if i >= 0 and i + 1 < len(text):
        cut = i + 1
    else:
        j = text.rfind("\n", 0, target)
        cut = j + 1 if j >= 0 else target
    return text[:cut], text[cut:]


def split_documents(docs: list[str], val_frac: float) -> tuple[list[str], list[str]]:
    """Last ``val_frac`` of the documents (at least one) to validation; a single document is cut in two."""
    if not docs:
        return [], []
    if len(docs) == 1:
        tr, va = _cut_text(docs[0], val_frac)
        return [tr] if tr else [], [va] if va else []
    n_val = _n_val(len(docs), val_frac)
    return docs[: len(docs) - n_val], docs[len(docs) - n_val:]


def _n_val(n_docs: int, val_frac: float) -> int:
    """How many of n_docs >= 2 documents, the last ones, validate: val_frac of them, at least one, not all."""
    return min(max(1, round(n_docs * val_frac)), n_docs - 1)


def split_files(rel_paths_and_sizes: list[tuple[str, int]], val_frac: float) -> tuple[list[str], list[str]]:
    """Deterministic by-file split. Files are ranked by the SHA-256 of their relative path (posix form) and moved
    into validation in that order until it holds at least ``val_frac`` of all bytes; a file that would push it past
    1.5x that target is skipped (stays in train), so one huge file cannot dominate validation. At least one file
    goes to validation and at least one stays in train. Returns (train, val) paths, each in the input order."""
    if len(rel_paths_and_sizes) < 2:
        return [p for p, _ in rel_paths_and_sizes], []
    target = val_frac * sum(s for _, s in rel_paths_and_sizes)
    ranked = sorted(rel_paths_and_sizes, key=lambda ps: hashlib.sha256(ps[0].encode("utf-8")).hexdigest())
    val: set[str] = set()
    got = 0
    for p, s in ranked:
        if got >= target or len(val) == len(ranked) - 1:
            break
        if got + s <= 1.5 * target:
            val.add(p)
            got += s
    if not val:  # every file is over 1.5x the target: the smallest (the first ranked of equals), not a huge one
        val.add(min(ranked, key=lambda ps: ps[1])[0])
    return [p for p, _ in rel_paths_and_sizes if p not in val], [p for p, _ in rel_paths_and_sizes if p in val]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_stdlib_skipped_dir(name: str) -> bool:
    return (name in _STDLIB_SKIP_DIRS or name.startswith("test_") or name.endswith("_test")
            or name.endswith("_tests") or "_test_" in name)


def list_stdlib_files() -> list[str]:
    """Sorted relative (posix) paths of the standard library's ``.py`` files, test suites excluded."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_stdlib_skipped_dir(d))
        rel_dir = Path(dirpath).relative_to(root)
        for fn in filenames:
            if fn.endswith(".py") and not fn.startswith("test_"):
                out.append((rel_dir / fn).as_posix())
    return sorted(out)


def stdlib_split(val_frac: float = DEFAULT_VAL_FRAC) -> tuple[list[str], list[str]]:
    """(train, val) relative paths of the stdlib corpus."""
    root = stdlib_root()
    files = [(p, (root / p).stat().st_size) for p in list_stdlib_files()]
    return split_files(files, val_frac)


_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-/]*$")
_HF_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_HF_SPLIT = re.compile(r"^[A-Za-z0-9_.\-\[\]:%+]+$")


@dataclass(frozen=True)
class HFSpec:
    name: str
    config: str | None
    split: str


def parse_hf_spec(spec: str) -> HFSpec:
    """Parse ``hf:NAME[:CONFIG][@SPLIT]``; DataError on anything malformed."""
    usage = "expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:roneneldan/TinyStories@train"
    if not spec.startswith("hf:"):
        raise DataError(f"not an hf: data spec: {spec!r} ({usage})")
    rest = spec[3:]
    if rest.count("@") > 1:
        raise DataError(f"malformed data spec {spec!r}: more than one '@' ({usage})")
    rest, at, split = rest.partition("@")
    if at and not split:
        raise DataError(f"malformed data spec {spec!r}: empty split after '@' ({usage})")
    split = split or "train"
    name, colon, config = rest.partition(":")
    if not name:
        raise DataError(f"malformed data spec {spec!r}: missing dataset name ({usage})")
    if colon and not config:
        raise DataError(f"malformed data spec {spec!r}: empty config after ':' ({usage})")
    if not _HF_NAME.match(name) or name.endswith("/") or "//" in name or name.count("/") > 1:
        raise DataError(f"malformed data spec {spec!r}: bad dataset name {name!r} ({usage})")
    if colon and not _HF_PART.match(config):
        raise DataError(f"malformed data spec {spec!r}: bad config {config!r} ({usage})")
    if not _HF_SPLIT.match(split):
        raise DataError(f"malformed data spec {spec!r}: bad split {split!r} ({usage})")
    return HFSpec(name, config or None, split)


def load_hf(spec: str):
    """``datasets.load_dataset`` for an ``hf:NAME[:CONFIG][@SPLIT]`` spec (downloads, or reads the
    datasets cache); one-line DataError when the package is missing or the load fails."""
    hf = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec!r} needs the `datasets` package (pip install datasets, or pip install "
                        "'slmlab[hf]')") from None
    try:
        return datasets.load_dataset(hf.name, hf.config, split=hf.split)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"could not load {spec}: {msg}") from None


class _Source:
    """A resolved data spec: ``fingerprint()`` is cheap where possible, ``split(val_frac)`` gives (train, val)
    `Docs`, which read the text as they are iterated."""

    def __init__(self, spec: str):
        self.spec = spec

    def fingerprint(self) -> str:
        raise NotImplementedError

    def cache_spec(self) -> str:
        """The spec as the cache key names it."""
        return self.spec

    def split(self, val_frac: float) -> tuple[Docs, Docs]:
        raise NotImplementedError

    def note(self, manifest: dict) -> str:
        """What the summary line adds about the source (files read and ignored)."""
        return ""


class _StdlibSource(_Source):
    def fingerprint(self) -> str:
        root = stdlib_root()
        h = hashlib.sha256()
        h.update(f"{platform.python_implementation()} {sys.version}\n".encode())
        for p in list_stdlib_files():
            h.update(f"{p}\t{(root / p).stat().st_size}\n".encode())
        return "stdlib:" + h.hexdigest()

    def split(self, val_frac):
        root = stdlib_root()
        return tuple(Docs([partial(_nonempty_text, root / p) for p in ps]) for ps in stdlib_split(val_frac))


def _stat_line(path: Path, rel: str) -> str:
    st = path.stat()
    return f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"


class _LocalSource(_Source):
    def __init__(self, spec: str, path: Path):
        super().__init__(spec)
        self.path = path

    def cache_spec(self) -> str:
        # ./x.txt, x.txt and /abs/x.txt are one corpus: keyed as written, each would tokenize and cache again.
        return str(self.path.resolve())


class _FileSource(_LocalSource):
    def __init__(self, spec: str, path: Path):
        super().__init__(spec, path)
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise DataError(f"unsupported data file type {path.suffix or '(none)'!r}: {path} "
                            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")

    def fingerprint(self):
        return "file:" + hashlib.sha256(_stat_line(self.path, str(self.path.resolve())).encode()).hexdigest()

    def split(self, val_frac):
        return split_stream(partial(iter_documents, self.path), val_frac)


def _list_dir(root: Path) -> tuple[list[str], dict[str, int]]:
    """Sorted relative (posix) paths of the supported files under ``root``, and what was left out, by reason:
    hidden (a name starting with '.', and all under such a directory), symlinked directories (not followed:
    a link could loop or reach outside the corpus; symlinked files are read), other file types, and entries
    that are not regular files (broken links, FIFOs, sockets), and a file seen before under another name (a
    symlink or hard link to it: its text would be read twice, and may land in both splits)."""
    files, ignored = [], Counter()
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: symlinked dirs are listed, not entered
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            if d.startswith("."):
                ignored["hidden"] += 1
            elif (here / d).is_symlink():
                ignored["symlinked dir"] += 1
            else:
                keep.append(d)
        dirnames[:] = keep
        for fn in filenames:
            path = here / fn
            if fn.startswith("."):
                ignored["hidden"] += 1
            elif path.suffix.lower() not in SUPPORTED_SUFFIXES:
                ignored["other type"] += 1
            elif not path.is_file():
                ignored["not a regular file"] += 1
            else:
                files.append(path.relative_to(root).as_posix())
    unique, seen = [], set()
    for rel in sorted(files):
        st = (root / rel).stat()
        if (st.st_dev, st.st_ino) in seen:
            ignored["duplicate"] += 1
        else:
            seen.add((st.st_dev, st.st_ino))
            unique.append(rel)
    return unique, dict(ignored)


class _DirSource(_LocalSource):
    def __init__(self, spec: str, path: Path):
        super().__init__(spec, path)
        self.files, self.ignored = _list_dir(path)
        if not self.files:
            raise DataError(f"empty corpus: no {'/'.join(SUPPORTED_SUFFIXES)} files under {path}"
                            f"{f' ({_ignored_note(self.ignored)})' if self.ignored else ''}")

    def fingerprint(self):
        h = hashlib.sha256(str(self.path.resolve()).encode() + b"\n")
        for rel in self.files:
            h.update(_stat_line(self.path / rel, rel).encode())
        return "dir:" + h.hexdigest()

    def split(self, val_frac):
        # Files with no text (empty, whitespace only) are left out of the split: one of them as the guaranteed
        # validation file would leave validation empty at any val_frac. One pass reads each file in turn for
        # that and its counts; the splits read them again as they are iterated.
        stats = {}
        for rel in self.files:
            n = chars = 0
            has_text = False
            for d in iter_documents(self.path / rel):
                n, chars, has_text = n + 1, chars + len(d), has_text or not d.isspace()
            if has_text:
                stats[rel] = n, chars
        texty = list(stats)
        self.n_empty = len(self.files) - len(texty)
        if len(texty) <= 1:
            return split_stream(partial(iter_documents, self.path / texty[0]) if texty else partial(iter, ()),
                                val_frac)
        sized = [(rel, (self.path / rel).stat().st_size) for rel in texty]
        return tuple(Docs([partial(iter_documents, self.path / rel) for rel in rels],
                          (sum(stats[r][0] for r in rels), sum(stats[r][1] for r in rels)))
                     for rels in split_files(sized, val_frac))

    def note(self, manifest: dict) -> str:
        empty = manifest.get("n_empty_files", 0)
        ignored = {**self.ignored, **({"empty": empty} if empty else {})}
        n_ign = sum(ignored.values())
        return f"{len(self.files) - empty} files read" + (f", {n_ign} ignored ({_ignored_note(ignored)})" if n_ign else "")


def _ignored_note(ignored: dict) -> str:
    return ", ".join(f"{n} {why}{'s' if n > 1 and why.endswith(' dir') else ''}"
                     for why, n in sorted(ignored.items(), key=lambda kv: (-kv[1], kv[0])))


class _HFSource(_Source):
    def __init__(self, spec: str):
        super().__init__(spec)
        self.hf = parse_hf_spec(spec)
        self._ds = None

    def _load(self):
        if self._ds is None:
            ds = load_hf(self.spec)
            cols = list(getattr(ds, "column_names", None) or [])
            if "text" not in cols:
                raise DataError(f"{self.spec} has no 'text' column (columns: {', '.join(map(str, cols)) or 'none'})")
            self._ds = ds
        return self._ds

    def fingerprint(self):
        ds = self._load()
        fp = getattr(ds, "_fingerprint", None)
        if fp:
            return f"hf:{self.spec}:{fp}"
        h = hashlib.sha256()
        for t in ds["text"]:
            h.update((t or "").encode("utf-8", "surrogatepass") + b"\0")
        return f"hf:{self.spec}:{h.hexdigest()}"

    def _documents(self) -> Iterator[str]:
        """The non-empty texts, checked, read from the column as they are asked for (datasets 4's
        ds["text"] is a lazy column; older versions return a list)."""
        for i, t in enumerate(self._load()["text"]):
            if not t:
                continue
            if not isinstance(t, str):
                raise DataError(f"{self.spec}: 'text' column must hold strings, got {type(t).__name__} (row {i})")
            if _SURROGATE.search(t):
                raise _surrogate_error(f"{self.spec}: row {i}", t, "fix or filter that row")
            yield t

    def split(self, val_frac):
        return split_stream(self._documents, val_frac)


def resolve_spec(spec: str) -> _Source:
    """Turn a data spec into a source; DataError for a missing path, bad type or malformed hf: spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}: use 'stdlib', a path, or hf:NAME[:CONFIG][@SPLIT]")
    if spec == "stdlib":
        return _StdlibSource(spec)
    if spec.startswith("hf:"):
        return _HFSource(spec)
    try:
        path = Path(spec).expanduser()
    except RuntimeError:  # "~name..." and no user of that name: a file whose name starts with ~
        path = Path(spec)
    if not path.exists():
        raise DataError(f"data path not found: {spec}")
    if path.is_dir():
        return _DirSource(spec, path)
    if not path.is_file():  # reading a FIFO would block forever, a device never ends
        raise DataError(f"data path {spec} is not a regular file or a directory (a FIFO, device or socket?); "
                        "slmlab reads regular files only")
    return _FileSource(spec, path)


# ================================================================================================================
# Preparation and cache
# ================================================================================================================


@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: np.memmap
    val: np.memmap
    val_bytes: int
    gzip_bpb: float
    xz_bpb: float
    manifest: dict
    bytes_per_token: float
    path: Path
    cached: bool = field(default=False, compare=False)
    note: str = field(default="", compare=False)  # the source's: files read and ignored

    @property
    def val_share(self) -> float | None:
        """Validation's share of the corpus bytes (None for caches written before train_bytes was recorded)."""
        tb = self.manifest.get("train_bytes")
        return self.val_bytes / (tb + self.val_bytes) if isinstance(tb, int) and tb + self.val_bytes else None

    def summary(self) -> str:
        m = self.manifest
        tag = "  (cached)" if self.cached else ""
        share = f", {self.val_share:.1%} of bytes" if self.val_share is not None else ""
        note = f"  [{self.note}]" if self.note else ""
        return (f"data: {m['spec']}{note}  vocab {m['vocab_size']}  train {count(m['n_train_tokens'])} tokens  "
                f"val {count(m['n_val_tokens'])} tokens ({m['val_bytes'] / 1e6:.2f} MB{share}, "
                f"{self.bytes_per_token:.2f} bytes/token)  gzip -9 {self.gzip_bpb:.2f} bpb  "
                f"xz -9 {self.xz_bpb:.2f} bpb{tag}")

    def warnings(self) -> list[str]:
        """One line each: a validation share far from val_frac, bpb that the tokenizer can only approximate."""
        m, out = self.manifest, []
        frac, share = m.get("val_frac"), self.val_share
        if isinstance(frac, float) and share is not None and not frac / 2 <= share <= 2 * frac:
            out.append(f"warning: validation holds {share:.2%} of the bytes of {m['spec']}, data.val_frac is "
                       f"{frac:g} (the split takes whole files or documents, and cuts a lone document only at a "
                       "newline: more, smaller files or documents give a closer split)")
        vtb = m.get("val_token_bytes")
        if isinstance(vtb, int) and vtb != self.val_bytes and vtb > 0:
            off = (self.val_bytes / vtb - 1) * 100
            out.append(f"warning: this tokenizer's per-token byte lengths add up to {vtb:,} over the validation "
                       f"split, not its {self.val_bytes:,} UTF-8 bytes: val_bpb is approximate, about "
                       f"{abs(off):.3g}% too {'high' if off > 0 else 'low'} (normalizer or prepended space)")
        return out


def compression_bpb(data: bytes) -> tuple[float, float]:
    """(gzip -9, xz -9) bits per byte of ``data``."""
    if not data:
        return float("nan"), float("nan")
    n = len(data)
    return 8 * len(gzip.compress(data, 9, mtime=0)) / n, 8 * len(lzma.compress(data, preset=9)) / n


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _training_sample(docs: Iterable[str], cap_bytes: int, total: int | None = None) -> list[str]:
    """Every stride-th 64K-character piece of ``docs``, about ``cap_bytes`` in all (``total``: their characters,
    a cheap stand-in for bytes, when known)."""
    if total is None:
        total = sum(len(d) for d in docs)
    if total <= cap_bytes:
        return list(docs)
    stride = math.ceil(total / cap_bytes)
    out, i = [], 0
    for d in docs:
        for piece in split_exact(d, 1 << 16):
            if i % stride == 0:
                out.append(piece)
            i += 1
    return out


def _encode_batches(docs: Iterable[str], own_regex, cut: bool = True) -> Iterator[tuple[list[str], list[bool], int]]:
    """``(pieces, ends, chars)`` batches of ``docs`` of at least ``_ENCODE_BATCH_CHARS`` characters (the last one
    less): each document cut into pieces by ``split_exact`` (which ``own_regex`` lets cut CRLF text and long lines
    too; `cut` False: whole, Tokenizer.cuts_exactly), ``ends`` marking every document's last piece (an EOS
    follows it), ``chars`` the batch's characters."""
    pieces: list[str] = []
    ends: list[bool] = []
    chars = 0
    for d in docs:
        parts = list(split_exact(d, 1 << 16, own_regex)) if cut else [d]
        for k, piece in enumerate(parts):
            pieces.append(piece)
            ends.append(k == len(parts) - 1)
            chars += len(piece)
            if chars >= _ENCODE_BATCH_CHARS:
                yield pieces, ends, chars
                pieces, ends, chars = [], [], 0
    if pieces:
        yield pieces, ends, chars


def _tokenize_to_file(tok: Tokenizer, docs: Iterable[str], path: Path, dtype: np.dtype, desc: str,
                      progress: bool, total_chars: int | None = None) -> int:
    """Write the ids of ``docs`` (each followed by EOS) to ``path``; return the number of tokens.
    ``total_chars`` (for the progress bar) is counted from ``docs`` when not given."""
    from tqdm import tqdm

    eos = np.array([tok.eos_id], dtype=dtype)
    n_tokens = 0
    if total_chars is None:
        total_chars = sum(len(d) for d in docs)
    with open(path, "wb") as f, tqdm(total=total_chars, desc=desc, unit="char", unit_scale=True,
                                     disable=not progress, leave=False, dynamic_ncols=True) as bar:
        for pieces, ends, chars in _encode_batches(docs, tok.own_regex, tok.cuts_exactly):
            arrays = []
            for ids, end in zip(tok.encode_batch(pieces), ends):
                arrays.append(np.asarray(ids, dtype=dtype))
                if end:
                    arrays.append(eos)
            arr = np.concatenate(arrays)
            arr.tofile(f)
            n_tokens += int(arr.size)
            bar.update(chars)
    return n_tokens


def _open_tokens(path: Path, dtype: np.dtype, n: int) -> np.memmap:
    if n == 0:  # an empty file cannot be memory-mapped
        return np.zeros(0, dtype=dtype)
    size = path.stat().st_size if path.is_file() else -1
    if size != n * dtype.itemsize:  # checked before mapping: numpy raises on odd or empty files
        raise DataError(f"cached token file {path} has {size} bytes, manifest says {n} tokens of "
                        f"{dtype.itemsize} bytes: delete {path.parent}")
    arr = np.memmap(path, dtype=dtype, mode="r")
    if arr.size != n:
        raise DataError(f"cached token file {path} has {arr.size} tokens, manifest says {n}: delete {path.parent}")
    return arr


def load_bundle(path: str | os.PathLike) -> DataBundle:
    """Open a prepared cache directory (``DataBundle.path``)."""
    path = Path(path)
    mpath = path / "manifest.json"
    # Every field used below or by DataBundle.summary is read here, so any damage is one DataError (which
    # prepare_data answers by rebuilding), never a KeyError from deeper down.
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        dtype = np.dtype(manifest["dtype"])
        if dtype not in (np.uint16, np.uint32):
            raise ValueError(f"dtype {dtype} is not a token dtype")
        n_train, n_val = int(manifest["n_train_tokens"]), int(manifest["n_val_tokens"])
        vb, gz, xz = int(manifest["val_bytes"]), float(manifest["gzip_bpb"]), float(manifest["xz_bpb"])
        if not isinstance(manifest["spec"], str) or not isinstance(manifest["vocab_size"], int):
            raise ValueError("spec or vocab_size has the wrong type")
    except FileNotFoundError:
        raise DataError(f"prepared data not found: {mpath}") from None
    except KeyError as e:
        raise DataError(f"corrupt data manifest {mpath}: no {e} field") from None
    except (ValueError, TypeError, OSError) as e:
        raise DataError(f"corrupt data manifest {mpath}: {e}") from None
    want = manifest.get("tokenizer_sha256")  # caches written before it was recorded have none
    if want and (not (path / "tokenizer.json").is_file()
                 or hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest() != want):
        raise DataError(f"cached tokenizer {path / 'tokenizer.json'} does not match its manifest")
    tok = Tokenizer.load(path / "tokenizer.json")
    train = _open_tokens(path / "train.bin", dtype, n_train)
    val = _open_tokens(path / "val.bin", dtype, n_val)
    return DataBundle(tokenizer=tok, train=train, val=val, val_bytes=vb, gzip_bpb=gz, xz_bpb=xz, manifest=manifest,
                      bytes_per_token=vb / n_val if n_val else float("nan"), path=path)


def cache_key(spec: str, source_fingerprint: str, vocab_size: int, val_frac: float,
              tokenizer_json: str | None, tokenizer_train_bytes: int) -> str:
    blob = json.dumps({
        "format": FORMAT_VERSION, "spec": spec, "source": source_fingerprint, "vocab_size": vocab_size,
        "val_frac": val_frac, "tokenizer_train_bytes": tokenizer_train_bytes,
        "tokenizer": hashlib.sha256(tokenizer_json.encode()).hexdigest() if tokenizer_json else None,
        **({"tokenizer_encoding": GIVEN_TOKENIZER_ENCODING} if tokenizer_json else {}),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _split_nonempty(source, spec: str, val_frac: float) -> tuple[Docs, Docs]:
    train_docs, val_docs = source.split(val_frac)
    n_train_chars, n_val_chars = train_docs.stats()[1], val_docs.stats()[1]
    if n_train_chars + n_val_chars == 0:
        raise DataError(f"empty corpus: {spec} contains no text")
    if n_train_chars == 0:
        raise DataError(f"train split of {spec} is empty: use a smaller data.val_frac (now {val_frac}) or more data")
    if n_val_chars == 0:
        raise DataError(f"validation split of {spec} is empty: use a larger data.val_frac (now {val_frac}) or more data")
    return train_docs, val_docs


def _utf8(docs) -> Iterator[bytes]:
    return (d.encode("utf-8", "surrogatepass") for d in docs)


class _TextDigest:
    """sha256 of documents' UTF-8 bytes, each followed by a NUL, and their byte count: what a split's text
    is, whatever path or mtime it was read from (compare.py and ablate.py tell corpora apart by it).
    `through(docs)` hashes documents as another pass (tokenization) reads them: no pass of its own."""

    def __init__(self):
        self.sha, self.bytes = hashlib.sha256(), 0

    def add(self, b: bytes) -> None:
        self.sha.update(b)
        self.sha.update(b"\0")
        self.bytes += len(b)

    def through(self, docs: Iterable[str]) -> Iterator[str]:
        for d in docs:
            self.add(d.encode("utf-8", "surrogatepass"))
            yield d


def text_identity(bundle: DataBundle | None) -> dict:
    """{train_sha256, val_sha256} of a prepared corpus (None each for caches written before they were
    recorded): two runs with equal ones trained and were validated on the same text. {} without a
    bundle (an SFT run's chat data is no prepared corpus)."""
    return {k: bundle.manifest.get(k) for k in ("train_sha256", "val_sha256")} if bundle is not None else {}


def _write_cache(path: Path, tokenizer, train_docs: Docs, val_docs: Docs, dtype, progress: bool, manifest: dict):
    """Token files, tokenizer.json and manifest.json (``manifest`` plus the split statistics) in a new ``path``.
    The train split is read once more (tokens and sha256 in one pass); the validation split is held."""
    path.mkdir()
    (n_train_docs, train_chars), n_val_docs = train_docs.stats(), val_docs.stats()[0]
    train_text = _TextDigest()
    n_train = _tokenize_to_file(tokenizer, train_text.through(train_docs), path / "train.bin", dtype,
                                "tokenize train", progress, train_chars)
    val_docs = list(val_docs)
    n_val = _tokenize_to_file(tokenizer, val_docs, path / "val.bin", dtype, "tokenize val", progress)
    val_encoded = list(_utf8(val_docs))  # once, for the baselines and the sha256
    val_raw = b"".join(val_encoded)
    gz, xz = compression_bpb(val_raw)
    val_text = _TextDigest()
    for b in val_encoded:
        val_text.add(b)
    # What evaluate's bpb will count for these tokens; equal to val_bytes for byte-level tokenizers.
    lengths = np.asarray(tokenizer.token_byte_lengths(), dtype=np.int64)
    val_ids = _open_tokens(path / "val.bin", dtype, n_val)
    val_token_bytes = sum(int(lengths[val_ids[i:i + 2**24]].sum()) for i in range(0, n_val, 2**24))
    del val_ids
    tokenizer.save(path / "tokenizer.json")
    manifest = {
        **manifest, "n_train_docs": n_train_docs, "n_val_docs": n_val_docs,
        "train_bytes": train_text.bytes, "train_sha256": train_text.sha.hexdigest(),
        "val_sha256": val_text.sha.hexdigest(),
        "n_train_tokens": n_train, "n_val_tokens": n_val, "val_bytes": len(val_raw), "val_token_bytes": val_token_bytes,
        "gzip_bpb": gz, "xz_bpb": xz, "eos_id": tokenizer.eos_id,
        "tokenizer_sha256": hashlib.sha256((path / "tokenizer.json").read_bytes()).hexdigest(),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def prepare_data(spec: str, vocab_size: int, cache_dir: str | os.PathLike, val_frac: float = DEFAULT_VAL_FRAC,
                 tokenizer: Tokenizer | None = None, progress: bool = True, *, quiet: bool = False,
                 tokenizer_train_bytes: int = DEFAULT_TOKENIZER_TRAIN_BYTES) -> DataBundle:
    """Resolve ``spec``, train a tokenizer on its train split (unless ``tokenizer`` is given; then ``vocab_size``
    is not used for training), tokenize both splits into memory-mapped files under ``cache_dir/<key>/`` and
    return a :class:`DataBundle`. A second call with the same arguments and unchanged source loads the cache.
    ``progress`` toggles tqdm bars; ``quiet`` suppresses the one-line summaries printed to stdout."""
    say = (lambda s: None) if quiet else (lambda s: print(s, flush=True))
    if isinstance(val_frac, bool) or not isinstance(val_frac, (int, float)) or not 0.0 < val_frac < 1.0:
        raise DataError(f"val_frac must be between 0 and 1 (exclusive), got {val_frac!r}")
    val_frac = float(val_frac)
    if tokenizer is None:
        from .tokenizer import MIN_VOCAB_SIZE

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise DataError(f"vocab_size {vocab_size!r} is too small: the minimum is {MIN_VOCAB_SIZE} "
                            "(256 byte tokens + 4 special tokens)")
    cache_dir = Path(cache_dir)

    source = resolve_spec(spec)
    fp = source.fingerprint()
    tok_json = tokenizer.fingerprint() if tokenizer is not None else None
    key = cache_key(source.cache_spec(), fp, vocab_size, val_frac, tok_json, tokenizer_train_bytes)
    final = cache_dir / key
    if final.exists() or final.is_symlink():
        try:
            bundle = load_bundle(final)
            bundle.cached = True
            # the entry may have been made under another spelling of this source (a relative path):
            # summaries and errors name the spec this run gave
            bundle.manifest["spec"] = spec
            bundle.note = source.note(bundle.manifest)
            _say_summary(bundle, say)
            return bundle
        except DataError as e:
            say(f"data: cache {final} unreadable ({e}); rebuilding")
            # Moved away in one step, so that publish below does not keep it (keep_existing) and a kill
            # mid-delete cannot leave a half-deleted directory under the key's name.
            try:
                discard(final)
            except FileNotFoundError:  # a concurrent prepare of the same key moved it first
                pass

    t0 = time.perf_counter()
    train_docs, val_docs = _split_nonempty(source, spec, val_frac)

    t_tok = 0.0
    if tokenizer is None:
        sample = _training_sample(train_docs, tokenizer_train_bytes, train_docs.stats()[1])
        say(f"data: training BPE tokenizer (vocab {vocab_size}) on {sum(map(len, sample)) / 1e6:.1f}M chars "
            f"of the {spec} train split")
        t1 = time.perf_counter()
        tokenizer = train_tokenizer(sample, vocab_size, show_progress=progress)
        t_tok = time.perf_counter() - t1
        del sample  # up to tokenizer_train_bytes of text, not needed while the splits are tokenized
    if tokenizer.eos_id is None:
        raise DataError("tokenizer has no end-of-sequence token (<|eos|>, </s>, <|endoftext|>, ...; name yours as "
                        "eos_token in a tokenizer_config.json beside tokenizer.json)")
    dtype = token_dtype(tokenizer.vocab_size)

    remove_stale(cache_dir, f"{key}-*")
    # keep_existing: a concurrent prepare of the same key that finished first wins; same content.
    with publish(final, keep_existing=True) as tmp:
        t1 = time.perf_counter()
        _write_cache(tmp, tokenizer, train_docs, val_docs, dtype, progress, {
            "format_version": FORMAT_VERSION, "spec": spec, "fingerprint": key, "source_fingerprint": fp,
            "vocab_size": tokenizer.vocab_size, "requested_vocab_size": vocab_size, "dtype": dtype.name,
            "val_frac": val_frac, "tokenizer_trained": tok_json is None,
            "tokenizer_train_bytes": tokenizer_train_bytes, "n_empty_files": getattr(source, "n_empty", 0)})
        t_enc = time.perf_counter() - t1
    bundle = load_bundle(final)
    bundle.manifest["timing"] = {"tokenizer_s": t_tok, "tokenize_s": t_enc, "total_s": time.perf_counter() - t0}
    bundle.note = source.note(bundle.manifest)
    _say_summary(bundle, say)
    return bundle


def _say_summary(bundle: DataBundle, say) -> None:
    say(bundle.summary())
    for line in bundle.warnings():
        say(line)


def given_tokenizer(cfg, path: str | os.PathLike | None = None, say=print) -> Tokenizer | None:
    """The tokenizer a run is given instead of training one: data.tokenizer (read from ``path`` instead when
    given, e.g. the run's own copy when a resumed run's data.tokenizer is gone) with data.added_tokens appended,
    which grows ``cfg.model.vocab_size`` to fit them (in place: the model is built from it). None without
    data.tokenizer."""
    if not cfg.data.tokenizer:
        return None
    tok = Tokenizer.load(Path(path or cfg.data.tokenizer).expanduser())
    if not cfg.data.added_tokens:
        return tok
    from .init_from import with_added_tokens

    return with_added_tokens(cfg, tok, say)


@dataclass
class RunData:
    """A run's corpora, tokenized with one tokenizer."""

    tokenizer: Tokenizer
    bundle: DataBundle  # data.spec: its validation split is the run's, and its train split every phase's without data
    train_sets: dict  # a phase's data (None for data.spec) -> (its DataBundle, its spec)


def prepare_for(cfg, tokenizer_path: str | os.PathLike | None = None, say=print, quiet: bool = False) -> RunData:
    """Tokenize a run's corpora as its training does, so whoever prepares first fills the cache entries the others
    read: data.spec with the given tokenizer (given_tokenizer: grows cfg.model.vocab_size for data.added_tokens)
    or one trained on it, then every phase's own data with that tokenizer. ``say`` reports the vocabulary's
    growth; ``quiet`` silences the data summaries and progress bars."""
    cache, val_frac = Path(cfg.data.cache_dir).expanduser(), cfg.data.val_frac
    given = given_tokenizer(cfg, tokenizer_path, say)
    bundle = prepare_data(cfg.data.spec, cfg.model.vocab_size, cache, val_frac, tokenizer=given,
                          progress=cfg.logging.progress and not quiet, quiet=quiet)
    tok = bundle.tokenizer
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    if given is None and tok.vocab_size < cfg.model.vocab_size:
        say(f"note: the tokenizer trained on {cfg.data.spec} has {tok.vocab_size} tokens, fewer than model.vocab_size="
            f"{cfg.model.vocab_size} (the text holds no more merges): the other "
            f"{cfg.model.vocab_size - tok.vocab_size} embedding rows never see a token; model.vocab_size="
            f"{tok.vocab_size} drops them")
    train_sets = {None: (bundle, cfg.data.spec)}
    for spec in (p.data for p in cfg.train.phases):
        if spec is not None and spec not in train_sets:
            train_sets[spec] = (prepare_data(spec, cfg.model.vocab_size, cache, val_frac, tokenizer=tok,
                                             progress=False, quiet=quiet), spec)
    return RunData(tok, bundle, train_sets)


def check_sizes(bundle: DataBundle, seq_len: int, batch_size: int,
                splits: tuple[str, ...] = ("train", "validation")) -> None:
    """DataError if a split in ``splits`` cannot supply one ``seq_len + 1`` window. Training reads
    only the train split (at a phase's seq_len) and evaluation only the validation split (at
    train.eval_seq_len), so each split's message names the settings that size it."""
    if seq_len < 1 or batch_size < 1:
        raise DataError(f"seq_len and batch_size must be >= 1, got seq_len={seq_len}, batch_size={batch_size}")
    unknown = set(splits) - {"train", "validation"}
    if unknown:
        raise ValueError(f"check_sizes: unknown splits {sorted(unknown)}; splits are train and validation")
    need, spec = seq_len + 1, bundle.manifest.get("spec", "?")
    if "train" in splits and len(bundle.train) < need:
        raise DataError(f"train split of {spec} has {len(bundle.train)} tokens but seq_len {seq_len} needs at least "
                        f"{need}: use a smaller train.seq_len (or phase seq_len) or more data")
    if "validation" in splits and len(bundle.val) < need:
        frac = bundle.manifest.get("val_frac")
        raise DataError(f"validation split of {spec} has {len(bundle.val)} tokens but evaluating at seq_len {seq_len} "
                        f"needs at least {need}: lower train.eval_seq_len (default: the last phase's seq_len), raise "
                        f"data.val_frac{f' (now {frac})' if frac is not None else ''} or use more data")


# ================================================================================================================
# Batching
# ================================================================================================================


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def get_batch(tokens: np.ndarray, batch_size: int, seq_len: int, generator: torch.Generator | None = None,
              device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: ``x`` and ``y`` are int64 ``[batch_size, seq_len]``, ``y`` is ``x``'s window shifted left by
    one token (``y[:, :-1] == x[:, 1:]``). Offsets come from ``torch.randint(..., generator=generator)``
    (a CPU generator), so a seeded generator reproduces the batches and saving its state resumes them."""
    n = len(tokens)
    if n < seq_len + 1:
        raise DataError(f"split has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}: use a smaller seq_len")
    offsets = torch.randint(0, n - seq_len, (batch_size,), generator=generator).numpy()
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    w = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    w = _to_device(w, device)
    return w[:, :-1], w[:, 1:]


def iter_eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None,
                      device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic contiguous windows from the start of ``tokens``: window ``i`` predicts tokens
    ``i*seq_len+1 .. (i+1)*seq_len``; windows do not overlap in predicted tokens and together cover
    ``min(len(tokens) - 1, max_tokens)`` rounded down to whole windows. The last batch may be smaller."""
    n_pred = len(tokens) - 1
    if max_tokens is not None:
        n_pred = min(n_pred, int(max_tokens))
    n_win = max(n_pred, 0) // seq_len
    for start in range(0, n_win, batch_size):
        b = min(batch_size, n_win - start)
        lo = start * seq_len
        flat = np.asarray(tokens[lo: lo + b * seq_len + 1], dtype=np.int64)
        idx = np.arange(b)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        w = _to_device(torch.from_numpy(flat[idx]), device)
        yield w[:, :-1], w[:, 1:]


def bits_per_byte(mean_loss_nats: float, bytes_per_token: float) -> float:
    """Convert mean per-token cross-entropy (nats) into bits per UTF-8 byte."""
    return mean_loss_nats / (math.log(2) * bytes_per_token)
