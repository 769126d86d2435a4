"""Model set-up that needs the tokenizer or another run: the mask-token check for diffusion models
and `train.init_from=RUN_DIR` (initialise from a finished run's weights, e.g. AR -> diffusion,
Dhara-style). Called once by the trainer right after the model is built, before the optimizer."""
from __future__ import annotations

from .errors import ConfigError
from .rundir import RunDir

# Fields that must match for weights to transfer; causal and the objective may differ.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "conv_kernel",
                "conv_bias", "tie_embeddings")


def init_model(model, cfg, tok):
    mask_id = getattr(model, "mask_id", None)
    if mask_id is not None:
        if tok.mask_id is None:
            raise ConfigError(f"--arch {cfg.arch} (masked diffusion) needs a tokenizer with a mask token (<|mask|>); "
                              f"this tokenizer has none")
        if tok.mask_id != mask_id:
            raise ConfigError(f"objective.mask_id={mask_id} but the tokenizer's <|mask|> is {tok.mask_id}")
    src = getattr(cfg.train, "init_from", "") or ""
    if src:
        load_init(model, cfg, tok, src)
    return model


def load_init(model, cfg, tok, run_dir):
    run = RunDir.open(run_dir, label="train.init_from=")
    src = run.config().model
    for f in SHAPE_FIELDS:
        a, b = getattr(src, f), getattr(cfg.model, f)
        if a != b:
            raise ConfigError(f"train.init_from run has model.{f}={a!r} but this run has {b!r}")
    if src.layer_types() != cfg.model.layer_types():
        raise ConfigError(f"train.init_from run has layers {src.layers!r} but this run has {cfg.model.layers!r}")
    run.check_same_tokenizer(tok, "the weights' token ids would mean other tokens (data or vocab_size differ)")
    run.load_weights(model)
    print(f"initialised from {run.path}")
