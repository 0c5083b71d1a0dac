"""The evaluation's two moments in a run (called by kubetune_trainer.worker on rank 0):

- `prepare(plan)` after setup, before training: reads the example sets, so a bad line fails the job (DataError,
  file and line) before any step or generation;
- `after_training(recipe, eval_set)` after the export: never raises. A failure (out of memory, a model that does
  not load) becomes `passed: false` with the error; the trained artifacts are kept either way.
"""

from __future__ import annotations

import logging
from typing import Any

from kubetune_trainer.evaluation.examples import EvalSet, load_eval_set
from kubetune_trainer.evaluation.runner import (EVALUATION_FILE, REPORT_FILE, Outcome, evaluate_after_training,
                                                summary_block, write_outputs)
from kubetune_trainer.plan import Plan

log = logging.getLogger("kubetune_trainer.evaluation")


def prepare(plan: Plan) -> EvalSet | None:
    """The evaluation's examples, or None when the plan asks for no evaluation."""
    if plan.evaluation is None:
        return None
    eval_set = load_eval_set(plan)
    log.info("evaluation set: %d held-out examples from %s, %d training prompts, %d probe prompts (%s)",
             len(eval_set.held_out), eval_set.source, len(eval_set.training), len(eval_set.probe),
             eval_set.probe_source)
    return eval_set


def after_training(recipe: Any, eval_set: EvalSet) -> Outcome:
    """Evaluate the exported result of `recipe` (a FineTuneRecipe after export) and publish the files."""
    from kubetune_trainer import storage
    from kubetune_trainer.storage import join_uri

    plan: Plan = recipe.plan
    final = recipe.output_dir / "final"
    recipe._set_phase("evaluating")
    try:
        doc = evaluate_after_training(plan, eval_set, model_dir=recipe.model_dir, output_dir=recipe.output_dir,
                                      precision=recipe.precision, device=recipe.device,
                                      history=recipe.result.history, eval_history=recipe.result.eval_history)
    except Exception as exc:  # noqa: BLE001 - the evaluation step fails alone; the trained artifacts stay
        error = f"{type(exc).__name__}: {exc}"
        log.exception("evaluation failed; the trained artifacts are kept")
        doc = {"version": 1, "passed": False, "error": error[:1000],
               "message": f"the evaluation could not run ({error[:300]}); the trained artifacts are kept"}
        write_outputs(final, doc, recipe.result.history, recipe.result.eval_history)
    uri = plan.output.uri
    storage.upload_dir(recipe.output_dir, uri)
    recipe._set_phase("done")
    return Outcome(summary=summary_block(doc),
                   artifacts={"evaluation": join_uri(uri, "final", EVALUATION_FILE),
                              "report": join_uri(uri, "final", REPORT_FILE)})
