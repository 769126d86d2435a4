"""Blocks and models. Importing this package registers every built-in mixer."""
from . import attention, conv  # noqa: F401  (registration side effects)
from .config import ModelConfig, parse_pattern
from .model import LM, Block, sample_next
from .registry import CHANNEL_MIXERS, LETTERS, MIXERS, register, register_channel_mixer

__all__ = ["LM", "Block", "ModelConfig", "parse_pattern", "sample_next", "MIXERS", "LETTERS",
           "CHANNEL_MIXERS", "register", "register_channel_mixer"]
