"""convert.py: every export format checked in its own runtime against our model's logits.

Run directories are built here (tiny random models with non-trivial norms), not trained, so the
default suite stays fast. The llama.cpp check on a trained run is `pytest -m slow tests/test_convert.py`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arch import LM
from slmlab.checkpoint import save_model
from slmlab.config import build
from slmlab.errors import ConfigError
from slmlab.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXT = ("def main(argv):\n    for i in range(10):\n        print('hello world', i)\n    return 0\n"
        "class Foo:\n    def __init__(self, x):\n        self.x = x + 1  # the quick brown fox\n") * 20

PRESETS = {
    "hybrid": dict(layers="CCA", window_pattern="L"),
    "transformer": dict(layers="A", window_pattern="L"),
    "transformer-sliding": dict(layers="A", window_pattern="SL", window=5),
    # a Mamba-2 model as transformers' Mamba2ForCausalLM holds one: mamba2 layers without MLP
    "hybrid-mamba": dict(layers="M", mlp="none", window_pattern="L",
                         mixer_opts={"mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk": 8}}),
    # mamba2 beside attention without QK-norm: transformers' GraniteMoeHybridForCausalLM, no experts
    "hybrid-granite": dict(layers="MMA", qk_norm=False, window_pattern="L",
                           mixer_opts={"mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk": 8}}),
    # and as IBM's Granite-4.0-H: NoPE, every multiplier away from 1
    "hybrid-granite-ibm": dict(layers="MMA", qk_norm=False, window_pattern="L", pos="none", embed_scale=6.0,
                               residual_scale=0.5, logit_scale=3.0, attn_scale=0.1,
                               mixer_opts={"mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk": 8}}),
    # attention with a mixture-of-experts MLP: transformers' Qwen3MoeForCausalLM
    "transformer-moe": dict(layers="A", window_pattern="L", mlp="moe", mixer_opts={"moe": {"experts": 4, "top_k": 2}}),
    # attention without QK-norm and a MoE: transformers' MixtralForCausalLM, llama.cpp's llama with experts
    "transformer-mixtral": dict(layers="A", window_pattern="L", mlp="moe", qk_norm=False,
                                mixer_opts={"moe": {"experts": 4, "top_k": 2}}),
    # conv + attention + sigmoid-routed experts with a bias, a dense first layer: LFM2-8B-A1B's layout
    "hybrid-moe": dict(layers="CCA", window_pattern="L", mlp="moe",
                       mixer_opts={"moe": {"experts": 4, "top_k": 2, "router": "sigmoid", "expert_bias": True,
                                           "dense_layers": 1}}),
    # mamba2 + attention + routed experts beside a shared MLP: IBM's Granite-4.0-H MoE layout
    "hybrid-granite-moe": dict(layers="MMA", qk_norm=False, window_pattern="L", mlp="moe",
                               mixer_opts={"mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2, "chunk": 8},
                                           "moe": {"experts": 4, "top_k": 2, "shared_ffn": 48}}),
}


def make_run(path: Path, preset: str = "hybrid", seed: int = 0, objective: dict | None = None,
             sections: dict | None = None, **overrides) -> Path:
    """A run directory (config.yaml, tokenizer.json, model.safetensors) holding a tiny random model;
    `sections`: other config sections ({"data": {...}})."""
    tok = train_tokenizer([TEXT], 300)
    model_tree = dict(vocab_size=tok.vocab_size, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96,
                      rope_theta=5000.0, init_std=0.08, kernels="torch", **PRESETS[preset])
    model_tree.update(overrides)
    cfg = build(preset.split("-")[0], {"model": model_tree, **({"objective": objective} if objective else {}),
                                       **(sections or {})})
    torch.manual_seed(seed)
    model = LM(cfg.model)
    with torch.no_grad():  # non-trivial norm weights (and MoE expert biases) so a swapped or dropped one cannot hide
        for n, p in [*model.named_parameters(), *model.named_buffers()]:
            if n.endswith(("norm.weight", "expert_bias")):
                p.add_(0.2 * torch.randn_like(p))
    path.mkdir(parents=True, exist_ok=True)
    cfg.save(path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_model(model, path / "model.safetensors")
    return path


def ours(run):
    from slmlab.rundir import RunDir

    _, model, tok = RunDir.open(run).load()
    return model.float().eval(), tok


def convert(*argv):
    """Run the CLI in-process; returns (exit code, stderr text)."""
    import contextlib
    import io

    import convert as cli
    from slmlab.cli import run_cli

    err, outbuf = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(outbuf):
        rc = run_cli(cli.main, [str(a) for a in argv])
    return rc, err.getvalue(), outbuf.getvalue()


sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {p: make_run(base / p, p) for p in PRESETS}


def prompt(tok, n=12):
    ids = tok.encode("def main(argv):\n    for i in")[:n]
    return torch.tensor([ids])


# ---------------------------------------------------------------- hf
@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_export_reloads_with_equal_logits_and_generation(runs, preset, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    rc, err, _ = convert("--run", runs[preset], "--to", "hf", "--out", out)
    assert rc == 0, err
    for f in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    want = {"hybrid": "Lfm2ForCausalLM", "hybrid-mamba": "Mamba2ForCausalLM", "hybrid-granite": "GraniteMoeHybridForCausalLM",
            "hybrid-granite-ibm": "GraniteMoeHybridForCausalLM", "hybrid-granite-moe": "GraniteMoeHybridForCausalLM",
            "transformer-moe": "Qwen3MoeForCausalLM", "hybrid-moe": "Lfm2MoeForCausalLM",
            "transformer-mixtral": "MixtralForCausalLM"}.get(preset, "Qwen3ForCausalLM")
    assert type(hf).__name__ == want
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    model, tok = ours(runs[preset])
    text = "def main(argv):\n    for i in range(3):"
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    # The token its documents start with (eos: <|bos|>'s row never trained), as what scorers start with
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.bos_token_id is None and hf.config.bos_token_id == tok.start_id
    idx = torch.tensor([tok.encode(text)] * 2)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-4, rtol=0)
        p = prompt(tok)
        mine = model.generate(p, 16, temperature=0)
        theirs = hf.generate(p, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    assert mine.tolist() == theirs.tolist()


def test_hf_export_fp16_dtype(runs, tmp_path):
    pytest.importorskip("transformers")
    from safetensors import safe_open

    out = tmp_path / "hf16"
    assert convert("--run", runs["hybrid"], "--to", "hf", "--out", out, "--dtype", "fp16")[0] == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


@pytest.mark.parametrize("preset", ["hybrid", "transformer-sliding", "hybrid-mamba", "hybrid-granite",
                                    "hybrid-granite-ibm", "transformer-moe", "hybrid-granite-moe", "hybrid-moe",
                                    "transformer-mixtral"])
def test_from_hf_round_trip(runs, preset, tmp_path):
    """An HF folder saved by transformers itself (random weights) -> our run dir -> same logits;
    and our export of that run is that folder again."""
    transformers = pytest.importorskip("transformers")
    from slmlab.hf import to_hf_config

    model, tok = ours(runs[preset])
    torch.manual_seed(1)
    hf_cfg = to_hf_config(model.cfg, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(1.0 if "norm" in n else 0.0, 0.1 if "norm" in n else 0.08)
    src = tmp_path / "src"
    hf.save_pretrained(src)
    (src / "tokenizer.json").write_text(tok.to_json())
    run = tmp_path / "run"
    rc, err, _ = convert("--from-hf", src, "--out", run)
    assert rc == 0, err
    back, _ = ours(run)
    idx = prompt(tok)
    with torch.no_grad():
        torch.testing.assert_close(back(idx), hf(idx).logits, atol=1e-4, rtol=0)


def test_from_hf_unsupported_and_mismatched(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2)
    src = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(gpt2).save_pretrained(src)
    rc, err, _ = convert("--from-hf", src, "--out", tmp_path / "r1")
    assert rc == 2 and "gpt2" in err and err.count("\n") == 1
    assert not (tmp_path / "r1").exists()
    # shapes that disagree with config.json
    model, tok = ours(runs["transformer"])
    out = tmp_path / "hf"
    assert convert("--run", runs["transformer"], "--to", "hf", "--out", out)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (out / "config.json").write_text(json.dumps(cfg))
    rc, err, _ = convert("--from-hf", out, "--out", tmp_path / "r2")
    assert rc == 2 and "shape mismatch" in err and err.count("\n") == 1
    assert not (tmp_path / "r2").exists()


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_size", 10 ** 9, "model.d_model must be in [1, 65536]"),
    ("vocab_size", "lots", "vocab_size"),
    ("num_hidden_layers", -1, ""),
])
def test_from_hf_hostile_config_values_are_one_line_errors(runs, tmp_path, key, value, needle):
    """config.json is untrusted input: absurd or mistyped values exit 2 with one line, nothing written."""
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert convert("--run", runs["transformer"], "--to", "hf", "--out", out)[0] == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    rc, err, _ = convert("--from-hf", out, "--out", tmp_path / "r")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- bad input
def test_bad_input_is_one_line_exit_2_nothing_written(runs, tmp_path):
    out = tmp_path / "o"
    cases = [
        ("--run", runs["hybrid"], "--to", "tflite", "--out", out),  # unknown format
        ("--run", tmp_path / "nope", "--to", "hf", "--out", out),  # no run dir
        ("--run", runs["hybrid"], "--to", "hf", "--out", out, "--dtype", "int4"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs["hybrid"] / "config.yaml").read_text())
    cases.append(("--run", empty, "--to", "hf", "--out", out))  # no checkpoint
    trunc = tmp_path / "trunc"
    make_run(trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("--run", trunc, "--to", "hf", "--out", out))  # truncated checkpoint
    for argv in cases:
        rc, err, _ = convert(*argv)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        assert not out.exists(), argv
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temp left behind


def test_existing_output_refused_unless_force(runs, tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "hf", "--out", out)
    assert rc == 2 and "--force" in err
    assert (out / "keep.txt").is_file()
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "hf", "--out", out, "--force")
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_unsupported_model_names_what(tmp_path):
    run = make_run(tmp_path / "diff", "hybrid", causal=False, objective={"name": "mdlm"})
    rc, err, _ = convert("--run", run, "--to", "hf", "--out", tmp_path / "o")
    assert rc == 2 and "bidirectional" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- decode graph (shared by onnx/executorch/coreml)
@pytest.mark.parametrize("preset", ["hybrid", "transformer-sliding"])
def test_step_graph_matches_lm_decode(runs, preset):
    """StepLM (fixed KV slots, plain-tensor states) against LM's own KVCache/ConvState decode."""
    from slmlab.export.step import StepLM, reference_decode

    model, tok = ours(runs[preset])
    idx = prompt(tok).repeat(2, 1)
    pre, toks, steps = reference_decode(model, idx, 10)  # 12 + 10 positions: past the window of 5
    step = StepLM(model, 32)
    with torch.no_grad():
        torch.testing.assert_close(step.prefill(idx), pre, atol=1e-5, rtol=0)
        logits, *st = step(idx, torch.tensor([0]), *step.init_states(2))
        torch.testing.assert_close(logits, pre, atol=1e-5, rtol=0)
        for i in range(10):
            logits, *st = step(toks[:, i:i + 1], torch.tensor([idx.shape[1] + i]), *st)
            torch.testing.assert_close(logits, steps[:, i:i + 1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- onnx
@pytest.mark.parametrize("preset", ["hybrid", "transformer-moe",
                                    pytest.param("transformer-sliding", marks=pytest.mark.slow)])
def test_onnx_prefill_and_decode_in_onnxruntime(runs, preset, tmp_path):
    _onnx_parity(runs[preset], tmp_path)


def _onnx_parity(run, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slmlab.export.onnx import run_onnx
    from slmlab.export.step import reference_decode

    out = tmp_path / "onnx"
    rc, err, _ = convert("--run", run, "--to", "onnx", "--out", out, "--max-len", 64)
    assert rc == 0, err
    model, tok = ours(run)
    idx = prompt(tok).repeat(2, 1)
    pre, toks, steps = reference_decode(model, idx, 16)
    got_pre, got_first, got_toks, got_steps = run_onnx(out, idx, 16, feed=toks)
    torch.testing.assert_close(got_pre, pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_first, pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_steps, steps, atol=1e-4, rtol=0)
    # a different batch size and length than the export example: the axes are dynamic
    short = idx[:1, :5]
    torch.testing.assert_close(run_onnx(out, short, 0)[0], model(short).detach(), atol=1e-4, rtol=0)
    # past max_len the states' writes fall off their end: wrong logits without an error, so it is refused
    with pytest.raises(ConfigError, match=f"{idx.shape[1]} prompt tokens \\+ {65 - idx.shape[1]} steps exceed the "
                                          "export's max_len 64"):
        run_onnx(out, idx, 65 - idx.shape[1])
    meta = json.loads((out / "export.json").read_text())
    assert meta["start_id"] == tok.start_id and "bos_id" not in meta  # bos never trained (as --to hf/gguf)
    return out, err


def test_the_bench_parity_of_a_runtime_with_nan_logits_is_inf():
    from slmlab.export.bench import _diff

    z = torch.zeros(1, 3, 5)
    assert _diff(z, torch.full((1, 4, 5), float("nan")), z, torch.zeros(1, 4, 5)) == float("inf")  # max() gave 0
    assert _diff(z, torch.ones(1, 4, 5), z, torch.zeros(1, 4, 5)) == 1.0


# ---------------------------------------------------------------- mamba2: its export graphs run the whole-input core
@pytest.fixture(scope="module")
def mamba_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "mamba", "hybrid", layers="MMA",
                    mixer_opts={"mamba2": {"d_state": 16, "headdim": 16, "ngroups": 2}})


def test_mamba2_model_in_onnxruntime(mamba_run, tmp_path):
    """Prefill (dynamic batch and length), the prompt through decode.onnx and 16 fed steps equal our
    decode: arch/mamba2.py's ssd_whole under export, its recurrence in eager."""
    _onnx_parity(mamba_run, tmp_path)


@pytest.mark.slow  # ~50 s each on a 2-core CI machine: the suite's 15-minute budget
def test_mamba2_model_in_executorch(mamba_run, tmp_path):
    """XNNPACK lowered the 6-dim chunked scan and then failed to load it ("Failed to define tensor"):
    the export core keeps to 3 dims, and executorch.check_loads refuses a program the runtime cannot load."""
    _executorch_parity(mamba_run, tmp_path)


# slow (~30 s each on 2 cores): the default suite stays inside CI's 15 minutes
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "executorch"])
def test_fp16_export_keeps_a_recurrent_state_fp32(mamba_run, tmp_path, fmt):
    """The block keeps its SSM state h in fp32 under any weight dtype, and so does an fp16 graph: the
    runners made every state fp16, and onnxruntime / ExecuTorch refused the input. export.json lists
    each state's dtype; run_pte reads the program's. Logits within fp16's rounding of ours."""
    pytest.importorskip("onnxruntime" if fmt == "onnx" else "executorch.runtime")
    from slmlab.export.step import reference_decode

    out = tmp_path / ("onnx" if fmt == "onnx" else "m.pte")
    rc, err, _ = convert("--run", mamba_run, "--to", fmt, "--out", out, "--max-len", 64, "--dtype", "fp16")
    assert rc == 0, err
    model, tok = ours(mamba_run)
    idx = prompt(tok)
    pre, toks, steps = reference_decode(model, idx, 4)
    if fmt == "onnx":
        from slmlab.export.onnx import run_onnx

        dtypes = json.loads((out / "export.json").read_text())["state_dtypes"]
        assert dtypes == ["float16", "float32", "float16", "float32", "float16", "float16"]
        got_pre, _, _, got_steps = run_onnx(out, idx, 4, feed=toks)
    else:
        from slmlab.export.executorch import run_pte

        got_pre, _, got_steps = run_pte(out, idx, 4, feed=toks)
    torch.testing.assert_close(got_pre.float(), pre, atol=3e-2, rtol=0)
    torch.testing.assert_close(got_steps.float(), steps, atol=3e-2, rtol=0)


