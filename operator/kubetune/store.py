"""The operator's read-only store of FineTuneJobs and their trainer Jobs and pods, fed only by watch streams.

A reconcile pass reads from here instead of asking the apiserver: with 1,000 jobs in flight, a GET of the
FineTuneJob, a GET of its Job and a LIST of its pods on every child event and every resync was most of the
operator's apiserver traffic and CPU. Jobs and pods are kept as slim copies (only the fields `reconcile`
reads), each as compressed compact JSON, which also keeps memory flat with the number of jobs.

Children are indexed by owner UID, as an informer's owner index is: a FineTuneJob's Job is the Job whose
controller ownerReference is that FineTuneJob's UID, and its pods are the pods controlled by that Job. An
object that merely carries our name or labels (left behind by a deleted FineTuneJob of the same name, or
orphaned with `--cascade=orphan`) is not anybody's child here.

Only the watches write: a pass never patches the store with what it wrote. A pass that needs to see its
own write first waits for the watch to deliver it (see kubetune.expectations). Ordering: resourceVersions
of one collection come from one etcd revision counter, so an event older than what the store holds is
ignored.
"""

from __future__ import annotations

import copy
import json
import threading
import zlib
from typing import Any

from kubetune.builders import (COMPLETION_INDEX_ANNOTATION, COMPONENT_LABEL, JOB_NAME_LABEL, LAYOUT_ANNOTATION,
                               SPEC_HASH_ANNOTATION)
from kubetune.sizing.fleet import GpuHolding, job_gpu_holding, job_pods

PREFLIGHT_COMPONENT = "preflight"  # kubetune.preflight.COMPONENT: the CPU check's Job, indexed apart from the trainer's

Key = tuple[str, str]  # (namespace, FineTuneJob name)

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def resource_version(obj: dict[str, Any]) -> int:
    """metadata.resourceVersion as an integer (-1 when missing or not numeric)."""
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or -1)
    except (TypeError, ValueError):
        return -1


def _slim_ftj_view(obj: dict[str, Any]) -> dict[str, Any]:
    """`slim_ftj` sharing everything below the top level with `obj` (for encoding it, not for keeping)."""
    meta = dict(obj.get("metadata") or {})
    meta.pop("managedFields", None)
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != LAST_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    return {**{k: v for k, v in obj.items() if k != "metadata"}, "metadata": meta}


def slim_ftj(obj: dict[str, Any]) -> dict[str, Any]:
    """A FineTuneJob without managedFields and kubectl's last-applied copy of the spec (an independent copy)."""
    return copy.deepcopy(_slim_ftj_view(obj))


class _StoredFtj:
    """A stored FineTuneJob: its identity, a brief of the fields the resync and Kueue scans read, and the rest as
    compact JSON, compressed (zlib level 1), decoded when a pass reads it (as a deep copy was before). A running
    FineTuneJob of the scale benchmark (7.7 KB of compact JSON with its status.plan, 2.4 KB compressed) takes
    2.7 KB with its brief, against 5.1 KB uncompressed and 7.4 KB as Python dicts (tracemalloc); decompressing
    adds about a quarter to the JSON decode of a pass (microseconds against the pass's API calls), and the
    scans no longer walk every job's dicts."""

    __slots__ = ("uid", "rv", "brief", "blob")

    def __init__(self, obj: dict[str, Any]) -> None:
        slim = _slim_ftj_view(obj)  # encoded below, so nothing needs copying
        meta = slim.get("metadata") or {}
        status = slim.get("status") or {}
        self.uid = str(meta.get("uid") or "")
        self.rv = resource_version(slim)
        self.brief = {
            "metadata": {"namespace": meta.get("namespace") or "", "name": meta.get("name") or "",
                         "labels": dict(meta.get("labels") or {})},
            "spec": {"ttlSecondsAfterFinished": (slim.get("spec") or {}).get("ttlSecondsAfterFinished")},
            "status": {k: status[k] for k in ("phase", "childrenDeleted") if k in status},
        }
        self.blob = zlib.compress(json.dumps(slim, separators=(",", ":")).encode(), 1)

    def full(self) -> dict[str, Any]:
        """The stored FineTuneJob (a new copy)."""
        return json.loads(zlib.decompress(self.blob))


