"""Settings a config never reads (slmlab/unused.py): each is named with why, none is named falsely.

The oracle for "has no effect" is independent of the rules: the model built from the same seed
(weights and logits), the resolved phases and the optimizer's hyperparameters, with the setting and
without it."""
import textwrap

import pytest
import torch

import train
from arch import build_model
from arch.registry import _LOADED, LETTERS, MIXERS
from slmlab.cli import run_cli
from slmlab.config import load_config
from slmlab.optim import build_optimizer
from slmlab.phases import lr_mult, resolve_phases
from slmlab.unused import RULES, settings, unused_changes, why_unused

TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.vocab_size=64"]
DEFAULT = load_config(overrides=TINY)

# (overrides, the setting they leave unused, a fragment of why)
UNUSED = [
    (["optim.name=adamw", "optim.muon_momentum=0.9"], "optim.muon_momentum", "optim.name is adamw"),
    (["optim.name=adamw", "optim.muon_lr=0.02", "optim.muon_ns_dtype=float32"], "optim.muon_lr", "optim.name is adamw"),
    (["objective.mask_id=7"], "objective.mask_id", "objective.name is ar"),
    (["train.seq_len=512"], "train.seq_len", "train.phases gives each stage its seq_len (256, 1024, 2048)"),
    (["train.batch_size=4"], "train.batch_size", "tokens_per_step"),
    (["train.schedule=cosine", "train.decay_frac=0.5"], "train.decay_frac", "train.schedule is cosine"),
    (["train.distill_temperature=4"], "train.distill_temperature", "train.teacher is not set"),
    (["train.lora.alpha=8"], "train.lora.alpha", "train.lora.r is 0"),
    (["train.ckpt_every=0", "train.keep_checkpoints=5"], "train.keep_checkpoints", "train.ckpt_every is 0"),
    (["train.sample_tokens=0", "train.sample_prompt=x"], "train.sample_prompt", "train.sample_tokens is 0"),
    (["train.quality_score=fn:length"], "train.quality_score", "no train.phases entry has order: quality"),
    (["logging.wandb_mode=online"], "logging.wandb_mode", "logging.wandb is false"),
    (["model.window=64"], "model.window", "model.window_pattern is L"),
    (["model.layers=C", "model.window_pattern=SL"], "model.window_pattern", "no layer takes a window"),
    (["model.layers=C", "model.window=64"], "model.window", "no layer takes a window"),
    (["model.max_positions=512"], "model.max_positions", "model.pos is rope"),
    (["model.pos=learned", "model.rope_theta=5e5"], "model.rope_theta", "model.pos is learned"),
    (["model.layers=C", "model.rope_theta=5e5"], "model.rope_theta", "no layer is attention"),
    (["model.layers=C", "model.n_kv_heads=2"], "model.n_kv_heads", "no layer is attention"),
    (["model.layers=C", "model.qk_norm=false", "model.attn_bias=true"], "model.qk_norm", "no layer is attention"),
    (["model.qk_norm=false", "model.qk_norm_scope=all"], "model.qk_norm_scope", "model.qk_norm is false"),
    (["model.layers=A", "model.conv_kernel=4"], "model.conv_kernel", "no layer is a short conv"),
    (["model.layers=D", "model.n_kv_heads=2"], "model.n_kv_heads", "no layer is attention"),
    (["model.layers=D", "model.mixer_opts.deltanet.head_dim=8", "model.head_dim=4"], "model.head_dim",
     "model.mixer_opts.deltanet sets its own head_dim"),
    (["model.layers=D", "model.mixer_opts.deltanet={heads: 2, head_dim: 8}", "model.n_heads=4"], "model.n_heads",
     "model.mixer_opts.deltanet sets its own heads"),
    (["model.layers=M", "model.n_heads=4"], "model.n_heads", "no layer is attention"),  # mamba2 has its own heads
    (["model.layers=M", "model.conv_kernel=2"], "model.conv_kernel", "no layer is a short conv"),  # and its own taps
    (["model.layers=C", "model.mixer_opts.mamba2.d_state=16"], "model.mixer_opts.mamba2.d_state",
     "no layer uses the mamba2 block"),
    (["model.mlp=lif", "model.mlp_bias=true"], "model.mlp_bias", "model.mlp is lif"),
    (["model.mlp=none", "model.ffn_dim=128"], "model.ffn_dim", "model.mlp is none (no channel mixer)"),
    (["model.layers=C", "model.attn_scale=0.1"], "model.attn_scale", "no layer is attention"),
    (["model.pos=none", "model.rope_theta=5e5"], "model.rope_theta", "model.pos is none"),
    (["model.mlp=none", "model.mlp_bias=true"], "model.mlp_bias", "model.mlp is none (no channel mixer)"),
    (["model.mixer_opts.lif.beta=0.5"], "model.mixer_opts.lif.beta", "no layer uses the lif block"),
    (["model.mixer_opts.moe.experts=4"], "model.mixer_opts.moe.experts", "no layer uses the moe block"),
    # one option the block does not read under its others (both values trained one model, without a note)
    (["model.mlp=moe", "model.mixer_opts.moe.bias_update_rate=0.05"], "model.mixer_opts.moe.bias_update_rate",
     "model.mixer_opts.moe.expert_bias is false"),
    (["train.sft_eval_examples=64"], "train.sft_eval_examples", "data.spec is no SFT data"),
    (["model.mlp=moe", "model.mixer_opts.moe.expert_ffn=32", "model.ffn_dim=128"], "model.ffn_dim",
     "model.mixer_opts.moe.expert_ffn sets the experts' width"),
    (["train.avg_last=1"], "train.avg_last", "averaging one checkpoint is that checkpoint"),
    (["train.decay_frac=0", "train.min_lr_frac=0.1"], "train.min_lr_frac", "train.decay_frac is 0"),
    (["train.steps=10", "train.warmup_steps=9", "train.decay_frac=0.1", "train.min_lr_frac=0.1"],
     "train.min_lr_frac", "no step of the 10 decays below the full lr"),
]
# each changes what it sets, and is read
USED = [
    ["optim.name=muon", "optim.muon_momentum=0.9"],
    ["train.phases=[]", "train.seq_len=512"],
    ["train.phases=[]", "train.batch_size=4"],
    ["train.phases=[{seq_len: 64, share: 1.0}]", "train.batch_size=4"],  # no tokens_per_step: the batch sets it
    ["train.phases=[{seq_len: 64, share: 1.0}]", "train.seq_len=32"],  # and train.seq_len is in that batch
    ["model.window_pattern=SL", "model.window=4"],
    ["model.layers=CCA", "model.conv_kernel=4"],
    ["model.layers=CCA", "model.n_kv_heads=2"],
    ["model.mlp=lif", "model.mixer_opts.lif.beta=0.5"],
    ["model.layers=LLA", "model.mixer_opts.lif.beta=0.5"],
    ["model.pos=learned", "model.max_positions=512"],
    ["model.mlp=gelu", "model.mlp_bias=true"],
    ["model.layers=CCA", "model.rope_theta=5e5"],
    ["model.layers=D", "model.n_heads=4"],  # deltanet's heads default to the model's
    ["model.layers=D", "model.head_dim=8"],
    ["model.layers=D", "model.mixer_opts.deltanet.heads=2", "model.n_heads=4"],  # its head size: d_model // n_heads
    ["model.layers=MA", "model.mixer_opts.mamba2.d_state=16"],
    ["model.ffn_dim=192"],
    ["model.attn_scale=0.1"], ["model.embed_scale=2.0"], ["model.residual_scale=0.5"], ["model.logit_scale=2.0"],
    ["model.pos=none"],
    ["model.mlp=moe", "model.ffn_dim=256"],  # the experts' width: ffn_dim / top_k
    ["model.mlp=moe", "model.mixer_opts.moe.top_k=1"],
    # the experts' width is set, but the dense leading layer is model.ffn_dim wide
    ["model.mlp=moe", "model.mixer_opts={moe: {expert_ffn: 32, dense_layers: 1}}", "model.ffn_dim=256"],
]


