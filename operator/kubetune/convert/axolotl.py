"""Axolotl YAML -> FineTuneJob (keys as Axolotl documents them in its config reference).

Every top-level key is either translated, listed with the reason it has no equivalent (REASONS), or reported as an
unknown Axolotl key by name (a typo, or an option newer than this converter).
"""

from __future__ import annotations

import re
from typing import Any

from .draft import Draft, sanitize_lora_targets
from .training_args import TRACKING

SOURCE = "Axolotl"
# Axolotl's dataset `type` -> dataset.format
DATASET_TYPES = {"alpaca": "alpaca", "sharegpt": "sharegpt", "chat_template": "messages", "completion": "text",
                 "messages": "messages"}
# Axolotl chat_template names -> ours ("" = the tokenizer's own template)
CHAT_TEMPLATES = {"chatml": "chatml", "llama3": "llama3", "mistral_v1": "mistral", "mistral_v2v3": "mistral",
                  "mistral_v3_tekken": "mistral", "gemma": "gemma", "phi_3": "phi3", "alpaca": "alpaca",
                  "tokenizer_default": ""}
ATTENTION = {"flash_attention": "flash_attention_2", "sdp_attention": "sdpa", "eager_attention": "eager"}
LIGER_FLAGS = ("liger_rope", "liger_rms_norm", "liger_glu_activation", "liger_layer_norm",
               "liger_fused_linear_cross_entropy", "liger_cross_entropy")
WANDB_RUN = ("wandb_project", "wandb_entity", "wandb_name", "wandb_mode")  # -> spec.tracking.wandb
WANDB = ("wandb_run_id", "wandb_watch", "wandb_log_model", "use_wandb", "use_mlflow",
         "comet_api_key", "comet_project_name")
WANDB_OFFLINE = ("the config holds no API key, so the job logs to W&B offline: run files under output.uri/wandb/ "
                 "for `wandb sync`; for live logging set spec.tracking.wandb.mode: online and apiKeySecretRef "
                 "(a Secret with the key)")