class _Packed:
    """A stored slim Job or pod: its resourceVersion, the FineTuneJob it belongs to (Jobs), and the slim object
    as compressed compact JSON (zlib level 1), decoded into a new copy on each read. A completed trainer Job's
    slim copy takes 0.6 KB this way against 1.7 KB as Python dicts, and a stored object is two allocations
    instead of ~30 small ones, which leaves fewer partly used allocator pools behind as objects are replaced."""

    __slots__ = ("rv", "key", "blob", "waiting", "count")

    def __init__(self, slim: dict[str, Any], key: "Key | None" = None,
                 waiting: GpuHolding | None = None, count: int = 0) -> None:
        self.rv = resource_version(slim)
        self.key = key
        self.blob = zlib.compress(json.dumps(slim, separators=(",", ":")).encode(), 1)
        self.waiting = waiting  # Jobs: the GPUs its pods ask for, while it wants pods (waiting_gpus)
        # Jobs: the pods it runs at once; pods: 1 while the pod stands for its index (not Failed: the Job controller
        # replaces a failed pod), else 0.
        self.count = count

    def full(self) -> dict[str, Any]:
        """The stored slim object (a new copy)."""
        return json.loads(zlib.decompress(self.blob))


def _meta(obj: dict[str, Any], *annotations: str) -> dict[str, Any]:
    meta = obj.get("metadata") or {}
    out: dict[str, Any] = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                 "creationTimestamp", "deletionTimestamp") if meta.get(k)}
    kept = {k: v for k, v in (meta.get("annotations") or {}).items() if k in annotations}
    if kept:
        out["annotations"] = kept
    labels = meta.get("labels") or {}
    out["labels"] = {JOB_NAME_LABEL: labels.get(JOB_NAME_LABEL, "")}
    if labels.get(COMPONENT_LABEL) == PREFLIGHT_COMPONENT:
        out["labels"][COMPONENT_LABEL] = PREFLIGHT_COMPONENT
    out["ownerReferences"] = [{k: o[k] for k in ("uid", "kind", "name", "controller") if o.get(k) is not None}
                              for o in meta.get("ownerReferences") or []]
    return out


# What a reconcile pass reads of a Job's status (reconcile.py): its conditions' verdicts, the failed-pod count
# and the run's times. The rest (active/ready/terminating counts, completed indexes, uncounted pods, condition
# timestamps) changes with every pod and is not kept.
JOB_STATUS_FIELDS = ("failed", "startTime", "completionTime")
JOB_CONDITION_FIELDS = ("type", "status", "reason", "message")


