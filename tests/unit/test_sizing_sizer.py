"""The sizer (docs/contracts.md §8) against simulated mixed fleets, built from real Node JSON shapes."""

from __future__ import annotations

import json

import pytest

from kubetune.api import parse_spec
from kubetune.sizing import apply_patch, fleet_from_nodes, size_job
from kubetune.sizing.architecture import ArchitectureError
from kubetune.sizing.fleet import parse_gpu_shorthand
from kubetune.sizing.sizer import parse_memory_quantity

pytestmark = pytest.mark.unit

GiB = 1024**3


def node(name, product=None, gpus=0, memory_mib=None, unschedulable=False, ready="True", count_label=True,
         host_memory="1056Gi"):
    """A Node as `kubectl get node -o json` returns it."""
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}
    alloc = {"cpu": "96", "memory": host_memory, "pods": "110", "ephemeral-storage": "1Ti"}
    if product:
        labels["nvidia.com/gpu.product"] = product
        if memory_mib:
            labels["nvidia.com/gpu.memory"] = str(memory_mib)
        if count_label:
            labels["nvidia.com/gpu.count"] = str(gpus)
        alloc["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels, "uid": "u-" + name},
        "spec": {"unschedulable": True} if unschedulable else {"podCIDR": "10.0.0.0/24"},
        "status": {"capacity": dict(alloc), "allocatable": alloc,
                   "conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": ready}]},
    }


def mixed_fleet():
    nodes = [node(f"l4-{i}", "NVIDIA-L4", 1, 23034, host_memory="192Gi") for i in range(4)]
    nodes += [node(f"a100-{i}", "NVIDIA-A100-SXM4-80GB", 8, 81920) for i in range(2)]
    nodes += [node(f"h100-{i}", "NVIDIA-H100-80GB-HBM3", 8, 81559) for i in range(2)]
    nodes += [node("cpu-0"), node("cpu-1")]
    return fleet_from_nodes(nodes)


def job(uri, method, **blocks):
    spec = {"model": {"uri": uri}, "dataset": {"uri": "pvc://data/train.jsonl"}, "method": method,
            "output": {"uri": "pvc://outputs/x"}}
    spec.update(blocks)
    return parse_spec(spec)


# ---- fleet parsing -----------------------------------------------------------------------------

def test_fleet_from_nodes_parses_real_node_json():
    nodes = [
        node("h100-0", "NVIDIA-H100-80GB-HBM3", 8, 81559),
        node("h100-1", "NVIDIA-H100-80GB-HBM3", 4, 81559),  # partly allocated elsewhere: 4 left
        node("l4-0", "NVIDIA-L4", 1, None),  # no memory label: inferred from the product
        node("l4-cordoned", "NVIDIA-L4", 1, 23034, unschedulable=True),
        node("l4-notready", "NVIDIA-L4", 1, 23034, ready="False"),
        node("mystery", "ACME-X1", 2, None),  # unknown product without memory label: skipped
        node("cpu-0"),
    ]
    fleet = fleet_from_nodes(json.loads(json.dumps(nodes)))
    assert [p.product for p in fleet.pools] == ["NVIDIA-L4", "NVIDIA-H100-80GB-HBM3"]
    l4, h100 = fleet.pools
    assert l4.memory_mib == 23034 and l4.node_gpus == {"l4-0": 1}
    assert h100.gpus_per_node == 8 and h100.total_gpus == 12
    assert h100.nodes_with(8) == 1 and h100.nodes_with(4) == 2
    assert h100.memory_bytes == 81559 * 1024**2
    assert fleet.cpu_nodes == 1
    assert len(fleet.skipped) == 3 and any("mystery" in s for s in fleet.skipped)


def test_fleet_from_python_client_dicts():
    # kubernetes.client V1Node.to_dict(): snake_case attribute names, labels/allocatable keys unchanged
    n = {"metadata": {"name": "a", "labels": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
                                              "nvidia.com/gpu.memory": "40960"}},
         "spec": {"unschedulable": None, "taints": None},
         "status": {"allocatable": {"nvidia.com/gpu": "4"}, "conditions": None}}
    fleet = fleet_from_nodes([n])
    assert fleet.pools[0].gpus_per_node == 4 and fleet.pools[0].memory_mib == 40960


