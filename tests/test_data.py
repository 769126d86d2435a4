import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from slmlab import data as D
from slmlab.data import (
    DataBundle,
    bits_per_byte,
    check_sizes,
    get_batch,
    iter_documents,
    iter_eval_batches,
    list_stdlib_files,
    parse_hf_spec,
    prepare_data,
    split_documents,
    stdlib_split,
)
from slmlab.errors import DataError
from slmlab.tokenizer import MIN_VOCAB_SIZE, Tokenizer, split_exact, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"

UNICODE_SAMPLES = [
    "Hello, world!",
    "héllo wörld — ñandú, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
    "emoji 🌍🚀👨‍👩‍👧‍👦 🏳️‍🌈 and flags 🇫🇷",
    "def f(x):\n\tif x:\n\t\treturn x  # tab\n    else:\n        return None\n\n\n",
    "  leading spaces and trailing   \n",
    "\r\n windows line\r\nendings\x00\x07\x7f",
    "<|eos|> literal special strings <|bos|><|mask|>",
    "",
    "a",
    "\U0010ffff\ufeff\u200b",
]


def _corpus_text() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:200_000]
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "of", "and", "to", "my", "lord", "thou", "art", "def", "return", "x", "=", "1"]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(6000)]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpus() -> str:
    return _corpus_text()


@pytest.fixture(scope="module")
def tok(corpus) -> Tokenizer:
    return train_tokenizer([corpus], 1024)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory, corpus):
    """A directory of several text-ish files."""
    d = tmp_path_factory.mktemp("corpus_dir")
    step = len(corpus) // 8
    for i in range(8):
        ext = ".txt" if i % 2 == 0 else ".md"
        (d / f"part{i}{ext}").write_text(corpus[i * step:(i + 1) * step], encoding="utf-8")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_round_trip_unicode(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_round_trip_random_bytes(tok):
    rng = np.random.default_rng(1)
    for _ in range(20):
        cps = rng.integers(0, 0x2FFFF, size=200)
        s = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
        assert tok.decode(tok.encode(s)) == s


def test_special_ids_and_vocab(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 1024
    assert tok.decode([tok.eos_id]) == "<|eos|>"
    # special strings in the text are plain text, never special ids
    assert not set(tok.encode("<|eos|><|mask|>")) & {0, 1, 2, 3}
    assert tok.encode_batch(["ab", "cd"]) == [tok.encode("ab"), tok.encode("cd")]


def test_vocab_too_small():
    with pytest.raises(DataError, match=str(MIN_VOCAB_SIZE)):
        train_tokenizer(["hello world"], 200)
    # the minimum itself works: bytes + specials, no merges
    t = train_tokenizer(["hello world"], MIN_VOCAB_SIZE)
    assert t.vocab_size == MIN_VOCAB_SIZE
    assert t.decode(t.encode("héllo 🌍")) == "héllo 🌍"


def test_tokenizer_deterministic(corpus):
    a = train_tokenizer([corpus[:50_000]], 600)
    b = train_tokenizer([corpus[:50_000]], 600)
    assert a.to_json() == b.to_json()


def test_split_exact_preserves_tokenization(tok, corpus):
    text = corpus[:60_000] + "\n  indented\n\tx\n\ny\n" + corpus[60_000:90_000]
    pieces = list(split_exact(text, 1000))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)


def test_save_load(tmp_path, tok):
    p = tok.save(tmp_path / "tokenizer.json")
    json.loads(p.read_text())  # one plain JSON file
    t2 = Tokenizer.load(p)
    assert t2.to_json() == tok.to_json()
    assert Tokenizer.load(tmp_path).vocab_size == tok.vocab_size  # directory works too
    s = UNICODE_SAMPLES[2]
    assert t2.encode(s) == tok.encode(s)
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="bad.json"):
        Tokenizer.load(bad)


def test_transformers_compat(tmp_path, tok):
    tr = pytest.importorskip("transformers")
    p = tok.save(tmp_path / "tokenizer.json")
    fast = tr.PreTrainedTokenizerFast(tokenizer_file=str(p))
    assert fast.encode("hello world", add_special_tokens=False) == tok.encode("hello world")


# ---------------------------------------------------------------------------------------------------------------
# Specs and preparation
# ---------------------------------------------------------------------------------------------------------------


def test_stdlib_listing_and_split():
    files = list_stdlib_files()
    assert len(files) > 100 and files == sorted(files)
    for f in files:
        parts = f.split("/")
        assert f.endswith(".py")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts[:-1]), f
    train, val = stdlib_split()
    assert (train, val) == stdlib_split()
    assert val and train and not set(train) & set(val) and set(train) | set(val) == set(files)
    root = D.stdlib_root()
    assert sum((root / p).stat().st_size for p in val) >= 200_000


