"""Train a small language model.

    python train.py --arch hybrid                      # default config, embedded stdlib data
    python train.py --arch transformer --layers CCA model.d_model=128 train.steps=100
    python train.py --resume --out runs/my-run                # continue from the latest checkpoint
    python train.py --arch hybrid --size 350m --dry-run --mem 16GB   # will it fit? (nothing is trained)
    torchrun --nproc_per_node 2 train.py --arch hybrid        # DDP (train.parallel=fsdp for FSDP2)

Extra arguments of the form section.key=value override any key of config.yaml.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from slmlab.cli import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=None, help="preset from config.yaml's presets (default: hybrid)")
    p.add_argument("--config", default=None, help="config file (default: config.yaml beside train.py)")
    p.add_argument("--data", default=None, help="data spec: stdlib | PATH | hf:NAME[:CONFIG][@SPLIT] (= data.spec)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<arch>-<timestamp>)")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (= train.steps)")
    p.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="(= train.device)")
    p.add_argument("--layers", default=None, help="layer pattern overriding the preset, e.g. CCA or conv,attn")
    p.add_argument("--seed", type=int, default=None, help="(= train.seed)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="load a Python file or module that registers blocks before the layer pattern is "
                        "parsed, e.g. --import ~/blocks/shift.py --layers SSA (repeatable; = model.imports)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint (its saved config.yaml plus "
                        "any overrides given here, optim.* ones applying from the resumed step; the model shape and "
                        "train.seed must not change)")
    p.add_argument("--size", default=None,
                   help="model shape from config.yaml's sizes, e.g. 124m, 350m, 1b (default: the model section)")
    p.add_argument("--dry-run", action="store_true",
                   help="print parameters, FLOPs, the memory breakdown per phase and step time, then exit")
    p.add_argument("--mem", default=None, metavar="SIZE",
                   help="device memory to fit, e.g. 16GB: --dry-run's largest micro-batch; a real run's "
                        "memory check (default: the device's free memory)")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="--dry-run: estimate for this GPU (datasheet bf16 peak, fp16 for V100/T4; memory), e.g. H100, "
                        "'RTX 4090'")
    p.add_argument("--world", type=int, default=None, metavar="N",
                   help="--dry-run: ranks under torchrun (train.parallel picks DDP or FSDP); memory per rank")
    p.add_argument("--mfu", type=float, default=None,
                   help="--dry-run: model FLOPs utilisation assumed for step times, times the --gpu datasheet peak or "
                        "the measured CPU matmul peak (default 0.35)")
    p.add_argument("--json", action="store_true", help="--dry-run: print the estimate as one JSON object")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (presets, --size, --layers and overrides applied; what the run's "
                        "config.yaml will hold) as YAML, then exit")
    p.add_argument("--force-memory", action="store_true",
                   help="train even when the memory estimate exceeds the device's free memory")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.d_model=128")
    return p.parse_intermixed_args(argv)  # lets overrides and flags mix in any order


# Flags that stand for one config key. --layers applies before the overrides (load_config's order),
# the others are appended to them; --import is not here: it adds to model.imports, replacing nothing.
SHORTCUTS = {"data": "data.spec", "steps": "train.steps", "device": "train.device", "seed": "train.seed",
             "layers": "model.layers"}
APPENDED = ("data", "steps", "device", "seed")


def flag_overrides(args) -> list[str]:
    """The overrides the shortcut flags stand for. A flag and an override of its own key are an error:
    which of the two wins is a guess the command line should not leave to the reader."""
    from slmlab.config import parse_override
    from slmlab.errors import ConfigError

    keys = {parse_override(text)[0]: text for text in args.overrides}
    for flag, key in SHORTCUTS.items():
        v = getattr(args, flag)
        if v is not None and key in keys:
            raise ConfigError(f"--{flag} {v} and {keys[key]} both set {key}: give one of them")
    return [f"{SHORTCUTS[flag]}={getattr(args, flag)}" for flag in APPENDED if getattr(args, flag) is not None]


def device_type(cfg, dry_run_gpu=None) -> str:
    """Where the run trains, "cuda" or "cpu", by runtime.resolve_device's rule. The dry run passes
    dry_run_gpu (whether --mem or --gpu was given): it may estimate for a GPU this machine lacks, so
    train.device=cuda means CUDA there, and so do --mem and --gpu unless the run is pinned to the CPU
    (then --mem is its RAM)."""
    from slmlab.runtime import resolve_device

    if dry_run_gpu is not None and cfg.train.device != "cpu" and (dry_run_gpu or cfg.train.device == "cuda"):
        return "cuda"
    return resolve_device(cfg.train.device).type


def dry_run(cfg, args):
    import json

    from slmlab.errors import ConfigError
    from slmlab.estimate import DEFAULT_MFU, estimate, parse_mem, report
    from slmlab.preflight import check_inputs

    if cfg.data.added_tokens:  # they grow model.vocab_size, and so the estimate; else the tokenizer is not needed
        from slmlab.data import given_tokenizer

        given_tokenizer(cfg, say=lambda msg: None if args.json else print(msg))
    from slmlab.data import resolve_spec

    for spec in {cfg.data.spec, *(p.data for p in cfg.train.phases if p.data)}:  # the specs load_data prepares
        resolve_spec(spec)  # a mistyped --data path is an error here too, not at the real run's start
    if args.gpu and cfg.train.device == "cpu":  # its memory would be the CPU run's, its time the GPU's
        raise ConfigError(f"--gpu {args.gpu} estimates a GPU run, but train.device=cpu pins it to the CPU: drop one")
    device = device_type(cfg, dry_run_gpu=bool(args.mem or args.gpu))
    check_inputs(cfg, device)
    est = estimate(cfg, device=device, world=1 if args.world is None else args.world,
                   mem=parse_mem(args.mem) if args.mem else None,
                   gpu=args.gpu, mfu=args.mfu if args.mfu is not None else DEFAULT_MFU)
    print(json.dumps(est) if args.json else report(est))


def check_memory(cfg, args):
    """Stop before training (one line) when the estimate exceeds the device's free memory."""
    import os

    from slmlab.estimate import check_fits, free_memory, parse_mem

    cuda = device_type(cfg) == "cuda"
    budget, where = (parse_mem(args.mem), "given by --mem") if args.mem else free_memory(cuda)
    check_fits(cfg, budget, where, cuda, world=int(os.environ.get("WORLD_SIZE", "1")))


