"""The block contract (arch/block.py): every registered mixer declares its residual outputs and its
non-parameter FLOPs; flops_per_token is exact on a config computed by hand; windows change through
a method; a researcher's mixer in a file outside the repository loads with --import, trains,
samples, decodes like its full forward and has its FLOPs counted. arch.check passes every built-in
block and names what is wrong with broken ones; the model refuses a block's bad output, the
registry bad names and classes, all as one line naming the block and its file."""
import json
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import arch
from arch import CHANNEL_MIXERS, MIXERS, ModelConfig, build_model
from arch.check import check_channel_mixer, check_mixer, check_mixer_windows, tiny_config
from arch.registry import _LOADED, LETTERS, OPTIONS, load_imports
from slmlab.errors import ConfigError

# The README's stateful example, as a user would write it in their own file.
TOKEN_SHIFT = textwrap.dedent('''
    import torch
    import torch.nn as nn

    from arch import Mixer, register


    @register("shift", "S")
    class TokenShift(Mixer):
        """y = proj(x_t + mix * (x_{t-1} - x_t)): RWKV's token shift; the state is the last input."""

        residual_out = ("proj",)

        def __init__(self, cfg, layer_idx, window=None):
            super().__init__()
            self.mix = nn.Parameter(torch.full((cfg.d_model,), 0.5))
            self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

        def init_state(self, batch_size, device=None, dtype=torch.float32):
            return torch.zeros(batch_size, 1, self.proj.in_features, device=device, dtype=dtype)

        def forward(self, x, state=None):
            prev = torch.zeros_like(x[:, :1]) if state is None else state
            shifted = torch.cat([prev, x[:, :-1]], dim=1)
            y = self.proj(x + self.mix * (shifted - x))
            return y, (None if state is None else x[:, -1:])

        def flops_per_token(self, seq_len):
            return 3 * 3 * self.proj.in_features  # subtract, scale, add per channel; x3 fwd + bwd
''')


@pytest.fixture
def shift_file(tmp_path):
    """TokenShift in a file outside the repository; unregistered again after the test."""
    path = tmp_path / "blocks" / "shift.py"
    path.parent.mkdir()
    path.write_text(TOKEN_SHIFT)
    yield path
    MIXERS.pop("shift", None)
    LETTERS.pop("S", None)
    for key in [k for k in _LOADED if k.endswith("shift.py")]:
        del _LOADED[key]


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, layers="CA",
                conv_kernel=3)
    base.update(kw)
    return ModelConfig(**base)


def test_flops_per_token_by_hand():
    m = build_model(tiny())
    d, f, V, T, hd = 32, 64, 50, 16, 16
    conv_params = d * 3 * d + d * d  # in_proj, out_proj (the [d, 1, K] taps are not a matmul)
    attn_params = d * 2 * hd + 2 * (d * hd) + 2 * hd * d  # q, k, v (1 kv head), out
    mlp_params = 2 * 3 * d * f  # two SwiGLUs
    head = V * d  # tied, still a matmul
    params = 6 * (conv_params + attn_params + mlp_params + head)
    conv_taps = 6 * d * 3
    attn_scores = 12 * 2 * hd * (T / 2)  # causal: a query sees T/2 keys on average
    assert m.flops_per_token(T) == params + conv_taps + attn_scores
    m.set_windows([None, 4])  # sliding window 4: queries 3.. see 4 keys, 0, 1, 2 see 1, 2, 3
    seen = sum(min(i + 1, 4) for i in range(T)) / T  # 3.625, the continuous count 4 - 16 / 32 = 3.5
    assert m.flops_per_token(T) == params + conv_taps + 12 * 2 * hd * 3.5 and abs(3.5 - seen) < 0.5
    m.set_windows([None, T])  # a window of the whole sequence is full attention
    assert m.flops_per_token(T) == params + conv_taps + attn_scores


