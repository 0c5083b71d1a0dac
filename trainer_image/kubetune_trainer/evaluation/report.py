"""final/report.md: the evaluation for people — metric table, gates, regurgitation, general probe, the loss curve
(final/loss-curve.svg, drawn by curve_svg, and a table of it) and the examples side by side."""

from __future__ import annotations

from typing import Any

MAX_CURVE_ROWS = 25
MAX_EXAMPLES = 20


def _cell(text: Any, limit: int = 120) -> str:
    s = "" if text is None else str(text)
    s = s.replace("|", "\\|").replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _num(x: Any) -> str:
    return "–" if x is None else f"{float(x):.4f}"


def curve_rows(history: list[dict], eval_history: list[dict], max_rows: int = MAX_CURVE_ROWS) -> list[tuple]:
    """(step, train loss, eval loss or None) at most `max_rows` evenly spaced steps, always the first and last."""
    if not history:
        return []
    evals = {e["step"]: e["loss"] for e in eval_history}
    n = len(history)
    if n <= max_rows:
        picks = list(range(n))
    else:
        picks = sorted({round(i * (n - 1) / (max_rows - 1)) for i in range(max_rows)})
    return [(history[i]["step"], history[i]["loss"], evals.get(history[i]["step"])) for i in picks]


def render_report(doc: dict[str, Any], history: list[dict], eval_history: list[dict], picture: str = "") -> str:
    """The Markdown report of an evaluation document (runner.compare)."""
    lines = ["# Fine-tuning evaluation", ""]
    verdict = "PASSED" if doc.get("passed") else "FAILED"
    lines += [f"**Gates: {verdict}** — {doc.get('message', '')}", ""]
    if doc.get("error"):
        lines += [f"The evaluation could not run: {doc['error']}", ""]
    s = doc.get("settings") or {}
    if s:
        lines += [f"Held-out examples: {s.get('numExamples')} from {s.get('source')}; "
                  f"max new tokens {s.get('maxNewTokens')}, temperature {s.get('temperature')} "
                  f"({'greedy' if not s.get('temperature') else 'sampled'}).", ""]
    if doc.get("metrics"):
        lines += ["## Base vs tuned", "", "| metric | base | tuned | delta | gate |", "| --- | ---: | ---: | ---: | --- |"]
        for row in doc["metrics"]:
            gate = "" if "passed" not in row else ("passed" if row["passed"] else "FAILED")
            better = " (lower is better)" if row.get("lowerIsBetter") else ""
            lines.append(f"| {row['metric']}{better} | {_num(row['base'])} | {_num(row['tuned'])} | "
                         f"{float(row['delta']):+.4f} | {gate} |")
        lines.append("")
    probe = doc.get("generalProbe")
    if probe:
        lines += ["## General ability", "",
                  f"{probe['examples']} generic prompts ({probe['source']}), {probe['metric']}: base "
                  f"{_num(probe['base'])}, tuned {_num(probe['tuned'])}, regression {float(probe['regression']):+.4f}"
                  + ("" if probe.get("maxRegression") is None else f" (allowed: {probe['maxRegression']})"), ""]
    reg = doc.get("regurgitation")
    if reg:
        t, b = reg["tuned"], reg["base"]
        lines += ["## Regurgitation", "",
                  "Training answers reproduced verbatim: on training prompts (their own answer) and on held-out "
                  "prompts (any other training answer).", "",
                  "| model | training prompts | held-out prompts |", "| --- | ---: | ---: |",
                  f"| base | {_num(b['training'])} | {_num(b['heldOut'])} |",
                  f"| tuned | {_num(t['training'])} | {_num(t['heldOut'])} |", ""]
    rows = curve_rows(history, eval_history)
    if rows:
        lines += ["## Loss curve", ""]
        if picture:
            lines += [f"![train and eval loss by step]({picture})", ""]
        lines += ["| step | train loss | eval loss |", "| ---: | ---: | ---: |"]
        lines += [f"| {step} | {_num(train)} | {_num(ev)} |" for step, train, ev in rows]
        lines.append("")
    examples = doc.get("examples") or []
    if examples:
        lines += ["## Examples", "", "| prompt | expected | base | tuned |", "| --- | --- | --- | --- |"]
        lines += [f"| {_cell(e['prompt'])} | {_cell(e['reference'])} | {_cell(e['base'])} | {_cell(e['tuned'])} |"
                  for e in examples[:MAX_EXAMPLES]]
        if len(examples) > MAX_EXAMPLES:
            lines.append(f"\n{len(examples) - MAX_EXAMPLES} more in evaluation.json.")
        lines.append("")
    return "\n".join(lines)
