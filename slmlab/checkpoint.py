"""Atomic writes and safe loading. A checkpoint is untrusted input: safetensors only for weights."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError


def atomic_write(path, write_fn):
    """write_fn(tmp_path) writes the file; it is fsynced and renamed over `path`, so a kill at any
    moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def state_dict_for_save(model: torch.nn.Module) -> dict:
    """State dict with tied parameters stored once (safetensors refuses shared storage)."""
    seen, out = {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_model(model: torch.nn.Module, path, metadata: dict | None = None):
    sd = state_dict_for_save(model)
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


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
    sd = load_tensors(path)
    if model.cfg.tie_embeddings and "lm_head.weight" not in sd and "embed.weight" in sd:
        sd["lm_head.weight"] = sd["embed.weight"]
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected or wrong):
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"shape mismatch {wrong[0]} {tuple(sd[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=strict)
    return model


def load_run(run_dir, device="cpu", weights: str = "model.safetensors"):
    """(config, model in eval mode, tokenizer) from a finished run directory."""
    from arch import build_model

    from .config import load_run_config
    from .tokenizer import Tokenizer

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}")
    cfg = load_run_config(run_dir / "config.yaml")
    model = build_model(cfg.model, cfg.objective)  # the config picks the class (e.g. DiffusionLM)
    load_model_weights(model, run_dir / weights)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    return cfg, model.to(device).eval(), tok


# ---- training checkpoints: out/checkpoints/step_XXXXXX/{model.safetensors, state.pt} ----
# A checkpoint directory is built under a temporary name, every file fsynced, then renamed into
# place: a directory named step_* is always complete, so a kill mid-write leaves the previous one.

CKPT_DIR = "checkpoints"


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dirs(out) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(out, step: int, model_sd: dict, state: dict, keep: int) -> Path:
    """Write model weights (safetensors) + trainer state (torch.save of tensors and plain Python
    values, loadable with weights_only=True), then drop all but the newest `keep` checkpoints."""
    import shutil

    root = Path(out) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_file(model_sd, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        for name in ("model.safetensors", "state.pt"):
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step after a resume: swap, never leave no checkpoint
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for p in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):  # leftovers of killed writes
        shutil.rmtree(p, ignore_errors=True)
    return final


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
    return state


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
        sd = load_tensors(d / "model.safetensors")
        if avg is None:
            avg = {k: v.double() for k, v in sd.items()}
            dtypes = {k: v.dtype for k, v in sd.items()}
        else:
            for k, v in sd.items():
                avg[k] += v.double()
    out = {k: (v / len(dirs)).to(dtypes[k]) for k, v in avg.items()}
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata={"averaged": ",".join(d.name for d in dirs)}))
    return out
