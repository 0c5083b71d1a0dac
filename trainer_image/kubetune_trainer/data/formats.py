"""Format detection and conversion of alpaca / sharegpt / messages / text records to `Conversation`."""

from __future__ import annotations

from typing import Callable

from ..errors import DataError
from .conversation import ROLES, Conversation, Message

FORMATS = ("alpaca", "sharegpt", "messages", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


def detect_format(record: object, source: str = "", line: int | None = None) -> str:
    """Guess the format of one record from its keys."""
    if not isinstance(record, dict):
        raise DataError(f"each example must be a JSON object, got {type(record).__name__}", path=source, line=line)
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    raise DataError(
        f"unknown dataset format: keys {sorted(record)}; expected 'messages' (OpenAI), 'conversations' "
        "(sharegpt), 'instruction'+'output' (alpaca) or 'text'", path=source, line=line)


def _string(record: dict, key: str, source: str, line: int | None, *, required: bool = True,
            label: str | None = None) -> str:
    label = label or key
    if key not in record or record[key] is None:
        if required:
            raise DataError(f"missing required field '{label}'", path=source, line=line, field=label)
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"field '{label}' must be a string, got {type(value).__name__}", path=source, line=line,
                        field=label)
    return value


def _require_dict(record: object, source: str, line: int | None) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"each example must be a JSON object, got {type(record).__name__}", path=source, line=line)
    return record


def _check_turns(messages: list[Message], field: str, source: str, line: int | None) -> None:
    if not any(m.role == "assistant" for m in messages):
        raise DataError(f"field '{field}' has no assistant turn to train on", path=source, line=line, field=field)
    for index, message in enumerate(messages):
        if message.role == "system" and index != 0:
            raise DataError(f"field '{field}[{index}]': a system message must come first", path=source, line=line,
                            field=f"{field}[{index}]")


def from_alpaca(record: object, source: str = "", line: int | None = None) -> Conversation:
    """alpaca: instruction (+ optional input, system) -> user turn; output -> assistant turn."""
    record = _require_dict(record, source, line)
    instruction = _string(record, "instruction", source, line)
    extra = _string(record, "input", source, line, required=False)
    output = _string(record, "output", source, line)
    system = _string(record, "system", source, line, required=False)
    if not instruction.strip():
        raise DataError("field 'instruction' is empty", path=source, line=line, field="instruction")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = ([Message("system", system)] if system.strip() else []) + [Message("user", prompt),
                                                                            Message("assistant", output)]
    return Conversation(tuple(messages), source=source, line=line, fmt="alpaca")


def from_sharegpt(record: object, source: str = "", line: int | None = None) -> Conversation:
    """sharegpt: conversations [{from: human|gpt|system, value}] (+ optional top-level system)."""
    record = _require_dict(record, source, line)
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError("field 'conversations' must be a non-empty list", path=source, line=line,
                        field="conversations")
    messages: list[Message] = []
    system = _string(record, "system", source, line, required=False)
    if system.strip():
        messages.append(Message("system", system))
    for index, turn in enumerate(turns):
        field = f"conversations[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"field '{field}' must be an object with 'from' and 'value'", path=source, line=line,
                            field=field)
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"field '{field}.from' is {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}",
                            path=source, line=line, field=f"{field}.from")
        value = _string(turn, "value", source, line, label=f"{field}.value")
        messages.append(Message(SHAREGPT_ROLES[speaker], value))
    _check_turns(messages, "conversations", source, line)
    return Conversation(tuple(messages), source=source, line=line, fmt="sharegpt")


def _content_text(content: object, field: str, source: str, line: int | None) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        parts = []
        for index, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise DataError(f"field '{field}[{index}]' is not a text part ({{type: text, text: ...}})",
                                path=source, line=line, field=f"{field}[{index}]")
            parts.append(part["text"])
        return "".join(parts)
    raise DataError(f"field '{field}' must be a string, got {type(content).__name__}", path=source, line=line,
                    field=field)


def from_messages(record: object, source: str = "", line: int | None = None) -> Conversation:
    """OpenAI chat: messages [{role: system|user|assistant, content}]."""
    record = _require_dict(record, source, line)
    turns = record.get("messages")
    if not isinstance(turns, list) or not turns:
        raise DataError("field 'messages' must be a non-empty list", path=source, line=line, field="messages")
    messages: list[Message] = []
    for index, turn in enumerate(turns):
        field = f"messages[{index}]"
        if not isinstance(turn, dict):
            raise DataError(f"field '{field}' must be an object with 'role' and 'content'", path=source, line=line,
                            field=field)
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f"field '{field}.role' is {role!r}; expected one of {list(ROLES)}", path=source,
                            line=line, field=f"{field}.role")
        if "content" not in turn or turn["content"] is None:
            raise DataError(f"missing required field '{field}.content'", path=source, line=line,
                            field=f"{field}.content")
        messages.append(Message(role, _content_text(turn["content"], f"{field}.content", source, line)))
    _check_turns(messages, "messages", source, line)
    return Conversation(tuple(messages), source=source, line=line, fmt="messages")


def from_text(record: object, source: str = "", line: int | None = None) -> Conversation:
    """Plain text: {text: ...}; every token is trained."""
    record = _require_dict(record, source, line)
    text = _string(record, "text", source, line)
    if not text.strip():
        raise DataError("field 'text' is empty", path=source, line=line, field="text")
    return Conversation(text=text, source=source, line=line, fmt="text")


CONVERTERS: dict[str, Callable[[object, str, int | None], Conversation]] = {
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "messages": from_messages,
    "text": from_text,
}


def convert(record: object, fmt: str, source: str = "", line: int | None = None) -> Conversation:
    """Convert one record of a known format to a Conversation (DataError names file, line and field)."""
    if fmt not in CONVERTERS:
        raise DataError(f"unknown dataset format {fmt!r}; expected auto or one of {list(FORMATS)}", path=source)
    return CONVERTERS[fmt](record, source, line)
