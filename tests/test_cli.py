"""train.py / sample.py from the outside: bad input is one line on stderr, exit 2, nothing overwritten;
a tiny run trains (loss goes down), writes its run directory and samples."""
import errno
import json
import os
from pathlib import Path

import pytest

import sample
import train
from slmlab.cli import run_cli

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared/data/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    if SHAKESPEARE.exists():
        text = SHAKESPEARE.read_text()[:200_000]
    else:
        text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 17}\n" for i in range(5000))
    p = d / "corpus.txt"
    p.write_text(text)
    return p


TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=3", "model.vocab_size=300",
        "train.batch_size=4", "train.seq_len=32", "train.eval_every=10", "train.eval_tokens=1024",
        "train.warmup_steps=2", "train.sample_tokens=8", "logging.progress=false", "train.phases=[]",
        "train.ckpt_every=0"]


def run_train(tmp_path, corpus, *extra, steps=4, out=None):
    out = out or tmp_path / "run"
    argv = ["--data", str(corpus), "--out", str(out), "--steps", str(steps), "--device", "cpu",
            f"data.cache_dir={tmp_path / 'cache'}", *TINY, *extra]
    return run_cli(train.main, argv), out


def _one_line_error(capsys, needle):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: "), err
    assert len(err.splitlines()) == 1, err
    assert needle in err, err


def test_tiny_run_trains_and_writes_run_dir(tmp_path, corpus, capsys):
    rc, out = run_train(tmp_path, corpus, "--arch", "hybrid", "optim.lr=0.01", steps=40)
    assert rc == 0
    for name in ("config.yaml", "tokenizer.json", "model.safetensors", "metrics.jsonl", "summary.json",
                 "sample.txt"):
        assert (out / name).exists(), name
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses  # it learns
    final = [r for r in recs if r.get("final")][0]
    assert 0 < final["val_bpb"] < 8
    # sample.py reads the run back and greedy decoding is deterministic
    capsys.readouterr()
    assert run_cli(sample.main, ["--run", str(out), "--prompt", "the", "--max-new-tokens", "12",
                                 "--temperature", "0", "--device", "cpu"]) == 0
    a = capsys.readouterr().out
    assert run_cli(sample.main, ["--run", str(out), "--prompt", "the", "--max-new-tokens", "12",
                                 "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == a and a.startswith("the")


@pytest.mark.parametrize("layers", ["CCA", "conv,attn,attn", "A"])
def test_layers_flag_forms(tmp_path, corpus, layers):
    rc, out = run_train(tmp_path, corpus, "--arch", "transformer", "--layers", layers, steps=2)
    assert rc == 0
    assert "layers" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--arch", "nope"], "unknown --arch 'nope'"),
    (["--layers", "CCZ"], "unknown block 'Z'"),
    (["model.d_model=30", "model.n_heads=4"], "not divisible by model.n_heads"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "not divisible by model.n_kv_heads"),
    (["model.window=0"], "model.window must be > 0"),
    (["model.d_model=abc"], "model.d_model expects an integer, got 'abc'"),
    (["model.d_modle=64"], "did you mean model.d_model"),
    (["model.vocab_size=100"], "vocab"),
    (["train.seq_len=100000"], "seq_len"),
    (["nonsense"], "not of the form section.key=value"),
    (["model.kernels=flex"], "model.kernels=flex runs on CUDA"),  # run_train gives --device cpu
])
def test_bad_input_is_one_line_exit_2(tmp_path, corpus, capsys, args, needle):
    rc, out = run_train(tmp_path, corpus, *args, steps=1)
    assert rc == 2
    _one_line_error(capsys, needle)


def test_missing_data_path(tmp_path, capsys):
    rc, _ = run_train(tmp_path, tmp_path / "no_such_file.txt", steps=1)
    assert rc == 2
    _one_line_error(capsys, "no_such_file.txt")


def test_existing_run_is_not_overwritten(tmp_path, corpus, capsys):
    rc, out = run_train(tmp_path, corpus, steps=2)
    assert rc == 0
    before = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    rc, _ = run_train(tmp_path, corpus, steps=2, out=out)
    assert rc == 2
    _one_line_error(capsys, "--force")
    assert (out / "model.safetensors").read_bytes() == before


