"""Experiment tracking in the status: the trainer's `tracking` summary block -> status.tracking and the Tracked
condition (docs/contracts.md §5). Pure."""

from __future__ import annotations

from typing import Any

from kubetune import reasons as R


def tracking_status(block: Any) -> dict[str, str]:
    """status.tracking from the summary's block ({} when the trainer reported none)."""
    if not isinstance(block, dict):
        return {}
    return {key: str(block[key]) for key in ("runId", "url") if block.get(key)}


def tracking_verdict(block: Any, message: str = "") -> tuple[bool, str, str]:
    """(Tracked, reason, message) for a job with spec.tracking: the run's URL, or why there is none (the trainer's
    warning is in the summary message)."""
    status = tracking_status(block)
    if status.get("runId"):
        return True, R.TRACKING_LOGGED, f"MLflow run {status['runId']}: {status.get('url', '')}"
    warning = next((part.strip() for part in message.split("; ") if "tracking" in part.lower()), "")
    return False, R.TRACKING_UNAVAILABLE, (
        (warning or "the trainer reported no tracking run (is the trainer image older than spec.tracking?)")
        + "; training was not affected: metrics are in the status, final/metrics.json and Prometheus")[:4096]
