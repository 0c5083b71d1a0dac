"""Attention for packed batches as variable-length sequences (PyTorch's `varlen_attn`), without a mask.

A packed row holds several examples whose `position_ids` restart at 0. With SDPA, transformers turns that into a
block-diagonal causal `[batch, 1, seq, seq]` mask, and a mask sends SDPA to its memory-efficient kernel, which
takes the mask as an additive bias (kept for backward), and k/v repeated to every query head (kept too): on
Llama 3.1 8B with 2 x 2,048 tokens that is 64 MiB of repeated k/v and 24 MiB of masks in the recomputed layer at
the peak of a checkpointed LoRA step. `torch.nn.attention.varlen.varlen_attn` runs FlashAttention over the
concatenated examples with their cumulative lengths instead: no mask, and k/v stay at their own (grouped) heads.
It ships with PyTorch (no flash-attn build in the image) and needs a CUDA GPU of compute capability 8.0 or newer.

`ATTENTION` is registered with transformers' attention interface and takes its masks from the flash-attention
mask function: none for an unpadded batch, the 2-D padding mask otherwise. A call the kernel cannot take (a
padding mask, a KV cache, logit soft-capping, attention dropout, a row not starting at position 0, a CPU tensor)
runs SDPA with the equivalent boolean mask instead, so generation and evaluation on the same model stay correct.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

ATTENTION = "kubetune_varlen"
MIN_CAPABILITY = (8, 0)  # FlashAttention-2 (and cuDNN's varlen path): Ampere or newer


def varlen_problem(*, cuda: bool, precision: str, capability: tuple[int, int] | None = None) -> str:
    """'' when packed batches can run as variable-length attention here, else why not."""
    if not cuda:
        return "no CUDA device"
    if precision not in ("bf16", "fp16"):
        return f"precision {precision} (the kernel computes in bf16/fp16)"
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        return f"GPU compute capability {capability[0]}.{capability[1]} < 8.0"
    return ""


def config_problem(config: Any) -> str:
    """'' when the model's attention can run as variable-length attention, else why not."""
    if getattr(config, "attn_logit_softcapping", None):
        return "the model soft-caps attention logits"
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return "the model uses attention dropout"
    return ""


def cuda_capability() -> tuple[int, int]:
    """Compute capability of the current CUDA device."""
    return tuple(torch.cuda.get_device_capability())  # type: ignore[return-value]


def register() -> str:
    """Register `ATTENTION` (attention function and mask function) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)
    return ATTENTION


def varlen_segments(query: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """(cu_seqlens, longest example) for the kernel, or None when it cannot take this call: not a CUDA tensor,
    fp32 outside autocast, or a row that does not start at position 0 (the memory trace replaces this function
    and the kernel)."""
    half = query.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(query.device.type)
    if not query.is_cuda or not half:
        return None
    return _SEGMENTS.get(position_ids, query.shape[0])


def _varlen_attn(*args: Any, **kwargs: Any) -> torch.Tensor:
    from torch.nn.attention import varlen

    return varlen.varlen_attn(*args, **kwargs)


class _SegmentCache:
    """cu_seqlens of the last position_ids tensor seen: every decoder layer gets the same tensor, so the lengths
    (and the one device-to-host read of the longest example) are computed once per forward, not per layer."""

    def __init__(self) -> None:
        self._key: Any = None
        self._value: tuple[torch.Tensor, int] | None = None

    def get(self, position_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, int] | None:
        key = (weakref.ref(position_ids), position_ids._version, tuple(position_ids.shape), batch)
        if self._key is not None and self._key[0]() is position_ids and self._key[1:] == key[1:]:
            return self._value
        position_ids = position_ids.expand(batch, position_ids.shape[-1])
        starts_at_zero = bool((position_ids[:, 0] == 0).all().item())
        value = cu_seqlens(position_ids) if starts_at_zero else None
        self._key, self._value = key, value
        return value


_SEGMENTS = _SegmentCache()


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cumulative example lengths as int32 `[examples + 1]`, the longest example) of a `[batch, seq]` tensor of
    position ids in which every example starts at position 0 (rows are concatenated in order)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1).to(torch.int32)
    total = torch.tensor([flat.numel()], dtype=torch.int32, device=flat.device)
    cu = torch.cat([starts, total])
    return cu, int((cu[1:] - cu[:-1]).max().item())


def packed_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, softcap: float | None = None,
                             position_ids: torch.Tensor | None = None, **kwargs: Any):
    """transformers attention function: `query` `[batch, heads, seq, dim]`, `key`/`value` `[batch, kv_heads, kv_seq,
    dim]`; returns (`[batch, seq, heads, dim]`, None)."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    if position_ids is None or position_ids.shape[-1] != q_len:
        position_ids = torch.arange(q_len, device=query.device).unsqueeze(0)
    segments = None
    if attention_mask is None and kv_len == q_len and softcap is None and not (dropout and module.training):
        segments = varlen_segments(query, position_ids)
    position_ids = position_ids.expand(batch, q_len)
    if segments is None:
        return _sdpa_fallback(module, query, key, value, attention_mask, position_ids, dropout=dropout,
                              scaling=scaling, sliding_window=sliding_window, softcap=softcap, **kwargs)
    cu, longest = segments
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # as CUDA autocast runs SDPA: fp32 inputs (an fp32 residual stream) reach the kernel in bf16/fp16
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    q = query.transpose(1, 2).reshape(batch * q_len, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * kv_len, kv_heads, key.shape[-1])
    v = value.transpose(1, 2).reshape(batch * kv_len, kv_heads, value.shape[-1])
    window = (sliding_window - 1, 0) if sliding_window else (-1, 0)  # (-1, 0): causal
    out = _varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, window_size=window,
                       enable_gqa=kv_heads != heads)
    return out.view(batch, q_len, heads, value.shape[-1]), None


def block_causal_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor | None, kv_len: int,
                      sliding_window: int | None = None) -> torch.Tensor:
    """Boolean `[batch, 1, q_len, kv_len]` mask (True = attend): causal, within an example (position ids restart
    at 0 for a new one), not onto padded keys, and within the sliding window. The queries are the last `q_len`
    of `kv_len` positions (a KV cache holds the first ones); packed segments are told apart within the queries.
    A query with no key to attend (left padding) attends to all keys, so its output stays finite."""
    batch, q_len = position_ids.shape
    device = position_ids.device
    offset = kv_len - q_len
    q_idx = torch.arange(q_len, device=device) + offset
    kv_idx = torch.arange(kv_len, device=device)
    mask = (kv_idx[None, :] <= q_idx[:, None]).expand(batch, q_len, kv_len)
    if sliding_window:
        mask = mask & (kv_idx[None, :] > q_idx[:, None] - sliding_window)
    if offset == 0:
        segment = (position_ids == 0).cumsum(-1)
        mask = mask & (segment[:, :, None] == segment[:, None, :])
    if attention_mask is not None:
        keys = attention_mask[:, -kv_len:].bool()
        mask = mask & keys[:, None, :]
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None]


def _sdpa_fallback(module, query, key, value, attention_mask, position_ids, *, dropout, scaling, sliding_window,
                   softcap, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if softcap is not None:  # config_problem keeps such models off this attention
        raise NotImplementedError(f"{ATTENTION} does not soft-cap attention logits")
    mask = block_causal_mask(position_ids, attention_mask, key.shape[2], sliding_window)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
