"""The termination summary (docs/contracts.md §5): versioned JSON, always < 4 KiB."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from kubetune_trainer import SUMMARY_VERSION

MAX_SUMMARY_BYTES = 4096
REASONS = ("Completed", "InvalidPlan", "DataError", "NonFiniteLoss", "OutOfMemory", "TrainingError")


def _num(value: Any) -> float | int | None:
    """JSON-safe number (NaN/inf → None)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def build_summary(*, status: str, reason: str, message: str = "", step: int = 0, total_steps: int = 0,
                  epoch: float = 0.0, train_loss: float | None = None, eval_loss: float | None = None,
                  perplexity: float | None = None, tokens: int = 0, runtime_seconds: float = 0.0,
                  tokens_per_second: float = 0.0, artifacts: dict[str, str] | None = None,
                  checkpoint: dict[str, Any] | None = None) -> dict[str, Any]:
    """A summary dict in the §5 shape (numbers rounded, non-finite values as null)."""
    if status not in ("Succeeded", "Failed"):
        raise ValueError(f"status must be Succeeded or Failed, got {status!r}")
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    arts = {"adapter": "", "merged": "", "model": "", "metrics": ""}
    arts.update({k: v for k, v in (artifacts or {}).items() if k in arts and v})
    ckpt = {"step": 0, "uri": ""}
    ckpt.update({k: v for k, v in (checkpoint or {}).items() if k in ckpt})

    def r(x, nd=6):
        x = _num(x)
        return round(x, nd) if isinstance(x, float) else x

    return {
        "version": SUMMARY_VERSION, "status": status, "reason": reason, "message": message,
        "step": int(step), "totalSteps": int(total_steps), "epoch": r(epoch, 4) or 0.0,
        "trainLoss": r(train_loss), "evalLoss": r(eval_loss), "perplexity": r(perplexity, 4),
        "tokens": int(tokens), "runtimeSeconds": r(runtime_seconds, 2) or 0.0,
        "tokensPerSecond": r(tokens_per_second, 2) or 0.0,
        "artifacts": arts, "checkpoint": {"step": int(ckpt["step"]), "uri": str(ckpt["uri"])},
    }


def encode_summary(summary: dict[str, Any], limit: int = MAX_SUMMARY_BYTES) -> bytes:
    """Compact JSON under `limit` bytes; the message (then URIs) is truncated to fit."""
    summary = json.loads(json.dumps(summary))
    data = json.dumps(summary, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) < limit:
        return data
    message = summary.get("message", "")
    over = len(data) - limit + 1
    keep = max(0, len(message.encode()) - over - 16)
    summary["message"] = message.encode()[:keep].decode(errors="ignore") + " …[truncated]"
    data = json.dumps(summary, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) < limit:
        return data
    for key in ("adapter", "merged", "model", "metrics"):
        summary["artifacts"][key] = summary["artifacts"][key][:256]
    summary["checkpoint"]["uri"] = summary["checkpoint"]["uri"][:256]
    summary["message"] = summary["message"][:512]
    return json.dumps(summary, separators=(",", ":"), ensure_ascii=False).encode()[:limit - 1]


def termination_log_path() -> Path:
    """KUBETUNE_TERMINATION_LOG (default /dev/termination-log)."""
    return Path(os.environ.get("KUBETUNE_TERMINATION_LOG") or "/dev/termination-log")


def write_summary(summary: dict[str, Any], path: str | Path | None = None) -> Path | None:
    """Write the summary to the termination log; never raises (returns None when it could not write)."""
    target = Path(path) if path is not None else termination_log_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_summary(summary))
        return target
    except OSError:
        return None


def failure_summary(exc: BaseException, **progress: Any) -> dict[str, Any]:
    """A Failed summary for an exception: the reason from `exc.reason`, OOM detected by type/message."""
    reason = getattr(exc, "reason", None)
    text = str(exc) or type(exc).__name__
    if reason not in REASONS:
        reason = "TrainingError"
        name = type(exc).__name__
        if name == "OutOfMemoryError" or isinstance(exc, MemoryError) or "out of memory" in text.lower():
            reason = "OutOfMemory"
        text = f"{name}: {text}"
    return build_summary(status="Failed", reason=reason, message=text, **progress)
