"""train.precision: the autocast a run's forward uses, and fp16's dynamic loss scaling (slmlab/precision.py).
fp16 autocast runs on CPU too, which is how these tests exercise the scaling without a GPU."""
from __future__ import annotations

import json

import pytest
import torch
from trainer_helpers import tiny_overrides, write_corpus

from slmlab.errors import ConfigError
from slmlab.precision import LossScale, autocast, loss_scale_problem, resolve_precision


@pytest.mark.parametrize("bf16_hw,want", [(True, "bf16"), (False, "fp16")])
def test_auto_is_fp32_on_cpu_and_on_cuda_bf16_only_where_the_gpu_has_it(monkeypatch, bf16_hw, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16_hw)
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == want
    # asked for: kept (the set-up line says it is emulated)
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"
    from slmlab.optim import fast_ns_dtype

    assert fast_ns_dtype(torch.device("cuda")) == (torch.bfloat16 if bf16_hw else torch.float32)
    with pytest.raises(ConfigError, match="train.precision must be one of auto, fp32, bf16, fp16, got 'half'"):
        resolve_precision("half", torch.device("cpu"))


@pytest.mark.parametrize("precision,tol", [("fp32", 0.0), ("bf16", 3e-2), ("fp16", 3e-3)])
def test_the_loss_under_each_autocast_is_the_fp32_loss_within_its_rounding(precision, tol):
    from arch import LM, ModelConfig

    torch.manual_seed(0)
    model = LM(ModelConfig(vocab_size=97, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, layers="CCA"))
    x = torch.randint(0, 97, (2, 63))
    want = model(x[:, :-1], x[:, 1:])
    with autocast("cpu", precision):
        got = model(x[:, :-1], x[:, 1:])
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) <= tol * want.item()


def test_loss_scale_halves_on_overflow_grows_after_an_interval_and_round_trips(monkeypatch):
    monkeypatch.setattr(LossScale, "GROWTH_INTERVAL", 3)
    s = LossScale(True)
    assert s.scale == 2.0 ** 16 and s.overflowed(2.5, float("inf")) and s.overflowed(2.5, float("nan"))
    assert not s.overflowed(float("nan"), float("nan"))  # a non-finite loss is no overflow of the gradients
    s.update(overflow=True)
    assert s.scale == 2.0 ** 15
    for _ in range(3):
        s.update(overflow=False)
    assert (s.scale, s.good_steps) == (2.0 ** 16, 0)
    s.update(overflow=False)
    restored = LossScale(True)
    restored.load_state_dict(s.state_dict())
    assert restored.state_dict() == s.state_dict() == {"scale": 2.0 ** 16, "good_steps": 1}
    s.scale = 1.0
    assert not s.overflowed(2.5, float("inf"))  # at scale 1 it is the run diverging: a bad step
    off = LossScale(False)
    off.update(overflow=True)
    assert off.scale == 1.0 and not off.overflowed(2.5, float("inf"))
    assert loss_scale_problem({"scale": 0.0, "good_steps": 0}) and loss_scale_problem({"scale": 2.0})
    assert loss_scale_problem({"scale": 2.0, "good_steps": 0}) is None


def test_fp16_training_skips_overflows_uncounted_and_resumes_with_its_scale(tmp_path, monkeypatch, capsys):
    """A scale far too large for fp16 overflows the first steps' gradients: each is skipped and the
    scale halved, none counts toward train.max_bad_steps (2 here), the scale grows back after its
    interval, the loss goes down, and a run stopped mid-way resumes with the same scale and losses."""
    from test_resume import ctrl_c_once_at

    import train
    from slmlab.cli import run_cli

    monkeypatch.setattr(LossScale, "INIT", 2.0 ** 24)
    monkeypatch.setattr(LossScale, "GROWTH_INTERVAL", 5)
    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=24, **{"train.precision": "fp16", "train.ckpt_every": 4,
                                               "train.max_bad_steps": 2, "train.warmup_steps": 0})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(tmp_path / "full"), *ov]) == 0
    out = capsys.readouterr().out
    assert "fp16 autocast, dynamic loss scaling" in out and out.count("fp16 gradients overflowed") >= 3
    ctrl_c_once_at(monkeypatch, 14)
    run = tmp_path / "stopped"
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(run), *ov]) == 130
    assert run_cli(train.main, ["--resume", "--out", str(run)]) == 0
    full, resumed = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                     for d in (tmp_path / "full", run))
    steps = [r for r in full if "loss" in r]
    scales = [r["loss_scale"] for r in steps]
    assert scales[0] == 2.0 ** 24 and min(scales) < 2.0 ** 20
    assert any(b == 2 * a for a, b in zip(scales, scales[1:]))  # grew back after 5 good steps
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5
    assert [(r["step"], r["loss"], r["loss_scale"]) for r in resumed if "loss" in r] == \
        [(r["step"], r["loss"], r["loss_scale"]) for r in steps]
