"""Speed features of the plan: attention implementation, Liger fused kernels and torch.compile.

Each is opt-in (training.attentionImplementation / ligerKernels / torchCompile) and applied where it is
correct; the decisions are pure functions so they can be tested without a GPU:

- attention: ``auto`` keeps transformers' default (sdpa where available); ``sdpa`` / ``eager`` are passed to
  ``from_pretrained(attn_implementation=...)``; ``flash_attention_2`` needs a CUDA GPU, the flash-attn package
  and bf16/fp16 — otherwise the plan is refused (InvalidPlan) before any data or model is loaded.
- Liger (liger-kernel: fused RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy): CUDA only, patched into the
  loaded base model before LoRA wrapping. Where it cannot apply (no CUDA device, package missing, model family
  without Liger kernels) the run continues without it and logs why; metrics.json records what was applied.
  Under ZeRO-3 the fused linear cross-entropy is left out (it reads lm_head.weight outside lm_head's forward,
  where ZeRO-3 has not gathered it); the other kernels still apply.
- torch.compile: the final (peft-wrapped, gradient-checkpointed) module is compiled in place
  (``nn.Module.compile``), so parameter names, checkpoints and exports are unchanged and DDP wraps the
  compiled module. Refused with DeepSpeed (plan validation) and where inductor lacks its compiler.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable

from kubetune_trainer.errors import PlanError

log = logging.getLogger(__name__)

CXX_CANDIDATES = ("g++", "c++", "clang++")
CC_CANDIDATES = ("gcc", "cc", "clang")


@dataclass
class SpeedReport:
    """What the run actually uses (written to final/metrics.json under ``speed``)."""

    attention_requested: str = "auto"
    attention_implementation: str = ""
    torch_compile: bool = False
    liger_kernels: bool = False
    liger_skipped_reason: str = ""
    liger_options: dict[str, bool] = field(default_factory=dict)
    loss: str = ""
    master_weights: str = ""
    optimizer: str = ""
    optimizer_in_backward: bool = False
    activation_offloading: bool = False
    tiled_mlp: bool = False
    recomputed_norms: bool = False
    embeddings_on_host: bool = False

    def to_json(self) -> dict[str, Any]:
        """camelCase dict for metrics.json."""
        return {"attentionRequested": self.attention_requested,
                "attentionImplementation": self.attention_implementation,
                "torchCompile": self.torch_compile, "ligerKernels": self.liger_kernels,
                "ligerSkippedReason": self.liger_skipped_reason, "ligerOptions": dict(self.liger_options),
                "loss": self.loss, "masterWeights": self.master_weights, "optimizer": self.optimizer,
                "optimizerInBackward": self.optimizer_in_backward,
                "activationOffloading": self.activation_offloading,
                "tiledMlp": self.tiled_mlp, "recomputedNorms": self.recomputed_norms,
                "embeddingsOnHost": self.embeddings_on_host}


def package_available(name: str) -> bool:
    """True when `name` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def resolve_attention(requested: str, *, cuda: bool, precision: str, flash_attn_installed: bool,
                      packing: bool = False, varlen_problem: str = "unchecked") -> str | None:
    """attn_implementation for from_pretrained (None = transformers' default); PlanError when it cannot run here.

    `auto` on packed batches takes variable-length attention (`packed_attention.ATTENTION`) when `varlen_problem`
    (see `packed_attention.varlen_problem`) is empty: no block-diagonal mask, k/v at their own heads."""
    if requested == "auto":
        if packing and not varlen_problem:
            from kubetune_trainer.packed_attention import register

            return register()
        return None
    if requested == "flash_attention_2":
        field_name = "training.attentionImplementation: flash_attention_2"
        if not cuda:
            raise PlanError(f"{field_name} needs a CUDA GPU and this process has none; use auto, sdpa or eager")
        if not flash_attn_installed:
            raise PlanError(f"{field_name} needs the flash-attn package, which is not installed in the trainer "
                            "image; use auto or sdpa, or an image with flash-attn")
        if precision == "fp32":
            raise PlanError(f"{field_name} computes in bf16/fp16 only, but training.precision resolved to fp32; "
                            "use precision auto/bf16/fp16 or attention sdpa")
    if requested not in ("sdpa", "eager", "flash_attention_2"):
        raise PlanError(f"training.attentionImplementation: unknown value {requested!r}")
    return requested