def test_mamba2_model_coreml_spec_names_its_states(mamba_run, tmp_path):
    pytest.importorskip("coremltools")
    from slmlab.export.coreml import describe

    out = tmp_path / "m.mlpackage"
    rc, err, _ = convert("--run", mamba_run, "--to", "coreml", "--out", out, "--max-len", 64)
    assert rc == 0, err
    inputs = describe(out)["inputs"]
    assert inputs == {"input_ids": [1, 1], "pos": [1], "conv_0": [1, 192, 3], "h_0": [1, 8, 16, 16],
                      "conv_1": [1, 192, 3], "h_1": [1, 8, 16, 16], "k_2": [1, 2, 64, 16], "v_2": [1, 2, 64, 16]}


# ---------------------------------------------------------------- deltanet: one token a call
@pytest.fixture(scope="module")
def deltanet_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "deltanet", "hybrid", layers="DDA")


def test_deltanet_model_exports_one_token_graphs_to_onnxruntime(deltanet_run, tmp_path):
    """Its chunked delta rule cannot be traced with a symbolic length (a loop over chunks, a triangular
    solve ONNX has no operator for): decode.onnx takes one token a call, there is no model.onnx, the
    prompt is fed token by token, and every logit equals our decode. convert says so in one line."""
    out, err = _onnx_parity(deltanet_run, tmp_path)
    meta = json.loads((out / "export.json").read_text())
    assert meta["one_token"] is True and meta["graphs"] == ["decode.onnx"] and not (out / "model.onnx").exists()
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: the onnx graph takes one token a call (a prompt is fed "
                                                   "token by token): block 'deltanet': its chunked delta rule")


