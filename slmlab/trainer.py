"""The training loop: data -> model -> AdamW + schedule -> periodic eval -> run directory.

Run directory layout: config.yaml (fully resolved), tokenizer.json, model.safetensors,
metrics.jsonl (one JSON object per log/eval step), summary.json, sample.txt.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from arch import build_model

from . import data as data_mod
from .checkpoint import save_model
from .config import RunConfig
from .errors import ConfigError
from .init_from import init_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Global learning rate at optimizer step `step` (0-based): linear warmup, then WSD (flat,
    then linear decay over the last decay_frac of steps) or cosine, down to min_lr_frac * lr."""
    t, base = cfg.train, cfg.optim.lr
    lo = t.min_lr_frac
    if step < t.warmup_steps:
        return base * (step + 1) / t.warmup_steps
    if t.schedule == "cosine":
        p = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        return base * (lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
    decay_start = int(t.steps * (1 - t.decay_frac))
    if step < decay_start:
        return base
    p = (step - decay_start + 1) / max(1, t.steps - decay_start)
    return base * (lo + (1 - lo) * max(0.0, 1 - p))


def make_optimizer(model, cfg: RunConfig):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


def token_byte_lengths(tok) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (special tokens: 0). With byte-level BPE every
    character of a vocabulary string is one byte, so bpb over any token subset is exact."""
    from .tokenizer import SPECIAL_TOKENS

    vocab = tok.hf.get_vocab()
    lengths = torch.zeros(max(vocab.values()) + 1, dtype=torch.float64)
    for s, i in vocab.items():
        if s not in SPECIAL_TOKENS:
            lengths[i] = len(s)
    return lengths


@torch.no_grad()
def evaluate(model, tokens, cfg: RunConfig, device, byte_lengths, max_tokens=None) -> dict:
    """Mean val loss (nats/token) and bits per UTF-8 byte over a deterministic prefix of the
    validation split (the whole split when max_tokens is None)."""
    was_training = model.training
    model.eval()
    nll, n_tok, n_bytes = 0.0, 0, 0.0
    gen = torch.Generator(device=device).manual_seed(0)  # stochastic estimators (diffusion ELBO) repeat exactly
    for x, y in data_mod.iter_eval_batches(tokens, cfg.train.batch_size, cfg.train.seq_len, max_tokens):
        x, y = x.to(device), y.to(device)
        with autocast(device):
            losses = model.token_nll(x, y, generator=gen)
        nll += losses.double().sum().item()
        n_tok += y.numel()
        n_bytes += byte_lengths[y.flatten().cpu()].sum().item()
    model.train(was_training)
    if n_tok == 0:
        return {}
    out = {"val_loss": nll / n_tok, "val_bpb": nll / math.log(2) / max(n_bytes, 1.0), "val_tokens": n_tok}
    if model.nll_is_bound:
        out["val_bpb_is_bound"] = True
    return {**out, **model.extra_metrics()}


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)  # bf16 matmul is ~3.5x slower than fp32 on these CPUs


def prepare_out_dir(out: Path, force: bool):
    if out.exists() and any(out.iterdir()):
        if (out / "config.yaml").exists() or (out / "model.safetensors").exists():
            if not force:
                raise ConfigError(f"--out {out} already holds a run; pass --force to overwrite it")
            for name in ("metrics.jsonl", "model.safetensors", "summary.json", "sample.txt"):
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


class Progress:
    """One status line: step, loss, tokens/s, ETA. Redraws in place on a terminal, prints
    periodic plain lines elsewhere (CI logs)."""

    def __init__(self, total, enabled=True):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.last_print = 0.0

    def update(self, step, loss, tps):
        if not self.enabled:
            return
        now = time.time()
        done = step / self.total
        eta = (now - self.t0) / max(done, 1e-9) * (1 - done)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"[{bar}] step {step}/{self.total} loss {loss:.4f} {tps:,.0f} tok/s eta {_fmt(eta)}"
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            sys.stderr.flush()
        elif now - self.last_print > 15 or step == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = now

    def write(self, msg):
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
        print(msg, flush=True)


def _fmt(s):
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s"


def train(cfg: RunConfig, out: Path, force: bool = False) -> dict:
    out = Path(out)
    t_start = time.time()
    prepare_out_dir(out, force)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    t = cfg.train

    bundle = data_mod.prepare_data(cfg.data.spec, cfg.model.vocab_size, Path(cfg.data.cache_dir).expanduser(),
                                   val_frac=cfg.data.val_frac, progress=cfg.logging.progress)
    data_mod.check_sizes(bundle, t.seq_len, t.batch_size)
    tok = bundle.tokenizer
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    byte_lengths = token_byte_lengths(tok)
    print(f"baselines on validation ({bundle.val_bytes:,} bytes): gzip -9 {bundle.gzip_bpb:.3f} bpb, "
          f"xz -9 {bundle.xz_bpb:.3f} bpb")

    model = build_model(cfg.model).to(device)
    init_model(model, cfg, tok)  # mask-token check (diffusion), train.init_from weights
    n_params = model.num_params()
    fpt = model.flops_per_token(t.seq_len)
    print(f"model: {cfg.arch}  layers {''.join(l.kind[0].upper() for l in model.layers)}  "
          f"{n_params / 1e6:.2f}M params ({model.num_params(exclude_embedding=True) / 1e6:.2f}M non-embedding)  "
          f"{fpt / 1e6:.1f} MFLOP/token  device {device}")
    cfg.save(out / "config.yaml")
    tok.save(out / "tokenizer.json")

    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(t.seed)
    metrics = open(out / "metrics.jsonl", "w")
    wb = _wandb(cfg, out)

    def log(rec):
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        if wb:
            wb.log(rec, step=rec["step"])

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    prog = Progress(t.steps, cfg.logging.progress)
    model.train()
    tokens_seen, t_loop, last_eval = 0, time.time(), {}
    for step in range(1, t.steps + 1):
        lr = lr_at(step - 1, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        t0 = time.time()
        loss_sum = 0.0
        for _ in range(t.grad_accum):
            x, y = data_mod.get_batch(bundle.train, t.batch_size, t.seq_len, gen, device)
            with autocast(device):
                loss = model(x, y)
            (loss / t.grad_accum).backward()
            loss_sum += loss.item() / t.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        dt = time.time() - t0
        tps = tokens_per_step / dt
        prog.update(step, loss_sum, tps)
        rec = None
        if step % t.log_every == 0 or step == 1:
            rec = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tokens": tokens_seen,
                   "tokens_per_s": tps, "elapsed_s": time.time() - t_loop}
        if step % t.eval_every == 0 and step != t.steps:
            last_eval = evaluate(model, bundle.val, cfg, device, byte_lengths, t.eval_tokens)
            prog.write(f"step {step}: val loss {last_eval['val_loss']:.4f}  val bpb {last_eval['val_bpb']:.4f}")
            rec = {**(rec or {"step": step, "tokens": tokens_seen}), **last_eval}
        if rec:
            log(rec)

    train_time = time.time() - t_loop
    final = evaluate(model, bundle.val, cfg, device, byte_lengths)
    prog.write(f"final (whole validation split, {final['val_tokens']:,} tokens): val loss {final['val_loss']:.4f}  "
               f"val bpb {final['val_bpb']:.4f}  (gzip -9 {bundle.gzip_bpb:.3f}, xz -9 {bundle.xz_bpb:.3f})")
    log({"step": t.steps, "tokens": tokens_seen, "final": True, **final})
    metrics.close()
    save_model(model, out / "model.safetensors", metadata={"arch": cfg.arch})

    sample = generate_sample(model, tok, t.sample_prompt, t.sample_tokens, device)
    (out / "sample.txt").write_text(sample)
    print("sample (temperature 0.8, top-k 50):\n" + "-" * 60 + f"\n{sample}\n" + "-" * 60)

    summary = {"arch": cfg.arch, "params": n_params, "flops_per_token": fpt, "steps": t.steps,
               "tokens": tokens_seen, "train_time_s": train_time, "wall_time_s": time.time() - t_start,
               "tokens_per_s": tokens_seen / train_time, **final,
               "gzip_bpb": bundle.gzip_bpb, "xz_bpb": bundle.xz_bpb, "device": str(device)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if wb:
        wb.summary.update(summary)
        wb.finish()
    print(f"run saved to {out}  ({_fmt(summary['wall_time_s'])} wall, {summary['tokens_per_s']:,.0f} tok/s)")
    return summary


def generate_sample(model, tok, prompt, n, device, temperature=0.8, top_k=50, seed=0):
    ids = tok.encode(prompt) or [tok.bos_id]
    idx = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, generator=g)
    return tok.decode(out[0].tolist())


def _wandb(cfg: RunConfig, out: Path):
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb=true needs wandb: pip install -e '.[wandb]'")
    return wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict(), dir=str(out), name=out.name)
