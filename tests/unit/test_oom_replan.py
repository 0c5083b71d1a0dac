"""Out-of-memory re-planning: the trainer's OutOfMemory exit code fails the Job at once; the operator records the
next plan that needs less memory per GPU (smaller micro batch with the global batch kept, then gradient
checkpointing), deletes the Job so the next pass recreates it with that plan, and fails only when nothing leaner
is left."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, build_plan, spec_hash
from kubetune.oom import current_training, next_memory_plan
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout
from kubetune.status import checked_status

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none")


def _spec(**training) -> dict:
    return {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://data/train.jsonl"},
            "method": "lora", "training": {"maxSteps": 100, **training}, "output": {"uri": "s3://out/run"},
            "backoffLimit": 3}


@pytest.mark.parametrize("micro,accum,expected", [(8, 1, (4, 2)), (6, 2, (3, 4)), (3, 4, (1, 12)), (2, 8, (1, 16))])
def test_smaller_micro_batch_keeps_the_global_batch(micro, accum, expected):
    spec = parse_spec(_spec(microBatchSize=micro, gradientAccumulationSteps=accum))
    training, change = next_memory_plan(spec, [])
    assert (training["microBatchSize"], training["gradientAccumulationSteps"]) == expected
    assert expected[0] * expected[1] == micro * accum
    assert f"microBatchSize {micro} -> {expected[0]}" in change and f"global batch {micro * accum}" in change


def test_then_gradient_checkpointing_then_nothing():
    spec = parse_spec(_spec(microBatchSize=2, gradientAccumulationSteps=4, gradientCheckpointing=False))
    replans = []
    changes = []
    while (leaner := next_memory_plan(spec, replans)) is not None:
        replans.append({"training": leaner[0], "change": leaner[1]})
        changes.append(leaner[1])
    assert changes == ["microBatchSize 2 -> 1, gradientAccumulationSteps 4 -> 8 (global batch 8 per process kept)",
                       "gradientCheckpointing false -> true",
                       "activationOffloading false -> true (saved activations wait in host RAM)"]
    assert current_training(spec, replans) == {"microBatchSize": 1, "gradientAccumulationSteps": 8,
                                               "gradientCheckpointing": True, "activationOffloading": True}
    # the trainer refuses activation offloading under DeepSpeed: not a step for a DeepSpeed layout
    spec = parse_spec(_spec(microBatchSize=1, gradientCheckpointing=True))
    assert next_memory_plan(spec, [], "deepspeed") is None
    assert next_memory_plan(spec, [], "none")[0]["activationOffloading"] is True


def test_the_plan_uses_the_last_replan():
    spec = parse_spec(_spec(microBatchSize=8, gradientAccumulationSteps=1))
    replans = [{"training": {"microBatchSize": 4, "gradientAccumulationSteps": 2, "gradientCheckpointing": True}}]
    training = build_plan(JobRef("demo", "ns", "uid"), spec, LAYOUT, replans)["training"]
    assert (training["microBatchSize"], training["gradientAccumulationSteps"]) == (4, 2)
    cm = build_children(JobRef("demo", "ns", "uid"), _spec(microBatchSize=8), spec, LAYOUT, BuildConfig(),
                        memory_replans=replans)[0]
    assert json.loads(cm["data"]["plan.json"])["training"]["microBatchSize"] == 4
    assert build_plan(JobRef("demo", "ns", "uid"), spec, LAYOUT)["training"]["microBatchSize"] == 8


def _job(spec: dict, conditions=None) -> dict:
    job = copy.deepcopy(build_children(JobRef("demo", "ns", "uid-1"), spec, parse_spec(spec), LAYOUT,
                                       BuildConfig())[-1])
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"conditions": conditions or [], "failed": 1}
    return job


def _oom_pod(name="demo-trainer-0-abcde", step=37):
    summary = {"version": 1, "status": "Failed", "reason": "OutOfMemory", "step": step,
               "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
               "checkpoint": {"step": 30, "uri": "s3://out/run/checkpoints/step-30"}}
    return {"metadata": {"name": name, "creationTimestamp": "2026-01-01T12:00:00Z",
                         "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                         "ownerReferences": [{"uid": "job-uid"}]},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": 9, "reason": "Error", "message": json.dumps(summary)}}}]}}


def _decide(spec: dict, status: dict, observed: Observed):
    return decide(name="demo", generation=1, labels={}, spec=parse_spec(spec), spec_hash=spec_hash(spec),
                  status=copy.deepcopy(status), observed=observed, now=T0)


def test_the_replanned_runs_stretch_ends_at_the_failed_pods_exit_not_at_the_pass():
    spec = _spec(microBatchSize=8, gradientAccumulationSteps=1)
    failed = [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}]
    pod = _oom_pod()
    pod["status"]["containerStatuses"][0]["state"]["terminated"].update(
        startedAt="2026-01-01T11:00:00Z", finishedAt="2026-01-01T11:50:00Z")
    running = {"phase": "Running", "layout": LAYOUT.to_status(), "accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    d = _decide(spec, running, Observed(job=_job(spec, failed), pods=[pod]))
    assert d.status["reason"] == R.REPLANNED_OOM and d.status["accounting"]["runningSeconds"] == 3000.0
    # Started and ran out of memory between two passes (never seen Running): from its container's start.
    unseen = _decide(spec, {"phase": "Pending", "layout": LAYOUT.to_status()}, Observed(job=_job(spec, failed),
                                                                                          pods=[pod]))
    assert unseen.status["accounting"]["runningSeconds"] == 3000.0
    # Another pod of the Job still runs: its GPUs are held, the stretch ends at this pass as before.
    other = {**_oom_pod("demo-trainer-1-fghij"), "status": {"phase": "Running", "containerStatuses": [
        {"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T11:00:00Z"}}}]}}
    both = _decide(spec, running, Observed(job=_job(spec, failed), pods=[pod, other]))
    assert both.status["accounting"]["runningSeconds"] == 3600.0


def test_out_of_memory_replans_deletes_the_job_and_says_what_changed():
    spec = _spec(microBatchSize=8, gradientAccumulationSteps=1)
    failed = [{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy"}]
    d = _decide(spec, {"phase": "Running", "layout": LAYOUT.to_status()},
                Observed(job=_job(spec, failed), pods=[_oom_pod()]))
    assert [a.kind for a in d.actions] == ["delete_job"]
    st = d.status
    assert st["phase"] == "Pending" and st["reason"] == R.REPLANNED_OOM
    assert "microBatchSize 8 -> 4, gradientAccumulationSteps 1 -> 2" in st["message"]
    assert "step 37" in st["message"] and "checkpoint step-30" in st["message"]
    assert st["memoryReplans"] == [{"pod": "demo-trainer-0-abcde", "step": 37,
                                    "message": "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
                                    "change": "microBatchSize 8 -> 4, gradientAccumulationSteps 1 -> 2 "
                                              "(global batch 8 per process kept)",
                                    "training": {"microBatchSize": 4, "gradientAccumulationSteps": 2,
                                                 "gradientCheckpointing": True, "activationOffloading": False}}]
    assert checked_status(st)["memoryReplans"][0]["step"] == 37  # the CRD keeps the field
    assert [e[:2] for e in d.events] == [("Warning", R.REPLANNED_OOM)]
    # The Job is still being deleted on the next pass: the same pod is not re-planned twice.
    again = _decide(spec, st, Observed(job=_job(spec, failed), pods=[_oom_pod()]))
    assert len(again.status["memoryReplans"]) == 1 and [a.kind for a in again.actions] == ["delete_job"]
    assert not again.events


def test_out_of_memory_with_nothing_leaner_fails_with_what_would_help():
    spec = _spec(microBatchSize=1, gradientCheckpointing=True, activationOffloading=True)
    d = _decide(spec, {"phase": "Running", "layout": LAYOUT.to_status()},
                Observed(job=_job(spec), pods=[_oom_pod()]))
    assert d.status["phase"] == "Failed" and d.status["reason"] == R.OUT_OF_MEMORY
    assert "CUDA out of memory" in d.status["message"] and "method qlora" in d.status["message"]
    assert "with gradient checkpointing and activation offloading;" in d.status["message"]
    assert C.find_condition(d.status["conditions"], C.FAILED)["reason"] == R.OUT_OF_MEMORY
    assert not d.actions
