"""The Kubeflow Trainer peer of the operator-scale benchmark, without a cluster: the runtime equivalent to the
kubetune Job, TrainJob phases, the kubetune/Kubeflow ratios, the managers' loopback webhooks and the
certificates the Trainer's rotator must accept as they are."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kubetune_dev.devcluster.kubeflow import (TRAINER_CA_NAME, TRAINER_SERVICE_DNS, generate_rotator_certs,
                                              jobset_config, loopback_webhook_configs, rotator_secret)
from tests.support.script_loader import load_module_from_file

pytestmark = pytest.mark.unit
peer = load_module_from_file("peer_kubeflow", Path(__file__).resolve().parents[2] / "bench" / "peer_kubeflow.py")

KUBETUNE_JOB = {"spec": {"template": {"metadata": {"labels": {"app.kubernetes.io/managed-by": "kubetune"}}, "spec": {
    "restartPolicy": "Never",
    "containers": [{"name": "trainer", "image": "ghcr.io/kubetune/trainer:0.1.0", "command": ["kubetune-train", "launch"],
                    "env": [{"name": "KUBETUNE_PLAN", "value": "/etc/kubetune/plan.json"},
                            {"name": "KUBETUNE_NUM_NODES", "value": "1"}],
                    "resources": {"requests": {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "1"},
                                  "limits": {"memory": "32Gi", "nvidia.com/gpu": "1"}},
                    "volumeMounts": [{"name": "plan", "mountPath": "/etc/kubetune"},
                                     {"name": "work", "mountPath": "/var/lib/kubetune"}]}],
    "volumes": [{"name": "plan", "configMap": {"name": "x-plan"}}, {"name": "work", "emptyDir": {}}],
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}}}


def test_runtime_runs_the_kubetune_pod_on_the_same_gpus_without_the_plan_configmap() -> None:
    runtime = peer.runtime_from_job(KUBETUNE_JOB)
    assert runtime["kind"] == "ClusterTrainingRuntime" and runtime["spec"]["mlPolicy"] == {"numNodes": 1}
    [rjob] = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == "node"
    assert rjob["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    pod = rjob["template"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    source = KUBETUNE_JOB["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == "node"
    assert (container["image"], container["command"], container["resources"]) == (
        source["image"], source["command"], source["resources"])
    assert [v["name"] for v in pod["volumes"]] == ["work"]
    assert [m["name"] for m in container["volumeMounts"]] == ["work"]
    assert [e["name"] for e in container["env"]] == ["KUBETUNE_NUM_NODES"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4"} and pod["tolerations"]
    assert source["name"] == "trainer" and len(KUBETUNE_JOB["spec"]["template"]["spec"]["volumes"]) == 2  # not mutated


def test_trainjob_phase_comes_from_its_conditions() -> None:
    assert peer.trainjob_digest({})["phase"] == ""
    running = {"status": {"conditions": [{"type": "Complete", "status": "False"}]}}
    assert peer.trainjob_digest(running)["phase"] == ""
    done = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                      {"type": "Complete", "status": "True", "reason": "JobSetCompleted"}]}}
    assert peer.trainjob_digest(done) == {"phase": "Succeeded", "reason": "JobSetCompleted", "message": ""}
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "boom"}]}}
    assert peer.trainjob_digest(failed)["phase"] == "Failed"


def test_pod_owner_prefers_the_jobset() -> None:
    assert peer.pod_owner({"jobset.sigs.k8s.io/jobset-name": "tj-1", "batch.kubernetes.io/job-name": "tj-1-node-0"}) \
        == "tj-1"
    assert peer.pod_owner({"batch.kubernetes.io/job-name": "ftj-1-trainer"}) == "ftj-1-trainer"
    assert peer.pod_owner({}) == ""


def _side(throughput: float, p99: float, ctl: float, requests: float, rss: float | None, completion: float) -> dict:
    return {"creation": {"to_pods": {"throughput_per_s": throughput, "latency_s": {"p50": 1.0, "p99": p99},
                                     "cpu_s_per_job": {"controllers": ctl, "kube-apiserver": 0.1, "etcd": 0.02},
                                     "apiserver_requests_per_job": requests}},
            "controller_peak_rss_mib": rss, "completion": {"wall_s": completion}}


def test_ratios_are_kubetune_over_kubeflow_with_the_better_direction_per_figure() -> None:
    ratios = peer.peer_ratios(_side(20.0, 4.0, 0.05, 12.0, 150.0, 30.0), _side(10.0, 8.0, 0.02, 10.0, None, 30.0))
    assert ratios["throughput_until_pods"] == {"kubetune": 20.0, "kubeflow": 10.0, "ratio": 2.0,
                                               "kubetune_at_least_as_good": True}
    assert ratios["latency_p99"]["ratio"] == 0.5 and ratios["latency_p99"]["kubetune_at_least_as_good"] is True
    assert ratios["controller_cpu_s_per_job"]["ratio"] == 2.5
    assert ratios["controller_cpu_s_per_job"]["kubetune_at_least_as_good"] is False
    assert ratios["apiserver_requests_per_job"]["kubetune_at_least_as_good"] is False
    assert ratios["completion_s"]["ratio"] == 1.0 and ratios["completion_s"]["kubetune_at_least_as_good"] is True
    assert ratios["controller_peak_rss_mib"]["ratio"] is None  # a side without the figure
    assert set(ratios) == {key for key, _, _ in peer.COMPARED}


def test_cpu_per_job_sums_the_controllers() -> None:
    cpu = {"trainer-controller-manager": 3.0, "jobset-controller-manager": 1.0, "kube-apiserver": 8.0, "etcd": 2.0}
    assert peer.cpu_per_job(cpu, ["trainer-controller-manager", "jobset-controller-manager"], 100) == {
        "controllers": 0.04, "kube-apiserver": 0.08, "etcd": 0.02}


def test_webhooks_call_loopback_and_pod_webhooks_only_see_jobset_pods() -> None:
    def hook(name: str, resource: str, path: str) -> dict:
        return {"name": name, "clientConfig": {"service": {"name": "webhook-service", "namespace": "system",
                                                           "path": path}},
                "rules": [{"apiGroups": [""], "resources": [resource], "operations": ["CREATE"]}]}
    manifests = [{"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
                  "metadata": {"name": "mutating-webhook-configuration"},
                  "webhooks": [hook("mjobset.kb.io", "jobsets", "/mutate-jobset"), hook("mpod.kb.io", "pods", "/mp")]},
                 {"kind": "Service"}]
    [out] = loopback_webhook_configs(manifests, "https://127.0.0.1:9443", "Q0E=",
                                     {"MutatingWebhookConfiguration": "jobset-mutating"},
                                     pod_selector_label="jobset.sigs.k8s.io/jobset-name")
    assert out["metadata"] == {"name": "jobset-mutating"}
    jobset_hook, pod_hook = out["webhooks"]
    assert jobset_hook["clientConfig"] == {"url": "https://127.0.0.1:9443/mutate-jobset", "caBundle": "Q0E="}
    assert "objectSelector" not in jobset_hook
    assert pod_hook["objectSelector"] == {"matchExpressions": [{"key": "jobset.sigs.k8s.io/jobset-name",
                                                                "operator": "Exists"}]}
    assert manifests[0]["webhooks"][0]["clientConfig"]["service"]  # input left as it was


def test_jobset_config_turns_off_its_cert_rotation_and_serves_on_loopback(tmp_path: Path) -> None:
    config = jobset_config(webhook_port=9443, health_port=8081, cert_dir=tmp_path)
    assert config["internalCertManagement"] == {"enable": False}
    assert config["webhook"] == {"port": 9443, "host": "127.0.0.1", "certDir": str(tmp_path)}
    assert config["leaderElection"] == {"leaderElect": False} and config["metrics"] == {"bindAddress": "0"}


def _openssl(*args: str) -> str:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, check=True).stdout


def test_rotator_certs_are_ones_the_trainer_keeps_and_the_apiserver_can_verify_on_loopback(tmp_path: Path) -> None:
    files = generate_rotator_certs(tmp_path / "pki")
    assert files["ca.key"].startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # the rotator parses PKCS#1 only
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    ca, server = str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt")
    assert f"DNS:{TRAINER_CA_NAME}" in _openssl("x509", "-in", ca, "-noout", "-ext", "subjectAltName")
    ext = _openssl("x509", "-in", server, "-noout", "-ext", "subjectAltName,extendedKeyUsage")
    assert f"DNS:{TRAINER_SERVICE_DNS}, IP Address:127.0.0.1" in ext and "TLS Web Server Authentication" in ext
    _openssl("verify", "-CAfile", ca, "-verify_hostname", TRAINER_SERVICE_DNS, server)
    _openssl("verify", "-CAfile", ca, "-verify_ip", "127.0.0.1", server)
    # the rotator renews anything that expires within 90 days: both must outlive that
    for cert in (ca, server):
        _openssl("x509", "-in", cert, "-noout", "-checkend", str(91 * 86400))
    secret = rotator_secret(files)
    assert set(secret["data"]) == {"ca.crt", "ca.key", "tls.crt", "tls.key"}
    assert secret["metadata"] == {"name": "kubeflow-trainer-webhook-cert", "namespace": "kubeflow-system"}
