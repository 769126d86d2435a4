"""Compare a few runs: a table of their numbers, what differs in their configs, what their numbers
cannot be compared for, and optionally their curves.

    python compare.py runs/a runs/b runs/c
    python compare.py runs/a runs/b --plot cmp.png --x steps     # val bpb and train loss against steps
    python compare.py runs/a runs/b --json                         # the rows and differences as JSON

A run still training, or killed, is compared from its metrics.jsonl. The first run is the one the
others' settings are compared with. See docs/training.md (Comparing runs).
"""
from __future__ import annotations

import argparse
import sys

from slmlab.cli import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN", help="run directories written by train.py (the first is the "
                                                          "reference for what differs)")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of val bpb and train loss against --x")
    p.add_argument("--x", choices=["tokens", "steps", "time"], default=None,
                   help="the plot's x axis: training tokens (default), optimizer steps or training time")
    p.add_argument("--force", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print one JSON object (rows, differences, notes) instead")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from slmlab.compare import check_plot, compare
    from slmlab.errors import ConfigError

    if not args.plot:  # nothing is silently ignored
        given = [f for f, v in (("--x", args.x), ("--force", args.force)) if v]
        if given:
            raise ConfigError(f"{'/'.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --plot PATH; "
                              "give one or drop it")
    else:
        check_plot(args.plot, args.force)
    compare(args.runs, args.plot, args.x or "tokens", args.json)


if __name__ == "__main__":
    sys.exit(run_cli(main))
