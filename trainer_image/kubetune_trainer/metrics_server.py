"""Rank-0 observability: Prometheus `/metrics` (own registry) and `GET /progress` JSON (contracts §6)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What `/progress` reports; updated by the training loop."""

    phase: str = "starting"
    step: int = 0
    totalSteps: int = 0
    epoch: float = 0.0
    trainLoss: float | None = None
    evalLoss: float | None = None
    learningRate: float = 0.0
    tokens: int = 0
    tokensPerSecond: float = 0.0
    etaSeconds: float | None = None
    checkpoint: dict[str, Any] = field(default_factory=lambda: {"step": 0, "uri": ""})

    def to_json(self) -> dict[str, Any]:
        """§6 JSON (version first)."""
        return {"version": 1, **asdict(self)}


class TrainingMetrics:
    """The metric set on a private registry plus the progress snapshot; thread-safe updates."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.train_loss = Gauge("kubetune_train_loss", "Training loss (mean over the last optimizer step)", registry=r)
        self.eval_loss = Gauge("kubetune_eval_loss", "Latest evaluation loss", registry=r)
        self.learning_rate = Gauge("kubetune_learning_rate", "Current learning rate", registry=r)
        self.tokens = Counter("kubetune_train_tokens", "Training tokens processed (all ranks)", registry=r)
        self.tokens_per_second = Gauge("kubetune_train_tokens_per_second", "Training throughput (all ranks)",
                                       registry=r)
        self.step = Gauge("kubetune_train_step", "Optimizer steps completed", registry=r)
        self.total_steps = Gauge("kubetune_train_total_steps", "Optimizer steps planned", registry=r)
        self.gpu_memory = Gauge("kubetune_gpu_memory_bytes", "Peak GPU memory allocated by this process",
                                registry=r)
        self.progress = Progress()
        self._lock = threading.Lock()

    def update(self, **fields: Any) -> None:
        """Set progress fields and mirror them into the Prometheus metrics."""
        with self._lock:
            for key, value in fields.items():
                if key == "tokens":
                    delta = int(value) - self.progress.tokens
                    if delta > 0:
                        self.tokens.inc(delta)
                setattr(self.progress, key, value)
            p = self.progress
            if p.trainLoss is not None:
                self.train_loss.set(p.trainLoss)
            if p.evalLoss is not None:
                self.eval_loss.set(p.evalLoss)
            self.learning_rate.set(p.learningRate)
            self.tokens_per_second.set(p.tokensPerSecond)
            self.step.set(p.step)
            self.total_steps.set(p.totalSteps)

    def set_gpu_memory(self, value: int) -> None:
        """Peak GPU memory in bytes."""
        self.gpu_memory.set(value)

    def snapshot(self) -> dict[str, Any]:
        """A copy of the progress JSON."""
        with self._lock:
            return json.loads(json.dumps(self.progress.to_json()))


def _handler(metrics: TrainingMetrics):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                body, ctype = generate_latest(metrics.registry), CONTENT_TYPE_LATEST
            elif path == "/progress":
                body, ctype = json.dumps(metrics.snapshot()).encode(), "application/json"
            elif path in ("/healthz", "/"):
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404, "not found: use /metrics or /progress")
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return

    return Handler


class MetricsServer:
    """HTTP server on a daemon thread; `port` is the bound port (None when disabled or unavailable)."""

    def __init__(self, metrics: TrainingMetrics, port: int | None, host: str = "0.0.0.0") -> None:
        self.metrics = metrics
        self.port: int | None = None
        self._server: ThreadingHTTPServer | None = None
        if port is None:
            return
        try:
            self._server = ThreadingHTTPServer((host, port), _handler(metrics))
        except OSError as exc:
            log.warning("metrics server disabled: cannot listen on port %s (%s)", port, exc)
            return
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="kubetune-metrics", daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def metrics_port_from_env(env: dict[str, str] | None = None) -> int | None:
    """KUBETUNE_METRICS_PORT: unset/empty → disabled, 0 → any free port, N → that port."""
    value = (env if env is not None else os.environ).get("KUBETUNE_METRICS_PORT", "").strip()
    if not value:
        return None
    try:
        port = int(value)
    except ValueError:
        log.warning("ignoring KUBETUNE_METRICS_PORT=%r: not a port number", value)
        return None
    return port if 0 <= port < 65536 else None


def eta_seconds(started: float, step_now: int, step_started: int, total: int, now: float | None = None) -> float | None:
    """Remaining time from the step rate since this process started training."""
    now = time.time() if now is None else now
    done = step_now - step_started
    if done <= 0 or now <= started:
        return None
    return max(0.0, (total - step_now) * (now - started) / done)
