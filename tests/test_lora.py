"""LoRA through peft: only adapters train (Muon or AdamW), checkpoints hold adapters only, resume
continues exactly, merging gives the adapter model's logits, and the bad inputs are one line, exit 2."""
import json
import shutil
import sys

import pytest
import torch
from sft_helpers import sft_overrides, write_chat
from trainer_helpers import ROOT, losses, run_here

from slmlab.checkpoint import checkpoint_dirs, load_tensors
from slmlab.cli import run_cli
from slmlab.config import load_config
from slmlab.lora import ADAPTER_MARK
from slmlab.rundir import RunDir, model_from_config


@pytest.fixture(scope="module")
def base(sft_base):
    return sft_base  # conftest.py: one make_base run shared with test_sft.py


def lora_args(tmp, base, steps, **extra):
    chat = write_chat(tmp / "chat.jsonl")
    return ["--arch", "hybrid", "--data", str(chat), *sft_overrides(tmp, steps=steps, **{
        "train.init_from": str(base), "train.lora.r": 4, "train.lora.alpha": 8, "optim.name": "muon", **extra})]


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lorarun")
    rc, out, err = run_here("train", *lora_args(tmp, base, 12, **{"train.ckpt_every": 4, "train.keep_checkpoints": 3}),
                       "--out", tmp / "run")
    assert rc == 0, err
    assert "LoRA: " in out and "trainable of" in out
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
    rc, _, err = run_here("convert", "--merge-lora", lora_run, "--out", tmp_path / "merged")
    assert rc == 0, err
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
    rc, out, err = run_here("train", "--resume", "--out", run)
    assert rc == 0, err
    assert "resumed from" in out
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
    rc, _, err = run_here("train", *lora_args(tmp_path, base, 2, **extra), "--out", tmp_path / "r")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(needle), err
    assert "Traceback" not in err


def test_merge_lora_without_adapters_is_one_line_exit_2(base, tmp_path):
    rc, _, err = run_here("convert", "--merge-lora", base, "--out", tmp_path / "m")
    assert rc == 2
    assert err.strip().splitlines()[-1] == f"error: --merge-lora: {base} has no LoRA adapters (its train.lora.r is 0)"


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


@pytest.mark.parametrize("target,module", [("conv", "layers.0.mixer.conv is a Conv1d"),
                                           ("mixer_norm", "layers.0.mixer_norm is a RMSNorm")])
def test_a_target_that_is_not_linear_is_refused(target, module):
    """peft wraps the depthwise conv, but ShortConv reads conv.weight itself: the adapter never ran, and
    merging it raised NotImplementedError."""
    from slmlab.errors import ConfigError
    from slmlab.lora import apply_lora

    cfg = load_config(arch="hybrid", overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                                "model.n_kv_heads=1", "model.vocab_size=300", "train.lora.r=32", "model.layers=CA",
                                                f"train.lora.targets=[q_proj, {target}]", "train.init_from=x"])
    with pytest.raises(ConfigError, match=f"^train.lora.targets: {module}, not a linear layer; the linear layers: "):
        apply_lora(model_from_config(cfg), cfg.train.lora)


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
    rc, _, err = run_here("convert", "--from-hf", tmp / "hf", "--out", tmp / "base")
    assert rc == 0, err
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
    rc, out, err = run_here("train", *args, "--dry-run", "--json")
    assert rc == 0, err
    lora_est = json.loads(out)["lora"]
    rc, out, err = run_here("train", *args)
    assert rc == 0, err
    # the dry run grows the vocabulary and counts the added rows as the trainer does
    assert f"LoRA: {lora_est['trainable']:,} trainable" in out, (lora_est, out)
    assert "data.added_tokens: model.vocab_size 300 -> 303" in out and "chat template from the tokenizer" in out
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

    rc, _, err = run_here("convert", "--merge-lora", tmp_path / "sft", "--out", tmp_path / "merged")
    assert rc == 0, err
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
    # Seeded: the weights below are perturbed by O(1) noise, and the merged logits' fp32 rounding exceeds 1e-5
    # for about 1 draw in 4; unseeded, the draw was whatever RNG state the earlier tests in the process left.
    torch.manual_seed(0)
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


# ---------------------------------------------------------------- the base: not --out, not changed, not a cycle
def retarget(run_dir, base):
    """Point a copied LoRA run's config at another base."""
    import yaml

    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["init_from"] = str(base)
    path.write_text(yaml.safe_dump(cfg))