def test_gpu_shorthand():
    nodes = parse_gpu_shorthand("H100-80GB:8x2")
    fleet = fleet_from_nodes(nodes)
    assert fleet.pools[0].total_gpus == 16 and fleet.pools[0].memory_mib == 81559
    with pytest.raises(ValueError, match="PRODUCT:GPUS"):
        parse_gpu_shorthand("H100")


# ---- the three headline cases ------------------------------------------------------------------

def test_qlora_70b_fits_one_80gb_gpu():
    d = size_job(job("hf://meta-llama/Llama-3.1-70B", "qlora"), mixed_fleet())
    assert d.fits and d.total_gpus == 1 and d.gpu_memory_bytes >= 79 * GiB
    assert d.distributed["strategy"] == "none"
    assert d.node_selector == {"nvidia.com/gpu.product": d.gpu_product}
    assert d.estimate.total <= d.usable_bytes


def test_full_8b_needs_zero_sharding_across_80gb_gpus():
    d = size_job(job("hf://meta-llama/Llama-3.1-8B-Instruct", "full"), mixed_fleet())
    assert d.fits and d.total_gpus > 1 and d.gpu_memory_bytes >= 79 * GiB
    assert d.distributed["strategy"] == "deepspeed" and d.distributed["zeroStage"] >= 2
    assert not d.distributed["offloadOptimizer"] and not d.distributed["offloadParams"]
    # ranking: a same-size older generation (A100 80GB) is preferred over H100
    assert d.gpu_product == "NVIDIA-A100-SXM4-80GB"
    # one fewer GPU would not fit: the sizer picked the fewest
    from kubetune.sizing import Parallelism, TrainingSetup, estimate_memory, load_catalog
    arch = load_catalog()["llama-3.1-8b"]
    fewer = [estimate_memory(arch, TrainingSetup(method="full"), Parallelism("deepspeed", z, world_size=d.total_gpus - 1))
             for z in (2, 3)]
    assert all(e.total > d.usable_bytes for e in fewer)


@pytest.mark.parametrize("uri,seq", [("hf://mistralai/Mistral-7B-Instruct-v0.3", 2048), ("hf://meta-llama/Llama-3.1-8B", 1024),
                                     ("hf://Qwen/Qwen2.5-7B-Instruct", 1024)])
def test_lora_7b_8b_fits_one_l4(uri, seq):
    spec = job(uri, "lora", training={"maxSeqLength": seq, "microBatchSize": 1, "gradientCheckpointing": True})
    d = size_job(spec, mixed_fleet())
    assert d.fits and d.gpu_product == "NVIDIA-L4" and d.total_gpus == 1, d.reason
    assert d.distributed["strategy"] == "none"


def test_smallest_gpu_type_and_fewest_gpus():
    d = size_job(job("hf://Qwen/Qwen2.5-0.5B", "lora"), mixed_fleet())
    assert d.fits and (d.gpu_product, d.total_gpus) == ("NVIDIA-L4", 1)


# ---- pins ---------------------------------------------------------------------------------------

def test_pinned_gpu_type_is_respected():
    d = size_job(job("hf://Qwen/Qwen2.5-0.5B", "lora", resources={"gpuType": "NVIDIA-H100-80GB-HBM3"}), mixed_fleet())
    assert d.fits and d.gpu_product == "NVIDIA-H100-80GB-HBM3" and d.total_gpus == 1


def test_pinned_gpus_per_pod_and_pods_are_respected():
    spec = job("hf://meta-llama/Llama-3.1-8B", "full",
               resources={"gpuType": "NVIDIA-H100-80GB-HBM3", "gpusPerPod": 8, "pods": 2})
    d = size_job(spec, mixed_fleet())
    assert d.fits and (d.gpus_per_pod, d.pods, d.gpu_product) == (8, 2, "NVIDIA-H100-80GB-HBM3")
    assert d.distributed["strategy"] in ("ddp", "deepspeed")


