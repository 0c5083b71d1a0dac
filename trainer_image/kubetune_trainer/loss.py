"""The training loss without the full ``[tokens, vocab]`` logits.

transformers' causal-LM loss computes ``lm_head`` over every position and upcasts the whole logits tensor
to fp32 before cross-entropy: 2-4 GiB at 8B x 4096 tokens, far more for 150k-256k vocabularies, and its
gradient of the same size during backward. Here the model body runs once, then only the completion
tokens (labels != -100 after the causal shift) go through ``lm_head`` + fp32 cross-entropy, a chunk of
tokens at a time; each chunk is checkpointed, so backward keeps only the chunk inputs (bf16 hidden states)
and recomputes one chunk's logits at a time. The value is the same mean over completion tokens that
transformers returns (up to float summation order).

On CUDA with ``training.ligerKernels`` Liger's fused linear cross-entropy does the same in Triton kernels
(used when ``lm_head`` is a plain Linear: not LoRA-wrapped and not a ZeRO-3 shard).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# fp32 logits per chunk: ~64 MiB, e.g. 130 tokens at a 128k vocabulary. A fixed byte budget keeps the peak
# independent of the sequence length; the chunk's backward holds three buffers of this size (log-softmax output,
# its incoming gradient, the logits' gradient). 256 MiB (torchtune's 8 chunks at 4,096 tokens) made the loss
# backward the peak of a checkpointed LoRA step once the recomputed layer got lean (kubetune_trainer.tokenwise).
CHUNK_LOGIT_BYTES = 64 * 2 ** 20
MIN_CHUNK_TOKENS = 64
# Config attributes that rescale logits in a family's forward (Cohere, Granite): the chunked loss would
# miss them, so those models keep transformers' own loss.
UNSUPPORTED_SCALING = ("logit_scale", "logits_scaling")


@dataclass
class LossOutput(ModelOutput):
    """`loss`: mean over completion tokens (what is back-propagated); `loss_sum` and `tokens` for eval sums."""

    loss: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    tokens: torch.Tensor | None = None


def chunk_tokens_for(vocab_size: int, budget_bytes: int = CHUNK_LOGIT_BYTES) -> int:
    """Tokens per loss chunk so one chunk's fp32 logits stay within `budget_bytes`."""
    return max(MIN_CHUNK_TOKENS, budget_bytes // (4 * max(1, vocab_size)))


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with the hidden state that predicts them (position t predicts token t+1)."""
    return nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def _chunk_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return nn.functional.cross_entropy(logits, labels, reduction="sum")


def chunked_ce_sum(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module, *, chunk_tokens: int,
                   softcap: float | None = None, checkpoint_chunks: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 cross-entropy over tokens with label != -100, their count): `head` runs per chunk.

    `hidden` is [..., hidden] and `labels` [...] already aligned (see `shifted_labels`).
    """
    hidden = hidden.reshape(-1, hidden.size(-1))
    labels = labels.reshape(-1).to(hidden.device)
    keep = labels != IGNORE_INDEX
    kept_hidden, kept_labels = hidden[keep], labels[keep]
    count = keep.sum()
    # Stays connected to the graph when no token counts (every parameter still gets a (zero) gradient).
    total = hidden.sum().float() * 0.0
    for start in range(0, kept_labels.numel(), chunk_tokens):
        h, y = kept_hidden[start:start + chunk_tokens], kept_labels[start:start + chunk_tokens]
        if checkpoint_chunks and torch.is_grad_enabled():
            part = checkpoint(_chunk_ce_sum, h, y, head, softcap, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_ce_sum(h, y, head, softcap)
        total = total + part
    return total, count


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def softcap_of(config: Any) -> float | None:
    """The final-logit soft-capping value of a config (Gemma 2/3), or None."""
    value = getattr(config, "final_logit_softcapping", None)
    return float(value) if value else None


def chunked_loss_supported(model: nn.Module) -> str:
    """'' when the chunked loss reproduces `model`'s own loss, else why not (the model keeps its own loss)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        return f"{type(model).__name__} does not expose its decoder and lm_head"
    for name in UNSUPPORTED_SCALING:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"config.{name} rescales the logits"
    if model.get_output_embeddings() is None:
        return "the model has no output embeddings"
    return ""


class CausalLMLoss(nn.Module):
    """Wraps a (peft-wrapped) causal LM: forward(input_ids, attention_mask, labels) -> LossOutput.

    The wrapped model's parameters are this module's (prefix ``model.``); engines save and export
    through the wrapped model itself.
    """

    def __init__(self, model: nn.Module, *, chunk_tokens: int | None = None, liger: bool = False) -> None:
        super().__init__()
        self.model = model
        config = model.config
        self.softcap = softcap_of(config)
        self.chunk_tokens = chunk_tokens or chunk_tokens_for(int(getattr(config, "vocab_size", 0) or 32000))
        self.fallback = chunked_loss_supported(model)
        if self.fallback:
            log.info("loss: transformers' full-logits loss (%s)", self.fallback)
        self._liger = None
        if liger and not self.fallback and _plain_linear(model.get_output_embeddings()):
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self._liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum",
                                                           softcap=self.softcap)

    @property
    def kind(self) -> str:
        """Which loss runs: chunked | liger | transformers."""
        return "transformers" if self.fallback else "liger" if self._liger is not None else "chunked"

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> LossOutput:
        """Mean cross-entropy over completion tokens (plus their sum and count)."""
        if self.fallback:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
            count = (shifted_labels(labels) != IGNORE_INDEX).sum()
            return LossOutput(loss=out.loss, loss_sum=out.loss.float() * count, tokens=count)
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                         **kwargs).last_hidden_state
        target = shifted_labels(labels)
        head = self.model.get_output_embeddings()
        if self._liger is not None and hidden.is_cuda:
            flat_h = hidden.reshape(-1, hidden.size(-1))
            flat_y = target.reshape(-1)
            total = self._liger(head.weight, flat_h, flat_y, head.bias).float()
            count = (flat_y != IGNORE_INDEX).sum()
        else:
            total, count = chunked_ce_sum(hidden, target, head, chunk_tokens=self.chunk_tokens, softcap=self.softcap)
        return LossOutput(loss=total / count, loss_sum=total, tokens=count)


def reference_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' own causal-LM loss on `batch` (full logits; for tests and comparisons)."""
    return model(**batch).loss
