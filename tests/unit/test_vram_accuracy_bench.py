"""bench/vram_accuracy.py without a GPU: the --dry-run lists enough configurations (methods, checkpointing,
architectures) with the operator's estimates, and a real run refuses to start without CUDA (exit 2, a
clear message, no results file); plus the pure error/target helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench" / "vram_accuracy.py"


def _bench():
    return load_module_from_file("vram_accuracy_bench_unit", BENCH)


def _no_cuda_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU visible, even on a GPU machine
    return env


@pytest.fixture(scope="module")
def dry_run() -> dict:
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--json"], capture_output=True, text=True,
                          timeout=300, env=_no_cuda_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_dry_run_lists_enough_configurations(dry_run):
    rows = dry_run["rows"]
    configs = [r["config"] for r in rows]
    assert len(configs) >= 8
    assert {c["method"] for c in configs} == {"full", "lora", "qlora"}
    assert {c["gradient_checkpointing"] for c in configs} == {True, False}
    assert len({c["model"] for c in configs}) >= 2
    assert len({c["seq_length"] for c in configs}) >= 2 and len({c["micro_batch_size"] for c in configs}) >= 2
    assert len({c["id"] for c in configs}) == len(configs)


def test_dry_run_estimates_match_the_operator_and_the_built_models(dry_run):
    from kubetune.sizing import Parallelism, estimate_memory, lookup_catalog, setup_from_spec

    bench = _bench()
    for row in dry_run["rows"]:
        cfg = row["config"]
        arch = lookup_catalog(cfg["model"])
        assert 0.4e9 <= arch.total_params() <= 8.1e9, cfg["model"]
        # the model transformers builds from the catalog config has exactly the estimator's parameter count
        assert row["builtParams"] == row["totalParams"] == arch.total_params()
        spec = bench.bench_spec(bench.BenchConfig(**cfg), "/m", "/d.jsonl", "/o", dry_run["stepsPerConfig"])
        est = estimate_memory(arch, setup_from_spec(spec), Parallelism())
        assert row["estimate"]["total"] == est.total and row["estimate"]["reserved"] == est.reserved
        assert row["estimate"]["tensors"] == est.tensors
        assert est.total < 70 * 1024 ** 3, f"{cfg['id']} would not fit an 80 GB GPU"


def test_real_run_without_cuda_exits_with_message_and_writes_nothing(tmp_path):
    out = tmp_path / "results.json"
    results = REPO / "bench" / "results"
    before = sorted(results.glob("vram_accuracy-*")) if results.is_dir() else []
    proc = subprocess.run([sys.executable, str(BENCH), "--configs", "qwen2.5-0.5b-lora-s2048-b4-gc", "--out",
                           str(out)], capture_output=True, text=True, timeout=300, env=_no_cuda_env(), cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "no CUDA GPU is available" in proc.stderr
    assert not out.exists()
    after = sorted(results.glob("vram_accuracy-*")) if results.is_dir() else []
    assert after == before


def test_unknown_configuration_is_rejected():
    proc = subprocess.run([sys.executable, str(BENCH), "--dry-run", "--configs", "nope"], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "unknown configuration 'nope'" in proc.stderr


def test_error_and_target_helpers():
    bench = _bench()
    assert bench.error_pct(110, 100) == pytest.approx(10.0)
    assert bench.error_pct(95, 100) == pytest.approx(-5.0)
    assert bench.within_target(10.0) and bench.within_target(-5.0) and bench.within_target(0.0)
    assert not bench.within_target(10.01) and not bench.within_target(-5.01)
    with pytest.raises(ValueError):
        bench.error_pct(1, 0)
    est = {"tensors": 90, "reserved": 104, "total": 120}
    ok = bench.row_verdict(est, {"tensors": 100, "reserved": 100, "total": 118})
    assert ok["pass"] and ok["errorPct"]["tensors"] == -10.0 and ok["withinTarget"] == {
        "tensors": False, "reserved": True, "total": True}
    assert not bench.row_verdict(est, {"tensors": 100, "reserved": 94, "total": 118})["pass"]  # +10.6% reserved
    assert not bench.row_verdict(est, {"tensors": 100, "reserved": 100, "total": 127})["pass"]  # -5.5% total
    assert not bench.row_verdict(est, {"tensors": 100, "reserved": 100, "total": None})["pass"]  # not measured
    assert bench.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
