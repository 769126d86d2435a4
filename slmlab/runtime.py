"""Where training runs: the device, distributed ranks and their parallel wrapper, the
peak FLOP/s that MFU is measured against, and the RNG state an exact resume needs. Shared by the
trainer, sample.py, the exporters and the benches."""
from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from typing import NamedTuple, Optional

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(name: str, flag: str | None = None) -> torch.device:
    """`name` (auto | cpu | cuda) as a device; `flag`: the command-line flag that set it, for the error
    (else it came from train.device)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{flag} cuda: no CUDA device is available (use {flag} cpu, or auto)" if flag
                          else "train.device=cuda but no CUDA device is available")
    if name == "cuda":  # fp32 matmuls outside autocast (eval heads, the optimizer) may use TF32 tensor cores
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if name == "cpu":
        keep_freed_memory()
    return torch.device(name)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def mallopt(param: int, value: int) -> bool:
    """glibc's mallopt(param, value); False where it did not take (no glibc, or refused)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(param, value))
    except (OSError, AttributeError):
        return False


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the kernel.

    By default glibc mmaps every block above a threshold (dynamic, at most 32 MB) and unmaps it on
    free, and trims the heap's free top: a training step's large activations and logits were
    page-faulted in afresh every step. On the 2-core CPU machines (bench/speed.py shapes, 2 threads,
    separate processes run alternately) the eager step ran 1.17x (hybrid) and 1.08x (transformer)
    faster with both thresholds at 1 GiB, the compiled one 1.04x / 1.02x. The cost: the resident
    size stays at the step's peak. Linux/glibc only; left alone when MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_ is set (the user chose) or another allocator (jemalloc, tcmalloc) is
    preloaded. True when the thresholds were set."""
    if any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return False
    return mallopt(M_MMAP_THRESHOLD, 1 << 30) and mallopt(M_TRIM_THRESHOLD, 1 << 30)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch onto the device: pinned and non-blocking on CUDA, so the copy overlaps compute."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextlib.contextmanager
def root_gathered(model):
    """FSDP2 gathers a sharded module's own parameters (the embedding, head and final norm of the
    root) in its forward's pre-hook only; the blocks gather their own when called. Methods other
    than forward (token_nll, evaluation) run inside this, which gathers the root's by hand and
    reshards after. Anything not sharded passes through."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


class CompiledOrEager:
    """`torch.compile(fn)` that falls back to `fn` with one warning line if compiling fails, so a
    compiler problem never stops a run. Shapes are static: each phase's sequence length compiles
    once (torch recompiles on a new shape), which is what the default 3-phase curriculum needs."""

    def __init__(self, fn, what: str, say=print, options: dict | None = None):
        self.eager, self.what, self.say = fn, what, say
        self.fn = torch.compile(fn, dynamic=False, options=options)

    def __call__(self, *args, **kwargs):
        if self.fn is self.eager:
            return self.eager(*args, **kwargs)
        try:
            return self.fn(*args, **kwargs)
        except Exception as e:  # only compiler failures fall back; anything else is the model's own error
            if not self.fall_back(e):
                raise
            return self.eager(*args, **kwargs)

    def would_fall_back(self, e: Exception) -> bool:
        """`e` is a compiler failure and this still runs compiled."""
        return self.fn is not self.eager and _is_compile_error(e)

    def fall_back(self, e: Exception) -> bool:
        """Run eager from now on if `e` is a compiler failure (one warning line). Also for errors
        raised outside the call: the backward graph compiles at the first backward. False (nothing
        changed) for any other error, or when already eager."""
        if not self.would_fall_back(e):
            return False
        self.say(fallback_warning(f"torch.compile failed for {self.what}", e, "running eager"))
        self.fn = self.eager
        return True


def fallback_warning(what_failed: str, e: Exception, instead: str) -> str:
    """The one line printed when a fast path fails and a slower one takes over."""
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"warning: {what_failed} ({type(e).__name__}: {first}); {instead}"


