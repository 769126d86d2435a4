"""Leaky integrate-and-fire (LIF) blocks: a token mixer (letter L) and a spiking channel mixer.

Neuron (snntorch `Leaky` semantics, reset by subtraction, reset_delay=True), per channel c:
    r_t = s_{t-1}                                  (the previous spike, detached: a reset signal)
    v_t = clamp(beta, 0, 1) * v_{t-1} + u_t - r_t * threshold
    s_t = H(v_t - threshold)                       (surrogate gradient in backward: atan or fast_sigmoid)
beta and threshold are learnable per channel.

Token mixer `lif`: sequence position is time. u, g = in_proj(x); spikes s = LIF(u) over t;
y = out_proj(s) * silu(g). out_proj sees only 0/1 spikes, so it is accumulate-only (AC) work on
neuromorphic hardware, the basis of the energy proxy. The decode state is (membrane, last spike).
Bidirectional models (model.causal=false, masked diffusion) run the same neurons over the reversed
sequence too and feed out_proj the summed spike counts (same parameters, so AR checkpoints load).

Channel mixer `lif` (model.mlp=lif): SwiGLU with the SiLU gate replaced by a spike
rate: each token's current c = w1(x) drives fresh LIF neurons for T_sim steps, and
y = w2(rate * w3(x)) with rate = spike count / T_sim. No state crosses tokens.

Three implementations of the scan over time: `lif_scan_ref` (a plain autograd loop, obviously
correct), `lif_scan` (a torch.autograd.Function with the backward written out, about 2-3x
less Python/autograd overhead per step) and, where model.kernels picks Triton (auto: on CUDA),
`kernels.lif_scan` (one launch each way instead of a few per time step). tests/test_lif.py checks
the eager two against snntorch.Leaky; tests/test_kernels.py the kernel against lif_scan_ref.

Options: model.mixer_opts.lif (LIFOptions below: beta, threshold, surrogate, surrogate_scale, T_sim,
scan), shared by both blocks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from slmlab.errors import ConfigError

from .block import ChannelMixer, Mixer, exporting
from .registry import register, register_channel_mixer

# Energy per operation at 45 nm (Horowitz, ISSCC 2014), the figures SNN papers use for the proxy.
E_MAC_PJ, E_AC_PJ = 4.6, 0.9
SURROGATES = {"atan": 2.0, "fast_sigmoid": 25.0}  # name -> default scale


# ---- options ------------------------------------------------------------------------------------
@dataclass
class LIFOptions:
    """model.mixer_opts.lif: shared by the LIF token mixer and the LIF channel mixer."""

    beta: float = 0.9  # initial membrane decay per step (learnable per channel, clamped to [0, 1])
    threshold: float = 1.0  # initial firing threshold (learnable per channel)
    surrogate: str = "atan"  # atan | fast_sigmoid: the spike's backward
    surrogate_scale: Optional[float] = None  # null = 2 for atan (alpha), 25 for fast_sigmoid (slope)
    T_sim: int = 4  # simulation steps per token in the LIF channel mixer
    scan: str = "fused"  # fused (hand-written backward) | reference (plain autograd loop)

    @property
    def scale(self) -> float:
        return SURROGATES[self.surrogate] if self.surrogate_scale is None else self.surrogate_scale

    def check(self, where: str):
        if self.surrogate not in SURROGATES:
            raise ConfigError(f"{where}.surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        if self.T_sim <= 0:
            raise ConfigError(f"{where}.T_sim must be an integer > 0, got {self.T_sim}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"{where}.beta must be in [0, 1], got {self.beta}")
        if not self.threshold > 0:  # (nan too: neurons that never spike)
            raise ConfigError(f"{where}.threshold must be > 0, got {self.threshold}")
        if not self.scale > 0:
            raise ConfigError(f"{where}.surrogate_scale must be > 0, got {self.scale}")
        if self.scan not in ("fused", "reference"):
            raise ConfigError(f"{where}.scan must be fused or reference, got {self.scan!r}")


# ---- surrogate spike functions (same formulas as snntorch.surrogate) -------------------------------
def surrogate_grad(x, name: str, scale: float):
    """d spike / d x used in backward in place of the Heaviside's zero-almost-everywhere derivative."""
    if name == "atan":
        return scale / 2 / (1 + (math.pi / 2 * scale * x).pow(2))
    return 1.0 / (scale * x.abs() + 1.0).pow(2)


