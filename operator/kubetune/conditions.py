"""Standard Kubernetes-style conditions (type/status/reason/message/lastTransitionTime)."""

from __future__ import annotations

from typing import Any

from kubetune.status import condition

READY = "Ready"
SIZED = "Sized"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
CANCELLED = "Cancelled"
EVALUATION_PASSED = "EvaluationPassed"  # only for jobs with spec.evaluation, once the trainer reported it
EXPORTED = "Exported"  # only for jobs with spec.output.export, once the trainer reported it
VALIDATED = "Validated"  # the CPU preflight checked the model and data (absent when the preflight is off)
ADVICE = "Advice"  # True when the preflight's numbers trip one of the advice rules (kubetune.advice); never blocks
TRACKED = "Tracked"  # only for jobs with spec.tracking, once the trainer reported it
LOSS_DIVERGED = "LossDiverged"  # True when the loss diverged and training.divergence.action is warn
ADMITTED = "Admitted"  # only for jobs labelled for a Kueue queue: whether Kueue admitted the trainer Job

CONDITION_TYPES = (READY, SIZED, ADMITTED, RUNNING, SUCCEEDED, FAILED, SUSPENDED, CANCELLED, EVALUATION_PASSED, EXPORTED,
                   TRACKED, LOSS_DIVERGED)


def make_condition(ctype: str, status: bool | str, reason: str, message: str = "",
                   *, now: str, generation: int | None = None) -> dict[str, Any]:
    """A condition dict built through the typed `kubetune.status.Condition`; `status` may be a bool or
    "True"/"False"/"Unknown"."""
    return condition(ctype, status, reason, message, now=now, generation=generation)


def find_condition(conditions: list[dict[str, Any]] | None, ctype: str) -> dict[str, Any] | None:
    """The condition of that type, or None."""
    for cond in conditions or []:
        if cond.get("type") == ctype:
            return cond
    return None


def merge_conditions(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge `new` into `old`, keeping lastTransitionTime when a condition's status did not change."""
    merged: dict[str, dict[str, Any]] = {c["type"]: dict(c) for c in old or [] if "type" in c}
    for cond in new:
        prev = merged.get(cond["type"])
        cond = dict(cond)
        if prev is not None and prev.get("status") == cond["status"]:
            cond["lastTransitionTime"] = prev.get("lastTransitionTime") or cond["lastTransitionTime"]
        merged[cond["type"]] = cond
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(merged.values(), key=lambda c: (order.get(c["type"], len(order)), c["type"]))


def is_true(conditions: list[dict[str, Any]] | None, ctype: str) -> bool:
    """Whether the condition exists with status True."""
    cond = find_condition(conditions, ctype)
    return bool(cond and cond.get("status") == "True")
