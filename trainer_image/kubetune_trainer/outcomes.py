"""How a training run ends: the termination-summary reasons and the exit code of each (docs/contracts.md §5).

The operator keeps its own copy of this table (kubetune.reasons); a unit test checks that the two agree.
Three kinds of failure:

* permanent - a retry would fail the same way (the Job's pod failure policy fails the Job at once);
* preempted - the run was asked to stop (SIGTERM), wrote a checkpoint and resumes when restarted
  (the pod failure policy does not count it against backoffLimit);
* re-planned - out of GPU memory: the same plan would fail the same way, so the Job fails at once and the
  operator re-plans with a layout that needs less memory per GPU, resuming from the last checkpoint;
* transient - anything else; retried up to backoffLimit from the last checkpoint.
"""

from __future__ import annotations

COMPLETED = "Completed"
INVALID_PLAN = "InvalidPlan"
DATA_ERROR = "DataError"
NON_FINITE_LOSS = "NonFiniteLoss"
DIVERGED = "Diverged"
PERMISSION_DENIED = "PermissionDenied"
NO_SPACE_LEFT = "NoSpaceLeft"
UNSUPPORTED_MODEL = "UnsupportedModel"
PREEMPTED = "Preempted"
OUT_OF_MEMORY = "OutOfMemory"
TRAINING_ERROR = "TrainingError"

# Exit code of `kubetune-train launch` / `run` for each reason. 3 is the historical "retry cannot fix it".
EXIT_CODES: dict[str, int] = {
    COMPLETED: 0,
    TRAINING_ERROR: 1,
    INVALID_PLAN: 3,
    DATA_ERROR: 3,
    NON_FINITE_LOSS: 4,
    DIVERGED: 5,
    PERMISSION_DENIED: 6,
    NO_SPACE_LEFT: 7,
    UNSUPPORTED_MODEL: 8,
    OUT_OF_MEMORY: 9,
    PREEMPTED: 75,  # EX_TEMPFAIL: stopped on request after a complete checkpoint; resume when restarted
}

PERMANENT_REASONS = frozenset({INVALID_PLAN, DATA_ERROR, NON_FINITE_LOSS, DIVERGED, PERMISSION_DENIED,
                               NO_SPACE_LEFT, UNSUPPORTED_MODEL})
REASONS = tuple(EXIT_CODES)
PREEMPTED_EXIT = EXIT_CODES[PREEMPTED]
PERMANENT_EXIT_CODES = tuple(sorted({EXIT_CODES[r] for r in PERMANENT_REASONS}))
REPLAN_REASONS = frozenset({OUT_OF_MEMORY})
REPLAN_EXIT_CODES = tuple(sorted({EXIT_CODES[r] for r in REPLAN_REASONS}))


def exit_code_for(reason: str) -> int:
    """The process exit code for a summary reason (1 for an unknown one: retried)."""
    return EXIT_CODES.get(reason, 1)


def is_permanent(reason: str) -> bool:
    """True when a retry of the same plan cannot succeed."""
    return reason in PERMANENT_REASONS
