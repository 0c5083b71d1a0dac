"""Fine-tuning methods: precision, model loading (full / LoRA / QLoRA), optimizer and LR schedule."""

from __future__ import annotations

import logging
from typing import Any, Iterable

from kubetune_trainer.errors import PlanError
from kubetune_trainer.plan import Plan, QuantizationPlan, TrainingPlan

log = logging.getLogger(__name__)

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_precision(requested: str, cuda_available: bool, bf16_supported: bool) -> str:
    """auto → bf16 if the GPU supports it, else fp16 on GPU, fp32 on CPU; explicit values are checked."""
    if requested == "auto":
        if not cuda_available:
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if requested == "fp16" and not cuda_available:
        raise PlanError("training.precision: fp16 needs a CUDA GPU (this process has none); use auto or fp32")
    if requested == "bf16" and cuda_available and not bf16_supported:
        raise PlanError("training.precision: bf16 is not supported by this GPU; use auto or fp16")
    return requested


def torch_dtype(name: str):
    """torch dtype for a precision (bf16|fp16|fp32) or dtype name (bfloat16|float16|float32)."""
    import torch

    name = DTYPE_NAMES.get(name, name)
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def bnb_config(quant: QuantizationPlan):
    """transformers BitsAndBytesConfig for a QLoRA plan (4-bit NF4/FP4 + double quant, or 8-bit)."""
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
    )


def lora_target_modules(names: list[str]) -> str | list[str]:
    """peft target_modules: the string "all-linear" or the explicit module names."""
    if any(n == "all-linear" for n in names):
        if len(names) > 1:
            raise PlanError("lora.targetModules: 'all-linear' cannot be combined with explicit module names")
        return "all-linear"
    return list(names)


def resolve_full_weights(requested: str, *, method: str, precision: str, strategy: str) -> str:
    """Dtype of the trainable weights of a full fine-tune: "bf16" (no fp32 master copy) or "fp32".

    ``auto`` keeps the weights in bf16 when the run computes in bf16 outside DeepSpeed: 2 bytes per parameter
    for weights and 2 for gradients instead of 4 + 4, no autocast copy of every linear weight, and a compensated
    update rule (kubetune_trainer.optim) so small updates are not lost. DeepSpeed keeps its own fp32 master
    partition under bf16, and fp16 needs fp32 weights for loss scaling, so those stay fp32.
    """
    if method != "full" or requested == "fp32":
        return "fp32"
    if requested == "none":
        if precision != "bf16":
            raise PlanError(f"training.masterWeights: none keeps the weights in bf16, but training.precision "
                            f"resolved to {precision}; use precision bf16 or masterWeights auto/fp32")
        if strategy == "deepspeed":
            raise PlanError("training.masterWeights: none is not supported with distributed.strategy deepspeed "
                            "(DeepSpeed keeps its own fp32 master weights); use auto or fp32")
        return "bf16"
    return "bf16" if precision == "bf16" and strategy != "deepspeed" else "fp32"


def load_base_model(model_dir: str, plan: Plan, precision: str, device, quantize: bool | None = None,
                    attn_implementation: str | None = None, full_weights: str = "fp32"):
    """Load the base causal LM for the plan's method on `device` (QLoRA: quantized with bitsandbytes).

    `attn_implementation` (sdpa|eager|flash_attention_2) is passed to from_pretrained; None keeps its default.
    `full_weights` (fp32|bf16, see resolve_full_weights) is the weight dtype of a full fine-tune.
    """
    import torch
    from transformers import AutoModelForCausalLM

    quantize = plan.method == "qlora" if quantize is None else quantize
    kwargs: dict[str, Any] = {"trust_remote_code": plan.model.trust_remote_code}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantize:
        assert plan.quantization is not None
        kwargs["quantization_config"] = bnb_config(plan.quantization)
        kwargs["dtype"] = torch_dtype(plan.quantization.compute_dtype)
        kwargs["device_map"] = {"": device}
    elif plan.method == "lora":
        # Frozen base weights may live in the compute dtype; adapters stay fp32 (peft upcasts them).
        kwargs["dtype"] = torch_dtype(precision)
    else:
        # Full fine-tune: fp32 weights with autocast for bf16/fp16, or bf16 weights (resolve_full_weights).
        kwargs["dtype"] = torch.bfloat16 if full_weights == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not quantize:
        model.to(device)
    return model


