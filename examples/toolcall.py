"""A verifiable tool-call format for the fine-tuning worked example (docs/finetune.md).

Every reply is `<think>REASON</think>TOOL_USE[TOOL:{JSON PARAMS}]`, and the right call follows
from the request, so a reply is checked exactly: does it parse, and is it the reference call?

    python examples/toolcall.py make --out data/toolcall            # train.jsonl + test.jsonl
    python examples/toolcall.py score --data data/toolcall/test.jsonl --pred preds.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slmlab.cli import run_cli
from slmlab.errors import DataError

CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Delhi", "Quito", "Rome", "Berlin", "Madrid", "Dakar", "Hanoi",
          "Seoul", "Accra", "Kyiv", "Bogota"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "June", "Kofi", "Lena"]
TOPICS = ["rust lifetimes", "bread recipes", "tide tables", "chess openings", "solar panels", "jazz piano",
          "tax forms", "bike repair", "moon phases", "python decorators", "sourdough", "knot tying"]
SUBJECTS = ["the budget", "lunch", "the release", "the trip", "the invoice", "the party", "the report"]

# (tool, request templates, think template, params) per tool.
TOOLS = [
    ("get_weather", ["What's the weather in {city}?", "Is it raining in {city}?", "Weather for {city} please."],
     "The user wants the weather in {city}.", lambda r: {"city": r.choice(CITIES)}),
    ("set_timer", ["Set a timer for {minutes} minutes.", "Remind me in {minutes} minutes.",
                   "Start a {minutes} minute timer."],
     "A timer of {minutes} minutes.", lambda r: {"minutes": r.randint(1, 90)}),
    ("search", ["Search the web for {query}.", "Look up {query}.", "Find pages about {query}."],
     "The user wants to search for {query}.", lambda r: {"query": r.choice(TOPICS)}),
    ("send_email", ["Email {to} about {subject}.", "Send {to} a note about {subject}.",
                    "Write to {to} regarding {subject}."],
     "An email to {to} about {subject}.", lambda r: {"to": r.choice(NAMES), "subject": r.choice(SUBJECTS)}),
]
CALL = re.compile(r"<think>([^<]*)</think>TOOL_USE\[(\w+):(\{.*\})\]", re.S)


def example(r: random.Random) -> dict:
    tool, asks, think, params = r.choice(TOOLS)
    p = params(r)
    reply = f"<think>{think.format(**p)}</think>TOOL_USE[{tool}:{json.dumps(p)}]"
    return {"prompt": r.choice(asks).format(**p), "completion": reply}


def make(n: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """`n` distinct examples; the last `held_out` (prompts never seen in training) are the test split."""
    r, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        ex = example(r)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(ex)
    return out[:n - held_out], out[n - held_out:]


def parse_call(reply: str):
    """(tool, params) of a well-formed reply, or None: the whole reply must be one call."""
    m = CALL.fullmatch(reply.strip())
    if not m:
        return None
    try:
        params = json.loads(m.group(3))
    except json.JSONDecodeError:
        return None
    return (m.group(2), params) if isinstance(params, dict) else None


def score(refs: list[dict], preds: list[dict]) -> dict:
    """format: share of replies that parse as one call; exact: share that are the reference call
    (tool and params equal; the think text is free)."""
    by_prompt = {p["prompt"]: p["completion"] for p in preds}
    fmt = exact = 0
    for ref in refs:
        got = parse_call(by_prompt.get(ref["prompt"], ""))
        fmt += got is not None
        exact += got is not None and got == parse_call(ref["completion"])
    return {"n": len(refs), "format_ok": fmt / len(refs), "exact": exact / len(refs)}


def read_jsonl(path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: {e}") from None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="write OUT/train.jsonl and OUT/test.jsonl ({prompt, completion})")
    mk.add_argument("--out", required=True)
    mk.add_argument("--n", type=int, default=400, help="examples in all (default 400)")
    mk.add_argument("--held-out", type=int, default=60, help="of them in test.jsonl (default 60)")
    mk.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="exact-format accuracy of --pred against the references in --data")
    sc.add_argument("--data", required=True, help="the reference jsonl (test.jsonl)")
    sc.add_argument("--pred", required=True, help="sample.py --prompts output for the same prompts")
    args = p.parse_args(argv)
    if args.cmd == "make":
        if not 0 < args.held_out < args.n <= 5000:
            raise DataError("need 0 < --held-out < --n <= 5000")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, rows in zip(("train", "test"), make(args.n, args.held_out, args.seed)):
            (out / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
        (out / "test_prompts.jsonl").write_text("".join(json.dumps({"prompt": x["prompt"]}) + "\n" for x in rows))
        print(f"wrote {out}/train.jsonl ({args.n - args.held_out}), test.jsonl ({args.held_out}), test_prompts.jsonl")
    else:
        print(json.dumps(score(read_jsonl(args.data), read_jsonl(args.pred))))


if __name__ == "__main__":
    sys.exit(run_cli(main))
