"""spec.evaluation: typed in kubetune.api, carried into the plan only when set, read by the trainer's plan."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import EVAL_METRICS, parse_spec
from kubetune.builders import JobRef, build_plan
from kubetune.sizing.layout import layout_from_resources
from kubetune_trainer.errors import PlanError
from kubetune_trainer.plan import parse_plan

pytestmark = pytest.mark.unit

CASES = Path(__file__).resolve().parents[1] / "data" / "builders"
CRD = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"


def _spec(case: str) -> dict:
    return yaml.safe_load((CASES / case / "input.yaml").read_text())["spec"]


def _plan(spec_dict: dict) -> dict:
    spec = parse_spec(spec_dict)
    return build_plan(JobRef("j", "ns", "uid"), spec, layout_from_resources(spec))


def test_the_plan_carries_the_evaluation_and_the_trainer_reads_it():
    plan = _plan(_spec("cpu-evaluation"))
    ev = plan["evaluation"]
    assert ev["metrics"] == ["exactMatch", "tokenF1", "evalLoss"]
    assert ev["gates"] == [{"metric": "exactMatch", "minImprovement": 0.5}, {"metric": "evalLoss", "minImprovement": 0.0}]
    assert ev["numExamples"] == 50 and ev["maxNewTokens"] == 64 and ev["temperature"] == 0.0
    parsed = parse_plan(plan)
    assert parsed.evaluation is not None and parsed.evaluation.max_general_regression == 0.05
    assert parsed.evaluation.dataset_uri == "pvc://eval-sets/spell-out/held-out.jsonl"


def test_no_evaluation_block_means_no_plan_key():
    """Plans of jobs without an evaluation stay readable by trainer images that predate it."""
    plan = _plan(_spec("cpu-quickstart"))
    assert "evaluation" not in plan
    assert parse_plan(plan).evaluation is None


def test_the_evaluation_dataset_claim_is_mounted():
    assert parse_spec(_spec("cpu-evaluation")).pvc_claims() == ["eval-sets", "kubetune-demo"]


def test_unknown_metric_is_refused_on_both_sides():
    spec = _spec("cpu-evaluation")
    spec["evaluation"]["metrics"] = ["accuracy"]
    with pytest.raises(ValidationError, match="accuracy"):
        parse_spec(spec)
    plan = _plan(_spec("cpu-evaluation"))
    plan["evaluation"]["gates"] = [{"metric": "bleurt"}]
    with pytest.raises(PlanError, match=r"evaluation\.gates\[0\]\.metric"):
        parse_plan(plan)


def test_the_trainer_refuses_a_gate_on_a_metric_it_does_not_score():
    plan = _plan(_spec("cpu-evaluation"))
    plan["evaluation"]["gates"] = [{"metric": "rougeL", "minImprovement": 0.1}]
    with pytest.raises(PlanError, match=r"evaluation: gates on \['rougeL'\]"):
        parse_plan(plan)


def test_the_crd_metric_enum_is_the_api_list():
    doc = yaml.safe_load(CRD.read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    ev = spec["properties"]["evaluation"]["properties"]
    assert tuple(ev["metrics"]["items"]["enum"]) == EVAL_METRICS
    assert tuple(ev["gates"]["items"]["properties"]["metric"]["enum"]) == EVAL_METRICS
