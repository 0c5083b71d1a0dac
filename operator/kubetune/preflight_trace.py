"""The preflight's traced step in the status and against the sized layout (pure functions, no I/O).

The preflight traces the trainer's real training step on fake tensors for the exact model and data
(kubetune_trainer.preflight_trace): live tensor bytes per GPU at the step's peak, split into weights, gradients,
optimizer states and activations, or the reason no trace ran. The trace has no runtime overhead, so the need per
GPU adds the documented constants of the estimator (docs/sizing.md "Runtime overhead"): the layout's communication
buffers (NCCL, DDP buckets, ZeRO buckets), the CUDA context, and allocator fragmentation (15% of the transient
bytes, 2% of the long-lived ones). It must fit the GPU memory the sizer may use (after its headroom), or the
trainer Job is not created on that layout (kubetune.oom_layout.trace_outlook finds another).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

from kubetune.sizing.estimator import CUDA_CONTEXT_BYTES, NCCL_BYTES, fragmentation_bytes, gib
from kubetune.sizing.layout import Layout
from kubetune.sizing.sizer import DEFAULT_HEADROOM

BREAKDOWN_KEYS = ("weights", "gradients", "optimizerStates", "activations")


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def trace_status(block: Any) -> dict[str, Any] | None:
    """status.preflight.trace from the preflight's `trace` block (None when the preflight reported none)."""
    if not isinstance(block, dict) or not block:
        return None
    if block.get("skipped") or "peakBytes" not in block:
        return {"skipped": str(block.get("skipped") or "the preflight reported no traced figure")[:1024]}
    breakdown = block.get("breakdown") or {}
    peak, paged = _int(block.get("peakBytes")), _int(block.get("pagedOptimizerBytes"))
    out: dict[str, Any] = {
        "peakBytes": peak, "peakGiB": gib(peak + paged), "pagedOptimizerBytes": paged,
        "breakdownBytes": {k: _int(breakdown.get(k)) for k in BREAKDOWN_KEYS},
        "peakAt": str(block.get("peakAt") or "")[:256], "seqLength": _int(block.get("seqLength")),
        "microBatchSize": _int(block.get("microBatchSize")), "basis": str(block.get("basis") or ""),
    }
    try:
        out["seconds"] = float(block.get("seconds") or 0.0)
    except (TypeError, ValueError):
        out["seconds"] = 0.0
    return out


@dataclasses.dataclass(frozen=True)
class TracedFit:
    """The traced step against one GPU of the sized layout (bytes per GPU)."""

    traced: int  # the traced live tensors, paged optimizer states included
    comm: int  # communication buffers (NCCL, DDP buckets, ZeRO buckets)
    runtime: int  # CUDA context and allocator fragmentation
    usable: int  # the GPU's memory the sizer may use (after its headroom)
    gpu_type: str

    @property
    def tensors(self) -> int:
        """Live tensors as the estimator counts them (MemoryEstimate.tensors): traced plus buffers."""
        return self.traced + self.comm

    @property
    def need(self) -> int:
        """What one GPU must hold."""
        return self.tensors + self.runtime

    @property
    def fits(self) -> bool:
        """Whether the traced step fits the layout's GPU."""
        return self.need <= self.usable

    def message(self) -> str:
        """'traced peak 17.8 GiB + 2.3 GiB runtime (...) = 20.1 GiB of 19.8 GiB usable on one NVIDIA-L4'."""
        return (f"traced peak {gib(self.traced)} GiB + {gib(self.comm + self.runtime)} GiB runtime (buffers, CUDA "
                f"context, fragmentation) = {gib(self.need)} GiB of {gib(self.usable)} GiB usable on one "
                f"{self.gpu_type}")

    def record(self) -> dict[str, Any]:
        """The verdict fields of status.preflight.trace."""
        return {"perGpuBytes": self.need, "usableBytes": self.usable, "gpuType": self.gpu_type, "fits": self.fits}


def traced_fit(trace: dict[str, Any] | None, plan: dict[str, Any] | None, layout: Layout | None) -> TracedFit | None:
    """The traced step (status.preflight.trace) against the sized layout; None without a traced figure or without
    a GPU to compare with (a CPU layout, an unknown GPU memory)."""
    if not trace or "peakBytes" not in trace or layout is None or layout.gpus_per_pod <= 0:
        return None
    plan = plan or {}
    memory = layout.gpu_memory_bytes or (_int(plan.get("gpuMemoryBytes")) if plan.get("gpuType") == layout.gpu_type
                                         else 0)
    if not memory:
        return None
    headroom = plan.get("headroom")
    headroom = float(headroom) if isinstance(headroom, (int, float)) else DEFAULT_HEADROOM
    b = trace.get("breakdownBytes") or {}
    paged = _int(trace.get("pagedOptimizerBytes"))
    estimate = plan.get("estimate") if isinstance(plan.get("estimate"), dict) else {}
    analytic = estimate.get("breakdownBytes") or {}
    if "commBuffers" in analytic:
        comm = _int(analytic["commBuffers"])
    else:  # no analytic estimate: NCCL's buffers with more than one GPU, DDP's second copy of the gradients
        comm = (NCCL_BYTES if layout.total_gpus > 1 else 0) + (_int(b.get("gradients")) if layout.strategy == "ddp"
                                                              else 0)
    context = _int(analytic.get("cudaContext")) if "cudaContext" in analytic else CUDA_CONTEXT_BYTES
    persistent = _int(b.get("weights")) + _int(b.get("optimizerStates")) + paged + comm
    transient = _int(b.get("gradients")) + _int(b.get("activations"))
    return TracedFit(_int(trace.get("peakBytes")) + paged, comm, context + fragmentation_bytes(persistent, transient),
                     int(memory * (1 - headroom)), layout.gpu_type)


def plan_with_trace(plan: dict[str, Any] | None, preflight: dict[str, Any] | None) -> dict[str, Any] | None:
    """status.plan with the traced figure beside the analytic one (plan.estimate.traced) and `source` naming the
    figure the layout decision rests on: "trace" when the preflight traced the step, else "analytic"."""
    trace = (preflight or {}).get("trace")
    if not plan or not isinstance(plan.get("estimate"), dict) or not isinstance(trace, dict):
        return plan
    plan = copy.deepcopy(plan)
    estimate = plan["estimate"]
    if "peakBytes" not in trace:
        estimate["source"] = "analytic"
        estimate["traced"] = {"skipped": trace.get("skipped", "")}
        return plan
    estimate["source"] = "trace"
    estimate["traced"] = {k: trace[k] for k in ("peakBytes", "peakGiB", "perGpuBytes", "usableBytes", "gpuType",
                                                "fits", "basis") if k in trace}
    if "perGpuBytes" in trace:
        estimate["traced"]["perGpuGiB"] = gib(trace["perGpuBytes"])
    return plan
