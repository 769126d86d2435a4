"""Will it fit, and how long will it take? Training and inference memory, FLOPs and step time of a
run, from the model built on the meta device (no weights allocated, so a 1B model costs nothing).

Training memory per device, in the order a step uses it (steady state: the optimizer state exists):
  weights      fp32 master weights (4 B/param; FSDP shards them over the ranks)
  optimizer    AdamW exp_avg + exp_avg_sq (8 B/param), Muon momentum (4 B/param): the routing of
               slmlab/optim.py, so optim.name=muon is sized by what Muon actually holds
  gradients    fp32 (4 B/param); with grad_accum > 1 they live through every forward; DDP keeps a
               second copy in its all-reduce buckets
  activations  what each block saves for backward: Block.activation_bytes, so a new block is sized
               by its own declaration; with model.grad_checkpoint only each block's input is kept
               and one block at a time is recomputed in backward
  logits       the B*T*V head output, its log-softmax and their gradients: large for big vocabularies;
               with model.loss_chunk only one chunk of it, plus dx and dW computed in the forward
  teacher      train.teacher's fp32 weights (frozen: no gradients, no optimizer state), one of its
               blocks' temporaries during its no-grad forward, its final hidden states through the
               student's forward, and its logits beside the student's in the distillation loss
The peak is the largest of: end of forward, the head's backward, each block's backward (activations
freed as gradients appear) and the optimizer step (AdamW's foreach update on CUDA allocates one
more copy of its parameters). On CUDA the matmuls run under bf16 (or fp16) autocast: activations
are 2 B (norm internals stay fp32) and autocast caches 2-byte copies of the matmul weights for the
step; train.precision=fp32 (CPU's default) keeps both at 4 B / none (half_precision).
tests/test_sizes.py compares this with measured CPU peaks.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import ConfigError
from .fmt import count, duration
from .optim import fused_rows, ns_batches, ns_shape, route_params
from .phases import Phase, phase_windows, resolve_phases
from .precision import FP32_ON_GPU
from .runtime import GPUS, gpu_peak_source, measured_peak

GB = 1024 ** 3
VERDICT_GB = (8, 16, 24, 40, 80)
# The model.loss_chunk the dry run and the fit check suggest when the logits are a large share of
# the peak: a [1024, V] fp32 chunk is ~0.2 GB at GPT-2's vocab, and 1024 x d x V keeps the head's
# matmuls large (on this CPU at the default shape, chunks of 512-2048 ran at 0.98-1.02x the plain head).
SUGGESTED_LOSS_CHUNK = 1024
# Model FLOPs utilisation assumed for --gpu step times: what a well-tuned small-model run reaches
# with bf16 and fused attention; state it next to every time printed.
DEFAULT_MFU = 0.35
# Memory a training process uses beyond its tensors. CPU: ~25-35 MB of RSS from torch's code
# pages and thread-local buffers touched by the first step (measured with bench/measure_memory.py
# on a 0.3M model). CUDA: the context and cuBLAS workspace, which torch.cuda.max_memory_allocated
# does not count (typically 300-500 MB; subtract `runtime` to compare with it).
RUNTIME_CPU, RUNTIME_CUDA = 32 * 1024 ** 2, 512 * 1024 ** 2
QUANT_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + one fp16 scale


def parse_mem(text: str) -> int:
    """'16GB', '16G', '24GiB', '16000MB' -> bytes (GB = GiB: what nvidia-smi and torch report)."""
    s = str(text).strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1024, "M": 1024 ** 2, "G": GB, "T": 1024 ** 4}
    try:
        n = float(s[:-1]) * units[s[-1]] if s and s[-1] in units else float(s) * GB  # a bare number is GB
    except ValueError:
        n = -1
    if not 0 < n < math.inf:  # (inf: int() would raise)
        raise ConfigError(f"--mem {text!r}: give a size like 16GB or 24GiB")
    return int(n)


def gpu_spec(name: str) -> tuple[str, float, int]:
    """--gpu NAME -> (its key in runtime.GPUS, dense datasheet FLOP/s, memory bytes)."""
    for key, spec in GPUS.items():
        if key.replace(" ", "").lower() == name.replace(" ", "").lower():
            return key, spec.peak, spec.memory_gb * GB
    raise ConfigError(f"unknown --gpu {name!r}; known: {', '.join(GPUS)}")


def meta_model(cfg, lora: bool = True):
    """The run's model (with its train.lora adapters unless lora=False) with shapes and no storage. Initialisation is skipped: there are no values
    to draw, and torch's meta normal_ imports its Python decompositions (~2 s) on first use."""
    from unittest import mock

    from arch import build_model

    with torch.device("meta"), mock.patch.object(torch.nn.init, "normal_", lambda t, *a, **k: t):
        model = build_model(cfg.model, cfg.objective)
        if lora and cfg.train.lora.r:
            from .init_from import base_vocab
            from .lora import apply_lora

            # added_tokens' rows train under LoRA, as the trainer sets them up
            grown = cfg.data.added_tokens and cfg.train.init_from
            apply_lora(model, cfg.train.lora, base_vocab(cfg) if grown else None)
        return model


