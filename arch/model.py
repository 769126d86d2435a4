"""The language model: embedding -> [pre-norm mixer + pre-norm SwiGLU] x n_layers -> norm -> head.

Layer i: h = x + mixer(norm(x)); out = h + mlp(norm(h)). The mixer is looked up by name in the
registry from the config's layer pattern; every mixer has forward(x, state=None) -> (y, state)
and init_state(batch_size, device, dtype).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .registry import get_mixer


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str, window: Optional[int]):
        super().__init__()
        self.kind = kind
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = get_mixer(kind)(cfg, layer_idx, window=window)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = make_channel_mixer(cfg)

    def forward(self, x, state=None):
        y, state = self.mixer(self.mixer_norm(x), state)
        h = x + y
        return h + self.mlp(self.mlp_norm(h)), state


def make_channel_mixer(cfg: ModelConfig) -> nn.Module:
    """SwiGLU by default; `mixer_opts.mlp` names another registered channel mixer."""
    name = cfg.mixer_opts.get("mlp", "swiglu")
    if name == "swiglu":
        return SwiGLU(cfg.d_model, cfg.ffn)
    from .registry import CHANNEL_MIXERS

    if name not in CHANNEL_MIXERS:
        from slmlab.errors import ConfigError

        raise ConfigError(f"unknown channel mixer {name!r}; known: swiglu, {', '.join(sorted(CHANNEL_MIXERS))}")
    return CHANNEL_MIXERS[name](cfg)


class LM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        kinds, windows = cfg.layer_types(), cfg.layer_windows()
        self.layers = nn.ModuleList(Block(cfg, i, k, w) for i, (k, w) in enumerate(zip(kinds, windows)))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)
        # GPT-2 style: shrink residual-branch outputs so the residual stream's variance stays O(1).
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def _init(self, m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, self.cfg.init_std)

    # ---- forward ----
    def hidden(self, idx, states=None):
        x = self.embed(idx)
        new_states = None if states is None else []
        for i, layer in enumerate(self.layers):
            if states is None and self.cfg.grad_checkpoint and self.training and torch.is_grad_enabled():
                x, _ = checkpoint(layer, x, None, use_reentrant=False)
            else:
                x, s = layer(x, None if states is None else states[i])
                if states is not None:
                    new_states.append(s)
        return self.norm(x), new_states

    def forward(self, idx, targets=None, states=None):
        """model(idx) -> logits [B, T, V]; model(idx, targets) -> mean CE loss (targets -1 ignored);
        model(idx, states=S) -> (logits, S') for incremental decode (S from init_state)."""
        x, new_states = self.hidden(idx, states)
        if targets is not None:
            return self.loss(x, targets)
        logits = self.lm_head(x)
        return logits if states is None else (logits, new_states)

    def loss(self, x, targets):
        logits = self.lm_head(x).float()
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    # ---- hooks the trainer uses, so objectives other than next-token prediction plug in ----
    nll_is_bound = False  # True when token_nll is an upper bound (e.g. a diffusion ELBO)

    def token_nll(self, idx, targets, generator=None):
        """Per-token negative log-likelihood in nats, [B, T], for evaluation and bits-per-byte."""
        logits = self(idx).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)

    def extra_metrics(self) -> dict:
        """Model-specific numbers logged at each eval (e.g. spike rates); empty by default."""
        return {}

    def init_state(self, batch_size: int, device=None, dtype=torch.float32):
        device = device or self.embed.weight.device
        return [layer.mixer.init_state(batch_size, device, dtype) for layer in self.layers]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, eos_id: Optional[int] = None):
        """Prefill the prompt once, then decode token by token through the states."""
        states = self.init_state(idx.shape[0], idx.device)
        logits, states = self(idx, states=states)
        out = [idx]
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, generator)
            out.append(nxt)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
            logits, states = self(nxt, states=states)
        return torch.cat(out, dim=1)

    # ---- accounting ----
    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM-style:
        6 * (matmul parameters, head included) + attention scores/values 12 * H * hd * ctx per
        attention layer, where ctx is the average number of keys a query sees (causal: ~T/2)."""
        n = sum(p.numel() for name, p in self.named_parameters() if p.dim() == 2 and "embed" not in name)
        if self.cfg.tie_embeddings:
            n += self.embed.weight.numel()  # the tied head still costs a matmul
        flops = 6 * n
        for layer in self.layers:
            if layer.kind == "attn":
                w = layer.mixer.window
                ctx = seq_len / 2 if w is None else min(w, seq_len / 2)
                if not self.cfg.causal:
                    ctx = seq_len if w is None else min(2 * w, seq_len)
                flops += 12 * self.cfg.n_heads * self.cfg.hd * ctx
            elif layer.kind == "conv":
                flops += 6 * self.cfg.d_model * self.cfg.conv_kernel
        return float(flops)


def sample_next(logits, temperature: float, top_k: Optional[int], generator=None):
    """logits [B, V] -> next token [B, 1]; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
