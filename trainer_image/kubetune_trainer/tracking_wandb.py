"""Experiment tracking on rank 0: a Weights & Biases run through the `wandb` library.

    tracker = WandbTracker.from_plan(plan.tracking, staging_dir, output_uri)  # None without tracking.wandb
    tracker.start(params, plan_json, tags)                # wandb.init: config = params, plan.json saved with the run
    tracker.log(step, {"train_loss": 1.9, ...})           # one history row per step
    tracker.finish("FINISHED", final_metrics, artifact_uris)  # summary, exit code; offline: publish the run files

The same interface as kubetune_trainer.tracking.MlflowTracker, with the same failure rule: a failing W&B call
does not fail the training unless the plan says `required` (then TrackingError, a retried failure).

Mode `online` sends the run to the W&B service (key from WANDB_API_KEY, as W&B's own client reads it; WANDB_BASE_URL
for a self-hosted server; WANDB_INIT_TIMEOUT bounds the first contact). Mode `offline` needs no network: the run
files go under `staging_dir`/wandb/offline-run-<time>-<id>/ and, once the run is closed, are copied to the output
(`output_uri`/wandb/<that directory>, any scheme kubetune_trainer.storage writes), where `wandb sync <directory>`
uploads them later. The run's own log lines go to its debug.log there, not to the trainer's log.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from .storage import join_uri, upload_dir
from .tracking import TrackingError

log = logging.getLogger("kubetune_trainer.tracking")

JOB_TYPE = "fine-tune"
TAG_PREFIX = "kubetune."


class WandbTracker:
    """One W&B run, written from rank 0."""

    def __init__(self, project: str, entity: str = "", run_name: str = "", mode: str = "online",
                 required: bool = False, staging_dir: str | Path = ".", output_uri: str = "") -> None:
        self.project = project
        self.entity = entity
        self.run_name = run_name
        self.mode = mode
        self.required = required
        self.staging_dir = Path(staging_dir)
        self.output_uri = output_uri
        self.local_dir: Path | None = None  # offline: the run files as written, before they are copied
        self.run: Any = None
        self.run_id = ""
        self.url = ""
        self.run_dir = ""  # offline: where the run files are published (output_uri/wandb/<run directory>)
        self.warning = ""
        self.finished = False

    @classmethod
    def from_plan(cls, tracking: Any, staging_dir: str | Path, output_uri: str = "") -> "WandbTracker | None":
        """The tracker for a plan's `tracking` block (None without tracking.wandb)."""
        if tracking is None or getattr(tracking, "wandb", None) is None:
            return None
        w = tracking.wandb
        return cls(w.project, w.entity, w.run_name, w.mode, tracking.required, staging_dir, output_uri)

    @property
    def active(self) -> bool:
        """True while a run is open and W&B answers."""
        return self.run is not None and not self.warning and not self.finished

    def _where(self) -> str:
        return f"W&B tracking ({self.mode}, project {'/'.join(filter(None, (self.entity, self.project)))})"

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one W&B call; on failure warn once and stop (or raise TrackingError when required)."""
        if self.warning:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - wandb raises its own errors, OSError, ValueError, timeouts...
            first_line = (str(exc) or "-").splitlines()[0][:300]
            message = f"{self._where()} failed while {what}: {type(exc).__name__}: {first_line}"
            self._abandon()
            if self.required:
                raise TrackingError(message + "; tracking.required is true") from exc
            self.warning = message + "; training continues without tracking"
            log.warning(self.warning)
            return None

    def _abandon(self) -> None:
        """Close a run that failed half-way, so that no background process outlives the training."""
        run, self.run = self.run, None
        if run is not None:
            try:
                run.finish(exit_code=1)
            except Exception:  # noqa: BLE001 - already failing; the warning says why
                pass
        _teardown()

    # ------------------------------------------------------------------ run lifecycle
    def start(self, params: dict[str, Any], plan: dict[str, Any], tags: dict[str, str] | None = None) -> None:
        """Open the run: config = params (nested) plus the job's tags, the resolved plan saved as plan.json."""
        self._guard("creating the run", self._start, params, plan, tags or {})

    def _start(self, params: dict[str, Any], plan: dict[str, Any], tags: dict[str, str]) -> None:
        import wandb

        logging.getLogger("wandb").propagate = False  # its INFO lines (the whole config) go to the run's debug.log
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        job = {k[len(TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}
        settings = wandb.Settings(console="off", disable_git=True, save_code=False, silent=True)
        self.run = wandb.init(project=self.project, entity=self.entity or None, name=self.run_name or None,
                              group=job.get("job") or None, job_type=JOB_TYPE, mode=self.mode,
                              dir=str(self.staging_dir), config={**params, "kubetune": job},
                              reinit="create_new", settings=settings)
        self.run_id = self.run.id
        self.url = (self.run.url or "") if self.mode == "online" else ""
        if self.mode == "offline":
            self.local_dir = Path(self.run.sync_dir)
            self.run_dir = join_uri(self.output_uri, "wandb", self.local_dir.name) if self.output_uri else str(
                self.local_dir)
        log.info("W&B run %s (%s): %s", self.run_id, self.mode, self.url or self.run_dir)
        plan_file = Path(self.run.dir) / "plan.json"
        plan_file.write_text(json.dumps(plan, indent=2, sort_keys=True))
        self.run.save(str(plan_file), base_path=self.run.dir, policy="now")

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """One history row for `step` (values that are None or not finite are left out)."""
        if not self.active:
            return
        row = {k: float(v) for k, v in metrics.items() if _finite(v)}
        if row:
            self._guard("logging metrics", self.run.log, row, step=step)

    def flush(self, step: int | None = None) -> None:
        """Nothing to do: the W&B library sends (or writes) history rows in the background."""

    def finish(self, status: str, metrics: dict[str, float | None], tags: dict[str, str]) -> None:
        """Final metrics and evaluation results into the run summary, the output URIs too, then close the run with
        exit code 0 (FINISHED) or 1 (FAILED); offline, publish the run files to the output."""
        if not self.active:
            return
        summary: dict[str, Any] = {k: float(v) for k, v in metrics.items() if _finite(v)}
        summary.update({k: v for k, v in tags.items() if v})
        if summary:
            self._guard("writing the run summary", self.run.summary.update, summary)
        run = self.run
        self._guard("closing the run", run.finish, exit_code=0 if status == "FINISHED" else 1)
        self.finished = True
        _teardown()  # W&B's service process ends with the run; the next run in this process starts afresh
        if self.local_dir is not None and self.output_uri and not self.warning:
            self._guard("copying the offline run files to the output", upload_dir, self.local_dir, self.run_dir)

    def report(self) -> dict[str, str]:
        """What final/metrics.json and the termination summary say about the W&B run."""
        return {"runId": self.run_id, "url": self.url, "runDir": self.run_dir, "mode": self.mode,
                "warning": self.warning}


def _teardown() -> None:
    """Stop W&B's service process and forget its process-wide settings (read from WANDB_* at the first run)."""
    try:
        import wandb

        wandb.teardown()
    except Exception:  # noqa: BLE001 - best effort: the run itself is already closed or abandoned
        pass


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False
