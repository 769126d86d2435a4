"""ONNX: model.onnx (prefill, dynamic batch and length) + decode.onnx (StepLM: states in and out).

Both come from torch.onnx.export(dynamo=True). decode.onnx inputs: input_ids [B, T] int64,
pos [1] int64, then the states named in export.json; outputs: logits, then `<state>_out` in the
same order. onnxruntime loads both before the folder is published; `run_onnx` runs them. A model
with a one-token block (step.one_token_blocks: deltanet) gets decode.onnx alone with T fixed at 1
(export.json: "one_token": true); run_onnx then feeds a prompt token by token.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..errors import ConfigError
from . import DTYPES, require
from .step import Prefill, StepLM, check_supported, one_token_blocks, seq_axis  # noqa: F401


def prepare(model, opts):
    model = copy.deepcopy(model).eval()
    if opts.quant == "int8":
        from .quant import quantize_int8

        quantize_int8(model)
    return model.to(DTYPES[opts.dtype])


def export(model, tok, cfg, out: Path, opts):
    require("onnx", "onnx", "onnx")
    require("onnxscript", "onnx", "onnx")
    out.mkdir(parents=True)
    model = prepare(model, opts)
    dt = DTYPES[opts.dtype]
    one = bool(one_token_blocks(cfg.model))
    n, seq = seq_axis(opts.max_len, 8, one)
    B = torch.export.Dim("batch", min=1, max=1024)
    idx = torch.zeros(2, n, dtype=torch.long)
    axes = {0: B, **seq}
    graphs = ["decode.onnx"] if one else ["model.onnx", "decode.onnx"]
    if not one:
        _export(Prefill(model, opts.max_len), (idx,), {"idx": axes}, ["input_ids"], ["logits"], out / "model.onnx")

    step = StepLM(model, opts.max_len).eval()
    names = step.state_names()
    states = step.init_states(2, dt)
    pos = torch.zeros(1, dtype=torch.long)
    dyn = {"idx": axes, "pos": None, "states": [{0: B} for _ in states]}
    _export(step, (idx, pos, *states), dyn, ["input_ids", "pos", *names],
            ["logits", *[n + "_out" for n in names]], out / "decode.onnx")
    meta = {"max_len": opts.max_len, "dtype": opts.dtype, "quant": opts.quant, "graphs": graphs, "one_token": one,
            "states": names,
            "state_shapes": [list(s[1:]) for s in step.state_shapes(1)],
            # an fp16 export keeps a recurrent block's state (mamba2's h, deltanet's S) in fp32
            "state_dtypes": [str(t.dtype).removeprefix("torch.") for t in states], "layers": cfg.model.layer_types(),
            # start_id: what a text starts after (eos for slmlab's own tokenizer: bos never trained), as --to hf/gguf
            "start_id": tok.start_id, "eos_id": tok.eos_id}
    (out / "export.json").write_text(json.dumps(meta, indent=1))
    tok.save(out / "tokenizer.json")
    check_loads(out, graphs)
    return {"graphs": graphs, "max_len": opts.max_len, "one_token": one}


def check_loads(folder: Path, graphs=("model.onnx", "decode.onnx")):
    """onnxruntime loads the graphs, before anything is published: the exporter accepts graphs whose
    operators onnxruntime has no kernel for (it did bf16 Conv and Expand)."""
    ort = require("onnxruntime", "onnx", "onnx")
    opt = ort.SessionOptions()
    opt.log_severity_level = 3
    for name in graphs:
        try:
            ort.InferenceSession(str(folder / name), opt, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own (pybind) exception types
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"onnxruntime cannot load the exported {name}: {msg}") from None


def _export(module, args, dynamic, input_names, output_names, path):
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" noise
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=_dyn_for(module, dynamic),
                                 input_names=input_names, output_names=output_names, verbose=False,
                                 optimize=True)
    prog.save(str(path), external_data=False)


def _dyn_for(module, dynamic):
    # dynamic_shapes mirrors forward's signature; StepLM takes *states as one tuple argument.
    if isinstance(module, StepLM):
        return (dynamic["idx"], dynamic["pos"], tuple(dynamic["states"]))
    return (dynamic["idx"],)


def run_onnx(folder, idx, n_steps: int, feed=None, threads: int = 0):
    """onnxruntime: prefill logits from model.onnx, the prompt again through decode.onnx, then
    n_steps decode steps (feeding `feed` tokens, else greedy). Returns (prefill, decode-prefill,
    tokens, step logits) as torch tensors; threads: onnxruntime's intra-op threads (0: its default).
    A one-token export (no model.onnx) feeds the prompt
    token by token, and its prefill is that decode-prefill."""
    ort = require("onnxruntime", "onnx", "onnx")
    import numpy as np

    folder = Path(folder)
    meta = json.loads((folder / "export.json").read_text())
    opt = ort.SessionOptions()
    opt.log_severity_level = 3
    opt.intra_op_num_threads = threads
    dec = ort.InferenceSession(str(folder / "decode.onnx"), opt, providers=["CPUExecutionProvider"])
    x = idx.numpy().astype(np.int64)
    B = x.shape[0]
    if x.shape[1] + n_steps > meta["max_len"]:  # past it the states' writes fall off their end: wrong logits, no error
        raise ConfigError(f"{x.shape[1]} prompt tokens + {n_steps} steps exceed the export's max_len "
                          f"{meta['max_len']} (convert.py --max-len)")
    states = [np.zeros([B, *s], dtype=np.dtype(d)) for s, d in zip(meta["state_shapes"], meta["state_dtypes"])]

    def step(tokens, p, states):
        feeds = {"input_ids": tokens, "pos": np.array([p], dtype=np.int64)}
        feeds.update(dict(zip(meta["states"], states)))
        out = dec.run(None, feeds)
        return out[0], out[1:]

    if meta.get("one_token"):
        firsts = []
        for i in range(x.shape[1]):
            logits, states = step(x[:, i:i + 1], i, states)
            firsts.append(logits)
        first = prefill = np.concatenate(firsts, 1)
    else:
        pre = ort.InferenceSession(str(folder / "model.onnx"), opt, providers=["CPUExecutionProvider"])
        prefill = pre.run(["logits"], {"input_ids": x})[0]
        logits, states = step(x, 0, states)
        first = logits
    p = x.shape[1]
    toks, steps = [], []
    nxt = logits[:, -1:].argmax(-1)
    for i in range(n_steps):
        if feed is not None:
            nxt = feed[:, i:i + 1].numpy().astype(np.int64)
        toks.append(nxt)
        logits, states = step(nxt, p, states)
        p += 1
        steps.append(logits)
        nxt = logits[:, -1:].argmax(-1)
    t = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    toks = np.concatenate(toks, 1) if toks else np.zeros((B, 0), np.int64)
    steps = np.concatenate(steps, 1) if steps else np.zeros((B, 0, prefill.shape[-1]), np.float32)
    return t(prefill), t(first), torch.from_numpy(toks), t(steps)
