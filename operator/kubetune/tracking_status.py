"""Experiment tracking in the status: the trainer's `tracking` summary block -> status.tracking and the Tracked
condition (docs/contracts.md §5). Pure."""

from __future__ import annotations

from typing import Any

from kubetune import reasons as R

WANDB_KEYS = ("runId", "url", "runDir")


def tracking_status(block: Any) -> dict[str, Any]:
    """status.tracking from the summary's block ({} when the trainer reported none): the MLflow run's runId/url and,
    under `wandb`, the W&B run's runId, url (online) and runDir (offline run files)."""
    if not isinstance(block, dict):
        return {}
    out: dict[str, Any] = {key: str(block[key]) for key in ("runId", "url") if block.get(key)}
    wandb = block.get("wandb")
    if isinstance(wandb, dict) and wandb.get("runId"):
        out["wandb"] = {key: str(wandb[key]) for key in WANDB_KEYS if wandb.get(key)}
    return out


def tracking_verdict(block: Any, message: str = "", mlflow: bool = True, wandb: bool = False) -> tuple[bool, str, str]:
    """(Tracked, reason, message) for a job with spec.tracking (`mlflow` / `wandb`: which trackers it names): True
    when every named tracker has its run, with where each run is; otherwise why not (the trainer's warnings are in
    the summary message)."""
    status = tracking_status(block)
    runs, missing = [], []
    if mlflow:
        if status.get("runId"):
            runs.append(f"MLflow run {status['runId']}: {status.get('url', '')}")
        else:
            missing.append("MLflow")
    if wandb:
        w = status.get("wandb") or {}
        if w.get("runId"):
            where = w.get("url") or (f"offline run files at {w['runDir']} (upload them with `wandb sync`)"
                                     if w.get("runDir") else "")
            runs.append(f"W&B run {w['runId']}: {where}")
        else:
            missing.append("W&B")
    if not missing:
        return True, R.TRACKING_LOGGED, "; ".join(runs)[:4096]
    warnings = [part.strip() for part in message.split("; ")
                if "tracking" in part.lower() and not part.strip().startswith("training continues")]
    why = "; ".join(warnings) or (f"the trainer reported no {' or '.join(missing)} run "
                                  "(is the trainer image older than spec.tracking?)")
    return False, R.TRACKING_UNAVAILABLE, "; ".join(
        [why, "training was not affected: metrics are in the status, final/metrics.json and Prometheus", *runs])[:4096]
