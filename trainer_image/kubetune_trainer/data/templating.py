"""Chat templating and prompt masking: conversation -> input_ids + labels (-100 on untrained tokens).

Assistant spans are found by rendering the conversation prefix: for assistant turn i the text of
``messages[:i]`` with the generation prompt must be a prefix of the text of ``messages[:i+1]``, which
must be a prefix of the whole conversation; the characters in between (trailing whitespace
excluded, end-of-turn token included) are the answer. Tokens whose offsets start inside an answer
are trained. This works with any chat template that renders turns left to right, with or
without ``{% generation %}`` blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from .conversation import Conversation

IGNORE_INDEX = -100

DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' }}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{{ '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template (base models) a simple one; True when one was set."""
    if getattr(tokenizer, "chat_template", None):
        return False
    if tokenizer.eos_token is None:
        raise DataError("the tokenizer has neither a chat template nor an eos token; cannot format chat examples")
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return True


@dataclass
class Encoded:
    """A tokenized example before truncation."""

    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        """Number of tokens that carry a label."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(conv: Conversation, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """Render the conversation and return (text, [(start, end) character spans of the assistant answers])."""
    messages = [{"role": m.role, "content": m.content} for m in conv.messages]
    try:
        text = _render(tokenizer, messages, False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = _render(tokenizer, messages[:index], True) if index else ""
            upto = _render(tokenizer, messages[: index + 1], False)
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise DataError(
                    "the tokenizer's chat template does not render conversation prefixes consistently, so the "
                    "assistant answers cannot be located for prompt masking; set training.completionOnly: false",
                    path=conv.source, line=conv.line)
            start, end = len(prompt), len(upto.rstrip())
            if end > start:
                spans.append((start, end))
    except DataError:
        raise
    except Exception as exc:  # jinja errors from templates that reject the turn order, etc.
        raise DataError(f"chat template failed: {exc}", path=conv.source, line=conv.line) from exc
    return text, spans


def _tokenize_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    try:
        out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(out["input_ids"]), [tuple(o) for o in out["offset_mapping"]]
    except (NotImplementedError, ValueError, TypeError):  # slow tokenizers have no offsets
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]), None


def encode_chat(conv: Conversation, tokenizer, completion_only: bool = True) -> Encoded:
    """Apply the chat template; labels are the assistant tokens (completion_only) or every token."""
    text, spans = assistant_spans(conv, tokenizer)
    if not completion_only:
        ids, _ = _tokenize_with_offsets(tokenizer, text)
        return Encoded(ids, list(ids))
    ids, offsets = _tokenize_with_offsets(tokenizer, text)
    if offsets is None:
        return _encode_by_segments(tokenizer, text, spans)
    labels = [IGNORE_INDEX] * len(ids)
    span_index = 0
    for position, ((start, _end), token) in enumerate(zip(offsets, ids)):
        while span_index < len(spans) and start >= spans[span_index][1]:
            span_index += 1
        if span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]:
            labels[position] = token
    return Encoded(ids, labels)


def _encode_by_segments(tokenizer, text: str, spans: list[tuple[int, int]]) -> Encoded:
    """Fallback without offsets: tokenize prompt and answer segments separately."""
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in spans + [(len(text), len(text))]:
        for segment, trained in ((text[cursor:start], False), (text[start:end], True)):
            if not segment:
                continue
            seg_ids = list(tokenizer(segment, add_special_tokens=False)["input_ids"])
            ids.extend(seg_ids)
            labels.extend(seg_ids if trained else [IGNORE_INDEX] * len(seg_ids))
        cursor = end
    return Encoded(ids, labels)


def encode_text(conv: Conversation, tokenizer, completion_only: bool = True) -> Encoded:
    """Plain text: bos (if the tokenizer has one) + text + eos; every token is a label, except (completion_only) the
    prompt of a prompt-template example (its first `prompt_chars` characters)."""
    masked = bool(conv.prompt_chars) and completion_only
    if masked:
        split = _encode_by_segments(tokenizer, conv.text, [(conv.prompt_chars, len(conv.text))])
        ids, labels = split.input_ids, split.labels
    else:
        ids = list(tokenizer(conv.text, add_special_tokens=False)["input_ids"])
        labels = list(ids)
    if tokenizer.bos_token_id is not None:
        ids, labels = [tokenizer.bos_token_id] + ids, [IGNORE_INDEX if masked else tokenizer.bos_token_id] + labels
    if tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return Encoded(ids, labels)


def encode(conv: Conversation, tokenizer, completion_only: bool = True) -> Encoded:
    """Tokenize one example (chat or text)."""
    return encode_text(conv, tokenizer, completion_only) if conv.is_text else encode_chat(conv, tokenizer,
                                                                                           completion_only)
