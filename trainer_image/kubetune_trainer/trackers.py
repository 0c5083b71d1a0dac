"""Every experiment tracker a plan names, driven as one from rank 0: MLflow (kubetune_trainer.tracking) and Weights &
Biases (kubetune_trainer.tracking_wandb) share one interface (start, log, flush, finish, report, active, finished,
warning); a required tracker's TrackingError still closes the other's run before it propagates."""

from __future__ import annotations

from typing import Any

from .tracking import MlflowTracker, TrackingError
from .tracking_wandb import WandbTracker


class Trackers:
    """MLflow's and W&B's trackers behind MlflowTracker's interface; report() keeps MLflow's run at the top level
    (the shape final/metrics.json had before W&B) and adds `wandb`."""

    def __init__(self, mlflow: MlflowTracker | None = None, wandb: WandbTracker | None = None) -> None:
        self.mlflow = mlflow
        self.wandb = wandb
        self.all = [t for t in (mlflow, wandb) if t is not None]

    @classmethod
    def from_plan(cls, tracking: Any, flush_every: int = 10, staging_dir: str = ".",
                  output_uri: str = "") -> "Trackers | None":
        """The trackers for a plan's `tracking` block (None when it names none). `staging_dir` and `output_uri` are
        W&B's: where offline run files are written, and the output they are copied to once the run is closed."""
        if tracking is None:
            return None
        trackers = cls(MlflowTracker.from_plan(tracking, flush_every=flush_every),
                       WandbTracker.from_plan(tracking, staging_dir, output_uri))
        return trackers if trackers.all else None

    @property
    def active(self) -> bool:
        return any(t.active for t in self.all)

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.all)

    @property
    def warnings(self) -> list[str]:
        return [t.warning for t in self.all if t.warning]

    @property
    def warning(self) -> str:
        return "; ".join(self.warnings)

    def start(self, params: dict[str, Any], plan: dict[str, Any], tags: dict[str, str] | None = None) -> None:
        for tracker in self.all:
            tracker.start(params, plan, tags)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        for tracker in self.all:
            tracker.log(step, metrics)

    def flush(self, step: int | None = None) -> None:
        for tracker in self.all:
            tracker.flush(step)

    def finish(self, status: str, metrics: dict[str, float | None], tags: dict[str, str]) -> None:
        failure: TrackingError | None = None
        for tracker in self.all:  # a required tracker's failure must not leave the other's run open
            try:
                tracker.finish(status, metrics, tags)
            except TrackingError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def report(self) -> dict[str, Any]:
        """{"runId", "url"} of the MLflow run, "warning" (every tracker's), and "wandb" (its report) when asked."""
        top = self.mlflow.report() if self.mlflow is not None else {"runId": "", "url": ""}
        out: dict[str, Any] = {**top, "warning": self.warning}
        if self.wandb is not None:
            out["wandb"] = self.wandb.report()
        return out
