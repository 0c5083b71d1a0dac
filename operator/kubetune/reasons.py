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
COMPLETING = "PodsCompleted"
QUEUED = "QueuedByKueue"
SUSPENDED = "SuspendedBySpec"
RESUMED = "Resumed"
RECREATING = "RecreatingForSpecChange"
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

# Trainer termination-summary reasons (docs/contracts.md §5) that make a retry pointless.
PERMANENT_TRAINER_REASONS = frozenset({"InvalidPlan", "DataError"})

# Trainer exit code for failures a retry cannot fix (the pod failure policy fails the Job at once).
PERMANENT_EXIT_CODE = 3
