"""Cluster I/O for one FineTuneJob's children (sync kubernetes client; called from worker threads)."""

from __future__ import annotations

import json
import logging
import urllib.request
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune.builders import COMPONENT_LABEL, JOB_NAME_LABEL, plan_name, trainer_name
from kubetune.preflight import preflight_name
from kubetune.reconcile import pod_index

log = logging.getLogger("kubetune.children")


def body_of(resp: Any) -> bytes:
    """The body of a `_preload_content=False` response, read to the end: only a fully read response gives
    its connection back to the pool (an unread one made every next request open a new TLS connection,
    which was a third of the operator's CPU in a burst)."""
    return resp.data


class NotOwned(Exception):
    """A child's name is taken by an object that the FineTuneJob does not control."""

    def __init__(self, kind: str, name: str, owner: str, deleting: bool = False) -> None:
        state = "is being deleted" if deleting else "exists"
        super().__init__(f"{kind} {name} {state} and is not owned by this FineTuneJob (owner: {owner or 'none'})")
        self.kind, self.name, self.owner, self.deleting = kind, name, owner, deleting


class ChildRejected(Exception):
    """The apiserver refused a child with a client error that retrying the same request cannot fix."""

    def __init__(self, kind: str, name: str, code: int, detail: str) -> None:
        super().__init__(f"the apiserver refused {kind} {name} ({code}): {detail}")
        self.kind, self.name, self.code, self.detail = kind, name, code, detail

    @property
    def terminating_namespace(self) -> bool:
        """Whether the refusal is only the namespace being deleted (nothing to report)."""
        return self.code == 403 and "because it is being terminated" in self.detail

    @classmethod
    def from_api(cls, obj: dict[str, Any], exc: ApiException) -> "ChildRejected | None":
        """The refusal of `obj`, or None when `exc` is not a client error to report (conflicts, throttling,
        server errors are retried instead)."""
        code = int(exc.status or 0)
        if not 400 <= code < 500 or code in (408, 409, 429):
            return None
        detail = exc.reason or ""
        try:
            detail = json.loads(exc.body or "{}").get("message") or detail
        except (TypeError, ValueError):
            pass
        return cls(obj.get("kind", "object"), (obj.get("metadata") or {}).get("name", ""), code, str(detail))


