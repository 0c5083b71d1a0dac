"""status.estimate and the cost in status.accounting (kubetune.estimate): exact steps and tokens from the preflight's
counts, GPU-hours from the documented throughput model, cost from the operator's price table."""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import json

import pytest
import yaml

from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.estimate import (MODEL_FLOPS_UTILIZATION, Pricing, estimate_status, optimizer_steps, parse_pricing,
                               peak_tflops)
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout, SizingOutcome

pytestmark = pytest.mark.unit

SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "pvc://data/train.jsonl"},
        "method": "lora", "training": {"epochs": 2, "microBatchSize": 4, "gradientAccumulationSteps": 4,
                                       "learningRate": "2e-4"},
        "output": {"uri": "pvc://out/run"}}
H100 = "NVIDIA-H100-80GB-HBM3"
PREFLIGHT = {"specHash": spec_hash(SPEC), "trainRows": 1000, "trainExamples": 1000, "tokensPerEpoch": 400_000,
             "steps": 125, "tokens": 800_000}
PLAN = {"estimate": {"totalParams": 8_030_261_248}}


def test_the_step_formula_is_the_trainers():
    from kubetune_trainer.recipe import total_optimizer_steps

    for rows, micro, accum, world, epochs, max_steps in itertools.product(
            (1, 7, 100, 1001), (1, 3, 8), (1, 4, 7), (1, 2, 8), (0.3, 1.0, 2.5), (0, 17)):
        want, _ = total_optimizer_steps(rows, micro, accum, world, epochs, max_steps)
        assert optimizer_steps(rows, micro, accum, world, epochs, max_steps) == want, (rows, micro, accum, world)


def test_gpu_hours_and_cost_follow_the_documented_model():
    layout = {"gpuType": H100, "totalGpus": 2, "pods": 1, "procsPerNode": 2}
    est = estimate_status(PREFLIGHT, layout, PLAN, parse_spec(SPEC), Pricing(((H100, 2.5),), "EUR"))
    # 1000 rows over 2 processes, micro 4 -> 125 micro-batches per epoch; 2 epochs / accumulation 4 -> 63 steps.
    assert est["steps"] == 63 and est["world"] == 2
    processed = 63 * 4 * 4 * 2  # steps x accumulation x micro x world rows (the last epoch wraps around)
    assert est["tokens"] == round(400_000 * processed / 1000)
    flops = (4 + 2) * 8_030_261_248  # LoRA with gradient checkpointing (the default)
    seconds = est["tokens"] * flops / (2 * 989e12 * MODEL_FLOPS_UTILIZATION)
    assert est["gpuHours"] == pytest.approx(2 * seconds / 3600, rel=1e-3)
    assert est["cost"] == pytest.approx(est["gpuHours"] * 2.5, rel=1e-3) and est["currency"] == "EUR"
    assert "63 steps" in est["display"] and "EUR" in est["display"]


def test_no_price_means_no_cost_and_unknown_gpus_no_time():
    layout = {"gpuType": H100, "totalGpus": 1, "pods": 1, "procsPerNode": 1}
    est = estimate_status(PREFLIGHT, layout, PLAN, parse_spec(SPEC), Pricing())
    assert est["gpuHours"] > 0 and "cost" not in est and "no price" in est["basis"]
    odd = estimate_status(PREFLIGHT, {**layout, "gpuType": "Acme-X1"}, PLAN, parse_spec(SPEC), Pricing())
    assert "gpuHours" not in odd and odd["steps"] == 125 and "Acme-X1" in odd["basis"]
    cpu = estimate_status(PREFLIGHT, {"gpuType": "", "totalGpus": 0, "pods": 1, "procsPerNode": 1}, PLAN,
                          parse_spec(SPEC), Pricing())
    assert cpu["gpuHours"] == 0.0 and cpu["cost"] == 0.0


def test_peak_table_matches_longer_names_first():
    assert peak_tflops("NVIDIA-H100-PCIe") == 756.0 and peak_tflops(H100) == 989.0
    assert peak_tflops("NVIDIA-L40S") == 362.0 and peak_tflops("NVIDIA-L4") == 121.0
    assert peak_tflops("NVIDIA-A100-SXM4-80GB") == 312.0 and peak_tflops("NVIDIA-A10-24GB") == 125.0


def test_pricing_from_the_flag_and_the_chart():
    flag = parse_pricing("NVIDIA-L4=0.8, NVIDIA-H100-80GB-HBM3=2.5", "USD")
    chart = parse_pricing('{"NVIDIA-L4":0.8,"NVIDIA-H100-80GB-HBM3":2.5}', "USD")
    assert flag == chart and flag.price("NVIDIA-L4") == 0.8 and flag.price("NVIDIA-T4") is None
    for bad in ("NVIDIA-L4", "NVIDIA-L4=-1", "NVIDIA-L4=abc"):
        with pytest.raises(ValueError):
            parse_pricing(bad)


