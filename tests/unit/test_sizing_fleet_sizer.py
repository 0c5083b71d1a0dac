"""FleetSizer's memo key comes from the typed spec: defaults applied, only the fields the sizer reads."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.sizing import FleetSizer, size_job_layout, sizing_key
from kubetune.sizing.fleet import parse_gpu_shorthand

pytestmark = pytest.mark.unit

BASE = {"model": {"uri": "hf://Qwen/Qwen2.5-7B"}, "dataset": {"uri": "pvc://d/x.jsonl"}, "method": "lora",
        "output": {"uri": "pvc://o/x"}}


def test_an_explicit_default_and_an_omitted_field_share_a_key():
    explicit = {**BASE, "lora": {"r": 16, "alpha": 32}, "distributed": {"strategy": "auto"},
                "training": {"epochs": 1, "maxSeqLength": 2048, "learningRate": "2e-4"}}
    assert sizing_key(parse_spec(explicit)) == sizing_key(parse_spec(BASE))


def test_a_sizing_field_changes_the_key_and_a_data_field_does_not():
    longer = {**BASE, "training": {"epochs": 1, "maxSeqLength": 8192}}
    assert sizing_key(parse_spec(longer)) != sizing_key(parse_spec(BASE))
    other_data = {**BASE, "dataset": {"uri": "s3://b/other.jsonl", "format": "alpaca"}, "image": "x/y:1"}
    assert sizing_key(parse_spec(other_data)) == sizing_key(parse_spec(BASE))


def test_memoized_outcome_equals_direct_sizing_of_the_typed_spec():
    nodes = parse_gpu_shorthand("NVIDIA-L4:1x2") + parse_gpu_shorthand("H100-80GB:8")
    sizer = FleetSizer(lambda: nodes)
    spec = parse_spec({**BASE, "training": {"epochs": 1, "maxSeqLength": 1024}})
    first = sizer.size(spec)
    again = sizer.size(parse_spec({**BASE, "training": {"epochs": 1, "maxSeqLength": 1024, "seed": 42}}))
    assert first == again == size_job_layout(spec, nodes)
    assert first.fits and first.layout is not None and (sizer.hits, sizer.misses) == (1, 1)
