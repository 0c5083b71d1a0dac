"""Evaluation metrics against hand-computed values, the gates, the report and the summary block (no model)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

from kubetune_trainer.evaluation import scoring  # noqa: E402
from kubetune_trainer.evaluation.gates import check_gates, metric_table, outcome_message  # noqa: E402
from kubetune_trainer.evaluation.report import curve_rows, render_report  # noqa: E402
from kubetune_trainer.evaluation.runner import summary_block  # noqa: E402
from kubetune_trainer.summary import encode_summary, build_summary  # noqa: E402


def test_normalization_drops_case_punctuation_articles_and_spaces():
    assert scoring.normalize_answer("  The  Cat, sat!  ") == "cat sat"
    assert scoring.normalize_answer("An apple a day") == "apple day"


def test_exact_match():
    assert scoring.exact_match("The Paris.", "paris") == 1.0
    assert scoring.exact_match("Paris, France", "Paris") == 0.0


def test_token_f1_by_hand():
    # "cat sat" vs "cat sat down": 2 shared tokens, precision 2/2, recall 2/3 -> F1 = 2*1*(2/3)/(1+2/3) = 0.8
    assert scoring.token_f1("The cat sat.", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count once per occurrence: "one one two" vs "one two two" share one+two = 2 of 3 each -> 2/3
    assert scoring.token_f1("one one two", "one two two") == pytest.approx(2 / 3)
    assert scoring.token_f1("", "") == 1.0 and scoring.token_f1("x", "") == 0.0 and scoring.token_f1("x", "y") == 0.0


def test_rouge_l_by_hand():
    # 6 tokens each, longest common subsequence "the cat sat on mat" = 5 -> P = R = F = 5/6
    assert scoring.rouge_l("the cat sat on a mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    # LCS "b d" (2) of 3 predicted and 4 reference tokens: P 2/3, R 2/4 -> F = 2PR/(P+R) = 4/7
    assert scoring.rouge_l("b x d", "a b c d") == pytest.approx(4 / 7)


def test_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty): (1/12) ** (1/4)
    assert scoring.corpus_bleu(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(12 ** -0.25)
    assert scoring.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)


def test_chrf_by_hand():
    # character n-gram precision = recall for n = 1..6: 5/6, 4/5, 3/4, 2/3, 1/2, 0/1 -> mean 3.55/6 (beta 2, P = R)
    assert scoring.corpus_chrf(["abcdeg"], ["abcdef"]) == pytest.approx(3.55 / 6)


def test_score_generations_means_per_example_and_corpus_statistics():
    preds, refs = ["Paris", "the cat sat"], ["paris", "a cat sat down"]
    out = scoring.score_generations(preds, refs, ["exactMatch", "tokenF1", "bleu"])
    assert out["exactMatch"] == pytest.approx(0.5)
    assert out["tokenF1"] == pytest.approx((1.0 + 0.8) / 2)
    assert set(out) == {"exactMatch", "tokenF1", "bleu"}
    with pytest.raises(ValueError, match="no examples"):
        scoring.score_generations([], [], ["tokenF1"])


def test_loss_metrics_and_direction():
    out = scoring.loss_metrics(nll_sum=6.0, tokens=4)
    assert out["evalLoss"] == pytest.approx(1.5) and out["perplexity"] == pytest.approx(math.exp(1.5))
    assert scoring.improvement("evalLoss", 3.0, 2.0) == pytest.approx(1.0)
    assert scoring.improvement("tokenF1", 0.2, 0.5) == pytest.approx(0.3)


METRICS = {"exactMatch": {"base": 0.1, "tuned": 0.6}, "evalLoss": {"base": 3.0, "tuned": 2.5}}


def gate(metric, threshold):
    return SimpleNamespace(metric=metric, min_improvement=threshold)


def test_gates_pass_at_and_below_what_was_reached_and_fail_above():
    assert check_gates(METRICS, [gate("exactMatch", 0.5)], None, None)[0].passed  # exactly reached
    assert not check_gates(METRICS, [gate("exactMatch", 0.51)], None, None)[0].passed
    assert check_gates(METRICS, [gate("evalLoss", 0.5)], None, None)[0].passed  # a decrease of 0.5
    assert not check_gates(METRICS, [gate("evalLoss", 0.6)], None, None)[0].passed
    reg = check_gates(METRICS, [], 0.04, 0.05)
    assert [g.metric for g in reg] == ["generalRegression"] and reg[0].passed
    assert not check_gates(METRICS, [], 0.06, 0.05)[0].passed
    assert not check_gates(METRICS, [], None, 0.05)[0].passed  # no probe result cannot pass a probe gate


def test_metric_table_and_message_carry_the_numbers():
    results = check_gates(METRICS, [gate("exactMatch", 0.6)], 0.0, None)
    rows = metric_table(METRICS, results)
    assert rows[0] == {"metric": "exactMatch", "base": 0.1, "tuned": 0.6, "delta": pytest.approx(0.5),
                       "lowerIsBetter": False, "passed": False}
    assert "passed" not in rows[1] and rows[1]["lowerIsBetter"]
    msg = outcome_message(METRICS, results)
    assert "exactMatch 0.100 -> 0.600" in msg and "improvement +0.500 >= +0.600 FAILED" in msg


def _doc(n_examples=3):
    results = check_gates(METRICS, [gate("exactMatch", 0.1)], 0.01, 0.05)
    return {"version": 1, "passed": all(r.passed for r in results), "message": outcome_message(METRICS, results),
            "settings": {"numExamples": n_examples, "source": "eval.jsonl", "maxNewTokens": 8, "temperature": 0.0},
            "metrics": metric_table(METRICS, results),
            "generalProbe": {"source": "builtin", "examples": 24, "metric": "tokenF1", "base": 0.2, "tuned": 0.19,
                             "regression": 0.01, "maxRegression": 0.05},
            "regurgitation": {"base": {"training": 0.0, "heldOut": 0.0}, "tuned": {"training": 0.5, "heldOut": 0.1}},
            "examples": [{"prompt": f"p{i} | x", "reference": "r", "base": "b", "tuned": "t"}
                         for i in range(n_examples)]}


def test_report_has_the_tables():
    history = [{"step": s, "loss": 10.0 / s} for s in range(1, 101)]
    text = render_report(_doc(), history, [{"step": 100, "loss": 0.2}])
    assert "**Gates: PASSED**" in text
    assert "| exactMatch | 0.1000 | 0.6000 | +0.5000 | passed |" in text
    assert "| tuned | 0.5000 | 0.1000 |" in text
    assert "| 100 | 0.1000 | 0.2000 |" in text and "| 1 | 10.0000 | – |" in text
    assert "| p0 \\| x | r | b | t |" in text  # table cells escape '|'


def test_curve_rows_keep_first_and_last_and_are_bounded():
    history = [{"step": s, "loss": float(s)} for s in range(1, 1001)]
    rows = curve_rows(history, [], max_rows=25)
    assert len(rows) == 25 and rows[0][0] == 1 and rows[-1][0] == 1000
    assert curve_rows([], []) == []


def test_summary_block_is_compact_and_fits_the_termination_message():
    block = summary_block(_doc(n_examples=500))
    assert set(block) == {"passed", "metrics", "message", "generalRegression", "regurgitation"}
    assert block["metrics"][0] == {"metric": "exactMatch", "base": 0.1, "tuned": 0.6, "delta": 0.5, "passed": True}
    summary = build_summary(status="Succeeded", reason="Completed", evaluation=block,
                            artifacts={"adapter": "pvc://o/final/adapter", "evaluation": "pvc://o/final/evaluation.json",
                                       "report": "pvc://o/final/report.md", "bogus": "x"})
    assert summary["artifacts"]["report"] == "pvc://o/final/report.md" and "bogus" not in summary["artifacts"]
    raw = encode_summary(summary)
    assert len(raw) < 4096 and json.loads(raw)["evaluation"]["passed"] is True
    assert "evaluation" not in build_summary(status="Succeeded", reason="Completed")
