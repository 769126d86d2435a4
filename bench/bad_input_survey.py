"""Bad-input survey (not a test): runs the careless and hostile inputs of issues 13 and 14 as a user would
type them and prints, per case, the exit status and the first line of stderr, flagging tracebacks,
hangs (60 s) and lost files. The test suite covers each case; this prints them all in one table.

    python bench/bad_input_survey.py            # read-only cases need root (a read-only bind mount)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # slmlab.tokenizer, imported below (`python bench/...` puts bench/ on the path, not ROOT)
TINY = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.n_layers=3", "model.vocab_size=300",
        "train.batch_size=4", "train.seq_len=32", "train.eval_every=100", "train.eval_tokens=512", "train.phases=[]",
        "train.warmup_steps=1", "train.sample_tokens=4", "logging.progress=false", "train.ckpt_every=2"]


def run(tool: str, *args, timeout: int = 60, env=None) -> tuple[str, str]:
    try:
        p = subprocess.run([sys.executable, str(ROOT / tool), *map(str, args)], capture_output=True, text=True,
                           timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    except subprocess.TimeoutExpired:
        return "hang", f"no exit within {timeout} s"
    err = p.stderr.strip().splitlines()
    tb = any(line.startswith("Traceback") for line in err)
    first = next((line for line in err if line.startswith("error:")), err[-1] if err else "")
    return f"{p.returncode}{' TRACEBACK' if tb else ''}", first[:200]


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="survey-"))
    corpus = tmp / "c.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 17}\n" for i in range(4000)))
    cache = f"data.cache_dir={tmp / 'cache'}"
    base = ["--data", corpus, "--steps", "4", "--device", "cpu", cache, *TINY]
    good = tmp / "good"
    assert run("train.py", "--out", good, *base)[0] == "0", "the tiny reference run failed"
    rows = []

    def case(group, what, tool, *args, check=None, **kw):
        rc, msg = run(tool, *args, **kw)
        lost = check() if check else ""
        rows.append((group, what, rc, msg + (f" **{lost}**" if lost else "")))

    # 1. data loss
    d = tmp / "notes"
    (d / "checkpoints").mkdir(parents=True)
    for n in ("summary.json", "sample.txt", "metrics.jsonl", "checkpoints/notes.txt"):
        (d / n).write_text("mine")
    case(1, "--out DIR holding a user's files, no config.yaml", "train.py", "--out", d, *base,
         check=lambda: "" if all((d / n).read_text() == "mine" for n in ("sample.txt", "checkpoints/notes.txt"))
         else "FILES LOST")
    case(1, "convert --run X --to hf --out X --force", "convert.py", "--run", good, "--to", "hf", "--out", good,
         "--force", check=lambda: "" if (good / "model.safetensors").is_file() else "RUN LOST")
    # 2. resume from a damaged state.pt (the run directory must stay as it was)
    import torch

    for what, mutate in (("state.pt without rng", lambda st: st.pop("rng")),
                         ("state.pt with step as a string", lambda st: st.update(step="4"))):
        r = tmp / what.replace(" ", "_")
        shutil.copytree(good, r)
        sp = sorted((r / "checkpoints").iterdir())[-1] / "state.pt"
        st = torch.load(sp, weights_only=True)
        mutate(st)
        torch.save(st, sp)
        before = {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()}
        case(2, f"--resume from a {what}", "train.py", "--resume", "--out", r, "--steps", "6",
             check=lambda r=r, before=before: "" if {p.name: p.read_bytes() for p in r.iterdir() if p.is_file()}
             == before else "RUN DIR CHANGED")
    # 3. values
    for ov in ("model.head_dim=-2", "model.ffn_dim=-64", "model.init_std=-1", "optim.betas=[2,3]", "optim.betas=[0.9]",
               "optim.eps=-1", "optim.weight_decay=-1"):
        case(3, ov, "train.py", "--out", tmp / "v", *base, ov)
    case(3, "sample.py --num-samples -1", "sample.py", "--run", good, "--num-samples", "-1")
    # 4. resources
    for ov in ("model.d_model=16384", "model.n_layers=1000002", "model.d_model=1000000000",
               "model.vocab_size=1000000000"):
        case(4, ov, "train.py", "--out", tmp / "r", *base, ov)
    bomb = tmp / "bomb.yaml"
    bomb.write_text("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
        + "model: {layers: *i}\n")
    case(4, f"--config of nested YAML aliases ({bomb.stat().st_size} bytes)", "train.py", "--config", bomb,
         "--out", tmp / "b")
    case(4, "sample.py --max-new-tokens 1000000000", "sample.py", "--run", good, "--max-new-tokens", "1000000000")
    # 5. data
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    case(5, "--data FIFO", "train.py", "--out", tmp / "f", "--data", fifo, "--steps", "2", cache, *TINY)
    bundle = next(p for p in (tmp / "cache").iterdir() if (p / "manifest.json").is_file())
    with open(bundle / "train.bin", "r+b") as fh:
        fh.truncate((bundle / "train.bin").stat().st_size - 1)
    case(5, "token cache truncated to an odd size", "train.py", "--out", tmp / "t1", *base)
    bundle = next(p for p in (tmp / "cache").iterdir() if (p / "manifest.json").is_file())
    (bundle / "val.bin").write_bytes(b"")
    case(5, "zero-byte val.bin", "train.py", "--out", tmp / "t2", *base)
    # 6. sample.py
    for flags in (["--top-k", "-1"], ["--temperature", "nan"], ["--temperature", "1e-45"],
                  ["--seed", "99999999999999999999999"]):
        case(6, "sample.py " + " ".join(flags), "sample.py", "--run", good, "--max-new-tokens", "4", *flags)
    case(6, "sample.py prompt with invalid UTF-8 bytes", "sample.py", "--run", good, "--max-new-tokens", "4",
         "--prompt", b"the \xff fox".decode("utf-8", "surrogateescape"))
    big = tmp / "bigtok"
    shutil.copytree(good, big)
    from slmlab.tokenizer import train_tokenizer

    texts = ["".join(chr(0x4E00 + (i * 7 + j) % 3000) for j in range(200)) for i in range(300)]
    (big / "tokenizer.json").write_text(train_tokenizer(texts, vocab_size=600).to_json())
    case(6, "sample.py: tokenizer ids past the model's vocab", "sample.py", "--run", big)
    # 7. convert --from-hf
    hf = tmp / "hf"
    run("convert.py", "--run", good, "--to", "hf", "--out", hf)
    for key, value in (("hidden_size", 10 ** 9), ("vocab_size", "lots"), ("num_hidden_layers", -1)):
        h = tmp / f"hf-{key}"
        shutil.copytree(hf, h)
        cfg = json.loads((h / "config.json").read_text())
        cfg[key] = value
        (h / "config.json").write_text(json.dumps(cfg))
        case(7, f"convert --from-hf with {key}: {value!r}", "convert.py", "--from-hf", h, "--out", tmp / f"o-{key}")
    # 9. fine-tuning (issue 14)
    bert = tmp / "hf-bert"
    shutil.copytree(hf, bert)
    (bert / "config.json").write_text(json.dumps({**json.loads((hf / "config.json").read_text()),
                                                  "model_type": "bert"}))
    case(9, "convert --from-hf of an unsupported family (bert)", "convert.py", "--from-hf", bert, "--out",
         tmp / "o-bert")
    chat = tmp / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    case(9, "SFT data: a chat without an assistant turn", "train.py", "--out", tmp / "sft", "--data", chat,
         "--steps", "2", cache, *TINY, f"train.init_from={good}")
    case(9, "train.lora.targets matching no module", "train.py", "--out", tmp / "lora", *base,
         f"train.init_from={good}", "train.lora.r=4", "train.lora.targets=[nope]")
    case(9, "convert --merge-lora on a run without adapters", "convert.py", "--merge-lora", good, "--out",
         tmp / "merged")
    # 8. filesystem: a read-only bind mount (needs root), and --out naming a file
    ro = tmp / "ro"
    ro.mkdir()
    (ro / "run").mkdir()
    shutil.copytree(good, ro / "run", dirs_exist_ok=True)
    mounted = subprocess.run(["mount", "--bind", str(ro), str(ro)]).returncode == 0 and subprocess.run(
        ["mount", "-o", "remount,bind,ro", str(ro)]).returncode == 0
    if mounted:
        case(8, "read-only --out (new run)", "train.py", "--out", ro / "new", *base)
        case(8, "read-only --resume", "train.py", "--resume", "--out", ro / "run", "--steps", "6")
        case(8, "read-only --force", "train.py", "--out", ro / "run", "--force", *base)
        case(8, "read-only data.cache_dir", "train.py", "--out", tmp / "c", *base, f"data.cache_dir={ro / 'cache'}")
        case(8, "convert --to hf into a read-only dir", "convert.py", "--run", good, "--to", "hf", "--out", ro / "hf")
        case(8, "convert --from-hf into a read-only dir", "convert.py", "--from-hf", hf, "--out", ro / "imported")
        subprocess.run(["umount", str(ro)])
    else:
        rows.append((8, "read-only destinations", "skipped", "needs root for a read-only bind mount"))
    f = tmp / "afile"
    f.write_text("mine")
    case(8, "--out naming an existing file", "train.py", "--out", f, *base,
         check=lambda: "" if f.read_text() == "mine" else "FILE LOST")

    print("| group | input | exit | first line of stderr |\n| --- | --- | --- | --- |")
    for g, what, rc, msg in rows:
        print(f"| {g} | {what} | {rc} | {msg.replace('|', '/')} |")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