def main(argv=None):
    args = parse_args(argv)
    from slmlab.config import DEFAULT_CONFIG, load_config
    from slmlab.errors import ConfigError

    if not args.dry_run:
        used = [f for f, v in (("--gpu", args.gpu), ("--world", args.world), ("--mfu", args.mfu),
                               ("--json", args.json)) if v is not None and v is not False]
        if used:
            raise ConfigError(f"{', '.join(used)} only appl{'ies' if len(used) == 1 else 'y'} to --dry-run")
    elif args.resume or args.force_memory:  # (--out and --force stay: a dry run of the command about to be run)
        raise ConfigError("--dry-run trains nothing: drop --resume / --force-memory")
    if args.resume and args.force:  # --force would replace the very run --resume continues
        raise ConfigError("--resume continues the run in --out and --force replaces it: give one of them")
    if args.print_config:
        extra = [f for f, v in (("--dry-run", args.dry_run), ("--force", args.force), ("--force-memory", args.force_memory),
                                ("--mem", args.mem), ("--out", args.out and not args.resume)) if v]
        if extra:
            raise ConfigError(f"--print-config only prints the config: drop {', '.join(extra)}")

    overrides = list(args.overrides) + flag_overrides(args)
    source = {"path": args.config or DEFAULT_CONFIG, "arch": args.arch, "size": args.size}  # else the file's arch
    if args.resume:
        from slmlab.rundir import CONFIG, RunDir

        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = RunDir.open(args.out, need=(CONFIG,), label="--resume: ").path / CONFIG
        if not (args.arch or args.config or args.size):  # else rebuilt from the given config; train() checks the model
            source = {"path": saved, "arch": None, "size": None}
    cfg = load_config(**source, overrides=overrides, layers=args.layers, imports=args.imports)
    note_unused(cfg, source, args.imports, config_file=args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return
    if args.dry_run:
        dry_run(cfg, args)
        return
    if not args.force_memory:
        check_memory(cfg, args)
    from slmlab.trainer import train  # after the dry run's exit: it imports the data pipeline

    if args.resume:
        train(cfg, Path(args.out), resume=True)
        return
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    train(cfg, out, force=args.force)


def note_unused(cfg, source: dict, imports: list, config_file=None):
    """A note line for each setting this command line changed that the config never reads
    (slmlab/unused.py): `optim.muon_lr` under adamw, `train.seq_len` while phases set their own; and,
    with --config FILE, each setting FILE changes from the defaults (config.yaml, same preset and
    size; the bare defaults for a FILE naming no preset) that is never read, named as FILE's. On
    stderr, so --json and --print-config keep stdout machine-readable."""
    import os

    from slmlab.config import load_config
    from slmlab.errors import SlmlabError
    from slmlab.unused import unused_changes

    if os.environ.get("RANK", "0") != "0":
        return
    baselines = [(lambda: load_config(**source, imports=imports), "")]
    if config_file:
        baselines.append((lambda: file_baseline(cfg.arch, source["size"], imports), f"{config_file}: "))
    noted = set()
    for baseline, where in baselines:
        try:
            base = baseline()
        except SlmlabError:  # the file alone does not resolve (an override completes it), or its preset is
            continue         # its own: nothing to compare with
        for line in unused_changes(cfg, base):
            key = line.partition("=")[0]
            if key not in noted:
                noted.add(key)
                print(f"note: {where}{line}", file=sys.stderr)


def file_baseline(arch: str, size, imports: list):
    """What a --config file's settings are compared with: config.yaml under the same preset and size,
    or, for a file naming no preset (arch custom), the defaults it replaces config.yaml with."""
    from slmlab.config import CUSTOM, DEFAULT_CONFIG, defaults, load_config

    if arch == CUSTOM:
        return defaults(imports)
    return load_config(DEFAULT_CONFIG, arch=arch, size=size, imports=imports)


if __name__ == "__main__":
    sys.exit(run_cli(main))
