"""Operator metrics are updated from many reconcile threads at once."""

from __future__ import annotations

import sys
import threading

import pytest

pytestmark = pytest.mark.unit


def test_observe_job_from_many_threads_counts_every_job():
    from kubetune.metrics import OperatorMetrics

    m = OperatorMetrics()
    errors: list[BaseException] = []
    layout = {"totalGpus": 1, "gpuType": "NVIDIA-L4"}

    def work(t: int) -> None:
        try:
            for i in range(300):
                m.observe_job("ns", f"job-{t}-{i}", {"phase": "Running", "layout": layout}, 1.0)
                if i % 3 == 0:
                    m.forget_job("ns", f"job-{t}-{i}")
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often so an unguarded iteration would collide
    try:
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    running = m.registry.get_sample_value("kubetune_jobs", {"phase": "Running"})
    assert running == 8 * 200
    assert m.registry.get_sample_value("kubetune_gpus_requested", {"gpu_type": "NVIDIA-L4"}) == 8 * 200
