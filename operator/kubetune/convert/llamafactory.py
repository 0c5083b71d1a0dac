"""LLaMA-Factory training YAML (`llamafactory-cli train config.yaml`, stage sft) -> FineTuneJob."""

from __future__ import annotations

from typing import Any

from . import training_args
from .draft import ConvertError, Draft, set_lora

SOURCE = "LLaMA-Factory"
# LLaMA-Factory template names -> ours
CHAT_TEMPLATES = {"llama3": "llama3", "qwen": "chatml", "chatml": "chatml", "mistral": "mistral", "gemma": "gemma",
                  "phi": "phi3", "alpaca": "alpaca", "empty": ""}
ATTENTION = {"fa2": "flash_attention_2", "sdpa": "sdpa", "disabled": "eager", "auto": "auto"}
REASONS: dict[str, str] = {
    "dataset_dir": "dataset names are resolved by LLaMA-Factory's dataset_info.json; dataset.uri names the file",
    "max_samples": "every record of dataset.uri is used; cut the file to size",
    "overwrite_cache": "data is tokenized in the trainer pod at the start of each run",
    "preprocessing_num_workers": "data is tokenized in the trainer pod",
    "tokenized_path": "data is tokenized in the trainer pod at the start of each run",
    "plot_loss": "the loss history is in final/metrics.json and the job's status",
    "neat_packing": "packing concatenates records without cross-record attention masks",
    "mask_history": "every assistant turn is trained",
    "adapter_name_or_path": "starting from an existing adapter is not available",
    "quantization_method": "",  # handled
    "rope_scaling": "RoPE scaling comes from the model's config.json",
    "use_unsloth": "Unsloth is not used; see training.ligerKernels and the memory features",
    "use_dora": "DoRA is not available",
    "use_rslora": "rank-stabilized LoRA is not available",
    "pissa_init": "PiSSA initialisation is not available",
    "additional_target": "only LoRA adapters (and no fully trained modules) are trained",
    "lora_target": "",  # handled
    "new_special_tokens": "adding tokens to the vocabulary is not available",
    "resize_vocab": "adding tokens to the vocabulary is not available",
    "infer_backend": "inference is not part of a FineTuneJob",
    "export_dir": "the adapter (and, with output.mergeAdapter, merged weights) are written under spec.output.uri",
    "streaming": "the dataset is read whole",
    "image_max_pixels": "text models only",
    "freeze_vision_tower": "text models only",
}
OFF_IS_OURS = {"neat_packing", "mask_history", "use_unsloth", "use_dora", "use_rslora", "pissa_init",
               "resize_vocab", "streaming", "plot_loss", "overwrite_cache", "new_special_tokens", "additional_target",
               "adapter_name_or_path"}
HANDLED = {"model_name_or_path", "model_revision", "trust_remote_code", "stage", "finetuning_type", "lora_rank",
           "lora_alpha", "lora_dropout", "lora_target", "quantization_bit", "quantization_type",
           "double_quantization", "dataset", "eval_dataset", "template", "cutoff_len", "val_size", "packing",
           "train_on_prompt", "flash_attn", "enable_liger_kernel"}