def _prep(spec, cache, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("quiet", True)
    return prepare_data(str(spec), kw.pop("vocab_size", 512), cache, **kw)


def test_prepare_txt_and_cache(tmp_path, corpus, monkeypatch):
    f = tmp_path / "shakes.txt"
    f.write_text(corpus, encoding="utf-8")
    cache = tmp_path / "cache"
    b = _prep(f, cache, val_frac=0.1)
    assert isinstance(b, DataBundle) and not b.cached
    assert isinstance(b.train, np.memmap) and isinstance(b.val, np.memmap)
    assert b.train.dtype == np.uint16 and b.manifest["dtype"] == "uint16"
    assert b.tokenizer.vocab_size == 512
    assert b.train.max() < 512
    m = b.manifest
    for k in ("spec", "vocab_size", "dtype", "n_train_tokens", "n_val_tokens", "val_bytes", "gzip_bpb", "xz_bpb",
              "fingerprint"):
        assert k in m
    assert m["n_train_tokens"] == len(b.train) and m["n_val_tokens"] == len(b.val)
    # one document each side, EOS-terminated, val is the tail of the file cut at a newline
    assert b.train[-1] == b.tokenizer.eos_id and b.val[-1] == b.tokenizer.eos_id
    val_text = b.tokenizer.decode(b.val[:-1])
    assert corpus.endswith(val_text) and corpus[: len(corpus) - len(val_text)].endswith("\n")
    assert b.val_bytes == len(val_text.encode())
    assert abs(b.val_bytes / len(corpus.encode()) - 0.1) < 0.02
    assert b.bytes_per_token == pytest.approx(b.val_bytes / len(b.val))
    assert 0 < b.gzip_bpb < 8 and 0 < b.xz_bpb < 8
    assert b.path.parent == cache and not list(cache.glob(".tmp-*"))

    # second call: served from the cache, tokenizer never retrained, nothing retokenized
    def boom(*a, **k):
        raise AssertionError("should be cached")

    monkeypatch.setattr(D, "train_tokenizer", boom)
    monkeypatch.setattr(D, "_tokenize_to_file", boom)
    b2 = _prep(f, cache, val_frac=0.1)
    assert b2.cached and b2.path == b.path
    assert np.array_equal(b2.train, b.train) and np.array_equal(b2.val, b.val)
    monkeypatch.chdir(tmp_path)  # another spelling of the same file: its entry, named as this run gave it
    rel = prepare_data("shakes.txt", 512, cache, val_frac=0.1, progress=False, quiet=True)
    assert rel.cached and rel.path == b.path and rel.manifest["spec"] == "shakes.txt"
    monkeypatch.undo()

    # a changed source invalidates the cache
    f.write_text(corpus + "more text\n", encoding="utf-8")
    b3 = _prep(f, cache, val_frac=0.1)
    assert b3.path != b.path and not b3.cached


def test_spellings_of_one_local_path_share_one_cache_entry(tmp_path, corpus, small_dir, monkeypatch):
    """Before: the key held the spec as written, so ./x.txt, x.txt and /abs/x.txt each tokenized and cached."""
    f = tmp_path / "shakes.txt"
    f.write_text(corpus, encoding="utf-8")
    cache = tmp_path / "cache"
    monkeypatch.chdir(tmp_path)
    first = _prep("shakes.txt", cache, val_frac=0.1)
    d = _prep(small_dir, cache, val_frac=0.1)

    def boom(*a, **k):
        raise AssertionError("should be cached")

    monkeypatch.setattr(D, "_tokenize_to_file", boom)
    for spelling in ("./shakes.txt", str(f), "../" + tmp_path.name + "/shakes.txt"):
        assert _prep(spelling, cache, val_frac=0.1).path == first.path
    monkeypatch.chdir(small_dir.parent)
    assert _prep("./" + small_dir.name + "/", cache, val_frac=0.1).path == d.path
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.path.name, d.path.name])


def test_token_files_deterministic(tmp_path, small_dir, capsys):
    a = prepare_data(str(small_dir), 700, tmp_path / "c1", val_frac=0.2, progress=False)
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("data: ")
    b = prepare_data(str(small_dir), 700, tmp_path / "c2", val_frac=0.2, progress=False, quiet=True)
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    assert a.path.name == b.path.name  # cache key does not depend on cache location


def test_dir_spec_splits_by_file(tmp_path, small_dir):
    b = _prep(small_dir, tmp_path / "c", val_frac=0.2)
    assert b.manifest["n_train_docs"] + b.manifest["n_val_docs"] == 8
    assert 1 <= b.manifest["n_val_docs"] <= 3
    # documents are EOS separated
    assert int((np.asarray(b.train) == b.tokenizer.eos_id).sum()) == b.manifest["n_train_docs"]


def test_md_and_single_file_dir(tmp_path, corpus):
    d = tmp_path / "one"
    d.mkdir()
    (d / "notes.md").write_text(corpus[:80_000], encoding="utf-8")
    b = _prep(d, tmp_path / "c", val_frac=0.1)
    assert b.manifest["n_train_docs"] == 1 and b.manifest["n_val_docs"] == 1
    b2 = _prep(d / "notes.md", tmp_path / "c", val_frac=0.1)
    assert np.array_equal(b.val, b2.val)


def test_jsonl_spec(tmp_path, corpus):
    f = tmp_path / "docs.jsonl"
    paras = [p for p in corpus[:100_000].split("\n\n") if p.strip()]
    with open(f, "w", encoding="utf-8") as fh:
        for p in paras:
            fh.write(json.dumps({"text": p, "id": 1}) + "\n")
        fh.write("\n")  # blank lines are ignored
    b = _prep(f, tmp_path / "c", val_frac=0.05)
    n_val = max(1, round(len(paras) * 0.05))
    assert b.manifest["n_val_docs"] == n_val and b.manifest["n_train_docs"] == len(paras) - n_val
    assert b.val_bytes == sum(len(p.encode()) for p in paras[-n_val:])
    # decoding the val split gives the last documents back, EOS separated
    assert b.tokenizer.decode(b.val) == "".join(p + "<|eos|>" for p in paras[-n_val:])


def test_jsonl_bad_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        _prep(f, tmp_path / "c")
    f.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        _prep(f, tmp_path / "c")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    f = tmp_path / "x.parquet"
    f.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match="pyarrow"):
        _prep(f, tmp_path / "c")


