"""Name -> token-mixer class. Adding a mixer = one module + one `@register` line.

Each entry has a full name (used in list patterns and configs) and a one-letter code (used in
compact patterns like "CCACCA"). Letters are upper-case and unique.
"""
from __future__ import annotations

MIXERS: dict[str, type] = {}
LETTERS: dict[str, str] = {}
# Channel mixers other than the default SwiGLU (picked with model.mixer_opts.mlp).
CHANNEL_MIXERS: dict[str, type] = {}


def register(name: str, letter: str):
    def deco(cls):
        if name in MIXERS or letter in LETTERS:
            raise ValueError(f"mixer {name!r} / letter {letter!r} registered twice")
        MIXERS[name] = cls
        LETTERS[letter] = name
        cls.mixer_name = name
        return cls

    return deco


def get_mixer(name: str):
    if name not in MIXERS:
        raise KeyError(name)
    return MIXERS[name]


def register_channel_mixer(name: str):
    def deco(cls):
        if name in CHANNEL_MIXERS or name == "swiglu":
            raise ValueError(f"channel mixer {name!r} registered twice")
        CHANNEL_MIXERS[name] = cls
        return cls

    return deco


# model.mixer_opts keys a block reads; any other key is rejected so a typo is never ignored.
MIXER_OPT_KEYS: set[str] = {"mlp"}


def register_mixer_opts(*keys: str):
    MIXER_OPT_KEYS.update(keys)
