"""The mixture-of-experts channel mixer (arch/moe.py): its two cores against each other, the block against
transformers' Qwen3-MoE, the balance loss, Muon on expert stacks, FLOPs, training and bad options."""
import pytest
import torch

from arch import ModelConfig, build_model
from arch.loss import linear_cross_entropy_ref
from arch.moe import balance_loss, expert_counts, moe_dense, moe_few, moe_sorted, route
from slmlab.config import OptimConfig
from slmlab.errors import ConfigError
from slmlab.optim import BatchedMuon, build_optimizer, route_params


def tiny(**kw):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, layers="CA", mlp="moe",
                mixer_opts={"moe": {"experts": 4, "top_k": 2}})
    return ModelConfig(**{**base, **kw})


def _case(N, E, k, d=16, f=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, requires_grad=True)
    w13 = (torch.randn(E, 2 * f, d, generator=g) * 0.2).requires_grad_()
    w2 = (torch.randn(E, d, f, generator=g) * 0.2).requires_grad_()
    logits = torch.randn(N, E, generator=g, requires_grad=True)
    return x, w13, w2, logits


@pytest.mark.parametrize("N", [1, 7, 63])
@pytest.mark.parametrize("E,k", [(4, 1), (8, 2), (5, 3)])
@pytest.mark.parametrize("fast", [moe_sorted, moe_few], ids=["sorted", "few"])
def test_fast_cores_equal_dense_reference_forward_and_gradients(N, E, k, fast):
    x, w13, w2, logits = _case(N, E, k)
    outs, grads = [], []
    for core in (moe_dense, fast):
        _, w, idx = route(logits, k, norm_topk=True)
        y = core(x, w13, w2, w, idx)
        outs.append(y)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), (x, w13, w2, logits)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if N == 1:  # experts no token picked get a zero gradient, not None
        assert grads[1][1].abs().sum(dim=(1, 2)).count_nonzero() == k


@pytest.mark.parametrize("norm_topk", [True, False])
@pytest.mark.parametrize("core", ["sorted", "dense"])
def test_block_equals_transformers_qwen3_moe_sparse_block(norm_topk, core):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = tiny(mixer_opts={"moe": {"experts": 6, "top_k": 2, "expert_ffn": 24, "norm_topk": norm_topk, "core": core}})
    torch.manual_seed(0)
    ours = build_model(cfg).layers[0].mlp
    theirs = Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=6,
                                                   num_experts_per_tok=2, norm_topk_prob=norm_topk))
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.router.weight)
        theirs.experts.gate_up_proj.copy_(ours.w13)
        theirs.experts.down_proj.copy_(ours.w2)
    x = torch.randn(3, 11, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)


def test_balance_loss_equals_transformers_and_is_k_when_balanced():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    logits = torch.randn(40, 8)
    probs, _, idx = route(logits, 2, norm_topk=True)
    theirs = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    torch.testing.assert_close(balance_loss(probs, expert_counts(idx, 8)), theirs)
    # uniform router, each expert picked equally often: f_e = k / E, P_e = 1 / E
    uniform = torch.full((8, 4), 0.25)
    assert balance_loss(uniform, expert_counts(torch.tensor([[0, 1], [2, 3]] * 4), 4)).item() == pytest.approx(2.0)
    # P uniform hides the skew
    assert balance_loss(uniform, expert_counts(torch.tensor([[0, 1]] * 8), 4)).item() == pytest.approx(2.0)
    skewed = torch.tensor([[0.9, 0.1 / 3, 0.1 / 3, 0.1 / 3]] * 8)
    assert balance_loss(skewed, expert_counts(torch.tensor([[0]] * 8), 4)).item() == pytest.approx(4 * 0.9)


