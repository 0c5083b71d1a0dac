"""Polls the rank-0 trainer's /progress endpoint of running jobs, off the reconcile path.

Reconcile workers never wait on a trainer pod: a poller thread reads every tracked job's /progress once
per period (a few requests at a time, each with a short timeout), keeps the latest answer, and queues a
pass for a job only when its answer changed. A pass folds `latest(key)` into the status.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable, Hashable

log = logging.getLogger("kubetune.progress")

Fetch = Callable[[str, int, float], "dict[str, Any] | None"]


class ProgressPoller:
    """track(key, host) while a job runs; latest(key) is the last /progress answer read from it."""

    def __init__(self, fetch: Fetch, notify: Callable[[Hashable], None], *, period: float, port: int,
                 timeout: float = 1.0, concurrency: int = 4) -> None:
        self._fetch, self._notify = fetch, notify
        self.period, self.port, self.timeout = period, port, timeout
        self._concurrency = concurrency
        self._lock = threading.Lock()
        self._targets: dict[Hashable, str] = {}
        self._latest: dict[Hashable, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def track(self, key: Hashable, host: str) -> None:
        """Poll this job's rank-0 host from now on (a new host drops the old answer)."""
        with self._lock:
            if self._targets.get(key) != host:
                self._latest.pop(key, None)
            self._targets[key] = host

    def untrack(self, key: Hashable) -> None:
        """Stop polling the job and forget its last answer."""
        with self._lock:
            self._targets.pop(key, None)
            self._latest.pop(key, None)

    def latest(self, key: Hashable) -> dict[str, Any] | None:
        """The last /progress answer of a tracked job, or None."""
        with self._lock:
            value = self._latest.get(key)
            return dict(value) if value is not None else None

    def tracked(self) -> dict[Hashable, str]:
        """Tracked jobs and their hosts."""
        with self._lock:
            return dict(self._targets)

    def poll_once(self, pool: concurrent.futures.Executor | None = None) -> list[Hashable]:
        """Read every tracked job once; returns (and notifies) the keys whose answer changed."""
        targets = self.tracked()
        if not targets:
            return []
        own = pool is None
        pool = pool or concurrent.futures.ThreadPoolExecutor(self._concurrency, "progress")
        try:
            answers = dict(zip(targets, pool.map(lambda host: self._safe_fetch(host), targets.values())))
        finally:
            if own:
                pool.shutdown(wait=False)
        changed = []
        with self._lock:
            for key, answer in answers.items():
                if answer is None or self._targets.get(key) != targets[key]:
                    continue  # unreachable, or untracked / moved while we read
                if self._latest.get(key) != answer:
                    self._latest[key] = answer
                    changed.append(key)
        self.polls += 1
        for key in changed:
            self._notify(key)
        return changed

    def _safe_fetch(self, host: str) -> dict[str, Any] | None:
        try:
            return self._fetch(host, self.port, self.timeout)
        except Exception as exc:  # noqa: BLE001 - a pod that answers nonsense is only not progressing
            log.debug("progress from %s failed: %s", host, exc)
            return None

    def start(self) -> "ProgressPoller":
        """Poll every `period` seconds in a daemon thread."""
        def loop() -> None:
            with concurrent.futures.ThreadPoolExecutor(self._concurrency, "progress") as pool:
                while not self._stop.wait(self.period):
                    try:
                        self.poll_once(pool)
                    except Exception:  # noqa: BLE001 - keep polling
                        log.exception("progress poll failed")
        self._thread = threading.Thread(target=loop, name="progress-poller", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