def test_every_registered_block_declares_the_contract():
    cfg = tiny(layers="CAL", n_layers=3)
    for name, cls in MIXERS.items():
        mixer = cls(cfg, 0)
        assert isinstance(mixer, arch.Mixer), name
        assert mixer.residual_out, f"{name} declares no residual output"
        for lin in mixer.residual_out:
            assert isinstance(mixer.get_submodule(lin), nn.Linear), (name, lin)
        assert mixer.flops_per_token(64) > 0, name
    for name, cls in CHANNEL_MIXERS.items():
        mlp = cls(cfg)
        # >= 0: a dense MLP (swiglu, gelu) does all its work in parameter matmuls, which the LM counts.
        # A block whose residual output is a matrix stack (moe's w2, no nn.Linear) scales its own init.
        writes = mlp.residual_out or getattr(mlp, "matrix_stacks", ())
        assert isinstance(mlp, arch.ChannelMixer) and writes and mlp.flops_per_token(64) >= 0, name
    assert set(OPTIONS) <= set(MIXERS) | set(CHANNEL_MIXERS)


def test_residual_init_is_declared_by_the_block():
    torch.manual_seed(0)
    cfg = tiny(d_model=256, ffn_dim=512, n_heads=4, n_kv_heads=2, n_layers=8, layers="CCCA")
    m = build_model(cfg)
    scaled = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for layer in m.layers:
        assert abs(layer.mixer.out_proj.weight.std().item() - scaled) < 0.1 * scaled
        assert abs(layer.mlp.w2.weight.std().item() - scaled) < 0.1 * scaled
        assert abs(layer.mlp.w1.weight.std().item() - cfg.init_std) < 0.1 * cfg.init_std


def test_windows_change_through_a_method():
    m = build_model(tiny(window_pattern="S", window=8))
    assert m.layers[1].mixer.window == 8
    m.set_windows([None, 3])
    assert m.layers[1].mixer.window == 3
    with pytest.raises(ValueError, match="has no attention window"):
        m.set_windows([3, 3])  # layer 0 is a conv
    with pytest.raises(ValueError, match="window must be > 0"):
        m.set_windows([None, 0])


def test_imports_bad_entries_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="model.imports: file not found"):
        tiny(imports=[str(tmp_path / "nope.py")])
    broken = tmp_path / "broken.py"
    broken.write_text("import does_not_exist_anywhere\n")
    with pytest.raises(ConfigError) as e:
        tiny(imports=[str(broken)])
    assert "importing" in str(e.value) and "ModuleNotFoundError" in str(e.value) and "\n" not in str(e.value)
    import sys

    assert not [m for m in sys.modules if m.startswith("slmlab_user_broken")]  # no half-imported module left
    with pytest.raises(ConfigError, match="unknown block 'S'"):
        tiny(layers="SSA", n_layers=3)  # not imported: the letter is unknown


def test_outside_mixer_decode_equals_forward_and_counts_flops(shift_file):
    cfg = tiny(imports=[str(shift_file)], layers="SSA", n_layers=3)
    torch.manual_seed(0)
    m = build_model(cfg).eval()
    assert [layer.kind for layer in m.layers] == ["shift", "shift", "attn"]
    idx = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        full = m(idx)
        st, outs = m.init_state(2), []
        for t in range(7):
            logits, st = m(idx[:, t:t + 1], states=st)
            outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    without = build_model(tiny(layers="A", n_layers=3))
    shift_params = 2 * (32 * 32)
    attn_params = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32)  # the two attention layers SSA replaces
    assert m.flops_per_token(16) == (without.flops_per_token(16) - 6 * attn_params - 2 * 12 * 2 * 16 * 8
                                     + 6 * shift_params + 2 * 3 * 3 * 32)


