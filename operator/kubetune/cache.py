"""The operator's in-memory view of FineTuneJobs and their trainer Jobs and pods, fed by its watch streams.

A reconcile pass reads from here instead of asking the apiserver: with 1,000 jobs in flight, a GET of the
FineTuneJob, a GET of its Job and a LIST of its pods on every child event and every resync was most of the
operator's apiserver traffic and CPU. Jobs and pods are kept as slim copies (only the fields `reconcile`
reads), which also keeps memory flat with the number of jobs.

Ordering: resourceVersions of one collection come from one etcd revision counter, so an event older than
what the cache holds (e.g. the watch echo of our own status write, whose response was stored first) is
ignored. Each pass may also write through what it just created or patched.
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from kubetune.builders import COMPLETION_INDEX_ANNOTATION, JOB_NAME_LABEL, SPEC_HASH_ANNOTATION

Key = tuple[str, str]  # (namespace, FineTuneJob name)

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def resource_version(obj: dict[str, Any]) -> int:
    """metadata.resourceVersion as an integer (-1 when missing or not numeric)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or -1)
    except (TypeError, ValueError):
        return -1


def slim_ftj(obj: dict[str, Any]) -> dict[str, Any]:
    """A FineTuneJob without managedFields and kubectl's last-applied copy of the spec."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    out = {k: copy.deepcopy(v) for k, v in obj.items() if k != "metadata"}
    out["metadata"] = copy.deepcopy(meta)
    return out


def _meta(obj: dict[str, Any], annotation: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out: dict[str, Any] = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                 "creationTimestamp", "deletionTimestamp") if meta.get(k)}
    value = (meta.get("annotations") or {}).get(annotation)
    if value is not None:
        out["annotations"] = {annotation: value}
    out["labels"] = {JOB_NAME_LABEL: (meta.get("labels") or {}).get(JOB_NAME_LABEL, "")}
    out["ownerReferences"] = [{"uid": o.get("uid"), "kind": o.get("kind")} for o in meta.get("ownerReferences") or []]
    return out


def slim_job(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields of a trainer Job that a reconcile pass reads: identity, spec hash, suspend, status."""
    return {"metadata": _meta(obj, SPEC_HASH_ANNOTATION),
            "spec": {"suspend": bool((obj.get("spec") or {}).get("suspend"))},
            "status": copy.deepcopy(obj.get("status") or {})}