@pytest.mark.slow  # an ExecuTorch export: ~15 s on 2 cores
def test_deltanet_model_in_executorch(deltanet_run, tmp_path):
    _executorch_parity(deltanet_run, tmp_path)


def test_deltanet_model_coreml_spec(deltanet_run, tmp_path):
    """Core ML's graph is one token a call for every model: deltanet's exports there as it is."""
    pytest.importorskip("coremltools")
    from slmlab.export.coreml import describe

    out = tmp_path / "m.mlpackage"
    rc, err, _ = convert("--run", deltanet_run, "--to", "coreml", "--out", out, "--max-len", 64)
    assert rc == 0 and "note:" not in err, err
    assert list(describe(out)["inputs"]) == ["input_ids", "pos", "conv_0", "S_0", "conv_1", "S_1", "k_2", "v_2"]


def test_executorch_refuses_to_publish_a_program_its_runtime_cannot_load(tmp_path):
    pytest.importorskip("executorch.runtime")
    from slmlab.export.executorch import check_loads

    (tmp_path / "m.pte").write_bytes(b"not a program")
    with pytest.raises(ConfigError, match="the ExecuTorch runtime cannot load the exported program"):
        check_loads(tmp_path / "m.pte")


# ---------------------------------------------------------------- gguf
@pytest.mark.parametrize("preset,dtype,quant,tol", [("hybrid", "fp32", None, 0.0), ("transformer", "fp16", None, 2e-3),
                                                    ("hybrid", "fp32", "q8_0", 2e-2)])
def test_gguf_written_and_read_back(runs, preset, dtype, quant, tol, tmp_path):
    pytest.importorskip("gguf")
    from slmlab.export.gguf import read_gguf
    from slmlab.hf import to_hf_state_dict

    out = tmp_path / "m.gguf"
    argv = ["--run", runs[preset], "--to", "gguf", "--out", out, "--dtype", dtype] + (["--quant", quant] if quant else [])
    rc, err, _ = convert(*argv)
    assert rc == 0, err
    meta, tensors = read_gguf(out)
    model, tok = ours(runs[preset])
    arch = "lfm2" if preset == "hybrid" else "qwen3"
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == 3 and meta[f"{arch}.embedding_length"] == 64
    assert meta[f"{arch}.feed_forward_length"] == 96
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.tokens"][:4] == ["<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"]
    assert len(meta["tokenizer.ggml.tokens"]) == tok.vocab_size
    assert meta["tokenizer.ggml.eos_token_id"] == 1
    if arch == "lfm2":
        assert meta["lfm2.attention.head_count_kv"] == [0, 0, 2]
        assert meta["lfm2.shortconv.l_cache"] == 3
    hf_sd = to_hf_state_dict(model)
    assert len(tensors) == len(hf_sd)
    emb = tensors["token_embd.weight"]
    want = model.embed.weight.detach().numpy()
    assert emb.shape == want.shape
    assert abs(emb - want).max() <= tol * max(1.0, abs(want).max())
    assert (tensors["output_norm.weight" if arch == "qwen3" else "token_embd_norm.weight"]
            == model.norm.weight.detach().numpy()).all()  # norms stay f32 in every type


