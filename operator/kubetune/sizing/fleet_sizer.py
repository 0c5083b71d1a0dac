"""Sizing against a recent snapshot of the cluster's GPU nodes, shared by a burst of new FineTuneJobs.

Sizing one job against 250 nodes cost ~18 ms: half grouping the Node objects into GPU pools, half the
layout search. A burst of 1,000 jobs repeated both for every job. Here the pools are built once per node
snapshot (at most every `ttl_seconds`) and outcomes are memoized per snapshot by the part of the spec the
sizer reads, so a sweep of jobs that differ only in data, output or learning-rate-like fields sizes once.
The scheduler still places pods on live data; a layout sized on a snapshot a few seconds old is at worst
re-sized on the next retry.

Within one snapshot the GPUs of every trainer Job the operator creates are handed out (`hand_out`): they
count as requested of their GPU type until the next snapshot sees the Job's pods. Without that, every job of
a burst sized inside one snapshot saw the same free GPUs and got the same type (~50 jobs at 10/s), so a type
with 10 free GPUs took all 50 and 40 of them waited unschedulable until they were moved minutes later. A
memoized layout whose GPUs were free when sized is used again only while its type can still place it. (Across
snapshots, the operator's Jobs whose pods do not exist yet come with the pods: `Reconciler._gpu_holdings`.)
"""

from __future__ import annotations

import copy
import dataclasses
import json
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from kubetune.api import FineTuneJobSpec

from .fleet import Fleet, GpuHolding, fleet_from_nodes, with_occupancy
from .layout import SizingOutcome, size_job_layout

# The spec fields the sizer and the layout read (sizer.size_job, layout.size_job_layout), by their Python
# names. Anything else (dataset, output, image, secrets, suspend, cancel, limits, TTL) cannot change a layout.
SIZING_FIELDS = frozenset({"model", "method", "lora", "quantization", "training", "resources", "distributed"})
MEMO_LIMIT = 512


def sizing_key(spec: FineTuneJobSpec) -> str:
    """The memo key of a spec: its sizing fields, defaults applied (an omitted lora/quantization block
    counts as its defaults, as the sizer reads it), as canonical JSON."""
    fields = spec.model_dump(include=set(SIZING_FIELDS), mode="json")
    lora, quant = spec.effective_lora(), spec.effective_quantization()
    fields["lora"] = lora.model_dump(mode="json") if lora is not None else None
    fields["quantization"] = quant.model_dump(mode="json") if quant is not None else None
    return json.dumps(fields, sort_keys=True)


class FleetSizer:
    """size(spec) -> SizingOutcome against a node snapshot refreshed at most every ttl_seconds."""

    def __init__(self, list_nodes: Callable[[], list[dict[str, Any]]], ttl_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 list_pods: Callable[[], Iterable[Mapping[str, Any] | GpuHolding] | None] | None = None) -> None:
        self._list_nodes = list_nodes
        # Unfinished pods of the whole cluster, as manifests or their GPU holdings (None when they cannot be
        # read): with them the sizer prefers GPU types with free capacity now. Without them it sizes on
        # allocatable GPUs alone.
        self._list_pods = list_pods
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._taken = float("-inf")
        self._nodes: list[dict[str, Any]] = []
        self._fleet: Fleet | None = None
        self._memo: dict[str, SizingOutcome] = {}
        self.hits = 0
        self.misses = 0
        self.stale = 0  # memo hits refused: GPUs handed out since made their type unable to place the layout
        self.snapshots = 0

    def _snapshot(self) -> tuple[list[dict[str, Any]], Fleet | None, dict[str, SizingOutcome]]:
        with self._lock:
            now = self._clock()
            if now - self._taken > self._ttl:
                nodes = self._list_nodes()
                fleet = fleet_from_nodes(nodes)
                pods = self._list_pods() if self._list_pods is not None else None
                if pods is not None:
                    with_occupancy(fleet, pods)
                self._nodes, self._fleet, self._memo = nodes, fleet, {}
                self._taken = now
                self.snapshots += 1
            return self._nodes, self._fleet, self._memo

    def fleet(self) -> Fleet | None:
        """The GPU pools of the current snapshot (shared: callers must not change it)."""
        return self._snapshot()[1]

    def size(self, spec: FineTuneJobSpec, avoid: frozenset[str] = frozenset()) -> SizingOutcome:
        """The layout for this spec on the current snapshot (a private copy: callers may change it).

        avoid: GPU products to treat as having no free GPUs (a re-size after the job's pods stayed unschedulable
        there); they are still chosen when nothing else fits."""
        nodes, fleet, memo = self._snapshot()
        key = sizing_key(spec) + "|" + ",".join(sorted(avoid))
        if avoid and fleet is not None:
            fleet = avoiding(fleet, avoid)
        with self._lock:  # the counters too: jobs are sized from the reconcile thread pool
            hit = memo.get(key)
            if hit is not None and not still_placeable(fleet, hit):
                hit = None
                self.stale += 1
            if hit is not None:
                self.hits += 1
            else:
                self.misses += 1
        if hit is not None:
            return copy.deepcopy(hit)
        outcome = size_job_layout(spec, nodes, fleet=fleet)
        with self._lock:
            if len(memo) >= MEMO_LIMIT:
                memo.clear()
            memo[key] = outcome
        return copy.deepcopy(outcome)

    def hand_out(self, held: GpuHolding | None) -> None:
        """GPUs of a trainer Job just created (not bound yet: `held.product` names its type) count as requested of
        that type in the current snapshot, as a pending pod selecting it would. The next snapshot counts the
        Job's pods instead. A snapshot taken since the Job was created may count it already (its pods, or the
        Job itself from the store): `held.job`, its UID, keeps it from counting twice."""
        if held is None or held.gpus <= 0 or not held.product:
            return
        with self._lock:
            fleet = self._fleet
            if fleet is None or not fleet.occupancy_known or (held.job and held.job in fleet.counted_jobs):
                return
            pool = fleet.pool(held.product)
            if pool is None:
                return
            pool.pending += held.gpus
            if held.job:
                fleet.counted_jobs.add(held.job)


def still_placeable(fleet: Fleet | None, outcome: SizingOutcome) -> bool:
    """Whether a memoized outcome still holds on the snapshot: a layout that was free when sized must still be
    placeable on its type (other outcomes do not depend on the GPUs handed out since)."""
    layout = outcome.layout
    if fleet is None or not fleet.occupancy_known or not outcome.free_now or layout is None \
            or not layout.gpu_type or layout.gpus_per_pod <= 0:
        return True
    pool = fleet.pool(layout.gpu_type)
    return pool is None or pool.placeable_now(layout.gpus_per_pod, layout.pods)


def avoiding(fleet: Fleet, products: frozenset[str]) -> Fleet:
    """A copy of the fleet whose pools of these products count as having no free GPUs (the shared snapshot is
    left as it is)."""
    wanted = {p.lower() for p in products}
    pools = [dataclasses.replace(pool, avoid=True) if pool.product.lower() in wanted else pool
             for pool in fleet.pools]
    return dataclasses.replace(fleet, pools=pools, occupancy_known=True)