def test_sample_bad_run_dir(tmp_path, capsys):
    assert run_cli(sample.main, ["--run", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys, "nope")


def test_finetune_on_other_data_with_the_runs_tokenizer(tmp_path, corpus, capsys):
    rc, first = run_train(tmp_path, corpus, steps=2)
    assert rc == 0
    other = tmp_path / "other.txt"
    other.write_text("".join(f"entirely different text number {i} with its own words\n" for i in range(3000)))
    # A fresh tokenizer trained on other data differs from the run's: refused, one line.
    rc, _ = run_train(tmp_path, other, f"train.init_from={first}", steps=2, out=tmp_path / "b")
    assert rc == 2
    _one_line_error(capsys, "different tokenizer")
    # Reusing the run's tokenizer makes the weights transfer.
    rc, out = run_train(tmp_path, other, f"train.init_from={first}", f"data.tokenizer={first}", steps=2,
                        out=tmp_path / "c")
    assert rc == 0
    assert (out / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("samplerun")
    rc, out = run_train(tmp, corpus, steps=2)
    assert rc == 0
    return out


@pytest.mark.parametrize("argv,needle", [
    (["--num-samples", "-1"], "--num-samples must be in [1, 10000], got -1"),
    (["--top-k", "-1"], "--top-k must be >= 0, got -1"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-p", "nan"], "--top-p must be in (0, 1], got nan"),
    (["--temperature", "nan"], "--temperature must be a finite number >= 0, got nan"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--seed", "99999999999999999999999"], "--seed must be in [0, 9223372036854775807]"),
    (["--max-new-tokens", "1000000000"], "--max-new-tokens must be in [0, 100000]"),
    (["--block-length", "0"], "--block-length must be > 0"),
    # temperature 0 decodes greedily: what only sampling uses would be ignored or repeat one output
    (["--temperature", "0", "--top-k", "5"], "--top-k has no effect at --temperature 0: greedy decoding takes"),
    (["--temperature", "0", "--top-p", "0.9"], "--top-p has no effect at --temperature 0: greedy decoding takes"),
    (["--temperature", "0", "--seed", "3"], "--seed has no effect at --temperature 0: greedy decoding draws"),
    (["--temperature", "1e-9", "--num-samples", "2"], "--num-samples 2 at --temperature 1e-09 repeats one output"),
])
def test_sample_bad_flags_are_one_line_errors(tiny_run, capsys, argv, needle):
    assert run_cli(sample.main, ["--run", str(tiny_run), "--device", "cpu", *argv]) == 2
    _one_line_error(capsys, needle)


def test_sample_with_top_p_draws_from_the_nucleus_only(tiny_run, capsys):
    """--top-p 1e-6 keeps the likeliest token alone: a sample at temperature 1 is then the greedy output."""
    capsys.readouterr()
    argv = ["--run", str(tiny_run), "--device", "cpu", "--max-new-tokens", "8", "--prompt", "the"]
    assert run_cli(sample.main, [*argv, "--temperature", "1", "--top-p", "1e-6", "--seed", "5"]) == 0
    nucleus = capsys.readouterr().out
    assert run_cli(sample.main, [*argv, "--temperature", "0"]) == 0
    assert nucleus == capsys.readouterr().out


def test_sample_odd_but_usable_inputs_work(tiny_run, capsys):
    """Bytes that are not UTF-8 in the prompt read as U+FFFD; a temperature of 1e-45 is greedy."""
    import torch

    from slmlab.rundir import RunDir

    capsys.readouterr()
    bad_utf8 = b"the \xff fox".decode("utf-8", "surrogateescape")  # what argv holds for non-UTF-8 bytes
    assert run_cli(sample.main, ["--run", str(tiny_run), "--device", "cpu", "--prompt", bad_utf8,
                                 "--max-new-tokens", "5", "--temperature", "1e-45"]) == 0
    out = capsys.readouterr().out
    _, model, tok = RunDir.open(tiny_run).load(torch.device("cpu"))
    greedy = model.generate(torch.tensor([tok.encode("the \ufffd fox")]), 5, temperature=0, eos_id=tok.eos_id)[0]
    if tok.eos_id in greedy.tolist():  # sample.py prints up to the end of text
        greedy = greedy[:greedy.tolist().index(tok.eos_id)]
    assert out == tok.decode(greedy.tolist()) + "\n"


def test_the_stream_prints_the_decoded_text_and_stops_at_eos(capsys):
    """A SentencePiece-style decoder drops the leading space of a decode's first token: the stream must
    still read as the whole decode (it printed 'a a a\naéaa a a\naé a': glued, then all again)."""
    from test_data import _llama_style_tokenizer

    tok = _llama_style_tokenizer()
    ids = tok.encode("a a a\naé a 日 a")  # 日 is three byte-fallback pieces: held back until whole
    printer = sample.StreamPrinter(tok, ids[:2], eos_id=tok.eos_id)
    for t in ids[2:] + [tok.eos_id]:
        printer.add(t)
    printer.finish(ids[2:] + [tok.eos_id, 261, 261])  # after eos: not printed
    assert capsys.readouterr().out == tok.decode(ids) + "\n" == "a a a\naé a 日 a\n"
    printer = sample.StreamPrinter(tok, [], eos_id=tok.eos_id)
    printer.finish(ids)  # nothing streamed (a diffusion run's tokens): all printed at the end
    assert capsys.readouterr().out == tok.decode(ids) + "\n"
    # a stray byte after 日's three makes the decoder rewrite the printed 日 as U+FFFDs: the stream went
    # silent for the rest of the sample (only finish() printed it); now the new tokens print on their own
    bad = tok.encode("a 日") + [tok.hf.token_to_id("<0x80>")] + tok.encode(" a a a")
    printer = sample.StreamPrinter(tok, [], eos_id=tok.eos_id)
    for t in bad:
        printer.add(t)
    streamed = capsys.readouterr().out
    assert streamed.endswith(" a a a") and streamed.replace("\ufffd", "").startswith("a 日")


def test_sample_py_stops_at_eos_and_does_not_print_the_start_token(tiny_run, capsys, monkeypatch):
    import torch

    from arch.model import LM
    from slmlab.rundir import RunDir

    tok = RunDir.open(tiny_run).load(torch.device("cpu"))[2]
    new = tok.encode(" cat") + [tok.eos_id] + tok.encode(" dog")
    seen = {}

    def generate(self, idx, n, *a, eos_id=None, on_token=None, **k):
        seen.update(prompt=idx[0].tolist(), eos_id=eos_id)
        for t in new:
            on_token(t)
        return torch.cat([idx, torch.tensor([new])], 1)

    monkeypatch.setattr(LM, "generate", generate)
    capsys.readouterr()
    assert run_cli(sample.main, ["--run", str(tiny_run), "--device", "cpu", "--prompt", ""]) == 0
    assert seen == {"prompt": [tok.start_id], "eos_id": tok.eos_id}
    assert capsys.readouterr().out == " cat\n"


def test_ctrl_c_mid_generation_exits_130_with_the_text_so_far(tiny_run, capsys, monkeypatch):
    from arch.model import LM

    def interrupted(self, idx, *a, on_token=None, **k):
        on_token(int(idx[0, -1]))  # one token printed, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(LM, "generate", interrupted)
    assert run_cli(sample.main, ["--run", str(tiny_run), "--device", "cpu", "--prompt", "the"]) == 130
    assert capsys.readouterr().out.startswith("the")
    assert run_cli(lambda argv: {"summary": 1}) == 0  # a main's results are not exit statuses
    assert run_cli(lambda argv: True) == 0


def test_learned_positions_bound_the_final_sample_and_sample_py(tmp_path, corpus, capsys):
    """model.pos=learned: the trainer's final sample is clamped to model.max_positions (and says so);
    sample.py refuses, before printing, a --prompt + --max-new-tokens the position table cannot hold."""
    import torch

    from slmlab.rundir import RunDir

    rc, out = run_train(tmp_path, corpus, "model.pos=learned", "model.max_positions=32", "train.sample_tokens=100",
                        steps=2)
    assert rc == 0
    _, _, tok = RunDir.open(out).load(torch.device("cpu"))
    n = len(tok.encode("def "))  # train.sample_prompt
    note, text = (out / "sample.txt").read_text().split("\n", 1)
    assert note == (f"[{32 - n} of train.sample_tokens=100 new tokens: a {n}-token prompt leaves no more of "
                    f"model.max_positions=32]")
    assert text.startswith("def ")
    capsys.readouterr()
    assert run_cli(sample.main, ["--run", str(out), "--device", "cpu", "--max-new-tokens", "100"]) == 2
    res = capsys.readouterr()
    assert res.out == ""  # refused up front, not after 32 tokens of text
    assert res.err == (f"error: --prompt is {n} tokens and --max-new-tokens 100: {n + 100} positions, but {out} has "
                       f"model.max_positions=32 (model.pos=learned); use --max-new-tokens {32 - n} or less\n")
    assert run_cli(sample.main, ["--run", str(out), "--device", "cpu", "--prompt", "the " * 40,
                                 "--max-new-tokens", "1"]) == 2
    _one_line_error(capsys, "shorten --prompt below 32 tokens")
    assert run_cli(sample.main, ["--run", str(out), "--device", "cpu", "--max-new-tokens", str(32 - n),
                                 "--temperature", "0"]) == 0
    prompts = tmp_path / "prompts.jsonl"  # teacher traces check every prompt before the first reply
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "the " * 20}) + "\n")
    assert run_cli(sample.main, ["--run", str(out), "--device", "cpu", "--prompts", str(prompts), "--out",
                                 str(tmp_path / "traces.jsonl"), "--max-new-tokens", "20"]) == 2
    _one_line_error(capsys, "--prompts example 2 is")
    assert not (tmp_path / "traces.jsonl").exists()


def test_sample_compile_on_a_diffusion_run_is_an_error():
    """--compile has no decode step to compile on a diffusion run: an error, as the diffusion flags are on AR runs."""
    from types import SimpleNamespace

    from slmlab.errors import ConfigError

    args = sample.parse_args(["--run", "runs/d", "--compile"])
    with pytest.raises(ConfigError, match="--compile applies to autoregressive runs .*runs/d is a diffusion run"):
        sample.decode_kwargs(args, SimpleNamespace(mask_id=3))
    assert sample.decode_kwargs(args, SimpleNamespace(supports_static=lambda: True))["compile"] is True


@pytest.mark.parametrize("tool", ["sample", "sample --chat", "sample --prompts", "eval", "convert"])
def test_every_tool_refuses_a_tokenizer_larger_than_the_model(tool, tiny_run, tmp_path, capsys):
    """RunDir.load refuses it for all: text it encodes would index past the embedding (eval and --prompts
    loaded without the check once)."""
    import shutil

    import convert
    import eval as eval_cli
    from slmlab.tokenizer import train_tokenizer

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    texts = ["".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(200)) for i in range(300)]
    (run / "tokenizer.json").write_text(train_tokenizer(texts, vocab_size=600).to_json())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    text = tmp_path / "t.txt"
    text.write_text("some text to score\n")
    main, argv = {"sample": (sample.main, ["--device", "cpu"]),
                  "sample --chat": (sample.main, ["--device", "cpu", "--chat"]),
                  "sample --prompts": (sample.main, ["--device", "cpu", "--prompts", str(prompts),
                                                     "--out", str(tmp_path / "o.jsonl")]),
                  "eval": (eval_cli.main, ["--device", "cpu", "--tasks", str(text)]),
                  "convert": (convert.main, ["--to", "hf", "--out", str(tmp_path / "hf")])}[tool]
    if tool == "eval":  # it scores every other model/task on and exits 1, naming each failure in one line
        assert run_cli(main, ["--run", str(run), *argv]) == 1
        assert "the tokenizer has 600 ids but the model only 300" in capsys.readouterr().err
    else:
        assert run_cli(main, ["--run", str(run), *argv]) == 2
        _one_line_error(capsys, "ids but the model only 300")


