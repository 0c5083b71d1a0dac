"""`kubetune operator --trace-memory N`: tracemalloc in the operator, and on SIGUSR2 a log of what grew.

For finding where a long-running operator's memory goes (bench/README.md, the 10,000-job runs): Python's
allocations are traced with N frames from start-up; each SIGUSR2 logs the largest growths since the previous
dump (the first: the largest holders), grouped by traceback, plus the traced total. Tracing costs CPU and
memory of its own (several times slower passes), so it is off by default and meant for a test cluster.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tracemalloc

log = logging.getLogger("kubetune.memory")

IGNORED = ("<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>", "<unknown>",
           tracemalloc.__file__)


class MemoryTrace:
    """tracemalloc with `frames` frames; dump() compares with the previous snapshot."""

    def __init__(self, frames: int, top: int = 25) -> None:
        self.frames, self.top = frames, top
        self._previous: tracemalloc.Snapshot | None = None

    def start(self) -> None:
        if not tracemalloc.is_tracing():
            tracemalloc.start(self.frames)
        log.info("tracing Python allocations (%d frames); SIGUSR2 logs what grew", self.frames)

    def stop(self) -> None:
        if tracemalloc.is_tracing():
            tracemalloc.stop()

    def install(self, loop: asyncio.AbstractEventLoop, signum: int = signal.SIGUSR2) -> None:
        """Dump on `signum`, in the loop's default executor (a snapshot of a large heap takes seconds)."""
        loop.add_signal_handler(signum, lambda: loop.run_in_executor(None, self.dump))

    def dump(self) -> str:
        """The report: traced total, then the `top` tracebacks that grew most since the last dump (the largest
        ones at the first). Also logged."""
        # Not Snapshot.filter_traces: it matches every trace in Python (minutes for a heap of 10,000 jobs);
        # the import machinery's frames are only left out of the printed tracebacks.
        snapshot = tracemalloc.take_snapshot()
        current, peak = tracemalloc.get_traced_memory()
        if self._previous is None:
            stats = snapshot.statistics("traceback")
            title = "largest"
        else:
            stats = sorted(snapshot.compare_to(self._previous, "traceback"), key=lambda s: -s.size_diff)
            title = "grew most since the last dump"
        self._previous = snapshot
        lines = [f"traced {current / 2**20:.1f} MiB now, {peak / 2**20:.1f} MiB at the peak; {title}:"]
        for stat in stats[:self.top]:
            diff = getattr(stat, "size_diff", None)
            head = (f"{stat.size / 2**20:8.2f} MiB ({diff / 2**20:+.2f})" if diff is not None
                    else f"{stat.size / 2**20:8.2f} MiB") + f" in {stat.count} blocks"
            lines.append(head)
            lines.extend(f"    {frame.filename}:{frame.lineno}" for frame in stat.traceback
                         if frame.filename not in IGNORED)
        report = "\n".join(lines)
        log.info("%s", report)
        return report
