"""Mixture of experts: a channel mixer of E SwiGLU experts, each token sent to the k it scores highest
(model.mlp=moe), the MLP of Qwen3-MoE, LFM2-MoE, OLMoE and Granite-4.0's MoE models.

    p = softmax(x W_router) (fp32, over the E experts), or sigmoid(x W_router) (router: sigmoid)
    y = sum over the k largest p_e (+ bias_e) of  w_e * SwiGLU_e(x)   [+ [sigmoid(x w_g) *] shared(x)]
with w the top-k scores p (not the bias), renormalised to sum to 1 when norm_topk (Qwen3-MoE's
norm_topk_prob), times routed_scale, and an optional shared SwiGLU expert every token passes through
(shared_ffn > 0), scaled per token by a sigmoid gate under shared_gate (Qwen2-MoE's shared_expert_gate).
LFM2-MoE is router sigmoid + expert_bias (+ dense_layers: leading layers with a dense SwiGLU,
ModelConfig.mlp_at).

Load balance: the load-balancing loss of Switch / transformers' MoE models, aux = E * sum_e f_e P_e
(f_e: the share of tokens that picked expert e among their k; P_e: e's mean router probability): k when
balanced, up to k * E when every token picks the same experts. The LM adds the gradient of
aux_loss_coef * aux to the objective but not its value (LM.add_aux_losses), so the logged training loss
is the language-model loss alone, comparable with a dense run's. Or, without a loss, expert_bias:
after every optimizer step the bias of each expert above the mean load falls by bias_update_rate and
the others' rises (DeepSeek-V3's auxiliary-loss-free balancing; MoE.after_step). Each eval logs the
worst expert's load (moe.max_load: its share of the token slots times E, 1 when balanced) and the mean
aux since the last eval.

Expert weights are stacks, w13 [E, 2f, d] (gate rows, then up rows) and w2 [E, d, f], laid out as
transformers' Qwen3MoeExperts (gate_up_proj, down_proj) and llama.cpp's *_exps tensors. Muon
orthogonalises each expert's matrix on its own (slmlab/optim.py takes a 3-D weight as a batch of
matrices), and the FLOPs counted are the k experts a token runs, not all E (flops_per_token; the LM
counts the router and the shared expert as the 2-D weights they are).

Three implementations: `moe_dense` (every expert on every token, weighted by a gate that is zero off
the top k: obviously correct, and free of data-dependent shapes, so the export graphs and compiled
inference run it), `moe_sorted` (the token slots grouped by expert, each expert on its own tokens:
k / E of the dense work, the training path) and `moe_few` (token by token through its k experts:
a few tokens, decode). tests/test_moe.py checks them against each other, forward and
gradients. Options: model.mixer_opts.moe (MoEOptions below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from slmlab.errors import ConfigError

from .block import ChannelMixer, exporting, recomputing
from .layers import SwiGLU
from .registry import register_channel_mixer


@dataclass
class MoEOptions:
    """model.mixer_opts.moe."""

    experts: int = 8  # E
    top_k: int = 2  # experts per token
    # Each expert's SwiGLU width; 0: the dense width (model.ffn_dim, or its default) / top_k rounded up to a
    # multiple of 8, so a token's expert FLOPs match the dense SwiGLU's (ablate.py --vary model.mlp=swiglu,moe
    # compares at equal compute).
    expert_ffn: int = 0
    shared_ffn: int = 0  # width of a shared expert every token passes through; 0: none
    shared_gate: bool = False  # the shared expert's output times sigmoid(x w_g), w_g [1, d] (Qwen2-MoE)
    norm_topk: bool = True  # renormalise the k weights to sum to 1
    aux_loss_coef: float = 0.01  # weight of the load-balancing loss (Switch's 0.01; 0 turns it off)
    core: str = "sorted"  # sorted | dense (the reference: every expert on every token)
    # LFM2-MoE / DeepSeek-V3 routing: per-expert sigmoid scores (softmax: Qwen3-MoE, Granite, Switch)
    router: str = "softmax"  # softmax | sigmoid
    # A per-expert bias added to the scores for choosing the top k only (not to the weights), moved after
    # every optimizer step by bias_update_rate toward balance: loaded experts down, idle ones up (DeepSeek-V3's
    # auxiliary-loss-free balancing; its rate 0.001; 0 keeps the bias as it is, an import's, say).
    expert_bias: bool = False
    bias_update_rate: float = 0.001
    routed_scale: float = 1.0  # the routed experts' weights times this (LFM2-MoE's routed_scaling_factor)
    dense_layers: int = 0  # the first N layers keep a dense SwiGLU model.ffn_dim wide (LFM2-MoE's num_dense_layers)

    def check(self, where: str):
        for key in ("experts", "top_k"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{where}.{key} must be an integer >= 1, got {getattr(self, key)}")
        if self.top_k > self.experts:
            raise ConfigError(f"{where}.top_k={self.top_k} exceeds {where}.experts={self.experts}")
        for key in ("expert_ffn", "shared_ffn"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{where}.{key} must be >= 0 (0: {'derived' if key == 'expert_ffn' else 'none'}), "
                                  f"got {getattr(self, key)}")
        if not self.aux_loss_coef >= 0:
            raise ConfigError(f"{where}.aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.core not in ("sorted", "dense"):
            raise ConfigError(f"{where}.core must be sorted or dense, got {self.core!r}")
        if self.router not in ("softmax", "sigmoid"):
            raise ConfigError(f"{where}.router must be softmax or sigmoid, got {self.router!r}")
        for key in ("bias_update_rate", "dense_layers"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"{where}.{key} must be >= 0, got {getattr(self, key)}")
        if not self.routed_scale > 0:
            raise ConfigError(f"{where}.routed_scale must be > 0, got {self.routed_scale}")
        if self.shared_gate and not self.shared_ffn:
            raise ConfigError(f"{where}.shared_gate gates the shared expert: give {where}.shared_ffn > 0 too")


def expert_width(o: MoEOptions, ffn: int) -> int:
    return o.expert_ffn or 8 * math.ceil(ffn / o.top_k / 8)


# ---- routing and the three cores --------------------------------------------------------------------
# x [N, d]; w13 [E, 2f, d]; w2 [E, d, f]; weights [N, k] and experts [N, k] from route(). -> y [N, d]
def route(logits, k: int, norm_topk: bool, router: str = "softmax", bias=None, scale: float = 1.0):
    """(scores [N, E] fp32, top-k weights [N, k] fp32, top-k experts [N, k] int64). The experts are the k
    highest scores + bias (bias: choice only); their weights are the scores, renormalised when norm_topk
    (sigmoid scores with LFM2-MoE's 1e-6 in the sum), times scale."""
    scores = logits.float().softmax(-1) if router == "softmax" else logits.float().sigmoid()
    if bias is None:
        weights, experts = scores.topk(k, dim=-1)
    else:
        experts = (scores + bias).topk(k, dim=-1).indices
        weights = scores.gather(-1, experts)
    if norm_topk:
        weights = weights / (weights.sum(-1, keepdim=True) + (1e-6 if router == "sigmoid" else 0.0))
    return scores, (weights * scale if scale != 1.0 else weights), experts


def swiglu_stack(x, w13, w2):
    """Expert-batched SwiGLU: x [E, n, d] -> [E, n, d]."""
    gate, up = (x @ w13.mT).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.mT


def moe_dense(x, w13, w2, weights, experts):
    """Every expert on every token, summed under a gate that is zero off each token's top k."""
    gate = torch.zeros(x.shape[0], w13.shape[0], device=x.device, dtype=weights.dtype)
    gate = gate.scatter(1, experts, weights)  # [N, E]
    y = swiglu_stack(x.unsqueeze(0).expand(w13.shape[0], -1, -1), w13, w2)  # [E, N, d]
    return (y * gate.mT.unsqueeze(-1).to(y.dtype)).sum(0)


def moe_few(x, w13, w2, weights, experts):
    """Token by token through its k experts (views of the stacks: nothing copied, nothing sorted): for a
    few tokens (decode), where the sorted core's fixed costs (a sort, E slices, most empty) dominate."""
    rows = []
    for n, chosen in enumerate(experts.tolist()):
        xn = x[n:n + 1]
        rows.append(sum(weights[n, j].to(xn.dtype) * swiglu_stack(xn, w13[e], w2[e]) for j, e in enumerate(chosen)))
    return torch.cat(rows)


def moe_sorted(x, w13, w2, weights, experts):
    """The N k token slots sorted by expert; expert e runs on its own slice; the outputs are scaled by
    their weights and summed back per token. The slices' sizes go to the host (one sync a layer).
    Why a loop and not F.grouped_mm (one call for every slice; CPU fp32 works in torch 2.13): no faster
    here. A training step of the default hybrid with MoE ran at 0.84x / 0.82x the dense SwiGLU's
    tokens/s with grouped_mm against 0.79x / 0.82x with the loop, forward 0.81x / 0.81x against 0.80x /
    0.84x (two quiet runs, interleaved, 2 threads); and under torch.compile its fake-tensor rule takes
    bf16 only. On CUDA (bf16, sm80+) it is the GPU issue's to measure."""
    N, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token = order // k
    ys = [swiglu_stack(xe, w13[e], w2[e]) for e, xe in enumerate(x[token].split(counts))]
    ys = torch.cat(ys) * weights.reshape(-1)[order, None].to(ys[0].dtype)
    return ys.new_zeros(N, x.shape[1]).index_add(0, token, ys)


def expert_counts(experts, E: int):
    """Token slots per expert [E] fp32, a static shape (bincount's depends on the data: a graph break)."""
    flat = experts.reshape(-1)
    return torch.zeros(E, device=flat.device).scatter_add(0, flat, torch.ones(flat.shape, device=flat.device))


def balance_loss(probs, counts):
    """E * sum_e f_e P_e (transformers' load_balancing_loss_func for one layer): k when balanced. probs
    [N, E] sum to 1 over the experts (sigmoid scores are normalised first, as DeepSeek-V3's balance loss
    does); counts [E]: token slots per expert (expert_counts, which the forward computes once for this
    and its load statistics)."""
    N, E = probs.shape
    return E * (counts / N * probs.mean(0)).sum()


# Tokens up to which a forward runs them one by one (moe_few): batch-1 eager decode of the default hybrid
# with MoE ran at 361 tok/s this way, 279 through the sorted core (dense SwiGLU: 516), and 220 gathering
# each token's experts' weights ([N, k, 2f, d] copies) instead (interleaved, 2 threads, 32-token prompt).
FEW_TOKENS = 4


# ---- the block ------------------------------------------------------------------------------------
@register_channel_mixer("moe", options=MoEOptions)
class MoE(ChannelMixer):
    matrix_stacks = ("w13", "w2")  # 3-D weights that are E matrices (slmlab/optim.py: Muon, weight decay)
    # w13's rows are two matrices (gate, then up): Muon orthogonalises them apart, as dense SwiGLU's w1 and
    # w3. Together, a dominant up gradient shrank the gate's update (RMS 0.03 against 0.10 apart).
    fused_rows = {"w13": 2}

    def __init__(self, cfg):
        super().__init__()
        o = cfg.block_options("moe")
        d, f = cfg.d_model, expert_width(o, cfg.ffn)
        if cfg.mlp_bias:
            raise ConfigError("model.mlp=moe has no biases: set model.mlp_bias=false")
        self.opts, self.d, self.f, self.E, self.k = o, d, f, o.experts, o.top_k
        self.router = nn.Linear(d, o.experts, bias=False)
        # The LM's init covers nn.Linear only: the stacks take its std here, w2 scaled as residual_out is.
        self.w13 = nn.Parameter(torch.randn(o.experts, 2 * f, d) * cfg.init_std)
        self.w2 = nn.Parameter(torch.randn(o.experts, d, f) * (cfg.init_std / math.sqrt(2 * cfg.n_layers)))
        self.shared = SwiGLU(d, o.shared_ffn) if o.shared_ffn else None
        self.shared_gate = nn.Linear(d, 1, bias=False) if o.shared_gate else None
        self.residual_out = ("shared.w2",) if o.shared_ffn else ()
        if o.expert_bias:  # a buffer: steps move it, not gradients; checkpoints and exports carry it
            self.register_buffer("expert_bias", torch.zeros(o.experts))
        self._aux: Optional[torch.Tensor] = None  # this step's balance loss, until the LM takes it
        # [E + 2]: slots per expert, summed aux, aux count: one tensor, so a compiled forward adds to it
        # without guarding on a Python counter
        self._stats: Optional[torch.Tensor] = None
        self._load: Optional[torch.Tensor] = None  # slots per expert since the last bias update

    def forward(self, x):
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        o = self.opts
        probs, weights, experts = route(self.router(xf), self.k, o.norm_topk, o.router,
                                        getattr(self, "expert_bias", None), o.routed_scale)
        if not exporting():
            self._record(probs, experts)
        y = self._core(xf, weights, experts)
        if self.shared is not None:
            shared = self.shared(xf)
            y = y + (shared if self.shared_gate is None else torch.sigmoid(self.shared_gate(xf)) * shared)
        return y.reshape(B, T, d)

    def _core(self, x, weights, experts):
        # An export graph (its T is symbolic) or a compiled inference step: no data-dependent shapes,
        # every expert runs.
        static = exporting() or (torch.compiler.is_compiling() and not torch.is_grad_enabled())
        if self.opts.core == "dense" or static:
            return moe_dense(x, self.w13, self.w2, weights, experts)
        if x.shape[0] <= FEW_TOKENS:
            return moe_few(x, self.w13, self.w2, weights, experts)
        return moe_sorted(x, self.w13, self.w2, weights, experts)

    def _record(self, probs, experts):
        """This step's balance loss for the LM (training), and the load statistics for extra_metrics.
        Under activation checkpointing the backward re-runs the forward: the loss is computed again (its
        backward needs the recomputed tensors) but neither it nor the loads are recorded twice."""
        with torch.no_grad():
            stats = expert_counts(experts, self.E)
        training = self.training and torch.is_grad_enabled()
        aux = None
        if training and self.opts.aux_loss_coef:
            if self.opts.router == "sigmoid":
                probs = probs / probs.sum(-1, keepdim=True)
            aux = balance_loss(probs, stats)
        if recomputing():
            return
        if aux is not None:
            self._aux = self.opts.aux_loss_coef * aux
        if training and self.opts.expert_bias and self.opts.bias_update_rate:
            self._load = stats if self._load is None else self._load + stats
        seen = aux.detach().float().reshape(1) if aux is not None else stats.new_zeros(1)
        stats = torch.cat([stats, seen, stats.new_ones(1) if aux is not None else stats.new_zeros(1)])
        self._stats = stats if self._stats is None else self._stats + stats

    @torch.no_grad()
    def after_step(self, stepped: bool = True):
        """After an optimizer step: the expert bias moves by bias_update_rate toward balance, from the loads
        of the step's forwards (summed over ranks, so every rank moves its copy alike); a skipped step's
        loads are dropped."""
        load, self._load = self._load, None
        if load is None or not stepped:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias.add_(torch.sign(load.mean() - load), alpha=self.opts.bias_update_rate)

    def take_aux_loss(self) -> Optional[torch.Tensor]:
        """The balance loss of the last training forward (once): LM.add_aux_losses adds its gradient."""
        aux, self._aux = self._aux, None
        return aux

    def take_stats(self):
        """(slots per expert [E], the mean balance loss or None) since the last call, or None."""
        stats, self._stats = self._stats, None
        if stats is None:
            return None
        n = float(stats[-1])
        return stats[:-2], (float(stats[-2]) / n if n else None)

    # ---- accounting ----
    def flops_per_token(self, seq_len: int) -> float:
        """The k experts a token runs (the stacks are 3-D, which the LM's 2-D count leaves out)."""
        return 6.0 * self.k * 3 * self.d * self.f

    def inactive_params(self) -> int:
        """The E - k experts a token does not run (LM.num_params(active=True))."""
        return (self.E - self.k) * 3 * self.d * self.f

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """Per token slot (k a token): its gathered input, the gate|up output, SiLU's output, the product,
        the expert output and its weighted copy, its int64 position and token and fp32 weight; per token:
        the router's fp32 probabilities, the top-k indices and weights and their sum; the shared expert's."""
        tokens = batch * seq_len
        out = tokens * (self.k * ((3 * self.d + 4 * self.f) * act + 20) + 4 * self.E + 12 * self.k + 4)
        if self.shared is not None:
            out += tokens * 4 * self.shared.w1.out_features * act
        return out


def moe_layers(model) -> list["MoE"]:
    """The model's MoE channel mixers, in layer order (seen through LoRA's wrappers: LM.mixers)."""
    return [m for m in model.mixers() if isinstance(m, MoE)]


def pending_stats(model) -> list:
    """Each MoE layer's load statistics since the last eval (None where it has none): a checkpoint
    keeps them, so a resumed run's next eval reports the loads an uninterrupted one would."""
    return [None if m._stats is None else m._stats.detach().cpu().clone() for m in moe_layers(model)]


def restore_pending_stats(model, saved: list) -> Optional[str]:
    """pending_stats' list back into the model's MoE layers; what does not fit them, as a problem."""
    layers = moe_layers(model)
    if not isinstance(saved, list) or len(saved) != len(layers):
        return f"'moe_stats' holds {len(saved) if isinstance(saved, list) else type(saved).__name__} entries for " \
               f"{len(layers)} MoE layers"
    for m, t in zip(layers, saved):
        if t is not None and not (isinstance(t, torch.Tensor) and t.shape == (m.E + 2,)):
            return f"'moe_stats' has an entry that is no [{m.E + 2}] tensor"
    for m, t in zip(layers, saved):
        m._stats = None if t is None else t.to(m.router.weight.device)
    return None


def moe_metrics(model) -> dict:
    """moe.max_load (the most loaded expert's share of token slots times E, worst layer; 1 when balanced),
    moe.dead_experts (experts no token picked, all layers) and moe.aux (the mean balance loss over the
    training steps, before aux_loss_coef), since the last call; {} without MoE layers."""
    loads, dead, auxes = [], 0, []
    for m in moe_layers(model):
        if (got := m.take_stats()) is None:
            continue
        counts, a = got
        if counts.sum() > 0:
            loads.append(float(counts.max() / counts.mean()))
            dead += int((counts == 0).sum())
        if a is not None:
            auxes.append(a)
    if not loads:
        return {}
    out = {"moe.max_load": max(loads), "moe.dead_experts": dead}
    if auxes:
        out["moe.aux"] = sum(auxes) / len(auxes)
    return out
