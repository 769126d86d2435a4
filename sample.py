"""Sample from a trained run with the cached (stateful) decode path.

    python sample.py --run runs/hybrid-... --prompt "def " --max-new-tokens 200 --temperature 0.8 --top-k 50

Diffusion runs (--arch diffusion) fill the new tokens by iterative unmasking instead:
    python sample.py --run runs/diffusion-... --max-new-tokens 128 --diffusion-steps 64 --block-length 32
"""
from __future__ import annotations

import argparse
import sys

from slmlab.cli import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (deterministic)")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d = p.add_argument_group("diffusion runs")
    d.add_argument("--diffusion-steps", type=int, default=None, help="denoising steps (default: one per new token)")
    d.add_argument("--block-length", type=int, default=None,
                   help="llada: semi-autoregressive block length; must divide --max-new-tokens (default 32 or a divisor)")
    d.add_argument("--sampler", default="llada", choices=["llada", "mdlm"],
                   help="llada: low-confidence remasking, block by block; mdlm: ancestral sampling")
    args = p.parse_args(argv)

    import torch

    from slmlab.errors import ConfigError
    from slmlab.rundir import RunDir
    from slmlab.runtime import resolve_device

    if args.max_new_tokens < 0:
        raise ConfigError("--max-new-tokens must be >= 0")
    if args.temperature < 0:
        raise ConfigError("--temperature must be >= 0")
    device = resolve_device(args.device)
    cfg, model, tok = RunDir.open(args.run).load(device)
    extra = {}
    if getattr(model, "mask_id", None) is not None:  # a masked-diffusion run
        from arch.diffusion import check_sampler_args

        check_sampler_args(args.max_new_tokens, args.diffusion_steps or max(args.max_new_tokens, 1), args.block_length)
        extra = dict(steps=args.diffusion_steps, block_length=args.block_length, sampler=args.sampler)
    elif args.diffusion_steps is not None or args.block_length is not None:
        raise ConfigError(f"--diffusion-steps/--block-length apply to diffusion runs; {args.run} is autoregressive")
    ids = tok.encode(args.prompt) or [tok.bos_id]
    g = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        idx = torch.tensor([ids], device=device)
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k or None,
                             generator=g, **extra)
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tok.decode(out[0].tolist()))


if __name__ == "__main__":
    sys.exit(run_cli(main))
