"""What only runs on a CUDA GPU: CUDA-graph decode, bf16 autocast training through the Triton
kernels (eager and compiled; a MoE's too), the trainer in each train.precision (fp16's loss scaling),
Muon's bf16 Newton-Schulz, fused AdamW, and the memory estimate against the CUDA allocator.
Skipped without CUDA (CI), except the CPU smoke run of bench/gpu.py; `bench/gpu_check.sh` runs them on
a lent GPU. The Triton kernels'
own tests (tests/test_kernels.py) also compile for the GPU when one is present."""
import math
import os

import pytest
import torch

import arch.model as model_mod
from arch import LM, ModelConfig, build_model
from slmlab.config import load_config
from slmlab.optim import build_optimizer
from slmlab.precision import autocast

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = torch.device("cuda")


def _tiny(layers):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, d_model=64, n_layers=3, layers=layers, n_heads=4, n_kv_heads=2, window=8,
                      window_pattern="SL")
    return LM(cfg).to(DEV).eval()


@needs_cuda
@pytest.mark.parametrize("layers", ["CCA", "A"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_graph_decode_equals_the_uncaptured_compiled_step(layers, temperature, monkeypatch, capsys):
    m = _tiny(layers)
    idx = torch.randint(0, 97, (2, 7), device=DEV)
    monkeypatch.setattr(model_mod, "GREEDY_CHUNK", 1)  # both runs compile the same one-token step
    outs = []
    for graphs in (False, True):
        g = torch.Generator(device=DEV).manual_seed(3)
        outs.append(m.generate(idx, 23, temperature=temperature, generator=g, compile=True, cuda_graph=graphs))
    assert "capture failed" not in capsys.readouterr().out
    assert torch.equal(outs[0], outs[1])
    # and the captured decode against the plain eager step (greedy: same argmax up to compile rounding)
    if temperature == 0:
        eager = m.generate(idx, 23, temperature=0)
        assert (eager == outs[1]).float().mean() > 0.95


MOE = ["model.mlp=moe", "model.mixer_opts={moe: {experts: 4, router: sigmoid, expert_bias: true}}"]


@needs_cuda
@pytest.mark.parametrize("arch_name,extra", [("hybrid", []), ("transformer", []), ("hybrid", MOE)],
                         ids=["hybrid", "transformer", "hybrid-moe"])
def test_bf16_training_on_cuda_learns(arch_name, extra):
    cfg = load_config(arch=arch_name, overrides=["model.d_model=64", "model.n_layers=3", "model.vocab_size=128",
                                                 "optim.name=muon", *extra])
    torch.manual_seed(0)
    m = build_model(cfg.model, cfg.objective).to(DEV).train()
    opt = build_optimizer(m, cfg.optim, verbose=False)
    x = torch.randint(0, 128, (8, 64), device=DEV)
    losses = []
    for _ in range(30):  # one batch memorised: the loss must fall
        with autocast(DEV):
            loss = m(x, x)
        loss.backward()
        opt.step()
        m.after_optimizer_step()  # a MoE's expert bias, as the trainer moves it
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.5 * losses[0], losses


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_the_trainer_learns_on_cuda_in_each_precision(tmp_path, precision, capsys):
    from trainer_helpers import losses, tiny_overrides, write_corpus

    import train
    from slmlab.cli import run_cli

    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=30, **{"train.device": "cuda", "train.precision": precision})
    assert run_cli(train.main, ["--data", str(corpus), "--out", str(tmp_path / "run"), *ov]) == 0
    got = losses(tmp_path / "run")
    assert all(map(math.isfinite, got.values())) and got[30] < got[1] - 1.0, got


@needs_cuda
@pytest.mark.parametrize("preset,extra", [("hybrid", []), ("spiking", []), ("hybrid", MOE)],
                         ids=["hybrid", "spiking", "hybrid-moe"])
def test_compiled_training_step_through_the_triton_kernels_matches_eager(preset, extra):
    """train.compile is on by default on CUDA: torch.compile must trace (or cleanly break around)
    the kernels' autograd Functions (conv and band attention; the LIF scan) and give the eager
    step's loss and gradients."""
    cfg = load_config(arch=preset, overrides=["model.d_model=64", "model.n_layers=3", "model.vocab_size=128",
                                              "model.window_pattern=SL", "model.window=16", *extra])
    torch.manual_seed(0)
    m = build_model(cfg.model, cfg.objective).to(DEV).train()
    x = torch.randint(0, 128, (4, 64), device=DEV)
    results = []
    for fwd in (m, torch.compile(m)):
        m.zero_grad(set_to_none=True)
        with autocast(DEV):
            loss = fwd(x, x)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten().float() for p in m.parameters()])))
    (l0, g0), (l1, g1) = results
    assert abs(l0 - l1) < 1e-2 * abs(l0)
    assert ((g0 - g1).norm() / g0.norm()).item() < 5e-2  # bf16 autocast on both sides


