"""TRL `SFTConfig` / transformers `TrainingArguments` (plus TRL's `ModelConfig` and `ScriptArguments`, as `trl sft
--config` reads them), JSON or YAML -> FineTuneJob."""

from __future__ import annotations

from typing import Any

from . import training_args
from .draft import Draft, set_lora

SOURCE = "TRL"
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash_attention_2"}
REASONS: dict[str, str] = {
    "dataset_config": "dataset.uri names one file or dataset repository",
    "dataset_train_split": "the training file is dataset.uri",
    "dataset_test_split": "the evaluation set is dataset.evalUri or evalSplit",
    "dataset_num_proc": "data is tokenized in the trainer pod",
    "dataset_kwargs": "data is read by format",
    "dataset_text_field": "",  # handled
    "eos_token": "the tokenizer's eos token is used",
    "pad_token": "the tokenizer's pad token (or eos) is used",
    "padding_free": "batches are padded, or packed with training.packing",
    "packing_strategy": "packing concatenates records into maxSeqLength blocks",
    "pad_to_multiple_of": "batches are padded to their longest sequence",
    "chat_template_path": "a file: put its Jinja text in spec.dataset.chatTemplate",
    "model_init_kwargs": "the model is loaded by method and precision",
    "torch_dtype": "weights load in the dtype training.precision resolves to",
    "dtype": "weights load in the dtype training.precision resolves to",
    "use_rslora": "rank-stabilized LoRA is not available",
    "use_dora": "DoRA is not available",
    "lora_modules_to_save": "only LoRA adapters (and no fully trained modules) are trained",
    "lora_task_type": "",  # handled: CAUSAL_LM only
    "load_in_8bit": "8-bit base weights are not available; use load_in_4bit (qlora) or plain lora",
    "bnb_4bit_compute_dtype": "",  # handled
    "use_peft": "",  # handled
    "neftune_noise_alpha": "NEFTune noise is not available",
    "activation_offloading": "",  # handled
    "use_liger_kernel": "",  # training_args
}
OFF_IS_OURS = {"use_rslora", "use_dora", "load_in_8bit", "lora_modules_to_save", "neftune_noise_alpha",
               "padding_free", "model_init_kwargs", "dataset_kwargs"}
HANDLED = {"model_name_or_path", "model_revision", "trust_remote_code", "dataset_name", "attn_implementation",
           "max_seq_length", "max_length", "packing", "completion_only_loss", "assistant_only_loss", "lora_r",
           "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit", "bnb_4bit_quant_type",
           "use_bnb_nested_quant"}


def convert(config: dict[str, Any], draft: Draft) -> Draft:
    """Fill `draft` from a TRL / transformers config."""
    c = config
    if "model_name_or_path" in c:
        draft.model("model_name_or_path", c["model_name_or_path"], str(c.get("model_revision") or ""))
    elif draft.options.model_uri:
        draft.set("model.uri", draft.options.model_uri)
    if c.get("trust_remote_code"):
        draft.set("model.trustRemoteCode", True)
    if "dataset_name" in c:
        draft.dataset("dataset_name", c["dataset_name"])
    elif draft.options.dataset_uri:
        draft.set("dataset.uri", draft.options.dataset_uri)
    if draft.options.eval_uri:
        draft.set("dataset.evalUri", draft.options.eval_uri)
    text_field = c.get("dataset_text_field")
    if text_field == "text":
        draft.set("dataset.format", "text")
    elif text_field is not None:
        draft.drop("dataset_text_field", text_field, "the text format reads the field 'text'; rename the field or "
                                                     "use dataset.promptTemplate with a {" + str(text_field) + "} "
                                                     "placeholder")
    _method(draft, c)
    for key in ("max_seq_length", "max_length"):
        if c.get(key) is not None:
            draft.set("training.maxSeqLength", int(c[key]))
    if c.get("packing") is not None:
        draft.set("training.packing", bool(c["packing"]))
    for key in ("completion_only_loss", "assistant_only_loss"):
        if c.get(key) is not None:
            draft.set("training.completionOnly", bool(c[key]))
    if c.get("attn_implementation") is not None:
        training_args.set_attention(draft, "attn_implementation", c["attn_implementation"], ATTENTION,
                                    "sdpa, eager or flash_attention_2")
    if c.get("activation_offloading") is not None:
        draft.set("training.activationOffloading", bool(c["activation_offloading"]))
    return training_args.apply_rest(draft, c, handled=HANDLED, reasons=REASONS, off_is_ours=OFF_IS_OURS,
                                    tool="TRL SFTConfig, ModelConfig, ScriptArguments or TrainingArguments")


def _method(draft: Draft, c: dict[str, Any]) -> None:
    if not c.get("use_peft"):
        draft.set("method", "full")
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "load_in_4bit"):
            if c.get(key) is not None and c.get(key) is not False:
                draft.drop(key, c[key], "use_peft is not true: this is full fine-tuning")
        return
    qlora = bool(c.get("load_in_4bit"))
    draft.set("method", "qlora" if qlora else "lora")
    if qlora:
        draft.set("quantization", {"bits": 4})
        if c.get("bnb_4bit_quant_type") in ("nf4", "fp4"):
            draft.set("quantization.quantType", c["bnb_4bit_quant_type"])
        if c.get("use_bnb_nested_quant") is not None:
            draft.set("quantization.doubleQuant", bool(c["use_bnb_nested_quant"]))
        dtype = c.get("bnb_4bit_compute_dtype") or c.get("torch_dtype") or c.get("dtype")
        if dtype in ("bfloat16", "float16", "float32"):
            draft.set("quantization.computeDtype", dtype)
    set_lora(draft, c, rank="lora_r", alpha="lora_alpha", dropout="lora_dropout", targets="lora_target_modules",
             targets_reason="expected a list of module names")
    if c.get("lora_task_type") not in (None, "CAUSAL_LM"):
        draft.drop("lora_task_type", c["lora_task_type"], "adapters are trained for causal language modelling")
