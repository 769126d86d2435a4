"""The chunked head + cross-entropy (arch/loss.py) against the plain one: value and gradients."""
import pytest
import torch

from arch.loss import (
    Distill,
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_distill_loss,
    linear_distill_loss_ref,
)
from arch.model import LM
from tests.test_arch import tiny


def _inputs(n, d=16, V=37, ignored=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(V, d, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    t = torch.randint(0, V, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -1
    if (t >= 0).sum() == 0:
        t[0] = 3
    return x, w, t


# Odd token counts and chunks that do not divide them: the last chunk is short.
@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (63, 8), (63, 64), (64, 16)])
def test_chunked_matches_reference_value_and_gradients(n, chunk):
    x, w, t = _inputs(n)
    ref = linear_cross_entropy_ref(x, w, t)
    gx_ref, gw_ref = torch.autograd.grad(ref * 1.7, (x, w))  # a non-unit upstream gradient
    got = linear_cross_entropy(x, w, t, chunk)
    gx, gw = torch.autograd.grad(got * 1.7, (x, w))
    # fp64 throughout (nothing is cast to fp32), so the two agree to fp64 rounding.
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-12)


def test_chunked_no_grad_and_frozen_weight():
    x, w, t = _inputs(20)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, 6), linear_cross_entropy_ref(x, w, t))
    frozen = w.detach()
    gx = torch.autograd.grad(linear_cross_entropy(x, frozen, t, 6), x)[0]
    torch.testing.assert_close(gx, torch.autograd.grad(linear_cross_entropy_ref(x, frozen, t), x)[0],
                               rtol=1e-10, atol=1e-12)


def test_all_targets_ignored_gives_nan_like_the_reference():
    x, w, t = _inputs(5)
    t[:] = -1
    assert torch.isnan(linear_cross_entropy_ref(x, w, t)) and torch.isnan(linear_cross_entropy(x, w, t, 2))


def test_bad_chunk_and_shape_mismatch_are_clear_errors():
    x, w, t = _inputs(6)
    with pytest.raises(ValueError, match="chunk must be > 0"):
        linear_cross_entropy(x, w, t, 0)
    with pytest.raises(ValueError, match="6 positions but 5 targets"):
        linear_cross_entropy(x, w, t[:5], 2)


def test_bf16_autocast_chunked_matches_plain_head():
    # The chunked path runs its matmuls in autocast's dtype, as lm_head(x) does under autocast.
    x, w, t = _inputs(33, d=32, V=50)
    x, w = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = linear_cross_entropy_ref(x, w, t)
        got = linear_cross_entropy(x, w, t, 8)
    gr, gg = torch.autograd.grad(ref, (x, w)), torch.autograd.grad(got, (x, w))
    # The same bf16 logits: the loss agrees to fp32 rounding (fp32 matmuls would be ~7e-4 off).
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(gg, gr)]
    # dx: the same bf16 product; dW: ours sums the chunks' products in fp32, the plain head rounds
    # one [V, N] x [N, d] product to bf16 (~2e-3 apart here).
    assert rel[0] < 1e-4 and rel[1] < 1e-2, rel