@needs_cuda
def test_memory_estimate_against_the_cuda_allocator():
    from slmlab.estimate import meta_model, static_memory, train_peak

    cfg = load_config(arch="hybrid", overrides=["model.vocab_size=8192"])
    B, T = 8, 256
    est_model = meta_model(cfg)
    st = static_memory(est_model, cfg, cuda=True, world=1)
    est = train_peak(est_model, st, cfg, B, T, checkpoint=False, cuda=True)["peak"] - st.runtime
    torch.manual_seed(0)
    m = build_model(cfg.model, cfg.objective).to(DEV).train()
    opt = build_optimizer(m, cfg.optim, verbose=False)
    x = torch.randint(0, 8192, (B, T), device=DEV)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() - sum(p.numel() * p.element_size() for p in m.parameters())
    for _ in range(2):  # the second step has the optimizer state
        with autocast(DEV):
            loss = m(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated() - base
    assert 0.8 <= est / measured <= 1.2, (est, measured)


def test_gpu_bench_python_runs_on_cpu_at_a_tiny_size(monkeypatch, capsys):
    """bench/gpu.py's train and decode sections on CPU with torch.compile stubbed out: the tables'
    Python (variants, HF twins, memory bookkeeping) runs before a GPU session spends time on it."""
    import importlib.util
    from pathlib import Path

    from tests.triton_probe import interpreter_problem

    if problem := interpreter_problem():  # the Triton variants run here under the interpreter
        pytest.skip(problem)

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"
    spec = importlib.util.spec_from_file_location("gpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn)
    rc = bench.main(["--device", "cpu", "--only", "train", "--only", "decode", "--size", "", "--tokens", "32",
                     "--seq-len", "16", "--rounds", "1", "--new-tokens", "3", "model.d_model=32", "model.n_layers=3",
                     "model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=97"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    for arch, rows in (("transformer", 6 + 2), ("hybrid", 5 + 2)):  # train variants + decode batches
        final = [ln for ln in lines if ln.startswith(f"| {arch} |")]  # the tables printed whole
        assert rc == 0 and len(final) == rows and [f"row: {ln}" for ln in final] == [
            ln for ln in lines if ln.startswith(f"row: | {arch} |")], out

    # --band: flex_attention has no CPU backward, so the reference stands in for it; the rows are what is checked
    import kernels.flex
    from kernels.reference import attention_ref

    monkeypatch.setattr(kernels.flex, "flex_band_attention", lambda q, k, v, causal, window, scale=None: attention_ref(
        q, k, v, causal=causal, window=window, scale=scale))
    assert bench.main(["--device", "cpu", "--only", "train", "--size", "", "--tokens", "32", "--seq-len", "16",
                       "--rounds", "1", "--archs", "transformer", "--band", "4", "model.d_model=32", "model.n_layers=2",
                       "model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=97"]) == 0
    band = capsys.readouterr().out
    assert sum(ln.startswith("| transformer |") for ln in band.splitlines()) == 7, band  # 3 eager, flex x2, compiled, HF


def test_decode_rate_is_nan_when_noise_inverts_the_timings():
    """bench/speed.py's decode_rates (bench/gpu.py's too): t_n <= t_1 gives no rate, not (n - 1) / 1e-9."""
    import importlib.util
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_bench", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    rates = speed.decode_rates({"noisy": lambda k: 0.5 if k == 1 else 0.4, "fine": lambda k: 0.1 * k}, 5, 1,
                               timed=lambda fn: fn())
    assert math.isnan(rates["noisy"]) and rates["fine"] == pytest.approx(10.0)


def test_gpu_check_script_keeps_its_budget_and_names_its_steps(tmp_path):
    """bench/gpu_check.sh's shell runs here: an unknown step is refused; a spent budget skips a step
    with a line instead of starting it, and the summary is still written."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET": "5"}
    bad = subprocess.run(["bash", str(script), "nope"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown step 'nope'" in bad.stderr
    ok = subprocess.run(["bash", str(script), "env", "kernels"], env=env, capture_output=True, text=True, timeout=60)
    summary = (tmp_path / "summary.txt").read_text()
    assert "env: skipped" in summary and "kernels: skipped" in summary, ok.stdout + ok.stderr
