"""Spec defaults live in one place: kubetune.api (pydantic). The CRD's `default:` keys, the trainer plan's
defaults and the operator's other default tables must agree with it; changing one of them alone fails here."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from pydantic import BaseModel, TypeAdapter
from pydantic.fields import FieldInfo

from kubetune import api
from kubetune.builders import SPEED_FIELD_DEFAULTS
from kubetune_trainer import plan

pytestmark = pytest.mark.unit

CRD = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"

# Fields the pydantic models default that have no CRD `default:` on purpose (path: why).
NO_CRD_DEFAULT = {
    "training.epochs": "set by the training block's own default (epochs: 1); absent with maxSteps means 0",
    "training.attentionImplementation": "speed feature: absent means the trainer's default",
    "training.torchCompile": "speed feature: absent means off",
    "training.ligerKernels": "speed feature: absent means off",
    "training.masterWeights": "memory feature: absent means auto (the trainer decides)",
    "training.activationOffloading": "memory feature: absent means off",
    "quantization.bits": "required by a CEL rule (bits: 4 for qlora), never defaulted",
    "training.warmupRatio": "absent means 0.03 unless warmupSteps is set; a CRD default would make the two "
                            "indistinguishable and 'exactly one' impossible to check",
    "training.checkpointStrategy": "added later: absent means steps (plans keep their old shape)",
    "training.keepCheckpoints": "added later: absent means 2 (plans keep their old shape)",
    "training.logEverySteps": "added later: absent means about 50 log lines per run",
    "dataset.chatTemplate": "absent means the tokenizer's own template",
    "tracking.mlflow.credentialsSecretRef.name": "required by the CRD whenever the reference is given",
}
HINTS = "model.architecture."  # model hints: 0/empty means "not given", the CRD leaves them unset

# (spec model, plan model) pairs whose shared settings the plan carries from the spec (builders.build_plan).
PLAN_PAIRS = [
    (api.ModelSource, plan.ModelRef), (api.DatasetSource, plan.DatasetPlan), (api.LoraSpec, plan.LoraPlan),
    (api.QuantizationSpec, plan.QuantizationPlan), (api.TrainingSpec, plan.TrainingPlan),
    (api.EarlyStopping, plan.EarlyStoppingPlan), (api.Divergence, plan.DivergencePlan),
    (api.OutputSpec, plan.OutputPlan),
    (api.EvaluationSpec, plan.EvaluationPlan), (api.EvalGate, plan.EvalGatePlan), (api.ExportSpec, plan.ExportPlan),
    (api.TrackingSpec, plan.TrackingPlan),
]
# Resolved by the operator, not copied from the spec: the spec says `auto`, the plan `none|ddp|deepspeed`.
PLAN_RESOLVED = {(api.DistributedSpec, "strategy")}


def _crd_spec_schema() -> dict[str, Any]:
    doc = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1alpha1"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def _crd_defaults(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted camelCase path, default) for every `default:` under the spec schema."""
    if "default" in node:
        yield path, node["default"]
    for key, child in (node.get("properties") or {}).items():
        yield from _crd_defaults(child, f"{path}.{key}" if path else key)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`LoraSpec | None` -> LoraSpec)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def _field(path: str) -> FieldInfo:
    """The pydantic field of a dotted camelCase spec path, looked up by alias."""
    model: type[BaseModel] | None = api.FineTuneJobSpec
    field = None
    for part in path.split("."):
        assert model is not None, f"{path}: {part} is below a field that is not a model"
        by_alias = {f.alias or name: f for name, f in model.model_fields.items()}
        assert part in by_alias, f"CRD field spec.{path} has no counterpart in kubetune.api.{model.__name__}"
        field = by_alias[part]
        model = _model_of(field.annotation)
    assert field is not None
    return field


def _pydantic_default(field: FieldInfo) -> Any:
    return field.get_default(call_default_factory=True)


def _comparable(value: Any) -> Any:
    """Models as their camelCase JSON, so a spec block and its plan twin compare by content."""
    return value.model_dump(by_alias=True, mode="json") if isinstance(value, BaseModel) else value