def test_gguf_refuses_what_llama_cpps_moe_graphs_would_drop(tmp_path):
    """llama.cpp renormalises the top-k weights in every MoE graph, and its lfm2moe reads no routed scale:
    such models are refused, not written to give other logits."""
    pytest.importorskip("gguf")
    for preset, opts, needle in (
            ("transformer-moe", {"experts": 4, "norm_topk": False}, "llama.cpp renormalises the top-k expert weights"),
            ("hybrid-moe", {"experts": 4, "router": "sigmoid", "routed_scale": 1.5}, "llama.cpp's lfm2moe has no routed scale")):
        run = make_run(tmp_path / preset, preset, mixer_opts={"moe": opts})
        rc, err, _ = convert("--run", run, "--to", "gguf", "--out", tmp_path / "x.gguf")
        assert rc == 2 and needle in err and not (tmp_path / "x.gguf").exists(), err


def test_gguf_names_the_pre_tokenizer_llama_cpp_must_use_and_types_added_tokens(tmp_path):
    """Every tokenizer was written as gpt-2 (a Qwen2 one cuts '(self' whole, GPT-2's regex '(' 'self'), and
    an added <think> as NORMAL, which llama.cpp never produces (no merges build it)."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from slmlab.export.gguf import _LLAMA3_SPLIT, _tokenizer_metadata, gguf_pre
    from slmlab.tokenizer import Tokenizer

    own = train_tokenizer(["def f(self): return 1234 + 5"] * 50, 300).with_added(["<think>", "<|fim_prefix|>"])
    assert gguf_pre(own) == "gpt-2"

    def with_pre(pre) -> Tokenizer:
        hf = HFTokenizer.from_str(own.to_json())
        hf.pre_tokenizer = pre
        return Tokenizer(hf)

    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    qwen2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    for regex, name in ((_LLAMA3_SPLIT, "llama-bpe"), (qwen2, "qwen2")):
        tok = with_pre(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), *split]))
        assert gguf_pre(tok) == name
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
    assert gguf_pre(with_pre(smollm)) == "smollm"  # SmolLM's and SmolLM2's (docs/export.md's import example)
    for pre in (pre_tokenizers.Metaspace(), pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\d"), "isolated"),
                                                                      *split])):
        with pytest.raises(ConfigError, match="llama.cpp would cut text differently"):
            gguf_pre(with_pre(pre))

    class Writer:  # records what _tokenizer_metadata adds
        def __init__(self):
            self.got = {}

        def __getattr__(self, name):
            return lambda value: self.got.__setitem__(name, value)

    w = Writer()
    _tokenizer_metadata(w, own, own.vocab_size)
    types = dict(zip(w.got["add_token_list"], w.got["add_token_types"]))
    assert types["<think>"] == gguf.TokenType.USER_DEFINED and types["<|eos|>"] == gguf.TokenType.CONTROL
    assert types["<|fim_prefix|>"] == gguf.TokenType.CONTROL  # looks like a control token, as llama.cpp types it
    assert w.got["add_tokenizer_pre"] == "gpt-2"


def test_lfm2_with_its_own_head_dim_is_refused_by_gguf_as_by_hf(tmp_path):
    """llama.cpp's lfm2 reads no key_length: the file was written and could not load (attn_q 128 x 64)."""
    pytest.importorskip("gguf")
    run = make_run(tmp_path / "r", "hybrid", d_model=64, n_heads=4, n_kv_heads=2, head_dim=32)
    for fmt, out in (("gguf", tmp_path / "x.gguf"), ("hf", tmp_path / "x")):
        rc, err, _ = convert("--run", run, "--to", fmt, "--out", out)
        assert rc == 2 and "Lfm2ForCausalLM fixes head_dim = d_model / n_heads" in err and not out.exists(), err


def test_gguf_refuses_sliding_window(runs, tmp_path):
    pytest.importorskip("gguf")
    rc, err, _ = convert("--run", runs["transformer-sliding"], "--to", "gguf", "--out", tmp_path / "x.gguf")
    assert rc == 2 and "sliding" in err and not (tmp_path / "x.gguf").exists()


def llama_logits(path, ids, text=None, repack=True):
    """All-position logits from llama.cpp (llama-cpp-python) with an f32 KV cache; if `text` is
    given, also checks that llama.cpp's tokenizer (from the GGUF metadata) gives `ids` for it.
    repack=False: without llama.cpp's extra weight buffers (slmlab/export/gguf.py open_llama)."""
    pytest.importorskip("llama_cpp")
    from slmlab.export.gguf import open_llama

    llm = open_llama(path, repack=repack, n_ctx=256, logits_all=True, n_threads=2, n_batch=256,
                     type_k=0, type_v=0, verbose=False)  # GGML_TYPE_F32 = 0
    if text is not None:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    return torch.tensor(llm.scores[:len(ids)].copy())


@pytest.mark.parametrize("preset,arch", [("hybrid-mamba", "mamba2"), ("hybrid-granite", "granitehybrid")])
def test_gguf_of_mamba2_models_holds_what_llama_cpp_reads(runs, preset, arch, tmp_path):
    """llama.cpp's mamba2 / granitehybrid keys and tensors, as its converter makes them from transformers'
    classes: A = -exp(A_log) and D as [heads, 1], the grouped norm as [groups, d_inner / groups], Granite's
    fused gate|up split, RoPE switched on (granitehybrid's flag). llama.cpp's logits: the slow test below."""
    pytest.importorskip("gguf")
    from slmlab.export.gguf import read_gguf

    out = tmp_path / "m.gguf"
    rc, err, _ = convert("--run", runs[preset], "--to", "gguf", "--out", out)
    assert rc == 0, err
    meta, tensors = read_gguf(out)
    model, _ = ours(runs[preset])
    assert meta["general.architecture"] == arch
    assert (meta[f"{arch}.ssm.inner_size"], meta[f"{arch}.ssm.state_size"], meta[f"{arch}.ssm.group_count"],
            meta[f"{arch}.ssm.time_step_rank"], meta[f"{arch}.ssm.conv_kernel"]) == (128, 16, 2, 8, 4)
    mixer = model.layers[0].mixer
    assert (tensors["blk.0.ssm_a"] == -mixer.A_log.detach().exp()[:, None].numpy()).all()
    assert tensors["blk.0.ssm_d"].shape == (8, 1) and tensors["blk.0.ssm_norm.weight"].shape == (2, 64)
    assert tensors["blk.0.ssm_conv1d.weight"].shape == (192, 4)
    if arch == "granitehybrid":
        assert meta["granitehybrid.attention.head_count_kv"] == [0, 0, 2]
        assert meta["granitehybrid.rope.scaling.finetuned"] is True
        w1, w3 = model.layers[0].mlp.w1.weight.detach().numpy(), model.layers[0].mlp.w3.weight.detach().numpy()
        assert (tensors["blk.0.ffn_gate.weight"] == w1).all() and (tensors["blk.0.ffn_up.weight"] == w3).all()
    else:
        assert not [n for n in tensors if "ffn" in n or "attn_q" in n]


@pytest.mark.slow
@pytest.mark.parametrize("preset,tol", [("hybrid", 0.3), ("transformer", 0.3), ("hybrid-mamba", 0.3),
                                        ("hybrid-granite", 0.3), ("transformer-moe", 1.5)])
