"""The language model: embedding -> [pre-norm mixer + pre-norm channel mixer] x n_layers -> norm -> head.

Layer i: h = x + mixer(norm(x)); out = h + mlp(norm(h)) (arch/block.py). The mixer is looked up by
name in the registry from the config's layer pattern and follows the block contract in
arch/block.py: forward(x, state=None) -> (y, state), init_state, flops_per_token, residual_out.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .block import Block, checkpoint_contexts, residual_linears
from .config import ModelConfig
from .layers import make_norm
from .lif import spike_metrics
from .loss import (
    Distill,
    linear_cross_entropy,
    linear_cross_entropy_ref,
    linear_distill_loss,
    linear_distill_loss_ref,
    linear_token_nll,
)
from .moe import moe_metrics


class LM(nn.Module):
    data_shard = (0, 1)  # (rank, world): see set_data_shard

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.pos == "learned":
            self.pos_embed = nn.Embedding(cfg.max_positions, cfg.d_model)
        kinds, windows = cfg.layer_types(), cfg.layer_windows()
        self.layers = nn.ModuleList(Block(cfg, i, k, w) for i, (k, w) in enumerate(zip(kinds, windows)))
        self.norm = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)
        # GPT-2 style: shrink residual-branch outputs so the residual stream's variance stays O(1).
        # Each block declares which of its layers write into the residual stream (residual_out).
        for layer in self.layers:
            for lin in residual_linears(layer.mixer) + residual_linears(layer.mlp):
                nn.init.normal_(lin.weight, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)

    # ---- forward ----
    def embed_at(self, idx, positions):
        """Token embeddings, plus the position table's rows at `positions` [T] when model.pos=learned."""
        x = self.embed(idx)
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        if self.cfg.pos == "learned":
            x = x + self.pos_embed(positions)
        return x

    def final_norm(self, x):
        """The final norm, divided by model.logit_scale: every head (logits, losses, scoring) reads this."""
        x = self.norm(x)
        return x if self.cfg.logit_scale == 1.0 else x / self.cfg.logit_scale

    def hidden(self, idx, states=None):
        start = getattr(states, "seen", 0)
        if self.cfg.pos == "learned" and start + idx.shape[1] > self.cfg.max_positions:
            raise ValueError(f"{start + idx.shape[1]} positions exceed model.max_positions={self.cfg.max_positions}")
        x = self.embed_at(idx, torch.arange(start, start + idx.shape[1], device=idx.device))
        new_states = None if states is None else States(seen=start + idx.shape[1])
        for i, layer in enumerate(self.layers):
            if states is None and self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                ctx = {} if torch.compiler.is_compiling() else {"context_fn": checkpoint_contexts}
                x, _ = checkpoint(layer, x, None, use_reentrant=False, **ctx)
            else:
                x, s = layer(x, None if states is None else states[i])
                if states is not None:
                    new_states.append(s)
        return self.final_norm(x), new_states

    def forward(self, idx, targets=None, states=None, teacher: Optional[Distill] = None):
        """model(idx) -> logits [B, T, V]; model(idx, targets) -> mean CE loss (targets -1 ignored);
        model(idx, targets, teacher=D) -> (distillation loss, CE) (arch/loss.py's Distill);
        model(idx, states=S) -> (logits, S') for incremental decode (S from init_state)."""
        x, new_states = self.hidden(idx, states)
        if targets is not None:
            return self.loss(x, targets) if teacher is None else self.distill_loss(x, targets, teacher)
        logits = self.lm_head(x)
        return logits if states is None else (logits, new_states)

    def loss(self, x, targets, **kw):
        """The head's cross-entropy on hidden states x, model.loss_chunk positions at a time when set;
        kw: linear_cross_entropy's row_scale / exclude (the diffusion ELBO's weights and mask column)."""
        # lm_head.weight, not lm_head(x): under data.added_tokens it is a parametrization's output.
        if self.cfg.loss_chunk:
            loss = linear_cross_entropy(x, self.lm_head.weight, targets, self.cfg.loss_chunk, **kw)
        else:
            loss = linear_cross_entropy_ref(x, self.lm_head.weight, targets, **kw)
        return self.add_aux_losses(loss)

    def distill_loss(self, x, targets, teacher: Distill):
        """(loss, CE) of distillation from `teacher` on hidden states x, chunked as loss() is."""
        if self.cfg.loss_chunk:
            loss, ce = linear_distill_loss(x, self.lm_head.weight, targets, teacher, self.cfg.loss_chunk)
        else:
            loss, ce = linear_distill_loss_ref(x, self.lm_head.weight, targets, teacher)
        return self.add_aux_losses(loss), ce

    def mixers(self) -> list:
        """Every layer's token and channel mixer (Block.parts: seen through LoRA's wrappers)."""
        return [m for layer in self.layers for m in layer.parts()]

    def blocks_with(self, method: str) -> list:
        """Every layer's token and channel mixer that defines `method` (an optional part of the block
        contract: after_step, take_aux_loss, inactive_params)."""
        return [m for m in self.mixers() if hasattr(m, method)]

    def after_optimizer_step(self, stepped: bool = True):
        """The trainer's call after each optimizer step (stepped=False: a skipped, non-finite step): blocks
        with an after_step(stepped) update what gradients do not train (MoE's expert bias, arch/moe.py)."""
        for m in self.blocks_with("after_step"):
            m.after_step(stepped)

    def add_aux_losses(self, loss):
        """loss plus the gradient, not the value, of the blocks' training-only losses (take_aux_loss in
        the block contract: MoE's load balance): `aux - aux.detach()` is exactly 0, so the logged loss
        stays the objective alone, comparable across blocks, while the gradient is the sum's."""
        for m in self.blocks_with("take_aux_loss"):
            aux = m.take_aux_loss()
            if aux is not None:
                loss = loss + (aux - aux.detach())
        return loss

    # ---- hooks the trainer uses, so objectives other than next-token prediction plug in ----
    nll_is_bound = False  # True when token_nll is an upper bound (e.g. a diffusion ELBO)

    def token_nll(self, idx, targets, generator=None):
        """Per-token negative log-likelihood in nats, [B, T], for evaluation and bits-per-byte.
        With model.loss_chunk, as the training loss, the [B*T, V] logits never exist whole."""
        return linear_token_nll(self.hidden(idx)[0], self.lm_head.weight, targets, self.cfg.loss_chunk)

    def extra_metrics(self) -> dict:
        """Numbers logged at each eval beyond the loss: spike rates and the energy proxy when the model
        has LIF blocks (arch/lif.py spike_metrics), expert loads when it has MoE layers (arch/moe.py
        moe_metrics), else none."""
        return {**spike_metrics(self), **moe_metrics(self)}

    def init_state(self, batch_size: int, device=None, dtype=torch.float32):
        device = device or self.embed.weight.device
        return States(layer.mixer.init_state(batch_size, device, dtype) for layer in self.layers)

    # ---- the static-state step: fixed-shape states, one implementation for decode and export ----
    def supports_static(self) -> bool:
        return self.cfg.causal and all(getattr(layer.mixer, "static_state_names", None) for layer in self.layers)

    def static_state(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> list:
        """Zero-filled, as they must start: attention's unwritten cache slots are masked out of the
        scores but still multiply into the output (0 x NaN is NaN); masking the values too would
        cost a pass over the cache per token."""
        device = device or self.embed.weight.device
        return [layer.mixer.static_state(batch_size, max_len, device, dtype) for layer in self.layers]

    def forward_static(self, idx, pos, states: list, inplace: bool = True):
        """idx [B, T] at absolute positions pos .. pos + T - 1 (pos: a [1] int64 tensor) ->
        (logits [B, T, V], states). inplace=True updates the state tensors in place."""
        positions = pos.reshape(1) + torch.arange(idx.shape[1], device=idx.device)
        x = self.embed_at(idx, positions)
        new_states = []
        for layer, st in zip(self.layers, states):
            x, st = layer.forward_static(x, positions, st, inplace)
            new_states.append(st)
        return self.lm_head(self.final_norm(x)), new_states

    def greedy_static(self, idx, pos, states: list, n: int):
        """n greedy tokens [B, n] after idx [B, 1] at position pos, in one call: what
        generate(compile=True) compiles for temperature 0, so the per-call cost (guards, the
        wrapper's checks) is paid once per n tokens."""
        toks = []
        for i in range(n):
            logits, _ = self.forward_static(idx, pos + i, states)
            idx = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(idx)
        return torch.cat(toks, dim=1)

    def room(self, prompt_len: int) -> Optional[int]:
        """New tokens that fit after a prompt of prompt_len tokens: None when positions are
        unbounded (rope), else what model.max_positions leaves (pos=learned has no row past it)."""
        if self.cfg.pos != "learned":
            return None
        return max(self.cfg.max_positions - prompt_len, 0)

    def check_room(self, prompt_len: int, max_new_tokens: int):
        """ConfigError (a ValueError) when prompt + new tokens need more positions than the model has.
        Checked once, before any decoder is built, so the static, dynamic, compiled and CUDA-graph
        paths all refuse alike instead of failing mid-generation in the position table."""
        left = self.room(prompt_len)
        if left is not None and max_new_tokens > left:
            from slmlab.errors import ConfigError

            fix = f"generate at most {left} new tokens" if left else f"shorten the prompt below {self.cfg.max_positions} tokens"
            raise ConfigError(f"a {prompt_len}-token prompt + {max_new_tokens} new tokens exceed model.max_positions="
                              f"{self.cfg.max_positions} (model.pos=learned): {fix}")

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
                 compile: bool = False, on_token=None, static: Optional[bool] = None,
                 cuda_graph: bool = True, top_p: Optional[float] = None):
        """Prefill the prompt once, then decode token by token. Models whose mixers all have a
        static state (attention, conv) decode through preallocated states updated in place
        (static=None picks it when available; False forces the dynamic forward(x, states) path).
        compile=True compiles the static step (worth it for long generations: compiling takes
        seconds, about a minute the first time for greedy, which decodes GREEDY_CHUNK tokens a
        call); on CUDA the compiled step is also captured as a CUDA graph unless cuda_graph=False:
        at batch 1 a token is a few hundred small kernels, and launching them from Python costs more
        than running them. With eos_id, generation ends once every row has emitted it; a row that
        finished earlier is padded with eos_id. on_token(id) is called with each new token of batch
        row 0 (sample.py streams with it). Sampling: sample_next (temperature, top_k, top_p)."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"generate needs prompts [batch, >= 1 token], got shape {tuple(idx.shape)}")
        check_top_p(top_p)
        if max_new_tokens <= 0:
            return idx.clone()
        self.check_room(idx.shape[1], max_new_tokens)
        use_static = self.supports_static() if static is None else static
        if use_static:
            graphed = compile and cuda_graph and idx.device.type == "cuda"
            # Greedy chunks amortise the compiled call's Python overhead, which a CUDA graph removes.
            chunk = GREEDY_CHUNK if compile and is_greedy(temperature) and not graphed else 1
            if self.cfg.pos == "learned" and idx.shape[1] + max_new_tokens + chunk > self.cfg.max_positions:
                chunk = 1  # the tokens a last chunk decodes past the end need positions too
            dec = StaticDecoder(self, idx, max_new_tokens, compile, chunk, graphed)
        else:
            dec = DynamicDecoder(self, idx)
        nxt, out = sample_next(dec.prefill(idx)[:, -1, :], temperature, top_k, generator, top_p), [idx]
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)  # rows that emitted eos_id
        while True:  # each pass adds at least one token, so max_new_tokens ends it
            for j in range(nxt.shape[1]):
                tok = nxt[:, j:j + 1]
                if eos_id is not None:  # a finished row is padded with eos_id until every row is
                    tok = tok.masked_fill(done[:, None], eos_id)
                    done |= tok[:, 0] == eos_id
                out.append(tok)
                if on_token is not None:
                    on_token(tok[0, 0].item())
                if bool(done.all()) or len(out) - 1 == max_new_tokens:
                    return torch.cat(out, dim=1)
            nxt = dec.next_tokens(nxt[:, -1:], temperature, top_k, generator, top_p)

    # ---- accounting ----
    def num_params(self, exclude_embedding: bool = False, active: bool = False) -> int:
        """All parameters; active=True leaves out those a token does not use (the MoE experts it is not
        routed to: a block's inactive_params())."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        if active:
            n -= sum(m.inactive_params() for m in self.blocks_with("inactive_params"))
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style: 6 * (matmul
        parameters, the head included) plus what each block declares beyond its parameters
        (attention scores and values, conv taps, neuron updates: Block.flops_per_token)."""
        n = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and "embed" not in name)
        if self.cfg.tie_embeddings:
            n += self.embed.weight.numel()  # the tied head still costs a matmul
        return float(6 * n + sum(layer.flops_per_token(seq_len) for layer in self.layers))

    def set_data_shard(self, rank: int, world: int):
        """Under torchrun: this process holds rows rank*B .. (rank+1)*B of each global batch. An objective
        that draws randomness per row (masked diffusion) draws it for the global batch and keeps these
        rows, so every rank's draws differ and the run repeats a 1-process run's (slmlab/trainer.py)."""
        self.data_shard = (rank, world)

    def set_windows(self, windows: list[Optional[int]]):
        """Per layer: the attention window to use from now on (None = full context / no window)."""
        if len(windows) != len(self.layers):
            raise ValueError(f"set_windows got {len(windows)} windows for {len(self.layers)} layers")
        for layer, w in zip(self.layers, windows):
            layer.mixer.set_window(w)


class States(list):
    """Per-layer decode states (LM.init_state), plus `seen`: the tokens consumed so far, the
    position of the next one (learned position embeddings need it; the mixers keep their own)."""

    def __init__(self, items=(), seen: int = 0):
        super().__init__(items)
        self.seen = seen


# Tokens per compiled greedy call (LM.greedy_static). generate(compile=True), default hybrid,
# 32-token prompt, 2 threads: chunk 1 ~1,230 tok/s, 4 ~1,500, 8 ~1,520; inductor's first build of
# the unrolled graph takes ~10 s, ~60 s, ~45-160 s (its on-disk cache then makes it ~5 s). At 4 the
# step is within ~10% of streaming the 23 MB of fp32 weights once a token.
GREEDY_CHUNK = 4
# Compiled decode states are sized up to a multiple of this, so generations of other lengths
# reuse the compiled step instead of compiling one per state shape.
STATIC_BUCKET = 256


class _RowLinearAsMV(torch.overrides.TorchFunctionMode):
    """Inside the compiled decode step: a linear layer on one row becomes torch.mv, which inductor
    turns into its own C++ reduction. As aten mm the one-row input came with a 0 row stride that
    mm copies first (~19 copies a token); default hybrid, greedy chunk 4: 1,614 tok/s vs 1,526."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].shape[:-1].numel() == 1:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            y = torch.mv(w, x.reshape(-1)).reshape(*x.shape[:-1], w.shape[0])
            return y if b is None else y + b
        return func(*args, **kwargs)


def _decode_in_mv_mode(fn):
    def wrapped(*args, **kwargs):
        with _RowLinearAsMV():
            return fn(*args, **kwargs)
    return wrapped


class StaticDecoder:
    """Decode state for LM.generate: preallocated per-layer states sized to prompt + new tokens
    (+ one greedy chunk; compiled: rounded up to STATIC_BUCKET), written in place by
    LM.forward_static; the step optionally compiled, greedy `chunk` tokens a call, and the
    compiled step captured as a CUDA graph when `graph`."""

    def __init__(self, model: LM, idx, max_new_tokens: int, compile: bool, chunk: int = 1, graph: bool = False):
        self.model, self.chunk = model, chunk
        slots = idx.shape[1] + max_new_tokens + chunk
        if compile:
            slots = -(-slots // STATIC_BUCKET) * STATIC_BUCKET
        self.states = model.static_state(idx.shape[0], slots, idx.device, model.embed.weight.dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=idx.device)
        self.fwd, self.greedy = model.forward_static, model.greedy_static
        if compile:
            from slmlab.runtime import CompiledOrEager

            # cpp_wrapper: the step's kernel launches from C++ instead of Python. Measured
            # interleaved at 1 thread, default hybrid (400 slots): 1.24 ms vs 1.45 ms a token.
            # (reduce-overhead CUDA graphs are skipped by torch for steps that mutate their inputs.)
            cpu = idx.device.type == "cpu"
            fn = model.greedy_static if chunk > 1 else model.forward_static
            what = "the greedy decode step" if chunk > 1 else "the decode step"
            step = CompiledOrEager(_decode_in_mv_mode(fn) if cpu else fn, what,
                                   options={"cpp_wrapper": True} if cpu else None)
            if graph:
                step = CudaGraphStep(step, self.states, what)
            if chunk > 1:
                self.greedy = step
            else:
                self.fwd = step

    def prefill(self, idx):
        logits, _ = self.model.forward_static(idx, self.pos, self.states)
        self.pos.fill_(idx.shape[1])
        return logits

    def step(self, nxt):
        logits, _ = self.fwd(nxt, self.pos, self.states)
        self.pos += nxt.shape[1]
        return logits

    def next_tokens(self, nxt, temperature: float, top_k, generator, top_p=None):
        """The tokens after nxt [B, 1]: [B, chunk] greedy ones in one call, or one sampled."""
        if self.chunk == 1:
            return sample_next(self.step(nxt)[:, -1, :], temperature, top_k, generator, top_p)
        # The last column of the previous chunk has that chunk's strides; the compiled step is
        # specialised on strides, so a fresh [B, 1] keeps it to one graph.
        toks = self.greedy(nxt.clone(memory_format=torch.contiguous_format), self.pos, self.states, self.chunk)
        self.pos += self.chunk
        return toks


class CudaGraphStep:
    """A static decode step (compiled or not) captured as a CUDA graph on its first call, then
    replayed. The decoder's states and pos tensors keep their addresses and are updated in place,
    which is what replay needs; the token input is copied into a fixed buffer and the outputs are
    cloned out of the graph's memory. If capture fails the step runs uncaptured (one warning line)."""

    def __init__(self, step, states: list, what: str, say=print):
        self.step, self.what, self.say = step, what, say
        self.state_tensors = [t for st in states for t in st]
        self.graph = None  # None: not captured yet; False: capture failed, run the step directly

    def __call__(self, idx, pos, states, *rest):
        if self.graph is None:
            self._capture(idx, pos, states, *rest)
        if self.graph is False:
            return self.step(idx, pos, states, *rest)
        self.idx.copy_(idx)
        self.graph.replay()
        return _clone_out(self.out)

    def _capture(self, idx, pos, states, *rest):
        # The warm-up (which compiles, and sets up cuBLAS and the allocator off the capture) advances
        # the states as a real step would (a conv buffer shifts); put them back before the replay.
        saved = [t.clone() for t in self.state_tensors]
        self.idx = idx.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.idx, pos, states, *rest)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.out = self.step(self.idx, pos, states, *rest)
            self.graph = graph
        except Exception as e:  # a step that cannot be captured still decodes, uncaptured
            from slmlab.runtime import fallback_warning

            self.say(fallback_warning(f"CUDA graph capture failed for {self.what}", e, "running uncaptured"))
            self.graph = False
        for t, s in zip(self.state_tensors, saved):
            t.copy_(s)


def _clone_out(out):
    """The step's output (tokens, or (logits, states)) with its tensors copied out of graph memory;
    the states are the decoder's own tensors and are returned as they are."""
    if torch.is_tensor(out):
        return out.clone()
    logits, states = out
    return logits.clone(), states


class DynamicDecoder:
    """Decode state for LM.generate through forward(x, states): any mixer's own init_state."""

    def __init__(self, model: LM, idx):
        self.model, self.states = model, model.init_state(idx.shape[0], idx.device)

    def prefill(self, idx):
        logits, self.states = self.model(idx, states=self.states)
        return logits

    def step(self, nxt):
        logits, self.states = self.model(nxt, states=self.states)
        return logits

    def next_tokens(self, nxt, temperature: float, top_k, generator, top_p=None):
        return sample_next(self.step(nxt)[:, -1, :], temperature, top_k, generator, top_p)


def is_greedy(temperature: float) -> bool:
    """Temperature 0 is greedy, and so is one so small that logits / temperature would overflow:
    below 1e-5 the softmax is a one-hot anyway."""
    return temperature < 1e-5


def sample_next(logits, temperature: float, top_k: Optional[int], generator=None, top_p: Optional[float] = None):
    """logits [B, V] -> next token [B, 1]; greedy (argmax) at is_greedy temperatures. Otherwise from
    softmax(logits / temperature), in transformers' order: the top_k likeliest tokens kept (0/None:
    all), then of those the fewest whose probabilities sum to top_p (nucleus sampling; None or 1: all)."""
    if is_greedy(temperature):
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        logits = nucleus(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)


def nucleus(logits, top_p: float):
    """logits [B, V] with -inf outside each row's nucleus: its likeliest tokens, most probable first,
    up to and including the one whose cumulative probability reaches top_p (so never empty). Tied
    logits at the edge go in sort order, as transformers' TopPLogitsWarper does."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the likelier tokens
    sorted_logits = sorted_logits.masked_fill(before >= top_p, float("-inf"))
    return logits.scatter(-1, order, sorted_logits)


def check_top_p(top_p: Optional[float]):
    if top_p is not None and not 0 < top_p <= 1:  # (NaN fails the comparison too)
        from slmlab.errors import ConfigError

        raise ConfigError(f"top_p must be in (0, 1], got {top_p}")
