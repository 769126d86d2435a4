"""LoRA through peft: only adapters train (Muon or AdamW), checkpoints hold adapters only, resume
continues exactly, merging gives the adapter model's logits, and the bad inputs are one line, exit 2."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from sft_helpers import make_base, sft_overrides, write_chat
from trainer_helpers import ROOT, losses, run_train

from slmlab.checkpoint import checkpoint_dirs, load_tensors
from slmlab.config import load_config
from slmlab.lora import ADAPTER_MARK
from slmlab.rundir import RunDir, model_from_config


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("lorabase"))


def lora_args(tmp, base, steps, **extra):
    chat = write_chat(tmp / "chat.jsonl")
    return ["--arch", "hybrid", "--data", str(chat), *sft_overrides(tmp, steps=steps, **{
        "train.init_from": str(base), "train.lora.r": 4, "train.lora.alpha": 8, "optim.name": "muon", **extra})]


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lorarun")
    res = run_train([*lora_args(tmp, base, 12, **{"train.ckpt_every": 4, "train.keep_checkpoints": 3}),
                     "--out", str(tmp / "run")])
    assert res.returncode == 0, res.stderr
    assert "LoRA: " in res.stdout and "trainable of" in res.stdout
    return tmp / "run"


def adapter_model(run_dir):
    """Base weights + the run's adapters, not merged."""
    from slmlab.checkpoint import load_model_weights
    from slmlab.lora import apply_lora

    cfg = RunDir.open(run_dir).config()
    model = RunDir.open(cfg.train.init_from).load_weights(model_from_config(cfg))
    return load_model_weights(apply_lora(model, cfg.train.lora), run_dir / "model.safetensors").eval()


def test_checkpoints_and_final_weights_hold_adapters_only(lora_run):
    for f in [lora_run / "model.safetensors"] + [d / "model.safetensors" for d in checkpoint_dirs(lora_run)]:
        keys = list(load_tensors(f))
        assert keys and all(ADAPTER_MARK in k for k in keys), keys[:3]
    assert [d.name for d in checkpoint_dirs(lora_run)] == ["step_000004", "step_000008", "step_000012"]


def test_only_adapters_change(base, lora_run):
    _, base_model, _ = RunDir.open(base).load()
    trained = adapter_model(lora_run)
    base_sd, sd = base_model.state_dict(), trained.state_dict()
    for k, v in sd.items():
        if ADAPTER_MARK not in k:
            assert torch.equal(v, base_sd[k.replace(".base_layer", "")]), k
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)  # B starts at zero: it trained


