"""Execution backends for the training loop: one process / torch DDP (`NativeEngine`) or DeepSpeed ZeRO.

Both expose the same small surface: `forward(batch) -> loss`, `backward(loss, boundary)`,
`step() -> grad_norm`, `save(dir)` / `load(dir)` for resumable checkpoints, and
`trainable_state_dict()` / `full_state_dict()` for the final export (gathering ZeRO-3 shards).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.offload import ActivationOffload

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
DEEPSPEED_TAG = "deepspeed"


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def in_backward_problem(*, strategy: str, grad_accum: int, max_grad_norm: float, precision: str) -> str:
    """Why the optimizer cannot step inside backward for this run ('' when it can, with the same result)."""
    if strategy == "deepspeed":
        return "DeepSpeed runs the optimizer step itself"
    if strategy == "ddp":
        return "DDP all-reduces gradients after the per-parameter hooks would already have used them"
    if grad_accum > 1:
        return "gradientAccumulationSteps > 1 sums gradients over micro-batches before the step"
    if max_grad_norm > 0:
        return "maxGradNorm > 0 needs the norm of all gradients before any parameter is updated"
    if precision == "fp16":
        return "fp16 loss scaling checks every gradient for inf/NaN before the step"
    return ""


def resolve_optimizer_in_backward(requested: bool | None, problem: str) -> bool:
    """None (auto) → on exactly when nothing prevents it; true where it cannot run → PlanError naming why."""
    if requested is None:
        return not problem
    if requested and problem:
        from kubetune_trainer.errors import PlanError

        raise PlanError(f"training.optimizerInBackward: {problem}; leave it unset (auto) or false")
    return bool(requested)


NORM_SLICE = 1 << 24  # elements per fp32 temporary when summing squared gradients


def squared_norm(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares of `grad` in fp32, a slice at a time (no fp32 copy of a whole bf16 gradient)."""
    flat = grad.detach().reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=flat.device)
    for start in range(0, flat.numel(), NORM_SLICE):
        total += flat[start:start + NORM_SLICE].float().square().sum()
    return total


