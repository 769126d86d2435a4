"""The coordinator: lay out OUT, then run what is not finished, locally or through submitit.

It holds no result in memory that matters: every run writes its own run directory, and the
report is rebuilt from those directories (report.py), so a killed coordinator loses nothing
but the runs in flight, which the re-run resumes from their last checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from ..checkpoint import remove_stale
from ..fmt import duration
from .plan import MANIFEST, OWN, Ablation, AblationError, Cell, Run, load_manifest, manifest, plan, same_ablation
from .scoring import brief, unscored
from .worker import DIVERGED, DONE, ERROR, SPEC, run_one, run_state, write_text

LOG = "train.log"  # each run's stdout/stderr, appended across resumes


def state(out: Path, run: Run):
    return run_state(out / run.dir, run.config_sha)


def is_done(out: Path, run: Run) -> bool:
    """Finished for good: done, or diverged (a re-run of the same seed would diverge again)."""
    return state(out, run).status in (DONE, DIVERGED)


def needs_worker(out: Path, run: Run) -> bool:
    """Work left for a worker: training (not finished), or scoring (done, and a task its ablate.json
    lists has no current result)."""
    st = state(out, run).status
    return st not in (DONE, DIVERGED) or (st == DONE and bool(unscored(out / run.dir)))


def _first_difference(old: dict, new: dict) -> str:
    for k, v in new["ablation"].items():
        if old.get("ablation", {}).get(k) != v:
            return f"{k} differs"
    return "the resolved run configs differ (config.yaml or a preset changed?)"


def _ablation_made(p: Path, old: Optional[dict]) -> bool:
    """A top-level entry of OUT that an ablation wrote: one of its files, a directory of the old
    manifest's runs, or a directory holding run directories (each has an ablate.json, at most two
    levels down: corpus/variant/seedK)."""
    if p.name in OWN or any(r["dir"].split("/")[0] == p.name for r in (old or {}).get("runs", [])):
        return True
    return p.is_dir() and not p.is_symlink() and any(any(p.glob(g)) for g in (SPEC, f"*/{SPEC}", f"*/*/{SPEC}"))


def _clear(out: Path, old: Optional[dict]):
    """--force: delete the ablation in OUT, found from its old manifest or, without a readable one,
    from the run directories' ablate.json: whole top-level run trees (so no empty variant
    directory stays), the outputs, invocations.jsonl (its times belong to the deleted ablation)
    and .submitit/. A file no ablation writes is the user's: it stays, and can pass for no run."""
    for p in out.iterdir():
        if p.name == ".lock" or not _ablation_made(p, old):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _old_manifest(path: Path, force: bool) -> Optional[dict]:
    try:
        return load_manifest(path)
    except AblationError as e:
        if force:
            return None  # unreadable: --force deletes it with the rest
        raise AblationError(f"{e}; pass --force to delete the ablation in {path.parent} and start this one") from None