# ---- nothing is lost, and the filesystem's errors are one line (issue 13) -------------------------
def test_out_that_is_a_file_or_a_foreign_directory_is_refused(tmp_path, corpus, capsys):
    f = tmp_path / "afile"
    f.write_text("mine")
    rc, _ = run_train(tmp_path, corpus, out=f, steps=1)
    assert rc == 2 and f.read_text() == "mine"
    _one_line_error(capsys, "is a file, not a directory")
    d = tmp_path / "notes"
    (d / "checkpoints").mkdir(parents=True)
    for name, text in (("summary.json", "{}"), ("sample.txt", "my sample"), ("metrics.jsonl", ""),
                       ("checkpoints/notes.txt", "my notes")):
        (d / name).write_text(text)
    rc, _ = run_train(tmp_path, corpus, out=d, steps=1)
    assert rc == 2 and (d / "sample.txt").read_text() == "my sample" and (d / "checkpoints/notes.txt").is_file()
    _one_line_error(capsys, "is not empty and holds no slmlab run")
    rc, _ = run_train(tmp_path, corpus, "--force", out=d, steps=1)  # --force replaces only slmlab's own files
    assert rc == 0 and (d / "checkpoints/notes.txt").read_text() == "my notes" and (d / "config.yaml").is_file()


