"""The next layout that needs less GPU memory per GPU, after the trainer ran out of it (pure, no I/O).

A smaller micro batch and gradient checkpointing (kubetune.oom) only shrink activations. When they are spent,
or when the estimate says the rest of the step (weights, master weights, gradients, optimizer states, buffers)
alone does not fit the GPU, the job needs another layout: a higher ZeRO stage, CPU offload of the optimizer or
the parameters, more GPUs, or a GPU with more memory — all within spec.resources and spec.distributed.

The failure is a measurement: the run needed at least what the estimate said, and its live tensors at least the
peak the trainer reported (torch.cuda.max_memory_allocated when it ran out). The ratio of that peak to the
estimate's live tensors scales every candidate's estimate, so a layout is only chosen
when it fits even if the estimator is off by as much as it was for the layout that failed. Candidates are
searched and ranked as the sizer does (kubetune.sizing.sizer): no offload before offload, then fewest GPUs, then
the smallest GPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

from kubetune.api import FineTuneJobSpec

from .catalog import resolve_architecture
from .estimator import MemoryEstimate, Parallelism, estimate_memory, gib
from .fleet import PRODUCT_LABEL, Fleet, GpuPool, parse_quantity_bytes
from .layout import Layout
from .sizer import DEFAULT_HEADROOM, _Candidate, _describe_pins, _layouts, _rank, _strategies, apply_patch
from .training_setup import setup_from_spec


@dataclasses.dataclass(frozen=True)
class Failure:
    """A run that ran out of GPU memory: its layout, its training settings, and what the trainer measured."""

    layout: Layout
    training: dict[str, Any]  # microBatchSize, gradientAccumulationSteps, gradientCheckpointing,
    # activationOffloading (camelCase)
    peak_bytes: int = 0  # the trainer's reported peak GPU memory at the failure (0: not reported)


@dataclasses.dataclass(frozen=True)
class LeanerLayout:
    """The next layout, or None with the reason none is left."""

    layout: Layout | None
    failed_estimate: int  # the estimator's bytes per GPU for the layout that failed (0: model unknown)
    estimate: int = 0  # the estimator's bytes per GPU for the new layout
    usable: int = 0  # bytes per GPU the new layout may use (after the sizer's headroom)
    change: str = ""  # what changed and why, for the status and the Event
    reason: str = ""  # why no layout is left (layout is None)


def layout_key(layout: Layout) -> tuple:
    """What makes two layouts the same run, memory-wise."""
    return (layout.gpu_type.lower(), layout.gpus_per_pod, layout.pods, layout.strategy, layout.zero_stage,
            layout.offload_optimizer, layout.offload_params)


def layout_record(layout: Layout) -> dict[str, Any]:
    """A layout as a status.memoryReplans entry stores it."""
    return {"gpuType": layout.gpu_type, "gpusPerPod": layout.gpus_per_pod, "pods": layout.pods,
            "strategy": layout.strategy, "zeroStage": layout.zero_stage,
            "offloadOptimizer": layout.offload_optimizer, "offloadParams": layout.offload_params}


def layout_from_record(record: dict[str, Any], *, gpu_memory_bytes: int = 0) -> Layout:
    """The Layout of a status.memoryReplans entry (the operator chose it: source "replan")."""
    gpu_type = str(record.get("gpuType") or "")
    gpus = int(record.get("gpusPerPod") or 0)
    return Layout(gpu_type=gpu_type, gpus_per_pod=gpus, pods=max(int(record.get("pods") or 1), 1),
                  strategy=str(record.get("strategy") or "none"), zero_stage=int(record.get("zeroStage") or 0),
                  offload_optimizer=bool(record.get("offloadOptimizer")),
                  offload_params=bool(record.get("offloadParams")),
                  node_selector={PRODUCT_LABEL: gpu_type} if gpus > 0 and gpu_type else {},
                  source="replan", gpu_memory_bytes=gpu_memory_bytes)


def describe_layout(layout: Layout) -> str:
    """'1 x NVIDIA-L4, single GPU', '2 x NVIDIA-L4, ZeRO-3 + CPU offload of optimizer over 2 GPUs'."""
    return f"{layout.pods * max(layout.gpus_per_pod, 1)} x {layout.gpu_type or 'GPU'}, {_parallelism(layout).describe()}"


def _parallelism(layout: Layout) -> Parallelism:
    return Parallelism(layout.strategy, layout.zero_stage, layout.offload_optimizer, layout.offload_params,
                       max(layout.total_gpus, 1))


def _pool(fleet: Fleet, product: str) -> GpuPool | None:
    return next((p for p in fleet.pools if p.product.lower() == product.lower()), None)


def _training_spec(spec: FineTuneJobSpec, training: dict[str, Any]) -> FineTuneJobSpec:
    keys = ("microBatchSize", "gradientAccumulationSteps", "gradientCheckpointing", "activationOffloading")
    patch = {k: training[k] for k in keys if k in training}
    return apply_patch(spec, {"training": patch}) if patch else spec


def _failed_estimate(spec: FineTuneJobSpec, failure: Failure, fleet: Fleet) -> tuple[MemoryEstimate, int] | None:
    """(the estimate of the failed layout, its GPU's bytes), or None when the model or the GPU is unknown."""
    try:
        arch = resolve_architecture(spec.model)
    except Exception:  # noqa: BLE001 - an unknown architecture: nothing to estimate
        return None
    pool = _pool(fleet, failure.layout.gpu_type)
    memory = pool.memory_bytes if pool is not None else failure.layout.gpu_memory_bytes
    if not memory:
        return None
    setup = setup_from_spec(_training_spec(spec, failure.training), bf16_capable=pool.bf16 if pool else True)
    return estimate_memory(arch, setup, _parallelism(failure.layout)), memory


def _scale(failed: MemoryEstimate, peak_bytes: int) -> float:
    """How far the estimate fell short at the failure: the trainer's peak (torch.cuda.max_memory_allocated, live
    tensors) over the estimate's live tensors, at least 1."""
    return max(1.0, peak_bytes / failed.tensors) if failed.tensors else 1.0


def batch_cannot_help(spec: FineTuneJobSpec, failure: Failure, fleet: Fleet,
                      headroom: float = DEFAULT_HEADROOM) -> str:
    """Why a smaller micro batch or gradient checkpointing cannot make the failed layout fit ('' when they may):
    everything but the activations and logits, scaled by the measured shortfall, exceeds the usable GPU memory."""
    found = _failed_estimate(spec, failure, fleet)
    if found is None:
        return ""
    est, memory = found
    fixed = est.total - est.activations - est.logits
    usable = int(memory * (1 - headroom))
    scale = _scale(est, failure.peak_bytes)
    if fixed * scale <= usable:
        return ""
    scaled = f" ({gib(fixed * scale)} GiB scaled by the measured peak)" if scale > 1 else ""
    return (f"weights, gradients, optimizer states and buffers alone need {gib(fixed)} GiB per GPU estimated with "
            f"{describe_layout(failure.layout)}{scaled}, more than the {gib(usable)} GiB usable")


def leaner_layout(spec: FineTuneJobSpec, failure: Failure, fleet: Fleet, tried: Iterable[Layout] = (),
                  headroom: float = DEFAULT_HEADROOM) -> LeanerLayout:
    """The layout the sizer prefers among those that need a smaller share of their GPU than the failed one and
    fit with the measured shortfall, within the spec's pins; never the failed layout or one in `tried`."""
    found = _failed_estimate(spec, failure, fleet)
    if found is None:
        return LeanerLayout(None, 0, reason=f"cannot estimate {spec.model.uri} on {failure.layout.gpu_type or 'its GPU'}"
                                            " to find a layout that needs less memory per GPU")
    failed_est, failed_memory = found
    scale = _scale(failed_est, failure.peak_bytes)
    failed_share = failed_est.total / failed_memory
    current = _training_spec(spec, failure.training)
    arch = resolve_architecture(current.model)
    res = current.resources
    excluded = {layout_key(failure.layout), *(layout_key(t) for t in tried)}
    pinned = res.gpu_type
    best: _Candidate | None = None
    leanest: _Candidate | None = None
    pod_limit = parse_quantity_bytes(res.memory)
    for pool in fleet.pools:
        if pinned and pool.product.lower() != pinned.lower():
            continue
        setup = setup_from_spec(current, bf16_capable=pool.bf16)
        limits = [x for x in (pool.host_memory_bytes, pod_limit) if x]
        host_limit = min(limits) if limits else 0
        for g, pods in _layouts(pool, res):
            for tier, par in _strategies(current.distributed, g * pods, current.method):
                cand = _Candidate(pool, g, pods, par, tier, estimate_memory(arch, setup, par), host_limit)
                layout = _layout(cand)
                if layout_key(layout) in excluded or cand.estimate.total / pool.memory_bytes >= failed_share:
                    continue
                if cand.host_limit and cand.host_need() > int(cand.host_limit * (1 - headroom)):
                    continue
                if leanest is None or _need(cand) < _need(leanest):
                    leanest = cand
                if cand.estimate.total * scale <= int(pool.memory_bytes * (1 - headroom)):
                    if best is None or _rank(cand) < _rank(best):
                        best = cand
    measured = (f"; the trainer measured a peak of {gib(failure.peak_bytes)} GiB" if failure.peak_bytes else "")
    failed_text = (f"{gib(failed_est.total)} GiB estimated per GPU with {describe_layout(failure.layout)} "
                   f"ran out of memory on a {gib(failed_memory)} GiB GPU{measured}")
    if best is None:
        pins = _describe_pins(current)
        if leanest is not None:
            usable = int(leanest.pool.memory_bytes * (1 - headroom))
            why = (f"the leanest, {describe_layout(_layout(leanest))}, needs {gib(leanest.estimate.total)} GiB per GPU "
                   f"estimated" + (f" ({gib(leanest.estimate.total * scale)} GiB scaled by the measured peak)"
                                   if scale > 1 else "") + f", more than the {gib(usable)} GiB usable")
        else:
            why = "no other layout of the cluster's GPUs needs less memory per GPU"
        return LeanerLayout(None, failed_est.total,
                            reason=f"{failed_text}; no layout within the pins{pins or ' (none)'} fits: {why}")
    layout = _layout(best)
    usable = int(best.pool.memory_bytes * (1 - headroom))
    change = (f"{describe_layout(failure.layout)} -> {describe_layout(layout)}: {failed_text}; "
              f"{gib(best.estimate.total)} GiB estimated per GPU of {gib(usable)} GiB usable")
    return LeanerLayout(layout, failed_est.total, best.estimate.total, usable, change)


def _need(c: _Candidate) -> float:
    return c.estimate.total / c.pool.memory_bytes


def _layout(c: _Candidate) -> Layout:
    par = c.par
    return Layout(gpu_type=c.pool.product, gpus_per_pod=c.gpus_per_pod, pods=c.pods, strategy=par.strategy,
                  zero_stage=par.zero, offload_optimizer=par.offload_optimizer, offload_params=par.offload_params,
                  node_selector={PRODUCT_LABEL: c.pool.product}, source="replan",
                  gpu_memory_bytes=c.pool.memory_bytes,
                  host_offload_bytes=c.estimate.host_offload * c.gpus_per_pod)
