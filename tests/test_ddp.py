"""torchrun with 2 CPU processes (gloo): each rank trains on its half of the global batch, and
the losses match a 1-process run with the same global batch."""
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from trainer_helpers import ROOT, kill_after_checkpoint, losses, run_train, tiny_overrides, write_corpus

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun_cmd(args, nproc=2):
    # --standalone: torchrun rendezvouses on a free localhost port (a fixed one can be taken on a shared machine).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            str(ROOT / "train.py"), *args]


def torchrun(args, nproc=2, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(torchrun_cmd(args, nproc), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _compare(tmp_path, extra):
    corpus = write_corpus(tmp_path / "c.txt")
    ov = tiny_overrides(tmp_path, steps=5, **extra)
    one = run_train(["--data", str(corpus), "--out", str(tmp_path / "one"), *ov])
    assert one.returncode == 0, one.stderr
    two = torchrun(["--data", str(corpus), "--out", str(tmp_path / "two"), *ov])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    bad = {k: (abs(a[k] - b[k]), reorder_bound(a[k], k, TOKENS_PER_STEP)) for k in a
           if abs(a[k] - b[k]) > reorder_bound(a[k], k, TOKENS_PER_STEP)}
    assert not bad, f"step: (|diff|, bound) {bad}; losses {a} vs {b}"
    return tmp_path / "two"


TOKENS_PER_STEP = 128  # tiny_overrides' phases


def reorder_bound(loss: float, step: int, n_terms: int) -> float:
    """How far summation order alone can move a step's loss between 1 and 2 processes.

    gloo sums the ranks' gradients (and dist.mean the ranks' half-batch losses) where one process
    sums all n_terms per-token terms at once. Reordering an fp32 sum of n terms moves it by at most
    n * u * sum|terms| (u = 2**-24, Higham's gamma_n bound), so the mean loss by n * u * |loss|:
    128 * 6e-8 * 5.7 = 4.4e-5 at step 1. From step 2 the weights differ as well: every step's
    update carries its own reordering error (Muon's bf16 Newton-Schulz rounds it, differently only
    where its fp32 inputs differed) and earlier ones persist, so over these few small steps the
    bound grows linearly with the step. Measured: at most 6.9e-6 here and 1.57e-5 on a fresh
    machine (both at step 3, bound 1.3e-4), while one step of training moves the loss by ~3e-2,
    so a rank training on the wrong rows still fails.
    """
    return step * n_terms * 2.0 ** -24 * abs(loss)


def test_ddp_two_processes_match_one(tmp_path):
    run = _compare(tmp_path, {"optim.name": "muon"})
    assert (run / "model.safetensors").is_file() and not list(run.glob("*rank*"))


# Muon's Newton-Schulz in fp32 in both runs: the 1-process run probes its dtype on its own, and a
# machine where bf16 won the probe in one of them would compare two optimizers.
MUON = {"optim.name": "muon", "optim.muon_ns_dtype": "float32"}


@pytest.mark.slow
@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_fsdp2_two_processes_match_one(tmp_path, optim):
    """Muon under FSDP2 gathers each sharded update whole for Newton-Schulz and applies each rank's rows."""
    from slmlab.rundir import RunDir

    run = _compare(tmp_path, {**(MUON if optim == "muon" else {"optim.name": optim}), "train.parallel": "fsdp"})
    RunDir.open(run).load()  # the gathered full weights load into a plain model


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("ddp", "ddp"), ("fsdp", "fsdp"), ("fsdp", "ddp")])
def test_a_killed_two_rank_run_resumes_as_the_uninterrupted_one(tmp_path, first, then):
    """Checkpoints hold the whole optimizer state (gathered from FSDP2's shards), so a run resumes under
    either parallelism. A finished run resumed again (at its last step: no training step before the final
    evaluation) rewrites the same outputs."""
    corpus = write_corpus(tmp_path / "c.txt")
    # Killed from outside once the step-20 checkpoint exists, with 40 steps left to run.
    ov = tiny_overrides(tmp_path, steps=60, **MUON, **{"train.ckpt_every": 4})
    one = run_train(["--data", str(corpus), "--out", str(tmp_path / "one"), *ov])
    assert one.returncode == 0, one.stderr
    cmd = torchrun_cmd(["--data", str(corpus), "--out", str(tmp_path / "two"), *ov, f"train.parallel={first}"])
    assert kill_after_checkpoint(cmd, tmp_path / "two", min_step=20, log=tmp_path / "killed.log") != 0
    assert not (tmp_path / "two" / "summary.json").exists()
    resumed = torchrun(["--resume", "--out", str(tmp_path / "two"), f"train.parallel={then}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) - reorder_bound(a[k], k, TOKENS_PER_STEP)
                                          for k in a) <= 0, (a, b)
    final = json.loads((tmp_path / "two" / "summary.json").read_text())["val_loss"]
    again = torchrun(["--resume", "--out", str(tmp_path / "two"), f"train.parallel={then}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["val_loss"] == final


@contextmanager
def plain_and_sharded(tmp_path):
    """In one process (gloo, world 1): a tiny LM and its twin sharded by the trainer's FSDP2 wrap, whose
    parameters are DTensors (each rank's rows being all of them)."""
    import torch

    from arch import LM, ModelConfig
    from slmlab.runtime import is_sharded, wrap_parallel

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = LM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, layers="CA"))
        sharded = LM(plain.cfg)
        sharded.load_state_dict(plain.state_dict())
        # wrap_parallel reads the world size only, and shards for any above 1: the group itself has one rank.
        _, sharded = wrap_parallel(sharded, "fsdp", SimpleNamespace(world=2), torch.device("cpu"))
        assert is_sharded(sharded)
        yield plain, sharded
    finally:
        dist.destroy_process_group()


def test_evaluation_under_fsdp2_gathers_the_root_weights(tmp_path):
    """token_nll is not forward, so FSDP2's pre-forward hook never gathers the root's embedding and head;
    inside root_gathered it gives the unsharded model's numbers. Evaluated before any forward (a resume at
    the last step), the blocks did not become FSDP roots of their own: the forward after it runs. (The
    slow torchrun tests run the whole trainer.)"""
    import torch

    from slmlab.runtime import root_gathered

    with plain_and_sharded(tmp_path) as (plain, sharded), torch.no_grad():
        x = torch.randint(0, 61, (2, 9))
        want = plain.eval().token_nll(x, x)
        with pytest.raises(RuntimeError, match="DTensor"):
            sharded.eval().token_nll(x, x)
        with root_gathered(sharded):
            got = sharded.token_nll(x, x)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(sharded(x, x), plain(x, x))


def test_muon_and_adamw_step_fsdp2_shards_as_the_plain_model_and_checkpoint_whole_state(tmp_path):
    """Muon gathers each sharded update whole for Newton-Schulz and applies the rank's rows; AdamW steps
    the shards. Three steps equal the plain model's; state_dict gives whole plain tensors (what a
    checkpoint saves, loadable with weights_only), and load_state_dict shards them again."""
    import torch

    from slmlab.config import load_config
    from slmlab.optim import build_optimizer
    from slmlab.runtime import is_dtensor

    ocfg = load_config(overrides=["optim.name=muon", "optim.muon_ns_dtype=float32"]).optim
    with plain_and_sharded(tmp_path) as (plain, sharded):
        opts = [build_optimizer(m, ocfg, verbose=False) for m in (plain, sharded)]
        assert {"muon", "adamw"} <= set(opts[1].optimizers)

        def steps(n):
            for _ in range(n):
                x = torch.randint(0, 61, (2, 9))
                for m, opt in zip((plain, sharded), opts):
                    m(x, x).backward()
                    opt.step()
                    opt.zero_grad()
            for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
                torch.testing.assert_close(b.full_tensor(), a, rtol=1e-5, atol=1e-6, msg=name)

        steps(3)
        whole = opts[1].state_dict()
        for k, sd in whole.items():
            for i, state in sd["state"].items():
                for name, v in state.items():
                    assert not is_dtensor(v)
                    torch.testing.assert_close(v, opts[0].state_dict()[k]["state"][i][name], rtol=1e-5, atol=1e-6)
        torch.save(whole, tmp_path / "state.pt")
        opts[1].load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
        shards = [v for opt in opts[1].optimizers.values() for s in opt.state.values() for v in s.values()]
        assert sum(map(is_dtensor, shards)) == sum(1 for v in shards if v.dim())  # all but AdamW's step counts
        steps(2)


# Muon parameters of uneven rows over 3 ranks: 7 rows (3, 3, 1), 2 rows (1, 1 and none: an empty shard), a
# stack of 3 matrices 4 x 6 (one a rank), and 8 rows that are 2 fused 4 x 6 matrices (the stack's job).
MUON_SHAPES = {"a": (7, 5), "b": (7, 5), "c": (2, 3), "d": (3, 4, 6), "e": (8, 6)}


def _muon_params(seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Module()
    for name, shape in MUON_SHAPES.items():
        m.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=g)))
    grads = [{n: torch.randn(s, generator=g) for n, s in MUON_SHAPES.items()} for _ in range(3)]
    return m, grads


