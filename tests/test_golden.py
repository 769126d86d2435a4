"""Golden loss trace: a tiny seeded run's per-step losses, diffed against a stored trace so that
silent numerical changes (init, data order, tokenizer, schedule, optimizer routing) show up.

After an intended change: python tests/test_golden.py --update, and say why in the commit.
"""
import json
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).parent / "golden" / "loss_trace.json"
TOL = 2e-4  # fp32 CPU kernels may reassociate sums across torch builds; real changes move losses by >1e-2

CASES = {
    "hybrid-adamw": ["--arch", "hybrid", "optim.name=adamw"],
    "transformer-muon": ["--arch", "transformer", "optim.name=muon", "model.window_pattern=SL", "model.window=8"],
}


def corpus_text() -> str:
    # Generated, not read from ../shared, so the trace depends on the code alone.
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "(", ")", ":", "\n", "    ", "x", "=", "+"]
    out, state = [], 12345
    for _ in range(30000):
        state = (1103515245 * state + 12345) % (2 ** 31)
        out.append(words[state % len(words)])
    return " ".join(out)


def trace(tmp: Path, case: str) -> list[float]:
    import train
    from slmlab.cli import run_cli

    corpus = tmp / "corpus.txt"
    corpus.write_text(corpus_text())
    out = tmp / case
    argv = ["--data", str(corpus), "--out", str(out), "--steps", "8", "--device", "cpu", "--seed", "7",
            f"data.cache_dir={tmp / 'cache'}", "model.vocab_size=300", "model.d_model=32", "model.n_layers=3",
            "model.n_heads=4", "model.n_kv_heads=2", "train.phases=[]", "train.batch_size=4", "train.seq_len=32",
            "train.log_every=1", "train.eval_every=1000", "train.eval_tokens=512", "train.warmup_steps=2",
            "train.ckpt_every=0", "train.sample_tokens=1", "logging.progress=false", *CASES[case]]
    assert run_cli(train.main, argv) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if "loss" in r and not r.get("final")]
    final = [r["val_loss"] for r in recs if r.get("final")]
    return losses + final


@pytest.mark.parametrize("case", list(CASES))
def test_loss_trace_matches_golden(tmp_path, case):
    golden = json.loads(GOLDEN.read_text())[case]
    got = trace(tmp_path, case)
    assert len(got) == len(golden)
    diffs = [abs(a - b) for a, b in zip(got, golden)]
    assert max(diffs) <= TOL, f"{case}: loss trace moved (max diff {max(diffs):.2e})\ngot    {got}\ngolden {golden}"


if __name__ == "__main__":
    import tempfile

    if "--update" not in sys.argv:
        sys.exit("usage: python tests/test_golden.py --update")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory() as d:
        traces = {case: trace(Path(d), case) for case in CASES}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(traces, indent=1) + "\n")
    print(f"wrote {GOLDEN}")
