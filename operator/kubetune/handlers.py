"""Thin kopf handlers: every trigger (create/resume/update, child Job/pod events, periodic resync)
runs the same level-based reconcile for one FineTuneJob."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import threading
import time
import uuid
from typing import Any

import kopf
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune import API_GROUP, API_VERSION, PLURAL
from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import TERMINAL_PHASES, parse_spec
from kubetune.builders import JOB_NAME_LABEL, MANAGED_BY, METRICS_PORT, BuildConfig, JobRef, build_children
from kubetune.children import ChildClient, fetch_progress, merge_patch, rank0_address
from kubetune.layout import size_job_layout
from kubetune.metrics import OperatorMetrics
from kubetune.reconcile import Decision, Observed, decide, iso, parse_time, status_changed

log = logging.getLogger("kubetune.operator")
registry = kopf.OperatorRegistry()


@dataclasses.dataclass
class OperatorConfig:
    """Runtime settings of the operator (from main's flags and env)."""

    namespaces: list[str] = dataclasses.field(default_factory=list)  # empty = all namespaces
    build: BuildConfig = dataclasses.field(default_factory=BuildConfig)
    resync_seconds: float = 10.0
    sizing_retry_seconds: float = 60.0
    progress_timeout: float = 1.0
    progress_port: int = METRICS_PORT
    progress_host: str = ""  # override the rank-0 pod IP (local process nodes, tests)
    node_cache_seconds: float = 5.0  # how long one Node list serves sizing passes


class Reconciler:
    """Runs reconcile passes, at most one at a time per FineTuneJob, coalescing extra triggers."""

    def __init__(self, api: client.ApiClient, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.api = api
        self.config = config
        self.metrics = metrics
        self.children = ChildClient(api)
        self.objects = client.CustomObjectsApi(api)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str]] = set()
        self._nodes_lock = threading.Lock()
        self._nodes: tuple[float, list[dict[str, Any]]] | None = None

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's Nodes for sizing, listed at most once per `node_cache_seconds`: a burst of new
        FineTuneJobs shares one list instead of each pass listing every node (the scheduler still places pods
        on live data; a layout sized on a list a few seconds old is at worst re-sized on the next retry)."""
        with self._nodes_lock:
            now = time.monotonic()
            if self._nodes is None or now - self._nodes[0] > self.config.node_cache_seconds:
                self._nodes = (now, self.children.list_nodes())
            return self._nodes[1]

    async def run(self, namespace: str, name: str) -> Decision | None:
        """Reconcile one FineTuneJob now (waits for a pass already in flight)."""
        key = (namespace, name)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            started = time.perf_counter()
            try:
                return await asyncio.to_thread(self.reconcile_sync, namespace, name)
            except Exception:
                self.metrics.reconcile_errors.inc()
                raise
            finally:
                self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    def kick(self, namespace: str, name: str) -> None:
        """Schedule a pass soon; triggers arriving while one is queued are merged."""
        key = (namespace, name)
        if key in self._pending:
            return
        self._pending.add(key)

        async def _go() -> None:
            await asyncio.sleep(0.2)  # let a burst of child events settle
            self._pending.discard(key)
            try:
                await self.run(namespace, name)
            except Exception:  # noqa: BLE001 - logged; the resync loop retries
                log.exception("reconcile of %s/%s failed", namespace, name)

        asyncio.get_running_loop().create_task(_go())

    # --- the pass itself (worker thread) -------------------------------------------------------

    def reconcile_sync(self, ns: str, name: str) -> Decision | None:
        """Read, decide, act, write status once (only if it changed)."""
        try:
            obj = self.objects.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                self.metrics.forget_job(ns, name)
                return None
            raise
        meta, spec_dict = obj["metadata"], obj.get("spec") or {}
        status = obj.get("status") or {}
        now = dt.datetime.now(dt.timezone.utc)
        try:
            spec = parse_spec(spec_dict)
        except ValidationError as exc:
            self._write_invalid(obj, str(exc), now)
            return None
        cfg = self.config
        observed = Observed(job=self.children.read_job(ns, name))
        if observed.job is not None:
            observed.pods = self.children.list_pods(ns, name)
            observed.children_exist = True
            if (status.get("phase") not in TERMINAL_PHASES and not spec.cancel
                    and not spec.suspend):
                host = cfg.progress_host or rank0_address(observed.pods)
                if host and any((p.get("status") or {}).get("phase") == "Running" for p in observed.pods):
                    observed.progress = fetch_progress(host, cfg.progress_port, cfg.progress_timeout)
        elif status.get("phase") in TERMINAL_PHASES and spec.ttl_seconds_after_finished > 0:
            observed.children_exist = self.children.other_children_exist(ns, name)
        labels = meta.get("labels") or {}
        args = dict(name=name, generation=int(meta.get("generation") or 0), labels=labels,
                    spec_dict=spec_dict, spec=spec, status=status, now=now,
                    sizing_retry_seconds=cfg.sizing_retry_seconds)
        decision = decide(observed=observed, **args)
        if decision.needs_sizing:
            outcome = size_job_layout(spec_dict, spec, self.nodes())
            observed.sizing = outcome
            if outcome.fits and outcome.layout is not None:
                ref = JobRef(name, ns, meta["uid"], labels)
                observed.children = build_children(ref, spec_dict, spec, outcome.layout, cfg.build)
            else:
                self.metrics.sizing_refusals.inc()
            decision = decide(observed=observed, **args)
        for action in decision.actions:
            if action.kind == "apply" and action.obj is not None:
                result = self.children.apply(action.obj)
                log.info("%s/%s: %s %s %s", ns, name, result, action.obj["kind"], action.obj["metadata"]["name"])
            elif action.kind == "suspend_job":
                self.children.set_job_suspend(ns, name, bool(action.value))
            elif action.kind == "delete_job":
                self.children.delete_job(ns, name)
            elif action.kind == "delete_children":
                self.children.delete_children(ns, name)
        if status_changed(status, decision.status):
            self._patch_status(ns, name, status, decision.status)
        for etype, reason, message in decision.events:
            self.post_event(obj, etype, reason, message)
        created = parse_time(meta.get("creationTimestamp"))
        self.metrics.observe_job(ns, name, decision.status,
                                 (now - created).total_seconds() if created else None, previous=status)
        return decision

    def _patch_status(self, ns: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> None:
        patch = {"status": merge_patch(old, new)}
        self.objects.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, ns, PLURAL, name, patch)

    def _write_invalid(self, obj: dict[str, Any], error: str, now: dt.datetime) -> None:
        meta, status = obj["metadata"], obj.get("status") or {}
        if status.get("phase") == "Failed" and status.get("reason") == R.INVALID_SPEC:
            return
        message = f"the spec cannot be used: {error}"
        gen = int(meta.get("generation") or 0)
        new = dict(status, phase="Failed", reason=R.INVALID_SPEC, message=message, observedGeneration=gen,
                   conditions=C.merge_conditions(status.get("conditions"), [
                       C.make_condition(C.FAILED, True, R.INVALID_SPEC, message, now=iso(now), generation=gen),
                       C.make_condition(C.READY, False, R.INVALID_SPEC, message, now=iso(now), generation=gen)]))
        self._patch_status(meta["namespace"], meta["name"], status, new)
        self.post_event(obj, "Warning", R.INVALID_SPEC, message)

    def post_event(self, obj: dict[str, Any], etype: str, reason: str, message: str) -> None:
        """Post a core/v1 Event about the FineTuneJob (failures to post are only logged)."""
        meta = obj["metadata"]
        now = dt.datetime.now(dt.timezone.utc)
        body = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "FineTuneJob",
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
            "reason": reason, "message": message[:1024], "type": etype,
            "firstTimestamp": now.isoformat(), "lastTimestamp": now.isoformat(), "count": 1,
            "source": {"component": "kubetune-operator"}, "reportingComponent": "kubetune-operator",
            "reportingInstance": os.environ.get("POD_NAME", "kubetune-operator"),
        }
        try:
            self.children.core.create_namespaced_event(meta["namespace"], body)
        except ApiException as exc:
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
        log.info("%s/%s: %s %s: %s", meta["namespace"], meta["name"], etype, reason, message)

    def list_jobs(self) -> list[dict[str, Any]]:
        """FineTuneJobs in the watched namespaces."""
        if not self.config.namespaces:
            rsp = self.objects.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)
            return list(rsp.get("items") or [])
        items: list[dict[str, Any]] = []
        for ns in self.config.namespaces:
            rsp = self.objects.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL)
            items.extend(rsp.get("items") or [])
        return items

    async def resync_forever(self) -> None:
        """Every resync interval, reconcile jobs that are active or waiting for their TTL."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            try:
                items = await asyncio.to_thread(self.list_jobs)
            except Exception:  # noqa: BLE001 - the next round retries
                log.exception("listing FineTuneJobs failed")
                continue
            for obj in items:
                status, spec = obj.get("status") or {}, obj.get("spec") or {}
                active = status.get("phase") not in TERMINAL_PHASES
                ttl_pending = bool(spec.get("ttlSecondsAfterFinished")) and not status.get("childrenDeleted")
                cancelling = status.get("phase") == "Cancelled"
                if active or ttl_pending or cancelling:
                    meta = obj["metadata"]
                    self.kick(meta["namespace"], meta["name"])