def prepare_out(out: Path, ab: Ablation, force: bool, tasks: Optional[list[dict]] = None,
                planned: Optional[tuple[list[Cell], list[Run]]] = None, texts: Optional[dict] = None
                ) -> tuple[list[Cell], list[Run]]:
    """Plan (or take `planned`), then claim OUT: an OUT holding another ablation (or anything else) is
    refused unless `force`, which deletes that ablation's runs and outputs first; so is one whose runs
    trained on other text than the corpora now hold (`texts`, from prepare_corpora). Each run
    directory gets its ablate.json. `tasks` (scoring.task_entries) replace the ablation's --tasks;
    None keeps the ones OUT's ablation has, so a resume without --tasks still scores what finishes."""
    cells, runs = planned or plan(ab)
    new = manifest(ab, cells, runs)
    path = out / MANIFEST
    if out.is_dir():
        remove_stale(out)  # a killed coordinator's half-written outputs: no ablation's, nor the user's
    kept = []
    if path.is_file():
        old = _old_manifest(path, force)
        changed = _changed_text(old or {}, texts or {})
        if old is None or not same_ablation(old, new) or changed:
            if not force:
                if changed:
                    raise AblationError(f"{out}'s runs trained on other text than {changed} holds now (its sha256 "
                                        "differs: the file changed, or a relative --data names another file from "
                                        "here); restore it, or pass --force to delete the runs and start again")
                raise AblationError(f"{out} holds a different ablation ({_first_difference(old, new)}); "
                                    "pass --force to delete it and start this one, or choose another --out")
            _clear(out, old)
        else:
            kept = old.get("tasks", [])
    elif out.is_dir() and not all(_made_by_this_start(p) for p in out.iterdir()):
        if not force:
            raise AblationError(f"--out {out} exists and holds no ablation; choose another directory or pass --force")
        _clear(out, None)
    # outside "ablation" and "runs": the tasks change no training, so same_ablation ignores them
    new["tasks"] = kept if tasks is None else tasks
    if texts is not None:
        new["texts"] = texts
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(new, indent=1))
    for r in runs:
        write_text(out / r.dir / SPEC, json.dumps({**asdict(r), "tasks": new["tasks"]}, indent=1))
    return cells, runs


def _changed_text(old: dict, texts: dict) -> Optional[str]:
    """The first corpus whose text (sha256 of its splits) differs from the one OUT's runs trained on;
    None when all agree, or where either side has no record (an older ablation or data cache)."""
    before = old.get("texts") or {}
    for spec, now in texts.items():
        was = before.get(spec)
        if isinstance(was, dict) and all(was.values()) and all(now.values()) and was != now:
            return spec
    return None


def prepare_corpora(runs: list[Run], say=print) -> dict:
    """Tokenize every corpus once, before any run starts: concurrent runs would otherwise each
    train the same tokenizer, and a bad data spec fails here instead of in every run (and before
    OUT records an ablation). Prepared as the trainer prepares them (data.prepare_for), so the runs
    find them in the cache. Returns each spec's text identity (data.text_identity), which OUT's
    ablation.json keeps: a resume on changed text is refused."""
    from ..config import load_config
    from ..data import prepare_for, text_identity

    seen, texts = set(), {}
    for r in runs:
        cfg = load_config(r.config, arch=r.arch, overrides=r.overrides)
        # all prepare_for reads: runs that agree on it share every cache entry, so once is enough
        key = (repr(cfg.data), cfg.model.vocab_size, tuple(p.data for p in cfg.train.phases))
        if key in seen:
            continue
        seen.add(key)
        say(f"[ablate] data: {cfg.data.spec} (vocab {cfg.model.vocab_size})")
        prepared = prepare_for(cfg, say=lambda msg: None, quiet=True)
        for bundle, spec in prepared.train_sets.values():
            texts[spec] = text_identity(bundle)
    return texts


