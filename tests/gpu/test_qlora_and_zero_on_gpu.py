"""On a CUDA GPU, through the trainer's pod entrypoint (`kubetune-train launch`, as the CPU tests in
tests/trainer/ run it):

- QLoRA (bitsandbytes NF4 + double quantization, bf16 compute) of the real qwen2.5-0.5b architecture with
  random weights for a few steps: finite losses, the adapter is written, and every decoder linear was
  really stored in 4 bit (the trainer's logged parameter count is the packed one);
- a one-process DeepSpeed ZeRO-2 run on the GPU (bf16): succeeds, loss falls, the adapter is written.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

pytestmark = [pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[2]
QLORA_STEPS = 6
ZERO_STEPS = 30


support = load_module_from_file("kubetune_tests_trainer_support", REPO / "tests" / "trainer" / "_support.py")
bench = load_module_from_file("vram_accuracy_bench_gpu2", REPO / "bench" / "vram_accuracy.py")


def gpu_env(tmp: Path, plan_path: Path) -> dict[str, str]:
    """The CPU tests' trainer environment, minus their DeepSpeed CPU accelerator, for one local process."""
    env = support.trainer_env(tmp, plan_path, KUBETUNE_NUM_NODES="1", KUBETUNE_NODE_RANK="0",
                              KUBETUNE_PROCS_PER_NODE="1", KUBETUNE_MASTER_ADDR="127.0.0.1",
                              KUBETUNE_MASTER_PORT=str(support.free_port()))
    env.pop("DS_ACCELERATOR", None)
    return env


def check_success(proc, tmp: Path, out: Path, steps: int) -> dict:
    assert proc.returncode == 0, proc.stderr[-5000:]
    summary = support.read_summary(tmp)
    assert summary["status"] == "Succeeded", summary
    assert summary["step"] == steps
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    losses = support.losses(metrics)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses), losses
    assert metrics["precision"] == "bf16"
    assert metrics["peakGpuMemoryBytes"] > 0, "the run did not use the GPU"
    return metrics


def test_qlora_nf4_double_quant_bf16_on_qwen2_5_0_5b(tmp_path):
    from safetensors import safe_open

    from kubetune.sizing import lookup_catalog
    from kubetune.sizing.params import lora_trainable_params

    model_dir = tmp_path / "qwen2.5-0.5b"
    build = subprocess.run([sys.executable, str(REPO / "bench" / "vram_accuracy.py"), "--_build", "qwen2.5-0.5b",
                            str(model_dir)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    data = support.write_dataset(tmp_path / "data.jsonl", n=64)
    out = tmp_path / "out"
    plan = support.make_plan(model_dir, data, out, "qlora", maxSteps=QLORA_STEPS, microBatchSize=4,
                             maxSeqLength=128, learningRate=1e-3, gradientCheckpointing=True)
    plan["quantization"] = {"bits": 4, "quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}
    plan_path = support.write_plan(tmp_path / "plan.json", plan)
    proc = support.run_trainer(["launch"], gpu_env(tmp_path, plan_path), timeout=900)
    metrics = check_success(proc, tmp_path, out, QLORA_STEPS)
    assert metrics["method"] == "qlora"

    # bitsandbytes packs two 4-bit weights per uint8, so with every decoder linear quantized the model
    # reports (all - quantizable) + quantizable / 2 + adapter parameters.
    arch = lookup_catalog("qwen2.5-0.5b")
    r, targets = plan["lora"]["r"], plan["lora"]["targetModules"]
    n_lora = lora_trainable_params(arch, targets, r)
    found = re.search(r"method qlora: (\d+) trainable of (\d+) parameters; precision (\w+)", proc.stderr)
    assert found, proc.stderr[-3000:]
    trainable, total, precision = int(found[1]), int(found[2]), found[3]
    assert trainable == n_lora
    packed = arch.total_params() - arch.quantizable_params() + arch.quantizable_params() // 2 + n_lora
    assert total == packed, f"{total} parameters reported; {packed} expected with every linear in 4 bit"
    assert precision == "bf16"

    adapter = out / "final" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == r
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    per_layer = len(arch.layer_linears())
    assert len(keys) == 2 * per_layer * arch.num_hidden_layers, len(keys)


def test_deepspeed_zero2_one_process_on_gpu(tmp_path):
    model_dir = support.build_model(tmp_path / "model")
    data = support.write_dataset(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    plan = support.make_plan(model_dir, data, out, "lora", maxSteps=ZERO_STEPS, microBatchSize=8,
                             gradientAccumulationSteps=2, checkpointEverySteps=20)
    plan["distributed"].update(strategy="deepspeed", zeroStage=2, numNodes=1, procsPerNode=1)
    plan_path = support.write_plan(tmp_path / "plan.json", plan)
    proc = support.run_trainer(["launch"], gpu_env(tmp_path, plan_path), timeout=900)
    metrics = check_success(proc, tmp_path, out, ZERO_STEPS)
    assert metrics["strategy"] == "deepspeed" and metrics["zeroStage"] == 2 and metrics["worldSize"] == 1
    losses = support.losses(metrics)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    assert (out / "checkpoints" / "step-20" / "deepspeed").is_dir()