def test_the_pass_that_creates_the_trainer_job_writes_the_estimate_and_running_adds_the_cost():
    layout = Layout(gpu_type=H100, gpus_per_pod=1, pods=1, strategy="none", node_selector={})
    outcome = SizingOutcome(True, layout, R.SIZED, "sized", plan_status=PLAN)
    children = build_children(JobRef("demo", "ns", "uid-1"), SPEC, parse_spec(SPEC), layout, BuildConfig())
    t0 = dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc)
    pricing = Pricing(((H100, 2.5),), "USD")
    d = decide(name="demo", generation=1, labels={}, spec=parse_spec(SPEC), spec_hash=spec_hash(SPEC),
               status={"preflight": copy.deepcopy(PREFLIGHT)}, observed=Observed(sizing=outcome, children=children),
               now=t0, pricing=pricing)
    est = d.status["estimate"]
    assert est["steps"] == 125 and est["cost"] > 0 and "estimate:" in d.status["message"]
    # An hour of one running GPU costs the price of one GPU-hour, beside the estimate.
    st = copy.deepcopy(d.status)
    st["accounting"] = {"runningSeconds": 3600.0}
    job = copy.deepcopy(children[-1])
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {}
    later = decide(name="demo", generation=1, labels={}, spec=parse_spec(SPEC), spec_hash=spec_hash(SPEC),
                   status=st, observed=Observed(job=job), now=t0, pricing=pricing)
    acc = later.status["accounting"]
    assert acc["gpuHours"] == 1.0 and acc["cost"] == 2.5 and acc["currency"] == "USD"


def _succeeded(uid: str, *, gpu_type: str = H100, gpus: int = 1, method: str = "lora", tps: float = 2000.0,
               tokens: int = 1_000_000, running: float = 620.0, params: int = 8_030_261_248,
               finished: str = "2026-01-01T00:00:00Z", **status: object) -> dict:
    return {"metadata": {"uid": uid}, "spec": {"method": method, "training": {"gradientCheckpointing": True}},
            "status": {"phase": "Succeeded", "completionTime": finished,
                       "layout": {"gpuType": gpu_type, "totalGpus": gpus, "pods": 1},
                       "plan": {"estimate": {"totalParams": params}}, "progress": {"tokensPerSecond": tps},
                       "accounting": {"runningSeconds": running, "tokens": tokens, "restarts": 0}, **status}}


def test_a_clean_succeeded_run_is_a_sample_of_throughput_and_overhead():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import sample_of

    s = sample_of(_succeeded("a", gpus=2, tps=4000.0), flops_per_token)
    # 1e6 tokens at 4000/s: 250 s of training steps in 620 s running -> 370 s outside them.
    assert s is not None and s.overhead_seconds == pytest.approx(370.0)
    assert s.flops_per_device == pytest.approx(4000.0 * 6 * 8_030_261_248 / 2)
    for unclean in ({"resumedFromStep": 40}, {"memoryReplans": [{"gpuType": H100}]}, {"phase": "Failed"}):
        assert sample_of(_succeeded("b", **unclean), flops_per_token) is None, unclean
    restarted = _succeeded("c")
    restarted["status"]["accounting"]["restarts"] = 1
    assert sample_of(restarted, flops_per_token) is None
    no_rate = _succeeded("d", tps=0.0)
    assert sample_of(no_rate, flops_per_token) is None


