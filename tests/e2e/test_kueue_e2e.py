"""End to end with a real Kueue and a real trainer: a low-priority FineTuneJob that trains on a process node is
preempted by a high-priority one; the trainer checkpoints on SIGTERM, the FineTuneJob shows the preemption, and
when Kueue admits it again it resumes from that checkpoint and finishes."""

from __future__ import annotations

import json
import uuid

import pytest
from kubernetes import client

from tests.e2e.test_e2e import ftj, operator, tiny_model, wait_terminal, ws  # noqa: F401 - module fixtures
from tests.support.cluster_helpers import wait_for
from tests.support.kueue_fixtures import kueue  # noqa: F401 - module-scoped Kueue

# Kueue first: the operator then finds Kueue's Workload API at its start. The setup may build Kueue (about 16
# minutes on a cold cache with 2 cores): room for that beyond the suite's 900 s per test.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.usefixtures("kueue"), pytest.mark.timeout(2400)]

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"


@pytest.fixture
def cpu_queue(k8s, namespace):
    """A ResourceFlavor for the process nodes, a ClusterQueue with room for one CPU trainer (2 CPUs, 4 GiB) and
    preemption by priority, a LocalQueue `team`, and WorkloadPriorityClasses low and high."""
    objects = client.CustomObjectsApi(k8s)
    suffix = uuid.uuid4().hex[:5]
    names = {"flavor": f"process-{suffix}", "cq": f"cq-{suffix}", "low": f"low-{suffix}", "high": f"high-{suffix}"}
    objects.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": names["flavor"]},
        "spec": {"nodeLabels": {"kubetune.io/process-node": "true"}}})
    for key, value in (("low", 10), ("high", 1000)):
        objects.create_cluster_custom_object(GROUP, VERSION, "workloadpriorityclasses", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "WorkloadPriorityClass", "metadata": {"name": names[key]},
            "value": value})
    objects.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "ClusterQueue", "metadata": {"name": names["cq"]},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                 "preemption": {"withinClusterQueue": "LowerPriority"},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [
                     {"name": names["flavor"], "resources": [{"name": "cpu", "nominalQuota": "2"},
                                                             {"name": "memory", "nominalQuota": "4Gi"}]}]}]}})
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LocalQueue", "metadata": {"name": "team"},
        "spec": {"clusterQueue": names["cq"]}})
    yield names
    objects.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", names["cq"])


def test_preempted_by_kueue_checkpoints_and_resumes_there(cluster, ftj, ws, cpu_queue):  # noqa: F811
    ns = ws.namespace
    low = ws.manifest("low", maxSteps=40, checkpointEverySteps=2)
    low["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team", "kueue.x-k8s.io/priority-class": cpu_queue["low"]}
    ws.apply(cluster, low)
    wait_for(lambda: (ftj.status(ns, "low").get("checkpoint") or {}).get("step", 0) >= 2, 420,
             lambda: f"low's first checkpoint; last status {json.dumps(ftj.status(ns, 'low'))[:1500]}")
    high = ws.manifest("high", maxSteps=2)
    high["spec"]["preflight"] = {"enabled": False}  # its trainer Job at once, while low is still training
    high["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team",
                                  "kueue.x-k8s.io/priority-class": cpu_queue["high"]}
    ws.apply(cluster, high)
    st = wait_for(lambda: (s := ftj.status(ns, "low")).get("reason") == "PreemptedByKueue" and s, 120,
                  lambda: f"low preempted; last status {json.dumps(ftj.status(ns, 'low'))[:1500]}")
    assert st["phase"] == "Queued", st
    # Its GPU time runs while the trainer writes its checkpoint on SIGTERM, and ends once the pod has stopped.
    wait_for(lambda: "runningSince" not in ftj.status(ns, "low")["accounting"], 120,
             lambda: f"low's running time ended; last status {json.dumps(ftj.status(ns, 'low'))[:1500]}")
    done_high = wait_terminal(ftj, ns, "high")
    assert done_high["phase"] == "Succeeded", json.dumps(done_high)[:2000]
    done = wait_terminal(ftj, ns, "low")
    assert done["phase"] == "Succeeded", json.dumps(done)[:3000]
    assert done["progress"]["step"] == 40 and 2 <= done.get("resumedFromStep", 0) < 40, json.dumps(done)[:3000]
    assert any(r == "PreemptedByKueue" for r, _ in ftj.events(ns, "low"))
    print(f"kueue e2e: low resumed from step {done['resumedFromStep']}; gpuHours {done['accounting']}")