def test_aux_loss_adds_its_gradient_and_not_its_value():
    torch.manual_seed(0)
    m = build_model(tiny(mixer_opts={"moe": {"experts": 4, "top_k": 2, "aux_loss_coef": 0.5}})).train()
    idx = torch.randint(0, 64, (2, 24))
    loss = m(idx, idx)
    got = torch.autograd.grad(loss, m.layers[0].mlp.router.weight)[0]
    # by hand: the same forward, the CE, plus coef * aux taken from each MoE layer
    h, _ = m.hidden(idx)
    ce = linear_cross_entropy_ref(h, m.lm_head.weight, idx)
    aux = sum(layer.mlp.take_aux_loss() for layer in m.layers)
    assert loss.item() == ce.item()  # the logged loss is the objective alone
    assert 0.5 * 2 <= aux.item() / len(m.layers)  # coef * (>= k)
    router = m.layers[0].mlp.router.weight
    ce_only = torch.autograd.grad(ce, router, retain_graph=True)[0]
    torch.testing.assert_close(got, torch.autograd.grad(ce + aux, router)[0])
    assert not torch.allclose(got, ce_only)
    with torch.no_grad():
        m.eval()
        m(idx, idx)
    assert all(layer.mlp.take_aux_loss() is None for layer in m.layers)  # eval records no balance loss


def test_moe_model_learns_and_logs_expert_loads():
    torch.manual_seed(0)
    m = build_model(tiny())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (2, 24))
    first = None
    for _ in range(15):
        loss = m(idx, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.7 * first
    mets = m.extra_metrics()
    assert 1.0 <= mets["moe.max_load"] <= 4 and mets["moe.dead_experts"] >= 0 and mets["moe.aux"] >= 2 - 1e-5
    m.eval()
    with torch.no_grad():
        m.token_nll(idx, idx)
    mets = m.extra_metrics()
    assert "moe.aux" not in mets and mets["moe.max_load"] >= 1.0  # eval: loads only
    assert m.extra_metrics() == {}  # read once per eval


def test_compiled_eval_runs_the_dense_core_without_graph_breaks():
    torch.manual_seed(0)
    m = build_model(tiny()).eval()
    x, y = torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        eager = m.token_nll(x, y)
        m.extra_metrics()
        explained = torch._dynamo.explain(m.token_nll)(x, y)
        compiled = torch.compile(m.token_nll)(x, y)
    assert explained.graph_break_count == 0, explained.break_reasons[:1]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_compiled_training_step_equals_eager():
    """Compiled training takes the loop over experts (a graph break at the slice sizes), and equals eager."""
    torch.manual_seed(0)
    m = build_model(tiny())
    idx = torch.randint(0, 64, (2, 17))
    eager = m(idx, idx)
    g_eager = torch.autograd.grad(eager, m.layers[0].mlp.w13)[0]
    compiled = torch.compile(m)(idx, idx)
    g_compiled = torch.autograd.grad(compiled, m.layers[0].mlp.w13)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_compiled, g_eager, atol=1e-5, rtol=1e-5)


def test_flops_count_the_experts_a_token_runs():
    """Default expert width = ffn / top_k: a token's expert FLOPs equal the dense SwiGLU's, the router's added."""
    dense, moe = build_model(tiny(mlp="swiglu")), build_model(tiny())
    assert moe.layers[0].mlp.f * 2 == dense.cfg.ffn
    assert moe.flops_per_token(64) == dense.flops_per_token(64) + 6 * 4 * 32 * 2  # + the routers
    assert moe.num_params() > 1.5 * dense.num_params()  # four experts of half width: twice the MLP weights
    assert moe.num_params(active=True) == dense.num_params() + 2 * 4 * 32  # two of four experts, and the routers


