"""Helpers for tests that drive FineTuneJobs on the local control plane (no pytest import)."""

from __future__ import annotations

import copy
import http.server
import json
import socket
import threading
from pathlib import Path
from typing import Any

from kubernetes import client

from kubetune import API_GROUP, API_VERSION, PLURAL
from kubetune.builders import COMPLETION_INDEX_ANNOTATION, COMPONENT_LABEL, JOB_NAME_LABEL
from tests.support.cluster_helpers import wait_for


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ftj_manifest(name: str, *, pods: int = 1, gpus: int = 1, gpu_type: str = "NVIDIA-L4",
                 **spec_overrides: Any) -> dict[str, Any]:
    """A LoRA FineTuneJob with a pinned GPU layout and no PVCs (hf:// model, s3:// data and output)."""
    spec: dict[str, Any] = {
        "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
        "dataset": {"uri": "s3://datasets/train.jsonl"},
        "method": "lora",
        "training": {"maxSteps": 100},
        "resources": {"gpuType": gpu_type, "gpusPerPod": gpus, "pods": pods},
        "output": {"uri": f"s3://outputs/{name}"},
    }
    labels = spec_overrides.pop("labels", None)
    for key, value in spec_overrides.items():
        spec[key] = value
    meta: dict[str, Any] = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "FineTuneJob", "metadata": meta, "spec": spec}