def test_llama_cpp_runs_q8_0_files_without_repacking(runs, preset, tol, tmp_path):
    """llama-cpp-python 0.3.36 segfaults on quantized files (Q8_0, Q4_0: any model, llama.cpp's own
    quantizer's output too) on this project's AMX CPUs, with its extra weight buffers (AMX / repack) on;
    without them our Q8_0 files run. Q8_0 rounding moves these tiny random models' logits by ~0.1; a MoE
    by more, since rounding the router can flip a token's experts (our own model with the file's
    rounded expert weights moved 0.39)."""
    pytest.importorskip("llama_cpp")
    out = tmp_path / "q.gguf"
    rc, err, _ = convert("--run", runs[preset], "--to", "gguf", "--out", out, "--quant", "q8_0")
    assert rc == 0, err
    model, tok = ours(runs[preset])
    ids = tok.encode(TEXT[:200])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    diff = (llama_logits(out, ids, TEXT[:200], repack=False) - want).abs().max().item()
    print(f"llama.cpp {preset} q8_0 (no repack) max |logit diff| = {diff:.2e}")
    assert diff < tol


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["hybrid", "transformer", "hybrid-mamba", "hybrid-granite", "hybrid-granite-ibm",
                                    "transformer-moe", "hybrid-granite-moe", "hybrid-moe", "transformer-mixtral"])
def test_llama_cpp_logits_match(runs, preset, tmp_path):
    pytest.importorskip("llama_cpp")
    out = tmp_path / "m.gguf"
    assert convert("--run", runs[preset], "--to", "gguf", "--out", out)[0] == 0
    model, tok = ours(runs[preset])
    ids = tok.encode(TEXT[:200])
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    got = llama_logits(out, ids, TEXT[:200])
    diff = (got - want).abs().max().item()
    print(f"llama.cpp {preset} f32 max |logit diff| = {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.slow
def test_llama_cpp_on_trained_hybrid(tmp_path):
    """Train a small hybrid for 20 steps with train.py, export f32 GGUF, compare llama.cpp's logits."""
    pytest.importorskip("llama_cpp")
    run = tmp_path / "run"
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--arch", "hybrid", "--out", str(run), "train.steps=20",
                    "model.d_model=64", "train.eval_every=20", "train.sample_tokens=8", "logging.progress=false"],
                   check=True, cwd=ROOT)
    out = tmp_path / "hybrid.gguf"
    assert convert("--run", run, "--to", "gguf", "--out", out)[0] == 0
    model, tok = ours(run)
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)  # é ü 😀"
    ids = tok.encode(text)
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    got = llama_logits(out, ids, text)
    diff = (got - want).abs().max().item()
    print(f"llama.cpp trained hybrid ({len(ids)} tokens) f32 max |logit diff| = {diff:.2e}")
    assert diff < 1e-3


# ---------------------------------------------------------------- coreml
def test_coreml_package_spec(runs, tmp_path):
    pytest.importorskip("coremltools")
    from slmlab.export.coreml import describe, predict_steps

    out = tmp_path / "m.mlpackage"
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "coreml", "--out", out, "--max-len", 64)
    assert rc == 0, err
    info = describe(out)
    assert info["inputs"] == {"input_ids": [1, 1], "pos": [1], "conv_0": [1, 64, 2], "conv_1": [1, 64, 2],
                              "k_2": [1, 2, 64, 16], "v_2": [1, 2, 64, 16]}
    assert info["outputs"] == {"logits": [1, 1, 300], "conv_0_out": [1, 64, 2], "conv_1_out": [1, 64, 2],
                               "k_2_out": [1, 2, 64, 16], "v_2_out": [1, 2, 64, 16]}
    if sys.platform == "darwin":  # the real runtime: same logits as ours, token by token
        model, tok = ours(runs["hybrid"])
        ids = tok.encode("def main(argv):")
        with torch.no_grad():
            torch.testing.assert_close(predict_steps(out, ids), model(torch.tensor([ids]))[0], atol=1e-3, rtol=0)


def test_sliding_window_model_converts_to_coreml(tmp_path):
    """The window's mask was `a & b` on bools, which coremltools' torch.export frontend has no rule for
    (a traceback); torch.logical_and converts."""
    pytest.importorskip("coremltools")
    from slmlab.export.coreml import describe

    run = make_run(tmp_path / "run", "transformer", window_pattern="S", window=16)
    rc, err, _ = convert("--run", run, "--to", "coreml", "--out", tmp_path / "m.mlpackage", "--max-len", 64)
    assert rc == 0, err
    assert describe(tmp_path / "m.mlpackage")["outputs"]["logits"] == [1, 1, 300]


# ---------------------------------------------------------------- executorch + int8
def _executorch_parity(run, tmp_path, quant=None):
    pytest.importorskip("executorch.runtime")
    from slmlab.export.executorch import run_pte
    from slmlab.export.quant import fake_quantize
    from slmlab.export.step import reference_decode

    out = tmp_path / "m.pte"
    argv = ["--run", run, "--to", "executorch", "--out", out, "--max-len", 64] + (["--quant", quant, "--no-eval"] if quant else [])
    rc, err, _ = convert(*argv)
    assert rc == 0, err
    model, tok = ours(run)
    if quant:
        fake_quantize(model)  # the reference for an int8 graph is the dequantized float model
    idx = prompt(tok)
    pre, toks, steps = reference_decode(model, idx, 8)
    got_pre, _, got_steps = run_pte(out, idx, 8, feed=toks)
    torch.testing.assert_close(got_pre, pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_steps, steps, atol=1e-4, rtol=0)
    return out


def test_executorch_prefill_and_decode(runs, tmp_path):
    _executorch_parity(runs["hybrid"], tmp_path)


@pytest.mark.slow  # ~50 s each on a 2-core CI machine: the suite's 15-minute budget
def test_moe_model_in_executorch_and_coreml(runs, tmp_path):
    """An export graph runs every expert under a gate that is zero off the top k (arch/moe.py moe_dense):
    no data-dependent shapes for torch.export, and the same logits as the sorted core in eager."""
    _executorch_parity(runs["transformer-moe"], tmp_path)
    pytest.importorskip("coremltools")
    from slmlab.export.coreml import describe

    out = tmp_path / "m.mlpackage"
    rc, err, _ = convert("--run", runs["transformer-moe"], "--to", "coreml", "--out", out, "--max-len", 64)
    assert rc == 0, err
    assert list(describe(out)["inputs"]) == ["input_ids", "pos", "k_0", "v_0", "k_1", "v_1", "k_2", "v_2"]


@pytest.mark.slow
def test_executorch_int8_smaller_and_equal_to_fake_quant(runs, tmp_path):
    fp = _executorch_parity(runs["hybrid"], tmp_path / "fp")
    q = _executorch_parity(runs["hybrid"], tmp_path / "q", quant="int8")
    assert q.stat().st_size < 0.5 * fp.stat().st_size


