"""A frozen input-embedding table kept in host memory (training.embeddingsOnHost).

LoRA and QLoRA never train the input embeddings, yet the table is one of the largest single tensors on the GPU
(vocabulary x hidden: 1.0 GiB on Llama 3.1 8B, 2.0 GiB on 70B, in bf16 even under QLoRA). The forward pass
only reads the rows of the batch's tokens, so the table can stay in host memory: the lookup runs on the CPU and
only the looked-up rows (tokens x hidden, 32 MiB for 4,096 tokens on 8B) are copied to the GPU, once per
micro-batch. No gradient flows back through the copy (the table is frozen and, with non-reentrant
checkpointing, the decoder's input needs none), so backward moves nothing.

Where it applies (`embeddings_problem`): adapters (`lora`/`qlora`) on a CUDA device, the input embeddings
frozen and not tied to the output projection (a tied table is read by lm_head on the GPU), and not under
DeepSpeed, which places and partitions every parameter itself. The table leaves `model.parameters()` (it is
not a parameter the optimizer, DDP or a checkpoint of the adapters needs); `host_parameter_count` counts it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from kubetune_trainer import offload

log = logging.getLogger("kubetune_trainer")


def embeddings_problem(*, method: str, cuda: bool, strategy: str) -> str:
    """Why auto keeps the input embeddings on the device for this run ('' when it moves them to the host).

    Only what the plan decides is checked here; a tied or trained table is found on the model
    (`model_problem`)."""
    if method == "full":
        return "full fine-tuning trains the input embeddings"
    if not cuda:
        return "without a GPU the table is in host memory already"
    if strategy == "deepspeed":
        return "DeepSpeed places and partitions every parameter itself"
    return ""


def model_problem(model: nn.Module) -> str:
    """Why this model's input embeddings cannot move to the host ('' when they can)."""
    inputs = model.get_input_embeddings()
    if inputs is None:
        return "the model has no input embedding module to move"
    if isinstance(inputs, HostEmbedding):
        return ""
    if any(p.requires_grad for p in inputs.parameters()):
        return "the input embeddings are trained"
    outputs = model.get_output_embeddings()
    weight = getattr(inputs, "weight", None)
    if outputs is not None and weight is not None and getattr(outputs, "weight", None) is weight:
        return "the input embeddings are tied to the output projection, which runs on the GPU"
    return ""


class HostEmbedding(nn.Module):
    """Runs a frozen embedding module on the CPU and returns its rows on `device`.

    The wrapped module (any embedding, e.g. Gemma's scaled one) is held as a plain attribute, so its table is
    neither a parameter nor a buffer of the model: `model.to(device)`, DDP's parameter checks and buffer
    broadcasts, the optimizer and adapter checkpoints leave it alone. `weight` gives read access to the table.
    """

    def __init__(self, inner: nn.Module, device: torch.device, compiled: bool = False) -> None:
        super().__init__()
        object.__setattr__(self, "inner", inner)  # unregistered on purpose (see the class docstring)
        self.device = device
        if compiled:  # torch.compile of the decoder: run the host lookup eagerly (a graph break at its start)
            self.forward = torch.compiler.disable(self.forward)
        for attr in ("num_embeddings", "embedding_dim", "padding_idx"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = self.inner(input_ids.to(self.weight.device))
            # detached: a forward hook on the inner module (peft's enable_input_require_grads) may have marked
            # the rows as needing a gradient, which non-reentrant checkpointing does not use
            return offload.device_copy(rows, self.device, pin_memory=False).detach()

    def extra_repr(self) -> str:
        return f"{type(self.inner).__name__} on the host -> {self.device}"


def _host_tables(model: nn.Module) -> list[torch.Tensor]:
    return [p for m in model.modules() if isinstance(m, HostEmbedding) for p in m.inner.parameters()]


def host_parameter_count(model: nn.Module) -> int:
    """Elements of the tables HostEmbedding modules hold (not in `model.parameters()`)."""
    return sum(p.numel() for p in _host_tables(model))


def host_table_bytes(model: nn.Module) -> int:
    """Bytes of the tables HostEmbedding modules hold in host memory."""
    return sum(p.numel() * p.element_size() for p in _host_tables(model))


def move_input_embeddings_to_host(model: nn.Module, device: torch.device, compiled: bool = False) -> int:
    """Move the model's frozen input-embedding table to host memory behind a HostEmbedding; returns its bytes.
    `compiled`: the decoder will be torch.compiled (the lookup then runs outside the compiled graph).

    Raises ValueError naming the reason when this model's table cannot move (`model_problem`)."""
    problem = model_problem(model)
    if problem:
        raise ValueError(problem)
    inner = model.get_input_embeddings()
    if isinstance(inner, HostEmbedding):
        return 0
    parent, name = _parent_of(model, inner)
    moved = 0
    for param in list(inner.parameters()):
        owner, leaf = _parent_of(inner, param, parameters=True)
        host = offload.host_copy(param.detach(), pin_memory=False)
        setattr(owner, leaf, nn.Parameter(host, requires_grad=False))
        moved += host.numel() * host.element_size()
    setattr(parent, name, HostEmbedding(inner, device, compiled=compiled))
    log.info("input embeddings: %.2f GiB table in host memory; %s rows per token copied to %s",
             moved / 2**30, getattr(inner, "embedding_dim", "?"), device)
    return moved


def _parent_of(root: nn.Module, target: Any, parameters: bool = False) -> tuple[nn.Module, str]:
    """The module holding `target` (a submodule, or a parameter when `parameters`) and its attribute name."""
    for module in root.modules():
        items = module.named_parameters(recurse=False) if parameters else module.named_children()
        for name, child in items:
            if child is target:
                return module, name
    raise ValueError(f"{type(target).__name__} not found under {type(root).__name__}")
