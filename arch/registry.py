"""Name -> block class. Adding a token mixer = one module with one `@register` line; the module can
live in the repo (imported by arch/__init__.py) or anywhere else (model.imports / train.py --import).

Each token mixer has a full name (used in list patterns and configs) and a one-letter code (used in
compact patterns like "CCACCA"). Letters are upper-case and unique. A block's options are a
dataclass passed as `options=`; users set them under model.mixer_opts.<block name>.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from slmlab.errors import ConfigError

MIXERS: dict[str, type] = {}
LETTERS: dict[str, str] = {}
# Channel mixers other than the built-in SwiGLU and GELU MLPs (picked with model.mlp).
CHANNEL_MIXERS: dict[str, type] = {}
# Block name -> its options dataclass (one namespace per name: the LIF mixer and LIF MLP share "lif").
OPTIONS: dict[str, type] = {}


def _add_options(name: str, options):
    if options is None:
        return
    if OPTIONS.get(name, options) is not options:
        raise ValueError(f"block {name!r} registers two different option classes")
    OPTIONS[name] = options


def register(name: str, letter: str, options=None):
    """Class decorator: a token mixer (arch.block.Mixer subclass) under `name` and `letter`."""
    if len(letter) != 1 or not letter.isupper():
        raise ValueError(f"mixer {name!r}: letter must be one upper-case character, got {letter!r}")

    def deco(cls):
        if name in MIXERS or letter in LETTERS:
            raise ValueError(f"mixer {name!r} / letter {letter!r} registered twice")
        MIXERS[name] = cls
        LETTERS[letter] = name
        cls.mixer_name = name
        _add_options(name, options)
        return cls

    return deco


def get_mixer(name: str):
    if name not in MIXERS:
        raise KeyError(name)
    return MIXERS[name]


def register_channel_mixer(name: str, options=None):
    def deco(cls):
        if name in CHANNEL_MIXERS or name in ("swiglu", "gelu"):  # the built-ins (arch/block.py)
            raise ValueError(f"channel mixer {name!r} registered twice")
        CHANNEL_MIXERS[name] = cls
        _add_options(name, options)
        return cls

    return deco


_LOADED: dict[str, str] = {}  # resolved file path or module name -> module name, so a second load is a no-op


def load_imports(specs) -> None:
    """Import each entry of model.imports: a .py file (anywhere on disk) or a dotted module name.
    Importing registers the blocks it defines; a bad entry is a one-line ConfigError."""
    for spec in [specs] if isinstance(specs, str) else list(specs or []):
        spec = str(spec)
        path = Path(spec).expanduser()
        is_file = spec.endswith(".py") or path.is_file()
        key = str(path.resolve()) if is_file else spec
        if key in _LOADED:
            continue
        # A stable name per file, so a checkpoint's config re-imports it as the same module.
        name = f"slmlab_user_{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}" if is_file else spec
        try:
            if is_file:
                if not path.is_file():
                    raise ConfigError(f"model.imports: file not found: {spec!r}")
                mod_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = module
                mod_spec.loader.exec_module(module)
            else:
                name = importlib.import_module(spec).__name__
        except ConfigError:
            raise
        except Exception as e:  # a user's file: report any failure as one line naming it
            if is_file:  # a half-executed module must not stay importable under its name
                sys.modules.pop(name, None)
            raise ConfigError(f"model.imports: importing {spec!r} failed: {type(e).__name__}: {e}") from None
        _LOADED[key] = name
