"""Peak resident memory of a process tree, sampled in a thread: what the benchmarks report as a job's memory."""

from __future__ import annotations

import threading


class PeakMemory:
    """Samples the resident memory of a process (``pid``; default this one) and all its children every
    ``interval`` seconds while in use; ``peak`` is the largest sum seen (bytes). A process that ends while sampled
    counts as what was seen before."""

    def __init__(self, pid: int | None = None, interval: float = 0.05) -> None:
        import psutil

        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        try:
            processes = [self._process, *self._process.children(recursive=True)]
        except psutil.Error:  # the process has ended
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())
