"""Settings other trainers' configs carry (training.warmupSteps / logEverySteps / checkpointStrategy /
keepCheckpoints, dataset.chatTemplate / promptTemplate, optimizer aliases): the spec model, the plan the builders
write, the trainer's plan model and the CRD agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune import api
from kubetune.builders import JobRef, build_plan
from kubetune.sizing.layout import layout_from_resources
from kubetune_trainer import plan as trainer_plan
from kubetune_trainer.data import chat_templates
from kubetune_trainer.errors import PlanError

pytestmark = pytest.mark.unit

CRD = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"
BASE = {"model": {"uri": "hf://org/m"}, "dataset": {"uri": "pvc://d/t.jsonl"}, "method": "lora",
        "output": {"uri": "pvc://o/run"}, "training": {"epochs": 1}}


def _spec(**blocks) -> dict:
    spec = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE.items()}
    for block, values in blocks.items():
        spec[block] = {**spec.get(block, {}), **values}
    return spec


def _plan(spec: dict) -> dict:
    typed = api.parse_spec(spec)
    return build_plan(JobRef("j", "ns", "uid"), typed, layout_from_resources(typed))


def _crd_spec() -> dict:
    doc = yaml.safe_load(CRD.read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_a_job_without_the_new_fields_gets_the_same_plan_keys_as_before():
    plan = _plan(_spec())
    for key in ("warmupSteps", "checkpointStrategy", "keepCheckpoints", "logEverySteps"):
        assert key not in plan["training"]
    assert plan["training"]["warmupRatio"] == 0.03
    assert set(plan["dataset"]) == {"uri", "format", "evalUri", "evalSplit"}
    parsed = trainer_plan.parse_plan(plan)
    assert parsed.training.keep_checkpoints == 2 and parsed.training.checkpoint_strategy == "steps"
    assert parsed.training.warmup_steps is None and parsed.dataset.chat_template == ""


def test_the_new_fields_reach_the_trainer_plan():
    spec = _spec(training={"warmupSteps": 10, "checkpointStrategy": "epoch", "keepCheckpoints": 5,
                           "logEverySteps": 7, "optimizer": "adamw_bnb_8bit"},
                 dataset={"chatTemplate": "llama3"})
    plan = _plan(spec)
    t = plan["training"]
    assert (t["warmupSteps"], t["checkpointStrategy"], t["keepCheckpoints"], t["logEverySteps"]) == (10, "epoch", 5, 7)
    assert "warmupRatio" not in t and t["optimizer"] == "adamw_8bit"
    assert plan["dataset"]["chatTemplate"] == "llama3"
    parsed = trainer_plan.parse_plan(plan)
    assert parsed.training.warmup_steps == 10 and parsed.training.log_every_steps == 7
    assert parsed.dataset.chat_template == "llama3"


def test_prompt_template_reaches_the_plan():
    template = {"prompt": "Q: {question}\nA: ", "completion": "{answer}"}
    plan = _plan(_spec(dataset={"promptTemplate": template}))
    assert plan["dataset"]["promptTemplate"] == template
    assert trainer_plan.parse_plan(plan).dataset.prompt_template.prompt == template["prompt"]


@pytest.mark.parametrize("alias,canonical", sorted(api.OPTIMIZER_ALIASES.items()))
def test_optimizer_aliases_become_the_canonical_name(alias, canonical):
    assert api.parse_spec(_spec(training={"optimizer": alias})).training.optimizer == canonical
    assert trainer_plan.TrainingPlan(epochs=1, optimizer=alias).optimizer == canonical


def test_the_alias_tables_agree_everywhere():
    assert trainer_plan.OPTIMIZER_ALIASES == api.OPTIMIZER_ALIASES
    assert set(api.OPTIMIZER_ALIASES.values()) <= set(api.OPTIMIZERS)
    optimizer = _crd_spec()["properties"]["training"]["properties"]["optimizer"]
    (rule,) = optimizer["x-kubernetes-validations"]
    assert re.findall(r"'([a-z0-9_]+)'", rule["rule"]) == list(api.OPTIMIZERS)
    for table in re.findall(r"\{[^}]*\}", rule["messageExpression"]):
        assert dict(re.findall(r"'([a-z0-9_]+)': '([a-z0-9_]+)'", table)) == api.OPTIMIZER_ALIASES


def test_chat_template_names_agree_everywhere():
    assert tuple(chat_templates.NAMED_TEMPLATES) == api.CHAT_TEMPLATE_NAMES
    (rule,) = _crd_spec()["properties"]["dataset"]["properties"]["chatTemplate"]["x-kubernetes-validations"]
    listed = re.search(r"self in \[([^\]]*)\]", rule["rule"]).group(1)
    assert tuple(re.findall(r"'([a-z0-9]+)'", listed)) == api.CHAT_TEMPLATE_NAMES


def test_unknown_optimizer_and_both_warmups_are_refused():
    with pytest.raises(ValidationError, match="optimizer"):
        api.parse_spec(_spec(training={"optimizer": "adafactor"}))
    with pytest.raises(ValidationError, match="only one of spec.training.warmupSteps"):
        api.parse_spec(_spec(training={"warmupSteps": 5, "warmupRatio": 0.1}))
    plan = _plan(_spec(training={"warmupSteps": 5}))
    plan["training"]["warmupRatio"] = 0.1
    with pytest.raises(PlanError, match="training: .*only one of warmupSteps or warmupRatio"):
        trainer_plan.parse_plan(plan)


def test_chat_template_must_be_a_name_or_jinja():
    with pytest.raises(ValidationError, match="neither a built-in template"):
        api.parse_spec(_spec(dataset={"chatTemplate": "vicuna"}))
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert api.parse_spec(_spec(dataset={"chatTemplate": inline})).dataset.chat_template == inline


def test_the_trainer_refuses_prompt_and_chat_template_together():
    plan = _plan(_spec(dataset={"chatTemplate": "chatml"}))
    plan["dataset"]["promptTemplate"] = {"prompt": "{q}", "completion": "{a}"}
    with pytest.raises(PlanError, match="chatTemplate and promptTemplate exclude each other"):
        trainer_plan.parse_plan(plan)


# ----------------------------------------------------------------------------- spec.tracking (MLflow)

TRACKING = {"mlflow": {"trackingUri": "http://mlflow.mlflow.svc:5000", "experiment": "support-bot",
                       "credentialsSecretRef": {"name": "mlflow-creds"}}}


def test_tracking_reaches_the_plan_without_credentials_and_the_pod_gets_them_from_the_secret():
    from kubetune.builders import BuildConfig, build_job

    spec = _spec()
    spec["tracking"] = TRACKING
    plan = _plan(spec)
    assert plan["tracking"] == {"mlflow": {"trackingUri": "http://mlflow.mlflow.svc:5000", "experiment": "support-bot",
                                           "runName": "j"}, "required": False}
    assert trainer_plan.parse_plan(plan).tracking.mlflow.run_name == "j"
    typed = api.parse_spec(spec)
    job = build_job(JobRef("j", "ns", "uid"), typed, layout_from_resources(typed), BuildConfig())
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-creds", "key": key, "optional": True}
    assert "tracking" not in _plan(_spec())  # jobs without tracking keep their plan shape


def test_tracking_status_and_condition():
    from kubetune import reasons as R
    from kubetune.tracking_status import tracking_status, tracking_verdict

    block = {"runId": "abc", "url": "http://m/#/experiments/1/runs/abc"}
    assert tracking_status(block) == block and tracking_status(None) == {}
    assert tracking_verdict(block) == (True, R.TRACKING_LOGGED, "MLflow run abc: http://m/#/experiments/1/runs/abc")
    ok, reason, message = tracking_verdict(None, "early stopping at step 3; MLflow tracking at http://m failed while "
                                                 "creating the run: refused; training continues without tracking")
    assert not ok and reason == R.TRACKING_UNAVAILABLE
    assert message.startswith("MLflow tracking at http://m failed") and "training was not affected" in message
