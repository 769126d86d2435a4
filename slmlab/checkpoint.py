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
    model = build_model(cfg.model)  # the config picks the class (e.g. DiffusionLM)
    load_model_weights(model, run_dir / weights)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    return cfg, model.to(device).eval(), tok