def test_calibration_is_the_median_of_recent_runs_and_predicts_another_model_size():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import RECENT_RUNS, ThroughputBook

    book = ThroughputBook(flops_per_token)
    assert book.calibration(H100, "lora") is None
    # Three runs of the 8B model; one slow outlier must not move the median.
    for i, (tps, running) in enumerate(((2000.0, 620.0), (2100.0, 600.0), (500.0, 2500.0))):
        assert book.observe(_succeeded(f"r{i}", tps=tps, running=running, finished=f"2026-01-0{i + 1}T00:00:00Z"))
    assert not book.observe(_succeeded("r0"))  # the same FineTuneJob seen again adds nothing
    cal = book.calibration(H100, "lora")
    assert cal is not None and cal.runs == 3
    assert cal.flops_per_device == pytest.approx(2000.0 * flops_per_token(8_030_261_248, "lora", True))
    assert cal.overhead_seconds == pytest.approx(600.0 - 1_000_000 / 2100.0)  # medians of 120, 123.8 and 500 s
    # A 70B-parameter job on the same GPU type: same FLOP/s, so tokens/s scale down with the model size.
    est = estimate_status(PREFLIGHT, {"gpuType": H100, "totalGpus": 4, "pods": 1, "procsPerNode": 4},
                          {"estimate": {"totalParams": 70_553_706_496}}, parse_spec(SPEC),
                          Pricing(((H100, 2.5),)), cal)
    rate = 4 * cal.flops_per_device / flops_per_token(70_553_706_496, "lora", True)
    assert est["etaSeconds"] == pytest.approx(cal.overhead_seconds + est["tokens"] / rate, rel=1e-3)
    assert est["cost"] == pytest.approx(4 * est["etaSeconds"] / 3600 * 2.5, rel=1e-2)
    assert "calibrated on this cluster: median of 3" in est["basis"]
    # Another method on the same GPU type borrows these runs (said so); another GPU type does not.
    full = book.calibration(H100, "full")
    assert full is not None and full.method == "any"
    assert book.calibration("NVIDIA-L4", "lora") is None
    # Only the most recent runs count.
    for i in range(RECENT_RUNS):
        book.observe(_succeeded(f"new{i}", tps=1000.0, running=1100.0, finished=f"2026-02-{i + 10}T00:00:00Z"))
    assert book.calibration(H100, "lora").flops_per_device == pytest.approx(
        1000.0 * flops_per_token(8_030_261_248, "lora", True))


def test_calibration_gives_gpu_types_without_a_datasheet_peak_a_time_and_cost():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import ThroughputBook

    book = ThroughputBook(flops_per_token)
    book.observe(_succeeded("x", gpu_type="Acme-X1", tps=100.0, tokens=10_000, running=130.0))
    layout = {"gpuType": "Acme-X1", "totalGpus": 1, "pods": 1, "procsPerNode": 1}
    est = estimate_status(PREFLIGHT, layout, PLAN, parse_spec(SPEC), Pricing((("Acme-X1", 1.2),)),
                          book.calibration("Acme-X1", "lora"))
    # Same model: 30 s outside training + 400,000 tokens... at the measured 100 tokens/s.
    assert est["etaSeconds"] == pytest.approx(30.0 + est["tokens"] / 100.0, rel=1e-3)
    assert est["cost"] == pytest.approx(est["etaSeconds"] / 3600 * 1.2, rel=1e-2)
    assert "about" in est["display"]


def test_the_pass_that_creates_the_trainer_job_uses_the_clusters_calibration():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import ThroughputBook

    book = ThroughputBook(flops_per_token)
    book.observe(_succeeded("earlier", tps=1500.0, running=900.0))
    layout = Layout(gpu_type=H100, gpus_per_pod=1, pods=1, strategy="none", node_selector={})
    outcome = SizingOutcome(True, layout, R.SIZED, "sized", plan_status=PLAN)
    children = build_children(JobRef("demo", "ns", "uid-1"), SPEC, parse_spec(SPEC), layout, BuildConfig())
    args = dict(name="demo", generation=1, labels={}, spec=parse_spec(SPEC), spec_hash=spec_hash(SPEC),
                now=dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc), pricing=Pricing(((H100, 2.5),), "USD"))
    plain = decide(status={"preflight": copy.deepcopy(PREFLIGHT)}, observed=Observed(sizing=outcome, children=children),
                   **args).status["estimate"]
    calibrated = decide(status={"preflight": copy.deepcopy(PREFLIGHT)},
                        observed=Observed(sizing=outcome, children=children), throughput=book,
                        **args).status["estimate"]
    assert "datasheet" in plain["basis"] and "calibrated on this cluster" in calibrated["basis"]
    overhead = 900.0 - 1_000_000 / 1500.0
    assert calibrated["etaSeconds"] == pytest.approx(overhead + calibrated["tokens"] / 1500.0, rel=1e-3)


def test_the_steps_own_rate_calibrates_when_the_trainer_reports_it():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import sample_of

    obj = _succeeded("s", tps=2000.0, running=620.0)
    obj["status"]["metrics"] = {"tokensPerSecond": 2000.0, "steadyTokensPerSecond": 2500.0}
    s = sample_of(obj, flops_per_token)
    # 1e6 tokens at the steps' 2500/s: 400 s in steps; the other 220 s (warm-up, evaluation, saving) are overhead.
    assert s.overhead_seconds == pytest.approx(220.0)
    assert s.flops_per_device == pytest.approx(2500.0 * flops_per_token(8_030_261_248, "lora", True))


