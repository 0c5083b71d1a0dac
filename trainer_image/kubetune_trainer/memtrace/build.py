"""Build the model the recipe builds, from a transformers config instead of a checkpoint directory.

The trainer loads its base model with `AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)` inside
`methods.load_base_model`. For the trace, `config_loader(config)` stands in for that one call: it builds the
same architecture with `from_config` under the active fake-tensor mode, honouring the arguments the trainer
passed (dtype, attention implementation, a 4-bit bitsandbytes quantization config), so whatever the trainer
changes around that call (dtypes, quantization, LoRA wrapping, gradient checkpointing) is traced as is.

`resolve_config` turns a config.json dict into a transformers config and raises `UnsupportedModel`, naming
what is missing, for architectures the trace cannot build (unknown `model_type`, custom code that needs
`trust_remote_code`, no causal-LM class, pre-quantized checkpoints, 8-bit quantization).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch

KNOWN_LOAD_ARGS = frozenset({"dtype", "torch_dtype", "attn_implementation", "trust_remote_code",
                             "quantization_config", "device_map", "low_cpu_mem_usage"})


class TraceError(RuntimeError):
    """The trace cannot run for this input; the message names what is missing."""


class UnsupportedModel(TraceError):
    """The trace cannot build this architecture (the caller falls back to the analytic estimate)."""


@dataclass
class BuildLog:
    """What the stand-in loader did (reported with the trace)."""

    calls: int = 0
    dtype: str = ""
    quantized_layers: int = 0
    notes: list[str] = field(default_factory=list)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def resolve_config(config: Any, *, trust_remote_code: bool = False):
    """A transformers PretrainedConfig for `config` (a config.json dict or a config object); UnsupportedModel if
    the trace cannot build it."""
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if isinstance(config, PretrainedConfig):
        cfg = config
        auto_map = getattr(config, "auto_map", None) or {}
    else:
        if not isinstance(config, Mapping):
            raise UnsupportedModel(f"model config: expected a config.json mapping, got {type(config).__name__}")
        data = dict(config)
        model_type = data.pop("model_type", None)
        auto_map = data.get("auto_map") or {}
        if not model_type:
            raise UnsupportedModel("model config has no model_type: the trace needs config.json's model_type to "
                                   "pick the architecture")
        if model_type not in CONFIG_MAPPING:
            if auto_map or trust_remote_code:
                raise UnsupportedModel(
                    f"model_type {model_type!r} is custom code shipped with the checkpoint (trust_remote_code, "
                    f"auto_map {sorted(auto_map) or '-'}); the trace builds only architectures that transformers "
                    f"{_transformers_version()} contains, so it cannot build this one")
            raise UnsupportedModel(
                f"unknown model_type {model_type!r}: transformers {_transformers_version()} has no architecture of "
                "that name, so the trace cannot build it")
        try:
            cfg = AutoConfig.for_model(model_type, **data)
        except (TypeError, ValueError) as exc:
            raise UnsupportedModel(f"model config for model_type {model_type!r} is not valid: {exc}") from None
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        raise UnsupportedModel(
            f"model_type {cfg.model_type!r} loads custom code with trust_remote_code "
            f"(auto_map AutoModelForCausalLM: {auto_map['AutoModelForCausalLM']}); the trace cannot run code "
            "that is not part of transformers")
    prequantized = getattr(cfg, "quantization_config", None)
    if prequantized:
        method = prequantized.get("quant_method", "?") if isinstance(prequantized, Mapping) else \
            getattr(prequantized, "quant_method", "?")
        raise UnsupportedModel(f"the checkpoint is pre-quantized (quantization_config quant_method {method}); the "
                               "trace emulates only bitsandbytes 4-bit quantization applied at load time")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if type(cfg) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModel(f"model_type {cfg.model_type!r} has no causal language model class in transformers "
                               f"{_transformers_version()}; the trainer fine-tunes causal LMs only")
    return cfg


def _load_dtype(config, kwargs: Mapping[str, Any]) -> torch.dtype:
    """The dtype from_pretrained would load in: the dtype argument, else the checkpoint's (config) dtype."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def build_model(config, kwargs: Mapping[str, Any], log: BuildLog,
                without_modes: Callable[[], contextlib.AbstractContextManager]):
    """What `AutoModelForCausalLM.from_pretrained(dir, **kwargs)` returns for `config`, built on the active
    (fake) tensor mode."""
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.memtrace.quantized import is_4bit_config, quantize_model_4bit

    unknown = sorted(set(kwargs) - KNOWN_LOAD_ARGS)
    if unknown:
        log.notes.append(f"from_pretrained arguments not modelled by the trace: {', '.join(unknown)}")
    quant = kwargs.get("quantization_config")
    if quant is not None and not is_4bit_config(quant):
        raise UnsupportedModel("8-bit (LLM.int8) quantization is not emulated by the trace (4-bit NF4/FP4 is); "
                               "use quantization.bits 4 or the analytic estimate")
    dtype = _load_dtype(config, kwargs)
    cfg = copy.deepcopy(config)
    extra: dict[str, Any] = {}
    if kwargs.get("attn_implementation"):
        extra["attn_implementation"] = kwargs["attn_implementation"]
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, **extra)
    if quant is not None:
        log.quantized_layers += quantize_model_4bit(model, quant, dtype, without_modes)
    model.eval()  # from_pretrained returns the model in eval mode
    log.calls += 1
    log.dtype = str(dtype).replace("torch.", "")
    return model


@contextlib.contextmanager
def config_loader(config, log: BuildLog,
                  without_modes: Callable[[], contextlib.AbstractContextManager]) -> Iterator[BuildLog]:
    """While active, `AutoModelForCausalLM.from_pretrained(anything, **kwargs)` builds `config` instead of
    reading a directory."""
    from transformers import AutoModelForCausalLM

    own = AutoModelForCausalLM.__dict__.get("from_pretrained")

    def from_pretrained(cls, _model_dir, *args, **kwargs):
        if args:
            log.notes.append(f"from_pretrained positional arguments ignored by the trace: {len(args)}")
        return build_model(config, kwargs, log, without_modes)

    AutoModelForCausalLM.from_pretrained = classmethod(from_pretrained)
    try:
        yield log
    finally:
        if own is None:
            del AutoModelForCausalLM.from_pretrained
        else:
            AutoModelForCausalLM.from_pretrained = own
