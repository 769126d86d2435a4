"""Name -> block class. Adding a token mixer = one module with one `@register` line; the module can
live in the repo (imported by arch/__init__.py) or anywhere else (model.imports / train.py --import).

Each token mixer has a full name (used in list patterns and configs) and a one-letter code (used in
compact patterns like "CCACCA"). Names are lower-case [a-z0-9_]+, letters upper-case A-Z, both
unique, and no name reads as a string of registered letters (so a pattern never means two things). A block's options are a
dataclass passed as `options=`; users set them under model.mixer_opts.<block name>.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import torch.nn as nn

from slmlab.errors import ConfigError

MIXERS: dict[str, type] = {}
LETTERS: dict[str, str] = {}
# Channel mixers, the built-in SwiGLU and GELU MLPs included (picked with model.mlp).
CHANNEL_MIXERS: dict[str, type] = {}
# model.mlp: no channel mixer at all (Mamba's own stacks: a layer is x + mixer(norm(x)))
NO_MLP = "none"
# Block name -> its options dataclass (one namespace per name: the LIF mixer and LIF MLP share "lif").
OPTIONS: dict[str, type] = {}
# Names are config values and pattern entries: parse_pattern lower-cases what it reads, so an
# upper-case name would register and then never be found.
NAME_RE = re.compile(r"[a-z0-9_]+")


def module_file(cls):
    """The file that defines `cls`, or None (a module without one)."""
    return getattr(sys.modules.get(cls.__module__), "__file__", None)


def where(cls) -> str:
    """'Class in FILE' for messages: the class and the file a researcher would open."""
    path = module_file(cls)
    if path is None:
        return f"{cls.__qualname__} in module {cls.__module__}"
    try:
        path = str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        pass  # outside the working directory (or none): the absolute path
    return f"{cls.__qualname__} in {path}"


def _add_options(name: str, options, cls):
    if options is None:
        return
    if OPTIONS.get(name, options) is not options:
        raise ConfigError(f"block {name!r} ({where(cls)}) registers a different options class than the block "
                          f"already under that name ({OPTIONS[name].__qualname__}): share one class")
    OPTIONS[name] = options


def spelled_by(name: str, letters) -> bool:
    """Whether a pattern string `name` also reads as compact letters ("ca" = C, A)."""
    return all(ch.upper() in letters for ch in name)


def _check_class(cls, base, args: tuple, kwargs: dict, signature: str, what: str):
    """One-line ConfigErrors for a class the model could not build or call: the wrong base class,
    an __init__ that does not take the arguments the model passes, no forward."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{what}: {where(cls) if isinstance(cls, type) else repr(cls)} must subclass "
                          f"arch.{base.__name__} (it supplies the defaults of the block contract)")
    try:
        inspect.signature(cls).bind(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{what} ({where(cls)}): __init__ must accept {signature}, but {e}") from None
    if cls.forward is nn.Module.forward:  # the unimplemented stub, which would raise at the first step
        raise ConfigError(f"{what} ({where(cls)}) defines no forward()")


def register(name: str, letter: str, options=None):
    """Class decorator: a token mixer (arch.block.Mixer subclass) under `name` and `letter`."""
    def deco(cls):
        from .block import ChannelMixer, Mixer

        what = f"mixer {name!r}"
        if isinstance(cls, type) and issubclass(cls, ChannelMixer):
            raise ConfigError(f"{what} ({where(cls)}) is a ChannelMixer: register it with "
                              "@register_channel_mixer(name) and pick it with model.mlp")
        _check_class(cls, Mixer, (None, 0), {"window": None}, "(cfg, layer_idx, window=None)", what)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"{what} ({where(cls)}): a block name must be lower-case letters, digits and _ "
                              f"(configs and patterns spell it that way), e.g. {_suggest_name(name)!r}")
        if not (isinstance(letter, str) and len(letter) == 1 and "A" <= letter <= "Z"):
            raise ConfigError(f"{what} ({where(cls)}): its letter must be one upper-case A-Z, got {letter!r}; "
                              f"free letters: {_free_letters()}")
        _check_free(name, letter, cls)
        if cls.static_state_names and not all(hasattr(cls, m) for m in ("static_state", "forward_static")):
            raise ConfigError(f"{what} ({where(cls)}) sets static_state_names but lacks static_state() or "
                              "forward_static() (docs/blocks.md, the static-state step)")
        MIXERS[name] = cls
        LETTERS[letter] = name
        cls.mixer_name = name
        _add_options(name, options, cls)
        return cls

    return deco


def _check_free(name: str, letter: str, cls):
    """The name and letter are free, and no pattern string could mean both a name and letters."""
    what = f"mixer {name!r} ({where(cls)})"
    if name in MIXERS:
        raise ConfigError(f"{what}: the name {name!r} is taken by {where(MIXERS[name])}; pick another name")
    if letter in LETTERS:
        raise ConfigError(f"{what}: the letter {letter!r} is taken by {LETTERS[letter]!r} "
                          f"({where(MIXERS[LETTERS[letter]])}); free letters: {_free_letters()}")
    letters = {*LETTERS, letter}
    if spelled_by(name, letters):
        raise ConfigError(f"{what}: the name {name!r} also reads as the letter pattern {name.upper()!r}; "
                          "pick a name with a character that is not a block letter")
    shadowed = [n for n in MIXERS if spelled_by(n, letters)]
    if shadowed:
        raise ConfigError(f"{what}: the letter {letter!r} would make the name {shadowed[0]!r} read as the letter "
                          f"pattern {shadowed[0].upper()!r} too; free letters: {_free_letters(exclude=shadowed[0])}")