NOT_NEEDED = "not needed: the model and tokenizer classes are found from config.json"
REASONS: dict[str, str] = {
    "base_model_config": NOT_NEEDED, "model_type": NOT_NEEDED, "tokenizer_type": NOT_NEEDED,
    "is_llama_derived_model": NOT_NEEDED, "is_mistral_derived_model": NOT_NEEDED, "is_qwen_derived_model": NOT_NEEDED,
    "tokenizer_config": "the tokenizer comes with the model (model.uri)",
    "tokenizer_use_fast": "the tokenizer comes with the model (model.uri)",
    "tokenizer_legacy": "the tokenizer comes with the model (model.uri)",
    "dataset_prepared_path": "data is tokenized in the trainer pod at the start of each run",
    "push_dataset_to_hub": "data is tokenized in the trainer pod at the start of each run",
    "dataset_processes": "data is tokenized in the trainer pod at the start of each run",
    "shuffle_merged_datasets": "one dataset per job",
    "output_dir": "a local directory; the job writes to spec.output.uri (set it with --output-uri)",
    "hub_model_id": "the output goes to spec.output.uri (pvc:// or s3://); upload final/ from there",
    "hub_strategy": "the output goes to spec.output.uri (pvc:// or s3://); upload final/ from there",
    "resume_from_checkpoint": "a restarted job resumes from the newest checkpoint under spec.output.uri by itself",
    "auto_resume_from_checkpoints": "a restarted job always resumes from the newest checkpoint under output.uri",
    "pad_to_sequence_len": "batches are padded to their longest sequence (or packed with packing)",
    "eval_sample_packing": "evaluation batches follow training.packing",
    "sample_packing_eff_est": "packing is exact here; no estimate to give",
    "total_num_tokens": "counted by the trainer",
    "group_by_length": "batches follow a seeded shuffle; length grouping is not available",
    "train_on_inputs": "",  # handled: completionOnly
    "lora_fan_in_fan_out": "set by peft from the model architecture",
    "lora_modules_to_save": "only LoRA adapters (and no fully trained modules) are trained",
    "lora_model_dir": "starting from an existing adapter is not available",
    "peft_use_dora": "DoRA is not available",
    "peft_use_rslora": "rank-stabilized LoRA is not available",
    "peft_layers_to_transform": "LoRA applies to every layer",
    "unfrozen_parameters": "full fine-tuning trains every parameter; partial freezing is not available",
    "load_in_8bit": "8-bit base weights are not available; use adapter: qlora (4-bit) or lora",
    "gptq": "GPTQ-quantized bases are not available",
    "tf32": "TF32 matmuls are not a setting here (PyTorch's default applies)",
    "xformers_attention": "xformers attention is not available (sdpa or flash_attention_2 are)",
    "s2_attention": "shifted sparse attention is not available",
    "fsdp": "FSDP is not a strategy here; use distributed.strategy: deepspeed with zeroStage 3 to shard weights",
    "fsdp_config": "FSDP is not a strategy here; use distributed.strategy: deepspeed with zeroStage 3",
    "fsdp_version": "FSDP is not a strategy here",
    "saves_per_epoch": "checkpoints are every checkpointEverySteps steps or once per epoch",
    "evals_per_epoch": "evaluation is every evalEverySteps steps or once per epoch",
    "eval_batch_size": "evaluation uses training.microBatchSize",
    "eval_max_new_tokens": "generation-based evaluation is not configured here",
    "eval_table_size": TRACKING,
    "do_causal_lm_eval": "evaluation reports loss and perplexity",
    "early_stopping_threshold": "",  # handled with early_stopping_patience
    "special_tokens": "the tokenizer's special tokens are used as the model ships them",
    "tokens": "adding tokens to the vocabulary is not available",
    "neftune_noise_alpha": "NEFTune noise is not available",
    "noisy_embedding_alpha": "NEFTune noise is not available",
    "lr_quadratic_warmup": "warmup is linear",
    "cosine_min_lr_ratio": "cosine decays to 0",
    "cosine_constant_lr_ratio": "cosine decays to 0",
    "lr_div_factor": "one_cycle schedules are not available",
    "adam_beta1": "AdamW uses fixed betas (0.9, 0.999) here",
    "adam_beta2": "AdamW uses fixed betas (0.9, 0.999) here",
    "adam_epsilon": "AdamW uses a fixed epsilon (1e-8) here",
    "optim_args": "optimizers take no extra arguments here",
    "gradient_checkpointing_kwargs": "checkpointing options are chosen by the trainer",
    "ddp_timeout": "the rendezvous timeout is fixed by the trainer",
    "ddp_find_unused_parameters": "DDP settings are chosen by the trainer",
    "debug": "the trainer logs at INFO; see the pod logs",
    "strict": "this converter reports every key it cannot express",
    "local_rank": "set by the launcher",
    "logging_dir": TRACKING,
    "plugins": "",  # handled: the Liger plugin
    "dataloader_num_workers": "data is tokenized up front; batches are assembled in the training process",
    "dataloader_pin_memory": "batches are assembled in the training process",
    "dataloader_prefetch_factor": "batches are assembled in the training process",
    "chat_template_jinja": "",  # handled with chat_template
    "default_system_message": "add the system message to the records (messages format) instead",
    "save_safetensors": "outputs are always written as safetensors",
    "save_only_model": "checkpoints always hold the optimizer state, which resuming needs",
    "max_packed_sequence_len": "packed blocks are training.maxSeqLength tokens",
    "torch_compile_backend": "torch.compile uses its default backend (inductor)",
}
# A false / empty value of these is what a FineTuneJob does anyway (the feature is off), so it is not listed.
OFF_IS_OURS = {"load_in_8bit", "tf32", "group_by_length", "xformers_attention", "s2_attention", "pad_to_sequence_len",
               "eval_sample_packing", "lora_fan_in_fan_out", "peft_use_dora", "peft_use_rslora", "gptq", "debug",
               "strict", "fsdp", "fsdp_config", "special_tokens", "tokens", "lora_modules_to_save",
               "unfrozen_parameters", "neftune_noise_alpha", "noisy_embedding_alpha", "lr_quadratic_warmup",
               "shuffle_merged_datasets", "lora_model_dir", "save_only_model", "dataset_prepared_path",
               "do_causal_lm_eval", "eval_table_size", "peft_layers_to_transform", "hub_model_id"}
