"""The process node runs pods bound to it as local processes: volumes and env are mapped to local
paths, the termination message and exit code reach the pod status, deletion kills the process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from kubernetes import client

from kubetune_dev.devcluster.process_node import (POD_DIR_ANNOTATION, create_local_pvc, expand_vars, localize_env,
                                              rewrite_path)
from kubetune_dev.devcluster.procs import pid_alive
from tests.support.cluster_helpers import wait_for

pytestmark = pytest.mark.integration


def _pod(name: str, script: str, node: str = "process-node-0", **extra) -> dict:
    container = {"name": "main", "image": "unused", "command": ["sh", "-c", script], **extra.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container], "restartPolicy": "Never",
                     "nodeSelector": {"kubetune.io/process-node": "true", "kubernetes.io/hostname": node},
                     **extra}}


def _wait_phase(core, ns: str, name: str, phases: set[str], timeout: float = 30):
    def check():
        pod = core.read_namespaced_pod(name, ns)
        return pod.status.phase in phases and pod
    return wait_for(check, timeout, lambda: f"pod {ns}/{name} in {phases}: "
                    f"{core.read_namespaced_pod(name, ns).status}")


@pytest.mark.unit
def test_paths_and_service_names_are_localized():
    mounts = [("/etc/kubetune/plan", "/tmp/p/plan"), ("/etc/kubetune", "/tmp/p/cfg"), ("/dev/termination-log",
                                                                                         "/tmp/p/term")]
    env = {"PLAN": "/etc/kubetune/plan.json", "DIR": "/etc/kubetune", "OTHER": "/etc/kubetunex", "T":
           "/dev/termination-log", "MASTER": "j-trainer-0.j-trainer.ns.svc", "URL": "http://a.b.svc.cluster.local:9090/x",
           "NOT": "svc.example.com"}
    assert localize_env(env, mounts) == {"PLAN": "/tmp/p/cfg/plan.json", "DIR": "/tmp/p/cfg", "OTHER": "/etc/kubetunex",
                                         "T": "/tmp/p/term", "MASTER": "127.0.0.1", "URL": "http://127.0.0.1:9090/x",
                                         "NOT": "svc.example.com"}
    assert rewrite_path("/etc/kubetune/plan/x", mounts) == "/tmp/p/plan/x"
    pvcs = [("/mnt/pvc/models", "/data/pvc/models"), ("/mnt/pvc/outputs", "/data/pvc/outputs"), ("/mnt/x", "/y")]
    assert rewrite_path("/mnt/pvc", pvcs) == "/data/pvc" and rewrite_path("/mnt/pvc/", pvcs) == "/data/pvc"
    assert rewrite_path("/mnt", pvcs) == "/mnt", "mounts under /mnt map to different roots: left alone"
    assert expand_vars("$(A)/b $$(A) $(MISSING)", {"A": "/a"}) == "/a/b $(A) $(MISSING)"


def test_pod_reads_configmap_via_env_and_reports_termination_message(cluster, k8s, namespace, process_nodes):
    core = client.CoreV1Api(k8s)
    data_root = process_nodes[0].config.data_root
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "app"}, "data": {"greeting": "hello from cm"}})
    create_local_pvc(k8s, namespace, "outputs", data_root)
    script = ('cat "$GREETING_FILE" > "$TERMINATION_LOG"; echo "$POD_NAME $NS $MASTER $SECRETLESS" > "$OUT/result.txt";'
              ' echo scratch > "$SCRATCH/x"; echo via-root > "$PVC_ROOT/outputs/via-root"; echo "ran in $PWD"')
    env = [{"name": "GREETING_FILE", "value": "/etc/app/greeting"},
           {"name": "TERMINATION_LOG", "value": "/dev/termination-log"},
           {"name": "OUT", "value": "/mnt/pvc/outputs/run1"},
           {"name": "SCRATCH", "value": "/scratch"},
           {"name": "PVC_ROOT", "value": "/mnt/pvc"},
           {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "MASTER", "value": f"demo-trainer-0.demo-trainer.{namespace}.svc"},
           {"name": "SECRETLESS", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "greeting"}}}]
    mounts = [{"name": "app", "mountPath": "/etc/app"}, {"name": "pvc", "mountPath": "/mnt/pvc/outputs"},
              {"name": "scratch", "mountPath": "/scratch"}]
    volumes = [{"name": "app", "configMap": {"name": "app"}}, {"name": "scratch", "emptyDir": {}},
               {"name": "pvc", "persistentVolumeClaim": {"claimName": "outputs"}}]
    (Path(data_root) / "pvc" / "outputs" / "run1").mkdir(parents=True, exist_ok=True)
    core.create_namespaced_pod(namespace, _pod("reader", script, container={"env": env, "volumeMounts": mounts},
                                               volumes=volumes))
    pod = _wait_phase(core, namespace, "reader", {"Succeeded", "Failed"})
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.exit_code, terminated.reason, terminated.message) == \
        ("Succeeded", 0, "Completed", "hello from cm"), pod.status
    assert pod.status.pod_ip == "127.0.0.1" and pod.spec.node_name == "process-node-0"
    result = (Path(data_root) / "pvc" / "outputs" / "run1" / "result.txt").read_text()
    assert result == f"reader {namespace} 127.0.0.1 hello from cm\n"
    assert (Path(data_root) / "pvc" / "outputs" / "via-root").read_text() == "via-root\n"
    pod_dir = Path(pod.metadata.annotations[POD_DIR_ANNOTATION])
    assert (pod_dir / "volumes" / "scratch" / "x").read_text() == "scratch\n"
    assert f"ran in {pod_dir / 'work'}" in (pod_dir / "logs" / "main.log").read_text()
    logs = cluster_cli_logs(cluster, namespace, "reader")
    assert "ran in" in logs


def cluster_cli_logs(cluster, namespace: str, pod: str) -> str:
    """`kubetune-dev node logs ns/pod` output."""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "kubetune_dev", "node", "logs", f"{namespace}/{pod}",
                             "--kubeconfig", str(cluster.kubeconfig)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_failing_command_ends_failed_with_its_exit_code(k8s, namespace, process_nodes):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, _pod("crasher", "echo 'bad input on line 3' >&2; exit 7",
                                               node="process-node-1",
                                               container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    pod = _wait_phase(core, namespace, "crasher", {"Succeeded", "Failed"})
    terminated = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, terminated.exit_code, terminated.reason) == ("Failed", 7, "Error"), pod.status
    assert "bad input on line 3" in terminated.message


def test_deleting_a_running_pod_kills_its_processes(k8s, namespace, process_nodes):
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, _pod("sleeper", 'sleep 600 & echo $! > "$WORK/child.pid"; wait',
                                               container={"env": [{"name": "WORK", "value": "/work"}],
                                                          "volumeMounts": [{"name": "w", "mountPath": "/work"}]},
                                               volumes=[{"name": "w", "emptyDir": {}}]))
    pod = _wait_phase(core, namespace, "sleeper", {"Running"})
    shell_pid = int(pod.status.container_statuses[0].container_id.removeprefix("process://"))
    pid_file = Path(pod.metadata.annotations[POD_DIR_ANNOTATION]) / "volumes" / "w" / "child.pid"
    child_pid = wait_for(lambda: pid_file.exists() and pid_file.read_text().strip() and int(pid_file.read_text()),
                         10, f"{pid_file} written")
    assert pid_alive(shell_pid) and pid_alive(child_pid)
    t0 = time.monotonic()
    core.delete_namespaced_pod("sleeper", namespace)

    def gone():
        return not any(p.metadata.name == "sleeper" for p in core.list_namespaced_pod(namespace).items)
    wait_for(gone, 30, "pod sleeper deleted")
    assert not pid_alive(shell_pid) and not pid_alive(child_pid), "process group survived pod deletion"
    assert time.monotonic() - t0 < 30


def test_a_deleted_running_pod_is_marked_failed_before_it_goes(k8s, namespace, process_nodes):
    """As a kubelet does: the Job controller counts the pod and drops its tracking finalizer, so a namespace
    holding a deleted pod can finish terminating. A finalizer here keeps the pod readable after its delete."""
    core = client.CoreV1Api(k8s)
    pod = _pod("doomed", "sleep 600")
    pod["metadata"]["finalizers"] = ["kubetune.test/hold"]
    core.create_namespaced_pod(namespace, pod)
    _wait_phase(core, namespace, "doomed", {"Running"})
    core.delete_namespaced_pod("doomed", namespace)
    failed = _wait_phase(core, namespace, "doomed", {"Failed"})
    term = failed.status.container_statuses[0].state.terminated
    assert term is not None and term.exit_code in (137, 143), failed.status.container_statuses
    core.patch_namespaced_pod("doomed", namespace, {"metadata": {"finalizers": None}})


def test_two_pod_indexed_job_runs_one_pod_on_each_process_node(k8s, namespace, process_nodes):
    core, batch = client.CoreV1Api(k8s), client.BatchV1Api(k8s)
    data_root = process_nodes[0].config.data_root
    create_local_pvc(k8s, namespace, "shared", data_root)
    template = _pod("x", 'echo "$JOB_COMPLETION_INDEX $NODE" > "$OUT/index-$JOB_COMPLETION_INDEX"',
                    container={"env": [{"name": "OUT", "value": "/mnt/pvc"},
                                       {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                               "volumeMounts": [{"name": "data", "mountPath": "/mnt/pvc"}]},
                    volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "shared"}}])
    spec = template["spec"]
    spec["nodeSelector"] = {"kubetune.io/process-node": "true"}
    spec["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"job-name": "pair"}}, "topologyKey": "kubernetes.io/hostname"}]}}
    batch.create_namespaced_job(namespace, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "pair"},
                                            "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2,
                                                     "backoffLimit": 0, "template": {"metadata": {"labels": {
                                                         "job-name": "pair"}}, "spec": spec}}})

    def complete():
        s = batch.read_namespaced_job_status("pair", namespace).status
        return s.succeeded == 2 and s
    wait_for(complete, 60, lambda: f"job pair succeeded=2: {batch.read_namespaced_job_status('pair', namespace).status}")
    written = {p.name: p.read_text().split() for p in (Path(data_root) / "pvc" / "shared").glob("index-*")}
    assert sorted(written) == ["index-0", "index-1"]
    assert {node for _, node in written.values()} == {"process-node-0", "process-node-1"}


@pytest.mark.unit
def test_container_env_resolves_downward_api_and_references():
    from kubetune_dev.devcluster.process_node import MissingReference, container_env

    pod = {"metadata": {"name": "p-0", "namespace": "ns", "uid": "u1", "labels": {"app": "a"},
                        "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
           "spec": {"nodeName": "process-node-1"}}
    data = {("configMap", "ns", "cm"): {"k": "from-cm", "x": "1"}, ("secret", "ns", "s"): {"token": "t0p"}}
    lookup = lambda kind, ns, name: data.get((kind, ns, name))  # noqa: E731
    container = {"name": "c", "resources": {"limits": {"cpu": "1500m", "memory": "1Gi"}},
                 "envFrom": [{"prefix": "CM_", "configMapRef": {"name": "cm"}}],
                 "env": [{"name": "IDX", "valueFrom": {"fieldRef": {
                             "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                         {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                         {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                         {"name": "RANK", "value": "rank-$(IDX)"},
                         {"name": "K", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}},
                         {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "token"}}},
                         {"name": "OPT", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "a", "optional": True}}},
                         {"name": "CPUS", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                         {"name": "MEM_MI", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory",
                                                                               "divisor": "1Mi"}}}]}
    env = container_env(pod, container, lookup)
    assert env == {"CM_k": "from-cm", "CM_x": "1", "IDX": "1", "APP": "a", "IP": "127.0.0.1", "RANK": "rank-1",
                   "K": "from-cm", "TOKEN": "t0p", "CPUS": "2", "MEM_MI": "1024"}
    with pytest.raises(MissingReference, match="secret ns/nope"):
        container_env(pod, {"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "nope",
                                                                                               "key": "a"}}}]}, lookup)
