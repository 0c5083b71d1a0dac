"""A local "process node": a Node in the local cluster whose pods run as local processes.

It registers Node `<name>` (label `kubetune.io/process-node: "true"`, allocatable cpu/memory/pods from its
config; no GPUs, unless `gpus` asks for simulated ones: `nvidia.com/gpu` and the GPU feature labels of
`gpu_product`, whose pods still compute on the CPU), keeps it Ready (a Lease in kube-node-lease renewed every 10 s
plus a status heartbeat), and runs every pod bound to it (`spec.nodeName == name`):

- each container runs `command + args` (an image's entrypoint is unknown here, so `command` is
  required) in its own process group, with cwd `<pod dir>/work`;
- env: the node's own environment (PATH etc.), then the container's `env` / `envFrom` with
  `$(VAR)` expansion and `valueFrom.fieldRef` (metadata.name/namespace/uid/labels/annotations,
  spec.nodeName, spec.serviceAccountName, status.podIP/hostIP = 127.0.0.1), `resourceFieldRef`,
  `configMapKeyRef` and `secretKeyRef`;
- volumes are local directories: configMap/secret (files materialized from the object's data,
  honouring `items`), emptyDir (fresh per pod), persistentVolumeClaim (`<data-root>/pvc/<claimName>`,
  shared by all process nodes with the same data root, so `pvc://claim/path` lives in
  `<data-root>/pvc/claim/path`), hostPath (the path itself), projected/downwardAPI (configMap,
  downwardAPI and namespace files);
- every env value (and every command/args word) that starts with a volume's mountPath is rewritten
  to the local directory backing it (docs/contracts.md §3), and the container's
  terminationMessagePath (default /dev/termination-log) to a per-container file; a parent of
  mountPaths that all map below one local directory is rewritten too (KUBETUNE_PVC_ROOT=/mnt/pvc with
  PVCs mounted at /mnt/pvc/<claim> becomes <data-root>/pvc);
- PATH: the node's environment is inherited, with the node's Python bin dir (the venv) first, so
  `command: [kubetune-train, ...]` finds the venv's console script;
- in-cluster DNS names (`*.svc`, `*.svc.cluster.local`, e.g. KUBETUNE_MASTER_ADDR
  `<job>-trainer-0.<job>-trainer.<ns>.svc`) in env values are rewritten to 127.0.0.1: all pods of
  all process nodes run on this machine, and /etc/hosts cannot be changed per process;
- stdout+stderr go to `<data-root>/nodes/<node>/pods/<ns>_<pod>_<uid8>/logs/<container>.log`; the pod
  carries that directory in annotation `node.kubetune.io/pod-dir`; `kubetune-dev node logs <ns>/<pod>`
  prints it (`kubectl logs` cannot work: there is no kubelet API);
- status: Pending -> Running (podIP 127.0.0.1, containerStatuses running, containerID
  `process://<pid>`) -> Succeeded (all exit 0) / Failed (exitCode, reason Completed/Error, message =
  the termination message file, or the log tail for FallbackToLogsOnError). Containers are not
  restarted; init containers are not supported (the pod fails with reason InitContainersUnsupported);
- deleting a pod (deletionTimestamp) SIGTERMs the process groups, SIGKILLs them after the grace
  period (at most `max_grace_seconds`), marks the pod Failed (as a kubelet does), then deletes it with
  grace period 0.

Run it in a thread (`Cluster.start_process_node(name, data_root, cpu="4")`, the pytest fixture
`process_nodes`) or as a command:

    kubetune-dev node run --kubeconfig KUBECONFIG --name process-node-0 --data-root DIR [--cpu 4 --memory 16Gi]
    kubetune-dev node logs NAMESPACE/POD [-c CONTAINER] [--kubeconfig KUBECONFIG]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kubetune import fleet_file
from kubetune.fleet_file import GPU_RESOURCE, NodeGroup

from .procs import group_alive, spawn

log = logging.getLogger("kubetune.process_node")

PROCESS_NODE_LABEL = "kubetune.io/process-node"
POD_DIR_ANNOTATION = "node.kubetune.io/pod-dir"
LOCAL_IP = "127.0.0.1"
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
_SVC_NAME = re.compile(r"(?<![A-Za-z0-9.-])(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+svc(?:\.cluster\.local)?\.?"
                       r"(?![A-Za-z0-9-])")
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


# --------------------------------------------------------------------------- pure helpers
def expand_vars(value: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined vars are substituted, `$$` escapes `$`, others stay."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)
    return _VAR_REF.sub(sub, value)


def rewrite_path(value: str, mounts: list[tuple[str, str]]) -> str:
    """Map a path under a mountPath (longest first) to the local directory backing it; a parent directory
    of mountPaths that all map below one local directory (e.g. /mnt/pvc for /mnt/pvc/<claim> ->
    <data-root>/pvc/<claim>) maps to that directory."""
    for mount_path, local in mounts:
        base = mount_path.rstrip("/") or "/"
        if value == base or value.startswith(base + "/") or (base == "/" and value.startswith("/")):
            rest = value[len(base):] if base != "/" else value
            return local.rstrip("/") + rest if rest else local
    parent = _common_parent_mapping(value, mounts)
    return parent if parent is not None else value


def _common_parent_mapping(value: str, mounts: list[tuple[str, str]]) -> str | None:
    base = value.rstrip("/")
    if not base.startswith("/"):
        return None
    roots = set()
    for mount_path, local in mounts:
        if mount_path.startswith(base + "/"):
            rel = mount_path[len(base):].rstrip("/")
            if not local.rstrip("/").endswith(rel):
                return None
            roots.add(local.rstrip("/")[: -len(rel)])
    return roots.pop() if len(roots) == 1 else None


def rewrite_service_names(value: str) -> str:
    """Replace in-cluster DNS names (`*.svc`, `*.svc.cluster.local`) with 127.0.0.1."""
    return _SVC_NAME.sub(LOCAL_IP, value)


def field_ref_value(pod: dict[str, Any], path: str) -> str:
    """Resolve a downward-API fieldPath for a pod run as a local process."""
    meta = pod.get("metadata", {})
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {
        "metadata.name": meta.get("name", ""), "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""), "spec.nodeName": pod.get("spec", {}).get("nodeName", ""),
        "spec.serviceAccountName": pod.get("spec", {}).get("serviceAccountName", ""),
        "status.podIP": LOCAL_IP, "status.podIPs": LOCAL_IP, "status.hostIP": LOCAL_IP, "status.hostIPs": LOCAL_IP,
    }
    if path in {"metadata.labels", "metadata.annotations"}:
        return "\n".join(f'{k}="{v}"' for k, v in sorted((meta.get(path.split(".")[1]) or {}).items()))
    if path not in simple:
        raise ValueError(f"unsupported fieldRef fieldPath {path!r}")
    return simple[path]


_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
           "Ti": 2**40}


def parse_quantity(q: str) -> float:
    """A Kubernetes quantity ("500m", "2Gi") as a float."""
    m = _QUANTITY.match(str(q))
    if not m or m.group(2) not in _SUFFIX:
        raise ValueError(f"cannot parse quantity {q!r}")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def resource_field_value(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """Resolve a resourceFieldRef (limits/requests cpu/memory/ephemeral-storage) like the kubelet (rounded up)."""
    kind, _, res = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    value = (resources.get(kind) or {}).get(res) or (resources.get("limits") or {}).get(res)
    if value is None:
        value = "1" if res == "cpu" else "0"
    divisor = parse_quantity(ref.get("divisor") or "1")
    import math
    return str(max(1 if res == "cpu" else 0, math.ceil(parse_quantity(value) / divisor)))


Lookup = Callable[[str, str, str], dict[str, str] | None]  # (kind, namespace, name) -> data or None


class MissingReference(Exception):
    """A ConfigMap/Secret (or key) that a pod needs does not exist yet."""


def _ref_data(lookup: Lookup, kind: str, ns: str, ref: dict[str, Any]) -> dict[str, str] | None:
    data = lookup(kind, ns, ref.get("name", ""))
    if data is None and not ref.get("optional"):
        raise MissingReference(f"{kind} {ns}/{ref.get('name')} not found")
    return data


def container_env(pod: dict[str, Any], container: dict[str, Any], lookup: Lookup) -> dict[str, str]:
    """The container's declared environment (envFrom, then env with $(VAR) expansion), before path rewriting."""
    ns = pod["metadata"].get("namespace", "default")
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind in ("configMap", "secret"):
            ref = src.get(f"{kind}Ref")
            if ref:
                data = _ref_data(lookup, kind, ns, ref) or {}
                env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "value" in item or "valueFrom" not in item:
            env[name] = expand_vars(item.get("value", ""), env)
            continue
        vf = item["valueFrom"]
        if "fieldRef" in vf:
            env[name] = field_ref_value(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = resource_field_value(container, vf["resourceFieldRef"])
        else:
            kind = "configMap" if "configMapKeyRef" in vf else "secret"
            ref = vf.get(f"{kind}KeyRef") or {}
            data = _ref_data(lookup, kind, ns, ref)
            if data is not None and ref.get("key") in data:
                env[name] = data[ref["key"]]
            elif not ref.get("optional"):
                raise MissingReference(f"key {ref.get('key')!r} not in {kind} {ns}/{ref.get('name')}")
    return env


def parent_mounts(mounts: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Parents of mountPaths whose mounts all keep the same relative layout locally, e.g. /mnt/pvc for
    /mnt/pvc/<claim> -> <data-root>/pvc/<claim>: an env value naming the parent (KUBETUNE_PVC_ROOT) maps too."""
    candidates: dict[str, set[str | None]] = {}
    for mount_path, local in mounts:
        parts = mount_path.rstrip("/").split("/")
        for cut in range(2, len(parts)):
            parent = "/".join(parts[:cut])
            rel = mount_path.rstrip("/")[len(parent):]
            ok = local.rstrip("/").endswith(rel)
            candidates.setdefault(parent, set()).add(local.rstrip("/")[:-len(rel)] if ok else None)
    own = {m for m, _ in mounts}
    return [(p, next(iter(locals_))) for p, locals_ in candidates.items()
            if len(locals_) == 1 and None not in locals_ and p not in own]


def localize_env(env: dict[str, str], mounts: list[tuple[str, str]]) -> dict[str, str]:
    """Rewrite mount paths (and parents of mounts, see parent_mounts) to local directories and in-cluster DNS
    names to 127.0.0.1."""
    pairs = sorted(mounts + parent_mounts(mounts), key=lambda p: len(p[0]), reverse=True)
    return {k: rewrite_service_names(rewrite_path(v, pairs)) for k, v in env.items()}


def container_argv(container: dict[str, Any], env: dict[str, str], mounts: list[tuple[str, str]]) -> list[str]:
    """command + args with $(VAR) expansion and mount paths rewritten word by word."""
    if not container.get("command"):
        raise ValueError(f"container {container['name']!r} has no command: a process node cannot run an image's "
                         "entrypoint, give the pod an explicit command")
    words = list(container["command"]) + list(container.get("args") or [])
    return [rewrite_path(expand_vars(w, env), mounts) for w in words]


def volume_mounts(container: dict[str, Any], volume_dirs: dict[str, str], termination: tuple[str, str]
                  ) -> list[tuple[str, str]]:
    """(mountPath, local path) pairs, longest mountPath first, plus the termination message file."""
    pairs = [termination]
    for m in container.get("volumeMounts") or []:
        local = volume_dirs.get(m["name"])
        if local is None:
            raise ValueError(f"volumeMount {m['name']!r} refers to no volume of the pod")
        if m.get("subPath"):
            local = os.path.join(local, m["subPath"])
        pairs.append((m["mountPath"], local))
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pod_dir_name(pod: dict[str, Any]) -> str:
    """<namespace>_<name>_<uid prefix>."""
    meta = pod["metadata"]
    return f"{meta.get('namespace', 'default')}_{meta['name']}_{meta.get('uid', '')[:8]}"


# --------------------------------------------------------------------------- runtime
@dataclass
class ProcessNodeConfig:
    """What the node offers and where it keeps files."""

    name: str
    data_root: Path
    cpu: str = "4"
    memory: str = "16Gi"
    pods: int = 20
    ephemeral_storage: str = "100Gi"
    labels: dict[str, str] = field(default_factory=dict)
    # Simulated GPUs: the node advertises `nvidia.com/gpu` and the GPU feature discovery labels of this product, so
    # the scheduler, the sizer and the cost accounting treat it as a GPU node; its pods still compute on the CPU.
    gpus: int = 0
    gpu_product: str = "KUBETUNE-PROCESS-GPU"
    gpu_memory_mib: int = 16384
    poll_interval: float = 0.3
    lease_duration_seconds: int = 40
    heartbeat_interval: float = 10.0
    max_grace_seconds: float = 10.0
    delete_node_on_stop: bool = True

    @property
    def pvc_root(self) -> Path:
        """Where persistentVolumeClaim volumes live: <data_root>/pvc/<claimName>."""
        return Path(self.data_root) / "pvc"

    @property
    def pods_root(self) -> Path:
        """Per-pod directories of this node."""
        return Path(self.data_root) / "nodes" / self.name / "pods"


@dataclass
class ContainerRun:
    """One container running as a process."""

    name: str
    log_path: Path
    termination_path: Path
    termination_policy: str
    image: str
    proc: subprocess.Popen | None = None
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    start_error: str = ""

    def poll(self) -> int | None:
        """Exit code once the process (and its group) ended."""
        if self.exit_code is None and self.proc is not None:
            code = self.proc.poll()
            if code is not None:
                self.exit_code = 128 - code if code < 0 else code  # killed by signal N -> 128+N
                self.finished_at = _now()
        return self.exit_code

    def message(self) -> str:
        """Termination message: the file, else (FallbackToLogsOnError and failed) the log tail."""
        if self.start_error:
            return self.start_error
        try:
            text = self.termination_path.read_bytes()[:4096].decode(errors="replace")
        except OSError:
            text = ""
        if not text and self.termination_policy == "FallbackToLogsOnError" and self.exit_code:
            try:
                lines = self.log_path.read_bytes().decode(errors="replace").splitlines()[-80:]
                text = "\n".join(lines)[-2048:]
            except OSError:
                pass
        return text

    def status(self) -> dict[str, Any]:
        """The containerStatuses entry."""
        base = {"name": self.name, "image": self.image, "imageID": "", "restartCount": 0,
                "containerID": f"process://{self.proc.pid}" if self.proc else ""}
        if self.exit_code is None:
            return {**base, "ready": True, "started": True, "state": {"running": {"startedAt": self.started_at}}}
        terminated = {"exitCode": self.exit_code, "reason": "Completed" if self.exit_code == 0 else "Error",
                      "message": self.message(), "startedAt": self.started_at or self.finished_at,
                      "finishedAt": self.finished_at}
        if self.start_error:
            terminated["reason"] = "StartError"
        return {**base, "ready": False, "started": False, "state": {"terminated": terminated}}


@dataclass
class PodRun:
    """A pod's processes and bookkeeping."""

    namespace: str
    name: str
    uid: str
    pod_dir: Path
    containers: list[ContainerRun]
    started_at: str
    kill_deadline: float | None = None
    reported_terminal: bool = False

    def alive(self) -> bool:
        """Any container process (group) still running."""
        return any(c.proc is not None and (c.proc.poll() is None or group_alive(c.proc.pid)) for c in self.containers)

    def signal(self, sig: int) -> None:
        """Send sig to every container's process group."""
        for c in self.containers:
            if c.proc is not None:
                try:
                    os.killpg(c.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass


class ProcessNode:
    """Registers the node, heartbeats, and runs its pods as processes (see the module docstring)."""

    def __init__(self, config: ProcessNodeConfig, api_client_factory: Callable[[], Any]) -> None:
        self.config = config
        self._api_factory = api_client_factory
        self.runs: dict[str, PodRun] = {}
        self._deleted: set[str] = set()
        self._waiting_reported: dict[str, str] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[str] = []

    @property
    def name(self) -> str:
        """The Node name."""
        return self.config.name

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> "ProcessNode":
        """Register the node and start the heartbeat and pod loops in daemon threads."""
        from kubernetes import client

        self._core = client.CoreV1Api(self._api_factory())
        self.config.pvc_root.mkdir(parents=True, exist_ok=True)
        self.config.pods_root.mkdir(parents=True, exist_ok=True)
        self.register()
        for target, tname in ((self._heartbeat_loop, "heartbeat"), (self._pod_loop, "pods")):
            t = threading.Thread(target=target, name=f"{self.name}-{tname}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def run_forever(self) -> None:
        """Run until stop() (or SIGTERM/SIGINT when called from the CLI)."""
        self.start()
        while not self._stop.is_set():
            self._stop.wait(0.5)

    def stop(self) -> None:
        """Kill all pod processes, stop the loops, delete the Node (if configured)."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        for run in list(self.runs.values()):
            run.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while any(r.alive() for r in self.runs.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for run in self.runs.values():
            run.signal(signal.SIGKILL)
        if self.config.delete_node_on_stop:
            try:
                self._core.delete_node(self.name)
            except Exception:  # noqa: BLE001 - the apiserver may already be gone
                pass

    # ----------------------------------------------------------------- node
    def node_manifest(self) -> dict[str, Any]:
        """The Node object with a Ready status."""
        c = self.config
        resources = {"cpu": c.cpu, "memory": c.memory, "pods": str(c.pods), "ephemeral-storage": c.ephemeral_storage}
        labels = {PROCESS_NODE_LABEL: "true", "kubernetes.io/hostname": c.name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64"}
        if c.gpus:
            gpu_node = fleet_file.node_manifest(NodeGroup(namePrefix=c.name, count=1, gpuProduct=c.gpu_product,
                                                          gpuMemoryMiB=c.gpu_memory_mib, gpusPerNode=c.gpus), c.name)
            labels.update({k: v for k, v in gpu_node["metadata"]["labels"].items() if k.startswith("nvidia.com/")})
            resources[GPU_RESOURCE] = str(c.gpus)
        labels.update(c.labels)
        return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": c.name, "labels": labels},
                "spec": {}, "status": {"capacity": resources, "allocatable": resources,
                                       "conditions": self._conditions(),
                                       "addresses": [{"type": "InternalIP", "address": LOCAL_IP},
                                                     {"type": "Hostname", "address": c.name}],
                                       "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                                    "kubeletVersion": "kubetune-process-node",
                                                    "containerRuntimeVersion": "process://local",
                                                    "kernelVersion": os.uname().release, "osImage": "local",
                                                    "bootID": "", "machineID": "", "systemUUID": "",
                                                    "kubeProxyVersion": ""}}}

    def _conditions(self) -> list[dict[str, str]]:
        now = _now()
        rows = [("Ready", "True", "KubeletReady", "process node is running pods as local processes"),
                ("MemoryPressure", "False", "KubeletHasSufficientMemory", ""),
                ("DiskPressure", "False", "KubeletHasNoDiskPressure", ""),
                ("PIDPressure", "False", "KubeletHasSufficientPID", "")]
        return [{"type": t, "status": s, "reason": r, "message": m, "lastHeartbeatTime": now,
                 "lastTransitionTime": now} for t, s, r, m in rows]

    def register(self) -> None:
        """Create the Node, or refresh its labels and status when it exists."""
        from kubernetes.client.rest import ApiException

        manifest = self.node_manifest()
        try:
            self._core.create_node(manifest)
        except ApiException as e:
            if e.status != 409:
                raise
            self._core.patch_node(self.name, {"metadata": {"labels": manifest["metadata"]["labels"]}})
            self._core.patch_node_status(self.name, {"status": manifest["status"]})

    def _renew_lease(self, coord: Any, node_uid: str) -> None:
        from kubernetes.client.rest import ApiException

        body = {"metadata": {"name": self.name, "namespace": "kube-node-lease",
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": self.name,
                                                  "uid": node_uid}]},
                "spec": {"holderIdentity": self.name, "leaseDurationSeconds": self.config.lease_duration_seconds,
                         "renewTime": _micro_now()}}
        try:
            coord.patch_namespaced_lease(self.name, "kube-node-lease", {"spec": body["spec"]})
        except ApiException as e:
            if e.status != 404:
                raise
            coord.create_namespaced_lease("kube-node-lease", body)

    def _heartbeat_loop(self) -> None:
        from kubernetes import client

        api = self._api_factory()
        core, coord = client.CoreV1Api(api), client.CoordinationV1Api(api)
        last_status = 0.0
        while not self._stop.is_set():
            try:
                node_uid = core.read_node(self.name).metadata.uid
                self._renew_lease(coord, node_uid)
                if time.monotonic() - last_status > 30:
                    core.patch_node_status(self.name, {"status": {"conditions": self._conditions()}})
                    last_status = time.monotonic()
            except Exception as e:  # noqa: BLE001 - keep heartbeating; the apiserver may blip
                if self._stop.is_set():
                    return
                log.warning("%s heartbeat failed: %s", self.name, e)
                if getattr(e, "status", None) == 404:
                    try:
                        self.register()
                    except Exception:  # noqa: BLE001
                        pass
            self._stop.wait(self.config.heartbeat_interval)

    # ----------------------------------------------------------------- pods
    def _pod_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync_once()
            except Exception as e:  # noqa: BLE001 - report and keep going
                if self._stop.is_set():
                    return
                log.exception("%s pod sync failed", self.name)
                self._errors.append(str(e))
            self._stop.wait(self.config.poll_interval)

    def _list_pods(self) -> list[dict[str, Any]]:
        resp = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.name}",
                                                      _preload_content=False)
        return json.loads(resp.data)["items"]

    def sync_once(self) -> None:
        """One pass: start new pods, report finished ones, carry out deletions."""
        pods = self._list_pods()
        seen = set()
        for pod in pods:
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            run = self.runs.get(uid)
            if pod["metadata"].get("deletionTimestamp"):
                self._handle_deletion(pod, run)
            elif run is not None:
                self._report_if_finished(run)
            elif pod.get("status", {}).get("phase") not in {"Succeeded", "Failed"}:
                self._start_pod(pod)
        for uid in list(self.runs):
            if uid not in seen:  # force-deleted behind our back
                run = self.runs.pop(uid)
                run.signal(signal.SIGKILL)
        self._deleted &= seen

    def _handle_deletion(self, pod: dict[str, Any], run: PodRun | None) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        meta = pod["metadata"]
        if run is not None and run.alive():
            if run.kill_deadline is None:
                grace = min(float(meta.get("deletionGracePeriodSeconds") or 30), self.config.max_grace_seconds)
                run.kill_deadline = time.monotonic() + grace
                run.signal(signal.SIGTERM)
            elif time.monotonic() >= run.kill_deadline:
                run.signal(signal.SIGKILL)
            return
        if meta["uid"] in self._deleted:
            return
        if run is not None:
            self.runs.pop(meta["uid"], None)
            # A kubelet marks a deleted pod terminal before it goes: the Job controller then counts it and
            # removes its tracking finalizer, so a namespace holding the pod can finish terminating.
            if not run.reported_terminal and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                try:
                    for container in run.containers:
                        container.poll()  # record the exit codes of the killed processes
                    self._patch_status(run, phase="Failed")
                    run.reported_terminal = True
                except ApiException as e:
                    if e.status not in (404, 409):
                        raise
        try:
            self._core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                             body=client.V1DeleteOptions(grace_period_seconds=0,
                                                                         preconditions={"uid": meta["uid"]}))
        except ApiException as e:
            if e.status not in (404, 409):
                raise
        self._deleted.add(meta["uid"])

    def _lookup(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        from kubernetes.client.rest import ApiException

        try:
            if kind == "configMap":
                obj = json.loads(self._core.read_namespaced_config_map(name, ns, _preload_content=False).data)
                data = dict(obj.get("data") or {})
                data.update({k: base64.b64decode(v).decode("latin-1") for k, v in (obj.get("binaryData") or {}).items()})
                return data
            obj = json.loads(self._core.read_namespaced_secret(name, ns, _preload_content=False).data)
            data = {k: base64.b64decode(v).decode("utf-8", errors="surrogateescape")
                    for k, v in (obj.get("data") or {}).items()}
            data.update(obj.get("stringData") or {})
            return data
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _materialize_volumes(self, pod: dict[str, Any], pod_dir: Path) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        dirs: dict[str, str] = {}
        for vol in pod["spec"].get("volumes") or []:
            name = vol["name"]
            local = pod_dir / "volumes" / name
            if "persistentVolumeClaim" in vol:
                local = self.config.pvc_root / vol["persistentVolumeClaim"]["claimName"]
                local.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in vol:
                local = Path(vol["hostPath"]["path"])
            elif "configMap" in vol or "secret" in vol:
                kind = "configMap" if "configMap" in vol else "secret"
                src = vol[kind]
                ref = {"name": src.get("name") or src.get("secretName"), "optional": src.get("optional")}
                data = _ref_data(self._lookup, kind, ns, ref) or {}
                self._write_items(local, data, src.get("items"), kind, ns, ref["name"])
            elif "projected" in vol:
                local.mkdir(parents=True, exist_ok=True)
                for source in vol["projected"].get("sources") or []:
                    if "configMap" in source or "secret" in source:
                        kind = "configMap" if "configMap" in source else "secret"
                        src = source[kind]
                        data = _ref_data(self._lookup, kind, ns, src) or {}
                        self._write_items(local, data, src.get("items"), kind, ns, src.get("name", ""))
                    elif "downwardAPI" in source:
                        self._write_downward(local, pod, source["downwardAPI"].get("items") or [])
                    elif "serviceAccountToken" in source:
                        (local / source["serviceAccountToken"].get("path", "token")).write_text("")
                (local / "namespace").write_text(ns)
            elif "downwardAPI" in vol:
                local.mkdir(parents=True, exist_ok=True)
                self._write_downward(local, pod, vol["downwardAPI"].get("items") or [])
            else:  # emptyDir and anything else: a fresh directory
                local.mkdir(parents=True, exist_ok=True)
            dirs[name] = str(local)
        return dirs

    @staticmethod
    def _write_items(local: Path, data: dict[str, str], items: list[dict[str, Any]] | None, kind: str, ns: str,
                     name: str) -> None:
        local.mkdir(parents=True, exist_ok=True)
        pairs = [(i["key"], i.get("path", i["key"])) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key not in data:
                raise MissingReference(f"key {key!r} not in {kind} {ns}/{name}")
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[key].encode("utf-8", errors="surrogateescape"))

    @staticmethod
    def _write_downward(local: Path, pod: dict[str, Any], items: list[dict[str, Any]]) -> None:
        for item in items:
            if "fieldRef" in item:
                target = local / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(field_ref_value(pod, item["fieldRef"]["fieldPath"]))

    def _start_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        pod_dir = self.config.pods_root / pod_dir_name(pod)
        if spec.get("initContainers"):
            self._fail_unstartable(pod, pod_dir, "InitContainersUnsupported",
                                   "the process node does not run init containers")
            return
        try:
            volume_dirs = self._materialize_volumes(pod, pod_dir)
            plans = []
            for container in spec["containers"]:
                cdir = pod_dir / "containers" / container["name"]
                cdir.mkdir(parents=True, exist_ok=True)
                term = cdir / "termination-log"
                term.write_text("")
                mounts = volume_mounts(container, volume_dirs,
                                       (container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH, str(term)))
                declared = container_env(pod, container, self._lookup)
                env = {**self._base_env(), "HOSTNAME": spec.get("hostname") or name, **localize_env(declared, mounts)}
                plans.append((container, term, env, container_argv(container, declared, mounts), mounts))
        except MissingReference as e:
            self._report_waiting(pod, "CreateContainerConfigError", str(e))
            return
        except ValueError as e:
            self._fail_unstartable(pod, pod_dir, "CreateContainerConfigError", str(e))
            return
        work = pod_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        runs = []
        for container, term, env, argv, mounts in plans:
            crun = ContainerRun(container["name"], pod_dir / "logs" / f"{container['name']}.log", term,
                                container.get("terminationMessagePolicy", "File"), container.get("image", ""))
            cwd = rewrite_path(container["workingDir"], mounts) if container.get("workingDir") else str(work)
            if not os.path.isdir(cwd):
                cwd = str(work)
            crun.started_at = _now()
            try:
                with open(crun.log_path.parent.mkdir(parents=True, exist_ok=True) or crun.log_path, "ab") as f:
                    f.write(f"# {_now()} {shlex.join(argv)}\n".encode())
                crun.proc = spawn(argv, crun.log_path, env=env, cwd=cwd)
            except OSError as e:
                crun.start_error = f"cannot start {argv[0]!r}: {e}"
                crun.exit_code = 127 if isinstance(e, FileNotFoundError) else 126
                crun.finished_at = _now()
            runs.append(crun)
        run = PodRun(ns, name, uid, pod_dir, runs, _now())
        self.runs[uid] = run
        self._waiting_reported.pop(uid, None)
        self._annotate(pod, pod_dir)
        self._patch_status(run, phase="Running")
        self._report_if_finished(run)

    @staticmethod
    def _base_env() -> dict[str, str]:
        """The node's environment, with this Python's bin dir (the venv's console scripts) first on PATH."""
        env = dict(os.environ)
        bin_dir = os.path.dirname(sys.executable)
        path = env.get("PATH", "")
        if bin_dir not in path.split(os.pathsep):
            env["PATH"] = bin_dir + (os.pathsep + path if path else "")
        return env

    def _annotate(self, pod: dict[str, Any], pod_dir: Path) -> None:
        meta = pod["metadata"]
        try:
            self._core.patch_namespaced_pod(meta["name"], meta["namespace"],
                                            {"metadata": {"annotations": {POD_DIR_ANNOTATION: str(pod_dir)}}})
        except Exception as e:  # noqa: BLE001 - only a convenience for `kubetune-dev node logs`
            log.warning("cannot annotate pod %s/%s: %s", meta["namespace"], meta["name"], e)

    def _report_waiting(self, pod: dict[str, Any], reason: str, message: str) -> None:
        uid = pod["metadata"]["uid"]
        if self._waiting_reported.get(uid) == message:
            return
        self._waiting_reported[uid] = message
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                     "restartCount": 0, "started": False,
                     "state": {"waiting": {"reason": reason, "message": message}}} for c in pod["spec"]["containers"]]
        self._core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                               {"status": {"phase": "Pending", "hostIP": LOCAL_IP,
                                                           "containerStatuses": statuses}})

    def _fail_unstartable(self, pod: dict[str, Any], pod_dir: Path, reason: str, message: str) -> None:
        now = _now()
        runs = [ContainerRun(c["name"], pod_dir / "logs" / f"{c['name']}.log", pod_dir / "none", "File",
                             c.get("image", ""), started_at=now, finished_at=now, exit_code=128,
                             start_error=f"{reason}: {message}") for c in pod["spec"]["containers"]]
        run = PodRun(pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"], pod_dir, runs, now)
        self.runs[run.uid] = run
        self._report_if_finished(run)

    def _report_if_finished(self, run: PodRun) -> None:
        if run.reported_terminal:
            return
        codes = [c.poll() for c in run.containers]
        if any(code is None for code in codes):
            return
        if run.alive():  # the main process ended but children in its group linger: stop them
            run.signal(signal.SIGKILL)
        phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        self._patch_status(run, phase=phase)
        run.reported_terminal = True

    def _patch_status(self, run: PodRun, phase: str) -> None:
        now = _now()
        running = phase == "Running"
        cond = "True" if running else "False"
        reason = {} if running else {"reason": "PodCompleted"}
        status = {
            "phase": phase, "hostIP": LOCAL_IP, "hostIPs": [{"ip": LOCAL_IP}], "podIP": LOCAL_IP,
            "podIPs": [{"ip": LOCAL_IP}], "startTime": run.started_at,
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": run.started_at},
                           {"type": "Initialized", "status": "True", "lastTransitionTime": run.started_at},
                           {"type": "ContainersReady", "status": cond, "lastTransitionTime": now, **reason},
                           {"type": "Ready", "status": cond, "lastTransitionTime": now, **reason}],
            "containerStatuses": [c.status() for c in run.containers],
        }
        self._core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status})