# --- kopf wiring ---------------------------------------------------------------------------------

def _reconciler(memo: Any) -> Reconciler:
    return memo.reconciler


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> Any:
    """Authenticate with the in-cluster service account, else the kubeconfig."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=registry)
async def startup(memo: Any, **_: Any) -> None:
    """Start the periodic resync (level-based safety net: progress, TTL, sizing retries)."""
    memo.resync_task = asyncio.get_running_loop().create_task(_reconciler(memo).resync_forever())


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: Any, **_: Any) -> None:
    """Stop the resync loop; resolve the operator's stop flag so kopf does not wait on it at exit."""
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()
    # Stopped by a signal, kopf still has a task awaiting the stop flag and waits up to 5 s for
    # it before exiting, which delays the Lease release (and a standby's takeover) by 5 s.
    flag = getattr(memo, "stop_flag", None)
    if isinstance(flag, asyncio.Future) and not flag.done():
        flag.set_result(None)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL, registry=registry)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL, registry=registry)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec", registry=registry)
async def reconcile_handler(name: str, namespace: str, memo: Any, **_: Any) -> None:
    """Reconcile a FineTuneJob; retry later while no GPU layout fits."""
    decision = await _reconciler(memo).run(namespace, name)
    if decision is not None and decision.retry_after and decision.status.get("phase") == "Pending":
        raise kopf.TemporaryError(f"{decision.status.get('reason')}: {decision.status.get('message')}",
                                  delay=decision.retry_after)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL, optional=True, registry=registry)
async def forget(name: str, namespace: str, memo: Any, **_: Any) -> None:
    """Drop a deleted FineTuneJob from the metrics (children go by garbage collection)."""
    _reconciler(memo).metrics.forget_job(namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED_BY, registry=registry)
@kopf.on.event("", "v1", "pods", labels=MANAGED_BY, registry=registry)
async def child_changed(labels: dict[str, str], namespace: str, memo: Any, **_: Any) -> None:
    """A child Job or trainer pod changed: reconcile its FineTuneJob."""
    owner = labels.get(JOB_NAME_LABEL)
    if owner:
        _reconciler(memo).kick(namespace, owner)
