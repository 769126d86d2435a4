"""Typed values from YAML and the command line: `coerce` checks/converts one value to a dataclass
field's type, `build_item` builds a whole dataclass from a mapping. Used by the run config
(slmlab/config.py) and by block options (arch/registry.py), so both report bad values alike."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Union

from .errors import ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def coerce(key: str, value: Any, tp):
    """Check/convert `value` to the field type `tp`; raise a one-line ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key} expects {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} expects an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # str() would write 0755 as 755
            raise ConfigError(f"{key} expects a string, got the number {value!r}: quote it if it is text")
        raise ConfigError(f"{key} expects a string, got {value!r}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} expects a list, got {value!r}")
        (item,) = typing.get_args(tp) or (None,)
        if dataclasses.is_dataclass(item):
            return [build_item(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
        return value
    if dataclasses.is_dataclass(tp):
        return build_item(key, tp, value)
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key} expects a mapping, got {value!r}")
    return value


def build_item(where: str, cls, value):
    """A mapping -> dataclass `cls` (a list entry such as one of train.phases), every field coerced."""
    if isinstance(value, cls):
        return value
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(names)}, got {value!r}")
    bad = [k for k in value if k not in names]
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r}; keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    for k in required:
        if k not in value:
            raise ConfigError(f"{where}: {k} is required")
    obj = cls(**{k: coerce(f"{where}.{k}", v, hints[k]) for k, v in value.items()})
    if hasattr(obj, "check"):
        obj.check(where)
    for k in value:  # after the item's own checks, whose `not x > 0` lets inf through (an inf aux loss: NaN steps)
        x = getattr(obj, k)
        if isinstance(x, float) and not math.isfinite(x):
            raise ConfigError(f"{where}.{k} must be a finite number, got {x}")
    return obj


def _shown(x) -> str:
    """A bound as a reader types it: 1048576, not :g's 1.04858e+06; fractions as :g."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed values of one numeric key; open ends exclude the bound. NaN and inf never pass."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        lo, hi = _shown(self.lo), _shown(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def check(self, key: str, value):
        import math

        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number {self.describe()}, got {value!r}")
        bad = isinstance(value, float) and not math.isfinite(value)
        if self.lo is not None:
            bad = bad or value < self.lo or (self.lo_open and value == self.lo)
        if self.hi is not None:
            bad = bad or value > self.hi or (self.hi_open and value == self.hi)
        if bad:
            raise ConfigError(f"{key} must be {self.describe()}, got {value!r}")


def check_ranges(obj, where: str, ranges: dict):
    """Check every field of dataclass `obj` named in `ranges` (field -> Range)."""
    for name, rng in ranges.items():
        rng.check(f"{where}.{name}", getattr(obj, name))


POSITIVE = Range(0, None, lo_open=True)
NON_NEGATIVE = Range(0, None)
AT_LEAST_1 = Range(1, None)
UNIT = Range(0, 1)
