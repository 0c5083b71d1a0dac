"""Experiment tracking on rank 0: an MLflow run through MLflow's REST API (no client library in the image).

    tracker = MlflowTracker.from_plan(plan.tracking)          # None when the plan has no tracking block
    tracker.start(params, plan_json)                           # experiment get-or-create, run, params, plan.json
    tracker.log(step, {"train_loss": 1.9, ...})                # buffered; sent every `flush_every` steps
    tracker.finish("FINISHED", final_metrics, artifact_uris)   # last metrics, artifact URIs as tags, run status

An unreachable or failing server does not fail the training unless the plan says `required`: the tracker logs a
warning once, keeps the message in `warning` (final/metrics.json) and stops sending. With `required` the first
failure raises TrackingError, a retried failure (the pod restarts and resumes from its checkpoint).
Credentials come from the environment, as MLflow's own client reads them: MLFLOW_TRACKING_TOKEN (bearer) or
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (basic).
kubetune_trainer.trackers drives every tracker the plan names (this one and kubetune_trainer.tracking_wandb's) as one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger("kubetune_trainer.tracking")

TIMEOUT_SECONDS = 10.0
MAX_PARAMS, MAX_METRICS, MAX_TAGS = 100, 1000, 100  # MLflow's log-batch limits per request
MAX_PARAM_CHARS = 500  # the smallest param value limit across MLflow server versions
ARTIFACTS_SCHEME = "mlflow-artifacts:"


class TrackingError(RuntimeError):
    """The tracking server failed and the plan requires tracking."""


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> {"training.learningRate": "0.0002", ...} (lists as JSON), for MLflow params."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    else:
        out[prefix] = data if isinstance(data, str) else json.dumps(data)
    return out


def evaluation_metrics(summary: dict[str, Any] | None) -> dict[str, float | None]:
    """The base-vs-tuned evaluation block (kubetune_trainer.evaluation.summary_block) as MLflow metrics:
    `evaluation.<metric>.base|tuned|delta`, `evaluation.passed` (1/0), `evaluation.generalRegression`."""
    if not summary:
        return {}
    out: dict[str, float | None] = {"evaluation.passed": 1.0 if summary.get("passed") else 0.0}
    for row in summary.get("metrics") or []:
        for part in ("base", "tuned", "delta"):
            out[f"evaluation.{row.get('metric')}.{part}"] = row.get(part)
    if summary.get("generalRegression") is not None:
        out["evaluation.generalRegression"] = summary["generalRegression"]
    return out


class MlflowTracker:
    """One MLflow run, written from rank 0."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str = "", required: bool = False,
                 env: dict[str, str] | None = None, flush_every: int = 10) -> None:
        self.base = tracking_uri.rstrip("/")
        self.experiment = experiment
        self.run_name = run_name
        self.required = required
        self.flush_every = max(1, flush_every)
        self.env = dict(os.environ if env is None else env)
        self.run_id = ""
        self.experiment_id = ""
        self.url = ""
        self.warning = ""
        self._buffer: list[dict[str, Any]] = []
        self._last_flush_step = 0
        self.finished = False

    @classmethod
    def from_plan(cls, tracking: Any, flush_every: int = 10) -> "MlflowTracker | None":
        """The tracker for a plan's `tracking` block (None without one)."""
        if tracking is None or tracking.mlflow is None:
            return None
        m = tracking.mlflow
        return cls(m.tracking_uri, m.experiment, m.run_name, tracking.required, flush_every=flush_every)

    @property
    def active(self) -> bool:
        """True while a run is open and the server answers."""
        return bool(self.run_id) and not self.warning

    # ------------------------------------------------------------------ HTTP
    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        token = self.env.get("MLFLOW_TRACKING_TOKEN")
        user, password = self.env.get("MLFLOW_TRACKING_USERNAME"), self.env.get("MLFLOW_TRACKING_PASSWORD")
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif user:
            pair = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            headers["Authorization"] = f"Basic {pair}"
        return headers

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, *, query: dict[str, str] | None = None,
              data: bytes | None = None) -> dict[str, Any]:
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(url, data=payload, method=method, headers=self._headers())
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
            text = response.read().decode() or "{}"
        return json.loads(text)

    def _guard(self, what: str, fn, *args, **kwargs) -> Any:
        """Run one tracking call; on failure warn once and stop (or raise TrackingError when required)."""
        if self.warning:
            return None
        try:
            return fn(*args, **kwargs)
        except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
            detail = exc.read().decode(errors="replace")[:300] if isinstance(exc, urllib.error.HTTPError) else ""
            message = f"MLflow tracking at {self.base} failed while {what}: {exc}" + (f" ({detail})" if detail else "")
            if self.required:
                raise TrackingError(message + "; tracking.required is true") from exc
            self.warning = message + "; training continues without tracking"
            log.warning(self.warning)
            return None

    # ------------------------------------------------------------------ run lifecycle
    def start(self, params: dict[str, Any], plan: dict[str, Any], tags: dict[str, str] | None = None) -> None:
        """Get or create the experiment, create the run, log params (flattened) and the plan as plan.json."""
        self._guard("creating the run", self._start, params, plan, tags or {})

    def _start(self, params: dict[str, Any], plan: dict[str, Any], tags: dict[str, str]) -> None:
        try:
            found = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name",
                               query={"experiment_name": self.experiment})
            self.experiment_id = found["experiment"]["experiment_id"]
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
            self.experiment_id = self._call("POST", "/api/2.0/mlflow/experiments/create",
                                            {"name": self.experiment})["experiment_id"]
        body: dict[str, Any] = {"experiment_id": self.experiment_id, "start_time": _now_ms(),
                                "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        if self.run_name:
            body["run_name"] = self.run_name
        info = self._call("POST", "/api/2.0/mlflow/runs/create", body)["run"]["info"]
        self.run_id = info["run_id"]
        self.url = f"{self.base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        log.info("MLflow run %s: %s", self.run_id, self.url)
        items = [{"key": k[:250], "value": v[:MAX_PARAM_CHARS]} for k, v in flatten(params).items()]
        for i in range(0, len(items), MAX_PARAMS):
            self._call("POST", "/api/2.0/mlflow/runs/log-batch", {"run_id": self.run_id, "params": items[i:i + MAX_PARAMS]})
        self._upload(info.get("artifact_uri", ""), "plan.json", json.dumps(plan, indent=2, sort_keys=True).encode())

    def _upload(self, artifact_uri: str, name: str, content: bytes) -> None:
        """PUT an artifact through the server's artifact proxy (`mlflow server` serves artifacts by default)."""
        if not artifact_uri.startswith(ARTIFACTS_SCHEME):
            log.info("MLflow artifact store %s is not proxied by the server; %s not uploaded", artifact_uri, name)
            return
        path = artifact_uri[len(ARTIFACTS_SCHEME):].lstrip("/")
        self._call("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(path)}/{name}", data=content)

    def log(self, step: int, metrics: dict[str, float | None]) -> None:
        """Buffer metrics for `step`; send every `flush_every` steps."""
        if not self.active:
            return
        now = _now_ms()
        self._buffer += [{"key": k, "value": float(v), "timestamp": now, "step": step}
                         for k, v in metrics.items() if v is not None and _finite(v)]
        if step - self._last_flush_step >= self.flush_every:
            self.flush(step)

    def flush(self, step: int | None = None) -> None:
        """Send buffered metrics."""
        if not self.active or not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        for i in range(0, len(batch), MAX_METRICS):
            self._guard("logging metrics", self._call, "POST", "/api/2.0/mlflow/runs/log-batch",
                        {"run_id": self.run_id, "metrics": batch[i:i + MAX_METRICS]})
        if step is not None:
            self._last_flush_step = step

    def finish(self, status: str, metrics: dict[str, float | None], tags: dict[str, str]) -> None:
        """Final metrics (step = the last step), tags (artifact URIs), then the run status FINISHED | FAILED."""
        if not self.active or self.finished:
            return
        self.finished = True
        step = max([int(m["step"]) for m in self._buffer] + [self._last_flush_step])
        self.log(step, metrics)
        self.flush(step)
        tag_items = [{"key": k, "value": v} for k, v in tags.items() if v]
        for i in range(0, len(tag_items), MAX_TAGS):
            self._guard("tagging the run", self._call, "POST", "/api/2.0/mlflow/runs/log-batch",
                        {"run_id": self.run_id, "tags": tag_items[i:i + MAX_TAGS]})
        self._guard("closing the run", self._call, "POST", "/api/2.0/mlflow/runs/update",
                    {"run_id": self.run_id, "status": status, "end_time": _now_ms()})

    def report(self) -> dict[str, str]:
        """What final/metrics.json and the termination summary say about tracking."""
        return {"runId": self.run_id, "url": self.url, "warning": self.warning}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(value: float) -> bool:
    try:
        return float(value) == float(value) and abs(float(value)) != float("inf")
    except (TypeError, ValueError):
        return False
