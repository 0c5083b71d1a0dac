"""The node index: a Node watch keeps only what sizing reads of each Node, gives the same fleet as the full
Nodes, follows changes, and falls back to listing the Nodes when it may not watch them."""

from __future__ import annotations

import json
import time

import pytest

from kubetune.node_index import WatchedNodes
from kubetune.sizing.fleet import fleet_from_nodes, slim_node

from tests.support.fake_list_watch import FakeListWatch

pytestmark = pytest.mark.unit

L4, H100 = "NVIDIA-L4", "NVIDIA-H100-80GB-HBM3"


def full_node(name, product=L4, gpus=4, ready="True", cordoned=False, memory="256Gi"):
    """A Node as the apiserver returns it, with the bulk a real one carries (images, managed fields)."""
    labels = {"kubernetes.io/hostname": name, "nvidia.com/gpu.product": product, "topology.kubernetes.io/zone": "z1"}
    node = {"metadata": {"name": name, "uid": f"uid-{name}", "labels": labels,
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0", "kwok.x-k8s.io/node": "fake"},
                         "managedFields": [{"manager": "kubelet", "fieldsV1": {"f:status": {"f:images": {}}}}] * 4},
            "spec": {"podCIDR": "10.0.0.0/24", "taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": str(gpus), "cpu": "64", "memory": memory, "pods": "110"},
                       "capacity": {"nvidia.com/gpu": str(gpus), "cpu": "64", "memory": memory},
                       "conditions": [{"type": t, "status": "False", "reason": "Fine", "message": "m" * 80}
                                      for t in ("MemoryPressure", "DiskPressure", "PIDPressure")]
                       + [{"type": "Ready", "status": ready, "reason": "KubeletReady", "message": "ready" * 10}],
                       "images": [{"names": [f"registry.example/image-{i}:v1"], "sizeBytes": 1 << 30}
                                  for i in range(30)],
                       "nodeInfo": {"kubeletVersion": "v1.33.0", "osImage": "Ubuntu"}}}
    if cordoned:
        node["spec"]["unschedulable"] = True
    return node


def fleet_view(fleet):
    return ([(p.product, p.memory_mib, p.node_gpus, p.node_memory) for p in fleet.pools], fleet.cpu_nodes,
            sorted(fleet.skipped))


def test_slim_nodes_give_the_same_fleet_and_are_a_small_fraction_of_the_full_ones():
    nodes = [full_node("a"), full_node("b", H100, 8), full_node("c", ready="False"), full_node("d", cordoned=True),
             full_node("e", gpus=0), full_node("f", product="")]
    slim = [slim_node(n) for n in nodes]
    assert fleet_view(fleet_from_nodes(slim)) == fleet_view(fleet_from_nodes(nodes))
    assert len(fleet_from_nodes(slim).skipped) == 3
    assert len(json.dumps(slim)) * 10 < len(json.dumps(nodes))


def test_the_watch_feeds_refreshes_without_listing_and_follows_changes():
    listed: list[int] = []
    index = WatchedNodes(lambda: listed.append(1) or [])
    server = FakeListWatch([full_node("a"), full_node("b", H100, 8)], events=[
        {"type": "MODIFIED", "object": full_node("a", ready="False")},
        {"type": "DELETED", "object": {"metadata": {"name": "b"}}},
        {"type": "ADDED", "object": full_node("c", H100, 8)}])
    watch = index.watch(server).start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sorted(n["metadata"]["name"] for n in index.nodes()) != ["a", "c"]:
            time.sleep(0.02)
        nodes = index.nodes()
    finally:
        watch.stop()
    assert sorted(n["metadata"]["name"] for n in nodes) == ["a", "c"]
    fleet = fleet_from_nodes(nodes)
    assert [p.product for p in fleet.pools] == [H100] and fleet.skipped == ["a: unschedulable or not ready"]
    assert listed == [] and index.fallbacks == 0
    assert server.calls[0]["label_selector"] == "" and server.calls[0]["limit"] == 100


def test_without_rbac_to_watch_nodes_refreshes_list_them_and_slim_them(caplog):
    index = WatchedNodes(lambda: [full_node("a")], first_list_wait=5)
    watch = index.watch(FakeListWatch([], status=403)).start()
    started = time.monotonic()
    nodes = index.nodes()
    watch._thread.join(5)
    assert not watch.alive() and time.monotonic() - started < 5
    assert nodes == [slim_node(full_node("a"))] and index.fallbacks == 1
    assert "cannot watch nodes" in caplog.text
    assert WatchedNodes(lambda: [full_node("b")]).nodes()[0]["metadata"]["name"] == "b"  # no watch started
