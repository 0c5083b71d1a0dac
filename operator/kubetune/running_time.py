"""The running time of a FineTuneJob's run, for status.accounting (runningSeconds, runningSince, gpuHours).
Pure functions of the status and the Job's (slim) pods.

A run's time is a sum of Running stretches. A stretch starts when the trainer containers started (the pass
that sees them comes later) and ends when they have exited (the pass that sees that comes later too): its
edges come from the kubelet's timestamps in pod status (`kubetune.pod_times`), the operator's passes only
where the pods record none. Between the two, `runningSince` holds the open stretch's start."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kubetune.pod_times import (containers_finished_at, containers_running, containers_started_at,
                                last_container_exit, ran)
from kubetune.timestamps import iso, parse_time


def close_running(st: dict[str, Any], now: dt.datetime, pods: list[dict[str, Any]] | None = None) -> None:
    """End the current Running stretch: add it to runningSeconds. With the Job's pods (the run succeeded or
    failed), the stretch ends at their last container exit rather than at this pass (while a container still runs,
    at this pass), and a run that started and ended between two passes (never seen Running) counts from its first
    container start."""
    acc = st.setdefault("accounting", {})
    since = parse_time(acc.pop("runningSince", None))
    end = now
    if pods:
        if since is None and not acc.get("runningSeconds"):
            since = containers_started_at(pods)
        exited = containers_finished_at(pods)
        if exited is not None and since is not None:
            end = min(max(exited, since), now)
    if since is not None:
        acc["runningSeconds"] = round(float(acc.get("runningSeconds") or 0.0)
                                      + max((end - since).total_seconds(), 0.0), 1)


def close_when_stopped(st: dict[str, Any], now: dt.datetime, pods: list[dict[str, Any]]) -> None:
    """End the Running stretch of a run that stopped (suspended, preempted by Kueue, or waiting for a retry) once
    its containers have exited: a pod being deleted holds its GPUs until then, a checkpoint saved on SIGTERM
    included. The stretch ends at the last exit its pods record, else (they are gone) at this pass; while a
    container still runs it stays open, and a later pass closes it."""
    if not containers_running(pods):
        close_running(st, now, [pod for pod in pods if ran(pod)])


def running_since(acc: dict[str, Any], running: list[dict[str, Any]], stopped: list[dict[str, Any]],
                   now: dt.datetime) -> str:
    """Where a Running stretch starts: when its containers started (the pass that sees it comes later). After a
    restart, not before the last exit of the pods that ran before (`stopped`: the previous stretch ended there),
    and at this pass when they record none (that stretch may have ended at the pass that saw them gone)."""
    started = containers_started_at(running)
    if started is not None and acc.get("runningSeconds"):
        previous_end = last_container_exit(stopped)
        started = max(started, previous_end) if previous_end is not None else None
    return iso(min(started, now)) if started is not None else iso(now)


def restarted_between_passes(acc: dict[str, Any], running: list[dict[str, Any]],
                             stopped: list[dict[str, Any]]) -> bool:
    """Whether the run stopped and started again since the pass that saw it Running (a busy operator's passes can
    come later than a failed pod's replacement starts): the pods before exited inside the open stretch, none of
    them runs any more, and every running pod's containers started after that exit."""
    since = parse_time(acc.get("runningSince"))
    exited = last_container_exit(stopped)
    started = containers_started_at(running)
    return (since is not None and exited is not None and started is not None and since < exited <= started
            and not containers_running(stopped))


def gpu_hours(st: dict[str, Any], now: dt.datetime) -> float:
    """GPUs x the running time so far (the completed stretches and the open one up to `now`), in hours."""
    acc = st.get("accounting") or {}
    seconds = float(acc.get("runningSeconds") or 0.0)
    since = parse_time(acc.get("runningSince"))
    if since is not None:
        seconds += max((now - since).total_seconds(), 0.0)
    gpus = int((st.get("layout") or {}).get("totalGpus") or 0)
    return round(gpus * seconds / 3600.0, 4)