def _walk_model_defaults(model: type[BaseModel], path: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted camelCase path, field) for every field of the spec models that has a default."""
    for name, field in model.model_fields.items():
        here = f"{path}.{field.alias or name}" if path else (field.alias or name)
        if not field.is_required():
            yield here, field
        sub = _model_of(field.annotation)
        if sub is not None:
            yield from _walk_model_defaults(sub, here)


CRD_DEFAULTS = dict(_crd_defaults(_crd_spec_schema()))


def test_the_crd_declares_defaults():
    assert len(CRD_DEFAULTS) > 40 and "training.learningRate" in CRD_DEFAULTS


@pytest.mark.parametrize("path", sorted(CRD_DEFAULTS))
def test_crd_default_equals_the_pydantic_default(path):
    field = _field(path)
    assert not field.is_required(), f"spec.{path} has a CRD default but is required in kubetune.api"
    # validate the CRD value as the operator would read it (e.g. learningRate "2e-4" -> 0.0002)
    crd_value = TypeAdapter(field.annotation).validate_python(CRD_DEFAULTS[path])
    assert crd_value == _pydantic_default(field), f"spec.{path}: CRD default {CRD_DEFAULTS[path]!r}"


def test_every_pydantic_default_is_in_the_crd_or_explained():
    unexplained = []
    for path, field in _walk_model_defaults(api.FineTuneJobSpec):
        if path in CRD_DEFAULTS or path in NO_CRD_DEFAULT or path.startswith(HINTS):
            continue
        if _pydantic_default(field) is None:
            continue  # an optional block (lora, quantization, model.architecture): absent means None
        unexplained.append(path)
    assert not unexplained, f"pydantic defaults without a CRD default: {unexplained}"
    for path in NO_CRD_DEFAULT:
        assert path not in CRD_DEFAULTS, f"spec.{path} now has a CRD default: drop it from NO_CRD_DEFAULT"


@pytest.mark.parametrize("spec_model,plan_model", PLAN_PAIRS + [(api.DistributedSpec, plan.DistributedPlan)],
                         ids=lambda m: m.__name__)
def test_trainer_plan_defaults_equal_the_spec_defaults(spec_model, plan_model):
    shared = set(spec_model.model_fields) & set(plan_model.model_fields)
    assert shared, f"{spec_model.__name__} and {plan_model.__name__} share no field"
    for name in sorted(shared):
        if (spec_model, name) in PLAN_RESOLVED:
            continue
        spec_field, plan_field = spec_model.model_fields[name], plan_model.model_fields[name]
        assert spec_field.is_required() == plan_field.is_required(), f"{spec_model.__name__}.{name}"
        if not spec_field.is_required():
            assert _comparable(_pydantic_default(spec_field)) == _comparable(_pydantic_default(plan_field)), (
                f"{spec_model.__name__}.{name}: spec default {_pydantic_default(spec_field)!r}, "
                f"plan default {_pydantic_default(plan_field)!r}")


@pytest.mark.parametrize("spec_model,plan_model", PLAN_PAIRS, ids=lambda m: m.__name__)
def test_the_plan_reads_every_setting_the_operator_copies(spec_model, plan_model):
    """The builders copy these blocks from the spec into the plan, whose models forbid unknown keys."""
    copied = set(spec_model.model_fields) - {"architecture"}  # hints size the job; the trainer reads config.json
    assert copied <= set(plan_model.model_fields), f"{plan_model.__name__} lacks {copied - set(plan_model.model_fields)}"


def test_speed_fields_left_out_of_the_plan_are_the_defaults_on_both_sides():
    """builders drop speed fields equal to SPEED_FIELD_DEFAULTS; the trainer must read absence the same way."""
    spec_defaults = api.TrainingSpec().dump()
    plan_defaults = plan.TrainingPlan(epochs=1).to_json_dict()
    for key, value in SPEED_FIELD_DEFAULTS.items():
        assert spec_defaults[key] == value == plan_defaults[key], key


def test_a_spec_with_only_the_required_fields_gets_the_crd_defaults():
    """End to end: what the apiserver would store for a minimal spec is what the pydantic model yields."""
    spec = api.parse_spec({"model": {"uri": "hf://x/y"}, "dataset": {"uri": "pvc://d/x"}, "method": "lora",
                           "output": {"uri": "pvc://o/x"}})
    dumped = spec.dump()
    for path, default in CRD_DEFAULTS.items():
        parent, _, key = path.rpartition(".")
        holder = dumped
        for part in filter(None, parent.split(".")):
            holder = holder.get(part) or {}
        if parent in ("lora", "quantization") or not holder:
            continue  # optional blocks: defaulted only when given
        field = _field(path)
        assert TypeAdapter(field.annotation).validate_python(holder[key]) == \
            TypeAdapter(field.annotation).validate_python(default), path


def test_the_contract_sample_shows_the_defaults():
    """docs/contracts.md §1 lists every spec field with its default; it must not drift from the CRD."""
    text = (CRD.parents[1] / "docs" / "contracts.md").read_text()
    section = text.split("## 1.", 1)[1].split("\n## ", 1)[0]
    sample = yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])["spec"]
    shown = 0
    for path, default in CRD_DEFAULTS.items():
        holder: Any = sample
        for part in path.split("."):
            holder = holder.get(part) if isinstance(holder, dict) else None
        if holder is None or isinstance(default, dict):
            continue  # not in the sample, or a whole-block default (its fields are checked one by one)
        field = _field(path)
        assert TypeAdapter(field.annotation).validate_python(holder) == \
            TypeAdapter(field.annotation).validate_python(default), f"docs/contracts.md §1 spec.{path}: {holder!r}"
        shown += 1
    assert shown > 40
