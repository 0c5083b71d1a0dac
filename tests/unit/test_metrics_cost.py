"""The per-job cost gauges (kubetune_job_gpu_hours, kubetune_job_cost, kubetune_job_estimated_cost)."""

from __future__ import annotations

import pytest

from kubetune.metrics import OperatorMetrics

pytestmark = pytest.mark.unit

JOB = {"namespace": "ml", "name": "run"}


def running(gpu_type: str, hours: float, cost: float | None, estimate: float | None, currency: str = "EUR") -> dict:
    status: dict = {"phase": "Running", "layout": {"gpuType": gpu_type, "totalGpus": 2},
                    "accounting": {"gpuHours": hours}}
    if cost is not None:
        status["accounting"].update(cost=cost, currency=currency)
    if estimate is not None:
        status["estimate"] = {"cost": estimate, "currency": currency}
    return status


def series(m: OperatorMetrics, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for metric in m.registry.collect() if metric.name == name
            for s in metric.samples}


def test_the_gauges_follow_the_status_and_a_move_leaves_no_series_behind():
    m = OperatorMetrics()
    m.observe_job("ml", "run", running("NVIDIA-L4", 0.5, 1.25, 1.0), 1.0)
    assert m.registry.get_sample_value("kubetune_job_gpu_hours", {**JOB, "gpu_type": "NVIDIA-L4"}) == 0.5
    assert m.registry.get_sample_value("kubetune_job_cost", {**JOB, "currency": "EUR"}) == 1.25
    assert m.registry.get_sample_value("kubetune_job_estimated_cost", {**JOB, "currency": "EUR"}) == 1.0
    # Moved to another GPU type, and the price list now in USD: one series each, under the new labels.
    m.observe_job("ml", "run", running("NVIDIA-H100-80GB-HBM3", 0.75, 2.0, 1.0, "USD"), 1.0)
    assert list(series(m, "kubetune_job_gpu_hours").values()) == [0.75]
    assert m.registry.get_sample_value("kubetune_job_gpu_hours", {**JOB, "gpu_type": "NVIDIA-H100-80GB-HBM3"}) == 0.75
    assert series(m, "kubetune_job_cost") == {(("currency", "USD"), ("name", "run"), ("namespace", "ml")): 2.0}
    # No price for the type (no cost in the status): no cost series, GPU-hours still.
    m.observe_job("ml", "run", running("NVIDIA-H100-80GB-HBM3", 1.0, None, None), 1.0)
    assert series(m, "kubetune_job_cost") == {} and series(m, "kubetune_job_estimated_cost") == {}
    assert list(series(m, "kubetune_job_gpu_hours").values()) == [1.0]
    m.forget_job("ml", "run")
    assert series(m, "kubetune_job_gpu_hours") == {}


def test_a_cpu_only_run_has_no_gpu_hours_series():
    m = OperatorMetrics()
    m.observe_job("ml", "cpu", {"phase": "Succeeded", "layout": {"gpuType": "", "totalGpus": 0, "pods": 1},
                                "accounting": {"gpuHours": 0.0, "runningSeconds": 30.0}}, 1.0)
    assert series(m, "kubetune_job_gpu_hours") == {}


def test_a_run_that_changed_gpu_type_has_a_series_for_each_type_it_ran_on():
    m = OperatorMetrics()
    status = running("NVIDIA-A100-SXM4-80GB", 1.75, 3.05, 2.0)
    status["accounting"]["gpuTime"] = [{"gpuType": "NVIDIA-L4", "runningSeconds": 3600.0, "gpuHours": 1.0}]
    m.observe_job("ml", "run", status, 1.0)
    assert series(m, "kubetune_job_gpu_hours") == {
        (("gpu_type", "NVIDIA-L4"), ("name", "run"), ("namespace", "ml")): 1.0,
        (("gpu_type", "NVIDIA-A100-SXM4-80GB"), ("name", "run"), ("namespace", "ml")): 0.75}
    m.forget_job("ml", "run")
    assert series(m, "kubetune_job_gpu_hours") == {}
