"""Small contracts of the plan and status.plan: a qlora spec without a quantization block trains with the same
defaults the sizer assumed, and status.plan says its estimate is the analytic one."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.builders import JobRef, build_plan
from kubetune.sizing.layout import layout_from_resources, size_job_layout
from kubetune.sizing.fleet import parse_gpu_shorthand

pytestmark = pytest.mark.unit


def qlora(**blocks):
    return parse_spec({"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://d/t.jsonl"},
                       "method": "qlora", "training": {"maxSteps": 10}, "output": {"uri": "s3://o/x"},
                       "resources": {"gpuType": "NVIDIA-L4", "gpusPerPod": 1, "pods": 1}, **blocks})


def test_qlora_without_a_quantization_block_gets_the_defaults_in_the_plan():
    spec = qlora()
    assert spec.quantization is None
    plan = build_plan(JobRef("q", "ns", "uid"), spec, layout_from_resources(spec))
    assert plan["quantization"] == spec.effective_quantization().dump()
    assert plan["quantization"]["bits"] == 4 and plan["quantization"]["quantType"] == "nf4"


def test_status_plan_names_the_estimate_as_analytic():
    outcome = size_job_layout(qlora(resources={}), parse_gpu_shorthand("NVIDIA-L4:1x1"))
    assert outcome.fits and outcome.plan_status["estimate"]["source"] == "analytic"
