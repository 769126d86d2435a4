"""Atomic writes and safe loading. A checkpoint is untrusted input: safetensors for weights,
torch.load(weights_only=True) for trainer state."""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .lora import ADDED_ROWS_MARK, saved_part
from .precision import loss_scale_problem
from .runtime import on_main, rng_state_problem

# ---- atomic publish: the one way anything in a run, cache or export directory gets written ----
# What is published is built under a private temporary sibling (".tmp-<name>-<pid>-<rand>/<name>"),
# fsynced, then renamed onto its final name, so a kill at any moment leaves the old version or the
# new one, never a torn one. The pid in the name lets a later writer tell a dead writer's leftovers
# from a live concurrent one (see remove_stale).


def _fsync_tree(path: Path):
    paths = [path] if path.is_file() else [*path.rglob("*"), path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def publish(path, keep_existing: bool = False):
    """Yield a temporary path to write `path`'s new content at (a file or a directory); when the
    block returns, fsync it and rename it onto `path`. If the block raises, nothing is published
    and the temporary is removed. An existing `path` is replaced only after the new one is
    complete, or, with keep_existing, kept (a concurrent writer that finished first wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_root.mkdir()
    staged = tmp_root / path.name
    try:
        yield staged
        if not staged.exists():
            raise RuntimeError(f"nothing was written at {staged}")
        _fsync_tree(staged)
        if keep_existing and path.exists():
            return
        if path.is_dir() and not path.is_symlink():  # rename cannot overwrite a directory: swap
            os.replace(path, tmp_root / ".old")
        try:
            os.replace(staged, path)
        except OSError:
            if not (keep_existing and path.exists()):
                raise
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def discard(path: Path):
    """Delete a published directory without ever leaving it half-deleted under its own name: it is
    renamed to a temporary first (one atomic step), so a kill mid-delete leaves only a temporary
    that remove_stale clears. (Deleting in place once left a step_* without state.pt.)"""
    trash = path.parent / f".tmp-{path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale(parent, name_glob: str = "*"):
    """Remove temporaries of publish() under `parent` whose writer process is gone."""
    for p in Path(parent).glob(f".tmp-{name_glob}"):
        try:
            pid = int(p.name.rsplit("-", 2)[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- tied weights: with tie_embeddings the head *is* the embedding; files store it once ----
TIED_HEAD, TIED_TO = "lm_head.weight", "embed.weight"
# A LoRA run's added-token rows (lora.AddedRows) under a tied head: one tensor under two names.
TIED_PAIRS = ((TIED_HEAD, TIED_TO), ("lm_head.parametrizations.weight.0" + ADDED_ROWS_MARK,
                                     "embed.parametrizations.weight.0" + ADDED_ROWS_MARK))


def tie_head(sd: dict, tie: bool, stored: bool) -> dict:
    """`sd` as files hold it (stored=True: the tied head dropped, since safetensors refuses shared
    storage) or as the model wants it (stored=False: the head restored from the embedding)."""
    for head, to in TIED_PAIRS:
        if tie and stored:
            sd.pop(head, None)
        elif tie and head not in sd and to in sd:
            sd[head] = sd[to]
    return sd


def weights_for_save(model: torch.nn.Module) -> dict:
    """CPU state dict ready for safetensors, on rank 0 ({} on the other ranks, which write nothing); under
    FSDP2 every rank must call this (it gathers the shards to rank 0: on_main)."""
    sd = {k: on_main(v) for k, v in model.state_dict().items()}
    if any(v is None for v in sd.values()):
        return {}
    return tie_head(saved_part(sd), model.cfg.tie_embeddings, stored=True)


def save_weights(sd: dict, path, metadata: dict | None = None):
    with publish(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)


def save_model(model: torch.nn.Module, path, metadata: dict | None = None):
    save_weights(weights_for_save(model), path, metadata)


def sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({msg})") from None


def load_model_weights(model: torch.nn.Module, path, strict: bool = True):
    """Load `path` into `model`; a model with LoRA adapters takes an adapter-only file (its base
    weights are already loaded)."""
    sd = tie_head(load_tensors(path), model.cfg.tie_embeddings, stored=False)
    own = saved_part(model.state_dict())
    if strict:
        check_fits(sd, own, f"checkpoint {path}")
    model.load_state_dict(sd, strict=strict and len(own) == len(model.state_dict()))
    return model


def check_fits(sd: dict, own: dict, what: str):
    """One CheckpointError line when state dict `sd` does not fit a model's `own`: the tensors it lacks,
    those the model has no place for, the first shape that differs."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    parts = []
    if missing:
        parts.append(f"missing {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"unexpected {', '.join(unexpected[:3])}")
    if wrong:
        parts.append(f"shape mismatch {wrong[0]} {tuple(sd[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
    if parts:
        raise CheckpointError(f"{what} does not fit the model: {'; '.join(parts)}")


# ---- training checkpoints: out/checkpoints/step_XXXXXX/{model.safetensors, state.pt} ----
# Each checkpoint directory is published whole (see publish): a directory named step_* is always
# complete, so a kill mid-write leaves the previous one.

CKPT_DIR = "checkpoints"
# {file name: sha256} of a checkpoint's files, written with them: a flipped bit inside a tensor or the
# optimizer state loads without complaint from safetensors and torch.load, and a resume would carry it
# on. Hashing costs ~0.9 s a GB here (page-cached, once a save and once a load), small beside the write.
CHECKSUMS = "sha256.json"
# In a checkpoint written off the train.ckpt_every schedule (a stop signal's): resume may start from it,
# but it neither counts toward train.keep_checkpoints nor enters train.avg_last's average, and the next
# scheduled checkpoint drops it, so a stopped-and-resumed run keeps and averages what an uninterrupted one does.
UNSCHEDULED = "unscheduled"


def scheduled_checkpoints(dirs: list[Path]) -> list[Path]:
    """Those of `dirs` the train.ckpt_every schedule wrote (not a stop signal's)."""
    return [d for d in dirs if not (d / UNSCHEDULED).exists()]


def checkpoint_step(path: Path) -> int:
    return int(path.name[5:])  # step_XXXXXX


def checkpoint_dirs(out) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((checkpoint_step(p), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(out, step: int, model_sd: dict, state: dict, keep: int, scheduled: bool = True) -> Path:
    """Write model weights (safetensors) + trainer state (torch.save of tensors and plain Python
    values, loadable with weights_only=True), then drop all but the newest `keep` scheduled
    checkpoints, and the unscheduled ones (UNSCHEDULED) older than the newest scheduled one."""
    root = Path(out) / CKPT_DIR
    final = root / f"step_{step:06d}"
    # Re-saving a step after a resume replaces it only once the new one is complete.
    with publish(final) as tmp:
        tmp.mkdir()
        save_file(model_sd, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        sums = {name: sha256(tmp / name) for name in ("model.safetensors", "state.pt")}
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1) + "\n")
        if not scheduled:
            (tmp / UNSCHEDULED).touch()
    dirs = checkpoint_dirs(out)
    sched = scheduled_checkpoints(dirs)
    newest = checkpoint_step(sched[-1]) if sched else -1
    for p in dirs:
        if (p in sched and p not in sched[-keep:]) or (p not in sched and checkpoint_step(p) < newest):
            discard(p)
    remove_stale(root, "step_*")  # leftovers of killed writes
    return final


def verify_checkpoint(d: Path):
    """CheckpointError if a file of checkpoint `d` differs from the sha256 recorded when it was written
    (checkpoints written before slmlab recorded them have no CHECKSUMS and are not checked)."""
    path = Path(d) / CHECKSUMS
    if not path.is_file():
        return
    try:
        want = json.loads(path.read_text(encoding="utf-8"))
        items = [(str(k), str(v)) for k, v in want.items()]
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {d}: {CHECKSUMS} is unreadable ({str(e).splitlines()[0][:120]})") from None
    for name, digest in items:
        f = Path(d) / name
        if f.is_file() and sha256(f) != digest:
            raise CheckpointError(f"checkpoint {d} is corrupt: {name} differs from the sha256 recorded when it was "
                                  f"written (a disk or copy error?); move {d.name} out of {Path(d).parent} to "
                                  "resume from the checkpoint before it")


def load_state(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a torn/corrupt pickle raises many types; all mean the same to the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({msg[:200]})") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {path} is not a slmlab trainer state")
    for key, types in STATE_SCHEMA.items():  # checked before anything is restored or rewritten
        if key not in state:
            raise CheckpointError(f"checkpoint {path} lacks {key!r}: not a complete slmlab trainer state")
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise CheckpointError(f"checkpoint {path}: {key!r} is a {type(state[key]).__name__}, "
                                  f"expected {' or '.join(t.__name__ for t in types)}")
    problem = counter_problem(state, path) or stream_problem(state) or rng_state_problem(state["rng"])
    if problem:
        raise CheckpointError(f"checkpoint {path}: {problem}")
    return state


# What Trainer.checkpoint writes into state.pt and resume reads back.
STATE_SCHEMA = {"step": (int,), "phase": (int,), "tokens": (int,), "optimizer": (dict,), "rng": (dict,),
                "metrics_offset": (int,), "bad_steps": (int,), "train_time": (int, float)}


def counter_problem(state: dict, path: Path) -> str | None:
    """A counter no run writes: negative, non-finite, or a step other than its directory's (a resume
    would train from that step with the weights of another)."""
    for key in ("step", "phase", "tokens", "metrics_offset", "bad_steps", "train_time"):
        if not (math.isfinite(state[key]) and state[key] >= 0):
            return f"{key!r} is {state[key]}, expected a number >= 0"
    if "rng_phase" in state and not (type(state["rng_phase"]) is int and state["rng_phase"] >= 0):
        return f"'rng_phase' is {state['rng_phase']!r}, expected a phase index >= 0"
    wall = state.get("wall_time", 0.0)  # absent in checkpoints written before it was saved
    if not (type(wall) in (int, float) and math.isfinite(wall) and wall >= 0):
        return f"'wall_time' is {wall!r}, expected a number >= 0"
    name = path.parent.name
    if name.startswith("step_") and name[5:].isdigit() and int(name[5:]) != state["step"]:
        return f"'step' is {state['step']}, but the checkpoint is {name}"
    if not isinstance(state.get("wandb_id"), (str, type(None))):
        return f"'wandb_id' is a {type(state['wandb_id']).__name__}, expected str or None"
    if "loss_scale" in state:  # absent in checkpoints written before fp16 training
        return loss_scale_problem(state["loss_scale"])
    return None


def stream_problem(state: dict) -> str | None:
    """Quality-stream cursors (optional: a run without such phases saves none) as BatchSource reads them."""
    streams, keys = state.get("streams", {}), state.get("stream_keys", {})
    if not isinstance(streams, dict) or not isinstance(keys, dict):
        return "'streams' and 'stream_keys' must be dicts"
    for k, cursor in streams.items():
        if not (isinstance(k, str) and k.isdigit()) or isinstance(cursor, bool) or not isinstance(cursor, int) \
                or cursor < 0:
            return f"'streams' entry {k!r}: {cursor!r} is not a phase index -> document position >= 0"
    for k, key in keys.items():
        if not isinstance(key, (list, tuple)) or len(key) != 3:
            return f"'stream_keys' entry {k!r}: {key!r} is not (data, top_frac, quality_score)"
    return None


def latest_checkpoint(out) -> Path:
    dirs = checkpoint_dirs(out)
    if not dirs:
        raise CheckpointError(f"--resume: no checkpoint in {Path(out) / CKPT_DIR} "
                              "(checkpoints are written every train.ckpt_every steps)")
    return dirs[-1]


def average_checkpoints(dirs: list[Path], path) -> dict:
    """Uniform average of the model weights of `dirs`, written atomically to `path`."""
    avg, dtypes = None, {}
    for d in dirs:
        verify_checkpoint(d)
        sd = load_tensors(d / "model.safetensors")
        if avg is None:
            avg = {k: v.double() for k, v in sd.items()}
            dtypes = {k: v.dtype for k, v in sd.items()}
        else:
            for k, v in sd.items():
                avg[k] += v.double()
    out = {k: (v / len(dirs)).to(dtypes[k]) for k, v in avg.items()}
    save_weights(out, path, metadata={"averaged": ",".join(d.name for d in dirs)})
    return out