def test_int8_weight_only_matches_fake_quant_and_shrinks(runs):
    import copy

    from slmlab.export.quant import fake_quantize, quantize_int8, weight_bytes

    model, tok = ours(runs["hybrid"])
    q = quantize_int8(copy.deepcopy(model))
    ref = fake_quantize(copy.deepcopy(model))
    idx = prompt(tok)
    with torch.no_grad():
        torch.testing.assert_close(q(idx), ref(idx), atol=1e-5, rtol=0)
        assert (q(idx) - model(idx)).abs().max() > 0  # it did quantize
    assert weight_bytes(q) < 0.35 * weight_bytes(model)


def test_quant_flag_checked_per_format(runs, tmp_path):
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "hf", "--out", tmp_path / "o", "--quant", "int8")
    assert rc == 2 and "int8" in err
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "gguf", "--out", tmp_path / "o", "--quant", "int8")
    assert rc == 2 and "q8_0" in err


def test_missing_extra_names_it(monkeypatch, runs, tmp_path):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "gguf", "--out", tmp_path / "x.gguf")
    assert rc == 2 and "pip install -e '.[gguf]'" in err and not (tmp_path / "x.gguf").exists()


def test_export_into_its_own_run_is_refused_even_with_force(runs):
    run = Path(runs["hybrid"])
    before = sorted(p.name for p in run.iterdir())
    for out in (run, run / "hf"):
        rc, err, _ = convert("--run", run, "--to", "hf", "--out", out, "--force")
        assert rc == 2 and "is inside the source" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in run.iterdir()) == before


# ---------------------------------------------------------------- learned positions, LIF MLP
def test_decode_graph_length_is_bounded_by_learned_positions(monkeypatch, tmp_path):
    """model.pos=learned: the decode graphs' default length shrinks to model.max_positions (a note on
    stderr; export.json and the report carry the real limit); an explicit --max-len past it is refused."""
    import slmlab.export.onnx as onnx_export

    seen = []

    def fake_export(model, tok, cfg, out, opts):  # the wiring, not onnx: what the exporter is handed
        seen.append(opts.max_len)
        out.write_text("graph")
        return {"max_len": opts.max_len}

    monkeypatch.setattr(onnx_export, "export", fake_export)
    run = make_run(tmp_path / "gpt2ish", "transformer", pos="learned", max_positions=48)
    rc, err, out = convert("--run", run, "--to", "onnx", "--out", tmp_path / "o")
    assert rc == 0 and seen == [48] and json.loads(out)["max_len"] == 48
    assert err == "note: --max-len 48, not 1024: this run has model.max_positions=48 (model.pos=learned)\n"
    rc, err, _ = convert("--run", run, "--to", "onnx", "--out", tmp_path / "o2", "--max-len", 49)
    assert rc == 2 and err == ("error: --max-len 49 exceeds this run's model.max_positions=48 (model.pos=learned: no "
                               "position past it): use --max-len 48 or less\n")
    assert not (tmp_path / "o2").exists() and seen == [48]
    rc, _, out = convert("--run", run, "--to", "onnx", "--out", tmp_path / "o3", "--max-len", 32)
    assert rc == 0 and seen == [48, 32]
    rc, err, _ = convert("--run", make_run(tmp_path / "rope", "transformer"), "--to", "onnx", "--out", tmp_path / "o4")
    assert rc == 0 and seen[-1] == 1024 and err == ""  # rope positions have no table to run out of


def test_hf_export_of_learned_positions_caps_the_tokenizer_length(tmp_path):
    pytest.importorskip("transformers")
    run = make_run(tmp_path / "gpt2", "transformer", pos="learned", max_positions=48, norm="layernorm", mlp="gelu",
                   qk_norm=False, attn_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=4)
    rc, err, _ = convert("--run", run, "--to", "hf", "--out", tmp_path / "hf")
    assert rc == 0, err
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == 48


@pytest.mark.parametrize("public", [True, False], ids=["is_exporting", "export_flag"])
def test_lif_mlp_step_exports_without_spike_counting(monkeypatch, public):
    """The LIF MLP counts spikes at eval through Python floats, which torch.export cannot trace: executorch
    failed and the ONNX exporter dumped ~800 lines of partial FX graphs. The counting stands aside while
    exporting (torch.compiler.is_exporting, or on torch < 2.12 the flag it reads: arch/block.py exporting()) and still
    counts in an eval forward."""
    import contextlib
    import io

    import arch.block
    from arch.lif import spike_metrics
    from slmlab.export.step import StepLM

    cfg = build("hybrid", {"model": dict(vocab_size=61, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1, layers="CCA",
                                         mlp="lif", kernels="torch")}).model
    monkeypatch.setattr(arch.block, "_IS_EXPORTING_TRACES", public)
    model = LM(cfg).eval()
    step = StepLM(model, 16).eval()
    args = (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long), *step.init_states(1))
    err = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stderr(err):
        torch.export.export(step, args)
    assert err.getvalue() == ""
    assert not spike_metrics(model)  # nothing was counted while exporting
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert any(k.startswith("spike_rate") for k in spike_metrics(model))


def test_gguf_of_a_padded_vocabulary_lists_a_token_per_embedding_row(tmp_path):
    """An import's embedding can have more rows than its tokenizer has tokens (Qwen2.5's); llama.cpp refuses
    a token list shorter than token_embd, so the rows past the tokenizer get [PADi] tokens of type UNUSED."""
    pytest.importorskip("gguf")
    import gguf

    from slmlab.export.gguf import read_gguf

    tok = train_tokenizer([TEXT], 300)
    run = make_run(tmp_path / "run", "transformer", vocab_size=tok.vocab_size + 5)
    rc, err, _ = convert("--run", run, "--to", "gguf", "--out", tmp_path / "m.gguf")
    assert rc == 0, err
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == tok.vocab_size + 5 == tensors["token_embd.weight"].shape[0]
    assert tokens[-5:] == [f"[PAD{i}]" for i in range(tok.vocab_size, tok.vocab_size + 5)]
    assert set(types[-5:]) == {gguf.TokenType.UNUSED} and gguf.TokenType.UNUSED not in types[:-5]
    assert meta["tokenizer.ggml.bos_token_id"] == tok.start_id == tok.eos_id  # as --to hf's bos_token_id


# ---------------------------------------------------------------- what --force may replace, flags that do nothing
def test_force_never_replaces_a_folder_holding_the_source_or_a_path_of_the_other_kind(tmp_path):
    """--force once deleted runs/ (and the user's files in it) for --out runs with --run runs/mine, and
    swapped a whole folder for a .gguf file: check_out refuses both before anything is read."""
    parent = tmp_path / "A" / "runs"
    run = make_run(parent / "mine")
    (parent / "other.txt").write_text("keep")
    hf_src = tmp_path / "hub" / "model"
    hf_src.mkdir(parents=True)
    (hf_src / "config.json").write_text("{}")
    for argv in (("--run", run, "--to", "hf", "--out", parent), ("--run", run, "--to", "gguf", "--out", tmp_path / "A"),
                 ("--from-hf", hf_src, "--out", hf_src.parent)):
        rc, err, _ = convert(*argv, "--force")
        assert rc == 2 and "contains the source" in err and err.count("\n") == 1, (argv, err)
    assert (parent / "other.txt").read_text() == "keep" and (run / "model.safetensors").is_file()
    assert (hf_src / "config.json").is_file()
    folder, file = tmp_path / "export", tmp_path / "model.bin"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    file.write_text("mine")
    for fmt, out, needle in (("gguf", folder, "is a folder"), ("executorch", folder, "is a folder"),
                             ("hf", file, "is a file"), ("onnx", file, "is a file")):
        rc, err, _ = convert("--run", run, "--to", fmt, "--out", out, "--force")
        assert rc == 2 and needle in err and err.count("\n") == 1, (fmt, err)
    assert (folder / "notes.txt").read_text() == "mine" and file.read_text() == "mine"