def effect(overrides: list[str]):
    """What a run does with these settings: weights and logits (same seed), phases, optimizer groups."""
    cfg = load_config(overrides=TINY + overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective)
    logits = model(torch.arange(12).remainder(64)[None])
    logits = logits[0] if isinstance(logits, tuple) else logits
    groups = [{k: v for k, v in g.items() if k != "params"}
              for g in build_optimizer(model, cfg.optim, verbose=False).param_groups]
    return model.state_dict(), logits, resolve_phases(cfg), groups


def same(a, b) -> bool:
    (wa, la, pa, ga), (wb, lb, pb, gb) = a, b
    return (wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa) and torch.equal(la, lb)
            and pa == pb and ga == gb)


@pytest.mark.parametrize("overrides,key,why", UNUSED, ids=[u[1] for u in UNUSED])
def test_an_unused_setting_is_named_with_why(overrides, key, why):
    lines = unused_changes(load_config(overrides=TINY + overrides), DEFAULT)
    mine = [line for line in lines if line.startswith(f"{key}=")]
    assert len(mine) == 1 and "has no effect: " in mine[0] and why in mine[0], lines


ORACLE = [u for u in UNUSED if u[1].startswith(("model.", "optim.", "train.seq_len", "train.batch_size"))]


@pytest.mark.parametrize("overrides,key,why", ORACLE, ids=[u[1] for u in ORACLE])
def test_a_setting_named_unused_really_changes_nothing(overrides, key, why):
    without = [o for o in overrides if not o.startswith(key)]
    assert same(effect(overrides), effect(without))


@pytest.mark.parametrize("overrides", USED, ids=[u[-1] for u in USED])
def test_a_used_setting_is_not_named_and_changes_something(overrides):
    assert unused_changes(load_config(overrides=TINY + overrides), DEFAULT) == []
    assert not same(effect(overrides), effect(overrides[:-1]))


