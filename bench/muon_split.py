"""Muon's Newton-Schulz split over the ranks vs run by every rank, on 2 gloo CPU processes (1 thread
each): the optimizer step alone, on the hidden matrices of a transformer of d_model D and L layers.

    python bench/muon_split.py                 # D 512, 4 layers (q, k, v, o, SwiGLU w1 w2 w3 each)
    python bench/muon_split.py --d 768 --layers 2
    python bench/muon_split.py --fsdp          # FSDP2-sharded parameters: how updates reach the NS rank

Both modes step identical parameters with identical gradients; the script checks they end equal and
prints each mode's median step time and the ratio, measured interleaved in the same processes.

With --fsdp the parameters are sharded (fully_shard) and both modes split the NS over the ranks; they
differ in the communication: every rank all-gathers every update and the rank that orthogonalised a
batch broadcasts the whole result (slmlab before 2026-12-03), against slmlab's gather of each batch to
that rank alone and a scatter of each rank's rows of the result.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shapes(d: int, layers: int) -> list[tuple[int, int]]:
    f = 8 * d // 3 // 64 * 64
    return [(d, d)] * 4 * layers + [(f, d), (d, f), (f, d)] * layers


def all_gather_muon(optim):
    """BatchedMuon as it ran under FSDP2 before runtime.gather_whole / scatter_rows: the baseline of --fsdp."""
    import torch

    from slmlab.runtime import shard_rows

    class AllGatherMuon(optim.BatchedMuon):
        def _run(self, jobs):
            rank, world = optim.replicas()
            for first in range(0, len(jobs), world):
                todo = jobs[first:first + world]
                stacks = [torch.cat([u.full_tensor().reshape(-1, j.A, j.B) for u in self._updates(j)]) for j in todo]
                mine = self._newton_schulz(todo[rank], stacks[rank]) if rank < len(todo) else None
                for k, job in enumerate(todo):
                    O = optim.share(mine if k == rank else None, job, src=k, dtype=torch.float32)
                    outs = [o[slice(*shard_rows(o.shape[0], world, rank))] for o in job.whole(O)]
                    self._apply(job, outs)

    return AllGatherMuon


def worker(rank: int, world: int, port: int, d: int, layers: int, reps: int, fsdp: bool):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    import slmlab.optim as optim

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if fsdp:
        return fsdp_worker(rank, world, d, layers, reps)
    g = torch.Generator().manual_seed(0)  # every rank the same: DDP replicas after the all-reduce
    init = [torch.randn(s, generator=g) for s in shapes(d, layers)]
    params = {m: [torch.nn.Parameter(w.clone()) for w in init] for m in ("all", "split")}
    grads = [torch.randn(s, generator=g) for s in shapes(d, layers)]
    opts = {m: optim.BatchedMuon(ps, ns_dtype=torch.float32, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                 adjust_lr_fn="match_rms_adamw") for m, ps in params.items()}
    split_replicas, times = optim.replicas, {"all": [], "split": []}
    for _ in range(reps):
        for mode in ("all", "split"):  # interleaved: the machine is shared and noisy
            optim.replicas = split_replicas if mode == "split" else (lambda: (0, 1))
            for p, gr in zip(params[mode], grads):
                p.grad = gr.clone()
            dist.barrier()
            t = time.perf_counter()
            opts[mode].step()
            dist.barrier()
            times[mode].append(time.perf_counter() - t)
    same = all(torch.equal(a, b) for a, b in zip(params["all"], params["split"]))
    if rank == 0:
        n = sum(p.numel() for p in params["all"])
        a, s = statistics.median(times["all"]), statistics.median(times["split"])
        print(f"{n / 1e6:.1f}M Muon parameters ({len(params['all'])} matrices), {world} ranks, {reps} steps each")
        print(f"  every rank all NS : {a:.3f} s/step")
        print(f"  NS split by rank  : {s:.3f} s/step   ({a / s:.2f}x)   parameters equal after: {same}")
    dist.destroy_process_group()


def fsdp_worker(rank: int, world: int, d: int, layers: int, reps: int):
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    import slmlab.optim as optim

    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in shapes(d, layers)]
    grads = [torch.randn(s, generator=g) for s in shapes(d, layers)]
    modes = {"all-gather + broadcast": all_gather_muon(optim), "gather + scatter (now)": optim.BatchedMuon}
    models, opts, times = {}, {}, {m: [] for m in modes}
    for mode, cls in modes.items():
        models[mode] = m = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in init])
        fully_shard(m)
        opts[mode] = cls(m.parameters(), ns_dtype=torch.float32, lr=0.02, weight_decay=0.1, momentum=0.95,
                         nesterov=True, adjust_lr_fn="match_rms_adamw")
    for _ in range(reps):
        for mode in modes:  # interleaved: the machine is shared and noisy
            for p, gr in zip(models[mode].parameters(), grads):
                p.grad = distribute_tensor(gr, p.device_mesh, p.placements, src_data_rank=None)
            dist.barrier()
            t = time.perf_counter()
            opts[mode].step()
            dist.barrier()
            times[mode].append(time.perf_counter() - t)
    a, b = (list(models[m].parameters()) for m in modes)
    same = all(torch.equal(x.to_local(), y.to_local()) for x, y in zip(a, b))
    if rank == 0:
        n = sum(p.numel() for p in a)
        base, now = (statistics.median(times[m]) for m in modes)
        print(f"FSDP2: {n / 1e6:.1f}M Muon parameters ({len(a)} matrices), {world} ranks, {reps} steps each, NS split")
        print(f"  all-gather + broadcast : {base:.3f} s/step")
        print(f"  gather + scatter (now) : {now:.3f} s/step   ({base / now:.2f}x)   parameters equal after: {same}")
    dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--fsdp", action="store_true", help="FSDP2-sharded parameters: all-gather vs gather/scatter")
    args = p.parse_args(argv)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args.d, args.layers, args.reps, args.fsdp), nprocs=args.world)


if __name__ == "__main__":
    main()
