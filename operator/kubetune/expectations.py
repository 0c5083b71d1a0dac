"""What a reconcile pass wrote and has not yet seen come back through the watches.

The store is written only by watches, so right after a pass creates a Job or patches a status, the store
is behind for a moment. A pass that ran in that moment would decide from the old state (create the Job
again, or patch a status with a stale resourceVersion). Like client-go's controller expectations, a pass
records what it expects to see, and the next pass for that key waits (is requeued shortly) until the
store shows it, or until the expectation is too old to trust (a lost event: then the pass runs and the
apiserver's AlreadyExists / Conflict answers keep it correct).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Hashable

EXPECTATION_TTL = 30.0


class Expectations:
    """Per key: the FineTuneJob resourceVersion the last status write produced, and the Job created for a
    FineTuneJob UID that the store has not shown yet (by the new Job's UID when known: a Job created right after
    the old one was deleted must not be mistaken for the old one, still in the store until its DELETED event)."""

    def __init__(self, ttl: float = EXPECTATION_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl, self._clock = ttl, clock
        self._lock = threading.Lock()
        self._versions: dict[Hashable, tuple[str, int, float]] = {}  # key -> (uid, rv, since)
        self._jobs: dict[str, tuple[str, float]] = {}  # FineTuneJob uid -> (created Job uid or '', since)

    def expect_version(self, key: Hashable, uid: str, rv: int) -> None:
        """The status write for `key` returned resourceVersion `rv`."""
        with self._lock:
            self._versions[key] = (uid, rv, self._clock())

    def expect_job(self, ftj_uid: str, job_uid: str = "") -> None:
        """A Job was created (or found) for this FineTuneJob; `job_uid` when the apiserver said which."""
        now = self._clock()
        with self._lock:
            for old in [u for u, (_, since) in self._jobs.items() if now - since > self._ttl]:
                del self._jobs[old]  # FineTuneJobs deleted before their Job was seen
            self._jobs[ftj_uid] = (job_uid, now)

    def waiting(self, key: Hashable, uid: str, stored_rv: int, stored_job_uid: str) -> str:
        """Why a pass for `key` should wait ('' when it may run), given what the store shows now
        (`stored_job_uid`: the UID of the trainer Job in the store, '' when none)."""
        now = self._clock()
        with self._lock:
            want = self._versions.get(key)
            if want is not None:
                w_uid, w_rv, since = want
                if w_uid != uid or stored_rv >= w_rv or now - since > self._ttl:
                    del self._versions[key]
                else:
                    return f"the store has resourceVersion {stored_rv}, the last status write made {w_rv}"
            expected = self._jobs.get(uid)
            if expected is not None:
                job_uid, since_job = expected
                seen = bool(stored_job_uid) and (not job_uid or stored_job_uid == job_uid)
                if seen or now - since_job > self._ttl:
                    del self._jobs[uid]
                else:
                    return "the created trainer Job has not been seen by the watch yet"
        return ""

    def forget(self, key: Hashable) -> None:
        """Drop the status expectation of a FineTuneJob that is gone."""
        with self._lock:
            self._versions.pop(key, None)
