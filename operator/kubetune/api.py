"""Typed models of the FineTuneJob spec (kubetune.io/v1alpha1, docs/contracts.md §1); the status models are in
kubetune.status."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

PVC_SCHEME = "pvc://"


class _Model(BaseModel):
    """Base: camelCase aliases, unknown keys ignored (the apiserver already pruned them)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def dump(self) -> dict[str, Any]:
        """The model as a camelCase dict (the CRD's field names)."""
        return self.model_dump(by_alias=True, mode="json")


class Architecture(_Model):
    family: str = ""
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    vocab_size: int | None = None
    tie_word_embeddings: bool | None = None
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    head_dim: int = 0


class ModelSource(_Model):
    uri: str
    architecture: Architecture | None = None
    trust_remote_code: bool = False


# Built-in chat templates (dataset.chatTemplate by name); the Jinja text lives in the trainer
# (kubetune_trainer.data.chat_templates) and the CRD lists the same names.
CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "mistral", "gemma", "phi3", "alpaca")


class PromptTemplate(_Model):
    """Records of any shape rendered as plain text: `{field}` placeholders; the prompt is masked, the completion trained."""

    prompt: str
    completion: str


class DatasetSource(_Model):
    uri: str
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = "auto"
    eval_uri: str = ""
    eval_split: float = 0.05
    chat_template: str = ""  # "" = the tokenizer's own; a CHAT_TEMPLATE_NAMES name or inline Jinja
    prompt_template: PromptTemplate | None = None

    @field_validator("chat_template")
    @classmethod
    def _chat_template(cls, value: str) -> str:
        if value and value not in CHAT_TEMPLATE_NAMES and "{{" not in value and "{%" not in value:
            raise ValueError(f"spec.dataset.chatTemplate {value!r} is neither a built-in template "
                             f"({', '.join(CHAT_TEMPLATE_NAMES)}) nor an inline Jinja template")
        return value


class LoraSpec(_Model):
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])


class QuantizationSpec(_Model):
    bits: int = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class EarlyStopping(_Model):
    patience: int = 0
    threshold: float = 0.0


class Divergence(_Model):
    """Stop (or warn) when the smoothed train loss stays above `factor` x its best for `patience` steps."""

    action: Literal["stop", "warn", "off"] = "stop"
    factor: float = 10.0
    patience: int = 10


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")
# Other projects' spellings (transformers' OptimizerNames, Axolotl, Unsloth) -> the canonical name. The CRD stores only
# canonical names (it refuses an alias, naming the canonical one); the models here, `kubetune convert` and the trainer
# plan (kubetune_trainer.plan.OPTIMIZER_ALIASES, the same table) translate.
OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
                     "adamw_bnb_8bit": "adamw_8bit", "paged_adamw": "paged_adamw_32bit"}


def canonical_optimizer(name: Any) -> Any:
    """The canonical optimizer name for an alias (other values unchanged, for the model to validate)."""
    return OPTIMIZER_ALIASES.get(name, name) if isinstance(name, str) else name


class TrainingSpec(_Model):
    epochs: float = 0
    max_steps: int = 0
    learning_rate: float = 2e-4
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 8
    max_seq_length: int = 2048
    packing: bool = False
    warmup_ratio: float = 0.03  # no CRD default: absent means 0.03 unless warmup_steps is set (exactly one)
    warmup_steps: int | None = None
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = 42
    completion_only: bool = True
    checkpoint_every_steps: int = 200
    checkpoint_strategy: Literal["steps", "epoch"] = "steps"
    keep_checkpoints: int = 2  # 0 = keep all; the newest complete checkpoint is never deleted
    log_every_steps: int = 0  # 0 = about 50 lines per run
    eval_every_steps: int = 0
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    divergence: Divergence = Field(default_factory=Divergence)
    # Speed features: no CRD default (absent = off / transformers' default); the plan carries them only when
    # set (builders.SPEED_FIELD_DEFAULTS).
    attention_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    torch_compile: bool = False
    liger_kernels: bool = False
    # Memory features, same rule (absent = the value shown; kubetune_trainer documents each default).
    master_weights: Literal["auto", "fp32", "none"] = "auto"
    optimizer_in_backward: bool | None = None  # None = auto
    activation_offloading: bool = False

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _parse_lr(cls, value: Any) -> float:
        """A YAML number or a decimal string such as "2e-4", in (0, 1] (the CRD leaves the field untyped; the
        admission policy in crds/ enforces the same rule, this catches clusters without it)."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"spec.training.learningRate {value!r} is not a number")
        try:
            rate = float(value)
        except ValueError as exc:
            raise ValueError(f"spec.training.learningRate {value!r} is not a number") from exc
        if not 0.0 < rate <= 1.0:
            raise ValueError(f"spec.training.learningRate {value!r} is outside (0, 1]")
        return rate

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_alias(cls, value: Any) -> Any:
        """Accept other projects' spellings (OPTIMIZER_ALIASES); the model holds the canonical name."""
        return canonical_optimizer(value)

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainingSpec":
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set:
            raise ValueError("set only one of spec.training.warmupSteps or spec.training.warmupRatio")
        return self


class ResourcesSpec(_Model):
    gpu_type: str = ""
    gpus_per_pod: int = 0
    pods: int = 0
    max_gpus: int = 0
    cpu: str = ""
    memory: str = ""

    def pins_layout(self) -> bool:
        """True when the spec fixes the layout: GPU type + GPUs per pod + pods, or a CPU-only run."""
        if self.pods <= 0:
            return False
        if self.gpus_per_pod > 0:
            return bool(self.gpu_type)
        return bool(self.cpu)


