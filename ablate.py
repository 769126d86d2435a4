"""Block ablations: several seeds per variant, equal compute, paired statistics, plots, resumable.

    # inline: the cartesian product of every --vary; the first value of each is the baseline
    python ablate.py --arch hybrid --vary model.layers=CCA,A,LLA --vary model.conv_kernel=3,4 \\
        --seeds 3 --steps 300 --data ../shared/data/tinyshakespeare.txt --out runs/abl-layers [overrides ...]
    # a file, for named variants that differ in several keys (and --arch per variant)
    python ablate.py ablations/families.yaml --out runs/abl-families --jobs 2
    python ablate.py --report runs/abl-families      # rebuild the outputs from the run directories alone

Every run is an ordinary run directory, OUT/<variant>/seed<k>/ (OUT/<corpus>/<variant>/seed<k>/
with several --data). Re-running the same command skips finished runs (done, or diverged: a
non-finite final val bpb), resumes interrupted ones and retries failed ones. Outputs in OUT: results.md, results.csv, timings.csv, curves.png, final.png.
With --tasks (eval.py's task specs) every finished run is also scored zero-shot on downstream tasks
and the report compares the variants' accuracies the same way; --tasks is no part of the
ablation's identity, so adding it to a finished ablation scores the runs without retraining.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from slmlab.cli import run_cli


def parse_args(argv=None):
    from slmlab.ablate.plan import BUDGETS, DEFAULT_BUDGET, DEFAULT_SEEDS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[FILE] [section.key=value ...]",
                   help="an ablation YAML file (the file form), then dotted overrides applied to every variant")
    p.add_argument("--report", metavar="OUT", help="only rebuild OUT's outputs from its run directories")
    p.add_argument("--out", help="the ablation directory (required unless --report or --dry-run)")
    p.add_argument("--arch", help="inline form: every variant's preset (default: the config's arch:, else hybrid); "
                                  "file form: the preset of variants that name none (replacing the file's arch:)")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="inline form: one axis of the grid (repeatable; cartesian product; first value = baseline)")
    p.add_argument("--seeds", type=int, help=f"seeds 1..N per variant (default {DEFAULT_SEEDS}, or the file's seeds:)")
    p.add_argument("--steps", type=int, help="the baseline's optimizer steps (default: the file's steps:, else "
                                             "train.steps of the config)")
    p.add_argument("--data", action="append", metavar="SPEC",
                   help="a corpus (repeatable: one table per corpus; default: the file's data:, else data.spec)")
    p.add_argument("--budget", choices=BUDGETS,
                   help=f"what every variant gets equal of (default {DEFAULT_BUDGET}, or the file's budget:)")
    p.add_argument("--config", help="the base config (default: config.yaml beside train.py)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="a Python file or module registering extra blocks, for every run (repeatable; as train.py's)")
    p.add_argument("--force", action="store_true",
                   help="OUT holds another ablation (or the runs of one, without ablation.json): delete its runs, "
                        "outputs, invocations.jsonl and .submitit/, and start this one")
    p.add_argument("--dry-run", action="store_true", help="print the plan (steps, tokens, FLOPs per variant); run nothing")
    p.add_argument("--jobs", type=int, help="local runs at once (default 1, or one per --gpus entry)")
    p.add_argument("--gpus", help="comma-separated GPU ids as torch numbers them (within CUDA_VISIBLE_DEVICES when it is set); "
                                   "one run per GPU at a time")
    p.add_argument("--threads", type=int, help="torch CPU threads per run (default: CPU cores / jobs; "
                                               "submitit: --slurm cpus_per_task, else torch's default)")
    p.add_argument("--launcher", choices=["local", "submitit"], default="local",
                   help="local processes (default) or one submitit job per run (Slurm)")
    p.add_argument("--cluster", choices=["auto", "slurm", "local", "debug"],
                   help="submitit executor (default auto: Slurm when srun is on PATH, else local processes)")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="a submitit parameter, e.g. slurm_partition=gpu timeout_min=60 gpus_per_node=1 "
                        "cpus_per_task=8 (repeatable)")
    p.add_argument("--tasks", metavar="SPEC[,SPEC...]",
                   help="downstream tasks as in eval.py (NAME, NAME=SOURCE, FILE.jsonl): every finished run is "
                        "scored on its final weights, and the report compares the variants' accuracies; "
                        "adding them to a finished ablation scores its runs without retraining")
    p.add_argument("--task-limit", type=int, metavar="N", help="score each task's first N items (default: all)")
    return p.parse_intermixed_args(argv)


def _check_flags(args):
    from slmlab.ablate.plan import AblationError

    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) not in (None, [], False)]  # noqa: E731
    if args.report:
        extra = given("out", "arch", "vary", "seeds", "steps", "data", "budget", "config", "imports", "force",
                      "dry_run", "jobs", "gpus", "threads", "cluster", "slurm", "tasks", "task_limit") + args.items
        if args.launcher != "local":  # (it has a default, so `given` cannot see it)
            extra.append(f"--launcher {args.launcher}")
        if extra:
            raise AblationError(f"--report OUT takes no other arguments (got {' '.join(extra)})")
        return
    if not args.out and not args.dry_run:
        raise AblationError("--out DIR is required (the ablation directory)")
    if args.dry_run:
        bad = given("out", "force", "jobs", "gpus", "threads", "cluster", "slurm")
        if bad or args.launcher != "local":
            raise AblationError(f"--dry-run only prints the plan; drop {(bad or ['--launcher'])[0]}")
    if args.launcher == "submitit":
        bad = given("jobs", "gpus")
        if bad:
            raise AblationError(f"{bad[0]} is for --launcher local; with submitit pass Slurm resources with "
                                "--slurm (e.g. --slurm gpus_per_node=1)")
    else:
        bad = given("cluster", "slurm")
        if bad:
            raise AblationError(f"{bad[0]} needs --launcher submitit")
        if _gpus(args) and args.jobs is not None and args.jobs != len(_gpus(args)):
            raise AblationError(f"--jobs {args.jobs} with {len(_gpus(args))} --gpus: runs go one per GPU; drop --jobs")
        _check_gpus(_gpus(args))
    if args.task_limit is not None and not args.tasks:
        raise AblationError("--task-limit N limits --tasks; give --tasks too")
    for flag in ("jobs", "threads", "seeds", "steps", "task_limit"):
        v = getattr(args, flag)
        if v is not None and v < (0 if flag == "threads" else 1):
            raise AblationError(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'threads' else 1}, got {v}")


def imports_override(imports: list[str]) -> list[str]:
    """--import as the model.imports override every run gets: files by absolute path, since each run
    is started from its own directory (a module name stays as it is)."""
    if not imports:
        return []
    paths = [str(Path(p).expanduser().resolve()) if Path(p).expanduser().exists() else p for p in imports]
    return ["model.imports=" + json.dumps(paths)]


def build_ablation(args):
    from slmlab.ablate.plan import AblationError, file_ablation, inline_ablation
    from slmlab.config import DEFAULT_CONFIG

    files = [x for x in args.items if "=" not in x]
    overrides = [x for x in args.items if "=" in x] + imports_override(args.imports)
    config = args.config or DEFAULT_CONFIG
    if len(files) > 1:
        raise AblationError(f"one ablation file at most, got {' '.join(files)} (overrides are section.key=value)")
    if files:
        if args.vary:
            raise AblationError("--vary is for the inline form; in a file, list the variants under variants:")
        return file_ablation(files[0], arch=args.arch, seeds=args.seeds, steps=args.steps, corpora=args.data,
                             budget=args.budget, overrides=overrides, config=config)
    return inline_ablation(args.arch, args.vary, args.seeds, args.steps, args.data, budget=args.budget,
                           overrides=overrides, config=config)


def print_plan(cells, runs):
    print(f"{len(runs)} runs; per variant and corpus:")
    for c in cells:
        print(f"  {c.variant:<24} {c.corpus:<40} {c.layers:<28} {c.params / 1e6:6.2f}M params  "
              f"{c.flops_per_token / 1e6:7.2f} MFLOP/token  {c.steps:>6} steps  {c.steps * c.tokens_per_step:>12,.0f} tokens")
    if len({r.seed for r in runs}) == 1:
        print("note: one seed per variant: the differences get no confidence interval or p-value (a paired test "
              "needs 2 seeds, a useful one 3 or more: --seeds N)")


def _require_extras():
    try:
        import matplotlib  # noqa: F401
        import scipy  # noqa: F401
    except ImportError as e:
        from slmlab.errors import SlmlabError

        raise SlmlabError(f"ablate.py needs scipy and matplotlib ({e.name} is missing): "
                          "pip install -e '.[ablate]'") from None


def slurm_params(args) -> dict:
    from slmlab.config import parse_override

    return dict(parse_override(s) for s in args.slurm)


def launch(args, out: Path, runs, prog, executor=None):
    """Run every unfinished run with the chosen launcher (submitit's `executor`); returns when all have ended."""
    from slmlab.ablate import runner

    group = out.resolve().name
    if args.launcher == "submitit":
        threads = args.threads if args.threads is not None else int(slurm_params(args).get("cpus_per_task", 0))
        runner.run_submitit(executor, out, runs, prog, threads, group)
        return
    gpus = _gpus(args)
    jobs = len(gpus) or args.jobs or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = args.threads if args.threads is not None else max(1, cores // jobs)
    runner.run_local(out, runs, prog, jobs, threads, gpus, group)


def _check_gpus(gpus: list[str]):
    """--gpus names distinct devices of a machine that has CUDA (runs went to the CPU, each "on GPU 0")."""
    from slmlab.ablate.plan import AblationError

    if not gpus:
        return
    twice = sorted({g for g in gpus if gpus.count(g) > 1})
    if twice:
        raise AblationError(f"--gpus names GPU {twice[0]} twice: one run per GPU at a time; list each once")
    import torch

    if not torch.cuda.is_available():
        raise AblationError(f"--gpus {','.join(gpus)}: this machine has no CUDA device torch can use; drop --gpus "
                            "(runs train on the CPU, --jobs at a time)")
    n = torch.cuda.device_count()  # a run given a GPU that is not there finds no CUDA and trains on the CPU
    past = [g for g in gpus if g.isdigit() and int(g) >= n]
    if past:
        raise AblationError(f"--gpus {past[0]}: torch sees {n} CUDA device{'s' if n > 1 else ''} here "
                            f"(0..{n - 1}, counted within CUDA_VISIBLE_DEVICES when it is set)")


def _check_device_is_not_cpu(ab):
    from slmlab.ablate.plan import AblationError, first_configs

    on_cpu = [name for name, cfg in first_configs(ab).items() if cfg.train.device == "cpu"]
    if on_cpu:
        raise AblationError(f"--gpus with train.device=cpu (variant {on_cpu[0]}): its runs would train on the CPU; "
                            "drop one of them")


def _gpus(args) -> list[str]:
    return [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []


def say_skipped(prog, out: Path):
    if prog.skipped:
        div, score = len(prog.skipped_diverged), len(prog.to_score)
        print(f"[ablate] {prog.skipped} of {prog.total} runs already finished in {out}"
              f"{f' ({div} of them diverged)' if div else ''}: "
              + (f"not trained again; {score} of them to score on --tasks" if score else "skipped"))


def say_outcome(prog):
    """Diverged runs on stderr (exit 0: a result); failed ones too, then exit 1 so a script notices."""
    diverged = prog.diverged + prog.skipped_diverged
    if diverged:  # a result, not an error: re-running the same seed would diverge again
        print(f"[ablate] {len(diverged)} run(s) diverged (non-finite final val bpb): "
              + ", ".join(r.dir for r in diverged) + "; the tables report them as diverged and leave them out of "
              "the statistics. A re-run does not retry them.", file=sys.stderr)
    if prog.failed:
        print(f"[ablate] {len(prog.failed)} run(s) failed: " + ", ".join(r.dir for r in prog.failed)
              + "; the tables mark them failed with their error (also in each run's error.txt). "
              "Re-run the same command to retry them.", file=sys.stderr)
    if prog.unscored:
        print(f"[ablate] {len(prog.unscored)} run(s) trained but not scored on --tasks: "
              + ", ".join(r.dir for r in prog.unscored) + "; the task tables say why (also in each run's error.txt). "
              "Re-run the same command to score them.", file=sys.stderr)
    if prog.failed or prog.unscored:
        raise SystemExit(1)


def main(argv=None):
    args = parse_args(argv)
    _require_extras()
    from slmlab.ablate import report, scoring
    from slmlab.ablate.plan import OUTPUTS, plan
    from slmlab.rundir import RunLock

    _check_flags(args)
    if args.report:
        report.write_report(Path(args.report))
        print(f"outputs rebuilt in {args.report}: {', '.join(OUTPUTS)}")
        return
    # before the plan builds anything: a mistyped task is an error at once
    tasks = scoring.task_entries(args.tasks, args.task_limit) if args.tasks is not None else None
    ab = build_ablation(args)
    if _gpus(args):
        _check_device_is_not_cpu(ab)
    if args.dry_run:
        print_plan(*plan(ab))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # two coordinators on one OUT would train the same runs
    with RunLock(out, doing="coordinating an ablation in it", then="then run the same command again"):
        coordinate(args, ab, tasks, out)


def coordinate(args, ab, tasks, out: Path):
    """Plan, prepare OUT, train every unfinished run, report (under OUT's lock)."""
    from slmlab.ablate import report, runner
    from slmlab.ablate.plan import OUTPUTS, plan

    executor = None
    if args.launcher == "submitit":
        executor = runner.submitit_executor(out, out.resolve().name, args.cluster or "auto", slurm_params(args))
    t0 = time.time()
    cells, runs = plan(ab)
    print_plan(cells, runs)
    texts = runner.prepare_corpora([r for r in runs if r.seed == ab.seeds[0]])  # a bad --data fails here
    cells, runs = runner.prepare_out(out, ab, args.force, tasks, planned=(cells, runs), texts=texts)
    prog = runner.Progress(runs, cells, out)
    say_skipped(prog, out)
    launch(args, out, runs, prog, executor)
    report.record_invocation(out, {"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                                   "elapsed_s": round(time.time() - t0, 1), "launcher": args.launcher,
                                   "ran": prog.finished, "failed": len(prog.failed),
                                   "diverged": len(prog.diverged), "skipped": prog.skipped})
    report.write_report(out)
    print(f"[ablate] outputs in {out}: {', '.join(OUTPUTS)}")
    say_outcome(prog)


if __name__ == "__main__":
    sys.exit(run_cli(main))