def test_muon_treats_an_expert_stack_as_its_matrices():
    torch.manual_seed(0)
    for shape in ((3, 8, 16), (3, 16, 8)):  # wide and tall
        stack = torch.nn.Parameter(torch.randn(shape))
        mats = [torch.nn.Parameter(stack.detach()[i].clone()) for i in range(3)]
        grad = torch.randn(shape)
        stack.grad = grad.clone()
        for i, p in enumerate(mats):
            p.grad = grad[i].clone()
        kw = dict(lr=0.1, weight_decay=0.01, ns_dtype=torch.float32)
        BatchedMuon([stack], **kw).step()
        BatchedMuon(mats, **kw).step()
        torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in mats]))
    # w13 [E, 2f, d]: each expert's gate and up rows are two matrices, orthogonalised apart as dense w1 and w3
    w13 = torch.nn.Parameter(torch.randn(3, 16, 8))
    halves = [torch.nn.Parameter(h.clone()) for h in w13.detach().reshape(6, 8, 8)]
    grad = torch.randn(3, 16, 8)
    w13.grad = grad.clone()
    for h, g in zip(halves, grad.reshape(6, 8, 8)):
        h.grad = g.clone()
    BatchedMuon([w13], row_splits={id(w13): 2}, **kw).step()
    BatchedMuon(halves, **kw).step()
    torch.testing.assert_close(w13.detach(), torch.stack([h.detach() for h in halves]).reshape(3, 16, 8))
    model = build_model(tiny())
    opt = build_optimizer(model, OptimConfig(name="muon"), verbose=False).optimizers["muon"]
    assert opt.row_splits == {id(model.layers[0].mlp.w13): 2, id(model.layers[1].mlp.w13): 2}
    routes = {r.group: r.names for r in route_params(build_model(tiny()), "muon")}
    assert {"layers.0.mlp.w13", "layers.0.mlp.w2", "layers.0.mlp.router.weight"} <= set(routes["muon"])
    assert "layers.0.mixer.conv.weight" in routes["adamw_no_decay"]  # a 3-D depthwise kernel, not a stack
    adamw = {r.group: r.names for r in route_params(build_model(tiny()), "adamw")}
    assert "layers.1.mlp.w13" in adamw["adamw_decay"]


@pytest.mark.parametrize("opts,needle", [
    ({"top_k": 5}, "model.mixer_opts.moe.top_k=5 exceeds model.mixer_opts.moe.experts=4"),
    ({"experts": 0}, "model.mixer_opts.moe.experts must be an integer >= 1"),
    ({"expert_ffn": -1}, "model.mixer_opts.moe.expert_ffn must be >= 0"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef must be >= 0"),
    ({"core": "grouped"}, "model.mixer_opts.moe.core must be sorted or dense"),
    ({"topk": 2}, "model.mixer_opts.moe: unknown key 'topk'"),
    ({"router": "relu"}, "model.mixer_opts.moe.router must be softmax or sigmoid"),
    ({"routed_scale": 0}, "model.mixer_opts.moe.routed_scale must be > 0"),
    ({"shared_gate": True}, "model.mixer_opts.moe.shared_gate gates the shared expert: give "
                            "model.mixer_opts.moe.shared_ffn > 0 too"),
    ({"bias_update_rate": -1}, "model.mixer_opts.moe.bias_update_rate must be >= 0"),
])
def test_bad_moe_options_are_one_line_errors(opts, needle):
    with pytest.raises(ConfigError) as e:
        build_model(tiny(mixer_opts={"moe": {"experts": 4, **opts}}))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_moe_with_mlp_bias_is_refused():
    with pytest.raises(ConfigError, match="model.mlp=moe has no biases: set model.mlp_bias=false"):
        build_model(tiny(mlp_bias=True))


def test_bf16_autocast_keeps_the_cores_together():
    torch.manual_seed(0)
    m = build_model(tiny())
    x = torch.randn(2, 13, 32)
    mlp = m.layers[0].mlp
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        mlp.opts.core = "dense"
        ref = mlp(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_expert_bias_moves_toward_balance_after_each_step():
    """DeepSeek-V3's auxiliary-loss-free balancing: after a step the bias of an expert above the mean load
    falls by bias_update_rate and the others rise; a skipped step moves nothing; eval records nothing."""
    torch.manual_seed(0)
    m = build_model(tiny(mixer_opts={"moe": {"experts": 4, "top_k": 1, "router": "sigmoid", "expert_bias": True,
                                             "bias_update_rate": 0.01}}))
    mlp = m.layers[0].mlp
    with torch.no_grad():
        mlp.router.weight.zero_()
        mlp.router.weight[0, :] = 1.0  # expert 0 scores highest for any input with a positive sum
    x = torch.rand(2, 9, 32)
    mlp(x)  # training mode, grad enabled: loads recorded
    m.after_optimizer_step(stepped=False)
    assert mlp.expert_bias.abs().sum() == 0  # a skipped step drops its loads
    mlp(x)
    m.after_optimizer_step()
    assert mlp.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    m.eval()
    with torch.no_grad():
        mlp(x)
    m.after_optimizer_step()
    assert mlp.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert "mlp.expert_bias" in dict(mlp.named_buffers(prefix="mlp"))  # saved with the weights


def test_the_bias_chooses_experts_but_does_not_weight_them():
    scores_logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 5.0, 0.0])
    s, w, e = route(scores_logits, 2, norm_topk=False, router="sigmoid", bias=bias, scale=2.0)
    assert e.tolist() == [[2, 0]]
    torch.testing.assert_close(w, 2.0 * torch.sigmoid(torch.tensor([[0.0, 2.0]])))


