"""The running time of a FineTuneJob's run, for status.accounting (runningSeconds, runningSince, gpuHours).
Pure functions of the status and the Job's (slim) pods.

A run's time is a sum of Running stretches. A stretch starts when the trainer containers started (the pass
that sees them comes later) and ends when they have exited (the pass that sees that comes later too): its
edges come from the kubelet's timestamps in pod status (`kubetune.pod_times`), the operator's passes only
where the pods record none. Between the two, `runningSince` holds the open stretch's start.

GPU time is counted per stretch on the layout the stretch ran on: a run re-planned after running out of memory may
go on with more GPUs or another GPU type, and its earlier stretches keep their own GPUs and price. Each completed
stretch adds to `accounting.gpuTime` (per GPU type: wall seconds and GPU-hours); the open one counts on the
current layout (`status.layout`). A status written before `gpuTime` existed has all its completed time on its
current layout, as it was billed then."""

from __future__ import annotations

import datetime as dt
from typing import Any, Callable

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
        seconds = max((end - since).total_seconds(), 0.0)
        _add_gpu_time(acc, st.get("layout") or {}, seconds)
        acc["runningSeconds"] = round(float(acc.get("runningSeconds") or 0.0) + seconds, 1)


def _gpus_of(layout: dict[str, Any]) -> tuple[str, int]:
    return str(layout.get("gpuType") or ""), int(layout.get("totalGpus") or 0)


def _add_gpu_time(acc: dict[str, Any], layout: dict[str, Any], seconds: float) -> None:
    """Add a completed stretch of `seconds` on `layout` to accounting.gpuTime (CPU-only layouts add nothing)."""
    gpu_type, gpus = _gpus_of(layout)
    table = acc.get("gpuTime")
    if table is None:  # the first stretch, or a status from before gpuTime: its time so far was on this layout
        table = []
        before = float(acc.get("runningSeconds") or 0.0)
        if before > 0 and gpus > 0:
            table.append({"gpuType": gpu_type, "runningSeconds": round(before, 1),
                          "gpuHours": round(gpus * before / 3600.0, 6)})
    if gpus > 0 and seconds > 0:
        row = next((r for r in table if r.get("gpuType") == gpu_type), None)
        if row is None:
            row = {"gpuType": gpu_type, "runningSeconds": 0.0, "gpuHours": 0.0}
            table.append(row)
        row["runningSeconds"] = round(float(row["runningSeconds"]) + seconds, 1)
        row["gpuHours"] = round(float(row["gpuHours"]) + gpus * seconds / 3600.0, 6)
    if table:  # absent until a stretch ran on GPUs (a CPU-only run has none)
        acc["gpuTime"] = table


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


def completed_gpu_hours(st: dict[str, Any]) -> dict[str, float]:
    """GPU-hours of the completed stretches by GPU type."""
    acc = st.get("accounting") or {}
    table = acc.get("gpuTime")
    if table is None:  # a status from before gpuTime: its completed time on the current layout
        gpu_type, gpus = _gpus_of(st.get("layout") or {})
        seconds = float(acc.get("runningSeconds") or 0.0)
        return {gpu_type: gpus * seconds / 3600.0} if gpus > 0 and seconds > 0 else {}
    out: dict[str, float] = {}
    for row in table:
        gpu_type = str(row.get("gpuType") or "")
        out[gpu_type] = out.get(gpu_type, 0.0) + float(row.get("gpuHours") or 0.0)
    return out


def gpu_hours_by_type(st: dict[str, Any], now: dt.datetime) -> dict[str, float]:
    """GPU-hours so far by GPU type: the completed stretches, and the open one up to `now` on the current layout."""
    out = completed_gpu_hours(st)
    since = parse_time((st.get("accounting") or {}).get("runningSince"))
    gpu_type, gpus = _gpus_of(st.get("layout") or {})
    if since is not None and gpus > 0:
        out[gpu_type] = out.get(gpu_type, 0.0) + gpus * max((now - since).total_seconds(), 0.0) / 3600.0
    return out


def gpu_hours(st: dict[str, Any], now: dt.datetime) -> float:
    """GPUs x the running time so far (the completed stretches on their layouts, the open one up to `now`), in
    hours."""
    return round(sum(gpu_hours_by_type(st, now).values()), 4)


def reported_gpu_hours(st: dict[str, Any]) -> dict[str, float]:
    """accounting.gpuHours as the last pass wrote it, by GPU type (for the metrics, which have no clock of their
    own): the completed stretches' types, and the rest on the current layout's."""
    acc = st.get("accounting") or {}
    out = completed_gpu_hours(st)
    gpu_type, gpus = _gpus_of(st.get("layout") or {})
    open_hours = float(acc.get("gpuHours") or 0.0) - sum(out.values())
    if gpus > 0 and (open_hours > 0 or not out):
        out[gpu_type] = out.get(gpu_type, 0.0) + max(open_hours, 0.0)
    return {t: round(h, 4) for t, h in out.items()}


def gpu_cost(st: dict[str, Any], now: dt.datetime, price: Callable[[str], float | None]) -> float | None:
    """What the GPU time so far cost: each GPU type's hours x its price (`price(gpu_type)`, None when unknown);
    None when a GPU type the run used, or the current layout's, has no price."""
    by_type = gpu_hours_by_type(st, now)
    current = _gpus_of(st.get("layout") or {})[0]
    total = 0.0
    for gpu_type in {*by_type, current}:
        unit = price(gpu_type)
        if unit is None:
            return None
        total += by_type.get(gpu_type, 0.0) * unit
    return round(total, 4)
