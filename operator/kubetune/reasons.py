"""Every condition/Event reason the operator writes, in one place (CamelCase, stable API)."""

# Sizing
SIZED = "Sized"
PINNED_BY_SPEC = "PinnedBySpec"
INSUFFICIENT_GPU = "InsufficientGPU"
SIZING_ERROR = "SizingError"
INVALID_SPEC = "InvalidSpec"

# Lifecycle
CREATED = "ChildrenCreated"
WAITING_FOR_PODS = "WaitingForPods"
PODS_RUNNING = "PodsRunning"
QUEUED = "QueuedByKueue"
# Kueue (the Admitted condition; kubetune.kueue_admission)
KUEUE_ADMITTED = "AdmittedByKueue"
KUEUE_PREEMPTED = "PreemptedByKueue"  # a higher-priority Workload took the quota: the Job is suspended again
KUEUE_EVICTED = "EvictedByKueue"  # Kueue evicted the Workload for another reason (stopped queue, timeout)
KUEUE_INACTIVE = "KueueWorkloadInactive"
KUEUE_NOT_INSTALLED = "KueueNotInstalled"  # a queue label, but the cluster has no Kueue
SUSPENDED = "SuspendedBySpec"
RESUMED = "Resumed"
RECREATING = "RecreatingForSpecChange"
RESIZING = "ResizingUnschedulable"  # the pods stayed unschedulable: sized again without that GPU type
COMPLETED = "Completed"
CANCELLED = "CancelledBySpec"
RETRYING = "PodFailedRetrying"
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
DEADLINE_EXCEEDED = "DeadlineExceeded"
POD_FAILURE_POLICY = "PodFailurePolicy"
JOB_FAILED = "JobFailed"
JOB_MISSING = "JobMissing"
TTL_EXPIRED = "TTLExpired"
CONTAINER_NOT_STARTING = "TrainerContainerNotStarting"  # e.g. a missing Secret, an image that cannot be pulled
CHILD_REJECTED = "ChildRejected"  # the apiserver refused a child (invalid, forbidden, over quota)
CHILD_NOT_OWNED = "ChildNotOwned"  # a child name is taken by an object this FineTuneJob does not own
PROGRESS_UNREACHABLE = "ProgressUnreachable"

# Post-training evaluation (EvaluationPassed condition and its Event; kubetune.evaluation)
EVALUATION_GATES_PASSED = "EvaluationGatesPassed"
EVALUATION_GATES_FAILED = "EvaluationGatesFailed"
EVALUATION_ERROR = "EvaluationError"
# Serving export (Exported condition; kubetune.export_status)
EXPORT_COMPLETED = "GGUFExported"
EXPORT_FAILED = "GGUFExportFailed"
# Experiment tracking (Tracked condition; kubetune.tracking_status)
TRACKING_LOGGED = "TrackingRunLogged"
TRACKING_UNAVAILABLE = "TrackingUnavailable"

DIVERGED_CONTINUED = "DivergedContinued"  # the loss diverged; training.divergence.action warn let the run finish
PREEMPTED_RESUMING = "ResumingAfterPreemption"  # the trainer stopped on SIGTERM after a checkpoint
REPLANNED_OOM = "ReplannedAfterOutOfMemory"  # out of GPU memory: the Job is recreated with a leaner plan
OUT_OF_MEMORY = "OutOfMemory"  # out of GPU memory and no leaner plan left

# Preflight (the CPU check of model and data before the trainer Job; kubetune.preflight)
PREFLIGHT_RUNNING = "PreflightRunning"
PREFLIGHT_RERUN = "PreflightRerunForSpecChange"
CACHE_CLAIM_NOT_BOUND = "CacheClaimNotBound"  # the preflight pod waits for the cache claim to be bound (docs/cache.md)
VALIDATED = "Validated"
PREFLIGHT_FAILED = "PreflightFailed"
ADVICE_NONE = "NoAdvice"
TRACE_EXCEEDS_ESTIMATE = "TraceExceedsEstimate"  # the traced step does not fit the sized layout: re-sized

# Trainer termination-summary reasons and the trainer's exit code for each (docs/contracts.md §5). The trainer
# package has the same table (kubetune_trainer.outcomes); tests/unit/test_failure_taxonomy.py checks they agree.
TRAINER_EXIT_CODES = {
    "Completed": 0,
    "TrainingError": 1,
    "InvalidPlan": 3,
    "DataError": 3,
    "NonFiniteLoss": 4,
    "Diverged": 5,
    "PermissionDenied": 6,
    "NoSpaceLeft": 7,
    "UnsupportedModel": 8,
    "OutOfMemory": 9,
    "Preempted": 75,
}

# Trainer reasons that make a retry pointless: the pod failure policy fails the Job at once on their exit codes.
PERMANENT_TRAINER_REASONS = frozenset({"InvalidPlan", "DataError", "NonFiniteLoss", "Diverged", "PermissionDenied",
                                       "NoSpaceLeft", "UnsupportedModel"})
PERMANENT_EXIT_CODES = tuple(sorted({TRAINER_EXIT_CODES[r] for r in PERMANENT_TRAINER_REASONS}))
# Out of GPU memory: the pod failure policy fails the Job at once and the operator re-plans (kubetune.oom).
REPLAN_TRAINER_REASONS = frozenset({"OutOfMemory"})
REPLAN_EXIT_CODES = tuple(sorted({TRAINER_EXIT_CODES[r] for r in REPLAN_TRAINER_REASONS}))
# The trainer stopped on request after a complete checkpoint: not counted against backoffLimit.
PREEMPTED_EXIT_CODE = TRAINER_EXIT_CODES["Preempted"]


# What to do about each permanent trainer failure (appended to the Failed condition's message).
PERMANENT_FAILURE_FIXES = {
    "InvalidPlan": "fix the spec (or the plan ConfigMap) and recreate the FineTuneJob",
    "DataError": "fix the dataset at the file and line named above, then recreate the FineTuneJob",
    "NonFiniteLoss": "lower spec.training.learningRate, keep maxGradNorm > 0 or use bf16 instead of fp16",
    "Diverged": "lower spec.training.learningRate or raise warmup; the last good checkpoint is kept",
    "PermissionDenied": "make the output volume writable for the trainer's user (runAsUser/fsGroup)",
    "NoSpaceLeft": "free space on the output volume or use a larger one; completed checkpoints are kept",
    "UnsupportedModel": "use a model architecture that transformers can load",
}