def convert(config: dict[str, Any], draft: Draft) -> Draft:
    """Fill `draft` from a LLaMA-Factory config."""
    c = config
    stage = c.get("stage", "sft")
    if stage not in ("sft", "pt"):
        raise ConvertError(f"stage {stage!r}: only supervised fine-tuning (sft) and continued pretraining (pt) can "
                           "be expressed as a FineTuneJob")
    if "model_name_or_path" in c:
        draft.model("model_name_or_path", c["model_name_or_path"], str(c.get("model_revision") or ""))
    if c.get("trust_remote_code"):
        draft.set("model.trustRemoteCode", True)
    _dataset(draft, c, stage)
    _method(draft, c)
    if c.get("cutoff_len") is not None:
        draft.set("training.maxSeqLength", int(c["cutoff_len"]))
    if c.get("val_size") is not None:
        value = float(c["val_size"])
        if 0 <= value <= 0.5:
            draft.set("dataset.evalSplit", value)
        else:
            draft.drop("val_size", c["val_size"], "evalSplit is a fraction in [0, 0.5]")
    if c.get("packing") is not None:
        draft.set("training.packing", bool(c["packing"]))
    if c.get("train_on_prompt") is not None:
        draft.set("training.completionOnly", not c["train_on_prompt"])
    if c.get("flash_attn") is not None:
        training_args.set_attention(draft, "flash_attn", c["flash_attn"], ATTENTION,
                                    "auto, sdpa, eager or flash_attention_2")
    if c.get("enable_liger_kernel") is not None:
        draft.set("training.ligerKernels", bool(c["enable_liger_kernel"]))
    return training_args.apply_rest(draft, c, handled=HANDLED, reasons=REASONS, off_is_ours=OFF_IS_OURS,
                                    tool="LLaMA-Factory or TrainingArguments")


def _dataset(draft: Draft, c: dict[str, Any], stage: str) -> None:
    names = [n.strip() for n in str(c.get("dataset") or "").split(",") if n.strip()]
    if not draft.options.dataset_uri:
        raise ConvertError(f"dataset {c.get('dataset')!r}: LLaMA-Factory datasets are names in its "
                           "dataset_info.json; pass the file with --dataset-uri pvc://claim/path.jsonl")
    draft.set("dataset.uri", draft.options.dataset_uri)
    for extra in names[1:]:
        draft.drop("dataset", extra, f"one dataset per job; --dataset-uri stands for {names[0]!r}")
    if stage == "pt":
        draft.set("dataset.format", "text")
    evals = [n.strip() for n in str(c.get("eval_dataset") or "").split(",") if n.strip()]
    if evals:
        if draft.options.eval_uri:
            draft.set("dataset.evalUri", draft.options.eval_uri)
        else:
            draft.drop("eval_dataset", c["eval_dataset"], "a dataset name; pass the file with --eval-uri")
    elif draft.options.eval_uri:
        draft.set("dataset.evalUri", draft.options.eval_uri)
    template = c.get("template")
    if template is not None and stage == "sft":
        draft.chat_template("template", template, CHAT_TEMPLATES)


def _method(draft: Draft, c: dict[str, Any]) -> None:
    kind = c.get("finetuning_type", "lora")
    if kind == "full":
        draft.set("method", "full")
        for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "quantization_bit",
                    "quantization_type", "double_quantization"):
            if c.get(key) is not None:
                draft.drop(key, c[key], "finetuning_type full: no adapter and no quantized base")
        return
    if kind != "lora":
        raise ConvertError(f"finetuning_type {kind!r}: only lora and full can be expressed (freeze trains a "
                           "subset of layers, which is not available)")
    bits = c.get("quantization_bit")
    if bits == 4 and c.get("quantization_method", "bitsandbytes") in ("bitsandbytes", "bnb"):
        draft.set("method", "qlora")
        draft.set("quantization", {"bits": 4})
        if c.get("quantization_type") in ("nf4", "fp4"):
            draft.set("quantization.quantType", c["quantization_type"])
        if c.get("double_quantization") is not None:
            draft.set("quantization.doubleQuant", bool(c["double_quantization"]))
    else:
        draft.set("method", "lora")
        if bits is not None:
            draft.drop("quantization_bit", bits, "only 4-bit bitsandbytes quantization (qlora) is available")
        if c.get("quantization_method") not in (None, "bitsandbytes", "bnb"):
            draft.drop("quantization_method", c["quantization_method"], "only bitsandbytes quantization is available")
    set_lora(draft, c, rank="lora_rank", alpha="lora_alpha", dropout="lora_dropout", targets="lora_target",
             targets_reason="expected module names or all")