def test_missing_and_unsupported_and_empty(tmp_path):
    with pytest.raises(DataError, match="data path not found"):
        _prep(tmp_path / "nope.txt", tmp_path / "c")
    f = tmp_path / "x.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        _prep(f, tmp_path / "c")
    e = tmp_path / "empty.txt"
    e.write_text("")
    with pytest.raises(DataError, match="empty corpus"):
        _prep(e, tmp_path / "c")
    d = tmp_path / "emptydir"
    d.mkdir()
    with pytest.raises(DataError, match="empty corpus"):
        _prep(d, tmp_path / "c")
    with pytest.raises(DataError, match="val_frac"):
        _prep(tmp_path / "x.csv", tmp_path / "c", val_frac=0)
    with pytest.raises(DataError, match="260"):
        _prep(tmp_path / "x.csv", tmp_path / "c", vocab_size=100)


def test_check_sizes(tmp_path, corpus):
    f = tmp_path / "small.txt"
    f.write_text(corpus[:20_000], encoding="utf-8")
    b = _prep(f, tmp_path / "c", val_frac=0.05)
    check_sizes(b, 64, 8)
    with pytest.raises(DataError) as e:
        check_sizes(b, len(b.val), 8)
    # the validation split is read only by evaluation: the fixes are its length and the split's size
    assert re.search(r"validation split .* has \d+ tokens but evaluating at seq_len \d+ needs at least \d+: lower "
                     r"train.eval_seq_len .*, raise data.val_frac \(now 0.05\) or use more data$", str(e.value)), e.value
    with pytest.raises(DataError, match="train split .* use a smaller train.seq_len"):
        check_sizes(b, len(b.train) + 5, 8)
    check_sizes(b, len(b.val), 8, splits=("train",))  # each split is checked at its own length
    with pytest.raises(DataError, match="validation split"):
        check_sizes(b, len(b.val), 8, splits=("validation",))


def test_atomic_write_leaves_no_partial_cache(tmp_path, corpus, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text(corpus[:30_000], encoding="utf-8")
    cache = tmp_path / "c"
    real = D._tokenize_to_file
    calls = []

    def fail_on_val(tok, docs, path, *a, **k):
        calls.append(path.name)
        if path.name == "val.bin":
            raise KeyboardInterrupt
        return real(tok, docs, path, *a, **k)

    monkeypatch.setattr(D, "_tokenize_to_file", fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        _prep(f, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    b = _prep(f, cache)
    assert not b.cached and len(b.val) > 0


def test_given_tokenizer(tmp_path, tok, corpus):
    f = tmp_path / "t.txt"
    f.write_text(corpus[:40_000], encoding="utf-8")
    b = _prep(f, tmp_path / "c", tokenizer=tok)
    assert b.tokenizer.to_json() == tok.to_json() and b.manifest["tokenizer_trained"] is False
    val_text = corpus[:40_000][len(corpus[:40_000]) - b.val_bytes:]
    assert val_text.encode() and len(val_text.encode()) == b.val_bytes  # ascii corpus: bytes == chars
    assert np.asarray(b.val).tolist() == tok.encode(val_text) + [tok.eos_id]


def test_tokenizer_train_cap(tmp_path, small_dir):
    a = _prep(small_dir, tmp_path / "c1", vocab_size=400, tokenizer_train_bytes=20_000)
    b = _prep(small_dir, tmp_path / "c2", vocab_size=400, tokenizer_train_bytes=20_000)
    full = _prep(small_dir, tmp_path / "c1", vocab_size=400)
    assert a.tokenizer.to_json() == b.tokenizer.to_json() != full.tokenizer.to_json()
    assert a.path != full.path


# ---------------------------------------------------------------------------------------------------------------
# hf: specs
# ---------------------------------------------------------------------------------------------------------------


def test_parse_hf_spec():
    assert parse_hf_spec("hf:roneneldan/TinyStories") == D.HFSpec("roneneldan/TinyStories", None, "train")
    assert parse_hf_spec("hf:wikitext:wikitext-2-raw-v1@validation") == D.HFSpec(
        "wikitext", "wikitext-2-raw-v1", "validation")
    assert parse_hf_spec("hf:a/b@train[:10%]").split == "train[:10%]"
    for bad in ["hf:", "hf:@train", "hf:name@", "hf:name:", "hf:name:@x", "hf:a@b@c", "hf:a b", "hf:/x", "hf:a//b",
                "hf:a/b/c"]:
        with pytest.raises(DataError, match="malformed|hf:NAME"):
            parse_hf_spec(bad)


def test_hf_fake_datasets(tmp_path, monkeypatch):
    seen = {}

    class FakeDS:
        column_names = ["text", "meta"]
        _fingerprint = "abc123"

        def __init__(self, texts):
            self._texts = texts

        def __getitem__(self, key):
            assert key == "text"
            return list(self._texts)

    texts = [f"story {i}: once upon a time there was a tiny model number {i}.\n" * 3 for i in range(200)]
    texts[5] = ""  # empty documents are dropped

    def load_dataset(name, config=None, split=None):
        seen.update(name=name, config=config, split=split)
        if name == "missing/ds":
            raise FileNotFoundError("Dataset 'missing/ds' doesn't exist on the Hub")
        if name == "notext/ds":
            ds = FakeDS([])
            ds.column_names = ["content"]
            return ds
        return FakeDS(texts)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    b = _prep("hf:fake/stories:cfg@train", tmp_path / "c", val_frac=0.1, vocab_size=300)
    assert seen == {"name": "fake/stories", "config": "cfg", "split": "train"}
    assert b.manifest["n_train_docs"] == 179 and b.manifest["n_val_docs"] == 20
    assert b.tokenizer.decode(b.val).startswith(texts[180])
    assert _prep("hf:fake/stories:cfg@train", tmp_path / "c", val_frac=0.1, vocab_size=300).cached
    with pytest.raises(DataError, match="could not load"):
        _prep("hf:missing/ds", tmp_path / "c")
    with pytest.raises(DataError, match="no 'text' column"):
        _prep("hf:notext/ds", tmp_path / "c")


def test_hf_without_datasets(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="needs the `datasets` package"):
        _prep("hf:roneneldan/TinyStories", tmp_path / "c")


# ---------------------------------------------------------------------------------------------------------------
# Batching and metrics
# ---------------------------------------------------------------------------------------------------------------


def test_get_batch():
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    x, y = get_batch(tokens, 4, 16, g, "cpu")
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    # reproducible from a seed, resumable from a saved generator state
    x2, _ = get_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    state = g.get_state()
    xa, _ = get_batch(tokens, 4, 16, g)
    g2 = torch.Generator()
    g2.set_state(state)
    xb, _ = get_batch(tokens, 4, 16, g2)
    assert torch.equal(xa, xb) and not torch.equal(xa, x)
    # windows can reach the end of the split but never past it
    x, y = get_batch(np.arange(17, dtype=np.uint16), 8, 16, g)
    assert torch.equal(x[0], torch.arange(16)) and int(y.max()) == 16
    with pytest.raises(DataError):
        get_batch(np.arange(16, dtype=np.uint16), 1, 16, g)


def test_iter_eval_batches():
    tokens = np.arange(103, dtype=np.uint32)
    batches = list(iter_eval_batches(tokens, 3, 10))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 10), (3, 10), (3, 10), (1, 10)]
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(ys, torch.arange(1, 101))  # every predicted token once, in order
    for x, y in batches:
        assert torch.equal(y, x + 1) and x.dtype == torch.int64
    again = list(iter_eval_batches(tokens, 3, 10))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    limited = list(iter_eval_batches(tokens, 3, 10, max_tokens=45))
    assert sum(x.shape[0] for x, _ in limited) == 4
    assert list(iter_eval_batches(np.arange(5, dtype=np.uint16), 2, 10)) == []


def test_bits_per_byte():
    assert bits_per_byte(math.log(2), 1.0) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 4.0) == pytest.approx(2.0 / (math.log(2) * 4.0))


