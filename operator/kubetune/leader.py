"""Leader election on a coordination.k8s.io/v1 Lease: only the holder runs the operator's handlers.

Expiry is judged on this process's own clock, as client-go's leaderelection does: a standby remembers
when it last saw the Lease record change (holder, renewTime, resourceVersion) and takes over only after
the record has stood still for a whole lease duration. The renewTime written by another machine is never
compared with the local wall clock, so a leader whose clock runs behind (or ahead) is neither deposed
while it renews nor kept forever after it stops."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
import uuid
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("kubetune.leader")


def default_identity() -> str:
    """Pod name (or hostname) plus a random suffix, unique per process."""
    base = os.environ.get("POD_NAME") or socket.gethostname()
    return f"{base}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class LeaseElector:
    """Acquire/renew/release one Lease with optimistic concurrency (resourceVersion)."""

    def __init__(self, api: client.ApiClient | None, namespace: str, name: str, identity: str,
                 lease_seconds: int = 15, *, coordination: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = coordination if coordination is not None else client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds = lease_seconds
        self._clock = clock
        self._observed: tuple[str, str, str] | None = None  # (holder, renewTime, resourceVersion) last seen
        self._observed_at = 0.0  # local monotonic time when that record was first seen

    def _observe(self, holder: str, renew: Any, rv: str) -> float:
        """Record the Lease as read now; seconds since its record last changed (local clock)."""
        record = (holder, str(renew), rv)
        now = self._clock()
        if record != self._observed:
            self._observed, self._observed_at = record, now
        return now - self._observed_at

    def _spec(self, transitions: int, acquire: dt.datetime | None) -> dict[str, Any]:
        now = _now()
        return {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_seconds,
                "acquireTime": (acquire or now).isoformat(), "renewTime": now.isoformat(),
                "leaseTransitions": transitions}

    def try_acquire_or_renew(self) -> bool:
        """True when this process holds the Lease after the call."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(0, None)}
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                log.info("created Lease %s/%s: this process is the leader", self.namespace, self.name)
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        spec = lease.spec
        holder = spec.holder_identity or ""
        renew = spec.renew_time or spec.acquire_time
        duration = spec.lease_duration_seconds or self.lease_seconds
        unchanged_for = self._observe(holder, renew, str(lease.metadata.resource_version or ""))
        expired = unchanged_for >= duration
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        acquire = spec.acquire_time if holder == self.identity else None
        body = {"metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": self._spec(transitions, acquire)}
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        if holder != self.identity:
            log.info("took over Lease %s/%s from %r", self.namespace, self.name, holder or None)
        return True

    def release(self) -> None:
        """Give the Lease up (if held) so a standby takes over at once."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            body = {"metadata": {"name": self.name, "namespace": self.namespace,
                                 "resourceVersion": lease.metadata.resource_version},
                    "spec": {"holderIdentity": None, "leaseDurationSeconds": 1,
                             "leaseTransitions": lease.spec.lease_transitions or 0,
                             "renewTime": (_now() - dt.timedelta(seconds=60)).isoformat()}}
            self.api.replace_namespaced_lease(self.name, self.namespace, body)
            log.info("released Lease %s/%s", self.namespace, self.name)
        except Exception:  # noqa: BLE001 - best effort at shutdown
            log.warning("could not release Lease %s/%s", self.namespace, self.name, exc_info=True)

    def holder(self) -> str:
        """The current holder's identity ('' when none)."""
        try:
            return self.api.read_namespaced_lease(self.name, self.namespace).spec.holder_identity or ""
        except ApiException:
            return ""
