"""On a CUDA GPU: bench/vram_accuracy.py measures three qwen2.5-0.5b configurations (full without
gradient checkpointing, LoRA and QLoRA with it) and each estimate of the operator's sizer must be within
the accuracy target (-5% .. +10% of the measured peak reserved memory and of the measured total)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

pytestmark = [pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "vram_accuracy.py"
CONFIGS = ("qwen2.5-0.5b-full-s1024-b2-nogc", "qwen2.5-0.5b-lora-s2048-b4-gc", "qwen2.5-0.5b-qlora-s2048-b2-gc")


def _bench():
    return load_module_from_file("vram_accuracy_bench_gpu", BENCH)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("vram")
    out = tmp / "vram_accuracy.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--configs", ",".join(CONFIGS), "--out", str(out),
                           "--model-cache", str(tmp / "models"), "--timeout", "600"],
                          capture_output=True, text=True, timeout=840, cwd=REPO)
    assert proc.returncode in (0, 1), f"benchmark crashed (exit {proc.returncode}):\n{proc.stderr[-5000:]}"
    assert out.is_file(), proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    doc["_stdout"] = proc.stdout
    return doc


def test_results_file_records_device_versions_and_every_row(results):
    bench = _bench()
    assert results["benchmark"] == "vram_accuracy"
    assert results["device"]["deviceName"], results["device"]
    assert results["device"]["deviceMemoryBytes"] > 0
    for pkg in ("torch", "transformers", "peft", "bitsandbytes"):
        assert results["versions"][pkg], pkg
    assert [r["config"]["id"] for r in results["rows"]] == list(CONFIGS)
    assert bench.device_slug(results["device"]["deviceName"])


@pytest.mark.parametrize("config_id", CONFIGS)
def test_estimate_within_target(results, config_id):
    row = next(r for r in results["rows"] if r["config"]["id"] == config_id)
    assert row["status"] == "ok", row.get("error", "")[-3000:]
    m = row["measured"]
    assert m["lossesFinite"] and len(m["losses"]) == results["stepsPerConfig"], m["losses"]
    assert m["tokens"] == m["expectedTokens"], "rows were not all maxSeqLength tokens long"
    assert m["trainableParams"] == row["estimatedTrainableParams"]
    assert m["precision"] == "bf16"
    assert m["outsideAllocatorBytes"] is not None, "nvidia-smi is needed to measure the CUDA context"
    table = results["_stdout"]
    for key in ("reserved", "total"):
        err = row["errorPct"][key]
        assert -5.0 <= err <= 10.0, f"{config_id}: {key} estimate off by {err:+.1f}%\n{table}"
    assert row["pass"] is True, table
