"""The training loss without the full ``[tokens, vocab]`` logits.

transformers' causal-LM loss computes ``lm_head`` over every position and upcasts the whole logits tensor
to fp32 before cross-entropy: 2-4 GiB at 8B x 4096 tokens, far more for 150k-256k vocabularies, and its
gradient of the same size during backward. Here the model body runs once, then only the completion
tokens (labels != -100 after the causal shift) go through ``lm_head`` + fp32 cross-entropy, a chunk of
tokens at a time, and backward keeps only the chunk inputs (bf16 hidden states) and recomputes one chunk's
logits at a time. The value is the same mean over completion tokens that transformers returns (up to float
summation order).

When ``lm_head`` is a plain Linear (full fine-tuning, or a frozen head under LoRA) one autograd function does
the chunks (`LinearCrossEntropy`): its backward adds every chunk's part of the weight's gradient into one
buffer in place. Autograd would form each chunk's part as a tensor of the weight's size and sum the parts
out of place (running sum, next part, their sum: three lm_head-sized tensors, 3 GiB at Llama 3.1 8B in
bf16, the peak of a full fine-tuning step). Other heads (LoRA-wrapped, ZeRO-3 shards) run each chunk
through the module under activation checkpointing.

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


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype lm_head's matmul runs in: autocast's when it is on (as nn.Linear would), else the weight's."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _softcapped(logits: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(capped fp32 logits, tanh(logits / cap) for the backward) — in place where it can be."""
    if not softcap:
        return logits, None
    t = torch.tanh(logits.div_(softcap))
    return t * softcap, t


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's fp32 (soft-capped) logits from its matmul in `dtype`, and the tanh the soft-cap's backward needs."""
    return _softcapped(nn.functional.linear(h.to(dtype), w, b).float(), softcap)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(softcap(hidden_i @ weight.T + bias), label_i) in fp32, `chunk` rows at a time, every label valid.

    Saves only its inputs. Backward recomputes one chunk's logits at a time, turns them into the logits'
    gradient in place (softmax minus one-hot, times the incoming gradient and the soft-cap's derivative) and
    adds the chunk's parts into the hidden states' gradient and, in place, into one weight-sized gradient.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk: int, softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, labels.numel(), chunk):
                logits, _ = _chunk_logits(hidden[start:start + chunk], w, b, dtype, softcap)
                total += nn.functional.cross_entropy(logits, labels[start:start + chunk], reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, labels)
        ctx.chunk, ctx.softcap, ctx.dtype = chunk, softcap, dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor):  # type: ignore[override]
        hidden, weight, bias, labels = ctx.saved_tensors
        chunk, softcap, dtype = ctx.chunk, ctx.softcap, ctx.dtype
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if want_h else None
        # In place into the weight's own dtype when the matmul runs in it (the lean bf16 path); otherwise
        # (an fp32 weight under autocast) each chunk's part is cast, as autograd would.
        grad_w = torch.zeros_like(weight) if want_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if want_b and bias is not None else None
        scale = grad_total.float()
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, labels.numel(), chunk):
                h = hidden[start:start + chunk].to(dtype)
                y = labels[start:start + chunk]
                logits, t = _chunk_logits(h, w, b, dtype, softcap)
                g = logits.sub_(logits.logsumexp(-1, keepdim=True)).exp_()  # softmax, in place
                g[torch.arange(y.numel(), device=y.device), y] -= 1.0
                g.mul_(scale)
                if t is not None:
                    g.mul_(t.square_().neg_().add_(1.0))  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
                    del t
                g = g.to(dtype)
                if grad_h is not None and grad_h.dtype == dtype:
                    torch.mm(g, w, out=grad_h[start:start + chunk])
                elif grad_h is not None:
                    grad_h[start:start + chunk] = g @ w
                if grad_w is not None:
                    if grad_w.dtype == dtype:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).to(grad_w.dtype)
                if grad_b is not None:
                    grad_b += g.float().sum(0)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _fused_head(head: nn.Module) -> bool:
    """Whether `LinearCrossEntropy` can take `head`'s weight directly: a plain Linear whose weight is whole
    (a ZeRO-3 partitioned weight only exists inside the module's own forward)."""
    return _plain_linear(head) and not hasattr(head.weight, "ds_id")


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
    if _fused_head(head):
        return total + LinearCrossEntropy.apply(kept_hidden, head.weight, head.bias, kept_labels, chunk_tokens,
                                                softcap, _compute_dtype(hidden, head.weight)), count
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
