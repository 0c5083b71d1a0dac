"""The FineTuneJob controller runtime: watches feed one read-only store, events feed one work queue,
a fixed pool of worker threads runs one level-based pass per key.

    kopf FineTuneJob watch ─┐                    ┌─> worker 1 ─┐
    Job/pod list+watch ─────┼─> store ─> queue ──┼─> ...       ├─> decide (pure) ─> children, status, Events
    progress poller ────────┘   (by owner UID)   └─> worker N ─┘
                                   ^ requeue-after (sizing retry, TTL), per-key backoff on errors

Timing has one owner, the queue: a pass that must come back later says so (`Decision.retry_after`: the
sizing retry while no GPU layout fits, the TTL of a finished job), an error is retried with per-key
exponential backoff, and a trainer's progress is read by the poller, never inside a pass. A slow periodic
resync of active jobs remains as a safety net only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from kubetune import API_GROUP, API_VERSION, PLURAL
from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import TERMINAL_PHASES, FineTuneJobSpec, parse_spec
from kubetune.builders import KUEUE_QUEUE_LABEL, METRICS_PORT, BuildConfig, JobRef, build_children, spec_hash
from kubetune.cache_claim import KnownClaims, build_cache_claim, claim_not_ready_message
from kubetune.child_watch import ChildWatch, child_watches
from kubetune.gpu_pods import GpuPods
from kubetune.node_index import WatchedNodes
from kubetune.kueue_watch import KueueWatch
from kubetune.children import ChildClient, ChildRejected, NotOwned, body_of, fetch_progress, merge_patch, rank0_address
from kubetune.estimate import Pricing, flops_per_token
from kubetune.expectations import Expectations
from kubetune.metrics import OperatorMetrics
from kubetune.preflight import build_preflight_job, preflight_enabled, preflight_name, validated_for
from kubetune.progress import ProgressPoller
from kubetune.resize import avoided_types, moves, resize_due
from kubetune.reconcile import (CANCEL, CREATE, FOLLOW, Decision, Observed, decide, decide_child_rejected, decide_not_owned, iso, parse_time, phase_of,
                                out_of_memory, parse_summary, status_changed, still_acting, unschedulable_message)
from kubetune.oom_layout import memory_outlook, replanned_layout, trace_outlook, with_replanned_layout
from kubetune.preflight_trace import trace_status, traced_fit
from kubetune.sizing.fleet import GpuHolding, job_gpu_holding
from kubetune.sizing.fleet_sizer import FleetSizer
from kubetune.sizing.layout import SizingOutcome
from kubetune.status import checked_status
from kubetune.store import ClusterStore
from kubetune.throughput import ThroughputBook
from kubetune.workqueue import ShutDown, WorkQueue

log = logging.getLogger("kubetune.operator")

Key = tuple[str, str]  # (namespace, FineTuneJob name)

# A burst of watch events for one job (a pod going Pending -> Running -> Ready) is merged into one pass.
EVENT_SETTLE_SECONDS = 0.2
# How soon a pass that waits for the watch to show its own last write comes back (the watch event itself
# usually queues it sooner).
EXPECTATION_RECHECK_SECONDS = 1.0


@dataclasses.dataclass
class OperatorConfig:
    """Runtime settings of the operator (from main's flags and env)."""

    namespaces: list[str] = dataclasses.field(default_factory=list)  # empty = all namespaces
    build: BuildConfig = dataclasses.field(default_factory=BuildConfig)
    resync_seconds: float = 60.0  # safety-net resync of active jobs; nothing waits for it
    progress_seconds: float = 10.0  # how often a running job's /progress is read
    sizing_retry_seconds: float = 60.0
    progress_timeout: float = 1.0
    progress_port: int = METRICS_PORT
    progress_host: str = ""  # override the rank-0 pod IP (local process nodes, tests)
    node_cache_seconds: float = 5.0  # how long one Node list serves sizing passes
    occupancy: bool = True  # size with the GPUs free now (watches the cluster's unfinished GPU pods)
    resize_unschedulable_seconds: float = 300.0  # re-size a job whose pods stayed unschedulable this long; 0 = off
    workers: int = 12
    cache_sync_timeout: float = 60.0  # how long workers wait for the child watches' first LIST
    preflight: bool = True  # run the CPU preflight before the trainer Job (spec.preflight.enabled overrides)
    pricing: Pricing = dataclasses.field(default_factory=Pricing)  # price per GPU-hour per GPU type (status cost)
    kueue_check_seconds: float = 30.0  # how often to look for Kueue's Workload API until the cluster serves it


@dataclasses.dataclass
class PassResult:
    """What a pass did and when it wants to run again."""

    decision: Decision | None
    requeue_after: float | None = None
    waited: str = ""  # why the pass did nothing yet (an expectation not met)


class Reconciler:
    """Owns the store, the queue, the workers, the child watches and the progress poller."""

    def __init__(self, api: client.ApiClient, config: OperatorConfig, metrics: OperatorMetrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.config = config
        self.metrics = metrics
        self.children = ChildClient(api)
        self.objects = client.CustomObjectsApi(api)
        self.store = ClusterStore()
        self.throughput = ThroughputBook(flops_per_token)
        self.queue: WorkQueue[Key] = WorkQueue(clock=clock)
        self.expectations = Expectations(clock=clock)
        self.gpu_pods = GpuPods() if config.occupancy else None
        self.nodes = WatchedNodes(self.children.list_nodes)
        self.sizer = FleetSizer(self.nodes.nodes, config.node_cache_seconds,
                                list_pods=self._gpu_holdings if self.gpu_pods is not None else None)
        self.poller = ProgressPoller(fetch_progress, self.queue.add, period=config.progress_seconds,
                                     port=config.progress_port, timeout=config.progress_timeout)
        metrics.queue_depth.set_function(self.queue.depth)
        metrics.queue_delayed.set_function(lambda: len(self.queue.delayed()))
        self._watches: list[ChildWatch] = []
        self._occupancy_watch: ChildWatch | None = None
        self._node_watch: ChildWatch | None = None
        self.kueue: KueueWatch | None = None
        self._workers: list[threading.Thread] = []
        self._resync_stop = threading.Event()
        self._terminating_logged: set[str] = set()
        self._seen: set[Key] = set()  # FineTuneJobs this process has run a pass for
        self.cache_claims = KnownClaims(self._ensure_cache_claim)
        self._resync: threading.Thread | None = None

    def _gpu_holdings(self) -> list[GpuHolding] | None:
        """The GPUs unfinished pods hold or ask for (the cluster-wide pod watch; None while unknown), and those
        the pods of this operator's trainer Jobs that do not exist yet will ask for."""
        assert self.gpu_pods is not None
        pods = self.gpu_pods.pods()
        return None if pods is None else pods + self.store.podless_job_gpus()

    # --- triggers ------------------------------------------------------------------------------------

    def enqueue(self, key: Key, delay: float = EVENT_SETTLE_SECONDS) -> None:
        """Queue a pass for the FineTuneJob (bursts within `delay` are merged)."""
        self.queue.add_after(key, delay)

    def observe_ftj(self, event_type: str | None, obj: dict[str, Any]) -> None:
        """A FineTuneJob watch event (from kopf): store it and queue a pass when it is news."""
        meta = obj.get("metadata") or {}
        if event_type != "DELETED":
            self.throughput.observe(obj)  # a clean succeeded run calibrates later estimates (kubetune.throughput)
        if self.store.observe_ftj(event_type, obj) and meta.get("name"):
            self.enqueue((meta.get("namespace") or "", meta["name"]))

    def due_for_resync(self) -> list[Key]:
        """FineTuneJobs the safety-net resync queues: active, waiting for their TTL, or cancelled."""
        keys = []
        for obj in self.store.ftj_briefs():
            ttl = int((obj.get("spec") or {}).get("ttlSecondsAfterFinished") or 0)
            if still_acting(obj.get("status") or {}, ttl):
                keys.append((obj["metadata"]["namespace"], obj["metadata"]["name"]))
        return keys

    # --- workers -------------------------------------------------------------------------------------

    def process(self, key: Key) -> PassResult | None:
        """Run one pass for `key` and schedule what comes next: requeue-after on success, per-key backoff
        on errors (the caller holds the key from the queue)."""
        started = time.perf_counter()
        try:
            result = self.reconcile_sync(*key)
        except Exception as exc:  # noqa: BLE001 - every failure is retried with backoff
            delay = self.queue.add_rate_limited(key)
            self.metrics.queue_retries.inc()
            if isinstance(exc, ApiException) and exc.status == 409:
                log.debug("%s/%s: conflict (%s); again in %.1fs", *key, exc.reason, delay)
            else:
                self.metrics.reconcile_errors.inc()
                log.exception("reconcile of %s/%s failed; again in %.1fs", *key, delay)
            return None
        finally:
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)
        self.queue.forget(key)
        if result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)
        return result

    def _work(self) -> None:
        while True:
            try:
                key = self.queue.get()
            except ShutDown:
                return
            try:
                if key is not None:
                    self.process(key)
            finally:
                if key is not None:
                    self.queue.done(key)

    def start_workers(self, wait_for_watches: bool = True) -> None:
        """Start the worker pool (after the child watches' first LIST, so passes see existing children)."""
        def start() -> None:
            if wait_for_watches:
                deadline = time.monotonic() + self.config.cache_sync_timeout
                for watch in self._watches + (self.kueue.watches if self.kueue is not None else []):
                    if not watch.listed.wait(max(deadline - time.monotonic(), 0)):
                        log.warning("%s has not listed after %.0fs; starting the workers anyway (an existing "
                                    "child is then found through AlreadyExists)", watch.name,
                                    self.config.cache_sync_timeout)
                        break
            for i in range(self.config.workers):
                t = threading.Thread(target=self._work, name=f"reconcile-{i}", daemon=True)
                t.start()
                self._workers.append(t)
        threading.Thread(target=start, name="start-workers", daemon=True).start()

    def start(self) -> None:
        """Start watches, workers, the progress poller and the safety-net resync."""
        self.start_child_watches()
        self.start_workers()
        self.poller.start()

        def resync() -> None:
            while not self._resync_stop.wait(self.config.resync_seconds):
                for key in self.due_for_resync():
                    self.queue.add(key)
        self._resync = threading.Thread(target=resync, name="resync", daemon=True)
        self._resync.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop everything started by `start`."""
        self._resync_stop.set()
        self.poller.stop(timeout=min(timeout, 1.0))
        self.stop_child_watches(timeout=timeout)
        self.queue.shut_down()

    def start_child_watches(self) -> None:
        """Start the Job and pod watches (threads) that feed the store and queue passes; they use their own
        ApiClient, so their long-lived requests take no connection from the workers' pool."""
        import copy

        api = client.ApiClient(copy.deepcopy(self.api.configuration))
        api.user_agent = self.api.user_agent
        watches = child_watches(api, self.config.namespaces, self.store.observe_job, self.store.observe_pod,
                                self.enqueue, self._watch_failed)
        for watch in watches:
            watch.start()
        self._watches = watches
        # Neither is among the watches the workers wait for: they may be forbidden, and sizing falls back.
        core = client.CoreV1Api(api)
        self._node_watch = self.nodes.watch(core.list_node, self._watch_failed).start()
        if self.gpu_pods is not None:
            self._occupancy_watch = self.gpu_pods.watch(core.list_pod_for_all_namespaces, self._watch_failed).start()
        self.kueue = KueueWatch(api, self.config.namespaces, self.store.observe_workload, self.enqueue,
                                self._queue_kueue_jobs, check_seconds=self.config.kueue_check_seconds,
                                on_failure=self._watch_failed).start()

    def _watch_failed(self, kind: str) -> None:
        self.metrics.watch_failures.labels(watch=kind).inc()

    def _queue_kueue_jobs(self) -> None:
        """Queue a pass for every FineTuneJob labelled for a Kueue queue (Kueue appeared, or is known absent)."""
        for obj in self.store.ftj_briefs():
            meta = obj.get("metadata") or {}
            if (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL):
                self.enqueue((meta.get("namespace") or "", meta.get("name") or ""))

    def stop_child_watches(self, timeout: float = 5.0) -> None:
        """Stop the watch threads (each open watch request is shut down)."""
        for watch in self._watches:
            watch.stop(timeout=timeout)
        for extra in (self._occupancy_watch, self._node_watch):
            if extra is not None:
                extra.stop(timeout=timeout)
        if self.kueue is not None:
            self.kueue.stop(timeout=timeout)

    # --- the pass itself -----------------------------------------------------------------------------

    def reconcile_sync(self, ns: str, name: str) -> PassResult:
        """One pass: read from the store, decide once, act, write the status once (only if it changed)."""
        key = (ns, name)
        obj = self.store.ftj(key)
        if obj is None:
            self.metrics.forget_job(ns, name)
            self.poller.untrack(key)
            self.expectations.forget(key)
            self._seen.discard(key)
            return PassResult(None)
        meta, spec_dict = obj["metadata"], obj.get("spec") or {}
        status = obj.get("status") or {}
        uid = str(meta.get("uid") or "")
        if key not in self._seen:
            self._seen.add(key)
            if status.get("phase"):
                log.info("%s/%s: resuming a job in phase %s", ns, name, status["phase"])
        job, pods = self.store.children(uid)
        waited = self.expectations.waiting(key, uid, int(meta.get("resourceVersion") or -1),
                                           str((job or {}).get("metadata", {}).get("uid") or ""))
        if waited:
            log.debug("%s/%s: waiting for the watch (%s)", ns, name, waited)
            return PassResult(None, EXPECTATION_RECHECK_SECONDS, waited)
        now = dt.datetime.now(dt.timezone.utc)
        try:
            spec = parse_spec(spec_dict)
        except ValidationError as exc:
            self._write_invalid(obj, str(exc), now)
            return PassResult(None)
        cfg = self.config
        want_hash = spec_hash(spec_dict)
        observed = Observed(job=job, pods=pods if job is not None else [], children_exist=job is not None)
        if (meta.get("labels") or {}).get(KUEUE_QUEUE_LABEL):
            observed.kueue_installed = self.kueue.installed if self.kueue is not None else None
            if job is not None:
                observed.workload = self.store.workload(str(job["metadata"].get("uid") or ""))
        branch = phase_of(status, spec, job, want_hash)
        observed.preflight = preflight_enabled(spec, cfg.preflight)
        if observed.preflight and branch in (CREATE, CANCEL):
            observed.preflight_job, observed.preflight_pods = self.store.preflight(uid)
            observed.cache_claim_wait = self._cache_claim_wait(ns, observed.preflight_pods)
        self._follow_progress(key, status, spec, observed)
        if job is None and status.get("phase") in TERMINAL_PHASES and spec.ttl_seconds_after_finished > 0 \
                and not status.get("childrenDeleted"):
            observed.children_exist = self.children.other_children_exist(ns, name)
        labels = meta.get("labels") or {}
        ref = JobRef(name, ns, uid, labels)
        if branch == CREATE or (branch == FOLLOW and not status.get("layout")):
            # Sizing is needed to create the Job, and to recover a layout that never reached the status.
            avoided = avoided_types(status)
            observed.sizing = with_replanned_layout(self.sizer.size(spec, avoided), status)
            if branch == CREATE:
                if observed.sizing.fits and observed.sizing.layout is not None:
                    observed.children = self._render(ref, spec_dict, spec, observed.sizing, status, avoided)
                    if observed.preflight:  # the plan ConfigMap first, then the preflight Job
                        observed.preflight_children = [
                            observed.children[0],
                            build_preflight_job(ref, spec, observed.sizing.layout, cfg.build, hash_=want_hash)]
                        if not validated_for(status, want_hash):
                            self._consider_trace(status, spec, observed)
                else:
                    self.metrics.sizing_refusals.inc()
        elif branch == FOLLOW:
            if replanned_layout(status) is None:  # a memory re-plan's layout stays; it is not re-sized
                self._consider_resize(ref, spec_dict, status, spec, observed, now)
            self._consider_memory(status, spec, observed)
        generation = int(meta.get("generation") or 0)
        decision = decide(name=name, generation=generation, labels=labels, spec=spec, spec_hash=want_hash,
                          status=status, observed=observed, now=now, sizing_retry_seconds=cfg.sizing_retry_seconds,
                          pricing=cfg.pricing, throughput=self.throughput)
        try:
            self._act(key, uid, decision)
        except NotOwned as exc:
            log.warning("%s/%s: %s", ns, name, exc)
            decision = decide_not_owned(generation=generation, status=status, kind=exc.kind, child=exc.name,
                                        owner=exc.owner, now=now, deleting=exc.deleting,
                                        retry_seconds=min(cfg.sizing_retry_seconds, 10.0) if exc.deleting
                                        else cfg.sizing_retry_seconds)
        except ChildRejected as exc:
            if exc.terminating_namespace:
                if ns not in self._terminating_logged:
                    self._terminating_logged.add(ns)
                    log.info("namespace %s is being deleted: nothing to do for its FineTuneJobs", ns)
                return PassResult(None)
            log.warning("%s/%s: %s", ns, name, exc)
            decision = decide_child_rejected(generation=generation, status=status, kind=exc.kind, child=exc.name,
                                             code=exc.code, detail=exc.detail, now=now,
                                             retry_seconds=cfg.sizing_retry_seconds)
        if status_changed(status, decision.status):
            self._patch_status(key, obj, decision.status)
        for etype, reason, message in decision.events:
            self.post_event(obj, etype, reason, message)
        created_at = parse_time(meta.get("creationTimestamp"))
        self.metrics.observe_job(ns, name, decision.status,
                                 (now - created_at).total_seconds() if created_at else None, previous=status)
        return PassResult(decision, decision.retry_after)

    def _consider_memory(self, status: dict[str, Any], spec: FineTuneJobSpec, observed: Observed) -> None:
        """A pod of the current Job ran out of GPU memory and is not re-planned yet: hand the pass the failure as
        measured and the next layout that needs less memory per GPU (kubetune.oom_layout)."""
        job_uid = ((observed.job or {}).get("metadata") or {}).get("uid")
        failed = [p for p in observed.pods if (p.get("status") or {}).get("phase") == "Failed"
                  and any(o.get("uid") == job_uid for o in (p.get("metadata") or {}).get("ownerReferences") or [])]
        failed.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        pod = out_of_memory(failed)
        name = ((pod or {}).get("metadata") or {}).get("name")
        if pod is None or any(r.get("pod") == name for r in status.get("memoryReplans") or []):
            return
        observed.memory = memory_outlook(spec, status, parse_summary(pod), self.sizer.fleet())

    def _consider_trace(self, status: dict[str, Any], spec: FineTuneJobSpec, observed: Observed) -> None:
        """The preflight succeeded and its traced step does not fit the sized layout: hand the pass the next layout,
        found with the traced figure as a floor (kubetune.oom_layout.trace_outlook)."""
        done = sorted((p for p in observed.preflight_pods if (p.get("status") or {}).get("phase") == "Succeeded"),
                      key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        if observed.preflight_job is None or not done or observed.sizing is None:
            return
        report = (parse_summary(done[-1]) or {}).get("preflight")
        trace = trace_status(report.get("trace")) if isinstance(report, dict) else None
        fit = traced_fit(trace, observed.sizing.plan_status, observed.sizing.layout)
        if fit is not None and not fit.fits:
            observed.trace = trace_outlook(spec, status, observed.sizing.layout, fit.tensors, self.sizer.fleet())

    def _render(self, ref: JobRef, spec_dict: dict[str, Any], spec: FineTuneJobSpec, outcome: SizingOutcome,
                status: dict[str, Any], avoided: frozenset[str]) -> list[dict[str, Any]]:
        """The children (plan ConfigMap, Service, trainer Job) for a sizing outcome that fits, sized without the
        GPU types in `avoided` (recorded on the Job with its layout)."""
        assert outcome.layout is not None
        return build_children(ref, spec_dict, spec, outcome.layout, self.config.build,
                              plan_status=outcome.plan_status, memory_replans=status.get("memoryReplans"),
                              avoided=avoided)

    def _consider_resize(self, ref: JobRef, spec_dict: dict[str, Any], status: dict[str, Any],
                         spec: FineTuneJobSpec, observed: Observed, now: dt.datetime) -> None:
        """Size the job again, avoiding its GPU type, when its pods stayed unschedulable long enough (resize.py);
        hand the new layout, and the children rendered for it, to the pass only when the job would move to GPUs
        that are free now (the pass deletes the Job and creates the new one together)."""
        if ((observed.job or {}).get("metadata") or {}).get("deletionTimestamp"):
            return  # a Job being deleted (a move whose new Job waits for it): its pods say nothing of the layout
        stuck_on = resize_due(spec, status, observed.pods, now, self.config.resize_unschedulable_seconds)
        if not stuck_on:
            return
        avoided = avoided_types(status) | {stuck_on}
        outcome = self.sizer.size(spec, avoided)
        if moves(status, outcome) and outcome.layout is not None:
            observed.resize, observed.resize_from = outcome, stuck_on
            observed.children = self._render(ref, spec_dict, spec, outcome, status, avoided)

    def _follow_progress(self, key: Key, status: dict[str, Any], spec: FineTuneJobSpec, observed: Observed) -> None:
        """Track the rank-0 pod of a running job with the poller and hand its last answer to the pass."""
        running = observed.job is not None and status.get("phase") not in TERMINAL_PHASES \
            and not spec.cancel and not spec.suspend \
            and any((p.get("status") or {}).get("phase") == "Running" for p in observed.pods)
        host = (self.config.progress_host or rank0_address(observed.pods)) if running else ""
        if host:
            self.poller.track(key, host)
            observed.progress = self.poller.latest(key)
        else:
            self.poller.untrack(key)

    def _ensure_cache_claim(self, ns: str) -> None:
        """Create the cache claim in `ns` if it is missing, when the operator manages it (--cache-storage-class):
        no owner, never deleted (kubetune.cache_claim). A refusal is the job's ChildRejected."""
        obj = build_cache_claim(ns, self.config.build)
        try:
            result = self.children.ensure_claim(obj)
        except ApiException as exc:
            rejected = ChildRejected.from_api(obj, exc)
            if rejected is None:
                raise
            raise rejected from exc
        if result == "created":
            log.info("%s: created PersistentVolumeClaim %s (StorageClass %s) for the model cache", ns,
                     obj["metadata"]["name"], self.config.build.cache_storage_class)

    def _cache_claim_wait(self, ns: str, pods: list[dict[str, Any]]) -> str:
        """Why an unschedulable preflight pod waits on the cache claim, or '' (kubetune.cache_claim). A managed
        claim found missing (deleted meanwhile) is created again."""
        cfg = self.config.build
        if not cfg.cache_claim or not unschedulable_message(pods):
            return ""
        try:
            claim = self.children.read_claim(ns, cfg.cache_claim)
            if claim is None and cfg.cache_storage_class:
                self.cache_claims.forget(ns)
                self.cache_claims.ensure(ns)
                claim = self.children.read_claim(ns, cfg.cache_claim)
        except (ApiException, ChildRejected) as exc:  # e.g. no RBAC to read claims: the scheduler's message stays
            log.debug("%s: cannot read the cache claim %s: %s", ns, cfg.cache_claim, exc)
            return ""
        return claim_not_ready_message(claim, cfg)

    def _act(self, key: Key, uid: str, decision: Decision) -> None:
        ns, name = key
        deleted_job = False
        for action in decision.actions:
            if action.kind == "apply" and action.obj is not None:
                kind = action.obj["kind"]
                trainer_job = kind == "Job" and action.obj["metadata"]["name"] != preflight_name(name)
                if kind == "Job" and self.config.build.cache_storage_class:
                    self.cache_claims.ensure(ns)  # before the first pod that mounts it
                try:
                    result, created = self.children.apply(action.obj)
                except ApiException as exc:
                    rejected = ChildRejected.from_api(action.obj, exc)
                    if rejected is None:
                        raise
                    raise rejected from exc
                except NotOwned as exc:
                    if not (trainer_job and deleted_job and exc.deleting):
                        raise
                    # the Job this pass deleted still exists (a finalizer holds it): the status this pass
                    # writes keeps the new layout's reasons, and a later pass creates the Job
                    log.info("%s/%s: the deleted trainer Job is still terminating; it is created again later",
                             ns, name)
                    continue
                log.info("%s/%s: %s %s %s", ns, name, result, kind, action.obj["metadata"]["name"])
                if trainer_job:  # the store keeps the preflight's Job apart
                    self.expectations.expect_job(uid, str(((created or {}).get("metadata") or {}).get("uid") or ""))
                    if result == "created" and not (action.obj.get("spec") or {}).get("suspend"):
                        # until the snapshot sees its pods (the created object: its UID)
                        self.sizer.hand_out(job_gpu_holding(created or action.obj))
            elif action.kind == "suspend_job":
                self.children.set_job_suspend(ns, name, bool(action.value))
            elif action.kind == "delete_job":
                self.children.delete_job(ns, name, foreground=action.foreground)
                deleted_job = True
            elif action.kind == "delete_preflight":
                self.children.delete_job(ns, name, preflight_name(name))
            elif action.kind == "delete_children":
                self.children.delete_children(ns, name)

    def _patch_status(self, key: Key, obj: dict[str, Any], new: dict[str, Any]) -> None:
        """Merge-patch the status from what the pass read to `new`, on the condition that the FineTuneJob is
        still at the resourceVersion read. A 409 means the store was behind: the pass is retried (the watch
        brings the newer object), never patched into the store by hand."""
        meta = obj["metadata"]
        ns, name = key
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion")},
                 "status": merge_patch(obj.get("status") or {}, new)}
        try:
            resp = self.objects.patch_namespaced_custom_object_status(API_GROUP, API_VERSION, ns, PLURAL, name,
                                                                      patch, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        written = json.loads(resp.data)
        rv = int((written.get("metadata") or {}).get("resourceVersion") or -1)
        self.expectations.expect_version(key, str(meta.get("uid") or ""), rv)

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
        checked_status(new)
        self._patch_status((meta["namespace"], meta["name"]), obj, new)
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
            if exc.status == 403 and "NamespaceTerminating" in str(exc.body or ""):
                log.debug("no event %s for %s/%s: the namespace is being deleted", reason, meta["namespace"],
                          meta["name"])
                return
            log.warning("could not post event %s for %s/%s: %s %s", reason, meta["namespace"], meta["name"],
                        exc.status, exc.reason)
        log.info("%s/%s: %s %s: %s", meta["namespace"], meta["name"], etype, reason, message)
