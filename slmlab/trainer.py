"""The training loop: data -> model -> optimizer (Muon + AdamW, or AdamW) -> phased schedule ->
periodic eval and checkpoints -> run directory. Runs alone or under torchrun (DDP / FSDP2).

Run directory layout: config.yaml (fully resolved), tokenizer.json, model.safetensors,
metrics.jsonl (one JSON object per log/eval step), summary.json, sample.txt,
checkpoints/step_XXXXXX/{model.safetensors,state.pt} (the last train.keep_checkpoints), and
model_avg.safetensors when train.avg_last > 1.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from arch import build_model

from . import data as data_mod
from .checkpoint import (
    average_checkpoints,
    checkpoint_dirs,
    latest_checkpoint,
    load_model_weights,
    load_state,
    save_checkpoint,
    state_dict_for_save,
)
from .config import RunConfig
from .errors import CheckpointError, ConfigError, SlmlabError
from .init_from import init_model
from .optim import build_optimizer
from .phases import lr_mult, phase_at, resolve_phases
from .tokenizer import Tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


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
def evaluate(model, tokens, cfg: RunConfig, device, byte_lengths, max_tokens=None, seq_len=None,
             batch_size=None) -> dict:
    """Mean val loss (nats/token) and bits per UTF-8 byte over a deterministic prefix of the
    validation split (the whole split when max_tokens is None), in windows of seq_len."""
    seq_len = seq_len or cfg.train.seq_len
    batch_size = batch_size or cfg.train.batch_size
    if max_tokens is not None:  # a budget below one window would evaluate nothing
        max_tokens = max(max_tokens, seq_len)
    was_training = model.training
    model.eval()
    nll, n_tok, n_bytes = 0.0, 0, 0.0
    gen = torch.Generator(device=device).manual_seed(0)  # stochastic estimators (diffusion ELBO) repeat exactly
    for x, y in data_mod.iter_eval_batches(tokens, batch_size, seq_len, max_tokens):
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


def check_out_dir(out: Path, force: bool):
    """Raise before anything is written if --out holds a run and --force was not given."""
    if out.exists() and any(out.iterdir()) and not force:
        if (out / "config.yaml").exists() or (out / "model.safetensors").exists():
            raise ConfigError(f"--out {out} already holds a run; pass --force to overwrite it "
                              "or --resume to continue it")


def prepare_out_dir(out: Path, force: bool):
    import shutil

    check_out_dir(out, force)
    if out.exists():
        for name in ("metrics.jsonl", "model.safetensors", "model_avg.safetensors", "summary.json", "sample.txt"):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


class Progress:
    """One status line: step, loss, tokens/s, ETA. Redraws in place on a terminal, prints
    periodic plain lines elsewhere (CI logs)."""

    def __init__(self, total, enabled=True, quiet=False):
        self.total, self.enabled, self.quiet = total, enabled, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.last_print = 0.0

    def update(self, step, loss, tps, phase=""):
        if not self.enabled:
            return
        now = time.time()
        done = step / self.total
        eta = (now - self.t0) / max(done, 1e-9) * (1 - done)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"[{bar}] {phase}step {step}/{self.total} loss {loss:.4f} {tps:,.0f} tok/s eta {_fmt(eta)}"
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            sys.stderr.flush()
        elif now - self.last_print > 15 or step == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = now

    def write(self, msg):
        if self.quiet:  # non-zero ranks
            return
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
        print(msg, flush=True)


def _fmt(s):
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s"


# ---- distributed ----
class Dist:
    """Rank/world from torchrun's environment; world 1 means a plain single-process run."""

    def __init__(self, cfg: RunConfig):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        if self.world > 1:
            import torch.distributed as dist

            self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
            use_cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: float) -> float:
        if self.world == 1:
            return x
        import torch.distributed as dist

        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def wrap_parallel(model, cfg: RunConfig, dist: Dist, device):
    """(module to call for training, underlying model). DDP wraps; FSDP2 shards in place."""
    if dist.world == 1:
        return model, model
    if cfg.train.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids), model


