"""A tiny pretrained base run and chat data for the SFT and LoRA tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

from trainer_helpers import run_train, tiny_overrides, write_corpus

WORDS = "the of and to a in is it you that".split()


def sft_overrides(tmp: Path, steps: int, **extra) -> list[str]:
    """tiny_overrides with one phase long enough for a ChatML example over a 300-token vocabulary."""
    return tiny_overrides(tmp, steps=steps, **{"train.phases": "[]", "train.seq_len": 96, "train.batch_size": 8,
                                                "optim.lr": 0.01, **extra})


def write_chat(path: Path, n: int = 60, seed: int = 0) -> Path:
    """`say W` -> `W W`: a reply the model can learn from the prompt in a few dozen steps."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            w = rng.choice(WORDS)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                             {"role": "assistant", "content": f"{w} {w}"}]}) + "\n")
    return path


def make_base(tmp: Path) -> Path:
    corpus = write_corpus(tmp / "corpus.txt")
    res = run_train(["--arch", "hybrid", "--data", str(corpus), "--out", str(tmp / "base"),
                     *sft_overrides(tmp, steps=6)])
    assert res.returncode == 0, res.stderr
    return tmp / "base"