class DistributedSpec(_Model):
    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False


class ExportSpec(_Model):
    """spec.output.export: a GGUF file of the fine-tuned weights and an Ollama Modelfile next to it."""

    gguf: Literal["f16", "q8_0", "q4_k_m"] = "f16"
    modelfile: bool = True
    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    num_ctx: int = 0  # 0 = training.maxSeqLength


class OutputSpec(_Model):
    uri: str
    merge_adapter: bool = False
    export: ExportSpec | None = None


EVAL_METRICS = ("exactMatch", "tokenF1", "rougeL", "bleu", "chrf", "evalLoss", "perplexity")
EvalMetric = Literal["exactMatch", "tokenF1", "rougeL", "bleu", "chrf", "evalLoss", "perplexity"]


class EvalGate(_Model):
    """Pass only if the tuned model beats the base by at least `min_improvement` on `metric` (for evalLoss and
    perplexity an improvement is a decrease)."""

    metric: EvalMetric
    min_improvement: float = 0.0


class EvaluationSpec(_Model):
    """Base-vs-tuned evaluation after training (spec.evaluation; absent = none)."""

    metrics: list[EvalMetric] = Field(default_factory=lambda: ["exactMatch", "tokenF1", "rougeL"])
    num_examples: int = 50
    dataset_uri: str = ""
    max_new_tokens: int = 64
    temperature: float = 0.0
    general_probe_uri: str = ""
    gates: list[EvalGate] = Field(default_factory=list)
    max_general_regression: float | None = None


class SecretKeyRef(_Model):
    name: str = ""
    key: str = "token"


class SecretRef(_Model):
    name: str = ""


class MlflowSpec(_Model):
    """An MLflow tracking server: one run per job attempt, logged from rank 0."""

    tracking_uri: str
    experiment: str
    run_name: str = ""
    credentials_secret_ref: SecretRef | None = None  # keys MLFLOW_TRACKING_TOKEN or _USERNAME / _PASSWORD


class WandbKeyRef(_Model):
    """A key of a Secret in the job's namespace."""

    name: str
    key: str = "apiKey"


class WandbSpec(_Model):
    """A Weights & Biases project: one run per job attempt, logged from rank 0 (offline: run files under the
    output, for a later `wandb sync`)."""

    project: str
    entity: str = ""
    run_name: str = ""
    mode: Literal["online", "offline"] = "online"
    api_key_secret_ref: WandbKeyRef | None = None  # reaches the pod as WANDB_API_KEY, never the plan


class TrackingSpec(_Model):
    """spec.tracking (absent = none): where the run's parameters, plan and metrics are logged."""

    mlflow: MlflowSpec | None = None
    wandb: WandbSpec | None = None
    required: bool = False


class PreflightSpec(_Model):
    """spec.preflight (absent = enabled): the CPU check of the model and data before any GPU pod starts."""

    enabled: bool = True


class SecretsSpec(_Model):
    hf_token_secret_ref: SecretKeyRef = Field(default_factory=SecretKeyRef)
    s3_credentials_secret_ref: SecretRef = Field(default_factory=SecretRef)


class FineTuneJobSpec(_Model):
    model: ModelSource
    dataset: DatasetSource
    method: Literal["full", "lora", "qlora"]
    lora: LoraSpec | None = None
    quantization: QuantizationSpec | None = None
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(epochs=1))
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    output: OutputSpec
    evaluation: EvaluationSpec | None = None
    tracking: TrackingSpec | None = None
    preflight: PreflightSpec | None = None
    image: str = ""
    secrets: SecretsSpec = Field(default_factory=SecretsSpec)
    suspend: bool = False
    cancel: bool = False
    backoff_limit: int = 3
    active_deadline_seconds: int = 0
    ttl_seconds_after_finished: int = 0

    def effective_lora(self) -> LoraSpec | None:
        """The LoRA settings for lora/qlora (defaults when the block is omitted), None for full."""
        if self.method == "full":
            return None
        return self.lora or LoraSpec()

    def effective_quantization(self) -> QuantizationSpec | None:
        """The quantization settings for qlora (defaults when the block is omitted), None otherwise."""
        if self.method != "qlora":
            return None
        return self.quantization or QuantizationSpec()

    def uris(self) -> list[str]:
        """Every storage URI the run reads or writes."""
        found = [self.model.uri, self.dataset.uri, self.output.uri]
        if self.dataset.eval_uri:
            found.append(self.dataset.eval_uri)
        if self.evaluation is not None:
            found += [u for u in (self.evaluation.dataset_uri, self.evaluation.general_probe_uri) if u]
        return found

    def pvc_claims(self) -> list[str]:
        """Names of the PersistentVolumeClaims referenced by pvc:// URIs, sorted, unique."""
        return sorted({pvc_claim(uri) for uri in self.uris() if uri.startswith(PVC_SCHEME)})


def pvc_claim(uri: str) -> str:
    """The claim name of a pvc://claim/path URI."""
    if not uri.startswith(PVC_SCHEME):
        raise ValueError(f"{uri!r} is not a pvc:// URI")
    return uri[len(PVC_SCHEME):].split("/", 1)[0]


def parse_spec(spec: dict[str, Any]) -> FineTuneJobSpec:
    """Parse a (defaulted) FineTuneJob .spec dict into the typed model."""
    return FineTuneJobSpec.model_validate(dict(spec))


PHASES = ("Pending", "Preparing", "Queued", "Running", "Succeeded", "Failed", "Suspended", "Cancelled")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Cancelled"})