HANDLED = {"base_model", "revision_of_model", "trust_remote_code", "datasets", "test_datasets", "val_set_size",
           "adapter", "load_in_4bit", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
           "lora_target_linear", "bnb_config_kwargs", "sequence_len", "sample_packing", "micro_batch_size",
           "gradient_accumulation_steps", "num_epochs", "max_steps", "learning_rate", "lr_scheduler", "warmup_steps",
           "warmup_ratio", "optimizer", "weight_decay", "max_grad_norm", "gradient_checkpointing", "bf16", "fp16",
           "seed", "logging_steps", "save_steps", "save_strategy", "save_total_limit", "eval_steps",
           "eval_strategy", "evaluation_strategy", "early_stopping_patience", "flash_attention", "sdp_attention",
           "eager_attention", "torch_compile", "deepspeed", "chat_template", "merge_lora", "mlflow_tracking_uri",
           "mlflow_experiment_name", "mlflow_run_name",
           *LIGER_FLAGS, *WANDB, *WANDB_RUN}


def _dataset(draft: Draft, entry: Any, key: str) -> None:
    """datasets[0]: path -> dataset.uri, type -> format or promptTemplate; other per-dataset keys are listed."""
    if not isinstance(entry, dict) or "path" not in entry:
        draft.drop(key, entry, "a dataset entry needs a path")
        return
    draft.dataset(f"{key}.path", entry["path"])
    kind = entry.get("type")
    for name, value in entry.items():
        where = f"{key}.{name}"
        if name in ("path", "type"):
            continue
        if name == "field_messages" and kind == "chat_template" and value == "messages":
            continue  # the messages format's own field name
        if name in ("message_property_mappings", "message_field_role", "message_field_content") and \
                kind == "chat_template" and value in ({"role": "role", "content": "content"}, "role", "content"):
            continue
        if name == "roles_to_train" and value == ["assistant"]:
            continue  # what completionOnly trains
        if name == "split" and value == "train":
            continue
        if name in ("ds_type", "data_files") and kind is not None:
            draft.drop(where, value, "dataset.uri names one file; the format follows from its suffix")
            continue
        draft.drop(where, value, "per-dataset options other than path and type are not available")
    if isinstance(kind, dict):
        _custom_type(draft, kind, f"{key}.type")
    elif kind in DATASET_TYPES:
        draft.set("dataset.format", DATASET_TYPES[kind])
    elif kind is not None:
        draft.drop(f"{key}.type", kind, "prompt strategy not available (alpaca, sharegpt, chat_template, completion "
                                        "or a custom format are); the format is detected from the records")


def _custom_type(draft: Draft, kind: dict, key: str) -> None:
    """A custom prompt format {field_instruction, field_input, field_output, format, no_input_format, system_*}."""
    fields = {"instruction": kind.get("field_instruction", "instruction"), "input": kind.get("field_input", "input"),
              "output": kind.get("field_output", "output"), "system": kind.get("field_system", "system")}
    fmt = kind.get("format")
    if not isinstance(fmt, str) or not re.search(r"\{[A-Za-z_]+\}", fmt):
        draft.drop(key, kind, "a custom type needs a format with {instruction}-style placeholders")
        return
    prompt = re.sub(r"\{(instruction|input|system)\}", lambda m: "{" + fields[m.group(1)] + "}", fmt)
    draft.set("dataset.promptTemplate", {"prompt": prompt, "completion": "{" + fields["output"] + "}"})
    for name, value in kind.items():
        if name in ("field_instruction", "field_input", "field_output", "field_system", "format"):
            continue
        if name == "no_input_format":
            draft.drop(f"{key}.{name}", value, "one prompt template for every record: records without the input "
                                               "field fail; give them an empty input")
        elif name == "system_prompt" and "{system}" not in fmt:
            draft.drop(f"{key}.{name}", value, "write the system prompt into the format text instead")
        else:
            draft.drop(f"{key}.{name}", value, "not available in a prompt template")


