"""RFC 3339 timestamps as Kubernetes writes them (`2026-01-01T12:00:00Z`): one parser and one formatter for the
status the operator writes and the pod and Job status it reads."""

from __future__ import annotations

import datetime as dt


def iso(now: dt.datetime) -> str:
    """RFC 3339 UTC timestamp with seconds precision."""
    return now.astimezone(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(text: str | None) -> dt.datetime | None:
    """Parse an RFC 3339 timestamp, None when empty."""
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
