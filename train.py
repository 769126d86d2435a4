"""Train a small language model.

    python train.py --arch hybrid                      # default config, embedded stdlib data
    python train.py --arch transformer --layers CCA model.d_model=128 train.steps=100
    python train.py --resume --out runs/my-run                # continue from the latest checkpoint
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
                        "any overrides given here; the model shape must not change)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. model.d_model=128")
    return p.parse_intermixed_args(argv)  # lets overrides and flags mix in any order


def main(argv=None):
    args = parse_args(argv)
    from slmlab.config import DEFAULT_CONFIG, load_config
    from slmlab.trainer import train

    overrides = list(args.overrides)
    for flag, key in (("data", "data.spec"), ("steps", "train.steps"), ("device", "train.device"),
                      ("seed", "train.seed")):
        v = getattr(args, flag)
        if v is not None:
            overrides.append(f"{key}={v}")
    if args.resume:
        from slmlab.errors import ConfigError
        from slmlab.rundir import CONFIG, RunDir

        if not args.out:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        saved = RunDir.open(args.out, need=(CONFIG,), label="--resume: ").path / CONFIG
        if args.arch or args.config:  # rebuild from the given config; train() checks the model is unchanged
            cfg = load_config(args.config or DEFAULT_CONFIG, arch=args.arch, overrides=overrides, layers=args.layers,
                              imports=args.imports)
        else:
            cfg = load_config(saved, overrides=overrides, layers=args.layers, imports=args.imports)
        train(cfg, Path(args.out), resume=True)
        return
    cfg = load_config(args.config or DEFAULT_CONFIG, arch=args.arch or "hybrid", overrides=overrides,
                      layers=args.layers, imports=args.imports)
    out = Path(args.out) if args.out else Path("runs") / f"{cfg.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    train(cfg, out, force=args.force)


if __name__ == "__main__":
    sys.exit(run_cli(main))