def create_local_pvc(api: Any, namespace: str, claim: str, data_root: str | Path, size: str = "10Gi") -> None:
    """Create a PersistentVolume (hostPath <data_root>/pvc/<claim>) pre-bound to a new PVC `claim`, so pods
    using the claim pass the scheduler's volume checks; the process node mounts the same directory."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(api) if not isinstance(api, client.CoreV1Api) else api
    path = Path(data_root) / "pvc" / claim
    path.mkdir(parents=True, exist_ok=True)
    pv_name = f"{namespace}-{claim}"
    pv = {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name,
                                                                        "labels": {PROCESS_NODE_LABEL: "true"}},
          "spec": {"capacity": {"storage": size}, "accessModes": ["ReadWriteMany"],
                   "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "kubetune-local",
                   "hostPath": {"path": str(path)}, "claimRef": {"namespace": namespace, "name": claim}}}
    pvc = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
           "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "kubetune-local", "volumeName": pv_name,
                    "resources": {"requests": {"storage": size}}}}
    for create in (lambda: core.create_persistent_volume(pv), lambda: core.create_namespaced_persistent_volume_claim(
            namespace, pvc)):
        try:
            create()
        except ApiException as e:
            if e.status != 409:
                raise


# --------------------------------------------------------------------------- CLI
def _logs(args: argparse.Namespace) -> int:
    from kubernetes import client, config as kconfig

    ns, _, name = args.pod.rpartition("/")
    ns = ns or "default"
    core = client.CoreV1Api(kconfig.new_client_from_config(config_file=args.kubeconfig))
    pod = core.read_namespaced_pod(name, ns)
    pod_dir = (pod.metadata.annotations or {}).get(POD_DIR_ANNOTATION)
    if not pod_dir:
        print(f"pod {ns}/{name} has no {POD_DIR_ANNOTATION} annotation: it is not run by a process node",
              file=sys.stderr)
        return 1
    containers = [args.container] if args.container else [c.name for c in pod.spec.containers]
    for c in containers:
        path = Path(pod_dir) / "logs" / f"{c}.log"
        if len(containers) > 1:
            print(f"==> {path} <==")
        sys.stdout.write(path.read_text(errors="replace") if path.exists() else f"(no log yet at {path})\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `kubetune-dev node`."""
    p = argparse.ArgumentParser(prog="kubetune-dev node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="register a process node and run its pods until interrupted")
    run.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    run.add_argument("--name", default="process-node-0")
    run.add_argument("--data-root", type=Path, required=True)
    run.add_argument("--cpu", default="4")
    run.add_argument("--memory", default="16Gi")
    run.add_argument("--pods", type=int, default=20)
    run.add_argument("--label", action="append", default=[], help="extra node label key=value")
    run.add_argument("--gpus", type=int, default=0,
                     help="simulated GPUs to advertise (nvidia.com/gpu + feature labels); pods compute on the CPU")
    run.add_argument("--gpu-product", default=ProcessNodeConfig.gpu_product, help="nvidia.com/gpu.product of them")
    run.add_argument("--gpu-memory-mib", type=int, default=ProcessNodeConfig.gpu_memory_mib,
                     help="nvidia.com/gpu.memory of them (what the sizer fits the job into)")
    logs = sub.add_parser("logs", help="print the logs of a pod run by a process node")
    logs.add_argument("pod", help="NAMESPACE/POD")
    logs.add_argument("-c", "--container")
    logs.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    args = p.parse_args(argv)
    if args.command == "logs":
        return _logs(args)
    if not args.kubeconfig:
        print("--kubeconfig (or KUBECONFIG) is required", file=sys.stderr)
        return 2
    from kubernetes import config as kconfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    labels = dict(item.split("=", 1) for item in args.label)
    node = ProcessNode(ProcessNodeConfig(name=args.name, data_root=args.data_root, cpu=args.cpu, memory=args.memory,
                                         pods=args.pods, labels=labels, gpus=args.gpus,
                                         gpu_product=args.gpu_product, gpu_memory_mib=args.gpu_memory_mib),
                       api_client_factory=lambda: kconfig.new_client_from_config(config_file=args.kubeconfig))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    print(f"process node {args.name} running; pods under {node.config.pods_root}, PVCs under {node.config.pvc_root}",
          file=sys.stderr, flush=True)
    try:
        while not stop.is_set():
            stop.wait(0.5)
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
