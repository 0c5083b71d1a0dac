"""The estimator's TrainingSetup read from a typed FineTuneJob spec (defaults come from kubetune.api)."""

from __future__ import annotations

from kubetune.api import FineTuneJobSpec, LoraSpec

from .estimator import TrainingSetup

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# spec.training.attentionImplementation -> the kernel a CUDA run uses (auto: transformers' default, SDPA, except
# packed batches: see attention_kernel)
ATTENTIONS = {"auto": "sdpa", "sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash"}


def attention_kernel(requested: str, packing: bool, precision: str, ampere_or_newer: bool = True) -> str:
    """The attention kernel family a CUDA run uses: `auto` on packed batches in bf16/fp16 runs them as
    variable-length flash attention (kubetune_trainer.packed_attention: no mask, grouped k/v) on GPUs of compute
    capability 8.0 or newer; older GPUs (no bf16 either) keep SDPA with the block mask."""
    if requested == "auto" and packing and precision in ("bf16", "fp16") and ampere_or_newer:
        return "flash"
    return ATTENTIONS.get(requested, "sdpa")


def resolve_precision(spec: FineTuneJobSpec, bf16_capable: bool = True) -> str:
    """Compute dtype for the estimate: qlora uses quantization.computeDtype; `auto` is bf16 where the
    GPU supports it (Ampere and newer), fp16 otherwise; both cost 2 bytes per element."""
    quant = spec.effective_quantization()
    if quant is not None:
        return _DTYPES.get(quant.compute_dtype, "bf16")
    if spec.training.precision == "auto":
        return "bf16" if bf16_capable else "fp16"
    return spec.training.precision


def setup_from_spec(spec: FineTuneJobSpec, bf16_capable: bool = True, precision: str | None = None) -> TrainingSetup:
    """The TrainingSetup the estimator needs, read from a FineTuneJob spec."""
    training = spec.training
    lora = spec.effective_lora() or LoraSpec()  # full fine-tuning: unused, the estimator ignores LoRA settings
    quant = spec.effective_quantization()
    precision = precision or resolve_precision(spec, bf16_capable)
    return TrainingSetup(
        method=spec.method,
        lora_r=lora.r,
        lora_dropout=lora.dropout,
        target_modules=tuple(lora.target_modules or ("all-linear",)),
        quant_bits=quant.bits if quant is not None else 4,
        quant_double=quant.double_quant if quant is not None else True,
        precision=precision,
        optimizer=training.optimizer,
        micro_batch_size=training.micro_batch_size,
        seq_length=training.max_seq_length,
        packing=training.packing,
        gradient_checkpointing=training.gradient_checkpointing,
        attention=attention_kernel(training.attention_implementation, training.packing, precision,
                                   ampere_or_newer=bf16_capable),
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        max_grad_norm=training.max_grad_norm,
        master_weights=training.master_weights,
        optimizer_in_backward=training.optimizer_in_backward,
        activation_offloading=training.activation_offloading,
        liger_kernels=training.liger_kernels,
    )
