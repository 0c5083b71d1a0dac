"""Unit tests of the pure reconcile core (kubetune.reconcile), conditions and status patching."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, spec_hash
from kubetune.children import merge_patch, rank0_address
from kubetune.sizing.layout import Layout, SizingOutcome, layout_from_resources
from kubetune.reconcile import (CANCEL, CREATE, FOLLOW, RECREATE, TERMINAL, Observed, decide, decide_not_owned,
                                phase_of, status_changed, still_acting)

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {
    "model": {"uri": "hf://meta-llama/Llama-3.1-8B"},
    "dataset": {"uri": "s3://data/train.jsonl"},
    "method": "lora",
    "training": {"maxSteps": 100, "learningRate": "2e-4"},
    "output": {"uri": "s3://out/run"},
    "backoffLimit": 3,
}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none",
                node_selector={"nvidia.com/gpu.product": "NVIDIA-L4"})


def run(spec: dict | None = None, status: dict | None = None, observed: Observed | None = None,
        now: dt.datetime = T0, labels: dict | None = None, generation: int = 1):
    spec = copy.deepcopy(spec or SPEC)
    return decide(name="demo", generation=generation, labels=labels or {}, spec=parse_spec(spec),
                  spec_hash=spec_hash(spec), status=copy.deepcopy(status or {}),
                  observed=observed or Observed(), now=now)


def fits(spec: dict | None = None) -> Observed:
    spec = spec or SPEC
    outcome = SizingOutcome(True, LAYOUT, R.SIZED, "sized: 1 pod(s) x 1 NVIDIA-L4", plan_status={"fits": True})
    children = build_children(JobRef("demo", "ns", "uid-1"), spec, parse_spec(spec), LAYOUT, BuildConfig())
    return Observed(sizing=outcome, children=children)


def job_obj(spec: dict | None = None, *, suspend: bool = False, conditions: list | None = None,
            failed: int = 0, completion: str | None = None) -> dict:
    spec = spec or SPEC
    job = build_children(JobRef("demo", "ns", "uid-1"), spec, parse_spec(spec), LAYOUT, BuildConfig())[-1]
    job = copy.deepcopy(job)
    job["metadata"]["uid"] = "job-uid"
    job["spec"]["suspend"] = suspend
    job["status"] = {"conditions": conditions or [], "failed": failed}
    if completion:
        job["status"]["completionTime"] = completion
    return job


def pod(phase: str, index: int = 0, *, created: str = "2026-01-01T12:00:00Z", summary: dict | None = None,
        exit_code: int | None = None, ip: str = "10.0.0.5") -> dict:
    status: dict = {"phase": phase, "podIP": ip}
    if summary is not None or exit_code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": exit_code if exit_code is not None else 0,
            "message": json.dumps(summary) if summary is not None else "", "reason": "Error"}}}]
    return {"metadata": {"name": f"demo-trainer-{index}-{phase.lower()}", "creationTimestamp": created,
                         "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
                         "ownerReferences": [{"uid": "job-uid"}]},
            "status": status}


def cond_of(status: dict, ctype: str) -> dict:
    found = C.find_condition(status["conditions"], ctype)
    assert found is not None, f"no {ctype} condition in {status['conditions']}"
    return found


def test_each_pass_takes_one_branch_and_creating_needs_the_sizing_first() -> None:
    spec = parse_spec(SPEC)
    want = spec_hash(SPEC)
    assert phase_of({}, spec, None, want) == CREATE
    assert phase_of({"phase": "Running"}, spec, job_obj(), want) == FOLLOW
    assert phase_of({"phase": "Suspended"}, spec, job_obj(), "another-hash") == RECREATE
    assert phase_of({"phase": "Succeeded"}, spec, None, want) == TERMINAL
    cancelled = parse_spec({**SPEC, "cancel": True})
    assert phase_of({"phase": "Running"}, cancelled, job_obj(), want) == CANCEL
    with pytest.raises(ValueError, match="size it first"):
        run()  # no Job and no sizing outcome: the caller must size before deciding


def test_a_child_name_taken_by_another_owner_is_reported_not_adopted() -> None:
    d = decide_not_owned(generation=2, status={"phase": ""}, kind="Job", child="demo-trainer",
                         owner="FineTuneJob demo (uid old-uid)", now=T0, retry_seconds=30)
    assert d.status["phase"] == "Pending" and d.status["reason"] == R.CHILD_NOT_OWNED
    assert "demo-trainer" in d.status["message"] and "old-uid" in d.status["message"]
    assert cond_of(d.status, C.READY)["reason"] == R.CHILD_NOT_OWNED
    assert d.events[0][:2] == ("Warning", R.CHILD_NOT_OWNED)
    assert d.retry_after == 30 and not d.actions


def test_insufficient_gpu_is_pending_with_reason_suggestion_and_retry() -> None:
    outcome = SizingOutcome(False, None, R.INSUFFICIENT_GPU, "needs 90 GiB per GPU, largest is 80 GiB",
                            "use method qlora", {"fits": False})
    d = run(observed=Observed(sizing=outcome))
    assert d.status["phase"] == "Pending"
    sized = cond_of(d.status, C.SIZED)
    assert sized["status"] == "False" and sized["reason"] == "InsufficientGPU"
    assert "use method qlora" in sized["message"]
    assert d.retry_after and not d.actions
    assert d.events and d.events[0][0] == "Warning" and d.events[0][1] == "InsufficientGPU"
    assert d.status["plan"] == {"fits": False}


def test_fitting_job_creates_children_once_and_records_layout() -> None:
    d = run(observed=fits())
    kinds = [a.obj["kind"] for a in d.actions if a.kind == "apply"]
    assert kinds == ["ConfigMap", "Job"]  # one pod: no rendezvous Service
    assert d.status["phase"] == "Pending"
    assert d.status["layout"]["totalGpus"] == 1 and d.status["layout"]["specHash"] == spec_hash(SPEC)
    assert cond_of(d.status, C.SIZED)["status"] == "True"
    assert cond_of(d.status, C.READY)["status"] == "False"
    # Next pass with the Job present: no more creations.
    d2 = run(status=d.status, observed=Observed(job=job_obj()), now=T0 + dt.timedelta(seconds=5))
    assert not [a for a in d2.actions if a.kind == "apply"]


def _waiting_pod(*, bound_at: dt.datetime | None) -> dict:
    p = pod("Pending")
    if bound_at is None:
        p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                      "message": "0/40 nodes are available: 40 Insufficient nvidia.com/gpu."}]
    else:
        p["spec"] = {"nodeName": "gpu-node-7"}
        p["status"]["conditions"] = [{"type": "PodScheduled", "status": "True",
                                      "lastTransitionTime": bound_at.strftime("%Y-%m-%dT%H:%M:%SZ")}]
    return p


def test_a_just_bound_pod_costs_no_status_write_until_it_runs_or_the_quiet_window_ends() -> None:
    from kubetune.reconcile import BOUND_QUIET_SECONDS

    waiting = run(status={"phase": "Pending", "layout": LAYOUT.to_status()},
                  observed=Observed(job=job_obj(), pods=[_waiting_pod(bound_at=None)])).status
    assert waiting["reason"] == R.WAITING_FOR_PODS and "0/40 nodes are available" in waiting["message"]
    bound = T0 + dt.timedelta(seconds=100)
    soon = run(status=waiting, observed=Observed(job=job_obj(), pods=[_waiting_pod(bound_at=bound)]),
               now=bound + dt.timedelta(seconds=3))
    assert not status_changed(waiting, soon.status) and not soon.events
    assert soon.retry_after == pytest.approx(BOUND_QUIET_SECONDS - 3)
    # then it runs: one write, straight to Running
    running = run(status=soon.status, observed=Observed(job=job_obj(), pods=[pod("Running")]),
                  now=bound + dt.timedelta(seconds=5))
    assert running.status["phase"] == "Running"
    # or it still does not run after the window (an image pull): the stale scheduler message goes
    late = run(status=waiting, observed=Observed(job=job_obj(), pods=[_waiting_pod(bound_at=bound)]),
               now=bound + dt.timedelta(seconds=BOUND_QUIET_SECONDS + 1))
    assert late.status["message"] == "waiting for the trainer pods to start", late.status["message"]


def test_kueue_label_gives_queued_and_operator_never_unsuspends() -> None:
    labels = {"kueue.x-k8s.io/queue-name": "team-a"}
    d = run(observed=fits(), labels=labels)
    assert d.status["phase"] == "Queued"
    d2 = run(status=d.status, observed=Observed(job=job_obj(suspend=True)), labels=labels)
    assert d2.status["phase"] == "Queued" and not any(a.kind == "suspend_job" for a in d2.actions)
    # Kueue admitted it (unsuspended) and a pod runs.
    d3 = run(status=d2.status, observed=Observed(job=job_obj(), pods=[pod("Running")]), labels=labels)
    assert d3.status["phase"] == "Running"


def test_running_sets_start_time_accounting_and_ready() -> None:
    d = run(status={"phase": "Pending", "layout": LAYOUT.to_status()},
            observed=Observed(job=job_obj(), pods=[pod("Running")]))
    assert d.status["phase"] == "Running"
    assert d.status["startTime"] == "2026-01-01T12:00:00Z"
    assert d.status["accounting"]["runningSince"] == "2026-01-01T12:00:00Z"
    assert cond_of(d.status, C.READY)["status"] == "True"
    later = run(status=d.status, observed=Observed(job=job_obj(), pods=[pod("Running")]),
                now=T0 + dt.timedelta(hours=2))
    assert later.status["accounting"]["gpuHours"] == pytest.approx(2.0)
    # The Ready condition keeps its first transition time.
    assert cond_of(later.status, C.READY)["lastTransitionTime"] == "2026-01-01T12:00:00Z"


def timed_pod(phase: str, started: str, finished: str | None = None, index: int = 0) -> dict:
    """A trainer pod whose container status carries the kubelet's start (and exit) time."""
    p = pod(phase, index)
    state = ({"terminated": {"exitCode": 0, "startedAt": started, "finishedAt": finished}} if finished
             else {"running": {"startedAt": started}})
    p["status"]["containerStatuses"] = [{"name": "trainer", "state": state}]
    return p