def test_max_gpus_bounds_the_layout():
    d = size_job(job("hf://meta-llama/Llama-3.1-8B", "full", resources={"maxGpus": 1}), mixed_fleet())
    assert d.fits and d.total_gpus == 1
    assert d.distributed["offloadOptimizer"]  # one GPU: only with the optimizer in host RAM


def test_explicit_distributed_is_respected():
    spec = job("hf://meta-llama/Llama-3.1-8B", "full", distributed={"strategy": "deepspeed", "zeroStage": 3})
    d = size_job(spec, mixed_fleet())
    assert d.fits and d.distributed == {"strategy": "deepspeed", "zeroStage": 3, "offloadOptimizer": False,
                                        "offloadParams": False}
    ddp = size_job(job("hf://Qwen/Qwen2.5-0.5B", "lora", distributed={"strategy": "ddp"},
                       resources={"gpusPerPod": 4}), mixed_fleet())
    assert ddp.fits and ddp.distributed["strategy"] == "ddp" and ddp.gpus_per_pod == 4


def test_pinned_layout_that_does_not_fit_is_reported_with_a_suggestion_that_fits():
    fleet = mixed_fleet()
    spec = job("hf://meta-llama/Llama-3.1-8B", "full", distributed={"strategy": "ddp"},
               resources={"gpuType": "NVIDIA-L4", "gpusPerPod": 1, "pods": 2})
    d = size_job(spec, fleet)
    assert not d.fits
    assert "GiB" in d.message and "22.49" in d.message and "pinned" in d.message
    assert d.suggestion and d.suggestion_patch
    fixed = size_job(apply_patch(spec, d.suggestion_patch), fleet)
    assert fixed.fits


def test_pinned_gpu_type_not_in_cluster():
    d = size_job(job("hf://Qwen/Qwen2.5-0.5B", "lora", resources={"gpuType": "NVIDIA-B200"}), mixed_fleet())
    assert not d.fits and "NVIDIA-B200" in d.message and "not in the cluster" in d.message
    assert size_job(apply_patch(job("hf://Qwen/Qwen2.5-0.5B", "lora"), d.suggestion_patch),
                    mixed_fleet()).fits


# ---- nothing fits ------------------------------------------------------------------------------

@pytest.mark.parametrize("uri,method,blocks,expect", [
    ("hf://meta-llama/Llama-3.1-70B", "full", {}, "method"),
    ("hf://Qwen/Qwen2.5-7B", "lora", {"training": {"maxSeqLength": 32768}}, "maxSeqLength"),
    ("hf://meta-llama/Llama-3.1-8B", "lora", {"training": {"microBatchSize": 16, "gradientCheckpointing": False}},
     "gradientCheckpointing"),
])
def test_nothing_fits_gives_numbers_and_a_suggestion_that_fits(uri, method, blocks, expect):
    l4_only = fleet_from_nodes([node(f"l4-{i}", "NVIDIA-L4", 1, 23034, host_memory="192Gi") for i in range(2)])
    spec = job(uri, method, **blocks)
    d = size_job(spec, l4_only)
    assert not d.fits
    assert "needs at least" in d.message and "GiB per GPU" in d.message and "22.49 GiB" in d.message
    assert expect in d.suggestion
    fixed = size_job(apply_patch(spec, d.suggestion_patch), l4_only)
    assert fixed.fits and fixed.estimate.total <= fixed.usable_bytes
    status = d.to_status()
    assert status["fits"] is False and status["suggestion"] == d.suggestion


# ---- CPU runs ----------------------------------------------------------------------------------

TINY_HINTS = {"family": "llama", "hiddenSize": 64, "intermediateSize": 128, "numHiddenLayers": 2,
              "numAttentionHeads": 4, "numKeyValueHeads": 2, "vocabSize": 1000}


