"""spec.training.masterWeights / optimizerInBackward / activationOffloading: CRD schema, typed spec, plan rendering
(written only when set, so older trainer images keep reading default plans) and the trainer's plan checks."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from kubetune.api import TrainingSpec, parse_spec
from kubetune.builders import SPEED_FIELD_DEFAULTS, JobRef, build_plan
from kubetune.sizing.layout import layout_from_resources
from kubetune_trainer.errors import PlanError
from kubetune_trainer.plan import TrainingPlan, parse_plan

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "kubetune.io_finetunejobs.yaml"
CASE = REPO / "tests" / "data" / "builders" / "cpu-quickstart" / "input.yaml"
FIELDS = {"masterWeights": "auto", "optimizerInBackward": None, "activationOffloading": False}


def _plan(method: str | None = None, **training) -> dict:
    spec = yaml.safe_load(CASE.read_text())["spec"]
    spec["training"] = {**spec.get("training", {}), **training}
    if method:
        spec["method"] = method
    parsed = parse_spec(spec)
    return build_plan(JobRef("j", "ns", "uid"), parsed, layout_from_resources(parsed))


def test_crd_declares_the_memory_fields_without_defaults():
    crd = yaml.safe_load(CRD.read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    training = props["training"]["properties"]
    for name in FIELDS:
        assert name in training and "default" not in training[name], name
    assert training["optimizerInBackward"]["type"] == training["activationOffloading"]["type"] == "boolean"
    values = typing.get_args(TrainingSpec.model_fields["master_weights"].annotation)
    assert training["masterWeights"]["enum"] == list(values)
    assert values == typing.get_args(TrainingPlan.model_fields["master_weights"].annotation)
    assert {k: SPEED_FIELD_DEFAULTS[k] for k in FIELDS} == FIELDS


def test_plan_carries_the_memory_fields_only_when_asked():
    plain = _plan()
    assert not set(FIELDS) & set(plain["training"])
    t = parse_plan(plain).training
    assert (t.master_weights, t.optimizer_in_backward, t.activation_offloading) == ("auto", None, False)
    asked = _plan(masterWeights="fp32", optimizerInBackward=False, activationOffloading=True)
    assert {k: asked["training"][k] for k in FIELDS} == {"masterWeights": "fp32", "optimizerInBackward": False,
                                                          "activationOffloading": True}
    t = parse_plan(asked).training
    assert (t.master_weights, t.optimizer_in_backward, t.activation_offloading) == ("fp32", False, True)


def test_trainer_refuses_master_weights_none_for_adapters():
    plan = _plan(masterWeights="none")
    assert plan["method"] != "full"
    with pytest.raises(PlanError, match="training.masterWeights: none applies to method full only"):
        parse_plan(plan)
