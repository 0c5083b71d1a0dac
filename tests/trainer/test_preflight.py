"""`kubetune-train preflight`: the CPU check before any GPU pod. It reads the data with the trainer's own code,
names a bad line as file:line, and counts exactly the optimizer steps the training run then takes."""

from __future__ import annotations

import json

import pytest

from kubetune_trainer.preflight import encode_message, near_duplicate_count

from ._support import build_model, make_plan, read_summary, run_trainer, trainer_env, write_dataset, write_plan


def _message(tmp_path) -> dict:
    return json.loads((tmp_path / "termination-log").read_text())


@pytest.mark.trainer
def test_preflight_counts_the_steps_the_training_run_takes(tmp_path):
    pytest.importorskip("torch")
    model = build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "train.jsonl", n=90)
    # 2 processes, 1.5 epochs, micro 4, accumulation 3: the step formula has remainders everywhere.
    plan = make_plan(model, data, tmp_path / "out", epochs=1.5, maxSteps=0, microBatchSize=4,
                     gradientAccumulationSteps=3)
    plan["distributed"].update({"strategy": "ddp", "procsPerNode": 2})
    plan_path = write_plan(tmp_path / "plan.json", plan)
    env = trainer_env(tmp_path, plan_path, KUBETUNE_PROCS_PER_NODE="2")  # as the Job builder sets it
    pre = run_trainer(["preflight"], env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    msg = _message(tmp_path)
    assert msg["status"] == "Succeeded" and msg["reason"] == "Validated"
    report = msg["preflight"]
    assert report["examples"] == 90 and report["trainExamples"] + report["evalExamples"] == 90
    assert report["world"] == 2 and report["steps"] > 0 and report["tokens"] > report["tokensPerEpoch"]
    assert len(report["dataset"]["sha256"]) == 64 and report["model"]["modelType"] == "llama"
    assert report["tokenLengths"]["max"] >= report["tokenLengths"]["p50"] > 0
    # The real step traced on fake tensors for this model, micro batch and the data's longest row.
    trace = report["trace"]
    assert "skipped" not in trace, trace
    assert trace["peakBytes"] == sum(trace["breakdown"].values()) > 0 and trace["breakdown"]["weights"] > 0
    assert trace["microBatchSize"] == 4 and 0 < trace["seqLength"] <= min(report["tokenLengths"]["max"], 64)
    assert trace["basis"] == "one of 2 DDP processes" and trace["peakAt"] and trace["seconds"] > 0

    (tmp_path / "termination-log").unlink()
    run = run_trainer(["launch"], env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["status"] == "Succeeded"
    assert summary["totalSteps"] == summary["step"] == report["steps"]


@pytest.mark.trainer
def test_a_bad_line_fails_the_preflight_with_file_and_line(tmp_path):
    pytest.importorskip("torch")
    model = build_model(tmp_path / "model", hidden=32)
    data = write_dataset(tmp_path / "train.jsonl", n=20)
    lines = data.read_text().splitlines()
    lines[6] = '{"messages": [{"role": "user", "content": "unterminated'
    data.write_text("\n".join(lines) + "\n")
    env = trainer_env(tmp_path, write_plan(tmp_path / "plan.json", make_plan(model, data, tmp_path / "out")))
    pre = run_trainer(["preflight"], env)
    assert pre.returncode == 3, pre.stderr[-3000:]
    msg = _message(tmp_path)
    assert msg["status"] == "Failed" and msg["reason"] == "DataError"
    assert f"{data}:7" in msg["message"]
    assert not (tmp_path / "out").exists()  # nothing was written where the run puts its outputs


@pytest.mark.trainer
def test_truncation_and_near_duplicates_are_counted(tmp_path):
    pytest.importorskip("torch")
    model = build_model(tmp_path / "model", hidden=32)
    rows = [{"messages": [{"role": "user", "content": f"Spell out: {i % 7} {i % 3}"},
                          {"role": "assistant", "content": "word " * (3 + i % 40)}]} for i in range(60)]
    rows.append({"messages": [{"role": "user", "content": "SPELL out:  0 0!"},
                              {"role": "assistant", "content": "word word word"}]})  # near-duplicate of row 0
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = make_plan(model, data, tmp_path / "out", maxSeqLength=24)
    env = trainer_env(tmp_path, write_plan(tmp_path / "plan.json", plan))
    pre = run_trainer(["preflight"], env)
    assert pre.returncode == 0, pre.stderr[-3000:]
    report = _message(tmp_path)["preflight"]
    assert report["truncated"] > 0 and report["tokenLengths"]["max"] > 24
    assert report["truncatedLocations"][0].startswith(f"{data}:")
    assert report["nearDuplicates"] >= 1 + report["duplicates"]


@pytest.mark.unit
def test_near_duplicates_ignore_case_punctuation_and_spacing():
    from kubetune_trainer.data import Conversation, Message

    def ex(q: str, a: str) -> Conversation:
        return Conversation(messages=(Message("user", q), Message("assistant", a)))

    assert near_duplicate_count([ex("Hello, world", "Yes."), ex("hello   WORLD!", "yes"), ex("other", "yes")]) == 1


@pytest.mark.unit
def test_the_termination_message_stays_under_the_kubelet_limit():
    report = {"truncatedLocations": ["/data/" + "x" * 400 + f".jsonl:{i}" for i in range(10)],
              "emptyAnswerLocations": ["/data/" + "y" * 400 + f".jsonl:{i}" for i in range(10)], "steps": 7}
    data = encode_message({"version": 1, "status": "Succeeded", "preflight": report})
    assert len(data) < 4000
    decoded = json.loads(data)
    assert decoded["preflight"]["steps"] == 7 and len(decoded["preflight"]["truncatedLocations"]) <= 3
