"""The block contract every token mixer and channel mixer follows, and the residual block around them.

A token mixer (`Mixer`) maps x [B, T, d] -> y [B, T, d] and carries a decode state:
    forward(x, state=None) -> (y, state)   state None: full sequence; else continue from state
    init_state(batch_size, device, dtype)  the state before the first token
    flops_per_token(seq_len)               training FLOPs (fwd + bwd) that are not parameter
                                           matmuls: attention scores, conv taps, neuron updates
    set_window(window)                     attention-like mixers: change the visible window
    activation_bytes(batch, seq_len, act)  bytes its forward saves for backward for one micro-batch
                                           (act: bytes per activation element, 4 fp32 / 2 bf16);
                                           slmlab/estimate.py sums these to size a run
    residual_out                           names of the Linear layers that write into the residual
                                           stream; their init is scaled by 1/sqrt(2 * n_layers)
A channel mixer (`ChannelMixer`) is forward(x) -> y with the same flops_per_token/residual_out/
activation_bytes.
Either kind may define take_aux_loss() -> a scalar tensor or None: a training-only loss of its last
forward, handed over once (MoE's load balance, arch/moe.py); the LM adds its gradient to the objective.
A module's `matrix_stacks` names its 3-D weights that are stacks of matrices (MoE experts): Muon and
weight decay treat them as the matrices they hold (slmlab/optim.py), unlike 3-D depthwise conv kernels;
its `fused_rows` ({name: k}) names weights whose rows are k matrices, which Muon orthogonalises apart.
after_step(stepped) is called after every optimizer step (LM.after_optimizer_step), for state that
gradients do not train (MoE's expert bias).
Register a mixer with `@register(name, letter, options=OptionsDataclass)` (arch/registry.py); its
options arrive as `cfg.block_options(name)`. The LM sums parameter-matmul FLOPs itself, so a block
only declares the work its parameters don't show.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager, nullcontext
from typing import Optional

import torch
import torch.nn as nn

from .layers import GeluMLP, SwiGLU, make_norm
from .registry import CHANNEL_MIXERS, NO_MLP, get_mixer, register_channel_mixer, where


def linear_activation_bytes(module: nn.Module, tokens: int, act: int) -> int:
    """A block's saved activations when it declares none: each Linear keeps its input for the
    weight gradient, and its output is kept by whatever consumes it. An upper bound for most
    blocks (a shared input counts once per Linear); the built-in blocks state the exact figure."""
    width = sum(m.in_features + m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    return tokens * width * act


class Mixer(nn.Module):
    mixer_name = "?"  # set by @register
    residual_out: tuple[str, ...] = ()
    # True: the block is built with (and takes from phases, via set_window) a sliding window from
    # model.window_pattern's S entries, as attention is; False: it is built with window=None.
    takes_window = False

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        return linear_activation_bytes(self, batch * seq_len, act)

    def init_state(self, batch_size: int, device=None, dtype=torch.float32):
        return None

    def flops_per_token(self, seq_len: int) -> float:
        return 0.0

    def set_window(self, window: Optional[int]):
        if window is not None:
            raise ValueError(f"mixer {self.mixer_name!r} has no attention window")

    # ---- optional: the static-state step (fixed-shape state tensors, fast decode and export) ----
    # static_state_names() -> names of the state tensors, e.g. ("k", "v")
    # static_state(batch_size, max_len, device, dtype) -> list of tensors of fixed shape
    # forward_static(x, positions [T] int64, state list, inplace) -> (y, state list): the same
    #   output as forward() with a state; inplace=True updates the tensors in place (decode),
    #   inplace=False returns new ones and has no data-dependent shapes (export graphs).
    # A mixer without them decodes through forward(x, state) instead (see LM.generate).
    static_state_names: Optional[tuple[str, ...]] = None
    # Why forward_static(inplace=False) cannot be traced with a symbolic token count, or None when it
    # can: slmlab/export then traces the model's decode graphs with one token a call, and says why.
    no_export: Optional[str] = None


# torch.compiler.is_exporting() inside torch.compile: before torch 2.12 dynamo folds it to a constant
# True in any compiled region (torch/_dynamo/variables/torch.py, tracing_state_functions), so on 2.9-2.11
# a compiled eval took the export path (LIF counted no spikes, mamba2 ran one chunk). 2.12+ dynamo reads
# the flag that is_exporting() returns in eager; before 2.12 exporting() reads that flag itself.
_IS_EXPORTING_TRACES = torch.__version__ >= (2, 12)


def exporting() -> bool:
    """torch.compiler.is_exporting(), also under torch.compile on torch < 2.12 (true only in torch.export):
    for a block whose graph for export differs from its eager/compiled one."""
    if _IS_EXPORTING_TRACES:
        return torch.compiler.is_exporting()
    return torch.compiler._is_exporting_flag


_RECOMPUTE = threading.local()


def recomputing() -> bool:
    """True while activation checkpointing (model.grad_checkpoint) re-runs a block's forward in the
    backward: a block that records something per forward (MoE's expert loads and balance loss) records
    it in the first run only (twice, its logged loads moved with a knob that changes no weight)."""
    return getattr(_RECOMPUTE, "on", False)


@contextmanager
def _recompute_context():
    _RECOMPUTE.on = True
    try:
        yield
    finally:
        _RECOMPUTE.on = False


def checkpoint_contexts():
    """torch.utils.checkpoint's context_fn: the recompute runs under recomputing(). A compiled graph
    recomputes inside the graph (no Python runs twice), and dynamo takes no custom context_fn."""
    return nullcontext(), _recompute_context()


class ChannelMixer(nn.Module):
    residual_out: tuple[str, ...] = ()

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        return linear_activation_bytes(self, batch * seq_len, act)

    def flops_per_token(self, seq_len: int) -> float:
        return 0.0


@register_channel_mixer("swiglu")
class SwiGLUMixer(ChannelMixer, SwiGLU):
    """The default channel mixer (arch/layers.py SwiGLU) under the block contract."""

    residual_out = ("w2",)

    def __init__(self, cfg):
        SwiGLU.__init__(self, cfg.d_model, cfg.ffn, cfg.mlp_bias)

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """w1's output (SiLU's input), SiLU's output and w3's output (the product's operands), the
        product (w2's input). The shared input x is the norm's output, counted by the Block."""
        return batch * seq_len * 4 * self.w1.out_features * act


@register_channel_mixer("gelu")
class GeluMixer(ChannelMixer, GeluMLP):
    """GPT-2's channel mixer (arch/layers.py GeluMLP), model.mlp=gelu."""

    residual_out = ("proj",)

    def __init__(self, cfg):
        GeluMLP.__init__(self, cfg.d_model, cfg.ffn, cfg.mlp_bias)

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """fc's output (GELU's input) and GELU's output (proj's input)."""
        return batch * seq_len * 2 * self.fc.out_features * act


def residual_linears(module: Optional[nn.Module]) -> list[nn.Linear]:
    return [module.get_submodule(name) for name in getattr(module, "residual_out", ())]


# ---- the contract, checked where the LM meets a block (arch/check.py checks a block in depth) ----
def fits_residual(y, x) -> bool:
    """y can be added to the residual stream x as it is: x's shape (a [B, 1, d] output would
    broadcast over T and leak the future) and x's dtype, or autocast's (bf16 matmul outputs).
    Shape and dtype comparisons only: no GPU sync, and torch.compile folds them at trace time."""
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        return False
    if y.dtype == x.dtype:
        return True
    kind = x.device.type
    return torch.is_autocast_enabled(kind) and y.dtype == torch.get_autocast_dtype(kind)


def bad_output(label: str, module: nn.Module, method: str, out, x, advice: bool = True):
    """The ConfigError for a block whose output cannot join the residual stream x."""
    from slmlab.errors import ConfigError

    token = label.startswith("block")
    expected = (f"(y {_describe(x)}, state)" if token else f"a tensor {_describe(x)}") + ", shaped and typed like its input"
    if token and isinstance(out, tuple) and len(out) == 2:
        got = f"(y {_describe(out[0])}, state)"
    elif isinstance(out, (tuple, list)):
        got = f"a {type(out).__name__} of {len(out)}"
    else:
        got = ("a bare tensor " if token and isinstance(out, torch.Tensor) else "") + _describe(out)
    advice = " (python -m arch.check FILE checks a block before training)" if advice else ""
    return ConfigError(f"{label} ({where(type(module))}): {method} returned {got}, expected {expected}{advice}")


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"[{', '.join(map(str, t.shape))}] {str(t.dtype).removeprefix('torch.')}"


def build_block(label: str, cls, *args, **kwargs) -> nn.Module:
    """cls(*args) with any failure as one line naming the block, its file and the failing line,
    instead of a traceback through the model's constructor; then its residual_out checked."""
    from slmlab.errors import ConfigError

    try:
        module = cls(*args, **kwargs)
    except ConfigError:
        raise  # a block's own option check: already one line
    except Exception as e:
        raise ConfigError(f"{label} ({where(cls)}): __init__ failed: {type(e).__name__}: {e}{_failing_line(e)}") from e
    for name in getattr(module, "residual_out", ()):
        try:
            ok = isinstance(module.get_submodule(name), nn.Linear)
        except AttributeError:
            ok = False
        if not ok:
            linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(f"{label} ({where(cls)}): residual_out names {name!r}, which is not an nn.Linear of "
                              f"the block (its Linear layers: {', '.join(linears) or 'none'})")
    return module


def _failing_line(e: Exception) -> str:
    """' (at FILE:LINE)' of the innermost frame: where in the block's code it went wrong."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


class Block(nn.Module):
    """Pre-norm residual block: h = x + mixer(norm(x)); out = h + mlp(norm(h)). Under model.mlp=none
    (NO_MLP) there is no channel mixer and no second norm: out = h, as in Mamba's own stacks."""

    def __init__(self, cfg, layer_idx: int, kind: str, window: Optional[int]):
        super().__init__()
        self.kind = kind
        self.mixer_norm = make_norm(cfg, cfg.d_model)
        self.mixer = build_block(f"block {kind!r}", get_mixer(kind), cfg, layer_idx, window=window)
        self.mlp_kind = cfg.mlp_at(layer_idx)
        self.residual_scale = cfg.residual_scale
        if self.mlp_kind == NO_MLP:
            self.mlp_norm = self.mlp = None
        else:
            self.mlp_norm = make_norm(cfg, cfg.d_model)
            self.mlp = build_block(f"channel mixer {self.mlp_kind!r}", CHANNEL_MIXERS[self.mlp_kind], cfg)

    def forward(self, x, state=None):
        out = self.mixer(self.mixer_norm(x), state)
        if not (isinstance(out, tuple) and len(out) == 2 and fits_residual(out[0], x)):
            raise bad_output(f"block {self.kind!r}", self.mixer, "forward", out, x)
        y, state = out
        return self._mlp(x + self._scaled(y)), state

    def forward_static(self, x, positions, state: list, inplace: bool):
        out = self.mixer.forward_static(self.mixer_norm(x), positions, state, inplace)
        if not (isinstance(out, tuple) and len(out) == 2 and fits_residual(out[0], x)):
            raise bad_output(f"block {self.kind!r}", self.mixer, "forward_static", out, x)
        y, state = out
        return self._mlp(x + self._scaled(y)), state

    def _scaled(self, y):
        return y if self.residual_scale == 1.0 else y * self.residual_scale

    def _mlp(self, h):
        """h + the channel mixer's output (h itself without one)."""
        if self.mlp is None:
            return h
        y = self.mlp(self.mlp_norm(h))
        if not fits_residual(y, h):
            raise bad_output(f"channel mixer {self.mlp_kind!r}", self.mlp, "forward", y, h)
        return h + self._scaled(y)

    def parts(self) -> list:
        """The token mixer and the channel mixer (if any), seen through peft's ParamWrapper: LoRA on a
        channel mixer's weight stacks (train.lora.targets: experts, slmlab/lora.py) puts the wrapper
        where the mixer was."""
        return [m.get_base_layer() if hasattr(m, "get_base_layer") else m for m in (self.mixer, self.mlp)
                if m is not None]

    def flops_per_token(self, seq_len: int) -> float:
        return sum(m.flops_per_token(seq_len) for m in self.parts() if hasattr(m, "flops_per_token"))

    def activation_bytes(self, batch: int, seq_len: int, act: int) -> int:
        """Saved for backward by one micro-batch. Each RMSNorm (its training path, layers._RMSNormFn)
        keeps the normalised x in fp32 and a per-token rsqrt; its output is kept (in the matmul dtype,
        `act`) by the projections that read it. The block input and h are the residual stream."""
        tokens, d = batch * seq_len, self.mixer_norm.weight.numel()
        norm = tokens * ((d + 1) * 4 + d * act)
        return sum(norm + m.activation_bytes(batch, seq_len, act) for m in self.parts())