@dataclass
class Static:
    shard: int  # ranks the weights, gradients and optimizer state are split over (FSDP), else 1
    params: int
    params_non_embedding: int
    weights: int
    gradients: int
    optimizer: int
    ddp_buckets: int
    autocast_weights: int
    opt_transient: int
    runtime: int  # the framework's own: code pages and buffers a first step touches, CUDA context
    teacher: int = 0  # train.teacher's weights
    teacher_model: Optional[torch.nn.Module] = field(default=None, repr=False)  # its meta model, for train_peak

    def bytes(self) -> dict:
        """The byte counts by name (the --json output's static_bytes)."""
        return {k: v for k, v in vars(self).items() if k != "teacher_model"}


def teacher_meta(cfg):
    """train.teacher's model on the meta device (as the trainer loads it: adapters merged), or None."""
    if not cfg.train.teacher:
        return None
    from .rundir import RunDir

    return meta_model(RunDir.open(cfg.train.teacher, label="train.teacher=").config(), lora=False)


def half_precision(cfg, cuda: bool) -> bool:
    """Whether the forward runs under 2-byte autocast (bf16 or fp16): train.precision, auto = on CUDA."""
    p = cfg.train.precision
    return cuda if p == "auto" else p != "fp32"


def precision_label(cfg, cuda: bool, gpu: Optional[str] = None) -> str:
    """The estimate's device and precision, as the trainer would resolve them (auto: fp16 on a --gpu
    without bf16 tensor cores)."""
    p = cfg.train.precision
    if p == "auto":
        p = "fp32" if not cuda else ("fp16" if gpu and GPUS[gpu].peak_dtype == "fp16" else "bf16")
    return f"{'cuda' if cuda else 'cpu'} ({'fp32' if p == 'fp32' else p + ' autocast'})"


