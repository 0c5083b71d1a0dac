"""bench/cost_agreement.py: its pure helpers, and a --quick CPU sequence whose estimates come from the operator's
functions, calibrated by the runs before them, and whose step counts match what the trainer ran."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "cost_agreement.py"


def _bench():
    return load_module_from_file("cost_agreement_bench", BENCH)


@pytest.mark.unit
def test_a_finished_run_is_the_sample_the_operator_would_take_from_its_finetunejob():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import sample_of

    b = _bench()
    spec = {"method": "lora", "training": {"gradientCheckpointing": False}}
    layout = {"gpuType": "NVIDIA-H200", "totalGpus": 1, "pods": 1}
    summary = {"step": 100, "tokens": 50_000, "tokensPerSecond": 4_000.0, "steadyTokensPerSecond": 5_000.0}
    obj = b.finished_job("u1", spec, layout, {"estimate": {"totalParams": 1_000_000}}, summary, 30.0,
                         dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
    sample = sample_of(obj, flops_per_token)
    # 50,000 tokens at the steps' 5,000/s: 10 s of steps, 20 s outside them.
    assert sample is not None and sample.overhead_seconds == pytest.approx(20.0)
    assert sample.flops_per_device == pytest.approx(5_000.0 * 4 * 1_000_000)
    assert sample.gpu_type == "NVIDIA-H200" and sample.params == 1_000_000


@pytest.mark.unit
def test_the_summary_reports_the_ratios_beside_the_devices_own_spread():
    b = _bench()
    runs = [{"ratio": None, "steadyTokensPerSecond": 1000.0}, {"ratio": 0.95, "steadyTokensPerSecond": 1100.0},
            {"ratio": 1.2, "steadyTokensPerSecond": 1050.0}, {"ratio": 1.02, "steadyTokensPerSecond": 1000.0}]
    s = b.summarize(runs)
    assert s == {"estimatedRuns": 3, "medianRatio": 1.02, "worstRatio": 1.2, "within10Percent": 2,
                 "steadyRateSpread": 0.1}
    assert b.summarize([{"ratio": None, "steadyTokensPerSecond": 900.0}]) == {"estimatedRuns": 0}


@pytest.mark.trainer
@pytest.mark.slow
def test_a_quick_cpu_sequence_estimates_each_run_from_the_runs_before_it(tmp_path):
    out = tmp_path / "ca.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert [r["steps"] for r in runs] == [16, 32, 16]
    for r in runs:
        # The preflight's counts give the exact step count the trainer then ran.
        assert r["estimatedSteps"] == r["trainedSteps"] == r["steps"], r
        assert r["seconds"] > 0 and r["steadyTokensPerSecond"] > 0
    # Nothing to calibrate the first run from (a CPU layout has no datasheet peak); the others are calibrated
    # from the runs before them, of this model size.
    assert runs[0]["estimatedSeconds"] is None and runs[0]["ratio"] is None
    assert "median of 1 finished lora run(s) of this model size" in runs[1]["basis"]
    assert "median of 2 finished lora run(s)" in runs[2]["basis"]
    # Within a factor of two even on a busy shared CPU: a lost calibration term (start-up time, the rate) is not.
    for r in runs[1:]:
        assert 0.5 < r["ratio"] < 2.0, runs
    assert report["summary"]["estimatedRuns"] == 2 and report["params"] > 1_000_000
