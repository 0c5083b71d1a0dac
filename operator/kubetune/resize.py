"""When to size a job again because its trainer pods cannot be scheduled (pure functions).

The sizer chooses a GPU type from the nodes it sees and the GPUs free on them, but the scheduler has the last
word: a taint, an affinity, a quota or GPUs taken in the meantime can leave the pods Pending. When every pod of
the trainer Job has been unschedulable for `after_seconds`, none has ever been bound, and the layout was the
sizer's choice (not pinned by spec.resources), the operator sizes the job again treating that GPU type as full.
It moves the job only to a layout whose GPUs are free now; the pods never ran, so nothing is lost.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from kubetune.api import FineTuneJobSpec
from kubetune.builders import LAYOUT_ANNOTATION
from kubetune.sizing.layout import SizingOutcome
from kubetune.timestamps import parse_time


def unschedulable_seconds(pods: list[dict[str, Any]], now: dt.datetime) -> float:
    """How long every pod has been waiting for a node the scheduler could not find: 0 unless there is at least
    one pod, none is bound to a node or finished, and each carries PodScheduled=False/Unschedulable."""
    if not pods:
        return 0.0
    waited: list[float] = []
    for pod in pods:
        if (pod.get("spec") or {}).get("nodeName") or (pod.get("status") or {}).get("phase") not in (None, "Pending"):
            return 0.0
        cond = next((c for c in (pod.get("status") or {}).get("conditions") or []
                     if c.get("type") == "PodScheduled"), None)
        since = parse_time((cond or {}).get("lastTransitionTime"))
        if not cond or cond.get("status") != "False" or cond.get("reason") != "Unschedulable" or since is None:
            return 0.0
        waited.append((now - since).total_seconds())
    return max(0.0, min(waited))


def resize_due(spec: FineTuneJobSpec, status: dict[str, Any], pods: list[dict[str, Any]], now: dt.datetime,
               after_seconds: float) -> str:
    """The GPU type to avoid when the job should be sized again, else ''."""
    layout = status.get("layout") or {}
    if after_seconds <= 0 or spec.suspend or spec.cancel or spec.resources.gpu_type:
        return ""
    if layout.get("source") != "sizer" or not layout.get("gpuType"):
        return ""
    return str(layout["gpuType"]) if unschedulable_seconds(pods, now) >= after_seconds else ""


def moves(status: dict[str, Any], outcome: SizingOutcome) -> bool:
    """Whether a new sizing outcome is worth recreating the Job for: it fits, its GPUs are free now, and it
    runs on another GPU type."""
    layout = status.get("layout") or {}
    return bool(outcome.fits and outcome.layout is not None and outcome.free_now
                and outcome.layout.gpu_type and outcome.layout.gpu_type != layout.get("gpuType"))


def avoided_types(status: dict[str, Any]) -> frozenset[str]:
    """The GPU types this job's pods stayed unschedulable on (status.unschedulableGpuTypes)."""
    return frozenset(str(t) for t in status.get("unschedulableGpuTypes") or [])


# What makes two status.layout blocks the same layout (specHash aside: the Job's own annotation carries it).
LAYOUT_KEYS = ("source", "gpuType", "gpusPerPod", "pods", "strategy", "zeroStage")


def recorded_layout(job: dict[str, Any]) -> tuple[dict[str, Any], frozenset[str]] | None:
    """The layout a trainer Job was created with and the GPU types its sizing avoided, from its
    `kubetune.io/layout` annotation (builders.layout_annotation); None for a Job without a readable one."""
    text = ((job.get("metadata") or {}).get("annotations") or {}).get(LAYOUT_ANNOTATION)
    try:
        record = json.loads(text) if text else None
    except ValueError:
        return None
    if not isinstance(record, dict) or not record.get("pods"):
        return None
    avoid = frozenset(str(t) for t in record.pop("avoid", None) or [])
    return record, avoid


def adopt_recorded_layout(status: dict[str, Any], job: dict[str, Any], spec_hash: str) -> bool:
    """Make status.layout (and status.unschedulableGpuTypes) say what the Job runs, when they do not: the pass
    that created the Job acts before it writes the status, and a refused status write (409 after a move) leaves
    the previous layout there. Returns whether the status changed."""
    recorded = recorded_layout(job)
    if recorded is None:
        return False
    layout, avoid = recorded
    current = status.get("layout") or {}
    changed = False
    if any(current.get(k) != layout.get(k) for k in LAYOUT_KEYS):
        status["layout"] = {**layout, **({"specHash": spec_hash} if spec_hash else {})}
        changed = True
    if not avoid <= avoided_types(status):
        status["unschedulableGpuTypes"] = sorted(avoided_types(status) | avoid)
        changed = True
    return changed
