"""The preflight's traced step on the operator side: folded into status.preflight.trace and beside the analytic
estimate in status.plan.estimate; when the traced peak plus the runtime constants does not fit the sized layout's
GPU, no trainer Job is created on it: the job is re-sized with the traced figure as a floor (TraceExceedsEstimate),
or fails when no layout is left."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.oom_layout import trace_outlook, with_replanned_layout
from kubetune.preflight import build_preflight_job
from kubetune.preflight_trace import plan_with_trace, trace_status, traced_fit
from kubetune.reconcile import Observed, decide
from kubetune.sizing import fleet_from_nodes, parse_gpu_shorthand, size_job_layout
from kubetune.sizing.estimator import CUDA_CONTEXT_BYTES, fragmentation_bytes
from kubetune.status import checked_status

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
GiB = 2**30
L4 = "NVIDIA-L4"
REF = JobRef("demo", "ns", "uid-1")
REPORT = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B", "revision": "a" * 40, "modelType": "llama"},
          "dataset": {"uri": "s3://data/train.jsonl", "sha256": "b" * 64, "format": "messages"},
          "examples": 1000, "trainExamples": 950, "evalExamples": 50, "trainRows": 950, "tokensPerEpoch": 190000,
          "tokens": 1600000, "steps": 100, "world": 1, "maxSeqLength": 2048, "truncated": 0, "duplicates": 0,
          "nearDuplicates": 0, "emptyAnswers": 0,
          "tokenLengths": {"min": 20, "mean": 200.0, "p50": 180, "p95": 400, "max": 2048}}


def _spec(resources=None, distributed=None, **training) -> dict:
    spec = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://data/train.jsonl"},
            "method": "lora", "output": {"uri": "s3://out/run"}, "resources": resources or {"gpuType": L4},
            "training": {"maxSteps": 100, "microBatchSize": 1, "gradientAccumulationSteps": 8,
                         "gradientCheckpointing": True, **training}}
    if distributed is not None:
        spec["distributed"] = distributed
    return spec


PINNED_DDP = {"resources": {"gpuType": L4, "gpusPerPod": 2, "pods": 1}, "distributed": {"strategy": "ddp"}}


def _trace(peak: int, **extra) -> dict:
    """A trace block as kubetune_trainer.preflight_trace reports it (breakdown adds up to the peak)."""
    weights = 15 * GiB
    return {"peakBytes": peak, "pagedOptimizerBytes": 0,
            "breakdown": {"weights": weights, "gradients": GiB // 2, "optimizerStates": GiB // 4,
                          "activations": peak - weights - GiB // 2 - GiB // 4},
            "peakAt": "step 2 micro-batch 1: backward / aten.mm / model.layers.31.mlp", "seqLength": 2048,
            "microBatchSize": 1, "basis": "one process", "seconds": 74.2, **extra}


def _sized(spec: dict, nodes: list[dict]):
    outcome = size_job_layout(parse_spec(spec), nodes)
    assert outcome.fits and outcome.layout is not None, outcome.message
    return outcome


def _observed(spec: dict, outcome, trace: dict | None, fleet=None, status: dict | None = None) -> Observed:
    typed = parse_spec(spec)
    children = build_children(REF, spec, typed, outcome.layout, BuildConfig(),
                              memory_replans=(status or {}).get("memoryReplans"))
    job = copy.deepcopy(build_preflight_job(REF, typed, outcome.layout, BuildConfig(), hash_=spec_hash(spec)))
    job["metadata"]["uid"] = "pre-uid"
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    report = {**REPORT, **({"trace": trace} if trace is not None else {})}
    message = {"version": 1, "status": "Succeeded", "reason": "Validated", "preflight": report}
    pod = {"metadata": {"name": "demo-preflight-x1", "creationTimestamp": "2026-01-01T12:00:00Z",
                        "ownerReferences": [{"uid": "pre-uid"}]},
           "status": {"phase": "Succeeded", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
               "exitCode": 0, "reason": "Completed", "message": json.dumps(message)}}}]}}
    obs = Observed(sizing=outcome, children=children, preflight=True, preflight_job=job, preflight_pods=[pod],
                   preflight_children=[children[0], job])
    fit = traced_fit(trace_status(trace), outcome.plan_status, outcome.layout)
    if fleet is not None and fit is not None and not fit.fits:  # what the controller hands the pass
        obs.trace = trace_outlook(typed, status or {}, outcome.layout, fit.tensors, fleet)
    return obs


def _run(spec: dict, obs: Observed, status: dict | None = None):
    return decide(name="demo", generation=1, labels={}, spec=parse_spec(spec), spec_hash=spec_hash(spec),
                  status=copy.deepcopy(status or {"phase": "Preparing"}), observed=obs, now=T0)


def _applied(decision) -> list[str]:
    return [a.obj["metadata"]["name"] for a in decision.actions if a.kind == "apply"]


def _cond(status: dict, ctype: str) -> dict:
    found = C.find_condition(status["conditions"], ctype)
    assert found is not None, status["conditions"]
    return found


def test_the_trace_block_is_folded_and_a_skip_keeps_its_reason():
    folded = trace_status(_trace(17 * GiB, pagedOptimizerBytes=GiB))
    assert folded["peakBytes"] == 17 * GiB and folded["peakGiB"] == 18.0 and folded["seqLength"] == 2048
    assert sum(folded["breakdownBytes"].values()) == 17 * GiB and folded["peakAt"].startswith("step 2")
    skipped = trace_status({"skipped": "unknown model_type 'acme': transformers has no architecture of that name"})
    assert skipped == {"skipped": "unknown model_type 'acme': transformers has no architecture of that name"}
    assert trace_status(None) is None and traced_fit(skipped, {}, None) is None


def test_the_need_adds_the_documented_runtime_constants_to_the_traced_peak():
    nodes = [n for s in (f"{L4}:4x2",) for n in parse_gpu_shorthand(s)]
    outcome = _sized(_spec(), nodes)
    fit = traced_fit(trace_status(_trace(17 * GiB)), outcome.plan_status, outcome.layout)
    assert fit is not None and fit.gpu_type == L4
    b = _trace(17 * GiB)["breakdown"]
    frag = fragmentation_bytes(b["weights"] + b["optimizerStates"], b["gradients"] + b["activations"])
    assert fit.tensors == 17 * GiB and fit.runtime == CUDA_CONTEXT_BYTES + frag  # one GPU: no communication buffers
    assert fit.usable == outcome.plan_status["estimate"]["usableBytes"]
    assert fit.fits == (fit.need <= fit.usable)
    # A CPU layout has no GPU memory to check against.
    cpu = outcome.layout.__class__(gpu_type="", gpus_per_pod=0, pods=1, strategy="none")
    assert traced_fit(trace_status(_trace(17 * GiB)), outcome.plan_status, cpu) is None


def test_a_trace_that_fits_creates_the_trainer_job_and_says_so():
    nodes = [n for s in (f"{L4}:4x2",) for n in parse_gpu_shorthand(s)]
    spec = _spec()
    outcome = _sized(spec, nodes)
    d = _run(spec, _observed(spec, outcome, _trace(12 * GiB), fleet_from_nodes(nodes)))
    assert _applied(d) == ["demo-plan", "demo-trainer"] and d.status["phase"] == "Pending"
    status = checked_status(d.status)  # the CRD keeps every field
    trace = status["preflight"]["trace"]
    assert trace["fits"] is True and trace["gpuType"] == L4 and trace["perGpuBytes"] > 12 * GiB
    validated = _cond(status, C.VALIDATED)
    assert "traced peak 12.0 GiB" in validated["message"] and "GiB usable on one NVIDIA-L4" in validated["message"]
    estimate = status["plan"]["estimate"]
    assert estimate["source"] == "trace" and estimate["traced"]["peakBytes"] == 12 * GiB
    assert estimate["traced"]["fits"] is True and estimate["perGpuBytes"] > 0  # the analytic figure stays beside it
    assert not status.get("memoryReplans")


def test_a_trace_over_the_sized_gpu_re_sizes_with_the_traced_floor_before_any_gpu_is_used():
    nodes = [n for s in (f"{L4}:4x2",) for n in parse_gpu_shorthand(s)]
    fleet = fleet_from_nodes(nodes)
    spec = _spec()
    outcome = _sized(spec, nodes)
    assert outcome.layout.total_gpus == 1
    obs = _observed(spec, outcome, _trace(21 * GiB), fleet)
    assert obs.trace is not None and obs.trace.leaner.layout is not None
    d = _run(spec, obs)
    assert _applied(d) == [] and d.status["reason"] == R.TRACE_EXCEEDS_ESTIMATE and d.retry_after == 1.0
    status = checked_status(d.status)
    sized = _cond(status, C.SIZED)
    assert sized["status"] == "False" and sized["reason"] == R.TRACE_EXCEEDS_ESTIMATE
    assert "traced peak 21.0 GiB" in sized["message"]
    assert any(t == "Warning" and r == R.TRACE_EXCEEDS_ESTIMATE for t, r, _ in d.events)
    assert status["preflight"]["trace"]["fits"] is False
    entry = status["memoryReplans"][0]
    assert entry["reason"] == R.TRACE_EXCEEDS_ESTIMATE and entry["pod"] == "demo-preflight-x1"
    assert entry["failed"]["layout"]["gpusPerPod"] == 1 and entry["failed"]["peakGpuMemoryBytes"] >= 21 * GiB
    new = entry["layout"]
    assert new["gpusPerPod"] * new["pods"] > 1 and "with the traced figure as a floor" in entry["change"]

    # The next pass creates the trainer Job on the re-sized layout, and the preflight does not run again.
    outcome2 = with_replanned_layout(size_job_layout(parse_spec(spec), nodes), d.status)
    assert outcome2.reason == R.TRACE_EXCEEDS_ESTIMATE and outcome2.layout.total_gpus == new["gpusPerPod"] * new["pods"]
    again = _run(spec, _observed(spec, outcome2, _trace(21 * GiB), fleet, d.status), d.status)
    assert _applied(again) == ["demo-plan", "demo-trainer"] and again.status["phase"] == "Pending"
    assert again.status["layout"]["totalGpus"] == new["gpusPerPod"] * new["pods"]
    assert _cond(again.status, C.SIZED)["status"] == "True"
    assert again.status["plan"]["estimate"]["source"] == "trace"


def test_a_trace_that_fits_no_layout_fails_the_job_before_any_gpu_is_used():
    nodes = [n for s in (f"{L4}:2x1",) for n in parse_gpu_shorthand(s)]
    spec = _spec(**PINNED_DDP)  # a pinned DDP layout cannot shrink
    outcome = _sized(spec, nodes)
    d = _run(spec, _observed(spec, outcome, _trace(23 * GiB), fleet_from_nodes(nodes)))
    assert _applied(d) == [] and d.status["phase"] == "Failed" and d.status["reason"] == R.TRACE_EXCEEDS_ESTIMATE
    assert "no layout of the cluster's GPUs" in d.status["message"] and "traced peak 23.0 GiB" in d.status["message"]
    assert _cond(checked_status(d.status), C.FAILED)["reason"] == R.TRACE_EXCEEDS_ESTIMATE


def test_a_larger_micro_batch_is_shrunk_when_no_layout_is_left():
    nodes = [n for s in (f"{L4}:2x1",) for n in parse_gpu_shorthand(s)]
    spec = _spec(**PINNED_DDP, microBatchSize=2, gradientAccumulationSteps=4, maxSeqLength=1024)
    outcome = _sized(spec, nodes)
    assert outcome.plan_status["fits"]
    trace = _trace(19 * GiB, microBatchSize=2, seqLength=1024)  # over the GPU by its activations
    trace["breakdown"].update(weights=15 * GiB, activations=19 * GiB - 15 * GiB - GiB // 2 - GiB // 4)
    d = _run(spec, _observed(spec, outcome, trace, fleet_from_nodes(nodes)))
    assert _applied(d) == [] and d.status["reason"] == R.TRACE_EXCEEDS_ESTIMATE and d.status["phase"] == "Pending"
    entry = checked_status(d.status)["memoryReplans"][0]
    assert entry["training"]["microBatchSize"] == 1 and entry["training"]["gradientAccumulationSteps"] == 8
    assert "layout" not in entry and "global batch 8 per process kept" in d.status["message"]


def test_a_skipped_trace_leaves_the_analytic_estimate_in_charge():
    nodes = [n for s in (f"{L4}:4x2",) for n in parse_gpu_shorthand(s)]
    spec = _spec()
    outcome = _sized(spec, nodes)
    skip = {"skipped": "model_type 'acme' is custom code shipped with the checkpoint (trust_remote_code)"}
    d = _run(spec, _observed(spec, outcome, skip, fleet_from_nodes(nodes)))
    assert _applied(d) == ["demo-plan", "demo-trainer"]
    status = checked_status(d.status)
    assert status["preflight"]["trace"] == skip and status["plan"]["estimate"]["source"] == "analytic"
    assert status["plan"]["estimate"]["traced"] == skip
    assert plan_with_trace(outcome.plan_status, {}) == outcome.plan_status  # no trace reported: unchanged
