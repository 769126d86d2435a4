"""Masked diffusion: ELBO by hand, samplers (fill every mask, keep the prompt, deterministic at
temperature 0), bad input (mask token, init_from, block length, causal), AR -> diffusion init."""
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from arch import LM, build_model
from arch.config import ModelConfig, ObjectiveConfig
from arch.diffusion import DiffusionLM, antithetic_t, llada_sample, masked_diffusion_terms, mdlm_sample
from slmlab.config import load_config
from slmlab.errors import ConfigError

V, MASK = 29, 3


OBJ = ObjectiveConfig(name="mdlm", mask_id=MASK, eval_t_samples=2)


def tiny(**kw):
    base = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, layers="CCA", causal=False)
    base.update(kw)
    return ModelConfig(**base)


def test_masked_diffusion_terms_by_hand():
    # vocab of 4, mask id 3; two positions, the first masked at t = 0.25, the second carried over.
    logits = torch.tensor([[[0.0, math.log(2.0), 0.0, 50.0], [1.0, 2.0, 3.0, 4.0]]])
    x0 = torch.tensor([[1, 0]])
    masked = torch.tensor([[True, False]])
    t = torch.tensor([0.25])
    terms = masked_diffusion_terms(logits, x0, masked, t, mask_id=3)
    # SUBS: the mask logit (50) is dropped, p(x0=1) = 2 / (1 + 2 + 1) = 1/2; weight 1/t = 4.
    expect = torch.tensor([[4 * math.log(2.0), 0.0]])
    torch.testing.assert_close(terms, expect)


def _reference_elbo(m, x0, t, masked):
    """The ELBO terms [B, T] through full logits and masked_diffusion_terms: no row gathering, no chunks."""
    xt = torch.where(masked, torch.full_like(x0, MASK), x0)
    return masked_diffusion_terms(m.lm_head(m.hidden(xt)[0]), x0, masked, t, MASK)


@pytest.mark.parametrize("seq_len", [7, 13])
@pytest.mark.parametrize("loss_chunk", [0, 5])
def test_fast_elbo_and_loss_match_the_reference(seq_len, loss_chunk):
    """DiffusionLM gathers the masked rows and runs the head on them (model.loss_chunk rows at a time):
    its training loss, gradients and eval terms equal masked_diffusion_terms on full logits. Odd lengths
    and a chunk that divides neither; fp32 throughout, so the tolerance is float rounding (1e-5)."""
    torch.manual_seed(0)
    m = DiffusionLM(tiny(loss_chunk=loss_chunk), OBJ)
    x0 = torch.randint(4, V, (3, seq_len))
    tol = dict(atol=1e-5, rtol=1e-5)

    torch.manual_seed(1)
    loss = m(x0, x0)
    fast_grads = torch.autograd.grad(loss, list(m.parameters()))
    torch.manual_seed(1)  # the same draws as forward: t first, then the mask
    t = antithetic_t(x0.shape[0], x0.device)
    masked = torch.rand(x0.shape) < t[:, None]
    assert masked.any() and not masked.all()
    ref = _reference_elbo(m, x0, t, masked).sum() / x0.numel()
    torch.testing.assert_close(loss, ref, **tol)
    for name_p, g, g_ref in zip(m.named_parameters(), fast_grads, torch.autograd.grad(ref, list(m.parameters()))):
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda msg, n=name_p[0]: f"{n}: {msg}")

    with torch.no_grad():
        t = torch.tensor([0.2, 0.5, 0.9])
        terms = m.elbo_terms(x0, t, torch.Generator().manual_seed(2))
        masked = torch.rand(x0.shape, generator=torch.Generator().manual_seed(2)) < t[:, None]
        torch.testing.assert_close(terms, _reference_elbo(m, x0, t, masked), **tol)


def test_ranks_draw_their_rows_of_the_global_batch_times_and_masks():
    """Under torchrun every rank drew the same times and masks for its rows (one seed per run): each rank
    now keeps its rows of the global batch's draws, so the ranks' mean loss is the 1-process run's."""
    torch.manual_seed(0)
    m = DiffusionLM(tiny(), OBJ)
    x0 = torch.randint(4, V, (4, 9))
    torch.manual_seed(1)
    whole = m(x0, x0)
    shards = []
    for rank in (0, 1):
        m.set_data_shard(rank, 2)
        torch.manual_seed(1)
        shards.append(m(x0[2 * rank:2 * rank + 2], x0[2 * rank:2 * rank + 2]))
    torch.testing.assert_close((shards[0] + shards[1]) / 2, whole, atol=1e-6, rtol=1e-6)


