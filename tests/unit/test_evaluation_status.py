"""The trainer's evaluation block → status.evaluation, the EvaluationPassed condition, the Event and the
kubetune_eval_metric series (kubetune.evaluation, kubetune.reconcile, kubetune.metrics)."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest
from prometheus_client import generate_latest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.evaluation import evaluation_status, headline, verdict
from kubetune.metrics import OperatorMetrics
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout
from kubetune.status import checked_status

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://data/train.jsonl", "evalSplit": 0.1},
    "method": "lora", "training": {"maxSteps": 100}, "output": {"uri": "s3://out/run"},
    "evaluation": {"metrics": ["exactMatch", "evalLoss"], "gates": [{"metric": "exactMatch", "minImprovement": 0.1}]},
}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none",
                node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})
BLOCK = {"passed": False,
         "metrics": [{"metric": "exactMatch", "base": 0.05, "tuned": 0.1, "delta": 0.05, "passed": False},
                     {"metric": "evalLoss", "base": 3.2, "tuned": 1.1, "delta": -2.1}],
         "message": "exactMatch 0.050 -> 0.100; evalLoss 3.200 -> 1.100; gates: exactMatch improvement +0.050 >= "
                    "+0.100 FAILED",
         "generalRegression": 0.02, "regurgitation": {"training": 0.4, "heldOut": 0.05}}


def summary_with(block: dict | None, export: dict | None = None) -> dict:
    summary = {"version": 1, "status": "Succeeded", "reason": "Completed", "message": "", "step": 100,
               "totalSteps": 100, "epoch": 1.0, "trainLoss": 1.2, "evalLoss": 1.3, "perplexity": 3.7,
               "tokens": 1000, "runtimeSeconds": 61.2, "tokensPerSecond": 20.0,
               "artifacts": {"adapter": "s3://out/run/final/adapter", "merged": "", "model": "",
                             "metrics": "s3://out/run/final/metrics.json",
                             "evaluation": "s3://out/run/final/evaluation.json",
                             "report": "s3://out/run/final/report.md"},
               "checkpoint": {"step": 100, "uri": "s3://out/run/checkpoints/step-100"}}
    if block is not None:
        summary["evaluation"] = block
    if export is not None:
        summary["export"] = export
    return summary


def complete(block: dict | None, spec: dict | None = None, export: dict | None = None):
    spec = copy.deepcopy(spec or SPEC)
    job = copy.deepcopy(build_children(JobRef("demo", "ns", "uid-1"), spec, parse_spec(spec), LAYOUT,
                                       BuildConfig())[-1])
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "failed": 0,
                     "completionTime": "2026-01-01T12:05:00Z"}
    pod = {"metadata": {"name": "demo-trainer-0", "creationTimestamp": "2026-01-01T12:00:00Z",
                        "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                        "ownerReferences": [{"uid": "job-uid"}]},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps(summary_with(block, export)), "reason": "Completed"}}}]}}
    return decide(name="demo", generation=1, labels={}, spec=parse_spec(spec), spec_hash=spec_hash(spec),
                  status={"phase": "Running", "layout": LAYOUT.to_status()}, observed=Observed(job=job, pods=[pod]),
                  now=T0 + dt.timedelta(minutes=5))


def cond(status: dict, ctype: str) -> dict | None:
    return C.find_condition(status.get("conditions"), ctype)


def test_a_failed_gate_keeps_the_phase_and_artifacts_and_says_why():
    d = complete(BLOCK)
    st = d.status
    assert st["phase"] == "Succeeded" and cond(st, C.READY)["status"] == "True"
    assert st["artifacts"]["evaluation"] == "s3://out/run/final/evaluation.json"
    assert st["artifacts"]["report"] == "s3://out/run/final/report.md" and st["artifacts"]["adapter"]
    ev = st["evaluation"]
    assert ev["passed"] is False and ev["display"] == "exactMatch 0.05->0.1 failed"
    assert ev["metrics"][0] == {"metric": "exactMatch", "base": 0.05, "tuned": 0.1, "delta": 0.05, "passed": False}
    assert "passed" not in ev["metrics"][1] and ev["regurgitation"] == {"training": 0.4, "heldOut": 0.05}
    c = cond(st, C.EVALUATION_PASSED)
    assert c["status"] == "False" and c["reason"] == R.EVALUATION_GATES_FAILED
    assert "exactMatch 0.050 -> 0.100" in c["message"] and "phase stays Succeeded" in c["message"]
    assert ("Warning", R.EVALUATION_GATES_FAILED) in [e[:2] for e in d.events]
    assert "evaluation: exactMatch 0.05->0.1 failed" in st["message"]
    checked_status(st)


def test_passed_gates_give_a_true_condition_and_a_normal_event():
    block = {**BLOCK, "passed": True, "metrics": [{**BLOCK["metrics"][0], "passed": True}]}
    d = complete(block)
    c = cond(d.status, C.EVALUATION_PASSED)
    assert c["status"] == "True" and c["reason"] == R.EVALUATION_GATES_PASSED
    assert ("Normal", R.EVALUATION_GATES_PASSED) in [e[:2] for e in d.events]
    assert d.status["evaluation"]["display"].endswith("passed")


def test_an_evaluation_error_is_reported_without_failing_the_job():
    d = complete({"passed": False, "metrics": [], "message": "x", "error": "MemoryError: out of memory"})
    assert d.status["phase"] == "Succeeded"
    c = cond(d.status, C.EVALUATION_PASSED)
    assert c["status"] == "False" and c["reason"] == R.EVALUATION_ERROR and "MemoryError" in c["message"]
    assert d.status["evaluation"]["display"] == "error"


def test_no_block_from_the_trainer_is_unknown_and_no_evaluation_spec_means_no_condition():
    assert cond(complete(None).status, C.EVALUATION_PASSED)["status"] == "Unknown"
    plain = {k: v for k, v in SPEC.items() if k != "evaluation"}
    st = complete(None, plain).status
    assert cond(st, C.EVALUATION_PASSED) is None and "evaluation" not in st


def test_status_block_drops_junk_and_headline_prefers_the_gated_metric():
    out = evaluation_status({"passed": True, "metrics": [{"metric": "rougeL", "base": "x", "tuned": 0.5},
                                                         {"nope": 1}, {"metric": "bleu", "base": 0.1, "tuned": 0.2,
                                                                       "passed": True}], "extra": 1})
    assert [r["metric"] for r in out["metrics"]] == ["rougeL", "bleu"] and out["metrics"][0]["base"] is None
    assert out["display"] == "bleu 0.1->0.2 passed"
    assert headline([], False) == "failed"
    assert verdict({"passed": True, "message": "m"}) == (True, R.EVALUATION_GATES_PASSED, "m")
    checked_status({"evaluation": out})


def test_eval_metric_series_per_model_and_forgotten_with_the_job():
    m = OperatorMetrics()
    m.observe_job("ns", "demo", {"phase": "Succeeded", "evaluation": evaluation_status(BLOCK)}, None)
    text = generate_latest(m.registry).decode()
    assert 'kubetune_eval_metric{metric="exactMatch",model="base",name="demo",namespace="ns"} 0.05' in text
    assert 'kubetune_eval_metric{metric="evalLoss",model="tuned",name="demo",namespace="ns"} 1.1' in text
    assert 'kubetune_eval_passed{name="demo",namespace="ns"} 0.0' in text
    m.forget_job("ns", "demo")
    text = generate_latest(m.registry).decode()
    assert 'name="demo"' not in text.split("kubetune_eval_metric", 1)[1]


def test_export_outcome_sets_the_exported_condition_and_keeps_the_phase():
    spec = {**SPEC, "output": {"uri": "s3://out/run", "export": {"gguf": "f16"}}}
    block = {"passed": True, "metrics": [], "message": "m"}
    ok = complete(block, spec, {"architecture": "llama", "type": "f16", "tensors": 21})
    c = cond(ok.status, C.EXPORTED)
    assert c["status"] == "True" and c["reason"] == R.EXPORT_COMPLETED and "21 tensors" in c["message"]
    bad = complete(block, spec, {"error": "UnsupportedArchitecture: GGUF export supports ... not 'gemma2'"})
    assert bad.status["phase"] == "Succeeded"
    c = cond(bad.status, C.EXPORTED)
    assert c["status"] == "False" and c["reason"] == R.EXPORT_FAILED and "gemma2" in c["message"]
    assert ("Warning", R.EXPORT_FAILED) in [e[:2] for e in bad.events]
    checked_status({"artifacts": {"gguf": "s3://out/run/final/gguf/model-f16.gguf",
                                  "modelfile": "s3://out/run/final/gguf/Modelfile"}})