def test_compression_bpb_sane():
    text = ("the quick brown fox jumps over the lazy dog. " * 50 + "".join(chr(33 + i % 90) for i in range(3000)))
    gz, xz = D.compression_bpb(text.encode())
    assert 0 < gz < 8 and 0 < xz < 8
    rnd = np.random.default_rng(0).bytes(20_000)
    gz, xz = D.compression_bpb(rnd)
    assert 7.9 < gz < 8.2 and 7.9 < xz < 8.2


@pytest.mark.parametrize("name,size", [("train.bin", "odd"), ("val.bin", 0)])
def test_a_damaged_token_cache_is_rebuilt_with_one_line(tmp_path, corpus, capsys, name, size):
    """A cache file truncated to an odd size or to zero bytes is rebuilt (one warning line), never a traceback."""
    f = tmp_path / "shakes.txt"
    f.write_text(corpus, encoding="utf-8")
    cache = tmp_path / "cache"
    b = _prep(f, cache, val_frac=0.1)
    want_train, want_val = np.asarray(b.train).copy(), np.asarray(b.val).copy()
    target = b.path / name
    with open(target, "r+b") as fh:
        fh.truncate(target.stat().st_size // 2 * 2 - 1 if size == "odd" else 0)
    capsys.readouterr()
    again = _prep(f, cache, val_frac=0.1, quiet=False)
    out = capsys.readouterr().out
    assert not again.cached and "unreadable" in out and "rebuilding" in out
    assert np.array_equal(np.asarray(again.train), want_train) and np.array_equal(np.asarray(again.val), want_val)


def test_a_cached_tokenizer_that_changed_is_detected_and_rebuilt(tmp_path, corpus, capsys):
    f = tmp_path / "shakes.txt"
    f.write_text(corpus, encoding="utf-8")
    cache = tmp_path / "cache"
    b = _prep(f, cache, val_frac=0.1)
    tok_path = b.path / "tokenizer.json"
    tok_path.write_text(tok_path.read_text().replace('"<|mask|>"', '"<|MASK|>"'))  # still valid JSON, not the same
    capsys.readouterr()
    again = _prep(f, cache, val_frac=0.1, quiet=False)
    assert not again.cached and "does not match its manifest" in capsys.readouterr().out
    assert again.tokenizer.to_json() == b.tokenizer.to_json()


# ---------------------------------------------------------------------------------------------------------------
# Audit fixes: bytes per token, cache repair, bad text, added tokens, directory corpora, CRLF
# ---------------------------------------------------------------------------------------------------------------


def test_added_tokens_count_their_utf8_bytes(tok, corpus):
    """bpb counts bytes: an added token that is not ASCII stands for more bytes than characters."""
    from slmlab.evaluate import token_byte_lengths

    t = tok.with_added(["<think>", "日本語", "Ωμέγα"])  # (ï of naïve is a byte-level symbol: refused, below)
    lengths = token_byte_lengths(t)
    for s in ("<think>", "日本語", "Ωμέγα"):
        assert lengths[t.hf.token_to_id(s)] == len(s.encode())
    text = corpus[:3000] + " 日本語 Ωμέγα naïve <think> é\n"
    assert lengths[torch.tensor(t.encode(text))].sum().item() == len(text.encode())
    assert lengths[[t.bos_id, t.eos_id, t.pad_id, t.mask_id]].sum().item() == 0


def _sentencepiece_tokenizer(tmp_path, corpus) -> Tokenizer:
    from tokenizers import SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([corpus[:100_000] + " héllo wörld 日本語\n"], vocab_size=400,
                           special_tokens=["<s>", "</s>", "<unk>"], show_progress=False)
    sp.save(str(tmp_path / "sp.json"))
    return Tokenizer.load(tmp_path / "sp.json")


def _llama_style_tokenizer() -> Tokenizer:
    """Llama-2's layout: Prepend/Replace normalizer, byte-fallback pieces <0x00>..<0xFF>, a decoder chain."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "a": 260,
             "▁a": 261, "é": 262}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[("▁", "a")], byte_fallback=True, unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    return Tokenizer(hf)


def test_a_tokenizer_without_a_pre_tokenizer_encodes_long_documents_whole(tmp_path):
    """Gemma's layout (normalizer ' ' -> '▁', no pre-tokenizer): BPE merges across newlines (d.\nThe▁), so a
    document cut after a newline into 64K-character pieces lost those merges; a Llama-3-style Split regex, which
    ends a pre-token at such a newline, still cuts."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    from slmlab.data import _tokenize_to_file

    hf = HFTokenizer(models.BPE(byte_fallback=True, unk_token=None))
    hf.normalizer = normalizers.Replace(" ", "▁")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    hf.train_from_iterator(["end.\nThe next line\nThe cat.\nThe dog" * 200], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "</s>", "<s>"], initial_alphabet=list("abcdefghijklmnopqrstuvwxyzTh.\n▁"),
        show_progress=False))
    gemma = Tokenizer(hf)
    assert not gemma.cuts_exactly
    doc = ("word " * 20 + "end.\nThe cat.\n") * 1000  # 115K characters
    _tokenize_to_file(gemma, [doc], tmp_path / "ids.bin", np.dtype(np.uint16), "x", False)
    assert np.fromfile(tmp_path / "ids.bin", np.uint16).tolist() == gemma.encode(doc) + [gemma.eos_id]
    llama3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    hf.normalizer = None
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(llama3), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert Tokenizer(hf).cuts_exactly
    hf.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")  # splits at spaces only
    assert not Tokenizer(hf).cuts_exactly


