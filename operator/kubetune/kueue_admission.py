"""What Kueue says about a trainer Job, read from its Workload (pure: no I/O).

Kueue creates one Workload per queued Job (owned by the Job) and writes its decisions there as conditions:
QuotaReserved (False with a reason and a message that names the quota numbers while it waits), Admitted,
Evicted and Preempted (True after Kueue took the quota back and suspended the Job again). The operator
never acts on the Job's `suspend` for Kueue: it only reads the Workload and tells the user in the
FineTuneJob's status, an `Admitted` condition and Events.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kubetune import reasons as R

WORKLOAD_JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"  # Kueue's label on the Workload of a batch Job


@dataclasses.dataclass(frozen=True)
class Admission:
    """Kueue's verdict on one Workload, as the FineTuneJob shows it."""

    admitted: bool
    reason: str  # one of ours (kubetune.reasons)
    message: str  # Kueue's own words, prefixed with what they are about
    evicted: bool = False  # Kueue took the quota back after admitting the Job (preemption, eviction)


def _conditions(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type", ""): c for c in (workload.get("status") or {}).get("conditions") or []}


def _true(cond: dict[str, Any] | None) -> bool:
    return bool(cond) and cond.get("status") == "True"  # type: ignore[union-attr]


def flavors(workload: dict[str, Any]) -> list[str]:
    """The ResourceFlavors Kueue assigned (sorted, without duplicates), [] when not admitted."""
    names: set[str] = set()
    for podset in ((workload.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []:
        names.update(str(v) for v in (podset.get("flavors") or {}).values())
    return sorted(names)


def cluster_queue(workload: dict[str, Any]) -> str:
    """The ClusterQueue that admitted the Workload ('' when none)."""
    return str(((workload.get("status") or {}).get("admission") or {}).get("clusterQueue") or "")


def admission(workload: dict[str, Any] | None, queue: str) -> Admission:
    """Kueue's verdict on the Workload of a Job labelled for LocalQueue `queue` (None: no Workload yet)."""
    if workload is None:
        return Admission(False, R.QUEUED, f"waiting for Kueue to create a Workload for the Job (queue {queue!r})")
    conds = _conditions(workload)
    if _true(conds.get("Admitted")):
        where = cluster_queue(workload)
        flavor = ", ".join(flavors(workload))
        text = f"admitted by Kueue to ClusterQueue {where!r}" + (f" on flavor {flavor}" if flavor else "")
        return Admission(True, R.KUEUE_ADMITTED, text)
    evicted = conds.get("Evicted")
    if _true(evicted):
        preempted = conds.get("Preempted")
        reason = R.KUEUE_PREEMPTED if _true(preempted) or evicted.get("reason") == "Preempted" else R.KUEUE_EVICTED
        detail = (preempted or {}).get("message") if _true(preempted) else ""
        text = f"evicted by Kueue ({evicted.get('reason', 'Evicted')}): {evicted.get('message', '')}".rstrip(": ")
        if detail and detail not in text:
            text += f"; {detail}"
        return Admission(False, reason, text + "; the Job is suspended until Kueue admits it again", evicted=True)
    if not (workload.get("spec") or {}).get("active", True):
        return Admission(False, R.KUEUE_INACTIVE, f"Kueue deactivated the Workload {workload_name(workload)!r}: "
                         "set its spec.active to true (or recreate the FineTuneJob) to queue it again")
    reserved = conds.get("QuotaReserved")
    if _true(reserved):
        return Admission(False, R.QUEUED, f"Kueue reserved quota in ClusterQueue {cluster_queue(workload)!r}; "
                         "waiting for its admission checks")
    if reserved and reserved.get("message"):
        return Admission(False, R.QUEUED, f"Kueue queue {queue!r}: {reserved['message']}")
    return Admission(False, R.QUEUED, f"waiting for Kueue queue {queue!r} to admit the Job")


def workload_name(workload: dict[str, Any]) -> str:
    return str((workload.get("metadata") or {}).get("name") or "")


def not_installed_message(queue: str) -> str:
    """What to do when a FineTuneJob asks for a Kueue queue and the cluster has no Kueue."""
    return (f"label kueue.x-k8s.io/queue-name={queue} asks Kueue to admit the trainer Job, but Kueue is not "
            "installed (the cluster serves no workloads.kueue.x-k8s.io API), so the suspended Job would wait "
            "forever: install Kueue, or remove the label and recreate the FineTuneJob")
