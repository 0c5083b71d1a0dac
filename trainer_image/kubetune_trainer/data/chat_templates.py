"""Chat template override (plan `dataset.chatTemplate`): a built-in name or inline Jinja, checked before training.

The built-in templates are written for this trainer from the documented turn formats of each model family; each
renders turns left to right and supports ``add_generation_prompt``, which is what prompt masking needs
(kubetune_trainer.data.templating). A template is checked by rendering a sample conversation through the tokenizer,
the same call the data pipeline makes; a failure is an InvalidPlan naming the Jinja error and its line.
"""

from __future__ import annotations

from ..errors import DataError, PlanError
from .conversation import Conversation, Message

NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}

SAMPLE = Conversation(messages=(
    Message("system", "You are a helpful assistant."),
    Message("user", "What is two plus two?"),
    Message("assistant", "Four."),
    Message("user", "And three plus three?"),
    Message("assistant", "Six."),
), source="dataset.chatTemplate sample")


def resolve(value: str) -> str | None:
    """The Jinja text of a plan's chatTemplate (None: keep the tokenizer's own)."""
    if not value:
        return None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise PlanError(f"dataset.chatTemplate: {value!r} is neither a built-in template ({', '.join(NAMED_TEMPLATES)}) "
                    "nor an inline Jinja template")


def _template_line(exc: BaseException) -> int | None:
    """The template line of a Jinja error: syntax errors carry it, render errors have it in the traceback."""
    line = getattr(exc, "lineno", None)
    if isinstance(line, int):
        return line
    tb, found = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            found = tb.tb_lineno
        tb = tb.tb_next
    return found


def apply_override(tokenizer, value: str) -> str | None:
    """Set the plan's chat template on the tokenizer and check it on a sample conversation; returns the name applied
    (or "inline"), None when there is no override. PlanError (InvalidPlan) names the Jinja error and its line."""
    template = resolve(value)
    if template is None:
        return None
    tokenizer.chat_template = template
    check(tokenizer, label=value if value in NAMED_TEMPLATES else "inline template")
    return value if value in NAMED_TEMPLATES else "inline"


def check(tokenizer, label: str = "template") -> None:
    """Render SAMPLE (whole and turn by turn, as prompt masking does); PlanError on any failure."""
    from .templating import assistant_spans

    try:
        text, spans = assistant_spans(SAMPLE, tokenizer)
    except DataError as exc:
        cause = exc.__cause__ or exc
        line = _template_line(cause)
        where = f" at line {line}" if line else ""
        detail = str(cause) if exc.__cause__ is not None else str(exc)
        if detail.startswith("chat template failed: "):
            detail = detail[len("chat template failed: "):]
        raise PlanError(f"dataset.chatTemplate ({label}): rendering a sample conversation failed{where}: "
                        f"{type(cause).__name__}: {detail}") from None
    answers = [text[start:end] for start, end in spans]
    if len(answers) != 2 or "Four." not in answers[0] or "Six." not in answers[1]:
        raise PlanError(f"dataset.chatTemplate ({label}): the sample conversation's assistant answers are not "
                        f"rendered where prompt masking finds them (got {answers!r} in {text[:300]!r})")