class _Spike(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name, scale):
        ctx.save_for_backward(x)
        ctx.name, ctx.scale = name, scale
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * surrogate_grad(x, ctx.name, ctx.scale), None, None


def spike(x, name="atan", scale=2.0):
    return _Spike.apply(x, name, scale)


# ---- the scan over time ---------------------------------------------------------------------------
def lif_scan_ref(u, beta, threshold, mem, spk, surrogate="atan", scale=2.0):
    """Reference: u [B, T, D] input currents; beta, threshold [D]; mem, spk [B, D] initial state.
    Returns (spikes [B, T, D], final mem, final spike)."""
    b = beta.clamp(0, 1)
    out = []
    for t in range(u.shape[1]):
        mem = b * mem + u[:, t] - spk.detach() * threshold
        spk = spike(mem - threshold, surrogate, scale)
        out.append(spk)
    return torch.stack(out, 1), mem, spk


class _LIFScan(torch.autograd.Function):
    """The same recurrence with a hand-written backward (BPTT): one Python step per time step
    each way, no autograd graph per step."""

    @staticmethod
    def forward(ctx, u, b, thr, mem0, spk0, surrogate, scale):
        B, T, D = u.shape
        mems = u.new_empty(B, T, D)
        spikes = u.new_empty(B, T, D)
        mem, spk = mem0, spk0
        for t in range(T):
            mem = b * mem + u[:, t] - spk * thr
            spk = (mem > thr).to(u.dtype)
            mems[:, t] = mem
            spikes[:, t] = spk
        ctx.save_for_backward(mems, spikes, b, thr, mem0, spk0)
        ctx.surrogate, ctx.scale = surrogate, scale
        return spikes, mem, spk

    @staticmethod
    def backward(ctx, g_spikes, g_mem_T, g_spk_T):
        mems, spikes, b, thr, mem0, spk0 = ctx.saved_tensors
        T = mems.shape[1]
        g_spikes = g_spikes.clone() if g_spikes is not None else torch.zeros_like(mems)
        if g_spk_T is not None:
            g_spikes[:, -1] += g_spk_T
        sg = surrogate_grad(mems - thr, ctx.surrogate, ctx.scale)
        g_direct = g_spikes * sg  # d loss / d v_t through s_t
        g_u = torch.empty_like(mems)
        gm = g_mem_T if g_mem_T is not None else torch.zeros_like(mem0)
        for t in range(T - 1, -1, -1):
            gm = gm + g_direct[:, t]
            g_u[:, t] = gm
            gm = gm * b
        prev_mem = torch.cat([mem0.unsqueeze(1), mems[:, :-1]], 1)
        prev_spk = torch.cat([spk0.unsqueeze(1), spikes[:, :-1]], 1)
        g_b = (g_u * prev_mem).sum((0, 1))
        g_thr = -(g_direct + g_u * prev_spk).sum((0, 1))
        return g_u, g_b, g_thr, gm, None, None, None


def lif_scan(u, beta, threshold, mem, spk, surrogate="atan", scale=2.0):
    """Fast path of `lif_scan_ref` (same signature and results). The membrane runs in the dtype the
    reference's arithmetic promotes to (fp32 parameters: fp32 under bf16 autocast, as the Triton
    kernel's state): in bf16 it rounded, and 8% of a bf16 scan's spikes differed from the reference's."""
    dt = torch.promote_types(u.dtype, torch.promote_types(beta.dtype, threshold.dtype))
    shape = u.shape[:1] + u.shape[2:]
    mem = mem.to(dt).expand(shape)
    spk = spk.to(dt).expand(shape).detach()
    return _LIFScan.apply(u.to(dt), beta.clamp(0, 1).to(dt), threshold.to(dt), mem, spk, surrogate, scale)


def scan_fn(opts: LIFOptions, backend: str, u):
    """The scan a block runs: the reference loop when asked for (scan: reference), else the Triton
    kernel where model.kernels picks Triton for u (auto: on CUDA), else the fused eager loop."""
    if opts.scan == "reference":
        return lif_scan_ref
    return kernels.lif_scan if kernels.use_triton(backend, u) else lif_scan


