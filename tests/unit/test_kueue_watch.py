"""How the operator finds out whether the cluster runs Kueue (kubetune.kueue_watch), without a cluster."""

from __future__ import annotations

import threading

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.kueue_watch import KueueWatch

pytestmark = pytest.mark.unit


class FakeObjects:
    """Answers the Workload LIST with the given statuses in turn (200 = the API is served)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls = 0

    def _answer(self, *args, **kwargs):
        self.calls += 1
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status != 200:
            raise ApiException(status=status, reason="x")
        return {"items": [], "metadata": {"resourceVersion": "1"}}

    list_cluster_custom_object = _answer
    list_namespaced_custom_object = _answer


def watch_with(objects: FakeObjects, changed: threading.Event, namespaces=None) -> KueueWatch:
    w = KueueWatch(client.ApiClient(), namespaces or [], lambda t, o: None, lambda k: None, changed.set,
                   check_seconds=0.05)
    w.objects = objects  # type: ignore[assignment]
    w._watches = lambda: []  # type: ignore[method-assign] - no watch threads in a unit test
    return w


def test_no_kueue_is_known_at_start_and_kueue_appearing_later_is_noticed() -> None:
    changed = threading.Event()
    w = watch_with(FakeObjects(404, 404, 404, 200), changed)
    w.start()
    assert w.installed is False  # known before the first pass
    assert changed.wait(5) and w.installed is True
    w.stop()


def test_kueue_present_at_start_watches_at_once_and_forbidden_is_unknown() -> None:
    changed = threading.Event()
    w = watch_with(FakeObjects(200), changed, ["team-a"])
    w.start()
    assert w.installed is True and not w._thread.is_alive()
    w.stop()
    forbidden = watch_with(FakeObjects(403), threading.Event())
    assert forbidden.check() is None and forbidden.installed is None
