"""Make library code choose what it chooses on a CUDA device while the trace runs on CPU fake tensors.

- torch optimizers (and gradient clipping) default to their `foreach` implementation for CUDA tensors and to
  the per-tensor loop for others (fake tensors included); foreach AdamW allocates a temporary the size of all
  parameters at the step, so the trace makes them take the CUDA default.
- bitsandbytes' paged optimizers keep their large state buffers (>= 1e5 elements) in CUDA unified memory,
  outside PyTorch's allocator; on CPU they fall back to ordinary tensors. The trace allocates them as
  ordinary fake tensors counted as paged, so they are reported apart from the allocator peak.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import Iterator

import torch

PAGED_MIN_ELEMENTS = 100_000  # bitsandbytes pages state buffers of at least this many elements


def _cuda_default_to_fused_or_foreach(params, differentiable: bool, use_fused: bool = False) -> tuple[bool, bool]:
    """torch.optim's default for CUDA tensors: foreach unless differentiable (fused only when asked for)."""
    if torch.jit.is_scripting() or differentiable:
        return False, False
    return bool(use_fused), not use_fused


def _cuda_has_foreach_support(tensors, device) -> bool:
    """CUDA tensors support foreach kernels."""
    return True


@contextlib.contextmanager
def cuda_optimizer_defaults() -> Iterator[None]:
    """While active, torch optimizers and clip_grad_norm_ take their CUDA default (foreach) implementation."""
    import torch.nn.utils.clip_grad as clip_grad
    import torch.optim

    patched: list[tuple[object, str, object]] = []
    names = [m.name for m in pkgutil.iter_modules(torch.optim.__path__) if not m.name.startswith("_")]
    for module in (importlib.import_module(f"torch.optim.{name}") for name in names):
        if hasattr(module, "_default_to_fused_or_foreach"):
            patched.append((module, "_default_to_fused_or_foreach", module._default_to_fused_or_foreach))
            module._default_to_fused_or_foreach = _cuda_default_to_fused_or_foreach
    if hasattr(clip_grad, "_has_foreach_support"):
        patched.append((clip_grad, "_has_foreach_support", clip_grad._has_foreach_support))
        clip_grad._has_foreach_support = _cuda_has_foreach_support
    try:
        yield
    finally:
        for module, name, original in reversed(patched):
            setattr(module, name, original)


@contextlib.contextmanager
def paged_optimizer_states(paged_allocations) -> Iterator[None]:
    """While active, bitsandbytes paged optimizers allocate their large states inside `paged_allocations()`
    (a context manager, e.g. StorageCounter.paged_allocations); no-op without bitsandbytes."""
    try:
        from bitsandbytes.optim.optimizer import Optimizer8bit
    except ImportError:
        yield
        return
    original = Optimizer8bit.get_state_buffer

    def get_state_buffer(self, p, dtype=torch.float32):
        if self.is_paged and p.numel() >= PAGED_MIN_ELEMENTS:
            with paged_allocations():
                return torch.zeros_like(p, dtype=dtype)
        return torch.zeros_like(p, dtype=dtype)

    Optimizer8bit.get_state_buffer = get_state_buffer
    try:
        yield
    finally:
        Optimizer8bit.get_state_buffer = original
