"""spec.training.attentionImplementation / torchCompile / ligerKernels: CRD schema, typed spec, plan rendering,
the trainer's plan validation, and the trainer's pure decisions about where each feature can run."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune.api import TrainingSpec, parse_spec
from kubetune.builders import SPEED_FIELD_DEFAULTS, JobRef, build_plan
from kubetune.sizing.layout import layout_from_resources
from kubetune_trainer.errors import PlanError
from kubetune_trainer.plan import TrainingPlan, parse_plan
from kubetune_trainer.speedups import compiler_problem, liger_options, resolve_attention

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "crds" / "kubetune.io_finetunejobs.yaml"
CASE = REPO / "tests" / "data" / "builders" / "cpu-quickstart" / "input.yaml"
FIELDS = ("attentionImplementation", "torchCompile", "ligerKernels")


def _training_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["training"]


def _spec(**training) -> dict:
    spec = yaml.safe_load(CASE.read_text())["spec"]
    spec["training"] = {**spec.get("training", {}), **training}
    return spec


def _plan(**training) -> dict:
    spec = parse_spec(_spec(**training))
    return build_plan(JobRef("j", "ns", "uid"), spec, layout_from_resources(spec))


def test_crd_declares_the_fields_without_defaults_and_with_the_typed_enums():
    props = _training_schema()["properties"]
    for name in FIELDS:
        assert name in props, f"spec.training.{name} missing from the CRD"
        # No default: existing objects would otherwise gain the keys on read and change their spec hash.
        assert "default" not in props[name]
    assert props["torchCompile"]["type"] == props["ligerKernels"]["type"] == "boolean"
    operator_values = typing.get_args(TrainingSpec.model_fields["attention_implementation"].annotation)
    trainer_values = typing.get_args(TrainingPlan.model_fields["attention_implementation"].annotation)
    assert props["attentionImplementation"]["enum"] == list(operator_values) == list(trainer_values)
    assert set(FIELDS) <= set(SPEED_FIELD_DEFAULTS)  # the memory fields: test_training_memory_fields.py
    assert "flash_attention_2" in operator_values


def test_typed_spec_defaults_and_rejects_unknown_attention():
    spec = parse_spec(_spec())
    assert (spec.training.attention_implementation, spec.training.torch_compile,
            spec.training.liger_kernels) == ("auto", False, False)
    spec = parse_spec(_spec(attentionImplementation="eager", torchCompile=True, ligerKernels=True))
    assert (spec.training.attention_implementation, spec.training.torch_compile,
            spec.training.liger_kernels) == ("eager", True, True)
    with pytest.raises(ValidationError, match="attentionImplementation"):
        parse_spec(_spec(attentionImplementation="xformers"))


def test_plan_carries_only_the_features_a_job_asks_for_and_the_trainer_reads_both():
    plain = _plan()
    assert not set(FIELDS) & set(plain["training"]), "defaults must not be written (older trainer images)"
    assert parse_plan(plain).training.attention_implementation == "auto"

    asked = _plan(attentionImplementation="sdpa", torchCompile=True, ligerKernels=True)
    assert asked["training"]["attentionImplementation"] == "sdpa"
    assert asked["training"]["torchCompile"] is True and asked["training"]["ligerKernels"] is True
    t = parse_plan(asked).training
    assert (t.attention_implementation, t.torch_compile, t.liger_kernels) == ("sdpa", True, True)

    partly = _plan(attentionImplementation="auto", torchCompile=True)
    assert "attentionImplementation" not in partly["training"] and partly["training"]["torchCompile"] is True


def test_trainer_plan_refuses_compile_with_deepspeed_and_unknown_attention():
    plan = _plan(torchCompile=True)
    plan["distributed"] = {"strategy": "deepspeed", "zeroStage": 2, "offloadOptimizer": False,
                           "offloadParams": False, "numNodes": 1, "procsPerNode": 2}
    with pytest.raises(PlanError, match="training.torchCompile: not supported with distributed.strategy deepspeed"):
        parse_plan(plan)
    bad = _plan()
    bad["training"]["attentionImplementation"] = "flash"
    with pytest.raises(PlanError, match="training.attentionImplementation"):
        parse_plan(bad)


@pytest.mark.parametrize("requested, cuda, precision, installed, expected", [
    ("auto", False, "fp32", False, None),
    ("sdpa", False, "fp32", False, "sdpa"),
    ("eager", True, "bf16", False, "eager"),
    ("flash_attention_2", True, "bf16", True, "flash_attention_2"),
])
def test_resolve_attention(requested, cuda, precision, installed, expected):
    assert resolve_attention(requested, cuda=cuda, precision=precision, flash_attn_installed=installed) == expected


@pytest.mark.parametrize("cuda, precision, installed, message", [
    (False, "fp32", True, "needs a CUDA GPU"),
    (True, "bf16", False, "needs the flash-attn package"),
    (True, "fp32", True, "bf16/fp16 only"),
])
def test_flash_attention_is_refused_where_it_cannot_run(cuda, precision, installed, message):
    with pytest.raises(PlanError, match=f"training.attentionImplementation: flash_attention_2 .*{message}"):
        resolve_attention("flash_attention_2", cuda=cuda, precision=precision, flash_attn_installed=installed)


def test_liger_options_apply_on_cuda_only_and_drop_fused_ce_under_zero3():
    supported = frozenset({"llama", "qwen2"})
    base = dict(enabled=True, cuda=True, installed=True, model_type="llama", supported=supported, zero_stage=0)
    options, reason = liger_options(**base)
    assert reason == "" and options["fused_linear_cross_entropy"] and options["rms_norm"] and options["swiglu"]
    assert options["rope"] and not options["cross_entropy"]
    options, _ = liger_options(**{**base, "zero_stage": 3})
    assert options["fused_linear_cross_entropy"] is False and options["rms_norm"] is True
    for change, why in (({"enabled": False}, "ligerKernels is false"), ({"cuda": False}, "no CUDA device"),
                        ({"installed": False}, "not installed"), ({"model_type": "gpt2"}, "'gpt2'")):
        options, reason = liger_options(**{**base, **change})
        assert options is None and why in reason


def test_compiler_problem_names_the_missing_compiler():
    none_found = lambda name: None  # noqa: E731
    only = lambda wanted: (lambda name: f"/usr/bin/{name}" if name == wanted else None)  # noqa: E731
    assert compiler_problem(cuda=False, which=only("g++"), env={}) == ""
    assert compiler_problem(cuda=False, which=only("clang++"), env={}) == ""
    assert compiler_problem(cuda=False, which=only("my-cxx"), env={"CXX": "my-cxx"}) == ""
    assert "C++ compiler" in compiler_problem(cuda=False, which=only("gcc"), env={})
    assert compiler_problem(cuda=True, which=only("gcc"), env={}) == ""
    assert "a C compiler" in compiler_problem(cuda=True, which=none_found, env={})
