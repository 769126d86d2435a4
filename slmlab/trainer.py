"""The training loop: data -> model -> optimizer (Muon + AdamW, or AdamW) -> phased schedule ->
periodic eval and checkpoints -> run directory (see rundir.py for its layout). Runs alone or
under torchrun (DDP / FSDP2).

`Trainer` reads top to bottom in the order a run lives: set up (data, model, optimizer, parallel
wrap), resume, then per step `train_step` (one optimizer step over its micro-batches, the loss
from `compute_loss`), `evaluate` and `checkpoint`, and finally `finalize`. What a checkpoint must
restore lives in named objects: TrainState (counters), BatchSource (data position and RNG),
MetricsLog (the metrics file offset), plus the model and optimizer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from arch.loss import IGNORE_INDEX, Distill
from arch.moe import pending_stats, restore_pending_stats

from . import data as data_mod
from .checkpoint import average_checkpoints, remove_stale, scheduled_checkpoints, weights_for_save
from .config import RunConfig
from .errors import CheckpointError, ConfigError, SlmlabError
from .evaluate import bpb_label, evaluate, generate_sample, moe_label, token_byte_lengths
from .fmt import duration as fmt_duration
from .harness import load_task_items, task_label, task_metrics
from .init_from import base_vocab, init_model
from .optim import build_optimizer
from .phases import eval_shape, lr_mult, phase_at, phase_windows, resolve_phases, warmup_note
from .precision import FP32_ON_GPU, LossScale, autocast, describe_precision, resolve_precision
from .preflight import check_inputs
from .progress import Progress
from .rundir import AVG_WEIGHTS, CONFIG, METRICS, SAMPLE, SUMMARY, RunDir, RunLock, model_from_config, read_metrics
from .runtime import (
    CompiledOrEager,
    Dist,
    is_dtensor,
    is_sharded,
    peak_flops,
    rng_state,
    root_gathered,
    set_rng_state,
    to_device,
    use_compile,
    wrap_parallel,
)
from .unused import show, why_unused


def train(cfg: RunConfig, out: Path, force: bool = False, resume: bool = False) -> dict:
    """Train `cfg` into the run directory `out` (or continue it from its latest checkpoint);
    returns the run summary. SFT data (chat or prompt/completion jsonl) gets the SFTTrainer."""
    from .sft import SFTTrainer, detect_format

    cls = SFTTrainer if detect_format(cfg.data.spec, cfg.data.format) else Trainer
    with RunLock(out, enabled=os.environ.get("RANK", "0") == "0"):  # torchrun's rank 0 writes the directory
        return cls(cfg, Path(out), force=force, resume=resume).fit()


def refuse_inputs_in_out(cfg: RunConfig, out: Path):
    """A run read as input cannot be --out: a new run there replaces its weights before reading them
    (a LoRA run would then name itself as its base)."""
    target = Path(out).expanduser().resolve()
    for key, value in (("train.init_from", cfg.train.init_from), ("train.teacher", cfg.train.teacher),
                       ("data.tokenizer", cfg.data.tokenizer)):
        path = Path(value).expanduser().resolve() if value else None
        if path is not None and (path == target or (path.is_file() and path.parent == target)):  # tokenizer.json
            raise ConfigError(f"{key} is --out ({target}): training into --out would replace it before the new "
                              "run is written; choose another --out")


def check_cache_dir(cfg: RunConfig):
    """data.cache_dir is a directory, or one that can be made: else one line naming it, before any work."""
    path = Path(cfg.data.cache_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"data.cache_dir={cfg.data.cache_dir} is a file, not a directory: choose another location")
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"data.cache_dir={cfg.data.cache_dir} is a broken symbolic link: fix it or choose another "
                          "location")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"data.cache_dir={cfg.data.cache_dir} cannot be created ({e.strerror or e}): choose "
                          "another location") from None


def load_teacher(path: str, cfg: RunConfig, tok, device, seq_len: int):
    """The frozen teacher of train.teacher=path, after checking it can teach this run: an
    autoregressive model on the same tokenizer and vocabulary as the autoregressive student, with
    positions for the longest training sequence (`seq_len`)."""
    if cfg.objective.name != "ar":
        raise ConfigError(f"train.teacher distills into autoregressive models; objective.name is {cfg.objective.name!r}")
    run = RunDir.open(path, label="train.teacher=")
    run.check_same_tokenizer(tok, "distillation needs the same tokenizer (train the teacher on the same "
                                  "data.spec and model.vocab_size)")
    tcfg = run.config()
    if tcfg.objective.name != "ar":
        raise ConfigError(f"train.teacher={path} is an objective.name={tcfg.objective.name} run: "
                          "distillation needs an autoregressive teacher")
    if tcfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"train.teacher={path} has model.vocab_size={tcfg.model.vocab_size}, this run "
                          f"{cfg.model.vocab_size}: distillation compares logits column by column")
    if tcfg.model.pos == "learned" and seq_len > tcfg.model.max_positions:
        raise ConfigError(f"train.teacher={path} has learned positions up to model.max_positions="
                          f"{tcfg.model.max_positions}, but this run trains on sequences of {seq_len} tokens: shorten "
                          "train.phases / train.seq_len or use a teacher with more positions")
    _, teacher, _ = run.load(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@dataclass
class TrainState:
    """The counters a checkpoint carries besides model, optimizer, data position and RNG."""
    step: int = 0  # optimizer steps done
    tokens: int = 0
    bad_steps: int = 0  # consecutive non-finite steps
    train_time0: float = 0.0  # training seconds spent before this process (resume)
    t_loop: float = 0.0  # when this process's loop started
    wall_time0: float = 0.0  # wall seconds of the processes before this one, up to their last checkpoint
    t_start: float = dataclasses.field(default_factory=time.time)  # when this process began (set-up included)

    def train_time(self) -> float:
        return self.train_time0 + time.time() - self.t_loop

    def wall_time(self) -> float:
        return self.wall_time0 + time.time() - self.t_start


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training; the message says where to resume (slmlab/cli.py prints
    it and exits 128 + signum)."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = int(signum)


@dataclass
class StepResult:
    loss: float
    ce: float
    grad_norm: float
    lr_mult: float
    tokens: int
    seconds: float
    stop: bool = False  # a rank caught Ctrl-C / SIGTERM by the end of this step's collective
    loss_scale: float = 1.0  # fp16: what this step's loss was multiplied by (LossScale)


class MetricsLog:
    """metrics.jsonl (one JSON object per line) and wandb, written by rank 0 only. On resume the
    file is cut at the checkpoint's offset: the lines logged after it are replayed; the wandb run
    of `wandb_id` (the checkpoint's) continues."""

    def __init__(self, run: RunDir, cfg: RunConfig, enabled: bool, resume_offset: int | None,
                 wandb_id: str | None = None):
        self.enabled, self.file, self.wb, self.wandb_id = enabled, None, None, wandb_id
        if not enabled:
            return
        path = run.path / METRICS
        # wandb drops a step below one it has: the replayed steps were sent before the kill (same values).
        self.wb_from = last_logged_step(path) + 1 if resume_offset is not None and cfg.logging.wandb else 0
        self.file = open_metrics(path, resume_offset)
        self.wb = _wandb(cfg, run.path, wandb_id)
        if self.wb:
            self.wandb_id = self.wb.id

    def log(self, rec: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.wb and rec["step"] >= self.wb_from:
            self.wb.log(rec, step=rec["step"])

    def offset(self) -> int:
        return self.file.tell()

    def close(self, summary: dict):
        if not self.enabled:
            return
        self.file.close()
        if self.wb:
            self.wb.summary.update(summary)
            self.wb.finish()


def last_logged_step(path: Path) -> int:
    """The highest step in a metrics.jsonl (0 if none): what the run had logged, to wandb too."""
    try:
        records = read_metrics(path)[0]
    except FileNotFoundError:
        return 0
    return max((r["step"] for r in records if isinstance(r.get("step"), int)), default=0)


def open_metrics(path: Path, resume_offset: int | None):
    """metrics.jsonl opened for appending at the resume point: a new run's is empty; a resumed
    run's is cut at the checkpoint's offset. A file lost or cut since is started or appended to
    (never padded to the offset), with one line on stderr."""
    if resume_offset is None:
        return open(path, "w")
    if not path.is_file():
        print(f"note: {path} is missing: a new one starts with the resumed steps", file=sys.stderr)
        return open(path, "w")
    size = path.stat().st_size
    f = open(path, "r+")
    if size < resume_offset:
        print(f"warning: {path} ({size} bytes) is shorter than when the checkpoint was written ({resume_offset} "
              "bytes): it was cut or replaced since; the resumed steps are appended at its end", file=sys.stderr)
    f.seek(min(size, resume_offset))
    f.truncate()
    if 0 < size < resume_offset:
        with open(path, "rb") as b:
            b.seek(-1, 2)
            if b.read(1) != b"\n":  # cut mid-line: the next record starts a line of its own
                f.write("\n")
    return f


def phase_seed(seed: int, index: int) -> int:
    """The data generator's seed in phase `index`: train.seed in the first, so a one-phase run draws what
    it always drew; a fixed odd step apart after it (mod 2**64, what manual_seed takes)."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2 ** 64


class BatchSource:
    """Training batches for a phase: random windows of the phase's corpus from a seeded generator,
    or a quality-ordered document stream. Every rank draws the same global batch and keeps its
    rows: a world-N run sees exactly the batches of a 1-process run with the same global batch.
    Each phase draws from a generator of its own (phase_seed), so runs of one seed whose step counts
    differ (an equal-FLOPs ablation's variants: their phase boundaries move) still see the same
    batches in each phase, up to the shorter run's end of it; one generator ran on across phases."""

    def __init__(self, train_sets: dict, tok, quality_score: str, dist: Dist, seed: int, say):
        self.train_sets, self.tok, self.quality_score, self.dist, self.say = train_sets, tok, quality_score, dist, say
        self.seed, self.gen_phase = seed, 0  # the phase self.gen draws for
        self.gen = torch.Generator().manual_seed(seed)
        self.streams = {}  # phase index -> OrderedStream, built when the phase starts
        self.stream_keys = {}  # phase index -> stream_key of the phase its stream was built for

    def stream(self, ph):
        if ph.order != "quality":
            return None
        if ph.index not in self.streams:
            from .curriculum import OrderedStream, document_spans, score_documents

            bundle, spec = self.train_sets[ph.data]
            spans = document_spans(bundle.train, self.tok.eos_id)
            scores = score_documents(bundle.train, spans, self.quality_score, spec)
            reads = ph.steps * ph.tokens_per_step
            s = self.streams[ph.index] = OrderedStream(bundle.train, spans, scores, ph.top_frac, reads)
            self.stream_keys[ph.index] = self.stream_key(ph)
            n = len(s)
            self.say(f"  phase {ph.index + 1}: {s.n_docs} of {len(spans)} documents ({n:,} tokens), low -> high "
                     f"{self.quality_score}; its {reads:,} tokens "
                     + (f"are the stream's best {reads / n:.0%}" if reads <= n else f"read it {reads / n:.1f} times")
                     + ", ending on the best")
        return self.streams[ph.index]

    def next(self, ph, batch_size: int, device):
        n = batch_size * self.dist.world
        stream = self.stream(ph)
        if stream is not None:
            x, y = stream.next(n, ph.seq_len)
        else:
            if ph.index != self.gen_phase:
                self.gen, self.gen_phase = torch.Generator().manual_seed(phase_seed(self.seed, ph.index)), ph.index
            x, y = data_mod.get_batch(self.train_sets[ph.data][0].train, n, ph.seq_len, self.gen, "cpu")
        rows = slice(self.dist.rank * batch_size, (self.dist.rank + 1) * batch_size)
        return to_device(x[rows], device), to_device(y[rows], device)

    def stream_key(self, ph) -> list:
        """What a stream's document order depends on: a saved cursor counts documents in that order."""
        return [ph.data, ph.top_frac, self.quality_score]

    def state_dict(self) -> dict:
        return {"rng": rng_state(self.gen), "rng_phase": self.gen_phase,
                "streams": {str(k): s.cursor for k, s in self.streams.items()},
                "stream_keys": {str(k): key for k, key in self.stream_keys.items()}}

    def load_state_dict(self, state: dict, phases):
        set_rng_state(state["rng"], self.gen)
        # (a checkpoint from before per-phase generators: its one generator goes on in the saved phase)
        self.gen_phase = state.get("rng_phase", state["phase"])
        keys = state.get("stream_keys", {})  # absent in checkpoints written before it was saved
        for k, cursor in state.get("streams", {}).items():
            i = int(k)
            if i >= len(phases) or phases[i].order != "quality":
                raise ConfigError(f"--resume: the checkpoint holds a position in the quality-ordered stream of "
                                  f"train.phases[{i}], which is no longer an order: quality phase: resume with the "
                                  "run's train.phases")
            if k in keys and list(keys[k]) != self.stream_key(phases[i]):
                (data, top, score), (data2, top2, score2) = keys[k], self.stream_key(phases[i])
                raise ConfigError(f"--resume: train.phases[{i}] is mid-way through its quality-ordered documents, "
                                  f"which (data, top_frac, train.quality_score) {data!r}, {top}, {score!r} -> "
                                  f"{data2!r}, {top2}, {score2!r} would reorder: resume with the run's values")
            self.stream(phases[i]).cursor = cursor
        # A stream still to be read is placed from the tokens its phase has left, so that it ends on its best
        # text: the same phases give the saved cursor (it moved by those tokens from the same placement); a
        # new train.steps (or tokens_per_step, or batch shape) re-lays the phases, and the cursor with them.
        saved = state.get("streams", {})
        for ph in phases:
            if ph.order != "quality":
                continue
            left = (ph.start + ph.steps - max(state["step"], ph.start)) * ph.tokens_per_step
            if left <= 0:
                continue
            s = self.stream(ph)
            cursor = s.start_for(left)
            if str(ph.index) in saved and cursor != s.cursor:
                self.say(f"--resume: phase {ph.index + 1}'s quality-ordered stream is placed again for the "
                         f"{left:,} tokens the phase now has left, so that it still ends on its best text")
            s.cursor = cursor


class Trainer:
    """One run: __init__ sets everything up (and restores a checkpoint with resume=True); fit()
    trains, evaluates and checkpoints, then finalize() writes the run directory's results."""

    stop_signal = None  # the signal number once Ctrl-C / SIGTERM arrived during fit()

    def __init__(self, cfg: RunConfig, out: Path, force: bool = False, resume: bool = False):
        self.cfg, self.t, self.t_start, self.resuming = cfg, cfg.train, time.time(), resume
        self.dist = Dist(cfg.train.device)
        self.phases = resolve_phases(cfg, self.dist.world)  # with the world size: batches must split over ranks
        longest = max([ph.seq_len for ph in self.phases] + [cfg.train.eval_seq_len or 0])
        if cfg.model.pos == "learned" and longest > cfg.model.max_positions:
            raise ConfigError(f"sequences of {longest} tokens exceed model.max_positions={cfg.model.max_positions} "
                              "(learned positions have no rows past it): shorten train.phases / train.seq_len")
        if not resume:
            refuse_inputs_in_out(cfg, out)
        check_cache_dir(cfg)
        if not resume and self.dist.main:
            RunDir.check_new(out, force)
        self.run = RunDir(out)
        torch.manual_seed(self.t.seed)
        self.device = self.dist.device(self.t.device)
        self.precision = resolve_precision(self.t.precision, self.device)
        self.loss_scale = LossScale(self.precision == "fp16")
        check_inputs(cfg, self.device.type, resuming=resume)
        self.say = print if self.dist.main else (lambda *a, **k: None)
        if self.t.lora.r:  # the adapter run names its base by an absolute path, so it loads from anywhere
            self.t.init_from = str(Path(self.t.init_from).expanduser().resolve())
        self.setup_data()
        self.task_items = load_task_items(self.t.eval_tasks, self.t.eval_tasks_limit, self.say)
        if self.t.teacher:
            self.teacher = load_teacher(self.t.teacher, cfg, self.tok, self.device, max(p.seq_len for p in self.phases))
        else:
            self.teacher = None
        ckpt = self.checkpoint_to_resume() if resume else None
        self.setup_model(resuming=ckpt is not None)
        saved = self.run.load_checkpoint(ckpt, self.model) if ckpt else None  # before DDP/FSDP wrap it
        self.setup_parallel_and_optimizer()
        self.batches = self.make_batches()
        done = saved["step"] if saved else 0
        # Score the quality-ordered phases to come now, not inside a timed step: a bad train.quality_score
        # fails before step 1, not mid-run.
        for ph in self.phases:
            if ph.order == "quality" and ph.start + ph.steps > done:
                self.batches.stream(ph)
        self.state = TrainState(t_start=self.t_start)
        if saved is not None:
            self.resume(ckpt, saved)
        elif self.dist.main:
            RunDir.create(out, force)
        self.open_run_dir(saved)
        self.peak, peak_desc = peak_flops(self.device)
        if self.device.type == "cuda" and self.precision == "fp32":
            peak_desc += f"; {FP32_ON_GPU}"
        self.say(f"MFU peak: {self.peak / 1e12:.3f} TFLOP/s ({peak_desc})")

    # ---- set-up ----
    def setup_data(self):
        """The run's corpora as data.prepare_for tokenizes them (the cache entries ablate.py's
        coordinator fills too), and the evaluation shape."""
        cfg, quiet = self.cfg, not self.dist.main
        src = self.tokenizer_source(cfg.data.tokenizer) if cfg.data.tokenizer else None
        data = data_mod.prepare_for(cfg, tokenizer_path=src, say=self.say, quiet=quiet)
        self.bundle, self.tok, self.train_sets = data.bundle, data.tokenizer, data.train_sets
        self.eval_T, self.eval_B = eval_shape(self.phases, self.t.eval_seq_len, self.t.grad_accum, self.dist.world)
        for ph in self.phases:
            data_mod.check_sizes(self.train_sets[ph.data][0], ph.seq_len, 1, splits=("train",))
        data_mod.check_sizes(self.bundle, self.eval_T, 1, splits=("validation",))  # only eval reads it
        self.byte_lengths = token_byte_lengths(self.tok)

    def tokenizer_source(self, src: str) -> Path:
        """Where the tokenizer is read: `src`, or on --resume, when `src` (a base run, say) is gone,
        the run's own copy, which is what it trained with (checkpoint_to_resume compares them)."""
        path = Path(src).expanduser()
        if self.resuming and not path.exists():
            self.say(f"note: {src} no longer exists: the tokenizer (and chat template) come from {self.run.path}")
            return self.run.path
        return path

    def make_batches(self):
        return BatchSource(self.train_sets, self.tok, self.t.quality_score, self.dist, self.t.seed, self.say)

    def describe_data(self) -> str:
        b = self.bundle
        return f"baselines on validation ({b.val_bytes:,} bytes): gzip -9 {b.gzip_bpb:.3f} bpb, xz -9 {b.xz_bpb:.3f} bpb"

    def baselines(self) -> dict:
        """Compression baselines of the validation split, reported beside the model's bpb."""
        return {"gzip_bpb": self.bundle.gzip_bpb, "xz_bpb": self.bundle.xz_bpb}

    def checkpoint_to_resume(self) -> Path:
        """The latest checkpoint of --out, after checking the run is compatible with this config."""
        run = RunDir.open(self.run.path, need=(CONFIG,), label="--resume: ")
        ckpt = run.latest_checkpoint()
        saved = run.config()
        diff = saved.model.weight_changes(self.cfg.model)
        if diff:
            raise ConfigError(f"--resume: the model config differs from the run in {run.path}: " + ", ".join(diff[:4]))
        data = [f"data.{k} {getattr(saved.data, k)!r} -> {getattr(self.cfg.data, k)!r}"
                for k in ("spec", "tokenizer", "added_tokens") if getattr(saved.data, k) != getattr(self.cfg.data, k)]
        run.check_same_tokenizer(self.tok, ", ".join(data) + "?" if data else
                                 "its data.tokenizer or data changed since the run began?")
        self.check_same_adapters(saved, run)
        if saved.train.seed != self.t.seed:  # the checkpoint's RNG states go on; a seed would only be recorded
            raise ConfigError(f"--resume: train.seed {saved.train.seed} -> {self.t.seed}: a resumed run continues "
                              f"the checkpoint's random state, so a new seed would not be used; resume with "
                              f"train.seed={saved.train.seed} (or start a new run)")
        where = [str(Path(p).expanduser().resolve()) if p else "" for p in (saved.train.init_from, self.t.init_from)]
        if not self.t.lora.r and where[0] != where[1]:  # LoRA runs: check_same_adapters names it
            raise ConfigError(f"--resume: train.init_from {saved.train.init_from!r} -> {self.t.init_from!r}: the "
                              "checkpoint holds every weight, so a new base would not be loaded; resume with "
                              f"train.init_from={saved.train.init_from!r} (or start a new run)")
        self.announce_changes(saved)
        return ckpt

    # What --resume may change mid-run besides optim.*: the batch shape and evaluation (metrics.jsonl logs
    # seq_len and eval_seq_len per line; config.yaml will hold only the new values).
    SHAPE_KEYS = ("batch_size", "seq_len", "grad_accum", "phases", "eval_seq_len", "eval_tokens")

    def announce_changes(self, saved: RunConfig):
        """One line for each kind of setting --resume changes, naming each key old -> new: they apply
        from the resumed step on, so the run's earlier steps and evals were made with the old values."""
        optim = [f"optim.{f.name} {getattr(saved.optim, f.name)!r} -> {getattr(self.cfg.optim, f.name)!r}"
                 for f in dataclasses.fields(saved.optim)
                 if getattr(saved.optim, f.name) != getattr(self.cfg.optim, f.name)]
        shape = self.changes(saved, lambda key: key.removeprefix("train.") in self.SHAPE_KEYS)
        other = self.changes(saved, lambda key: key not in self.OWN_LINE)
        for changes in (optim, saved.model.runtime_changes(self.cfg.model), shape, other):
            if changes:
                self.say(f"--resume: {', '.join(changes)}: applies from the resumed step on"
                         + (self.eval_change(saved) if changes is shape else ""))
        data = self.changes(saved, lambda key: key in ("data.spec", "data.val_frac"))
        if data:
            self.say(f"--resume: {', '.join(data)}: training reads the new data from the resumed step on, and the "
                     "validation split is the new data's, so val losses before and after do not compare")
        if saved.train.steps != self.t.steps:  # the shares and the schedule are of train.steps
            self.say(f"--resume: train.steps {saved.train.steps} -> {self.t.steps}: the phases' steps and the lr "
                     f"schedule (warmup, decay) are laid out anew over {self.t.steps} steps, so the resumed step "
                     "may fall in another phase, at another lr, than it would have")

    # Keys --resume checks or announces on their own (above, check_same_adapters, checkpoint_to_resume),
    # and data.cache_dir, a location: any other train.* / data.* change gets a line of changes().
    OWN_LINE = {*(f"train.{k}" for k in SHAPE_KEYS), "train.steps", "train.seed", "train.init_from", "train.lora",
                "data.cache_dir", "data.spec", "data.val_frac"}

    def changes(self, saved: RunConfig, wanted) -> list[str]:
        """'KEY old -> new' for each train.* and data.* KEY that `wanted` takes, differs and is read: the lr
        schedule, gradient clipping, the cadence of logs and evals, the data."""
        out = []
        for sec in ("train", "data"):
            old, new = dataclasses.asdict(getattr(saved, sec)), dataclasses.asdict(getattr(self.cfg, sec))  # phases shown
            out += [f"{sec}.{k} {show(old[k])} -> {show(new[k])}" for k in old
                    if wanted(f"{sec}.{k}") and old[k] != new[k] and why_unused(self.cfg, f"{sec}.{k}") is None]
        return out

    def eval_change(self, saved: RunConfig) -> str:
        """'; ...' when the resumed run evaluates other tokens than the run did so far, else ''."""
        old_T = eval_shape(resolve_phases(saved), saved.train.eval_seq_len, saved.train.grad_accum)[0]
        if old_T != self.eval_T:
            return (f"; evaluation moves from seq_len {old_T} to {self.eval_T}, so val losses before and after "
                    "do not compare")
        if saved.train.eval_tokens != self.t.eval_tokens:
            return "; periodic evaluations cover other tokens, so val losses before and after do not compare"
        return ""

    def check_same_adapters(self, saved: RunConfig, run: RunDir):
        """The saved adapters only mean the same function on the same base, rank, targets and scale
        (alpha / r multiplies them: a new alpha would rescale them mid-run). Dropout may change."""
        old, new = saved.train, self.t
        if not (old.lora.r or new.lora.r):
            return
        diff = [f"train.lora.{k} {getattr(old.lora, k)!r} -> {getattr(new.lora, k)!r}" for k in ("r", "alpha", "targets")
                if getattr(old.lora, k) != getattr(new.lora, k)]
        if old.init_from != new.init_from:
            diff.append(f"train.init_from {old.init_from!r} -> {new.init_from!r}")
        if diff:
            raise ConfigError(f"--resume: the run's LoRA adapters were trained otherwise: {', '.join(diff)}; resume "
                              "with the run's values (or start a new run)")
        if old.lora.r:
            run.lora_base()  # refuses a base retrained since the run began

    def setup_model(self, resuming: bool = False):
        self.say(self.describe_data())
        self.model = model = model_from_config(self.cfg).to(self.device)
        # A resumed checkpoint holds every weight, so the base need not exist any more; LoRA
        # checkpoints hold adapters only and still sit on the base.
        init_model(model, self.cfg, self.tok, load_weights=not resuming or bool(self.t.lora.r))
        if self.t.lora.r:
            from .lora import apply_lora, trainable_report

            apply_lora(model, self.t.lora, base_vocab(self.cfg))
            self.say(trainable_report(model))
        self.n_params = model.num_params()
        self.fpt = model.flops_per_token(self.phases[-1].seq_len)
        world = self.dist.world
        self.n_active = model.num_params(active=True)  # a MoE's: the experts a token runs
        active = f", {self.n_active / 1e6:.2f}M active a token" if self.n_active != self.n_params else ""
        self.say(f"model: {self.cfg.arch}  layers {self.cfg.model.layer_letters()}  "
                 f"{self.n_params / 1e6:.2f}M params ({model.num_params(exclude_embedding=True) / 1e6:.2f}M "
                 f"non-embedding{active})  {self.fpt / 1e6:.1f} MFLOP/token at {self.phases[-1].seq_len}  device "
                 f"{self.device} ({describe_precision(self.precision, self.device)})"
                 + (f"  {world} ranks ({self.t.parallel})" if world > 1 else ""))
        for ph in self.phases:
            self.say("  " + ph.describe() + f"  batch {ph.batch_size(self.t.grad_accum, world) * world}")
        if (note := warmup_note(self.t)) is not None:
            self.say("  " + note)
        self.say(self.cfg.model.kernel_routing(self.device, self.phases[-1].seq_len))

    def setup_parallel_and_optimizer(self):
        self.model.set_data_shard(self.dist.rank, self.dist.world)
        self.fwd, self.model = wrap_parallel(self.model, self.t.parallel, self.dist, self.device)
        self.loss_fn, self.nll_fn = self.fwd, None  # what compute_loss and evaluate call
        self.teacher_fn = None if self.teacher is None else self.teacher.hidden
        if use_compile(self.t.compile, self.device):
            self.loss_fn = CompiledOrEager(self.fwd, "the training forward", self.say)
            self.nll_fn = CompiledOrEager(self.model.token_nll, "the eval forward", self.say)
            if self.teacher is not None:
                self.teacher_fn = CompiledOrEager(self.teacher.hidden, "the teacher forward", self.say)
        self.opt = build_optimizer(self.model, self.cfg.optim, verbose=self.dist.main)
        self.base_windows = self.cfg.model.layer_windows()

    def resume(self, ckpt: Path, saved: dict):
        step, steps = saved["step"], self.t.steps
        # steps == step finishes a run killed before it wrote its outputs (and rewrites a finished
        # run's); whether it finished is not asked: under torchrun rank 0 may write summary.json
        # before another rank would read it, and the ranks must decide alike.
        if steps < step:
            raise ConfigError(f"--resume: the checkpoint is at step {step}; train.steps ({steps}) must be at least that")
        # The saved param groups carry the old run's lr, betas, weight decay, momentum...: this config's
        # (what config.yaml and metrics.jsonl record, and optim.* overrides may change) go back on top.
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.opt.param_groups]
        try:
            self.opt.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{ckpt / 'state.pt'}: optimizer state does not fit (optim.name changed?): "
                                  f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
        for group, hyper in zip(self.opt.param_groups, configured):
            group.update(hyper)
        self.batches.load_state_dict(saved, self.phases)  # data position and every RNG
        if self.loss_scale.enabled and "loss_scale" in saved:  # (a run switched to fp16 starts a fresh scale)
            self.loss_scale.load_state_dict(saved["loss_scale"])
        problem = restore_pending_stats(self.model, saved["moe_stats"]) if "moe_stats" in saved else None
        if problem:  # (a checkpoint from before they were saved has none: the loads restart)
            raise CheckpointError(f"{ckpt / 'state.pt'}: {problem}")
        # A checkpoint from before wall_time was saved: the wall time counts this process only, as it did.
        self.state = TrainState(step=saved["step"], tokens=saved["tokens"], bad_steps=saved["bad_steps"],
                                train_time0=saved["train_time"], wall_time0=saved.get("wall_time", 0.0),
                                t_start=self.t_start)
        # The phase the next step is in: a new train.steps moves the phase boundaries.
        self.say(f"resumed from {ckpt} (step {step}, phase {phase_at(self.phases, step).index + 1})")

    def open_run_dir(self, saved: dict | None):
        if self.dist.main:
            remove_stale(self.run.path)  # temporaries of a writer killed in an earlier attempt
            self.run.write_config(self.cfg)
            self.run.write_tokenizer(self.tok)
            if saved is None and self.t.lora.r:
                self.run.write_lora_base(self.t.init_from)
            if saved is not None:  # the finish it describes is being replaced (metrics.jsonl loses its final line)
                (self.run.path / SUMMARY).unlink(missing_ok=True)
        self.metrics = MetricsLog(self.run, self.cfg, self.dist.main, saved["metrics_offset"] if saved else None,
                                  saved.get("wandb_id") if saved else None)

    # ---- the loop ----
    def fit(self) -> dict:
        t = self.t
        self.progress = Progress(t.steps, self.cfg.logging.progress and self.dist.main, quiet=not self.dist.main,
                                 start=self.state.step, costs=[(p.start, p.steps, p.tokens_per_step
                                                                * self.model.flops_per_token(p.seq_len))
                                                               for p in self.phases])
        self.model.train()
        self.state.t_loop, phase = time.time(), None
        with self.stop_on_signals():
            for step in range(self.state.step + 1, t.steps + 1):
                if phase_at(self.phases, step - 1) is not phase:
                    phase = self.enter_phase(step)
                res = self.train_step(step, phase)
                self.progress.update(step, res.loss, res.tokens / res.seconds,
                                     phase=f"p{phase.index + 1} T{phase.seq_len} ")
                rec = self.step_record(step, phase, res) if step % t.log_every == 0 or step == 1 else None
                if step % t.eval_every == 0 and step != t.steps:
                    ev = self.periodic_eval(phase)
                    self.progress.write(f"step {step}: val loss {ev['val_loss']:.4f}  val bpb {bpb_label(ev)}"
                                        + (f"  exact match {ev['exact_match']:.3f}" if "exact_match" in ev else "")
                                        + moe_label(ev) + task_label(ev))
                    rec = {**(rec or self.position(step, phase)), **ev}
                if rec:
                    self.metrics.log(rec)
                if self.checkpoint_due(step):
                    self.checkpoint(step, phase)
                # Under torchrun the all-reduced flag only: a rank's own may have come after the collective.
                if res.stop or (self.dist.world == 1 and self.stop_signal is not None):
                    self.stop(step, phase)
        # Ctrl-C or SIGTERM (a scheduler's) in the final eval or writes stops at once: the last step's
        # checkpoint finishes the run on --resume. SIGTERM killed the process silently here before.
        try:
            with self.stop_on_signals(finishing=True):
                return self.finalize()
        except Stopped:
            raise
        except KeyboardInterrupt:  # off the main thread no handler is set: Python's own Ctrl-C
            raise Stopped(self.stopped_message(signal.SIGINT), signal.SIGINT) from None

    def checkpoint_due(self, step: int) -> bool:
        return bool(self.t.ckpt_every) and (step % self.t.ckpt_every == 0 or step == self.t.steps)

    @contextmanager
    def stop_on_signals(self, finishing: bool = False):
        """Ctrl-C or SIGTERM during the loop stops it after the step under way (see stop); a second
        one stops at once, as does the first once `finishing` (after the last step, which the loop
        checkpointed). Handlers need the main thread: elsewhere the signals stay as they were."""
        self.stop_signal = None

        def handler(signum, frame):
            if finishing:
                raise Stopped(self.stopped_message(signum), signum)
            if self.stop_signal is not None:
                raise Stopped(self.stopped_message(signum, at_once=True), signum)
            self.stop_signal = signum

        try:
            previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:
            previous = {}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def stop(self, step: int, ph):
        """A signal arrived: checkpoint the finished step (unless the loop just did, or checkpoints are
        off: train.ckpt_every=0), then raise Stopped naming the checkpoint to resume from."""
        signum = self.stop_signal or signal.SIGTERM  # a rank the signal missed
        if self.t.ckpt_every and not self.checkpoint_due(step):
            self.checkpoint(step, ph, scheduled=False)
        raise Stopped(self.stopped_message(signum), signum)

    def stopped_message(self, signum: int, at_once: bool = False) -> str:
        what = f"{signal.Signals(signum).name} " + (
            "again: stopped at once, without a checkpoint of the step under way" if at_once
            else f"at step {self.state.step}: stopped after it")
        if not self.dist.main:  # rank 0 names the checkpoint, which only it writes
            return f"rank {self.dist.rank}: {what}"
        ckpts = self.run.checkpoints()
        if not ckpts:
            return f"{what}; no checkpoint was written (train.ckpt_every={self.t.ckpt_every}), so it cannot be resumed"
        launch = "the same torchrun command with" if self.dist.world > 1 else "python train.py"
        return f"{what}; last checkpoint {ckpts[-1]}; continue with: {launch} --resume --out {self.run.path}"

    def periodic_eval(self, ph) -> dict:
        """evaluate() with the model's own attention windows, as the final evaluation runs, not the
        phase's `window`: periodic evals stay comparable with each other and with the final one."""
        self.model.set_windows(self.base_windows)
        try:
            return {**self.evaluate(self.t.eval_tokens), "eval_seq_len": self.eval_T}
        finally:
            self.model.set_windows(phase_windows(self.base_windows, ph.window))

    def enter_phase(self, step: int):
        ph = phase_at(self.phases, step - 1)
        self.progress.write(f"step {step}: entering {ph.describe()}")
        self.model.set_windows(phase_windows(self.base_windows, ph.window))
        self.fpt = self.model.flops_per_token(ph.seq_len)
        return ph

    def train_step(self, step: int, ph) -> StepResult:
        """One optimizer step: the phase's global batch in t.grad_accum micro-batches, gradients
        synchronised on the last one, clipped; a non-finite step is skipped (and counted)."""
        t, dist = self.t, self.dist
        mult = lr_mult(step - 1, t) * ph.lr_mul
        self.opt.set_lr_mult(mult)
        B = ph.batch_size(t.grad_accum, dist.world)
        t0 = time.time()
        micro = [self.batches.next(ph, B, self.device) for _ in range(t.grad_accum)]
        n_tok = sum(x.numel() for x, _ in micro)  # SFT batches are as long as their longest example
        try:
            sums = self.accumulate(micro)
        except Exception as e:  # the compiled backward failed to compile (it compiles at the first backward)
            if not (isinstance(self.loss_fn, CompiledOrEager) and self.loss_fn.would_fall_back(e)):
                raise
            if dist.world > 1:  # DDP's reducer / FSDP's reduce-scatters are mid-backward: no clean redo
                raise ConfigError(f"torch.compile failed for the training backward ({type(e).__name__}); with "
                                  f"{dist.world} ranks the step cannot be redone eagerly: rerun with "
                                  "train.compile=false") from e
            self.loss_fn.fall_back(e)
            self.opt.zero_grad(set_to_none=True)  # a partial backward may have written some gradients
            sums = self.accumulate(micro)
        # The stop flag rides in the losses' all-reduce: every rank stops after the same step, even
        # when a signal reached only some, at no extra collective.
        loss_sum, ce_sum, stop, tok = dist.mean(*sums.tolist(), float(self.stop_signal is not None), float(n_tok))
        # grad_clip 0 = no clipping: max_norm 0 would scale every gradient to zero. An infinite bound still
        # measures the norm for the log, through the same DTensor-aware call under FSDP.
        self.loss_scale.unscale_(self.model.parameters())
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip or math.inf)
        gnorm = float(gnorm.full_tensor() if is_dtensor(gnorm) else gnorm)
        stepped = math.isfinite(loss_sum) and math.isfinite(gnorm)
        overflow = not stepped and self.loss_scale.overflowed(loss_sum, gnorm)
        if stepped:
            self.opt.step()
            self.state.bad_steps = 0
        elif overflow:
            self.progress.write(f"step {step}: fp16 gradients overflowed at loss scale {self.loss_scale.scale:g}; "
                                f"update skipped, scale halved")
        else:
            self.skip_bad_step(step, loss_sum, gnorm)
        used_scale = self.loss_scale.scale
        self.loss_scale.update(overflow)
        # e.g. MoE expert biases (arch/moe.py). A LoRA run moves none: they are the base's, as its frozen
        # weights are, and its files hold adapters only (a moved bias would be lost on resume and merge).
        self.model.after_optimizer_step(stepped and not self.t.lora.r)
        self.opt.zero_grad(set_to_none=True)
        step_tokens = round(tok * dist.world)  # every rank's: SFT ranks pad their batches to different lengths
        self.state.step, self.state.tokens = step, self.state.tokens + step_tokens
        return StepResult(loss_sum, ce_sum, gnorm, mult, step_tokens, time.time() - t0, stop > 0, used_scale)

    def accumulate(self, micro: list):
        """Forward and backward of the step's micro-batches, gradients summed (synchronised across
        ranks on the last one); returns (loss, ce) averaged, on the device."""
        sums = torch.zeros(2, device=self.device)
        scales, loss_scale = self.micro_scales(micro), self.loss_scale.scale
        for i, (x, y) in enumerate(micro):
            sync = i == len(micro) - 1 or not hasattr(self.fwd, "no_sync")
            if scales is not None and scales[i] == 0:  # no scored token: its mean would be 0/0
                y = y.clone()
                y.view(-1)[0] = 0  # one, at weight 0: the forward and backward still run, as DDP expects of a rank
            with (torch.enable_grad() if sync else self.fwd.no_sync()), autocast(self.device, self.precision):
                loss, ce = self.compute_loss(x, y)
            both = torch.stack([loss.detach(), ce.detach()]).float()
            # (loss_scale is 1 but under fp16: the unscaled runs' arithmetic is unchanged, bit for bit)
            if scales is None:
                (loss / len(micro) * loss_scale).backward()
                sums += both / len(micro)
            else:
                (loss * scales[i] * loss_scale).backward()
                sums += both * scales[i]
        return sums

    # SFTTrainer: micro-batches score different numbers of (reply) tokens
    token_weighted = False

    def micro_scales(self, micro: list) -> list[float] | None:
        """What each micro-batch's loss (a mean over its scored tokens) is multiplied by, so that the step's
        gradient is the mean over the scored tokens of every micro-batch of every rank, as one process with
        the whole batch computes it: its tokens' share of the step's, times the world size (DDP averages the
        ranks). None where every micro-batch scores alike (each loss / grad_accum, as pretraining's)."""
        if not self.token_weighted:
            return None
        counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro]
        total = self.dist.mean(float(sum(counts)))[0] * self.dist.world
        return [n * self.dist.world / max(total, 1.0) for n in counts]

    def compute_loss(self, x, y):
        """(loss to minimise, cross-entropy to report) for one micro-batch. The one place a new
        objective goes: SFT masking (the -1 labels), distillation (below), an auxiliary loss."""
        if self.teacher is None:
            loss = self.loss_fn(x, y)  # the model's own objective (next-token CE, or the MDLM ELBO)
            return loss, loss
        with torch.no_grad():  # the teacher's hidden states only: its head runs inside the loss, chunked
            hidden = self.teacher_fn(x)[0]
        teacher = Distill(hidden, self.teacher.lm_head.weight, self.t.distill_alpha, self.t.distill_temperature)
        return self.loss_fn(x, y, teacher=teacher)

    def skip_bad_step(self, step: int, loss: float, gnorm: float):
        self.state.bad_steps += 1
        n, limit = self.state.bad_steps, self.t.max_bad_steps
        self.progress.write(f"warning: step {step}: non-finite loss {loss} / grad norm {gnorm}; update skipped "
                            f"({n}/{limit})")
        if n >= limit:
            raise SlmlabError(f"training diverged: {n} consecutive non-finite steps (last: step {step}); "
                              f"lower optim.lr or raise train.warmup_steps")

    # ---- logging, evaluation, checkpoints ----
    def position(self, step: int, ph) -> dict:
        """Where a record stands (an eval's off a log step): compare.py --x time plots by elapsed_s."""
        return {"step": step, "phase": ph.index + 1, "seq_len": ph.seq_len, "tokens": self.state.tokens,
                "elapsed_s": self.state.train_time()}

    def end_position(self) -> dict:
        """Where the final evals' records stand: the last step, in the phase that trained it (the last
        phase gets no step when train.steps is too few for it), at the evaluation's seq_len."""
        last = phase_at(self.phases, self.t.steps - 1)
        return {"step": self.t.steps, "phase": last.index + 1, "seq_len": last.seq_len, "tokens": self.state.tokens,
                "eval_seq_len": self.eval_T}

    def step_record(self, step: int, ph, res: StepResult) -> dict:
        tps = res.tokens / res.seconds
        rec = {"step": step, "phase": ph.index + 1, "seq_len": ph.seq_len, "loss": res.loss,
               "lr": self.cfg.optim.lr * res.lr_mult, "lr_mult": res.lr_mult, "grad_norm": res.grad_norm,
               "tokens": self.state.tokens, "tokens_per_s": tps, "mfu": self.fpt * tps / self.dist.world / self.peak,
               "elapsed_s": self.state.train_time()}
        if self.teacher is not None:
            rec["ce"] = res.ce
        if self.loss_scale.enabled:
            rec["loss_scale"] = res.loss_scale
        return rec

    def evaluate(self, max_tokens: int | None, model=None) -> dict:
        """Validation loss and bpb at the eval shape; max_tokens None is the whole split."""
        nll_fn = self.nll_fn if model is None else None
        model = model or self.model
        with root_gathered(model):  # token_nll is not forward: FSDP2 would leave the root's weights sharded
            return {**evaluate(model, self.bundle.val, self.cfg, self.device, self.byte_lengths, max_tokens,
                               self.eval_T, self.eval_B, nll_fn=nll_fn), **self.task_metrics(model)}

    def task_metrics(self, model) -> dict:
        """train.eval_tasks' scores (harness.task_metrics) at the evaluation context; {} without tasks.
        Every rank scores (an FSDP forward is collective); under root_gathered, as token_nll."""
        if not self.task_items:
            return {}
        return task_metrics(model, self.tok, self.device, self.eval_T, self.task_items, dtype=self.t.precision)

    def checkpoint(self, step: int, ph, scheduled: bool = True):
        # Weights and optimizer state whole: collectives under FSDP (every rank calls them), and a
        # checkpoint any world size or parallelism resumes.
        sd, opt_sd = weights_for_save(self.model), self.opt.state_dict()
        if not self.dist.main:
            return
        s = self.state
        st = {"step": step, "phase": ph.index, "tokens": s.tokens, "optimizer": opt_sd,
              **self.batches.state_dict(), "metrics_offset": self.metrics.offset(), "bad_steps": s.bad_steps,
              "moe_stats": pending_stats(self.model),
              "train_time": s.train_time(), "wall_time": s.wall_time(), "world": self.dist.world, "wandb_id": self.metrics.wandb_id}
        if self.loss_scale.enabled:
            st["loss_scale"] = self.loss_scale.state_dict()
        self.run.save_checkpoint(step, sd, st, self.t.keep_checkpoints, scheduled)

    # ---- the end ----
    def finalize(self) -> dict:
        """Whole-split evaluation (and of the checkpoint average), then weights and summary, and only
        then the sample: a sample that fails loses nothing of the run."""
        t, train_time = self.t, self.state.train_time()
        self.model.set_windows(self.base_windows)
        final, base = self.evaluate(None), self.baselines()
        self.progress.write(f"final (whole validation split, {final['val_tokens']:,} tokens at seq_len {self.eval_T}): "
                            f"val loss {final['val_loss']:.4f}  val bpb {bpb_label(final)}"
                            + (f"  (gzip -9 {base['gzip_bpb']:.3f}, xz -9 {base['xz_bpb']:.3f})" if base else "")
                            + (f"  exact match {final['exact_match']:.3f} of {final['exact_n']}" if "exact_n" in final
                               else "") + moe_label(final) + task_label(final))
        self.metrics.log({**self.end_position(), "final": True, **final})
        avg = self.average_checkpoints(final) if t.avg_last > 1 and self.dist.main else {}
        sd = weights_for_save(self.model)  # collective under FSDP
        summary = {"arch": self.cfg.arch, "params": self.n_params, "params_active": self.n_active,
                   "flops_per_token": self.fpt, "steps": t.steps,
                   "tokens": self.state.tokens, "train_time_s": train_time, "wall_time_s": self.state.wall_time(),
                   "tokens_per_s": self.state.tokens / max(train_time, 1e-9), "optimizer": self.cfg.optim.name,
                   "phases": [{"seq_len": p.seq_len, "steps": p.steps, "tokens_per_step": p.tokens_per_step}
                              for p in self.phases], "world_size": self.dist.world, **final, **avg,
                   **self.baselines(), **data_mod.text_identity(self.bundle), "device": str(self.device),
                   "precision": self.precision}
        if self.dist.main:
            self.run.write_weights(sd, metadata={"arch": self.cfg.arch})
            self.run.write_summary(summary)
        if math.isfinite(final["val_loss"]):
            sample = generate_sample(self.model, self.tok, t.sample_prompt, t.sample_tokens, self.device,
                                     static=False if is_sharded(self.model) else None)
        else:  # sampling would fail on non-finite probabilities; the weights and summary are written
            sample = f"(no sample: the final validation loss is {final['val_loss']}; the run diverged)"
        if self.dist.main:
            self.write_sample(sample, summary)
        self.dist.close()
        return summary

    def average_checkpoints(self, final: dict) -> dict:
        dirs = scheduled_checkpoints(self.run.checkpoints())[-self.t.avg_last:]
        if len(dirs) < 2:
            return {}
        average_checkpoints(dirs, self.run.path / AVG_WEIGHTS)
        avg_model = self.run.load_weights(model_from_config(self.cfg).to(self.device), AVG_WEIGHTS)
        ev = self.evaluate(None, model=avg_model)
        avg = {"avg_of": [d.name for d in dirs], "avg_val_loss": ev["val_loss"], "avg_val_bpb": ev["val_bpb"],
               **{f"avg_{k}": v for k, v in ev.items() if k.startswith("task_")}}
        self.progress.write(f"average of {len(dirs)} checkpoints ({dirs[0].name} .. {dirs[-1].name}): val loss "
                            f"{ev['val_loss']:.4f}  val bpb {bpb_label(ev)}  (last: {final['val_loss']:.4f})")
        self.metrics.log({**self.end_position(), "final_avg": True, **avg})
        return avg

    def write_sample(self, sample: str, summary: dict):
        self.run.write_text(SAMPLE, sample)
        print("sample (temperature 0.8, top-k 50):\n" + "-" * 60 + f"\n{sample}\n" + "-" * 60)
        self.metrics.close(summary)
        print(f"run saved to {self.run.path}  ({fmt_duration(summary['wall_time_s'])} wall, "
              f"{summary['tokens_per_s']:,.0f} tok/s)")


def _wandb(cfg: RunConfig, out: Path, run_id: str | None = None):
    """The wandb run: a new one, or with `run_id` (a resumed run's checkpoint has it) that run continued."""
    if not cfg.logging.wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("logging.wandb=true needs wandb: pip install -e '.[wandb]'") from None
    # Offline mode writes under out/wandb and needs no network or login (`wandb sync` uploads later).
    return wandb.init(project=cfg.logging.wandb_project, config=cfg.to_dict(), dir=str(out), name=out.name,
                      mode=cfg.logging.wandb_mode, id=run_id, resume="allow" if run_id else None)