def test_running_time_counts_from_the_containers_start_to_their_exit_not_the_passes_that_saw_them() -> None:
    # The pass that sees the pod Running comes 40 s after its container started.
    d = run(status={"phase": "Pending", "layout": LAYOUT.to_status()},
            observed=Observed(job=job_obj(), pods=[timed_pod("Running", "2026-01-01T11:59:20Z")]))
    assert d.status["accounting"]["runningSince"] == "2026-01-01T11:59:20Z"
    # The pass that sees the Job complete comes 3 minutes after the container exited.
    job = job_obj(conditions=[{"type": "Complete", "status": "True"}])
    done = run(status=d.status, observed=Observed(job=job, pods=[
        timed_pod("Succeeded", "2026-01-01T11:59:20Z", "2026-01-01T12:10:00Z")]), now=T0 + dt.timedelta(minutes=13))
    assert done.status["phase"] == "Succeeded"
    assert done.status["accounting"]["runningSeconds"] == 640.0 and "runningSince" not in done.status["accounting"]
    # A clock ahead of the operator's never counts time after this pass; a start in the future is this pass.
    ahead = run(status={"phase": "Pending", "layout": LAYOUT.to_status()},
                observed=Observed(job=job_obj(), pods=[timed_pod("Running", "2026-01-01T12:00:30Z")]))
    assert ahead.status["accounting"]["runningSince"] == "2026-01-01T12:00:00Z"


