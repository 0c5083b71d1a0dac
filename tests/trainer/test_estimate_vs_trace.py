"""The operator's analytic estimate against the GPU-free trace of the trainer's real step (bench/estimate_vs_trace.py).

Every configuration of the benchmark (5 model families at their real width with 2 decoder layers; full, LoRA,
QLoRA; micro batch 1-4; sequences 512-8192; checkpointing on/off; packing; padded batches; ZeRO-1/2/3 per-rank
shares; Liger on/off; AdamW, SGD, 8-bit and paged optimizers; optimizer in backward; gradient accumulation) is
traced and estimated; each estimate must be within +5% / -2% of its traced figure.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("estimate_vs_trace", REPO / "bench" / "estimate_vs_trace.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["estimate_vs_trace"] = module
    spec.loader.exec_module(module)
    return module


def test_the_cases_cover_what_the_estimate_must_get_right():
    bench = _bench()
    cases = bench.CASES
    assert len(cases) >= 30
    families = {bench.FAMILIES[c.family]["model_type"] for c in cases}
    assert {"llama", "qwen2", "mistral", "mixtral", "phi3"} <= families
    assert {c.method for c in cases} == {"full", "lora", "qlora"}
    assert {c.micro_batch_size for c in cases} >= {1, 2, 3, 4}
    assert min(c.seq_length for c in cases) == 512 and max(c.seq_length for c in cases) == 8192
    assert {c.gradient_checkpointing for c in cases} == {True, False} and {c.packing for c in cases} == {True, False}
    assert {c.zero_stage for c in cases} == {0, 1, 2, 3} and {c.liger for c in cases} == {True, False}
    assert any(c.max_grad_norm == 0 for c in cases)  # optimizer in backward
    assert any(c.gradient_accumulation_steps > 1 for c in cases)
    assert {c.optimizer for c in cases} >= {"adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"}


def test_estimate_within_band_of_the_trace_for_every_case(tmp_path, capsys):
    bench = _bench()
    rows = bench.compare(bench.CASES, bench.DEFAULT_LAYERS, log=None)
    table = bench.format_table(rows)
    with capsys.disabled():
        print("\n" + table)
    out = tmp_path / "estimate_vs_trace.json"
    bench.write_results(rows, out, bench.DEFAULT_LAYERS, ["--out", str(out)])
    data = json.loads(out.read_text())["runs"][f"layers={bench.DEFAULT_LAYERS}"]
    assert len(data["rows"]) == len(bench.CASES)
    outside = [f"{r.case}: estimate {r.estimate_bytes:,} / trace {r.trace_bytes:,} = {r.ratio:.3f}"
               for r in rows if not r.ok]
    assert not outside, "estimate outside +5%/-2% of the trace:\n" + "\n".join(outside)
    assert data["allWithinBand"] is True
