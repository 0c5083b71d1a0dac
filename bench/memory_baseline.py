"""The plain transformers + peft fine-tuning step that the guides show: the baseline of bench/memory.py.

What a `transformers.Trainer(bf16=True, gradient_checkpointing=True)` run of a peft model does per step,
written out so that the memory trace (fake tensors on CPU) and a GPU measurement run the same code:

- LoRA: base weights loaded in bf16, `get_peft_model` (adapters in fp32, peft's default), torch AdamW.
- QLoRA: 4-bit NF4 (double quantization, bf16 compute) through `BitsAndBytesConfig`, then peft's
  `prepare_model_for_kbit_training` (it upcasts the unquantized weights to fp32), `get_peft_model`, AdamW.
- full: fp32 weights (the fp32 master copy of mixed precision), bnb `PagedAdamW8bit` (or torch AdamW).
- every method: gradient checkpointing (non-reentrant, input grads enabled as the Trainer does), the
  forward under `torch.autocast(bf16)`, `model(**batch)` with `labels` so transformers computes its own loss
  (full-vocabulary logits upcast to fp32), backward per micro-batch, grad-norm clipping, optimizer step,
  `zero_grad(set_to_none=True)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

LOAD_URI = "baseline://model"  # the argument passed to from_pretrained (the trace's loader ignores it)


@dataclass(frozen=True)
class BaselineSettings:
    """What the baseline run trains; the same fields as the kubetune plan it is compared with."""

    method: str = "lora"  # full | lora | qlora
    lora_r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    optimizer: str = "adamw"  # adamw | paged_adamw_8bit
    gradient_checkpointing: bool = True
    attn_implementation: str = "sdpa"
    learning_rate: float = 1e-4
    max_grad_norm: float = 1.0


def load_kwargs(settings: BaselineSettings) -> dict[str, Any]:
    """The `from_pretrained` keyword arguments the guides use for the method."""
    import torch

    kwargs: dict[str, Any] = {"attn_implementation": settings.attn_implementation}
    if settings.method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["dtype"] = torch.bfloat16
    elif settings.method == "lora":
        kwargs["dtype"] = torch.bfloat16
    elif settings.method == "full":
        kwargs["dtype"] = torch.float32  # mixed precision keeps fp32 weights; autocast computes in bf16
    else:
        raise ValueError(f"baseline method must be full, lora or qlora, not {settings.method!r}")
    return kwargs


def build_baseline(settings: BaselineSettings, load: Callable[..., Any]):
    """(model, optimizer) as the plain script builds them; `load(**kwargs)` is `from_pretrained(dir, **kwargs)`."""
    import torch

    model = load(**load_kwargs(settings))
    model.config.use_cache = False
    if settings.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=settings.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if settings.gradient_checkpointing:  # what Trainer(gradient_checkpointing=True) does
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if settings.method != "full":
            model.enable_input_require_grads()
    if settings.method != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
            target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=settings.learning_rate, weight_decay=0.0)
    elif settings.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    else:
        raise ValueError(f"baseline optimizer must be adamw or paged_adamw_8bit, not {settings.optimizer!r}")
    return model, optimizer


def baseline_step(model, optimizer, micro_batches: Sequence[dict], *, device_type: str,
                  max_grad_norm: float = 1.0) -> float:
    """One optimizer step over `micro_batches` (each with `labels`): transformers' loss, bf16 autocast.

    Returns the mean loss (0.0 on fake tensors)."""
    import torch

    total = 0.0
    n = len(micro_batches)
    for batch in micro_batches:
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            out = model(**batch)
        loss = out.loss / n
        del out
        loss.backward()
        total += float(loss.detach())
        del loss
    params = [p for p in model.parameters() if p.requires_grad]
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total