def test_training_into_the_base_itself_is_refused_before_anything_is_deleted(base, tmp_path, capsys):
    import train

    own = tmp_path / "own"
    shutil.copytree(base, own)
    before = {p: p.read_bytes() for p in own.rglob("*") if p.is_file()}
    for key in ("train.init_from", "train.teacher"):
        argv = [*lora_args(tmp_path, base, 2, **{key: str(own)}), "--out", str(own), "--force"]
        assert run_cli(train.main, argv) == 2
        err = capsys.readouterr().err
        assert err == f"error: {key} is --out ({own}): training into --out would replace it before the new run is " \
                      "written; choose another --out\n", err
    assert {p: p.read_bytes() for p in own.rglob("*") if p.is_file()} == before


def test_a_lora_run_based_on_itself_or_a_cycle_is_a_checkpoint_error(lora_run, tmp_path):
    from slmlab.errors import CheckpointError

    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(lora_run, d)
    retarget(a, a)
    with pytest.raises(CheckpointError, match=f"train.init_from={a} is the run itself"):
        RunDir.open(a).load()
    retarget(a, b)
    retarget(b, a)
    with pytest.raises(CheckpointError, match=f"its LoRA bases form a cycle \\({a} -> {b} -> {a}\\)"):
        RunDir.open(a).load()


def test_a_base_retrained_in_place_is_refused(base, lora_run, tmp_path, capsys):
    import os

    from safetensors.torch import save_file

    import train
    from slmlab.errors import CheckpointError

    b, run = tmp_path / "b", tmp_path / "run"
    shutil.copytree(base, b)  # copy2 keeps size and mtime: trusted on a stat
    shutil.copytree(lora_run, run)
    retarget(run, b)
    want = RunDir.open(lora_run).load()[1].state_dict()
    weights = b / "model.safetensors"
    os.utime(weights, ns=(0, 1))  # touched, same bytes: the sha256 decides
    got = RunDir.open(run).load()[1].state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    sd = load_tensors(weights)
    sd["embed.weight"] = sd["embed.weight"] + 1e-3  # same size, other weights
    save_file(sd, str(weights))
    with pytest.raises(CheckpointError, match=f"the base {b} changed since this LoRA run"):
        RunDir.open(run).load()
    capsys.readouterr()
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "16"]) == 2
    assert "changed since this LoRA run" in capsys.readouterr().err


