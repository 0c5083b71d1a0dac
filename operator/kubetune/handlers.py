"""Thin kopf handlers: every trigger (a FineTuneJob watch event from kopf, a child Job/pod event from
child_watch, the periodic resync) runs the same level-based reconcile for one FineTuneJob."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import json
import logging
import os
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
from kubetune.api import TERMINAL_PHASES, FineTuneJobSpec, parse_spec
from kubetune.builders import METRICS_PORT, BuildConfig, JobRef, build_children
from kubetune.cache import ClusterCache
from kubetune.child_watch import ChildWatch, child_watches
from kubetune.children import ChildClient, body_of, fetch_progress, merge_patch, rank0_address
from kubetune.sizing.fleet_sizer import FleetSizer
from kubetune.metrics import OperatorMetrics
from kubetune.reconcile import Decision, Observed, decide, iso, parse_time, status_changed, still_acting

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


class StaleCache(Exception):
    """The cache was behind the apiserver (a child already existed, or the status write conflicted); the
    entry was refreshed and the pass must run again."""


class Reconciler:
    """Runs reconcile passes, at most one at a time per FineTuneJob, coalescing extra triggers.

    Passes read the FineTuneJob, its Job and its pods from `cache` (fed by watch events) and
    write only what changed: a new job costs three creates, one status patch and one Event."""

    def __init__(self, api: client.ApiClient, config: OperatorConfig, metrics: OperatorMetrics) -> None:
        self.api = api
        self.config = config
        self.metrics = metrics
        self.children = ChildClient(api)
        self.objects = client.CustomObjectsApi(api)
        self.cache = ClusterCache()
        self.sizer = FleetSizer(self.children.list_nodes, config.node_cache_seconds)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str]] = set()
        self._progress_at: dict[tuple[str, str], float] = {}
        self._watches: list[ChildWatch] = []

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
                if not self.cache.has_ftj(key) and not lock.locked() and key not in self._pending:
                    self._locks.pop(key, None)

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
        """One pass; re-run (at most twice) when the cache turned out to be behind the apiserver."""
        for _ in range(2):
            try:
                return self._pass(ns, name)
            except StaleCache as exc:
                log.debug("%s/%s: %s; running the pass again", ns, name, exc)
        return self._pass(ns, name)

    def _observe_children(self, ns: str, name: str, status: dict[str, Any], spec: FineTuneJobSpec) -> Observed:
        """The Job and pods of a FineTuneJob from the cache; read once from the apiserver the first time
        this operator sees the job (its watches may not have delivered them yet)."""
        key = (ns, name)
        synced, job, pods = self.cache.children(key)
        if not synced:
            phase = status.get("phase") or ""
            if phase:
                log.info("%s/%s: resuming a job in phase %s", ns, name, phase)
            # Children may exist from before this operator started: read them once, unless the job is
            # finished and nothing is left to do with them (no cancel to carry out, no TTL pending), or the
            # child watches have listed every Job and pod already (after a restart or failover with N
            # active jobs, that saves 2N reads).
            if status.get("layout") and still_acting(status, spec.ttl_seconds_after_finished) \
                    and not self.children_listed():
                job = self.children.read_job(ns, name)
                self.cache.store_job(key, job)
                pods = self.children.list_pods(ns, name) if job is not None else []
                self.cache.store_pods(key, pods)
                synced, job, pods = self.cache.children(key)
            self.cache.mark_synced(key)
        return Observed(job=job, pods=pods if job is not None else [])

    def children_listed(self) -> bool:
        """Whether the child watches run and have each completed a LIST (the cache then holds every Job and
        pod that existed, and follows them from there)."""
        return bool(self._watches) and all(w.listed.is_set() for w in self._watches)

    def _progress_due(self, key: tuple[str, str]) -> bool:
        """Poll a running job's /progress at most about once per resync period, not on every pod event."""
        now = time.monotonic()
        if now - self._progress_at.get(key, float("-inf")) < 0.9 * self.config.resync_seconds:
            return False
        self._progress_at[key] = now
        return True

    def _pass(self, ns: str, name: str) -> Decision | None:
        """Read (from the cache), decide, act, write status once (only if it changed)."""
        key = (ns, name)
        obj = self.cache.ftj(key)
        if obj is None:
            self.metrics.forget_job(ns, name)
            self._progress_at.pop(key, None)
            return None
        meta, spec_dict = obj["metadata"], obj.get("spec") or {}
        status = obj.get("status") or {}
        now = dt.datetime.now(dt.timezone.utc)
        try:
            spec = parse_spec(spec_dict)
        except ValidationError as exc:
            self._write_invalid(obj, str(exc), now)
            return None
        cfg = self.config
        observed = self._observe_children(ns, name, status, spec)
        if observed.job is not None:
            observed.children_exist = True
            if (status.get("phase") not in TERMINAL_PHASES and not spec.cancel
                    and not spec.suspend):
                host = cfg.progress_host or rank0_address(observed.pods)
                if host and any((p.get("status") or {}).get("phase") == "Running" for p in observed.pods) \
                        and self._progress_due(key):
                    observed.progress = fetch_progress(host, cfg.progress_port, cfg.progress_timeout)
        elif status.get("phase") in TERMINAL_PHASES and spec.ttl_seconds_after_finished > 0 \
                and not status.get("childrenDeleted"):
            observed.children_exist = self.children.other_children_exist(ns, name)
        labels = meta.get("labels") or {}
        args = dict(name=name, generation=int(meta.get("generation") or 0), labels=labels,
                    spec_dict=spec_dict, spec=spec, status=status, now=now,
                    sizing_retry_seconds=cfg.sizing_retry_seconds)
        decision = decide(observed=observed, **args)
        if decision.needs_sizing:
            outcome = self.sizer.size(spec)
            observed.sizing = outcome
            if outcome.fits and outcome.layout is not None:
                ref = JobRef(name, ns, meta["uid"], labels)
                observed.children = build_children(ref, spec_dict, spec, outcome.layout, cfg.build)
            else:
                self.metrics.sizing_refusals.inc()
            decision = decide(observed=observed, **args)
        for action in decision.actions:
            if action.kind == "apply" and action.obj is not None:
                result, created = self.children.apply(action.obj)
                log.info("%s/%s: %s %s %s", ns, name, result, action.obj["kind"], action.obj["metadata"]["name"])
                if action.obj["kind"] == "Job":
                    if created is None:  # it existed although the cache had none: follow it instead
                        self.cache.store_job(key, self.children.read_job(ns, name))
                        raise StaleCache("the trainer Job already exists")
                    self.cache.store_job(key, created)
            elif action.kind == "suspend_job":
                self.children.set_job_suspend(ns, name, bool(action.value))
            elif action.kind == "delete_job":
                self.children.delete_job(ns, name)
            elif action.kind == "delete_children":
                self.children.delete_children(ns, name)
        if status_changed(status, decision.status):
            self._patch_status(obj, decision.status)
        for etype, reason, message in decision.events:
            self.post_event(obj, etype, reason, message)
        created_at = parse_time(meta.get("creationTimestamp"))
        self.metrics.observe_job(ns, name, decision.status,
                                 (now - created_at).total_seconds() if created_at else None, previous=status)
        return decision

    def _patch_status(self, obj: dict[str, Any], new: dict[str, Any]) -> None:
        """Merge-patch the status from what the pass read to `new`, on the condition that the FineTuneJob is
        still at the resourceVersion read (else the cache was behind: refresh it and run the pass again)."""
        meta = obj["metadata"]
        ns, name = meta["namespace"], meta["name"]
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                 "status": merge_patch(obj.get("status") or {}, new)}
        try:
            resp = self.objects.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, ns, PLURAL, name,
                                                                      patch, _preload_content=False)
        except ApiException as exc:
            if exc.status == 409:
                self._refresh_ftj(ns, name)
                raise StaleCache("the FineTuneJob changed since the cache saw it") from exc
            if exc.status == 404:
                self.cache.forget_ftj((ns, name))
                return
            raise
        self.cache.store_ftj(json.loads(resp.data))

    def _refresh_ftj(self, ns: str, name: str) -> None:
        try:
            resp = self.objects.get_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, name,
                                                             _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                self.cache.forget_ftj((ns, name))
                return
            raise
        self.cache.store_ftj(json.loads(resp.data))

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
        self._patch_status(obj, new)
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
            body_of(self.children.core.create_namespaced_event(meta["namespace"], body, _preload_content=False))
        except ApiException as exc:
            log.warning("could not post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc)
        log.info("%s/%s: %s %s: %s", meta["namespace"], meta["name"], etype, reason, message)

    def due_for_resync(self) -> list[tuple[str, str]]:
        """FineTuneJobs the periodic resync should reconcile: active, waiting for their TTL, or cancelled
        (whose Job may still be there)."""
        keys = []
        for obj in self.cache.ftjs():
            ttl = int((obj.get("spec") or {}).get("ttlSecondsAfterFinished") or 0)
            if still_acting(obj.get("status") or {}, ttl):
                keys.append((obj["metadata"]["namespace"], obj["metadata"]["name"]))
        return keys

    def start_child_watches(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the Job and pod watches (threads) that feed the cache and kick passes on `loop`; they use
        their own ApiClient, so their long-lived requests take no connection from the reconcile pool."""
        def notify(key: tuple[str, str]) -> None:
            try:
                loop.call_soon_threadsafe(self.kick, *key)
            except RuntimeError:  # the loop closed: the operator is stopping
                pass

        api = client.ApiClient(copy.deepcopy(self.api.configuration))
        watches = child_watches(api, self.config.namespaces, self.cache.observe_job, self.cache.observe_pod,
                                notify, lambda kind: self.metrics.watch_failures.labels(watch=kind).inc())
        for watch in watches:
            watch.start()
        self._watches = watches

    def stop_child_watches(self, timeout: float = 5.0) -> None:
        """Stop the watch threads (each open watch request is shut down)."""
        for watch in self._watches:
            watch.stop(timeout=timeout)

    async def resync_forever(self) -> None:
        """Every resync interval, reconcile jobs that are active or waiting for their TTL (from the cache:
        the watches keep it current, so a resync costs no apiserver reads)."""
        while True:
            await asyncio.sleep(self.config.resync_seconds)
            for namespace, name in self.due_for_resync():
                self.kick(namespace, name)


# --- kopf wiring ---------------------------------------------------------------------------------

def _reconciler(memo: Any) -> Reconciler:
    return memo.reconciler


@kopf.on.login(registry=registry)
def login(**kwargs: Any) -> Any:
    """Authenticate with the in-cluster service account, else the kubeconfig."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup(registry=registry)
async def startup(memo: Any, **_: Any) -> None:
    """Start the periodic resync (level-based safety net: progress, TTL, sizing retries) and the child
    Job/pod watches."""
    reconciler, loop = _reconciler(memo), asyncio.get_running_loop()
    memo.resync_task = loop.create_task(reconciler.resync_forever())
    reconciler.start_child_watches(loop)


@kopf.on.cleanup(registry=registry)
async def cleanup(memo: Any, **_: Any) -> None:
    """Stop the resync loop; resolve the operator's stop flag so kopf does not wait on it at exit."""
    task = getattr(memo, "resync_task", None)
    if task is not None:
        task.cancel()
    _reconciler(memo).stop_child_watches(timeout=0)
    # Stopped by a signal, kopf still has a task awaiting the stop flag and waits up to 5 s for
    # it before exiting, which delays the Lease release (and a standby's takeover) by 5 s.
    flag = getattr(memo, "stop_flag", None)
    if isinstance(flag, asyncio.Future) and not flag.done():
        flag.set_result(None)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL, registry=registry)
async def finetunejob_event(event: dict[str, Any], memo: Any, **_: Any) -> None:
    """A FineTuneJob was listed, created, changed or deleted: cache it and reconcile it.

    A level-based pass per event instead of kopf's create/update/resume handlers: those would make kopf
    patch its bookkeeping annotations onto every FineTuneJob (one more write per job); sizing retries and
    progress come from the periodic resync."""
    obj = event.get("object") or {}
    meta = obj.get("metadata") or {}
    if _reconciler(memo).cache.observe_ftj(event.get("type"), obj) and meta.get("name"):
        _reconciler(memo).kick(meta.get("namespace") or "", meta["name"])