class FtjClient:
    """Thin typed access to FineTuneJobs, their children and pods for tests."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.objects = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)

    def create(self, ns: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create a FineTuneJob."""
        return self.objects.create_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, manifest)

    def get(self, ns: str, name: str) -> dict[str, Any]:
        """Read a FineTuneJob."""
        return self.objects.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name)

    def status(self, ns: str, name: str) -> dict[str, Any]:
        """Its status ({} when none)."""
        return self.get(ns, name).get("status") or {}

    def patch_spec(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the spec."""
        return self.objects.patch_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name,
                                                           {"spec": spec})

    def delete(self, ns: str, name: str) -> None:
        """Delete the FineTuneJob (children go by garbage collection)."""
        self.objects.delete_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name)

    def jobs(self, ns: str) -> list[Any]:
        """All batch Jobs in the namespace."""
        return self.batch.list_namespaced_job(ns).items

    def pods(self, ns: str, name: str, phase: str | None = None) -> list[Any]:
        """Trainer pods of a FineTuneJob (optionally of one phase), oldest first."""
        items = self.core.list_namespaced_pod(
            ns, label_selector=f"{JOB_NAME_LABEL}={name},{COMPONENT_LABEL}=trainer").items
        items = [p for p in items if phase is None or p.status.phase == phase]
        return sorted(items, key=lambda p: p.metadata.creation_timestamp)

    def running_pod(self, ns: str, name: str, index: int) -> Any | None:
        """The newest Running, not-deleting trainer pod with this completion index."""
        found = [p for p in self.pods(ns, name, "Running") if p.metadata.deletion_timestamp is None
                 and (p.metadata.annotations or {}).get(COMPLETION_INDEX_ANNOTATION) == str(index)]
        return found[-1] if found else None

    def events(self, ns: str, name: str) -> list[tuple[str, str]]:
        """(reason, message) of Events about the FineTuneJob."""
        items = self.core.list_namespaced_event(
            ns, field_selector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob").items
        return [(e.reason, e.message) for e in items]

    def wait_events(self, ns: str, name: str, *reasons: str, timeout: float = 30.0) -> list[tuple[str, str]]:
        """events() once an Event of each reason is there. The operator posts a pass's Events right after the
        status write of that pass, so a test that has just seen the status may list the Events a moment early."""
        def all_there() -> list[tuple[str, str]] | None:
            events = self.events(ns, name)
            return events if set(reasons) <= {reason for reason, _ in events} else None

        return wait_for(all_there, timeout, lambda: f"Events {reasons} about {ns}/{name}; seen {self.events(ns, name)}")


def summary_json(name: str, *, status: str = "Succeeded", reason: str = "Completed", message: str = "",
                 step: int = 100, total: int = 100) -> str:
    """A termination summary (docs/contracts.md §5) as the trainer writes it."""
    base = f"s3://outputs/{name}"
    data = {"version": 1, "status": status, "reason": reason, "message": message,
            "step": step, "totalSteps": total, "epoch": 1.0, "trainLoss": 1.23, "evalLoss": 1.31,
            "perplexity": 3.7, "tokens": 123456, "runtimeSeconds": 61.2, "tokensPerSecond": 2017.0,
            "artifacts": {"adapter": f"{base}/final/adapter", "merged": "", "model": "",
                          "metrics": f"{base}/final/metrics.json"} if status == "Succeeded" else {},
            "checkpoint": {"step": step, "uri": f"{base}/checkpoints/step-{step}"}}
    return json.dumps(data)


class ProgressServer:
    """Serves a settable /progress JSON on 127.0.0.1 (stands in for the rank-0 trainer endpoint)."""

    def __init__(self) -> None:
        self.payload: dict[str, Any] | None = None
        self.requests = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server API
                outer.requests += 1
                body = json.dumps(outer.payload).encode() if outer.payload and self.path == "/progress" else b""
                self.send_response(200 if body else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "ProgressServer":
        """Serve in a daemon thread."""
        self.thread.start()
        return self

    def set(self, payload: dict[str, Any] | None) -> None:
        """Set (or clear, with None) what /progress returns."""
        self.payload = copy.deepcopy(payload)

    def stop(self) -> None:
        """Shut the server down."""
        self.server.shutdown()
        self.server.server_close()


def free_gpus_by_node(api: client.ApiClient, product: str) -> dict[str, int]:
    """Unrequested `nvidia.com/gpu` per node with this `nvidia.com/gpu.product`, counting every pod bound to
    the node that has not finished (a Terminating pod still holds its GPUs for the scheduler)."""
    core = client.CoreV1Api(api)
    nodes = core.list_node(label_selector=f"nvidia.com/gpu.product={product}").items
    free = {n.metadata.name: int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) for n in nodes}
    for pod in core.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed").items:
        if pod.spec.node_name in free:
            for c in pod.spec.containers:
                free[pod.spec.node_name] -= int(((c.resources and c.resources.limits) or {}).get("nvidia.com/gpu", "0"))
    return free


def gpu_type_with_free_gpus(api: client.ApiClient, gpus: int, products: tuple[str, ...] = (
        "NVIDIA-L4", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3")) -> str:
    """The first GPU product (in the given order) with a node that has `gpus` unrequested GPUs, so a test does not
    depend on what earlier tests' jobs (in namespaces still terminating) hold; raises when none has."""
    free = {product: max(free_gpus_by_node(api, product).values(), default=0) for product in products}
    for product in products:
        if free[product] >= gpus:
            return product
    raise RuntimeError(f"no node has {gpus} free GPUs: {free}")


def wait_for_free_gpus(api: client.ApiClient, product: str, gpus: int, timeout: float = 120) -> None:
    """Wait until one node of this GPU product has `gpus` unrequested GPUs (jobs of earlier tests in namespaces
    still being deleted can hold a small GPU type for a while)."""
    wait_for(lambda: max(free_gpus_by_node(api, product).values(), default=0) >= gpus, timeout,
             lambda: f"{gpus} free {product} GPU(s) on one node; free now: {free_gpus_by_node(api, product)}")


def wait_phase(ftj: FtjClient, ns: str, name: str, phase: str, timeout: float = 40) -> dict[str, Any]:
    """Wait for the FineTuneJob's status.phase == phase; the timeout message shows the last status."""
    last: dict[str, Any] = {}

    def check() -> dict[str, Any] | None:
        nonlocal last
        last = ftj.status(ns, name)
        return last if last.get("phase") == phase else None

    return wait_for(check, timeout, lambda: f"{ns}/{name} phase {phase}; last status: {json.dumps(last)[:1500]}")


ARGOCD_HEALTH_SCRIPT = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "argocd" / "health-finetunejob.lua"


def argocd_health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the chart's Argo CD health check (Lua, via lupa from the dev extra) on a FineTuneJob: (status, message)."""
    import lupa

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(ARGOCD_HEALTH_SCRIPT.read_text())
    return hs["status"], hs["message"]
