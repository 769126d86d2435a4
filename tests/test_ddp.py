"""torchrun with 2 CPU processes (gloo): each rank trains on its half of the global batch, and
the losses match a 1-process run with the same global batch."""
import os
import subprocess
import sys

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


@pytest.mark.slow
def test_fsdp2_two_processes_match_one(tmp_path):
    from slmlab.rundir import RunDir

    run = _compare(tmp_path, {"optim.name": "adamw", "train.parallel": "fsdp"})
    RunDir.open(run).load()  # the gathered full weights load into a plain model


@pytest.mark.slow
def test_ddp_resume(tmp_path):
    corpus = write_corpus(tmp_path / "c.txt")
    # Killed from outside once the step-20 checkpoint exists, with 40 steps left to run.
    ov = tiny_overrides(tmp_path, steps=60, **{"optim.name": "muon", "train.ckpt_every": 4})
    one = run_train(["--data", str(corpus), "--out", str(tmp_path / "one"), *ov])
    assert one.returncode == 0, one.stderr
    cmd = torchrun_cmd(["--data", str(corpus), "--out", str(tmp_path / "two"), *ov])
    assert kill_after_checkpoint(cmd, tmp_path / "two", min_step=20, log=tmp_path / "killed.log") != 0
    assert not (tmp_path / "two" / "summary.json").exists()
    resumed = torchrun(["--resume", "--out", str(tmp_path / "two")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) - reorder_bound(a[k], k, TOKENS_PER_STEP)
                                          for k in a) <= 0, (a, b)


def test_evaluation_under_fsdp2_gathers_the_root_weights(tmp_path):
    """In one process (gloo, world 1: the parameters are still DTensors): token_nll is not forward,
    so FSDP2's pre-forward hook never gathers the root's embedding and head; inside root_gathered
    it gives the unsharded model's numbers. (The slow torchrun test runs the whole trainer.)"""
    import torch
    from torch.distributed.fsdp import fully_shard

    from arch import LM, ModelConfig
    from slmlab.runtime import is_sharded, root_gathered

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = LM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, layers="CA")).eval()
        sharded = LM(plain.cfg).eval()
        sharded.load_state_dict(plain.state_dict())
        for layer in sharded.layers:
            fully_shard(layer)
        fully_shard(sharded)
        assert is_sharded(sharded)
        x = torch.randint(0, 61, (2, 9))
        with torch.no_grad():
            want = plain.token_nll(x, x)
            with pytest.raises(RuntimeError, match="DTensor"):
                sharded.token_nll(x, x)
            with root_gathered(sharded):
                got = sharded.token_nll(x, x)
        torch.testing.assert_close(got, want)
    finally:
        dist.destroy_process_group()


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
