"""Mamba-2: the selective state-space model in its state-space-duality (SSD) form (Dao & Gu 2024),
the token mixer of transformers' `Mamba2Mixer` and mamba_ssm's `Mamba2`. Letter M.

Each head h keeps a [headdim, d_state] state; heads share B and C within a group (ngroups groups):
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,    y_t = h_t C_t + D x_t
with dt_t = softplus(dt_raw_t + dt_bias) > 0 and A = -exp(A_log) < 0 one scalar per head (the "scalar
times identity" A that makes the SSD form possible), D a per-head skip.

Layer: in_proj: d -> (z [d_inner], xBC [d_inner + 2 ngroups d_state], dt [nheads]); xBC passes a
depthwise causal conv of conv_kernel taps (with bias) and SiLU and splits into x, B, C; the core
above; y * SiLU(z) is RMS-normalised per group (Mamba2's RMSNormGated, norm after the gate) and sent
through out_proj. d_inner = expand * d_model, nheads = d_inner / headdim. The weights are
transformers' `Mamba2Mixer`'s, same names aside (tests/test_mamba2.py moves one into this block).

Two implementations of the core: `ssd_ref` (one token at a time, obviously correct; it is also the
decode step) and `ssd_chunked` (the training path: inside chunks of `chunk` tokens the output is a
masked "attention" C B^T weighted by the segment-sum decays; the chunk-end states are a loop over
T / chunk steps of one multiply-add each). tests/test_mamba2.py checks them against each other,
forward and gradients. Export graphs run `ssd_chunked` as one chunk over the whole input (no loop over
a symbolic length); tests/test_convert.py runs them in onnxruntime and ExecuTorch.

Bidirectional models (model.causal=false, masked diffusion) run a centred conv and the core over the
sequence in both directions, summing the two outputs (the same parameters, so AR checkpoints load).
The core runs in fp32 under bf16 autocast: the state accumulates over thousands of tokens.

Options: model.mixer_opts.mamba2 (Mamba2Options below).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import conv1d_op
from slmlab.errors import ConfigError

from .block import Mixer, exporting
from .conv import bidirectional_conv
from .registry import register


@dataclass
class Mamba2Options:
    """model.mixer_opts.mamba2."""

    # State size per head. Mamba-2's own default is 128; 64 here because the parameters barely depend
    # on it (2 * ngroups * d_state rows of in_proj) while the core's work and the decode state grow
    # with it: at d_model 256 the mixer has 431,768 parameters (d_state 128: 465,176; 16: 406,712;
    # the short conv's: 262,912), and the default MMA model 6.42M against the hybrid's 5.74M.
    d_state: int = 64
    expand: int = 2  # d_inner = expand * d_model
    headdim: int = 64  # channels per head; nheads = d_inner / headdim
    ngroups: int = 1  # B/C groups (heads in a group share B and C); must divide nheads
    conv_kernel: int = 4  # taps of the short causal conv on x, B and C (Mamba-2 uses 4)
    chunk: int = 64  # tokens per chunk of the training path
    core: str = "chunked"  # chunked | reference (the token-by-token loop)

    def d_inner(self, d_model: int) -> int:
        return self.expand * d_model

    def heads(self, d_model: int) -> int:
        """SSM heads: d_inner / headdim (the block refuses a headdim that does not divide d_inner)."""
        return self.d_inner(d_model) // self.headdim

    def check(self, where: str):
        for key in ("d_state", "expand", "headdim", "ngroups", "conv_kernel", "chunk"):
            value = getattr(self, key)
            if value < 1:
                raise ConfigError(f"{where}.{key} must be an integer >= 1, got {value}")
        if self.core not in ("chunked", "reference"):
            raise ConfigError(f"{where}.core must be chunked or reference, got {self.core!r}")


@dataclass
class Mamba2State:
    conv: torch.Tensor  # [B, conv channels, K-1]: the last K-1 inputs of the conv (xBC before it)
    h: torch.Tensor  # [B, nheads, headdim, d_state] fp32: the SSM state


# ---- the core: SSD ------------------------------------------------------------------------------------
# x [B, T, H, P], dt [B, T, H] (> 0), A [H] (< 0), B, C [B, T, G, N] (head h reads group h // (H / G)),
# h [B, H, P, N], all fp32. Both return (y [B, T, H, P] without the D skip, final h).

def ssd_ref(x, dt, A, B, C, h):
    """Reference: the recurrence one token at a time."""
    r = x.shape[2] // B.shape[2]
    B, C = B.repeat_interleave(r, dim=2), C.repeat_interleave(r, dim=2)
    out = []
    for t in range(x.shape[1]):
        decay = (dt[:, t] * A).exp()[..., None, None]
        h = h * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        out.append(torch.einsum("bhpn,bhn->bhp", h, C[:, t]))
    return torch.stack(out, 1), h


def ssd_chunked(x, dt, A, B, C, h, chunk: int = 64, final_state: bool = True):
    """The same recurrence in chunks of L tokens. With a = dt A, gam = cumsum(a) inside a chunk,
    seg_ij = a_{j+1} + ... + a_i (= gam_i - gam_j) and S0 the state at its start, unrolling the
    recurrence gives (u = dt x)
        y_i = sum_{j <= i} exp(seg_ij) (C_i . B_j) u_j + exp(gam_i) S0 C_i
        S_L = exp(gam_L) S0 + sum_j exp(seg_Lj) u_j B_j^T
    The first term is every chunk at once (C B^T is per group, the decay mask per head); only the
    state hand-over S <- exp(gam_L) S + R runs chunk after chunk. final_state=False (training, the
    reversed pass) skips the last chunk's hand-over and returns None for the state: its graph would
    never reach the loss, and autograd would still have built it."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    r = H // G
    L = min(chunk, T)
    nc = -(-T // L)
    pad = nc * L - T  # padded tokens: u = 0 and a = 0 leave the state as it is

    def per_head(t):  # [B, T, H, ...] -> [B, G, r, nc, L, ...]
        t = t.transpose(1, 2)
        t = F.pad(t, (0, 0, 0, pad)) if t.dim() == 4 else F.pad(t, (0, pad))
        # contiguous: without padding the transposed view reaches the matmuls, which copy it there
        return t.contiguous().reshape(Bsz, G, r, nc, L, *t.shape[3:])

    def per_group(t):  # [B, T, G, N] -> [B, G, nc, L, N]
        return F.pad(t.transpose(1, 2), (0, 0, 0, pad)).contiguous().reshape(Bsz, G, nc, L, N)

    u, a = per_head(x * dt[..., None]), per_head(dt * A)
    B, C = per_group(B), per_group(C)
    gam = a.cumsum(-1)
    # seg summed over its own segment: gam_i - gam_j would cancel two long sums (|gam| ~ 1e3 under
    # strong decay: an error of ~1e-4 in the exponent). -inf above the diagonal: j > i reads nothing.
    mask = torch.ones(L, L, dtype=torch.bool, device=x.device)
    seg = a[..., None].expand(*a.shape, L).masked_fill(~mask.tril(-1), 0).cumsum(-2)
    decay = seg.masked_fill(~mask.tril(), float("-inf")).exp()  # [B, G, r, nc, L, L]
    y = ((C @ B.transpose(-1, -2))[:, :, None] * decay) @ u  # [B, G, r, nc, L, P]
    # One op a chunk in the loop: each op is a parallel region with a barrier, and many small ones
    # a chunk stall a busy machine (deltanet's loop body went from 7 ops to 1 for that reason).
    S = h.reshape(Bsz, G, r, P, N)
    starts, handed = [S], nc if final_state else nc - 1
    if handed:
        w = decay[:, :, :, :handed, -1, :, None]  # the row of seg_Lj
        R = torch.einsum("bgrnlp,bgnls->bgrnps", u[:, :, :, :handed] * w, B[:, :, :handed])
        # unbind once: indexing [:, :, :, n] in the loop makes full-size zero gradients for each chunk
        for e, rn in zip(gam[:, :, :, :handed, -1].exp().unbind(3), R.unbind(3)):
            S = torch.addcmul(rn, S, e[..., None, None])
            starts.append(S)
    S0 = torch.stack(starts[:nc], 3)  # [B, G, r, nc, P, N]: the state at each chunk's start
    y = y + torch.einsum("bgnls,bgrnps->bgrnlp", C, S0) * gam.exp()[..., None]
    y = y.reshape(Bsz, H, nc * L, P)[:, :, :T].transpose(1, 2)
    return y, (S.reshape(Bsz, H, P, N) if final_state else None)


def ssd_whole(x, dt, A, B, C, h):
    """The chunked form with one chunk spanning the input, in tensors of at most 3 dims (batch and heads
    folded): the export graphs' core. It has no loop over a symbolic length and no branch on T == 1, and
    XNNPACK (ExecuTorch's CPU backend) refused ssd_chunked's 6-dim tensors. Its masks are T x T per head:
    an export prompt of up to --max-len tokens affords them, a decode step is 1 x 1."""
    Bsz, T, H, P = x.shape
    N, r = B.shape[3], H // B.shape[2]

    def fold(t):  # [B, T, H, ...] -> [B H, T, ...]
        return t.transpose(1, 2).reshape(Bsz * H, T, *t.shape[3:])

    u, a = fold(x * dt[..., None]), fold(dt * A)
    B, C = fold(B.repeat_interleave(r, dim=2)), fold(C.repeat_interleave(r, dim=2))
    i = torch.arange(T, device=x.device)
    below, causal = i[:, None] > i[None, :], i[:, None] >= i[None, :]
    # seg_ij = a_{j+1} + ... + a_i summed over its own segment (see ssd_chunked), -inf where j > i
    seg = a[:, None, :].expand(-1, T, -1).transpose(1, 2).masked_fill(~below, 0).cumsum(1)
    decay = seg.masked_fill(~causal, float("-inf")).exp()  # [B H, T, T]
    gam = a.cumsum(1)  # [B H, T]
    S = h.reshape(Bsz * H, P, N)
    y = ((C @ B.transpose(1, 2)) * decay) @ u + gam.exp()[..., None] * (C @ S.transpose(1, 2))
    S = gam[:, -1:, None].exp() * S + (u * decay[:, -1, :, None]).transpose(1, 2) @ B
    return y.reshape(Bsz, H, T, P).transpose(1, 2), S.reshape(Bsz, H, P, N)


# ---- the block ------------------------------------------------------------------------------------
@register("mamba2", "M", options=Mamba2Options)
class Mamba2(Mixer):
    residual_out = ("out_proj",)

    def __init__(self, cfg, layer_idx: int, window: Optional[int] = None):
        super().__init__()
        o = cfg.block_options("mamba2")
        self.opts, self.causal, self.backend, self.eps = o, cfg.causal, cfg.kernels, cfg.norm_eps
        d = cfg.d_model
        self.d_inner = o.d_inner(d)
        if self.d_inner % o.headdim:
            raise ConfigError(f"model.mixer_opts.mamba2.headdim={o.headdim} does not divide d_inner = expand * "
                              f"d_model = {o.expand} * {d} = {self.d_inner}")
        self.nheads, self.P = o.heads(d), o.headdim
        self.N, self.G, self.K = o.d_state, o.ngroups, o.conv_kernel
        if self.nheads % self.G:
            raise ConfigError(f"model.mixer_opts.mamba2.ngroups={self.G} does not divide the {self.nheads} heads "
                              f"(d_inner {self.d_inner} / headdim {self.P})")
        self.conv_dim = self.d_inner + 2 * self.G * self.N
        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.nheads, bias=False)  # z | xBC | dt
        self.conv = nn.Conv1d(self.conv_dim, self.conv_dim, self.K, groups=self.conv_dim, bias=True)
        # mamba_ssm's init: A ~ U(1, 16), dt = softplus(dt_bias) log-uniform in [1e-3, 0.1], D = 1
        self.A_log = nn.Parameter(torch.empty(self.nheads).uniform_(1, 16).log())
        dt = torch.exp(torch.empty(self.nheads).uniform_(math.log(1e-3), math.log(0.1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # the inverse of softplus
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm_weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    # ---- forward ----
    def init_state(self, batch_size: int, device=None, dtype=torch.float32) -> Mamba2State:
        return Mamba2State(torch.zeros(batch_size, self.conv_dim, self.K - 1, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.nheads, self.P, self.N, device=device,
                                       dtype=torch.promote_types(dtype, torch.float32)))  # the scan's dtype

    def forward(self, x, state: Optional[Mamba2State] = None):
        Bsz, T, _ = x.shape
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        w, bias = self.conv.weight.squeeze(1), self.conv.bias
        if not self.causal:
            if state is not None:
                raise RuntimeError("incremental decode needs a causal model")
            xbc = bidirectional_conv(xbc, w, bias)
        elif state is None:
            xbc = conv1d_op(xbc, w, bias, backend=self.backend)
        else:
            xbc, buf = conv1d_op(xbc, w, bias, initial_state=state.conv.to(xbc.dtype), return_final_state=True,
                                 backend=self.backend)
        cd = torch.promote_types(x.dtype, torch.float32)  # the scan runs in fp32 (fp64 for an fp64 model)
        with torch.autocast(x.device.type, enabled=False):
            xs, Bm, Cm = F.silu(xbc.to(cd)).split([self.d_inner, self.G * self.N, self.G * self.N], dim=-1)
            xs = xs.reshape(Bsz, T, self.nheads, self.P)
            Bm, Cm = Bm.reshape(Bsz, T, self.G, self.N), Cm.reshape(Bsz, T, self.G, self.N)
            dt = F.softplus(dt.to(cd) + self.dt_bias)
            A = -self.A_log.to(cd).exp()
            h0 = torch.zeros(Bsz, self.nheads, self.P, self.N, device=x.device, dtype=cd) if state is None \
                else state.h.to(cd)
            y, h = self._core(xs, dt, A, Bm, Cm, h0, final_state=state is not None)
            if not self.causal:  # no state here: h0 is zeros
                y = y + self._core(*(t.flip(1) for t in (xs, dt)), A, Bm.flip(1), Cm.flip(1), h0, False)[0].flip(1)
            y = (y + self.D[:, None] * xs).reshape(Bsz, T, self.G, -1) * F.silu(z.to(cd)).view(Bsz, T, self.G, -1)
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
            y = (y.reshape(Bsz, T, self.d_inner) * self.norm_weight).to(x.dtype)
        return self.out_proj(y), (None if state is None else Mamba2State(buf, h))

    def _core(self, x, dt, A, B, C, h, final_state: bool):
        if exporting():
            # An export graph (convert.py: onnx, executorch, coreml) takes T as a symbolic size: one chunk
            # spanning the input has no loop over chunks and no branch on T == 1. Its masks are T x T per
            # head, which a prompt of up to --max-len tokens affords; a decode step is 1 x 1.
            return ssd_whole(x, dt, A, B, C, h)
        # One token (decode) is the reference's single step: the chunked form would build 1x1 masks.
        if self.opts.core == "reference" or x.shape[1] == 1:
            return ssd_ref(x, dt, A, B, C, h)
        return ssd_chunked(x, dt, A, B, C, h, self.opts.chunk, final_state)

    # ---- static state: the same tensors as Mamba2State, updated in place for decode ----
    static_state_names = ("conv", "h")

    def static_state(self, batch_size: int, max_len: int, device=None, dtype=torch.float32) -> list:
        st = self.init_state(batch_size, device, dtype)
        return [st.conv, st.h]

    def forward_static(self, x, positions, state: list, inplace: bool):
        y, new = self.forward(x, Mamba2State(*state))
        if not inplace:
            return y, [new.conv, new.h]
        for buf, t in zip(state, (new.conv, new.h)):
            buf.copy_(t)
        return y, state

    # ---- sizing ----
    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """What autograd keeps for backward, counted tensor by tensor (tests/test_mamba2.py checks it
        against autograd's saved tensors over shapes, fp32 and bf16, causal and not). In the matmul
        dtype: the conv's padded input and out_proj's input (under bf16, also autocast's copy of x).
        In fp32: the conv's output (SiLU's input), SiLU's output, z, ~4 per channel in the gated norm,
        two per head for dt; in fp32 runs in_proj's whole output (z, xBC and dt are views of it). The
        chunked core, per padded token: per head two chunk-length rows (the decay mask, the masked
        scores), exp(gam) and two headdim vectors (dt x, the state's read-out), per group the scores
        row and two d_state vectors; for the hand-over (every chunk but the last: training keeps no
        final state) the weighted dt x and B again; per chunk the start states read out, plus the
        states entering the hand-over loop. The reference core keeps a state and a few vectors per
        token. A bidirectional model runs a second core over flipped copies, sharing the zero state.
        Measured within 0.8% on every shape tried (T = 7 to 130, 1 to 9 chunks, 1 to 4 groups)."""
        H, P, N, G, K = self.nheads, self.P, self.N, self.G, self.K
        tokens, state, masks = batch * seq_len, batch * H * P * N, 0
        if self.opts.core == "reference":
            core, shared = tokens * H * (P * N + P + 2 * N + 2) + state, state
        else:
            L = min(self.opts.chunk, seq_len)
            n = -(-seq_len // L)
            handed = n - 1
            core = batch * n * L * (H * (2 * L + 1) + G * (L + 2 * N) + 2 * self.d_inner)
            core += batch * handed * L * (self.d_inner + G * N) + (n + handed) * state
            shared = state if handed else 0
            masks = (1 if self.causal else 2) * 2 * L * L  # the two bool masks of each pass
        fp32 = tokens * (2 * self.conv_dim + 5 * self.d_inner + 2 * H + G) + core
        if not self.causal:
            fp32 += core - shared + tokens * (self.d_inner + H)
        matmul = batch * (seq_len + K - 1) * self.conv_dim + tokens * self.d_inner
        if act == 4:
            fp32 += tokens * (self.conv_dim + H)  # the rest of in_proj's output (z is counted above)
        else:
            matmul += tokens * self.in_proj.in_features
        return 4 * fp32 + act * matmul + masks

    def flops_per_token(self, seq_len: int) -> float:
        """Work beyond the parameter matmuls, fwd + bwd (x3 the forward's multiply-adds x2): per group
        and token the chunk's C B^T row (L d_state); per head and token the masked scores times
        dt x (L headdim), the start state read out by C and, in all chunks but the last (training
        hands no state on), the chunk-end state term (headdim d_state each); a bidirectional model runs
        the core twice; plus the conv's taps. FlopCounterMode agrees (tests/test_mamba2.py)."""
        L = min(self.opts.chunk, seq_len)
        nc = -(-seq_len // L)
        per_head = L * self.P + self.P * self.N * (1 + (nc - 1) / nc)
        core = self.G * L * self.N + self.nheads * per_head
        return 6 * (core * (1 if self.causal else 2) + self.conv_dim * self.K)