class ChildClient:
    """Reads and writes the ConfigMap, Service, Job and pods of FineTuneJobs."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)

    def read_job(self, ns: str, job: str) -> dict[str, Any] | None:
        """The child Job, or None (raw JSON: every pass reads it, and client models would only be converted
        back to dicts)."""
        try:
            resp = self.batch.read_namespaced_job(trainer_name(job), ns, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(resp.data)

    def list_pods(self, ns: str, job: str) -> list[dict[str, Any]]:
        """Trainer pods of the job (raw JSON, as read_job)."""
        selector = f"{JOB_NAME_LABEL}={job},{COMPONENT_LABEL}=trainer"
        resp = self.core.list_namespaced_pod(ns, label_selector=selector, _preload_content=False)
        return list(json.loads(resp.data).get("items") or [])

    def other_children_exist(self, ns: str, job: str) -> bool:
        """Whether the ConfigMap or Service still exist."""
        for read, name in ((self.core.read_namespaced_config_map, plan_name(job)),
                           (self.core.read_namespaced_service, trainer_name(job))):
            try:
                body_of(read(name, ns, _preload_content=False))
                return True
            except ApiException as exc:
                if exc.status != 404:
                    raise
        return False

    def list_nodes(self) -> list[dict[str, Any]]:
        """All Nodes as dicts (for the sizer), from the apiserver's watch cache (resourceVersion=0) as raw JSON:
        a 250-node list is ~1.5 MB, and client models would only be converted back to dicts."""
        resp = self.core.list_node(resource_version="0", _preload_content=False)
        return list(json.loads(resp.data).get("items") or [])

    def apply(self, obj: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
        """Create a child; if one of that name exists and is ours, keep it (Job, Service) or update its data
        (ConfigMap); if it is not ours, raise NotOwned and leave it alone.

        Returns what happened ("created" | "updated" | "exists") and, for a Job, the Job as the apiserver
        returned it (raw JSON: no client models are built for responses nobody reads)."""
        kind, ns, name = obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]
        create = {"ConfigMap": self.core.create_namespaced_config_map,
                  "Service": self.core.create_namespaced_service,
                  "Job": self.batch.create_namespaced_job}[kind]
        try:
            data = body_of(create(ns, obj, _preload_content=False))
            return "created", json.loads(data) if kind == "Job" else None
        except ApiException as exc:
            if exc.status != 409:
                raise
        read = {"ConfigMap": self.core.read_namespaced_config_map,
                "Service": self.core.read_namespaced_service,
                "Job": self.batch.read_namespaced_job}[kind]
        existing = json.loads(body_of(read(name, ns, _preload_content=False)))
        want = {o.get("uid") for o in obj["metadata"].get("ownerReferences") or []}
        owners = [o for o in (existing.get("metadata") or {}).get("ownerReferences") or []
                  if o.get("controller")]
        ours = any(o.get("uid") in want for o in owners) if want else not owners
        deleting = bool((existing.get("metadata") or {}).get("deletionTimestamp"))
        if not ours or deleting:
            raise NotOwned(kind, name, ", ".join(f"{o.get('kind')} {o.get('name')} (uid {o.get('uid')})"
                                                 for o in owners), deleting)
        if kind == "ConfigMap":
            body_of(self.core.patch_namespaced_config_map(
                name, ns, {"data": obj["data"], "metadata": {"labels": obj["metadata"]["labels"]}},
                _preload_content=False))
            return "updated", None
        return "exists", existing if kind == "Job" else None

    def read_claim(self, ns: str, name: str) -> dict[str, Any] | None:
        """A PersistentVolumeClaim (raw JSON), or None when it does not exist."""
        try:
            return json.loads(body_of(self.core.read_namespaced_persistent_volume_claim(
                name, ns, _preload_content=False)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def ensure_claim(self, obj: dict[str, Any]) -> str:
        """Create the PersistentVolumeClaim `obj` unless one of its name exists (whoever made it: it is then
        left exactly as it is). Returns "created" or "exists"."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if self.read_claim(ns, name) is not None:
            return "exists"
        try:
            body_of(self.core.create_namespaced_persistent_volume_claim(ns, obj, _preload_content=False))
        except ApiException as exc:
            if exc.status == 409:
                return "exists"
            raise
        return "created"

    def set_job_suspend(self, ns: str, job: str, value: bool) -> None:
        """Patch the Job's .spec.suspend."""
        body_of(self.batch.patch_namespaced_job(trainer_name(job), ns, {"spec": {"suspend": value}},
                                                _preload_content=False))

    def delete_job(self, ns: str, job: str, name: str = "", foreground: bool = False) -> None:
        """Delete the trainer Job (or the Job `name` of this FineTuneJob); its pods go with it (background
        propagation; `foreground`: the Job stays, deleting, until its pods are gone)."""
        try:
            body_of(self.batch.delete_namespaced_job(name or trainer_name(job), ns,
                                                     propagation_policy="Foreground" if foreground else "Background",
                                                     _preload_content=False))
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_children(self, ns: str, job: str) -> None:
        """Delete the Job, the preflight Job, Service and ConfigMap."""
        self.delete_job(ns, job)
        self.delete_job(ns, job, preflight_name(job))
        for delete, name in ((self.core.delete_namespaced_service, trainer_name(job)),
                             (self.core.delete_namespaced_config_map, plan_name(job))):
            try:
                body_of(delete(name, ns, _preload_content=False))
            except ApiException as exc:
                if exc.status != 404:
                    raise


def rank0_address(pods: list[dict[str, Any]]) -> str:
    """IP of the newest running pod with completion index 0, or ''."""
    running = [p for p in pods if pod_index(p) == 0 and (p.get("status") or {}).get("phase") == "Running"
               and (p.get("status") or {}).get("podIP")]
    running.sort(key=lambda p: p["metadata"].get("creationTimestamp") or "")
    return running[-1]["status"]["podIP"] if running else ""


def fetch_progress(host: str, port: int, timeout: float) -> dict[str, Any] | None:
    """GET http://host:port/progress (docs/contracts.md §6); None when unreachable or malformed."""
    url = f"http://{host}:{port}/progress"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as rsp:  # noqa: S310 - cluster-internal http
            data = json.loads(rsp.read(65536).decode())
    except (OSError, ValueError) as exc:
        log.debug("progress endpoint %s unreachable: %s", url, exc)
        return None
    return data if isinstance(data, dict) and data.get("version") == 1 else None


def merge_patch(old: Any, new: Any) -> Any:
    """RFC 7386 merge patch turning `old` into `new` (removed keys become null; lists are replaced)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value) if isinstance(value, dict) and isinstance(old[key], dict) \
                else value
    return patch
