"""Run configuration: config.yaml -> preset -> dotted overrides -> typed, validated dataclasses.

Sections are dataclasses (torchtitan style); every key a user can set is a field here, so an
unknown key is an error that names the closest valid keys instead of being silently ignored.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from arch.config import ModelConfig, ObjectiveConfig
from arch.registry import load_imports

from .coerce import AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT, Range, check_ranges, coerce
from .errors import ConfigError
from .phases import PhaseConfig
from .precision import check_precision

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
CUSTOM = "custom"  # the arch label of a config that names no preset (no arch: and no presets:)


@dataclass
class DataConfig:
    spec: str = "stdlib"  # stdlib | PATH | hf:NAME[:CONFIG][@SPLIT]
    val_frac: float = 0.02
    cache_dir: str = "~/.cache/slmlab/data"
    # An existing tokenizer.json (or a run directory holding one) instead of training a new one,
    # e.g. to fine-tune a run (train.init_from) on other data with the tokenizer it was trained with.
    tokenizer: Optional[str] = None
    # Strings appended to data.tokenizer as single tokens (e.g. <think>, TOOL_USE[); model.vocab_size grows
    # to fit, and with train.init_from the new embedding (and untied head) rows start at the mean row.
    added_tokens: list = field(default_factory=list)
    # SFT: a .jsonl of {"messages": [...]} (chat) or {"prompt", "completion"} trains on the replies only
    # (slmlab/sft.py). auto = decided from the first record's fields; text = plain pretraining text.
    format: str = "auto"  # auto | text | chat | prompt_completion


@dataclass
class LoraConfig:
    """train.lora: low-rank adapters through peft (slmlab/lora.py); r = 0 trains every weight."""
    r: int = 0  # adapter rank; 0 = no LoRA
    alpha: float = 16.0  # scale alpha / r on the adapter's output
    dropout: float = 0.0  # dropout on the adapter's input
    # module-name suffixes; all-linear: all but the head; experts: the MoE expert stacks
    targets: list = field(default_factory=lambda: ["all-linear"])

    def check(self, where: str):
        check_ranges(self, where, {"r": Range(0, 4096), "alpha": POSITIVE, "dropout": Range(0, 1, hi_open=True)})
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"{where}.targets must be a non-empty list of module names, got {self.targets!r}")


@dataclass
class TrainConfig:
    steps: int = 400  # optimizer steps; sized for ~10 minutes on a 2-core CPU
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    warmup_steps: int = 30
    schedule: str = "wsd"  # wsd | cosine
    decay_frac: float = 0.3  # WSD: share of steps spent decaying
    min_lr_frac: float = 0.0  # the schedule's floor, reached one step past the last (phases.lr_mult)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 32768  # per periodic eval; the final eval covers the whole validation split
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (CUDA: bf16, fp16 on GPUs without bf16; CPU: fp32) | fp32 | bf16 | fp16
    sample_tokens: int = 200
    sample_prompt: str = "def "
    # Context curriculum (docs/training.md): typed stages; [] = one stage from seq_len/batch_size.
    phases: list[PhaseConfig] = field(default_factory=lambda: [
        PhaseConfig(seq_len=256, share=0.7, tokens_per_step=4096),
        PhaseConfig(seq_len=1024, share=0.2, tokens_per_step=4096),
        PhaseConfig(seq_len=2048, share=0.1, tokens_per_step=4096)])
    eval_seq_len: Optional[int] = None  # null = the last phase's seq_len
    eval_tasks: str = ""  # eval.py task specs, comma-separated, scored at each eval ("" = none); docs/eval.md
    eval_tasks_limit: int = 500  # items per task per eval (0 = all)
    ckpt_every: int = 100  # also one at the last step (and on Ctrl-C / SIGTERM); 0 = none, so no --resume
    keep_checkpoints: int = 2
    avg_last: int = 0  # >1: average the last K checkpoints into model_avg.safetensors
    quality_score: Optional[str] = None  # jsonl field name, or "fn:NAME" of a built-in scorer
    teacher: Optional[str] = None  # run directory of a teacher model for distillation
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    max_bad_steps: int = 10  # consecutive non-finite steps before aborting
    parallel: str = "ddp"  # under torchrun: ddp | fsdp
    compile: Union[bool, str] = "auto"  # torch.compile the training/eval forward: auto (CUDA only) | true | false
    init_from: str = ""  # RUN_DIR: start from that run's weights (e.g. AR -> diffusion); see slmlab/init_from.py
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the train.init_from model
    sft_eval_examples: int = 16  # SFT: held-out examples completed greedily for exact match per eval (0 = off)


@dataclass
class OptimConfig:
    name: str = "muon"  # muon | adamw (auto, which chose adamw under FSDP2 before it took Muon, is muon)
    lr: float = 3e-3
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    muon_lr: Optional[float] = None  # null = optim.lr (right with muon_adjust_lr_fn=match_rms_adamw)
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    muon_adjust_lr_fn: str = "match_rms_adamw"  # original | match_rms_adamw
    muon_weight_decay: Optional[float] = None  # null = optim.weight_decay
    # auto (bf16 on CUDA if it has bf16, else fp32; CPU: the faster, probed) | float32 | bfloat16
    muon_ns_dtype: str = "auto"


@dataclass
class LoggingConfig:
    wandb: bool = False
    wandb_project: str = "slmlab"
    wandb_mode: str = "offline"  # offline (no network or login needed) | online
    progress: bool = True


SECTIONS = {"model": ModelConfig, "objective": ObjectiveConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
            "logging": LoggingConfig}


@dataclass
class RunConfig:
    arch: str
    model: ModelConfig
    objective: ObjectiveConfig
    data: DataConfig
    train: TrainConfig
    optim: OptimConfig
    logging: LoggingConfig

    def to_dict(self) -> dict:
        out = {"arch": self.arch}
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False)

    def save(self, path):
        Path(path).write_text(self.to_yaml())


# ---- YAML as configs read it: YAML 1.2's numbers, no duplicate keys ----
# PyYAML reads YAML 1.1, where train.seed=0042 is octal (34), train.steps=1:00 base 60 (60), and 1e3
# (no dot) is text. A config reads numbers as YAML 1.2 (and as people write them): 42, text, 1000.0.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT_RE = re.compile(r"^[-+]?[0-9]+$")
_FLOAT_RE = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$")


def _yaml12_numbers(cls):
    cls.yaml_implicit_resolvers = {c: [(t, rx) for t, rx in rs if t not in (_INT, _FLOAT)]
                                   for c, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    cls.add_implicit_resolver(_INT, _INT_RE, list("-+0123456789"))
    cls.add_implicit_resolver(_FLOAT, _FLOAT_RE, list("-+0123456789."))
    return cls


@_yaml12_numbers
class _Loader(yaml.SafeLoader):
    def construct_yaml_int(self, node):
        return int(self.construct_scalar(node))  # decimal only: a leading 0 is no octal

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:  # PyYAML keeps the last of two equal keys without a word
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"the key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_constructor(_INT, _Loader.construct_yaml_int)


@_yaml12_numbers
class _Dumper(yaml.SafeDumper):
    """Quotes a string _Loader would read as a number ("0042", "1e3"), as SafeDumper does for YAML 1.1's."""