def liger_options(*, enabled: bool, cuda: bool, installed: bool, model_type: str, supported: frozenset[str],
                  zero_stage: int) -> tuple[dict[str, bool] | None, str]:
    """(keyword arguments for Liger's apply function, or None when Liger is not applied; the reason if not)."""
    if not enabled:
        return None, "training.ligerKernels is false"
    if not cuda:
        return None, "Liger kernels are Triton GPU kernels and this process has no CUDA device"
    if not installed:
        return None, "the liger-kernel package is not installed in the trainer image"
    if model_type not in supported:
        return None, f"liger-kernel has no kernels for model type {model_type!r}"
    options = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
               "fused_linear_cross_entropy": True}
    if zero_stage == 3:
        options["fused_linear_cross_entropy"] = False  # lm_head.weight is a ZeRO-3 shard outside its forward
    return options, ""


def liger_supported_model_types() -> frozenset[str]:
    """Model types liger-kernel can patch (empty when the package is missing)."""
    if not package_available("liger_kernel"):
        return frozenset()
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def apply_liger(model, *, enabled: bool, cuda: bool, zero_stage: int, report: SpeedReport) -> None:
    """Patch Liger kernels into the loaded base model (before LoRA wrapping) or log why not; fills `report`."""
    if not enabled:
        return
    installed = package_available("liger_kernel")
    supported = liger_supported_model_types() if installed and cuda else frozenset()
    model_type = str(getattr(model.config, "model_type", ""))
    options, reason = liger_options(enabled=enabled, cuda=cuda, installed=installed, model_type=model_type,
                                    supported=supported, zero_stage=zero_stage)
    if options is None:
        report.liger_skipped_reason = reason
        log.warning("training.ligerKernels: not applied, training continues without them: %s", reason)
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    # The fused linear cross-entropy is called by kubetune_trainer.loss (the trainer's own loss bypasses the
    # model's forward), so Liger's patch of the causal-LM forward is not needed.
    _apply_liger_kernel_to_instance(model=model, **dict(options, fused_linear_cross_entropy=False))
    report.liger_kernels = True
    report.liger_options = options
    log.info("Liger kernels applied to %s: %s", model_type,
             ", ".join(name for name, on in options.items() if on))


def compiler_problem(*, cuda: bool, which: Callable[[str], str | None] = shutil.which,
                     env: dict[str, str] | None = None) -> str:
    """Why torch.compile's inductor backend cannot build kernels here ('' when it can).

    On CPU inductor compiles C++ (needs a C++ compiler, CXX or g++/c++/clang++); on CUDA Triton builds
    its launcher with a C compiler (CC or gcc/cc/clang).
    """
    e = os.environ if env is None else env
    var, candidates, what = ("CC", CC_CANDIDATES, "a C compiler") if cuda else ("CXX", CXX_CANDIDATES,
                                                                               "a C++ compiler")
    names = ([e[var]] if e.get(var) else []) + list(candidates)
    if any(which(name) for name in names):
        return ""
    return (f"torch.compile (inductor) needs {what} on this {'GPU' if cuda else 'CPU'} machine and none was "
            f"found (${var} or {'/'.join(candidates)})")


def compile_in_place(model, *, cuda: bool, report: SpeedReport):
    """torch.compile the final training module in place (parameter names unchanged); PlanError without a compiler."""
    problem = compiler_problem(cuda=cuda)
    if problem:
        raise PlanError(f"training.torchCompile: {problem}; install one or turn torchCompile off")
    model.compile()
    report.torch_compile = True
    log.info("torch.compile: model compiled in place (inductor); the first steps include compilation")
    return model