# the schedule's floor: (overrides with train.min_lr_frac last, whether it is read)
FLOOR = [(["train.decay_frac=0", "train.min_lr_frac=0.1"], False),
         (["train.steps=10", "train.warmup_steps=9", "train.decay_frac=0.1", "train.min_lr_frac=0.1"], False),
         (["train.steps=10", "train.decay_frac=0.1", "train.min_lr_frac=0.1"], False),  # one decay step, at full lr
         (["train.steps=10", "train.decay_frac=0.2", "train.min_lr_frac=0.1"], True),
         (["train.min_lr_frac=0.1"], True),
         (["train.schedule=cosine", "train.steps=4", "train.min_lr_frac=0.1"], True)]


@pytest.mark.parametrize("overrides,read", FLOOR, ids=[" ".join(f[0]) for f in FLOOR])
def test_min_lr_frac_is_named_unused_exactly_when_no_step_lr_depends_on_it(overrides, read):
    cfg, without = load_config(overrides=TINY + overrides), load_config(overrides=TINY + overrides[:-1])
    lrs = [[lr_mult(s, c.train) for s in range(c.train.steps)] for c in (cfg, without)]
    assert (lrs[0] != lrs[1]) == read
    named = [line for line in unused_changes(cfg, DEFAULT) if line.startswith("train.min_lr_frac=")]
    assert bool(named) != read, named


def test_an_option_rule_names_the_option_only_where_its_block_does_not_read_it():
    on = ["model.mlp=moe", "model.mixer_opts.moe.expert_bias=true", "model.mixer_opts.moe.bias_update_rate=0.05"]
    assert unused_changes(load_config(overrides=TINY + on), DEFAULT) == []  # it moves the biases each step
    off = load_config(overrides=TINY + ["model.mlp=moe", "model.mixer_opts.moe.bias_update_rate=0.05"])
    assert why_unused(off, "model.mixer_opts.moe") is None  # the block's options as a whole are read


def test_every_rule_names_a_setting():
    keys = settings(DEFAULT)
    assert [k for k in RULES if k not in keys] == []


def test_a_researchers_block_may_read_any_model_key(tmp_path):
    """With a block from model.imports in the model, block-specific keys are never called unused."""
    path = tmp_path / "myblock.py"
    path.write_text(textwrap.dedent("""
        from arch.block import Mixer
        from arch.registry import register
        import torch.nn as nn

        @register("kernelsized", "X")
        class KernelSized(Mixer):
            def __init__(self, cfg, layer_idx, window=None):
                super().__init__()
                self.proj = nn.Linear(cfg.d_model, cfg.d_model * cfg.conv_kernel, bias=False)
            def forward(self, x, state=None):
                return self.proj(x)[..., :x.shape[-1]], state
    """))
    try:
        cfg = load_config(overrides=TINY + [f"model.imports=[{path}]", "model.layers=X", "model.conv_kernel=4",
                                            "model.n_kv_heads=2"])
        assert unused_changes(cfg, DEFAULT) == []
        assert cfg.model.layer_letters() == "XXXXXX"  # its registered letter, not the name's initial
    finally:  # leave the registry as the other tests expect it
        MIXERS.pop("kernelsized", None), LETTERS.pop("X", None)
        for key in [k for k in _LOADED if k.startswith(str(tmp_path))]:
            del _LOADED[key]


def test_train_py_notes_what_the_command_line_leaves_unused(capsys):
    assert run_cli(train.main, ["--arch", "hybrid", "--dry-run", "train.seq_len=512", "optim.muon_lr=0.02",
                                "optim.lr=0.01", "optim.name=adamw"]) == 0
    err = capsys.readouterr().err  # stderr: a --json estimate or --print-config on stdout stays parseable
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert notes == ["note: optim.muon_lr=0.02 has no effect: optim.name is adamw",
                     "note: train.seq_len=512 has no effect: train.phases gives each stage its seq_len (256, 1024, "
                     "2048); train.phases=[] trains one stage at train.seq_len"]
    # what the preset sets is the baseline, not the user's: the spiking preset's lif options are used
    assert run_cli(train.main, ["--arch", "spiking", "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_train_py_notes_what_a_config_file_leaves_unused(tmp_path, capsys):
    """A key the user's --config file changes from config.yaml's defaults (same preset) and that is
    never read is noted as the file's; one the command line also changes is noted once, as the command
    line's."""
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  name: adamw\n  muon_lr: 0.05\ntrain:\n  seq_len: 512\n")
    assert run_cli(train.main, ["--config", str(path), "--dry-run", "train.seq_len=300"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes[0].startswith("note: train.seq_len=300 has no effect: train.phases gives each stage")
    assert notes[1:] == [f"note: {path}: optim.muon_lr=0.05 has no effect: optim.name is adamw"]
    path.write_text("optim:\n  name: muon\n  muon_lr: 0.05\n")  # read under muon: nothing to note
    assert run_cli(train.main, ["--config", str(path), "--dry-run"]) == 0
    assert "note:" not in capsys.readouterr().err
