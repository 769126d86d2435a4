"""The block contract (arch/block.py): every registered mixer declares its residual outputs and its
non-parameter FLOPs; flops_per_token is exact on a config computed by hand; windows change through
a method; a researcher's mixer in a file outside the repository loads with --import, trains,
samples, decodes like its full forward and has its FLOPs counted."""
import json
import textwrap

import pytest
import torch
import torch.nn as nn

import arch
from arch import CHANNEL_MIXERS, MIXERS, ModelConfig, build_model
from arch.registry import _LOADED, LETTERS, OPTIONS
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
    m.set_windows([None, 4])  # sliding window 4 < T/2: every query sees at most 4 keys
    assert m.flops_per_token(T) == params + conv_taps + 12 * 2 * hd * 4


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
        assert isinstance(mlp, arch.ChannelMixer) and mlp.residual_out and mlp.flops_per_token(64) > 0, name
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
    from slmlab.cli import run_cli

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
    assert "the " in capsys.readouterr().out