def _free_letters(exclude: str = "") -> str:
    used = set(LETTERS) | {c.upper() for c in exclude}
    return "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used)


def _suggest_name(name) -> str:
    return re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_") or "my_block"


def get_mixer(name: str):
    if name not in MIXERS:
        raise KeyError(name)
    return MIXERS[name]


def register_channel_mixer(name: str, options=None):
    """Class decorator: a channel mixer (arch.block.ChannelMixer subclass) under `name` (model.mlp)."""
    def deco(cls):
        from .block import ChannelMixer, Mixer  # block imports this module

        what = f"channel mixer {name!r}"
        if isinstance(cls, type) and issubclass(cls, Mixer):
            raise ConfigError(f"{what} ({where(cls)}) is a token Mixer: register it with @register(name, letter) "
                              "and use it in model.layers")
        _check_class(cls, ChannelMixer, (None,), {}, "(cfg)", what)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ConfigError(f"{what} ({where(cls)}): a block name must be lower-case letters, digits and _ "
                              f"(model.mlp spells it that way), e.g. {_suggest_name(name)!r}")
        if name == NO_MLP:
            raise ConfigError(f"{what} ({where(cls)}): model.mlp={NO_MLP} means no channel mixer; pick another name")
        if name in CHANNEL_MIXERS and is_builtin(CHANNEL_MIXERS[name]):
            raise ConfigError(f"{what} ({where(cls)}): {name!r} is a built-in channel mixer; pick another name")
        if name in CHANNEL_MIXERS:
            raise ConfigError(f"{what} ({where(cls)}): the name {name!r} is taken by "
                              f"{where(CHANNEL_MIXERS[name])}; pick another name")
        CHANNEL_MIXERS[name] = cls
        _add_options(name, options, cls)
        return cls

    return deco


def is_builtin(cls) -> bool:
    """Defined in this package (arch/), not by a user's model.imports."""
    return cls.__module__.startswith(f"{__package__}.")


_LOADED: dict[str, str] = {}  # resolved file path or module name -> module name, so a second load is a no-op


USER_MODULE_PREFIX = "slmlab_user_"  # the module name of a block file imported by path


def load_imports(specs) -> list[str]:
    """Import each entry of model.imports: a .py file (anywhere on disk) or a dotted module name.
    Importing registers the blocks it defines; a bad entry is a one-line ConfigError. Returns the
    entries as the run records them: files as absolute paths (so sample.py from another directory
    finds them), each once (so `--resume --import SAME` adds nothing)."""
    out = []
    for spec in [specs] if isinstance(specs, str) else list(specs or []):
        key = _import_one(str(spec))
        if key not in out:
            out.append(key)
    return out


def _import_one(spec: str) -> str:
    path = Path(spec).expanduser()
    is_file = spec.endswith(".py") or path.is_file()
    key = str(path.resolve()) if is_file else spec
    if key in _LOADED:
        return key
    # A stable name per file, so a checkpoint's config re-imports it as the same module.
    name = f"{USER_MODULE_PREFIX}{path.stem}_{hashlib.sha1(key.encode()).hexdigest()[:8]}" if is_file else spec
    if is_file and (known := _imported_as(key)):
        # a package's own file (`python -m arch.check arch/deltanet.py`): executing it again under
        # another name would fail its relative imports, or register its blocks twice
        _LOADED[key] = known
        return key
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
    except Exception as e:  # a user's file: report any failure as one line naming it
        if is_file:  # a half-executed module must not stay importable under its name
            sys.modules.pop(name, None)
        if isinstance(e, ConfigError):  # already one line naming the block and its file (register's checks)
            raise
        raise ConfigError(f"model.imports: importing {spec!r} failed: {type(e).__name__}: {e}{_at(e, key)}") from None
    _LOADED[key] = name
    return key


def _imported_as(path: str):
    """The name of the module a package or script already imported from this file (resolved path), or
    None. Not our own imports by path (slmlab_user_*): _LOADED knows those, and when a caller clears
    it (tests unregistering a block) the file must run again to register."""
    for name, module in list(sys.modules.items()):
        if name.startswith(USER_MODULE_PREFIX):
            continue
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py") and str(Path(file).resolve()) == path:
            return name
    return None


def _at(e: Exception, key: str) -> str:
    """' (FILE:LINE)' of the deepest frame of the failure inside the imported file, when there is one."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == key]
    if isinstance(e, SyntaxError) or not frames:
        return ""  # a SyntaxError names its own line
    return f" (at {Path(key).name}:{frames[-1].lineno})"
