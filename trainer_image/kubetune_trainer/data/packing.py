"""Packing tokenized examples into blocks of at most `max_len` tokens.

Examples are never split: they are placed in order into the current block and a new block is
started when the next one does not fit. Each block carries ``position_ids`` that restart at 0 for
every example, and the first label of every example is -100, so no token is trained to predict
across an example boundary.

Cross-example attention: when a batch is given to a transformers (>= 4.54 / 5.x) decoder with
``position_ids`` and *no* ``attention_mask``, the model derives a block-diagonal causal mask
from the position restarts (sdpa/eager/flex) or uses variable-length kernels (flash-attention),
so tokens attend only within their own example. `DataCollator` therefore drops the attention mask
for packed batches. Passing an all-ones attention mask instead would let examples attend to
earlier examples in the same block.
"""

from __future__ import annotations

from .templating import IGNORE_INDEX


def pack(examples: list[dict], max_len: int) -> list[dict]:
    """Greedily pack examples (dicts with input_ids/labels, each <= max_len) into blocks."""
    blocks: list[dict] = []
    current: dict | None = None
    for example in examples:
        ids, labels = list(example["input_ids"]), list(example["labels"])
        if len(ids) > max_len:
            raise ValueError(f"example of {len(ids)} tokens is longer than the block size {max_len}; truncate first")
        if not ids:
            continue
        if current is None or len(current["input_ids"]) + len(ids) > max_len:
            current = {"input_ids": [], "labels": [], "position_ids": [], "attention_mask": [], "num_examples": 0}
            blocks.append(current)
        labels[0] = IGNORE_INDEX
        current["input_ids"].extend(ids)
        current["labels"].extend(labels)
        current["position_ids"].extend(range(len(ids)))
        current["attention_mask"].extend([1] * len(ids))
        current["num_examples"] += 1
    return blocks


def example_boundaries(position_ids: list[int]) -> list[tuple[int, int]]:
    """(start, end) index ranges of the examples in a packed block, from its position ids."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(position_ids)])]