def convert(config: dict[str, Any], draft: Draft) -> Draft:
    """Fill `draft` from an Axolotl config."""
    c = config
    if "base_model" in c:
        draft.model("base_model", c["base_model"], str(c.get("revision_of_model") or ""))
    if c.get("trust_remote_code"):
        draft.set("model.trustRemoteCode", True)
    datasets = c.get("datasets") or []
    if isinstance(datasets, list) and datasets:
        _dataset(draft, datasets[0], "datasets[0]")
        for index, extra in enumerate(datasets[1:], start=1):
            draft.drop(f"datasets[{index}]", extra, "one dataset per job: merge the files into one")
    elif draft.options.dataset_uri:
        draft.set("dataset.uri", draft.options.dataset_uri)
    tests = c.get("test_datasets") or []
    if tests:
        draft.dataset("test_datasets[0].path", (tests[0] or {}).get("path", ""), eval_set=True)
        for index, extra in enumerate(tests[1:], start=1):
            draft.drop(f"test_datasets[{index}]", extra, "one evaluation file per job")
    split = c.get("val_set_size")
    if split is not None:
        if 0 <= float(split) <= 0.5:
            draft.set("dataset.evalSplit", float(split))
        else:
            draft.drop("val_set_size", split, "evalSplit is a fraction in [0, 0.5]")
    _method(draft, c)
    _training(draft, c)
    _features(draft, c)
    for key, value in c.items():
        if key in HANDLED or REASONS.get(key) == "" or key in OFF_IS_OURS and not value:
            continue
        if key in REASONS:
            draft.drop(key, value, REASONS[key])
        else:
            draft.drop(key, value, "unknown Axolotl key (not in the options this converter knows)")
    return draft


def _method(draft: Draft, c: dict[str, Any]) -> None:
    adapter = c.get("adapter")
    if adapter in ("lora", "qlora"):
        qlora = adapter == "qlora" or bool(c.get("load_in_4bit"))
        draft.set("method", "qlora" if qlora else "lora")
        if qlora:
            draft.set("quantization", {"bits": 4})
            bnb = c.get("bnb_config_kwargs") or {}
            for name, value in bnb.items():
                if name == "bnb_4bit_quant_type" and value in ("nf4", "fp4"):
                    draft.set("quantization.quantType", value)
                elif name == "bnb_4bit_use_double_quant":
                    draft.set("quantization.doubleQuant", bool(value))
                else:
                    draft.drop(f"bnb_config_kwargs.{name}", value, "not a quantization setting here")
        elif c.get("bnb_config_kwargs"):
            draft.drop("bnb_config_kwargs", c["bnb_config_kwargs"], "adapter lora trains on unquantized weights")
        lora = {"r": c.get("lora_r"), "alpha": c.get("lora_alpha"), "dropout": c.get("lora_dropout")}
        for name, value in lora.items():
            if value is not None:
                draft.set(f"lora.{name}", int(value) if name == "r" else float(value))
        if c.get("lora_target_linear"):
            draft.set("lora.targetModules", ["all-linear"])
            if c.get("lora_target_modules"):
                draft.drop("lora_target_modules", c["lora_target_modules"],
                           "lora_target_linear: true already targets every linear layer")
        elif c.get("lora_target_modules"):
            targets = sanitize_lora_targets(c["lora_target_modules"])
            if targets:
                draft.set("lora.targetModules", targets)
            else:
                draft.drop("lora_target_modules", c["lora_target_modules"], "expected a list of module names")
        if c.get("merge_lora"):
            draft.set("output.mergeAdapter", True)
    elif adapter is None:
        draft.set("method", "full")
        for key in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_linear",
                    "load_in_4bit", "bnb_config_kwargs", "merge_lora"):
            if c.get(key) not in (None, False):
                draft.drop(key, c[key], "no adapter: this is full fine-tuning")
    else:
        draft.set("method", "lora")
        draft.drop("adapter", adapter, "only lora and qlora adapters are available; converted as lora")