def test_data_that_is_a_fifo_is_refused_by_name(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    rc, _ = run_train(tmp_path, fifo, steps=1)
    assert rc == 2
    _one_line_error(capsys, "is not a regular file or a directory (a FIFO, device or socket?)")


@pytest.mark.parametrize("err,needle", [(errno.EROFS, "read-only"), (errno.ENOSPC, "no space left"),
                                        (errno.EACCES, "permission denied")])
def test_filesystem_errors_are_one_line_naming_the_path(tmp_path, corpus, capsys, monkeypatch, err, needle):
    """The writer fails the way a read-only, full or forbidden directory makes it fail."""
    from slmlab import checkpoint

    def failing_publish(path, *a, **k):
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(checkpoint, "publish", failing_publish)
    rc, _ = run_train(tmp_path, corpus, steps=1)
    assert rc == 2
    _one_line_error(capsys, needle)


def tiny_diffusion_model():
    import torch

    from slmlab.config import build
    from slmlab.rundir import model_from_config

    cfg = build("diffusion", {"model": dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                            layers="CA", kernels="torch", causal=False),
                              "objective": {"name": "mdlm"}})
    torch.manual_seed(0)
    return model_from_config(cfg).eval()


def test_sample_diffusion_steps_note_the_passes_that_run(capsys, monkeypatch):
    """--diffusion-steps 2 --block-length 2 --max-new-tokens 8 ran 4 passes (llada: the same steps in
    each block) without a word; the note gives the count, and it is what runs."""
    import torch

    model = tiny_diffusion_model()
    passes, denoise = [], model.denoise_logits
    monkeypatch.setattr(model, "denoise_logits", lambda x: passes.append(1) or denoise(x))
    args = sample.parse_args(["--run", "runs/d", "--diffusion-steps", "2", "--block-length", "2",
                              "--max-new-tokens", "8"])
    kw = sample.decode_kwargs(args, model)
    assert capsys.readouterr().err.startswith("note: --diffusion-steps 2 runs as 4 denoising passes: 4 blocks of 2 ")
    model.generate(torch.full((1, 3), 5), 8, temperature=0, **kw)
    assert len(passes) == 4
    sample.decode_kwargs(sample.parse_args(["--run", "d", "--diffusion-steps", "4", "--max-new-tokens", "8"]), model)
    assert capsys.readouterr().err == ""  # what was asked is what runs: no note


