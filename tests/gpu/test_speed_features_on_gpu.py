"""On a CUDA GPU, through the real recipe (bf16, LoRA, a tiny llama with random weights):

- training.ligerKernels: Liger's kernels really replace the model's RMSNorm / SwiGLU MLP / forward (fused
  linear cross-entropy), losses are finite and close to the same run without Liger, and metrics.json says so;
- ligerKernels + torchCompile together train with finite losses;
- attentionImplementation flash_attention_2 runs when flash-attn is installed, and is refused as InvalidPlan
  (not a crash) when it is not.

Skipped without a GPU (tests/conftest.py: the reason starts with "needs a CUDA GPU").
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from tests.support.script_loader import load_module_from_file

pytestmark = [pytest.mark.gpu]

REPO = Path(__file__).resolve().parents[2]
STEPS = 8


support = load_module_from_file("kubetune_tests_trainer_support", REPO / "tests" / "trainer" / "_support.py")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-speed")
    return support.build_model(root / "model", hidden=128, layers=2), support.write_dataset(root / "data.jsonl")


def train(tmp_path, monkeypatch, **training):
    """setup → train → export in this process on the GPU; returns (recipe, model, metrics.json)."""
    from kubetune_trainer.plan import parse_plan
    from kubetune_trainer.recipe import FineTuneRecipe, RunEnv

    model_dir, data = training.pop("assets")
    plan = support.make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=STEPS, precision="bf16",
                             learningRate=2e-3, **training)
    plan_path = support.write_plan(tmp_path / "plan.json", plan)
    support.use_trainer_env(monkeypatch, tmp_path, plan_path)
    recipe = FineTuneRecipe(parse_plan(plan), RunEnv.from_env())
    try:
        recipe.setup()
        model = recipe.engine.raw_model
        recipe.train()
        recipe.export()
    finally:
        recipe.cleanup()
    metrics = json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())
    losses = support.losses(metrics)
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert metrics["peakGpuMemoryBytes"] > 0, "the run did not use the GPU"
    return recipe, model, metrics


def test_liger_kernels_replace_the_modules_and_train_like_the_plain_model(assets, tmp_path, monkeypatch):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    (tmp_path / "plain").mkdir()
    (tmp_path / "liger").mkdir()
    _, _, plain = train(tmp_path / "plain", monkeypatch, assets=assets)
    _, model, liger = train(tmp_path / "liger", monkeypatch, assets=assets, ligerKernels=True)
    assert liger["speed"]["ligerKernels"] is True and liger["speed"]["ligerSkippedReason"] == ""
    assert liger["speed"]["ligerOptions"]["fused_linear_cross_entropy"] is True
    base = model.get_base_model()
    layer = base.model.layers[0]
    # Liger patches the instances' forward methods (module classes stay); its RMSNorm forward is the one bound.
    assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert base.forward.__func__.__module__.startswith("liger_kernel"), "fused linear cross-entropy not applied"
    first_plain, first_liger = support.losses(plain)[0], support.losses(liger)[0]
    assert first_liger == pytest.approx(first_plain, rel=0.02), (first_plain, first_liger)


def test_liger_with_torch_compile_trains(assets, tmp_path, monkeypatch):
    _, model, metrics = train(tmp_path, monkeypatch, assets=assets, ligerKernels=True, torchCompile=True,
                              gradientCheckpointing=True)
    assert metrics["speed"]["ligerKernels"] is True and metrics["speed"]["torchCompile"] is True
    assert model._compiled_call_impl is not None


def test_flash_attention_2_runs_or_is_refused_as_invalid_plan(assets, tmp_path, monkeypatch):
    from kubetune_trainer import cli

    if importlib.util.find_spec("flash_attn") is None:
        model_dir, data = assets
        plan = support.make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2, precision="bf16",
                                 attentionImplementation="flash_attention_2")
        support.use_trainer_env(monkeypatch, tmp_path, support.write_plan(tmp_path / "plan.json", plan))
        assert cli.run_worker() == 3
        summary = support.read_summary(tmp_path)
        assert summary["reason"] == "InvalidPlan" and "flash-attn package" in summary["message"]
        return
    _, model, metrics = train(tmp_path, monkeypatch, assets=assets, attentionImplementation="flash_attention_2")
    assert model.config._attn_implementation == "flash_attention_2"
    assert metrics["speed"]["attentionImplementation"] == "flash_attention_2"
