"""Evaluation: validation loss and bits per UTF-8 byte, and a text sample. Used by the trainer,
the int8 export report and anything else that scores a model on a run's validation split."""
from __future__ import annotations

import torch

from . import data as data_mod
from .precision import autocast


def token_byte_lengths(tok) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (special tokens: 0), from the tokenizer's decoder
    (Tokenizer.token_byte_lengths): exact for byte-level BPE, so bpb over any token subset is exact;
    prepare_data warns, with the error, when a tokenizer's lengths do not add up to the validation bytes."""
    return torch.tensor(tok.token_byte_lengths(), dtype=torch.float64)


def run_eval_shape(cfg) -> tuple[int, int]:
    """(seq_len, batch) at which a run evaluated on one device (phases.eval_shape). A learned position
    table caps the length: an imported GPT-2's run config keeps the default phases, which it never trained."""
    from .phases import eval_shape, resolve_phases

    T, B = eval_shape(resolve_phases(cfg), cfg.train.eval_seq_len, cfg.train.grad_accum)
    if cfg.model.pos == "learned" and T > cfg.model.max_positions:  # as many tokens per forward, shorter rows
        T, B = cfg.model.max_positions, max(1, B * T // cfg.model.max_positions)
    return T, B


@torch.no_grad()
def evaluate(model, tokens, cfg, device, byte_lengths, max_tokens=None, seq_len=None, batch_size=None,
             nll_fn=None) -> dict:
    """Mean val loss (nats/token) and bits per UTF-8 byte over a deterministic prefix of the
    validation split (the whole split when max_tokens is None), in windows of seq_len (default: the
    run's eval shape, as its training evaluated). nll_fn: model.token_nll by default (the trainer
    passes its compiled version)."""
    if seq_len is None or batch_size is None:
        T, B = run_eval_shape(cfg)
        seq_len, batch_size = seq_len or T, batch_size or B
    if max_tokens is not None:  # a budget below one window would evaluate nothing
        max_tokens = max(max_tokens, seq_len)
    was_training = model.training
    model.eval()
    out = score(model, data_mod.iter_eval_batches(tokens, batch_size, seq_len, max_tokens), device, byte_lengths,
                nll_fn, precision=cfg.train.precision)
    model.train(was_training)
    if not out:
        return {}
    if model.nll_is_bound:
        out["val_bpb_is_bound"] = True
    return {**out, **model.extra_metrics()}


@torch.no_grad()
def score(model, batches, device, byte_lengths, nll_fn=None, ignore_index: int | None = None,
          precision: str = "auto") -> dict:
    """val_loss (nats/token), val_bpb and val_tokens over the targets of `batches` ((x, y) pairs)
    under the run's autocast (train.precision), leaving out targets equal to ignore_index (SFT's prompt and padding
    positions); {} when nothing is scored."""
    device = torch.device(device)
    nll, n_tok, n_bytes = 0.0, 0, 0.0
    gen = torch.Generator(device=device).manual_seed(0)  # stochastic estimators (diffusion ELBO) repeat exactly
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        keep = torch.ones_like(y, dtype=torch.bool) if ignore_index is None else y != ignore_index
        with autocast(device, precision):
            losses = (nll_fn or model.token_nll)(x, y.where(keep, 0), generator=gen)
        nll += losses.double().where(keep, 0.0).sum().item()
        scored = y[keep].cpu()
        n_tok += scored.numel()
        n_bytes += byte_lengths[scored].sum().item()
    if n_tok == 0:
        return {}
    return {"val_loss": nll / n_tok, "val_bpb": data_mod.bits_per_byte(nll / n_tok, max(n_bytes, 1.0) / n_tok),
            "val_tokens": n_tok}


def bpb_label(ev: dict) -> str:
    return f"<= {ev['val_bpb']:.4f} (ELBO bound)" if ev.get("val_bpb_is_bound") else f"{ev['val_bpb']:.4f}"


def moe_label(ev: dict) -> str:
    """'  moe load 1.14 (0 dead)' for an eval with MoE load metrics (arch/moe.py moe_metrics), else ''."""
    if "moe.max_load" not in ev:
        return ""
    return f"  moe load {ev['moe.max_load']:.2f} ({ev['moe.dead_experts']} dead)"


def generate_sample(model, tok, prompt, n, device, temperature=0.8, top_k=50, seed=0, static=None) -> str:
    """static=False decodes through model.forward (what an FSDP-sharded model needs: its hooks gather
    the weights around forward, not around forward_static). n is clamped to what model.max_positions
    leaves after the prompt (model.pos=learned), with a first line saying so: the run's last step
    must not fail on a sample length."""
    ids = tok.encode(prompt) or [tok.start_id]
    left, note = model.room(len(ids)), ""
    if left is not None and n > left:
        note = (f"[{left} of train.sample_tokens={n} new tokens: a {len(ids)}-token prompt leaves no more "
                f"of model.max_positions={model.cfg.max_positions}]\n")
        n = left
    idx = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    extra = {} if static is None else {"static": static}  # the diffusion LM's generate has no decode paths
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, generator=g, **extra)
    return note + tok.decode(out[0].tolist())