def test_flops_per_token_counts_the_head_on_the_masked_tokens_only():
    """The parameter matmuls FlopCounterMode counts in a training step (forward + backward: aten.mm; the
    attention core is another op) within 1% of flops_per_token's parameter term: the head runs on the
    ~half of the tokens that are masked (counted on all, the estimate was 13% high here)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    m = DiffusionLM(tiny(vocab_size=500, layers="AA", n_layers=2), ObjectiveConfig(name="mdlm", mask_id=MASK))
    x = torch.randint(4, 500, (64, 32))
    with FlopCounterMode(display=False) as counter:
        m(x, x).backward()
    mm = counter.get_flop_counts()["Global"][torch.ops.aten.mm] / x.numel()
    assert mm == pytest.approx(m.flops_per_token(32) - sum(b.flops_per_token(32) for b in m.layers), rel=0.01)


def test_model_elbo_on_a_uniform_model_by_hand():
    """A model with zero weights predicts uniformly over the V-1 non-mask tokens: every masked
    position costs log(V-1)/t, so the ELBO's expectation over t and the masks is exactly log(V-1)."""
    m = DiffusionLM(tiny(), OBJ)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
    x0 = torch.randint(4, V, (64, 32))
    g = torch.Generator().manual_seed(0)
    t = torch.full((64,), 0.5)
    terms = m.elbo_terms(x0, t, generator=g)
    masked = terms != 0
    torch.testing.assert_close(terms[masked], torch.full_like(terms[masked], 2 * math.log(V - 1)))
    assert 0.4 < masked.float().mean() < 0.6  # masking rate is t
    # Monte Carlo over antithetic t: the per-token bound is log(V-1) (stochastic, so a tolerance).
    est = m.token_nll(x0, x0, generator=g).mean().item()
    assert abs(est - math.log(V - 1)) < 0.05 * math.log(V - 1)
    # training loss is the same quantity
    torch.manual_seed(0)
    assert abs(m(x0, x0).item() - math.log(V - 1)) < 0.1 * math.log(V - 1)


def test_token_nll_is_repeatable_with_a_fixed_generator_and_bound_flag():
    torch.manual_seed(0)
    m = build_model(tiny(), OBJ).eval()
    assert isinstance(m, DiffusionLM) and m.nll_is_bound and not LM.nll_is_bound
    x = torch.randint(4, V, (3, 16))
    a = m.token_nll(x, x, generator=torch.Generator().manual_seed(5))
    b = m.token_nll(x, x, generator=torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b) and (a >= 0).all()


def test_antithetic_t_is_stratified():
    t = antithetic_t(8, "cpu", torch.Generator().manual_seed(1)).sort().values
    assert ((t >= 1e-3) & (t < 1)).all()
    gaps = t[1:] - t[:-1]
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - 1e-3) / 8))


def test_denoiser_is_bidirectional_and_never_predicts_mask():
    torch.manual_seed(0)
    m = build_model(tiny(), OBJ).eval()
    a = torch.randint(4, V, (1, 12))
    b = a.clone()
    b[0, 9:] = MASK
    with torch.no_grad():
        la, lb = m(a), m(b)
    assert not torch.allclose(la[:, :5], lb[:, :5])  # earlier positions see later ones
    assert torch.isinf(la[..., MASK]).all()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny(), OBJ).eval()


@pytest.mark.parametrize("sampler", ["llada", "mdlm"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_fills_every_mask_and_keeps_the_prompt(model, sampler, temperature):
    prompt = torch.randint(4, V, (2, 5))
    prompt[1, 2] = MASK  # even a literal mask token in the prompt is left alone
    g = torch.Generator().manual_seed(0)
    out = model.generate(prompt, 12, temperature=temperature, generator=g, steps=5, block_length=4, sampler=sampler)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], prompt)
    assert not (out[:, 5:] == MASK).any()


