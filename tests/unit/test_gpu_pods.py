"""The occupancy index: a cluster-wide pod watch keeps only what sizing on free GPUs reads of each unfinished GPU
pod, reads the same as the full pods, and stops (sizing on allocatable GPUs) when pods may not be listed."""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest

from kubetune.gpu_pods import UNFINISHED, GpuPods
from kubetune.sizing.fleet import (GpuHolding, fleet_from_nodes, gpu_holding, parse_gpu_shorthand,
                                   with_occupancy)

from tests.support.fake_list_watch import FakeListWatch

pytestmark = pytest.mark.unit

L4, A100 = "NVIDIA-L4", "A100-80GB"


def nodes():
    return parse_gpu_shorthand(f"{L4}:4x2") + parse_gpu_shorthand(f"{A100}:8x1")


def full_pod(name, gpus=0, node="", product="", phase="Running", init=0, ns="team"):
    """A pod as the apiserver returns it, with the fields a real trainer pod carries."""
    containers = [{"name": "trainer", "image": "ghcr.io/example/trainer:1.0", "command": ["python", "-m", "x"],
                   "env": [{"name": f"VAR_{i}", "value": "v" * 40} for i in range(30)],
                   "resources": {"limits": {"nvidia.com/gpu": str(gpus), "memory": "64Gi"}} if gpus else {},
                   "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]
    spec = {"containers": containers, "restartPolicy": "Never", "schedulerName": "default-scheduler",
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
    if init:
        spec["initContainers"] = [{"name": "fetch", "resources": {"requests": {"nvidia.com/gpu": str(init)}}}]
    if node:
        spec["nodeName"] = node
    if product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": product, "pool": "gpu"}
    return {"metadata": {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": {"app": "x"},
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}] * 3},
            "spec": spec, "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}] * 4}}


def l4_nodes():
    return [n["metadata"]["name"] for n in nodes() if n["metadata"]["labels"]["nvidia.com/gpu.product"] == L4]


def test_only_unfinished_gpu_pods_hold_gpus():
    a, _ = l4_nodes()
    assert gpu_holding(full_pod("cpu-only")) is None
    assert gpu_holding(full_pod("done", gpus=2, node=a, phase="Succeeded")) is None
    assert gpu_holding(full_pod("bound", gpus=3, node=a)) == GpuHolding(a, "", 3)
    assert gpu_holding(full_pod("queued", gpus=1, init=2, product=L4)) == GpuHolding("", L4, 2)


def test_the_holdings_give_the_same_occupancy_as_the_full_pods():
    a, b = l4_nodes()
    pods = [full_pod("p1", gpus=3, node=a), full_pod("p2", gpus=4, node=b, phase="Succeeded"),
            full_pod("p3", gpus=2, product=L4), full_pod("p4", gpus=1, node="elsewhere"),
            full_pod("p5", gpus=8, product=A100), full_pod("p6"), full_pod("p7", gpus=1, init=4, node=b)]
    full = with_occupancy(fleet_from_nodes(nodes()), pods)
    index = GpuPods()
    for p in pods:
        index.observe("ADDED", p)
    slim = with_occupancy(fleet_from_nodes(nodes()), index.kept().values())
    assert [(p.product, p.node_used, p.pending) for p in slim.pools] == \
        [(p.product, p.node_used, p.pending) for p in full.pools]
    assert slim.pool(L4).node_used == {a: 3, b: 4} and slim.pool(A100).pending == 8


def test_events_update_the_index_and_a_finished_or_deleted_pod_frees_its_gpus():
    a, _ = l4_nodes()
    index = GpuPods()
    index.observe("ADDED", full_pod("p", gpus=2, product=L4))
    index.observe("MODIFIED", full_pod("p", gpus=2, node=a))  # bound
    assert list(index.kept().values()) == [GpuHolding(a, "", 2)]
    index.observe("MODIFIED", full_pod("p", gpus=2, node=a, phase="Failed"))
    assert index.kept() == {}
    index.observe("ADDED", full_pod("q", gpus=1, node=a))
    index.observe("DELETED", {"metadata": {"namespace": "team", "name": "q"}})
    assert index.kept() == {}


def test_the_watch_lists_unfinished_pods_and_the_sizer_reads_them():
    a, _ = l4_nodes()
    server = FakeListWatch([full_pod("p", gpus=3, node=a), full_pod("c")])
    index = GpuPods()
    assert index.pods() is None  # no watch: occupancy unknown
    watch = index.watch(server, lambda kind: None).start()
    try:
        pods = index.pods()
    finally:
        watch.stop()
    assert pods == [GpuHolding(a, "", 3)]
    assert server.calls[0]["field_selector"] == UNFINISHED and server.calls[0]["label_selector"] == ""


def test_without_rbac_to_list_pods_the_watch_stops_and_sizing_uses_allocatable_gpus(caplog):
    server = FakeListWatch([], status=403)
    failures: list[str] = []
    index = GpuPods(first_list_wait=5)
    watch = index.watch(server, failures.append).start()
    started = time.monotonic()
    assert index.pods() is None
    watch._thread.join(5)
    assert not watch.alive() and len(server.calls) == 1 and failures == []
    assert time.monotonic() - started < 5
    assert "cannot list pods in all namespaces" in caplog.text


def test_the_index_of_two_thousand_pods_is_a_small_fraction_of_their_decoded_list():
    """What the sizer's snapshot holds at once: the decoded full list it used to take vs the index's pods."""
    pods = [full_pod(f"p{i}", gpus=(i % 3), node=f"n{i % 100}") for i in range(2000)]
    body = json.dumps({"items": pods}).encode()
    tracemalloc.start()
    try:
        listed = json.loads(body)["items"]
        full_bytes = tracemalloc.get_traced_memory()[0]
        del listed
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        index = GpuPods()
        for p in pods:
            index.observe("ADDED", p)
        kept = list(index.kept().values())
        slim_bytes = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(kept) == sum(1 for i in range(2000) if i % 3)
    print(f"decoded list {full_bytes / 2**20:.1f} MiB, index {slim_bytes / 2**20:.2f} MiB")
    assert slim_bytes * 50 < full_bytes, (slim_bytes, full_bytes)


def test_a_relist_forgets_the_gpu_pods_that_went_away_while_the_watch_was_down():
    a, b = l4_nodes()
    server = FakeListWatch([full_pod("p", gpus=3, node=a), full_pod("q", gpus=1, node=b)])
    index = GpuPods()
    watch = index.watch(server)
    watch.list_once()
    assert len(index.kept()) == 2
    assert json.loads(watch._known[("team", "p")]) == {"metadata": {"namespace": "team", "name": "p"}}  # the key only
    server.items = [full_pod("q", gpus=1, node=b)]
    watch.list_once()  # after a 410 Gone: p finished or was deleted meanwhile
    assert list(index.kept()) == [("team", "q")]