# ---- blocks -------------------------------------------------------------------------------------
@dataclass
class LIFState:
    mem: torch.Tensor  # [B, D] membrane potential
    spk: torch.Tensor  # [B, D] last spike (drives the next reset)


class _SpikeStats:
    """Spike counts accumulated during eval forwards; read (and reset) by spike_metrics()."""

    def _reset_stats(self):
        self._stat = {"spikes": 0.0, "nonzero": 0.0, "slots": 0.0, "tokens": 0}

    def _record(self, spikes, nonzero, slots, tokens):
        # Training: a reduction per step for nothing (rates are logged at eval). Exporting: float()
        # of a traced tensor is a guard torch.export cannot trace (executorch failed on a model.mlp=lif
        # run; the ONNX exporter printed each failed attempt's FX graph before falling back).
        if self.training or exporting():
            return
        # Detached tensors, read by spike_metrics: float() here would be a host sync per layer and
        # a graph break per layer under torch.compile (a compiled eval or `sample.py --compile`).
        for key, v in (("spikes", spikes), ("nonzero", nonzero), ("slots", slots), ("tokens", tokens)):
            self._stat[key] = self._stat[key] + (v.detach().double() if torch.is_tensor(v) else v)


@register("lif", "L", options=LIFOptions)
class LIFMixer(Mixer, _SpikeStats):
    residual_out = ("out_proj",)

    def __init__(self, cfg, layer_idx: int, window: Optional[int] = None):
        super().__init__()
        o = cfg.block_options("lif")
        d = cfg.d_model
        self.opts, self.causal, self.d, self.backend = o, cfg.causal, d, cfg.kernels
        self.in_proj = nn.Linear(d, 2 * d, bias=False)  # current u and gate g
        self.out_proj = nn.Linear(d, d, bias=False)
        self.beta = nn.Parameter(torch.full((d,), o.beta))
        self.threshold = nn.Parameter(torch.full((d,), o.threshold))
        self._reset_stats()

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> LIFState:
        z = torch.zeros(batch_size, self.d, device=device, dtype=dtype)
        return LIFState(z, z.clone())

    def _scan(self, u, mem, spk):
        fn = scan_fn(self.opts, self.backend, u)
        return fn(u, self.beta, self.threshold, mem, spk, self.opts.surrogate, self.opts.scale)

    def forward(self, x, state: Optional[LIFState] = None):
        u, g = self.in_proj(x).chunk(2, dim=-1)
        B = x.shape[0]
        zero = torch.zeros(B, self.d, device=x.device, dtype=u.dtype)
        if not self.causal:
            if state is not None:
                raise RuntimeError("incremental decode needs a causal model")
            s_fwd, _, _ = self._scan(u, zero, zero)
            s_bwd, _, _ = self._scan(u.flip(1), zero, zero)
            s = s_fwd + s_bwd.flip(1)
        else:
            mem, spk = (zero, zero) if state is None else (state.mem, state.spk)
            s, mem, spk = self._scan(u, mem, spk)
            if state is not None:
                state = LIFState(mem, spk)
        with torch.no_grad():  # bidirectional: two neurons per channel (one per scan), s their spike sum
            self._record(s.sum(), (s != 0).sum(), s.numel() * (1 if self.causal else 2), B * x.shape[1])
        return self.out_proj(s.to(x.dtype)) * F.silu(g), state

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """in_proj's output (u and g), the scan's membranes and spikes (out_proj's input),
        out_proj's output and silu(g): 6d per token; the reverse scan of a bidirectional model
        adds its membranes, spikes and the summed spike counts."""
        return batch * seq_len * (6 if self.causal else 9) * self.d * act

    def flops_per_token(self, seq_len: int) -> float:
        """Neuron update per channel and step: decay, input, reset, threshold compare (4 ops) and
        the gate multiply; x3 for fwd + bwd (the backward scan does about twice the work)."""
        return 3 * 5 * self.d * (2 if not self.causal else 1)

    def ops_per_token(self, rate_nonzero, spikes_per_slot):
        """(MACs, ACs, dense-equivalent MACs) per token: in_proj is dense; out_proj accumulates a
        weight column per spike."""
        d = self.d
        return 2 * d * d + d, spikes_per_slot * d * d, 3 * d * d + d


