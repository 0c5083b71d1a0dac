"""Gates: base-vs-tuned numbers + the plan's thresholds → pass/fail per gate, overall, and one readable message."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from kubetune_trainer.evaluation.scoring import LOWER_IS_BETTER, improvement

PROBE_METRIC = "tokenF1"  # the general-ability probe's score (regression = base - tuned)
TOLERANCE = 1e-9  # a gate exactly at its threshold passes despite float rounding


@dataclass(frozen=True)
class GateResult:
    """One gate: the metric (or `generalRegression`), what was required and what was reached."""

    metric: str
    required: float
    reached: float
    passed: bool

    def text(self) -> str:
        """e.g. `exactMatch +0.850 >= +0.100 passed`."""
        if self.metric == "generalRegression":
            return f"general-ability regression {self.reached:.3f} <= {self.required:.3f} " + \
                ("passed" if self.passed else "FAILED")
        return f"{self.metric} improvement {self.reached:+.3f} >= {self.required:+.3f} " + \
            ("passed" if self.passed else "FAILED")


def check_gates(metrics: dict[str, dict[str, float]], gates: Sequence[Any], general_regression: float | None,
                max_general_regression: float | None) -> list[GateResult]:
    """Every gate's result. `metrics` maps metric → {"base", "tuned"}; `gates` have `.metric`/`.min_improvement`."""
    out = []
    for gate in gates:
        vals = metrics[gate.metric]
        reached = improvement(gate.metric, vals["base"], vals["tuned"])
        out.append(GateResult(gate.metric, float(gate.min_improvement), reached,
                              reached >= gate.min_improvement - TOLERANCE))
    if max_general_regression is not None:
        reached = general_regression if general_regression is not None else float("inf")
        out.append(GateResult("generalRegression", float(max_general_regression), reached,
                              reached <= max_general_regression + TOLERANCE))
    return out


def metric_table(metrics: dict[str, dict[str, float]], gate_results: Sequence[GateResult]) -> list[dict[str, Any]]:
    """Rows {metric, base, tuned, delta, passed} in the plan's metric order; `passed` only for gated metrics."""
    passed = {g.metric: g.passed for g in gate_results}
    rows = []
    for name, vals in metrics.items():
        row: dict[str, Any] = {"metric": name, "base": vals["base"], "tuned": vals["tuned"],
                               "delta": vals["tuned"] - vals["base"], "lowerIsBetter": name in LOWER_IS_BETTER}
        if name in passed:
            row["passed"] = passed[name]
        rows.append(row)
    return rows


def outcome_message(metrics: dict[str, dict[str, float]], gate_results: Sequence[GateResult]) -> str:
    """One line with the numbers: each metric base → tuned, then each gate's verdict."""
    parts = [f"{m} {v['base']:.3f} -> {v['tuned']:.3f}" for m, v in metrics.items()]
    text = "; ".join(parts)
    if gate_results:
        text += "; gates: " + "; ".join(g.text() for g in gate_results)
    else:
        text += "; no gates set"
    return text


def as_dicts(results: Sequence[GateResult]) -> list[dict[str, Any]]:
    """JSON form of gate results."""
    return [asdict(r) for r in results]
