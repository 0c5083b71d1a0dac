"""The failure taxonomy shared by contract: the trainer's reasons and exit codes (kubetune_trainer.outcomes) and
the operator's copy (kubetune.reasons) agree; the Job's pod failure policy fails at once on permanent codes and
does not count preemption; the status says "failed, not retried" for a permanent failure and "resuming" after a
preemption, never "retrying"."""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, JobRef, build_children, pod_failure_policy, spec_hash
from kubetune.grace import checkpoint_bytes, termination_grace_seconds
from kubetune.reconcile import Observed, decide
from kubetune.sizing.layout import Layout

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.timezone.utc)
SPEC = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://data/train.jsonl"},
        "method": "lora", "training": {"maxSteps": 100}, "output": {"uri": "s3://out/run"}, "backoffLimit": 3}
LAYOUT = Layout(gpu_type="NVIDIA-L4", gpus_per_pod=1, pods=1, strategy="none")


def test_operator_copy_of_the_trainer_taxonomy_agrees():
    outcomes = pytest.importorskip("kubetune_trainer.outcomes")
    assert R.TRAINER_EXIT_CODES == outcomes.EXIT_CODES
    assert R.PERMANENT_TRAINER_REASONS == outcomes.PERMANENT_REASONS
    assert R.PREEMPTED_EXIT_CODE == outcomes.PREEMPTED_EXIT
    assert R.PERMANENT_EXIT_CODES == outcomes.PERMANENT_EXIT_CODES
    assert R.REPLAN_TRAINER_REASONS == outcomes.REPLAN_REASONS
    assert R.REPLAN_EXIT_CODES == outcomes.REPLAN_EXIT_CODES
    assert set(R.PERMANENT_FAILURE_FIXES) == set(R.PERMANENT_TRAINER_REASONS)
    # An exit code means one thing: permanent codes are never shared with a retried reason.
    retried = {c for r, c in R.TRAINER_EXIT_CODES.items() if r not in R.PERMANENT_TRAINER_REASONS}
    assert not retried & set(R.PERMANENT_EXIT_CODES)


def test_pod_failure_policy_fails_permanent_codes_and_ignores_preemption():
    rules = pod_failure_policy()["rules"]
    fail = [r for r in rules if r["action"] == "FailJob"]
    assert fail[0]["onExitCodes"]["values"] == sorted(R.PERMANENT_EXIT_CODES + R.REPLAN_EXIT_CODES)
    assert fail[0]["onExitCodes"]["values"] == [3, 4, 5, 6, 7, 8, 9]
    ignore_codes = [r["onExitCodes"]["values"] for r in rules if r["action"] == "Ignore" and "onExitCodes" in r]
    assert ignore_codes == [[75]]
    assert {"type": "DisruptionTarget"} in [c for r in rules for c in r.get("onPodConditions", [])]
    assert all(r["onExitCodes"]["containerName"] == "trainer" for r in rules if "onExitCodes" in r)


