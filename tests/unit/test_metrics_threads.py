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


def test_phase_and_gpu_gauges_follow_every_change_of_every_job():
    """Moves between GPU types, phase changes, finished and forgotten jobs: the gauges always equal the totals
    summed over the jobs afresh."""
    import random

    from kubetune.api import PHASES
    from kubetune.metrics import OperatorMetrics

    m = OperatorMetrics()
    rng = random.Random(7)
    truth: dict[str, dict] = {}
    types = ["NVIDIA-L4", "NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"]
    for step in range(3000):
        name = f"job-{rng.randrange(60)}"
        if rng.random() < 0.1:
            m.forget_job("ns", name)
            truth.pop(name, None)
            continue
        status = {"phase": rng.choice(["Pending", "Running", "Queued", "Succeeded", "Failed"]),
                  "layout": {"gpuType": rng.choice(types), "totalGpus": rng.choice([1, 2, 8])}}
        m.observe_job("ns", name, status, 1.0)
        truth[name] = status
        if step % 250 == 0 or step == 2999:
            for phase in PHASES:
                want = sum(1 for s in truth.values() if s["phase"] == phase)
                assert (m.registry.get_sample_value("kubetune_jobs", {"phase": phase}) or 0) == want, (step, phase)
            for gpu_type in types:
                want = sum(s["layout"]["totalGpus"] for s in truth.values()
                           if s["phase"] in ("Running", "Pending", "Queued") and s["layout"]["gpuType"] == gpu_type)
                got = m.registry.get_sample_value("kubetune_gpus_requested", {"gpu_type": gpu_type})
                assert (got if want else got is None) == (want if want else True), (step, gpu_type, got, want)