def make_lora_run(path: Path, base: Path) -> Path:
    """A train.lora run on `base` as train.py leaves it: config with train.lora.r and init_from, and a
    weights file of (here random) adapters only."""
    from slmlab.lora import apply_lora
    from slmlab.rundir import RunDir

    cfg, model, tok = RunDir.open(base).load()
    cfg.train.lora.r, cfg.train.init_from = 4, str(base)
    apply_lora(model, cfg.train.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # B starts at zero: make the merge visible
                p.normal_(0.0, 0.05)
    path.mkdir(parents=True)
    cfg.save(path / "config.yaml")
    tok.save(path / "tokenizer.json")
    save_model(model, path / "model.safetensors")
    (path / "metrics.jsonl").write_text("{}\n")
    return path


def test_merge_lora_never_deletes_its_source_and_publishes_whole(tmp_path, monkeypatch):
    """--merge-lora R --out R --force deleted R's weights and metrics, and a merge that failed midway left
    --out without its old weights (RunDir.create removed them first): it is check_out and publish now."""
    pytest.importorskip("peft")
    from slmlab.rundir import RunDir

    base = make_run(tmp_path / "base")
    lora = make_lora_run(tmp_path / "lora", base)
    before = {p.name: p.read_bytes() for p in [*lora.iterdir(), *base.iterdir()]}
    for out in (lora, base, tmp_path):
        rc, err, _ = convert("--merge-lora", lora, "--out", out, "--force")
        assert rc == 2 and "source" in err and err.count("\n") == 1, (out, err)
    # so is an export of the LoRA run over its base (the run could no longer load)
    rc, err, _ = convert("--run", lora, "--to", "hf", "--out", base, "--force")
    assert rc == 2 and f"is inside the source {base.resolve()}" in err and err.count("\n") == 1, err
    assert {p.name: p.read_bytes() for p in [*lora.iterdir(), *base.iterdir()]} == before
    out = tmp_path / "merged"
    rc, err, _ = convert("--merge-lora", lora, "--out", out)
    assert rc == 0, err
    _, merged, tok = RunDir.open(out).load()
    idx = prompt(tok)
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), ours(lora)[0](idx), atol=1e-5, rtol=0)
    old = (out / "model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RunDir, "write_tokenizer", disk_full)
    rc, err, _ = convert("--merge-lora", lora, "--out", out, "--force")
    assert rc == 2 and (out / "model.safetensors").read_bytes() == old


@pytest.mark.parametrize("argv,needle", [
    (("--to", "hf", "--no-eval"), "--no-eval applies to --quant int8"),
    (("--to", "onnx", "--dtype", "bf16"), "--dtype bf16 is not supported for onnx"),
    (("--to", "coreml", "--dtype", "bf16"), "--dtype bf16 is not supported for coreml"),
    (("--to", "coreml"), "--to coreml writes an .mlpackage: name --out o.mlpackage"),
])
def test_flags_a_format_cannot_honour_are_refused(runs, tmp_path, argv, needle):
    """These were accepted and ignored (--no-eval without int8; coreml's bf16 became fp16), wrote a graph
    onnxruntime cannot load (bf16), or (coreml without the suffix) saved beside --out and then failed."""
    rc, err, _ = convert("--run", runs["hybrid"], "--out", tmp_path / "o", *argv)
    assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [("--dtype", "fp16"), ("--quant", "int8"), ("--max-len", "64")])
def test_run_directory_writers_refuse_export_flags(runs, tmp_path, flags):
    for src in ("--from-hf", "--merge-lora"):
        rc, err, _ = convert(src, runs["hybrid"], "--out", tmp_path / "o", *flags)
        assert rc == 2 and err == f"error: {src} writes a run directory; it takes no {flags[0]}\n", err
        assert not (tmp_path / "o").exists()


def test_onnx_refuses_to_publish_a_graph_onnxruntime_cannot_load(tmp_path):
    pytest.importorskip("onnxruntime")
    from slmlab.export.onnx import check_loads

    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(ConfigError, match="onnxruntime cannot load the exported model.onnx"):
        check_loads(tmp_path)


# ---------------------------------------------------------------- int8 with its val-bpb report, onnx int8
@pytest.mark.slow  # two ExecuTorch exports and an eval: ~60 s on 2 cores
def test_int8_val_bpb_report_is_computed_before_publishing(tmp_path, monkeypatch):
    """Without --no-eval (the default) the report evaluated the int8 model, whose head has no .weight for
    the fused loss: an AttributeError after the .pte was already published. It evaluates fake_quantize's
    float model now, and before publishing, so a failing evaluation leaves nothing at --out."""
    pytest.importorskip("executorch.runtime")
    import slmlab.export.quant as quant

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    run = make_run(tmp_path / "run", sections={
        "data": {"spec": str(corpus), "cache_dir": str(tmp_path / "cache"), "val_frac": 0.25},
        "train": {"phases": [], "seq_len": 32, "batch_size": 4}})
    out = tmp_path / "m.pte"
    rc, err, report = convert("--run", run, "--to", "executorch", "--quant", "int8", "--out", out, "--max-len", 16)
    assert rc == 0, err
    report = json.loads(report)
    assert report["fp32_bpb"] > 0 and abs(report["delta_bpb"]) < 0.05 * report["fp32_bpb"], report
    assert report["int8_weight_bytes"] < 0.35 * report["fp32_weight_bytes"] and out.is_file()

    def failing(*a, **k):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(quant, "bpb_change", failing)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        convert("--run", run, "--to", "executorch", "--quant", "int8", "--out", tmp_path / "q.pte", "--max-len", 16)
    assert not (tmp_path / "q.pte").exists()


