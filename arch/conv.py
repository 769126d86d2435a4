"""LFM2 gated short convolution.

in_proj: d -> 3d split as (B, C, x); y = C * conv(B * x) with a depthwise causal conv of kernel K
and no activation; out_proj: d -> d. The decode state holds the last K-1 inputs of the conv.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from kernels import conv1d_op
from kernels.reference import causal_conv1d_ref

from .block import Mixer
from .registry import register


@dataclass
class ConvState:
    buf: torch.Tensor  # [B, D, K-1]: the last K-1 values of B*x


@register("conv", "C")
class ShortConv(Mixer):
    residual_out = ("out_proj",)

    def __init__(self, cfg, layer_idx: int, window: Optional[int] = None):
        super().__init__()
        d, K = cfg.d_model, cfg.conv_kernel
        self.K = K
        self.causal = cfg.causal
        self.backend = cfg.kernels
        self.in_proj = nn.Linear(d, 3 * d, bias=cfg.conv_bias)
        # nn.Conv1d only holds the depthwise weight [D, 1, K] (same layout as HF's Lfm2ShortConv);
        # the convolution itself goes through kernels.conv1d_op.
        self.conv = nn.Conv1d(d, d, K, groups=d, bias=cfg.conv_bias)
        self.out_proj = nn.Linear(d, d, bias=cfg.conv_bias)

    def flops_per_token(self, seq_len: int) -> float:
        """K depthwise taps per channel (a multiply-add each), x3 for fwd + bwd."""
        return 6 * self.conv.in_channels * self.K

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """in_proj's output (B, C and x in one tensor), the padded B*x the conv reads (K-1 more
        steps per sequence), the conv output and C * conv (out_proj's input)."""
        d = self.conv.in_channels
        return (batch * seq_len * 6 * d + batch * (self.K - 1) * d) * act

    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> ConvState:
        return ConvState(torch.zeros(batch_size, self.conv.in_channels, self.K - 1, device=device, dtype=dtype))

    def forward(self, x, state: Optional[ConvState] = None):
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        bx = b * h
        w = self.conv.weight.squeeze(1)
        if not self.causal:
            if state is not None:
                raise RuntimeError("incremental decode needs a causal model")
            y = bidirectional_conv(bx, w, self.conv.bias)
        elif state is None:
            y = conv1d_op(bx, w, self.conv.bias, backend=self.backend)
        else:
            y, buf = conv1d_op(bx, w, self.conv.bias, initial_state=state.buf.to(bx.dtype),
                               return_final_state=True, backend=self.backend)
            state = ConvState(buf)
        return self.out_proj(c * y), state


    # ---- static state: the same [B, D, K-1] buffer as ConvState ----
    static_state_names = ("conv",)

    def static_state(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> list:
        return [self.init_state(batch_size, device, dtype).buf]

    def forward_static(self, x, positions, state: list, inplace: bool):
        if not self.causal:
            raise RuntimeError("incremental decode needs a causal model")
        b, c, h = self.in_proj(x).chunk(3, dim=-1)
        bx = b * h
        (buf,) = state
        w = self.conv.weight.squeeze(1)
        if inplace and x.shape[1] == 1:
            # One token: K multiply-adds per channel. F.conv1d (oneDNN) cost ~170 us per call here,
            # more than the layer's matmuls.
            window = torch.cat([buf.to(bx.dtype), bx.transpose(1, 2)], dim=-1)  # [B, D, K]
            y = (window * w).sum(-1, keepdim=True).transpose(1, 2)
            if self.conv.bias is not None:
                y = y + self.conv.bias
            new = window[:, :, 1:]
        else:
            y, new = causal_conv1d_ref(bx, w, self.conv.bias, initial_state=buf, return_final_state=True)
        if inplace:
            buf.copy_(new)
            new = buf
        return self.out_proj(c * y), [new]


def bidirectional_conv(x, weight, bias=None):
    """Centred depthwise conv for the bidirectional (diffusion) objective: the same K taps,
    shifted so output t sees inputs t - (K-1)//2 ... t + K//2. Same parameters as the causal
    form, so a checkpoint moves between objectives unchanged."""
    import torch.nn.functional as F

    K = weight.shape[1]
    xt = x.transpose(1, 2)
    xt = F.pad(xt, ((K - 1) // 2, K // 2))
    return F.conv1d(xt, weight.unsqueeze(1), bias, groups=x.shape[-1]).transpose(1, 2)