def _training(draft: Draft, c: dict[str, Any]) -> None:
    simple = {"sequence_len": ("training.maxSeqLength", int), "micro_batch_size": ("training.microBatchSize", int),
              "gradient_accumulation_steps": ("training.gradientAccumulationSteps", int),
              "num_epochs": ("training.epochs", float), "weight_decay": ("training.weightDecay", float),
              "max_grad_norm": ("training.maxGradNorm", float), "seed": ("training.seed", int),
              "logging_steps": ("training.logEverySteps", int), "save_steps": ("training.checkpointEverySteps", int),
              "save_total_limit": ("training.keepCheckpoints", int), "eval_steps": ("training.evalEverySteps", int)}
    for key, (path, cast) in simple.items():
        value = c.get(key)
        if value is None:
            continue
        if cast is int and isinstance(value, float) and 0 < value < 1:
            draft.drop(key, value, "a fraction of the run's steps; only a step count can be expressed")
            continue
        draft.set(path, cast(value))
    if c.get("max_steps"):
        draft.set("training.maxSteps", int(c["max_steps"]))
    if c.get("learning_rate") is not None:
        draft.learning_rate(c["learning_rate"])
    if c.get("lr_scheduler") is not None:
        draft.scheduler("lr_scheduler", c["lr_scheduler"])
    if c.get("optimizer") is not None:
        draft.optimizer("optimizer", c["optimizer"])
    if c.get("sample_packing") is not None:
        draft.set("training.packing", bool(c["sample_packing"]))
    if c.get("gradient_checkpointing") is not None:
        draft.set("training.gradientCheckpointing", bool(c["gradient_checkpointing"]))
    if "train_on_inputs" in c:
        draft.set("training.completionOnly", not c["train_on_inputs"])
    steps, ratio = c.get("warmup_steps"), c.get("warmup_ratio")
    if steps:
        draft.set("training.warmupSteps", int(steps))
        if ratio:
            draft.drop("warmup_ratio", ratio, "warmup_steps is set too; a FineTuneJob takes one of the two")
    elif ratio is not None:
        draft.set("training.warmupRatio", float(ratio))
    bf16, fp16 = c.get("bf16"), c.get("fp16")
    if bf16 is True:
        draft.set("training.precision", "bf16")
    elif fp16 is True:
        draft.set("training.precision", "fp16")
    elif bf16 == "auto" or bf16 is None and fp16 is None:
        pass  # auto: bf16 where the GPU supports it
    else:
        draft.set("training.precision", "fp32")
    for key in ("save_strategy",):
        value = c.get(key)
        if value in ("steps", "epoch"):
            draft.set("training.checkpointStrategy", value)
        elif value is not None:
            draft.drop(key, value, "kubetune always saves checkpoints so that a restarted pod resumes (steps or "
                                   "epoch); keepCheckpoints: 1 keeps only the newest")
    for key in ("eval_strategy", "evaluation_strategy"):
        value = c.get(key)
        if value == "epoch":
            draft.set("training.evalEverySteps", 0)
        elif value == "no":
            draft.set("dataset.evalSplit", 0.0)
        elif value not in (None, "steps"):
            draft.drop(key, value, "only no, steps and epoch are evaluation strategies here")
    if c.get("early_stopping_patience"):
        draft.set("training.earlyStopping", {"patience": int(c["early_stopping_patience"])})
        if c.get("early_stopping_threshold") is not None:
            draft.set("training.earlyStopping.threshold", float(c["early_stopping_threshold"]))


