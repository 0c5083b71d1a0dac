"""When a pass first sees a job that already has children, it reads its Job and pods from the apiserver,
unless the child watches have listed everything already (a restart or failover with N active jobs would
otherwise cost 2N reads)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
from kubernetes import client

from kubetune.api import parse_spec
from kubetune.builders import JOB_NAME_LABEL, MANAGED_BY
from kubetune.handlers import OperatorConfig, Reconciler
from kubetune.metrics import OperatorMetrics

pytestmark = pytest.mark.unit

NS, NAME = "team", "demo"
SPEC = parse_spec({"model": {"uri": "hf://Qwen/Qwen2.5-0.5B"}, "dataset": {"uri": "s3://data/train.jsonl"},
                   "method": "lora", "output": {"uri": "s3://out/run"}})
RUNNING = {"phase": "Running", "layout": {"gpuType": "NVIDIA-L4", "gpusPerPod": 1, "pods": 1}}


class RecordingChildren:
    def __init__(self) -> None:
        self.reads: list[str] = []

    def read_job(self, ns: str, name: str) -> dict:
        self.reads.append(f"job {ns}/{name}")
        return {"metadata": {"name": f"{name}-trainer", "namespace": ns, "uid": "u", "resourceVersion": "5",
                             "labels": {**MANAGED_BY, JOB_NAME_LABEL: name}}, "status": {}}

    def list_pods(self, ns: str, name: str) -> list:
        self.reads.append(f"pods {ns}/{name}")
        return []


def reconciler(watches: list | None = None) -> tuple[Reconciler, RecordingChildren]:
    rec = Reconciler(client.ApiClient(), OperatorConfig(), OperatorMetrics())
    rec.children = RecordingChildren()
    rec._watches = watches or []  # noqa: SLF001 - what start_child_watches sets
    return rec, rec.children


def watch(listed: bool) -> SimpleNamespace:
    event = threading.Event()
    if listed:
        event.set()
    return SimpleNamespace(listed=event)


def test_without_watches_the_first_sight_reads_once():
    rec, children = reconciler()
    observed = rec._observe_children(NS, NAME, RUNNING, SPEC)
    assert children.reads == [f"job {NS}/{NAME}", f"pods {NS}/{NAME}"]
    assert observed.job is not None
    rec._observe_children(NS, NAME, RUNNING, SPEC)
    assert len(children.reads) == 2  # synced: the cache serves from now on


def test_watches_still_listing_do_not_stop_the_read():
    rec, children = reconciler([watch(True), watch(False)])
    assert not rec.children_listed()
    rec._observe_children(NS, NAME, RUNNING, SPEC)
    assert len(children.reads) == 2


def test_listed_watches_make_the_cache_authoritative():
    rec, children = reconciler([watch(True), watch(True)])
    assert rec.children_listed()
    rec.cache.observe_job("ADDED", RecordingChildren().read_job(NS, NAME))
    observed = rec._observe_children(NS, NAME, RUNNING, SPEC)
    assert children.reads == []
    assert observed.job is not None and observed.job["metadata"]["resourceVersion"] == "5"
