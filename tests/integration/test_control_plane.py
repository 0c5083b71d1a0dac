"""The local control plane is real: kubectl, the Job controller, the scheduler's GPU accounting,
the garbage collector and KWOK's simulated pod lifecycle all work, and nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from kubetune_dev.devcluster.procs import pid_alive
from tests.support.cluster_helpers import complete_pod, pod_events, wait_for

pytestmark = pytest.mark.integration

GPU = "nvidia.com/gpu"


def _pod(name: str, gpus: int = 0, **spec: object) -> dict:
    resources = {"limits": {GPU: str(gpus)}} if gpus else {}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "busybox", "command": ["true"],
                                     "resources": resources}],
                     "restartPolicy": "Never", "nodeSelector": {"type": "kwok"}, **spec}}


@pytest.mark.unit
def test_generated_fleet_cycles_through_default_groups():
    from kubetune_dev.devcluster.fleet import generate_fleet, load_fleet, node_manifests, parse_fleet

    default = load_fleet()
    assert [(g.gpuProduct, g.count, g.gpusPerNode) for g in default.groups] == [
        ("NVIDIA-H100-80GB-HBM3", 2, 8), ("NVIDIA-A100-SXM4-80GB", 2, 8), ("NVIDIA-L4", 2, 4)]
    big = generate_fleet(10)
    assert [g.count for g in big.groups] == [4, 3, 3] and len(big.node_names) == 10
    assert parse_fleet(yaml.safe_load(big.to_yaml())) == big
    l4 = [n for n in node_manifests(big) if n["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-L4"][0]
    assert l4["status"]["allocatable"][GPU] == "4" and l4["metadata"]["labels"]["nvidia.com/gpu.memory"] == "23034"
    with pytest.raises(ValueError, match="unknown keys"):
        parse_fleet({"kind": "Fleet", "groups": [{"namePrefix": "x", "count": 1, "gpus": 8}]})


def test_kubectl_apply_creates_objects(cluster, namespace):
    manifest = textwrap.dedent(f"""
        apiVersion: v1
        kind: ConfigMap
        metadata: {{name: settings, namespace: {namespace}}}
        data: {{greeting: hello}}
        ---
        apiVersion: v1
        kind: Service
        metadata: {{name: web, namespace: {namespace}}}
        spec:
          clusterIP: None
          selector: {{app: web}}
          ports: [{{port: 80}}]
        """)
    out = cluster.kubectl("apply", "-f", "-", input=manifest).stdout
    assert "configmap/settings created" in out and "service/web created" in out
    got = cluster.kubectl("get", "configmap", "settings", "-n", namespace, "-o", "jsonpath={.data.greeting}").stdout
    assert got == "hello"
    again = cluster.kubectl("apply", "-f", "-", input=manifest).stdout
    assert "configmap/settings unchanged" in again


def test_fleet_nodes_carry_gpus_and_discovery_labels(cluster, k8s):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(k8s).list_node(label_selector="type=kwok").items}
    assert set(cluster.fleet.node_names) <= set(nodes)
    for group in cluster.fleet.groups:
        for name in group.node_names():
            node = nodes[name]
            assert node.status.allocatable[GPU] == str(group.gpusPerNode)
            assert node.metadata.labels["nvidia.com/gpu.product"] == group.gpuProduct
            assert node.metadata.labels["nvidia.com/gpu.memory"] == str(group.gpuMemoryMiB)
            assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)


# kube-controller-manager's --node-monitor-grace-period (its default): a node whose lease and status
# are both older than this is marked NotReady and tainted unreachable.
NODE_MONITOR_GRACE_S = 50


def test_fleet_nodes_stay_ready_on_their_leases(k8s):
    """KWOK renews a Lease per node, so no simulated node is ever marked NotReady and tainted (before
    devcluster/kwok-stages.yaml had its own node stages, every node flapped NotReady once a minute)."""
    core, leases = client.CoreV1Api(k8s), client.CoordinationV1Api(k8s)
    nodes = core.list_node(label_selector="type=kwok").items
    oldest = min(n.metadata.creation_timestamp for n in nodes)
    age = time.time() - oldest.timestamp()
    if age < NODE_MONITOR_GRACE_S + 15:  # the fleet must have lived past the grace period
        time.sleep(NODE_MONITOR_GRACE_S + 15 - age)
    nodes = core.list_node(label_selector="type=kwok").items
    renewed = {lease.metadata.name: lease.spec.renew_time
               for lease in leases.list_namespaced_lease("kube-node-lease").items}
    now = time.time()
    for node in nodes:
        name = node.metadata.name
        assert name in renewed, f"{name} has no Lease in kube-node-lease"
        assert now - renewed[name].timestamp() < 20, f"{name}'s Lease was last renewed at {renewed[name]}"
        ready = [c.status for c in node.status.conditions if c.type == "Ready"]
        assert ready == ["True"], f"{name} Ready={ready}"
        assert not node.spec.taints, f"{name} is tainted: {node.spec.taints}"
    not_ready = [e.involved_object.name for e in core.list_namespaced_event("default").items
                 if e.reason == "NodeNotReady"]
    assert not not_ready, f"{len(not_ready)} NodeNotReady events, e.g. {not_ready[:3]}"


def test_indexed_gpu_job_runs_only_on_nodes_with_enough_gpus(cluster, k8s, namespace):
    core, batch = client.CoreV1Api(k8s), client.BatchV1Api(k8s)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "train"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": {"spec": _pod("x", gpus=8)["spec"]}}}
    batch.create_namespaced_job(namespace, job)

    def list_pods():
        return core.list_namespaced_pod(namespace, label_selector="job-name=train").items

    def running_pods():
        found = list_pods()
        return len(found) == 2 and all(p.status.phase == "Running" and p.status.pod_ip for p in found) and found

    pods = wait_for(running_pods, 60, lambda: "2 running pods of job train; pods: "
                    f"{[(p.metadata.name, p.status.phase, p.spec.node_name) for p in list_pods()]}")
    eight_gpu_nodes = {n for g in cluster.fleet.groups if g.gpusPerNode >= 8 for n in g.node_names()}
    nodes = [p.spec.node_name for p in pods]
    assert set(nodes) <= eight_gpu_nodes, f"8-GPU pods landed on {nodes}, not all in {sorted(eight_gpu_nodes)}"
    assert len(set(nodes)) == 2, "two 8-GPU pods cannot share one 8-GPU node"
    indexes = sorted(p.metadata.annotations["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1"]

    for p in pods:
        complete_pod(k8s, namespace, p.metadata.name, exit_code=0, message="done")

    def job_complete():
        status = batch.read_namespaced_job_status("train", namespace).status
        return status.succeeded == 2 and any(c.type == "Complete" and c.status == "True"
                                             for c in status.conditions or []) and status
    wait_for(job_complete, 60, lambda: f"job train Complete: {batch.read_namespaced_job_status('train', namespace).status}")


def test_pod_needing_more_gpus_than_any_node_stays_pending(k8s, namespace):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, _pod("too-big", gpus=16))

    def failed_scheduling():
        return [m for r, m in pod_events(k8s, namespace, "too-big") if r == "FailedScheduling"]

    messages = wait_for(failed_scheduling, 60, "a FailedScheduling event for pod too-big")
    assert f"Insufficient {GPU}" in messages[0], messages
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name


def test_deleting_owner_garbage_collects_children(k8s, namespace):
    core = client.CoreV1Api(k8s)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "child", "ownerReferences": [ref]}})
    core.create_namespaced_pod(namespace, {**_pod("child-pod"), "metadata": {"name": "child-pod",
                                                                              "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")

    def children_gone():
        left = [c.metadata.name for c in core.list_namespaced_config_map(namespace).items
                if c.metadata.name in {"owner", "child"}]
        left += [p.metadata.name for p in core.list_namespaced_pod(namespace).items]
        return not left

    wait_for(children_gone, 60, lambda: "owner's children deleted; left: "
             f"{[c.metadata.name for c in core.list_namespaced_config_map(namespace).items]} "
             f"{[p.metadata.name for p in core.list_namespaced_pod(namespace).items]}")


def test_deleting_a_namespace_with_a_running_job_frees_its_pods_and_gpus(k8s):
    """Pods of a deleted Job are killed as a kubelet would (KWOK stage kubetune-pod-kill), so the Job controller
    drops its tracking finalizer and the pods, with the GPUs they hold, go away instead of staying Running and
    Terminating forever (which also kept the namespace Terminating)."""
    core, batch = client.CoreV1Api(k8s), client.BatchV1Api(k8s)
    ns = f"doomed-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    wait_for(lambda: core.read_namespaced_service_account("default", ns), 30, "default service account")
    batch.create_namespaced_job(ns, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "doomed"},
                                     "spec": {"backoffLimit": 0, "template": {"spec": _pod("x", gpus=1)["spec"]},
                                              # as the operator's trainer Jobs have: with a pod failure policy the
                                              # Job controller keeps a deleted pod's finalizer until it is terminal
                                              "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                                                  "containerName": "main", "operator": "In", "values": [3]}}]}}})

    def running():
        return [p for p in core.list_namespaced_pod(ns).items if p.status.phase == "Running"]
    pod = wait_for(running, 60, "running pod of job doomed")[0]
    assert "batch.kubernetes.io/job-tracking" in (pod.metadata.finalizers or [])
    core.delete_namespace(ns)

    def gone():
        try:
            core.read_namespace(ns)
        except client.ApiException as exc:
            return exc.status == 404
        return False

    def left():
        return [(p.metadata.name, p.status.phase, p.metadata.finalizers) for p in core.list_namespaced_pod(ns).items]
    wait_for(gone, 90, lambda: f"namespace {ns} deleted; pods left: {left()}")


@pytest.mark.parametrize("exit_code,message,phase,reason", [(0, "all good", "Succeeded", "Completed"),
                                                            (3, "boom: CUDA OOM", "Failed", "Error")])
def test_driving_a_pod_to_completion_reports_exit_code_and_message(k8s, namespace, exit_code, message, phase,
                                                                   reason):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, _pod("worker"))
    wait_for(lambda: core.read_namespaced_pod("worker", namespace).status.phase == "Running", 30, "pod worker Running")
    complete_pod(k8s, namespace, "worker", exit_code=exit_code, message=message)

    def done():
        pod = core.read_namespaced_pod("worker", namespace)
        return pod.status.phase == phase and pod
    pod = wait_for(done, 30, lambda: f"pod worker {phase}: {core.read_namespaced_pod('worker', namespace).status}")
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.message, terminated.reason) == (exit_code, message, reason)


def _wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"cluster process exited with {proc.returncode}: {proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} not written within {timeout}s")
        time.sleep(0.2)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and pid_alive(int(entry)):
                found.append(f"{entry}: {cmdline[:200]}")
    return found


@pytest.mark.parametrize("how", ["ctrl-c", "cluster-down", "kill-9"])
def test_stopping_cluster_up_leaves_no_process(tmp_path, how):
    env_file = tmp_path / "env"
    proc = subprocess.Popen([sys.executable, "-m", "kubetune_dev", "cluster", "up", "--nodes", "1",
                             "--process-nodes", "1", "--data-root", str(tmp_path / "data"),
                             "--env-file", str(env_file), "--work-dir", str(tmp_path / "work")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_file(env_file, proc, 90)
        state = json.loads((tmp_path / "work" / "state.json").read_text())
        pids = state["pids"]
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}, pids
        # a pod process on the cluster's process node must go too
        kubectl = ["kubectl", f"--kubeconfig={state['kubeconfig']}"]
        subprocess.run(kubectl + ["run", "sleeper", "--image=unused", "--restart=Never", "--overrides",
                                  '{"spec": {"nodeName": "process-node-0"}}', "--command", "--", "sleep", "600"],
                       check=True, capture_output=True, timeout=30)

        def sleeper_pid():
            out = subprocess.run(kubectl + ["get", "pod", "sleeper", "-o",
                                            "jsonpath={.status.containerStatuses[0].containerID}"],
                                 capture_output=True, text=True, timeout=30).stdout
            return out.startswith("process://") and int(out.removeprefix("process://"))
        pids["pod sleeper"] = wait_for(sleeper_pid, 30, "pod sleeper running on process-node-0")
        assert all(pid_alive(p) for p in pids.values())
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        elif how == "cluster-down":
            down = subprocess.run([sys.executable, "-m", "kubetune_dev", "cluster", "down", "--env-file", str(env_file)],
                                  capture_output=True, text=True, timeout=90)
            assert down.returncode == 0, down.stderr
            assert proc.wait(10) == 0
        else:  # the parent dies without any chance to clean up: children die with it (pdeathsig)
            proc.kill()
            proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    wait_for(lambda: not [n for n, p in pids.items() if pid_alive(p)], 10,
             lambda: f"components gone; alive: {[n for n, p in pids.items() if pid_alive(p)]}")
    assert _processes_mentioning(str(tmp_path / "work")) == []
    if how != "kill-9":
        assert not env_file.exists()


def test_exception_after_start_leaves_no_process(tmp_path):
    script = textwrap.dedent("""
        import json, sys
        from kubetune_dev.devcluster import Cluster, ClusterOptions, generate_fleet
        with Cluster(ClusterOptions(fleet=generate_fleet(1))) as c:
            print(json.dumps({"pids": c.pids, "dir": str(c.work_dir)}), flush=True)
            raise RuntimeError("test failure inside the cluster block")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "test failure inside the cluster block" in result.stderr, result.stderr
    info = json.loads(result.stdout.splitlines()[-1])
    assert len(info["pids"]) == 5
    assert [n for n, p in info["pids"].items() if pid_alive(p)] == []
    assert _processes_mentioning(info["dir"]) == []
    assert not Path(info["dir"]).exists()