def full_state_dict(model) -> dict:
    """CPU state dict for saving; under FSDP2 every rank must call this (it all-gathers)."""
    sd = {}
    for k, v in state_dict_for_save(model).items() if not _is_sharded(model) else model.state_dict().items():
        sd[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous().cpu()
    if _is_sharded(model) and model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def _is_sharded(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


# ---- throughput accounting ----
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12,
             "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def _bpb_label(ev: dict) -> str:
    return f"<= {ev['val_bpb']:.4f} (ELBO bound)" if ev.get("val_bpb_is_bound") else f"{ev['val_bpb']:.4f}"


def peak_flops(device) -> tuple[float, str]:
    """The FLOP/s that MFU is measured against: a GPU's dense bf16 peak from its datasheet, or
    the best measured matmul throughput (fp32 on CPU) with this process's threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, v in BF16_PEAK.items():
            if key in name:
                return v, f"{name} dense bf16 datasheet peak"
    return _measured_peak(device.type)


@functools.lru_cache(maxsize=None)
def _measured_peak(device_type: str) -> tuple[float, str]:
    # 2048^3 and a warm-up: 1024^3 for four reps read 0.11-0.19 TFLOP/s on the same 2-core CPU
    # (frequency ramp, timer noise) and gave MFU above 100%; this reads within a few percent.
    n, dtype = 2048, torch.float32 if device_type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device_type, dtype=dtype)
    b = torch.randn(n, n, device=device_type, dtype=dtype)
    best, t_end = 0.0, None
    for i in range(12):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        dt = time.perf_counter() - t0
        if i >= 1:
            best = max(best, 2 * n ** 3 / dt)
            t_end = t_end or t0 + 1.0
            if t0 > t_end and i >= 4:
                break
    return best, f"best measured {n}x{n} {str(dtype).replace('torch.', '')} matmul on {device_type}"


# ---- RNG state for exact resume ----
def rng_state(gen: torch.Generator) -> dict:
    npst = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "data": gen.get_state(), "python": random.getstate(),
          "numpy": {"key": npst[1].astype(np.int64).tolist(), "pos": int(npst[2]), "has_gauss": int(npst[3]),
                    "gauss": float(npst[4])}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict, gen: torch.Generator):
    torch.set_rng_state(st["torch"])
    gen.set_state(st["data"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ---- resume checks (before anything is written) ----
def check_resume(cfg: RunConfig, out: Path, tok) -> Path:
    """The checkpoint to resume from, after checking the run is compatible with `cfg`."""
    from .config import load_run_config

    if not (out / "config.yaml").is_file():
        raise CheckpointError(f"--resume: {out} holds no run (no config.yaml)")
    ckpt = latest_checkpoint(out)
    saved = load_run_config(out / "config.yaml")
    a, b = saved.model.to_dict(), cfg.model.to_dict()
    diff = [k for k in a if a[k] != b.get(k)]
    if diff:
        raise ConfigError(f"--resume: the model config differs from the run in {out}: "
                          + ", ".join(f"model.{k} {a[k]!r} -> {b[k]!r}" for k in diff[:4]))
    if (out / "tokenizer.json").is_file() and (out / "tokenizer.json").read_text() != tok.to_json():
        raise ConfigError(f"--resume: the data gives a different tokenizer than the run in {out} "
                          f"(data.spec {saved.data.spec!r} -> {cfg.data.spec!r}?)")
    return ckpt


def load_teacher(run_dir: str, tok, device):
    from .checkpoint import load_run

    d = Path(run_dir).expanduser()
    if not (d / "tokenizer.json").is_file():
        raise ConfigError(f"train.teacher={run_dir}: not a run directory (no tokenizer.json)")
    if (d / "tokenizer.json").read_text() != tok.to_json():
        raise ConfigError(f"train.teacher={run_dir} uses a different tokenizer than this run's data; "
                          "distillation needs the same tokenizer (train the teacher on the same data.spec "
                          "and model.vocab_size)")
    _, teacher, _ = load_run(d, device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distill_loss(logits, targets, teacher_logits, alpha: float, temp: float):
    """(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), per token (Hinton et al.)."""
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    s = F.log_softmax(logits.flatten(0, 1) / temp, dim=-1)
    t = F.log_softmax(teacher_logits.flatten(0, 1) / temp, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean") * temp * temp
    return (1 - alpha) * ce + alpha * kl, ce


def phase_windows(base_windows, window):
    """Per-phase sliding windows: only layers built with a window (S layers) take the phase's."""
    return [window if w is not None and window else w for w in base_windows]


def train(cfg: RunConfig, out: Path, force: bool = False, resume: bool = False) -> dict:
    out = Path(out)
    t_start = time.time()
    dist = Dist(cfg)
    t = cfg.train
    phases = resolve_phases(cfg, dist.world)  # with the world size: batches must split over ranks
    if not resume and dist.main:
        check_out_dir(out, force)
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    say = print if dist.main else (lambda *a, **k: None)

    # -- data: the run's split, plus any per-phase corpora tokenized with the same tokenizer --
    quiet = not dist.main
    cache = Path(cfg.data.cache_dir).expanduser()
    given_tok = Tokenizer.load(Path(cfg.data.tokenizer).expanduser()) if cfg.data.tokenizer else None
    bundle = data_mod.prepare_data(cfg.data.spec, cfg.model.vocab_size, cache, val_frac=cfg.data.val_frac,
                                   tokenizer=given_tok, progress=cfg.logging.progress and dist.main, quiet=quiet)
    tok = bundle.tokenizer
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    train_sets = {None: (bundle, cfg.data.spec)}
    for ph in phases:
        if ph.data is not None and ph.data not in train_sets:
            train_sets[ph.data] = (data_mod.prepare_data(ph.data, cfg.model.vocab_size, cache, cfg.data.val_frac,
                                                         tokenizer=tok, progress=False, quiet=quiet), ph.data)
    eval_T = t.eval_seq_len or phases[-1].seq_len
    eval_B = max(1, phases[-1].tokens_per_step // eval_T)
    for ph in phases:
        data_mod.check_sizes(train_sets[ph.data][0], ph.seq_len, 1)
    data_mod.check_sizes(bundle, eval_T, 1)
    teacher = load_teacher(t.teacher, tok, device) if t.teacher else None
    ckpt = check_resume(cfg, out, tok) if resume else None
    byte_lengths = token_byte_lengths(tok)
    say(f"baselines on validation ({bundle.val_bytes:,} bytes): gzip -9 {bundle.gzip_bpb:.3f} bpb, "
        f"xz -9 {bundle.xz_bpb:.3f} bpb")

    model = build_model(cfg.model, cfg.objective).to(device)
    init_model(model, cfg, tok)  # mask-token check (diffusion), train.init_from weights
    n_params = model.num_params()
    fpt = model.flops_per_token(phases[-1].seq_len)
    say(f"model: {cfg.arch}  layers {''.join(l.kind[0].upper() for l in model.layers)}  "
        f"{n_params / 1e6:.2f}M params ({model.num_params(exclude_embedding=True) / 1e6:.2f}M non-embedding)  "
        f"{fpt / 1e6:.1f} MFLOP/token at {phases[-1].seq_len}  device {device}"
        + (f"  {dist.world} ranks ({t.parallel})" if dist.world > 1 else ""))
    for ph in phases:
        say("  " + ph.describe() + f"  batch {ph.batch_size(t.grad_accum, dist.world) * dist.world}")
    if ckpt is not None:  # weights go in before DDP/FSDP wrap the model
        state = load_state(ckpt / "state.pt")
        load_model_weights(model, ckpt / "model.safetensors")
        if dist.world > 1 and t.parallel == "fsdp":
            raise ConfigError("--resume with train.parallel=fsdp is not supported yet; resume with ddp")
    fwd, model = wrap_parallel(model, cfg, dist, device)
    opt = build_optimizer(model, cfg.optim, verbose=dist.main)
    if cfg.optim.name == "muon" and _is_sharded(model):
        raise ConfigError("train.parallel=fsdp supports optim.name=adamw only (Muon needs whole matrices)")
    gen = torch.Generator().manual_seed(t.seed)
    streams = {}  # phase index -> OrderedStream, built when the phase starts
    base_windows = cfg.model.layer_windows()

    start_step, tokens_seen, bad_steps, train_time0, metrics_offset = 0, 0, 0, 0.0, 0
    if ckpt is not None:
        try:
            opt.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt / 'state.pt'}: optimizer state does not fit (optim.name changed?): "
                                  f"{str(e).splitlines()[0]}") from None
        set_rng_state(state["rng"], gen)
        start_step, tokens_seen = state["step"], state["tokens"]
        bad_steps, train_time0, metrics_offset = state["bad_steps"], state["train_time"], state["metrics_offset"]
        say(f"resumed from {ckpt} (step {start_step}, phase {state['phase'] + 1})")
    elif dist.main:
        prepare_out_dir(out, force)

    if dist.main:
        cfg.save(out / "config.yaml")
        tok.save(out / "tokenizer.json")
        metrics = open(out / "metrics.jsonl", "r+" if ckpt is not None else "w")
        metrics.seek(metrics_offset)
        metrics.truncate()  # drop lines logged after the checkpoint: they are replayed
    wb = _wandb(cfg, out, resume=ckpt is not None)
    peak, peak_desc = peak_flops(device)
    say(f"MFU peak: {peak / 1e12:.3f} TFLOP/s ({peak_desc})")

    def log(rec):
        if not dist.main:
            return
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        if wb:
            wb.log(rec, step=rec["step"])

    def stream_for(ph):
        if ph.order != "quality":
            return None
        if ph.index not in streams:
            from .curriculum import OrderedStream, document_spans, score_documents

            b, spec = train_sets[ph.data]
            spans = document_spans(b.train, tok.eos_id)
            scores = score_documents(b.train, spans, t.quality_score, spec)
            streams[ph.index] = OrderedStream(b.train, spans, scores, ph.top_frac)
            say(f"  phase {ph.index + 1}: {streams[ph.index].n_docs} of {len(spans)} documents, low -> high "
                f"{t.quality_score}")
        return streams[ph.index]

    if ckpt is not None:
        for k, cur in state.get("streams", {}).items():
            stream_for(phases[int(k)]).cursor = cur

    def save_ckpt(step, ph):
        sd = full_state_dict(model)  # collective under FSDP
        if dist.main:
            st = {"step": step, "phase": ph.index, "tokens": tokens_seen, "optimizer": opt.state_dict(),
                  "rng": rng_state(gen), "streams": {str(k): s.cursor for k, s in streams.items()},
                  "metrics_offset": metrics.tell(), "bad_steps": bad_steps,
                  "train_time": train_time0 + time.time() - t_loop, "world": dist.world}
            save_checkpoint(out, step, sd, st, t.keep_checkpoints)

    kill_after = int(os.environ.get("SLMLAB_KILL_AFTER_STEP", "0"))  # test hook: SIGKILL ourselves
    prog = Progress(t.steps, cfg.logging.progress and dist.main, quiet=not dist.main)
    model.train()
    t_loop, last_eval, cur = time.time(), {}, None
    for step in range(start_step + 1, t.steps + 1):
        ph = phase_at(phases, step - 1)
        if ph is not cur:
            prog.write(f"step {step}: entering {ph.describe()}")
            model.set_windows(phase_windows(base_windows, ph.window))
            cur, fpt = ph, model.flops_per_token(ph.seq_len)
        B = ph.batch_size(t.grad_accum, dist.world)
        mult = lr_mult(step - 1, t) * ph.lr_mul
        opt.set_lr_mult(mult)
        stream = stream_for(ph)
        tokens_b = train_sets[ph.data][0].train
        t0 = time.time()
        loss_sum, ce_sum = 0.0, 0.0
        for micro in range(t.grad_accum):
            # Every rank draws the same global batch and keeps its rows: a world-N run sees exactly
            # the batches of a 1-process run with the same global batch.
            if stream is not None:
                x, y = stream.next(B * dist.world, ph.seq_len)
            else:
                x, y = data_mod.get_batch(tokens_b, B * dist.world, ph.seq_len, gen, "cpu")
            x = x[dist.rank * B:(dist.rank + 1) * B].to(device)
            y = y[dist.rank * B:(dist.rank + 1) * B].to(device)
            sync = micro == t.grad_accum - 1 or not hasattr(fwd, "no_sync")
            with (torch.enable_grad() if sync else fwd.no_sync()), autocast(device):
                if teacher is None:
                    loss = fwd(x, y)
                    ce = loss
                else:
                    with torch.no_grad():
                        tl = teacher(x).float()
                    loss, ce = distill_loss(fwd(x).float(), y, tl, t.distill_alpha, t.distill_temperature)
            (loss / t.grad_accum).backward()
            loss_sum += loss.item() / t.grad_accum
            ce_sum += ce.item() / t.grad_accum
        loss_sum, ce_sum = dist.mean(loss_sum), dist.mean(ce_sum)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        if math.isfinite(loss_sum) and math.isfinite(gnorm):
            opt.step()
            bad_steps = 0
        else:
            bad_steps += 1
            prog.write(f"warning: step {step}: non-finite loss {loss_sum} / grad norm {gnorm}; update skipped "
                       f"({bad_steps}/{t.max_bad_steps})")
            if bad_steps >= t.max_bad_steps:
                raise SlmlabError(f"training diverged: {bad_steps} consecutive non-finite steps (last: step {step}); "
                                  f"lower optim.lr or raise train.warmup_steps")
        opt.zero_grad(set_to_none=True)
        step_tokens = B * dist.world * ph.seq_len * t.grad_accum
        tokens_seen += step_tokens
        dt = time.time() - t0
        tps = step_tokens / dt
        prog.update(step, loss_sum, tps, phase=f"p{ph.index + 1} T{ph.seq_len} ")
        rec = None
        if step % t.log_every == 0 or step == 1:
            rec = {"step": step, "phase": ph.index + 1, "seq_len": ph.seq_len, "loss": loss_sum, "lr": cfg.optim.lr * mult,
                   "lr_mult": mult, "grad_norm": gnorm, "tokens": tokens_seen, "tokens_per_s": tps,
                   "mfu": fpt * tps / dist.world / peak, "elapsed_s": train_time0 + time.time() - t_loop}
            if teacher is not None:
                rec["ce"] = ce_sum
        if step % t.eval_every == 0 and step != t.steps:
            last_eval = evaluate(model, bundle.val, cfg, device, byte_lengths, t.eval_tokens, eval_T, eval_B)
            prog.write(f"step {step}: val loss {last_eval['val_loss']:.4f}  val bpb {_bpb_label(last_eval)}")
            rec = {**(rec or {"step": step, "phase": ph.index + 1, "seq_len": ph.seq_len, "tokens": tokens_seen}),
                   **last_eval}
        if rec:
            log(rec)
        if (t.ckpt_every and step % t.ckpt_every == 0) or (step == t.steps and (t.ckpt_every or t.avg_last)):
            save_ckpt(step, ph)
        if step == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train_time = train_time0 + time.time() - t_loop
    model.set_windows(base_windows)
    final = evaluate(model, bundle.val, cfg, device, byte_lengths, None, eval_T, eval_B)
    prog.write(f"final (whole validation split, {final['val_tokens']:,} tokens at seq_len {eval_T}): val loss "
               f"{final['val_loss']:.4f}  val bpb {_bpb_label(final)}  (gzip -9 {bundle.gzip_bpb:.3f}, "
               f"xz -9 {bundle.xz_bpb:.3f})")
    log({"step": t.steps, "phase": phases[-1].index + 1, "seq_len": eval_T, "tokens": tokens_seen, "final": True,
         **final})
    avg = {}
    if t.avg_last > 1 and dist.main:
        dirs = checkpoint_dirs(out)[-t.avg_last:]
        if len(dirs) >= 2:
            average_checkpoints(dirs, out / "model_avg.safetensors")
            avg_model = build_model(cfg.model, cfg.objective).to(device)
            load_model_weights(avg_model, out / "model_avg.safetensors")
            ev = evaluate(avg_model, bundle.val, cfg, device, byte_lengths, None, eval_T, eval_B)
            avg = {"avg_of": [d.name for d in dirs], "avg_val_loss": ev["val_loss"], "avg_val_bpb": ev["val_bpb"]}
            prog.write(f"average of {len(dirs)} checkpoints ({dirs[0].name} .. {dirs[-1].name}): val loss "
                       f"{ev['val_loss']:.4f}  val bpb {_bpb_label(ev)}  (last: {final['val_loss']:.4f})")
            log({"step": t.steps, "tokens": tokens_seen, "final_avg": True, **avg})
    sd = full_state_dict(model)
    sample = generate_sample(model, tok, t.sample_prompt, t.sample_tokens, device)
    summary = {"arch": cfg.arch, "params": n_params, "flops_per_token": fpt, "steps": t.steps,
               "tokens": tokens_seen, "train_time_s": train_time, "wall_time_s": time.time() - t_start,
               "tokens_per_s": tokens_seen / max(train_time, 1e-9), "optimizer": cfg.optim.name,
               "phases": [{"seq_len": p.seq_len, "steps": p.steps, "tokens_per_step": p.tokens_per_step}
                          for p in phases], "world_size": dist.world, **final, **avg,
               "gzip_bpb": bundle.gzip_bpb, "xz_bpb": bundle.xz_bpb, "device": str(device)}
    if dist.main:
        metrics.close()
        from safetensors.torch import save_file

        from .checkpoint import atomic_write

        atomic_write(out / "model.safetensors", lambda tmp: save_file(sd, tmp, metadata={"arch": cfg.arch}))
        (out / "sample.txt").write_text(sample)
        print("sample (temperature 0.8, top-k 50):\n" + "-" * 60 + f"\n{sample}\n" + "-" * 60)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if wb:
            wb.summary.update(summary)
            wb.finish()
        print(f"run saved to {out}  ({_fmt(summary['wall_time_s'])} wall, {summary['tokens_per_s']:,.0f} tok/s)")
    dist.close()
    return summary

def generate_sample(model, tok, prompt, n, device, temperature=0.8, top_k=50, seed=0):
    ids = tok.encode(prompt) or [tok.bos_id]
    idx = torch.tensor([ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, n, temperature=temperature, top_k=top_k, generator=g)
    return tok.decode(out[0].tolist())


def _wandb(cfg: RunConfig, out: Path, resume: bool = False):
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb=true needs wandb: pip install -e '.[wandb]'") from None
    # Offline mode writes under out/wandb and needs no network or login (`wandb sync` uploads later).
    return wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict(), dir=str(out), name=out.name,
                      mode=cfg.logging.wandb_mode, resume="allow" if resume else None)