def test_merge_gives_the_adapter_models_logits(lora_run, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--merge-lora", str(lora_run), "--out",
                          str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    cfg, merged, _ = RunDir.open(tmp_path / "merged").load()
    assert cfg.train.lora.r == 0 and not any(ADAPTER_MARK in k for k in load_tensors(tmp_path / "merged" /
                                                                                      "model.safetensors"))
    x = torch.randint(0, 260, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapter_model(lora_run)(x), atol=1e-5, rtol=1e-5)
    assert (tmp_path / "merged" / "chat_template.jinja").is_file()


def test_resume_continues_exactly(lora_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    for d in checkpoint_dirs(run)[1:]:
        shutil.rmtree(d)  # back to step 4, as if killed after it
    res = run_train(["--resume", "--out", str(run)])
    assert res.returncode == 0, res.stderr
    assert "resumed from" in res.stdout
    a, b = losses(lora_run), losses(run)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6, (a, b)


def test_optimizer_routes_adapters_only():
    from slmlab.lora import apply_lora
    from slmlab.optim import route_params

    cfg = load_config(arch="hybrid", overrides=["model.d_model=32", "model.n_layers=3", "model.n_heads=2",
                                                "model.n_kv_heads=1", "model.vocab_size=300", "train.lora.r=2",
                                                "train.init_from=x"])
    model = apply_lora(model_from_config(cfg), cfg.train.lora)
    routes = {r.group: r.names for r in route_params(model, "muon")}
    names = [n for ns in routes.values() for n in ns]
    assert names and all(ADAPTER_MARK in n for n in names) and "muon" not in routes


@pytest.mark.parametrize("extra,needle", [
    ({"train.lora.targets": "[q_proj, nope]"}, "error: train.lora.targets ['nope'] match no module of the model"),
    ({"train.init_from": ""}, "error: train.lora needs train.init_from=RUN_DIR"),
])
def test_bad_lora_config_is_one_line_exit_2(base, tmp_path, extra, needle):
    res = run_train([*lora_args(tmp_path, base, 2, **extra), "--out", str(tmp_path / "r")])
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode == 2 and len(errors) == 1 and errors[0].startswith(needle), res.stderr
    assert "Traceback" not in res.stderr


def test_merge_lora_without_adapters_is_one_line_exit_2(base, tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--merge-lora", str(base), "--out",
                          str(tmp_path / "m")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"error: --merge-lora: {base} has no LoRA adapters (its train.lora.r is 0)"


def test_dry_run_sizes_gradients_and_optimizer_for_the_adapters_only():
    from slmlab.estimate import estimate, report

    ov = ["model.d_model=64", "model.n_layers=3", "model.vocab_size=300", "train.init_from=x"]
    full, lora = estimate(load_config(arch="hybrid", overrides=ov)), estimate(
        load_config(arch="hybrid", overrides=[*ov, "train.lora.r=4"]))
    n = lora["lora"]["trainable"]
    assert 0 < n < full["params"] and lora["static_bytes"]["gradients"] == 4 * n
    assert lora["lora"]["saved_bytes"] == (full["static_bytes"]["gradients"] + full["static_bytes"]["optimizer"]
                                           - 4 * n - 8 * n)
    assert "LoRA: " in report(lora) and full["lora"] is None


@pytest.mark.parametrize("arch,want", [("transformer", {"q_proj", "k_proj", "v_proj", "out_proj", "w1", "w2", "w3"}),
                                       ("hybrid", {"in_proj", "q_proj", "k_proj", "v_proj", "out_proj", "w1", "w2",
                                                   "w3"})])
def test_all_linear_adapts_every_linear_layer_but_the_head(arch, want):
    from slmlab.lora import apply_lora

    cfg = load_config(arch=arch, overrides=["model.d_model=32", "model.n_layers=3", "model.n_heads=2",
                                            "model.n_kv_heads=1", "model.vocab_size=300", "train.lora.r=2",
                                            "train.init_from=x"])
    model = apply_lora(model_from_config(cfg), cfg.train.lora)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ADAPTER_MARK in n}
    assert adapted == want


# ---------------------------------------------------------------- an imported Llama, with added tokens
ADDED = ["<think>", "</think>", "TOOL_USE["]


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory):
    """A tiny random transformers Llama (its own BPE and chat template) imported as a run, and tool-call data."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "examples"))
    import make_tiny_llama
    import toolcall

    tmp = tmp_path_factory.mktemp("llama")
    train, _ = toolcall.make(80, 8, seed=0)
    (tmp / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in train))
    texts = [x["prompt"] + " " + x["completion"] for x in train]
    make_tiny_llama.make(tmp / "hf", vocab=300, d_model=32, layers=2, texts=texts)
    res = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--from-hf", str(tmp / "hf"), "--out",
                          str(tmp / "base")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp / "base" / "chat_template.jinja").read_text() == make_tiny_llama.TEMPLATE
    return tmp


def test_lora_sft_of_an_imported_llama_with_added_tokens_merges_exactly(imported_llama, tmp_path):
    """import -> LoRA SFT (train.py, the added tokens' rows trainable) -> --merge-lora -> the same logits."""
    from slmlab.lora import ADDED_ROWS_MARK

    tmp, base = imported_llama, imported_llama / "base"
    ov = sft_overrides(tmp_path, steps=30, **{
        "train.init_from": str(base), "data.tokenizer": str(base), "data.added_tokens": json.dumps(ADDED),
        "train.lora.r": 8, "train.lora.alpha": 16, "train.seq_len": 64, "train.sft_eval_examples": 1})
    args = ["--config", str(base / "config.yaml"), "--data", str(tmp / "train.jsonl"), "--out",
            str(tmp_path / "sft"), *[o for o in ov if not o.startswith("model.")]]  # the imported shape
    res = run_train(args + ["--dry-run", "--json"])
    assert res.returncode == 0, res.stderr
    lora_est = json.loads(res.stdout)["lora"]
    res = run_train(args)
    assert res.returncode == 0, res.stderr
    # the dry run grows the vocabulary and counts the added rows as the trainer does
    assert f"LoRA: {lora_est['trainable']:,} trainable" in res.stdout, (lora_est, res.stdout)
    assert "data.added_tokens: model.vocab_size 300 -> 303" in res.stdout and "chat template from the tokenizer" \
        in res.stdout
    loss = list(losses(tmp_path / "sft").values())
    assert sum(loss[-5:]) / 5 < 0.93 * sum(loss[:5]) / 5, loss  # on the replies (random weights learn slowly)
    saved = list(load_tensors(tmp_path / "sft" / "model.safetensors"))
    assert sum(ADDED_ROWS_MARK in k for k in saved) == 1, saved  # tied: stored once

    cfg, lora_model, tok = RunDir.open(tmp_path / "sft").load()
    assert cfg.arch == "transformer"  # --config's arch, not train.py's default
    assert tok.encode("<think>")[0] == 300 and lora_model.lm_head.weight is lora_model.embed.weight
    new = lora_model.embed.weight[300:]
    assert not torch.allclose(new[0], new[1]) and not torch.allclose(new[1], new[2])  # the new rows trained
    _, base_model, _ = RunDir.open(base).load()
    torch.testing.assert_close(lora_model.embed.weight[:300], base_model.embed.weight, atol=0, rtol=0)

    res = subprocess.run([sys.executable, str(ROOT / "convert.py"), "--merge-lora", str(tmp_path / "sft"), "--out",
                          str(tmp_path / "merged")], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    mcfg, merged, _ = RunDir.open(tmp_path / "merged").load()
    assert mcfg.train.lora.r == 0 and mcfg.model.vocab_size == 303
    assert (tmp_path / "merged" / "chat_template.jinja").read_text() == (base / "chat_template.jinja").read_text()
    x = torch.randint(0, 303, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lora_model(x), atol=1e-5, rtol=0)
        # and the adapters did something: the merged model is not the grown base
        assert (merged(x)[..., :300] - base_model(x)).abs().max() > 1e-3


def test_added_rows_of_an_untied_head_save_load_and_merge(tmp_path):
    """An untied head gets trainable added rows of its own; both are saved, load back and merge."""
    from slmlab.checkpoint import load_model_weights, weights_for_save
    from slmlab.lora import apply_lora, merge_lora, trainable_report

    cfg = load_config(overrides=["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
                                 "model.layers=A", "model.vocab_size=12", "model.tie_embeddings=false",
                                 "train.lora.r=2", "train.init_from=x"])
    model = apply_lora(model_from_config(cfg), cfg.train.lora, n_old=9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
    assert trainable == ["embed.parametrizations.weight.0.added_rows", "lm_head.parametrizations.weight.0.added_rows"]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_plain = sum(p.numel() for p in model_from_config(cfg).parameters())
    n_adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert trainable_report(model) == (f"LoRA: {n_train:,} trainable of {n_plain + n_adapters:,} parameters "
                                       f"({100 * n_train / (n_plain + n_adapters):.2f}%)")  # added rows counted once
    sd = weights_for_save(model)
    assert sd["embed.parametrizations.weight.0.added_rows"].shape == (3, 16) and len([k for k in sd if "added" in k]) == 2
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "w.safetensors"))
    other = apply_lora(model_from_config(cfg), cfg.train.lora, n_old=9)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "added" not in k},
                          strict=False)
    load_model_weights(other, tmp_path / "w.safetensors")
    x = torch.randint(0, 12, (1, 7))
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(other(x), want, atol=0, rtol=0)
        merged = merge_lora(other)
        torch.testing.assert_close(merged(x), want, atol=1e-5, rtol=0)
    assert merged.lm_head.weight is not merged.embed.weight and "embed.weight" in dict(merged.named_parameters())
