"""ChildWatch's loop: a failing WATCH is counted and retried from the listed resourceVersion, and a 410
during the watch makes it list again (the requests themselves are tested against the real apiserver in
tests/integration/test_child_watch.py)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest

from kubetune.child_watch import ChildWatch, Gone

pytestmark = pytest.mark.unit

LIST = b'{"metadata": {"resourceVersion": "7"}, "items": []}'


class Server:
    """A list_call whose WATCH requests fail as scripted."""

    def __init__(self, watch_outcomes: list[Exception]) -> None:
        self.outcomes = list(watch_outcomes)
        self.calls: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()

    def __call__(self, **kwargs):  # noqa: ANN204 - the kubernetes client's list_* signature
        with self.lock:
            if not kwargs.get("watch"):
                self.calls.append(("list", None))
                return SimpleNamespace(data=LIST)
            self.calls.append(("watch", kwargs["resource_version"]))
            outcome = self.outcomes.pop(0) if self.outcomes else ConnectionError("still down")
        raise outcome


def run_until(watch: ChildWatch, server: Server, done, timeout: float = 10) -> None:
    watch.start()
    deadline = time.monotonic() + timeout
    try:
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.stop()
    assert done(), server.calls


def test_failed_watches_are_counted_and_retried_from_the_listed_version():
    server = Server([ConnectionError("refused"), TimeoutError("read timed out")])
    failures: list[str] = []
    watch = ChildWatch("pods in team", server, lambda t, o: None, lambda k: None, kind="pods",
                       retry_delays=(0.01,), on_failure=failures.append)
    run_until(watch, server, lambda: len(failures) >= 3)
    assert failures[:3] == ["pods", "pods", "pods"]
    assert server.calls[0] == ("list", None)
    assert all(call == ("watch", "7") for call in server.calls[1:4])
    assert watch.lists == 1  # a plain failure does not relist


def test_gone_during_a_watch_lists_again_without_counting_a_failure():
    server = Server([Gone("too old resource version")])
    watch = ChildWatch("jobs in team", server, lambda t, o: None, lambda k: None, kind="jobs",
                       retry_delays=(0.01,), on_failure=lambda kind: server.calls.append(("failure", kind)))
    run_until(watch, server, lambda: watch.lists >= 2)
    # in order: no failure counted between the 410 and the relist
    assert server.calls[:3] == [("list", None), ("watch", "7"), ("list", None)]
