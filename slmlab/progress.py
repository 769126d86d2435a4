"""The training status line."""
from __future__ import annotations

import sys
import time

from .fmt import duration as fmt_duration


class Progress:
    """One status line: step (or other unit), loss, tokens/s, ETA. Redraws in place on a terminal,
    prints periodic plain lines elsewhere (CI logs)."""

    def __init__(self, total, enabled=True, quiet=False, start=0, unit="step", costs=()):
        # `start`: the steps done before this process (a resumed run); the ETA's rate counts only
        # the steps this process ran, in the time it ran them. `costs`: (first step, steps, cost of
        # each) spans, the training phases: a step at 2048 tokens of context costs more than one at 256
        # (the default run's last phase ran 2,050 tok/s against the first's 2,850), so the ETA weighs
        # the steps left by their cost; without them every step costs the same.
        self.total, self.enabled, self.quiet, self.start, self.unit = total, enabled, quiet, start, unit
        self.costs = list(costs) or [(0, total, 1.0)]
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.last_print = 0.0

    def update(self, step, loss, tps, phase=""):
        self.update_count(step, f"loss {loss:.4f} {tps:,.0f} tok/s", phase)

    def update_count(self, step, detail="", prefix=""):
        """`step` of total done; `detail` after the count, `prefix` before it."""
        if not self.enabled:
            return
        now = time.time()
        worked = self.work(step)
        eta = (now - self.t0) / max(worked - self.work(self.start), 1e-9) * (self.work(self.total) - worked)
        filled = int(20 * step / max(self.total, 1))
        bar = "#" * filled + "." * (20 - filled)
        detail = detail + " " if detail else ""
        line = f"[{bar}] {prefix}{self.unit} {step}/{self.total} {detail}eta {fmt_duration(eta)}"
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            sys.stderr.flush()
        elif now - self.last_print > 15 or step == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = now

    def work(self, steps: int) -> float:
        """The cost of the first `steps` steps."""
        return sum(cost * min(max(steps - first, 0), n) for first, n, cost in self.costs)

    def write(self, msg):
        if self.quiet:  # non-zero ranks
            return
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
        print(msg, flush=True)

