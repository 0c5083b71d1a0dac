"""With CPU offload the trainer pod asks for the host RAM the sizer estimated, and a layout whose nodes lack it
is refused with the numbers."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.builders import BuildConfig, pod_resources
from kubetune.sizing.fleet import fleet_from_nodes, parse_gpu_shorthand, parse_quantity_bytes
from kubetune.sizing.layout import size_job_layout

pytestmark = pytest.mark.unit


def full_70b(**resources):
    return parse_spec({"model": {"uri": "hf://meta-llama/Llama-3.1-70B"}, "dataset": {"uri": "s3://d/t.jsonl"},
                       "method": "full", "training": {"maxSteps": 10}, "output": {"uri": "s3://o/x"},
                       "distributed": {"strategy": "deepspeed", "zeroStage": 3, "offloadOptimizer": True},
                       "resources": resources})


def nodes(host_memory: str):
    out = parse_gpu_shorthand("H100-80GB:8x2")
    for n in out:
        n["status"]["allocatable"]["memory"] = host_memory
    return out


def test_the_pod_requests_the_estimated_offload_memory():
    outcome = size_job_layout(full_70b(), nodes("2048Gi"))
    assert outcome.fits and outcome.layout.offload_optimizer, outcome.message
    need = outcome.layout.host_offload_bytes
    assert need > 100 * 1024**3  # fp32 Adam states of 70B parameters, shared by the pods
    requested = parse_quantity_bytes(pod_resources(full_70b(), outcome.layout, BuildConfig())["requests"]["memory"])
    assert requested >= need * 1.1 and requested <= need * 1.1 + (BuildConfig().memory_per_gpu_gi * 8 + 1) * 1024**3


def test_nodes_without_that_much_host_ram_are_refused_with_the_numbers():
    outcome = size_job_layout(full_70b(maxGpus=8), nodes("256Gi"))
    assert not outcome.fits
    assert "GiB of host RAM" in outcome.message and "allocatable" in outcome.message, outcome.message


def lora_8b(**training):
    return parse_spec({"model": {"uri": "hf://meta-llama/Llama-3.1-8B"}, "dataset": {"uri": "s3://d/t.jsonl"},
                       "method": "lora", "output": {"uri": "s3://o/x"},
                       "training": {"maxSteps": 10, "microBatchSize": 2, "maxSeqLength": 2048, **training}})


def test_activation_offloading_asks_for_host_ram_for_the_saved_activations_and_less_gpu_memory():
    plain = size_job_layout(lora_8b(), nodes("512Gi"))
    offloaded = size_job_layout(lora_8b(activationOffloading=True), nodes("512Gi"))
    assert plain.fits and offloaded.fits, (plain.message, offloaded.message)
    table = 128256 * 4096 * 2  # the frozen input-embedding table lives in host RAM in both (embeddingsOnHost)
    assert plain.layout.host_offload_bytes == table
    # 32 checkpointed layer inputs (bf16, 2 x 2,048 x 4,096) and the loss's hidden states: about 1.06 GiB
    layer_input = 2 * 2048 * 4096 * 2
    assert 32 * layer_input <= offloaded.layout.host_offload_bytes - table <= 36 * layer_input
    assert offloaded.plan_status["estimate"]["hostOffloadBytes"] == offloaded.layout.host_offload_bytes
    plain_gpu, offloaded_gpu = (o.plan_status["estimate"]["breakdownBytes"]["activations"]
                                for o in (plain, offloaded))
    assert offloaded_gpu < plain_gpu - 30 * layer_input
    base = parse_quantity_bytes(pod_resources(lora_8b(), plain.layout, BuildConfig())["requests"]["memory"])
    more = parse_quantity_bytes(pod_resources(lora_8b(activationOffloading=True), offloaded.layout,
                                              BuildConfig())["requests"]["memory"])
    per_gpu = BuildConfig().memory_per_gpu_gi * 1024**3  # what a pod asks per GPU without anything on the host
    assert more > base
    assert base - per_gpu >= plain.layout.host_offload_bytes  # the embedding table
    assert more - per_gpu >= offloaded.layout.host_offload_bytes  # the table and the saved activations
