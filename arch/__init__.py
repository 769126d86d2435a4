"""Blocks and models. Importing this package registers every built-in mixer."""
from typing import Optional

from . import attention, conv, deltanet, lif, mamba2, moe  # noqa: F401  (registration side effects)
from .block import Block, ChannelMixer, Mixer
from .config import ModelConfig, ObjectiveConfig, parse_pattern
from .model import LM, sample_next
from .registry import CHANNEL_MIXERS, LETTERS, MIXERS, OPTIONS, load_imports, register, register_channel_mixer

__all__ = ["build_model", "LM", "Block", "Mixer", "ChannelMixer", "ModelConfig", "ObjectiveConfig", "parse_pattern",
           "sample_next", "MIXERS", "LETTERS", "CHANNEL_MIXERS", "OPTIONS", "register", "register_channel_mixer",
           "load_imports"]


def build_model(cfg: ModelConfig, objective: Optional[ObjectiveConfig] = None):
    """The model class for a config and objective (default: next-token prediction).

    objective.name: ar -> LM (with LIF blocks its eval also logs spike rates and an energy proxy,
    LM.extra_metrics) | mdlm -> DiffusionLM (masked diffusion, arch/diffusion.py)."""
    from .diffusion import DiffusionLM

    objective = objective or ObjectiveConfig()
    objective.validate(cfg)
    if objective.name == "mdlm":
        return DiffusionLM(cfg, objective)
    return LM(cfg)
