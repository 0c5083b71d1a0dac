"""The end of `kubetune-dev demo` for a FineTuneJob with spec.evaluation: the base-vs-tuned table from
status.evaluation, a few held-out examples from the trainer's final/evaluation.json, and the command that asks the
exported GGUF one held-out prompt (`python -m kubetune_trainer.export.ask`, llama.cpp). Pure functions."""

from __future__ import annotations

from typing import Any

LOWER_IS_BETTER = frozenset({"evalLoss", "perplexity"})


def _num(value: Any, width: int = 7) -> str:
    return f"{'?':>{width}}" if value is None else f"{value:{width}.3f}"


def improved(row: dict[str, Any]) -> bool:
    """Whether the tuned model beats the base on this metric (lower is better for losses)."""
    base, tuned = row.get("base"), row.get("tuned")
    if base is None or tuned is None:
        return False
    return tuned < base if row.get("metric") in LOWER_IS_BETTER else tuned > base


def after_training_note(spec: dict[str, Any], phase: str, step: int | None, total: int | None) -> str | None:
    """What the trainer does between its last step and Succeeded, for a job that asks for it (else None)."""
    if phase != "Running" or not total or step != total:
        return None
    work = []
    if ((spec.get("output") or {}).get("export")):
        work.append("writes the GGUF")
    if spec.get("evaluation"):
        work.append("lets the base and the tuned model answer the held-out prompts (spec.evaluation)")
    return f"training done; the trainer {' and '.join(work)}" if work else None


def format_evaluation(evaluation: dict[str, Any], examples: int | None = None) -> str:
    """status.evaluation as a table: metric, base, tuned, delta, gate; then the verdict line."""
    where = f" on {examples} held-out prompts" if examples else " on held-out prompts"
    lines = [f"evaluation{where}, base model vs tuned (status.evaluation):",
             f"  {'metric':<12}{'base':>8}{'tuned':>8}{'delta':>9}  gate"]
    for row in evaluation.get("metrics") or []:
        delta = row.get("delta")
        gate = "" if "passed" not in row else ("passed" if row["passed"] else "FAILED")
        tail = " ".join(t for t in (gate, "(tuned better)" if improved(row) else "") if t)
        delta_text = f"{'?':>9}" if delta is None else f"{delta:+9.3f}"
        lines.append(f"  {row['metric']:<12}{_num(row.get('base'), 8)}{_num(row.get('tuned'), 8)}{delta_text}  "
                     f"{tail}".rstrip())
    if evaluation.get("error"):
        lines.append(f"  the evaluation could not run: {evaluation['error']}")
    message = str(evaluation.get("message") or "")
    gates = message[message.rindex("gates:") + len("gates:"):].strip() if "gates:" in message else ""
    lines.append(f"  gates: {'passed' if evaluation.get('passed') else 'FAILED'}" + (f" ({gates})" if gates else ""))
    return "\n".join(lines)


def format_examples(doc: dict[str, Any], count: int = 3) -> str:
    """The first `count` held-out examples of final/evaluation.json: prompt, expected, base and tuned answers."""
    lines = []
    for i, ex in enumerate((doc.get("examples") or [])[:count], 1):
        lines.append(f"[{i}] prompt:   {ex['prompt']!r}")
        lines.append(f"    expected: {ex['reference']!r}")
        lines.append(f"    base:     {ex['base']!r}")
        lines.append(f"    tuned:    {ex['tuned']!r}")
    return "\n".join(lines)


def ask_command(python: str, gguf: str, tokenizer: str, prompt: str, base: str, adapter: str,
                max_new_tokens: int = 32) -> list[str]:
    """`python -m kubetune_trainer.export.ask` for one prompt (transformers from base + adapter without llama_cpp)."""
    return [python, "-m", "kubetune_trainer.export.ask", "--gguf", gguf, "--tokenizer", tokenizer, "--prompt",
            prompt, "--base", base, "--adapter", adapter, "--max-new-tokens", str(max_new_tokens), "--json"]


def format_answer(answer: dict[str, Any], gguf_name: str, expected: str) -> str:
    """The asked prompt, the answer and the engine; a line saying why when the engine is not llama.cpp."""
    verdict = "correct" if answer["answer"].split() == expected.split() else f"expected {expected!r}"
    if answer.get("engine") == "llama.cpp":
        head = f"held-out prompt answered by llama.cpp from the exported {gguf_name}:"
    else:
        head = f"{answer.get('note') or 'llama.cpp unavailable'}\nheld-out prompt answered by {answer.get('engine')}:"
    return f"{head}\n  {answer['prompt']!r} -> {answer['answer']!r}  ({verdict})"
