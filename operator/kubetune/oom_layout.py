"""Out-of-memory re-planning across layouts: what failed, and the layout the recreated Job uses (pure, no I/O).

kubetune.oom shrinks the micro batch and turns gradient checkpointing on; when those are spent, or when the
estimate says they cannot help, kubetune.sizing.leaner finds a layout that needs less memory per GPU (a higher
ZeRO stage, CPU offload, more GPUs or a larger GPU, within the spec's pins). The controller gathers a
`MemoryOutlook` when a trainer pod ran out of memory; the pass records it in `status.memoryReplans` (what failed,
as planned and as measured, and what changed), and once a re-plan carries a `layout`, every later Job of the
run is built with it instead of the sizer's first choice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kubetune import reasons
from kubetune.api import FineTuneJobSpec
from kubetune.oom import current_training
from kubetune.sizing.fleet import Fleet
from kubetune.sizing.layout import Layout, SizingOutcome, layout_from_resources, resolve_strategy
from kubetune.sizing.leaner import (Failure, LeanerLayout, batch_cannot_help, describe_layout, layout_from_record,
                                    layout_record, leaner_layout)


@dataclasses.dataclass(frozen=True)
class MemoryOutlook:
    """What the controller found for a trainer pod that ran out of GPU memory."""

    failure: Failure
    failed_gpu_memory: int  # bytes of one GPU of the failed layout's type (0: unknown)
    leaner: LeanerLayout  # the next layout, or why none is left
    batch_blocked: str = ""  # why a smaller micro batch / checkpointing cannot help ('' when they may)

    def failed_record(self) -> dict[str, Any]:
        """status.memoryReplans[].failed."""
        layout = layout_record(self.failure.layout)
        if self.leaner.failed_estimate:
            layout["estimatedPerGpuBytes"] = self.leaner.failed_estimate
        if self.failed_gpu_memory:
            layout["gpuMemoryBytes"] = self.failed_gpu_memory
        out: dict[str, Any] = {"layout": layout,
                               "microBatchSize": int(self.failure.training.get("microBatchSize") or 0),
                               "gradientCheckpointing": bool(self.failure.training.get("gradientCheckpointing"))}
        if self.failure.peak_bytes:
            out["peakGpuMemoryBytes"] = self.failure.peak_bytes
        return out

    def layout_record(self) -> dict[str, Any] | None:
        """status.memoryReplans[].layout for the next layout (None when none is left)."""
        new = self.leaner.layout
        if new is None:
            return None
        return {**layout_record(new), "estimatedPerGpuBytes": self.leaner.estimate,
                "gpuMemoryBytes": new.gpu_memory_bytes}


def replanned_layout(status: dict[str, Any]) -> Layout | None:
    """The layout the last layout-changing re-plan chose, or None when no re-plan changed the layout."""
    for replan in reversed(status.get("memoryReplans") or []):
        if replan.get("layout"):
            record = replan["layout"]
            return layout_from_record(record, gpu_memory_bytes=int(record.get("gpuMemoryBytes") or 0))
    return None


def tried_layouts(status: dict[str, Any]) -> list[Layout]:
    """Every layout that already ran out of memory in this run."""
    return [layout_from_record(r["failed"]["layout"]) for r in status.get("memoryReplans") or []
            if (r.get("failed") or {}).get("layout")]


def running_layout(status: dict[str, Any], spec: FineTuneJobSpec) -> Layout | None:
    """The layout the current Job runs with, offload included (status.layout does not carry offload): a re-plan's,
    else status.layout with the strategy block of the sizer's plan (or of the spec when it pinned the layout)."""
    replanned = replanned_layout(status)
    if replanned is not None:
        return replanned
    st = status.get("layout") or {}
    if not st.get("gpuType") or not st.get("gpusPerPod"):
        return None
    plan = status.get("plan") or {}
    dist = plan.get("distributed") or {}
    if st.get("source") == "spec" or not dist:
        pinned = layout_from_resources(spec)
        strategy, stage = resolve_strategy(spec, int(st["gpusPerPod"]), int(st.get("pods") or 1))
        off_opt, off_par = pinned.offload_optimizer, pinned.offload_params
    else:
        strategy, stage = str(dist.get("strategy") or st.get("strategy") or "none"), int(dist.get("zeroStage") or 0)
        off_opt, off_par = bool(dist.get("offloadOptimizer")), bool(dist.get("offloadParams"))
    memory = int(plan.get("gpuMemoryBytes") or 0) if plan.get("gpuType") == st.get("gpuType") else 0
    return Layout(gpu_type=str(st["gpuType"]), gpus_per_pod=int(st["gpusPerPod"]), pods=int(st.get("pods") or 1),
                  strategy=str(st.get("strategy") or strategy), zero_stage=int(st.get("zeroStage") or stage),
                  offload_optimizer=off_opt, offload_params=off_par, source=str(st.get("source") or "sizer"),
                  gpu_memory_bytes=memory)


def memory_outlook(spec: FineTuneJobSpec, status: dict[str, Any], summary: dict[str, Any] | None,
                   fleet: Fleet | None) -> MemoryOutlook | None:
    """The failure and the next layout for a trainer that ran out of memory (None without a layout or a fleet)."""
    failed = running_layout(status, spec)
    if failed is None or fleet is None:
        return None
    return _outlook(spec, status, failed, int((summary or {}).get("peakGpuMemoryBytes") or 0), fleet)


def trace_outlook(spec: FineTuneJobSpec, status: dict[str, Any], sized: Layout, traced_bytes: int,
                  fleet: Fleet | None) -> MemoryOutlook | None:
    """The next layout for a job whose preflight-traced step does not fit the sized layout, before any GPU is used:
    found as after running out of memory, with the traced live tensors as the measured peak, so every candidate's
    estimate is scaled up to the traced figure at least (None without a fleet)."""
    if fleet is None:
        return None
    return _outlook(spec, status, sized, traced_bytes, fleet)


def _outlook(spec: FineTuneJobSpec, status: dict[str, Any], failed: Layout, peak: int, fleet: Fleet) -> MemoryOutlook:
    training = current_training(spec, status.get("memoryReplans"))
    failure = Failure(failed, training, peak)
    pool = next((p for p in fleet.pools if p.product.lower() == failed.gpu_type.lower()), None)
    return MemoryOutlook(failure, pool.memory_bytes if pool is not None else failed.gpu_memory_bytes,
                         leaner_layout(spec, failure, fleet, tried_layouts(status)),
                         batch_cannot_help(spec, failure, fleet))


def with_replanned_layout(outcome: SizingOutcome, status: dict[str, Any]) -> SizingOutcome:
    """The sizing outcome a Job is built from: the sizer's, unless a memory re-plan chose another layout."""
    layout = replanned_layout(status)
    if layout is None:
        return outcome
    last = next(r for r in reversed(status.get("memoryReplans") or []) if r.get("layout"))
    if last.get("reason") == reasons.TRACE_EXCEEDS_ESTIMATE:
        return SizingOutcome(True, layout, reasons.TRACE_EXCEEDS_ESTIMATE,
                             f"re-sized because the preflight's traced step did not fit: {describe_layout(layout)}",
                             plan_status=outcome.plan_status)
    return SizingOutcome(True, layout, reasons.REPLANNED_OOM,
                         f"re-planned after running out of GPU memory: {describe_layout(layout)}",
                         plan_status=outcome.plan_status)
