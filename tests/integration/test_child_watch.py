"""The operator's own Job/pod watch (child_watch.ChildWatch) against the real apiserver: list, watch,
relist after objects vanished, 410 Gone, label filtering and a prompt stop."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes import client

from kubetune.builders import MANAGED_BY
from kubetune.child_watch import ChildWatch, Gone

pytestmark = pytest.mark.integration


class Recorder:
    """observe/notify callbacks that record what the watch delivered."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.notified: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def observe(self, event_type: str, obj: dict) -> tuple[str, str]:
        meta = obj["metadata"]
        with self.lock:
            self.events.append((event_type, meta["name"]))
        return meta["namespace"], meta["name"]

    def notify(self, key: tuple[str, str]) -> None:
        with self.lock:
            self.notified.append(key)

    def wait_for(self, wanted: tuple[str, str], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if wanted in self.events:
                    return
            time.sleep(0.05)
        raise AssertionError(f"{wanted} not delivered; got {self.events}")


def pod(name: str, labeled: bool = True) -> dict:
    labels = dict(MANAGED_BY) if labeled else {"app": "other"}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
            # no node can take it: it stays Pending and is deleted at once
            "spec": {"nodeSelector": {"kubetune.io/test": "nowhere"},
                     "containers": [{"name": "c", "image": "busybox"}]}}


@pytest.fixture
def core(cluster):
    api = cluster.api_client()
    yield client.CoreV1Api(api)
    api.close()


def pods_watch(core, namespace, rec, **kwargs) -> ChildWatch:
    def list_pods(**kw):
        return core.list_namespaced_pod(namespace, **kw)
    return ChildWatch("pods", list_pods, rec.observe, rec.notify, **kwargs)


def test_lists_then_watches_labeled_objects_only(core, namespace):
    core.create_namespaced_pod(namespace, pod("before"))
    core.create_namespaced_pod(namespace, pod("unlabeled-before", labeled=False))
    rec = Recorder()
    watch = pods_watch(core, namespace, rec).start()
    try:
        assert watch.listed.wait(30)
        rec.wait_for(("ADDED", "before"))
        core.create_namespaced_pod(namespace, pod("after"))
        core.create_namespaced_pod(namespace, pod("unlabeled-after", labeled=False))
        rec.wait_for(("ADDED", "after"))
        core.patch_namespaced_pod("after", namespace, {"metadata": {"annotations": {"touched": "1"}}})
        rec.wait_for(("MODIFIED", "after"))
        core.delete_namespaced_pod("after", namespace, grace_period_seconds=0)
        rec.wait_for(("DELETED", "after"))
        names = {name for _, name in rec.events}
        assert "unlabeled-before" not in names and "unlabeled-after" not in names
        assert (namespace, "after") in rec.notified
    finally:
        started = time.monotonic()
        watch.stop()
        assert not watch.alive()
        assert time.monotonic() - started < 5, "stop() waited for the server to end the watch"


def test_relist_delivers_objects_that_vanished_as_deleted(core, namespace):
    for name in ("keep", "gone"):
        core.create_namespaced_pod(namespace, pod(name))
    rec = Recorder()
    watch = pods_watch(core, namespace, rec, page_size=1)  # two pages: the continue token is followed
    watch.list_once()
    assert sorted(rec.events) == [("ADDED", "gone"), ("ADDED", "keep")]
    core.delete_namespaced_pod("gone", namespace, grace_period_seconds=0)
    rec.events.clear()
    watch.list_once()
    assert sorted(rec.events) == [("ADDED", "keep"), ("DELETED", "gone")]
    assert watch.lists == 2


def test_a_compacted_resource_version_raises_gone(core, namespace):
    rec = Recorder()
    watch = pods_watch(core, namespace, rec)
    with pytest.raises(Gone):
        watch.watch_once("1")  # far older than the apiserver's watch cache holds
