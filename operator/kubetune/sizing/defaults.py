"""FineTuneJob spec defaults (docs/contracts.md §1, the same values as the CRD) and spec -> TrainingSetup."""

from __future__ import annotations

import copy
from typing import Any, Mapping

from .estimator import TrainingSetup

SPEC_DEFAULTS: dict[str, Any] = {
    "model": {"architecture": {}, "trustRemoteCode": False},
    "dataset": {"format": "auto", "evalUri": "", "evalSplit": 0.05},
    "method": "lora",
    "training": {
        "epochs": 1, "maxSteps": 0, "learningRate": "2e-4", "microBatchSize": 1,
        "gradientAccumulationSteps": 8, "maxSeqLength": 2048, "packing": False, "warmupRatio": 0.03,
        "scheduler": "cosine", "optimizer": "adamw", "weightDecay": 0.0, "maxGradNorm": 1.0,
        "gradientCheckpointing": True, "precision": "auto", "seed": 42, "completionOnly": True,
        "checkpointEverySteps": 200, "evalEverySteps": 0,
        "earlyStopping": {"patience": 0, "threshold": 0.0},
    },
    "resources": {"gpuType": "", "gpusPerPod": 0, "pods": 0, "maxGpus": 0, "cpu": "", "memory": ""},
    "distributed": {"strategy": "auto", "zeroStage": 0, "offloadOptimizer": False, "offloadParams": False},
    "output": {"mergeAdapter": False},
    "image": "",
    "secrets": {"hfTokenSecretRef": {"name": "", "key": "token"}, "s3CredentialsSecretRef": {"name": ""}},
    "suspend": False,
    "cancel": False,
    "backoffLimit": 3,
    "activeDeadlineSeconds": 0,
    "ttlSecondsAfterFinished": 0,
}
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
QUANTIZATION_DEFAULTS: dict[str, Any] = {"bits": 4, "quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _merge(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_spec_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a FineTuneJob .spec with every default of docs/contracts.md §1 filled in.

    The lora block is defaulted for lora/qlora, the quantization block for qlora only (it is
    forbidden otherwise). A given `training.maxSteps > 0` without `epochs` clears the epochs default.
    """
    spec = dict(spec or {})
    out = _merge(SPEC_DEFAULTS, spec)
    if "maxSteps" in (spec.get("training") or {}) and "epochs" not in (spec.get("training") or {}):
        if int(out["training"]["maxSteps"] or 0) > 0:
            out["training"]["epochs"] = 0
    if out["method"] in ("lora", "qlora"):
        out["lora"] = _merge(LORA_DEFAULTS, spec.get("lora") or {})
    if out["method"] == "qlora":
        out["quantization"] = _merge(QUANTIZATION_DEFAULTS, spec.get("quantization") or {})
    return out


def resolve_precision(spec: Mapping[str, Any], bf16_capable: bool = True) -> str:
    """Compute dtype for the estimate: qlora uses quantization.computeDtype; `auto` is bf16 where the
    GPU supports it (Ampere and newer), fp16 otherwise; both cost 2 bytes per element."""
    if spec.get("method") == "qlora":
        return _DTYPES.get(str((spec.get("quantization") or {}).get("computeDtype", "bfloat16")), "bf16")
    precision = str((spec.get("training") or {}).get("precision", "auto"))
    if precision == "auto":
        return "bf16" if bf16_capable else "fp16"
    return precision


def setup_from_spec(spec: Mapping[str, Any], bf16_capable: bool = True, precision: str | None = None) -> TrainingSetup:
    """The TrainingSetup the estimator needs, read from a defaulted FineTuneJob spec."""
    training = spec.get("training") or {}
    lora = spec.get("lora") or LORA_DEFAULTS
    quant = spec.get("quantization") or {}
    method = str(spec.get("method", "lora"))
    return TrainingSetup(
        method=method,
        lora_r=int(lora.get("r", 16)),
        lora_dropout=float(lora.get("dropout", 0.05)),
        target_modules=tuple(lora.get("targetModules") or ("all-linear",)),
        quant_bits=int(quant.get("bits", 4)) if method == "qlora" else 4,
        quant_double=bool(quant.get("doubleQuant", True)),
        precision=precision or resolve_precision(spec, bf16_capable),
        optimizer=str(training.get("optimizer", "adamw")),
        micro_batch_size=int(training.get("microBatchSize", 1)),
        seq_length=int(training.get("maxSeqLength", 2048)),
        packing=bool(training.get("packing", False)),
        gradient_checkpointing=bool(training.get("gradientCheckpointing", True)),
    )
