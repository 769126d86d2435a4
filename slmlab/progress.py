"""The training status line."""
from __future__ import annotations

import sys
import time

from .fmt import duration as fmt_duration


class Progress:
    """One status line: step, loss, tokens/s, ETA. Redraws in place on a terminal, prints
    periodic plain lines elsewhere (CI logs)."""

    def __init__(self, total, enabled=True, quiet=False, start=0):
        # `start`: the steps done before this process (a resumed run); the ETA's rate counts only
        # the steps this process ran, in the time it ran them.
        self.total, self.enabled, self.quiet, self.start = total, enabled, quiet, start
        self.tty = sys.stderr.isatty()
        self.t0 = time.time()
        self.last_print = 0.0

    def update(self, step, loss, tps, phase=""):
        if not self.enabled:
            return
        now = time.time()
        done = step / self.total
        eta = (now - self.t0) / max(step - self.start, 1e-9) * (self.total - step)
        bar = "#" * int(20 * done) + "." * (20 - int(20 * done))
        line = f"[{bar}] {phase}step {step}/{self.total} loss {loss:.4f} {tps:,.0f} tok/s eta {fmt_duration(eta)}"
        if self.tty:
            sys.stderr.write("\r" + line + " " * 4)
            sys.stderr.flush()
        elif now - self.last_print > 15 or step == self.total:
            print(line, file=sys.stderr, flush=True)
            self.last_print = now

    def write(self, msg):
        if self.quiet:  # non-zero ranks
            return
        if self.tty and self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
        print(msg, flush=True)

