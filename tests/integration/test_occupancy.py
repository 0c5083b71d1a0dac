"""Sizing sees the cluster as it is (real apiserver, scheduler and KWOK GPU nodes): a GPU type whose GPUs are
all held by other pods gives way to a free one that fits, and a job whose pods stay unschedulable on the type
the sizer chose is sized again without it, says why, and runs elsewhere, with one Job at a time."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from kubernetes import client

from kubetune_dev.operator_process import OperatorProcess, install_crds
from tests.support.cluster_helpers import wait_for
from tests.support.finetunejobs import FtjClient, free_port, ftj_manifest, wait_for_free_gpus
from tests.support.operator_fixtures import progress  # noqa: F401 - module-scoped fake /progress

pytestmark = pytest.mark.integration

L4 = "NVIDIA-L4"
NODE_SNAPSHOT_SECONDS = 5  # OperatorConfig.node_cache_seconds
TAINT = {"key": "kubetune.test/reserved", "value": "other-team", "effect": "NoSchedule"}


@pytest.fixture(scope="module")
def operator(cluster, progress, tmp_path_factory):  # noqa: F811 - this module's own operator
    """The operator with occupancy on (the default) and re-sizing after 3 s of unschedulable pods."""
    install_crds(cluster.kubectl)
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    op = OperatorProcess(cluster.kubeconfig, [
        "--all-namespaces", "--liveness-port", "0", "--metrics-port", str(free_port()),
        "--resync-seconds", "1", "--progress-seconds", "1", "--sizing-retry-seconds", "2",
        "--resize-unschedulable-seconds", "3",
        "--lease-namespace", "default", "--lease-name", f"occ-{uuid.uuid4().hex[:6]}",
        "--lease-seconds", "5", "--progress-host", "127.0.0.1", "--progress-port", str(progress.port),
        "--no-preflight",  # KWOK pods run no preflight; tests/e2e covers it on process nodes
    ], log)
    with op.leading():
        yield op


@pytest.fixture
def ftj(k8s, operator):
    return FtjClient(k8s)


def l4_nodes(core: client.CoreV1Api) -> list[client.V1Node]:
    return core.list_node(label_selector=f"nvidia.com/gpu.product={L4}").items


def unpinned(name: str) -> dict:
    """Llama-3.1-8B LoRA with no GPU pins: on an idle fleet the sizer's cheapest choice is one L4."""
    manifest = ftj_manifest(name)
    manifest["spec"]["resources"] = {}
    return manifest


def wait_layout(ftj: FtjClient, ns: str, name: str, timeout: float = 30) -> dict:
    last: dict = {}

    def check():
        nonlocal last
        last = ftj.status(ns, name)
        return last if (last.get("layout") or {}).get("gpuType") else None
    return wait_for(check, timeout, lambda: f"{ns}/{name} layout; last status {json.dumps(last)[:1500]}")


def job_product(ftj: FtjClient, ns: str) -> str:
    jobs = ftj.jobs(ns)
    assert len(jobs) <= 1, [j.metadata.name for j in jobs]
    return (jobs[0].spec.template.spec.node_selector or {}).get("nvidia.com/gpu.product", "") if jobs else ""


def test_a_full_gpu_type_gives_way_to_a_free_one(ftj, namespace):
    """Input: every L4 GPU held by another team's running pods. Expected: the job is sized onto a larger GPU
    type that is free now, and the status message says why it did not get the cheaper L4."""
    ns = namespace
    for node in l4_nodes(ftj.core):
        gpus = node.status.allocatable["nvidia.com/gpu"]
        ftj.core.create_namespaced_pod(ns, client.V1Pod(
            metadata=client.V1ObjectMeta(name=f"other-{node.metadata.name}"),
            spec=client.V1PodSpec(node_name=node.metadata.name, containers=[client.V1Container(
                name="c", image="busybox", resources=client.V1ResourceRequirements(
                    requests={"nvidia.com/gpu": gpus}, limits={"nvidia.com/gpu": gpus}))])))
    # Running (KWOK) means the apiserver's watch cache, which the operator's pod list reads, has them too.
    wait_for(lambda: all(p.status.phase == "Running" for p in ftj.core.list_namespaced_pod(ns).items) or None, 30,
             "the other team's pods running")
    time.sleep(NODE_SNAPSHOT_SECONDS + 1)  # a snapshot taken before they ran (other jobs' passes) has expired
    ftj.create(ns, unpinned("busy"))
    st = wait_layout(ftj, ns, "busy")
    assert st["layout"]["gpuType"] != L4, st["layout"]
    sized = st["plan"]["message"]  # the sizer's words stay in status.plan (the phase message moves on)
    assert f"over 1 x {L4}" in sized and f"{L4}: 0 of" in sized, sized
    wait_for(lambda: job_product(ftj, ns) == st["layout"]["gpuType"] or None, 30, "the Job on the free GPU type")


def test_pods_unschedulable_on_the_chosen_type_are_moved_once(ftj, namespace):
    """Input: the L4 nodes carry a taint the trainer pods do not tolerate (the sizer cannot know). Expected:
    the job is first placed on L4, its pod stays unschedulable, and after the configured 3 s the operator
    deletes the never-started Job, records L4 in status.unschedulableGpuTypes, posts a Warning with the
    scheduler's words, and creates one Job on another GPU type that fits."""
    ns = namespace
    nodes = l4_nodes(ftj.core)
    wait_for_free_gpus(ftj.api, L4, 4)  # other tests' pods gone from the L4 nodes
    time.sleep(NODE_SNAPSHOT_SECONDS + 1)  # and out of the operator's node and pod snapshot
    try:
        for node in nodes:
            ftj.core.patch_node(node.metadata.name, {"spec": {"taints": [TAINT]}})
        ftj.create(ns, unpinned("tainted"))
        first = wait_layout(ftj, ns, "tainted")
        assert first["layout"]["gpuType"] == L4, first["layout"]

        def moved():
            st = ftj.status(ns, "tainted")
            return st if st.get("unschedulableGpuTypes") == [L4] and (st.get("layout") or {}).get("gpuType") \
                not in (None, L4) else None
        st = wait_for(moved, 60, lambda: f"re-sized; last status {json.dumps(ftj.status(ns, 'tainted'))[:1500]}")
        events = [(r, m) for r, m in ftj.wait_events(ns, "tainted", "ResizingUnschedulable") if r == "ResizingUnschedulable"]
        assert len(events) == 1 and "untolerated taint" in events[0][1] and L4 in events[0][1], events
        wait_for(lambda: job_product(ftj, ns) == st["layout"]["gpuType"] or None, 30, "the Job on the new type")
        pods = ftj.core.list_namespaced_pod(ns).items
        wait_for(lambda: all(p.spec.node_name for p in ftj.core.list_namespaced_pod(ns).items) or None, 30,
                 f"the new pod bound; pods {[p.metadata.name for p in pods]}")
    finally:
        for node in nodes:
            ftj.core.patch_node(node.metadata.name, {"spec": {"taints": None}})
