"""Check a block against the contract (arch/block.py) before training with it (docs/blocks.md):

    python -m arch.check my_blocks.py              every block the file registers
    python -m arch.check my_blocks.py shift attn   the named blocks (built-in ones too)

check_mixer(name_or_class, cfg=None) and check_channel_mixer(...) return the problems found, one
line each ([] when the block passes). On a tiny model on the CPU (tens of milliseconds) they check:
  - forward returns (y, state) with y shaped and typed like x, at T = 1, 7 and 16
  - causality (cfg.causal): changing later tokens leaves earlier outputs as they were
  - every parameter gets a finite gradient
  - decoding from init_state() token by token and in chunks of 3 equals the full forward
  - residual_out names nn.Linear layers of the block
  - forward_static (the static-state step) equals forward, in place and not
A channel mixer: returns a tensor shaped like x, each token's output depends on that token alone,
finite gradients, residual_out. Training, sampling and export all rely on these: a block that
breaks one trains without an error and learns from the future or decodes wrong tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn

from slmlab.errors import ConfigError

from .block import bad_output, build_block, fits_residual
from .config import ModelConfig
from .registry import _LOADED, CHANNEL_MIXERS, MIXERS, load_imports, module_file, where

BATCH = 2
LENGTHS = (1, 7, 16)  # one token (decode), an odd length, and one long enough to split
T = LENGTHS[-1]


def tiny_config(**kw) -> ModelConfig:
    """The default config of a check: small enough that every check takes milliseconds."""
    base = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, layers="attn")
    return ModelConfig(**{**base, **kw})


def check_mixer(name_or_class, cfg: Optional[ModelConfig] = None, window: Optional[int] = None) -> list[str]:
    """Problems of a token mixer (a registered name or a Mixer class) under `cfg` (default tiny_config())."""
    name, cls = _resolve(name_or_class, MIXERS, "token mixer")
    cfg, label = cfg or tiny_config(), f"block {name!r} ({where(cls)})"
    with torch.random.fork_rng():  # the caller's random stream stays as it was
        torch.manual_seed(0)
        try:
            mixer = build_block(f"block {name!r}", cls, cfg, 0, window=window).eval()
        except ConfigError as e:
            return [str(e)]
        problems = _mixer_outputs(mixer, name, cfg.d_model)
        if problems:  # the later checks would only repeat a wrong output
            return problems
        leaks = _causal(lambda x: mixer(x)[0], cfg.d_model) if cfg.causal else []
        if cfg.causal and window is not None and not leaks:
            leaks = _windowed(lambda x: mixer(x)[0], cfg.d_model, window)
        problems += leaks + _gradients(mixer, lambda x: mixer(x)[0], cfg.d_model)
        if cfg.causal and not leaks:  # no decode without causality (nor in a bidirectional model)
            problems += _decode(mixer, cfg.d_model)
            if mixer.static_state_names:
                problems += _static(mixer, cfg.d_model)
    return [p if p.startswith(label) else f"{label}: {p}" for p in problems]


def check_channel_mixer(name_or_class, cfg: Optional[ModelConfig] = None) -> list[str]:
    """Problems of a channel mixer (a model.mlp name or a ChannelMixer class) under `cfg`."""
    name, cls = _resolve(name_or_class, CHANNEL_MIXERS, "channel mixer")
    cfg, label = cfg or tiny_config(), f"channel mixer {name!r} ({where(cls)})"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        try:
            mlp = build_block(f"channel mixer {name!r}", cls, cfg).eval()
        except ConfigError as e:
            return [str(e)]
        with torch.no_grad():
            for n in LENGTHS:
                x = torch.randn(BATCH, n, cfg.d_model)
                y = mlp(x)
                if not fits_residual(y, x):
                    return [str(bad_output(f"channel mixer {name!r}", mlp, "forward", y, x, advice=False))]
        problems = _per_token(mlp, cfg.d_model) + _gradients(mlp, mlp, cfg.d_model)
    return [f"{label}: {p}" for p in problems]


def _resolve(name_or_class, table: dict, kind: str):
    if not isinstance(name_or_class, str):
        return getattr(name_or_class, "mixer_name", name_or_class.__name__), name_or_class
    if name_or_class not in table:
        raise ConfigError(f"no {kind} named {name_or_class!r}; registered: {', '.join(sorted(table)) or 'none'}")
    return name_or_class, table[name_or_class]


def _mixer_outputs(mixer, name: str, d: int) -> list[str]:
    """forward(x) is (y, state) with y like x at every length, and flops_per_token a number."""
    with torch.no_grad():
        for n in LENGTHS:
            x = torch.randn(BATCH, n, d)
            out = mixer(x)
            if not (isinstance(out, tuple) and len(out) == 2 and fits_residual(out[0], x)):
                return [str(bad_output(f"block {name!r}", mixer, "forward", out, x, advice=False))]
    flops = mixer.flops_per_token(T)
    if isinstance(flops, bool) or not isinstance(flops, (int, float)) or not flops >= 0:
        return [f"flops_per_token({T}) returned {flops!r}, expected a number >= 0 (0 when its parameters' "
                "matmuls are all it does)"]
    return []


def _tolerance(y: torch.Tensor) -> float:
    return 1e-5 * max(1.0, y.abs().max().item())


def _moved(fn: Callable, d: int, change: slice) -> tuple[torch.Tensor, float]:
    """(per position, the largest change of fn's output when the tokens at `change` of a random
    input are redrawn; the tolerance below which a change is rounding)."""
    with torch.no_grad():
        x = torch.randn(BATCH, T, d)
        other = x.clone()
        other[:, change] = torch.randn_like(other[:, change])
        y = fn(x)
        diff = (y - fn(other)).abs().amax(dim=(0, 2))
    return diff, _tolerance(y)


def _first_over(diff: torch.Tensor, tol: float, start: int = 0) -> Optional[int]:
    """The first position from `start` on whose change exceeds the tolerance, or None."""
    moved = (diff[start:] > tol).nonzero().flatten().tolist()
    return start + moved[0] if moved else None


def _windowed(fn: Callable, d: int, window: int) -> list[str]:
    """With a causal window w, position p reads tokens p-w+1..p: changing tokens 0..3 must leave
    every output from position 3 + w on as it was (a block that ignores its window reads them all)."""
    k = 4
    diff, tol = _moved(fn, d, slice(0, k))
    p = _first_over(diff, tol, start=k - 1 + window)
    if p is None:
        return []
    return [f"ignores its window: with window={window}, changing tokens 0..{k - 1} changed the output at position "
            f"{p} (by {diff[p].item():.1e}), which sees only tokens {p - window + 1}..{p}"]


def _causal(fn: Callable, d: int) -> list[str]:
    """Outputs before position T/2 must not move when the tokens from T/2 on change."""
    half = T // 2
    diff, tol = _moved(fn, d, slice(half, T))
    p = _first_over(diff[:half], tol)
    if p is None:
        return []
    return [f"not causal: changing tokens {half}..{T - 1} changed the output at position {p} (by "
            f"{diff[p].item():.1e}), so training would learn from the future; with cfg.causal true, "
            "position t may only read tokens <= t"]


def _per_token(fn: Callable, d: int) -> list[str]:
    """A channel mixer maps each token alone: changing one token changes only its own output."""
    diff, tol = _moved(fn, d, slice(5, 6))
    diff[5] = 0
    p = _first_over(diff, tol)
    if p is None:
        return []
    return [f"changing token 5 changed the output at position {p}: a channel mixer must act on each "
            "token alone (mixing across tokens is a token mixer's job: @register)"]


def _gradients(module: nn.Module, fn: Callable, d: int) -> list[str]:
    """A parameter without a gradient never trains; a non-finite one wrecks the step."""
    module.zero_grad(set_to_none=True)
    x = torch.randn(BATCH, T, d)
    fn(x).float().square().sum().backward()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None]
    bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
    module.zero_grad(set_to_none=True)
    out = []
    if missing:
        out.append(f"no gradient reaches {', '.join(missing)}: unused in forward? (use it, or drop it or set "
                   "requires_grad=False)")
    if bad:
        out.append(f"non-finite gradient in {', '.join(bad)}")
    return out


def _decode(mixer, d: int) -> list[str]:
    """Decoding from init_state() in steps of 1 and of 3 tokens equals the full forward (LM.generate)."""
    with torch.no_grad():
        x = torch.randn(BATCH, T, d)
        full = mixer(x)[0]
        for chunk in (1, 3):
            state, ys, stale = mixer.init_state(BATCH, x.device, x.dtype), [], False
            for s in range(0, T, chunk):
                y, new = mixer(x[:, s:s + chunk], state)
                if state is not None and new is None:
                    return ["forward(x, state) returned state None: return the state after x (None is "
                            "'a fresh sequence', so the next token would forget everything before it)"]
                stale, state = stale or new is state, new
                ys.append(y)
            err = (torch.cat(ys, 1) - full).abs().max().item()
            if err > _tolerance(full):
                return [f"decoding from init_state() in steps of {chunk} differs from the full forward by "
                        f"{err:.1e}{_decode_hint(mixer, stale)}"]
    return []


def _decode_hint(mixer, stale: bool) -> str:
    if mixer.init_state(BATCH) is None:
        return (" (init_state() returns None, which means 'a fresh sequence' at every step: return the state "
                "before the first token, e.g. zeros, and forward(x, state) the state after x)")
    if stale:
        return " (forward(x, state) returned the state it was given: return the state after x)"
    return ""


def _static(mixer, d: int) -> list[str]:
    """forward_static (generate's fast decode and the exported decode graph) equals forward:
    in place with a 7-token prefill then one token a step, and not in place over the whole sequence."""
    names = mixer.static_state_names
    with torch.no_grad():
        x = torch.randn(BATCH, T, d)
        full = mixer(x)[0]
        state = mixer.static_state(BATCH, T, x.device, x.dtype)
        if not isinstance(state, (list, tuple)) or len(state) != len(names):
            return [f"static_state() returned {type(state).__name__} of {len(state) if hasattr(state, '__len__') else '?'}"
                    f" items, expected a list of {len(names)} tensors (static_state_names {names})"]
        pos = torch.arange(T)
        ys, st = [], list(state)
        for s, e in [(0, 7)] + [(t, t + 1) for t in range(7, T)]:
            y, st = mixer.forward_static(x[:, s:e], pos[s:e], st, True)
            ys.append(y)
        runs = {"inplace=True (prefill 7, then 1 token a step)": torch.cat(ys, 1),
                "inplace=False (the whole sequence)":
                    mixer.forward_static(x, pos, mixer.static_state(BATCH, T, x.device, x.dtype), False)[0]}
    tol = _tolerance(full)
    return [f"forward_static {how} differs from forward by {(y - full).abs().max().item():.1e}"
            for how, y in runs.items() if y.shape != full.shape or (y - full).abs().max().item() > tol]


def check_mixer_windows(name: str, cfg: Optional[ModelConfig] = None) -> list[str]:
    """check_mixer, and for a block that takes a sliding window (Mixer.takes_window) once more with
    a window of 3, shorter than the checked sequences: its decode must honour the window too."""
    problems = check_mixer(name, cfg)
    if not problems and MIXERS[name].takes_window:
        problems = [f"with window=3: {p}" for p in check_mixer(name, cfg, window=3)]
    return problems


def check_named(name: str, cfg: Optional[ModelConfig] = None) -> list[str]:
    """Problems of every block under `name`: a token mixer, a channel mixer, or both (lif)."""
    if name not in MIXERS and name not in CHANNEL_MIXERS:
        known = sorted({*MIXERS, *CHANNEL_MIXERS})
        raise ConfigError(f"no block named {name!r}; registered: {', '.join(known)}")
    problems = check_mixer_windows(name, cfg) if name in MIXERS else []
    if name in CHANNEL_MIXERS:
        problems += check_channel_mixer(name, cfg)
    return problems


_CHECKED: set = set()  # classes already checked in this process (an ablation builds many configs)


def check_imported(cfg: ModelConfig):
    """The run's blocks that came from model.imports pass check_mixer / check_channel_mixer, or a
    one-line ConfigError: a non-causal or mis-decoding block would otherwise train and sample
    silently wrong. Checked at the run's own widths (a block may need them: head sizes, multiples
    of 64), one layer and a tiny vocabulary: milliseconds at the default width (~5 ms for a token
    shift, ~25 ms for attention at d_model 32 on one CPU thread), once per class and process."""
    imported = set(_LOADED.values())
    small = dataclasses.replace(cfg, n_layers=1, vocab_size=64, layers="attn", loss_chunk=0, grad_checkpoint=False,
                                kernels="torch")
    todo = [(n, MIXERS[n], check_mixer_windows) for n in dict.fromkeys(cfg.layer_types())]
    if cfg.mlp in CHANNEL_MIXERS:
        todo.append((cfg.mlp, CHANNEL_MIXERS[cfg.mlp], check_channel_mixer))
    for name, cls, check in todo:
        if cls.__module__ not in imported or cls in _CHECKED:
            continue
        problems = check(name, small)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"{problems[0]}{more}; python -m arch.check {module_file(cls) or cls.__module__} lists "
                              "every problem")
        _CHECKED.add(cls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m arch.check", description=__doc__.split("\n\n")[0])
    ap.add_argument("file", help="a .py file or module that registers blocks (what train.py --import takes)")
    ap.add_argument("names", nargs="*", help="blocks to check (default: every block the file registers)")
    args = ap.parse_args(argv)
    module = _LOADED[load_imports([args.file])[0]]
    names = args.names or [n for n, cls in {**MIXERS, **CHANNEL_MIXERS}.items() if cls.__module__ == module]
    if not names:
        raise ConfigError(f"{args.file} registers no blocks; name the blocks to check after the file")
    failed = 0
    for name in names:
        problems = check_named(name)
        failed += bool(problems)
        print("\n".join(problems) if problems else f"{name}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    from slmlab.cli import run_cli

    sys.exit(run_cli(main))
