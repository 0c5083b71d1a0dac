"""Post-training evaluation: the base and the tuned model on the same held-out prompts, scored and gated.

`load_eval_set(plan)` reads the examples before training; `evaluate_after_training(...)` generates, scores
(`scoring`), checks the gates (`gates`) and writes final/evaluation.json and final/report.md (`report`).
"""

from kubetune_trainer.evaluation.examples import EvalSet, Example, load_eval_set
from kubetune_trainer.evaluation.runner import evaluate_after_training, summary_block

__all__ = ["EvalSet", "Example", "load_eval_set", "evaluate_after_training", "summary_block"]
