"""Peak memory and time of data preparation on a directory of .jsonl shards, at two corpus sizes.

    python bench/data_memory.py ../shared/data/tinyshakespeare.txt --mb 100 200 [--single]

Writes --mb megabytes of documents (random runs of 5-40 lines of SOURCE, each with a distinct last
line) as 10 MB .jsonl shards (--single: as one .jsonl file), then prepares each corpus (a BPE tokenizer of --vocab trained on its
sample, both splits tokenized, a fresh cache) in a fresh process and prints its peak RSS (ru_maxrss)
and wall time. Preparation that holds the corpus grows with it; one that streams it file by file
does not. Each process also pays the imports (~300 MB) and the tokenizer trainer.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PREPARE = """
import json, resource, sys, time
from slmlab.data import prepare_data
t = time.perf_counter()
b = prepare_data(sys.argv[1], int(sys.argv[3]), sys.argv[2], progress=False, quiet=True)
print(json.dumps({"s": time.perf_counter() - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "train_tokens": b.manifest["n_train_tokens"], "train_sha256": b.manifest["train_sha256"][:12]}))
"""


def write_shards(source: Path, out: Path, mb: int, single: bool = False, seed: int = 0) -> Path:
    """The corpus: a directory of 10 MB shards, or (single) one .jsonl of the same documents."""
    lines = source.read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    out.mkdir(parents=True)
    for shard in range(-(-mb // 10)):
        with open(out / ("all.jsonl" if single else f"shard{shard:03d}.jsonl"), "a", encoding="utf-8") as f:
            written = 0
            while written < min(10, mb - 10 * shard) * 2**20:
                i = rng.randrange(len(lines) - 40)
                doc = "\n".join(lines[i:i + rng.randrange(5, 40)]) + f"\n-- {rng.random()}\n"
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc)
    return out / "all.jsonl" if single else out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", type=Path, help="a text file to draw lines from")
    ap.add_argument("--mb", type=int, nargs="+", default=[100, 200], help="corpus sizes in MB of text")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--single", action="store_true", help="one .jsonl file instead of 10 MB shards")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        print("| corpus | peak RSS | time | train tokens |\n| --- | --- | --- | --- |")
        for mb in args.mb:
            corpus = write_shards(args.source, Path(tmp) / f"c{mb}", mb, args.single)
            r = subprocess.run([sys.executable, "-c", PREPARE, str(corpus), str(Path(tmp) / f"cache{mb}"),
                                str(args.vocab)], cwd=ROOT, capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {mb} MB | {m['rss_mb']:,.0f} MB | {m['s']:.1f} s | {m['train_tokens']:,} |", flush=True)


if __name__ == "__main__":
    main()