def load_yaml(text: str):
    """`text` parsed as a config reads YAML (above); ConfigError for text that is not such YAML."""
    try:
        return yaml.load(text, Loader=_Loader)
    except (yaml.YAMLError, ValueError, TypeError) as e:  # ValueError: an explicit tag, !!int abc
        raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _unknown(key: str, pool: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, pool, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(pool)}"
    return ConfigError(f"unknown config key {key!r}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """`section.key=value`: the value as YAML (numbers, lists, mappings), except a text key's
    (data.spec, train.sample_prompt, ...), which is taken as typed: YAML would cut `notes #1.txt` at
    its comment, strip the space of `def ` and read `0755` as a number. Quote it (`'...'`) to have it
    read as YAML, and `null` stays null where the key may be null."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    kind = _text_key(key)
    if kind and not raw.lstrip().startswith(("'", '"')):
        return key, None if kind == "optional" and raw.strip() in ("null", "~") else raw
    try:
        return key, load_yaml(raw) if raw.strip() else ""
    except ConfigError:
        return key, raw


def _text_key(key: str) -> str | None:
    """'text' for a `section.key` typed str, 'optional' for Optional[str], else None."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or "." in name:
        return None
    tp = typing.get_type_hints(SECTIONS[section]).get(name)
    if tp is str:
        return "text"
    return "optional" if tp == Optional[str] else None


def _set(tree: dict, key: str, value):
    parts = key.split(".")
    if len(parts) in (3, 4) and parts[:2] == ["model", "mixer_opts"]:  # one block's options, or one option
        node = tree.setdefault("model", {}).setdefault("mixer_opts", {})
        for i, part in enumerate(parts[2:-1], start=2):
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(parts[:i])} must be a mapping, got {node!r}")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:-1])} must be a mapping, got {node!r}")
        node[parts[-1]] = value
        return
    if len(parts) == 3 and parts[:2] == ["train", "lora"]:  # one adapter option, e.g. train.lora.r=8
        node = tree.setdefault("train", {}).setdefault("lora", {})
        if not isinstance(node, dict):
            raise ConfigError(f"train.lora must be a mapping, got {node!r}")
        node[parts[2]] = value
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown(key, all_keys())
    section, name = parts
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        raise _unknown(key, all_keys())
    tree.setdefault(section, {})[name] = value


def _merge(tree: dict, overrides: dict, where: str):
    for section, values in (overrides or {}).items():
        if section == "arch":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping")
        for k, v in values.items():
            _set(tree, f"{section}.{k}", v)


MAX_CONFIG_BYTES = 1 << 20


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {path.stat().st_size:,} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES:,} bytes")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        aliased, data = _parse_config(text)
        data = copy.deepcopy(data)  # the cached copy stays as parsed: callers change theirs
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except ConfigError as e:  # load_yaml's own (a duplicate key), which does not name the file
        raise ConfigError(f"config file {path}: {e}") from None
    if aliased:  # raised here, not in the try, whose ConfigError handler would prefix the path twice
        raise ConfigError(f"config file {path} uses YAML aliases (*name); write the values out instead")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    return data


@functools.lru_cache(maxsize=16)
def _parse_config(text: str) -> tuple[bool, Any]:
    """(uses aliases, parsed data) of a config file's text, cached by the text: PyYAML took ~55 ms to
    scan and parse the 230-line config.yaml, on every load_config (a test that checks 300 overrides
    spent 20 s there)."""
    # Aliases are refused: a few hundred bytes of nested aliases expand to gigabytes.
    if any(isinstance(tok, yaml.AliasToken) for tok in yaml.scan(text)):
        return True, {}
    return False, load_yaml(text) or {}


def presets(path=DEFAULT_CONFIG) -> dict:
    return _table(read_yaml(path), "presets", path)


def sizes(path=DEFAULT_CONFIG) -> dict:
    return _table(read_yaml(path), "sizes", path)


def _table(raw: dict, section: str, path) -> dict:
    """A config file's presets: or sizes: (name -> partial config), checked before anything looks a
    name up in it, so a wrongly typed one is named instead of failing as a traceback there."""
    table = raw.get(section)
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {section} must map names to partial configs, got {table!r}")
    for name, entry in table.items():
        if entry is not None and not isinstance(entry, dict):
            raise ConfigError(f"{path}: {section}.{name} must be a mapping of config sections, got {entry!r}")
    return table


def _apply_size(tree: dict, table: dict, size: str, arch: str, path, presets=()):
    """Merge size `size` (its sections, then its per_arch entry for `arch`) into `tree`; a per_arch
    entry that names no preset (a typo: `hybird`) is an error, not an entry no --arch reaches."""
    if size not in table:
        raise ConfigError(f"unknown --size {size!r}; sizes in {Path(path).name}: {', '.join(map(str, table))}")
    entry = copy.deepcopy(table[size]) or {}  # _table checked it is a mapping or empty
    per_arch = entry.pop("per_arch", {}) or {}
    _merge(tree, entry, f"size {size}")
    if not isinstance(per_arch, dict):
        raise ConfigError(f"size {size}: per_arch must map preset names to partial configs")
    stray = [k for k in per_arch if presets and k not in presets]
    if stray:
        raise ConfigError(f"size {size}: per_arch names {stray[0]!r}, which is no preset of {Path(path).name} "
                          f"({', '.join(map(str, presets))})")
    _merge(tree, per_arch.get(arch) or {}, f"size {size} for --arch {arch}")


def load_config(path=DEFAULT_CONFIG, arch: Optional[str] = None, overrides: list[str] = (),
                layers: Optional[str] = None, imports: list[str] = (), size: Optional[str] = None) -> RunConfig:
    """Base config -> preset `arch` -> size `size` (train.py --size) -> `--layers` -> dotted
    overrides, then type-check everything. `imports` (train.py --import) are appended to
    model.imports, so they load before the pattern is parsed."""
    raw = read_yaml(path)
    table, size_table = _table(raw, "presets", path), _table(raw, "sizes", path)
    for section in ("presets", "sizes"):  # not config sections: what --arch and --size pick from
        raw.pop(section, None)
    tree: dict = {}
    _merge(tree, raw, str(path))
    own = file_arch(raw, table)
    if not table and raw.get("arch") and "layers" not in (raw.get("model") or {}):  # a run's config.yaml has it
        raise ConfigError(f"{path} labels its run arch: {raw['arch']}, but without a presets: section its model is "
                          "its own model section over the bare defaults (model.layers A), not that preset's: give "
                          "model.layers in it, or drop arch: (the run is labelled custom), or use --arch with "
                          "config.yaml's presets and overrides")
    if arch and not table and arch != own:  # else --arch would only rename the run
        raise ConfigError(f"--arch {arch}: {path} has no presets: section to pick it from (a run's saved "
                          f"config.yaml fixes its architecture{', ' + repr(raw['arch']) if raw.get('arch') else ''}); "
                          "drop --arch or set model.* keys")
    arch = arch or own
    if table:
        if arch not in table:
            raise ConfigError(f"unknown --arch {arch!r}; presets in {Path(path).name}: {', '.join(map(str, table))}")
        _merge(tree, copy.deepcopy(table[arch]), f"preset {arch}")
    if size is not None:
        _apply_size(tree, size_table, str(size), arch, path, presets=table)
    if layers is not None:
        _set(tree, "model.layers", layers)
    for text in overrides:
        k, v = parse_override(text)
        _set(tree, k, v)
    if imports:
        model = tree.setdefault("model", {})
        have = model.get("imports") or []
        model["imports"] = ([have] if isinstance(have, str) else list(have)) + list(imports)
    return build(arch, tree)


def file_arch(raw: dict, table: dict) -> str:
    """The run's label when --arch is not given. A file with no presets: section replaces config.yaml
    (it is not merged over it), so its model is its own model section over the dataclass defaults,
    not the hybrid preset: without its own arch: it is CUSTOM, as load_run_config labels such a file."""
    if raw.get("arch"):
        return raw["arch"]
    return "hybrid" if table else CUSTOM


def defaults(imports: list[str] = ()) -> RunConfig:
    """The dataclass defaults (= config.yaml's sections, no preset): what a file with no presets: is
    merged over."""
    return build(CUSTOM, {"model": {"imports": list(imports)}})


def build(arch: str, tree: dict) -> RunConfig:
    # A researcher's blocks register themselves on import; the layer pattern is parsed after.
    imports = (tree.get("model") or {}).get("imports") or []
    load_imports(coerce("model.imports", imports, list) if not isinstance(imports, str) else [imports])
    sections = {}
    for name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        values = {k: coerce(f"{name}.{k}", v, hints[k]) for k, v in (tree.get(name) or {}).items()}
        try:
            sections[name] = cls(**values)
        except TypeError as e:
            raise ConfigError(f"section {name}: {e}") from None
    cfg = RunConfig(arch=arch, **sections)
    validate(cfg)
    if cfg.model.imports:  # a researcher's blocks: checked against the contract before they train
        from arch.check import check_imported

        check_imported(cfg.model)
    return cfg


def load_run_config(path) -> RunConfig:
    """A run directory's resolved config.yaml (no presets applied)."""
    tree = read_yaml(path)
    if "model" not in tree:  # an empty or cut file would load as the defaults, and the weights be blamed
        raise ConfigError(f"{path} has no model section (empty or truncated?): a run's config.yaml holds its "
                          "whole resolved config")
    arch = tree.pop("arch", CUSTOM)
    for section in list(tree):
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r}")
        for k in tree[section]:
            if k not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
                raise _unknown(f"{section}.{k}", all_keys())
    return build(arch, tree)


# Every numeric key of these sections and what it may be (the model's and objective's live beside
# their dataclasses in arch/config.py). tests/test_config.py fails if a numeric key is missing here.
RANGES = {
    "data": {"val_frac": Range(0, 1, lo_open=True, hi_open=True)},
    "train": {"steps": Range(1, 10 ** 9), "batch_size": Range(1, 2 ** 20), "seq_len": Range(1, 2 ** 20),
              "grad_accum": Range(1, 2 ** 16), "warmup_steps": NON_NEGATIVE, "decay_frac": UNIT,
              "min_lr_frac": UNIT, "grad_clip": NON_NEGATIVE, "eval_every": AT_LEAST_1, "eval_tokens": AT_LEAST_1,
              "log_every": AT_LEAST_1, "seed": Range(0, 2 ** 63 - 1), "sample_tokens": Range(0, 2 ** 20),
              "eval_seq_len": Range(1, 2 ** 20), "eval_tasks_limit": Range(0, 10 ** 9), "ckpt_every": NON_NEGATIVE, "keep_checkpoints": AT_LEAST_1,
              "avg_last": NON_NEGATIVE, "distill_alpha": UNIT, "distill_temperature": Range(0, 1000, lo_open=True),
              "max_bad_steps": AT_LEAST_1, "sft_eval_examples": Range(0, 10 ** 6)},
    "optim": {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "eps": Range(0, 1, lo_open=True),
              "muon_lr": POSITIVE, "muon_momentum": Range(0, 1, hi_open=True),
              "muon_ns_steps": Range(1, 99), "muon_weight_decay": NON_NEGATIVE},
}


def validate(cfg: RunConfig):
    cfg.objective.validate(cfg.model)
    for section, ranges in RANGES.items():
        check_ranges(getattr(cfg, section), section, ranges)
    betas = cfg.optim.betas
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                  for b in betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {betas!r}")
    cfg.optim.betas = [float(b) for b in betas]  # torch's AdamW refuses ints ([0, 0] from YAML): both floats
    t = cfg.train
    if t.schedule not in ("wsd", "cosine"):
        raise ConfigError(f"train.schedule must be wsd or cosine, got {t.schedule!r}")
    if t.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"train.device must be auto, cpu or cuda, got {t.device!r}")
    check_precision(t.precision)
    if cfg.optim.name == "auto":  # configs written while auto was the default; config.yaml records muon
        cfg.optim.name = "muon"
    if cfg.optim.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name must be muon or adamw; got {cfg.optim.name!r}")
    if cfg.optim.muon_adjust_lr_fn not in ("original", "match_rms_adamw"):
        raise ConfigError(f"optim.muon_adjust_lr_fn must be original or match_rms_adamw, "
                          f"got {cfg.optim.muon_adjust_lr_fn!r}")
    if cfg.optim.muon_ns_dtype not in ("auto", "float32", "bfloat16"):
        raise ConfigError(f"optim.muon_ns_dtype must be auto, float32 or bfloat16, got {cfg.optim.muon_ns_dtype!r}")
    if t.compile not in (True, False, "auto"):
        raise ConfigError(f"train.compile must be true, false or auto, got {t.compile!r}")
    if t.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
    if cfg.logging.wandb_mode not in ("offline", "online"):
        raise ConfigError(f"logging.wandb_mode must be offline or online, got {cfg.logging.wandb_mode!r}")
    added = cfg.data.added_tokens
    if not isinstance(added, list) or not all(isinstance(a, str) and a for a in added):
        raise ConfigError(f"data.added_tokens must be a list of non-empty strings, got {added!r}")
    if added and not cfg.data.tokenizer:
        raise ConfigError("data.added_tokens extends an existing tokenizer: set data.tokenizer=RUN_DIR (or a "
                          "tokenizer.json) too")
    if cfg.data.format not in ("auto", "text", "chat", "prompt_completion"):
        raise ConfigError(f"data.format must be auto, text, chat or prompt_completion, got {cfg.data.format!r}")
    t.lora.check("train.lora")
    if t.lora.r and not t.init_from:
        raise ConfigError("train.lora needs train.init_from=RUN_DIR: the base model the adapters are trained on")
    if t.lora.r and t.avg_last > 1:
        raise ConfigError("train.avg_last does not apply to train.lora runs (their checkpoints hold adapters only)")
    if t.avg_last > 1 and not t.ckpt_every:
        raise ConfigError(f"train.avg_last={t.avg_last} averages checkpoints, but train.ckpt_every=0 writes none: "
                          "set train.ckpt_every=N (or train.avg_last=0)")
    if t.avg_last > t.keep_checkpoints:
        raise ConfigError(f"train.avg_last={t.avg_last} needs train.keep_checkpoints >= {t.avg_last}")
    from .phases import resolve_phases

    resolve_phases(cfg)  # raises a one-line ConfigError on a bad phase list