def _features(draft: Draft, c: dict[str, Any]) -> None:
    for key, value in ATTENTION.items():
        if c.get(key):
            draft.set("training.attentionImplementation", value)
    if c.get("torch_compile") is not None and c["torch_compile"] != "auto":
        draft.set("training.torchCompile", bool(c["torch_compile"]))
    elif c.get("torch_compile") == "auto":
        draft.drop("torch_compile", "auto", "set true or false (auto is not a setting here)")
    plugins = c.get("plugins") or []
    liger = [p for p in plugins if "liger" in str(p).lower()]
    if liger or any(c.get(flag) for flag in LIGER_FLAGS):
        draft.set("training.ligerKernels", True)
        off = [flag for flag in LIGER_FLAGS if c.get(flag) is False]
        for flag in off:
            draft.drop(flag, False, "Liger kernels are switched on or off together")
    for plugin in plugins:
        if plugin not in liger:
            draft.drop("plugins", plugin, "Axolotl plugins do not run here")
    if c.get("deepspeed"):
        from .training_args import HANDLERS

        HANDLERS["deepspeed"](draft, "deepspeed", c["deepspeed"])
    if c.get("chat_template") is not None:
        name = c["chat_template"]
        if name == "jinja":
            jinja = c.get("chat_template_jinja")
            if jinja:
                draft.set("dataset.chatTemplate", jinja)
            else:
                draft.drop("chat_template", name, "jinja needs chat_template_jinja")
        else:
            draft.chat_template("chat_template", name, CHAT_TEMPLATES)
    for key in WANDB:
        if c.get(key) not in (None, False, ""):
            draft.drop(key, c[key], TRACKING)
    _mlflow(draft, c)
    _wandb(draft, c)


def _wandb(draft: Draft, c: dict[str, Any]) -> None:
    """wandb_project / wandb_entity / wandb_name / wandb_mode -> spec.tracking.wandb (offline: the key is not in the
    config, and an online run needs it from a Secret)."""
    given = {key: c[key] for key in WANDB_RUN if c.get(key) not in (None, False, "")}
    mode = str(given.get("wandb_mode", "online"))
    if not given.get("wandb_project") or mode == "disabled":
        why = ("wandb_mode: disabled" if mode == "disabled"
               else "no wandb_project: spec.tracking.wandb needs the project")
        for key, value in given.items():
            draft.drop(key, value, why)
        return
    wandb = {"project": str(given["wandb_project"])}
    if "wandb_entity" in given:
        wandb["entity"] = str(given["wandb_entity"])
    if "wandb_name" in given:
        wandb["runName"] = str(given["wandb_name"])
    wandb["mode"] = "offline"
    if mode != "offline":
        draft.drop("wandb_mode", mode, WANDB_OFFLINE)
    draft.set("tracking.wandb", wandb)


def _mlflow(draft: Draft, c: dict[str, Any]) -> None:
    """mlflow_tracking_uri / mlflow_experiment_name / mlflow_run_name -> spec.tracking.mlflow."""
    uri = c.get("mlflow_tracking_uri")
    if not uri:
        for key in ("mlflow_experiment_name", "mlflow_run_name"):
            if c.get(key):
                draft.drop(key, c[key], "no mlflow_tracking_uri: spec.tracking needs the server's URL")
        return
    if not re.match(r"^https?://\S+$", str(uri)):
        draft.drop("mlflow_tracking_uri", uri, "spec.tracking.mlflow.trackingUri must be an http(s) URL the trainer "
                                               "pods can reach")
        return
    mlflow = {"trackingUri": str(uri), "experiment": str(c.get("mlflow_experiment_name") or "Default")}
    if c.get("mlflow_run_name"):
        mlflow["runName"] = str(c["mlflow_run_name"])
    draft.set("tracking.mlflow", mlflow)
