"""Dataset preparation for training: load -> convert -> split -> tokenize/mask -> truncate -> pack -> report."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from .conversation import Conversation
from .formats import FORMATS, convert, detect_format
from .packing import pack
from .prompt_template import FORMAT as PROMPT_TEMPLATE_FORMAT
from .prompt_template import render as render_prompt_template
from .readers import read_records
from .report import length_stats
from .split import duplicate_count, split_by_hash
from .chat_templates import NAMED_TEMPLATES
from .templating import IGNORE_INDEX, encode, ensure_chat_template

log = logging.getLogger("kubetune_trainer.data")
MAX_LISTED_LOCATIONS = 10


def _local_path(uri_or_path: str | Path) -> tuple[Path, str]:
    """Resolve/fetch a dataset URI to a local file; returns (path, name used in messages)."""
    text = str(uri_or_path)
    if "://" not in text and Path(text).is_file():
        return Path(text), text
    from ..storage import fetch_dataset

    return fetch_dataset(text), text


def load_examples(uri_or_path: str | Path, fmt: str = "auto", prompt_template: dict | None = None) -> list[Conversation]:
    """Read and convert every example of a dataset file (rendered by `prompt_template` when given); DataError names
    the file, line and field."""
    path, name = _local_path(uri_or_path)
    source = str(path) if name == str(path) else f"{name} ({path.name})"
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; expected auto or one of {list(FORMATS)}", path=source)
    examples: list[Conversation] = []
    chosen = None if fmt == "auto" else fmt
    for line, record in read_records(path):
        if prompt_template:
            examples.append(render_prompt_template(record, prompt_template, source, line))
            continue
        if chosen is None:
            chosen = detect_format(record, source, line)
        examples.append(convert(record, chosen, source, line))
    if not examples:
        raise DataError("dataset has no examples", path=source)
    return examples


@dataclass
class PreparedData:
    """Tokenized train/eval sets (HF `datasets.Dataset`; eval is None when there is no eval data) and the report."""

    train: Any
    eval: Any
    report: dict = field(default_factory=dict)


def _locations(examples: list[Conversation]) -> list[str]:
    return [ex.where for ex in examples[:MAX_LISTED_LOCATIONS]]


def _tokenize(examples: list[Conversation], tokenizer, max_len: int, completion_only: bool,
              stats: dict) -> list[dict]:
    """Encode, truncate (counted) and drop examples left without any trained token."""
    rows: list[dict] = []
    for ex in examples:
        enc = encode(ex, tokenizer, completion_only)
        stats["lengths"].append(len(enc.input_ids))
        ids, labels = enc.input_ids, enc.labels
        if len(ids) > max_len:
            stats["truncated"].append(ex)
            ids, labels = ids[:max_len], labels[:max_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            stats["no_targets"].append(ex)
            continue
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return rows


def _to_dataset(rows: list[dict]):
    from datasets import Dataset

    return Dataset.from_list(rows)


def _drop_empty_answers(examples: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    kept = [ex for ex in examples if not ex.has_empty_answer()]
    dropped = [ex for ex in examples if ex.has_empty_answer()]
    return kept, dropped


def build_datasets(plan_dataset: dict, plan_training: dict, tokenizer, seed: int) -> PreparedData:
    """Prepare train/eval data from the plan's `dataset` and `training` blocks (docs/contracts.md §2)."""
    uri = plan_dataset.get("uri")
    if not uri:
        raise DataError("plan dataset.uri is empty")
    fmt = plan_dataset.get("format", "auto") or "auto"
    eval_uri = plan_dataset.get("evalUri") or ""
    eval_split = float(plan_dataset.get("evalSplit", 0.0) or 0.0)
    max_len = int(plan_training.get("maxSeqLength", 2048))
    packing = bool(plan_training.get("packing", False))
    completion_only = bool(plan_training.get("completionOnly", True))
    if max_len < 2:
        raise DataError(f"training.maxSeqLength must be at least 2, got {max_len}")

    prompt_template = plan_dataset.get("promptTemplate") or None
    examples = load_examples(uri, fmt, prompt_template)
    detected = examples[0].fmt
    duplicates = duplicate_count(examples)
    plain = detected in ("text", PROMPT_TEMPLATE_FORMAT)
    template_added = False if plain else ensure_chat_template(tokenizer)

    overlap_dropped = 0
    if eval_uri:
        eval_examples = load_examples(eval_uri, fmt, prompt_template)
        eval_hashes = {ex.content_hash() for ex in eval_examples}
        train_examples = [ex for ex in examples if ex.content_hash() not in eval_hashes]
        overlap_dropped = len(examples) - len(train_examples)
        if overlap_dropped:
            log.warning("dropped %d training examples that also appear in the eval set %s", overlap_dropped, eval_uri)
    else:
        train_examples, eval_examples = split_by_hash(examples, eval_split, seed)

    train_examples, empty_train = _drop_empty_answers(train_examples)
    eval_examples, empty_eval = _drop_empty_answers(eval_examples)
    empty = empty_train + empty_eval
    if empty:
        log.warning("dropped %d examples with an empty assistant answer (first at %s)", len(empty),
                    ", ".join(_locations(empty)))

    stats: dict = {"lengths": [], "truncated": [], "no_targets": []}
    train_rows = _tokenize(train_examples, tokenizer, max_len, completion_only, stats)
    eval_rows = _tokenize(eval_examples, tokenizer, max_len, completion_only, stats)
    if stats["truncated"]:
        log.warning("truncated %d of %d examples to maxSeqLength=%d tokens (first at %s)", len(stats["truncated"]),
                    len(stats["lengths"]), max_len, ", ".join(_locations(stats["truncated"])))
    if stats["no_targets"]:
        log.warning("dropped %d examples with no trained token left after truncation (first at %s)",
                    len(stats["no_targets"]), ", ".join(_locations(stats["no_targets"])))
    if not train_rows:
        raise DataError("no usable training examples after dropping empty answers and fully truncated answers",
                        path=str(uri))

    train_count, eval_count = len(train_rows), len(eval_rows)
    train_target_tokens = sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in train_rows)
    train_tokens = sum(len(r["input_ids"]) for r in train_rows)
    train_blocks = eval_blocks = None
    if packing:
        train_rows = [_strip_count(b) for b in pack(train_rows, max_len)]
        eval_rows = [_strip_count(b) for b in pack(eval_rows, max_len)]
        train_blocks, eval_blocks = len(train_rows), len(eval_rows)

    report = {
        "source": str(uri),
        "evalSource": eval_uri,
        "format": detected,
        "examples": len(examples),
        "trainExamples": train_count,
        "evalExamples": eval_count,
        "duplicates": duplicates,
        "emptyAnswers": len(empty),
        "emptyAnswerLocations": _locations(empty),
        "truncated": len(stats["truncated"]),
        "truncatedLocations": _locations(stats["truncated"]),
        "droppedNoTargets": len(stats["no_targets"]),
        "evalOverlapDropped": overlap_dropped,
        "tokens": length_stats(stats["lengths"]),
        "trainTokens": train_tokens,
        "trainTargetTokens": train_target_tokens,
        "maxSeqLength": max_len,
        "completionOnly": completion_only and detected != "text",
        "chatTemplate": plan_dataset.get("chatTemplate") if plan_dataset.get("chatTemplate") in NAMED_TEMPLATES
        else ("inline" if plan_dataset.get("chatTemplate") else ""),
        "packing": packing,
        "packedTrainBlocks": train_blocks,
        "packedEvalBlocks": eval_blocks,
        "chatTemplateAdded": template_added,
    }
    log.info("data report: %s", json.dumps(report, sort_keys=True))
    return PreparedData(train=_to_dataset(train_rows), eval=_to_dataset(eval_rows) if eval_rows else None,
                        report=report)


def _strip_count(block: dict) -> dict:
    return {k: v for k, v in block.items() if k != "num_examples"}