@pytest.mark.parametrize("argv,needle", [
    (["--sampler", "mdlm", "--block-length", "4"], "--block-length applies to --sampler llada"),
    (["--block-length", "3", "--max-new-tokens", "8"], "--block-length 3 must divide --max-new-tokens 8"),
])
def test_sample_diffusion_flags_that_cannot_apply_are_refused(argv, needle):
    from slmlab.errors import ConfigError

    with pytest.raises(ConfigError, match=needle):
        sample.decode_kwargs(sample.parse_args(["--run", "runs/d", *argv]), tiny_diffusion_model())


def test_sample_zero_new_tokens_on_a_diffusion_run_is_the_prompt():
    """README: --max-new-tokens 0..100,000; diffusion refused 0 with a message naming no flag."""
    import torch

    model = tiny_diffusion_model()
    kw = sample.decode_kwargs(sample.parse_args(["--run", "runs/d", "--max-new-tokens", "0"]), model)
    idx = torch.full((1, 3), 5)
    assert torch.equal(model.generate(idx, 0, **kw), idx)


def test_sample_sampler_on_an_autoregressive_run_is_refused():
    from types import SimpleNamespace

    from slmlab.errors import ConfigError

    args = sample.parse_args(["--run", "runs/ar", "--sampler", "mdlm"])
    with pytest.raises(ConfigError, match="^--sampler applies to diffusion runs; runs/ar is autoregressive$"):
        sample.decode_kwargs(args, SimpleNamespace(supports_static=lambda: True))


# ---- sample.py: a flag the chosen mode has no use for is an error, never ignored ---------------------
@pytest.fixture
def traces_io(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "the"}) + "\n")
    return prompts, tmp_path / "t.jsonl"


