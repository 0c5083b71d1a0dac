"""Typed models of the FineTuneJob status (the CRD's `status` schema, docs/contracts.md §1).

Every status a pass writes goes through `FineTuneJobStatus` (`checked_status`): a field the CRD does not
declare (the apiserver would silently prune it) or a value of the wrong type is a bug caught in the pass,
not a status that quietly loses information. `tests/unit/test_status_model.py` ties these models to the
CRD's schema field by field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class _Status(BaseModel):
    """Base: camelCase aliases; unknown keys are refused (what we write must be what the CRD keeps)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Status):
    """A standard Kubernetes condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str = ""
    observed_generation: int | None = None


class LayoutStatus(_Status):
    """Where and how the trainer runs (status.layout)."""

    source: str | None = None
    gpu_type: str | None = None
    gpus_per_pod: int | None = None
    pods: int | None = None
    total_gpus: int | None = None
    procs_per_node: int | None = None
    strategy: str | None = None
    zero_stage: int | None = None
    spec_hash: str | None = None


class ProgressStatus(_Status):
    """Training progress read from the rank-0 trainer (status.progress)."""

    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    percent: float | None = None
    eta_seconds: float | None = None
    display: str | None = None
    updated_at: str | None = None


class MetricsStatus(_Status):
    """Latest training metrics (status.metrics)."""

    train_loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    tokens_per_second: float | None = None
    steady_tokens_per_second: float | None = None  # the training steps' own rate (no warm-up, eval, checkpoints)
    runtime_seconds: float | None = None


class ArtifactsStatus(_Status):
    """Where the run's outputs are (status.artifacts)."""

    adapter: str | None = None
    merged: str | None = None
    model: str | None = None
    metrics: str | None = None
    evaluation: str | None = None
    report: str | None = None
    gguf: str | None = None
    modelfile: str | None = None


class EvalMetricStatus(_Status):
    """One metric of status.evaluation.metrics."""

    metric: str | None = None
    base: float | None = None
    tuned: float | None = None
    delta: float | None = None
    passed: bool | None = None


class RegurgitationStatus(_Status):
    """status.evaluation.regurgitation."""

    training: float | None = None
    held_out: float | None = None


class EvaluationStatus(_Status):
    """Base-vs-tuned evaluation summary (status.evaluation)."""

    passed: bool | None = None
    display: str | None = None
    message: str | None = None
    error: str | None = None
    general_regression: float | None = None
    regurgitation: RegurgitationStatus | None = None
    metrics: list[EvalMetricStatus] | None = None


class WandbTrackingStatus(_Status):
    """The Weights & Biases run (status.tracking.wandb)."""

    run_id: str | None = None
    url: str | None = None
    run_dir: str | None = None


class TrackingStatus(_Status):
    """The experiment-tracking run (status.tracking, spec.tracking)."""

    run_id: str | None = None
    url: str | None = None
    wandb: WandbTrackingStatus | None = None


class CheckpointStatus(_Status):
    """The newest checkpoint (status.checkpoint)."""

    step: int | None = None
    uri: str | None = None


class GpuTimeStatus(_Status):
    """The completed Running stretches on one GPU type (status.accounting.gpuTime[])."""

    gpu_type: str
    running_seconds: float
    gpu_hours: float


class AccountingStatus(_Status):
    """GPU time, tokens and restarts (status.accounting)."""

    gpu_hours: float | None = None
    gpu_time: list[GpuTimeStatus] | None = None  # completed stretches by GPU type (kubetune.running_time)
    running_seconds: float | None = None
    running_since: str | None = None
    tokens: int | None = None
    restarts: int | None = None
    cost: float | None = None  # gpuHours x the GPU type's price (operator --pricing); absent without a price
    currency: str | None = None


class TokenLengthsStatus(_Status):
    """Token-length distribution of the examples (status.preflight.tokenLengths)."""

    min: int | None = None
    mean: float | None = None
    p50: int | None = None
    p95: int | None = None
    max: int | None = None


class PreflightCacheStatus(_Status):
    """The shared model cache as the preflight used it (status.preflight.cache; docs/cache.md)."""

    volume: str | None = None
    model: str | None = None
    dataset: str | None = None
    filled: list[str] | None = None
    hits: list[str] | None = None
    evicted: int | None = None
    bytes: int | None = None


class TraceBreakdownStatus(_Status):
    """The traced step's live tensors per GPU at its peak (status.preflight.trace.breakdownBytes)."""

    weights: int | None = None
    gradients: int | None = None
    optimizer_states: int | None = None
    activations: int | None = None


class PreflightTraceStatus(_Status):
    """The trainer's real step traced on fake tensors by the preflight (status.preflight.trace;
    kubetune.preflight_trace), or why no trace ran."""

    skipped: str | None = None
    peak_bytes: int | None = None
    peak_gib: float | None = Field(default=None, alias="peakGiB")
    paged_optimizer_bytes: int | None = None
    breakdown_bytes: TraceBreakdownStatus | None = None
    peak_at: str | None = None
    seq_length: int | None = None
    micro_batch_size: int | None = None
    basis: str | None = None
    seconds: float | None = None
    per_gpu_bytes: int | None = None
    usable_bytes: int | None = None
    gpu_type: str | None = None
    fits: bool | None = None