def test_byte_lengths_of_sentencepiece_tokenizers(tmp_path, corpus):
    """Metaspace pieces count ▁ as one space byte, byte-fallback pieces one byte; off only by the ▁ that the
    tokenizer prepends to each text."""
    from slmlab.evaluate import token_byte_lengths

    llama = _llama_style_tokenizer()
    lengths = token_byte_lengths(llama)
    assert lengths[llama.hf.token_to_id("<0x0A>")] == 1 and lengths[llama.hf.token_to_id("▁a")] == 2
    assert lengths[llama.hf.token_to_id("é")] == 2 and lengths[llama.bos_id] == 0
    text = "a a\né\n日"
    ids = llama.encode(text)
    assert llama.decode(ids) == text and lengths[torch.tensor(ids)].sum().item() == len(text.encode()) + 1

    sp = _sentencepiece_tokenizer(tmp_path, corpus)
    lengths = token_byte_lengths(sp)
    text = "héllo wörld 日本語 the king\n"
    assert lengths[torch.tensor(sp.encode(text))].sum().item() == len(text.encode()) + 1


def test_a_tokenizer_that_prepends_encodes_long_documents_whole(tmp_path, corpus):
    """SentencePiece-style tokenizers put a ▁ before every text they encode: a document cut into
    64K-character pieces got one more ▁ token at each cut (19 in tinyshakespeare's train split)."""
    sp, llama = _sentencepiece_tokenizer(tmp_path, corpus), _llama_style_tokenizer()
    assert not sp.cuts_exactly and not llama.cuts_exactly and train_tokenizer([corpus[:5000]], 300).cuts_exactly
    f = tmp_path / "long.txt"
    f.write_text(corpus[:200_000], encoding="utf-8")  # one document of several 64K pieces
    b = _prep(f, tmp_path / "cache", tokenizer=sp, val_frac=0.05)
    train_doc = split_documents(list(iter_documents(f)), 0.05)[0][0]
    assert np.asarray(b.train).tolist() == sp.encode(train_doc) + [sp.eos_id]


def test_prepare_warns_when_bpb_is_approximate(tmp_path, corpus, capsys):
    f = tmp_path / "c.txt"
    f.write_text(corpus[:100_000] + "日本語\n", encoding="utf-8")
    b = _prep(f, tmp_path / "cache", tokenizer=_sentencepiece_tokenizer(tmp_path, corpus), quiet=False, val_frac=0.1)
    out = capsys.readouterr().out
    assert 0 < b.manifest["val_token_bytes"] - b.val_bytes <= 2  # one prepended ▁ per encoded piece
    assert re.search(r"warning: .* val_bpb is approximate, about [0-9.e-]+% too low", out)
    own = _prep(f, tmp_path / "cache", vocab_size=300, quiet=False)  # byte-level: exact, no warning
    assert own.manifest["val_token_bytes"] == own.val_bytes and "approximate" not in capsys.readouterr().out


