"""The Kubeflow Trainer v2 side of the operator-scale benchmark: what it creates and how it is compared.

Pure functions (no cluster): the ClusterTrainingRuntime equivalent to the kubetune Job of the benchmark, the
TrainJobs, the digests the watchers keep, and the kubetune/Kubeflow ratios. bench/operator_scale.py runs the phase.
"""

from __future__ import annotations

import copy
from typing import Any

TRAINER_API = "trainer.kubeflow.org/v1alpha1"
RUNTIME_NAME = "kubetune-lora-single-node"
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


def runtime_from_job(job: dict[str, Any], name: str = RUNTIME_NAME) -> dict[str, Any]:
    """A ClusterTrainingRuntime running the pod of a kubetune single-node Job: one trainer pod ("node" replicated
    Job, container "node") with the same image, command, environment, resources, security context, node selector
    and tolerations, so it lands on the same simulated GPUs. The plan ConfigMap volume (a FineTuneJob child) is
    left out, with its mount and the variable that points at it."""
    pod = copy.deepcopy(job["spec"]["template"]["spec"])
    plan_volumes = {v["name"] for v in pod.get("volumes") or [] if "configMap" in v}
    pod["volumes"] = [v for v in pod.get("volumes") or [] if v["name"] not in plan_volumes]
    if len(pod["containers"]) != 1:
        raise ValueError(f"expected a single-container trainer pod, got {len(pod['containers'])}")
    container = pod["containers"][0]
    container["name"] = "node"
    container["volumeMounts"] = [m for m in container.get("volumeMounts") or [] if m["name"] not in plan_volumes]
    container["env"] = [e for e in container.get("env") or [] if e["name"] != "KUBETUNE_PLAN"]
    return {
        "apiVersion": TRAINER_API, "kind": "ClusterTrainingRuntime", "metadata": {"name": name},
        "spec": {
            "mlPolicy": {"numNodes": 1},
            "template": {"spec": {"replicatedJobs": [{
                "name": "node",
                "template": {
                    "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                    "spec": {"template": {"spec": pod}},
                },
            }]}},
        },
    }


def trainjob_manifest(name: str, namespace: str, output_uri: str, runtime: str = RUNTIME_NAME) -> dict[str, Any]:
    """One benchmark TrainJob: the runtime above, with its output location in the trainer's environment (the
    FineTuneJob carries it in spec.output.uri)."""
    return {"apiVersion": TRAINER_API, "kind": "TrainJob", "metadata": {"name": name, "namespace": namespace},
            "spec": {"runtimeRef": {"name": runtime, "apiGroup": "trainer.kubeflow.org",
                                    "kind": "ClusterTrainingRuntime"},
                     "trainer": {"env": [{"name": "KUBETUNE_OUTPUT_URI", "value": output_uri}]}}}


def trainjob_digest(obj: dict[str, Any]) -> dict[str, Any]:
    """A TrainJob's terminal phase from its conditions ("Succeeded" when Complete, "Failed" when Failed, else
    ""), and the message of the condition that made it so."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
    for ctype, phase in (("Complete", "Succeeded"), ("Failed", "Failed")):
        cond = conditions.get(ctype)
        if cond and cond.get("status") == "True":
            return {"phase": phase, "reason": cond.get("reason") or "", "message": (cond.get("message") or "")[:200]}
    return {"phase": "", "reason": "", "message": ""}


def pod_owner(labels: dict[str, str]) -> str:
    """The workload a benchmark pod belongs to: its JobSet (= TrainJob name) or else its Job."""
    return labels.get(JOBSET_NAME_LABEL) or labels.get(JOB_NAME_LABEL) or ""


# Compared figures: (key in the result, path in a phase result (kubetune or kubeflow), whether more is better).
COMPARED = (
    ("throughput_until_pods", ("creation", "to_pods", "throughput_per_s"), True),
    ("latency_p50", ("creation", "to_pods", "latency_s", "p50"), False),
    ("latency_p99", ("creation", "to_pods", "latency_s", "p99"), False),
    ("controller_cpu_s_per_job", ("creation", "to_pods", "cpu_s_per_job", "controllers"), False),
    ("apiserver_cpu_s_per_job", ("creation", "to_pods", "cpu_s_per_job", "kube-apiserver"), False),
    ("etcd_cpu_s_per_job", ("creation", "to_pods", "cpu_s_per_job", "etcd"), False),
    ("apiserver_requests_per_job", ("creation", "to_pods", "apiserver_requests_per_job"), False),
    ("controller_peak_rss_mib", ("controller_peak_rss_mib",), False),
    ("completion_s", ("completion", "wall_s"), False),
    ("pod_done_to_job_done_p50", ("completion", "pod_to_job_done_s", "p50"), False),
)


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def peer_ratios(kubetune: dict[str, Any], kubeflow: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kubetune / Kubeflow for each COMPARED figure, with both values and whether kubetune is at least as good
    (higher throughput, lower everything else). None where a side lacks the figure or Kubeflow's is 0."""
    out = {}
    for key, path, more_is_better in COMPARED:
        a, b = _get(kubetune, path), _get(kubeflow, path)
        r = round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        at_least_as_good = None if r is None else (r >= 1.0 if more_is_better else r <= 1.0)
        out[key] = {"kubetune": a, "kubeflow": b, "ratio": r, "kubetune_at_least_as_good": at_least_as_good}
    return out


def cpu_per_job(cpu: dict[str, Any], controllers: list[str], n: int) -> dict[str, float | None]:
    """CPU seconds per job for the controllers together and for kube-apiserver and etcd, from a
    `cpu_delta` reading over a phase of n jobs."""
    if not n:
        return {"controllers": None, "kube-apiserver": None, "etcd": None}
    ctl = sum(cpu.get(name, 0.0) for name in controllers)
    return {"controllers": round(ctl / n, 4),
            "kube-apiserver": round(cpu.get("kube-apiserver", 0.0) / n, 4),
            "etcd": round(cpu.get("etcd", 0.0) / n, 4)}
