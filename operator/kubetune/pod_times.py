"""When the trainer containers really ran, from the pods' own status (the kubelet's timestamps), for
status.accounting. The operator's passes see a start or an end late: after the watch event, the Job controller's
verdict and the work queue, seconds on a quiet cluster and minutes in a burst of thousands of jobs, and a short
run can start and finish between two passes. Pure functions of the (slim) pod objects."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubetune.timestamps import parse_time


def _time(value: Any) -> dt.datetime | None:
    """A time from pod status; None when absent or malformed (a pod's status is not the operator's to trust)."""
    try:
        return parse_time(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _states(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [cs.get("state") or {} for cs in (pod.get("status") or {}).get("containerStatuses") or []]


def containers_started_at(pods: list[dict[str, Any]]) -> dt.datetime | None:
    """The earliest start of a container that is running or has run, among these pods; None when none says."""
    starts = [_time((state.get("running") or state.get("terminated") or {}).get("startedAt"))
              for pod in pods for state in _states(pod)]
    known = [t for t in starts if t is not None]
    return min(known) if known else None


def containers_finished_at(pods: list[dict[str, Any]]) -> dt.datetime | None:
    """The last container exit among these pods, once every container of every pod has exited with a time;
    None while one still runs or an exit time is missing."""
    ends: list[dt.datetime] = []
    for pod in pods:
        states = _states(pod)
        if not states:
            return None
        for state in states:
            end = _time((state.get("terminated") or {}).get("finishedAt"))
            if end is None:
                return None
            ends.append(end)
    return max(ends) if ends else None


def _phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "")


def containers_running(pods: list[dict[str, Any]]) -> bool:
    """Whether a container of these pods still runs (by its state; a pod that reports none, by its phase). A pod
    being deleted holds its GPUs until its containers have exited."""
    for pod in pods:
        states = _states(pod)
        if any("running" in state for state in states) or (not states and _phase(pod) == "Running"):
            return True
    return False


def ran(pod: dict[str, Any]) -> bool:
    """Whether a container of the pod has started (it runs or has run)."""
    return any((state.get("running") or state.get("terminated") or {}).get("startedAt") for state in _states(pod))


def last_container_exit(pods: list[dict[str, Any]]) -> dt.datetime | None:
    """The latest container exit these pods record; None when none records one."""
    ends = [_time((state.get("terminated") or {}).get("finishedAt")) for pod in pods for state in _states(pod)]
    known = [t for t in ends if t is not None]
    return max(known) if known else None
