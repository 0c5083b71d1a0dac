"""Exact parameter counts: the torch-free estimator vs transformers/peft models built on the meta device."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="torch is a test-only dependency of the operator side")
transformers = pytest.importorskip("transformers", reason="transformers is needed to build reference models")
peft = pytest.importorskip("peft", reason="peft is needed to count LoRA parameters")

from kubetune.sizing.catalog import catalog_names, load_catalog  # noqa: E402
from kubetune.sizing.params import lora_trainable_params  # noqa: E402

pytestmark = pytest.mark.unit

LORA_R = 8


def _meta_model(name: str, layers: int | None = None):
    arch = load_catalog()[name]
    cfg = dict(arch.config)
    if layers:
        cfg["num_hidden_layers"] = layers
    model_type = cfg.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **cfg)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def _count(model, trainable_only: bool = False) -> int:
    # named_parameters() de-duplicates tied weights, as the estimator does
    return sum(p.numel() for _, p in model.named_parameters() if p.requires_grad or not trainable_only)


@pytest.mark.parametrize("name", catalog_names())
def test_catalog_param_counts_match_transformers(name):
    arch = load_catalog()[name]
    model = _meta_model(name)
    assert arch.total_params() == _count(model), f"{name}: total parameter count differs from transformers"
    # LoRA counts are per layer times layers in both peft and the estimator: build 2 layers to stay fast
    small = arch.with_overrides(num_hidden_layers=2)
    for targets in (list(arch.lora_default_targets), ["all-linear"]):
        lora = peft.get_peft_model(_meta_model(name, layers=2), peft.LoraConfig(r=LORA_R, lora_alpha=16, target_modules="all-linear" if targets == ["all-linear"] else targets))
        assert lora_trainable_params(small, targets, LORA_R) == _count(lora, trainable_only=True), (
            f"{name}: LoRA trainable parameters differ for target_modules={targets}"
        )