def test_calibration_uses_the_runs_of_the_jobs_own_model_size_else_the_nearest_measured_one():
    from kubetune.estimate import flops_per_token
    from kubetune.throughput import ThroughputBook

    book = ThroughputBook(flops_per_token)
    small, large, huge = 494_032_768, 8_030_261_248, 70_553_706_496
    # A small model keeps a GPU far less busy than a large one: mixing them would estimate neither.
    book.observe(_succeeded("s1", params=small, tps=40_000.0, running=300.0, finished="2026-01-01T00:00:00Z"))
    book.observe(_succeeded("s2", params=small, tps=44_000.0, running=280.0, finished="2026-01-02T00:00:00Z"))
    book.observe(_succeeded("l1", params=large, tps=2_000.0, running=700.0, finished="2026-01-03T00:00:00Z"))
    own = book.calibration(H100, "lora", small)
    assert own.runs == 2 and own.params == small
    assert own.flops_per_device == pytest.approx(42_000.0 * flops_per_token(small, "lora", True))
    assert "of this model size (494M parameters)" in own.describe()
    big = book.calibration(H100, "lora", large)
    assert big.runs == 1 and big.flops_per_device == pytest.approx(2_000.0 * flops_per_token(large, "lora", True))
    assert big.overhead_seconds == pytest.approx(700.0 - 1_000_000 / 2_000.0)
    # No run of 70B yet: 8B is nearer by ratio than 0.5B, and the basis says it stood in.
    nearest = book.calibration(H100, "lora", huge)
    assert nearest.params == large and nearest.runs == 1
    assert "nearest measured model size (8.03B parameters; this job 70.6B)" in nearest.describe()
    # 1.5B: nearer to 0.5B (3x) than to 8B (5.4x).
    assert book.calibration(H100, "lora", 1_543_714_304).params == small
    # Unknown size: every run, as before sizes were told apart.
    assert book.calibration(H100, "lora").runs == 3
    # Another method of the same GPU type still stands in, at the nearest size.
    assert book.calibration(H100, "full", large).method == "any"


def test_a_models_runs_are_kept_beside_other_models_runs_and_the_oldest_series_goes_first():
    from kubetune import throughput
    from kubetune.estimate import flops_per_token

    book = throughput.ThroughputBook(flops_per_token)
    book.observe(_succeeded("mine", params=1_000_000, finished="2026-01-01T00:00:00Z"))
    # Many runs of another model do not push the first model's only run out.
    for i in range(3 * throughput.RECENT_RUNS):
        book.observe(_succeeded(f"other{i}", params=2_000_000, finished=f"2026-01-02T00:00:{i:02d}Z"))
    assert book.calibration(H100, "lora", 1_000_000).runs == 1
    assert book.calibration(H100, "lora", 2_000_000).runs == throughput.RECENT_RUNS
    # Past MAX_SERIES model sizes, the series whose newest run is oldest is forgotten (and can come back).
    for i in range(throughput.MAX_SERIES - 2):  # with the two above: MAX_SERIES series
        finished = f"2026-02-01T{i // 60:02d}:{i % 60:02d}:00Z"
        book.observe(_succeeded(f"size{i}", params=10_000_000 + i, finished=finished))
    assert book.calibration(H100, "lora", 1_000_000).params == 1_000_000
    assert book.observe(_succeeded("one-more", params=99, finished="2026-03-01T00:00:00Z"))
    assert book.calibration(H100, "lora", 1_000_000).params != 1_000_000
    assert book.observe(_succeeded("mine", params=1_000_000, finished="2026-01-01T00:00:00Z"))


def test_finished_runs_read_from_kubectl_output_calibrate_an_offline_estimate():
    from kubetune.estimate_offline import finished_runs

    listed = {"apiVersion": "v1", "kind": "List", "items": [
        {"kind": "FineTuneJob", **_succeeded("a", tps=2000.0, running=620.0)},
        {"kind": "FineTuneJob", **_succeeded("b", phase="Failed")},  # not a clean run: no sample
        {"kind": "ConfigMap", "metadata": {"uid": "c"}}]}
    book = finished_runs(yaml.safe_dump(listed))
    cal = book.calibration(H100, "lora", 8_030_261_248)
    assert cal is not None and cal.runs == 1 and cal.overhead_seconds == pytest.approx(120.0)
    # Multi-document YAML and a JSON array are read the same way.
    docs = "---\n".join(yaml.safe_dump({"kind": "FineTuneJob", **_succeeded(u)}) for u in ("x", "y"))
    assert finished_runs(docs).calibration(H100, "lora", 8_030_261_248).runs == 2
    as_json = json.dumps([_succeeded("z")])
    assert finished_runs(as_json).calibration(H100, "lora", 8_030_261_248).runs == 1
    assert finished_runs("").calibration(H100, "lora") is None
