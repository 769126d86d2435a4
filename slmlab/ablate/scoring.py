"""Downstream tasks of an ablation (`ablate.py --tasks`): read once by the coordinator, scored by
each run's worker on the run's final weights (on the device it trained on), kept in
RUN_DIR/tasks.json, tabulated by the report.

The task list is no part of the ablation's identity (it changes no training): OUT/ablation.json
keeps the last --tasks given, and every run directory's ablate.json lists them for its worker. A
run's result counts for a task only when it was scored on the items the coordinator read (their
digest): an edited task file or another --task-limit makes the old scores stale, so a table never
pairs runs scored on different items, and a re-run scores exactly the runs without a current result.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import astuple
from pathlib import Path
from typing import Optional

from ..errors import DataError, SlmlabError
from .plan import AblationError
from .worker import SPEC, TASKS, read_json, write_text


def digest(items) -> str:
    return hashlib.sha256(json.dumps([astuple(it) for it in items]).encode()).hexdigest()[:16]


def primary(task: dict) -> str:
    """The metric the report compares: per-byte-normalised accuracy for multiple choice, greedy
    accuracy for completions."""
    return "acc_norm" if task["choice"] else "acc"


def _portable(spec: str) -> str:
    """`spec` with its file made absolute: a worker may start in another directory (a Slurm job).
    abspath, not resolve: a symlink's target could have another stem, and the stem names the task."""
    from ..tasks import BUILTIN

    name, eq, source = spec.partition("=")
    if eq:
        return spec if source.startswith("hf:") else f"{name}={os.path.abspath(source)}"
    return spec if name in BUILTIN else os.path.abspath(name)


def task_entries(specs: str, limit: Optional[int], say=print) -> list[dict]:
    """--tasks as OUT/ablation.json keeps it, one entry a task. Every spec is resolved before any
    item is read (a typo fails at once), and every task's items are read here, before any run
    starts, so a bad row fails now rather than in every worker after training."""
    from ..tasks import resolve_all

    entries = []
    for spec, task in resolve_all(specs, "--tasks"):
        entries.append(e := _entry(spec, task, limit))
        say(f"[ablate] task {e['name']}: {e['items']:,} of {e['of']:,} items from {task.source} ("
            + (f"multiple choice, chance {100 * e['chance']:.2f}%)" if e["choice"] else "completion)"))
    return entries


def _entry(spec: str, task, limit: Optional[int]) -> dict:
    from ..tasks import read_items

    items, total = read_items(task, limit)
    if items[0].text:  # its bpb is a lower-is-better number the accuracy tables do not read
        raise AblationError(f"--tasks: {task.name} is a text task (bits per byte): ablate.py compares bpb on its "
                            "--data corpora; eval.py compares runs on any text")
    choice = items[0].is_choice
    return {"name": task.name, "spec": _portable(spec), "limit": limit, "items": len(items), "of": total,
            "digest": digest(items), "choice": choice,
            "chance": sum(1 / len(it.contexts) for it in items) / len(items) if choice else None}


def run_results(run_dir) -> dict:
    """RUN_DIR/tasks.json: task name -> result; {} when there is none (or it does not parse)."""
    results = read_json(Path(run_dir) / TASKS)
    return results if isinstance(results, dict) else {}


def current(results: dict, task: dict) -> Optional[dict]:
    """A run's result for `task` (`results`: its tasks.json) when it was scored on these items, else None."""
    r = results.get(task["name"])
    return r if isinstance(r, dict) and r.get("digest") == task["digest"] else None


def listed(run_dir) -> list[dict]:
    """The tasks RUN_DIR/ablate.json gives its worker to score."""
    spec = read_json(Path(run_dir) / SPEC)
    return spec.get("tasks", []) if isinstance(spec, dict) else []


def unscored(run_dir) -> list[dict]:
    """The tasks RUN_DIR/ablate.json lists that RUN_DIR/tasks.json has no current result for."""
    results = run_results(run_dir)
    return [t for t in listed(run_dir) if not current(results, t)]


def brief(run_dir) -> str:
    """'t acc_norm 37.50%, u acc 12.50%': the run's current results on its listed tasks, for a progress line."""
    results = run_results(run_dir)
    return ", ".join(f"{t['name']} {primary(t)} {100 * r['metrics'][primary(t)]:.2f}%"
                     for t in listed(run_dir) if (r := current(results, t)))


def score_run(run_dir):
    """Score the run's final weights on every unscored task of its ablate.json, on the device its
    config trains on; each result goes into tasks.json as soon as it exists (a kill keeps those).
    A task that fails (say, a continuation longer than this run's context) does not keep the
    others from being scored; the failures are raised together after them."""
    from ..harness import RunScorer
    from ..rundir import RunDir
    from ..runtime import resolve_device

    run_dir = Path(run_dir)
    todo = unscored(run_dir)
    if not todo:
        return
    scorer = RunScorer.open(run_dir, resolve_device(RunDir.open(run_dir).config().train.device))
    errors = []
    for task in todo:
        try:
            _score_task(scorer, run_dir, task)
        except SlmlabError as e:
            errors.append(f"task {task['name']}: {e}")
    if errors:
        raise DataError("; ".join(errors))


def _score_task(scorer, run_dir: Path, task: dict):
    from ..harness import evaluate_items, to_json
    from ..tasks import read_items, resolve

    items, _ = read_items(resolve(task["spec"]), task["limit"])
    if digest(items) != task["digest"]:
        raise DataError(f"its items changed since ablate.py read them ({task['spec']}); re-run ablate.py to score "
                        "the runs on the new ones")
    print(f"[ablate] scoring {run_dir} on {task['name']} ({len(items):,} items)", flush=True)
    t0 = time.time()
    res = evaluate_items(scorer, items)
    results = run_results(run_dir)
    results[task["name"]] = {"spec": task["spec"], "limit": task["limit"], "digest": task["digest"],
                             "items": res.n, "metrics": res.metrics, "per_item": res.per_item,
                             "max_len": scorer.max_len, "truncated": res.truncated,
                             "seconds": round(time.time() - t0, 2)}
    write_text(run_dir / TASKS, to_json(results, indent=1))  # strict JSON: an overflowed ppl is null
