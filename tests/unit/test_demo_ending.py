"""The demo's ending for a job with spec.evaluation: the base-vs-tuned table, examples and the GGUF answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune_dev import demo, demo_ending

pytestmark = pytest.mark.unit

EVALUATION = {"passed": True, "message": "exactMatch 0.000 -> 0.960; gates: exactMatch improvement +0.960 >= +0.500 "
              "passed",
              "metrics": [{"metric": "exactMatch", "base": 0.0, "tuned": 0.96, "delta": 0.96, "passed": True},
                          {"metric": "tokenF1", "base": 0.01, "tuned": 0.99, "delta": 0.98},
                          {"metric": "evalLoss", "base": 6.83, "tuned": 0.05, "delta": -6.78}]}


def test_the_table_has_a_row_per_metric_with_base_tuned_delta_and_gate():
    lines = demo_ending.format_evaluation(EVALUATION, 50).splitlines()
    assert lines[0] == "evaluation on 50 held-out prompts, base model vs tuned (status.evaluation):"
    assert lines[1].split() == ["metric", "base", "tuned", "delta", "gate"]
    assert lines[2].split() == ["exactMatch", "0.000", "0.960", "+0.960", "passed", "(tuned", "better)"]
    assert lines[3].split() == ["tokenF1", "0.010", "0.990", "+0.980", "(tuned", "better)"]
    assert lines[4].split() == ["evalLoss", "6.830", "0.050", "-6.780", "(tuned", "better)"]  # lower is better
    assert lines[5] == "  gates: passed (exactMatch improvement +0.960 >= +0.500 passed)"


def test_a_failed_gate_and_a_worse_metric_are_not_called_better():
    ev = {"passed": False, "metrics": [{"metric": "exactMatch", "base": 0.2, "tuned": 0.1, "delta": -0.1,
                                        "passed": False},
                                       {"metric": "evalLoss", "base": 1.0, "tuned": 2.0, "delta": 1.0}]}
    text = demo_ending.format_evaluation(ev)
    assert "better" not in text and "FAILED" in text.splitlines()[2] and text.endswith("gates: FAILED")
    assert not any(demo_ending.improved(r) for r in ev["metrics"])


def test_examples_and_the_answer_say_what_each_model_answered():
    doc = {"examples": [{"prompt": "Spell out: 4 2", "reference": "four two", "base": "qu x", "tuned": "four two"}]}
    assert demo_ending.format_examples(doc, 3).splitlines() == [
        "[1] prompt:   'Spell out: 4 2'", "    expected: 'four two'", "    base:     'qu x'",
        "    tuned:    'four two'"]
    llama = {"prompt": "Spell out: 7 1", "answer": "seven one", "engine": "llama.cpp", "note": ""}
    assert demo_ending.format_answer(llama, "model-f16.gguf", "seven one").splitlines() == [
        "held-out prompt answered by llama.cpp from the exported model-f16.gguf:",
        "  'Spell out: 7 1' -> 'seven one'  (correct)"]
    fallback = dict(llama, engine="transformers", answer="seven", note="llama_cpp is not importable (x)")
    lines = demo_ending.format_answer(fallback, "model-f16.gguf", "seven one").splitlines()
    assert lines[0].startswith("llama_cpp is not importable") and "transformers" in lines[1]
    assert lines[2].endswith("(expected 'seven one')")


def test_the_quickstart_evaluates_with_a_gate_and_exports_a_gguf():
    spec = yaml.safe_load(demo.DEFAULT_MANIFEST.read_text())["spec"]
    ev = spec["evaluation"]
    assert ev["gates"] and all(g["metric"] in ev["metrics"] for g in ev["gates"]) and "exactMatch" in ev["metrics"]
    assert spec["dataset"]["evalSplit"] > 0 and spec["output"]["export"]["gguf"] == "f16"
    cmd = demo_ending.ask_command("python", "/o/model-f16.gguf", "/o/adapter", "Spell out: 1", "/m", "/o/adapter")
    assert cmd[1:3] == ["-m", "kubetune_trainer.export.ask"] and cmd[cmd.index("--prompt") + 1] == "Spell out: 1"
    assert Path(demo.DEFAULT_DATASET).is_file()


def test_the_wait_after_the_last_step_is_explained_only_for_jobs_that_evaluate_or_export():
    spec = yaml.safe_load(demo.DEFAULT_MANIFEST.read_text())["spec"]
    note = demo_ending.after_training_note(spec, "Running", 600, 600)
    assert note.startswith("training done; the trainer writes the GGUF and lets the base and the tuned model")
    assert demo_ending.after_training_note(spec, "Running", 599, 600) is None
    assert demo_ending.after_training_note(spec, "Succeeded", 600, 600) is None
    assert demo_ending.after_training_note({"output": {"uri": "pvc://o"}}, "Running", 600, 600) is None
