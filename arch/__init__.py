"""Blocks and models. Importing this package registers every built-in mixer."""
from . import attention, conv, lif  # noqa: F401  (registration side effects)
from .config import ModelConfig, parse_pattern
from .model import LM, Block, sample_next
from .registry import (
    CHANNEL_MIXERS,
    LETTERS,
    MIXER_OPT_KEYS,
    MIXERS,
    register,
    register_channel_mixer,
)

__all__ = ["build_model", "LM", "Block", "ModelConfig", "parse_pattern", "sample_next", "MIXERS", "LETTERS",
           "CHANNEL_MIXERS", "register", "register_channel_mixer", "check_mixer_opts"]


def check_mixer_opts(cfg: ModelConfig):
    """Validate the model.mixer_opts keys the built-in blocks read (one-line ConfigError)."""
    from .diffusion import check_diffusion_opts
    from .lif import lif_options

    unknown = sorted(set(cfg.mixer_opts) - MIXER_OPT_KEYS)
    if unknown:
        import difflib

        from slmlab.errors import ConfigError

        close = difflib.get_close_matches(unknown[0], MIXER_OPT_KEYS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(MIXER_OPT_KEYS))}"
        raise ConfigError(f"unknown model.mixer_opts key {unknown[0]!r}; {hint}")
    lif_options(cfg.mixer_opts)  # checked even if no LIF block is used, so typos in values fail early
    check_diffusion_opts(cfg)


def build_model(cfg: ModelConfig):
    """The model class for a config; objectives other than next-token prediction plug in here.

    model.mixer_opts.objective: ar (default, next-token) | mdlm (masked diffusion, arch/diffusion.py).
    Models with LIF blocks log spike rates and an energy proxy at each eval (arch/lif.py)."""
    from .diffusion import DiffusionLM, objective
    from .lif import SpikingLM, uses_spikes

    check_mixer_opts(cfg)
    if objective(cfg) == "mdlm":
        return DiffusionLM(cfg)
    return SpikingLM(cfg) if uses_spikes(cfg) else LM(cfg)
