"""Block ablations you can trust: several seeds per variant, equal compute, paired statistics
against the baseline, plots, resumable, run locally or on Slurm (ablate.py is the command).

plan.py   what to run: variants x corpora x seeds, each a normal run directory, with its step budget
runner.py where it runs: sequentially, N local processes (CPU threads or GPUs split), or submitit
worker.py one run in its own process (train() plus resume and peak-memory bookkeeping, then --tasks scoring)
scoring.py --tasks: read once by the coordinator, scored by each run's worker into RUN_DIR/tasks.json
stats.py  means, paired differences, confidence intervals, p-values (scipy.stats)
report.py results.md / results.csv / timings.csv / curves.png / final.png, from the run directories
"""
