"""Optimizers: AdamW alone, or Muon for hidden matrices + AdamW for everything else.

Muon orthogonalises the momentum of a 2-D weight (Newton-Schulz), which only makes sense for
matrices that map one hidden space to another. Embeddings and an untied head are lookups /
classifiers over the vocabulary, norms/biases/scalars are vectors, and depthwise conv kernels are
per-channel filters: those stay on AdamW (as in Keller Jordan's and Moonshot's setups).

Routing is by parameter, printed at start, and asserted complete: every trainable parameter lands
in exactly one group. Both optimizers are stepped together behind `CombinedOptimizer`, which the
trainer and the checkpoint code treat as one optimizer.

Under torchrun the ranks split Muon's Newton-Schulz: the batches of matrices go round-robin to the
ranks, and each result is broadcast from the rank that made it (DDP replicas would otherwise all
orthogonalise every matrix, identical work on identical inputs). Under FSDP2 the parameters,
gradients and optimizer state are DTensors (each rank holds its rows): AdamW's elementwise update
runs on the shards; for Muon the rank that orthogonalises a batch gathers its updates whole, and
scatters each rank its rows of the result.
`CombinedOptimizer.state_dict` gathers the state whole to rank 0 and `load_state_dict` shards it again,
so a checkpoint resumes under any parallelism and world size.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from .errors import ConfigError
from .precision import native_bf16
from .runtime import gather_whole, is_dtensor, on_main, scatter_rows

OPTIMIZERS = ("muon", "adamw")
MUON_ADJUST = ("original", "match_rms_adamw")


@dataclass
class Route:
    group: str  # muon | adamw_decay | adamw_no_decay
    names: list
    params: list

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def matrix_stacks(model) -> set[int]:
    """ids of the 3-D weights that are stacks of matrices (a module's `matrix_stacks` names them: MoE
    experts, arch/moe.py), unlike the 3-D depthwise conv kernels."""
    return {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "matrix_stacks", ())}


def fused_rows(model) -> dict[int, int]:
    """{id: k} of the weights whose rows are k matrices (a module's `fused_rows`: MoE's w13, gate then up)."""
    return {id(getattr(m, name)): k for m in model.modules() for name, k in getattr(m, "fused_rows", {}).items()}


def ns_shape(p: torch.Tensor, row_splits: dict) -> tuple[int, int]:
    """The A x B of the matrices Muon orthogonalises in `p`: its last two dims, the rows cut k ways where
    row_splits (fused_rows) says they are k matrices. Newton-Schulz batches matrices of one such shape."""
    rows, cols = p.shape[-2:]
    return rows // row_splits.get(id(p), 1), cols


def lookup_tables(model) -> set[int]:
    """ids of every nn.Embedding's weight: the token embedding and the learned position table."""
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def is_hidden_matrix(name: str, p: torch.Tensor, model, stacks: set[int] = frozenset(),
                     lookups: set[int] = frozenset()) -> bool:
    """A 2-D weight between hidden spaces, or a stack of them (`stacks`, from matrix_stacks): not the
    token embedding and not the output head."""
    if not (p.dim() == 2 or id(p) in stacks):
        return False
    if name.startswith(("embed.", "lm_head.")) or ".embed" in name:
        return False
    if id(p) in lookups:  # by type, from lookup_tables: pos_embed.weight matched no name above
        return False
    if ".lora_" in name:  # LoRA factors (r x d, d x r) stay on AdamW, as peft's recipes train them
        return False
    head = getattr(model, "lm_head", None)
    emb = getattr(model, "embed", None)
    for m in (head, emb):
        if m is not None and getattr(m, "weight", None) is p:
            return False
    return True


