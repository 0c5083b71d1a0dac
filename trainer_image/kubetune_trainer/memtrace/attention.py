"""The attention kernel CUDA would run, and what it keeps, for a trace that runs on CPU fake tensors.

On CPU, `scaled_dot_product_attention` picks CPU kernels (or the math kernel, which stores the full
`[batch, heads, seq, seq]` attention matrix); on a GPU, PyTorch picks FlashAttention-2 when there is no mask
(bf16/fp16, head dim <= 256) and the memory-efficient (cutlass) kernel when there is one. Inside the trace
`cuda_attention()` replaces `torch.nn.functional.scaled_dot_product_attention` by a function that chooses the
kernel as CUDA would and allocates exactly what that kernel allocates (output, logsumexp, and in backward the
gradients plus the kernel's fp32 accumulators); only the math fallback runs the real decomposition.

Sizes follow PyTorch's CUDA kernels: flash keeps `out` and an fp32 logsumexp `[B, H, Lq]`; its backward
allocates dq/dk/dv, an fp32 dq accumulator `[B, round128(Lq), H, D]`, fp32 `softmax_d [B, H, round128(Lq)]`
and, for grouped-query attention, k/v gradients expanded to the query heads before they are summed.
The memory-efficient kernel converts a boolean mask to an additive mask in the query dtype (saved for
backward), keeps `out` and an fp32 logsumexp `[B, H, round32(Lq)]`; its backward allocates the gradients, an
fp32 `delta [B, H, Lq]` and an fp32 dq accumulator `[B, H, Lq, D]`.
Packed batches under `kubetune_trainer.packed_attention` call the variable-length flash kernel instead
(`torch.nn.attention.varlen.varlen_attn`), emulated the same way; the trace models a GPU of compute
capability 8.0 or newer, where that kernel runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch

FLASH = "flash"
EFFICIENT = "memory_efficient"
MATH = "math"
VARLEN = "varlen_flash"


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


def cuda_kernel(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None, *, enable_gqa: bool,
                force_flash: bool = False) -> str:
    """The SDPA backend CUDA picks for these inputs (flash, then memory-efficient, then math)."""
    head_dim = query.shape[-1]
    half = query.dtype in (torch.float16, torch.bfloat16)
    if force_flash and half and head_dim <= 256:
        return FLASH
    if attn_mask is None and half and head_dim <= 256 and head_dim % 8 == 0:
        return FLASH
    if not enable_gqa and query.dtype in (torch.float16, torch.bfloat16, torch.float32) and head_dim % 8 == 0:
        return EFFICIENT
    return MATH


def _grouped_kv_grads(key: torch.Tensor, value: torch.Tensor, lead: tuple[int, ...], heads: int,
                      kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's k/v gradients, shaped `[*lead, kv_heads, dim]`: for grouped k/v it forms them at the
    query heads, then sums each group."""
    if kv_heads == heads:
        return (key.new_empty((*lead, kv_heads, key.shape[-1])),
                value.new_empty((*lead, kv_heads, value.shape[-1])))
    dk_wide = key.new_empty((*lead, heads, key.shape[-1]))
    dv_wide = value.new_empty((*lead, heads, value.shape[-1]))
    group = heads // kv_heads
    return (dk_wide.view(*lead, kv_heads, group, -1).sum(-2), dv_wide.view(*lead, kv_heads, group, -1).sum(-2))


class _FlashAttention(torch.autograd.Function):
    """Allocates what FlashAttention-2 allocates (values are meaningless: used on fake tensors only)."""

    @staticmethod
    def forward(ctx, query, key, value):  # type: ignore[override]
        batch, heads, q_len, _ = query.shape
        out = query.new_empty((batch, q_len, heads, value.shape[-1])).transpose(1, 2)
        lse = query.new_empty((batch, heads, q_len), dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, _out, _lse = ctx.saved_tensors
        batch, heads, q_len, head_dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        rounded = _round_up(q_len, 128)
        dq_accum = query.new_empty((batch, rounded, heads, head_dim), dtype=torch.float32)
        softmax_d = query.new_empty((batch, heads, rounded), dtype=torch.float32)
        dq = query.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)
        dk, dv = _grouped_kv_grads(key, value, (batch, kv_len), heads, kv_heads)
        del dq_accum, softmax_d
        return dq, dk.transpose(1, 2), dv.transpose(1, 2)


