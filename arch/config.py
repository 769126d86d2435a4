"""Model and objective configuration: dataclasses validated once, plus the layer/window pattern logic."""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Optional, Union

from slmlab.coerce import AT_LEAST_1, POSITIVE, Range, check_ranges, coerce
from slmlab.errors import ConfigError

from .registry import CHANNEL_MIXERS, LETTERS, MIXERS, NO_MLP, OPTIONS, load_imports, spelled_by


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 6
    # Token-mixer pattern: compact letters ("CCA"), comma names ("conv,conv,attn") or a list.
    # Tiled to n_layers when shorter (its length must divide n_layers).
    layers: Union[str, list] = "A"
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # default d_model // n_heads
    ffn_dim: Optional[int] = None  # SwiGLU width; default 8/3 * d_model rounded up to 64
    # Attention windows: `window_pattern` is tiled over the attention layers in order,
    # S = sliding window of `window` keys (including the query itself), L = full context.
    window: int = 128
    window_pattern: str = "L"
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    conv_kernel: int = 3
    conv_bias: bool = False
    tie_embeddings: bool = True
    causal: bool = True  # False: every mixer runs bidirectionally (masked diffusion)
    kernels: str = "auto"  # auto | triton | torch | flex
    grad_checkpoint: bool = False
    # Training loss: logits for this many tokens at a time (arch/loss.py), so the [tokens, vocab]
    # logits never exist whole; 0 = all at once. Memory only: the loss and gradients are the same.
    loss_chunk: int = 0
    init_std: float = 0.02
    # channel mixer by registered name: swiglu | gelu (GPT-2's, tanh approximation) | lif | ... | none (no
    # channel mixer and no second norm: a layer is x + mixer(norm(x)), Mamba's own layout)
    mlp: str = "swiglu"
    # Family knobs (imports of Llama / Qwen2 / GPT-2 set them; each is also an ablation axis).
    norm: str = "rmsnorm"  # rmsnorm | layernorm (with bias, GPT-2): the block and final norms
    # rope | learned (absolute position embeddings added to the token embeddings, GPT-2) | none (NoPE:
    # attention sees no positions beyond its causal mask, as IBM's Granite-4.0-H hybrids)
    pos: str = "rope"
    max_positions: int = 2048  # pos=learned: rows of the position table (the longest sequence)
    # pos=rope: the context length the model is stated to handle (an HF import's max_position_embeddings),
    # which hf/gguf exports state again; None = not stated. Metadata only: RoPE has no hard limit, so
    # nothing (sampling, decode graphs) is bounded by it; learned positions state max_positions.
    context_length: Optional[int] = None
    qk_norm: bool = True  # RMSNorm on each head's q and k before RoPE (Qwen3/LFM2); false for Llama/Qwen2/GPT-2
    # what one QK-norm normalises: head (each head's hd channels, Qwen3/LFM2) | all (all heads' q, and all
    # of k, at once, one weight per channel: OLMoE/OLMo-2)
    qk_norm_scope: str = "head"
    attn_bias: bool = False  # biases on the q/k/v projections (Qwen2, GPT-2)
    attn_out_bias: bool = False  # bias on the attention output projection (GPT-2)
    mlp_bias: bool = False  # biases in the channel mixer's projections (GPT-2)
    # RoPE frequency scaling: {} = none, or {type: llama3, factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings} (Llama-3.1/3.2).
    rope_scaling: dict = field(default_factory=dict)
    # Granite's multipliers (IBM's GraniteMoeHybrid imports set them; 1 / None leave the model as it is):
    # the token embeddings times embed_scale, every residual branch's output times residual_scale, the
    # logits divided by logit_scale, and attention's softmax scale (None: 1 / sqrt(head_dim)).
    embed_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    attn_scale: Optional[float] = None
    # Per-block options, namespaced by block name ({lif: {beta: 0.9}}); each block declares its
    # options dataclass at registration, so new blocks need no new fields here.
    mixer_opts: dict = field(default_factory=dict)
    # Python files or modules imported before the pattern is parsed: a researcher's own blocks.
    imports: list = field(default_factory=list)

    # How a step runs, not what the weights are: --resume may change these.
    RUNTIME_KNOBS = ("kernels", "grad_checkpoint", "loss_chunk")
    # Where the blocks' code lives, not what it builds: a moved file resumes with model.imports=[NEW]
    # (the layer pattern and the checkpoint's tensor names still have to match); context_length is
    # what exports state, not a shape.
    NOT_WEIGHTS = RUNTIME_KNOBS + ("imports", "context_length")

    def __post_init__(self):
        # Fields as typed (n_heads=2.0 -> 2; window=2.5 or layers=None a one-line error), as config.yaml's
        # are: a ModelConfig built in Python meets the same checks.
        hints = _field_types()
        for f in dataclasses.fields(self):
            if f.name != "imports":  # load_imports takes a path or a list of them
                setattr(self, f.name, coerce(f"model.{f.name}", getattr(self, f.name), hints[f.name]))
        self.imports = load_imports(self.imports)  # absolute paths, each once
        self.validate()

    # Block options that say how a block computes or trains, not what its weights mean: --resume may
    # change them too (a core, chunk or scan computes the same function; MoE's balancing loss weight and
    # bias rate steer training only). A block not listed (an imported one) has every option counted.
    RUNTIME_OPTIONS = {"moe": ("core", "aux_loss_coef", "bias_update_rate"), "lif": ("scan",),
                       "deltanet": ("core", "chunk"), "mamba2": ("core", "chunk")}

    def weight_changes(self, new: "ModelConfig", allowed: tuple = ()) -> list[str]:
        """'model.KEY old -> new' for each setting that builds other weights or gives them another meaning.
        The configs are compared as built: derived sizes resolved (head_dim null = d_model / n_heads),
        options of the blocks both use with defaults filled (a block the model lacks reads none), the
        layer pattern as its block list and the windows as the layers get them. Lines name the
        patterns as written. Keys in `allowed` may differ (train.init_from's: causal, RoPE, ...)."""
        a, b = self.built(), new.built()
        # A value both derive (ffn_dim null in both) follows the settings it derives from, which have lines.
        derived = self.derived_keys() & new.derived_keys()
        return [f"model.{k} {a[k]!r} -> {b.get(k)!r}" for k in a if k in b and a[k] != b[k] and k not in derived
                and k not in allowed
                and not (k == "layers" and self.layer_types() == new.layer_types())
                and not (k in ("window", "window_pattern") and self.layer_windows() == new.layer_windows())]

    def runtime_changes(self, new: "ModelConfig") -> list[str]:
        """'model.KEY old -> new' for each RUNTIME_KNOBS key and RUNTIME_OPTIONS option (of a block both
        use) that differs: what --resume lets change, and announces."""
        a, b = self.built(runtime=True), new.built(runtime=True)
        return [f"model.{k} {a[k]!r} -> {b[k]!r}" for k in a if self.is_runtime(k) and k in b and a[k] != b[k]]

    @classmethod
    def is_runtime(cls, key: str) -> bool:
        """Whether built()'s `key` is a RUNTIME_KNOBS key or a RUNTIME_OPTIONS option."""
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "mixer_opts":
            return parts[2] in cls.RUNTIME_OPTIONS.get(parts[1], ())
        return key in cls.RUNTIME_KNOBS

    def built(self, runtime: bool = False) -> dict:
        """to_dict() as the model is built from it: derived values resolved, mixer_opts flattened to
        'mixer_opts.BLOCK.OPTION' for the blocks in use, defaults filled. NOT_WEIGHTS and RUNTIME_OPTIONS
        are left out unless `runtime`."""
        d = self.spelled(resolved=True)
        return {k: v for k, v in d.items() if runtime or not (k in self.NOT_WEIGHTS or self.is_runtime(k))}

    def spelled(self, resolved: bool = False) -> dict:
        """to_dict() with mixer_opts flattened for the blocks in use, defaults filled; `resolved`: derived
        values (null head_dim, ffn_dim, ...) replaced by what the model builds with."""
        d = self.to_dict()
        if resolved:
            d.update(head_dim=self.hd, ffn_dim=self.ffn, rope_scaling=self.rope_scale() or {})
            if not self.qk_norm:  # no QK-norm: its scope builds nothing
                d["qk_norm_scope"] = "head"
        del d["mixer_opts"]
        for name in sorted(self.blocks_in_use()):
            opts = self.resolved_options(name) if resolved else dataclasses.asdict(self.block_options(name))
            d.update({f"mixer_opts.{name}.{key}": value for key, value in opts.items()})
        return d

    def derived_keys(self) -> set[str]:
        """built()'s keys whose value this config leaves to be derived."""
        spelled, built = self.spelled(), self.spelled(resolved=True)
        return {k for k in built if spelled[k] != built[k]}

    def blocks_in_use(self) -> set[str]:
        """Names of the token and channel mixers the model builds that take options."""
        used = set(self.layer_types()) | {self.mlp_at(i) for i in range(self.n_layers)}
        return used & set(OPTIONS)

    def resolved_options(self, name: str) -> dict:
        """Block `name`'s options as a dict, each null or 0 that the block derives replaced by its value."""
        opts = self.block_options(name)
        out = dataclasses.asdict(opts)
        if name == "lif":
            out["surrogate_scale"] = opts.scale
        elif name == "deltanet":
            heads, dk = opts.heads or self.n_heads, opts.head_dim or self.hd
            out.update(heads=heads, v_heads=opts.v_heads or heads, head_dim=dk, v_head_dim=opts.v_head_dim or dk)
        elif name == "moe":
            from .moe import expert_width

            out["expert_ffn"] = expert_width(opts, self.ffn)
        return out

    def block_options(self, name: str):
        """The options dataclass of block `name`, filled from mixer_opts[name] and checked."""
        from slmlab.coerce import build_item

        return build_item(f"model.mixer_opts.{name}", OPTIONS[name], self.mixer_opts.get(name) or {})

    # ---- derived ----
    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        if self.ffn_dim:
            return self.ffn_dim
        return 64 * ((8 * self.d_model // 3 + 63) // 64)

    def layer_types(self) -> list[str]:
        return parse_pattern(self.layers, self.n_layers)

    def mlp_at(self, i: int) -> str:
        """Layer i's channel mixer: model.mlp, except a MoE's first mixer_opts.moe.dense_layers layers,
        which keep the dense SwiGLU (LFM2-MoE's num_dense_layers)."""
        if self.mlp == "moe" and i < self.block_options("moe").dense_layers:
            return "swiglu"
        return self.mlp

    def layer_letters(self) -> str:
        """One registered letter per layer ("CCACCA"): how logs, tables and notes spell the pattern."""
        letter = {name: l for l, name in LETTERS.items()}
        return "".join(letter[t] for t in self.layer_types())

    def layer_summary(self) -> str:
        """layer_letters, plus the window pattern over the window-taking layers when one slides:
        "CCACCA (windows SL, 128)"."""
        windows = self.layer_windows()
        if all(w is None for w in windows):
            return self.layer_letters()
        pat = "".join("L" if w is None else "S" for w, t in zip(windows, self.layer_types()) if MIXERS[t].takes_window)
        return f"{self.layer_letters()} (windows {pat}, {self.window})"

    def kernel_routing(self, device, seq_len: int) -> str:
        """The one line naming the kernel each block runs on `device` at seq_len (kernels.describe_routing)."""
        from kernels import describe_routing

        return describe_routing(self.kernels, device, self.layer_types(), self.layer_windows(), seq_len, self.mlp,
                                self.block_options("lif").scan)

    def layer_windows(self) -> list[Optional[int]]:
        """Per layer: its sliding window (None = full context, or a block that takes no window).
        window_pattern tiles over the layers whose block takes a window (Mixer.takes_window:
        attention, or a registered block that says so)."""
        pat, out, k = self.window_pattern.upper(), [], 0
        for t in self.layer_types():
            if MIXERS[t].takes_window:
                out.append(self.window if pat[k % len(pat)] == "S" else None)
                k += 1
            else:
                out.append(None)
        return out

    # Bounds keep a typo from allocating terabytes or building a million layers before any error;
    # vocab: 2^18 covers the largest published vocabularies (Gemma's 262,144) and what the BPE trainer handles.
    RANGES = {"vocab_size": Range(1, 2 ** 18), "d_model": Range(1, 65536), "n_layers": Range(1, 1024),
              "n_heads": Range(1, 1024), "n_kv_heads": Range(1, 1024), "head_dim": Range(2, 4096),
              "ffn_dim": Range(1, 2 ** 20), "window": POSITIVE, "rope_theta": POSITIVE,
              "norm_eps": Range(0, 1, lo_open=True, hi_open=True), "conv_kernel": Range(1, 64),
              "init_std": Range(0, 10, lo_open=True), "max_positions": Range(1, 2 ** 24),
              "loss_chunk": Range(0, 2 ** 30), "embed_scale": POSITIVE, "residual_scale": POSITIVE,
              "logit_scale": POSITIVE, "attn_scale": POSITIVE,
              # allocates nothing, so any length a checkpoint states imports; GGUF stores it as uint32
              "context_length": Range(1, 2 ** 32 - 1)}

    def validate(self):
        def bad(msg):
            raise ConfigError(msg)

        check_ranges(self, "model", self.RANGES)
        if self.head_dim is None and self.d_model % self.n_heads:
            bad(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            bad(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.hd % 2 and self.pos == "rope":
            bad(f"head dim {self.hd} must be even for RoPE")
        for key, allowed in (("norm", NORMS), ("pos", POSITIONS), ("qk_norm_scope", QK_NORM_SCOPES)):
            if getattr(self, key) not in allowed:
                bad(f"model.{key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")
        if self.context_length is not None and self.pos == "learned":
            bad("model.context_length applies to model.pos=rope; learned positions end at model.max_positions")
        self.rope_scale()  # raises on a bad model.rope_scaling
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            bad(f"model.window_pattern {self.window_pattern!r} must be a non-empty string of S (sliding) and L (full)")
        if self.kernels not in ("auto", "triton", "torch", "flex"):
            bad(f"model.kernels must be auto, triton, torch or flex, got {self.kernels!r}")
        self.layer_types()  # raises on a bad pattern
        if self.mlp not in CHANNEL_MIXERS and self.mlp != NO_MLP:
            bad(f"unknown model.mlp {self.mlp!r}; known: {', '.join(sorted(CHANNEL_MIXERS))}, or {NO_MLP} "
                "(no channel mixer)")
        if not isinstance(self.mixer_opts, dict):
            bad(f"model.mixer_opts must be a mapping of block name -> options, got {self.mixer_opts!r}")
        for name in self.mixer_opts:
            if name not in OPTIONS:
                hint = f"blocks with options: {', '.join(sorted(OPTIONS)) or 'none'}"
                if name in LEGACY_FLAT_OPTS:
                    hint = f"options are namespaced by block now: {LEGACY_FLAT_OPTS[name]}"
                bad(f"model.mixer_opts.{name}: no block {name!r} takes options ({hint})")
            self.block_options(name)  # checked even if the block is unused, so a typo fails early
        if self.mlp == "moe" and self.block_options("moe").dense_layers >= self.n_layers:
            bad(f"model.mixer_opts.moe.dense_layers={self.block_options('moe').dense_layers} leaves no MoE layer "
                f"among model.n_layers={self.n_layers}: use model.mlp=swiglu for a dense model")

    def rope_scale(self) -> Optional[dict]:
        """model.rope_scaling checked and completed with Llama-3's defaults; None when unscaled."""
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            raise ConfigError(f"model.rope_scaling must be a mapping like {{type: llama3, factor: 8}}, got {rs!r}")
        if not rs:
            return None
        if rs.get("type") != "llama3":
            raise ConfigError(f"model.rope_scaling.type must be llama3 (the only scaling supported), got "
                              f"{rs.get('type')!r}")
        unknown = set(rs) - {"type", *LLAMA3_SCALING}
        if unknown:
            raise ConfigError(f"model.rope_scaling: unknown keys {sorted(unknown)}; known: type, "
                              f"{', '.join(LLAMA3_SCALING)}")
        out = {**LLAMA3_SCALING, **{k: v for k, v in rs.items() if k != "type"}}
        for k, v in out.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ConfigError(f"model.rope_scaling.{k} must be a positive number, got {v!r}")
        if not float(out["original_max_position_embeddings"]).is_integer():
            raise ConfigError("model.rope_scaling.original_max_position_embeddings must be an integer (a context "
                              f"length), got {out['original_max_position_embeddings']!r}")
        if out["high_freq_factor"] <= out["low_freq_factor"]:
            raise ConfigError("model.rope_scaling.high_freq_factor must exceed low_freq_factor")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def _field_types() -> dict:
    """ModelConfig's resolved field annotations, resolved once (a ModelConfig is built on every replace)."""
    return typing.get_type_hints(ModelConfig)


NORMS = ("rmsnorm", "layernorm")
QK_NORM_SCOPES = ("head", "all")
POSITIONS = ("rope", "learned", "none")
# Llama-3.1's published scaling, the defaults of any key model.rope_scaling leaves out.
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


# Keys of the old flat model.mixer_opts and where they live now (a one-line hint in the error).
LEGACY_FLAT_OPTS = {
    "mlp": "model.mlp", "objective": "objective.name", "mask_id": "objective.mask_id",
    "eval_t_samples": "objective.eval_t_samples", "block_length": "objective.block_length",
    "lif_beta": "model.mixer_opts.lif.beta", "lif_threshold": "model.mixer_opts.lif.threshold",
    "surrogate": "model.mixer_opts.lif.surrogate", "surrogate_scale": "model.mixer_opts.lif.surrogate_scale",
    "T_sim": "model.mixer_opts.lif.T_sim", "lif_scan": "model.mixer_opts.lif.scan"}


@dataclass
class ObjectiveConfig:
    """What the model is trained to do with the stack: next-token prediction or masked diffusion."""

    name: str = "ar"  # ar (needs model.causal=true) | mdlm (masked diffusion, arch/diffusion.py; needs model.causal=false)
    mask_id: int = 3  # mdlm: the tokenizer's <|mask|> id
    eval_t_samples: int = 4  # mdlm: diffusion times drawn per eval sequence for the ELBO
    block_length: int = 32  # mdlm: default block length of the semi-autoregressive LLaDA sampler

    def validate(self, model: ModelConfig):
        if self.name not in OBJECTIVES:
            raise ConfigError(f"objective.name must be one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        if self.name == "ar" and not model.causal:
            raise ConfigError("objective.name=ar needs model.causal=true (a bidirectional model sees the token it "
                              "predicts); set model.causal=true, or objective.name=mdlm for a bidirectional model")
        if self.name != "mdlm":
            return
        if model.causal:
            raise ConfigError("objective.name=mdlm needs model.causal=false (a bidirectional model)")
        if not 0 <= self.mask_id < model.vocab_size:
            raise ConfigError(f"objective.mask_id={self.mask_id} is outside the vocabulary ({model.vocab_size})")
        check_ranges(self, "objective", {"eval_t_samples": Range(1, 1024), "block_length": AT_LEAST_1})


OBJECTIVES = ("ar", "mdlm")


def parse_pattern(layers, n_layers: int) -> list[str]:
    """Pattern -> list of registered mixer names, tiled to n_layers. Registration guarantees no
    string is both a name and a run of letters (arch/registry.py), so the reading is unambiguous."""
    if isinstance(layers, str):
        s = layers.strip()
        if "," in s or s.lower() in MIXERS:
            items = [p.strip() for p in s.split(",")] if s else []
        else:
            items = _letters_or_word(s)
    else:
        items = [str(p).strip() for p in layers]
    if "" in items:  # a doubled or stray comma is a typo, not a shorter pattern
        raise ConfigError(f"layer pattern {layers!r} has an empty entry at position {items.index('') + 1} "
                          "(a doubled or stray comma?); give one block name per entry")
    if not items:
        raise ConfigError("model.layers is empty: give a pattern like 'CCA' or [conv, conv, attn]")
    names = []
    for it in items:
        if it.lower() in MIXERS:
            names.append(it.lower())
        elif it.upper() in LETTERS and len(it) == 1:
            names.append(LETTERS[it.upper()])
        else:
            hint = _did_you_mean(it) or (_did_you_mean(layers) if isinstance(layers, str) else "")
            raise ConfigError(f"unknown block {it!r} in layer pattern {layers!r}{hint}; "
                              f"known blocks: {_known_blocks()}")
    if len(names) > n_layers or n_layers % len(names):
        raise ConfigError(
            f"layer pattern {layers!r} has {len(names)} layers, which does not tile model.n_layers={n_layers} "
            f"(give {n_layers} entries or a divisor of {n_layers})"
        )
    return names * (n_layers // len(names))


def _letters_or_word(s: str) -> list[str]:
    """A compact pattern's letters. A string that is not upper-case and not all registered letters
    ("attention") stays one token, so an error names the whole word, not its first unknown letter."""
    if s.isupper() or spelled_by(s, LETTERS):
        return list(s)
    return [s]


def _did_you_mean(token: str) -> str:
    import difflib

    close = difflib.get_close_matches(token.lower(), list(MIXERS), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""


def _known_blocks() -> str:
    return ", ".join(f"{n} ({l})" for l, n in sorted(LETTERS.items(), key=lambda kv: kv[1]))