class NativeEngine:
    """Plain torch (single process) or DistributedDataParallel, manual gradient accumulation."""

    def __init__(self, model, optimizer, scheduler, *, device: torch.device, precision: str,
                 grad_accum: int, max_grad_norm: float, distributed: bool, rank: int,
                 train_module: torch.nn.Module | None = None, optimizer_in_backward: bool = False,
                 activation_offloading: bool = False) -> None:
        self.raw_model = model
        self.train_module = model if train_module is None else train_module
        self.activation_offloading = activation_offloading
        # saved activations wait in (pinned) host memory between forward and backward; parameters stay put
        self._offload = (ActivationOffload(self.train_module.parameters(), device) if activation_offloading
                         else contextlib.nullcontext())
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.precision = precision
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.rank = rank
        self.is_writer = rank == 0
        self.model = self.train_module
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(self.train_module, device_ids=ids)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer_in_backward = optimizer_in_backward
        self._sq_norm = torch.zeros((), dtype=torch.float32, device=device)
        self._hooks = []
        if optimizer_in_backward:
            if distributed or self.scaler is not None or grad_accum != 1 or max_grad_norm > 0:
                raise ValueError("optimizer in backward needs one process, no loss scaling, no gradient "
                                 "accumulation and no clipping")
            from kubetune_trainer.optim import parameter_step

            self._step_one = parameter_step(optimizer)
            self._hooks = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in self._params]

    def _step_parameter(self, param: torch.Tensor) -> None:
        """Optimizer-in-backward: update `param` as soon as its gradient is complete, then free the gradient.

        Every other parameter's gradient is None at this moment (each was stepped and freed by its own hook),
        so the optimizer's step touches this parameter only; its state lives in the one optimizer as usual
        (checkpoints and the LR schedule are unchanged).
        """
        self._sq_norm += squared_norm(param.grad)
        self._step_one(param)
        param.grad = None

    def train(self, mode: bool = True) -> None:
        """Switch train/eval mode."""
        self.model.train(mode)

    def accumulating(self, boundary: bool):
        """Context for one micro-batch: DDP skips the gradient all-reduce until the boundary."""
        if not boundary and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward(self, batch: dict):
        """Model outputs for a batch."""
        with _autocast(self.device, self.precision), self._offload:
            return self.model(**batch)

    def backward(self, loss) -> None:
        """Accumulate gradients of loss / grad_accum."""
        scaled = loss / self.grad_accum
        (self.scaler.scale(scaled) if self.scaler else scaled).backward()

    def eval_forward(self, batch: dict):
        """Forward without gradients (no DDP wrapper needed)."""
        with _autocast(self.device, self.precision):
            return self.train_module(**batch)

    def step(self) -> float:
        """Clip, optimizer step, LR step, zero grads; returns the pre-clip gradient norm."""
        if self.optimizer_in_backward:  # every parameter was stepped during backward
            norm = float(self._sq_norm.sqrt())
            self._sq_norm.zero_()
            self.scheduler.step()
            return norm
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self._params, self.max_grad_norm)
        else:
            norm = torch.stack([squared_norm(p.grad) for p in self._params if p.grad is not None]).sum().sqrt()
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def zero_grad(self) -> None:
        """Drop accumulated gradients."""
        self.optimizer.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        """Learning rate of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Rank 0 writes trainable weights, optimizer, scheduler (and grad scaler) into `directory`."""
        if not self.is_writer:
            return
        from safetensors.torch import save_file

        state = {name: p.detach().to("cpu").contiguous().clone()
                 for name, p in self.raw_model.named_parameters() if p.requires_grad}
        save_file(state, str(directory / TRAINABLE_FILE))
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)
        if self.scaler:
            torch.save(self.scaler.state_dict(), directory / SCALER_FILE)

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (every rank reads the same files)."""
        from safetensors.torch import load_file

        state = load_file(str(directory / TRAINABLE_FILE))
        params = dict(self.raw_model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        if missing:
            raise RuntimeError(f"checkpoint {directory} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for name, tensor in state.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu",
                                                  weights_only=False))
        self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=False))
        if self.scaler and (directory / SCALER_FILE).exists():
            self.scaler.load_state_dict(torch.load(directory / SCALER_FILE, weights_only=False))

    # -- export --------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Trainable tensors by name (rank 0; None elsewhere)."""
        if not self.is_writer:
            return None
        return {n: p.detach().cpu() for n, p in self.raw_model.named_parameters() if p.requires_grad}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model state (rank 0; None elsewhere); None also means 'use the model as is'."""
        return None


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1-3 (optionally offloaded) around the client optimizer; LR schedule stepped here."""

    def __init__(self, model, optimizer, scheduler, *, config: dict[str, Any], rank: int,
                 train_module: torch.nn.Module | None = None) -> None:
        import deepspeed

        self.raw_model = model
        self.train_module = model if train_module is None else train_module
        # Parameter names inside DeepSpeed carry the wrapper's prefix ("model.") when a loss wrapper is used.
        self._prefix = "" if self.train_module is model else "model."
        self.scheduler = scheduler
        self.rank = rank
        self.is_writer = rank == 0
        self.config = config
        self.zero_stage = int(config["zero_optimization"]["stage"])
        self.model, self.optimizer, _, _ = deepspeed.initialize(model=self.train_module, optimizer=optimizer,
                                                                config=config)
        self.device = self.model.device
        self.precision = "bf16" if config["bf16"]["enabled"] else "fp16" if config["fp16"]["enabled"] else "fp32"
        self._frozen = any(not p.requires_grad for p in model.parameters())

    def train(self, mode: bool = True) -> None:
        """Switch train/eval mode."""
        self.model.train(mode)

    def accumulating(self, boundary: bool):
        """DeepSpeed tracks the accumulation boundary itself."""
        return contextlib.nullcontext()

    def forward(self, batch: dict):
        """Model outputs for a batch."""
        return self.model(**batch)

    def backward(self, loss) -> None:
        """DeepSpeed backward (scales by 1/gradient_accumulation_steps itself) + micro step."""
        self.model.backward(loss)
        if not self.model.is_gradient_accumulation_boundary():
            self.model.step()

    def eval_forward(self, batch: dict):
        """Forward without gradients (ZeRO-3 gathers shards collectively: every rank must call it)."""
        return self.model(**batch)

    def step(self) -> float:
        """Optimizer step at the accumulation boundary + LR step; returns the global grad norm."""
        self.model.step()
        self.scheduler.step()
        norm = self.model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self) -> None:
        """Drop accumulated gradients."""
        self.model.zero_grad()

    def current_lr(self) -> float:
        """Learning rate of the first param group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, directory: Path) -> None:
        """Every rank writes its ZeRO shards; rank 0 also the LR schedule."""
        self.model.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False,
                                   exclude_frozen_parameters=self._frozen)
        if self.is_writer:
            torch.save(self.scheduler.state_dict(), directory / SCHEDULER_FILE)

    def load(self, directory: Path) -> None:
        """Restore the ZeRO shards, optimizer and LR schedule."""
        path, _ = self.model.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=not self._frozen,
                                             load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
        self.scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=False))

    def trainable_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Trainable tensors gathered from ZeRO-3 shards (collective; rank 0 gets them)."""
        named = [(n, p) for n, p in self.raw_model.named_parameters() if p.requires_grad]
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
                return {n: p.detach().cpu().clone() for n, p in named} if self.is_writer else None
        return {n: p.detach().cpu().clone() for n, p in named} if self.is_writer else None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights for export: gathered under ZeRO-3 (collective), else None (the module holds them)."""
        if self.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
            if state is None or not self._prefix:
                return state
            return {name.removeprefix(self._prefix): tensor for name, tensor in state.items()}
        return None
