"""ExecuTorch: a .pte of StepLM (prefill and decode in one method) lowered with XNNPACK.

Method `forward(input_ids [1, T] int64, pos [1] int64, *states) -> (logits [1, T, V], *states)`,
T dynamic in 1..max_len (fixed at 1 for a model with a one-token block, step.one_token_blocks:
run_pte then feeds a prompt token by token); the state layout is StepLM's (see step.py). --quant int8 stores int8
weights with per-row scales (quant.py). Run with `run_pte` (executorch.runtime).
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError
from . import DTYPES, require
from .step import StepLM, check_supported, one_token_blocks, seq_axis  # noqa: F401


def export(model, tok, cfg, out: Path, opts):
    require("executorch", "executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = copy.deepcopy(model).eval()
    if opts.quant == "int8":
        from .quant import quantize_int8

        quantize_int8(model)
    dt = DTYPES[opts.dtype]
    step = StepLM(model.to(dt), opts.max_len).eval()
    states = step.init_states(1, dt)
    one = bool(one_token_blocks(cfg.model))
    n, seq = seq_axis(opts.max_len, 4, one)
    args = (torch.zeros(1, n, dtype=torch.long), torch.zeros(1, dtype=torch.long), *states)
    logging.getLogger("executorch").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(step, args, dynamic_shapes=(seq, None, tuple(None for _ in states)))
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(prog.buffer)
    check_loads(out)
    return {"states": step.state_names(), "max_len": opts.max_len, "one_token": one}


def check_loads(path: Path):
    """The runtime loads the program's method, before anything is published: XNNPACK accepts at lowering
    graphs it then cannot compile at load (it did mamba2's 6-dim chunked scan: "Failed to define tensor")."""
    require("executorch", "executorch", "executorch")
    from executorch.runtime import Runtime

    try:
        Runtime.get().load_program(str(path)).load_method("forward")
    except Exception as e:  # the runtime raises RuntimeError (or pybind types) with its own codes
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"the ExecuTorch runtime cannot load the exported program: {msg}") from None


# ExecuTorch's ScalarType codes (those of c10) of the dtypes a state can have
_SCALAR_TYPES = {5: torch.float16, 6: torch.float32, 15: torch.bfloat16}


def run_pte(path, ids: torch.Tensor, n_steps: int = 0, feed=None):
    """(prefill logits [1, T, V], fed tokens [1, n], step logits [1, n, V]) from executorch.runtime.
    Each state is made in the dtype the program declares: an fp16 export keeps a recurrent block's
    state (mamba2's h, deltanet's S) in fp32."""
    require("executorch", "executorch", "executorch")
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")
    meta = method.metadata
    states = [torch.zeros(tuple(m.sizes()), dtype=_SCALAR_TYPES[m.dtype()])
              for m in (meta.input_tensor_meta(i) for i in range(2, meta.num_inputs()))]
    per_call = meta.input_tensor_meta(0).sizes()[1]  # a dynamic axis reports its upper bound: max_len
    pres = []
    for at in range(0, ids.shape[1], per_call):
        out = method.execute([ids[:, at:at + per_call].contiguous(), torch.tensor([at]), *states])
        pres.append(out[0])
        states = list(out[1:])
    pre = torch.cat(pres, 1)
    p = ids.shape[1]
    toks, steps = [], []
    nxt = pre[:, -1:].argmax(-1)
    for i in range(n_steps):
        if feed is not None:
            nxt = feed[:, i:i + 1]
        toks.append(nxt)
        out = method.execute([nxt.contiguous(), torch.tensor([p]), *states])
        steps.append(out[0])
        states = list(out[1:])
        p += 1
        nxt = out[0][:, -1:].argmax(-1)
    cat = lambda xs, shape: torch.cat(xs, 1) if xs else torch.zeros(shape)  # noqa: E731
    return pre, cat(toks, (1, 0)), cat(steps, (1, 0, pre.shape[-1]))