@pytest.mark.parametrize("tie", [True, False])
def test_model_loss_chunked_equals_plain(tie):
    torch.manual_seed(0)
    plain = LM(tiny(layers="CA", tie_embeddings=tie))
    chunked = LM(tiny(layers="CA", tie_embeddings=tie, loss_chunk=5))
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, plain.cfg.vocab_size, (2, 7))
    y = torch.randint(0, plain.cfg.vocab_size, (2, 7))
    y[0, :3] = -1  # SFT-style prompt positions
    losses = [m(idx, y) for m in (plain, chunked)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bench_script_runs_and_prints_ratios(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "loss_chunk.py"
    spec = importlib.util.spec_from_file_location("loss_chunk_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--rounds", "1", "--tokens", "64", "--seq-len", "16", "--chunks", "24", "--device", "cpu",
                       "model.d_model=32", "model.n_layers=3", "model.vocab_size=61"]) == 0
    out = capsys.readouterr().out
    assert "loss_chunk=0 " in out and "loss_chunk=24 " in out and out.count("x") >= 3


def test_loss_chunk_is_a_runtime_knob_on_resume():
    from arch.config import ModelConfig

    saved = ModelConfig()
    assert saved.weight_changes(ModelConfig(loss_chunk=8, grad_checkpoint=True, kernels="torch")) == []
    assert saved.weight_changes(ModelConfig(d_model=128, loss_chunk=8)) == ["model.d_model 256 -> 128"]


@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (63, 8)])
def test_row_scale_and_excluded_column_match_the_reference(n, chunk):
    """The diffusion ELBO's form: sum(row_scale * CE) with one vocabulary column out of the softmax."""
    x, w, t = _inputs(n, ignored=0.0)
    t[t == 5] = 6  # no target is the excluded column
    scale = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    ref = linear_cross_entropy_ref(x, w, t, row_scale=scale, exclude=5)
    by_hand = sum(scale[i] * -torch.log_softmax(torch.cat([(x[i] @ w.t())[:5], (x[i] @ w.t())[6:]]), 0)[
        t[i] - (t[i] > 5).long()] for i in range(n))
    torch.testing.assert_close(ref, by_hand, rtol=1e-12, atol=1e-12)
    got = linear_cross_entropy(x, w, t, chunk, row_scale=scale, exclude=5)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got * 0.3, (x, w))
    for a, b in zip(grads, torch.autograd.grad(ref * 0.3, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads[1][5].abs().max() == 0  # the excluded row of the head learns nothing
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk, row_scale=scale, exclude=5), ref)
    with pytest.raises(ValueError, match=f"{n + 1} row scales but {n} targets"):
        linear_cross_entropy(x, w, t, chunk, row_scale=torch.ones(n + 1))