def test_dense_layers_keep_a_swiglu():
    from arch.block import SwiGLUMixer
    from arch.moe import MoE

    m = build_model(tiny(n_layers=3, layers="CCA", mixer_opts={"moe": {"experts": 4, "dense_layers": 2}}))
    assert [type(layer.mlp) for layer in m.layers] == [SwiGLUMixer, SwiGLUMixer, MoE]
    with pytest.raises(ConfigError, match="dense_layers=3 leaves no MoE layer among model.n_layers=3"):
        build_model(tiny(n_layers=3, layers="CCA", mixer_opts={"moe": {"dense_layers": 3}}))


@pytest.mark.parametrize("opts", ["{moe: {experts: 4, top_k: 2}}",
                                  "{moe: {experts: 4, top_k: 2, router: sigmoid, expert_bias: true, dense_layers: 1,"
                                  " aux_loss_coef: 0, bias_update_rate: 0.01}}"], ids=["softmax", "lfm2-style"])
def test_moe_run_with_muon_resumes_exactly(tmp_path, opts):
    """Muon's momentum for the 3-D expert stacks, the router's state and the expert bias come back from the
    checkpoint: a run resumed from step 4 logs the uninterrupted run's losses for steps 5-8."""
    import shutil

    from trainer_helpers import losses, run_here, tiny_overrides, write_corpus

    from slmlab.checkpoint import checkpoint_dirs

    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=8, **{"train.ckpt_every": 4, "optim.name": "muon", "model.mlp": "moe",
                                              "model.mixer_opts": opts})
    rc, _, err = run_here("train", "--data", corpus, "--out", tmp_path / "full", *ov)
    assert rc == 0, err
    run = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", run)
    (run / "summary.json").unlink()
    for ckpt in checkpoint_dirs(run):
        if int(ckpt.name[5:]) > 4:
            shutil.rmtree(ckpt)
    rc, out, err = run_here("train", "--resume", "--out", run)
    assert rc == 0 and "resumed from" in out, err
    final = next(line for line in out.splitlines() if line.startswith("final"))
    assert " moe load " in final and " dead)" in final  # the eval line shows the expert loads
    full, resumed = losses(tmp_path / "full"), losses(run)
    assert sorted(resumed) == sorted(full) == list(range(1, 9))
    assert max(abs(full[k] - resumed[k]) for k in full) <= 1e-6, (full, resumed)
    if "expert_bias" in opts:  # the bias moved, and is in the saved weights
        from slmlab.checkpoint import load_tensors

        biases = [v for k, v in load_tensors(run / "model.safetensors").items() if k.endswith("expert_bias")]
        assert biases and all(b.abs().sum() > 0 for b in biases)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_grad_checkpoint_changes_no_gradient_and_records_each_forward_once(router):
    """model.grad_checkpoint re-runs each block's forward in the backward: the balance loss must be
    recomputed for its backward, but the loads, the aux statistics and the expert-bias loads were counted
    a second time (the logged moe.max_load moved with a knob that changes no weight)."""
    opts = {"experts": 4, "top_k": 2, "router": router, "expert_bias": True, "bias_update_rate": 0.01,
            "aux_loss_coef": 0.1}
    idx = torch.randint(0, 64, (2, 24))
    got = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = build_model(tiny(mixer_opts={"moe": opts}, grad_checkpoint=ckpt)).train()
        m(idx, idx).backward()
        mlp = m.layers[0].mlp
        got.append(([p.grad.clone() for p in m.parameters()], mlp._load.clone(), mlp._stats.clone()))
        assert mlp._aux is None  # the LM took the first forward's; the recompute set none
    (g0, load0, stats0), (g1, load1, stats1) = got
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert torch.equal(load0, load1) and torch.equal(stats0, stats1)
