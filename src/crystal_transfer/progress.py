"""Progress shown to a person at a terminal, and kept short in logs (a job's log is a file, not a terminal)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


class Counter:
    """Items done out of a total, with the rate: a line rewritten in place on a terminal, a log line every tenth
    otherwise (none for a total under ``log_from``: a small pass logs its outcome only)."""

    def __init__(self, total: int, label: str, log: Callable[[str], None], unit: str = "crystals",
                 log_from: int = 0) -> None:
        self.total, self.label, self.log, self.unit = total, label, log, unit
        self.done, self.start, self.next_report = 0, time.perf_counter(), max(1, total // 10)
        self.terminal = sys.stderr.isatty()
        self.quiet = total < log_from

    def advance(self, count: int) -> None:
        self.done += count
        rate = self.done / max(time.perf_counter() - self.start, 1e-9)
        text = f"{self.label}: {self.done}/{self.total} {self.unit} ({rate:.1f}/s)"
        if self.terminal:
            filled = int(20 * self.done / max(self.total, 1))
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {text}"
            print("\r" + text, end="" if self.done < self.total else "\n", file=sys.stderr, flush=True)
        elif not self.quiet and (self.done >= self.next_report or self.done == self.total):
            self.log(text)
            self.next_report = self.done + max(1, self.total // 10)