@pytest.mark.parametrize("mode,argv,needle", [
    ("traces", ["--prompt", "X"], "--prompt and --prompts conflict"),
    ("traces", ["--batch-size", "2"], "--batch-size applies to --hf --prompts"),
    ("traces", ["--batch-size", "8"], "--batch-size applies to --hf --prompts"),  # the default, given, is refused too
    ("traces", ["--diffusion-steps", "3"], "--diffusion-steps applies to sampling a diffusion run"),
    ("traces", ["--block-length", "4", "--sampler", "mdlm"], "--block-length/--sampler apply to sampling a diffusion"),
    ("traces", ["--compile"], "--compile applies to sampling a run without --prompts"),
    ("traces", ["--prompt", "X", "--batch-size", "2", "--diffusion-steps", "3"], "error: --"),  # the report's line
    ("hf", ["--prompt", "X"], "--prompt and --prompts conflict"),
    ("hf", ["--compile"], "--compile applies to sampling a run without --prompts"),
    ("hf", ["--sampler", "llada"], "--sampler applies to sampling a diffusion run; --prompts --hf generates with"),
    ("sample", ["--batch-size", "3"], "--batch-size applies to --hf --prompts"),
    ("sample", ["--force"], "--force applies to --prompts with --out"),
    ("sample", ["--diffusion-steps", "3"], "--diffusion-steps applies to diffusion runs"),
    ("sample", ["--hf", "x"], "--hf generates traces: give --prompts"),
    ("sample", ["--system", "be brief"], "--system applies to --chat"),
    ("sample", ["--chat", "--prompt", "X", "--num-samples", "2"],
     "--chat takes the prompts you type, one reply each, from an autoregressive run: drop --prompt/--num-samples"),
    ("sample", ["--chat", "--sampler", "mdlm"], "drop --sampler"),
    ("sample", ["--chat", "--temperature", "0", "--seed", "1"], "--seed has no effect at --temperature 0"),
    ("traces", ["--chat"], "drop --prompts"),
])
def test_sample_flags_of_another_mode_are_one_line_errors(tiny_run, traces_io, capsys, mode, argv, needle):
    """`--prompts p --out t --prompt X --batch-size 2 --diffusion-steps 3` exited 0 with all three ignored."""
    prompts, out = traces_io
    src = ["--hf", str(prompts.parent / "no-such-folder")] if mode == "hf" else ["--run", str(tiny_run)]
    io = ["--prompts", str(prompts), "--out", str(out)] if mode != "sample" else []
    if "--hf" in argv:  # --hf and --run exclude each other
        src = []
    capsys.readouterr()
    assert run_cli(sample.main, [*src, "--device", "cpu", "--max-new-tokens", "2", *io, *argv]) == 2
    res = capsys.readouterr()
    err = res.err.strip()
    assert res.out == "" and "Traceback" not in err, err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()