def test_a_run_that_started_and_ended_between_two_passes_still_counts_its_running_time() -> None:
    job = job_obj(conditions=[{"type": "Complete", "status": "True"}])
    d = run(status={"phase": "Pending", "layout": LAYOUT.to_status()}, observed=Observed(job=job, pods=[
        timed_pod("Succeeded", "2026-01-01T11:58:00Z", "2026-01-01T11:59:30Z")]))
    assert d.status["phase"] == "Succeeded" and d.status["accounting"]["runningSeconds"] == 90.0
    assert d.status["accounting"]["gpuHours"] == pytest.approx(90 / 3600, abs=1e-4)


def test_a_failed_runs_time_ends_at_its_last_container_exit_once_every_pod_has_exited() -> None:
    job = job_obj(conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}], failed=1)
    running = {"phase": "Running", "layout": LAYOUT.to_status(), "accounting": {"runningSince": "2026-01-01T12:00:00Z"}}
    failed = timed_pod("Failed", "2026-01-01T12:00:00Z", "2026-01-01T12:05:00Z")
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] = 1
    # The pass that sees the Job failed comes 2 minutes after the trainer exited: the 2 minutes are not billed.
    d = run(status=copy.deepcopy(running), observed=Observed(job=job, pods=[failed]),
            now=T0 + dt.timedelta(minutes=7))
    assert d.status["phase"] == "Failed" and d.status["accounting"]["runningSeconds"] == 300.0
    # A pod of the Job still running (a permanent failure decided early): the stretch ends at this pass.
    still = run(status=copy.deepcopy(running), observed=Observed(job=job, pods=[
        failed, timed_pod("Running", "2026-01-01T12:00:00Z", index=1)]), now=T0 + dt.timedelta(minutes=7))
    assert still.status["accounting"]["runningSeconds"] == 420.0