def static_memory(model, cfg, cuda: bool, world: int, teacher=None) -> Static:
    """Per-rank bytes that do not depend on the batch; teacher: teacher_meta's model, if any."""
    params = model.num_params()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # all but frozen (train.lora) bases
    shard = world if world > 1 and cfg.train.parallel == "fsdp" else 1
    routes = {r.group: r for r in route_params(model, cfg.optim.name)}
    adam = sum(r.numel for g, r in routes.items() if g != "muon")
    muon = routes["muon"].numel if "muon" in routes else 0
    largest = max(p.numel() for p in model.parameters())
    # AdamW's step: foreach (CUDA) builds sqrt(exp_avg_sq) for the whole group at once; the
    # single-tensor loop (CPU) one tensor at a time. BatchedMuon (slmlab/optim.py) makes every
    # Newton-Schulz on one batch of same-shape matrices at a time (optim.ns_batches): the batch's
    # Nesterov updates, their stack, its normalised copy and the next iterate are alive together
    # (under FSDP2 with the whole matrices gathered from their shards as well).
    transient = (4 * adam // shard if cuda else 2 * 4 * largest)
    if muon:
        shapes, splits = defaultdict(list), fused_rows(model)  # sizes per matrix shape, as BatchedMuon batches
        for p in routes["muon"].params:
            shapes[ns_shape(p, splits)].append(p.numel())
        stack = max(sum(sizes[i] for i in batch) for sizes in shapes.values() for batch in ns_batches(sizes))
        transient += int((cfg.optim.muon_nesterov / shard + 3 + (shard > 1)) * 4 * stack)
    matmul = sum(p.numel() for p in model.parameters() if p.dim() == 2)
    return Static(shard=shard, params=params, params_non_embedding=model.num_params(exclude_embedding=True),
                  weights=4 * params // shard, gradients=4 * trainable // shard,
                  optimizer=(8 * adam + 4 * muon) // shard,
                  ddp_buckets=4 * params if world > 1 and cfg.train.parallel == "ddp" else 0,
                  autocast_weights=2 * matmul if half_precision(cfg, cuda) else 0, opt_transient=transient,
                  runtime=RUNTIME_CUDA if cuda else RUNTIME_CPU,
                  teacher=0 if teacher is None else 4 * teacher.num_params(), teacher_model=teacher)


def logits_bytes(tokens: int, vocab: int, d_model: int, chunk: int = 0, half: bool = False,
                 distill: bool = False) -> tuple[int, int]:
    """(peak during the loss forward, peak during its backward) for `tokens` positions, in either
    precision (the loss upcasts bf16 / fp16 logits to fp32): forward holds the fp32 logits and their
    log-softmax; backward the saved log-softmax, the loss gradient and the logits gradient.
    Chunked (arch/loss.py): the forward holds one chunk's fp32 logits and logsumexp temporary (and
    the 2-byte copy of its gradient under half precision) beside dx and the fp32 dW it sums; the backward holds the
    saved dx and dW and the scaled dx (the scaled dW is the head's gradient, counted with those).
    Distilling, the teacher's logits and both tempered log-softmaxes come on top: 32 B per position
    and vocabulary entry through forward and backward unchunked, 24 B more per chunk entry chunked
    (measured on CPU at 2048 x 16384, chunk 256: 32.1 and 37.2 - 13.0)."""
    if not chunk:
        return (tokens * vocab * 32,) * 2 if distill else (tokens * vocab * 8, tokens * vocab * 12)
    c = min(chunk, tokens)
    dx, dw = tokens * d_model * 4, vocab * d_model * 4
    return c * vocab * ((10 if half else 8) + (24 if distill else 0)) + dx + dw, 2 * dx + dw


def head_tokens(cfg, batch: int, seq_len: int) -> int:
    """Positions the training head runs on: all of them, or for the diffusion ELBO the masked ones.
    Its t are antithetic strata (u + i) / batch, so the masked share of a step is at most their
    largest mean, 1/2 + 1/(2 batch): every position at batch 1."""
    tokens = batch * seq_len
    if cfg.objective.name != "mdlm":
        return tokens
    return min(tokens, math.ceil(tokens * (0.5 + 0.5 / batch)))


def train_peak(model, st: Static, cfg, batch: int, seq_len: int, checkpoint: bool, cuda: bool) -> dict:
    """Peak bytes per rank of one optimizer step at micro-batch `batch` x `seq_len`, and its parts."""
    half = half_precision(cfg, cuda)
    act_elem = 2 if half else 4
    d, V, tokens = cfg.model.d_model, cfg.model.vocab_size, batch * seq_len
    per_layer = [layer.activation_bytes(batch, seq_len, act_elem) for layer in model.layers]
    grads_layer = [4 * sum(p.numel() for p in layer.parameters() if p.requires_grad) // st.shard
                   for layer in model.layers]
    residual = tokens * d * 4  # the fp32 residual stream: a block's input
    kept = [residual] * len(per_layer) if checkpoint else per_layer
    head = tokens * ((2 * d + 1) * 4 + d * act_elem)  # the final RMSNorm, like a Block's norms
    act = sum(kept) + head
    teacher = st.teacher_model
    logits_fwd, logits_bwd = logits_bytes(head_tokens(cfg, batch, seq_len), V, d, cfg.model.loss_chunk, half,
                                          distill=teacher is not None)
    accum = cfg.train.grad_accum > 1
    base = st.weights + st.optimizer + st.autocast_weights + st.ddp_buckets + st.teacher
    held_grads = st.gradients if accum else 0
    head_grad = st.gradients - sum(grads_layer)  # embedding/head and final norm: the first gradients
    t_hidden = 0 if teacher is None else tokens * teacher.cfg.d_model * 4  # freed once the loss is computed
    candidates = {"forward": base + held_grads + act + t_hidden + logits_fwd,
                  "loss backward": base + max(held_grads, head_grad) + act + logits_bwd}
    if teacher is not None:  # its no-grad forward: one block's temporaries (at most what it would save)
        block = max(layer.activation_bytes(batch, seq_len, act_elem) for layer in teacher.layers)
        candidates["teacher forward"] = base + held_grads + block + 2 * t_hidden
    # Walk back through the blocks: block i's activations (recomputed, with checkpointing), the
    # gradients of its intermediates (about one per saved activation) and the gradient flowing in
    # the residual stream (dx, d(norm out), d(branch out)), against the gradients of the blocks
    # already done and the blocks below still waiting.
    below, done = act - head, head_grad
    for i in reversed(range(len(per_layer))):
        below -= kept[i]
        done += grads_layer[i]
        live = below + 2 * per_layer[i] + 3 * residual
        candidates["block backward"] = max(candidates.get("block backward", 0),
                                           base + max(held_grads, done) + live)
    candidates["optimizer step"] = st.weights + st.optimizer + st.gradients + st.ddp_buckets + st.opt_transient
    phase = max(candidates, key=candidates.get)
    return {"peak": candidates[phase] + st.runtime, "peak_at": phase, "activations": act, "logits": max(logits_fwd, logits_bwd)}


def max_micro_batch(model, st, cfg, seq_len: int, checkpoint: bool, cuda: bool, budget: int) -> int:
    """The largest micro-batch (sequences) whose peak fits `budget` bytes; 0 if not even one."""
    if train_peak(model, st, cfg, 1, seq_len, checkpoint, cuda)["peak"] > budget:
        return 0
    lo, hi = 1, 2
    while train_peak(model, st, cfg, hi, seq_len, checkpoint, cuda)["peak"] <= budget and hi < 1 << 20:
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # peak grows with the batch: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if train_peak(model, st, cfg, mid, seq_len, checkpoint, cuda)["peak"] <= budget \
            else (lo, mid)
    return lo


def accum_for(tokens_per_step: int, seq_len: int, world: int, fit: int) -> Optional[int]:
    """The smallest grad_accum whose micro-batch (tokens_per_step / (seq_len * accum * world)
    sequences, a whole number) is at most `fit`; None if none is."""
    seqs = tokens_per_step // seq_len
    for accum in range(1, seqs + 1):
        if seqs % (accum * world) == 0 and seqs // (accum * world) <= fit:
            return accum
    return None


def inference_memory(model, cfg, context: int) -> dict:
    """Weights in each storage format, and the decode state (KV cache, conv buffers) per token of
    context and at `context` tokens, batch 1, fp16."""
    state_fixed, state_per_token = 0, 0
    with torch.device("meta"):
        for layer in model.layers:
            s = layer.mixer.init_state(1, "meta", torch.float16)
            if s is None:
                continue
            tensors = [v for v in vars(s).values() if isinstance(v, torch.Tensor)]
            if hasattr(s, "k"):  # a KV cache starts empty and grows by a key and a value per token
                w = layer.mixer.window
                per = 2 * s.k.shape[1] * s.k.shape[3] * 2
                if w is None:
                    state_per_token += per
                else:
                    state_fixed += per * (w - 1)
            else:
                state_fixed += sum(t.numel() * t.element_size() for t in tensors)
    return {"weights": {k: int(model.num_params() * b) for k, b in QUANT_BYTES.items()},
            "state_per_token": state_per_token, "state_fixed": state_fixed,
            "state_at_context": state_fixed + state_per_token * context, "context": context}


def estimate(cfg, device: str = "cpu", world: int = 1, mem: Optional[int] = None, gpu: Optional[str] = None,
             mfu: float = DEFAULT_MFU, context: int = 2048) -> dict:
    """Everything --dry-run prints, as one dict (the --json output)."""
    if world < 1:
        raise ConfigError(f"--world must be >= 1, got {world}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    cuda = device == "cuda"
    gpu_name, peak_flops, gpu_mem = gpu_spec(gpu) if gpu else (None, None, None)
    budget = mem if mem is not None else gpu_mem
    model, st, sized = size_phases(cfg, cuda, world, budget)
    lora = None
    if cfg.train.lora.r:  # adapters: gradients and optimizer state for them only
        full = static_memory(meta_model(cfg, lora=False), cfg, cuda, world)
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = {"trainable": n, "share": n / st.params,
                "saved_bytes": full.gradients + full.optimizer - st.gradients - st.optimizer}
    out = {"arch": cfg.arch, "params": st.params, "params_non_embedding": st.params_non_embedding,
           "params_active": model.num_params(active=True),
           "device": precision_label(cfg, cuda, gpu_name), "world": world,
           "parallel": cfg.train.parallel if world > 1 else None, "optimizer": cfg.optim.name,
           "static_bytes": st.bytes(), "lora": lora, "phases": [],
           "kernels": cfg.model.kernel_routing(device, sized[-1].phase.seq_len)}
    for p in sized:
        ph = p.phase
        row = {"phase": ph.index + 1, "seq_len": ph.seq_len, "tokens_per_step": ph.tokens_per_step,
               "micro_batch": p.batch, "grad_accum": cfg.train.grad_accum, "steps": ph.steps,
               "flops_per_token": p.flops_per_token, **p.peaks}
        if budget is not None:
            for key in ("no_checkpoint", "grad_checkpoint"):
                fit = row[key]["max_micro_batch"]
                row[key]["grad_accum_to_fit"] = accum_for(ph.tokens_per_step, ph.seq_len, world, fit) if fit else None
        if "loss_chunk" in row:  # the what-if shown
            row["loss_chunk"]["unchunked_peak"] = row[_ckpt_key(cfg)]["peak"]
        row["verdict"] = {f"{g}GB": row[_ckpt_key(cfg)]["peak"] <= g * GB for g in VERDICT_GB}
        out["phases"].append(row)
    first = out["phases"][0][_ckpt_key(cfg)]
    out["train_memory_bytes"] = first["peak"]
    out["max_micro_batch"] = first.get("max_micro_batch")
    out["mem_bytes"] = budget
    total_flops = sum(p["flops_per_token"] * p["tokens_per_step"] * p["steps"] for p in out["phases"])
    tokens = sum(p["tokens_per_step"] * p["steps"] for p in out["phases"])
    if peak_flops is not None:
        peak_desc = gpu_peak_source(gpu_name) + (f"; {FP32_ON_GPU}" if cuda and not half_precision(cfg, cuda)
                                                 else "")
    elif not cuda:  # a CPU run: what this machine's matmuls reach, as the trainer's MFU uses
        peak_flops, peak_desc = measured_peak("cpu")
    out["throughput"] = None  # a GPU of unknown kind: --gpu NAME gives times
    if peak_flops is not None:
        rate = peak_flops * mfu * world
        flops_avg = total_flops / max(1, tokens)
        out["throughput"] = {
            "peak_flops": peak_flops, "peak_source": peak_desc, "mfu": mfu, "tokens_per_s": rate / flops_avg,
            # 20 tokens per parameter a token uses (a MoE's active ones)
            "run_seconds": total_flops / rate, "chinchilla_tokens": 20 * out["params_active"],
            "chinchilla_seconds": 20 * out["params_active"] * flops_avg / rate,
            "step_seconds": [p["flops_per_token"] * p["tokens_per_step"] / rate for p in out["phases"]]}
    out["inference"] = inference_memory(model, cfg, context)
    return out


@dataclass
class PhaseSize:
    """One phase at its micro-batch: train_peak (with budget: its max_micro_batch) under "no_checkpoint",
    "grad_checkpoint" and, when model.loss_chunk is unset, "loss_chunk" (SUGGESTED_LOSS_CHUNK at the
    run's grad_checkpoint: the what-if the dry run shows and the fit check suggests)."""
    phase: Phase
    batch: int
    flops_per_token: float
    peaks: dict


def size_phases(cfg, cuda: bool, world: int,
                budget: Optional[int] = None) -> tuple[torch.nn.Module, Static, list[PhaseSize]]:
    """The run's meta model, its static memory and a PhaseSize per phase (estimate and check_fits read
    these). The model is left with the last phase's windows."""
    model = meta_model(cfg)
    st = static_memory(model, cfg, cuda, world, teacher_meta(cfg))
    windows = cfg.model.layer_windows()
    variants = [("no_checkpoint", cfg, False), ("grad_checkpoint", cfg, True)]
    if not cfg.model.loss_chunk:
        variants.append(("loss_chunk", with_loss_chunk(cfg, SUGGESTED_LOSS_CHUNK), cfg.model.grad_checkpoint))
    out = []
    for ph in resolve_phases(cfg, world):
        model.set_windows(phase_windows(windows, ph.window))
        batch = ph.batch_size(cfg.train.grad_accum, world)
        if batch < 1:
            raise ConfigError(f"phase {ph.index + 1}: tokens_per_step {ph.tokens_per_step} is less than one "
                              f"sequence of {ph.seq_len} per rank and micro-batch")
        peaks = {}
        for key, c, ckpt in variants:
            peaks[key] = train_peak(model, st, c, batch, ph.seq_len, ckpt, cuda)
            if budget is not None:
                peaks[key]["max_micro_batch"] = max_micro_batch(model, st, c, ph.seq_len, ckpt, cuda, budget)
        out.append(PhaseSize(ph, batch, model.flops_per_token(ph.seq_len), peaks))
    return model, st, out


def with_loss_chunk(cfg, chunk: int):
    """A shallow copy of cfg whose model.loss_chunk is `chunk` (for what-if estimates)."""
    out = copy.copy(cfg)
    out.model = copy.copy(cfg.model)
    out.model.loss_chunk = chunk
    return out


def _ckpt_key(cfg) -> str:
    return "grad_checkpoint" if cfg.model.grad_checkpoint else "no_checkpoint"


def _b(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", GB), ("MB", 1024 ** 2), ("KB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def report(est: dict) -> str:
    """The human-readable --dry-run report."""
    s = est["static_bytes"]
    active = f", {count(est['params_active'])} active a token" if est["params_active"] != est["params"] else ""
    lines = [f"model: {est['arch']}  {count(est['params'])} params ({count(est['params_non_embedding'])} non-embedding"
             f"{active})"
             f"  device: {est['device']}" + (f"  world {est['world']} ({est['parallel']}, per rank)"
                                            if est["world"] > 1 else ""),
             est["kernels"],
             f"per device, every phase: weights {_b(s['weights'])}  gradients {_b(s['gradients'])}  "
             f"optimizer ({est['optimizer']}) {_b(s['optimizer'])}"
             + (f"  DDP buckets {_b(s['ddp_buckets'])}" if s["ddp_buckets"] else "")
             + (f"  autocast weight copies {_b(s['autocast_weights'])}" if s["autocast_weights"] else "")
             + f"  optimizer-step scratch {_b(s['opt_transient'])}"
             + (f"  teacher weights {_b(s['teacher'])}" if s["teacher"] else "")]
    if est.get("lora"):
        lo = est["lora"]
        lines.append(f"LoRA: {count(lo['trainable'])} trainable params ({100 * lo['share']:.2f}%): gradients and "
                     f"optimizer state {_b(lo['saved_bytes'])} smaller than full fine-tuning")
    mem = est["mem_bytes"]
    for p in est["phases"]:
        lines.append(f"phase {p['phase']}: seq_len {p['seq_len']}  micro-batch {p['micro_batch']} x grad_accum "
                     f"{p['grad_accum']} = {p['tokens_per_step']} tokens/step  {p['flops_per_token'] / 1e9:.3f} "
                     f"GFLOP/token")
        for key, label in (("no_checkpoint", "no grad checkpoint"), ("grad_checkpoint", "grad checkpoint  ")):
            r = p[key]
            fit = ""
            if mem is not None:
                fit = f"  | {_b(mem)}: max micro-batch {r['max_micro_batch']}"
                fit += f" (grad_accum {r['grad_accum_to_fit']})" if r["grad_accum_to_fit"] else \
                    ("" if r["max_micro_batch"] else " (does not fit)")
            lines.append(f"  {label}: activations {_b(r['activations'])}  logits {_b(r['logits'])}  "
                         f"peak {_b(r['peak'])} (at {r['peak_at']}){fit}")
        lc = p.get("loss_chunk")
        if lc and lc["peak"] < 0.9 * lc["unchunked_peak"]:  # worth a line: the logits are a large share
            lines.append(f"  with model.loss_chunk={SUGGESTED_LOSS_CHUNK}: logits {_b(lc['logits'])}  peak "
                         f"{_b(lc['peak'])} (at {lc['peak_at']})"
                         + (f"  | max micro-batch {lc['max_micro_batch']}" if mem is not None else ""))
        ok = [g for g, v in p["verdict"].items() if v]
        lines.append(f"  fits: {', '.join(ok) if ok else 'none of ' + ', '.join(p['verdict'])}"
                     + (f"  (does not fit: {', '.join(g for g, v in p['verdict'].items() if not v)})"
                        if ok and len(ok) < len(p["verdict"]) else ""))
    th = est["throughput"]
    if th is None:
        lines.append("time: give --gpu NAME for step times (datasheet bf16 peak x MFU)")
    else:
        steps = ", ".join(f"p{i + 1} {duration(x, sub_second=True)}" for i, x in enumerate(th["step_seconds"]))
        lines.append(f"time: {th['peak_flops'] / 1e12:.1f} TFLOP/s ({th['peak_source']}) x MFU {th['mfu']:.2f}: "
                     f"step {steps}; {th['tokens_per_s']:,.0f} tokens/s; this run {duration(th['run_seconds'])}; "
                     f"20 tokens/param ({count(th['chinchilla_tokens'])} tokens) "
                     f"{duration(th['chinchilla_seconds'])}")
    inf = est["inference"]
    w = inf["weights"]
    lines.append("inference weights: " + "  ".join(f"{k} {_b(v)}" for k, v in w.items())
                 + f"; state (fp16, batch 1) {_b(inf['state_per_token'])}/token + {_b(inf['state_fixed'])} "
                   f"= {_b(inf['state_at_context'])} at {inf['context']} tokens; fits in 1 GB at int8: "
                 + ("yes" if w["int8"] + inf["state_at_context"] <= GB else "no"))
    return "\n".join(lines)


def free_memory(cuda: bool) -> tuple[int, str]:
    """(bytes this process may use, where that figure comes from) on the device a run would use.
    CPU: the kernel's MemAvailable, shared by the ranks of this node."""
    import os

    if cuda:
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        free, _ = torch.cuda.mem_get_info(rank)
        return free, f"free on cuda:{rank}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // local, "available RAM" + (f" / {local} ranks" if local > 1 else "")


def check_fits(cfg, budget: int, where: str, cuda: bool, world: int = 1):
    """Raise a one-line ConfigError before training if some phase's estimated peak exceeds
    `budget`, naming the largest micro-batch that fits and the setting that gets every phase there."""
    _, _, sized = size_phases(cfg, cuda, world, budget)
    phases = [p.phase for p in sized]
    key = _ckpt_key(cfg)
    over = next((p for p in sized if p.peaks[key]["peak"] > budget), None)
    fits = [p.peaks[key]["max_micro_batch"] for p in sized]
    fits_ck = [0 if cfg.model.grad_checkpoint else p.peaks["grad_checkpoint"]["max_micro_batch"] for p in sized]
    fits_lc = [p.peaks["loss_chunk"]["max_micro_batch"] if "loss_chunk" in p.peaks else 0 for p in sized]
    if over is None:
        return
    ph, batch, peak = over.phase, over.batch, over.peaks[key]["peak"]
    hints = []
    if not all(fits):
        hints.append(f"not even micro-batch 1 fits at seq_len {phases[fits.index(0)].seq_len}")
    else:
        accum = _accum_for_all(phases, world, fits)
        fit = fits[ph.index]
        hints.append(f"largest micro-batch that fits: {fit} at seq_len {ph.seq_len}; "
                     + (f"set {_accum_flags(cfg, phases[0], world, accum)}" if accum else
                        "no train.grad_accum splits every phase's tokens_per_step into micro-batches that fit: "
                        "lower tokens_per_step"))
    if all(fits_ck) and any(c > f for c, f in zip(fits_ck, fits)):
        accum = _accum_for_all(phases, world, fits_ck)
        hints.append("or model.grad_checkpoint=true"
                     + (f" with {_accum_flags(cfg, phases[0], world, accum)}" if accum and accum > 1 else "")
                     + f" (micro-batch up to {fits_ck[ph.index]})")
    if all(fits_lc) and any(c > f for c, f in zip(fits_lc, fits)):
        accum = _accum_for_all(phases, world, fits_lc)
        hints.append(f"or model.loss_chunk={SUGGESTED_LOSS_CHUNK}"
                     + (f" with {_accum_flags(cfg, phases[0], world, accum)}" if accum and accum > 1 else "")
                     + f" (micro-batch up to {fits_lc[ph.index]})")
    if not all(fits) and not all(fits_ck) and not all(fits_lc):
        hints.append("use a smaller --size, FSDP over more GPUs, or more memory")
    raise ConfigError(f"estimated peak {_b(peak)} (phase {ph.index + 1}: micro-batch {batch} x seq_len {ph.seq_len}) "
                      f"exceeds the {_b(budget)} {where}; {'; '.join(hints)} (python train.py ... --dry-run "
                      f"for the breakdown; --force-memory to train anyway)")


def _accum_flags(cfg, phase, world: int, accum: int) -> str:
    """The overrides that set grad_accum while keeping tokens per step: with train.phases, the
    micro-batch follows from it; without, train.batch_size is the micro-batch and shrinks."""
    if cfg.train.phases:
        return f"train.grad_accum={accum}"
    return f"train.batch_size={phase.tokens_per_step // (phase.seq_len * accum * world)} train.grad_accum={accum}"


def _accum_for_all(phases, world: int, fits: list[int]) -> Optional[int]:
    """The smallest grad_accum that splits every phase into whole micro-batches that fit."""
    most = min(p.tokens_per_step // p.seq_len for p in phases)
    for accum in range(1, most + 1):
        if all((p.tokens_per_step // p.seq_len) % (accum * world) == 0
               and p.tokens_per_step // (p.seq_len * accum * world) <= f for p, f in zip(phases, fits)):
            return accum
    return None
