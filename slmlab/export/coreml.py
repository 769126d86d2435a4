"""CoreML: an .mlpackage (ML Program) of the one-token decode step, via torch.export.

ct.convert(ep.run_decompositions({}), convert_to="mlprogram") — the torch.jit.trace route breaks
with numpy >= 2.4. Inputs: input_ids [1, 1] int32, pos [1] int32, then the StepLM states (names and
shapes in the model's metadata); outputs: logits [1, 1, V] and `<state>_out`. A prompt is fed one
token at a time. Prediction needs macOS (`predict_steps`); on Linux we check the spec.
"""
from __future__ import annotations

import copy
import json
import platform
from pathlib import Path

import numpy as np
import torch

from . import require
from .step import StepLM, check_supported  # noqa: F401


def export(model, tok, cfg, out: Path, opts):
    ct = require("coremltools", "coreml", "coreml")
    import logging
    import warnings

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    model = copy.deepcopy(model).eval()
    step = StepLM(model, opts.max_len).eval()
    names = step.state_names()
    shapes = step.state_shapes(1)
    states = step.init_states(1)
    args = (torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), *states)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(step, args).run_decompositions({})
        precision = ct.precision.FLOAT32 if opts.dtype == "fp32" else ct.precision.FLOAT16
        inputs = [ct.TensorType(name="input_ids", shape=(1, 1), dtype=np.int32),
                  ct.TensorType(name="pos", shape=(1,), dtype=np.int32)]
        inputs += [ct.TensorType(name=n, shape=s, dtype=np.float32) for n, s in zip(names, shapes)]
        outputs = [ct.TensorType(name="logits")] + [ct.TensorType(name=n + "_out") for n in names]
        mlm = ct.convert(ep, convert_to="mlprogram", inputs=inputs, outputs=outputs, compute_precision=precision,
                         minimum_deployment_target=ct.target.iOS17, skip_model_load=True)
    mlm.short_description = f"slmlab {cfg.arch} decode step ({', '.join(cfg.model.layer_types())})"
    mlm.user_defined_metadata["slmlab.states"] = json.dumps(names)
    mlm.user_defined_metadata["slmlab.max_len"] = str(opts.max_len)
    mlm.user_defined_metadata["slmlab.tokenizer"] = tok.to_json()
    mlm.save(str(out))
    return {"inputs": ["input_ids", "pos", *names], "max_len": opts.max_len}


def describe(path) -> dict:
    """{'inputs': {name: shape}, 'outputs': {name: shape}, 'metadata': {...}} read from the spec."""
    ct = require("coremltools", "coreml", "coreml")
    spec = ct.utils.load_spec(str(path))
    d = spec.description
    return {"inputs": {i.name: list(i.type.multiArrayType.shape) for i in d.input},
            "outputs": {o.name: list(o.type.multiArrayType.shape) for o in d.output},
            "metadata": dict(d.metadata.userDefined)}


def predict_steps(path, ids: list[int]) -> torch.Tensor:
    """macOS only: feed ids one by one through the package; logits [len(ids), V]."""
    ct = require("coremltools", "coreml", "coreml")
    if platform.system() != "Darwin":
        raise RuntimeError("CoreML prediction needs macOS")
    m = ct.models.MLModel(str(path))
    info = describe(path)
    names = json.loads(info["metadata"]["slmlab.states"])
    states = {n: np.zeros(info["inputs"][n], np.float32) for n in names}
    out = []
    for p, t in enumerate(ids):
        r = m.predict({"input_ids": np.array([[t]], np.int32), "pos": np.array([p], np.int32), **states})
        out.append(torch.from_numpy(np.asarray(r["logits"], np.float32)[0, 0]))
        states = {n: r[n + "_out"] for n in names}
    return torch.stack(out)
