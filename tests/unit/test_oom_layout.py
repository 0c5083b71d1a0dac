"""Out-of-memory re-planning across layouts: when a smaller micro batch and gradient checkpointing are spent (or
cannot help), the next layout needs less memory per GPU (higher ZeRO stage, CPU offload, more GPUs, a larger GPU)
within the spec's pins; the status records what failed as planned and as measured, and the recreated Job runs
with the new layout."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.oom_layout import memory_outlook, running_layout, tried_layouts, with_replanned_layout
from kubetune.reconcile import Observed, decide
from kubetune.running_time import gpu_hours
from kubetune.sizing import fleet_from_nodes, parse_gpu_shorthand, size_job_layout
from kubetune.sizing.estimator import gib
from kubetune.sizing.layout import Layout
from kubetune.sizing.leaner import Failure, batch_cannot_help, layout_key, leaner_layout
from kubetune.status import checked_status

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
L4, A100 = "NVIDIA-L4", "NVIDIA-A100-SXM4-80GB"
LEAN = {"microBatchSize": 1, "gradientAccumulationSteps": 8, "gradientCheckpointing": True,
        "activationOffloading": True}


def _nodes(*shorthands: str) -> list[dict]:
    return [n for s in shorthands for n in parse_gpu_shorthand(s)]


def _spec(resources=None, distributed=None, method="lora", **training) -> dict:
    spec = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://data/train.jsonl"},
            "method": method, "training": {"maxSteps": 100, **(training or LEAN)}, "output": {"uri": "s3://out/run"}}
    if resources is not None:
        spec["resources"] = resources
    if distributed is not None:
        spec["distributed"] = distributed
    return spec


def _first(spec: dict, nodes: list[dict]) -> Layout:
    outcome = size_job_layout(parse_spec(spec), nodes)
    assert outcome.fits and outcome.layout is not None, outcome.message
    return outcome.layout


def _share(layout: Layout, estimate: int, fleet) -> float:
    return estimate / next(p for p in fleet.pools if p.product == layout.gpu_type).memory_bytes


def test_each_step_needs_a_smaller_share_of_its_gpu_until_none_is_left():
    nodes = _nodes(f"{L4}:4x2")
    fleet = fleet_from_nodes(nodes)
    spec = parse_spec(_spec(resources={"gpuType": L4}))
    layout, tried, steps = _first(_spec(resources={"gpuType": L4}), nodes), [], []
    while True:
        step = leaner_layout(spec, Failure(layout, LEAN), fleet, tried)
        if step.layout is None:
            break
        assert _share(step.layout, step.estimate, fleet) < _share(layout, step.failed_estimate, fleet)
        assert step.estimate <= step.usable and step.layout.gpu_type == L4 and step.layout.source == "replan"
        assert layout_key(step.layout) not in {layout_key(t) for t in [*tried, layout]}
        assert f"{gib(step.failed_estimate)} GiB estimated per GPU" in step.change
        assert f"{gib(step.estimate)} GiB estimated per GPU of {gib(step.usable)} GiB usable" in step.change
        steps.append(step.layout)
        tried.append(layout)
        layout = step.layout
    # single GPU -> ZeRO-3 over more GPUs (no offload first, as the sizer prefers) -> offload at last
    assert (steps[0].strategy, steps[0].zero_stage, steps[0].offload_optimizer) == ("deepspeed", 3, False)
    assert steps[0].total_gpus == 2
    assert steps[-1].offload_optimizer and steps[-1].offload_params
    assert all(s.total_gpus <= 8 for s in steps)
    assert "no layout within the pins (pinned: gpuType=NVIDIA-L4) fits" in step.reason


def test_max_gpus_one_leaves_only_offload_on_one_gpu():
    nodes = _nodes(f"{L4}:4x2")
    spec = _spec(resources={"gpuType": L4, "maxGpus": 1})
    step = leaner_layout(parse_spec(spec), Failure(_first(spec, nodes), LEAN), fleet_from_nodes(nodes))
    assert step.layout is not None and step.layout.total_gpus == 1
    # LoRA's optimizer states are tiny: offloading them alone frees too little, the frozen weights must go too.
    assert (step.layout.strategy, step.layout.zero_stage, step.layout.offload_optimizer,
            step.layout.offload_params) == ("deepspeed", 3, True, True)
    assert "single GPU -> 1 x NVIDIA-L4, ZeRO-3 + CPU offload of optimizer and params" in step.change


def test_a_pinned_gpu_type_is_kept_and_an_unpinned_job_may_move_to_a_larger_gpu():
    nodes = _nodes(f"{L4}:1x1", f"{A100}:1x1")
    fleet = fleet_from_nodes(nodes)
    failed = Layout(gpu_type=L4, gpus_per_pod=1, pods=1, strategy="none")
    unpinned = leaner_layout(parse_spec(_spec()), Failure(failed, LEAN), fleet)
    assert unpinned.layout is not None and unpinned.layout.gpu_type == A100
    assert unpinned.layout.strategy == "none" and unpinned.layout.node_selector == {"nvidia.com/gpu.product": A100}
    pinned = leaner_layout(parse_spec(_spec(resources={"gpuType": L4})), Failure(failed, LEAN), fleet)
    assert pinned.layout is not None and pinned.layout.gpu_type == L4 and pinned.layout.offload_optimizer


def test_a_pinned_strategy_that_cannot_shrink_leaves_nothing_with_a_clear_reason():
    nodes = _nodes(f"{L4}:2x1")
    spec = _spec(resources={"gpuType": L4, "gpusPerPod": 2, "pods": 1}, distributed={"strategy": "ddp"})
    failed = _first(spec, nodes)
    step = leaner_layout(parse_spec(spec), Failure(failed, LEAN), fleet_from_nodes(nodes))
    assert step.layout is None and step.failed_estimate > 0
    assert "2 x NVIDIA-L4, DDP over 2 GPUs ran out of memory on a" in step.reason
    assert "no layout within the pins (pinned: gpuType=NVIDIA-L4, gpusPerPod=2, pods=1, distributed=ddp/zero0)" \
        in step.reason and "no other layout" in step.reason


def test_the_measured_peak_scales_the_estimates():
    nodes = _nodes(f"{L4}:4x2")
    fleet = fleet_from_nodes(nodes)
    spec = parse_spec(_spec(resources={"gpuType": L4}))
    failed = _first(_spec(resources={"gpuType": L4}), nodes)
    plain = leaner_layout(spec, Failure(failed, LEAN), fleet)
    peak = 2 * plain.failed_estimate  # the trainer needed twice what the estimate said
    scaled = leaner_layout(spec, Failure(failed, LEAN, peak_bytes=peak), fleet)
    assert scaled.layout is not None and plain.layout is not None
    assert scaled.estimate * 2 <= scaled.usable < plain.estimate * 2  # the plain choice would not fit, scaled
    assert scaled.layout.total_gpus > plain.layout.total_gpus
    assert f"the trainer measured a peak of {gib(peak)} GiB" in scaled.change


def test_a_smaller_micro_batch_cannot_help_when_the_weights_and_optimizer_alone_exceed_the_gpu():
    nodes = _nodes(f"{A100}:8x1")
    fleet = fleet_from_nodes(nodes)
    full = parse_spec(_spec(method="full", resources={"gpuType": A100, "gpusPerPod": 1, "pods": 1},
                            microBatchSize=4, gradientCheckpointing=False))
    one = Layout(gpu_type=A100, gpus_per_pod=1, pods=1, strategy="none")
    text = batch_cannot_help(full, Failure(one, {"microBatchSize": 4, "gradientCheckpointing": False}), fleet)
    assert "weights, gradients, optimizer states and buffers alone need" in text and "GiB usable" in text
    lora = parse_spec(_spec(resources={"gpuType": A100}))
    assert batch_cannot_help(lora, Failure(one, LEAN), fleet) == ""


# --- the pass: status, Event, the recreated Job -------------------------------------------------------------

def _oom_pod(name: str, peak: int = 0) -> dict:
    summary = {"version": 1, "status": "Failed", "reason": "OutOfMemory", "step": 37,
               "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}
    if peak:
        summary["peakGpuMemoryBytes"] = peak
    return {"metadata": {"name": name, "creationTimestamp": "2026-01-01T12:00:00Z",
                         "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                         "ownerReferences": [{"uid": "job-uid"}]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": 9, "reason": "Error", "message": json.dumps(summary)}}}]}}


def _job(spec: dict, layout: Layout) -> dict:
    job = copy.deepcopy(build_children(JobRef("demo", "ns", "uid-1"), spec, parse_spec(spec), layout,
                                       BuildConfig())[-1])
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"conditions": [{"type": "FailureTarget", "status": "True"}], "failed": 1}
    return job


def test_the_pass_records_the_failure_changes_the_layout_and_the_next_job_uses_it():
    nodes = _nodes(f"{L4}:4x2")
    fleet = fleet_from_nodes(nodes)
    spec = _spec(resources={"gpuType": L4})
    typed = parse_spec(spec)
    sized = size_job_layout(typed, nodes)
    status = {"phase": "Running", "layout": sized.layout.to_status(), "plan": sized.plan_status,
              "accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    assert running_layout(status, typed) == Layout(gpu_type=L4, gpus_per_pod=1, pods=1, strategy="none",
                                                   gpu_memory_bytes=sized.layout.gpu_memory_bytes)
    pod = _oom_pod("demo-trainer-0-aaaaa", peak=21 * 2**30)
    outlook = memory_outlook(typed, status, {"peakGpuMemoryBytes": 21 * 2**30}, fleet)
    d = decide(name="demo", generation=1, labels={}, spec=typed, spec_hash=spec_hash(spec), status=status,
               observed=Observed(job=_job(spec, sized.layout), pods=[pod], memory=outlook), now=T0)
    assert [a.kind for a in d.actions] == ["delete_job"] and d.status["reason"] == R.REPLANNED_OOM
    entry = checked_status(d.status)["memoryReplans"][0]  # the CRD keeps every field
    assert entry["failed"] == {"layout": {"gpuType": L4, "gpusPerPod": 1, "pods": 1, "strategy": "none",
                                          "zeroStage": 0, "offloadOptimizer": False, "offloadParams": False,
                                          "estimatedPerGpuBytes": outlook.leaner.failed_estimate,
                                          "gpuMemoryBytes": fleet.pools[0].memory_bytes},
                               "microBatchSize": 1, "gradientCheckpointing": True, "peakGpuMemoryBytes": 21 * 2**30}
    new = entry["layout"]
    assert (new["strategy"], new["zeroStage"]) == ("deepspeed", 3) and new["gpusPerPod"] * new["pods"] > 1
    assert new["estimatedPerGpuBytes"] == outlook.leaner.estimate and entry["training"]["microBatchSize"] == 1
    assert entry["change"].endswith(outlook.leaner.change) and "single GPU -> " in entry["change"]
    # 21 GiB measured against the estimate's live tensors: even weights and buffers would not fit, and it says so
    assert outlook.batch_blocked and entry["change"].startswith(outlook.batch_blocked + ", so a smaller micro batch")
    events = [m for t, r, m in d.events if r == R.REPLANNED_OOM]
    assert len(events) == 1 and outlook.leaner.change in events[0] and "21.0 GiB" in events[0]
    # The next pass creates the Job with the re-planned layout: status.layout and the plan's distributed block.
    outcome = with_replanned_layout(size_job_layout(typed, nodes), d.status)
    assert outcome.reason == R.REPLANNED_OOM and outcome.layout.source == "replan"
    assert outcome.layout.to_status()["zeroStage"] == 3
    children = build_children(JobRef("demo", "ns", "uid-1"), spec, typed, outcome.layout, BuildConfig(),
                              memory_replans=d.status["memoryReplans"])
    plan = json.loads(children[0]["data"]["plan.json"])
    assert plan["distributed"]["strategy"] == "deepspeed" and plan["distributed"]["zeroStage"] == 3
    assert plan["distributed"]["numNodes"] * plan["distributed"]["procsPerNode"] == new["gpusPerPod"] * new["pods"]
    assert running_layout(d.status, typed) == outcome.layout
    assert tried_layouts(d.status) == [Layout(gpu_type=L4, gpus_per_pod=1, pods=1, strategy="none",
                                              node_selector={"nvidia.com/gpu.product": L4}, source="replan")]
    # The hour on one L4 stays one GPU-hour when the run goes on with the re-planned layout's GPUs.
    acc = d.status["accounting"]
    assert acc["gpuTime"] == [{"gpuType": L4, "runningSeconds": 3600.0, "gpuHours": 1.0}] and acc["gpuHours"] == 1.0
    gpus = new["gpusPerPod"] * new["pods"]
    later = {**d.status, "phase": "Running", "layout": outcome.layout.to_status(),
             "accounting": {**acc, "runningSince": "2026-01-01T12:10:00Z"}}
    assert gpu_hours(later, T0 + dt.timedelta(minutes=70)) == 1.0 + gpus


def test_the_pass_fails_with_the_reason_when_no_layout_is_left():
    nodes = _nodes(f"{L4}:2x1")
    fleet = fleet_from_nodes(nodes)
    spec = _spec(resources={"gpuType": L4, "gpusPerPod": 2, "pods": 1}, distributed={"strategy": "ddp"})
    typed = parse_spec(spec)
    sized = size_job_layout(typed, nodes)
    status = {"phase": "Running", "layout": sized.layout.to_status(), "plan": sized.plan_status}
    outlook = memory_outlook(typed, status, None, fleet)
    d = decide(name="demo", generation=1, labels={}, spec=typed, spec_hash=spec_hash(spec), status=status,
               observed=Observed(job=_job(spec, sized.layout), pods=[_oom_pod("demo-trainer-0-bbbbb")],
                                 memory=outlook), now=T0)
    assert d.status["phase"] == "Failed" and d.status["reason"] == R.OUT_OF_MEMORY and not d.actions
    assert outlook.leaner.reason in d.status["message"]
