"""The evaluation through the real trainer on CPU with the tiny model: the tuned model measurably beats the base,
a gate set above what it reached fails, the files and the summary say so; a bad evaluation file fails before
training; an evaluation that breaks keeps the trained artifacts."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

from kubetune_trainer import cli  # noqa: E402
from kubetune_trainer.evaluation import hook  # noqa: E402

from ._support import build_model, make_plan, read_summary, use_trainer_env, write_dataset, write_plan  # noqa: E402

ALL_METRICS = ["exactMatch", "tokenF1", "rougeL", "bleu", "chrf", "evalLoss", "perplexity"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl")


def evaluated_plan(assets, out, **evaluation):
    model_dir, data = assets
    plan = make_plan(model_dir, data, out, "lora", maxSteps=60)
    plan["evaluation"] = {"metrics": ALL_METRICS, "numExamples": 20, "maxNewTokens": 12, **evaluation}
    return plan


def run(tmp_path, monkeypatch, plan):
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    code = cli.run_worker()
    return code, read_summary(tmp_path)


def test_tuned_beats_base_and_a_gate_above_the_reached_improvement_fails(assets, tmp_path, monkeypatch):
    out = tmp_path / "out"
    plan = evaluated_plan(assets, out, gates=[{"metric": "evalLoss", "minImprovement": 1.0},
                                              {"metric": "tokenF1", "minImprovement": 0.99}],
                          maxGeneralRegression=1.0)
    code, summary = run(tmp_path, monkeypatch, plan)
    assert code == 0, summary
    assert summary["status"] == "Succeeded"  # a failed gate never fails the run
    doc = json.loads((out / "final" / "evaluation.json").read_text())
    rows = {r["metric"]: r for r in doc["metrics"]}
    assert set(rows) == set(ALL_METRICS)
    # The tiny model learns the spell-out task: answers get closer and the held-out loss drops a lot.
    assert rows["tokenF1"]["tuned"] > rows["tokenF1"]["base"] + 0.1, rows["tokenF1"]
    assert rows["rougeL"]["tuned"] > rows["rougeL"]["base"] + 0.1, rows["rougeL"]
    assert rows["evalLoss"]["tuned"] < rows["evalLoss"]["base"] - 1.0, rows["evalLoss"]
    assert rows["perplexity"]["tuned"] < rows["perplexity"]["base"]
    # Gates: the loss gate is below what was reached and passes; the F1 gate is above it and fails.
    gates = {g["metric"]: g for g in doc["gates"]}
    assert gates["evalLoss"]["passed"] and gates["evalLoss"]["reached"] >= 1.0
    assert not gates["tokenF1"]["passed"] and gates["tokenF1"]["reached"] < 0.99
    assert gates["generalRegression"]["passed"]
    assert doc["passed"] is False and "tokenF1 improvement" in doc["message"] and "FAILED" in doc["message"]
    # Same prompts for both models, every example recorded with both outputs.
    assert len(doc["examples"]) == 20 and all(e["base"] != e["tuned"] for e in doc["examples"])
    assert len(doc["generalProbeExamples"]) == 20 and doc["generalProbe"]["source"] == "builtin"
    reg = doc["regurgitation"]["tuned"]
    assert 0.0 <= reg["training"] <= 1.0 and 0.0 <= reg["heldOut"] <= 1.0
    # The summary carries the compact block, the artifacts name the files.
    ev = summary["evaluation"]
    assert ev["passed"] is False
    assert {r["metric"]: r.get("passed") for r in ev["metrics"]}["tokenF1"] is False
    assert summary["artifacts"]["evaluation"] == f"{out}/final/evaluation.json"
    assert summary["artifacts"]["report"] == f"{out}/final/report.md"
    assert len((tmp_path / "termination-log").read_bytes()) < 4096
    report = (out / "final" / "report.md").read_text()
    assert "**Gates: FAILED**" in report and "## Loss curve" in report and "## Examples" in report
    assert "![train and eval loss by step](loss-curve.svg)" in report  # the picture next to the report
    svg = ET.fromstring((out / "final" / "loss-curve.svg").read_text())
    train = [e for e in svg.iter("{http://www.w3.org/2000/svg}polyline") if e.get("class") == "train"]
    assert len(train) == 1 and len(train[0].get("points").split()) == summary["step"]
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()


def test_a_bad_line_in_the_evaluation_set_fails_before_training(assets, tmp_path, monkeypatch):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Spell out: 1"}, '
                   '{"role": "assistant", "content": "one"}]}\n{"messages": [oops\n')
    out = tmp_path / "out"
    code, summary = run(tmp_path, monkeypatch, evaluated_plan(assets, out, datasetUri=str(bad)))
    assert code == 3 and summary["reason"] == "DataError", summary
    assert f"{bad}:2" in summary["message"] or (str(bad) in summary["message"] and "line 2" in summary["message"])
    assert summary["step"] == 0 and not (out / "final").exists()


def test_an_evaluation_that_breaks_keeps_the_trained_artifacts(assets, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError("cannot allocate 80 GiB")

    monkeypatch.setattr(hook, "evaluate_after_training", out_of_memory)
    out = tmp_path / "out"
    code, summary = run(tmp_path, monkeypatch, evaluated_plan(assets, out, gates=[{"metric": "evalLoss"}]))
    assert code == 0 and summary["status"] == "Succeeded", summary
    assert summary["evaluation"]["passed"] is False and "MemoryError" in summary["evaluation"]["error"]
    assert (out / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "final" / "metrics.json").is_file()
    doc = json.loads((out / "final" / "evaluation.json").read_text())
    assert doc["passed"] is False and "trained artifacts are kept" in doc["message"]


def test_prompt_template_datasets_are_evaluated_on_their_own_prompt_format(assets, tmp_path, monkeypatch):
    """Plain-text examples from dataset.promptTemplate: the prompt is the rendered template's prompt part,
    generated without a chat template, exactly as the trainer encoded it."""
    from kubetune_trainer.plan import DatasetPlan

    if "prompt_template" not in DatasetPlan.model_fields:
        pytest.skip("this plan version has no dataset.promptTemplate")
    model_dir, chat = assets
    qa = tmp_path / "qa.jsonl"
    with qa.open("w") as fh:
        for line in chat.read_text().splitlines():
            user, answer = json.loads(line)["messages"]
            fh.write(json.dumps({"q": user["content"], "a": answer["content"]}) + "\n")
    out = tmp_path / "out"
    plan = make_plan(model_dir, qa, out, "lora", maxSteps=60)
    plan["dataset"]["promptTemplate"] = {"prompt": "Q: {q}\nA: ", "completion": "{a}"}
    plan["evaluation"] = {"metrics": ["tokenF1", "evalLoss"], "numExamples": 10, "maxNewTokens": 12}
    code, summary = run(tmp_path, monkeypatch, plan)
    assert code == 0, summary
    doc = json.loads((out / "final" / "evaluation.json").read_text())
    assert doc["examples"][0]["prompt"].startswith("Q: Spell out: ") and doc["examples"][0]["prompt"].endswith("A: ")
    rows = {r["metric"]: r for r in doc["metrics"]}
    assert rows["tokenF1"]["tuned"] > rows["tokenF1"]["base"] + 0.1 and rows["evalLoss"]["tuned"] < rows["evalLoss"]["base"]