def test_explicit_cpu_run_even_with_gpu_nodes():
    spec = job("pvc://demo/models/tiny", "lora", resources={"gpusPerPod": 0, "pods": 1, "cpu": "2", "memory": "4Gi"},
               model={"uri": "pvc://demo/models/tiny", "architecture": TINY_HINTS})
    d = size_job(spec, mixed_fleet())
    assert d.fits and d.device == "cpu" and d.gpus_per_pod == 0 and d.pods == 1 and not d.node_selector
    assert d.estimate is not None and d.estimate.total_params > 0
    assert d.to_status()["device"] == "cpu"


def test_cpu_run_without_architecture_is_not_estimated():
    spec = job("pvc://demo/models/tiny", "lora", resources={"pods": 1, "cpu": "2"})
    d = size_job(spec, mixed_fleet())
    assert d.fits and d.device == "cpu" and d.estimate is None


def test_cpu_run_over_memory_limit():
    spec = job("hf://Qwen/Qwen2.5-0.5B", "full", resources={"pods": 1, "cpu": "8", "memory": "2Gi"})
    d = size_job(spec, mixed_fleet())
    assert not d.fits and "resources.memory" in d.message and d.suggestion_patch["resources"]["memory"].endswith("Gi")


def test_no_gpu_nodes_real_model_does_not_fit_tiny_model_runs_on_cpu():
    cpu_only = fleet_from_nodes([node("cpu-0")])
    real = size_job(job("hf://meta-llama/Llama-3.1-8B", "lora"), cpu_only)
    assert not real.fits and "no schedulable GPU nodes" in real.message
    tiny = size_job(job("pvc://m/tiny", "lora", model={"uri": "pvc://m/tiny", "architecture": TINY_HINTS}), cpu_only)
    assert tiny.fits and tiny.device == "cpu"


def test_unknown_model_on_gpu_cluster_raises_with_what_to_add():
    with pytest.raises(ArchitectureError, match="spec.model.architecture"):
        size_job(job("hf://acme/secret-model", "lora"), mixed_fleet())


# ---- status ------------------------------------------------------------------------------------

def test_to_status_is_camelcase_json_with_breakdown():
    d = size_job(job("hf://meta-llama/Llama-3.1-8B", "full"), mixed_fleet())
    status = json.loads(json.dumps(d.to_status()))
    for key in ("fits", "gpuType", "gpusPerPod", "pods", "totalGpus", "gpuMemoryBytes", "distributed", "nodeSelector",
                "reason", "message", "suggestion", "estimate"):
        assert key in status
    est = status["estimate"]
    b = est["breakdownBytes"]
    assert b["total"] == est["perGpuBytes"] == sum(v for k, v in b.items() if k != "total")
    assert set(est["breakdownGiB"]) == set(b)
    assert est["perGpuBytes"] <= est["usableBytes"] <= status["gpuMemoryBytes"]
    assert "\n" not in status["reason"] and "GiB" in status["reason"]
    assert status["distributed"]["zeroStage"] == d.distributed["zeroStage"]


def test_memory_quantities():
    assert parse_memory_quantity("4Gi") == 4 * GiB
    assert parse_memory_quantity("512Mi") == 512 * 1024**2
    assert parse_memory_quantity("8G") == 8 * 10**9
    assert parse_memory_quantity("") == 0


def test_cpu_offload_is_bounded_by_host_memory():
    def l4s(mem):
        return fleet_from_nodes([node(f"l4-{i}", "NVIDIA-L4", 1, 23034, host_memory=mem) for i in range(2)])

    spec = job("hf://meta-llama/Llama-3.1-70B", "full")
    big_hosts = size_job(spec, l4s("2048Gi"))  # ZeRO-3 with parameter offload: GPU holds the working set only
    assert big_hosts.fits and big_hosts.distributed["offloadParams"]
    assert big_hosts.estimate.host_offload > 300 * GiB
    small_hosts = size_job(spec, l4s("192Gi"))
    assert not small_hosts.fits and "host RAM" in small_hosts.message
