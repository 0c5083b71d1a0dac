"""One source of truth for the value ranges: the trainer re-validates the plan against the bounds the CRD
enforces (crds/kubetune.io_finetunejobs.yaml, and for the untyped learningRate the admission policy next to it),
and this test fails when the two disagree or when the CRD bounds a plan field the trainer's table lacks."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kubetune_trainer.bounds import PLAN_BOUNDS, Bound, bound_problems
from kubetune_trainer.errors import PlanError
from kubetune_trainer.plan import parse_plan

from ._support import make_plan

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "kubetune.io_finetunejobs.yaml"
POLICY = REPO / "crds" / "kubetune.io_finetunejobs-policy.yaml"
# Plan sections whose every bounded CRD field must be in the trainer's table (the plan mirrors spec.<section>).
CHECKED_SECTIONS = ("dataset", "lora", "training", "distributed")


def _spec_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _crd_node(path: str) -> dict | None:
    node = _spec_schema()
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def _crd_bound(node: dict) -> Bound:
    return Bound(node.get("minimum"), node.get("maximum"), bool(node.get("exclusiveMinimum", False)),
                 bool(node.get("exclusiveMaximum", False)))


def _bounded_crd_fields(node: dict, prefix: str = ""):
    for name, child in (node.get("properties") or {}).items():
        path = f"{prefix}{name}"
        if "minimum" in child or "maximum" in child:
            yield path, child
        yield from _bounded_crd_fields(child, path + ".")


def _learning_rate_rule() -> Bound:
    """The range the admission policy enforces on the untyped spec.training.learningRate."""
    text = POLICY.read_text()
    m = re.search(r"variables\.learningRate > ([0-9.]+) && variables\.learningRate <= ([0-9.]+)", text)
    assert m, "the learningRate admission rule changed shape; update this test to read it"
    return Bound(float(m.group(1)), float(m.group(2)), exclusive_minimum=True)


def test_trainer_bounds_equal_the_crd():
    for path, bound in PLAN_BOUNDS.items():
        node = _crd_node(path)
        assert node is not None, f"spec.{path} is not in the CRD"
        if "minimum" in node or "maximum" in node:
            assert bound == _crd_bound(node), f"spec.{path}: trainer {bound} != CRD {_crd_bound(node)}"
        else:
            assert path == "training.learningRate", f"spec.{path} has no bounds in the CRD"
            assert bound == _learning_rate_rule()


def test_every_bounded_crd_field_of_the_plan_is_checked_by_the_trainer():
    from kubetune_trainer.plan import Plan

    spec = _spec_schema()
    plan_fields = set(Plan.model_json_schema(by_alias=True)["properties"])
    missing = []
    for section in CHECKED_SECTIONS:
        assert section in plan_fields
        for sub, _ in _bounded_crd_fields(spec["properties"][section]):
            if f"{section}.{sub}" not in PLAN_BOUNDS and _in_plan(f"{section}.{sub}"):
                missing.append(f"{section}.{sub}")
    assert not missing, f"CRD bounds without a trainer check: {missing}"


def _in_plan(path: str) -> bool:
    """Whether the plan model has this camelCase field path."""
    from pydantic import BaseModel

    from kubetune_trainer.plan import Plan

    model: type[BaseModel] | None = Plan
    for part in path.split("."):
        fields = {f.alias or name: f for name, f in model.model_fields.items()} if model else {}
        if part not in fields:
            return False
        annotation = fields[part].annotation
        model = next((a for a in getattr(annotation, "__args__", (annotation,))
                      if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return True


@pytest.mark.parametrize("field,value,words", [
    ("learningRate", 1e30, "training.learningRate: 1e+30 is above the maximum 1"),
    ("learningRate", 0.0, "training.learningRate: 0 is not above the minimum 0"),
    ("maxSeqLength", 8, "training.maxSeqLength: 8 is below the minimum 16"),
    ("epochs", 5000, "training.epochs: 5000 is above the maximum 1000"),
    ("gradientAccumulationSteps", 10_000, "training.gradientAccumulationSteps: 10000 is above the maximum 4096"),
])
def test_a_tampered_plan_is_refused_naming_the_field(field, value, words):
    plan = make_plan(Path("/models/m"), Path("/data/d.jsonl"), Path("/out"), "lora", **{field: value})
    if field == "epochs":
        plan["training"]["maxSteps"] = 0
    with pytest.raises(PlanError) as err:
        parse_plan(plan)
    assert words in str(err.value) and "FineTuneJob CRD" in str(err.value)
    assert err.value.reason == "InvalidPlan"


def test_lora_rank_and_a_valid_plan():
    plan = make_plan(Path("/models/m"), Path("/data/d.jsonl"), Path("/out"), "lora")
    assert parse_plan(plan).lora.r == 8
    plan["lora"]["r"] = 4096
    with pytest.raises(PlanError, match=r"lora\.r: .*1024"):
        parse_plan(plan)
    assert bound_problems({"lora": {"dropout": 1.0}}) == [
        "lora.dropout: 1 is not below the maximum 1 that the FineTuneJob CRD allows"]
