"""Model set-up that needs the tokenizer or another run: the mask-token check for diffusion models
and `train.init_from=RUN_DIR` (initialise from a finished run's weights, e.g. AR -> diffusion,
Dhara-style). Called once by the trainer right after the model is built, before the optimizer."""
from __future__ import annotations

import dataclasses

import torch

from .checkpoint import check_fits
from .errors import ConfigError
from .rundir import WEIGHTS, RunDir

# What may differ from the base run's model: what starting from it is for (causal: AR -> diffusion;
# RoPE and the windows: context extension) and what loading its weights makes moot (init_std). Anything
# else ModelConfig.weight_changes names builds other weights or gives them another meaning.
MAY_DIFFER = ("causal", "rope_theta", "rope_scaling", "window", "window_pattern", "init_std")


def with_added_tokens(cfg, tok, say=print):
    """data.added_tokens: `tok` with them appended, and cfg.model.vocab_size grown to match (the new
    rows are initialised from train.init_from's). The trainer, SFT and --dry-run all grow it here."""
    tok = tok.with_added(cfg.data.added_tokens)
    if tok.vocab_size > cfg.model.vocab_size:
        say(f"data.added_tokens: model.vocab_size {cfg.model.vocab_size} -> {tok.vocab_size}")
        cfg.model = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size)
    return tok


def base_vocab(cfg) -> int:
    """The first embedding row LoRA trains (as AddedRows): with data.added_tokens adding tokens, the
    base tokenizer's size, where the new tokens start (below the base's model.vocab_size when that is
    padded, as in HF imports); otherwise the base's model.vocab_size (no row trains)."""
    run = RunDir.open(cfg.train.init_from, label="train.init_from=")
    tok = run.tokenizer()
    if cfg.data.added_tokens and tok.with_added(cfg.data.added_tokens).vocab_size > tok.vocab_size:
        return tok.vocab_size
    return run.config().model.vocab_size


def init_model(model, cfg, tok, load_weights: bool = True):
    """Check the mask token (diffusion) and, unless not `load_weights`, load train.init_from's weights."""
    mask_id = getattr(model, "mask_id", None)
    if mask_id is not None:
        if tok.mask_id is None:
            raise ConfigError(f"--arch {cfg.arch} (masked diffusion) needs a tokenizer with a mask token (<|mask|>); "
                              f"this tokenizer has none")
        if tok.mask_id != mask_id:
            raise ConfigError(f"objective.mask_id={mask_id} but the tokenizer's <|mask|> is {tok.mask_id}")
    src = getattr(cfg.train, "init_from", "") or ""
    if src and load_weights:
        load_init(model, cfg, tok, src)
    return model


def load_init(model, cfg, tok, run_dir):
    run = RunDir.open(run_dir, label="train.init_from=")
    src, added, base_tok = run.config().model, cfg.data.added_tokens, run.tokenizer()
    check_same_model(src, cfg.model, base_tok.vocab_size, tok.vocab_size, bool(added), run_dir)
    if added:
        if base_tok.with_added(added).to_json() != tok.to_json():
            raise ConfigError(f"{run.name}'s tokenizer plus data.added_tokens is not this run's tokenizer "
                              "(set data.tokenizer to the same run)")
        # the new tokens' rows: past the base's rows, or inside a padded vocabulary's
        grow_vocab(model, run, base_tok.vocab_size, tok.vocab_size)
    else:
        run.check_same_tokenizer(tok, "the weights' token ids would mean other tokens (data or vocab_size differ)")
        run.load_weights(model)
    print(f"initialised from {run.path}")


def check_same_model(src, new, base_ids: int, ids: int, added: bool, run_dir: str):
    """`new` (this run's model config) builds the weights of `src` (train.init_from's), but for MAY_DIFFER,
    compared as built (ModelConfig.weight_changes). The base's tokenizer (`base_ids` ids) fits its rows;
    with data.added_tokens the vocabulary is the base's rows grown to fit the `ids` tokens, no more: rows
    past every token would start at zero and draw probability mass from step 0."""
    if base_ids > src.vocab_size:
        raise ConfigError(f"train.init_from={run_dir}: its tokenizer has {base_ids} ids but its model "
                          f"{src.vocab_size} embedding rows")
    vocab = max(src.vocab_size, ids) if added else src.vocab_size
    if new.vocab_size != vocab:
        why = f" (its rows grown to the {ids} tokens of data.added_tokens)" if vocab > src.vocab_size else ""
        raise ConfigError(f"train.init_from={run_dir} has model.vocab_size={src.vocab_size}: this run needs "
                          f"{vocab}{why}, not {new.vocab_size}")
    changes = src.weight_changes(dataclasses.replace(new, vocab_size=src.vocab_size), allowed=MAY_DIFFER)
    if changes:
        raise ConfigError(f"train.init_from={run_dir} builds another model: " + ", ".join(changes[:4])
                          + (f" (and {len(changes) - 4} more)" if len(changes) > 4 else ""))


def grow_vocab(model, run, n_tok: int | None = None, n_new: int | None = None):
    """Load `run`'s weights into `model`, whose vocabulary may be larger. The rows of new tokens, from
    the base tokenizer's size `n_tok` to this one's `n_new` (default: from the base's rows to the
    model's), start at the mean of the base's token rows, so the new tokens begin as an average token;
    a padded base's unused padding rows would otherwise stand in for them untrained."""
    from .rundir import model_from_config

    sd = run.load_weights(model_from_config(run.config())).state_dict()
    vocab = model.cfg.vocab_size
    for key in ("embed.weight", "lm_head.weight"):
        old = sd[key]
        start = old.shape[0] if n_tok is None else n_tok
        rows = torch.cat([old, old.new_zeros(vocab - old.shape[0], old.shape[1])])
        rows[start:vocab if n_new is None else n_new] = old[:start].mean(0)
        sd[key] = rows
    # (check_same_model passed: a block whose options build other tensors than its config says)
    check_fits(sd, model.state_dict(), f"checkpoint {run.path / WEIGHTS}")
    model.load_state_dict(sd)