@pytest.mark.parametrize("chunk", [1, 4])
def test_ignored_rows_beside_an_excluded_column_zero_are_zero_not_nan(chunk):
    """An ignored target (-1) reads column 0 for its (zero-weighted) term: with column 0 excluded
    (-inf) that term was 0 * inf = nan in the chunked path."""
    x, w, t = _inputs(6, ignored=0.0)
    t[t == 0] = 1
    t[[2, 5]] = -1
    ref = linear_cross_entropy_ref(x, w, t, exclude=0)
    got = linear_cross_entropy(x, w, t, chunk, exclude=0)
    assert torch.isfinite(ref)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(ref, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_diffusion_elbo_chunked_equals_plain():
    """model.loss_chunk on the diffusion objective: the same masks (same RNG draws), loss, gradients
    and evaluation terms as the unchunked head."""
    from arch import build_model
    from arch.config import ObjectiveConfig

    obj = ObjectiveConfig(name="mdlm", mask_id=3)
    torch.manual_seed(0)
    plain = build_model(tiny(layers="CA", causal=False), obj)
    chunked = build_model(tiny(layers="CA", causal=False, loss_chunk=5), obj)
    chunked.load_state_dict(plain.state_dict())
    x = torch.randint(4, plain.cfg.vocab_size, (3, 11))
    losses = []
    for m in (plain, chunked):
        torch.manual_seed(1)
        losses.append(m(x, x))
        losses[-1].backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        a, b = (m.token_nll(x, x, generator=torch.Generator().manual_seed(2)) for m in (plain, chunked))
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_dry_run_and_fit_check_suggest_loss_chunk_where_it_matters(capsys):
    import train
    from slmlab.cli import run_cli
    from slmlab.config import load_config
    from slmlab.errors import ConfigError
    from slmlab.estimate import check_fits

    assert run_cli(train.main, ["--arch", "transformer", "--size", "124m", "--dry-run", "--mem", "16GB",
                                "optim.name=adamw"]) == 0
    out = capsys.readouterr().out
    # 124m at GPT-2's vocabulary: the logits are most of the step; chunked, micro-batch 53 -> 114 at T=256
    assert "with model.loss_chunk=1024: logits" in out and "max micro-batch 114" in out, out
    with pytest.raises(ConfigError, match=r"or model.loss_chunk=1024 with train.grad_accum=2 \(micro-batch up to"):
        check_fits(load_config(arch="transformer", size="124m", overrides=["optim.name=adamw"]), 4 * 2**30,
                   "test budget", cuda=True)
    # the diffusion ELBO's head chunks too: suggested there as well
    assert run_cli(train.main, ["--arch", "diffusion", "--size", "124m", "--dry-run", "--mem", "16GB"]) == 0
    assert "with model.loss_chunk=1024: logits" in capsys.readouterr().out
    assert run_cli(train.main, ["--arch", "transformer", "--size", "124m", "--dry-run", "--mem", "16GB",
                                "model.loss_chunk=512"]) == 0
    assert "with model.loss_chunk=" not in capsys.readouterr().out  # already on: nothing to suggest


def test_token_nll_chunked_equals_plain():
    torch.manual_seed(0)
    plain = LM(tiny(layers="CA")).eval()
    chunked = LM(tiny(layers="CA", loss_chunk=4)).eval()
    chunked.load_state_dict(plain.state_dict())
    idx, y = torch.randint(0, 61, (3, 7)), torch.randint(0, 61, (3, 7))
    with torch.no_grad():
        a, b = plain.token_nll(idx, y), chunked.token_nll(idx, y)
        ref = torch.nn.functional.cross_entropy(plain(idx).flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    assert b.shape == (3, 7)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-6)  # the full-logits cross-entropy


def test_eval_batch_is_at_most_one_training_micro_batch():
    from slmlab.config import load_config
    from slmlab.phases import eval_shape, resolve_phases

    cfg = load_config(overrides=["train.grad_accum=2"])  # default phases: 4096 tokens per step, last at 2048
    phases = resolve_phases(cfg, 1)
    assert eval_shape(phases, None, 2, 1) == (2048, 1)  # one micro-batch: 1 x 2048, not the step's 2
    assert eval_shape(phases, None, 1, 1) == (2048, 2)
    assert eval_shape(phases, 512, 2, 1) == (512, 4)  # the micro-batch's 2048 tokens in 512-windows
    assert eval_shape(phases, None, 1, 2) == (2048, 1)  # per rank under torchrun


# ---- distillation: the same chunked head with the teacher's logits beside the student's ----

def _teacher(n, V=37, dt=12, seed=2, alpha=0.3, temp=2.0):
    g = torch.Generator().manual_seed(seed)
    return Distill(torch.randn(n, dt, generator=g, dtype=torch.float64),
                   torch.randn(V, dt, generator=g, dtype=torch.float64) * 0.5, alpha, temp)


def test_distill_reference_matches_a_hand_computation():
    import math

    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [5.0, 5.0, 5.0]]  # logits; the identity head
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 9.0, 0.0]]
    targets = [1, 2, -1]  # the third row is a prompt position: out of both terms
    alpha, temp = 0.25, 2.0

    def log_softmax(row, t=1.0):
        lse = math.log(sum(math.exp(v / t) for v in row))
        return [v / t - lse for v in row]

    rows = list(zip(student, teacher, targets))[:2]
    ce = sum(-log_softmax(s)[y] for s, _, y in rows) / 2
    kl = sum(sum(math.exp(lt) * (lt - ls) for ls, lt in zip(log_softmax(s, temp), log_softmax(t, temp)))
             for s, t, _ in rows) / 2  # KL(teacher_T || student_T), mean over the valid tokens
    eye = torch.eye(3, dtype=torch.float64)

    def ref(t_logits, a):
        return linear_distill_loss_ref(torch.tensor(student, dtype=torch.float64), eye, torch.tensor(targets),
                                       Distill(torch.tensor(t_logits, dtype=torch.float64), eye, a, temp))

    loss, got_ce = ref(teacher, alpha)
    assert got_ce.item() == pytest.approx(ce, rel=1e-12)
    assert loss.item() == pytest.approx((1 - alpha) * ce + alpha * temp ** 2 * kl, rel=1e-12)
    assert kl > 0.05  # the KL term is not negligible, so a wrong sign or temperature would show
    assert ref(teacher, 0.0)[0].item() == pytest.approx(ce, rel=1e-12)  # alpha 0: plain CE
    assert ref(student, alpha)[0].item() == pytest.approx((1 - alpha) * ce, rel=1e-12)  # KL(p || p) = 0


