"""The training plan (docs/contracts.md §2): typed, validated pydantic v2 models.

`load_plan(path)` / `parse_plan(dict)` return a `Plan` or raise `PlanError` naming the
offending field (e.g. ``training.learningRate: ...``). Unknown keys are rejected at every level.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune_trainer import PLAN_VERSION
from kubetune_trainer.errors import PlanError


class _Model(BaseModel):
    """Base: camelCase aliases, unknown keys forbidden, frozen-ish values."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid",
                              validate_default=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The camelCase JSON form (what the operator writes)."""
        return self.model_dump(by_alias=True, mode="json")


class JobRef(_Model):
    name: str = ""
    namespace: str = ""
    uid: str = ""


class ModelRef(_Model):
    uri: str = Field(min_length=1)
    trust_remote_code: bool = False


class PromptTemplatePlan(_Model):
    prompt: str = Field(min_length=1)
    completion: str = Field(min_length=1)


class DatasetPlan(_Model):
    uri: str = Field(min_length=1)
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = "auto"
    eval_uri: str = ""
    eval_split: float = Field(default=0.05, ge=0.0, le=0.5)
    # Optional (absent = the tokenizer's template / format detection); kubetune_trainer.data.chat_templates.
    chat_template: str = ""
    prompt_template: PromptTemplatePlan | None = None

    @model_validator(mode="after")
    def _one_template(self) -> "DatasetPlan":
        if self.prompt_template is not None and self.chat_template:
            raise ValueError("chatTemplate and promptTemplate exclude each other")
        if self.prompt_template is not None and self.format not in ("auto", "text"):
            raise ValueError(f"promptTemplate renders plain text; format must be auto or text, not {self.format}")
        return self


class LoraPlan(_Model):
    r: int = Field(default=16, ge=1, le=1024)
    alpha: float = Field(default=32.0, gt=0.0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)


class QuantizationPlan(_Model):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class EarlyStoppingPlan(_Model):
    patience: int = Field(default=0, ge=0)
    threshold: float = Field(default=0.0, ge=0.0)


# Other projects' spellings -> canonical optimizer names (the same table as kubetune.api.OPTIMIZER_ALIASES).
OPTIMIZER_ALIASES = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
                     "adamw_bnb_8bit": "adamw_8bit", "paged_adamw": "paged_adamw_32bit"}


class DivergencePlan(_Model):
    action: Literal["stop", "warn", "off"] = "stop"
    factor: float = Field(default=10.0, gt=1.0)
    patience: int = Field(default=10, ge=1)


class TrainingPlan(_Model):
    epochs: float = Field(default=0.0, ge=0.0)
    max_steps: int = Field(default=0, ge=0)
    learning_rate: float = 2e-4
    micro_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=8, ge=1)
    max_seq_length: int = Field(default=2048, ge=8)
    packing: bool = False
    warmup_ratio: float = Field(default=0.03, ge=0.0, le=1.0)
    warmup_steps: int | None = Field(default=None, ge=0)  # instead of warmupRatio (exactly one)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd"] = "adamw"
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    gradient_checkpointing: bool = True
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    seed: int = Field(default=42, ge=0)
    completion_only: bool = True
    checkpoint_every_steps: int = Field(default=200, ge=1)
    checkpoint_strategy: Literal["steps", "epoch"] = "steps"
    keep_checkpoints: int = Field(default=2, ge=0)  # 0 = keep all; the newest complete one is never deleted
    log_every_steps: int = Field(default=0, ge=0)  # 0 = about 50 lines per run
    eval_every_steps: int = Field(default=0, ge=0)
    early_stopping: EarlyStoppingPlan = Field(default_factory=EarlyStoppingPlan)
    divergence: DivergencePlan = Field(default_factory=DivergencePlan)  # kubetune_trainer.divergence
    # Speed features (optional; absent = today's behaviour). Where each applies: kubetune_trainer.speedups.
    attention_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    torch_compile: bool = False
    liger_kernels: bool = False
    # Memory features (absent = the value shown). Where each applies: kubetune_trainer.methods / engine.
    master_weights: Literal["auto", "fp32", "none"] = "auto"
    optimizer_in_backward: bool | None = None  # None = auto: on where it is exact (engine.in_backward_problem)
    activation_offloading: bool = False
    tiled_mlp: bool | None = None  # None = auto: LoRA/QLoRA with gradient checkpointing (kubetune_trainer.tokenwise)
    embeddings_on_host: bool | None = None  # None = auto: LoRA/QLoRA on a GPU (kubetune_trainer.host_embeddings)

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _parse_learning_rate(cls, value: Any) -> float:
        if isinstance(value, bool):
            raise ValueError("must be a number or a numeric string such as \"2e-4\"")
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"{value!r} is not a number (expected e.g. \"2e-4\")") from None
        if not isinstance(value, (int, float)):
            raise ValueError("must be a number or a numeric string such as \"2e-4\"")
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {value}")
        return value

    @field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_alias(cls, value: Any) -> Any:
        return OPTIMIZER_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_warmup(self) -> "TrainingPlan":
        if self.warmup_steps is not None and "warmup_ratio" in self.model_fields_set:
            raise ValueError("set only one of warmupSteps or warmupRatio")
        return self

    @model_validator(mode="after")
    def _one_length(self) -> "TrainingPlan":
        if (self.epochs > 0) == (self.max_steps > 0):
            raise ValueError("exactly one of epochs or maxSteps must be greater than 0 "
                             f"(got epochs={self.epochs}, maxSteps={self.max_steps})")
        return self


class DistributedPlan(_Model):
    strategy: Literal["none", "ddp", "deepspeed"] = "none"
    zero_stage: int = Field(default=0, ge=0, le=3)
    offload_optimizer: bool = False
    offload_params: bool = False
    num_nodes: int = Field(default=1, ge=1)
    procs_per_node: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _resolved(self) -> "DistributedPlan":
        if self.strategy == "deepspeed" and self.zero_stage == 0:
            raise ValueError("strategy deepspeed needs a resolved zeroStage 1..3 (got 0)")
        if self.strategy != "deepspeed" and (self.offload_optimizer or self.offload_params):
            raise ValueError("offloadOptimizer/offloadParams need strategy deepspeed")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offloadParams needs zeroStage 3")
        if self.strategy == "none" and self.world_size > 1:
            raise ValueError(f"strategy none runs one process, but numNodes x procsPerNode = {self.world_size}")
        return self

    @property
    def world_size(self) -> int:
        """Total number of training processes."""
        return self.num_nodes * self.procs_per_node


class ExportPlan(_Model):
    """GGUF + Ollama Modelfile after training (kubetune_trainer.export); absent = none."""

    gguf: Literal["f16", "q8_0", "q4_k_m"] = "f16"
    modelfile: bool = True
    system: str = ""
    temperature: float = Field(default=0.7, ge=0.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    num_ctx: int = Field(default=0, ge=0)


class OutputPlan(_Model):
    uri: str = Field(min_length=1)
    merge_adapter: bool = False
    export: ExportPlan | None = None


EvalMetric = Literal["exactMatch", "tokenF1", "rougeL", "bleu", "chrf", "evalLoss", "perplexity"]


class EvalGatePlan(_Model):
    metric: EvalMetric
    min_improvement: float = 0.0


class EvaluationPlan(_Model):
    """Base-vs-tuned evaluation after training (kubetune_trainer.evaluation); absent = none."""

    metrics: list[EvalMetric] = Field(default_factory=lambda: ["exactMatch", "tokenF1", "rougeL"], min_length=1)
    num_examples: int = Field(default=50, ge=1)
    dataset_uri: str = ""
    max_new_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    general_probe_uri: str = ""
    gates: list[EvalGatePlan] = Field(default_factory=list)
    max_general_regression: float | None = Field(default=None, ge=0.0)

    @model_validator(mode="after")
    def _gated_metrics_are_scored(self) -> "EvaluationPlan":
        missing = sorted({g.metric for g in self.gates} - set(self.metrics))
        if missing:
            raise ValueError(f"gates on {missing} need those metrics in evaluation.metrics")
        return self


class MlflowPlan(_Model):
    tracking_uri: str = Field(min_length=1)
    experiment: str = Field(min_length=1)
    run_name: str = ""


class WandbPlan(_Model):
    project: str = Field(min_length=1)
    entity: str = ""
    run_name: str = ""
    mode: Literal["online", "offline"] = "online"


class TrackingPlan(_Model):
    """Experiment tracking from rank 0 (kubetune_trainer.tracking); absent = none. Credentials come from the pod
    environment (MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / _PASSWORD; WANDB_API_KEY), never from the
    plan."""

    mlflow: MlflowPlan | None = None
    wandb: WandbPlan | None = None
    required: bool = False


class FaultsPlan(_Model):
    """Test-only fault injection (the operator never writes it; the FineTuneJob CRD has no such field)."""

    out_of_memory_at_step: int = Field(default=0, ge=0)  # raise a CUDA out-of-memory error in this step (1-based)
    kill_while_saving_step: int = Field(default=0, ge=0)  # SIGKILL this process while it writes this step's checkpoint


class Plan(_Model):
    version: int
    job: JobRef = Field(default_factory=JobRef)
    model: ModelRef
    dataset: DatasetPlan
    method: Literal["full", "lora", "qlora"]
    lora: LoraPlan | None = None
    quantization: QuantizationPlan | None = None
    training: TrainingPlan
    distributed: DistributedPlan = Field(default_factory=DistributedPlan)
    output: OutputPlan
    evaluation: EvaluationPlan | None = None
    tracking: TrackingPlan | None = None
    faults: FaultsPlan | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, value: int) -> int:
        if value != PLAN_VERSION:
            raise ValueError(f"unsupported plan version {value}; this trainer reads version {PLAN_VERSION}")
        return value

    @model_validator(mode="after")
    def _within_crd_bounds(self) -> "Plan":
        from kubetune_trainer.bounds import bound_problems

        problems = bound_problems(self.to_json_dict())
        if problems:
            raise PlanError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _method_blocks(self) -> "Plan":
        if self.method == "qlora" and self.quantization is None:
            raise PlanError("quantization: required for method qlora")
        if self.method != "qlora" and self.quantization is not None:
            raise PlanError(f"quantization: only allowed for method qlora (method is {self.method})")
        if self.method in ("lora", "qlora") and self.lora is None:
            self.lora = LoraPlan()
        if self.method == "full" and self.lora is not None:
            raise PlanError("lora: only allowed for methods lora/qlora (method is full)")
        if self.output.merge_adapter and self.method == "full":
            raise PlanError("output.mergeAdapter: only meaningful for methods lora/qlora")
        if self.training.torch_compile and self.distributed.strategy == "deepspeed":
            raise PlanError("training.torchCompile: not supported with distributed.strategy deepspeed (ZeRO's "
                            "parameter hooks and torch.compile are not combined by this trainer); "
                            "use strategy ddp or turn torchCompile off")
        if self.training.master_weights == "none" and self.method != "full":
            raise PlanError(f"training.masterWeights: none applies to method full only (method is {self.method}; "
                            "LoRA adapters are small and stay fp32)")
        if self.method == "qlora" and self.distributed.zero_stage == 3:
            raise PlanError("distributed.zeroStage: ZeRO-3 cannot shard bitsandbytes-quantized weights; "
                            "use zeroStage 2 or ddp for qlora")
        return self


def _loc(loc: tuple) -> str:
    """Turn a pydantic error location into the camelCase field path."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        elif item in ("function-after", "function-before") or str(item).startswith("function-"):
            continue
        else:
            parts.append(str(item))
    return ".".join(parts) or "plan"


