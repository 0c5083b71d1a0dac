"""The termination summary (docs/contracts.md §5): versioned JSON, always < 4 KiB."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path
from typing import Any

from kubetune_trainer import SUMMARY_VERSION
from kubetune_trainer.outcomes import REASONS

MAX_SUMMARY_BYTES = 4096
OPTIONAL_ARTIFACTS = ("evaluation", "report", "gguf", "modelfile")  # only runs with an evaluation / export


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
                  tokens_per_second: float = 0.0, steady_tokens_per_second: float = 0.0,
                  artifacts: dict[str, str] | None = None,
                  checkpoint: dict[str, Any] | None = None, evaluation: dict[str, Any] | None = None,
                  export: dict[str, Any] | None = None, tracking: dict[str, Any] | None = None) -> dict[str, Any]:
    """A summary dict in the §5 shape (numbers rounded, non-finite values as null). `evaluation` (the compact
    base-vs-tuned block) and `export` (GGUF outcome), with their artifacts, appear only when the run did them."""
    if status not in ("Succeeded", "Failed"):
        raise ValueError(f"status must be Succeeded or Failed, got {status!r}")
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    arts = {"adapter": "", "merged": "", "model": "", "metrics": ""}
    arts.update({k: v for k, v in (artifacts or {}).items() if (k in arts or k in OPTIONAL_ARTIFACTS) and v})
    ckpt = {"step": 0, "uri": ""}
    ckpt.update({k: v for k, v in (checkpoint or {}).items() if k in ckpt})

    def r(x, nd=6):
        x = _num(x)
        return round(x, nd) if isinstance(x, float) else x

    summary = {
        "version": SUMMARY_VERSION, "status": status, "reason": reason, "message": message,
        "step": int(step), "totalSteps": int(total_steps), "epoch": r(epoch, 4) or 0.0,
        "trainLoss": r(train_loss), "evalLoss": r(eval_loss), "perplexity": r(perplexity, 4),
        "tokens": int(tokens), "runtimeSeconds": r(runtime_seconds, 2) or 0.0,
        "tokensPerSecond": r(tokens_per_second, 2) or 0.0,
        "steadyTokensPerSecond": r(steady_tokens_per_second, 2) or 0.0,
        "artifacts": arts, "checkpoint": {"step": int(ckpt["step"]), "uri": str(ckpt["uri"])},
    }
    if evaluation is not None:
        summary["evaluation"] = evaluation
    if export is not None:
        summary["export"] = export
    wandb = (tracking or {}).get("wandb") or {}
    if tracking and (tracking.get("runId") or wandb.get("runId")):
        summary["tracking"] = {"runId": str(tracking.get("runId", ""))[:64], "url": str(tracking.get("url", ""))[:512]}
        if wandb.get("runId"):
            summary["tracking"]["wandb"] = {"runId": str(wandb["runId"])[:64], "url": str(wandb.get("url", ""))[:512],
                                            "runDir": str(wandb.get("runDir", ""))[:512]}
    return summary


def _clip(text: str, max_bytes: int, marker: str = "") -> str:
    """`text` cut to at most `max_bytes` UTF-8 bytes (on a character boundary), `marker` appended when cut."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    keep = max(0, max_bytes - len(marker.encode()))
    return raw[:keep].decode(errors="ignore") + marker


def encode_summary(summary: dict[str, Any], limit: int = MAX_SUMMARY_BYTES) -> bytes:
    """Compact, always valid JSON under `limit` bytes: over-long URIs are cut first, then the message."""
    summary = json.loads(json.dumps(summary))

    def dump() -> bytes:
        return json.dumps(summary, separators=(",", ":"), ensure_ascii=False).encode()

    def cut_uris(max_bytes: int) -> None:
        for key in summary.get("artifacts", {}):
            summary["artifacts"][key] = _clip(summary["artifacts"][key], max_bytes)
        if "checkpoint" in summary:
            summary["checkpoint"]["uri"] = _clip(summary["checkpoint"]["uri"], max_bytes)

    data = dump()
    if len(data) < limit:
        return data
    cut_uris(512)  # a URI this long is unusable anyway; the message says what went wrong
    data = dump()
    if len(data) < limit:
        return data
    message = summary.get("message", "")
    over = len(data) - limit + 1
    summary["message"] = _clip(message, max(0, len(message.encode()) - over), " …[truncated]")
    max_uri = 512
    data = dump()
    while len(data) >= limit and max_uri > 0:  # only when the other fields alone overflow
        max_uri //= 2
        cut_uris(max_uri)
        summary["message"] = _clip(summary["message"], max_uri, " …[truncated]")
        data = dump()
    return data


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
        elif (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "no space left on device" in text.lower():
            reason = "NoSpaceLeft"
        elif isinstance(exc, PermissionError):
            reason = "PermissionDenied"
        text = f"{name}: {text}"
    return build_summary(status="Failed", reason=reason, message=text, **progress)
