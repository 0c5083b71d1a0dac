"""Prompt template (plan `dataset.promptTemplate`): records of any shape -> plain text with a masked prompt.

Each ``{name}`` in the template's prompt and completion is replaced by the record's field ``name`` (a string, or a
number/bool written as JSON); every other character is literal. The result is one plain-text example whose first
``len(prompt)`` characters are the prompt (masked when completionOnly) and the rest the completion (trained).
"""

from __future__ import annotations

import json
import re

from ..errors import DataError
from .conversation import Conversation

FORMAT = "promptTemplate"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.-]*)\}")


def _value(record: dict, name: str, source: str, line: int | None) -> str:
    if name not in record or record[name] is None:
        raise DataError(f"missing field '{name}' used by dataset.promptTemplate", path=source, line=line, field=name)
    value = record[name]
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return json.dumps(value)
    raise DataError(f"field '{name}' used by dataset.promptTemplate must be a string, got {type(value).__name__}",
                    path=source, line=line, field=name)


def fill(template: str, record: dict, source: str = "", line: int | None = None) -> str:
    """`template` with each {name} replaced by the record's field (DataError names a missing field)."""
    return PLACEHOLDER.sub(lambda m: _value(record, m.group(1), source, line), template)


def render(record: object, template: dict, source: str = "", line: int | None = None) -> Conversation:
    """One record -> a plain-text Conversation with `prompt_chars` marking the prompt."""
    if not isinstance(record, dict):
        raise DataError(f"each example must be a JSON object, got {type(record).__name__}", path=source, line=line)
    prompt = fill(template["prompt"], record, source, line)
    completion = fill(template["completion"], record, source, line)
    if not completion.strip():
        raise DataError("dataset.promptTemplate renders an empty completion", path=source, line=line)
    return Conversation(text=prompt + completion, prompt_chars=len(prompt), source=source, line=line, fmt=FORMAT)