def format_validation_error(exc: ValidationError) -> str:
    """One message naming each bad field, e.g. ``training.learningRate: ...``."""
    lines = []
    for err in exc.errors():
        msg = err.get("msg", "invalid")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err.get("type") == "extra_forbidden":
            msg = "unknown key (not in plan version 1)"
        lines.append(f"{_loc(tuple(err.get('loc', ())))}: {msg}")
    return "invalid training plan: " + "; ".join(lines)


def parse_plan(data: Any) -> Plan:
    """Validate a plan dict; raise PlanError naming the field on any problem."""
    if not isinstance(data, dict):
        raise PlanError(f"plan: expected a JSON object, got {type(data).__name__}")
    try:
        return Plan.model_validate(data)
    except PlanError as exc:
        raise PlanError(f"invalid training plan: {exc}") from None
    except ValidationError as exc:
        # A PlanError raised inside a model validator arrives wrapped; unwrap it.
        for err in exc.errors():
            inner = (err.get("ctx") or {}).get("error")
            if isinstance(inner, PlanError):
                raise PlanError(f"invalid training plan: {inner}") from None
        raise PlanError(format_validation_error(exc)) from None


def load_plan(path: str | Path) -> Plan:
    """Read and validate the plan JSON at `path`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PlanError(f"cannot read plan file {p}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan file {p} is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    return parse_plan(data)
