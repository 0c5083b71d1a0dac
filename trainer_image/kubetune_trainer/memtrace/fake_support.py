"""Running the trainer's code on fake tensors: what FakeTensorMode alone does not cover.

- `FakeExecutor` runs each op below the storage counter: ops whose tensor inputs are all real (the batch of
  token ids and masks derived from it) run for real, so transformers takes the same data-dependent decisions
  as on a GPU (mask or no mask, packed sequences); scalar reads of fake values (`.item()` for logging the
  loss or the gradient norm) return 0; bitsandbytes' `gemm_4bit` runs as CUDA runs it for training inputs.
- `swappable_fake_tensors()` lets `nn.Module.to()` / `_apply` convert fake parameters: torch swaps fake
  parameters in place (`torch.utils.swap_tensors`), which refuses tensors with weak references, and every
  fake tensor has one in FakeTensorMode's own memo of converted tensors; that memo entry is dropped first.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes

from kubetune_trainer.memtrace.counter import StorageCounter
from kubetune_trainer.memtrace.quantized import emulate_gemm_4bit, gemm_4bit_op


class FakeExecutor:
    """Runs each op below the counter: CUDA's bitsandbytes gemm, real ops on real-only inputs, scalar reads."""

    def __init__(self, *, bitsandbytes_4bit: bool = False) -> None:
        self.counter: StorageCounter | None = None
        self.scalar_reads = 0
        self._gemm_4bit = gemm_4bit_op() if bitsandbytes_4bit else None
        self._scalar = torch.ops.aten._local_scalar_dense.default
        self._device = torch.ops.prim.device.default
        aten = torch.ops.aten
        self._index_ops = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                           aten._index_put_impl_.default}

    def __call__(self, func, args: tuple, kwargs: dict):
        if func is self._device and isinstance(args[0], FakeTensor):
            return args[0].fake_device  # asked for by autograd on every gradient: answered without dispatch
        if func is self._scalar and isinstance(args[0], FakeTensor):
            self.scalar_reads += 1
            dtype = args[0].dtype
            return False if dtype == torch.bool else 0.0 if dtype.is_floating_point else 0
        if func in self._index_ops:
            args = (args[0], _long_indices(args[1]), *args[2:])
        if self._gemm_4bit is not None and func is self._gemm_4bit:
            return emulate_gemm_4bit(args, kwargs, self.counter.track)
        if _all_real_tensors(args, kwargs):  # the batch and what is derived from it: compute for real
            with _disable_current_modes():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _all_real_tensors(args: tuple, kwargs: dict) -> bool:
    """True when the op has tensor inputs and none of them is fake (tensors nested in lists/tuples included)."""
    seen = False
    for value in (*args, *kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor):
                if isinstance(item, FakeTensor):
                    return False
                seen = True
    return seen


def _long_indices(indices) -> list:
    """Real boolean masks among `indices` turned into the integer indices they select (computed for real),
    so indexing a fake tensor with a mask derived from the real batch has a known output shape."""
    out: list = []
    for index in indices:
        if (isinstance(index, torch.Tensor) and not isinstance(index, FakeTensor)
                and index.dtype in (torch.bool, torch.uint8)):
            with _disable_current_modes():
                out.extend(index.nonzero(as_tuple=True))
        else:
            out.append(index)
    return out


def _drop_memo_refs(tensor) -> None:
    """Remove `tensor` from its fake mode's memo of converted tensors (the only weak reference torch adds)."""
    mode = getattr(tensor, "fake_mode", None)
    if mode is None:
        return
    memo = mode.fake_tensor_converter.tensor_memo
    for ref in weakref.getweakrefs(tensor):
        key = getattr(ref, "key", None)
        if key is not None and memo.data.get(key) is ref:
            del memo.data[key]


@contextlib.contextmanager
def swappable_fake_tensors() -> Iterator[None]:
    """While active, `torch.utils.swap_tensors` accepts fake tensors known to FakeTensorMode's memo."""
    import torch.utils

    original = torch.utils.swap_tensors

    def swap_tensors(t1, t2):
        _drop_memo_refs(t1)
        _drop_memo_refs(t2)
        return original(t1, t2)

    torch.utils.swap_tensors = swap_tensors
    try:
        yield
    finally:
        torch.utils.swap_tensors = original
