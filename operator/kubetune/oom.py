"""Re-planning after the trainer ran out of GPU memory (pure functions, no I/O).

Running the same plan again would fail the same way, so the trainer's OutOfMemory exit code fails the Job at once
(its pod failure policy) and the operator recreates it with the next plan that needs less memory per GPU, resuming
from the last checkpoint:

1. a smaller micro batch with more gradient accumulation, keeping the global batch (micro batch x accumulation)
   exactly: the micro batch goes to its largest proper divisor (8 -> 4, 6 -> 3, 3 -> 1);
2. gradient checkpointing, when it is off;
3. activation offloading, when it is off and the run is not under DeepSpeed (the trainer refuses the two
   together): what checkpointing keeps (every layer's input) waits in host RAM instead of GPU memory, at the
   cost of a copy out and back per layer.

Each re-plan is recorded in `status.memoryReplans`; the builders apply the last one's `training` settings to the
plan. When neither step is left, the job fails with reason OutOfMemory and says what would still help.
"""

from __future__ import annotations

from typing import Any

from kubetune.api import FineTuneJobSpec


def current_training(spec: FineTuneJobSpec, replans: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The memory-relevant training settings the current plan uses (the spec's, overridden by the last re-plan)."""
    settings = {"microBatchSize": spec.training.micro_batch_size,
                "gradientAccumulationSteps": spec.training.gradient_accumulation_steps,
                "gradientCheckpointing": spec.training.gradient_checkpointing,
                "activationOffloading": spec.training.activation_offloading}
    if replans:
        settings.update(replans[-1].get("training") or {})
    return settings


def _largest_proper_divisor(n: int) -> int:
    for d in range(n // 2, 0, -1):
        if n % d == 0:
            return d
    return 1


def next_memory_plan(spec: FineTuneJobSpec, replans: list[dict[str, Any]] | None,
                     strategy: str = "") -> tuple[dict[str, Any], str] | None:
    """(the training settings of the next leaner plan, what changed in words), or None when nothing is left.
    `strategy` is the resolved one of the layout that ran out of memory (status.layout.strategy)."""
    now = current_training(spec, replans)
    micro, accum = int(now["microBatchSize"]), int(now["gradientAccumulationSteps"])
    if micro > 1:
        smaller = _largest_proper_divisor(micro)
        more = accum * (micro // smaller)
        change = (f"microBatchSize {micro} -> {smaller}, gradientAccumulationSteps {accum} -> {more} "
                  f"(global batch {micro * accum} per process kept)")
        return {**now, "microBatchSize": smaller, "gradientAccumulationSteps": more}, change
    if not now["gradientCheckpointing"]:
        return {**now, "gradientCheckpointing": True}, "gradientCheckpointing false -> true"
    if not now.get("activationOffloading") and strategy != "deepspeed" and spec.distributed.strategy != "deepspeed":
        return ({**now, "activationOffloading": True},
                "activationOffloading false -> true (saved activations wait in host RAM)")
    return None


def exhausted_message(spec: FineTuneJobSpec, replans: list[dict[str, Any]] | None) -> str:
    """What still helps when micro batch 1 with gradient checkpointing does not fit."""
    tried = f" after {len(replans)} re-plan(s)" if replans else ""
    offloading = " and activation offloading" if current_training(spec, replans).get("activationOffloading") else ""
    return (f"out of GPU memory at microBatchSize 1 with gradient checkpointing{offloading}{tried}; use a shorter "
            "training.maxSeqLength, method qlora, distributed.strategy deepspeed with a higher zeroStage or offload, "
            "or a GPU with more memory (spec.resources)")