def _is_compile_error(e: Exception) -> bool:
    import torch._dynamo.exc as dynamo_exc

    kinds = [dynamo_exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError

        kinds.append(InductorError)
    except ImportError:
        pass
    return isinstance(e, tuple(kinds))


def use_compile(setting, device: torch.device) -> bool:
    """train.compile: true | false | auto (on CUDA; off on CPU, where compiling each phase's shapes
    cost more than it saved in the 10-minute default run: see README "Speed")."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


# ---- distributed ----
class Dist:
    """Rank/world from torchrun's environment; world 1 means a plain single-process run."""

    def __init__(self, device_name: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.local_rank = 0, 0
        if self.world > 1:
            import torch.distributed as dist

            self.rank, self.local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
            use_cuda = device_name != "cpu" and torch.cuda.is_available()
            if not dist.is_initialized():
                dist.init_process_group("nccl" if use_cuda else "gloo")
            # NCCL reduces CUDA tensors only: mean()'s scalars go through this rank's GPU there.
            self.collective_device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, name: str) -> torch.device:
        """This rank's device: under torchrun each rank takes the GPU of its local rank."""
        device = resolve_device(name)
        if device.type == "cuda" and self.world > 1:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def mean(self, *xs: float) -> list[float]:
        """The mean over ranks of each of xs, in one all-reduce."""
        if self.world == 1:
            return list(xs)
        import torch.distributed as dist

        t = torch.tensor(xs, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def close(self):
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def wrap_parallel(model, parallel: str, dist: Dist, device):
    """(module to call for training, underlying model). DDP wraps; FSDP2 shards in place."""
    if dist.world == 1:
        return model, model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        # FSDP2 makes the first sharded module that runs its root. That must be the model: an evaluation
        # before any training step (a resume of a run killed after its last checkpoint) reaches the blocks
        # through token_nll, not forward, and made layers.0 a root ("FSDP state has already been lazily
        # initialized for layers.0"). No public call does this; forward's pre-hook calls the same.
        model._get_fsdp_state()._lazy_init()
        return model, model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids), model


def is_dtensor(t) -> bool:
    """An FSDP2-sharded tensor (torch.distributed.tensor.DTensor, which not every torch build has)."""
    return hasattr(t, "full_tensor")


def is_sharded(model) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def rows_per_rank(n: int, world: int) -> int:
    """ceil(n / world): the rows of each rank's shard under FSDP2's Shard(0), the last ranks' padded to it."""
    return -(-n // world)


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s rows of `n` under FSDP2's Shard(0): torch.chunk's split, ceil(n / world)
    rows a rank, the last ranks fewer or none."""
    per = rows_per_rank(n, world)
    return min(rank * per, n), min((rank + 1) * per, n)


def _padded(rows: torch.Tensor, per: int) -> torch.Tensor:
    """`rows` with zero rows appended up to `per`, flattened: one rank's piece of a gather or scatter."""
    return torch.cat([rows, rows.new_zeros(per - rows.shape[0], *rows.shape[1:])]).reshape(-1)


def gather_whole(tensors: list, dst: int) -> torch.Tensor | None:
    """DTensors sharded by rows over a 1-D mesh (FSDP2's Shard(0)) whole on mesh rank `dst` only, one after
    another in one flat buffer (None on the other ranks). One gather of every rank's rows, each padded to
    ceil(rows / world) as FSDP pads its shards. A collective: every rank of the mesh calls it.

    full_tensor() all-gathers: every rank receives everything, W times what one consumer needs (Muon's
    Newton-Schulz runs on one rank; a checkpoint is written by rank 0)."""
    import torch.distributed as dist

    mesh = tensors[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    mine = [_padded(t.to_local(), rows_per_rank(t.shape[0], world)) for t in tensors]
    flat = torch.cat(mine)
    got = [torch.empty_like(flat) for _ in range(world)] if rank == dst else None
    dist.gather(flat, got, group=mesh.get_group(), group_dst=dst)
    if got is None:
        return None
    per_rank = [b.split([m.numel() for m in mine]) for b in got]
    out, start = flat.new_empty(sum(t.numel() for t in tensors)), 0  # each rank's rows copied into place
    for i, t in enumerate(tensors):
        row = math.prod(t.shape[1:])
        for r in range(world):
            lo, hi = shard_rows(t.shape[0], world, r)
            out[start + lo * row:start + hi * row] = per_rank[r][i][:(hi - lo) * row]
        start += t.numel()
    return out


def scatter_rows(wholes: list | None, like: list, src: int, dtype) -> list[torch.Tensor]:
    """gather_whole's way back: mesh rank `src`'s whole tensors (`wholes`, None on the other ranks), shaped
    as the DTensors `like`, sent out so that each rank receives its rows of each and no more (one scatter,
    rows padded as gather_whole pads them). Returns this rank's rows, one tensor per tensor of `like`.

    Muon's step under FSDP2 uses both: with an all-gather of each update and a broadcast of the whole
    result instead, each of W ranks received W times as much, and on 2-4 gloo CPU ranks the step took
    1.03-1.17x this time (bench/muon_split.py --fsdp), the Newton-Schulz compute dominating there."""
    import torch.distributed as dist

    mesh = like[0].device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    shapes = [t.shape for t in like]
    pers = [rows_per_rank(s[0], world) for s in shapes]
    pieces = None
    if wholes is not None:
        pieces = [torch.cat([_padded(w[slice(*shard_rows(w.shape[0], world, r))], per)
                             for w, per in zip(wholes, pers)]) for r in range(world)]
    sizes = [per * math.prod(s[1:]) for per, s in zip(pers, shapes)]
    out = torch.empty(sum(sizes), dtype=dtype, device=like[0].device)
    dist.scatter(out, pieces, group=mesh.get_group(), group_src=src)
    mine = [shard_rows(s[0], world, rank) for s in shapes]
    return [o.view(per, *s[1:])[:hi - lo] for o, per, s, (lo, hi) in zip(out.split(sizes), pers, shapes, mine)]


def on_main(t: torch.Tensor) -> torch.Tensor | None:
    """`t` whole, detached and on CPU, on rank 0; None on the other ranks, which hold no copy. Under FSDP2
    a collective (every rank calls it, in the same order): the shards are gathered to rank 0 alone, where
    full_tensor() put a CPU copy of every weight and optimizer state on every rank at each checkpoint (a 1B
    model's weights and Muon/AdamW state are 8-12 GB: 8 ranks made 8 such copies in one node's RAM)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if is_dtensor(t):
        from torch.distributed.tensor import Shard

        mesh = t.device_mesh  # (a 1-D mesh over every rank: its rank 0 is rank 0)
        if mesh.ndim == 1 and mesh.size() == dist.get_world_size() and tuple(t.placements) == (Shard(0),):
            whole = gather_whole([t.detach()], dst=0)
            return None if whole is None else whole.view(t.shape).cpu()
        t = t.full_tensor()  # another layout: gathered everywhere, kept on rank 0
    return t.detach().contiguous().cpu() if rank == 0 else None


# ---- throughput accounting ----
class GPUSpec(NamedTuple):
    peak: float  # dense tensor-core FLOP/s from the datasheet, in peak_dtype
    memory_gb: int  # GiB, for --dry-run --gpu with no --mem
    peak_dtype: str = "bf16"


# Keys are matched against torch.cuda.get_device_name, the longest contained one winning ("NVIDIA H100
# PCIe" is the PCIe card, not the SXM one; "NVIDIA L40S" not an L4). V100 and T4 have no bf16 tensor
# cores: their figure is the fp16 one, which train.precision=auto trains in there (an explicit bf16
# cannot use those tensor cores, and its MFU reads low).
GPUS = {"H200": GPUSpec(989e12, 141), "H100": GPUSpec(989e12, 80), "H100 PCIe": GPUSpec(756e12, 80),
        "H100 NVL": GPUSpec(835e12, 94), "A100": GPUSpec(312e12, 80), "L40S": GPUSpec(362e12, 48),
        "L40": GPUSpec(181e12, 48), "A10G": GPUSpec(125e12, 24), "L4": GPUSpec(121e12, 24),
        "RTX 4090": GPUSpec(165e12, 24), "RTX 3090": GPUSpec(71e12, 24), "V100": GPUSpec(125e12, 32, "fp16"),
        "T4": GPUSpec(65e12, 16, "fp16")}


def gpu_peak_source(key: str, name: Optional[str] = None) -> str:
    """How GPUS[key]'s peak is labelled next to an MFU or a step time; `name`: the device's full name."""
    spec = GPUS[key]
    label = f"{name or key} dense {spec.peak_dtype} datasheet peak"
    if spec.peak_dtype != "bf16":
        label += " (it has no bf16 tensor cores: train.precision auto trains in fp16 there; bf16 runs below this)"
    return label


def peak_flops(device) -> tuple[float, str]:
    """The FLOP/s that MFU is measured against: a GPU's dense tensor-core peak from its datasheet
    (bf16, or fp16 where it has no bf16: gpu_peak_source says which), or the best measured matmul
    throughput (fp32 on CPU) with this process's threads."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = max((k for k in GPUS if k in name), key=len, default=None)
        if key:
            return GPUS[key].peak, gpu_peak_source(key, name)
    return measured_peak(device.type)


@functools.lru_cache(maxsize=None)
def measured_peak(device_type: str) -> tuple[float, str]:
    """(best FLOP/s of a 2048^3 matmul on this device, fp32 on CPU and bf16 elsewhere; its label)."""
    # 2048^3 and a warm-up: 1024^3 for four reps read 0.11-0.19 TFLOP/s on the same 2-core CPU
    # (frequency ramp, timer noise) and gave MFU above 100%; this reads within a few percent.
    n, dtype = 2048, torch.float32 if device_type == "cpu" else torch.bfloat16
    # A private generator: measuring must not move the global RNG that training draws from.
    g = torch.Generator(device=device_type).manual_seed(0)
    a = torch.randn(n, n, device=device_type, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device_type, dtype=dtype, generator=g)
    best, t_end = 0.0, None
    for i in range(12):
        if device_type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        dt = time.perf_counter() - t0
        if i >= 1:
            best = max(best, 2 * n ** 3 / dt)
            t_end = t_end or t0 + 1.0
            if t0 > t_end and i >= 4:
                break
    return best, f"best measured {n}x{n} {str(dtype).replace('torch.', '')} matmul on {device_type}"


# ---- RNG state for exact resume ----
def rng_state(gen: torch.Generator) -> dict:
    npst = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "data": gen.get_state(), "python": random.getstate(),
          "numpy": {"key": npst[1].astype(np.int64).tolist(), "pos": int(npst[2]), "has_gauss": int(npst[3]),
                    "gauss": float(npst[4])}}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def rng_state_problem(st) -> Optional[str]:
    """What is wrong with a saved rng_state() ('rng.KEY ...'), or None. Each state is set on a scratch
    generator, so the check runs the restore's own parsing and moves no RNG the run draws from."""
    if not isinstance(st, dict):
        return f"rng is a {type(st).__name__}, expected dict"
    missing = [k for k in ("torch", "data", "python", "numpy") if k not in st]
    if missing:
        return f"rng lacks {missing[0]!r}"
    checks = {"torch": _check_torch_rng, "data": _check_torch_rng, "python": _check_python_rng,
              "numpy": _check_numpy_rng}
    if "cuda" in st:
        checks["cuda"] = _check_cuda_rng
    for key, check in checks.items():
        try:
            check(st[key])
        except Exception as e:  # the parsers raise TypeError, ValueError, RuntimeError, OverflowError...
            return f"rng.{key} is not a saved generator state ({str(e).splitlines()[0][:120] or type(e).__name__})"
    return None


def _check_torch_rng(state, device: str = "cpu"):
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"a {type(state).__name__}, expected a uint8 tensor")
    torch.Generator(device=device).set_state(state)


def _check_python_rng(state):
    if not isinstance(state, (tuple, list)) or len(state) != 3 or not isinstance(state[1], (tuple, list)):
        raise TypeError("expected (version, internal state, gauss_next)")
    random.Random().setstate((state[0], tuple(state[1]), state[2]))


def _check_numpy_rng(state):
    if not isinstance(state, dict) or set(state) != {"key", "pos", "has_gauss", "gauss"}:
        raise TypeError("expected {key, pos, has_gauss, gauss}")
    # numpy accepts any pos, and one past the key's 624 words would read beyond it
    if isinstance(state["pos"], bool) or not isinstance(state["pos"], int) or not 0 <= state["pos"] <= 624:
        raise ValueError(f"pos {state['pos']!r} is outside 0..624")
    np.random.RandomState().set_state(("MT19937", np.array(state["key"], dtype=np.uint32), state["pos"],
                                       state["has_gauss"], state["gauss"]))


def _check_cuda_rng(states):
    if not isinstance(states, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in states):
        raise TypeError("expected a list of uint8 tensors, one per GPU")
    if torch.cuda.is_available():  # set_rng_state restores them only then
        for s in states:
            _check_torch_rng(s, "cuda")


def set_rng_state(st: dict, gen: torch.Generator):
    torch.set_rng_state(st["torch"])
    gen.set_state(st["data"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