@register_channel_mixer("lif", options=LIFOptions)
class SpikingMLP(ChannelMixer, _SpikeStats):
    residual_out = ("w2",)

    def __init__(self, cfg):
        super().__init__()
        o = cfg.block_options("lif")
        d, f = cfg.d_model, cfg.ffn
        self.opts, self.d, self.f, self.backend = o, d, f, cfg.kernels
        self.w1 = nn.Linear(d, f, bias=False)  # input current of the spiking gate
        self.w3 = nn.Linear(d, f, bias=False)  # up
        self.w2 = nn.Linear(f, d, bias=False)  # down
        self.beta = nn.Parameter(torch.full((f,), o.beta))
        self.threshold = nn.Parameter(torch.full((f,), o.threshold))
        self._reset_stats()

    def forward(self, x):
        c = self.w1(x)
        flat = c.reshape(-1, 1, self.f).expand(-1, self.opts.T_sim, -1)
        zero = torch.zeros(flat.shape[0], self.f, device=x.device, dtype=c.dtype)
        fn = scan_fn(self.opts, self.backend, flat)
        s, _, _ = fn(flat, self.beta, self.threshold, zero, zero, self.opts.surrogate, self.opts.scale)
        rate = s.mean(1).view_as(c)
        with torch.no_grad():
            self._record(s.sum(), (rate != 0).sum(), rate.numel(), rate.numel() // self.f)
        return self.w2(rate.to(x.dtype) * self.w3(x))

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """Membranes and spikes of the T_sim-step scan per gate channel, its zero initial state,
        the rate and w3's output (the product's operands) and the product (w2's input)."""
        return batch * seq_len * (2 * self.opts.T_sim + 4) * self.f * act

    def flops_per_token(self, seq_len: int) -> float:
        """T_sim neuron updates (4 ops) per gate channel, the rate and the gate multiply; x3 for fwd + bwd."""
        return 3 * (4 * self.opts.T_sim + 2) * self.f

    def ops_per_token(self, rate_nonzero, spikes_per_slot):
        """w1, w3 dense; w2 only needs the columns whose gate spiked at least once (zero-skipping)."""
        d, f = self.d, self.f
        return 2 * d * f + f + rate_nonzero * f * d, 0.0, 3 * d * f + f


def spike_metrics(model) -> dict:
    """Per-layer spike rates and the energy proxy from the eval forwards since the last call.

    spike_rate.layerI.{mixer,mlp}: spikes per neuron per simulation step. energy_proxy_pj_per_token:
    4.6 pJ per MAC + 0.9 pJ per AC over all weight matmuls (attention scores, norms and the LIF state
    updates are left out); energy_vs_dense: that over the same model with every matmul a dense MAC.
    """
    out, macs, acs, dense = {}, 0.0, 0.0, 0.0
    spiking_params = set()
    rates = []
    for i, layer in enumerate(getattr(model, "layers", [])):
        for part in ("mixer", "mlp"):
            m = getattr(layer, part)
            if not isinstance(m, _SpikeStats):
                continue
            spiking_params.update(id(p) for p in m.parameters())
            st = {k: float(v) for k, v in m._stat.items()}
            if st["slots"] == 0:
                continue
            rate = st["spikes"] / (st["slots"] * (m.opts.T_sim if isinstance(m, SpikingMLP) else 1))
            per_token = st["spikes"] / st["tokens"] / m.d if isinstance(m, LIFMixer) else 0.0
            a, b, c = m.ops_per_token(st["nonzero"] / st["slots"], per_token)
            macs, acs, dense = macs + a, acs + b, dense + c
            out[f"spike_rate.layer{i}.{part}"] = rate
            rates.append(rate)
            m._reset_stats()
    if not spiking_params:
        return {}
    for mod in model.modules():  # every other weight matmul is dense
        if isinstance(mod, nn.Linear) and id(mod.weight) not in spiking_params:
            n = mod.in_features * mod.out_features
            macs, dense = macs + n, dense + n
    if rates:
        out["spike_rate_mean"] = sum(rates) / len(rates)
        e = E_MAC_PJ * macs + E_AC_PJ * acs
        out["energy_proxy_pj_per_token"] = e
        out["energy_vs_dense"] = e / (E_MAC_PJ * dense)
        out["ac_ops_per_token"] = acs
        out["mac_ops_per_token"] = macs
    return out
