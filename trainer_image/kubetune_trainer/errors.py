"""Trainer exceptions; each carries the termination-summary `reason` (docs/contracts.md §5)."""

from __future__ import annotations


class KubetuneTrainerError(Exception):
    """Base class: a failure the trainer reports in its termination summary."""

    reason = "TrainingError"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        """The human-readable message (what and where)."""
        return str(self)


class PlanError(KubetuneTrainerError):
    """The training plan is invalid (unknown keys, wrong types, impossible combination)."""

    reason = "InvalidPlan"


class DataError(KubetuneTrainerError):
    """The dataset cannot be used; the message names the file and line when known."""

    reason = "DataError"

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line
        self.field = field


class NonFiniteLossError(KubetuneTrainerError):
    """The loss became NaN or infinite."""

    reason = "NonFiniteLoss"


class DivergedError(KubetuneTrainerError):
    """The loss stayed far above its best value (the divergence detector, training.divergence)."""

    reason = "Diverged"


class PermissionDeniedError(KubetuneTrainerError):
    """The output (or another path the run writes) is not writable."""

    reason = "PermissionDenied"


class NoSpaceError(KubetuneTrainerError):
    """The output volume is full (or too small for a checkpoint)."""

    reason = "NoSpaceLeft"


class UnsupportedModelError(KubetuneTrainerError):
    """The model's architecture cannot be loaded by this trainer."""

    reason = "UnsupportedModel"


class PreemptedError(KubetuneTrainerError):
    """The run was asked to stop (SIGTERM) and stopped at a step boundary after a complete checkpoint."""

    reason = "Preempted"


class StorageError(KubetuneTrainerError):
    """A model/dataset/output URI cannot be resolved, fetched or uploaded."""

    reason = "TrainingError"
