"""Optimizer routing (Muon for hidden matrices, AdamW for the rest) and steps against torch.optim."""
import copy

import pytest
import torch

from arch import build_model
from arch.config import ModelConfig
from slmlab.config import OptimConfig
from slmlab.errors import ConfigError
from slmlab.optim import build_optimizer, route_params


def tiny(tie=True, layers="CCA"):
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=300, d_model=32, n_layers=3, n_heads=2, n_kv_heads=1,
                                   layers=layers, tie_embeddings=tie))


def fake_grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize("tie", [True, False])
def test_muon_routing_is_explicit_and_complete(tie, capsys):
    model = tiny(tie=tie, layers="CCA")
    opt = build_optimizer(model, OptimConfig(name="muon"))
    printed = capsys.readouterr().out
    assert "optimizer routing" in printed and "muon" in printed and "adamw_no_decay" in printed
    routes = {r.group: set(r.names) for r in route_params(model, "muon")}
    names = {n for n, _ in model.named_parameters()}
    assert set().union(*routes.values()) == names
    assert sum(len(v) for v in routes.values()) == len(names)  # each in exactly one group
    for n, p in model.named_parameters():
        if any(k in n for k in ("q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "mlp.w")):
            assert n in routes["muon"], n
        elif n in ("embed.weight", "lm_head.weight"):
            assert n in routes["adamw_decay"], n
        else:  # norms, depthwise conv kernels
            assert n in routes["adamw_no_decay"] and p.dim() != 2, n
    assert ("lm_head.weight" in names) == (not tie)
    assert set(opt.optimizers) == {"muon", "adamw"}


def test_the_learned_position_table_stays_on_adamw():
    """pos_embed.weight (model.pos=learned: GPT-2 and its imports) went to Muon, with Muon's weight
    decay: a lookup table, as the token embedding, is no hidden matrix."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, layers="A",
                                    pos="learned", max_positions=64))
    routes = {r.group: set(r.names) for r in route_params(model, "muon")}
    assert "pos_embed.weight" in routes["adamw_decay"] and "pos_embed.weight" not in routes["muon"]


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optim.name"):
        route_params(tiny(), "sgd")
    from slmlab.config import load_config

    with pytest.raises(ConfigError, match="optim.name"):
        load_config(overrides=["optim.name=lion"])


def test_adamw_matches_torch_adamw():
    a, b = tiny(), tiny()
    ocfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    ours = build_optimizer(a, ocfg, verbose=False)
    decay = [p for p in b.parameters() if p.dim() == 2]
    rest = [p for p in b.parameters() if p.dim() != 2]
    ref = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for s in range(3):
        fake_grads(a, s)
        fake_grads(b, s)
        ours.step()
        ref.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_muon_matches_torch_muon_plus_adamw():
    a, b = tiny(), tiny()
    ocfg = OptimConfig(name="muon", lr=1e-2, muon_lr=0.02, muon_adjust_lr_fn="original")
    ours = build_optimizer(a, ocfg, verbose=False)
    ours.optimizers["muon"].ns_dtype = torch.bfloat16  # torch.optim.Muon's NS dtype: then updates are equal
    ours.set_lr_mult(0.5)  # the schedule scales both optimizers
    hidden = [p for n, p in b.named_parameters() if p.dim() == 2 and not n.startswith("embed")]
    emb = [b.embed.weight]
    rest = [p for p in b.parameters() if p.dim() != 2]
    m = torch.optim.Muon(hidden, lr=0.01, weight_decay=0.1, adjust_lr_fn="original")
    w = torch.optim.AdamW([{"params": emb, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                          lr=5e-3, betas=(0.9, 0.95))
    for s in range(3):
        fake_grads(a, s)
        fake_grads(b, s)
        ours.step()
        m.step()
        w.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("batch_numel", [2 ** 24, 1, 64 * 32 * 2])  # one batch a shape; one matrix each; 2 + 1
def test_batched_newton_schulz_equals_a_plain_fp32_loop(batch_numel):
    """BatchedMuon's NS (stacked by shape, in batches of up to batch_numel elements, tall matrices
    transposed) against the textbook iteration on one fp32 matrix at a time; and its full update
    against that reference."""
    from slmlab.optim import BatchedMuon, newton_schulz

    def plain(G, steps=5, a=3.4445, b=-4.7750, c=2.0315):
        X = G.T if G.shape[0] > G.shape[1] else G
        X = X / X.norm().clamp(min=1e-7)
        for _ in range(steps):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        return X.T if G.shape[0] > G.shape[1] else X

    g = torch.Generator().manual_seed(0)
    G = torch.randn(3, 24, 40, generator=g)
    for i in range(3):
        torch.testing.assert_close(newton_schulz(G, 5)[i], plain(G[i]), atol=1e-5, rtol=1e-5)
    shapes = [(64, 32), (32, 64), (64, 32), (48, 48), (64, 32)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    before = [p.detach().clone() for p in params]
    opt = BatchedMuon(params, ns_dtype=torch.float32, batch_numel=batch_numel, lr=0.02, weight_decay=0.1,
                      momentum=0.0, nesterov=False, adjust_lr_fn="original")
    grads = [torch.randn(s, generator=g) for s in shapes]
    for p, gr in zip(params, grads):
        p.grad = gr
    opt.step()
    for p, p0, gr in zip(params, before, grads):
        ratio = max(1, p.shape[0] / p.shape[1]) ** 0.5
        want = p0 * (1 - 0.02 * 0.1) - 0.02 * ratio * plain(gr)
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5)


def _one_muon_update(adjust, seed=3, shape=(64, 32), lr=0.01):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(shape))
    before = p.detach().clone()
    opt = torch.optim.Muon([p], lr=lr, weight_decay=0.0, momentum=0.0, nesterov=False, adjust_lr_fn=adjust)
    p.grad = torch.randn(shape)
    opt.step()
    return p.detach() - before


def test_newton_schulz_batches_hold_at_most_the_limit_in_order():
    from slmlab.optim import ns_batches

    assert ns_batches([3, 3, 3, 10, 1], limit=6) == [[0, 1], [2], [3], [4]]  # 10 alone: one matrix is never split
    assert ns_batches([2, 2, 2], limit=6) == [[0, 1, 2]]
    assert ns_batches([]) == []


def test_muon_update_is_orthogonalised_and_deterministic():
    u = _one_muon_update("original")
    torch.testing.assert_close(u, _one_muon_update("original"), rtol=0, atol=0)
    s = torch.linalg.svdvals(u)
    # Newton-Schulz with the quintic coefficients pushes every singular value into ~[0.7, 1.2]:
    # the update is near-orthogonal whatever the gradient's spectrum (a raw Gaussian's spans ~0.3-1.7 x).
    assert s.max() / s.min() < 1.8, s
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(4))
    sg = torch.linalg.svdvals(g)
    assert sg.max() / sg.min() > 2.5


def test_match_rms_adamw_gives_update_rms_near_0_2_lr():
    lr = 0.01
    u = _one_muon_update("match_rms_adamw", lr=lr, shape=(96, 48))
    rms = u.pow(2).mean().sqrt().item()
    assert 0.14 * lr < rms < 0.26 * lr, rms


def test_state_dict_round_trip():
    a = tiny()
    opt = build_optimizer(a, OptimConfig(name="muon"), verbose=False)
    fake_grads(a)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    b = copy.deepcopy(a)
    opt2 = build_optimizer(b, OptimConfig(name="muon"), verbose=False)
    opt2.load_state_dict(sd)
    for o in (opt, opt2):
        fake_grads(a if o is opt else b, 7)
        o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    with pytest.raises(ValueError):
        build_optimizer(tiny(), OptimConfig(name="adamw"), verbose=False).load_state_dict(sd)


@pytest.mark.parametrize("picked", ["float32", "bfloat16"])
def test_a_resumed_auto_muon_keeps_the_dtype_its_run_picked(monkeypatch, picked):
    """auto's probe times bf16 against fp32 once per process: a resume under other load could pick the
    other, and its losses then parted from the run's. The state dict carries the pick; an explicit
    setting, or another kind of device, still decides for itself."""
    from slmlab import optim

    monkeypatch.setattr(optim, "_fast_cpu_dtype", lambda: optim.NS_DTYPES[picked])
    sd = build_optimizer(tiny(), OptimConfig(name="muon"), verbose=False).state_dict()
    assert sd["muon"]["ns_dtype"] == {"device": "cpu", "dtype": picked}
    monkeypatch.setattr(optim, "_fast_cpu_dtype", lambda: pytest.fail("probed again on resume"))
    resumed = build_optimizer(tiny(), OptimConfig(name="muon"), verbose=False)
    resumed.load_state_dict(sd)
    assert resumed.optimizers["muon"].ns_dtype == optim.NS_DTYPES[picked]
    explicit = build_optimizer(tiny(), OptimConfig(name="muon", muon_ns_dtype="float32"), verbose=False)
    explicit.load_state_dict(sd)
    assert explicit.optimizers["muon"].ns_dtype == torch.float32
    other = {**sd, "muon": {**sd["muon"], "ns_dtype": {"device": "cuda", "dtype": "bfloat16"}}}
    fresh = build_optimizer(tiny(), OptimConfig(name="muon"), verbose=False)
    fresh.load_state_dict(other)
    assert fresh.optimizers["muon"].ns_dtype is None


def test_ranks_take_rank_0s_newton_schulz_dtype(monkeypatch):
    """auto's probe is timed in each process: two ranks that picked differently would update their DDP
    replicas apart (nothing re-syncs them). Rank 0's pick is broadcast; here rank 0 said bf16."""
    import torch.distributed as dist

    from slmlab import optim

    def rank0_says_bf16(flag, src):
        assert src == 0
        flag.fill_(1)

    monkeypatch.setattr(optim, "_probe_cpu_dtype", lambda: torch.float32)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "broadcast", rank0_says_bf16)
    assert optim._fast_cpu_dtype.__wrapped__() == torch.bfloat16