def test_onnx_int8_runs_in_onnxruntime_equal_to_fake_quant(runs, tmp_path):
    """StepLM.prefill read the embedding's .weight, which the int8 embedding lacks: every onnx int8 failed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slmlab.export.onnx import run_onnx
    from slmlab.export.quant import fake_quantize
    from slmlab.export.step import reference_decode

    out = tmp_path / "onnx"
    rc, err, _ = convert("--run", runs["hybrid"], "--to", "onnx", "--out", out, "--max-len", 32, "--quant", "int8",
                         "--no-eval")
    assert rc == 0, err
    model, tok = ours(runs["hybrid"])
    fake_quantize(model)
    idx = prompt(tok)
    pre, toks, steps = reference_decode(model, idx, 4)
    got_pre, got_first, _, got_steps = run_onnx(out, idx, 4, feed=toks)
    for got, want in ((got_pre, pre), (got_first, pre), (got_steps, steps)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    assert json.loads((out / "export.json").read_text())["quant"] == "int8"


# ---------------------------------------------------------------- small --max-len, context lengths, q8_0 report
@pytest.mark.slow  # five ONNX/ExecuTorch exports: ~40 s on 2 cores
def test_decode_graphs_export_at_the_smallest_lengths(tmp_path):
    """The graphs were traced from 8-token (onnx) and 4-token (executorch) examples: a smaller --max-len,
    or the default under a small model.max_positions, was a torch.export traceback."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from slmlab.export.onnx import run_onnx
    from slmlab.export.step import reference_decode

    run = make_run(tmp_path / "gpt2ish", "transformer", pos="learned", max_positions=3)
    rc, err, _ = convert("--run", run, "--to", "onnx", "--out", tmp_path / "onnx")
    assert rc == 0 and err.startswith("note: --max-len 3, not 1024"), err
    model, tok = ours(run)
    idx = prompt(tok, 2)
    pre, toks, steps = reference_decode(model, idx, 1)
    got_pre, _, _, got_steps = run_onnx(tmp_path / "onnx", idx, 1, feed=toks)
    torch.testing.assert_close(got_pre, pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_steps, steps, atol=1e-4, rtol=0)
    pytest.importorskip("executorch.runtime")
    from slmlab.export.executorch import run_pte

    rc, err, _ = convert("--run", run, "--to", "executorch", "--out", tmp_path / "m.pte", "--max-len", 1)
    assert rc == 0, err
    torch.testing.assert_close(run_pte(tmp_path / "m.pte", idx[:, :1])[0], pre[:, :1], atol=1e-4, rtol=0)


def test_hf_and_gguf_context_length_is_max_len_not_a_constant(runs, tmp_path):
    """Both wrote 4096 whatever --max-len said. A RoPE run states --max-len, else DEFAULT_CONTEXT; a
    learned-position run its model.max_positions, and no --max-len past it."""
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from slmlab.export import DEFAULT_CONTEXT
    from slmlab.export.gguf import read_gguf

    for argv, want in (((), DEFAULT_CONTEXT), (("--max-len", 32768), 32768)):
        out = tmp_path / f"hf{want}"
        assert convert("--run", runs["hybrid"], "--to", "hf", "--out", out, *argv)[0] == 0
        assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == want
        assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == want
    assert convert("--run", runs["hybrid"], "--to", "gguf", "--out", tmp_path / "m.gguf", "--max-len", 512)[0] == 0
    assert read_gguf(tmp_path / "m.gguf")[0]["lfm2.context_length"] == 512
    run = make_run(tmp_path / "gpt2", "transformer", pos="learned", max_positions=48, norm="layernorm", mlp="gelu",
                   qk_norm=False, attn_bias=True, attn_out_bias=True, mlp_bias=True, n_kv_heads=4)
    rc, err, _ = convert("--run", run, "--to", "hf", "--out", tmp_path / "g", "--max-len", 49)
    assert rc == 2 and "exceeds this run's model.max_positions=48" in err and not (tmp_path / "g").exists()


def test_gguf_q8_0_reports_each_type_and_stores_fallback_rows_in_dtype(tmp_path):
    """Rows not a multiple of 32 cannot be Q8_0: they were F32 whatever --dtype said, and the report said
    Q8_0 for a file mostly F32. They take --dtype, a note says how much fell back, the report counts types."""
    gguf = pytest.importorskip("gguf")
    run = make_run(tmp_path / "run", "transformer", ffn_dim=72)  # the down projection's rows are 72 long
    out = tmp_path / "m.gguf"
    rc, err, report = convert("--run", run, "--to", "gguf", "--out", out, "--quant", "q8_0", "--dtype", "fp16")
    assert rc == 0, err
    assert err.startswith("note: --quant q8_0: 3 matrices (") and "as F16 (--dtype fp16)" in err, err
    types = json.loads(report)["tensor_types"]
    written = {}
    for t in gguf.GGUFReader(str(out)).tensors:
        n = written.setdefault(t.tensor_type.name, {"tensors": 0, "weights": 0})
        n["tensors"], n["weights"] = n["tensors"] + 1, n["weights"] + int(t.n_elements)
    assert types == written and set(types) == {"Q8_0", "F16", "F32"} and types["F16"]["tensors"] == 3


@pytest.mark.slow  # ~26 s on 2 cores; the int8 path itself stays in the default suite (dense models)
def test_int8_onnx_export_of_a_moe_quantizes_its_experts(runs, tmp_path):
    """--quant int8 stores the expert stacks as int8 too (a dequantizing parametrization: the weights a
    MoE is mostly made of), and onnxruntime equals the fake-quantized model."""
    pytest.importorskip("onnxruntime")
    from slmlab.export.onnx import run_onnx
    from slmlab.export.quant import fake_quantize
    from slmlab.export.step import reference_decode

    onnx = pytest.importorskip("onnx")
    out = tmp_path / "int8"
    rc, err, _ = convert("--run", runs["transformer-moe"], "--to", "onnx", "--out", out, "--max-len", 64,
                         "--quant", "int8", "--no-eval")
    assert rc == 0, err
    inits = {i.name: (list(i.dims), onnx.TensorProto.DataType.Name(i.data_type))
             for i in onnx.load(out / "decode.onnx").graph.initializer}
    stacks = {k: v for k, v in inits.items() if k.endswith(("w13.original", "w2.original"))}
    assert len(stacks) == 6 and all(t == "INT8" for _, t in stacks.values()), stacks  # 3 layers x 2 stacks
    assert not [k for k, (dims, t) in inits.items() if t == "FLOAT" and dims in ([4, 96, 64], [4, 64, 48])]
    model, tok = ours(runs["transformer-moe"])
    fake_quantize(model)
    idx = prompt(tok)
    pre, toks, steps = reference_decode(model, idx, 8)
    got_pre, _, _, got_steps = run_onnx(tmp_path / "int8", idx, 8, feed=toks)
    torch.testing.assert_close(got_pre, pre, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_steps, steps, atol=1e-4, rtol=0)


def test_an_out_under_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("mine")
    run = make_run(tmp_path / "run")
    rc, err, _ = convert("--run", run, "--to", "hf", "--out", tmp_path / "afile" / "o")
    assert rc == 2 and err.count("\n") == 1 and "a file stands where a directory is expected" in err, err
    assert (tmp_path / "afile").read_text() == "mine"


def test_int8_report_without_the_runs_data_is_refused_before_the_export(tmp_path):
    """data.spec is kept as typed (relative to where train.py ran): from elsewhere the report failed only
    after the export, ~40 s in, without saying --no-eval skips it."""
    run = make_run(tmp_path / "run", sections={"data": {"spec": "../elsewhere/corpus.txt"}})
    rc, err, _ = convert("--run", run, "--to", "onnx", "--quant", "int8", "--out", tmp_path / "o")
    assert rc == 2 and err.count("\n") == 1 and "data path not found: ../elsewhere/corpus.txt" in err, err
    assert "--no-eval" in err and not (tmp_path / "o").exists()
