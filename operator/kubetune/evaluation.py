"""The trainer's evaluation block (termination summary, docs/contracts.md §5) → status.evaluation, the
EvaluationPassed condition and its Event. Pure.

A failed gate, or an evaluation that could not run, never changes the phase: the run trained and exported, so it
stays Succeeded with every artifact; EvaluationPassed is False with the numbers and a Warning Event says why.
"""

from __future__ import annotations

from typing import Any

from kubetune import reasons as R

MAX_MESSAGE = 4096


def _num(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None


def headline(rows: list[dict[str, Any]], passed: bool) -> str:
    """`<metric> <base>-><tuned> passed|failed` for the first gated metric (else the first one)."""
    if not rows:
        return "passed" if passed else "failed"
    row = next((r for r in rows if "passed" in r), rows[0])

    def fmt(x: float | None) -> str:
        return "?" if x is None else f"{x:.3g}"

    return f"{row['metric']} {fmt(row.get('base'))}->{fmt(row.get('tuned'))} {'passed' if passed else 'failed'}"


def evaluation_status(block: dict[str, Any]) -> dict[str, Any]:
    """status.evaluation from the summary's evaluation block (unknown keys dropped, numbers checked)."""
    passed = bool(block.get("passed"))
    rows = []
    for item in block.get("metrics") or []:
        if not isinstance(item, dict) or not item.get("metric"):
            continue
        row: dict[str, Any] = {"metric": str(item["metric"]), "base": _num(item.get("base")),
                               "tuned": _num(item.get("tuned")), "delta": _num(item.get("delta"))}
        if isinstance(item.get("passed"), bool):
            row["passed"] = item["passed"]
        rows.append(row)
    out: dict[str, Any] = {"passed": passed, "display": headline(rows, passed),
                           "message": str(block.get("message") or "")[:MAX_MESSAGE], "metrics": rows[:7]}
    if block.get("error"):
        out["error"] = str(block["error"])[:1024]
        out["display"] = "error"
    if _num(block.get("generalRegression")) is not None:
        out["generalRegression"] = _num(block["generalRegression"])
    regurg = block.get("regurgitation")
    if isinstance(regurg, dict):
        out["regurgitation"] = {"training": _num(regurg.get("training")), "heldOut": _num(regurg.get("heldOut"))}
    return out


def verdict(block: dict[str, Any]) -> tuple[bool, str, str]:
    """(EvaluationPassed, reason, message) for the condition and the Event."""
    message = str(block.get("message") or "")
    if block.get("error"):
        return False, R.EVALUATION_ERROR, (f"the evaluation could not run: {block['error']}; the trained artifacts "
                                           "are kept and the phase stays Succeeded")[:MAX_MESSAGE]
    if block.get("passed"):
        return True, R.EVALUATION_GATES_PASSED, message[:MAX_MESSAGE]
    return False, R.EVALUATION_GATES_FAILED, (f"{message}; the artifacts are kept and the phase stays "
                                              "Succeeded")[:MAX_MESSAGE]
