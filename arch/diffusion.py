"""Masked diffusion language model (MDLM / LLaDA) on the same blocks, run bidirectionally.

Forward process: each token of a clean sequence x0 is replaced by the mask token independently with
probability t (log-linear schedule: alpha_t = 1 - t), t ~ U(eps, 1). The network sees x_t and
predicts x0 at every position (SUBS parameterisation: the mask token's logit is -inf, and
unmasked positions are carried over, so they cost nothing). The continuous-time ELBO is

    -log p(x0) <= E_t E_{x_t} [ sum over masked positions i of  -log p_theta(x0_i | x_t) / t ]

which is also LLaDA's loss (CE over masked positions / p_mask). Divided by the sequence length
it is a per-token bound in nats: training minimises it and eval reports it (bpb labelled a bound).
t is drawn antithetically (stratified over the batch, as in MDLM) to cut its variance.

Samplers: `llada_sample` (block-wise semi-autoregressive, low-confidence remasking) and
`mdlm_sample` (ancestral: each masked token is revealed with probability (t - s) / t per step).

Options (the `objective:` section, arch/config.py ObjectiveConfig): name: mdlm, mask_id (3, the
slmlab tokenizer's <|mask|>), eval_t_samples (4: t draws per eval sequence), block_length (32:
default sampler block).
The model needs model.causal=false (every mixer bidirectional; see arch/conv.py for the centred
conv and arch/lif.py for the two-way LIF).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from slmlab.errors import ConfigError

from .loss import linear_token_nll
from .model import LM, check_top_p, sample_next

T_EPS = 1e-3  # smallest t: keeps the 1/t weight finite


def antithetic_t(n: int, device, generator=None, eps: float = T_EPS):
    """n diffusion times covering [eps, 1) evenly: one uniform offset, n strata."""
    u = torch.rand(1, device=device, generator=generator)
    t = (u + torch.arange(n, device=device) / n) % 1.0
    return eps + (1 - eps) * t


def masked_diffusion_terms(logits, x0, masked, t, mask_id: int):
    """Per-position ELBO terms [B, T]: CE(x0) / t where masked, 0 where carried over.
    logits [B, T, V] (any values at the mask id; SUBS sets it to -inf here), t [B]."""
    logits = logits.float().clone()
    logits[..., mask_id] = float("-inf")
    ce = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
    return torch.where(masked, ce / t[:, None], torch.zeros_like(ce))


class DiffusionLM(LM):
    nll_is_bound = True  # token_nll is the ELBO, an upper bound on the NLL

    def __init__(self, cfg, objective):
        objective.validate(cfg)
        self.mask_id = objective.mask_id
        self.eval_t_samples = objective.eval_t_samples
        self.block_length = objective.block_length
        super().__init__(cfg)

    def flops_per_token(self, seq_len: int) -> float:
        """LM's count with the head on the masked tokens only (training runs it there: _masked_rows),
        a share E[t] = (1 + T_EPS) / 2 of them; counted on every token it read MFU ~10% high on the
        default diffusion preset."""
        head = self.lm_head.weight.numel()
        return super().flops_per_token(seq_len) - 6 * head * (1 - (1 + T_EPS) / 2)

    # ---- the objective ----
    def denoise_logits(self, xt):
        """p_theta(x0 | x_t) logits [B, T, V] with the mask token excluded (SUBS)."""
        logits = self.lm_head(self.hidden(xt)[0]).float()
        logits[..., self.mask_id] = float("-inf")
        return logits

    def _masked_rows(self, x0, t, generator=None, u=None):
        """Mask x0 at rate t [B] (where the uniforms u [B, T], drawn here if None, fall below t): (hidden
        states of the masked positions [N, d], their clean tokens [N], their t [N], the mask [B, T]).
        The head (often the largest matmul in a small model) then only runs where there is a loss."""
        if u is None:
            u = torch.rand(x0.shape, device=x0.device, generator=generator)
        masked = u < t[:, None]
        xt = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        h = self.hidden(xt)[0]
        return h[masked], x0[masked], t[:, None].expand_as(x0)[masked], masked

    def elbo_terms(self, x0, t, generator=None):
        """Mask x0 at rate t [B] and return the per-position ELBO terms [B, T] (model.loss_chunk
        rows of logits at a time when set)."""
        h, target, tt, masked = self._masked_rows(x0, t, generator)
        ce = linear_token_nll(h, self.lm_head.weight, target, self.cfg.loss_chunk, exclude=self.mask_id)
        out = torch.zeros(x0.shape, device=x0.device, dtype=ce.dtype)
        out[masked] = ce / tt
        return out

    def forward(self, idx, targets=None, states=None):
        """model(idx) -> denoising logits; model(idx, targets) -> the training loss, the ELBO per
        token of the clean sequence idx (targets only signal training: the objective needs no
        shifted targets). Times and masks are drawn from torch's global RNG, so runs repeat from the
        seed, for the whole global batch under torchrun (set_data_shard): every rank drew the same ones."""
        if states is not None:
            raise RuntimeError("a diffusion model has no incremental decode; use generate()")
        if targets is None:
            return self.denoise_logits(idx)
        (B, T), (rank, world) = idx.shape, self.data_shard
        rows = slice(rank * B, (rank + 1) * B)
        t = antithetic_t(B * world, idx.device)
        u = torch.rand(B * world, T, device=idx.device)
        h, target, tt, _ = self._masked_rows(idx, t[rows], u=u[rows])
        scale = 1.0 / (tt * idx.numel())  # sum over masked positions of CE / t, per clean token
        return self.loss(h, target, row_scale=scale, exclude=self.mask_id)

    def token_nll(self, idx, targets, generator=None):
        """Per-token ELBO terms [B, T] of the sequence `targets` (the one whose bytes the trainer
        counts; it is idx shifted by one), averaged over eval_t_samples antithetic draws of t."""
        x0 = targets
        B, K = x0.shape[0], self.eval_t_samples
        t = antithetic_t(B * K, x0.device, generator).view(K, B)
        return sum(self.elbo_terms(x0, t[k], generator) for k in range(K)) / K

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        raise RuntimeError("a diffusion model has no incremental decode; use generate()")

    # ---- sampling ----
    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None,
                 steps: Optional[int] = None, block_length: Optional[int] = None, sampler: str = "llada",
                 top_p: Optional[float] = None):
        """Fill max_new_tokens masks after the prompt. steps defaults to one token per step;
        block_length (llada) defaults to objective.block_length, shrunk to a divisor if needed. With
        eos_id, a row's tokens after its first generated eos_id are eos_id (LM.generate pads a finished
        row so): every position is sampled at once, so the text after an end is noise."""
        n = max_new_tokens
        self.check_room(idx.shape[1], n)
        check_top_p(top_p)
        if n == 0:
            return idx
        steps = steps or n
        if sampler == "mdlm":
            out = mdlm_sample(self, idx, n, steps, temperature, top_k, generator, top_p)
        elif sampler == "llada":
            if block_length is None:
                block_length = default_block_length(n, self.block_length)
            out = llada_sample(self, idx, n, steps, block_length, temperature, top_k, generator, top_p)
        else:
            raise ConfigError(f"sampler must be llada or mdlm, got {sampler!r}")
        if eos_id is not None:
            new = out[:, idx.shape[1]:]
            new.masked_fill_((new == eos_id).cummax(1).values, eos_id)
        return out


def _draw(logits, temperature, top_k, generator, top_p=None):
    """Sample x0 [B, L] from logits [B, L, V]; temperature 0 is argmax."""
    B, L, V = logits.shape
    return sample_next(logits.reshape(B * L, V), temperature, top_k, generator, top_p).view(B, L)


def default_block_length(gen_length: int, block_length: int) -> int:
    """llada's block length when none is given: the objective's, shrunk to a divisor of gen_length."""
    return math.gcd(gen_length, block_length)


def llada_steps_per_block(gen_length: int, steps: int, block_length: int) -> int:
    """The denoising passes llada_sample runs on each block: steps split evenly over the blocks,
    rounded up, at most one per token. sample.py tells the user when this rounds --diffusion-steps."""
    return min(block_length, -(-steps // (gen_length // block_length)))


def check_sampler_args(gen_length: int, steps: int, block_length: Optional[int] = None):
    if gen_length <= 0:
        raise ConfigError(f"generation length must be > 0, got {gen_length}")
    if steps <= 0:
        raise ConfigError(f"--diffusion-steps must be > 0, got {steps}")
    if block_length is not None:
        if block_length <= 0:
            raise ConfigError(f"--block-length must be > 0, got {block_length}")
        if gen_length % block_length:
            raise ConfigError(f"--block-length {block_length} does not divide the generation length {gen_length}")


@torch.no_grad()
def llada_sample(model, prompt, gen_length: int, steps: int, block_length: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator=None, top_p: Optional[float] = None):
    """LLaDA: generate block by block, left to right; within a block, each step predicts every
    masked token and keeps the most confident ones (the rest stay masked). Steps are split evenly
    over blocks (rounded up), and each block's tokens evenly over its steps, so every mask is filled
    by the block's last step. Prompt tokens are never touched."""
    check_sampler_args(gen_length, steps, block_length)
    B, P = prompt.shape
    x = torch.cat([prompt, prompt.new_full((B, gen_length), model.mask_id)], 1)
    n_blocks = gen_length // block_length
    per_block = llada_steps_per_block(gen_length, steps, block_length)
    base, extra = divmod(block_length, per_block)
    schedule = [base + (i < extra) for i in range(per_block)]
    pos = torch.arange(x.shape[1], device=x.device)
    for b in range(n_blocks):
        lo, hi = P + b * block_length, P + (b + 1) * block_length
        in_block = (pos >= lo) & (pos < hi)
        for k in schedule:
            logits = model.denoise_logits(x)
            x0 = _draw(logits, temperature, top_k, generator, top_p)
            conf = F.softmax(logits, -1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            open_ = (x == model.mask_id) & in_block
            conf = torch.where(open_, conf, torch.full_like(conf, -1.0))
            pick = conf.topk(k, dim=1).indices
            x = x.scatter(1, pick, x0.gather(1, pick))
    return x


@torch.no_grad()
def mdlm_sample(model, prompt, gen_length: int, steps: int, temperature: float = 1.0,
                top_k: Optional[int] = None, generator=None, top_p: Optional[float] = None):
    """MDLM ancestral sampling from t=1 to 0 in `steps` equal steps: a masked token is revealed
    with probability (t - s) / t (the posterior of the log-linear schedule), with a value drawn
    from p_theta(x0 | x_t); revealed tokens never change. The last step (s = 0) reveals all."""
    check_sampler_args(gen_length, steps)
    B, P = prompt.shape
    x = torch.cat([prompt, prompt.new_full((B, gen_length), model.mask_id)], 1)
    gen_region = torch.arange(x.shape[1], device=x.device) >= P
    for i in range(steps):
        t, s = 1 - i / steps, 1 - (i + 1) / steps
        masked = (x == model.mask_id) & gen_region
        if not masked.any():
            break
        x0 = _draw(model.denoise_logits(x), temperature, top_k, generator, top_p)
        reveal = torch.rand(x.shape, device=x.device, generator=generator) < (t - s) / t
        x = torch.where(masked & reveal, x0, x)
    return x
