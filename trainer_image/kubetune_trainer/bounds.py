"""The value ranges the FineTuneJob CRD allows, checked again by the trainer on the plan it is handed.

The plan ConfigMap is written by the operator from a validated FineTuneJob, but anyone who can edit
ConfigMaps in the namespace can change it; the trainer refuses values the CRD would have refused
(InvalidPlan, naming the field and the bound). Keys are plan paths (camelCase, as in the plan JSON); the
CRD has the same field under `spec.`. tests/trainer/test_plan_bounds.py checks this table against
crds/kubetune.io_finetunejobs.yaml (and the learning-rate admission rule), so the two cannot drift apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """An inclusive (or exclusive) numeric range; None = unbounded on that side."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False

    def problem(self, value: float) -> str:
        """'' when `value` is inside, else what is wrong."""
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if self.minimum is not None:
            if value < self.minimum or (self.exclusive_minimum and value == self.minimum):
                return f"{value:g} is {'not above' if self.exclusive_minimum else 'below'} the minimum {self.minimum:g}"
        if self.maximum is not None:
            if value > self.maximum or (self.exclusive_maximum and value == self.maximum):
                return f"{value:g} is {'not below' if self.exclusive_maximum else 'above'} the maximum {self.maximum:g}"
        return ""


PLAN_BOUNDS: dict[str, Bound] = {
    "dataset.evalSplit": Bound(0, 0.5),
    "lora.r": Bound(1, 1024),
    "lora.alpha": Bound(0, 16384, exclusive_minimum=True),
    "lora.dropout": Bound(0, 1, exclusive_maximum=True),
    "training.epochs": Bound(0, 1000),
    "training.maxSteps": Bound(0, 10_000_000),
    "training.learningRate": Bound(0, 1, exclusive_minimum=True),
    "training.microBatchSize": Bound(1, 1024),
    "training.gradientAccumulationSteps": Bound(1, 4096),
    "training.maxSeqLength": Bound(16, 1_048_576),
    "training.warmupRatio": Bound(0, 1),
    "training.warmupSteps": Bound(0, 10_000_000),
    "training.weightDecay": Bound(0, 1),
    "training.maxGradNorm": Bound(0, 1000),
    "training.seed": Bound(0, 4_294_967_295),
    "training.checkpointEverySteps": Bound(1, 10_000_000),
    "training.keepCheckpoints": Bound(0, 10_000),
    "training.logEverySteps": Bound(0, 10_000_000),
    "training.evalEverySteps": Bound(0, 10_000_000),
    "training.earlyStopping.patience": Bound(0, 1000),
    "training.earlyStopping.threshold": Bound(0, 1000),
    "training.divergence.factor": Bound(2, 1000),
    "training.divergence.patience": Bound(1, 100_000),
    "distributed.zeroStage": Bound(0, 3),
}


def _lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def bound_problems(plan_json: dict[str, Any], bounds: dict[str, Bound] | None = None) -> list[str]:
    """`path: what is wrong` for every field of the (camelCase) plan outside its CRD range."""
    out = []
    for path, bound in (PLAN_BOUNDS if bounds is None else bounds).items():
        value = _lookup(plan_json, path)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        problem = bound.problem(float(value))
        if problem:
            out.append(f"{path}: {problem} that the FineTuneJob CRD allows")
    return out
