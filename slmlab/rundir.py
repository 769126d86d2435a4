"""A run directory, opened, validated and written in one place.

    config.yaml            the fully resolved RunConfig
    tokenizer.json         the HF-compatible tokenizer the run was trained with
    model.safetensors      final weights (the tied head stored once); a train.lora run: its adapters only
    chat_template.jinja    an SFT run's chat template (ChatML or the tokenizer's own), for sampling and exports
    lora_base.json         a train.lora run's base: its model.safetensors' size, mtime and sha256
    imports.json           the sha256 of each model.imports file (a researcher's blocks) when the run was written
    model_avg.safetensors  average of the last train.avg_last checkpoints (when > 1)
    tokenizer_config.json  a foreign tokenizer's special-token names (slmlab/tokenizer.py SIDECAR)
    metrics.jsonl          one JSON object per log/eval step
    summary.json, sample.txt
    checkpoints/step_XXXXXX/{model.safetensors, state.pt, sha256.json}   the last train.keep_checkpoints
    wandb/                 wandb's files, with logging.wandb
    .lock                  while a process trains into the directory (RunLock)

Every file is written through checkpoint.publish, so a kill leaves the old file or the new one.
Everything read from here is untrusted: weights are safetensors, trainer state is loaded with
torch.load(weights_only=True), and a missing or torn file is a one-line error naming it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .errors import CheckpointError, ConfigError, RunDirError
from .tokenizer import SIDECAR

CONFIG, TOKENIZER, WEIGHTS, AVG_WEIGHTS = "config.yaml", "tokenizer.json", "model.safetensors", "model_avg.safetensors"
METRICS, SUMMARY, SAMPLE = "metrics.jsonl", "summary.json", "sample.txt"
CHAT_TEMPLATE = "chat_template.jinja"
LORA_BASE = "lora_base.json"  # a LoRA run's fingerprint of its base's weights, taken when the run began
IMPORTS = "imports.json"  # the sha256 of each model.imports file, taken when the config was written
WANDB_DIR = "wandb"
LOCK = ".lock"  # RunLock's: not an output (--force keeps it), and no sign that a directory holds anything
FINISHED = (CONFIG, TOKENIZER, WEIGHTS)
# Every file slmlab writes into a run directory (besides checkpoints/ and WANDB_DIR): what --force removes.
OUTPUTS = (CONFIG, TOKENIZER, SIDECAR, WEIGHTS, AVG_WEIGHTS, METRICS, SUMMARY, SAMPLE, CHAT_TEMPLATE, LORA_BASE, IMPORTS)


def read_metrics(path, valid=None) -> tuple[list[dict], list[int]]:
    """A metrics.jsonl's records, and the numbers (from 1) of the lines that read as none. A kill
    cuts the line being written, and a resume from a file cut shorter than its checkpoint keeps that
    line mid-file (trainer.open_metrics), so such lines are skipped; each reader says whether the
    ones it got matter. Records are not checked further, but by `valid` (a reader's check of the keys
    it needs): a record it refuses counts as a line that reads as none."""
    records, bad = [], []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict) and (valid is None or valid(rec)):
            records.append(rec)
        elif line.strip():
            bad.append(i)
    return records, bad


def split_evals(records: list[dict]) -> tuple[list[dict], dict | None]:
    """The periodic evals and the final one (marked `final`). They measure different token sets
    (the first train.eval_tokens of the validation split; the whole split), so a plot must not join
    them by a line nor a table rank one against the other."""
    periodic = [r for r in records if "val_bpb" in r and not r.get("final")]
    final = next((r for r in reversed(records) if "val_bpb" in r and r.get("final")), None)
    return periodic, final


def model_from_config(cfg):
    """The model a RunConfig describes, untrained (the config picks the class, e.g. DiffusionLM)."""
    from arch import build_model

    return build_model(cfg.model, cfg.objective)


class RunDir:
    def __init__(self, path, label: str = ""):
        self.path = Path(path).expanduser()
        self.label = label  # how errors name the run, e.g. "train.teacher=" -> "train.teacher=runs/x"
        self._cfg = None

    def __repr__(self):
        return f"RunDir({str(self.path)!r})"

    # ---- opening ----
    @classmethod
    def open(cls, path, need=FINISHED, label: str = "") -> RunDir:
        """An existing run directory holding every file in `need`; RunDirError naming what is
        missing otherwise (a run without weights "holds no run" yet; with them it is "finished")."""
        run = cls(path, label)
        what = "is not a finished run" if WEIGHTS in need else "holds no run"
        if not run.path.is_dir():
            why = "a file, not a run directory" if run.path.exists() else "no such directory"
            raise RunDirError(f"{run.name} {what} ({why})")
        for f in need:
            if not (run.path / f).is_file():
                raise RunDirError(f"{run.name} {what} (no {f})")
        return run

    @property
    def name(self) -> str:
        return f"{self.label}{self.path}"

    def config(self):
        if self._cfg is None:
            from .config import load_run_config

            self._cfg = load_run_config(self.path / CONFIG)
            self.check_imports()
        return self._cfg

    def check_imports(self):
        """A note on stderr for each block file of model.imports that changed since the run was
        written: the weights still load, but the blocks may now compute something else than what was
        trained (a warning, not an error: fixing a typo in a block file is common and harmless)."""
        import sys

        try:
            want = json.loads((self.path / IMPORTS).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            print(f"note: {self.path / IMPORTS} is unreadable ({type(e).__name__}): imported block files not checked",
                  file=sys.stderr)
            return
        for file, sha in want.items():
            if Path(file).is_file() and ckpt.sha256(file) != sha:
                print(f"note: {file} changed since {self.path} was written (sha256 differs): its blocks may "
                      "compute something else than the ones trained", file=sys.stderr)

    def tokenizer(self):
        from .tokenizer import Tokenizer

        return Tokenizer.load(self.path / TOKENIZER)

    def load_weights(self, model, weights: str = WEIGHTS):
        """`model` with this run's weights. A train.lora run's file holds adapters only: its base
        (train.init_from) is loaded first, the adapters on top, and then merged into a plain LM."""
        lora = self.config().train.lora
        if not lora.r or weights != WEIGHTS:
            return ckpt.load_model_weights(model, self.path / weights)
        from .init_from import grow_vocab
        from .lora import added_rows_in, apply_lora, merge_lora

        base = self.lora_base()
        if base.config().model.vocab_size < model.cfg.vocab_size:  # data.added_tokens grew the vocabulary
            grow_vocab(model, base)
        else:
            base.load_weights(model)
        # The file says where the trained rows of data.added_tokens start (a padded base's tokenizer
        # ends below its model.vocab_size).
        n_old = model.cfg.vocab_size - added_rows_in(ckpt.load_tensors(self.path / weights))
        ckpt.load_model_weights(apply_lora(model, lora, n_old), self.path / weights)
        return merge_lora(model)

    def lora_base(self) -> RunDir:
        """A LoRA run's base (train.init_from), refused if it is this run or built on it (a cycle)
        or if its weights changed since this run began (its LORA_BASE fingerprint)."""
        chain, run, base = [self.path.resolve()], self, None
        while run.config().train.lora.r:
            path = Path(run.config().train.init_from).expanduser().resolve()
            if path in chain:
                what = (f"its LoRA base train.init_from={path} is the run itself" if len(chain) == 1 else
                        f"its LoRA bases form a cycle ({' -> '.join(map(str, [*chain, path]))})")
                raise CheckpointError(f"{self.path}: {what}, so there are no base weights under the adapters; "
                                      "retrain them on a base in another directory")
            run = RunDir.open(path, label=f"{run.path}: base train.init_from=")
            base = base or run
            chain.append(path)
        self.check_lora_base(base)
        return base

    def check_lora_base(self, base: RunDir):
        """Refuse a base whose weights file differs from the one this run was trained on: a size and
        mtime equal to the fingerprint's are trusted (a stat); otherwise the sha256 decides. Runs
        from before fingerprints have none and are trusted."""
        path = self.path / LORA_BASE
        if not path.is_file():
            return
        try:
            want = json.loads(path.read_text(encoding="utf-8"))
            size, mtime, sha = want["size"], want["mtime_ns"], want["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is corrupt ({type(e).__name__}): the base's fingerprint is unreadable") \
                from None
        st = (base.path / WEIGHTS).stat()
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            return
        if st.st_size != size or ckpt.sha256(base.path / WEIGHTS) != sha:
            raise CheckpointError(f"the base {base.path} changed since this LoRA run ({self.path}) was trained (its "
                                  f"{WEIGHTS} differs): restore that base, or retrain the adapters on the new one")

    def summary(self) -> dict | None:
        """The parsed summary.json; None while the run has not finished (it is written last, whole)."""
        path = self.path / SUMMARY
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError:  # not JSON or not UTF-8: publish writes it whole, so it was damaged since
            summary = None
        if not isinstance(summary, dict):
            raise RunDirError(f"{path} is damaged (not a JSON object): move it aside to see the run as unfinished, "
                              f"from its {METRICS}")
        return summary

    def chat_template(self) -> str | None:
        path = self.path / CHAT_TEMPLATE
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def load(self, device="cpu", weights: str = WEIGHTS):
        """(RunConfig, model in eval mode on `device`, Tokenizer), refusing a tokenizer with ids past the
        model's vocabulary (every user encodes text or decodes ids with it). A run trained with kernels this
        device cannot run (model.kernels=triton on a CPU, say) loads with model.kernels=auto, which
        computes the same function, and says so on stderr."""
        import sys

        from kernels import unavailable

        cfg = self.config()
        why = unavailable(cfg.model.kernels, torch.device(device).type)
        if why:
            print(f"note: {self.path}: {why}; loading with model.kernels=auto (the same function)", file=sys.stderr)
            cfg.model.kernels = "auto"
        model = self.load_weights(model_from_config(cfg), weights)
        bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())),
                   None)
        if bad is not None:  # it would score NaN, greedy-decode token 0 and fail to sample, with no word why
            raise CheckpointError(f"{self.path / weights} holds non-finite weights (NaN or inf), first in {bad}: the "
                                  "run diverged or the file was altered; use an earlier checkpoint's weights")
        tok = self.tokenizer()
        if tok.vocab_size > cfg.model.vocab_size:  # text it encodes would index past the embedding
            raise ConfigError(f"{self.name}: the tokenizer has {tok.vocab_size} ids but the model only "
                              f"{cfg.model.vocab_size} (tokenizer.json replaced?)")
        return cfg, model.to(device).eval(), tok

    def check_same_tokenizer(self, tok, why: str = ""):
        """ConfigError unless `tok` is the tokenizer this run was trained with (token ids only mean
        the same thing under the same tokenizer: for weights, logits and data positions)."""
        path = self.path / TOKENIZER
        if path.is_file() and path.read_text(encoding="utf-8") != tok.to_json():
            raise ConfigError(f"{self.name} uses a different tokenizer than this run's data"
                              + (f"; {why}" if why else ""))

    # ---- checkpoints ----
    def checkpoints(self) -> list[Path]:
        return ckpt.checkpoint_dirs(self.path)

    def latest_checkpoint(self) -> Path:
        return ckpt.latest_checkpoint(self.path)

    def save_checkpoint(self, step: int, model_sd: dict, state: dict, keep: int, scheduled: bool = True) -> Path:
        return ckpt.save_checkpoint(self.path, step, model_sd, state, keep, scheduled)

    def load_checkpoint(self, path: Path, model) -> dict:
        """Load a checkpoint's weights into `model`; return its trainer state. The checksums are checked
        last: a torn file gets the error that says so, a whole one with a flipped bit this one."""
        state = ckpt.load_state(path / "state.pt")
        ckpt.load_model_weights(model, path / WEIGHTS)
        ckpt.verify_checkpoint(path)
        return state

    # ---- writing ----
    @classmethod
    def create(cls, path, force: bool = False) -> RunDir:
        """A run directory to train into: refused if it holds a run and not `force`; with `force`,
        the previous run's outputs are removed."""
        run = cls.check_new(path, force)
        if run.path.exists():  # only what slmlab writes goes; a user's own files in the directory stay
            for name in OUTPUTS:
                (run.path / name).unlink(missing_ok=True)
            for d in ckpt.checkpoint_dirs(run.path):
                ckpt.discard(d)
            if (run.path / WANDB_DIR).is_dir():  # else the new run's wandb/latest-run sits among the old runs
                shutil.rmtree(run.path / WANDB_DIR)
        run.path.mkdir(parents=True, exist_ok=True)
        return run

    @classmethod
    def check_new(cls, path, force: bool = False) -> RunDir:
        """Raise before anything is written if `path` holds a run and `force` was not given."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise ConfigError(f"--out {run.path} is a file, not a directory")
        if force or not run.path.exists():
            return run
        if any((run.path / f).exists() for f in (CONFIG, WEIGHTS)):
            raise ConfigError(f"--out {run.path} already holds a run; pass --force to overwrite it "
                              "or --resume to continue it")
        if any(p.name != LOCK for p in run.path.iterdir()):
            raise ConfigError(f"--out {run.path} is not empty and holds no slmlab run; pick an empty or new "
                              "directory, or pass --force (which replaces only the files slmlab writes)")
        return run

    def write_config(self, cfg):
        with ckpt.publish(self.path / CONFIG) as tmp:
            cfg.save(tmp)
        files = {f: ckpt.sha256(f) for f in cfg.model.imports if Path(f).is_file()}  # modules are not hashed
        if files:
            self.write_text(IMPORTS, json.dumps(files, indent=1))

    def write_tokenizer(self, tok):
        tok.save(self.path / TOKENIZER)

    def write_weights(self, sd: dict, metadata: dict | None = None, name: str = WEIGHTS):
        ckpt.save_weights(sd, self.path / name, metadata)

    def write_lora_base(self, base):
        """Fingerprint the base's weights file (LORA_BASE): loading the run later refuses a base that
        was retrained in place, which would otherwise change this run's outputs silently."""
        weights = Path(base) / WEIGHTS
        st = weights.stat()
        fp = {"base": str(base), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": ckpt.sha256(weights)}
        self.write_text(LORA_BASE, json.dumps(fp, indent=2))

    def write_text(self, name: str, text: str):
        with ckpt.publish(self.path / name) as tmp:
            tmp.write_text(text, encoding="utf-8")

    def write_summary(self, summary: dict):
        self.write_text(SUMMARY, json.dumps(summary, indent=2))


class RunLock:
    """RUN/.lock, held (flock) while this process trains into RUN: a second trainer there (--resume given
    twice, a requeued job beside the one still running, --force over a run still training) stops with one
    line before it reads or writes anything, instead of both writing checkpoints and metrics.jsonl. The
    kernel drops the lock however the holder ends (a kill leaves a stale, unlocked file); a clean end
    removes the file, and the directory too when it was made only to hold the lock (a bad --data, say).
    ablate.py holds its OUT the same way (`doing`, `then`: what the holder does and what to do after)."""

    def __init__(self, path, enabled: bool = True, doing: str = "training into it", then: str = "then --resume"):
        self.path, self.enabled, self.file, self.made = Path(path), enabled, None, False
        self.doing, self.then = doing, then

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return self
        if not self.enabled or (self.path.exists() and not self.path.is_dir()):  # a file: check_new says so
            return self
        lock = self.path / LOCK
        try:
            self.made = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError:  # unwritable: the trainer's own first write names the problem
            return self
        while True:
            f = open(lock, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                holder = f.read().strip() or "its pid unknown"
                f.close()
                if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise ConfigError(f"{self.path} is in use: another process is {self.doing} ({holder}); "
                                      f"wait for it to end or stop it, {self.then}") from None
                print(f"note: {self.path} cannot be locked here ({e.strerror}): nothing stops a second trainer "
                      "from writing into it at the same time", file=sys.stderr)
                return self
            try:  # the holder may have ended and removed the file between our open and our flock
                if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        if self.file is None:
            return
        (self.path / LOCK).unlink(missing_ok=True)  # before the unlock: a waiter then finds no file of ours
        self.file.close()
        self.file = None
        if self.made and not any(self.path.iterdir()):
            self.path.rmdir()