def _muon(m):
    import torch

    from slmlab.optim import BatchedMuon

    return BatchedMuon(m.parameters(), ns_dtype=torch.float32, row_splits={id(m.e): 2}, lr=0.02, weight_decay=0.1,
                       momentum=0.95, nesterov=True, adjust_lr_fn="match_rms_adamw")


def _sharded_muon_worker(rank, world, store, out):
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from slmlab.optim import whole_state
    from slmlab.runtime import on_main

    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    try:
        m, grads = _muon_params()
        fully_shard(m)
        opt = _muon(m)
        for step in grads:
            for n, p in m.named_parameters():
                p.grad = distribute_tensor(step[n], p.device_mesh, p.placements, src_data_rank=None)
            opt.step()
        whole = {n: p.full_tensor() for n, p in m.named_parameters()}
        # what a checkpoint keeps: gathered to rank 0 alone, as full_tensor() gathers to all
        mine = {n: on_main(p) for n, p in m.named_parameters()}
        state = whole_state(opt.state_dict())["state"]
        if rank:
            assert all(v is None for v in mine.values()) and all(s["momentum_buffer"] is None for s in state.values())
            return
        assert all(torch.equal(mine[n], whole[n]) for n in whole)
        torch.save({"weights": whole, "momentum": [s["momentum_buffer"] for s in state.values()]}, out)
    finally:
        dist.destroy_process_group()