def test_outside_mixer_trains_and_samples_from_the_cli(shift_file, tmp_path, capsys):
    import sample
    import train
    from slmlab.checkpoint import sha256
    from slmlab.cli import run_cli
    from slmlab.rundir import RunDir

    corpus = tmp_path / "corpus.txt"
    words = "the cat sat on a mat while bob and alice run to the sea ".split()
    g = torch.Generator().manual_seed(0)
    corpus.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (4000,), generator=g)))
    out = tmp_path / "run"
    rc = run_cli(train.main, ["--import", str(shift_file), "--layers", "SSA", "--out", str(out), "--data", str(corpus),
                              "model.vocab_size=300", "model.d_model=32", "model.n_layers=3", "model.n_heads=2",
                              "model.n_kv_heads=1", "train.steps=30", "train.phases=[]", "train.batch_size=4",
                              "train.seq_len=32", "train.eval_every=100", "train.log_every=1",
                              "train.warmup_steps=2", "train.sample_tokens=8", "train.ckpt_every=0",
                              f"data.cache_dir={tmp_path / 'cache'}", "logging.progress=false"])
    assert rc == 0, capsys.readouterr().err
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r]
    assert losses[-1] < losses[0] - 0.5  # it learns
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flops_per_token"] > 0
    MIXERS.pop("shift")  # sample.py must re-import the block from the run's config (model.imports)
    LETTERS.pop("S")
    _LOADED.clear()
    capsys.readouterr()
    assert run_cli(sample.main, ["--run", str(out), "--max-new-tokens", "8", "--prompt", "the "]) == 0
    res = capsys.readouterr()
    assert "the " in res.out and "changed since" not in res.err
    assert run_cli(sample.main, ["--run", str(out), "--max-new-tokens", "2", "--compile"]) == 0
    assert "note: --compile compiles the static-state decode step, which shift lack(s)" in capsys.readouterr().err
    # the run fingerprints the block file: an edit since training is named when the run is loaded
    assert json.loads((out / "imports.json").read_text()) == {str(shift_file.resolve()): sha256(shift_file)}
    shift_file.write_text(shift_file.read_text() + "\n# edited after training\n")
    RunDir.open(out).config()
    assert f"note: {shift_file.resolve()} changed since {out} was written (sha256 differs)" in capsys.readouterr().err


# ---- arch.check and the contract checks at the model's edges ----

@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("causal", [True, False])
def test_check_mixer_passes_every_builtin_mixer(name, causal):
    assert check_mixer(name, tiny_config(causal=causal)) == []


def test_check_mixer_passes_a_sliding_window():
    assert check_mixer("attn", window=4) == []


@pytest.mark.parametrize("name", sorted(CHANNEL_MIXERS))
def test_check_channel_mixer_passes_every_builtin_channel_mixer(name):
    assert check_channel_mixer(name) == []


def test_builtin_channel_mixers_share_the_user_registry():
    """One registry: the built-in MLPs are registered like a user's, and every message lists them all."""
    assert {"swiglu", "gelu", "lif", "moe"} <= set(CHANNEL_MIXERS)
    with pytest.raises(ConfigError, match="known: gelu, lif, moe, swiglu"):
        tiny(mlp="nope")


# A header shared by the broken blocks below: a token mixer with one Linear and a real state.
BROKEN_HEAD = """
import torch, torch.nn as nn
from arch import Mixer, register

@register("broken", "Q")
class Broken(Mixer):
    residual_out = ("proj",)
    def __init__(self, cfg, layer_idx, window=None):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
    def init_state(self, batch_size, device=None, dtype=torch.float32):
        return torch.zeros(batch_size, 1, self.proj.in_features, device=device, dtype=dtype)
"""
SHIFTED = "torch.cat([torch.zeros_like(x[:, :1]) if state is None else state, x[:, :-1]], 1)"
# (forward's body, what arch.check says): each of these trained without an error before.
BROKEN = {
    "mean_over_time": ("return self.proj(x).mean(1, keepdim=True), state", "returned (y [2, 1, 32] float32, state), "
                       "expected (y [2, 7, 32] float32, state)"),
    "bare_tensor": ("return self.proj(x)", "returned a bare tensor [2, 1, 32] float32"),
    "float64": ("return self.proj(x).double(), state", "float64"),
    "future": ("return self.proj(x.flip(1).cumsum(1).flip(1)), state", "not causal: changing tokens 8..15 changed"),
    "stale_state": (f"return self.proj(x + {SHIFTED}), state", "returned the state it was given"),
    "none_state": ("return self.proj(x), None", "returned state None"),
    "no_init_state": (f"return self.proj(x + {SHIFTED}), (None if state is None else x[:, -1:])",
                      "init_state() returns None"),
    "bad_residual_out": ("return self.proj(x), state\n    residual_out = ('out_proj',)",
                         "residual_out names 'out_proj', which is not an nn.Linear of the block (its Linear layers: proj)"),
    "dead_param": ("return self.proj(x), state", "no gradient reaches unused"),
}


