"""The typed status model and the CRD's status schema are the same, field by field and type by type,
so nothing a pass writes is pruned by the apiserver and nothing the CRD declares is unwritable."""

from __future__ import annotations

import typing
from pathlib import Path

import pydantic
import pytest
import yaml

from kubetune.status import FineTuneJobStatus, checked_status

pytestmark = pytest.mark.unit

CRD = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs.yaml"
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


def crd_status() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def core_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return core_type(args[0])
    return annotation


def compare(model: type[pydantic.BaseModel], schema: dict, where: str) -> list[str]:
    problems = []
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    props = schema.get("properties") or {}
    for name in sorted(set(fields) ^ set(props)):
        problems.append(f"{where}.{name}: only in the {'model' if name in fields else 'CRD'}")
    for name in sorted(set(fields) & set(props)):
        ann, prop = core_type(fields[name].annotation), props[name]
        origin = typing.get_origin(ann) or ann
        if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel):
            if prop.get("type") != "object":
                problems.append(f"{where}.{name}: object in the model, {prop.get('type')} in the CRD")
            problems += compare(ann, prop, f"{where}.{name}")
        elif origin is list:
            item = typing.get_args(ann)[0]
            if prop.get("type") != "array":
                problems.append(f"{where}.{name}: array in the model, {prop.get('type')} in the CRD")
            elif isinstance(item, type) and issubclass(item, pydantic.BaseModel):
                problems += compare(item, prop["items"], f"{where}.{name}[]")
        elif origin is typing.Literal:
            if prop.get("type") != "string":
                problems.append(f"{where}.{name}: enum of strings in the model, {prop.get('type')} in the CRD")
        elif JSON_TYPES.get(origin) != prop.get("type"):
            problems.append(f"{where}.{name}: {JSON_TYPES.get(origin)} in the model, {prop.get('type')} in the CRD")
    return problems


def test_status_model_matches_the_crd_schema():
    assert compare(FineTuneJobStatus, crd_status(), "status") == []


def test_a_status_field_the_crd_would_prune_is_refused():
    with pytest.raises(pydantic.ValidationError, match="progres"):
        checked_status({"phase": "Running", "progres": {"step": 1}})
    with pytest.raises(pydantic.ValidationError):
        checked_status({"phase": "Running", "accounting": {"restarts": "many"}})
    assert checked_status({"phase": "Running", "accounting": {"restarts": 2}}) == {
        "phase": "Running", "accounting": {"restarts": 2}}
