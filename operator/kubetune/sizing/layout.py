"""The compute layout of a run (GPU type, GPUs per pod, pods, strategy): from the sizer or pinned by the spec."""

from __future__ import annotations

import dataclasses
from typing import Any

from kubetune import reasons
from kubetune.api import FineTuneJobSpec

from .fleet import Fleet, fleet_from_nodes
from .sizer import SizingDecision, size_job

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where and how the trainer runs; everything the builders need besides the spec."""

    gpu_type: str
    gpus_per_pod: int
    pods: int
    strategy: str  # resolved: none | ddp | deepspeed
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    source: str = "sizer"  # sizer | spec
    gpu_memory_bytes: int = 0
    host_offload_bytes: int = 0  # host RAM per pod the sizer estimated for CPU offload (0: none or unknown)

    @property
    def procs_per_node(self) -> int:
        """Trainer processes per pod: one per GPU, one on CPU."""
        return self.gpus_per_pod if self.gpus_per_pod > 0 else 1

    @property
    def total_gpus(self) -> int:
        """GPUs across all pods."""
        return self.gpus_per_pod * self.pods

    def distributed(self) -> dict[str, Any]:
        """The plan's `distributed` block (docs/contracts.md §2)."""
        return {"strategy": self.strategy, "zeroStage": self.zero_stage,
                "offloadOptimizer": self.offload_optimizer, "offloadParams": self.offload_params,
                "numNodes": self.pods, "procsPerNode": self.procs_per_node}

    def to_status(self, spec_hash: str = "") -> dict[str, Any]:
        """The status.layout block."""
        out = {"source": self.source, "gpuType": self.gpu_type, "gpusPerPod": self.gpus_per_pod,
               "pods": self.pods, "totalGpus": self.total_gpus, "procsPerNode": self.procs_per_node,
               "strategy": self.strategy, "zeroStage": self.zero_stage}
        if spec_hash:
            out["specHash"] = spec_hash
        return out


def resolve_strategy(spec: FineTuneJobSpec, gpus_per_pod: int, pods: int) -> tuple[str, int]:
    """Resolve `auto`/`ddp`/`deepspeed` to none|ddp|deepspeed and a ZeRO stage for this layout."""
    dist = spec.distributed
    procs = max(gpus_per_pod, 1) * max(pods, 1)
    wants_zero = dist.zero_stage > 0 or dist.offload_optimizer or dist.offload_params
    if dist.strategy == "deepspeed" or (dist.strategy == "auto" and wants_zero):
        return "deepspeed", dist.zero_stage or (3 if dist.offload_params else 2)
    if procs == 1:
        return "none", 0
    if dist.strategy == "auto" and spec.method == "full":
        return "deepspeed", 2
    return "ddp", 0


def layout_from_resources(spec: FineTuneJobSpec) -> Layout:
    """The layout pinned by spec.resources."""
    res = spec.resources
    pods = max(res.pods, 1)
    gpus = res.gpus_per_pod
    strategy, stage = resolve_strategy(spec, gpus, pods)
    selector = {GPU_PRODUCT_LABEL: res.gpu_type} if gpus > 0 and res.gpu_type else {}
    return Layout(gpu_type=res.gpu_type if gpus > 0 else "", gpus_per_pod=gpus, pods=pods,
                  strategy=strategy, zero_stage=stage,
                  offload_optimizer=spec.distributed.offload_optimizer and strategy == "deepspeed",
                  offload_params=spec.distributed.offload_params and strategy == "deepspeed",
                  node_selector=selector, source="spec")


def layout_from_decision(decision: SizingDecision, spec: FineTuneJobSpec) -> Layout:
    """The layout chosen by a sizing decision (docs/contracts.md §8)."""
    par = decision.parallelism
    gpus = decision.gpus_per_pod
    pods = max(decision.pods, 1)
    strategy, stage = par.strategy, par.zero
    selector = dict(decision.node_selector)
    product = decision.gpu_product
    if gpus > 0 and product and GPU_PRODUCT_LABEL not in selector:
        selector[GPU_PRODUCT_LABEL] = product
    return Layout(gpu_type=product if gpus > 0 else "", gpus_per_pod=gpus, pods=pods,
                  strategy=strategy, zero_stage=stage,
                  offload_optimizer=par.offload_optimizer, offload_params=par.offload_params,
                  node_selector=selector, source="sizer",
                  gpu_memory_bytes=decision.gpu_memory_bytes,
                  host_offload_bytes=(decision.estimate.host_offload * max(gpus, 1)
                                      if decision.estimate is not None else 0))


@dataclasses.dataclass
class SizingOutcome:
    """Result of sizing a job: a layout when it fits, else the reason and a suggestion."""

    fits: bool
    layout: Layout | None
    reason: str
    message: str
    suggestion: str = ""
    plan_status: dict[str, Any] = dataclasses.field(default_factory=dict)
    free_now: bool = True  # the layout's GPUs are free now (always True when occupancy is unknown)


def size_job_layout(spec: FineTuneJobSpec, nodes: list[dict[str, Any]], *, fleet: Fleet | None = None
                    ) -> SizingOutcome:
    """Size a job against the cluster's Nodes (or a Fleet already built from them)."""
    try:
        decision = size_job(spec, fleet if fleet is not None else fleet_from_nodes(nodes))
        plan_status = dict(decision.to_status())
    except Exception as exc:  # the sizer is pure; an error means the spec cannot be sized
        if spec.resources.pins_layout():
            layout = layout_from_resources(spec)
            return SizingOutcome(True, layout, reasons.PINNED_BY_SPEC,
                                 f"layout pinned by spec.resources ({describe(layout)}); estimate failed: {exc}")
        return SizingOutcome(False, None, reasons.SIZING_ERROR, f"cannot size this job: {exc}")
    if spec.resources.pins_layout():
        layout = layout_from_resources(spec)
        note = "" if decision.fits else f"; warning from the sizer: {decision.message}"
        return SizingOutcome(True, layout, reasons.PINNED_BY_SPEC,
                             f"layout pinned by spec.resources ({describe(layout)}){note}",
                             plan_status=plan_status)
    if not decision.fits:
        return SizingOutcome(False, None, reasons.INSUFFICIENT_GPU, decision.message, decision.suggestion,
                             plan_status)
    layout = layout_from_decision(decision, spec)
    return SizingOutcome(True, layout, reasons.SIZED, f"sized: {describe(layout)}. {decision.message}".strip(),
                         plan_status=plan_status, free_now=decision.free_now)


def describe(layout: Layout) -> str:
    """One-line description of a layout."""
    if layout.gpus_per_pod == 0:
        where = f"{layout.pods} CPU pod(s)"
    else:
        where = f"{layout.pods} pod(s) x {layout.gpus_per_pod} {layout.gpu_type or 'GPU'}"
    stage = f" ZeRO-{layout.zero_stage}" if layout.strategy == "deepspeed" else ""
    return f"{where}, strategy {layout.strategy}{stage}"
