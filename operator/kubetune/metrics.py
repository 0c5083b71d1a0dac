"""Prometheus metrics of the operator (own registry, served on --metrics-port)."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from kubetune.api import PHASES
from kubetune.running_time import reported_gpu_hours


class OperatorMetrics:
    """All operator metrics on one registry; `observe_job` keeps per-job gauges current."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("kubetune_jobs", "FineTuneJobs by phase.", ["phase"], registry=r)
        self.reconcile_duration = Histogram(
            "kubetune_reconcile_duration_seconds", "Time of one reconcile pass.", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.reconcile_errors = Counter("kubetune_reconcile_errors_total", "Reconcile passes that raised.",
                                        registry=r)
        self.time_to_running = Histogram(
            "kubetune_job_time_to_running_seconds", "From FineTuneJob creation to its first Running phase.",
            registry=r, buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200))
        self.gpus_requested = Gauge("kubetune_gpus_requested", "GPUs requested by active FineTuneJobs.",
                                    ["gpu_type"], registry=r)
        self.sizing_refusals = Counter("kubetune_sizing_refusals_total",
                                       "Sizing passes that found no GPU layout that fits.", registry=r)
        self.queue_depth = Gauge("kubetune_workqueue_depth", "FineTuneJobs queued and ready for a reconcile pass.",
                                 registry=r)
        self.queue_delayed = Gauge("kubetune_workqueue_delayed", "FineTuneJobs waiting for a requeue-after or backoff.",
                                   registry=r)
        self.queue_retries = Counter("kubetune_workqueue_retries_total",
                                     "Passes requeued with per-key backoff after an error or a conflict.", registry=r)
        self.watch_failures = Counter("kubetune_watch_failures_total",
                                      "Failed LIST/WATCH requests of the operator's watches, by watch: jobs, "
                                      "pods, nodes, occupancy (GPU pods), workloads (each is retried with "
                                      "backoff).", ["watch"], registry=r)
        labels = ["namespace", "name"]  # not "job": that is Prometheus' scrape-target label
        self.train_loss = Gauge("kubetune_job_train_loss", "Latest training loss reported by rank 0.", labels,
                                registry=r)
        self.tokens_per_second = Gauge("kubetune_job_tokens_per_second", "Latest training throughput.", labels,
                                       registry=r)
        self.progress_ratio = Gauge("kubetune_job_progress_ratio", "Steps done / steps planned (0..1).", labels,
                                    registry=r)
        self.eval_metric = Gauge("kubetune_eval_metric", "Post-training evaluation score (spec.evaluation) of the "
                                 "base or the tuned model.", [*labels, "metric", "model"], registry=r)
        self.eval_passed = Gauge("kubetune_eval_passed", "1 when the evaluation gates held, 0 when not.", labels,
                                 registry=r)
        # What runs cost, as the FineTuneJobs' status says (series exist while the FineTuneJob does, like
        # kube-state-metrics' object gauges; a sum over them is the cost of the jobs still in the cluster).
        self.gpu_hours = Gauge("kubetune_job_gpu_hours", "GPU-hours the run has used so far on each GPU "
                               "type (status.accounting.gpuHours, gpuTime).", [*labels, "gpu_type"], registry=r)
        self.cost = Gauge("kubetune_job_cost", "What the run has cost so far: its GPU-hours x the price of its GPU "
                          "type (status.accounting.cost; the operator's --pricing).", [*labels, "currency"], registry=r)
        self.estimated_cost = Gauge("kubetune_job_estimated_cost", "The run's cost estimated before its GPUs started "
                                    "(status.estimate.cost).", [*labels, "currency"], registry=r)
        self._labelled: dict[tuple[Gauge, tuple[str, str]], set[str]] = {}  # (gauge, job) -> its extra label's values
        self._eval_series: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._phases: dict[tuple[str, str], str] = {}
        self._gpus: dict[tuple[str, str], tuple[str, int]] = {}
        # Totals kept as the per-job maps change, so a pass updates two gauges instead of summing every job (at
        # 10,000 jobs the sums were a fifth of the operator's CPU, under the lock every worker waits on).
        self._phase_counts: dict[str, int] = {}
        self._gpu_totals: dict[str, int] = {}
        self._running_seen: set[tuple[str, str]] = set()
        # Reconcile passes run on many threads at once: the per-job maps and the gauges derived from them
        # change under this lock only (iterating them while another pass inserted raised "dictionary changed
        # size during iteration" at 1,000 jobs).
        self._lock = threading.RLock()
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(0)

    def observe_job(self, namespace: str, name: str, status: dict[str, Any], age_seconds: float | None,
                    previous: dict[str, Any] | None = None) -> None:
        """Update the per-job gauges from a FineTuneJob's status.

        previous: the status before this pass. When given, time-to-running is observed only if this
        pass made the job's first start (status.startTime appeared), so a restarted or newly elected
        operator does not count jobs that were already running as new starts."""
        with self._lock:
            self._observe_job(namespace, name, status, age_seconds, previous)

    def _observe_job(self, namespace: str, name: str, status: dict[str, Any], age_seconds: float | None,
                     previous: dict[str, Any] | None) -> None:
        key = (namespace, name)
        phase = status.get("phase") or ""
        if phase:
            self._set_phase(key, phase)
        layout = status.get("layout") or {}
        if phase in ("Running", "Pending", "Queued") and layout.get("totalGpus"):
            self._set_gpus(key, (layout.get("gpuType") or "", int(layout["totalGpus"])))
        else:
            self._set_gpus(key, None)
        if phase == "Running" and key not in self._running_seen:
            self._running_seen.add(key)
            first_start = previous is None or not previous.get("startTime")
            if age_seconds is not None and first_start:
                self.time_to_running.observe(max(age_seconds, 0.0))
        metrics = status.get("metrics") or {}
        if metrics.get("trainLoss") is not None:
            self.train_loss.labels(namespace, name).set(float(metrics["trainLoss"]))
        if metrics.get("tokensPerSecond") is not None:
            self.tokens_per_second.labels(namespace, name).set(float(metrics["tokensPerSecond"]))
        progress = status.get("progress") or {}
        if progress.get("totalSteps"):
            self.progress_ratio.labels(namespace, name).set(
                min(float(progress.get("step") or 0) / float(progress["totalSteps"]), 1.0))
        self._observe_evaluation(key, status.get("evaluation") or {})
        acc, est = status.get("accounting") or {}, status.get("estimate") or {}
        self._set_labelled(self.gpu_hours, key, reported_gpu_hours(status) if acc.get("gpuHours") is not None else {})
        self._set_labelled(self.cost, key, _one(acc.get("currency"), acc.get("cost")))
        self._set_labelled(self.estimated_cost, key, _one(est.get("currency"), est.get("cost")))

    def _set_labelled(self, gauge: Gauge, key: tuple[str, str], values: dict[str, Any]) -> None:
        """Set a per-job gauge's series, one per value of its extra label (GPU type, currency); the job's series
        under labels no longer in `values` (a job moved to another GPU type, a currency changed) go."""
        slot = (gauge, key)
        for old in self._labelled.get(slot, set()) - set(values):
            try:
                gauge.remove(*key, old)
            except KeyError:
                pass
        for label, value in values.items():
            gauge.labels(*key, label).set(float(value))
        if values:
            self._labelled[slot] = set(values)
        else:
            self._labelled.pop(slot, None)

    def _observe_evaluation(self, key: tuple[str, str], evaluation: dict[str, Any]) -> None:
        if not evaluation:
            return
        series = self._eval_series.setdefault(key, set())
        for row in evaluation.get("metrics") or []:
            for model in ("base", "tuned"):
                if row.get("metric") and row.get(model) is not None:
                    self.eval_metric.labels(*key, row["metric"], model).set(float(row[model]))
                    series.add((row["metric"], model))
        if evaluation.get("passed") is not None:
            self.eval_passed.labels(*key).set(1.0 if evaluation["passed"] else 0.0)

    def forget_job(self, namespace: str, name: str) -> None:
        """Drop a deleted FineTuneJob from the gauges."""
        with self._lock:
            self._forget_job(namespace, name)

    def _forget_job(self, namespace: str, name: str) -> None:
        key = (namespace, name)
        self._set_phase(key, None)
        self._set_gpus(key, None)
        self._running_seen.discard(key)
        for gauge in (self.train_loss, self.tokens_per_second, self.progress_ratio, self.eval_passed):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        for gauge in (self.gpu_hours, self.cost, self.estimated_cost):
            self._set_labelled(gauge, key, {})
        for metric, model in self._eval_series.pop(key, set()):
            try:
                self.eval_metric.remove(namespace, name, metric, model)
            except KeyError:
                pass

    def _set_phase(self, key: tuple[str, str], phase: str | None) -> None:
        """Record the job's phase (None: forget it) and update the two phase gauges that change."""
        for name, step in _changes(self._phases, key, phase):
            self._phase_counts[name] = self._phase_counts.get(name, 0) + step
            self.jobs.labels(phase=name).set(self._phase_counts[name])

    def _set_gpus(self, key: tuple[str, str], held: tuple[str, int] | None) -> None:
        """Record the GPUs an active job requests (None: none) and update the GPU types' gauges that change."""
        for (gpu_type, gpus), sign in _changes(self._gpus, key, held):
            total = self._gpu_totals.get(gpu_type, 0) + sign * gpus
            if total > 0:
                self._gpu_totals[gpu_type] = total
                self.gpus_requested.labels(gpu_type=gpu_type).set(total)
            else:
                self._gpu_totals.pop(gpu_type, None)
                try:
                    self.gpus_requested.remove(gpu_type)
                except KeyError:
                    pass

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics on a background thread."""
        start_http_server(port, addr=addr, registry=self.registry)


V = TypeVar("V")


def _one(label: Any, value: Any) -> dict[str, Any]:
    """A gauge's single series under `label`, none when `value` is None."""
    return {} if value is None else {str(label or ""): value}


def _changes(values: dict[tuple[str, str], V], key: tuple[str, str], value: V | None) -> list[tuple[V, int]]:
    """Set values[key] to value (None: remove it); what left (-1) and what came (+1), nothing when unchanged."""
    old = values.pop(key, None) if value is None else values.get(key)
    if old == value:
        return []
    if value is not None:
        values[key] = value
    return [(v, step) for v, step in ((old, -1), (value, 1)) if v is not None]
