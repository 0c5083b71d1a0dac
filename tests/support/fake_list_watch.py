"""A fake kubernetes-client list function for watch tests: one LIST page, then WATCH requests that stream the
queued events once and afterwards fail (the watch loop retries), or a 401/403 for every call."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

from kubernetes.client.rest import ApiException


class FakeListWatch:
    """Called like `CoreV1Api.list_node` / `list_pod_for_all_namespaces`; records every call's kwargs."""

    def __init__(self, items: list[dict[str, Any]], status: int = 0, events: list[dict[str, Any]] = ()) -> None:
        self.items, self.status, self.events = items, status, list(events)
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        if self.status:
            raise ApiException(status=self.status, reason="Forbidden")
        if not kwargs.get("watch"):
            return SimpleNamespace(data=json.dumps({"metadata": {"resourceVersion": "5"},
                                                    "items": self.items}).encode())
        if self.events:
            lines, self.events = [json.dumps(e).encode() for e in self.events], []
            return _Stream(lines)
        time.sleep(0.05)
        raise ConnectionError("closed")


class _Stream:
    """The urllib3 response of a WATCH request: the events as JSON lines."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        yield b"\n".join(self.lines) + b"\n"

    def release_conn(self) -> None:
        pass

    def shutdown(self) -> None:
        pass
