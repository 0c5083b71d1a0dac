"""The operator's one work queue: de-duplicated keys, delayed adds (requeue-after) and per-key
exponential backoff, consumed by a fixed pool of worker threads.

Semantics follow client-go's rate-limited delaying queue, which controller-runtime reconcilers rely on:
- a key is queued at most once; adding a queued key again is a no-op;
- a key is processed by at most one worker at a time; adding it while it is processed marks it dirty,
  and it is queued again when that worker calls `done`;
- `add_after(key, delay)` queues the key once the delay has passed; an earlier deadline for the same key
  replaces a later one (a retry in 60 s does not postpone an event that asks for 0.2 s);
- `add_rate_limited(key)` waits `base * 2**failures` (capped) since that key's last `forget`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


class ShutDown(Exception):
    """The queue was shut down: the worker should exit."""


class WorkQueue(Generic[K]):
    """Thread-safe work queue with de-duplication, delayed adds and per-key exponential backoff."""

    def __init__(self, *, base_delay: float = 0.5, max_delay: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._base, self._max = base_delay, max_delay
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: list[K] = []  # ready keys, FIFO
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()  # added while processing: queue again on done()
        self._waiting: list[tuple[float, int, K]] = []  # (deadline, seq, key) heap of delayed adds
        self._deadline: dict[K, float] = {}  # the earliest pending deadline per delayed key
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._shutdown = False

    # --- producers -----------------------------------------------------------------------------------

    def add(self, key: K) -> None:
        """Queue the key now (no-op when already queued; deferred when being processed)."""
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: K) -> None:
        if self._shutdown:
            return
        if key in self._processing:
            self._dirty.add(key)
            return
        if key in self._queued:
            return
        self._queued.add(key)
        self._queue.append(key)
        self._cond.notify()

    def add_after(self, key: K, delay: float) -> None:
        """Queue the key once `delay` seconds have passed (at once when delay <= 0)."""
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._shutdown:
                return
            deadline = self._clock() + delay
            if self._deadline.get(key, float("inf")) <= deadline:
                return
            self._deadline[key] = deadline
            heapq.heappush(self._waiting, (deadline, next(self._seq), key))
            self._cond.notify()

    def backoff(self, key: K) -> float:
        """The delay `add_rate_limited` would use for this key now."""
        with self._cond:
            return min(self._base * (2 ** self._failures.get(key, 0)), self._max)

    def add_rate_limited(self, key: K) -> float:
        """Queue the key after its exponential backoff and count one more failure; returns the delay."""
        with self._cond:
            failures = self._failures.get(key, 0)
            delay = min(self._base * (2 ** failures), self._max)
            self._failures[key] = failures + 1
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset the key's backoff (its last pass succeeded)."""
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        """Consecutive failures counted for the key since its last `forget`."""
        with self._cond:
            return self._failures.get(key, 0)

    # --- consumers -----------------------------------------------------------------------------------

    def _promote_due_locked(self) -> float | None:
        """Move delayed keys whose deadline has passed to the ready queue; seconds until the next one."""
        now = self._clock()
        while self._waiting:
            deadline, _, key = self._waiting[0]
            if self._deadline.get(key) != deadline:  # superseded by an earlier deadline, or already promoted
                heapq.heappop(self._waiting)
                continue
            if deadline > now:
                return deadline - now
            heapq.heappop(self._waiting)
            del self._deadline[key]
            self._add_locked(key)
        return None

    def get(self, timeout: float | None = None) -> K | None:
        """The next ready key (the caller must call `done(key)`); None on timeout. Raises ShutDown."""
        end = None if timeout is None else self._clock() + timeout
        with self._cond:
            while True:
                if self._shutdown:
                    raise ShutDown()
                wait = self._promote_due_locked()
                if self._queue:
                    key = self._queue.pop(0)
                    self._queued.discard(key)
                    self._processing.add(key)
                    return key
                if end is not None:
                    left = end - self._clock()
                    if left <= 0:
                        return None
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def done(self, key: K) -> None:
        """The worker finished the key; queue it again if it was added meanwhile."""
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)

    def shut_down(self) -> None:
        """Wake every waiting worker with ShutDown; later adds are ignored."""
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()

    # --- introspection -------------------------------------------------------------------------------

    def depth(self) -> int:
        """Keys ready to be processed now."""
        with self._cond:
            return len(self._queue)

    def delayed(self) -> dict[K, float]:
        """Delayed keys and the seconds until each is due."""
        with self._cond:
            now = self._clock()
            return {k: d - now for k, d in self._deadline.items()}

    def processing(self) -> set[K]:
        """Keys a worker holds right now."""
        with self._cond:
            return set(self._processing)