def apply_method(model, plan: Plan):
    """Wrap the base model for the method: trainable full model, or a peft LoRA model."""
    gc = plan.training.gradient_checkpointing
    if plan.method == "full":
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        return model
    from peft import LoraConfig, get_peft_model

    assert plan.lora is not None
    # QLoRA takes the LoRA path. peft's prepare_model_for_kbit_training is not used: besides freezing the base
    # and enabling checkpointing (done here and by get_peft_model) it upcasts every non-quantized weight
    # (embeddings, norms, lm_head) to fp32, which doubles those weights, turns the residual stream and MLP
    # activations fp32 and keeps an extra bf16 copy of lm_head for backward. They stay in the compute dtype.
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    config = LoraConfig(
        r=plan.lora.r,
        lora_alpha=plan.lora.alpha,
        lora_dropout=plan.lora.dropout,
        target_modules=lora_target_modules(plan.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise PlanError(f"lora.targetModules: {exc}") from None


def share_adapter_inputs(model, precision: str) -> int:
    """Under autocast (bf16/fp16), let LoRA adapters read their input as it is; returns how many were switched.

    peft casts an adapter's input to the adapter dtype (fp32) before lora_A; under autocast lora_A then casts it
    back to the compute dtype, bit for bit the input (no dropout: exactly; dropout draws its mask on the other
    dtype), and saves that new copy for backward: one per adapted module, though q/k/v (and gate/up) read the
    same tensor. Without the cast they save the input itself, shared. peft's own 4-bit LoRA layers already skip
    the cast under autocast. fp32 precision (no autocast) keeps it: the adapters need fp32 inputs there.
    """
    if precision not in ("bf16", "fp16"):
        return 0
    n = 0
    for module in model.modules():
        if getattr(module, "cast_input_dtype_enabled", None) is True:
            module.cast_input_dtype_enabled = False
            n += 1
    return n


def trainable_parameters(model) -> list:
    """Parameters with requires_grad, in a stable order."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and norm weights (1-D tensors)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params: Iterable, training: TrainingPlan, *, ds_cpu_adam: bool = False,
                    bf16_weights: bool = False, in_backward: bool = False):
    """The plan's optimizer over `params` (torch AdamW/SGD or a bitsandbytes 8-bit/paged AdamW).

    With `bf16_weights` (a full fine-tune without fp32 master weights) the update rule compensates bf16
    rounding: Kahan-summed AdamW/SGD (torch-optimi) or stochastic rounding around bitsandbytes (optim.py).
    `in_backward`: the engine steps it one parameter at a time during backward (optim.parameter_step).
    """
    import torch

    from kubetune_trainer import optim

    lr, name = training.learning_rate, training.optimizer
    params = list(params)
    if bf16_weights:
        if name in optim.BNB_OPTIMIZERS:
            return optim.bnb_optimizer(name, params, lr, bf16_weights=True)
        return optim.compensated_optimizer(name, params, lr, training.weight_decay, gradient_release=in_backward)
    if name == "adamw":
        if ds_cpu_adam:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, adamw_mode=True)
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return optim.bnb_optimizer(name, params, lr, bf16_weights=False)


def warmup_steps(training: TrainingPlan, total_steps: int) -> int:
    """Warmup steps from warmupSteps (capped at the run's length) or warmupRatio (only the *_with_warmup/linear/cosine
    schedules use it)."""
    if training.scheduler == "constant":
        return 0
    if training.warmup_steps is not None:
        return min(training.warmup_steps, total_steps)
    return int(round(training.warmup_ratio * total_steps))


def build_scheduler(optimizer, training: TrainingPlan, total_steps: int):
    """transformers LR scheduler: linear | cosine | constant | constant_with_warmup."""
    from transformers import get_scheduler

    return get_scheduler(training.scheduler, optimizer=optimizer,
                         num_warmup_steps=warmup_steps(training, total_steps),
                         num_training_steps=max(1, total_steps))