class PreflightStatus(_Status):
    """What the CPU preflight found (status.preflight; kubetune.preflight)."""

    spec_hash: str | None = None
    completed_at: str | None = None
    display: str | None = None
    model_revision: str | None = None
    model_type: str | None = None
    dataset_sha256: str | None = None
    eval_dataset_sha256: str | None = None
    format: str | None = None
    examples: int | None = None
    train_examples: int | None = None
    eval_examples: int | None = None
    train_rows: int | None = None
    tokens_per_epoch: int | None = None
    tokens: int | None = None
    steps: int | None = None
    world: int | None = None
    max_seq_length: int | None = None
    truncated: int | None = None
    truncated_locations: list[str] | None = None
    duplicates: int | None = None
    near_duplicates: int | None = None
    empty_answers: int | None = None
    token_lengths: TokenLengthsStatus | None = None
    cache: PreflightCacheStatus | None = None
    trace: PreflightTraceStatus | None = None


class EstimateStatus(_Status):
    """Steps, tokens, time and cost of the run before it starts (status.estimate; kubetune.estimate)."""

    steps: int | None = None
    tokens: int | None = None
    world: int | None = None
    gpu_type: str | None = None
    gpus: int | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    gpu_hours: float | None = None
    price_per_gpu_hour: float | None = None
    cost: float | None = None
    currency: str | None = None
    basis: str | None = None
    display: str | None = None


class ReplanLayoutStatus(_Status):
    """A layout in a memory re-plan: the one that failed, or the one chosen after it (kubetune.sizing.leaner)."""

    gpu_type: str | None = None
    gpus_per_pod: int | None = None
    pods: int | None = None
    strategy: str | None = None
    zero_stage: int | None = None
    offload_optimizer: bool | None = None
    offload_params: bool | None = None
    estimated_per_gpu_bytes: int | None = None  # the estimator's need per GPU with this layout
    gpu_memory_bytes: int | None = None  # memory of one GPU of this type


class ReplanFailureStatus(_Status):
    """What ran out of GPU memory, as planned and as measured."""

    layout: ReplanLayoutStatus | None = None
    micro_batch_size: int | None = None
    gradient_checkpointing: bool | None = None
    peak_gpu_memory_bytes: int | None = None  # the trainer's reported peak (absent when it reported none)


class MemoryReplanStatus(_Status):
    """One re-plan after the trainer ran out of GPU memory (kubetune.oom, kubetune.oom_layout)."""

    pod: str | None = None
    reason: str | None = None  # TraceExceedsEstimate: the preflight's traced step did not fit (absent: OutOfMemory)
    step: int | None = None
    message: str | None = None
    change: str | None = None
    training: dict[str, Any] | None = None  # the plan's training settings from then on
    failed: ReplanFailureStatus | None = None
    layout: ReplanLayoutStatus | None = None  # the layout from then on, when this re-plan changed it


class FineTuneJobStatus(_Status):
    """The whole status subresource."""

    phase: str | None = None
    reason: str | None = None
    message: str | None = None
    observed_generation: int | None = None
    conditions: list[Condition] | None = None
    plan: dict[str, Any] | None = None  # the sizer's decision (preserve-unknown-fields in the CRD)
    layout: LayoutStatus | None = None
    progress: ProgressStatus | None = None
    metrics: MetricsStatus | None = None
    artifacts: ArtifactsStatus | None = None
    evaluation: EvaluationStatus | None = None
    tracking: TrackingStatus | None = None
    checkpoint: CheckpointStatus | None = None
    resumed_from_step: int | None = None
    accounting: AccountingStatus | None = None
    preflight: PreflightStatus | None = None
    estimate: EstimateStatus | None = None
    start_time: str | None = None
    completion_time: str | None = None
    children_deleted: bool | None = None
    unschedulable_gpu_types: list[str] | None = None  # re-sizing avoids them while another GPU type fits
    memory_replans: list[MemoryReplanStatus] | None = None  # after running out of GPU memory, oldest first


def condition(ctype: str, status: bool | str, reason: str, message: str = "", *, now: str,
              generation: int | None = None) -> dict[str, Any]:
    """A condition as the CRD stores it; `status` may be a bool or "True"/"False"/"Unknown"."""
    text = status if isinstance(status, str) else ("True" if status else "False")
    model = Condition(type=ctype, status=text, reason=reason, message=message[:4096], last_transition_time=now,
                      observed_generation=generation)
    return model.model_dump(by_alias=True, exclude_none=True)


def checked_status(status: dict[str, Any]) -> dict[str, Any]:
    """`status` unchanged, after checking it against the typed model (raises pydantic.ValidationError)."""
    FineTuneJobStatus.model_validate(status)
    return status