class Progress:
    """One line per started and finished run: which of how many, and an ETA from the compute
    (steps x tokens/step x FLOPs/token) finished so far in this invocation."""

    def __init__(self, runs: list[Run], cells: list[Cell], out: Path, say=print):
        self.cost = {(c.variant, c.corpus): c.steps * c.tokens_per_step * c.flops_per_token for c in cells}
        self.index = {r.dir: i + 1 for i, r in enumerate(runs)}
        self.total, self.say, self.t0, self.out = len(runs), say, time.time(), out
        self.done_cost, self.left_cost = 0.0, 0.0
        self.finished, self.failed, self.diverged, self.unscored = 0, [], [], []
        states = {r.dir: state(out, r).status for r in runs}
        # trained already, to score only: no training cost, and not counted again as finished
        self.to_score = [r.dir for r in runs if states[r.dir] == DONE and unscored(out / r.dir)]
        self.skipped = sum(st in (DONE, DIVERGED) for st in states.values())
        self.skipped_diverged = [r for r in runs if states[r.dir] == DIVERGED]
        for r in runs:
            if states[r.dir] not in (DONE, DIVERGED):
                self.left_cost += self._cost(r)

    def _cost(self, r: Run) -> float:
        return self.cost[r.variant, r.corpus]

    def _eta(self) -> str:
        if not self.done_cost:
            return "eta ?"
        return f"eta {duration((time.time() - self.t0) / self.done_cost * self.left_cost)}"

    def _counts(self) -> str:
        div = len(self.diverged) + len(self.skipped_diverged)
        return (f"{self.finished + self.skipped} done{f' ({div} diverged)' if div else ''}, {len(self.failed)} failed, "
                f"{self._eta()}")

    def start(self, r: Run, where: str = ""):
        tasks = ", ".join(t["name"] for t in unscored(self.out / r.dir))
        if r.dir in self.to_score:
            self.say(f"[ablate] scoring {r.dir} on {tasks}{where}")
            return
        self.say(f"[ablate] run {self.index[r.dir]}/{self.total} start: {r.variant} seed {r.seed} on {r.corpus}"
                 f"{where}{f', then scoring on {tasks}' if tasks else ''}  ({self._counts()})")

    def end(self, r: Run, status: str, why: str = "", left: list = ()):
        """`status`: DONE, DIVERGED (finished with a non-finite val bpb) or anything else: failed.
        `left`: the tasks a DONE run is still not scored on."""
        if r.dir in self.to_score:
            self._scored(r, left, why)
            return
        c = self._cost(r)
        self.left_cost -= c
        if status in (DONE, DIVERGED):
            self.finished += 1
            self.done_cost += c
            if status == DIVERGED:
                self.diverged.append(r)
        else:
            self.failed.append(r)
        label = {DONE: "done", DIVERGED: "DIVERGED (non-finite final val bpb)"}.get(status, f"FAILED ({why})")
        self.say(f"[ablate] run {self.index[r.dir]}/{self.total} {label}: {r.variant} seed {r.seed} on {r.corpus}"
                 f"  ({self._counts()})")
        if status == DONE:
            self._scored(r, left, why)

    def _scored(self, r: Run, left: list, why: str):
        if left:
            self.unscored.append(r)
            self.say(f"[ablate] scoring {r.dir} FAILED on {', '.join(t['name'] for t in left)} ({why})")
        elif results := brief(self.out / r.dir):
            self.say(f"[ablate] scored {r.dir}: {results}")


def _finish(out: Path, r: Run, prog: Progress, why: str, logs: str):
    """Record how a run's attempt ended. A failure's reason (`why`, one line) goes to
    RUN_DIR/error.txt, where the report finds it (the coordinator's output is gone by then); a
    re-run retries the run. `logs` says where the whole story is."""
    st = state(out, r).status
    left = unscored(out / r.dir) if st == DONE else []
    if st in (DONE, DIVERGED) and not left:
        (out / r.dir / ERROR).unlink(missing_ok=True)
    else:  # beside a counting summary: the scoring's error, for the report's notes
        write_text(out / r.dir / ERROR, " ".join(why.split()) + "\n")
    prog.end(r, st, f"{why}; {logs}", left)


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:200] if lines else ""


