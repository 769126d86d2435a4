"""One source of defaults: config.yaml lists every key the dataclasses define, with the same value,
each documented by a comment; typed phases; per-block option overrides; --import."""
import dataclasses
import re

import pytest
import yaml

from slmlab.config import DEFAULT_CONFIG, SECTIONS, load_config, load_run_config
from slmlab.errors import ConfigError


def _yaml_sections() -> dict:
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.pop("presets")
    raw.pop("sizes")
    return raw


def _default_dict(cls) -> dict:
    return dataclasses.asdict(cls())


def test_config_yaml_has_exactly_the_dataclass_keys():
    raw = _yaml_sections()
    assert set(raw) == set(SECTIONS), "config.yaml sections differ from slmlab.config.SECTIONS"
    for name, cls in SECTIONS.items():
        want = {f.name for f in dataclasses.fields(cls)}
        assert set(raw[name]) == want, f"{name}: missing {want - set(raw[name])}, extra {set(raw[name]) - want}"


def test_config_yaml_values_equal_dataclass_defaults():
    raw = _yaml_sections()
    for name, cls in SECTIONS.items():
        defaults = _default_dict(cls)
        for key, value in raw[name].items():
            want = defaults[key]
            if key == "phases":  # the yaml spells only the keys it sets; the rest take PhaseConfig defaults
                built = load_config().train.phases
                assert [dataclasses.asdict(p) for p in built] == want
                continue
            assert value == want, f"{name}.{key}: config.yaml {value!r} != dataclass default {want!r}"


def test_every_key_in_config_yaml_is_documented():
    """A key line carries a trailing comment, or sits under a comment block that documents it."""
    lines = DEFAULT_CONFIG.read_text().split("presets:")[0].splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^  ([a-z_A-Z]+):", line)
        if m and "#" not in line and not lines[i - 1].strip().startswith("#"):
            undocumented.append(m.group(1))
    assert not undocumented, f"config.yaml keys without a comment: {undocumented}"


def test_every_preset_builds():
    for arch in yaml.safe_load(DEFAULT_CONFIG.read_text())["presets"]:
        load_config(arch=arch)


def test_phases_are_typed_once_and_round_trip(tmp_path):
    cfg = load_config(overrides=["train.phases=[{seq_len: 64, share: 0.5}, {seq_len: 128, share: 0.5, lr_mul: 2}]"])
    p0, p1 = cfg.train.phases
    assert (p0.seq_len, p0.share, p0.lr_mul, p1.lr_mul) == (64, 0.5, 1.0, 2.0)
    assert isinstance(p1.lr_mul, float)
    cfg.save(tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml").train.phases == cfg.train.phases
    with pytest.raises(ConfigError, match=r"train.phases\[0\].seq_len expects an integer"):
        load_config(overrides=["train.phases=[{seq_len: abc, share: 1.0}]"])
    with pytest.raises(ConfigError, match=r"train.phases\[0\]: seq_len is required"):
        load_config(overrides=["train.phases=[{share: 1.0}]"])


def test_unknown_key_names_the_closest():
    with pytest.raises(ConfigError, match="did you mean train.steps"):
        load_config(overrides=["train.stpes=3"])
