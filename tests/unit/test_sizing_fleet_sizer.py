"""FleetSizer's memo key comes from the typed spec: defaults applied, only the fields the sizer reads."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.sizing import FleetSizer, size_job_layout, sizing_key
from kubetune.sizing.fleet import GpuHolding, job_gpu_holding, parse_gpu_shorthand

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


def two_l4_and_h100s():
    nodes = parse_gpu_shorthand("NVIDIA-L4:1x2") + parse_gpu_shorthand("H100-80GB:8")
    return FleetSizer(lambda: nodes, list_pods=lambda: []), parse_spec({**BASE, "training": {"maxSeqLength": 1024}})


def test_gpus_handed_out_in_a_snapshot_move_the_next_jobs_of_a_burst_to_a_type_with_free_gpus():
    """Two L4s free: the first two jobs of a burst get them, the third goes to a free H100 instead of queueing
    for an L4 (before, every job sized inside one snapshot got the L4 from the memo)."""
    sizer, spec = two_l4_and_h100s()
    chosen = []
    for _ in range(3):
        outcome = sizer.size(spec)
        assert outcome.fits and outcome.free_now
        chosen.append(outcome.layout.gpu_type)
        sizer.hand_out(job_gpu_holding({"spec": {"parallelism": 1, "template": {"spec": {
            "nodeSelector": outcome.layout.node_selector,
            "containers": [{"resources": {"limits": {"nvidia.com/gpu": str(outcome.layout.gpus_per_pod)}}}]}}}}))
    assert chosen == ["NVIDIA-L4", "NVIDIA-L4", "H100-80GB"]
    assert (sizer.hits, sizer.stale) == (1, 1)


def test_without_hand_outs_a_snapshot_keeps_answering_from_the_memo():
    sizer, spec = two_l4_and_h100s()
    assert {sizer.size(spec).layout.gpu_type for _ in range(3)} == {"NVIDIA-L4"}
    assert (sizer.hits, sizer.misses, sizer.stale) == (2, 1, 0)


def test_hand_outs_last_until_the_next_snapshot():
    clock = [0.0]
    nodes = parse_gpu_shorthand("NVIDIA-L4:1x1") + parse_gpu_shorthand("H100-80GB:8")
    sizer = FleetSizer(lambda: nodes, ttl_seconds=5.0, clock=lambda: clock[0], list_pods=lambda: [])
    spec = parse_spec({**BASE, "training": {"maxSeqLength": 1024}})
    assert sizer.size(spec).layout.gpu_type == "NVIDIA-L4"
    sizer.hand_out(GpuHolding("", "NVIDIA-L4", 1))
    assert sizer.size(spec).layout.gpu_type == "H100-80GB"
    clock[0] = 6.0  # the new snapshot counts pods (here: none), not the hand-outs of the last one
    assert sizer.size(spec).layout.gpu_type == "NVIDIA-L4"


def test_a_job_the_snapshot_already_counts_is_not_handed_out_again():
    """A snapshot refreshed between the Job's creation and its hand-out can count it already: its pods (from the
    pod watch, by their Job UID label) or the Job itself (the store's podless Jobs). Counting it again would
    send the next jobs of a burst away from GPUs that are free."""
    nodes = parse_gpu_shorthand("NVIDIA-L4:1x2") + parse_gpu_shorthand("H100-80GB:8")
    spec = parse_spec({**BASE, "training": {"maxSeqLength": 1024}})
    for seen in ([GpuHolding("", "NVIDIA-L4", 1, "job-a")],
                 [{"metadata": {"labels": {"batch.kubernetes.io/controller-uid": "job-a"}},
                   "spec": {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L4"},
                            "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}]}}]):
        sizer = FleetSizer(lambda: nodes, list_pods=lambda seen=seen: seen)
        assert sizer.size(spec).layout.gpu_type == "NVIDIA-L4"  # one L4 of two taken: by job-a
        sizer.hand_out(GpuHolding("", "NVIDIA-L4", 1, "job-a"))
        assert sizer.fleet().pool("NVIDIA-L4").pending == 1
        assert sizer.size(spec).layout.gpu_type == "NVIDIA-L4"  # the other L4 is still free
        # A Job the snapshot does not count is handed out once, however often it is reported.
        sizer.hand_out(GpuHolding("", "NVIDIA-L4", 1, "job-b"))
        sizer.hand_out(GpuHolding("", "NVIDIA-L4", 1, "job-b"))
        assert sizer.fleet().pool("NVIDIA-L4").pending == 2
        assert sizer.size(spec).layout.gpu_type == "H100-80GB"


def test_hand_outs_are_ignored_without_occupancy_or_for_an_unknown_type():
    nodes = parse_gpu_shorthand("NVIDIA-L4:1x1")
    blind = FleetSizer(lambda: nodes)  # no pod list: sizing on allocatable GPUs alone
    spec = parse_spec({**BASE, "training": {"maxSeqLength": 1024}})
    blind.size(spec)
    blind.hand_out(GpuHolding("", "NVIDIA-L4", 1))
    assert blind.fleet().pool("NVIDIA-L4").pending == 0
    sizer, spec = two_l4_and_h100s()
    sizer.size(spec)
    sizer.hand_out(GpuHolding("", "T4", 4))
    sizer.hand_out(None)
    assert sizer.size(spec).layout.gpu_type == "NVIDIA-L4" and sizer.stale == 0


def test_a_jobs_holding_is_its_template_gpus_times_parallelism_on_its_selected_product():
    job = {"spec": {"parallelism": 2, "template": {"spec": {
        "nodeSelector": {"nvidia.com/gpu.product": "H100-80GB"},
        "containers": [{"resources": {"requests": {"nvidia.com/gpu": "4"}}}]}}}}
    assert job_gpu_holding(job) == GpuHolding("", "H100-80GB", 8)
    job["metadata"] = {"uid": "u-1"}
    assert job_gpu_holding(job) == GpuHolding("", "H100-80GB", 8, "u-1")
    cpu = {"spec": {"template": {"spec": {"containers": [{"resources": {"requests": {"cpu": "2"}}}]}}}}
    assert job_gpu_holding(cpu) is None