def test_a_cache_directory_without_manifest_is_replaced(tmp_path, corpus, capsys):
    f = tmp_path / "shakes.txt"
    f.write_text(corpus, encoding="utf-8")
    cache = tmp_path / "cache"
    b = _prep(f, cache, val_frac=0.1)
    (b.path / "manifest.json").unlink()
    again = _prep(f, cache, val_frac=0.1, quiet=False)
    assert not again.cached and "unreadable" in capsys.readouterr().out
    assert np.array_equal(np.asarray(again.val), np.asarray(b.val)) and _prep(f, cache, val_frac=0.1).cached
    assert not list(cache.glob(".tmp-*"))


@pytest.mark.parametrize("damage", [("val_bytes", None), ("gzip_bpb", None), ("spec", None), ("xz_bpb", None),
                                    ("val_bytes", "x"), ("gzip_bpb", [1]), ("spec", 3), ("dtype", "float16")])
def test_a_damaged_manifest_is_rebuilt_with_one_line(tmp_path, corpus, capsys, damage):
    key, value = damage
    f = tmp_path / "shakes.txt"
    f.write_text(corpus, encoding="utf-8")
    cache = tmp_path / "cache"
    b = _prep(f, cache, val_frac=0.1)
    m = json.loads((b.path / "manifest.json").read_text())
    if value is None:
        del m[key]
    else:
        m[key] = value
    (b.path / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    again = _prep(f, cache, val_frac=0.1, quiet=False)
    assert not again.cached and "unreadable" in capsys.readouterr().out
    assert again.manifest[key] == b.manifest[key]


def test_lone_surrogates_are_a_data_error_naming_the_line(tmp_path, monkeypatch):
    f = tmp_path / "s.jsonl"
    lines = [json.dumps({"text": f"document number {i}"}) for i in range(20)]
    lines[3] = '{"text": "abc \\ud83d"}'
    lines[5] = '{"text": "a pair is fine \\ud83d\\ude00"}'
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl:4: 'text' holds a lone UTF-16 surrogate \(\\ud83d"):
        _prep(f, tmp_path / "c")
    lines[3] = json.dumps({"text": "fixed"})
    lines[19] = '{"text": "\\udc00 in the validation split"}'
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"s\.jsonl:20: "):
        _prep(f, tmp_path / "c")

    class FakeDS:
        column_names = ["text"]
        _fingerprint = "fp"

        def __getitem__(self, key):
            return ["fine text\n" * 20] * 10 + ["bad \ud83d text"]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: FakeDS()))
    with pytest.raises(DataError, match=r"hf:x/y: row 10: 'text' holds a lone UTF-16 surrogate"):
        _prep("hf:x/y", tmp_path / "c")