@pytest.fixture
def block_file(tmp_path):
    """Writes a block file and imports it; its blocks are unregistered afterwards."""
    before = set(MIXERS), dict(LETTERS), set(CHANNEL_MIXERS), set(OPTIONS)

    def load(source, name="blk.py"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path, load_imports([str(path)])

    yield load
    for table, keep in ((MIXERS, before[0]), (CHANNEL_MIXERS, before[2]), (OPTIONS, before[3])):
        for k in set(table) - keep:
            del table[k]
    LETTERS.clear()
    LETTERS.update(before[1])
    for key in [k for k in _LOADED if k.startswith(str(tmp_path))]:
        del _LOADED[key]


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_check_mixer_names_what_is_broken(case, block_file):
    body, needle = BROKEN[case]
    source = BROKEN_HEAD
    if case == "no_init_state":  # this block keeps Mixer's init_state (None)
        source = source.replace("    def init_state", "    def _unused")
    if case == "dead_param":
        source = source.replace("super().__init__()", "super().__init__()\n        self.unused = nn.Parameter(torch.zeros(1))")
    path, _ = block_file(source + f"    def forward(self, x, state=None):\n        {body}\n")
    problems = check_mixer("broken")
    assert problems and all(p.startswith(f"block 'broken' (Broken in {path}") for p in problems), problems
    assert needle in " ".join(problems), problems
    assert all("\n" not in p for p in problems)


def test_check_mixer_compares_the_static_step_with_forward(block_file):
    """A static step that forgets to write its state decodes the prefill right, then goes wrong."""
    block_file(BROKEN_HEAD + f"""
    def forward(self, x, state=None):
        return self.proj(x + {SHIFTED}), (None if state is None else x[:, -1:])
    static_state_names = ("prev",)
    def static_state(self, batch_size, max_len, device=None, dtype=torch.float32):
        return [self.init_state(batch_size, device, dtype)]
    def forward_static(self, x, positions, state, inplace):
        y, _ = self.forward(x, state[0])
        return y, state
""")
    problems = check_mixer("broken")
    assert len(problems) == 1 and "forward_static inplace=True (prefill 7, then 1 token a step) differs" in problems[0]


def channel_mixer_source(body: str) -> str:
    """A one-Linear channel mixer 'cm' whose forward is `body`."""
    return f"""
        import torch.nn as nn
        from arch import ChannelMixer, register_channel_mixer

        @register_channel_mixer("cm")
        class CM(ChannelMixer):
            def __init__(self, cfg):
                super().__init__()
                self.fc = nn.Linear(cfg.d_model, cfg.d_model)
            def forward(self, x):
                {body}
        """


@pytest.mark.parametrize("body,needle", [
    ("return self.fc(x), None", "forward returned a tuple of 2, expected a tensor [2, 1, 32] float32"),
    ("return self.fc(x).cumsum(1)", "changing token 5 changed the output at position 6"),
])
def test_check_channel_mixer_names_what_is_broken(body, needle, block_file):
    block_file(channel_mixer_source(body))
    problems = check_channel_mixer("cm")
    assert len(problems) == 1 and needle in problems[0], problems


def test_python_m_arch_check(block_file, capsys):
    from arch.check import main

    path, _ = block_file(TOKEN_SHIFT, "shift.py")
    assert main([str(path)]) == 0 and capsys.readouterr().out == "shift: ok\n"
    block_file(BROKEN_HEAD + "    def forward(self, x, state=None):\n        return self.proj(x), None\n")
    assert main([str(path), "broken", "attn"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and "returned state None" in out[0] and out[1] == "attn: ok"


def test_python_m_arch_check_on_a_built_in_block_file(capsys):
    """A package's own file by path: it was executed again under another name, and its relative
    imports failed ("attempted relative import with no known parent package")."""
    from arch.check import main

    assert main([str(Path(arch.__file__).parent / "conv.py")]) == 0
    assert capsys.readouterr().out == "conv: ok\n"


@pytest.mark.parametrize("case,needle", [
    ("mean_over_time", "forward returned (y [2, 1, 32] float32, state), expected (y [2, 8, 32] float32, state)"),
    ("bare_tensor", "forward returned a bare tensor [2, 8, 32] float32, expected (y [2, 8, 32] float32, state)"),
    ("float64", "forward returned (y [2, 8, 32] float64, state)"),
])
def test_model_refuses_a_mixer_output_that_does_not_fit_the_residual(case, needle, block_file):
    """Before: [B, 1, d] broadcast over T and trained on the future; a bare batch-2 tensor unpacked
    along the batch and trained; float64 failed deep inside the next matmul."""
    path, _ = block_file(BROKEN_HEAD + f"    def forward(self, x, state=None):\n        {BROKEN[case][0]}\n")
    m = build_model(tiny(imports=[str(path)], layers="QA"))
    idx = torch.randint(0, 50, (2, 8))
    with pytest.raises(ConfigError) as e:
        m(idx, idx)
    assert str(e.value).startswith(f"block 'broken' (Broken in {path}): ") and needle in str(e.value)
    assert "python -m arch.check" in str(e.value)


def test_model_refuses_a_channel_mixer_output_that_does_not_fit(block_file):
    path, _ = block_file(channel_mixer_source("return self.fc(x), None"))
    m = build_model(tiny(imports=[str(path)], mlp="cm"))
    with pytest.raises(ConfigError, match=r"channel mixer 'cm' \(CM in .*\): forward returned a tuple of 2, "
                                          r"expected a tensor \[2, 8, 32\] float32"):
        m(torch.randint(0, 50, (2, 8)))


def test_output_check_accepts_autocast_outputs():
    """Under bf16 autocast the blocks return bf16 into an fp32 residual stream: that is fine."""
    m = build_model(tiny(layers="CAL", n_layers=3))
    idx = torch.randint(0, 50, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(idx, idx)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("register_line,needle", [
    ('@register("MyShift", "Z")', "mixer 'MyShift' (TokenShift in {path}): a block name must be lower-case "
                                  "letters, digits and _ (configs and patterns spell it that way), e.g. 'myshift'"),
    ('@register("shift", "s")', "its letter must be one upper-case A-Z, got 's'"),
    ('@register("ca", "Z")', "the name 'ca' also reads as the letter pattern 'CA'"),
    ('@register("conv", "Z")', "the name 'conv' is taken by ShortConv in arch/conv.py"),
    ('@register("shift", "C")', "the letter 'C' is taken by 'conv' (ShortConv in arch/conv.py); free letters: B"),
    ('@register("xyz", "Z")\n@register("qz", "Q")', "the letter 'Z' would make the name 'qz' read as the letter "
                                                  "pattern 'QZ' too"),
])
def test_registry_refuses_names_a_pattern_cannot_use(register_line, needle, block_file, monkeypatch, tmp_path):
    """Before: an upper-case name registered and could not be used; 'ca' shadowed the pattern CA;
    a collision said 'registered twice' without saying what or by whom."""
    monkeypatch.chdir(Path(arch.__file__).parents[1])  # built-in blocks are named by their path in the repo
    source = TOKEN_SHIFT.replace('@register("shift", "S")', register_line)
    with pytest.raises(ConfigError) as e:
        block_file(source)
    assert needle.format(path=tmp_path / "blk.py") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("source,needle", [
    ("from arch import register\nimport torch.nn as nn\n@register('q', 'Q')\nclass B(nn.Module):\n"
     "    def forward(self, x, state=None): return x, state\n", "mixer 'q': B in {path} must subclass arch.Mixer"),
    ("from arch import Mixer, register\n@register('q', 'Q')\nclass B(Mixer):\n    def __init__(self, cfg, layer_idx):\n"
     "        super().__init__()\n    def forward(self, x, state=None): return x, state\n",
     "mixer 'q' (B in {path}): __init__ must accept (cfg, layer_idx, window=None), but got an unexpected keyword "
     "argument 'window'"),
    ("from arch import Mixer, register\n@register('q', 'Q')\nclass B(Mixer):\n    pass\n",
     "mixer 'q' (B in {path}) defines no forward()"),
    ("from arch import ChannelMixer, register\n@register('q', 'Q')\nclass B(ChannelMixer):\n"
     "    def forward(self, x): return x\n", "is a ChannelMixer: register it with @register_channel_mixer(name)"),
    ("from arch import Mixer, register_channel_mixer\n@register_channel_mixer('q')\nclass B(Mixer):\n"
     "    def forward(self, x, state=None): return x, state\n", "is a token Mixer: register it with @register(name, letter)"),
    ("from arch import register_channel_mixer\nimport torch.nn as nn\n@register_channel_mixer('q')\nclass B(nn.Module):\n"
     "    def forward(self, x): return x\n", "channel mixer 'q': B in {path} must subclass arch.ChannelMixer"),
    ("from arch import ChannelMixer, register_channel_mixer\n@register_channel_mixer('q')\nclass B(ChannelMixer):\n"
     "    def __init__(self, cfg, width):\n        super().__init__()\n    def forward(self, x): return x\n",
     "channel mixer 'q' (B in {path}): __init__ must accept (cfg), but missing a required argument: 'width'"),
    ("from arch import ChannelMixer, register_channel_mixer\n@register_channel_mixer('swiglu')\nclass B(ChannelMixer):\n"
     "    def forward(self, x): return x\n", "'swiglu' is a built-in channel mixer"),
])
def test_registry_refuses_classes_the_model_cannot_build(source, needle, block_file, tmp_path):
    with pytest.raises(ConfigError) as e:
        block_file(source)
    assert needle.format(path=tmp_path / "blk.py") in str(e.value) and "\n" not in str(e.value)
    assert "q" not in MIXERS and "q" not in CHANNEL_MIXERS


def test_a_failing_block_init_is_one_line_naming_the_block(block_file, tmp_path):
    """Before: a 20-50 line traceback through LM.__init__ and Block.__init__."""
    path, _ = block_file(BROKEN_HEAD.replace("super().__init__()", "super().__init__()\n        1 / 0")
                         + "    def forward(self, x, state=None):\n        return self.proj(x), state\n")
    with pytest.raises(ConfigError) as e:
        build_model(tiny(imports=[str(path)], layers="QA"))
    assert str(e.value) == (f"block 'broken' (Broken in {path}): __init__ failed: ZeroDivisionError: division by zero "
                            f"(at {path}:10)")


def test_an_imported_block_is_checked_when_the_run_config_is_built(block_file):
    """Before: a block that reads the future trained (its loss falls fast) and sampled garbage."""
    from slmlab.config import load_config

    path, _ = block_file(BROKEN_HEAD + f"    def forward(self, x, state=None):\n        {BROKEN['future'][0]}\n")
    with pytest.raises(ConfigError) as e:
        load_config(layers="QA", imports=[str(path)])
    assert str(e.value).startswith(f"block 'broken' (Broken in {path}): not causal")
    assert str(e.value).endswith(f"python -m arch.check {path} lists every problem")


def test_output_checks_compile_without_a_graph_break():
    """The checks are shape and dtype comparisons: torch.compile folds them (fullgraph=True fails on
    any break), in fp32 and under autocast, where the blocks' bf16 outputs take the second branch."""
    m = build_model(tiny())
    idx = torch.randint(0, 50, (2, 8))
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(idx, idx), m(idx, idx))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(idx, idx), m(idx, idx))


WINDOW_SUM = """
import torch, torch.nn as nn
import torch.nn.functional as F
from arch import Mixer, register

@register("wsum", "W")
class WindowSum(Mixer):
    residual_out = ("proj",)
    takes_window = True  # model.window_pattern's S entries (and phase windows) reach it, as attention

    def __init__(self, cfg, layer_idx, window=None):
        super().__init__()
        self.window = window
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def set_window(self, window):
        self.window = window

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        return torch.zeros(batch_size, 0, self.proj.in_features, device=device, dtype=dtype)

    def forward(self, x, state=None):
        past = x[:, :0] if state is None else state
        full = torch.cat([past, x], 1)
        c = full.cumsum(1)
        if self.window is not None and USE_WINDOW:  # the sum of the last `window` inputs, itself included
            c = c - F.pad(c, (0, 0, self.window, 0))[:, :c.shape[1]]
        return self.proj(c[:, past.shape[1]:]), (None if state is None else full)
"""


@pytest.mark.parametrize("use_window", [True, False])
def test_a_block_can_take_windows_and_is_checked_for_honouring_them(use_window, block_file):
    """Mixer.takes_window: model.window_pattern tiles over such blocks too, phases resize their
    window, and arch.check fails a block that takes a window but reads past it."""
    block_file(f"USE_WINDOW = {use_window}\n" + WINDOW_SUM)
    cfg = tiny(layers="WA", window=3, window_pattern="SL")
    assert cfg.layer_windows() == [3, None]  # the W layer is tiled first: S, then attention's L
    model = build_model(cfg)
    assert model.layers[0].mixer.window == 3
    model.set_windows([5, None])
    assert model.layers[0].mixer.window == 5
    problems = check_mixer_windows("wsum")
    if use_window:
        assert problems == []
    else:
        assert len(problems) == 1 and "with window=3: block 'wsum'" in problems[0] and \
            "ignores its window: with window=3, changing tokens 0..3 changed the output at position 6" in problems[0]
