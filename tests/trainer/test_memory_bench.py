"""bench/memory.py --quick: the kubetune trainer and the plain transformers + peft step traced side by side (fake
tensors, no GPU) write the results JSON, and the trainer's traced peak is at or below the baseline's for every
method of the quick preset; bench/memory_gpu.py refuses to run without CUDA and writes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.trainer

ROOT = Path(__file__).resolve().parents[2]
SIDE_KEYS = {"peakBytes", "peakGiB", "breakdown", "pagedOptimizerBytes", "peakAt", "attention", "trainableParams",
             "seconds", "notes"}


@pytest.mark.slow
def test_quick_memory_bench_writes_both_sides_and_kubetune_is_not_above_the_baseline(tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["schemaVersion"] == 1 and result["preset"] == "quick"
    assert "not a GPU measurement" in result["what"]
    methods = {row["case"]["method"] for row in result["cases"]}
    assert methods == {"lora", "qlora", "full"}
    for row in result["cases"]:
        ours, base = row["kubetune"], row["baseline"]
        assert SIDE_KEYS <= set(ours) and SIDE_KEYS <= set(base), row["id"]
        for side in (ours, base):
            assert side["peakBytes"] == sum(side["breakdown"].values()) > 0, (row["id"], side)
            assert side["breakdown"]["weights"] > 0
        # both sides train the same parameters, so the comparison is like for like
        assert ours["trainableParams"] == base["trainableParams"], row["id"]
        assert row["ratio"] == round(ours["peakBytes"] / base["peakBytes"], 4)
        assert ours["peakBytes"] <= base["peakBytes"], (row["id"], ours["peakGiB"], base["peakGiB"])
    full = next(r for r in result["cases"] if r["case"]["method"] == "full")
    assert full["kubetune"]["pagedOptimizerBytes"] > 0 and full["baseline"]["pagedOptimizerBytes"] > 0
    # the baseline keeps fp32 weights for full fine-tuning: twice the trainer's bf16 weights
    assert full["baseline"]["breakdown"]["weights"] > 1.9 * full["kubetune"]["breakdown"]["weights"]
    assert "llama-3.2-1b-4layers-lora-mbs2-seq1024-packed" in proc.stdout


def test_memory_gpu_refuses_clearly_without_cuda_and_writes_nothing(tmp_path):
    out = tmp_path / "memory_gpu.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_gpu.py"), "--configs", "qwen2.5-0.5b-lora*",
                           "--out", str(out)], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "no CUDA GPU is available" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()