def slim_job(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields of a trainer Job that a reconcile pass reads: identity, spec hash, layout, suspend, and of
    its status JOB_STATUS_FIELDS and the conditions' JOB_CONDITION_FIELDS."""
    status = obj.get("status") or {}
    keep: dict[str, Any] = {k: status[k] for k in JOB_STATUS_FIELDS if status.get(k) is not None}
    conds = [{k: c[k] for k in JOB_CONDITION_FIELDS if c.get(k)} for c in status.get("conditions") or []]
    if conds:
        keep["conditions"] = conds
    return {"metadata": _meta(obj, SPEC_HASH_ANNOTATION, LAYOUT_ANNOTATION),
            "spec": {"suspend": bool((obj.get("spec") or {}).get("suspend"))},
            "status": keep}


# The Job controller's verdicts: a Job with one of these True asks for no more pods (reconcile reads the same).
FINISHED_JOB_CONDITIONS = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


def waiting_gpus(job: dict[str, Any]) -> GpuHolding | None:
    """The GPUs a trainer Job will ask of its GPU type as soon as its pods exist; None when it asks for none now:
    suspended (Kueue has not admitted it), being deleted, or finished."""
    if ((job.get("spec") or {}).get("suspend") or (job.get("metadata") or {}).get("deletionTimestamp")
            or any(c.get("type") in FINISHED_JOB_CONDITIONS and c.get("status") == "True"
                   for c in (job.get("status") or {}).get("conditions") or [])):
        return None
    return job_gpu_holding(job)


def slim_pod(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields of a trainer pod that a reconcile pass reads: identity, completion index, phase, IP,
    scheduling condition, each container's termination, start time or waiting reason, and the pod's reason/message.
    It shares dicts with `obj` (the store encodes it at once, and reads decode a new copy)."""
    status = obj.get("status") or {}
    keep: dict[str, Any] = {k: status[k] for k in ("phase", "podIP", "reason", "message") if status.get(k)}
    conds = [c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"]
    if conds:
        keep["conditions"] = conds
    statuses = []
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        term, waiting = state.get("terminated"), state.get("waiting")
        if term:
            slim_state = {"terminated": term}
        elif (state.get("running") or {}).get("startedAt"):
            slim_state = {"running": {"startedAt": state["running"]["startedAt"]}}  # status.accounting
        elif waiting:
            slim_state = {"waiting": {k: waiting[k] for k in ("reason", "message") if waiting.get(k)}}
        else:
            slim_state = {}
        statuses.append({"name": cs.get("name"), "state": slim_state})
    if statuses:
        keep["containerStatuses"] = statuses
    return {"metadata": _meta(obj, COMPLETION_INDEX_ANNOTATION), "status": keep}


def slim_workload(obj: dict[str, Any]) -> dict[str, Any]:
    """The fields of a Kueue Workload that a reconcile pass reads: identity, spec.active, conditions and the
    admission's ClusterQueue and flavors (kubetune.kueue_admission)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    out: dict[str, Any] = {
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion") if meta.get(k)},
        "spec": {"active": (obj.get("spec") or {}).get("active", True)},
        "status": {"conditions": [{k: c[k] for k in ("type", "status", "reason", "message") if c.get(k) is not None}
                                  for c in status.get("conditions") or []]},
    }
    admission = status.get("admission")
    if admission:
        out["status"]["admission"] = {
            "clusterQueue": admission.get("clusterQueue", ""),
            "podSetAssignments": [{"flavors": dict(ps.get("flavors") or {})}
                                  for ps in admission.get("podSetAssignments") or []]}
    return out


def label_key(obj: dict[str, Any]) -> Key | None:
    """(namespace, FineTuneJob name) named by a child's kubetune.io/job label (a hint, not ownership)."""
    meta = obj.get("metadata") or {}
    owner = (meta.get("labels") or {}).get(JOB_NAME_LABEL)
    return (meta.get("namespace") or "", owner) if owner else None


def controller_of(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """The object's controller ownerReference of that kind (the first owner of that kind when none is
    marked controller), or None."""
    refs = [o for o in (obj.get("metadata") or {}).get("ownerReferences") or [] if o.get("kind") == kind]
    for ref in refs:
        if ref.get("controller"):
            return ref
    return refs[0] if refs else None


def _newer_version(new: int, old: int) -> bool:
    """Whether resourceVersion `new` is later than `old` (an unknown one, -1, always counts as news)."""
    return new > old or new < 0


def _newer(new: dict[str, Any], old: "_Packed | None") -> bool:
    return old is None or _newer_version(resource_version(new), old.rv)


def _uid(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("uid") or "")


class ClusterStore:
    """FineTuneJobs by (namespace, name); trainer Jobs by owning FineTuneJob UID; trainer pods by owning Job
    UID. Written only by watch events; safe to read from worker threads. Reads return copies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ftjs: dict[Key, _StoredFtj] = {}
        self._jobs: dict[str, _Packed] = {}  # job uid -> slim Job (key: the FineTuneJob it belongs to)
        self._job_of: dict[str, str] = {}  # FineTuneJob uid -> job uid
        self._preflight_of: dict[str, str] = {}  # FineTuneJob uid -> preflight job uid
        self._pods: dict[str, _Packed] = {}  # pod uid -> slim pod
        self._pods_of: dict[str, set[str]] = {}  # job uid -> pod uids
        self._workloads: dict[str, dict[str, Any]] = {}  # job uid -> slim Kueue Workload owned by that Job

    # --- FineTuneJobs ------------------------------------------------------------------------------

    def observe_ftj(self, event_type: str | None, obj: dict[str, Any]) -> bool:
        """Record a FineTuneJob watch event; True when it is news (a pass should run)."""
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        stored = _StoredFtj(obj) if event_type != "DELETED" else None  # encoded outside the lock
        with self._lock:
            old = self._ftjs.get(key)
            if stored is None:
                if old is not None and old.uid == _uid(obj):
                    del self._ftjs[key]
                return True
            if old is not None and old.uid == stored.uid and not _newer_version(stored.rv, old.rv):
                return False  # an older event arriving late
            self._ftjs[key] = stored
            return True

    def ftj(self, key: Key) -> dict[str, Any] | None:
        """A copy of the FineTuneJob, or None."""
        with self._lock:
            stored = self._ftjs.get(key)
        return stored.full() if stored is not None else None

    def has_ftj(self, key: Key) -> bool:
        """Whether the FineTuneJob is known (exists, as far as the watch has told)."""
        with self._lock:
            return key in self._ftjs

    def ftj_briefs(self) -> list[dict[str, Any]]:
        """Every known FineTuneJob as a brief: metadata namespace/name/labels, spec.ttlSecondsAfterFinished,
        status phase/childrenDeleted (shared: callers read only)."""
        with self._lock:
            return [stored.brief for stored in self._ftjs.values()]

    def ftj_version(self, key: Key) -> tuple[str, int]:
        """(uid, resourceVersion) of the stored FineTuneJob; ('', -1) when unknown."""
        with self._lock:
            stored = self._ftjs.get(key)
            return (stored.uid, stored.rv) if stored is not None else ("", -1)

    # --- children ----------------------------------------------------------------------------------

    def _ftj_key_of_job(self, job: dict[str, Any]) -> Key | None:
        ref = controller_of(job, "FineTuneJob")
        if ref is not None and ref.get("name"):
            return ((job.get("metadata") or {}).get("namespace") or "", str(ref["name"]))
        return label_key(job)

    def observe_job(self, event_type: str | None, obj: dict[str, Any]) -> Key | None:
        """Record a trainer Job watch event; the FineTuneJob to reconcile (its owner, else the one its label
        names), or None when neither."""
        uid = _uid(obj)
        ref = controller_of(obj, "FineTuneJob")
        owner = str(ref.get("uid") or "") if ref else ""
        preflight = ((obj.get("metadata") or {}).get("labels") or {}).get(COMPONENT_LABEL) == PREFLIGHT_COMPONENT
        key = self._ftj_key_of_job(obj)
        stored = (_Packed(slim_job(obj), key, None if preflight else waiting_gpus(obj), job_pods(obj))
                  if event_type != "DELETED" else None)  # encoded outside the lock
        with self._lock:
            index = self._preflight_of if preflight else self._job_of
            old = self._jobs.get(uid)
            if event_type == "DELETED":
                if old is not None:
                    del self._jobs[uid]
                    if owner and index.get(owner) == uid:
                        del index[owner]
            elif stored is not None and _newer(obj, old):
                self._jobs[uid] = stored
                if owner:
                    index[owner] = uid
        return key

    def observe_pod(self, event_type: str | None, obj: dict[str, Any]) -> Key | None:
        """Record a trainer pod watch event; the FineTuneJob to reconcile (the owner of the pod's Job, else
        the one its label names), or None when neither."""
        uid = _uid(obj)
        ref = controller_of(obj, "Job")
        job_uid = str(ref.get("uid") or "") if ref else ""
        phase = (obj.get("status") or {}).get("phase")
        stored = (_Packed(slim_pod(obj), count=0 if phase == "Failed" else 1)
                  if event_type != "DELETED" else None)  # encoded outside the lock
        with self._lock:
            old = self._pods.get(uid)
            if event_type == "DELETED":
                if old is not None:
                    del self._pods[uid]
                    members = self._pods_of.get(job_uid)
                    if members is not None:
                        members.discard(uid)
                        if not members:
                            del self._pods_of[job_uid]
            elif stored is not None and _newer(obj, old):
                self._pods[uid] = stored
                if job_uid:
                    self._pods_of.setdefault(job_uid, set()).add(uid)
            job = self._jobs.get(job_uid)
        if job is not None and job.key is not None:
            return job.key
        return label_key(obj)

    def observe_workload(self, event_type: str | None, obj: dict[str, Any]) -> Key | None:
        """Record a Kueue Workload watch event (kept by the UID of the Job that owns it); the FineTuneJob whose
        trainer Job that is, or None when the Job is not ours (or not known yet: its own event brings the pass)."""
        ref = controller_of(obj, "Job")
        job_uid = str(ref.get("uid") or "") if ref else ""
        if not job_uid:
            return None
        with self._lock:
            old = self._workloads.get(job_uid)
            if event_type == "DELETED":
                if old is not None and _uid(old) == _uid(obj):
                    del self._workloads[job_uid]
            elif (old is None or _uid(old) != _uid(obj)
                  or _newer_version(resource_version(obj), resource_version(old))):
                self._workloads[job_uid] = slim_workload(obj)
            job = self._jobs.get(job_uid)
        return job.key if job is not None else None

    def workload(self, job_uid: str) -> dict[str, Any] | None:
        """A copy of the Kueue Workload owned by the Job with this UID, or None."""
        with self._lock:
            obj = self._workloads.get(job_uid)
            return copy.deepcopy(obj) if obj is not None else None

    def children(self, ftj_uid: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(Job, pods) owned by the FineTuneJob with this UID, as copies."""
        with self._lock:
            job_uid = self._job_of.get(ftj_uid)
            job = self._jobs.get(job_uid) if job_uid else None
            if job is None:
                return None, []
            pods = [self._pods[p] for p in self._pods_of.get(job_uid, ()) if p in self._pods]
        return job.full(), [pod.full() for pod in pods]

    def preflight(self, ftj_uid: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """(preflight Job, its pods) owned by the FineTuneJob with this UID, as copies."""
        with self._lock:
            job_uid = self._preflight_of.get(ftj_uid)
            job = self._jobs.get(job_uid) if job_uid else None
            if job is None:
                return None, []
            pods = [self._pods[p] for p in self._pods_of.get(job_uid, ()) if p in self._pods]
        return job.full(), [pod.full() for pod in pods]

    def podless_job_gpus(self) -> list[GpuHolding]:
        """What the trainer Jobs will ask for with the pods the Job controller has not created yet (all of them
        after the Job's creation; a failed pod's replacement): a cluster-wide pod watch does not count those.
        A Job's pods that exist, pending, running or succeeded, are left to the pod watch."""
        out = []
        with self._lock:
            for uid, packed in self._jobs.items():
                held = packed.waiting
                if held is None:
                    continue
                present = sum(self._pods[p].count for p in self._pods_of.get(uid, ()) if p in self._pods)
                missing = packed.count - present
                if missing > 0:
                    out.append(held._replace(gpus=held.gpus * missing // max(packed.count, 1)))
        return out

    def sizes(self) -> dict[str, int]:
        """How many objects of each kind the store holds (for tests and debugging)."""
        with self._lock:
            return {"finetunejobs": len(self._ftjs), "jobs": len(self._jobs), "pods": len(self._pods)}
