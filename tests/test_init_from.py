"""train.init_from: which model configs take a base run's weights (slmlab/init_from.py check_same_model).
The end-to-end paths (AR -> diffusion, SFT, LoRA, added tokens) are tested in test_diffusion.py,
test_sft.py and test_hf_families.py."""
import dataclasses

import pytest

from slmlab.config import load_config
from slmlab.errors import ConfigError
from slmlab.init_from import check_same_model

TINY = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1",
        "model.layers=CA"]


def model(*overrides, arch="hybrid"):
    return load_config(arch=arch, overrides=TINY + list(overrides)).model


def check(src, new, base_ids=300, ids=300, added=False):
    check_same_model(src, new, base_ids, ids, added, "runs/base")


@pytest.mark.parametrize("change, needle", [
    # same tensor shapes, another function: each loaded silently before
    ({"mixer_opts": {"deltanet": {"heads": 2, "head_dim": 8}}}, "model.mixer_opts.deltanet.heads 1 -> 2"),
    ({"norm_eps": 1e-6}, "model.norm_eps 1e-05 -> 1e-06"),
    ({"logit_scale": 4.0}, "model.logit_scale 1.0 -> 4.0"),
    ({"d_model": 64}, "model.d_model 32 -> 64"),
])
def test_a_model_that_reads_the_weights_otherwise_is_refused(change, needle):
    src = model("model.layers=DA", "model.mixer_opts={deltanet: {heads: 1, head_dim: 16}}")
    with pytest.raises(ConfigError, match=rf"^train.init_from=runs/base builds another model: {needle}"):
        check(src, dataclasses.replace(src, **change))


def test_what_init_from_is_for_may_differ_and_a_derived_size_spelled_out_is_no_change():
    src = model()
    check(src, dataclasses.replace(src, causal=False, rope_theta=5e5, window=64, window_pattern="SL", init_std=0.01))
    check(src, dataclasses.replace(src, head_dim=src.hd, ffn_dim=src.ffn))  # was refused: head_dim 16 vs None
    check(dataclasses.replace(src, head_dim=src.hd), src)


def test_added_tokens_grow_the_vocabulary_to_the_tokens_and_no_further():
    src = model()
    check(src, dataclasses.replace(src, vocab_size=302), ids=302, added=True)
    with pytest.raises(ConfigError, match=r"has model.vocab_size=300: this run needs 302 \(its rows grown to the 302 "
                                          r"tokens of data.added_tokens\), not 400$"):
        check(src, dataclasses.replace(src, vocab_size=400), ids=302, added=True)  # 98 rows no token reaches
    padded = dataclasses.replace(src, vocab_size=320)  # an import's padded vocabulary holds the new tokens
    check(padded, padded, ids=302, added=True)
    with pytest.raises(ConfigError, match="has model.vocab_size=300: this run needs 300, not 302"):
        check(src, dataclasses.replace(src, vocab_size=302))  # no added tokens: the base's rows
    with pytest.raises(ConfigError, match="its tokenizer has 303 ids but its model 300 embedding rows"):
        check(src, src, base_ids=303)
