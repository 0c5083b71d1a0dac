"""Failures that know they are permanent, trainer side: each reason has its exit code (the one the Job's pod
failure policy acts on), and a model whose architecture transformers cannot load ends as UnsupportedModel."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer import outcomes
from kubetune_trainer.summary import failure_summary
from kubetune_trainer.worker import exit_code_for

from ._support import build_model, make_plan, read_summary, run_trainer, trainer_env, write_dataset, write_plan


@pytest.mark.unit
def test_every_reason_has_one_exit_code_and_permanent_ones_are_distinct_from_retried():
    assert exit_code_for("Completed") == 0 and exit_code_for("Preempted") == 75
    assert exit_code_for("TrainingError") == exit_code_for("Unknown") == 1
    assert exit_code_for("OutOfMemory") == 9 and outcomes.REPLAN_EXIT_CODES == (9,)
    for reason in outcomes.PERMANENT_REASONS:
        assert exit_code_for(reason) in outcomes.PERMANENT_EXIT_CODES
    assert 1 not in outcomes.PERMANENT_EXIT_CODES and 75 not in outcomes.PERMANENT_EXIT_CODES


@pytest.mark.unit
def test_plain_os_errors_get_their_reason():
    import errno

    full = failure_summary(OSError(errno.ENOSPC, "No space left on device"))
    assert full["reason"] == "NoSpaceLeft"
    denied = failure_summary(PermissionError(errno.EACCES, "Permission denied", "/mnt/pvc/out/x"))
    assert denied["reason"] == "PermissionDenied"


@pytest.mark.trainer
def test_unknown_architecture_is_unsupported_model(tmp_path):
    pytest.importorskip("torch")
    model_dir = build_model(tmp_path / "model", hidden=32)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "architecture-from-the-future"
    (model_dir / "config.json").write_text(json.dumps(config))
    data = write_dataset(tmp_path / "data.jsonl", n=16)
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    proc = run_trainer(["run"], trainer_env(tmp_path, write_plan(tmp_path / "plan.json", plan)))
    summary = read_summary(tmp_path)
    assert proc.returncode == 8, proc.stderr[-3000:]
    assert summary["reason"] == "UnsupportedModel"
    assert "architecture-from-the-future" in summary["message"] and "cannot load" in summary["message"]


@pytest.mark.trainer
def test_dot_dot_in_the_output_uri_is_an_invalid_plan_not_a_retry(tmp_path):
    pytest.importorskip("torch")
    model_dir = build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "data.jsonl", n=16)
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["output"]["uri"] = "pvc://outputs/../other-team/run"
    proc = run_trainer(["run"], trainer_env(tmp_path, write_plan(tmp_path / "plan.json", plan)))
    summary = read_summary(tmp_path)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert summary["reason"] == "InvalidPlan" and "'..' is not allowed" in summary["message"]


@pytest.mark.trainer
def test_out_of_memory_exits_for_a_replan_and_the_leaner_plan_resumes(tmp_path):
    """A CUDA out-of-memory error at step 5 (injected through the plan's test-only `faults`) ends the run with
    reason OutOfMemory and exit code 9 (the Job's pod failure policy fails the Job; the operator re-plans); the
    plan the operator then writes (kubetune.oom: half the micro batch, twice the accumulation) resumes from the
    step-4 checkpoint and finishes."""
    pytest.importorskip("torch")
    oom = pytest.importorskip("kubetune.oom")
    from kubetune.api import parse_spec

    model_dir = build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "data.jsonl", n=48)
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=8, microBatchSize=8, gradientAccumulationSteps=1,
                     checkpointEverySteps=2)
    plan["faults"] = {"outOfMemoryAtStep": 5}
    first = tmp_path / "first"
    first.mkdir()
    proc = run_trainer(["run"], trainer_env(first, write_plan(first / "plan.json", plan)))
    summary = read_summary(first)
    assert proc.returncode == 9, proc.stderr[-3000:]
    assert summary["reason"] == "OutOfMemory" and "CUDA out of memory at step 5" in summary["message"]
    assert summary["message"].endswith("(microBatchSize 8)") and "peakGpuMemoryBytes" not in summary  # no GPU
    assert summary["step"] == 4 and summary["checkpoint"]["step"] == 4

    spec = parse_spec({"model": {"uri": "hf://x/y"}, "dataset": {"uri": "s3://d/x"}, "method": "lora",
                       "output": {"uri": "s3://o/x"},
                       "training": {"maxSteps": 8, "microBatchSize": 8, "gradientAccumulationSteps": 1}})
    training, change = oom.next_memory_plan(spec, [])
    assert change.startswith("microBatchSize 8 -> 4, gradientAccumulationSteps 1 -> 2")
    del plan["faults"]
    plan["training"].update(training)
    second = tmp_path / "second"
    second.mkdir()
    proc = run_trainer(["run"], trainer_env(second, write_plan(second / "plan.json", plan)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["resumedFromStep"] == 4 and [h["step"] for h in metrics["history"]] == list(range(1, 9))


@pytest.mark.unit
def test_oom_detail_names_the_measured_memory():
    from kubetune_trainer.worker import oom_detail

    assert oom_detail(75 * 2 ** 30, 80 * 2 ** 30, 8) == \
        " (peak 75.0 GiB allocated of 80.0 GiB on the GPU, microBatchSize 8)"
    assert oom_detail(0, 0, 4) == " (microBatchSize 4)"


@pytest.mark.unit
def test_the_oom_summary_carries_the_measured_peak_only_when_a_gpu_reported_one():
    from kubetune_trainer.worker import add_oom_detail

    summary = {"message": "CUDA out of memory"}
    add_oom_detail(summary, 75 * 2 ** 30, 80 * 2 ** 30, 8)
    assert summary == {"message": "CUDA out of memory (peak 75.0 GiB allocated of 80.0 GiB on the GPU, "
                                  "microBatchSize 8)", "peakGpuMemoryBytes": 75 * 2 ** 30}
    on_cpu = {"message": "CUDA out of memory"}
    add_oom_detail(on_cpu, 0, 0, 4)
    assert on_cpu == {"message": "CUDA out of memory (microBatchSize 4)"}
