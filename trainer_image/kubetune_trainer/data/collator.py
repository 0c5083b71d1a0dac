"""Batch collation for a plain torch DataLoader: right-pads input_ids (pad id) and labels (-100)."""

from __future__ import annotations

from typing import Sequence

from .templating import IGNORE_INDEX


class DataCollator:
    """Pad a list of examples (input_ids, labels[, attention_mask, position_ids]) into a batch of tensors.

    Packed examples (with ``position_ids``) are padded with a fresh position run so padding forms its
    own "example", and by default the attention mask is left out so transformers builds a
    block-diagonal causal mask from the position ids (see `kubetune_trainer.data.packing`).
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None,
                 keep_attention_mask_when_packed: bool = False) -> None:
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.keep_attention_mask_when_packed = keep_attention_mask_when_packed

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> "DataCollator":
        """Collator using the tokenizer's pad id (eos when it has no pad token)."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return cls(pad, **kwargs)

    def __call__(self, features: Sequence[dict]) -> dict:
        import torch

        if not features:
            raise ValueError("cannot collate an empty batch")
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        packed = all("position_ids" in f for f in features)
        input_ids, labels, attention, positions = [], [], [], []
        for feature in features:
            ids = list(feature["input_ids"])
            lab = list(feature["labels"])
            if len(lab) != len(ids):
                raise ValueError(f"labels ({len(lab)}) and input_ids ({len(ids)}) differ in length")
            pad = length - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            mask = list(feature.get("attention_mask") or [1] * len(ids))
            attention.append(mask + [0] * pad)
            if packed:
                positions.append(list(feature["position_ids"]) + list(range(pad)))
        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }
        if packed:
            batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
            if self.keep_attention_mask_when_packed:
                batch["attention_mask"] = torch.tensor(attention, dtype=torch.long)
        else:
            batch["attention_mask"] = torch.tensor(attention, dtype=torch.long)
        return batch
