"""The canonical example form every dataset format is converted into."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    """One chat turn: role is system, user or assistant."""

    role: str
    content: str


@dataclass(frozen=True)
class Conversation:
    """A training example: chat messages, or (format `text`) one plain text; `source`/`line` say where it came from."""

    messages: tuple[Message, ...] = ()
    text: str | None = None
    source: str = ""
    line: int | None = None
    fmt: str = ""
    prompt_chars: int = 0  # plain text from a prompt template: the first prompt_chars characters are the prompt
    _hash: str = field(default="", compare=False, repr=False)

    @property
    def is_text(self) -> bool:
        """True for plain-text (pretraining-style) examples."""
        return self.text is not None

    @property
    def where(self) -> str:
        """`file:line` (or just the file) for messages."""
        return f"{self.source}:{self.line}" if self.line is not None else self.source

    def to_dict(self) -> dict:
        """Canonical JSON-able form (used by golden tests and the content hash); no location info."""
        if self.is_text:
            return {"text": self.text}
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}

    def content_hash(self) -> str:
        """SHA-256 of the canonical content: identical examples hash the same wherever they occur."""
        payload = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def assistant_answers(self) -> list[str]:
        """The contents of the assistant turns, in order."""
        return [m.content for m in self.messages if m.role == "assistant"]

    def has_empty_answer(self) -> bool:
        """True when some assistant turn is empty or only whitespace."""
        return any(not a.strip() for a in self.assistant_answers())