def test_a_retry_waits_for_the_failed_runs_pods_to_stop_and_ends_its_time_at_their_exit() -> None:
    running = {"phase": "Running", "layout": LAYOUT.to_status(), "accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    failed = timed_pod("Failed", "2026-01-01T11:00:00Z", "2026-01-01T11:58:00Z")
    d = run(status=copy.deepcopy(running), observed=Observed(job=job_obj(failed=1), pods=[failed, pod("Pending")]))
    assert d.status["accounting"]["runningSeconds"] == 3480.0 and "runningSince" not in d.status["accounting"]
    # Another pod of the run is still being deleted and runs: its GPU is held, the stretch stays open.
    deleting = timed_pod("Running", "2026-01-01T11:00:00Z", index=1)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T11:58:01Z"
    held = run(status=copy.deepcopy(running), observed=Observed(job=job_obj(failed=1), pods=[failed, deleting]))
    assert held.status["phase"] == "Pending" and held.status["accounting"]["runningSince"] == "2026-01-01T11:00:00Z"
    # The retry's pod runs while that one still stops: the old stretch ends and the new one starts at this pass.
    retry = timed_pod("Running", "2026-01-01T12:00:30Z", index=0)
    both = run(status=held.status, observed=Observed(job=job_obj(failed=1), pods=[failed, deleting, retry]),
               now=T0 + dt.timedelta(minutes=1))
    acc = both.status["accounting"]
    assert both.status["phase"] == "Running" and acc["runningSeconds"] == 3660.0
    assert acc["runningSince"] == "2026-01-01T12:01:00Z"


def test_after_a_restart_running_time_resumes_at_the_new_containers_start_not_before_the_last_exit() -> None:
    status = {"phase": "Pending", "layout": LAYOUT.to_status(), "accounting": {"runningSeconds": 100.0}}
    failed = timed_pod("Failed", "2026-01-01T11:00:00Z", "2026-01-01T11:58:00Z")
    d = run(status=status, observed=Observed(job=job_obj(failed=1), pods=[
        failed, timed_pod("Running", "2026-01-01T11:59:00Z")]))
    assert d.status["accounting"]["runningSince"] == "2026-01-01T11:59:00Z"
    # A container that started before the last one exited (the previous stretch ran up to that exit).
    early = run(status=status, observed=Observed(job=job_obj(failed=1), pods=[
        failed, timed_pod("Running", "2026-01-01T11:57:00Z")]))
    assert early.status["accounting"]["runningSince"] == "2026-01-01T11:58:00Z"


def test_a_restart_between_two_passes_is_seen_as_one_stop_and_a_resume() -> None:
    """A busy operator's pass can come after a failed pod was replaced and its replacement runs: the pass before
    saw the run Running, this one sees it Running again. The gap is not billed and the resume is recorded."""
    status = {"phase": "Running", "layout": LAYOUT.to_status(), "accounting": {"runningSince": "2026-01-01T11:00:00Z"},
              "checkpoint": {"step": 40, "uri": "s3://out/run/checkpoints/step-40"}}
    failed = timed_pod("Failed", "2026-01-01T11:00:00Z", "2026-01-01T11:50:00Z")
    failed["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] = 1
    d = run(status=copy.deepcopy(status), observed=Observed(job=job_obj(failed=1), pods=[
        failed, timed_pod("Running", "2026-01-01T11:51:00Z", index=0)]))
    acc = d.status["accounting"]
    assert acc["runningSeconds"] == 3000.0 and acc["runningSince"] == "2026-01-01T11:51:00Z", acc
    assert d.status["resumedFromStep"] == 40 and "resuming from checkpoint step 40" in d.status["message"]
    assert "retry after failure" in d.status["message"]
    # One pod of two failed and was replaced while the other kept running: the run did not stop.
    d = run(status=copy.deepcopy(status), observed=Observed(job=job_obj(failed=1), pods=[
        failed, timed_pod("Running", "2026-01-01T11:51:00Z", index=1), timed_pod("Running", "2026-01-01T11:00:00Z")]))
    assert d.status["accounting"] == {"runningSince": "2026-01-01T11:00:00Z", "gpuHours": 1.0, "restarts": 1}, \
        d.status["accounting"]
    assert "resumedFromStep" not in d.status
    # A failure seen earlier (its exit before the open stretch began) is no restart now.
    seen = {**copy.deepcopy(status), "accounting": {"runningSince": "2026-01-01T11:52:00Z", "runningSeconds": 3000.0}}
    d = run(status=seen, observed=Observed(job=job_obj(failed=1), pods=[
        failed, timed_pod("Running", "2026-01-01T11:51:00Z")]))
    assert d.status["accounting"]["runningSince"] == "2026-01-01T11:52:00Z" and "resumedFromStep" not in d.status


def test_after_a_restart_running_time_resumes_at_the_pass_that_sees_it() -> None:
    """When the pods before record no exit, the stretch before may have been counted up to the pass that saw
    them gone: the new pod's own start time could fall before that pass and count the gap twice."""
    status = {"phase": "Pending", "layout": LAYOUT.to_status(), "accounting": {"runningSeconds": 100.0}}
    d = run(status=status, observed=Observed(job=job_obj(failed=1), pods=[
        pod("Failed", exit_code=1, created="2026-01-01T11:00:00Z"), timed_pod("Running", "2026-01-01T11:59:00Z")]))
    assert d.status["accounting"]["runningSince"] == "2026-01-01T12:00:00Z"


def test_finished_pods_before_job_completion_keep_running_not_pending() -> None:
    running = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
                  observed=Observed(job=job_obj(), pods=[pod("Running")])).status
    d = run(status=running, observed=Observed(job=job_obj(), pods=[pod("Succeeded")]))
    # Nothing to write for the moment between the pods' exit and the Job's completion: the status stays Running.
    assert d.status["phase"] == "Running" and d.status["reason"] == running["reason"] and not d.events, d.status
    assert not status_changed(running, d.status)
    assert cond_of(d.status, C.READY)["status"] == "True"
    # A pod that never started is still Pending, and a finished pod of a job that was not running is not "completing".
    assert run(status={"phase": "Running", "layout": LAYOUT.to_status()},
               observed=Observed(job=job_obj(), pods=[pod("Pending")])).status["phase"] == "Pending"
    assert run(status={"phase": "Pending", "layout": LAYOUT.to_status()},
               observed=Observed(job=job_obj(), pods=[pod("Succeeded")])).status["phase"] == "Pending"


def test_progress_is_folded_into_status() -> None:
    progress = {"version": 1, "phase": "training", "step": 40, "totalSteps": 100, "epoch": 0.4,
                "trainLoss": 1.9, "evalLoss": None, "tokens": 40960, "tokensPerSecond": 2100.0,
                "etaSeconds": 38.0, "checkpoint": {"step": 20, "uri": "s3://out/run/checkpoints/step-20"}}
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job_obj(), pods=[pod("Running")], progress=progress))
    assert d.status["progress"]["percent"] == 40.0 and d.status["progress"]["display"] == "40% (40/100)"
    assert d.status["metrics"]["trainLoss"] == 1.9 and "evalLoss" not in d.status["metrics"]
    assert d.status["checkpoint"] == {"step": 20, "uri": "s3://out/run/checkpoints/step-20"}
    assert d.status["accounting"]["tokens"] == 40960


