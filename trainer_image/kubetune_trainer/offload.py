"""Activation offloading: tensors autograd saves for backward wait in host memory instead of on the GPU.

`ActivationOffload(model, device)` is a `saved_tensors_hooks` context for the forward pass. A saved tensor is
copied to host memory (pinned on CUDA, so the copy runs asynchronously on the current stream) and copied back
when backward needs it, except:

- the model's parameters (and views of them, e.g. a transposed weight saved by a matmul): they stay on the
  GPU anyway, so a host copy would only add a transfer and, in backward, a second device copy of the weight;
- tensors smaller than `min_bytes` (1 MiB): masks, indices and norms' statistics, where a copy costs more
  time than it saves memory.

With gradient checkpointing, what reaches these hooks is what checkpointing keeps (each layer's input, the
tensors saved outside checkpointed layers); the tensors a layer saves during its recomputation in backward
stay on the GPU. PyTorch's `torch.autograd.graph.save_on_cpu` offloads every saved tensor, parameters included
(for a tied or large lm_head, 1 GiB copied out and back each step), hence this class.

`host_copy` / `device_copy` are module functions so that the memory trace (`memtrace.step`) can stand in for
the transfers with allocations it counts as host or device memory.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

MIN_OFFLOAD_BYTES = 1 << 20


def host_copy(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    """A host-memory copy of `tensor` (asynchronous into pinned memory on CUDA)."""
    host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin_memory)
    host.copy_(tensor, non_blocking=pin_memory)
    return host


def device_copy(host: torch.Tensor, device: torch.device, pin_memory: bool) -> torch.Tensor:
    """`host` back on `device` (ordered after the copy out on the same stream)."""
    return host.to(device, non_blocking=pin_memory)


class _Offloaded:
    """What the pack hook keeps for an offloaded tensor: its device and the host copy."""

    __slots__ = ("device", "host")

    def __init__(self, device: torch.device, host: torch.Tensor) -> None:
        self.device = device
        self.host = host


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations wait in host memory between forward and backward (see the module docstring)."""

    def __init__(self, parameters: Iterable[torch.Tensor], device: torch.device, *,
                 min_bytes: int = MIN_OFFLOAD_BYTES) -> None:
        self.kept_storages = {_storage_key(p) for p in parameters}
        self.pin_memory = device.type == "cuda"
        self.min_bytes = min_bytes
        self.offloaded = 0  # tensors sent to host memory since this context was made
        super().__init__(self._pack, self._unpack)

    def offloads(self, tensor: torch.Tensor) -> bool:
        """Whether a saved `tensor` goes to host memory."""
        if tensor.layout != torch.strided or tensor.numel() * tensor.element_size() < self.min_bytes:
            return False
        return _storage_key(tensor) not in self.kept_storages

    def _pack(self, tensor: torch.Tensor) -> Any:
        if not self.offloads(tensor):
            return tensor
        self.offloaded += 1
        return _Offloaded(tensor.device, host_copy(tensor, self.pin_memory))

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Offloaded):
            return device_copy(packed.host, packed.device, self.pin_memory)
        return packed


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
