"""Run the evaluation after training: base and tuned model on the same prompts, scores, gates, files.

    eval_set = load_eval_set(plan)                       # before training: a bad file fails the job early
    ...train, export...
    outcome = evaluate_after_training(plan, eval_set, model_dir=..., output_dir=..., precision=..., device=...,
                                      history=..., eval_history=...)

Writes `final/evaluation.json` (per metric base vs tuned, gates, regurgitation, general probe, every example's
outputs) and `final/report.md`. An evaluation that fails (out of memory, a model that cannot load) never fails
the run: the outcome says `passed: false` with the error, and the trained artifacts stay as they are.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from kubetune_trainer.evaluation.examples import EvalSet, Example
from kubetune_trainer.evaluation.gates import PROBE_METRIC, as_dicts, check_gates, metric_table, outcome_message
from kubetune_trainer.evaluation.scoring import (GENERATED_METRICS, LOSS_METRICS, example_scores, loss_metrics,
                                                 score_generations, token_f1)
from kubetune_trainer.plan import Plan

log = logging.getLogger("kubetune_trainer.evaluation")
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.md"
CURVE_FILE = "loss-curve.svg"  # the loss curve as a picture, next to report.md
MAX_SUMMARY_MESSAGE = 1200  # the termination summary must stay under 4 KiB


@dataclass
class ModelRun:
    """What one model (base or tuned) answered, and its loss on the held-out answers."""

    held_out: list[str] = field(default_factory=list)
    training: list[str] = field(default_factory=list)
    probe: list[str] = field(default_factory=list)
    nll_sum: float = 0.0
    tokens: int = 0


@dataclass
class Outcome:
    """The evaluation's result for the termination summary and the artifacts it wrote."""

    summary: dict[str, Any]
    artifacts: dict[str, str] = field(default_factory=dict)