def test_restart_after_checkpoint_records_resumed_step() -> None:
    status = {"phase": "Pending", "layout": LAYOUT.to_status(), "checkpoint": {"step": 60, "uri": "x"}}
    d = run(status=status, observed=Observed(job=job_obj(failed=1),
                                             pods=[pod("Failed", exit_code=1, created="2026-01-01T11:00:00Z"),
                                                   pod("Running")]))
    assert d.status["phase"] == "Running" and d.status["resumedFromStep"] == 60
    assert d.status["reason"] == R.RETRYING and d.status["accounting"]["restarts"] == 1


def test_succeeded_copies_summary_artifacts_and_metrics() -> None:
    summary = {"version": 1, "status": "Succeeded", "reason": "Completed", "message": "", "step": 100,
               "totalSteps": 100, "epoch": 1.0, "trainLoss": 1.2, "evalLoss": 1.3, "perplexity": 3.7,
               "tokens": 123456, "runtimeSeconds": 61.2, "tokensPerSecond": 2017.0,
               "artifacts": {"adapter": "s3://out/run/final/adapter", "merged": "", "model": "",
                             "metrics": "s3://out/run/final/metrics.json"},
               "checkpoint": {"step": 100, "uri": "s3://out/run/checkpoints/step-100"}}
    job = job_obj(conditions=[{"type": "Complete", "status": "True"}], completion="2026-01-01T12:05:00Z")
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status(),
                    "accounting": {"runningSince": "2026-01-01T12:00:00Z"}},
            observed=Observed(job=job, pods=[pod("Succeeded", summary=summary)]),
            now=T0 + dt.timedelta(minutes=5))
    st = d.status
    assert st["phase"] == "Succeeded" and st["completionTime"] == "2026-01-01T12:05:00Z"
    assert st["artifacts"] == {"adapter": "s3://out/run/final/adapter",
                               "metrics": "s3://out/run/final/metrics.json"}
    assert st["metrics"]["perplexity"] == 3.7 and st["accounting"]["tokens"] == 123456
    assert st["accounting"]["runningSeconds"] == 300.0 and "runningSince" not in st["accounting"]
    assert st["accounting"]["gpuHours"] == pytest.approx(300 / 3600, abs=1e-4)
    assert cond_of(st, C.SUCCEEDED)["status"] == "True" and cond_of(st, C.READY)["status"] == "True"
    assert ("Normal", R.COMPLETED) == d.events[0][:2]