@pytest.mark.parametrize("n,chunk", [(1, 1), (7, 3), (63, 8), (63, 64)])
@pytest.mark.parametrize("alpha,temp", [(0.3, 2.0), (1.0, 0.5)])
def test_distill_chunked_matches_reference(n, chunk, alpha, temp):
    x, w, t = _inputs(n)
    teacher = _teacher(n, alpha=alpha, temp=temp)
    ref, ce_ref = linear_distill_loss_ref(x, w, t, teacher)
    grads_ref = torch.autograd.grad(ref * 1.7, (x, w))
    got, ce = linear_distill_loss(x, w, t, teacher, chunk)
    assert not ce.requires_grad  # reported, not differentiated
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got * 1.7, (x, w)), grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(linear_distill_loss(x, w, t, teacher, chunk)[0], ref, rtol=1e-12, atol=1e-12)


def test_distill_ignores_the_teacher_on_ignored_positions():
    x, w, t = _inputs(9)
    t[:4] = -1
    teacher = _teacher(9)
    other = teacher._replace(hidden=teacher.hidden.clone())
    other.hidden[:4] += 10.0  # the teacher differs only where nothing is learned
    for fn in (lambda d: linear_distill_loss_ref(x, w, t, d), lambda d: linear_distill_loss(x, w, t, d, 4)):
        torch.testing.assert_close(fn(other)[0], fn(teacher)[0], rtol=1e-12, atol=1e-12)


def test_distill_shape_mismatch_is_a_clear_error():
    x, w, t = _inputs(6)
    with pytest.raises(ValueError, match="the teacher gives 5 positions x 37 logits, the student 6 x 37"):
        linear_distill_loss(x, w, t, _teacher(5), 2)
    with pytest.raises(ValueError, match="the teacher gives 6 positions x 40 logits, the student 6 x 37"):
        linear_distill_loss(x, w, t, _teacher(6, V=40), 2)


@pytest.mark.parametrize("chunk", [0, 5])
def test_model_distill_loss_chunked_equals_plain_under_bf16_autocast(chunk):
    """LM(idx, y, teacher=...) as the trainer calls it: chunked == plain head, and under bf16
    autocast on both the student's and the teacher's side."""
    torch.manual_seed(0)
    student, teacher_model = LM(tiny(layers="CA")), LM(tiny(layers="AC", d_model=24)).eval()
    idx, y = torch.randint(0, 61, (2, 7)), torch.randint(0, 61, (2, 7))
    y[0, :3] = -1
    with torch.no_grad():
        teacher = Distill(teacher_model.hidden(idx)[0], teacher_model.lm_head.weight, 0.5, 2.0)
    plain = student(idx, y, teacher=teacher)
    student.cfg.loss_chunk = chunk
    got = student(idx, y, teacher=teacher)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = student(idx, y, teacher=teacher)
    torch.testing.assert_close(bf[0], plain[0], rtol=2e-2, atol=2e-2)  # bf16 logits
    assert plain[0] != plain[1]  # the KL term is there
