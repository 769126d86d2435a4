"""What an ablation runs: named variants x corpora x seeds, each one ordinary run directory.

Two ways to say it, one result: `inline_ablation` (the cartesian product of `--vary` axes, the
first value of each axis being the baseline) and `file_ablation` (named variants in a YAML file).
`plan` resolves every run's config, builds every variant's model once (so a variant that does not
build fails before any training), and sizes each variant's step count under the budget.
"""
from __future__ import annotations

import difflib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..config import DEFAULT_CONFIG, RunConfig, load_config, parse_override, read_yaml
from ..errors import SlmlabError
from ..phases import phase_windows, resolve_phases
from ..unused import changed, setting_key, unused_changes, why_unused
from .worker import config_sha

BUDGETS = ("steps", "tokens", "flops")
DEFAULT_BUDGET, DEFAULT_SEEDS = "flops", 3
MANIFEST = "ablation.json"
OUTPUTS = ("results.md", "results.csv", "timings.csv", "curves.png", "final.png")
# What else an ablation writes at OUT's top level (--force deletes these with the runs); no variant may
# take one of these names (or a dot name: `..` would put its runs outside OUT).
OWN = OUTPUTS + ("invocations.jsonl", ".submitit", MANIFEST)
FILE_KEYS = ("arch", "seeds", "steps", "budget", "data", "overrides", "variants")
VARIANT_KEYS = ("arch", "overrides")
# Keys `resolve` sets on every run from the ablation's own axes, so an override or --vary of one
# would be overwritten; each with where it is said instead.
RUN_KEYS = {
    "data.spec": "corpora are the ablation's own axis (one table each): give --data SPEC per corpus (file key data:)",
    "train.steps": "give the baseline's steps with --steps N (file key steps:); the budget sizes the others'",
    "train.seed": "seeds are every variant's repeats: give --seeds N (file key seeds:)",
}


class AblationError(SlmlabError):
    """Bad ablation input; ablate.py prints it on one line and exits 2."""


def refuse_run_keys(where: str, overrides):
    """An AblationError for the first override of a RUN_KEYS key."""
    for text in overrides:
        key = str(text).split("=", 1)[0].strip()
        if key in RUN_KEYS:
            raise AblationError(f"{where} {str(text).strip()!r}: the ablation sets {key} on every run; {RUN_KEYS[key]}")


@dataclass
class Variant:
    name: str
    arch: str
    overrides: list[str] = field(default_factory=list)  # section.key=value on top of the common ones


