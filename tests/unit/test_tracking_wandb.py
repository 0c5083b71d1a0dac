"""spec.tracking.wandb: the plan carries the W&B project without the API key, which reaches the pod as WANDB_API_KEY
from the Secret; the trainer's summary block reaches status.tracking.wandb and the Tracked condition covers it (both
trackers must have a run for Tracked True)."""

from __future__ import annotations

import json

import pytest

from kubetune import api
from kubetune import conditions as C
from kubetune import reasons as R
from kubetune.builders import BuildConfig, JobRef, build_job, build_plan
from kubetune.sizing.layout import layout_from_resources
from kubetune.status import checked_status
from kubetune.tracking_status import tracking_status, tracking_verdict
from kubetune_trainer import plan as trainer_plan
from kubetune_trainer.errors import PlanError
from kubetune_trainer.summary import build_summary, encode_summary
from tests.unit.test_tracking_status import SPEC, complete

pytestmark = pytest.mark.unit

WANDB = {"project": "support-bot", "entity": "ml-team", "apiKeySecretRef": {"name": "wandb-key"}}
MLFLOW_RUN = {"runId": "0123abcd", "url": "http://mlflow:5000/#/experiments/1/runs/0123abcd"}
OFFLINE = {"runId": "k5ndn00t", "url": "", "mode": "offline", "warning": "",
           "runDir": "s3://out/run/wandb/offline-run-20260101_120000-k5ndn00t"}
ONLINE = {"runId": "k5ndn00t", "url": "https://wandb.example/ml-team/support-bot/runs/k5ndn00t", "mode": "online",
          "runDir": "", "warning": ""}
WANDB_WARNING = ("W&B tracking (online, project ml-team/support-bot) failed while creating the run: CommError: Timed "
                 "out while retrying; training continues without tracking")


def _spec(tracking: dict) -> dict:
    return {**SPEC, "tracking": tracking}


def _plan_and_env(spec: dict) -> tuple[dict, dict]:
    typed = api.parse_spec(spec)
    ref = JobRef("j", "ns", "uid")
    job = build_job(ref, typed, layout_from_resources(typed), BuildConfig())
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return build_plan(ref, typed, layout_from_resources(typed)), env


def test_the_plan_names_the_project_and_the_key_comes_from_the_secret():
    plan, env = _plan_and_env(_spec({"wandb": WANDB}))
    assert plan["tracking"] == {"wandb": {"project": "support-bot", "entity": "ml-team", "runName": "j",
                                          "mode": "online"}, "required": False}
    assert "wandb-key" not in json.dumps(plan)  # the key's whereabouts stay in the pod spec
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "wandb-key", "key": "apiKey"}
    assert not [name for name in env if name.startswith("MLFLOW_")]
    parsed = trainer_plan.parse_plan(plan).tracking
    assert (parsed.wandb.project, parsed.wandb.run_name, parsed.mlflow) == ("support-bot", "j", None)


def test_offline_needs_no_key_and_both_trackers_can_be_named():
    tracking = {"wandb": {"project": "p", "runName": "r1", "mode": "offline",
                          "apiKeySecretRef": {"name": "k", "key": "token"}},
                "mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "e"}, "required": True}
    plan, env = _plan_and_env(_spec(tracking))
    assert plan["tracking"] == {"mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "e", "runName": "j"},
                                "wandb": {"project": "p", "entity": "", "runName": "r1", "mode": "offline"},
                                "required": True}
    assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "k", "key": "token"}
    _, env = _plan_and_env(_spec({"wandb": {"project": "p", "mode": "offline"}}))
    assert "WANDB_API_KEY" not in env


def test_spec_and_plan_agree_on_the_defaults():
    spec, plan = api.WandbSpec(project="p"), trainer_plan.WandbPlan(project="p")
    assert (spec.entity, spec.run_name, spec.mode) == (plan.entity, plan.run_name, plan.mode) == ("", "", "online")
    assert api.WandbKeyRef(name="k").key == "apiKey"


@pytest.mark.parametrize("wandb,needle", [({"project": ""}, "project"), ({"project": "p", "mode": "cloud"}, "mode"),
                                          ({"project": "p", "apiKey": "secret"}, "apiKey")])