def test_one_jsonl_reader_for_text_examples_prompts_and_tasks(tmp_path):
    """data.jsonl_records reads every .jsonl (training text, SFT, --prompts, eval tasks): a leading BOM
    dropped, the line of a byte that is not UTF-8 named, and lone surrogates looked for only where they
    would be read (training text reads 'text', not its metadata; task rows are read whole)."""
    from slmlab.data import _iter_jsonl, jsonl_records
    from slmlab.tasks import _rows

    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "one"}).encode() + b"\n\n"
                  + b'{"text": "two", "source": "\\ud83d"}\n')
    assert list(_iter_jsonl(f)) == ["one", "two"]  # the metadata's lone surrogate is never tokenized
    assert next(jsonl_records(f)) == (f"{f}:1", {"text": "one"})
    with pytest.raises(DataError, match=r"d\.jsonl:3: 'source' holds a lone UTF-16 surrogate"):
        _rows(str(f))  # a task row is read whole (its choices, its label)
    f.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 \(byte 0xe9: invalid continuation byte\)"):
        list(_iter_jsonl(f))
    f.write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not JSON \("):
        list(jsonl_records(f))


def test_with_added_refuses_byte_level_symbol_spellings(tok):
    from slmlab.errors import ConfigError

    for s in ("é", "Ã", "Ġthe"):
        assert tok.hf.token_to_id(s) is not None  # spelled like a byte-level vocabulary symbol
        with pytest.raises(ConfigError, match=f"added token '{s}' cannot be added: it is the spelling of"):
            tok.with_added(["<think>", s])
    t = tok.with_added(["<think>", "the"])  # an entry that is its own text keeps its id, as documented
    assert t.hf.token_to_id("the") == tok.hf.token_to_id("the") and t.vocab_size == tok.vocab_size + 1


def test_with_added_refuses_tokens_that_would_not_decode_to_themselves(tok):
    """The ByteLevel decoder reads an added token's characters as byte symbols: café decoded as 'caf\ufffd'."""
    from slmlab.errors import ConfigError

    for s in ("café", "<ü>", "<Ā>"):
        with pytest.raises(ConfigError, match=f"^added token '{s}' would decode as '.*': this tokenizer's decoder"):
            tok.with_added(["<think>", s])
    t = tok.with_added(["<think>", "<中文>", "<ő>"])  # characters outside the byte-level alphabet are themselves
    for s in ("<think>", "<中文>", "<ő>"):
        assert t.encode(s) == [t.hf.token_to_id(s)] and t.decode(t.encode(s)) == s


def test_an_added_token_holding_a_newline_is_never_cut_inside(tok, tmp_path):
    """Long documents are encoded in pieces cut after a newline between two non-spaces: one cut inside an
    added token x\ny lost the token; such a tokenizer encodes documents whole."""
    from slmlab.data import _tokenize_to_file

    t = tok.with_added(["x\ny"])
    assert not t.cuts_exactly and tok.cuts_exactly and tok.with_added(["x\n", "\n\n"]).cuts_exactly
    doc = "word x\ny " * 8000  # 80K characters: more than one 64K piece
    n = _tokenize_to_file(t, [doc], tmp_path / "ids.bin", np.dtype(np.uint16), "x", False)
    assert np.fromfile(tmp_path / "ids.bin", np.uint16).tolist() == t.encode(doc) + [t.eos_id] and n > 8000


def test_with_added_refuses_a_special_token_which_text_never_encodes_to(tok):
    from slmlab.errors import ConfigError

    assert tok.encode("a<|eos|>b") != [tok.encode("a")[0], tok.eos_id, tok.encode("b")[0]]  # text stays text
    with pytest.raises(ConfigError, match=rf"^added token '<\|eos\|>' is already special token {tok.eos_id} of this"):
        tok.with_added(["<think>", "<|eos|>"])  # accepted before, and changed nothing


@pytest.mark.parametrize("blank", ["", "\n", " \n\t "])
def test_files_without_text_are_left_out_of_a_directory_split(tmp_path, corpus, blank):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text(corpus[:20_000])
    (d / "0.txt").write_text(blank)  # ranks first by SHA-256, so it was the guaranteed validation file
    (d / "zz.txt").write_text(corpus[20_000:23_000])
    for frac in (0.02, 0.5):
        b = _prep(d, tmp_path / "c", val_frac=frac)
        assert b.manifest["n_val_docs"] == 1 and b.val_bytes >= 1000 and b.manifest["n_empty_files"] == 1
    (d / "zz.txt").unlink()  # one file with text left: cut like a single file
    b = _prep(d, tmp_path / "c", val_frac=0.1)
    assert b.manifest["train_bytes"] + b.val_bytes == 20_000


def test_split_exact_cuts_crlf_text_and_long_lines_exactly(tok, corpus):
    lf = corpus[:60_000] + "\n  indented\n\tx\n\ny\n" + corpus[60_000:90_000]
    code = "def f():\n" + "    x = 1\n" * 500  # indented lines: no cut point, but newlines, so no space cuts
    for text in (lf, code):  # own_regex=False: the newline-only cuts of before, the pieces LF text keeps
        assert list(split_exact(text, 1000)) == list(split_exact(text, 1000, own_regex=False))
    crlf = lf.replace("\n", "\r\n") + "a.\r\n\r\nb\r\n"
    line = " ".join(corpus[:50_000].split()) + " \x1c.\x1cx  y 12 'll 's\u3000z"  # one huge line
    for text in (crlf, line):
        pieces = list(split_exact(text, 1000))
        assert len(pieces) > 10 and "".join(pieces) == text and max(map(len, pieces)) < 3000
        assert [i for ids in tok.encode_batch(pieces) for i in ids] == tok.encode(text)
    # foreign pre-tokenizers (Llama-3's regex joins "\r\n") keep the old, newline-only cuts
    foreign = list(split_exact(crlf, 1000, own_regex=False))
    assert "".join(foreign) == crlf and all(p[-1] == "\n" and not p[-2].isspace() for p in foreign[:-1])
    assert tok.own_regex and not tok.with_added(["a b"]).own_regex


def test_tokenizer_train_cap_holds_for_crlf_text(corpus):
    crlf = corpus.replace("\n", "\r\n") * 10  # ~2M characters in ~64K pieces
    sample = D._training_sample([crlf], 200_000)
    assert 100_000 < sum(map(len, sample)) < 400_000


def test_directory_summary_says_what_was_read_and_ignored(tmp_path, small_dir, capsys):
    import os

    d = tmp_path / "d"
    d.mkdir()
    for p in small_dir.iterdir():
        (d / p.name).write_bytes(p.read_bytes())
    (d / ".hidden.txt").write_text("secret\n")
    (d / ".git").mkdir()
    (d / ".git" / "x.md").write_text("x\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "o.txt").write_text("linked\n")
    os.symlink(other, d / "linked")
    (d / "empty.md").write_text("")
    _prep(d, tmp_path / "c", quiet=False)
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("data: /"))
    assert "[8 files read, 5 ignored (2 hidden, 1 empty, 1 other type, 1 symlinked dir)]" in line
    again = _prep(d, tmp_path / "c", quiet=False)
    assert again.cached and "[8 files read, 5 ignored" in capsys.readouterr().out


def test_a_file_linked_twice_into_a_corpus_is_read_once(tmp_path, corpus):
    """A symlink (or hard link) to a file of the corpus: read twice, one copy could land in validation
    and the other in train (a third of validation was training text)."""
    import os

    from slmlab.data import resolve_spec

    d = tmp_path / "d"
    d.mkdir()
    for i in range(3):
        (d / f"a{i}.txt").write_text(corpus[i * 20_000:(i + 1) * 20_000])
    os.symlink(d / "a0.txt", d / "link.txt")
    os.link(d / "a1.txt", d / "hard.txt")
    src = resolve_spec(str(d))
    assert src.files == ["a0.txt", "a1.txt", "a2.txt"] and src.ignored == {"duplicate": 2}
    train, val = map(list, src.split(0.3))
    assert not set(train) & set(val) and len(train) + len(val) == 3


def test_a_corpus_is_prepared_a_batch_of_documents_at_a_time(tmp_path, corpus, tok, monkeypatch):
    """A corpus larger than memory, as a directory of .jsonl shards or as one .jsonl: no pass (counting,
    tokenizing with the sha256) holds more documents than the validation split and one encoding batch
    (before, each split was a list of all its documents); and both give the same tokens."""
    live, most = [0], [0]

    class Doc(str):  # a document that counts itself out when it is freed
        def __del__(self):
            live[0] -= 1

    def tracked(path):
        for d in real(path):
            doc = Doc(d)
            live[0] += 1
            most[0] = max(most[0], live[0])
            yield doc

    real = D.iter_documents
    monkeypatch.setattr(D, "iter_documents", tracked)
    monkeypatch.setattr(D, "_ENCODE_BATCH_CHARS", 2000)  # a few documents a batch
    lines = corpus.splitlines(keepends=True)
    shards = ["".join(json.dumps({"text": "".join(lines[j:j + 9])}) + "\n" for j in range(i * 300, (i + 1) * 300, 9))
              for i in range(8)]
    d = tmp_path / "d"
    d.mkdir()
    for i, text in enumerate(shards):
        (d / f"f{i}.jsonl").write_text(text)
    # One file with the directory's validation shards last, and val_frac their share of the documents (34
    # each): split by documents, its splits are the directory's.
    val = [int(name[1]) for name in D.split_files([(f.name, f.stat().st_size) for f in sorted(d.iterdir())], 0.25)[1]]
    one = tmp_path / "one.jsonl"
    one.write_text("".join([t for i, t in enumerate(shards) if i not in val] + [shards[i] for i in sorted(val)]))
    bundles = []
    for spec, val_frac in ((d, 0.25), (one, len(val) / 8)):
        most[0] = live[0] = 0
        b = _prep(spec, tmp_path / "c", val_frac=val_frac, tokenizer=tok)
        assert b.manifest["n_train_docs"] + b.manifest["n_val_docs"] == 8 * 34
        assert most[0] <= b.manifest["n_val_docs"] + 10, f"{spec.name}: {most[0]} documents held at once"
        bundles.append(b)
    assert bundles[0].manifest["n_val_docs"] == bundles[1].manifest["n_val_docs"] == 34 * len(val)
    for split in ("train", "val"):
        assert np.array_equal(getattr(bundles[0], split), getattr(bundles[1], split)), split


def test_when_every_file_is_too_big_for_validation_the_smallest_is_taken():
    from slmlab.data import split_files

    sizes = [("big.txt", 100), ("b.txt", 100), ("c.txt", 500), ("d.txt", 100)]
    for order in (sizes, sizes[::-1]):
        train, val = split_files(order, 0.01)
        assert len(val) == 1 and dict(sizes)[val[0]] == 100  # never the 500-byte file


def test_text_odds_and_ends_of_real_files(tmp_path, monkeypatch):
    """A UTF-8 byte-order mark is no text (as in .jsonl); a file named ~something is a file."""
    from slmlab.data import resolve_spec

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfFirst line\nsecond\n")
    assert list(iter_documents(tmp_path / "bom.txt")) == ["First line\nsecond\n"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~notes.txt").write_text("x\n")
    assert resolve_spec("~notes.txt").path == Path("~notes.txt")


def test_a_trained_tokenizer_smaller_than_the_model_vocabulary_is_noted(tmp_path, corpus):
    from slmlab.config import load_config
    from slmlab.data import prepare_for

    f = tmp_path / "small.txt"
    f.write_text(corpus[:3000])
    cfg = load_config(arch="hybrid",
                      overrides=[f"data.spec={f}", "model.vocab_size=70000", f"data.cache_dir={tmp_path}"])
    said = []
    tok = prepare_for(cfg, say=said.append, quiet=True).tokenizer
    assert tok.vocab_size < 70000 and said == [
        f"note: the tokenizer trained on {f} has {tok.vocab_size} tokens, fewer than model.vocab_size=70000 (the text "
        f"holds no more merges): the other {70000 - tok.vocab_size} embedding rows never see a token; "
        f"model.vocab_size={tok.vocab_size} drops them"]


def test_parquet_text_that_is_not_strings_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for name, arr in (("ints", pa.array([1, 2])), ("bytes", pa.array([b"a", b"b"])),
                      ("lists", pa.array([["a"], ["b"]]))):
        pq.write_table(pa.table({"text": arr}), tmp_path / f"{name}.parquet")
        with pytest.raises(DataError, match=f"{name}.parquet: the 'text' column holds .*, not strings"):
            list(iter_documents(tmp_path / f"{name}.parquet"))
    pq.write_table(pa.table({"text": pa.array(["a", "b"]).dictionary_encode()}), tmp_path / "dict.parquet")
    assert list(iter_documents(tmp_path / "dict.parquet")) == ["a", "b"]
    # read 4,096 rows at a time, across row groups: every row, in order, nulls and empty strings dropped
    rows = [None if i % 7 == 0 else "" if i % 11 == 0 else f"doc {i}" for i in range(10_000)]
    pq.write_table(pa.table({"text": rows}), tmp_path / "many.parquet", row_group_size=3_000)
    assert list(iter_documents(tmp_path / "many.parquet")) == [r for r in rows if r]


def test_a_validation_share_far_from_val_frac_is_reported(tmp_path, corpus, capsys):
    f = tmp_path / "one_line.txt"
    f.write_text("Title\n" + corpus[:20_000].replace("\n", " "))  # one cut point: almost all of it is validation
    b = _prep(f, tmp_path / "c", vocab_size=300, val_frac=0.02, quiet=False)
    out = capsys.readouterr().out
    assert b.val_share > 0.9 and "% of bytes" in out
    assert re.search(r"warning: validation holds 99\.\d\d% of the bytes of .*, data\.val_frac is 0\.02", out)
    f2 = tmp_path / "many.txt"
    f2.write_text(corpus[:20_000])
    _prep(f2, tmp_path / "c", vocab_size=300, val_frac=0.1, quiet=False)
    assert "warning" not in capsys.readouterr().out
