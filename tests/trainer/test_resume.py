"""Run control: a LoRA run preempted (SIGTERM) mid-step checkpoints that step and resumes there (not step 0,
ignoring and removing incomplete checkpoints) and ends exactly where an uninterrupted run ends; the termination
summary is valid JSON under 4 KiB (docs/contracts.md §4, §5, §6)."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import pytest

from kubetune_trainer import checkpoints
from kubetune_trainer.summary import MAX_SUMMARY_BYTES, build_summary, encode_summary, failure_summary, write_summary

from ._support import build_model, make_plan, use_trainer_env, write_dataset, write_plan

SUMMARY_KEYS = {"version", "status", "reason", "message", "step", "totalSteps", "epoch", "trainLoss", "evalLoss",
                "perplexity", "tokens", "runtimeSeconds", "tokensPerSecond", "steadyTokensPerSecond", "artifacts",
                "checkpoint"}


# ----------------------------------------------------------------------------- checkpoint directory rules (pure)

def _complete(root: Path, step: int) -> Path:
    path = checkpoints.step_dir(root, step)
    path.mkdir(parents=True)
    checkpoints.write_state(path, {"step": step})
    return path


@pytest.mark.unit
def test_latest_checkpoint_ignores_temp_and_stateless_dirs(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoints.latest_checkpoint(root) is None
    _complete(root, 2)
    _complete(root, 10)
    checkpoints.prepare_temp(root, 12)                # a save that crashed before the rename
    (checkpoints.step_dir(root, 14)).mkdir()          # no trainer_state.json: never completed
    (root / "step-x").mkdir()
    assert checkpoints.latest_checkpoint(root) == (10, root / "step-10")  # numeric, not lexical order
    assert [s for s, _ in checkpoints.complete_checkpoints(root)] == [2, 10]


@pytest.mark.unit
def test_publish_is_atomic_and_prune_keeps_the_newest(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _complete(root, step)
    tmp = checkpoints.prepare_temp(root, 4)
    (tmp / "weights").write_text("w")
    assert checkpoints.latest_checkpoint(root)[0] == 3  # not visible before the state marker + rename
    checkpoints.write_state(tmp, {"step": 4})
    assert checkpoints.publish(root, 4) == root / "step-4" and not tmp.exists()
    assert (root / "step-4" / "weights").read_text() == "w"
    checkpoints.prepare_temp(root, 2)  # stale temp older than the newest checkpoint
    checkpoints.prepare_temp(root, 9)  # a save in progress for a later step must survive
    removed = checkpoints.prune(root, keep=2)
    assert {p.name for p in removed} == {"step-1", "step-2", ".tmp-step-2"}
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-9", "step-3", "step-4"]


# ----------------------------------------------------------------------------- summary (pure)

@pytest.mark.unit
@pytest.mark.parametrize("message,uri_len", [("x" * 20000, 40), ("🙂 données " * 3000, 40), ("ok", 3000),
                                             ("🙂" * 5000, 3000)])
def test_summary_is_valid_json_under_4kib_whatever_the_sizes(tmp_path, message, uri_len):
    uri = "pvc://outputs/" + "🙂é" * (uri_len // 2)
    summary = build_summary(status="Failed", reason="DataError", message=message, step=3, total_steps=9,
                            train_loss=float("nan"), eval_loss=float("inf"),
                            artifacts={"adapter": uri + "/final/adapter", "merged": uri + "/final/merged",
                                       "model": uri + "/final/model", "metrics": uri + "/final/metrics.json",
                                       "bogus": "dropped"},
                            checkpoint={"step": 2, "uri": uri + "/checkpoints/step-2"})
    path = write_summary(summary, tmp_path / "dev" / "termination-log")
    raw = path.read_bytes()
    assert len(raw) < MAX_SUMMARY_BYTES
    decoded = json.loads(raw.decode("utf-8"))
    assert set(decoded) == SUMMARY_KEYS and decoded["reason"] == "DataError" and decoded["step"] == 3
    assert decoded["trainLoss"] is None and decoded["evalLoss"] is None  # NaN/inf are not JSON
    assert set(decoded["artifacts"]) == {"adapter", "merged", "model", "metrics"}
    assert decoded["message"][:1] == message[:1]  # the start of the message (what and where) survives
    assert decoded["artifacts"]["adapter"].startswith("pvc://outputs/")


@pytest.mark.unit
def test_failure_summary_reasons():
    from kubetune_trainer.errors import DataError

    data = failure_summary(DataError("invalid JSON", path="pvc://data/train.jsonl", line=7), step=0)
    assert data["reason"] == "DataError" and data["message"] == "pvc://data/train.jsonl:7: invalid JSON"
    oom = failure_summary(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom["reason"] == "OutOfMemory" and oom["message"].startswith("RuntimeError: ")
    other = failure_summary(ValueError("boom"))
    assert other["reason"] == "TrainingError" and other["status"] == "Failed"
    assert len(encode_summary(data)) < MAX_SUMMARY_BYTES


# ----------------------------------------------------------------------------- preemption and resume (tiny LoRA run)

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("resume-assets")
    return build_model(root / "model", hidden=32), write_dataset(root / "data.jsonl", n=48)


def _run(tmp: Path, monkeypatch, plan: dict, metrics_port: str | None = None) -> tuple[int, dict]:
    from kubetune_trainer import cli

    tmp.mkdir(parents=True, exist_ok=True)
    use_trainer_env(monkeypatch, tmp, write_plan(tmp / "plan.json", plan))
    if metrics_port is not None:
        monkeypatch.setenv("KUBETUNE_METRICS_PORT", metrics_port)
    code = cli.run_worker()
    raw = (tmp / "termination-log").read_bytes()
    assert len(raw) < MAX_SUMMARY_BYTES
    summary = json.loads(raw)
    assert set(summary) == SUMMARY_KEYS and summary["version"] == 1
    return code, summary


def _get_json(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return json.loads(resp.read())


def _get_text(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.read().decode()


@pytest.mark.trainer
def test_preempted_run_resumes_from_latest_complete_checkpoint(assets, tmp_path, monkeypatch):
    from kubetune_trainer import recipe as recipe_mod

    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=8, checkpointEverySteps=2, microBatchSize=4,
                     learningRate=5e-3)

    # 1. Preemption: SIGTERM arrives during step 5 (after the step-4 checkpoint; the real signal handler of
    # run_worker). Every rank finishes step 5, a checkpoint of step 5 is written, and the run exits Preempted.
    original_micro = recipe_mod.FineTuneRecipe.micro_batch

    def micro_then_preempt(self, index):
        if index == 4 and not self.stop.requested:  # the first micro-batch of step 5 (one micro-batch a step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original_micro(self, index)

    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "micro_batch", micro_then_preempt)
    code, first = _run(tmp_path / "first", monkeypatch, plan)
    assert code == 75, "a preempted run exits with the Preempted code (not counted as a failure)"
    assert first["status"] == "Failed" and first["reason"] == "Preempted"
    assert "stopped by SIGTERM at step 5" in first["message"]
    assert first["step"] == 5 and first["checkpoint"] == {"step": 5, "uri": f"{out}/checkpoints/step-5"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert not (out / "final").exists()
    state5 = checkpoints.read_state(out / "checkpoints" / "step-5")
    assert state5["step"] == 5 and [h["step"] for h in state5["history"]] == [1, 2, 3, 4, 5]

    # Leftovers the restart must not trust: a temp dir from a save that died and a step dir without state.
    junk = checkpoints.prepare_temp(out / "checkpoints", 6)
    (junk / "garbage.bin").write_bytes(b"\0" * 16)
    (out / "checkpoints" / "step-7").mkdir()

    # 2. Restart (what the Job's retry does): same plan, same output. Observe /progress right after resuming.
    seen: dict = {}
    original_resume = recipe_mod.FineTuneRecipe._resume

    def resume_and_observe(self):
        original_resume(self)
        seen["step"] = self.step
        seen["progress"] = _get_json(self.server.port, "/progress")

    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "micro_batch", original_micro)
    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "_resume", resume_and_observe)
    code, second = _run(tmp_path / "second", monkeypatch, plan, metrics_port="0")
    assert code == 0, second
    assert seen["step"] == 5, "did not resume from the latest complete checkpoint"
    assert seen["progress"]["phase"] == "resuming"
    assert seen["progress"]["checkpoint"] == {"step": 5, "uri": f"{out}/checkpoints/step-5"}
    assert second["status"] == "Succeeded" and second["step"] == second["totalSteps"] == 8
    assert second["checkpoint"] == {"step": 6, "uri": f"{out}/checkpoints/step-6"}
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["resumedFromStep"] == 5
    assert [h["step"] for h in metrics["history"]] == list(range(1, 9))
    assert metrics["history"][:5] == state5["history"]
    assert not (out / "checkpoints" / ".tmp-step-6").exists() and not (out / "checkpoints" / "step-7").exists()
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()

    # 3. The resumed run ends where an uninterrupted run ends: data position, optimizer, scheduler and RNG restored.
    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "_resume", original_resume)
    ref_out = tmp_path / "ref-out"
    code, ref = _run(tmp_path / "ref", monkeypatch, make_plan(model_dir, data, ref_out, "lora", maxSteps=8,
                                                              checkpointEverySteps=2, microBatchSize=4,
                                                              learningRate=5e-3))
    assert code == 0, ref
    ref_metrics = json.loads((ref_out / "final" / "metrics.json").read_text())
    assert ref_metrics["resumedFromStep"] == 0
    resumed = [h["loss"] for h in metrics["history"]]
    straight = [h["loss"] for h in ref_metrics["history"]]
    assert resumed == pytest.approx(straight, rel=1e-4, abs=1e-5)
    assert second["tokens"] == ref["tokens"]
    assert second["evalLoss"] == pytest.approx(ref["evalLoss"], rel=1e-4)


@pytest.mark.trainer
def test_live_metrics_during_training(assets, tmp_path, monkeypatch):
    """The recipe feeds the metrics server: at a checkpoint /progress and /metrics show the run's real state."""
    from prometheus_client.parser import text_string_to_metric_families

    from kubetune_trainer import recipe as recipe_mod

    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=4, checkpointEverySteps=3, microBatchSize=4)
    original_save = recipe_mod.FineTuneRecipe.save_checkpoint
    seen: dict = {}

    def save_and_observe(self):
        final = original_save(self)
        seen["progress"] = _get_json(self.server.port, "/progress")
        seen["metrics"] = {s.name: s.value for f in text_string_to_metric_families(_get_text(self.server.port,
                                                                                             "/metrics"))
                           for s in f.samples}
        seen["tokens"] = self.result.tokens
        seen["loss"] = self.result.train_loss
        return final

    monkeypatch.setattr(recipe_mod.FineTuneRecipe, "save_checkpoint", save_and_observe)
    code, summary = _run(tmp_path / "run", monkeypatch, plan, metrics_port="0")
    assert code == 0, summary
    progress, values = seen["progress"], seen["metrics"]
    assert progress["phase"] == "training" and progress["step"] == 3 and progress["totalSteps"] == 4
    assert progress["checkpoint"] == {"step": 3, "uri": f"{out}/checkpoints/step-3"}
    assert progress["tokens"] == seen["tokens"] > 0 and progress["trainLoss"] == pytest.approx(seen["loss"])
    assert progress["learningRate"] > 0 and progress["tokensPerSecond"] > 0 and progress["etaSeconds"] is not None
    assert values["kubetune_train_step"] == 3 and values["kubetune_train_total_steps"] == 4
    assert values["kubetune_train_tokens_total"] == seen["tokens"]
    assert values["kubetune_train_loss"] == pytest.approx(seen["loss"])
    assert values["kubetune_learning_rate"] == pytest.approx(progress["learningRate"])