@pytest.mark.parametrize("sampler", ["llada", "mdlm"])
def test_a_row_is_eos_after_its_first_generated_eos(model, sampler):
    """eos_id was accepted and ignored: LM.generate pads a finished row with it, and so does this now."""
    prompt = torch.randint(4, V, (2, 5))
    kw = dict(temperature=1.0, steps=4, block_length=4, sampler=sampler)
    free = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0), **kw)
    eos = int(free[0, 9])  # a token row 0 generated mid-way
    out = model.generate(prompt, 12, generator=torch.Generator().manual_seed(0), eos_id=eos, **kw)
    for row, got in zip(free, out):
        hits = (row[5:] == eos).nonzero()
        end = 5 + int(hits[0]) if len(hits) else 17
        assert torch.equal(got[:end + 1], row[:end + 1]) and (got[end:] == eos).all()


@pytest.mark.parametrize("steps,block", [(12, 12), (3, 4), (30, 6), (1, 12)])
def test_llada_schedules(model, steps, block):
    out = llada_sample(model, torch.randint(4, V, (1, 3)), 12, steps, block)
    assert not (out[:, 3:] == MASK).any()


@pytest.mark.parametrize("sampler", ["llada", "mdlm"])
def test_temperature_zero_is_deterministic(model, sampler):
    prompt = torch.randint(4, V, (1, 4))

    def run(seed):
        return model.generate(prompt, 8, temperature=0, steps=4, block_length=4, sampler=sampler,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    if sampler == "llada":  # low-confidence remasking uses no randomness at all at temperature 0
        assert torch.equal(run(1), run(2))
    # mdlm still draws *which* masks to reveal at each step (ancestral sampling): repeatable per seed.


def test_llada_reveals_most_confident_first(model):
    # one step per token: each step reveals exactly one token, the one the model is surest of.
    prompt = torch.randint(4, V, (1, 3))
    x = torch.cat([prompt, torch.full((1, 6), MASK)], 1)
    with torch.no_grad():
        logits = model.denoise_logits(x)
    p = logits.softmax(-1).max(-1).values[0, 3:]
    first = int(p.argmax())
    out1 = llada_sample(model, prompt, 6, steps=6, block_length=6)
    assert out1[0, 3 + first] == logits[0, 3 + first].argmax()


@pytest.mark.parametrize("call,needle", [
    (lambda m: llada_sample(m, torch.zeros(1, 2, dtype=torch.long), 10, 5, 4), "--block-length 4 does not divide"),
    (lambda m: m.generate(torch.zeros(1, 2, dtype=torch.long), 10, block_length=3), "does not divide"),
    (lambda m: mdlm_sample(m, torch.zeros(1, 2, dtype=torch.long), 10, 0), "--diffusion-steps must be > 0"),
])
def test_bad_sampler_arguments(model, call, needle):
    with pytest.raises(ConfigError) as e:
        call(model)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kw,obj,needle", [
    (dict(causal=True), {}, "needs model.causal=false"),
    ({}, dict(mask_id=99), "objective.mask_id=99 is outside the vocabulary"),
    ({}, dict(name="bert"), "objective.name must be one of"),
    ({}, dict(block_length=0), "objective.block_length must be >= 1, got 0"),
    (dict(mixer_opts={"objective": "mdlm"}), {}, "namespaced by block now: objective.name"),
])
def test_bad_diffusion_config(kw, obj, needle):
    with pytest.raises(ConfigError) as e:
        build_model(tiny(**kw), dataclasses.replace(OBJ, **obj))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_diffusion_without_a_mask_token_is_an_error():
    from slmlab.init_from import init_model

    cfg = SimpleNamespace(arch="diffusion", train=SimpleNamespace(init_from=""))
    m = build_model(tiny(), OBJ)
    with pytest.raises(ConfigError, match="needs a tokenizer with a mask token"):
        init_model(m, cfg, SimpleNamespace(mask_id=None))
    with pytest.raises(ConfigError, match="mask_id=3 but the tokenizer's <|mask|> is 5"):
        init_model(m, cfg, SimpleNamespace(mask_id=5))
    init_model(m, cfg, SimpleNamespace(mask_id=3))
    init_model(LM(tiny(causal=True)), cfg, SimpleNamespace(mask_id=None))  # AR needs none


