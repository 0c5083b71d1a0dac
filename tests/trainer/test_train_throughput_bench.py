"""bench/train_throughput.py: the pure FLOPs/MFU/rate helpers, and a --quick CPU run whose JSON must be complete
and show the kubetune trainer at no less than half the plain Hugging Face baseline's tokens/s."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "train_throughput.py"
MIN_SPEED_RATIO = 0.5


def _bench():
    return load_module_from_file("train_throughput_bench", BENCH)


@pytest.mark.unit
@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("NVIDIA GeForce GTX 1080", None),
])
def test_peak_table_matches_device_names(name, peak):
    assert _bench().peak_bf16_tflops(name) == peak


@pytest.mark.unit
def test_training_flops_full_lora_and_mfu():
    b = _bench()
    n, n_lora, tokens, layers, width, sq = 1_000_000, 10_000, 512, 4, 256, 4 * 128 * 128
    attention = 12.0 * layers * width * sq
    assert b.training_flops("full", n, n, tokens, layers, width, sq) == 6.0 * n * tokens + attention
    lora = (4.0 * n + 6.0 * n_lora) * tokens + attention
    assert b.training_flops("lora", n, n_lora, tokens, layers, width, sq) == lora
    assert b.training_flops("qlora", n, n_lora, tokens, layers, width, sq) == b.training_flops(
        "lora", n, n_lora, tokens, layers, width, sq)
    with pytest.raises(ValueError):
        b.training_flops("prefix", n, n, tokens, layers, width, sq)
    assert b.mfu(989e12, 2.0, 989.0) == pytest.approx(0.5)
    assert b.mfu(1e12, 1.0, None) is None


@pytest.mark.unit
def test_rates_exclude_warmup_and_lengths_follow_position_restarts():
    b = _bench()
    times = [10.0, 11.0, 11.5, 12.0]  # end of each step; step 1 (warm-up) is slow
    tokens = [100, 100, 100, 200]
    tps, counted, seconds = b.windowed_rate(times, tokens, warmup=1)
    assert (counted, seconds) == (400, 2.0) and tps == 200.0
    assert b.median_step_rate(times, tokens, warmup=1) == 200.0  # per-step rates 200, 200, 400
    with pytest.raises(ValueError):
        b.windowed_rate(times, tokens, warmup=4)
    assert b.example_lengths(5, None) == [5]
    assert b.example_lengths(7, [0, 1, 2, 0, 1, 0, 1]) == [3, 2, 2]


@pytest.mark.unit
def test_rows_per_device_and_row_selection():
    b = _bench()
    names = lambda rows: [name for name, _, _ in rows]  # noqa: E731
    assert names(b.scenarios("cpu")) == ["default", "packing", "gradient_checkpointing", "eager", "torch_compile"]
    assert names(b.scenarios("cpu", quick=True)) == ["default", "packing", "gradient_checkpointing", "eager"]
    assert names(b.scenarios("cuda")) == ["default", "packing", "gradient_checkpointing", "eager", "torch_compile",
                                          "liger", "fp32"]
    overrides = {name: o for name, _, o in b.scenarios("cuda")}
    assert overrides["eager"] == {"attentionImplementation": "eager"} and overrides["default"] == {}
    assert overrides["torch_compile"] == {"torchCompile": True} and overrides["liger"] == {"ligerKernels": True}
    assert names(b.select_rows(b.scenarios("cpu"), "torch_compile")) == ["default", "torch_compile"]
    assert names(b.select_rows(b.scenarios("cpu"), "")) == names(b.scenarios("cpu"))
    with pytest.raises(SystemExit, match="liger"):
        b.select_rows(b.scenarios("cpu"), "liger")


@pytest.mark.unit
def test_quantized_weights_count_their_logical_elements():
    from types import SimpleNamespace

    b = _bench()
    packed = SimpleNamespace(quant_state=SimpleNamespace(shape=(64, 32)), numel=lambda: 1024)
    assert b._logical_numel(packed) == 2048
    assert b._logical_numel(SimpleNamespace(numel=lambda: 10)) == 10


@pytest.mark.trainer
@pytest.mark.slow
def test_quick_cpu_run_is_complete_and_kubetune_keeps_pace_with_the_baseline(tmp_path):
    out = tmp_path / "tt.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--device", "cpu", "--model", "tiny",
                           "--method", "lora", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert time.monotonic() - started < 300

    assert report["benchmark"] == "train_throughput" and report["config"]["device"] == "cpu"
    assert report["config"]["method"] == "lora" and report["config"]["quick"] is True
    machine = report["machine"]
    assert machine["cpuCount"] >= 1 and machine["cpuModel"] and machine["versions"]["torch"]
    names = [row["name"] for row in report["rows"]]
    assert names == ["default", "packing", "gradient_checkpointing", "eager"]
    assert set(report["featureRowsLeftOut"]) == {"torch_compile", "liger", "fp32"}
    timed_steps = report["config"]["steps"] - report["config"]["warmupSteps"]
    for row in report["rows"]:
        kt, hf = row["kubetune"], row["baseline"]
        for side in (kt, hf):
            assert side["tokensPerSecond"] > 0 and side["medianStepTokensPerSecond"] > 0
            assert side["timedTokens"] > 0 and side["timedSeconds"] > 0 and side["timedSteps"] == timed_steps
            assert side["peakRssBytes"] > 100 * 2**20
            assert side["modelTflopsPerSecond"] > 0 and side["mfu"] is None  # no GPU peak on CPU
            assert side["lastLoss"] < side["firstLoss"], f"{row['name']}: {side['side']} did not train"
            assert side["gradientCheckpointingActive"] is (row["name"] == "gradient_checkpointing")
        # Same model and method on both sides: the same trainable LoRA parameters out of the same model.
        assert kt["trainableParameters"] == hf["trainableParameters"] > 0
        assert kt["parameters"] == hf["parameters"] > kt["trainableParameters"]
        # What each side really ran with: eager only in the eager row, transformers' default (sdpa) elsewhere.
        assert kt["attnImplementation"] == hf["attnImplementation"] == ("eager" if row["name"] == "eager" else "sdpa")
        assert kt["torchCompile"] is hf["torchCompile"] is False and kt["ligerKernels"] is hf["ligerKernels"] is False
        assert row["ratio"]["tokensPerSecond"] == pytest.approx(kt["tokensPerSecond"] / hf["tokensPerSecond"], rel=1e-3)
        assert row["ratio"]["peakMemory"] > 0
    default, packing = report["rows"][0], report["rows"][1]
    assert packing["kubetune"]["paddingFraction"] < default["kubetune"]["paddingFraction"]
    assert packing["baseline"]["paddingFraction"] == 0.0
    assert set(report["featureEffects"]) == {"packing", "gradient_checkpointing", "eager"}

    # Speed: per-step medians (robust to other jobs' bursts on a shared runner); window ratio in the message.
    speed = default["ratio"]["medianStepTokensPerSecond"]
    assert speed >= MIN_SPEED_RATIO, (
        f"kubetune trains at {speed:.2f}x the plain transformers baseline's tokens/s (window ratio "
        f"{default['ratio']['tokensPerSecond']:.2f}); expected at least {MIN_SPEED_RATIO}x")
