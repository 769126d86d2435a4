"""Write a next-line multiple-choice task (eval.py's generic jsonl) from the default data's validation
files: the standard library modules `python train.py` holds out, so no run trained on them.

    python bench/nextline_task.py --out /tmp/nextline.jsonl --items 500
    python eval.py --run runs/a --run runs/b --tasks /tmp/nextline.jsonl

Each item: 8 lines of a module as the context, its next line against 3 lines drawn from other held-out
modules with the same indentation (so indentation alone gives nothing away). Seeded, deterministic
for one Python version's standard library.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--context-lines", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from slmlab.data import stdlib_root, stdlib_split

    root = stdlib_root()
    files = {f: (root / f).read_text(encoding="utf-8", errors="replace").splitlines() for f in stdlib_split()[1]}
    good = lambda s: len(s.strip()) >= 12 and not s.strip().startswith("#")  # noqa: E731
    indent = lambda s: len(s) - len(s.lstrip(" "))  # noqa: E731
    by_indent: dict[int, list[tuple[str, str]]] = {}
    for f, lines in files.items():
        for s in lines:
            if good(s):
                by_indent.setdefault(indent(s), []).append((f, s))
    rng = random.Random(args.seed)
    names, n_ctx, items = sorted(files), args.context_lines, []
    while len(items) < args.items:
        f = rng.choice(names)
        lines = files[f]
        if len(lines) <= n_ctx:
            continue
        i = rng.randrange(n_ctx, len(lines))
        pool = sorted({s for g, s in by_indent.get(indent(lines[i]), []) if g != f and s != lines[i]})
        if not good(lines[i]) or len(pool) < 3:
            continue
        choices = [lines[i], *rng.sample(pool, 3)]  # distinct: the label names one choice
        rng.shuffle(choices)
        items.append({"context": "\n".join(lines[i - n_ctx:i]) + "\n", "choices": choices,
                      "label": choices.index(lines[i])})
    Path(args.out).write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {args.out}: {len(items)} items from {len(files)} held-out modules")


if __name__ == "__main__":
    main()
