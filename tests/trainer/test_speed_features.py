"""training.attentionImplementation / torchCompile / ligerKernels through the real recipe on CPU with a tiny model:
the requested attention kernel is the one that runs (eager and sdpa give the same losses), torch.compile trains
with LoRA + gradient checkpointing and keeps parameter names, flash_attention_2 on CPU is refused as
InvalidPlan before training, and ligerKernels on CPU is skipped with a logged reason."""

from __future__ import annotations

import json
import logging
import math
import random

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubetune_trainer import cli  # noqa: E402
from kubetune_trainer.plan import parse_plan  # noqa: E402
from kubetune_trainer.recipe import FineTuneRecipe, RunEnv  # noqa: E402

from ._support import build_model, make_plan, read_summary, use_trainer_env, write_dataset, write_plan  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed-assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl", n=120)


def train(tmp_path, monkeypatch, plan: dict) -> tuple[FineTuneRecipe, dict]:
    """Run setup → train → export in this process; returns the recipe (model still held) and metrics.json."""
    plan_path = write_plan(tmp_path / "plan.json", plan)
    use_trainer_env(monkeypatch, tmp_path, plan_path)
    recipe = FineTuneRecipe(parse_plan(plan), RunEnv.from_env())
    try:
        recipe.setup()
        model = recipe.engine.raw_model
        recipe.train()
        recipe.export()
    finally:
        recipe.cleanup()
    recipe.model_after_training = model
    return recipe, json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())


class AttentionSpy:
    """Counts calls of transformers' eager attention and of torch's scaled_dot_product_attention."""

    def __init__(self, monkeypatch) -> None:
        from transformers.models.llama import modeling_llama

        self.eager = self.sdpa = 0
        eager, sdpa = modeling_llama.eager_attention_forward, torch.nn.functional.scaled_dot_product_attention

        def counting_eager(*args, **kwargs):
            self.eager += 1
            return eager(*args, **kwargs)

        def counting_sdpa(*args, **kwargs):
            self.sdpa += 1
            return sdpa(*args, **kwargs)

        monkeypatch.setattr(modeling_llama, "eager_attention_forward", counting_eager)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting_sdpa)


def test_requested_attention_implementation_is_the_one_that_runs(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    first_losses = {}
    for impl in ("eager", "sdpa"):
        work = tmp_path / impl
        work.mkdir()
        with monkeypatch.context() as mp:
            spy = AttentionSpy(mp)
            plan = make_plan(model_dir, data, work / "out", "lora", maxSteps=6, attentionImplementation=impl)
            recipe, metrics = train(work, mp, plan)
        model = recipe.model_after_training
        assert model.config._attn_implementation == impl
        assert model.get_base_model().model.layers[0].self_attn.config._attn_implementation == impl
        calls = {"eager": spy.eager, "sdpa": spy.sdpa}
        assert calls[impl] > 0, f"{impl} requested but never called: {calls}"
        other = "sdpa" if impl == "eager" else "eager"
        assert calls[other] == 0, f"{impl} requested but {other} ran: {calls}"
        history = [h["loss"] for h in metrics["history"]]
        assert len(history) == 6 and all(math.isfinite(x) for x in history)
        assert metrics["speed"]["attentionRequested"] == impl
        assert metrics["speed"]["attentionImplementation"] == impl
        assert metrics["speed"]["torchCompile"] is False and metrics["speed"]["ligerKernels"] is False
        first_losses[impl] = history[0]
    # Same weights, same batch, fp32: the two kernels compute the same attention.
    assert first_losses["eager"] == pytest.approx(first_losses["sdpa"], rel=1e-4)


def test_auto_attention_keeps_transformers_default(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2)
    plan["training"].pop("attentionImplementation", None)
    recipe, metrics = train(tmp_path, monkeypatch, plan)
    assert metrics["speed"]["attentionRequested"] == "auto"
    assert metrics["speed"]["attentionImplementation"] == recipe.model_after_training.config._attn_implementation
    assert metrics["speed"]["attentionImplementation"] == "sdpa"  # transformers 5's default where torch has it


def write_fixed_length_dataset(path, n: int = 64, seed: int = 0):
    """'Repeat: 3 1 4' -> '3 1 4': every example has the same token count, so every batch has one shape."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(n):
            digits = " ".join(str(rng.randrange(10)) for _ in range(3))
            fh.write(json.dumps({"messages": [{"role": "user", "content": "Repeat: " + digits},
                                              {"role": "assistant", "content": digits}]}) + "\n")
    return path


@pytest.mark.slow
def test_torch_compile_trains_lora_with_gradient_checkpointing(assets, tmp_path, monkeypatch):
    """Inductor on CPU (C++ kernels), cold cache as on a fresh node; one input shape, so the run compiles once
    (50-75 s on 2 shared cores, nearly all compilation; varied lengths would add a dynamic-shape recompile)."""
    model_dir, _ = assets
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    data = write_fixed_length_dataset(tmp_path / "fixed.jsonl")
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=4, microBatchSize=4,
                     gradientCheckpointing=True, torchCompile=True)
    plan["dataset"]["evalSplit"] = 0.0
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    recipe, metrics = train(tmp_path, monkeypatch, plan)
    model = recipe.model_after_training
    # The trainer's chunked loss runs the model body (decoder) and lm_head per loss chunk: the body is compiled.
    assert model.get_decoder()._compiled_call_impl is not None, "the model body was not compiled"
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile captured no graph: the model ran eagerly"
    assert metrics["speed"]["torchCompile"] is True
    history = [h["loss"] for h in metrics["history"]]
    assert len(history) == 4 and all(math.isfinite(x) for x in history)
    assert history[-1] < history[0]
    config = json.loads((tmp_path / "out" / "final" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "final" / "adapter" / "adapter_model.safetensors"))
    assert saved and not any("_orig_mod" in key for key in saved), "compiled-module prefixes leaked into the adapter"


def test_flash_attention_on_cpu_is_refused_before_training(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=2,
                     attentionImplementation="flash_attention_2")
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    code = cli.run_worker()
    summary = read_summary(tmp_path)
    assert code == 3, summary
    assert summary["status"] == "Failed" and summary["reason"] == "InvalidPlan"
    assert "flash_attention_2 needs a CUDA GPU" in summary["message"]
    assert not (tmp_path / "out" / "final").exists()


def test_liger_on_cpu_is_skipped_with_a_logged_reason(assets, tmp_path, monkeypatch, caplog):
    model_dir, data = assets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", maxSteps=3, ligerKernels=True)
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.speedups"):
        _, metrics = train(tmp_path, monkeypatch, plan)
    assert metrics["speed"]["ligerKernels"] is False
    assert "no CUDA device" in metrics["speed"]["ligerSkippedReason"]
    assert any("training.ligerKernels: not applied" in r.getMessage() for r in caplog.records)
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