def test_the_trainer_refuses_a_bad_wandb_block(wandb, needle):
    plan, _ = _plan_and_env(_spec({"wandb": {"project": "p"}}))
    plan["tracking"]["wandb"] = wandb
    with pytest.raises(PlanError, match=needle):
        trainer_plan.parse_plan(plan)


def test_the_summary_carries_the_wandb_run():
    summary = build_summary(status="Succeeded", reason="Completed",
                            tracking={"runId": "", "url": "", "warning": "", "wandb": OFFLINE})
    assert summary["tracking"] == {"runId": "", "url": "", "wandb": {
        "runId": "k5ndn00t", "url": "", "runDir": OFFLINE["runDir"]}}
    assert json.loads(encode_summary(summary))["tracking"] == summary["tracking"]
    failed = build_summary(status="Succeeded", reason="Completed",
                           tracking={"runId": "", "url": "", "warning": "x", "wandb": {**OFFLINE, "runId": ""}})
    assert "tracking" not in failed


def test_status_and_verdict():
    block = {**MLFLOW_RUN, "wandb": {"runId": "k5ndn00t", "url": "", "runDir": OFFLINE["runDir"]}}
    assert tracking_status(block) == {**MLFLOW_RUN, "wandb": {"runId": "k5ndn00t", "runDir": OFFLINE["runDir"]}}
    ok, reason, message = tracking_verdict(block, mlflow=True, wandb=True)
    assert ok and reason == R.TRACKING_LOGGED
    assert message == (f"MLflow run 0123abcd: {MLFLOW_RUN['url']}; W&B run k5ndn00t: offline run files at "
                       f"{OFFLINE['runDir']} (upload them with `wandb sync`)")
    ok, reason, message = tracking_verdict({"runId": "", "url": "", "wandb": {"runId": "k5ndn00t",
                                                                              "url": ONLINE["url"]}}, wandb=True,
                                           mlflow=False)
    assert ok and message == f"W&B run k5ndn00t: {ONLINE['url']}"
    # MLflow logged, W&B did not: not tracked, the W&B warning first, the MLflow run still named
    ok, reason, message = tracking_verdict(MLFLOW_RUN, "early stopping at step 3; " + WANDB_WARNING,
                                           mlflow=True, wandb=True)
    assert not ok and reason == R.TRACKING_UNAVAILABLE
    assert message.startswith(WANDB_WARNING.split("; ")[0]) and message.endswith(f"MLflow run 0123abcd: "
                                                                                   f"{MLFLOW_RUN['url']}")
    ok, _, message = tracking_verdict(MLFLOW_RUN, "", mlflow=True, wandb=True)
    assert not ok and message.startswith("the trainer reported no W&B run")


def test_the_wandb_run_reaches_the_status_and_the_tracked_condition():
    spec = _spec({"wandb": {"project": "p", "mode": "offline"}})
    d = complete({"runId": "", "url": "", "wandb": {"runId": "k5ndn00t", "url": "", "runDir": OFFLINE["runDir"]}},
                 spec=spec)
    assert d.status["phase"] == "Succeeded"
    assert d.status["tracking"] == {"wandb": {"runId": "k5ndn00t", "runDir": OFFLINE["runDir"]}}
    tracked = C.find_condition(d.status["conditions"], C.TRACKED)
    assert tracked["status"] == "True" and tracked["reason"] == R.TRACKING_LOGGED and "wandb sync" in tracked["message"]
    checked_status(d.status)  # the status model (and so the CRD's status schema) accepts it


def test_an_unreachable_wandb_server_is_a_warning_condition_not_a_failure():
    spec = _spec({"wandb": {"project": "p", "apiKeySecretRef": {"name": "k"}},
                  "mlflow": {"trackingUri": "http://mlflow:5000", "experiment": "exp"}})
    d = complete(MLFLOW_RUN, message=WANDB_WARNING, spec=spec)
    assert d.status["phase"] == "Succeeded" and d.status["tracking"] == MLFLOW_RUN
    tracked = C.find_condition(d.status["conditions"], C.TRACKED)
    assert tracked["status"] == "False" and tracked["reason"] == R.TRACKING_UNAVAILABLE
    assert "Timed out while retrying" in tracked["message"] and "training was not affected" in tracked["message"]
    assert ("Warning", R.TRACKING_UNAVAILABLE, tracked["message"]) in d.events
