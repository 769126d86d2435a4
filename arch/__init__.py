"""Blocks and models. Importing this package registers every built-in mixer."""
from . import attention, conv  # noqa: F401  (registration side effects)
from .config import ModelConfig, parse_pattern
from .model import LM, Block, sample_next
from .registry import CHANNEL_MIXERS, LETTERS, MIXERS, register, register_channel_mixer

__all__ = ["build_model", "LM", "Block", "ModelConfig", "parse_pattern", "sample_next", "MIXERS", "LETTERS",
           "CHANNEL_MIXERS", "register", "register_channel_mixer"]


def build_model(cfg: ModelConfig):
    """The model class for a config; objectives other than next-token prediction plug in here."""
    return LM(cfg)