def test_a_divergence_the_run_continued_past_is_a_condition_and_a_warning() -> None:
    """training.divergence.action warn: the job succeeds, and LossDiverged + a Warning Event say why to look."""
    text = "training loss diverged: the loss has stayed above 10 x its best smoothed value (0.4 at step 12)"
    summary = {"version": 1, "status": "Succeeded", "reason": "Completed", "message": text, "divergence": text,
               "step": 100, "totalSteps": 100, "artifacts": {}, "checkpoint": {"step": 100, "uri": ""}}
    job = job_obj(conditions=[{"type": "Complete", "status": "True"}], completion="2026-01-01T12:05:00Z")
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job, pods=[pod("Succeeded", summary=summary)]), now=T0 + dt.timedelta(minutes=5))
    assert d.status["phase"] == "Succeeded"
    diverged = cond_of(d.status, C.LOSS_DIVERGED)
    assert diverged["status"] == "True" and diverged["reason"] == R.DIVERGED_CONTINUED and text in diverged["message"]
    assert ("Warning", R.DIVERGED_CONTINUED) in [e[:2] for e in d.events]
    plain = {**summary, "message": "", "divergence": ""}
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job, pods=[pod("Succeeded", summary=plain)]), now=T0 + dt.timedelta(minutes=5))
    assert C.find_condition(d.status["conditions"], C.LOSS_DIVERGED) is None


def test_failed_job_reports_reason_and_pod_message() -> None:
    summary = {"version": 1, "status": "Failed", "reason": "DataError",
               "message": "/mnt/pvc/data/train.jsonl:7: not JSON"}
    job = job_obj(conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                               "message": "Job has reached the specified backoff limit"}], failed=4)
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job, pods=[pod("Failed", summary=summary, exit_code=1)]))
    st = d.status
    assert st["phase"] == "Failed" and st["reason"] == "BackoffLimitExceeded"
    assert "train.jsonl:7: not JSON" in st["message"] and "DataError" in st["message"]
    failed = cond_of(st, C.FAILED)
    assert failed["status"] == "True" and "train.jsonl:7" in failed["message"]
    assert d.events[0][0] == "Warning"


def test_failure_target_fails_at_once_without_a_retry_report() -> None:
    summary = {"version": 1, "status": "Failed", "reason": "DataError", "message": "train.jsonl:7: not JSON"}
    job = job_obj(conditions=[{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy",
                               "message": "Container trainer for pod ns/demo-trainer-0 failed with exit code 3"}],
                  failed=1)
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job, pods=[pod("Failed", summary=summary, exit_code=3)]))
    assert d.status["phase"] == "Failed" and d.status["reason"] == "DataError", d.status
    assert "train.jsonl:7" in d.status["message"] and "not retried" in d.status["message"]
    assert all(reason != "PodFailedRetrying" for _, reason, *_ in d.events), d.events


def test_success_criteria_met_completes() -> None:
    job = job_obj(conditions=[{"type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached"}])
    d = run(status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job, pods=[pod("Succeeded")]))
    assert d.status["phase"] == "Succeeded", d.status


def test_suspend_patches_job_and_resume_unsuspends() -> None:
    spec = {**SPEC, "suspend": True}
    d = run(spec=spec, status={"phase": "Running", "layout": LAYOUT.to_status(),
                               "accounting": {"runningSince": "2026-01-01T11:00:00Z"}},
            observed=Observed(job=job_obj(spec), pods=[pod("Running")]))
    assert [(a.kind, a.value) for a in d.actions] == [("suspend_job", True)]
    # The pod still runs (it checkpoints on SIGTERM and holds its GPU until it exits): its time still counts.
    assert d.status["phase"] == "Suspended" and "stopping" in d.status["message"]
    assert d.status["accounting"]["runningSince"] == "2026-01-01T11:00:00Z"
    assert d.status["accounting"]["gpuHours"] == pytest.approx(1.0)
    # The pass after the container exited, 2 minutes later: the time ends at the exit, not at this pass.
    exited = timed_pod("Failed", "2026-01-01T11:00:00Z", "2026-01-01T12:00:45Z")
    stopped = run(spec=spec, status=d.status, observed=Observed(job=job_obj(spec, suspend=True), pods=[exited]),
                  now=T0 + dt.timedelta(minutes=2))
    assert stopped.status["accounting"]["runningSeconds"] == 3645.0, stopped.status["accounting"]
    assert "runningSince" not in stopped.status["accounting"] and "stopped" in stopped.status["message"]
    # Gone without a trace (the pod object deleted): the time ends at the pass that sees it gone.
    gone = run(spec=spec, status=d.status, observed=Observed(job=job_obj(spec, suspend=True)),
               now=T0 + dt.timedelta(minutes=1))
    assert gone.status["accounting"]["runningSeconds"] == 3660.0
    d2 = run(status=stopped.status, observed=Observed(job=job_obj(suspend=True)))
    assert [(a.kind, a.value) for a in d2.actions] == [("suspend_job", False)]
    assert d2.status["phase"] == "Pending"


