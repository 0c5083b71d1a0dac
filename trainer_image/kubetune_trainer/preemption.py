"""Stopping on request (SIGTERM: preemption, node drain, Job deletion) without losing trained steps.

Before training starts there is nothing to save, so the signal stops the process at once (reason
`Preempted`). Once the training loop runs, the signal only sets a flag: the loop shares it with every rank
at the next step boundary (in the all-reduce it already does for the loss), so all ranks finish the same
optimizer step, rank 0 writes a complete checkpoint, and the run exits with the `Preempted` exit code.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

from kubetune_trainer.errors import PreemptedError

# The launcher's stop request in a file: a signal sent to a worker that torchrun has forked but not yet started
# (between fork and exec) is lost, so a worker also looks for this file once its handler is installed.
STOP_FILE_ENV = "KUBETUNE_STOP_FILE"


class GracefulStop:
    """A stop request from a signal; raised at once outside `deferred()`, remembered inside it."""

    def __init__(self) -> None:
        self.signum = 0
        self._deferring = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal arrived."""
        return self.signum != 0

    def request(self, signum: int = signal.SIGTERM) -> None:
        """Record a stop request (what the signal handler does); raise when not deferring."""
        self.signum = signum
        if not self._deferring:
            raise PreemptedError(f"stopped by {signal.Signals(signum).name} before training started; no "
                                 "trained step is lost, the run starts again when restarted")

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.request(signum)

    def hold(self) -> None:
        """From now on (until `restore`) a signal only sets the flag: once the model is set up, the training loop
        reads it at step boundaries, and the export after training is finished rather than cut short."""
        self._deferring += 1

    @contextlib.contextmanager
    def deferred(self) -> Iterator["GracefulStop"]:
        """Inside: a signal only sets the flag (the training loop stops at the next step boundary)."""
        self._deferring += 1
        try:
            yield self
        finally:
            self._deferring -= 1

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> bool:
        """Install the handler (main thread only); returns whether it was installed."""
        if threading.current_thread() is not threading.main_thread():
            return False
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def adopt_launcher_request(self, path: str | None) -> None:
        """Act on a stop the launcher recorded in `path` (its signal number) before this handler existed."""
        if not path:
            return
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            return  # not asked to stop
        self.request(int(text) if text.isdigit() else signal.SIGTERM)

    def restore(self) -> None:
        """Put the previous handlers back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self._deferring = 0


def record_stop_request(path: str, signum: int) -> None:
    """Write the launcher's stop request for workers that start (or started without hearing it) later."""
    try:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(str(int(signum)))
    except OSError:
        pass  # the signal sent to the workers still stops those that are running


def stop_message(step: int, checkpoint_step: int, signum: int) -> str:
    """The summary message of a run that stopped on request."""
    name = signal.Signals(signum).name if signum else "a stop request"
    return (f"stopped by {name} at step {step} after writing checkpoint step-{checkpoint_step}; "
            f"the run resumes at step {checkpoint_step} when restarted")


def child_pids(parent: int, proc: str = "/proc") -> list[int]:
    """Direct children of `parent` (read from /proc; empty where /proc is not available)."""
    out = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat"), encoding="utf-8", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may contain spaces and parentheses, so split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[1].isdigit() and int(fields[1]) == parent:
            out.append(int(entry))
    return sorted(out)