def slim_pod(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields of a trainer pod that a reconcile pass reads: identity, completion index, phase, IP,
    scheduling condition, the trainer container's termination and the pod's reason/message."""
    status = obj.get("status") or {}
    keep: dict[str, Any] = {k: status[k] for k in ("phase", "podIP", "reason", "message") if status.get(k)}
    conds = [c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"]
    if conds:
        keep["conditions"] = copy.deepcopy(conds)
    statuses = []
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        statuses.append({"name": cs.get("name"), "state": {"terminated": copy.deepcopy(term)} if term else {}})
    if statuses:
        keep["containerStatuses"] = statuses
    return {"metadata": _meta(obj, COMPLETION_INDEX_ANNOTATION), "status": keep}


def owner_key(obj: dict[str, Any]) -> Key | None:
    """(namespace, FineTuneJob name) of a child, from its kubetune.io/job label."""
    meta = obj.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
    return (meta.get("namespace") or "", owner) if owner else None


def _newer(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    if old is None:
        return True
    return resource_version(new) > resource_version(old) or resource_version(new) < 0


class ClusterCache:
    """FineTuneJobs, trainer Jobs and trainer pods by FineTuneJob; safe to use from the event loop and
    from reconcile threads. Reads return copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ftjs: dict[Key, dict[str, Any]] = {}
        self._jobs: dict[Key, dict[str, Any]] = {}
        self._pods: dict[Key, dict[str, dict[str, Any]]] = {}
        self._synced: set[Key] = set()  # keys whose Job and pods were read or seen since start

    # --- FineTuneJobs ------------------------------------------------------------------------------

    def observe_ftj(self, event_type: str | None, obj: dict[str, Any]) -> bool:
        """Record a FineTuneJob watch event; True when it is news (a pass should run)."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            old = self._ftjs.get(key)
            if event_type == "DELETED":
                if old is not None and (old.get("metadata") or {}).get("uid") == meta.get("uid"):
                    self._forget(key)
                return True
            if old is not None and (old.get("metadata") or {}).get("uid") == meta.get("uid") \
                    and not _newer(obj, old):
                return False  # the echo of our own write, or an older event
            self._ftjs[key] = slim_ftj(obj)
            return True

    def store_ftj(self, obj: dict[str, Any]) -> None:
        """Write through a FineTuneJob the apiserver returned (a read or a status patch response)."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            old = self._ftjs.get(key)
            if old is None or (old.get("metadata") or {}).get("uid") != meta.get("uid") or _newer(obj, old):
                self._ftjs[key] = slim_ftj(obj)

    def forget_ftj(self, key: Key) -> None:
        """Drop a FineTuneJob that no longer exists (and what the cache knew about its children)."""
        with self._lock:
            self._forget(key)

    def _forget(self, key: Key) -> None:
        self._ftjs.pop(key, None)
        self._synced.discard(key)
        self._jobs.pop(key, None)
        self._pods.pop(key, None)

    def ftj(self, key: Key) -> dict[str, Any] | None:
        """A copy of the FineTuneJob, or None."""
        with self._lock:
            obj = self._ftjs.get(key)
            return copy.deepcopy(obj) if obj is not None else None

    def has_ftj(self, key: Key) -> bool:
        """Whether the FineTuneJob is known (exists, as far as the watch has told)."""
        with self._lock:
            return key in self._ftjs

    def ftjs(self) -> list[dict[str, Any]]:
        """Every known FineTuneJob (shallow: callers read only)."""
        with self._lock:
            return list(self._ftjs.values())

    # --- children ----------------------------------------------------------------------------------

    def observe_job(self, event_type: str | None, obj: dict[str, Any]) -> Key | None:
        """Record a trainer Job watch event; the owning FineTuneJob's key, or None when unlabeled."""
        key = owner_key(obj)
        if key is None:
            return None
        uid = (obj.get("metadata") or {}).get("uid")
        with self._lock:
            old = self._jobs.get(key)
            if event_type == "DELETED":
                if old is not None and old["metadata"].get("uid") == uid:
                    del self._jobs[key]
            elif _newer(obj, old):
                self._jobs[key] = slim_job(obj)
        return key

    def store_job(self, key: Key, obj: dict[str, Any] | None) -> None:
        """Write through a trainer Job read or created by a pass (None: read and found absent)."""
        with self._lock:
            if obj is None:
                self._jobs.pop(key, None)
            elif _newer(obj, self._jobs.get(key)):
                self._jobs[key] = slim_job(obj)

    def observe_pod(self, event_type: str | None, obj: dict[str, Any]) -> Key | None:
        """Record a trainer pod watch event; the owning FineTuneJob's key, or None when unlabeled."""
        key = owner_key(obj)
        if key is None:
            return None
        name = (obj.get("metadata") or {}).get("name") or ""
        with self._lock:
            pods = self._pods.setdefault(key, {})
            old = pods.get(name)
            if event_type == "DELETED":
                if old is not None and old["metadata"].get("uid") == (obj.get("metadata") or {}).get("uid"):
                    del pods[name]
                if not pods:
                    del self._pods[key]
            elif _newer(obj, old):
                pods[name] = slim_pod(obj)
        return key

    def store_pods(self, key: Key, pods: list[dict[str, Any]]) -> None:
        """Replace the pods of a FineTuneJob with a LIST a pass just made (newer events still win)."""
        with self._lock:
            current = self._pods.get(key, {})
            fresh = {}
            for pod in pods:
                name = (pod.get("metadata") or {}).get("name") or ""
                old = current.get(name)
                fresh[name] = slim_pod(pod) if _newer(pod, old) else old
            if fresh:
                self._pods[key] = fresh
            else:
                self._pods.pop(key, None)

    def mark_synced(self, key: Key) -> None:
        """The cache now knows this FineTuneJob's Job and pods (read, or known not to exist yet)."""
        with self._lock:
            self._synced.add(key)

    def children(self, key: Key) -> tuple[bool, dict[str, Any] | None, list[dict[str, Any]]]:
        """(synced, Job, pods) of a FineTuneJob as copies; not synced means the watch may not have
        delivered them yet (e.g. right after the operator started) and the caller should read them."""
        with self._lock:
            job = self._jobs.get(key)
            pods = list((self._pods.get(key) or {}).values())
            return (key in self._synced, copy.deepcopy(job) if job is not None else None, copy.deepcopy(pods))

    def sizes(self) -> dict[str, int]:
        """How many objects of each kind the cache holds (for tests and debugging)."""
        with self._lock:
            return {"finetunejobs": len(self._ftjs), "jobs": len(self._jobs),
                    "pods": sum(len(p) for p in self._pods.values())}
