"""Advice rules (kubetune.advice): each fires at its documented threshold, not below it, says its numbers, and
reaches the status as the Advice condition and a Warning Event without blocking the trainer Job."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import advice as A
from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.preflight import build_preflight_job
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout, SizingOutcome

pytestmark = pytest.mark.unit

SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "pvc://data/train.jsonl"},
        "method": "lora", "training": {"epochs": 1, "learningRate": "2e-4", "maxSeqLength": 512},
        "output": {"uri": "pvc://out/run"}}
GOOD = {"examples": 2000, "trainExamples": 1900, "truncated": 0, "duplicates": 0, "nearDuplicates": 0,
        "tokenLengths": {"min": 20, "mean": 180.0, "p50": 170, "p95": 400, "max": 480}}


def rules(spec: dict | None = None, **pre) -> dict[str, str]:
    return dict(A.advise(parse_spec(spec or SPEC), {**GOOD, **pre}))


def with_training(**training) -> dict:
    spec = copy.deepcopy(SPEC)
    spec["training"].update(training)
    return spec


def test_a_good_job_gets_no_advice():
    assert rules() == {}


def test_few_examples():
    assert A.FEW_EXAMPLES not in rules(trainExamples=200)
    assert "199 training examples" in rules(trainExamples=199)[A.FEW_EXAMPLES]


def test_max_seq_length_far_above_the_data():
    assert A.SEQ_ABOVE_DATA not in rules(with_training(maxSeqLength=959))  # < 2 x 480
    text = rules(with_training(maxSeqLength=960))[A.SEQ_ABOVE_DATA]
    assert "960" in text and "480 tokens" in text
    # Twice the longest but fewer than 256 tokens of slack: no advice.
    assert A.SEQ_ABOVE_DATA not in rules(with_training(maxSeqLength=200), tokenLengths={"max": 100, "p95": 90})


def test_truncation():
    assert A.TRUNCATION not in rules(truncated=100)  # 5% of 2000
    text = rules(truncated=101, truncatedLocations=["train.jsonl:7"])[A.TRUNCATION]
    assert "101 of 2000" in text and "train.jsonl:7" in text


def test_lora_rank_high_for_the_data():
    spec = {**SPEC, "lora": {"r": 64, "alpha": 128}}
    assert A.LORA_RANK_HIGH not in rules(spec, trainExamples=1000)
    assert "rank 64 for 999" in rules(spec, trainExamples=999)[A.LORA_RANK_HIGH]
    assert A.LORA_RANK_HIGH not in rules({**SPEC, "lora": {"r": 32}}, trainExamples=300)


@pytest.mark.parametrize("method,lr,fires", [("lora", "1e-3", False), ("lora", "2e-3", True), ("lora", "5e-6", True),
                                             ("full", "1e-4", False), ("full", "2e-4", True), ("qlora", "1e-2", True)])
def test_learning_rate_outside_the_usual_range(method, lr, fires):
    spec = with_training(learningRate=lr)
    spec["method"] = method
    if method == "qlora":
        spec["quantization"] = {"bits": 4}
    assert (A.LEARNING_RATE_UNUSUAL in rules(spec)) is fires


def test_near_duplicates():
    assert A.NEAR_DUPLICATES not in rules(nearDuplicates=200)  # 10%
    assert "201 of 2000" in rules(nearDuplicates=201, duplicates=150)[A.NEAR_DUPLICATES]


def test_advice_is_a_condition_and_events_and_never_blocks():
    layout = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none", node_selector={})
    spec = with_training(learningRate="1e-2")
    ref = JobRef("demo", "ns", "uid-1")
    children = build_children(ref, spec, parse_spec(spec), layout, BuildConfig())
    job = copy.deepcopy(build_preflight_job(ref, parse_spec(spec), layout, BuildConfig(), hash_=spec_hash(spec)))
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    report = {**GOOD, "trainExamples": 150, "steps": 10, "tokens": 1000, "trainRows": 150, "tokensPerEpoch": 900}
    pod = {"metadata": {"name": "demo-preflight-x", "creationTimestamp": "2026-01-01T12:00:00Z"},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "message": json.dumps({"status": "Succeeded", "preflight": report})}}}]}}
    d = decide(name="demo", generation=1, labels={}, spec=parse_spec(spec), spec_hash=spec_hash(spec),
               status={"phase": "Preparing"}, now=dt.datetime(2026, 1, 1, 12, tzinfo=dt.timezone.utc),
               observed=Observed(sizing=SizingOutcome(True, layout, R.SIZED, "sized"), children=children,
                                 preflight=True, preflight_job=job, preflight_pods=[pod]))
    assert [a.obj["kind"] for a in d.actions] == ["ConfigMap", "Job"]  # the trainer Job is created anyway
    advice = C.find_condition(d.status["conditions"], C.ADVICE)
    assert advice["status"] == "True" and "150 training examples" in advice["message"] and "1e-2" not in advice["message"]
    warnings = {reason: msg for kind, reason, msg in d.events if kind == "Warning"}
    assert set(warnings) == {A.FEW_EXAMPLES, A.LEARNING_RATE_UNUSUAL} and "0.01" in warnings[A.LEARNING_RATE_UNUSUAL]



def test_many_epochs_over_little_data_fires_above_three_epochs_under_a_thousand_examples():
    assert A.MANY_EPOCHS in rules(with_training(epochs=4), trainExamples=999)
    assert "4 epochs over 999 training examples" in rules(with_training(epochs=4), trainExamples=999)[A.MANY_EPOCHS]
    assert A.MANY_EPOCHS not in rules(with_training(epochs=3), trainExamples=999)
    assert A.MANY_EPOCHS not in rules(with_training(epochs=4), trainExamples=1000)


def test_a_family_chat_template_on_another_family_fires():
    spec = copy.deepcopy(SPEC)
    spec["dataset"]["chatTemplate"] = "gemma"
    fired = rules(spec, modelType="llama")
    assert "made for gemma/gemma2/gemma3 models but the model is llama" in fired[A.CHAT_TEMPLATE_FAMILY]
    assert A.CHAT_TEMPLATE_FAMILY not in rules(spec, modelType="gemma2")
    spec["dataset"]["chatTemplate"] = "chatml"  # generic: never a mismatch
    assert A.CHAT_TEMPLATE_FAMILY not in rules(spec, modelType="llama")
    assert A.CHAT_TEMPLATE_FAMILY not in rules(SPEC, modelType="llama")  # the tokenizer's own template