def test_sample_traces_refuse_an_existing_out_without_force(tiny_run, traces_io, capsys):
    prompts, out = traces_io
    argv = ["--run", str(tiny_run), "--device", "cpu", "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "2", "--temperature", "0"]
    out.write_text("my traces\n")
    assert run_cli(sample.main, argv) == 2
    _one_line_error(capsys, f"output {out} exists (pass --force to replace it)")
    assert out.read_text() == "my traces\n"
    assert run_cli(sample.main, [*argv, "--force"]) == 0
    assert [set(json.loads(line)) for line in out.read_text().splitlines()] == [{"prompt", "completion"}]
    assert "prompt 1/1" in capsys.readouterr().err  # the status line
    onto_prompts = [str(prompts) if a == str(out) else a for a in argv]
    assert run_cli(sample.main, [*onto_prompts, "--force"]) == 2
    _one_line_error(capsys, "is the --prompts file")
    assert json.loads(prompts.read_text()) == {"prompt": "the"}


def test_sample_flags_of_the_mode_are_accepted_and_defaults_filled(traces_io):
    """The None defaults that tell a given flag from an absent one are filled in after the checks."""
    prompts, out = traces_io
    args = sample.parse_args(["--hf", "x", "--prompts", str(prompts), "--out", str(out), "--batch-size", "2"])
    sample.check_args(args)
    assert args.batch_size == 2
    args = sample.parse_args(["--run", "r"])
    sample.check_args(args)
    assert (args.prompt, args.batch_size) == ("def ", 8)


def test_sample_device_cuda_without_cuda_names_the_flag(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_cli(sample.main, ["--run", "nope", "--device", "cuda"]) == 2
    _one_line_error(capsys, "--device cuda: no CUDA device is available")


def test_print_config_is_the_resolved_config_the_run_would_save(tmp_path, capsys):
    from slmlab.config import load_config, load_run_config

    argv = ["--arch", "spiking", "--layers", "LA", "model.d_model=64", "train.steps=7"]
    assert run_cli(train.main, [*argv, "--print-config"]) == 0
    printed = tmp_path / "config.yaml"
    printed.write_text(capsys.readouterr().out)
    want = load_config(arch="spiking", layers="LA", overrides=["model.d_model=64", "train.steps=7"])
    assert load_run_config(printed).to_dict() == want.to_dict()
    for extra, flag in ((["--dry-run"], "--dry-run"), (["--out", str(tmp_path / "r")], "--out"),
                        (["--mem", "8GB"], "--mem")):
        assert run_cli(train.main, [*argv, "--print-config", *extra]) == 2
        _one_line_error(capsys, f"--print-config only prints the config: drop {flag}")


@pytest.mark.parametrize("script", ["train", "sample", "eval", "convert", "ablate", "compare"])
def test_every_flag_is_documented(script, capsys):
    """Each flag a script's --help lists appears in the README or docs/ (a new flag without a line
    there fails here)."""
    import importlib
    import re

    mod = importlib.import_module(script)
    with pytest.raises(SystemExit):
        mod.main(["--help"])
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", capsys.readouterr().out)) - {"--help"}
    flags -= {f for f in flags if "_" in f}  # torchrun's --nproc_per_node in a usage example
    root = Path(__file__).resolve().parents[1]
    docs = "\n".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))])
    assert flags and sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", docs)) == []


def test_resume_with_force_is_refused(tmp_path, capsys):
    assert run_cli(train.main, ["--resume", "--force", "--out", str(tmp_path / "run")]) == 2
    _one_line_error(capsys, "--resume continues the run in --out and --force replaces it")


# a value for each shortcut flag and another for its key's override
SHORTCUT_VALUES = {"data": ("stdlib", "other.txt"), "steps": ("10", "20"), "device": ("cpu", "auto"),
                   "seed": ("3", "4"), "layers": ("A", "CCA")}


@pytest.mark.parametrize("flag", sorted(SHORTCUT_VALUES))
def test_a_shortcut_flag_and_the_override_of_its_key_are_refused(flag, capsys):
    assert set(SHORTCUT_VALUES) == set(train.SHORTCUTS)  # a new shortcut flag needs its values here
    key, (by_flag, by_override) = train.SHORTCUTS[flag], SHORTCUT_VALUES[flag]
    assert run_cli(train.main, ["--print-config", f"--{flag}", by_flag, f"{key}={by_override}"]) == 2
    _one_line_error(capsys, f"--{flag} {by_flag} and {key}={by_override} both set {key}: give one of them")
    # each alone sets the key
    assert run_cli(train.main, ["--print-config", f"--{flag}", by_flag]) == 0
    assert run_cli(train.main, ["--print-config", f"{key}={by_flag}"]) == 0
    flag_out, override_out = capsys.readouterr().out.split("arch: ")[1:]
    assert flag_out == override_out


def test_the_readme_synopsis_lists_every_flag_of_help(capsys):
    import re

    with pytest.raises(SystemExit):
        train.main(["--help"])
    usage = capsys.readouterr().out.split("\n\n")[0]
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = re.search(r"## `train.py`\n\n```\n(.*?)```", readme, re.S).group(1)
    flags = set(re.findall(r"--[a-z-]+", usage))
    assert flags and flags == set(re.findall(r"--[a-z-]+", synopsis))


@pytest.mark.parametrize("avg_last,used", [(1, False), (2, True)])
def test_avg_last_is_noted_exactly_when_it_does_nothing(tmp_path, corpus, capsys, avg_last, used):
    rc, out = run_train(tmp_path, corpus, f"train.avg_last={avg_last}", "train.ckpt_every=2", steps=4)
    assert rc == 0
    err = capsys.readouterr().err
    assert (out / "model_avg.safetensors").exists() == used
    assert ("note: train.avg_last=1 has no effect" in err) == (not used), err
