"""Sizing sees the cluster as it is: GPUs held by pods, queued demand, GPU types a job's pods could not be
scheduled on, and suggestions inside the CRD's bounds."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import LAYOUT_ANNOTATION, BuildConfig, JobRef, build_children
from kubetune.reconcile import SPEC_HASH_ANNOTATION, Observed, decide
from kubetune.resize import (adopt_recorded_layout, avoided_types, moves, recorded_layout, resize_due,
                             unschedulable_seconds)
from kubetune.sizing import size_job
from kubetune.sizing.fleet import fleet_from_nodes, parse_gpu_shorthand, pod_gpu_request, with_occupancy
from kubetune.sizing.fleet_sizer import FleetSizer
from kubetune.store import slim_job
from kubetune.sizing.sizer import MAX_GRADIENT_ACCUMULATION_STEPS, _alternatives

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.timezone.utc)
L4, A100 = "NVIDIA-L4", "A100-80GB"


def nodes():
    return parse_gpu_shorthand(f"{L4}:4x2") + parse_gpu_shorthand(f"{A100}:8x1")


def lora(**blocks):
    return parse_spec({"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://d/t.jsonl"},
                       "method": "lora", "training": {"maxSteps": 10}, "output": {"uri": "s3://o/x"}, **blocks})


def pod(gpus, node="", product="", phase="Running", init=0):
    spec = {"containers": [{"resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]}
    if init:
        spec["initContainers"] = [{"resources": {"requests": {"nvidia.com/gpu": str(init)}}}]
    if node:
        spec["nodeName"] = node
    if product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return {"spec": spec, "status": {"phase": phase}}


def l4_nodes():
    return [n["metadata"]["name"] for n in nodes() if L4 in n["metadata"]["labels"]["nvidia.com/gpu.product"]]


def test_gpu_requests_of_a_pod():
    assert pod_gpu_request(pod(2)) == 2 and pod_gpu_request(pod(1, init=3)) == 3 and pod_gpu_request({}) == 0


def test_bound_pods_hold_gpus_queued_pods_are_demand_finished_pods_hold_nothing():
    a, b = l4_nodes()
    fleet = with_occupancy(fleet_from_nodes(nodes()), [
        pod(3, node=a), pod(4, node=b, phase="Succeeded"), pod(2, product=L4), pod(1, node="elsewhere")])
    l4 = fleet.pool(L4)
    assert fleet.occupancy_known and l4.node_used == {a: 3} and l4.pending == 2
    assert l4.free_on(a) == 1 and l4.free_on(b) == 4 and l4.free_gpus == 3
    assert l4.placeable_now(1, 1) and not l4.placeable_now(4, 2) and "3 of 8 GPUs free" in l4.describe_free()


def test_without_occupancy_the_cheapest_type_is_chosen():
    d = size_job(lora(), fleet_from_nodes(nodes()))
    assert d.gpu_product == L4 and d.free_now and "Free GPUs" not in d.message


def test_a_full_gpu_type_gives_way_to_one_that_fits_and_is_free():
    full = [pod(4, node=n) for n in l4_nodes()]
    d = size_job(lora(), with_occupancy(fleet_from_nodes(nodes()), full))
    assert d.fits and d.gpu_product == A100 and d.free_now
    assert f"over 1 x {L4}" in d.message and f"{L4}: 0 of 8 GPUs free" in d.message, d.message


def test_when_every_type_that_fits_is_full_the_job_waits_for_the_cheapest_and_says_so():
    a100 = next(n["metadata"]["name"] for n in nodes() if A100 in n["metadata"]["labels"]["nvidia.com/gpu.product"])
    full = [pod(4, node=n) for n in l4_nodes()] + [pod(8, node=a100)]
    d = size_job(lora(), with_occupancy(fleet_from_nodes(nodes()), full))
    assert d.gpu_product == L4 and not d.free_now and "the pods will wait for free GPUs" in d.message


def test_a_pinned_gpu_type_is_kept_even_when_full():
    full = [pod(4, node=n) for n in l4_nodes()]
    d = size_job(lora(resources={"gpuType": L4}), with_occupancy(fleet_from_nodes(nodes()), full))
    assert d.gpu_product == L4 and not d.free_now


def test_fleet_sizer_counts_the_clusters_pods_and_avoids_types_on_request():
    listed = {"pods": 0}

    def list_pods():
        listed["pods"] += 1
        return []
    sizer = FleetSizer(nodes, ttl_seconds=60, list_pods=list_pods)
    assert sizer.size(lora()).layout.gpu_type == L4
    moved = sizer.size(lora(), frozenset({L4}))
    assert moved.layout.gpu_type == A100 and moved.free_now and "its pods stayed unschedulable" in moved.message
    assert sizer.size(lora()).layout.gpu_type == L4  # the shared snapshot is not changed by `avoid`
    assert listed["pods"] == 1  # one pod list per node snapshot
    unreadable = FleetSizer(nodes, list_pods=lambda: None)  # RBAC without the pod list: allocatable only
    assert unreadable.size(lora()).layout.gpu_type == L4


def test_suggestions_keep_the_effective_batch_within_the_crds_bounds():
    crd = yaml.safe_load((ROOT / "crds" / "kubetune.io_finetunejobs.yaml").read_text())
    training = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]
    assert training["properties"]["gradientAccumulationSteps"]["maximum"] == MAX_GRADIENT_ACCUMULATION_STEPS
    spec = lora(training={"maxSteps": 10, "microBatchSize": 8, "gradientAccumulationSteps": 1024,
                          "gradientCheckpointing": True})
    batches = [p["training"] for _, p in _alternatives(spec) if "microBatchSize" in p.get("training", {})]
    assert batches == [{"microBatchSize": 2, "gradientAccumulationSteps": 4096}]
    at_bound = lora(training={"maxSteps": 10, "microBatchSize": 2, "gradientAccumulationSteps": 4096})
    assert not [p for _, p in _alternatives(at_bound) if "microBatchSize" in p.get("training", {})]


def unschedulable(since_s, node=""):
    p = {"metadata": {"name": "x-trainer-0-abcde"}, "spec": {"nodeName": node} if node else {},
         "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/6 nodes are available: 2 node(s) had untolerated taint",
         "lastTransitionTime": (NOW - dt.timedelta(seconds=since_s)).isoformat().replace("+00:00", "Z")}]}}
    return p


def test_unschedulable_seconds_counts_only_pods_that_all_wait_for_a_node():
    assert unschedulable_seconds([unschedulable(400), unschedulable(350)], NOW) == 350
    assert unschedulable_seconds([unschedulable(400), unschedulable(350, node="n1")], NOW) == 0
    assert unschedulable_seconds([unschedulable(400), {"status": {"phase": "Running"}}], NOW) == 0
    assert unschedulable_seconds([], NOW) == 0


def test_resize_is_due_only_for_a_sizer_layout_after_the_configured_time():
    status = {"layout": {"source": "sizer", "gpuType": L4}}
    pods = [unschedulable(400)]
    assert resize_due(lora(), status, pods, NOW, 300) == L4
    assert resize_due(lora(), status, pods, NOW, 500) == ""
    assert resize_due(lora(), status, pods, NOW, 0) == ""  # turned off
    assert resize_due(lora(resources={"gpuType": L4}), status, pods, NOW, 300) == ""  # the user pinned it
    assert resize_due(lora(), {"layout": {"source": "spec", "gpuType": L4}}, pods, NOW, 300) == ""
    assert avoided_types({"unschedulableGpuTypes": [L4]}) == {L4}


def test_a_resize_moves_the_job_in_one_pass_records_the_type_and_warns():
    """Input: the Job's pods waited 400 s unschedulable on L4 and an A100 is free. Expected: one pass deletes
    the Job and creates the children rendered for A100 (delete first), with the new layout in status; a pass
    asked to move without children refuses instead of leaving the job without a Job."""
    sizer = FleetSizer(nodes, list_pods=lambda: [])
    outcome = sizer.size(lora(), frozenset({L4}))
    status = {"phase": "Pending", "reason": "WaitingForPods", "layout": {"source": "sizer", "gpuType": L4}}
    assert moves(status, outcome) and not moves({"layout": {"gpuType": A100}}, outcome)
    spec_dict = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://d/t.jsonl"},
                 "method": "lora", "training": {"maxSteps": 10}, "output": {"uri": "s3://o/x"}}
    spec = parse_spec(spec_dict)
    want = "h1"
    children = build_children(JobRef("x", "ns", "ftj-uid", {}), spec_dict, spec, outcome.layout, BuildConfig())
    job = {"metadata": {"uid": "j", "annotations": {SPEC_HASH_ANNOTATION: want}}, "spec": {}, "status": {}}
    observed = Observed(job=job, pods=[unschedulable(400)], children_exist=True, resize=outcome, resize_from=L4,
                        children=children)
    d = decide(name="x", generation=1, labels={}, spec=spec, spec_hash=want, status=status, observed=observed,
               now=NOW)
    assert [a.kind for a in d.actions] == ["delete_job"] + ["apply"] * len(children)
    applied = [a.obj for a in d.actions if a.kind == "apply"]
    assert [o["kind"] for o in applied] == [c["kind"] for c in children] and "Job" in [o["kind"] for o in applied]
    new_job = next(o for o in applied if o["kind"] == "Job")
    assert new_job["spec"]["template"]["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == A100
    assert d.status["layout"]["gpuType"] == A100 and d.status["layout"]["specHash"] == want
    assert d.status["reason"] == R.RESIZING and d.status["unschedulableGpuTypes"] == [L4]
    assert "untolerated taint" in d.status["message"] and A100 in d.status["message"]
    assert [(t, r) for t, r, _ in d.events] == [("Warning", R.RESIZING)]
    # A job moved before (its status still says so) that is stuck again gets an Event for this move too.
    again = decide(name="x", generation=1, labels={}, spec=spec, spec_hash=want, now=NOW, observed=observed,
                   status={**status, "reason": R.RESIZING, "message": "moved before"})
    assert [(t, r) for t, r, _ in again.events] == [("Warning", R.RESIZING)]
    with pytest.raises(ValueError, match="render its children"):
        decide(name="x", generation=1, labels={}, spec=spec, spec_hash=want, status=status, now=NOW,
               observed=Observed(job=job, pods=[unschedulable(400)], children_exist=True, resize=outcome,
                                 resize_from=L4))


def test_the_trainer_job_records_its_layout_and_a_lost_status_write_is_recovered_from_it():
    """Input: the Job rendered for a move to A100 (L4 avoided), while the status still holds the L4 layout (the
    move's status write was refused). Expected: the annotation survives the store's slim copy and gives back the
    layout and the avoided type; adopting it changes the status once, then is a no-op; Jobs without a readable
    annotation (older operators, hand edits) change nothing."""
    sizer = FleetSizer(nodes, list_pods=lambda: [])
    outcome = sizer.size(lora(), frozenset({L4}))
    spec_dict = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://d/t.jsonl"},
                 "method": "lora", "training": {"maxSteps": 10}, "output": {"uri": "s3://o/x"}}
    job = build_children(JobRef("x", "ns", "ftj-uid", {}), spec_dict, parse_spec(spec_dict), outcome.layout,
                         BuildConfig(), avoided=frozenset({L4}))[-1]
    stored = slim_job(job)
    layout, avoid = recorded_layout(stored)
    assert layout == outcome.layout.to_status() and avoid == {L4}
    status = {"phase": "Pending", "layout": {"source": "sizer", "gpuType": L4, "gpusPerPod": 1, "pods": 1,
                                              "totalGpus": 1, "strategy": "none", "zeroStage": 0, "specHash": "h1"}}
    assert adopt_recorded_layout(status, stored, "h1")
    assert status["layout"] == {**outcome.layout.to_status(), "specHash": "h1"}
    assert status["unschedulableGpuTypes"] == [L4]
    assert not adopt_recorded_layout(status, stored, "h1")
    for text in (None, "", "{not json", "[1]", "{}"):
        other = {"metadata": {"annotations": {LAYOUT_ANNOTATION: text} if text is not None else {}}}
        before = {"layout": {"gpuType": L4, "pods": 1}}
        assert recorded_layout(other) is None and not adopt_recorded_layout(before, other, "h1")
        assert before == {"layout": {"gpuType": L4, "pods": 1}}