def test_spec_change_while_suspended_recreates_job() -> None:
    changed = {**SPEC, "suspend": True, "training": {"maxSteps": 200, "learningRate": "2e-4"}}
    d = run(spec=changed, status={"phase": "Suspended", "layout": LAYOUT.to_status()},
            observed=Observed(job=job_obj(SPEC, suspend=True)))
    assert [a.kind for a in d.actions] == ["delete_job"] and d.status["reason"] == R.RECREATING


def test_cancel_deletes_job_and_is_terminal() -> None:
    spec = {**SPEC, "cancel": True}
    d = run(spec=spec, status={"phase": "Running", "layout": LAYOUT.to_status()},
            observed=Observed(job=job_obj(spec), pods=[pod("Running")]))
    assert [a.kind for a in d.actions] == ["delete_job"]
    assert d.status["phase"] == "Cancelled" and d.status["completionTime"]
    d2 = run(spec=spec, status=d.status, observed=Observed())
    assert d2.status["phase"] == "Cancelled" and not d2.actions and not d2.events


def test_a_cancelled_runs_gpu_time_counts_until_its_pods_have_stopped() -> None:
    """The Job is deleted in the foreground; its pods stop (a checkpoint on SIGTERM) with their GPUs held, and the
    Running stretch ends at their last exit, not at the pass that cancelled."""
    spec = {**SPEC, "cancel": True}
    started = {"name": "trainer", "state": {"running": {"startedAt": "2026-01-01T11:00:00Z"}}}
    stopping = {**pod("Running"), "status": {"phase": "Running", "containerStatuses": [started]}}
    status = {"phase": "Running", "layout": LAYOUT.to_status(), "accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    d = run(spec=spec, status=status, observed=Observed(job=job_obj(spec), pods=[stopping]))
    assert [(a.kind, a.foreground) for a in d.actions] == [("delete_job", True)]
    assert d.status["phase"] == "Cancelled" and d.status["accounting"]["runningSince"] == "2026-01-01T11:00:00Z"
    assert "its pods are stopping (their GPU time counts until they exit)" in d.status["message"]
    deleting = job_obj(spec)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    later = T0 + dt.timedelta(seconds=30)
    still = run(spec=spec, status=d.status, observed=Observed(job=deleting, pods=[stopping]), now=later)
    assert not still.actions and still.retry_after == 5.0  # deleting already: no second delete
    assert still.status["accounting"]["gpuHours"] == pytest.approx(1.0 + 30 / 3600, abs=1e-4)
    exited = {"name": "trainer", "state": {"terminated": {"exitCode": 75, "startedAt": "2026-01-01T11:00:00Z",
                                                          "finishedAt": "2026-01-01T12:00:20Z"}}}
    done = run(spec=spec, status=still.status, observed=Observed(
        job=deleting, pods=[{**stopping, "status": {"phase": "Failed", "containerStatuses": [exited]}}]),
        now=T0 + dt.timedelta(seconds=40))
    acc = done.status["accounting"]
    assert "runningSince" not in acc and acc["runningSeconds"] == 3620.0 and done.retry_after is None
    assert done.status["message"].endswith("its pods have stopped") and done.status["phase"] == "Cancelled"
    # Pods gone without a record of their exit: the stretch ends at the pass that sees them gone.
    gone = run(spec=spec, status=still.status, observed=Observed(), now=T0 + dt.timedelta(seconds=50))
    assert gone.status["accounting"]["runningSeconds"] == 3650.0


def test_terminal_phase_is_sticky_and_ttl_deletes_children() -> None:
    spec = {**SPEC, "ttlSecondsAfterFinished": 60}
    done = {"phase": "Succeeded", "completionTime": "2026-01-01T12:00:00Z", "layout": LAYOUT.to_status()}
    early = run(spec=spec, status=done, observed=Observed(job=job_obj(spec), children_exist=True),
                now=T0 + dt.timedelta(seconds=30))
    assert early.status["phase"] == "Succeeded" and not early.actions and early.retry_after == 30
    late = run(spec=spec, status=done, observed=Observed(job=job_obj(spec), children_exist=True),
               now=T0 + dt.timedelta(seconds=61))
    assert [a.kind for a in late.actions] == ["delete_children"] and late.status["childrenDeleted"]
    assert late.events[0][1] == R.TTL_EXPIRED


def test_pending_pod_surfaces_scheduler_message() -> None:
    p = pod("Pending")
    p["status"]["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                  "message": "0/6 nodes are available: 6 Insufficient nvidia.com/gpu."}]
    d = run(status={"phase": "Pending", "layout": LAYOUT.to_status()}, observed=Observed(job=job_obj(), pods=[p]))
    assert "Insufficient nvidia.com/gpu" in d.status["message"]


def test_observed_generation_and_status_changed() -> None:
    d = run(observed=fits(), generation=7)
    assert d.status["observedGeneration"] == 7
    assert all(c["observedGeneration"] == 7 for c in d.status["conditions"])
    assert status_changed({}, d.status)
    same = copy.deepcopy(d.status)
    same.setdefault("progress", {})["updatedAt"] = "later"
    d.status.setdefault("progress", {})
    assert not status_changed(d.status, same)


def test_running_gpu_hours_alone_do_not_rewrite_the_status() -> None:
    """A resync a few seconds later only moves accounting.gpuHours: no write (it is written with the next
    real change); any real change is still a change."""
    running = {"phase": "Running", "reason": "PodsRunning", "layout": LAYOUT.to_status(),
               "accounting": {"runningSince": "2026-01-01T11:00:00Z"}}
    pods = [pod("Running", 0)]
    first = run(status=running, observed=Observed(job=job_obj(), pods=pods))
    later = run(status=first.status, observed=Observed(job=job_obj(), pods=pods), now=T0 + dt.timedelta(seconds=30))
    assert later.status["accounting"]["gpuHours"] > first.status["accounting"]["gpuHours"]
    assert not status_changed(first.status, later.status)
    moved = copy.deepcopy(later.status)
    moved["progress"] = {"step": 3}
    assert status_changed(first.status, moved)


def test_merge_patch_nulls_removed_keys() -> None:
    old = {"phase": "Running", "accounting": {"runningSince": "t", "tokens": 5}, "conditions": [1]}
    new = {"phase": "Succeeded", "accounting": {"tokens": 5, "runningSeconds": 3.0}, "conditions": [1, 2]}
    assert merge_patch(old, new) == {"phase": "Succeeded", "conditions": [1, 2],
                                     "accounting": {"runningSince": None, "runningSeconds": 3.0}}


def test_rank0_address_picks_newest_running_index0() -> None:
    pods = [pod("Running", 0, created="2026-01-01T10:00:00Z", ip="10.0.0.1"),
            pod("Running", 0, created="2026-01-01T11:00:00Z", ip="10.0.0.2"),
            pod("Running", 1, created="2026-01-01T12:00:00Z", ip="10.0.0.3")]
    assert rank0_address(pods) == "10.0.0.2"


def test_layout_from_resources_resolves_strategy() -> None:
    spec = parse_spec({**SPEC, "method": "full",
                       "resources": {"gpuType": "NVIDIA-H100-80GB-HBM3", "gpusPerPod": 8, "pods": 2}})
    lay = layout_from_resources(spec)
    assert (lay.strategy, lay.zero_stage, lay.total_gpus, lay.source) == ("deepspeed", 2, 16, "spec")
    single = layout_from_resources(parse_spec({**SPEC, "resources": {"gpusPerPod": 0, "pods": 1, "cpu": "2"}}))
    assert (single.strategy, single.procs_per_node, single.node_selector) == ("none", 1, {})


@pytest.mark.parametrize("status, ttl, acting", [
    ({}, 0, True),  # never reconciled yet
    ({"phase": "Running"}, 0, True),
    ({"phase": "Cancelled"}, 0, True),  # its Job may still need deleting
    ({"phase": "Succeeded"}, 0, False),
    ({"phase": "Failed"}, 60, True),  # TTL clean-up pending
    ({"phase": "Succeeded", "childrenDeleted": True}, 60, False),
])
def test_still_acting_covers_active_cancelled_and_ttl_pending_jobs(status, ttl, acting) -> None:
    assert still_acting(status, ttl) is acting