# ---- end to end: AR run -> diffusion run (init_from), sample.py on it ------------------------------
SMALL = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2",
         "train.steps=3", "train.batch_size=2", "train.seq_len=16", "train.eval_every=100", "train.eval_tokens=256",
         "train.sample_tokens=8", "logging.progress=false", "train.warmup_steps=1", "train.phases=[]",
         "train.ckpt_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from slmlab.trainer import train

    root = tmp_path_factory.mktemp("runs")
    text = root / "corpus.txt"
    words = "the cat sat on a mat while bob and alice run to the sea ".split()
    g = torch.Generator().manual_seed(0)
    text.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (6000,), generator=g)))
    common = SMALL + [f"data.spec={text}", f"data.cache_dir={root / 'cache'}"]
    ar = load_config(arch="hybrid", overrides=common)
    train(ar, root / "ar")
    diff = load_config(arch="diffusion", overrides=common + [f"train.init_from={root / 'ar'}", "train.steps=1",
                                                             "optim.lr=1.0e-9"])
    summary = train(diff, root / "diff")
    return SimpleNamespace(root=root, common=common, summary=summary)


def test_ar_to_diffusion_init_copies_weights_and_reports_a_bound(runs):
    from slmlab.checkpoint import load_tensors

    assert runs.summary["val_bpb_is_bound"] is True and runs.summary["val_bpb"] > 0
    a = load_tensors(runs.root / "ar" / "model.safetensors")
    d = load_tensors(runs.root / "diff" / "model.safetensors")
    assert a.keys() == d.keys()
    for k in a:  # one step at lr 1e-9: still the AR weights
        torch.testing.assert_close(a[k], d[k], atol=1e-6, rtol=0)


def test_init_from_a_different_shape_is_a_one_line_error(runs):
    from slmlab.trainer import train

    cfg = load_config(arch="diffusion", overrides=runs.common + [f"train.init_from={runs.root / 'ar'}",
                                                                 "model.d_model=64"])
    with pytest.raises(ConfigError) as e:
        train(cfg, runs.root / "bad")
    assert "builds another model: model.d_model 32 -> 64" in str(e.value) and "\n" not in str(e.value)
    assert not (runs.root / "bad" / "config.yaml").exists()


def test_init_from_a_different_tokenizer_is_a_one_line_error(runs):
    from slmlab.init_from import load_init

    cfg = load_config(arch="diffusion", overrides=runs.common)
    with pytest.raises(ConfigError) as e:
        tok = SimpleNamespace(to_json=lambda: "{}", vocab_size=cfg.model.vocab_size)
        load_init(build_model(cfg.model, cfg.objective), cfg, tok, runs.root / "ar")
    assert "different tokenizer" in str(e.value) and "\n" not in str(e.value)


def test_init_from_a_missing_run(runs):
    from slmlab.init_from import load_init

    cfg = load_config(arch="diffusion", overrides=runs.common)
    with pytest.raises(ConfigError, match="is not a finished run"):
        load_init(build_model(cfg.model, cfg.objective), cfg, None, runs.root / "nope")


def test_sample_cli_on_a_diffusion_run(runs, capsys):
    import sample
    from slmlab.cli import run_cli

    run = str(runs.root / "diff")
    assert run_cli(sample.main, ["--run", run, "--prompt", "the cat", "--max-new-tokens", "8",
                                 "--diffusion-steps", "4", "--block-length", "4", "--temperature", "0"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the cat") and "<|mask|>" not in first
    run_cli(sample.main, ["--run", run, "--prompt", "the cat", "--max-new-tokens", "8", "--diffusion-steps", "4",
                          "--block-length", "4", "--temperature", "0"])
    assert capsys.readouterr().out == first  # temperature 0: deterministic
    assert run_cli(sample.main, ["--run", run, "--max-new-tokens", "8", "--sampler", "mdlm"]) == 0
    capsys.readouterr()
    # mdlm reveals random positions even at temperature 0, so --seed and --num-samples still mean something
    assert run_cli(sample.main, ["--run", run, "--max-new-tokens", "4", "--sampler", "mdlm", "--temperature", "0",
                                 "--seed", "1", "--num-samples", "2"]) == 0
    capsys.readouterr()
    assert run_cli(sample.main, ["--run", run, "--max-new-tokens", "4", "--temperature", "0", "--seed", "1"]) == 2
    assert "--seed has no effect at --temperature 0: llada's low-confidence remasking" in capsys.readouterr().err
    rc = run_cli(sample.main, ["--run", run, "--max-new-tokens", "10", "--block-length", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "--block-length 4 must divide --max-new-tokens 10" in err and err.count("\n") == 1
    rc = run_cli(sample.main, ["--run", str(runs.root / "ar"), "--block-length", "4"])
    assert rc == 2 and "applies to diffusion runs" in capsys.readouterr().err