def test_resume_with_another_alpha_is_refused(lora_run, tmp_path, capsys):
    import train

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert run_cli(train.main, ["--resume", "--out", str(run), "--steps", "16", "train.lora.alpha=16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the run's LoRA adapters were trained otherwise: train.lora.alpha 8") \
        and "-> 16" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_added_tokens_in_a_padded_vocabulary_start_at_the_mean_row_and_train(base, tmp_path):
    """A base whose model.vocab_size (320) exceeds its tokenizer (300), as HF imports pad it: the added
    token takes id 300, a padding row, which must start at the mean row and train under LoRA."""
    import dataclasses

    from slmlab.checkpoint import weights_for_save
    from slmlab.init_from import base_vocab, init_model, with_added_tokens
    from slmlab.lora import ADDED_ROWS_MARK, apply_lora
    from slmlab.trainer import train

    src = RunDir.open(base)
    cfg = src.config()
    cfg.model = dataclasses.replace(cfg.model, vocab_size=320)
    torch.manual_seed(1)
    padded = RunDir.create(tmp_path / "padded")
    padded.write_config(cfg)
    padded.write_tokenizer(src.tokenizer())
    padded.write_weights(weights_for_save(model_from_config(cfg)))
    ov = lora_args(tmp_path, padded.path, 3, **{"model.vocab_size": 320, "data.tokenizer": str(padded.path),
                                                "data.added_tokens": "[<think>]"})
    run_cfg = load_config(arch="hybrid", overrides=[f"data.spec={ov[3]}", *ov[4:]])
    tok = with_added_tokens(run_cfg, src.tokenizer())
    assert tok.encode("<think>") == [300] and run_cfg.model.vocab_size == 320
    model = init_model(model_from_config(run_cfg), run_cfg, tok)
    _, pad_model, _ = padded.load()
    E0, E = pad_model.embed.weight, model.embed.weight
    torch.testing.assert_close(E[300], E0[:300].mean(0))
    assert torch.equal(E[:300], E0[:300]) and torch.equal(E[301:], E0[301:])  # padding stays padding
    assert base_vocab(run_cfg) == 300
    apply_lora(model, run_cfg.train.lora, base_vocab(run_cfg))
    assert any(ADDED_ROWS_MARK in n and p.requires_grad for n, p in model.named_parameters())

    train(run_cfg, tmp_path / "lora")
    _, trained, _ = RunDir.open(tmp_path / "lora").load()
    assert torch.equal(trained.embed.weight[:300], E0[:300])
    assert not torch.allclose(trained.embed.weight[300], E[300])  # the new token's row trained


@pytest.fixture(scope="module")
def moe_lora_run(tmp_path_factory):
    """A MoE base (expert_bias on, so its after_step runs through peft's wrapper) and a LoRA run on it
    that adapts the expert stacks too (targets: experts), checkpointed at step 2 of 4."""
    from sft_helpers import write_corpus

    tmp = tmp_path_factory.mktemp("moelora")
    moe = {"model.mlp": "moe", "model.mixer_opts": "{moe: {experts: 4, top_k: 2, expert_bias: true, "
                                                  "bias_update_rate: 0.01}}"}
    rc, _, err = run_here("train", "--arch", "hybrid", "--data", write_corpus(tmp / "corpus.txt"), "--out",
                          tmp / "base", *sft_overrides(tmp, steps=4, **moe))
    assert rc == 0, err
    rc, out, err = run_here("train", *lora_args(tmp, tmp / "base", 4, **moe, **{
        "train.lora.targets": "[all-linear, experts]", "train.ckpt_every": 2, "train.eval_every": 4}),
        "--out", tmp / "run")
    assert rc == 0, err
    return tmp / "base", tmp / "run", out


def test_lora_adapts_the_expert_stacks_and_merges_exactly(moe_lora_run, tmp_path):
    base, run, out = moe_lora_run
    assert "LoRA: " in out and "stay frozen" not in out and "the expert bias stays the base's" in out
    assert "moe load" in out  # the MoE statistics still reach the eval line through peft's wrapper
    keys = list(load_tensors(run / "model.safetensors"))
    assert all(ADAPTER_MARK in k for k in keys)
    assert {k.split(".lora_")[0] for k in keys if ".mlp.lora_" in k or ".mlp.base_layer.lora_" in k} == {
        f"layers.{i}.mlp{w}" for i in range(3) for w in ("", ".base_layer")}  # w2 and w13 of every layer
    trained = adapter_model(run)
    sd = trained.state_dict()
    assert all(sd[k].abs().sum() > 0 for k in keys if "mlp.lora_B" in k or "mlp.base_layer.lora_B" in k)
    rc, _, err = run_here("convert", "--merge-lora", run, "--out", tmp_path / "merged")
    assert rc == 0, err
    _, merged, _ = RunDir.open(tmp_path / "merged").load()
    _, base_model, _ = RunDir.open(base).load()
    assert not torch.equal(merged.layers[0].mlp.w13, base_model.layers[0].mlp.w13)
    assert torch.equal(merged.layers[0].mlp.expert_bias, base_model.layers[0].mlp.expert_bias)
    assert base_model.layers[0].mlp.expert_bias.abs().sum() > 0  # the base's own training moved it
    x = torch.randint(0, 260, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), trained(x), atol=1e-5, rtol=1e-5)


def test_lora_on_the_expert_stacks_resumes_exactly(moe_lora_run, tmp_path):
    _, run, _ = moe_lora_run
    shutil.copytree(run, tmp_path / "run")
    for d in checkpoint_dirs(tmp_path / "run")[1:]:
        shutil.rmtree(d)
    rc, _, err = run_here("train", "--resume", "--out", tmp_path / "run")
    assert rc == 0, err
    a, b = losses(run), losses(tmp_path / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and max(abs(a[k] - b[k]) for k in a) <= 1e-6, (a, b)


@pytest.mark.parametrize("mlp,extra,needle", [
    ("swiglu", {}, "train.lora.targets: experts adapts the expert weight stacks of model.mlp=moe; this model has none"),
    ("moe", {"dropout": 0.1}, "train.lora.dropout=0.1 with targets: experts: "),
])
def test_bad_expert_targets_are_config_errors(mlp, extra, needle):
    from slmlab.config import LoraConfig
    from slmlab.errors import ConfigError
    from slmlab.lora import apply_lora

    cfg = load_config(arch="hybrid", overrides=["model.d_model=32", "model.n_layers=2", "model.n_heads=2",
                                                "model.n_kv_heads=1", "model.vocab_size=300", f"model.mlp={mlp}",
                                                "model.layers=CA"])
    with pytest.raises(ConfigError, match="^" + needle.replace(".", r"\.")):
        apply_lora(model_from_config(cfg), LoraConfig(r=2, targets=["all-linear", "experts"], **extra))
