"""spec.training.learningRate: a YAML number or a decimal string, in (0, 1]. The CRD leaves the field untyped
and the admission policy in crds/ enforces the rule; the operator's model enforces the same rule for clusters
without the policy (and the integration tests check the policy against the real apiserver)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import parse_spec

pytestmark = pytest.mark.unit

BASE = {"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "pvc://data/train.jsonl"},
        "method": "lora", "output": {"uri": "pvc://outputs/run"}}


def _spec(rate):
    return {**BASE, "training": {"epochs": 1, "learningRate": rate}}


@pytest.mark.parametrize("rate,expected", [(2e-4, 2e-4), ("2e-4", 2e-4), ("0.0002", 2e-4), (1, 1.0), ("1", 1.0),
                                           (1e-5, 1e-5), (".5", 0.5)])
def test_numbers_and_decimal_strings_give_the_same_float(rate, expected):
    assert parse_spec(_spec(rate)).training.learning_rate == pytest.approx(expected)


@pytest.mark.parametrize("rate,needle", [("fast", "is not a number"), (True, "is not a number"),
                                         ([0.1], "is not a number"), (0, "outside (0, 1]"), (-1e-4, "outside (0, 1]"),
                                         (2.0, "outside (0, 1]"), ("1e30", "outside (0, 1]")])
def test_anything_else_is_rejected_naming_the_field(rate, needle):
    with pytest.raises(ValidationError) as exc:
        parse_spec(_spec(rate))
    assert "spec.training.learningRate" in str(exc.value) and needle in str(exc.value)


def test_yaml_as_users_write_it():
    """`learningRate: 2e-4` is a float to kubectl's YAML 1.2 parser and a string to PyYAML (YAML 1.1); both work."""
    for text in ("learningRate: 2e-4", "learningRate: 0.0002", 'learningRate: "2e-4"', "learningRate: 2.0e-4"):
        rate = yaml.safe_load(text)["learningRate"]
        assert parse_spec(_spec(rate)).training.learning_rate == pytest.approx(2e-4), text


def test_the_admission_policy_and_the_model_agree_on_the_bounds():
    """The policy's expression holds the same bounds as the model: (0, 1], the only integer allowed being 1."""
    from pathlib import Path
    policy_file = Path(__file__).resolve().parents[2] / "crds" / "kubetune.io_finetunejobs-policy.yaml"
    policy = next(d for d in yaml.safe_load_all(policy_file.read_text()) if d["kind"] == "ValidatingAdmissionPolicy")
    rule = policy["spec"]["validations"][0]["expression"]
    for bound in ("variables.learningRate > 0.0", "variables.learningRate <= 1.0", "variables.learningRate == 1",
                  "double(variables.learningRate) > 0.0", "double(variables.learningRate) <= 1.0"):
        assert bound in rule, bound
