"""The examples an evaluation runs on, read before training so a bad file fails the job before any generation.

Held-out examples are `evaluation.datasetUri` when set, else the job's own eval data (`dataset.evalUri`, or the
`evalSplit` the trainer held out: the same content-hash split). Training examples (for the regurgitation check)
are the rest of the training file. Each example is a conversation up to its last assistant turn (the prompt) and
that turn (the reference). The general-ability probe is `generalProbeUri` or the set shipped with the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from kubetune_trainer.data import load_examples
from kubetune_trainer.data.conversation import Conversation
from kubetune_trainer.data.split import split_by_hash
from kubetune_trainer.errors import DataError
from kubetune_trainer.plan import Plan

BUILTIN_PROBE = "general_probe.jsonl"


@dataclass(frozen=True)
class Example:
    """A prompt (chat messages before the answer, or the plain-text prompt of a dataset.promptTemplate example),
    the reference answer, the example as the trainer read it, and where it came from."""

    messages: tuple[dict, ...]
    reference: str
    where: str = ""
    text_prompt: str | None = None
    conversation: Conversation | None = None

    @property
    def prompt(self) -> str:
        """The last user turn, or the plain-text prompt (for reports)."""
        if self.text_prompt is not None:
            return self.text_prompt
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def generation_input(self) -> tuple[dict, ...] | str:
        """What the model is prompted with (kubetune_trainer.generate.prompt_ids)."""
        return self.text_prompt if self.text_prompt is not None else self.messages


@dataclass(frozen=True)
class EvalSet:
    """Everything the evaluation generates on."""

    held_out: list[Example]
    training: list[Example]
    probe: list[Example]
    source: str
    probe_source: str
    training_answers: frozenset[str] = frozenset()  # every training answer, stripped (regurgitation check)


def to_example(conv: Conversation) -> Example | None:
    """The conversation as prompt + reference, or None (plain text, or no assistant answer at the end)."""
    split = getattr(conv, "prompt_chars", 0)
    if conv.is_text and split:  # dataset.promptTemplate: prompt and completion of one text
        answer = conv.text[split:]
        if not answer.strip():
            return None
        return Example(messages=(), reference=answer, where=conv.where, text_prompt=conv.text[:split],
                       conversation=conv)
    if conv.is_text or len(conv.messages) < 2 or conv.messages[-1].role != "assistant":
        return None
    if not conv.messages[-1].content.strip():
        return None
    msgs = tuple({"role": m.role, "content": m.content} for m in conv.messages[:-1])
    return Example(messages=msgs, reference=conv.messages[-1].content, where=conv.where, conversation=conv)


def to_examples(convs: list[Conversation], limit: int, source: str) -> list[Example]:
    """The first `limit` usable examples; DataError (naming the file) when there is none."""
    out = [ex for ex in map(to_example, convs) if ex is not None][:limit]
    if not out:
        raise DataError("no example with a prompt and an answer to evaluate on (plain text without a "
                        "dataset.promptTemplate, and chats without a final assistant turn, cannot be scored)",
                        path=source)
    return out


def builtin_probe() -> list[Conversation]:
    """The generic instruction set shipped with the trainer."""
    ref = resources.files("kubetune_trainer.evaluation").joinpath(BUILTIN_PROBE)
    with resources.as_file(ref) as path:
        return load_examples(str(path))


def load_eval_set(plan: Plan) -> EvalSet:
    """Read and split every example set of `plan.evaluation` (DataError names the file and line)."""
    ev = plan.evaluation
    if ev is None:
        raise ValueError("the plan has no evaluation block")
    ds = plan.dataset
    template = getattr(ds, "prompt_template", None)
    fmt_args = (ds.format, template.to_json_dict()) if template is not None else (ds.format,)
    examples = load_examples(ds.uri, *fmt_args)
    if ds.eval_uri:
        own_eval = load_examples(ds.eval_uri, *fmt_args)
        held = {c.content_hash() for c in own_eval}
        train = [c for c in examples if c.content_hash() not in held]
        source = ds.eval_uri
    else:
        train, own_eval = split_by_hash(examples, ds.eval_split, plan.training.seed)
        source = f"{ds.uri} (held-out split evalSplit={ds.eval_split})"
    if ev.dataset_uri:
        own_eval = load_examples(ev.dataset_uri, *fmt_args) if template is not None else \
            load_examples(ev.dataset_uri, "auto")
        source = ev.dataset_uri
        held = {c.content_hash() for c in own_eval}
        train = [c for c in train if c.content_hash() not in held]
    if not own_eval:
        raise DataError("evaluation needs held-out examples: set dataset.evalSplit > 0, dataset.evalUri or "
                        "evaluation.datasetUri", path=ds.uri)
    if ev.general_probe_uri:
        probe_convs, probe_source = load_examples(ev.general_probe_uri, "auto"), ev.general_probe_uri
    else:
        probe_convs, probe_source = builtin_probe(), "builtin"
    all_train = [ex for ex in map(to_example, train) if ex is not None]
    return EvalSet(held_out=to_examples(own_eval, ev.num_examples, source),
                   training=all_train[:ev.num_examples],
                   training_answers=frozenset(ex.reference.strip() for ex in all_train),
                   probe=to_examples(probe_convs, ev.num_examples, probe_source),
                   source=source, probe_source=probe_source)