class _EfficientAttention(torch.autograd.Function):
    """Allocates what the memory-efficient (cutlass) kernel allocates (fake tensors only)."""

    @staticmethod
    def forward(ctx, query, key, value, bias):  # type: ignore[override]
        batch, heads, q_len, _ = query.shape
        out = query.new_empty((batch, q_len, heads, value.shape[-1])).transpose(1, 2)
        lse = query.new_empty((batch, heads, _round_up(q_len, 32)), dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, _out, _lse, _bias = ctx.saved_tensors
        batch, heads, q_len, head_dim = query.shape
        delta = query.new_empty((batch, heads, q_len), dtype=torch.float32)
        dq_accum = query.new_empty((batch, heads, q_len, head_dim), dtype=torch.float32)
        dq = query.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)
        dk = key.new_empty((batch, key.shape[2], key.shape[1], key.shape[-1])).transpose(1, 2)
        dv = value.new_empty((batch, value.shape[2], value.shape[1], value.shape[-1])).transpose(1, 2)
        del delta, dq_accum
        return dq, dk, dv, None


class _VarlenFlashAttention(torch.autograd.Function):
    """Allocates what FlashAttention-2's variable-length kernel allocates for `[tokens, heads, dim]` inputs (fake
    tensors only): the output and an fp32 logsumexp `[heads, tokens]`; in backward the gradients, fp32 dq
    accumulator and softmax_d, and k/v gradients at the query heads before they are summed (grouped k/v)."""

    @staticmethod
    def forward(ctx, query, key, value):  # type: ignore[override]
        tokens, heads, _ = query.shape
        out = query.new_empty((tokens, heads, value.shape[-1]))
        lse = query.new_empty((heads, tokens), dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        query, key, value, _out, _lse = ctx.saved_tensors
        tokens, heads, head_dim = query.shape
        rounded = _round_up(tokens, 128)
        dq_accum = query.new_empty((rounded, heads, head_dim), dtype=torch.float32)
        softmax_d = query.new_empty((heads, rounded), dtype=torch.float32)
        dq = query.new_empty(query.shape)
        dk, dv = _grouped_kv_grads(key, value, (tokens,), heads, key.shape[1])
        del dq_accum, softmax_d
        return dq, dk, dv


def _efficient_bias(query: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The additive bias the memory-efficient kernel receives (bool masks converted, last dim padded to 16)."""
    if attn_mask is None:
        return None
    bias = attn_mask
    if bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, dtype=query.dtype, device=query.device).masked_fill_(
            bias.logical_not(), float("-inf"))
    if bias.shape[-1] % 16:
        padded = bias.new_zeros((*bias.shape[:-1], _round_up(bias.shape[-1], 16)))
        padded[..., :bias.shape[-1]] = bias
        bias = padded[..., :attn_mask.shape[-1]]
    return bias


class KernelLog:
    """Counts which kernel each attention call used (reported with the trace)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def add(self, kernel: str) -> None:
        """Record one call of `kernel`."""
        self.calls[kernel] = self.calls.get(kernel, 0) + 1

    def summary(self) -> str:
        """e.g. 'flash x64' or 'memory_efficient x64'."""
        return ", ".join(f"{k} x{n}" for k, n in sorted(self.calls.items())) or "none"


@contextlib.contextmanager
def cuda_attention(log: KernelLog, *, force_flash: bool = False) -> Iterator[KernelLog]:
    """Route `F.scaled_dot_product_attention` through the CUDA kernel emulation for the duration of the block."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
             **kwargs: Any):
        # CUDA autocast runs scaled_dot_product_attention in the lower precision: fp32 inputs (an fp32 residual
        # stream, fp32 rotary tables) reach the kernel as bf16/fp16 copies. This function replaces the Python
        # entry point, before autocast's dispatch has cast anything, so it casts as autocast would.
        if torch.is_autocast_enabled(query.device.type):
            dtype = torch.get_autocast_dtype(query.device.type)
            query, key, value = (t.to(dtype) if t.dtype == torch.float32 else t for t in (query, key, value))
        kernel = cuda_kernel(query, key, attn_mask, enable_gqa=enable_gqa, force_flash=force_flash)
        log.add(kernel)
        if kernel == FLASH:
            return _FlashAttention.apply(query, key, value)
        if kernel == EFFICIENT:
            return _EfficientAttention.apply(query, key, value, _efficient_bias(query, attn_mask))
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa, **kwargs)

    def segments(query, position_ids):
        # the cumulative lengths are read from the (fake) position ids on a GPU; only the kernel's sizes matter here
        return query.new_zeros((2,), dtype=torch.int32), query.shape[2]

    def varlen(query, key, value, *args, **kwargs):
        log.add(VARLEN)
        return _VarlenFlashAttention.apply(query, key, value)

    from kubetune_trainer import packed_attention

    saved = packed_attention.varlen_segments, packed_attention._varlen_attn
    torch.nn.functional.scaled_dot_product_attention = sdpa
    packed_attention.varlen_segments, packed_attention._varlen_attn = segments, varlen
    try:
        yield log
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
        packed_attention.varlen_segments, packed_attention._varlen_attn = saved