def route_params(model, name: str) -> list[Route]:
    """Split trainable parameters into optimizer groups. AdamW weight decay goes to matrices and
    embeddings only (never norms, biases, scalars or depthwise kernels)."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of: {', '.join(OPTIMIZERS)}; got {name!r}")
    routes = {g: Route(g, [], []) for g in ("muon", "adamw_decay", "adamw_no_decay")}
    stacks, lookups = matrix_stacks(model), lookup_tables(model)
    for n, p in model.named_parameters():  # named_parameters() yields a tied weight once
        if not p.requires_grad:
            continue
        if name == "muon" and is_hidden_matrix(n, p, model, stacks, lookups):
            g = "muon"
        elif p.dim() == 2 or id(p) in stacks:
            g = "adamw_decay"
        else:
            g = "adamw_no_decay"
        routes[g].names.append(n)
        routes[g].params.append(p)
    out = [r for r in routes.values() if r.params]
    # Completeness: every trainable parameter exactly once.
    ids = [id(p) for r in out for p in r.params]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)), "a parameter was routed to two optimizer groups"
    assert set(ids) == trainable, "some trainable parameters were not routed to any optimizer group"
    return out


def describe_routes(routes: list[Route]) -> str:
    lines = []
    for r in routes:
        shown = ", ".join(r.names[:4]) + (f", ... (+{len(r.names) - 4})" if len(r.names) > 4 else "")
        lines.append(f"  {r.group:<15} {len(r.params):>4} tensors {r.numel / 1e6:>8.3f}M params: {shown}")
    return "optimizer routing:\n" + "\n".join(lines)


class CombinedOptimizer:
    """Several torch optimizers stepped as one. Every param group remembers its base `lr`, and
    `set_lr_mult(m)` sets lr = base_lr * m in all of them, so one schedule drives both Muon and
    AdamW."""

    def __init__(self, optimizers: dict):
        self.optimizers = optimizers
        for opt in optimizers.values():
            for g in opt.param_groups:
                g.setdefault("base_lr", g["lr"])

    @property
    def param_groups(self):
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def set_lr_mult(self, m: float):
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * m

    def step(self):
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The whole (unsharded) state on rank 0 (the other ranks' copy holds None for each sharded tensor);
        under FSDP2 a collective every rank must call."""
        return {k: whole_state(opt.state_dict()) for k, opt in self.optimizers.items()}

    def load_state_dict(self, sd: dict):
        """A whole state, as state_dict gives it (from any world size); sharded again under FSDP2."""
        if set(sd) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(sd)}, expected {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(sd[k])
            shard_state(opt)


def whole_state(sd: dict) -> dict:
    """An optimizer state dict with each DTensor gathered whole to rank 0, on CPU (a GPU holding every
    gathered tensor at once would need the unsharded state's memory), None on the other ranks (on_main).
    Collective: the ranks walk the same parameters in the same order, since they built the same optimizer."""
    state = {i: {k: on_main(v) if is_dtensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {**sd, "state": state}


def shard_state(opt: torch.optim.Optimizer):
    """After load_state_dict of a whole state: each DTensor parameter's state tensors of its full shape
    become this rank's shards of them, as the sharded parameters are (no communication: every rank
    loaded the whole state). Scalars (AdamW's step) stay as they are."""
    for p, s in opt.state.items():
        if not is_dtensor(p):
            continue
        from torch.distributed.tensor import distribute_tensor

        for k, v in s.items():
            if torch.is_tensor(v) and not is_dtensor(v) and v.shape == p.shape:
                s[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)


def newton_schulz(G: torch.Tensor, steps: int, coefficients=(3.4445, -4.7750, 2.0315), eps: float = 1e-7,
                  dtype=None) -> torch.Tensor:
    """Orthogonalise a batch of wide matrices G [n, r, c] (r <= c) with the quintic Newton-Schulz
    iteration of torch.optim.Muon (Keller Jordan's coefficients), all n at once: one batched
    matmul per step instead of one small matmul per matrix."""
    a, b, c = coefficients
    X = G.to(dtype or G.dtype)
    X = X / X.flatten(1).norm(dim=1).clamp(min=eps)[:, None, None]
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    return X


NS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fast_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA GPU with bf16 tensor cores (fp32 on one without, T4 / V100: bf16 is emulated
    there); on CPU whichever of fp32 / bf16 multiplies faster here. CPUs differ: on this project's
    AVX-512 machines without AMX bf16 matmul ran ~3.5x slower than fp32, on ones with AMX (amx_bf16)
    a 256x704 NS step ran ~5x faster in bf16 (64 ms vs 14 ms for 18 matrices)."""
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return _fast_cpu_dtype()


@functools.cache  # probed once per process
def _fast_cpu_dtype() -> torch.dtype:
    """The probe's pick; under torchrun, rank 0's for every rank: ranks that ran NS in different dtypes
    (a noisy probe, nodes with other CPUs) would update their DDP replicas apart, which nothing
    re-syncs. build_optimizer calls it on every rank (a collective); later calls read the cache."""
    import torch.distributed as dist

    dtype = _probe_cpu_dtype()
    if replicas()[1] > 1:
        flag = torch.tensor([dtype == torch.bfloat16], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        dtype = torch.bfloat16 if flag.item() else torch.float32
    return dtype


def _probe_cpu_dtype() -> torch.dtype:
    import time

    # A private generator: the probe must not move the global RNG, or a resumed run (which probes
    # again at its first step) would draw different diffusion masks than the uninterrupted one.
    a = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))

    def best(dtype):
        x, times = a.to(dtype), []
        for _ in range(10):  # the min of several: the machine is shared and noisy
            t = time.perf_counter()
            x @ x.T
            times.append(time.perf_counter() - t)
        return min(times[1:])

    return torch.bfloat16 if best(torch.bfloat16) < 0.8 * best(torch.float32) else torch.float32


# Elements per batched Newton-Schulz call. Unbounded, one call took every matrix of a shape at once: at
# the 1b hybrid its 48 MLP up-projections, whose stack and two NS temporaries were 10 GB of step
# scratch per rank (`--dry-run --size 1b --world 2 train.parallel=fsdp`). 2^24 (64 MB in fp32) keeps
# the default shapes' batches whole (4.7M Muon parameters in all) and a 124M model's matmuls large.
NS_BATCH_NUMEL = 2 ** 24


def ns_batches(numels: list[int], limit: int = NS_BATCH_NUMEL) -> list[list[int]]:
    """Positions of same-shape updates (sizes `numels`) in order, cut into batches of at most `limit`
    elements (one parameter larger than that alone). The memory estimate sizes the step by these."""
    out, n = [], 0
    for i, k in enumerate(numels):
        if not out or n + k > limit:
            out.append([])
            n = 0
        out[-1].append(i)
        n += k
    return out


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon's update (same param groups, state and checkpoint format, same momentum,
    nesterov, decoupled weight decay and adjust_lr_fn) with Newton-Schulz batched over matrices
    of one shape (up to `batch_numel` elements a batch) and run in `ns_dtype`.

    Why not torch.optim.Muon itself: it runs NS in bfloat16, one matrix at a time. On this
    project's 2-core CPUs bf16 matmul is ~3.5x slower than fp32, and one 5-step NS on a 256x704
    matrix took ~630 ms in bf16 against ~40 ms in fp32; a Muon step at the default transformer
    shape took ~10x an AdamW step (issue 10). fp32 on CPU, bf16 on CUDA (where it is the fast
    dtype, as in modded-nanogpt). tests/test_optim.py checks the update equals torch.optim.Muon's
    when both run NS in bf16, and equals a plain fp32 loop."""

    def __init__(self, params, ns_dtype=None, row_splits: dict | None = None, batch_numel: int = NS_BATCH_NUMEL,
                 **kw):
        # torch.optim.Muon's __init__ refuses 3-D weights, though its update is per matrix: a stack
        # [n, r, c] (MoE experts) is n matrices. Muon checks the hyperparameters and makes the defaults
        # (on a stand-in matrix); the base Optimizer takes the parameters.
        defaults = torch.optim.Muon([torch.zeros(1, 1)], **kw).defaults
        torch.optim.Optimizer.__init__(self, params, defaults)
        for p in (p for g in self.param_groups for p in g["params"]):
            if p.dim() not in (2, 3):
                raise ValueError(f"BatchedMuon takes matrices and stacks of them (2-D, 3-D), got {tuple(p.shape)}")
        self.ns_dtype = ns_dtype
        self.row_splits = row_splits or {}  # id(param) -> k: its rows are k matrices (fused_rows)
        self.batch_numel = batch_numel  # elements per Newton-Schulz batch (ns_batches)

    def state_dict(self) -> dict:
        """torch's, plus the NS dtype in use and its device type: with optim.muon_ns_dtype auto, a resume
        on the same kind of device keeps what the run's probe picked. A new probe (timed, once per
        process) could pick the other dtype under other load, and the losses then parted by 1e-6
        within 4 steps of the resumed run."""
        sd, device = super().state_dict(), self._device()
        if device is not None:
            sd["ns_dtype"] = {"device": device.type,
                              "dtype": str(self._ns_dtype(device)).removeprefix("torch.")}
        return sd

    def load_state_dict(self, state_dict: dict):
        state_dict = dict(state_dict)
        saved = state_dict.pop("ns_dtype", None)  # absent in checkpoints from before it was saved
        device = self._device()
        if self.ns_dtype is None and isinstance(saved, dict) and device is not None \
                and saved.get("device") == device.type:
            self.ns_dtype = NS_DTYPES.get(saved.get("dtype"))
        super().load_state_dict(state_dict)

    def _device(self) -> torch.device | None:
        """Where the parameters are (None without any): the NS dtype auto picks depends on it."""
        return next((p.device for g in self.param_groups for p in g["params"]), None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._run(self._jobs())
        return loss

    def _jobs(self) -> list["NSJob"]:
        """Momentum updated; the batched Newton-Schulz calls to make, largest first (every rank lists the
        same, in the same order)."""
        jobs = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - group["momentum"])
            by_shape = defaultdict(list)  # matrices of one shape, a 3-D stack (or fused rows) being several
            for i, p in enumerate(params):
                by_shape[(ns_shape(p, self.row_splits), p.device)].append(i)
            world = replicas()[1]
            for ((A, B), device), idx in by_shape.items():
                sizes = [params[i].numel() for i in idx]
                # Under torchrun a shape's matrices go out in about `world` batches, one a rank. Whole, the
                # 4-layer d_model 512 transformer's three shapes were batches of 5.5M, 4.2M and 2.8M elements,
                # and 2 ranks stepped 1.59-1.65x as fast as one; split so, 1.94-1.97x (bench/muon_split.py).
                for batch in ns_batches(sizes, min(self.batch_numel, -(-sum(sizes) // world))):
                    jobs.append(NSJob(group, [params[idx[j]] for j in batch], [bufs[idx[j]] for j in batch],
                                      A, B, device))
        # (stable) largest first: a round's jobs are of about one size, so no rank idles long
        return sorted(jobs, key=NSJob.numel, reverse=True)

    def _run(self, jobs: list["NSJob"]):
        rank, world = replicas()
        for first in range(0, len(jobs), world):  # a round: rank r orthogonalises job first + r for all
            todo, G = jobs[first:first + world], None
            for k, job in enumerate(todo):
                if job.sharded:  # FSDP2: a gather, which every rank joins (sending its rows) and k receives
                    whole = gather_whole(self._updates(job), dst=k)
                    G = whole.view(-1, job.A, job.B) if k == rank else G
                elif k == rank:
                    G = torch.cat([u.reshape(-1, job.A, job.B) for u in self._updates(job)])
            # After every gather of the round: NS inside the loop made the next rank's gather wait for it.
            mine = None if G is None else self._newton_schulz(todo[rank], G)
            for k, job in enumerate(todo):
                O = mine if k == rank else None
                if job.sharded:  # each rank receives its rows of k's result, and only them
                    self._apply(job, scatter_rows(None if O is None else job.whole(O), job.params, k,
                                                  self._ns_dtype(job.device)))
                    continue
                if world > 1:
                    O = share(O, job, src=k, dtype=self._ns_dtype(job.device))
                self._apply(job, job.whole(O))

    def _updates(self, job: "NSJob") -> list:
        """The job's Nesterov updates, one per parameter (FSDP2: DTensors of this rank's rows, as the momentum)."""
        group = job.group
        return [(p.grad.lerp(b, group["momentum"]) if group["nesterov"] else b) for p, b in zip(job.params, job.bufs)]

    def _newton_schulz(self, job: "NSJob", G: torch.Tensor) -> torch.Tensor:
        tall = job.A > job.B  # NS works on the wide orientation: tall matrices transposed
        g = job.group
        O = newton_schulz(G.mT if tall else G, g["ns_steps"], g["ns_coefficients"], g["eps"],
                          self._ns_dtype(job.device))
        return O.mT if tall else O

    def _ns_dtype(self, device: torch.device) -> torch.dtype:
        return self.ns_dtype or fast_ns_dtype(device)

    def _apply(self, job: "NSJob", outs: list):
        """Decoupled weight decay, then each parameter's orthogonalised update (`outs`, in its shape; FSDP2:
        this rank's rows of it) scaled by adjust_lr_fn."""
        group, A, B = job.group, job.A, job.B
        if group["adjust_lr_fn"] == "match_rms_adamw":
            ratio = 0.2 * math.sqrt(max(A, B))
        else:  # "original" (and torch's None)
            ratio = math.sqrt(max(1, A / B))
        for p, o in zip(job.params, outs):
            o = o.to(p.dtype)
            if is_dtensor(p):
                from torch.distributed.tensor import DTensor

                o = DTensor.from_local(o, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                       stride=p.stride())
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o, alpha=-group["lr"] * ratio)


@dataclass
class NSJob:
    """One batched Newton-Schulz: these parameters' A x B matrices (and their momentum buffers)."""
    group: dict
    params: list
    bufs: list
    A: int
    B: int
    device: torch.device

    @property
    def sharded(self) -> bool:
        return any(is_dtensor(p) for p in self.params)

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def counts(self) -> list[int]:
        """A x B matrices in each parameter (a stack or fused rows being several)."""
        return [p.numel() // (self.A * self.B) for p in self.params]

    def whole(self, O: torch.Tensor) -> list[torch.Tensor]:
        """The orthogonalised stack O [n, A, B] cut into each parameter's update, in its shape."""
        return [o.reshape(p.shape) for p, o in zip(self.params, O.split(self.counts()))]


def replicas() -> tuple[int, int]:
    """(rank, world) of the ranks that hold the same matrices and gradients (DDP replicas, FSDP2 shards
    gathered whole), which then split the Newton-Schulz work; (0, 1) without a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(O, job: NSJob, src: int, dtype) -> torch.Tensor:
    """Rank `src`'s orthogonalised stack of `job`, broadcast to every rank (O: src's, None elsewhere).
    Every rank ran Newton-Schulz on every matrix before, identical work on identical inputs: splitting it
    divides it by the world size for one broadcast of the result (modded-nanogpt splits it likewise)."""
    import torch.distributed as dist

    if O is None:
        O = torch.empty(sum(job.counts()), job.A, job.B, dtype=dtype, device=job.device)
    dist.broadcast(O.contiguous(), src=src)
    return O


def build_optimizer(model, ocfg, verbose: bool = True) -> CombinedOptimizer:
    """`ocfg` is the optim config section (name, lr, betas, eps, weight_decay, muon_*)."""
    routes = route_params(model, ocfg.name)
    if verbose:
        print(describe_routes(routes))
    by = {r.group: r for r in routes}
    opts = {}
    adam_groups = []
    if "adamw_decay" in by:
        adam_groups.append({"params": by["adamw_decay"].params, "weight_decay": ocfg.weight_decay})
    if "adamw_no_decay" in by:
        adam_groups.append({"params": by["adamw_no_decay"].params, "weight_decay": 0.0})
    if adam_groups:
        on_cuda = all(p.is_cuda for g in adam_groups for p in g["params"])  # fused: one kernel for all params
        opts["adamw"] = torch.optim.AdamW(adam_groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps,
                                          fused=True if on_cuda else None)
    if "muon" in by:
        if ocfg.muon_adjust_lr_fn not in MUON_ADJUST:
            raise ConfigError(f"optim.muon_adjust_lr_fn must be one of {', '.join(MUON_ADJUST)}, "
                              f"got {ocfg.muon_adjust_lr_fn!r}")
        muon_lr = ocfg.muon_lr if ocfg.muon_lr is not None else ocfg.lr
        wd = ocfg.muon_weight_decay if ocfg.muon_weight_decay is not None else ocfg.weight_decay
        params = by["muon"].params
        if ocfg.muon_ns_dtype == "auto" and params[0].device.type == "cpu" and replicas()[1] > 1:
            _fast_cpu_dtype()  # the ranks agree now, together: a step's first call on one rank alone could not
        opts["muon"] = BatchedMuon(params, ns_dtype=NS_DTYPES.get(ocfg.muon_ns_dtype), row_splits=fused_rows(model),
                                   lr=muon_lr, weight_decay=wd,
                                   momentum=ocfg.muon_momentum, nesterov=ocfg.muon_nesterov,
                                   ns_steps=ocfg.muon_ns_steps, adjust_lr_fn=ocfg.muon_adjust_lr_fn)
    return CombinedOptimizer(opts)