def _worker_env(threads: int, gpu: Optional[str]) -> dict:
    env = dict(os.environ)
    # The worker must import the same slmlab as this coordinator, not whatever is installed.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if gpu is not None:  # --gpus counts within this process's CUDA_VISIBLE_DEVICES, as torch does
        visible = [v.strip() for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[int(gpu)] if visible and gpu.isdigit() and int(gpu) < len(visible) else gpu
    return env


def run_local(out: Path, runs: list[Run], prog: Progress, jobs: int, threads: int, gpus: list[str], group: str):
    """Up to `jobs` worker processes at once; with GPUs, one per GPU."""
    queue = deque(r for r in runs if needs_worker(out, r))
    free = list(gpus) if gpus else [None] * jobs
    running = []  # (process, run, gpu)
    try:
        while queue or running:
            while queue and free:
                r, gpu = queue.popleft(), free.pop(0)
                (out / r.dir / ERROR).unlink(missing_ok=True)  # this attempt's outcome replaces the last one's
                log = open(out / r.dir / LOG, "a")
                cmd = [sys.executable, "-m", "slmlab.ablate.worker", str(out / r.dir), "--threads", str(threads),
                       "--group", group, "--parent", str(os.getpid())]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_worker_env(threads, gpu))
                log.close()
                running.append((proc, r, gpu))
                prog.start(r, f" on GPU {gpu}" if gpu is not None else "")
            time.sleep(0.2)
            for item in list(running):
                proc, r, gpu = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                free.append(gpu)
                last = _last_line(out / r.dir / LOG)
                why = (f"exit {proc.returncode}: {last}" if proc.returncode else
                       f"exit 0 without a readable summary.json: {last}")
                _finish(out, r, prog, why, f"log: {out / r.dir / LOG}")
    finally:
        for proc, _, _ in running:  # interrupted: stop the workers; their checkpoints remain
            proc.terminate()


def _made_by_this_start(p: Path) -> bool:
    """What ablate.py puts in --out before prepare_out: its lock, and submitit's (empty) job folder."""
    return p.name == ".lock" or (p.name == ".submitit" and p.is_dir() and not any(p.iterdir()))


def submitit_executor(out: Path, group: str, cluster: str, params: dict):
    """The executor of --launcher submitit with its --slurm parameters, built before the ablation writes
    anything: no Slurm under --cluster slurm, a parameter submitit does not know (a typo), or a Slurm one
    where `auto` found no Slurm (submitit would drop it silently) is a one-line error."""
    try:
        import submitit
    except ImportError:
        raise AblationError("--launcher submitit needs submitit: pip install -e '.[ablate]'") from None
    try:
        ex = submitit.AutoExecutor(folder=out / ".submitit" / "%j", cluster=None if cluster == "auto" else cluster)
        ex.update_parameters(name=f"ablate-{group}", **params)
    except (ValueError, TypeError, NameError, RuntimeError) as e:  # RuntimeError: no srun; NameError: unknown key
        raise AblationError(f"--launcher submitit --cluster {cluster}: {str(e).splitlines()[0]}") from None
    lost = sorted(k for k in params if k.startswith("slurm_")) if ex.cluster != "slurm" else []
    if lost:
        why = "found no Slurm here (no srun) and runs" if cluster == "auto" else f"was told to run (--cluster {cluster})"
        raise AblationError(f"--slurm {lost[0]}={params[lost[0]]}: submitit {why} on its {ex.cluster} executor, "
                            "which has no use for it; run on the cluster or drop it")
    print(f"[ablate] submitit runs the jobs on its {ex.cluster} executor", flush=True)
    return ex


def run_submitit(ex, out: Path, runs: list[Run], prog: Progress, threads: int, group: str):
    """Every unfinished run as one job of submitit executor `ex` (submitit_executor's)."""
    os.environ["PYTHONPATH"] = _worker_env(0, None)["PYTHONPATH"]  # local jobs inherit it
    pending = []
    for r in (r for r in runs if needs_worker(out, r)):
        (out / r.dir / ERROR).unlink(missing_ok=True)  # this attempt's outcome replaces the last one's
        job = ex.submit(run_one, str(out / r.dir), threads, group)
        write_text(out / r.dir / "submitit_job.txt", f"{job.job_id}\n")
        prog.start(r, f" as job {job.job_id}")
        pending.append((job, r))
    while pending:
        for item in list(pending):
            job, r = item
            try:
                if not job.done():  # the debug executor runs the job here, so this may raise too
                    continue
                job.result()
                why = "the job ended without a readable summary.json"
            except Exception as e:  # the job's own traceback is in its submitit log
                msg = str(e).strip().splitlines()[-1][:200] if str(e).strip() else ""
                why = f"{type(e).__name__}: {msg}"
            pending.remove(item)
            _finish(out, r, prog, why, f"logs: {out / '.submitit' / str(job.job_id)}")
        time.sleep(0.5)