def test_muon_under_fsdp2_gathers_and_scatters_uneven_rows_as_one_process_steps(tmp_path):
    """Each Newton-Schulz job is gathered whole on the one rank that orthogonalises it, and each rank
    receives its rows of the result: with rows that do not split evenly over 3 ranks, an empty shard, a
    3-D stack and fused rows, three steps equal BatchedMuon's on the unsharded parameters. What a checkpoint
    saves (weights, momentum) is gathered whole to rank 0 and to no other rank."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_sharded_muon_worker, args=(3, str(tmp_path / "store"), str(tmp_path / "w.pt")), nprocs=3)
    m, grads = _muon_params()
    opt = _muon(m)
    for step in grads:
        for n, p in m.named_parameters():
            p.grad = step[n]
        opt.step()
    got = torch.load(tmp_path / "w.pt", weights_only=True)
    for n, p in m.named_parameters():
        torch.testing.assert_close(got["weights"][n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
    for a, b in zip(got["momentum"], (opt.state[p]["momentum_buffer"] for p in m.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_moe_with_expert_bias_on_two_ranks_matches_one_process(tmp_path, parallel):
    """The expert bias moves by the loads of the whole global batch (all-reduced over ranks), so 2
    ranks keep one bias and train as 1 process does, under DDP and under FSDP2 (which shards the expert
    stacks). (The balance loss is left out: like Megatron's, it is computed per rank on that rank's
    tokens, which no longer equals the 1-process loss.)"""
    from slmlab.checkpoint import load_tensors

    run = _compare(tmp_path, {"optim.name": "adamw", "train.parallel": parallel, "model.mlp": "moe",
                                    "model.mixer_opts": "{moe: {experts: 4, router: sigmoid, expert_bias: true, "
                                                        "aux_loss_coef: 0.0, bias_update_rate: 0.01}}"})
    one, two = (load_tensors(p / "model.safetensors") for p in (tmp_path / "one", run))
    biases = [k for k in one if k.endswith("expert_bias")]
    assert biases and all(one[k].abs().sum() > 0 and (one[k] - two[k]).abs().max() < 1e-6 for k in biases)


@pytest.mark.slow
def test_masked_diffusion_on_two_ranks_matches_one_process(tmp_path):
    """Each rank keeps its rows of the global batch's diffusion times and masks: every rank drew the same
    ones before (the 2-rank losses then differed from the 1-process ones by 0.6 to 2.9 nats)."""
    _compare(tmp_path, {"optim.name": "adamw", "objective.name": "mdlm", "model.causal": "false"})
