"""Muon's Newton-Schulz split over the ranks vs run by every rank, on 2 gloo CPU processes (1 thread
each): the optimizer step alone, on the hidden matrices of a transformer of d_model D and L layers.

    python bench/muon_split.py                 # D 512, 4 layers (q, k, v, o, SwiGLU w1 w2 w3 each)
    python bench/muon_split.py --d 768 --layers 2

Both modes step identical parameters with identical gradients; the script checks they end equal and
prints each mode's median step time and the ratio, measured interleaved in the same processes.
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


def worker(rank: int, world: int, port: int, d: int, layers: int, reps: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    import slmlab.optim as optim

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--world", type=int, default=2)
    args = p.parse_args(argv)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world, port, args.d, args.layers, args.reps), nprocs=args.world)


if __name__ == "__main__":
    main()
