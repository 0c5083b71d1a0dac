"""The preflight's memory trace (kubetune_trainer.preflight_trace): the plan's exact step at the data's sequence
length, the per-GPU share of a ZeRO world, and a clear skip reason (instead of a failed preflight) whenever the
trace cannot run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune_trainer.plan import parse_plan
from kubetune_trainer.preflight import encode_message
from kubetune_trainer.preflight_trace import (TRACE_SECONDS_ENV, per_rank, run_trace, trace_plan_dict,
                                              traced_seq_length, unsupported_layout)

from ._support import make_plan

MEMTRACE_REPORT = {"breakdown": {"weights": 1000, "gradients": 400, "optimizerStates": 800, "activations": 300},
                   "pagedOptimizerBytes": 80, "peakPhase": "step 2: optimizer step", "peakOp": "aten.add",
                   "peakWhere": "", "seqLength": 512, "microBatchSize": 2, "seconds": 3.5}


def _plan(tmp_path: Path, method: str = "lora", distributed: dict | None = None, **training):
    plan = make_plan(tmp_path / "model", tmp_path / "train.jsonl", tmp_path / "out", method=method, **training)
    if distributed:
        plan["distributed"].update(distributed)
    return parse_plan(plan)


@pytest.mark.unit
def test_the_trace_runs_at_the_longest_row_the_data_produces(tmp_path):
    assert traced_seq_length([30, 412, 97], 2048) == 412
    assert traced_seq_length([4096, 12], 2048) == 2048  # never above maxSeqLength
    assert traced_seq_length([], 1024) == 1024
    plan = _plan(tmp_path, maxSeqLength=2048, microBatchSize=2, gradientCheckpointing=True)
    traced = trace_plan_dict(plan, 412)
    assert traced["training"]["maxSeqLength"] == 412 and traced["training"]["microBatchSize"] == 2
    assert traced["training"]["gradientCheckpointing"] is True and traced["lora"]["r"] == 8
    assert plan.training.max_seq_length == 2048  # the plan itself is not changed


@pytest.mark.unit
def test_zero_shares_divide_what_deepspeed_partitions(tmp_path):
    one = per_rank(MEMTRACE_REPORT, _plan(tmp_path))
    assert one["peakBytes"] == 2500 and one["basis"] == "one process" and one["pagedOptimizerBytes"] == 80
    assert one["peakAt"] == "step 2: optimizer step / aten.add"
    zero2 = per_rank(MEMTRACE_REPORT, _plan(tmp_path, distributed={"strategy": "deepspeed", "zeroStage": 2,
                                                                   "procsPerNode": 4}))
    assert zero2["breakdown"] == {"weights": 1000, "gradients": 100, "optimizerStates": 200, "activations": 300}
    assert zero2["peakBytes"] == 1600 and zero2["pagedOptimizerBytes"] == 20 and "ZeRO-2 share of 4" in zero2["basis"]
    zero1 = per_rank(MEMTRACE_REPORT, _plan(tmp_path, distributed={"strategy": "deepspeed", "zeroStage": 1,
                                                                   "procsPerNode": 4}))
    assert zero1["breakdown"]["gradients"] == 400 and zero1["breakdown"]["optimizerStates"] == 200


@pytest.mark.unit
def test_layouts_the_one_process_trace_cannot_represent_are_skipped_with_the_reason(tmp_path, monkeypatch):
    full_ds = _plan(tmp_path, method="full", distributed={"strategy": "deepspeed", "zeroStage": 2, "procsPerNode": 2})
    assert "DeepSpeed full fine-tuning" in run_trace(full_ds, {}, 64)["skipped"]
    zero3 = _plan(tmp_path, distributed={"strategy": "deepspeed", "zeroStage": 3, "procsPerNode": 2})
    assert "ZeRO-3" in unsupported_layout(zero3)
    offload = _plan(tmp_path, distributed={"strategy": "deepspeed", "zeroStage": 2, "offloadOptimizer": True,
                                           "procsPerNode": 2})
    assert "offload" in unsupported_layout(offload)
    assert unsupported_layout(_plan(tmp_path, distributed={"strategy": "ddp", "procsPerNode": 2})) == ""
    monkeypatch.setenv(TRACE_SECONDS_ENV, "0")
    assert run_trace(_plan(tmp_path), {"model_type": "llama"}, 64) == {
        "skipped": f"the trace is turned off ({TRACE_SECONDS_ENV}=0)"}
    # The operator names why a layout needs no trace (a CPU-only one has no GPU memory to check).
    monkeypatch.setenv("KUBETUNE_PREFLIGHT_TRACE_SKIP", "a CPU-only layout: no GPU memory to check")
    monkeypatch.setenv(TRACE_SECONDS_ENV, "600")
    assert run_trace(_plan(tmp_path), {"model_type": "llama"}, 64) == {
        "skipped": "a CPU-only layout: no GPU memory to check"}


@pytest.mark.unit
def test_the_trace_fits_the_termination_message():
    trace = per_rank({**MEMTRACE_REPORT, "peakWhere": "model.layers.31.mlp.down_proj" * 20}, parse_plan(
        make_plan(Path("/m"), Path("/d.jsonl"), Path("/o"))))
    report = {"truncatedLocations": ["/data/" + "x" * 600 + f".jsonl:{i}" for i in range(10)], "trace": trace}
    decoded = json.loads(encode_message({"version": 1, "status": "Succeeded", "preflight": report}))
    assert decoded["preflight"]["trace"]["peakBytes"] == 2500 and len(trace["peakAt"]) <= 240


@pytest.mark.trainer
def test_an_unknown_model_type_is_a_clear_skip_not_a_failure(tmp_path):
    pytest.importorskip("torch")
    plan = _plan(tmp_path)
    config = {"model_type": "acme-brainwave", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}
    trace = run_trace(plan, config, 32, timeout=300)
    assert set(trace) == {"skipped"}
    assert "unknown model_type 'acme-brainwave'" in trace["skipped"] and "cannot build it" in trace["skipped"]