def answer_nll(model, tokenizer, examples: Sequence[Example], max_len: int) -> tuple[float, int]:
    """Summed negative log-likelihood of the reference answers (answer tokens only, as trained) and their count."""
    import torch
    import torch.nn.functional as F

    from kubetune_trainer.data import IGNORE_INDEX, encode
    from kubetune_trainer.data.conversation import Conversation, Message

    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for ex in examples:
        conv = ex.conversation or Conversation(messages=tuple(Message(m["role"], m["content"]) for m in ex.messages)
                                               + (Message("assistant", ex.reference),))
        enc = encode(conv, tokenizer, True)
        ids = torch.tensor([enc.input_ids[:max_len]], device=device)
        labels = torch.tensor(enc.labels[:max_len], device=device)[1:]
        mask = labels != IGNORE_INDEX
        if not bool(mask.any()):
            continue
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        total += float(F.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        tokens += int(mask.sum())
    return total, tokens


def run_model(model, tokenizer, eval_set: EvalSet, plan: Plan) -> ModelRun:
    """Generate on every set and compute the held-out loss with one model."""
    from kubetune_trainer.generate import generate_replies

    ev = plan.evaluation
    model.eval()

    def answers(examples: list[Example]) -> list[str]:
        return generate_replies(model, tokenizer, [ex.generation_input for ex in examples], ev.max_new_tokens,
                                temperature=ev.temperature, seed=plan.training.seed)

    run = ModelRun(held_out=answers(eval_set.held_out), training=answers(eval_set.training),
                   probe=answers(eval_set.probe))
    if set(ev.metrics) & set(LOSS_METRICS):
        run.nll_sum, run.tokens = answer_nll(model, tokenizer, eval_set.held_out, plan.training.max_seq_length)
    return run


def regurgitation(run: ModelRun, eval_set: EvalSet) -> dict[str, float | None]:
    """Share of training prompts answered with their training answer verbatim, and of held-out prompts answered
    verbatim with some training answer other than their own reference."""
    train_answers = eval_set.training_answers
    training = None
    if eval_set.training:
        training = sum(out.strip() == ex.reference.strip() for out, ex in zip(run.training, eval_set.training)) \
            / len(eval_set.training)
    held = sum(out.strip() in train_answers and out.strip() != ex.reference.strip()
               for out, ex in zip(run.held_out, eval_set.held_out)) / len(eval_set.held_out)
    return {"training": training, "heldOut": held}


def compare(base: ModelRun, tuned: ModelRun, eval_set: EvalSet, plan: Plan) -> dict[str, Any]:
    """Scores, gates and the full JSON document of the evaluation."""
    ev = plan.evaluation
    refs = [ex.reference for ex in eval_set.held_out]
    generated = [m for m in ev.metrics if m in GENERATED_METRICS]
    scores = {"base": score_generations(base.held_out, refs, generated) if generated else {},
              "tuned": score_generations(tuned.held_out, refs, generated) if generated else {}}
    for name, run in (("base", base), ("tuned", tuned)):
        if set(ev.metrics) & set(LOSS_METRICS):
            scores[name].update(loss_metrics(run.nll_sum, run.tokens))
    metrics = {m: {"base": scores["base"][m], "tuned": scores["tuned"][m]} for m in ev.metrics}
    probe_refs = [ex.reference for ex in eval_set.probe]
    probe_base = sum(map(token_f1, base.probe, probe_refs)) / len(probe_refs)
    probe_tuned = sum(map(token_f1, tuned.probe, probe_refs)) / len(probe_refs)
    regression = probe_base - probe_tuned
    gate_results = check_gates(metrics, ev.gates, regression, ev.max_general_regression)
    passed = all(g.passed for g in gate_results)
    per_example = [{"where": ex.where, "prompt": ex.prompt, "reference": ex.reference, "base": b, "tuned": t,
                    "scores": {"base": example_scores(b, ex.reference, ev.metrics),
                               "tuned": example_scores(t, ex.reference, ev.metrics)}}
                   for ex, b, t in zip(eval_set.held_out, base.held_out, tuned.held_out)]
    return {
        "version": 1, "passed": passed, "message": outcome_message(metrics, gate_results),
        "settings": {"metrics": list(ev.metrics), "numExamples": len(eval_set.held_out),
                     "maxNewTokens": ev.max_new_tokens, "temperature": ev.temperature, "source": eval_set.source},
        "metrics": metric_table(metrics, gate_results),
        "gates": as_dicts(gate_results),
        "generalProbe": {"source": eval_set.probe_source, "examples": len(probe_refs), "metric": PROBE_METRIC,
                         "base": probe_base, "tuned": probe_tuned, "regression": regression,
                         "maxRegression": ev.max_general_regression},
        "regurgitation": {"trainingPrompts": len(eval_set.training), "heldOutPrompts": len(eval_set.held_out),
                          "base": regurgitation(base, eval_set), "tuned": regurgitation(tuned, eval_set)},
        "examples": per_example,
        "generalProbeExamples": [{"prompt": ex.prompt, "reference": ex.reference, "base": b, "tuned": t}
                                 for ex, b, t in zip(eval_set.probe, base.probe, tuned.probe)],
        "trainingExamples": [{"prompt": ex.prompt, "reference": ex.reference, "base": b, "tuned": t}
                             for ex, b, t in zip(eval_set.training, base.training, tuned.training)],
    }


def summary_block(doc: dict[str, Any]) -> dict[str, Any]:
    """The compact form for the termination summary (numbers rounded; per-example outputs stay in the file)."""
    def r(x):
        return None if x is None else round(float(x), 4)

    rows = []
    for row in doc.get("metrics", []):
        item = {"metric": row["metric"], "base": r(row["base"]), "tuned": r(row["tuned"]), "delta": r(row["delta"])}
        if "passed" in row:
            item["passed"] = row["passed"]
        rows.append(item)
    out: dict[str, Any] = {"passed": bool(doc.get("passed")), "metrics": rows,
                           "message": str(doc.get("message", ""))[:MAX_SUMMARY_MESSAGE]}
    probe = doc.get("generalProbe")
    if probe:
        out["generalRegression"] = r(probe["regression"])
    regurg = (doc.get("regurgitation") or {}).get("tuned")
    if regurg:
        out["regurgitation"] = {k: r(v) for k, v in regurg.items()}
    if doc.get("error"):
        out["error"] = str(doc["error"])[:300]
    return out


def _load_models(plan: Plan, model_dir: Path, final_dir: Path, precision: str, device):
    """Yield ("base", model) then ("tuned", model); the tuned one reuses the base weights for adapters."""
    import gc

    from kubetune_trainer.methods import load_base_model

    base = load_base_model(str(model_dir), plan, precision, device)
    yield "base", base
    if plan.method == "full":
        del base
        gc.collect()
        yield "tuned", load_base_model(str(final_dir / "model"), plan, precision, device)
    else:
        from peft import PeftModel

        yield "tuned", PeftModel.from_pretrained(base, str(final_dir / "adapter"))


def evaluate_after_training(plan: Plan, eval_set: EvalSet, *, model_dir: Path, output_dir: Path, precision: str,
                            device, history: list[dict] | None = None, eval_history: list[dict] | None = None
                            ) -> dict[str, Any]:
    """Generate with base and tuned, score, gate; write final/evaluation.json and final/report.md; return the
    JSON document. Raises on failure (the caller keeps the run's outcome)."""
    import torch
    from transformers import AutoTokenizer

    started = time.time()
    final_dir = output_dir / "final"
    tuned_dir = final_dir / ("model" if plan.method == "full" else "adapter")
    tokenizer = AutoTokenizer.from_pretrained(str(tuned_dir), trust_remote_code=plan.model.trust_remote_code)
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    runs: dict[str, ModelRun] = {}
    for name, model in _load_models(plan, model_dir, final_dir, precision, device):
        log.info("evaluation: generating with the %s model on %d held-out, %d training and %d probe prompts", name,
                 len(eval_set.held_out), len(eval_set.training), len(eval_set.probe))
        runs[name] = run_model(model, tokenizer, eval_set, plan)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    doc = compare(runs["base"], runs["tuned"], eval_set, plan)
    doc["runtimeSeconds"] = round(time.time() - started, 2)
    write_outputs(final_dir, doc, history or [], eval_history or [])
    log.info("evaluation %s: %s", "passed" if doc["passed"] else "FAILED", doc["message"])
    return doc


def write_outputs(final_dir: Path, doc: dict[str, Any], history: list[dict], eval_history: list[dict]) -> None:
    """final/evaluation.json, final/report.md and the loss curve it shows (final/loss-curve.svg)."""
    from kubetune_trainer.evaluation.curve_svg import loss_curve_svg
    from kubetune_trainer.evaluation.report import render_report

    final_dir.mkdir(parents=True, exist_ok=True)
    (final_dir / EVALUATION_FILE).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    picture = loss_curve_svg(history, eval_history)
    if picture:
        (final_dir / CURVE_FILE).write_text(picture)
    report = render_report(doc, history, eval_history, picture=CURVE_FILE if picture else "")
    (final_dir / REPORT_FILE).write_text(report)
