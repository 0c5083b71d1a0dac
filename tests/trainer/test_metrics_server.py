"""Rank-0 observability (docs/contracts.md §6): /metrics in Prometheus text with the kubetune_* names and
/progress in the contract's JSON shape, served by a real MetricsServer on a free port."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.unit

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from kubetune_trainer.metrics_server import (MetricsServer, TrainingMetrics, eta_seconds,  # noqa: E402
                                             metrics_port_from_env)

CONTRACT_METRICS = ("kubetune_train_loss", "kubetune_eval_loss", "kubetune_learning_rate",
                    "kubetune_train_tokens_total", "kubetune_train_tokens_per_second", "kubetune_train_step",
                    "kubetune_train_total_steps", "kubetune_gpu_memory_bytes")
PROGRESS_KEYS = {"version", "phase", "step", "totalSteps", "epoch", "trainLoss", "evalLoss", "learningRate",
                 "tokens", "tokensPerSecond", "etaSeconds", "checkpoint"}


def get(port: int, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def samples(text: str) -> dict[str, float]:
    """{sample name: value} parsed with prometheus_client's own text parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = sample.value
    return out


@pytest.fixture
def served():
    metrics = TrainingMetrics()
    server = MetricsServer(metrics, 0, host="127.0.0.1")
    assert server.port, "MetricsServer did not bind a free port"
    yield metrics, server.port
    server.close()


def test_metrics_endpoint_serves_contract_names_with_updated_values(served):
    metrics, port = served
    metrics.update(phase="training", step=40, totalSteps=120, epoch=0.33, trainLoss=1.9, learningRate=2e-4,
                   tokens=40960, tokensPerSecond=2100.0, etaSeconds=38.0)
    metrics.update(evalLoss=1.5)
    metrics.set_gpu_memory(123456789)
    status, ctype, body = get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    values = samples(body.decode())
    missing = [name for name in CONTRACT_METRICS if name not in values]
    assert not missing, f"/metrics lacks {missing}"
    assert values["kubetune_train_loss"] == pytest.approx(1.9)
    assert values["kubetune_eval_loss"] == pytest.approx(1.5)
    assert values["kubetune_learning_rate"] == pytest.approx(2e-4)
    assert values["kubetune_train_tokens_total"] == 40960
    assert values["kubetune_train_tokens_per_second"] == 2100.0
    assert values["kubetune_train_step"] == 40
    assert values["kubetune_train_total_steps"] == 120
    assert values["kubetune_gpu_memory_bytes"] == 123456789


def test_token_counter_is_monotonic_across_updates(served):
    metrics, port = served
    metrics.update(tokens=1000)
    metrics.update(tokens=2500)
    metrics.update(tokens=2500)  # a repeated report must not double count
    values = samples(get(port, "/metrics")[2].decode())
    assert values["kubetune_train_tokens_total"] == 2500


def test_progress_endpoint_returns_contract_json(served):
    metrics, port = served
    status, ctype, body = get(port, "/progress")
    assert status == 200 and ctype == "application/json"
    initial = json.loads(body)
    assert set(initial) == PROGRESS_KEYS
    assert initial["version"] == 1 and initial["trainLoss"] is None and initial["evalLoss"] is None
    assert initial["checkpoint"] == {"step": 0, "uri": ""}

    metrics.update(phase="training", step=40, totalSteps=120, epoch=0.33, trainLoss=1.9, learningRate=2e-4,
                   tokens=40960, tokensPerSecond=2100.0, etaSeconds=38.0,
                   checkpoint={"step": 20, "uri": "pvc://outputs/demo/checkpoints/step-20"})
    progress = json.loads(get(port, "/progress")[2])
    assert set(progress) == PROGRESS_KEYS
    assert progress == {"version": 1, "phase": "training", "step": 40, "totalSteps": 120, "epoch": 0.33,
                        "trainLoss": 1.9, "evalLoss": None, "learningRate": 2e-4, "tokens": 40960,
                        "tokensPerSecond": 2100.0, "etaSeconds": 38.0,
                        "checkpoint": {"step": 20, "uri": "pvc://outputs/demo/checkpoints/step-20"}}


def test_unknown_path_is_404_and_health_is_ok(served):
    _, port = served
    assert get(port, "/healthz")[0] == 200
    with pytest.raises(urllib.error.HTTPError) as err:
        get(port, "/nope")
    assert err.value.code == 404


def test_server_disabled_without_port_and_survives_busy_port():
    metrics = TrainingMetrics()
    assert MetricsServer(metrics, None).port is None
    first = MetricsServer(metrics, 0, host="127.0.0.1")
    try:
        second = MetricsServer(metrics, first.port, host="127.0.0.1")
        assert second.port is None  # training goes on without metrics rather than crashing
    finally:
        first.close()


@pytest.mark.parametrize("value,expected", [("", None), ("0", 0), ("9090", 9090), ("abc", None), ("70000", None)])
def test_metrics_port_from_env(value, expected):
    env = {"KUBETUNE_METRICS_PORT": value} if value else {}
    assert metrics_port_from_env(env) == expected


def test_eta_from_step_rate():
    assert eta_seconds(started=100.0, step_now=30, step_started=10, total=110, now=120.0) == pytest.approx(80.0)
    assert eta_seconds(started=100.0, step_now=10, step_started=10, total=110, now=120.0) is None