@dataclass
class Ablation:
    """The definition: everything that decides which runs exist and how each is configured."""

    variants: list[Variant]  # variants[0] is the baseline every other variant is compared with
    seeds: list[int]
    corpora: list[str]  # data specs; one results table each
    steps: int  # the baseline's optimizer steps; other variants' follow from the budget
    budget: str = DEFAULT_BUDGET
    overrides: list[str] = field(default_factory=list)  # common to every variant
    config: str = str(DEFAULT_CONFIG)

    def __post_init__(self):
        if self.budget not in BUDGETS:
            raise AblationError(f"--budget must be one of {', '.join(BUDGETS)}, got {self.budget!r}")
        if not self.variants:
            raise AblationError("an ablation needs at least one variant")
        names = [v.name for v in self.variants]
        for n in names:
            if n.startswith(".") or n in OWN:
                why = "it starts with a dot" if n.startswith(".") else "the ablation writes that file"
                raise AblationError(f"variant name {n!r} cannot name a directory of OUT: {why}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise AblationError(f"variant name {dup[0]!r} is used twice")
        if not self.seeds or any(not isinstance(s, int) or isinstance(s, bool) for s in self.seeds):
            raise AblationError(f"seeds must be a count or a list of integers, got {self.seeds!r}")
        if len(set(self.seeds)) != len(self.seeds):
            raise AblationError(f"seeds repeat: {self.seeds}")
        if not self.corpora:
            raise AblationError("no data: give --data SPEC (repeatable) or `data:` in the file")
        if len(set(self.corpora)) != len(self.corpora):
            raise AblationError(f"--data repeats a corpus: {self.corpora}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise AblationError(f"--steps must be a positive integer, got {self.steps!r}")
        refuse_run_keys("override", self.overrides)
        for v in self.variants:
            refuse_run_keys(f"variant {v.name}", v.overrides)

    @property
    def baseline(self) -> Variant:
        return self.variants[0]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Cell:
    """One variant on one corpus: what every seed of it shares."""

    variant: str
    corpus: str
    layers: str  # token mixers per layer, plus the sliding-window pattern when there is one
    params: int
    nonembed_params: int
    flops_per_token: float  # training FLOPs per token, averaged over the phases by their tokens
    tokens_per_step: float  # averaged over the phases by their steps
    steps: int  # this variant's optimizer steps under the budget
    bpb_is_bound: bool  # masked diffusion reports an ELBO upper bound, not an exact bpb


@dataclass
class Run:
    variant: str
    corpus: str
    seed: int
    dir: str  # relative to the ablation's OUT
    arch: str
    overrides: list[str]  # everything load_config needs on top of config + arch
    config: str
    config_sha: str  # of the resolved config: a changed config.yaml means a different ablation


def seed_list(seeds) -> list[int]:
    """`3` -> [1, 2, 3]; a list is taken as the seeds themselves."""
    if isinstance(seeds, bool):
        raise AblationError(f"seeds must be a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise AblationError(f"--seeds must be >= 1, got {seeds}")
        return list(range(1, seeds + 1))
    if isinstance(seeds, list):
        return seeds
    raise AblationError(f"seeds must be a count or a list of integers, got {seeds!r}")


def split_values(raw: str) -> list[str]:
    """Split on commas outside brackets and quotes, so a value may itself be a YAML list."""
    out, depth, quote, cur = [], 0, None, ""
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        cur += ch
    out.append(cur.strip())
    return out


def parse_vary(text: str) -> tuple[str, list[str]]:
    if "=" not in text:
        raise AblationError(f"--vary {text!r} is not of the form section.key=v1,v2,...")
    key, raw = text.split("=", 1)
    key, values = key.strip(), split_values(raw)
    if not key or "." not in key:
        raise AblationError(f"--vary {text!r}: the key must be section.key, e.g. model.layers")
    if key in RUN_KEYS:
        raise AblationError(f"--vary {key}: the ablation sets {key} on every run, so it is no variant axis; "
                            f"{RUN_KEYS[key]}")
    if any(v == "" for v in values):
        raise AblationError(f"--vary {text!r} has an empty value")
    if len(set(values)) != len(values):
        raise AblationError(f"--vary {text!r} repeats a value")
    return key, values


def safe_name(name: str) -> str:
    """A variant name usable as a directory name."""
    return re.sub(r"[^A-Za-z0-9._=+,-]", "-", name)


def config_defaults(config, arch: Optional[str], steps: Optional[int], corpora: Optional[list[str]],
                    overrides: list[str]) -> tuple[str, int, list[str]]:
    """`arch`, `steps` and `corpora`, each that is not given taken from the config as train.py
    would use it: its arch: (the preset, or a saved run config's own), train.steps, data.spec."""
    if arch and steps is not None and corpora:
        return arch, steps, list(corpora)
    cfg = load_config(config, arch=arch, overrides=overrides)
    return arch or cfg.arch, cfg.train.steps if steps is None else steps, list(corpora or [cfg.data.spec])


def inline_ablation(arch: Optional[str], varies: list[str], seeds=None, steps: Optional[int] = None,
                    corpora: Optional[list[str]] = None, budget: Optional[str] = None, overrides: list[str] = (),
                    config=DEFAULT_CONFIG) -> Ablation:
    """The cartesian product of the --vary axes; the first value of every axis is the baseline.
    What is None comes from the config (config_defaults), seeds and budget from the defaults here."""
    arch, steps, corpora = config_defaults(config, arch, steps, corpora, list(overrides))
    axes = [parse_vary(v) for v in varies]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise AblationError(f"--vary gives {sorted(k for k in keys if keys.count(k) > 1)[0]} twice")
    shared = {k.split(".")[-1] for k in keys}
    variants = []
    for combo in itertools.product(*(values for _, values in axes)):
        # Name by the last key part when that is unambiguous (layers=CCA), else the full key.
        parts = [f"{k.split('.')[-1] if len(shared) == len(keys) else k}={v}" for k, v in zip(keys, combo)]
        variants.append(Variant(safe_name("+".join(parts)) if parts else arch, arch,
                                [f"{k}={v}" for k, v in zip(keys, combo)]))
    ab = Ablation(variants=variants, seeds=seed_list(DEFAULT_SEEDS if seeds is None else seeds), corpora=corpora,
                  steps=steps, budget=budget or DEFAULT_BUDGET, overrides=list(overrides), config=str(config))
    # A product of axes can hold cells that train one model twice (conv_kernel=3,4 under layers=A):
    # the later one is dropped, and said. A file's variants are the user's list: plan refuses those.
    for v, same_as, why in duplicates(ab, first_configs(ab)):
        ab.variants.remove(v)
        print(f"[ablate] variant {v.name} dropped: it trains the same model as {same_as.name} ({why})")
    return ab


def _override_text(key: str, value) -> str:
    """A YAML value as the `key=value` text that config.parse_override reads back to the same value."""
    if isinstance(value, str) and parse_override(f"{key}={value}")[1] == value:
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def _overrides_from(where: str, raw) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [_override_text(str(k), v) for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        return list(raw)
    raise AblationError(f"{where}: overrides must be a mapping of section.key: value or a list of "
                        f"'section.key=value' strings, got {raw!r}")


def _check_keys(where: str, got, allowed):
    for k in got:
        if k not in allowed:
            close = difflib.get_close_matches(str(k), allowed, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; keys: {', '.join(allowed)}"
            raise AblationError(f"{where}: unknown key {k!r}{hint}")


def _check_file_types(path, doc: dict):
    """arch a preset name, data one spec or a non-empty list of them, steps a positive integer, as
    their command-line flags (a list `arch:` was a TypeError; `data: {a: 1}` trained on "a")."""
    if "arch" in doc and not isinstance(doc["arch"], str):
        raise AblationError(f"{path}: arch must be a preset name, got {doc['arch']!r}")
    data = doc.get("data")
    if "data" in doc and not (isinstance(data, str) and data or isinstance(data, list) and data
                              and all(isinstance(d, str) and d for d in data)):
        raise AblationError(f"{path}: data must be a data spec or a non-empty list of them, got {data!r}")
    steps = doc.get("steps")
    if "steps" in doc and (not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0):
        raise AblationError(f"{path}: steps must be a positive integer, got {steps!r}")


def file_ablation(path, arch: Optional[str] = None, seeds=None, steps: Optional[int] = None,
                  corpora: Optional[list[str]] = None, budget: Optional[str] = None, overrides: list[str] = (),
                  config=DEFAULT_CONFIG) -> Ablation:
    """Named variants from a YAML file. Command-line values, when given, replace the file's
    (arch: only for variants without their own; overrides: appended after the file's). What
    neither gives comes from the config as in inline_ablation."""
    doc = read_yaml(path)
    _check_keys(str(path), doc, FILE_KEYS)
    raw_variants = doc.get("variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise AblationError(f"{path}: `variants` must be a mapping of name -> {{arch, overrides}}; "
                            "the first one is the baseline")
    common = _overrides_from(str(path), doc.get("overrides"))
    refuse_run_keys(f"{path}: overrides", common)
    _check_file_types(path, doc)
    data = corpora or doc.get("data")
    default_arch, steps, data = config_defaults(
        config, arch or doc.get("arch"), doc.get("steps") if steps is None else steps,
        [data] if isinstance(data, str) else data, common + list(overrides))
    variants = []
    for name, spec in raw_variants.items():
        spec = spec or {}
        where = f"{path}: variant {name!r}"
        if not isinstance(spec, dict):
            raise AblationError(f"{where} must be a mapping with keys {', '.join(VARIANT_KEYS)}")
        _check_keys(where, spec, VARIANT_KEYS)
        if safe_name(str(name)) != str(name):
            raise AblationError(f"{where}: names may use letters, digits and . _ = + , - only")
        variants.append(Variant(str(name), str(spec.get("arch") or default_arch),
                                _overrides_from(where, spec.get("overrides"))))
        refuse_run_keys(f"{where}: overrides", variants[-1].overrides)
    if arch and all((spec or {}).get("arch") for spec in raw_variants.values()):
        raise AblationError(f"--arch {arch} has no effect: every variant of {path} names its own arch; drop it "
                            "(or the variants' arch keys)")
    seeds = seeds if seeds is not None else doc.get("seeds", DEFAULT_SEEDS)
    return Ablation(variants=variants, seeds=seed_list(seeds), corpora=[str(d) for d in data], steps=steps,
                    budget=budget or doc.get("budget", DEFAULT_BUDGET), overrides=common + list(overrides),
                    config=str(config))


# ---- planning ----
def corpus_dirs(corpora: list[str]) -> dict[str, str]:
    """A directory name per corpus: the file's stem or the spec, numbered when two would clash."""
    out: dict[str, str] = {}
    for spec in corpora:
        p = Path(spec)
        slug = safe_name(p.stem if p.suffix else (p.name or spec)).lstrip(".") or "data"  # ("..": inside OUT)
        name, k = slug, 2
        while name in out.values():
            name, k = f"{slug}-{k}", k + 1
        out[spec] = name
    return out


def run_dir(ab: Ablation, variant: str, corpus: str, seed: int) -> str:
    """OUT/<variant>/seed<k>, with a corpus level above when there are several corpora."""
    rel = f"{variant}/seed{seed}"
    return f"{corpus_dirs(ab.corpora)[corpus]}/{rel}" if len(ab.corpora) > 1 else rel


def resolve(ab: Ablation, v: Variant, corpus: str, steps: int, seed: int) -> tuple[list[str], RunConfig]:
    """The run's full override list and its resolved config, errors naming the variant. The
    RUN_KEYS come last; Ablation refuses them in the overrides, so they replace nothing."""
    overrides = list(ab.overrides) + list(v.overrides) + [f"data.spec={corpus}", f"train.steps={steps}",
                                                          f"train.seed={seed}"]
    try:
        return overrides, load_config(ab.config, arch=v.arch, overrides=overrides)
    except SlmlabError as e:
        raise AblationError(f"variant {v.name}: {e}") from None


def _build(cfg: RunConfig):
    """The variant's model, on the meta device when the blocks allow it (no memory, no init)."""
    import torch

    from arch import build_model

    try:
        with torch.device("meta"):
            return build_model(cfg.model, cfg.objective)
    except (NotImplementedError, RuntimeError):
        return build_model(cfg.model, cfg.objective)


def measure(v: Variant, corpus: str, cfg: RunConfig) -> Cell:
    """Build the model once: parameters, layer string and FLOPs per token for the budget."""
    try:
        model = _build(cfg)
    except Exception as e:  # any failure to build is the variant's, reported before training starts
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AblationError(f"variant {v.name} does not build: {msg}") from None
    phases, windows, per_phase = resolve_phases(cfg), cfg.model.layer_windows(), []
    for p in phases:  # at each phase's attention windows, as the trainer runs (and counts) it
        model.set_windows(phase_windows(windows, p.window))
        per_phase.append(model.flops_per_token(p.seq_len))
    tokens = [p.steps * p.tokens_per_step for p in phases]
    fpt = sum(n * f for n, f in zip(tokens, per_phase)) / sum(tokens)
    return Cell(variant=v.name, corpus=corpus, layers=cfg.model.layer_summary(), params=model.num_params(),
                nonembed_params=model.num_params(exclude_embedding=True), flops_per_token=fpt,
                tokens_per_step=sum(tokens) / cfg.train.steps, steps=cfg.train.steps,
                bpb_is_bound=bool(getattr(model, "nll_is_bound", False)))


def budget_steps(budget: str, base_steps: int, base: Cell, cell: Cell) -> int:
    """Steps for `cell` so it spends what the baseline spends in `base_steps`: the same steps, the
    same tokens, or the same training FLOPs (a cheaper block then sees more tokens)."""
    if budget == "steps":
        return base_steps
    cost = (lambda c: c.tokens_per_step) if budget == "tokens" else (lambda c: c.tokens_per_step * c.flops_per_token)
    return max(1, round(base_steps * cost(base) / cost(cell)))


def first_configs(ab: Ablation) -> dict[str, RunConfig]:
    """Each variant's resolved config on the first corpus at the baseline's steps and first seed."""
    corpus = ab.corpora[0]  # data.spec is the same in every variant of a corpus
    return {v.name: resolve(ab, v, corpus, ab.steps, ab.seeds[0])[1] for v in ab.variants}


def unused_overrides(ab: Ablation, cfgs: dict[str, RunConfig]) -> list[str]:
    """'KEY=VALUE has no effect in any variant: WHY' for each common override that no variant's
    config (first_configs) reads."""
    out = []
    for text in ab.overrides:
        key = setting_key(parse_override(text)[0])
        whys = [why_unused(cfg, key) for cfg in cfgs.values()] if key else [None]
        if all(whys):
            out.append(f"{text} has no effect in any variant: {whys[0]}")
    return out


def duplicates(ab: Ablation, cfgs: dict[str, RunConfig]) -> list[tuple[Variant, Variant, str]]:
    """(variant, the earlier variant it trains the same model as, why) for each variant whose
    settings (first_configs) differ from an earlier one's only where neither reads them (slmlab/unused.py)."""
    out = []
    for i, v in enumerate(ab.variants):
        for w in ab.variants[:i]:
            a, b = cfgs[v.name], cfgs[w.name]
            keys = changed(a, b)
            if all(why_unused(a, k) and why_unused(b, k) for k in keys):
                out.append((v, w, "; ".join(unused_changes(a, b)) or "the same resolved config"))
                break
    return out


def plan(ab: Ablation) -> tuple[list[Cell], list[Run]]:
    """Every cell (variant x corpus, sized under the budget) and every run, interleaved by seed
    (seed 1 of every variant, then seed 2, ...) so that machine drift spreads over all variants."""
    first = first_configs(ab)
    twins = duplicates(ab, first)
    if twins:
        v, same_as, why = twins[0]
        raise AblationError(f"variant {v.name} trains the same model as {same_as.name} ({why}): drop one")
    for line in unused_overrides(ab, first):
        print(f"[ablate] note: {line}")
    cells: dict[tuple[str, str], Cell] = {}
    for corpus in ab.corpora:
        for v in ab.variants:
            _, cfg = resolve(ab, v, corpus, ab.steps, ab.seeds[0])
            cells[v.name, corpus] = measure(v, corpus, cfg)
        base = cells[ab.baseline.name, corpus]
        for v in ab.variants:
            c = cells[v.name, corpus]
            c.steps = budget_steps(ab.budget, ab.steps, base, c)
            if c.steps != ab.steps:  # the resized run must still be a valid config (phases, warmup)
                resolve(ab, v, corpus, c.steps, ab.seeds[0])
    runs = []
    for seed in ab.seeds:
        for corpus in ab.corpora:
            for v in ab.variants:
                overrides, cfg = resolve(ab, v, corpus, cells[v.name, corpus].steps, seed)
                runs.append(Run(variant=v.name, corpus=corpus, seed=seed, dir=run_dir(ab, v.name, corpus, seed),
                                arch=v.arch, overrides=overrides, config=ab.config, config_sha=config_sha(cfg.to_dict())))
    return list(cells.values()), runs


def manifest(ab: Ablation, cells: list[Cell], runs: list[Run]) -> dict:
    return {"ablation": ab.to_dict(), "cells": [asdict(c) for c in cells], "runs": [asdict(r) for r in runs]}


def load_manifest(path: Path) -> dict:
    """OUT/ablation.json, or a one-line AblationError when it is cut short or not a manifest."""
    try:
        man = json.loads(path.read_text())
    except ValueError as e:
        raise AblationError(f"{path} is not valid JSON ({e}); it was cut short or edited") from None
    except OSError as e:
        raise AblationError(f"{path}: {e.strerror}") from None
    if not isinstance(man, dict) or not all(isinstance(man.get(k), t) for k, t in
                                            (("ablation", dict), ("cells", list), ("runs", list))):
        raise AblationError(f"{path} is not an ablation manifest (needs ablation, cells and runs)")
    return man


def read_manifest(out) -> dict:
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise AblationError(f"{out} holds no ablation (no {MANIFEST})")
    return load_manifest(path)


def same_ablation(old: dict, new: dict) -> bool:
    """Equal definitions and equal resolved run configs (so an edited config.yaml counts as a change)."""
    return old.get("ablation") == new["ablation"] and old.get("runs") == new["runs"]