def test_grace_period_covers_a_checkpoint_of_the_sized_plan():
    plan = {"estimate": {"trainableParams": 1_000_000_000}}
    assert checkpoint_bytes(plan) == 12_000_000_000
    assert termination_grace_seconds(plan, base_seconds=60, write_bytes_per_second=100_000_000) == 60 + 120
    assert termination_grace_seconds(None, base_seconds=60, write_bytes_per_second=1) == 60
    job = build_children(JobRef("demo", "ns", "uid"), SPEC, parse_spec(SPEC), LAYOUT, BuildConfig(),
                         plan_status=plan)[-1]
    seconds = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert seconds == 60 + -(-12_000_000_000 // (100 * 1024 * 1024))


def _job(conditions=None, failed=0):
    job = copy.deepcopy(build_children(JobRef("demo", "ns", "uid-1"), SPEC, parse_spec(SPEC), LAYOUT,
                                       BuildConfig())[-1])
    job["metadata"]["uid"] = "job-uid"
    job["status"] = {"conditions": conditions or [], "failed": failed}
    return job


def _pod(phase, *, code=None, summary=None, created="2026-01-01T12:00:00Z", name=None):
    status = {"phase": phase}
    if code is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": {
            "exitCode": code, "reason": "Error", "message": json.dumps(summary) if summary else ""}}}]
    return {"metadata": {"name": name or f"demo-trainer-0-{phase.lower()}", "creationTimestamp": created,
                         "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                         "ownerReferences": [{"uid": "job-uid"}]}, "status": status}


def _decide(status, observed):
    return decide(name="demo", generation=1, labels={}, spec=parse_spec(SPEC), spec_hash=spec_hash(SPEC),
                  status=copy.deepcopy(status), observed=observed, now=T0)


@pytest.mark.parametrize("reason,code", [("NoSpaceLeft", 7), ("NonFiniteLoss", 4), ("PermissionDenied", 6),
                                         ("Diverged", 5), ("UnsupportedModel", 8), ("InvalidPlan", 3)])
def test_permanent_failure_is_reported_at_once_and_once(reason, code):
    summary = {"version": 1, "status": "Failed", "reason": reason, "message": "what went wrong", "step": 14}
    failed_pod = _pod("Failed", code=code, summary=summary)
    running = {"phase": "Running", "layout": LAYOUT.to_status()}
    # The pod failed; the Job controller has not applied its pod failure policy yet.
    d = _decide(running, Observed(job=_job(failed=1), pods=[failed_pod]))
    assert d.status["phase"] == "Failed" and d.status["reason"] == reason, d.status
    assert "not retried" in d.status["message"] and "what went wrong" in d.status["message"]
    assert R.PERMANENT_FAILURE_FIXES[reason] in d.status["message"]
    assert C.find_condition(d.status["conditions"], C.FAILED)["reason"] == reason
    assert [e[:2] for e in d.events] == [("Warning", reason)]
    assert all(e[1] != R.RETRYING for e in d.events)
    # Then the Job is marked failed by the policy: same phase and reason, so no second Event.
    job = _job(conditions=[{"type": "FailureTarget", "status": "True", "reason": "PodFailurePolicy",
                            "message": f"Container trainer failed with exit code {code}"}], failed=1)
    again = _decide(d.status, Observed(job=job, pods=[failed_pod]))
    assert again.status["reason"] == reason and not again.events


def test_preempted_pod_resumes_without_a_retry_warning():
    summary = {"version": 1, "status": "Failed", "reason": "Preempted", "step": 37,
               "message": "stopped by SIGTERM at step 37 after writing checkpoint step-37",
               "checkpoint": {"step": 37, "uri": "s3://out/run/checkpoints/step-37"}}
    pods = [_pod("Failed", code=75, summary=summary, created="2026-01-01T11:00:00Z"),
            _pod("Pending", name="demo-trainer-0-new")]
    d = _decide({"phase": "Running", "layout": LAYOUT.to_status()}, Observed(job=_job(), pods=pods))
    assert d.status["phase"] == "Pending" and d.status["reason"] == R.PREEMPTED_RESUMING, d.status
    assert "resuming after preemption" in d.status["message"] and "step 37" in d.status["message"]
    assert [e[:2] for e in d.events] == [("Normal", R.PREEMPTED_RESUMING)]
    # A retried (not permanent, not preempted) failure still says so.
    other = [_pod("Failed", code=1, created="2026-01-01T11:00:00Z"), _pod("Pending", name="demo-trainer-0-new")]
    d = _decide({"phase": "Running", "layout": LAYOUT.to_status()}, Observed(job=_job(failed=1), pods=other))
    assert d.status["reason"] == R.RETRYING


def test_a_divergence_reported_with_action_warn_reaches_the_succeeded_message():
    summary = {"version": 1, "status": "Succeeded", "reason": "Completed", "step": 30, "totalSteps": 30,
               "message": "training loss diverged: the loss has stayed above 10 x its best smoothed value 1.2 "
                          "(step 4) for 10 steps, up to 74 at step 19 (smoothed 60.1)"}
    pod = _pod("Succeeded", code=0, summary=summary)
    job = _job(conditions=[{"type": "Complete", "status": "True"}])
    d = _decide({"phase": "Running", "layout": LAYOUT.to_status()}, Observed(job=job, pods=[pod]))
    assert d.status["phase"] == "Succeeded"
    assert "training finished at step 30 (training loss diverged" in d.status["message"]
    assert "up to 74 at step 19" in C.find_condition(d.status["conditions"], C.SUCCEEDED)["message"]


def test_operator_flags_set_the_grace_period_settings():
    from kubetune.main import build_parser, operator_config

    default = operator_config(build_parser().parse_args([])).build
    assert (default.termination_grace_base_seconds, default.checkpoint_write_bytes_per_second) == (60, 100 * 2 ** 20)
    cfg = operator_config(build_parser().parse_args(["--termination-grace-base-seconds", "120",
                                                     "--checkpoint-write-mib-per-second", "500"])).build
    assert (cfg.termination_grace_base_seconds, cfg.checkpoint_write_bytes_per_second) == (120, 500 * 2 ** 20)
    plan = {"estimate": {"trainableParams": 1_000_000_000}}
    job = build_children(JobRef("demo", "ns", "uid"), SPEC, parse_spec(SPEC), LAYOUT, cfg, plan_status=plan)[-1]
    seconds = job["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert seconds == 120 + -(-12_000_000_000 // (500 * 2 ** 20))
