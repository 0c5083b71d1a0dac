"""Two training processes on one pod (gloo on CPU) through `kubetune-train launch`: plain DDP, DeepSpeed
ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator) each write one adapter; ZeRO-3 resumes exactly."""

from __future__ import annotations

import json
import shutil

import pytest

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

pytest.importorskip("torch")
pytest.importorskip("deepspeed")

from ._support import build_model, free_port, losses, make_plan, read_summary, run_trainer, trainer_env, write_dataset, write_plan  # noqa: E402,E501

STEPS = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl")


def launch_two(tmp_path, assets, strategy: str, zero_stage: int):
    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=STEPS, microBatchSize=4, checkpointEverySteps=10)
    plan["distributed"].update(strategy=strategy, zeroStage=zero_stage, procsPerNode=2)
    plan_path = write_plan(tmp_path / "plan.json", plan)
    env = trainer_env(tmp_path, plan_path, KUBETUNE_NUM_NODES="1", KUBETUNE_NODE_RANK="0",
                      KUBETUNE_PROCS_PER_NODE="2", KUBETUNE_MASTER_ADDR="127.0.0.1",
                      KUBETUNE_MASTER_PORT=str(free_port()))
    proc = run_trainer(["launch"], env, timeout=400)
    return proc, out, env


def check_run(proc, tmp_path, out, strategy: str) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(tmp_path)
    assert summary["status"] == "Succeeded", summary
    assert summary["step"] == STEPS
    finals = sorted(p.name for p in (out / "final").iterdir())
    assert finals == ["adapter", "metrics.json"]
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "checkpoints" / "step-10").is_dir()
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["worldSize"] == 2 and metrics["strategy"] == strategy
    assert "[rank 1]" in proc.stderr, "the second process did not run"
    return metrics


@pytest.fixture(scope="module")
def ddp_losses(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    proc, out, _ = launch_two(tmp, assets, "ddp", 0)
    return losses(check_run(proc, tmp, out, "ddp"))


def test_ddp_two_processes(ddp_losses):
    assert len(ddp_losses) == STEPS and ddp_losses[-1] < ddp_losses[0]


def test_deepspeed_zero2_two_processes_matches_ddp(assets, tmp_path, ddp_losses):
    proc, out, _ = launch_two(tmp_path, assets, "deepspeed", 2)
    metrics = check_run(proc, tmp_path, out, "deepspeed")
    assert metrics["zeroStage"] == 2
    assert losses(metrics) == pytest.approx(ddp_losses, rel=1e-3)


def test_deepspeed_zero3_two_processes_matches_ddp_and_resumes_exactly(assets, tmp_path, ddp_losses):
    proc, out, env = launch_two(tmp_path, assets, "deepspeed", 3)
    metrics = check_run(proc, tmp_path, out, "deepspeed")
    assert metrics["zeroStage"] == 3
    first = losses(metrics)
    assert first == pytest.approx(ddp_losses, rel=1e-3)
    # Restart the same job: it must continue from checkpoints/step-10 (weights, optimizer, LR, data position).
    shutil.rmtree(out / "final")
    (tmp_path / "termination-log").unlink()
    env["KUBETUNE_MASTER_PORT"] = str(free_port())
    again = run_trainer(["launch"], env, timeout=400)
    resumed = check_run(again, tmp_path, out, "deepspeed")
    assert resumed["resumedFromStep"] == 10
    assert [h["step"] for h in resumed["history"]] == list(range(1, STEPS + 1))
    assert losses(resumed)[10:] == pytest.approx(first[10:], rel=1e-4)
