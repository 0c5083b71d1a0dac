"""The real recipe on CPU with a tiny model: loss goes down (full, LoRA, QLoRA), merged == base + adapter,
NaN loss and invalid plans fail with the contract's reasons, early stopping, summary shape."""

from __future__ import annotations

import json
import statistics

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubetune_trainer import cli  # noqa: E402

from ._support import (build_model, losses, make_plan, read_summary, use_trainer_env, write_dataset,  # noqa: E402
                       write_plan)

SUMMARY_KEYS = {"version", "status", "reason", "message", "step", "totalSteps", "epoch", "trainLoss", "evalLoss",
                "perplexity", "tokens", "runtimeSeconds", "tokensPerSecond", "steadyTokensPerSecond", "artifacts",
                "checkpoint"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return build_model(root / "model"), write_dataset(root / "data.jsonl")


def run_in_process(tmp_path, monkeypatch, plan: dict) -> tuple[int, dict]:
    """Run `kubetune-train run` in this process; returns (exit code, summary)."""
    plan_path = write_plan(tmp_path / "plan.json", plan)
    use_trainer_env(monkeypatch, tmp_path, plan_path)
    code = cli.run_worker()
    return code, read_summary(tmp_path)


def assert_loss_dropped(metrics: dict, factor: float = 0.6) -> None:
    hist = losses(metrics)
    initial, final = hist[0], statistics.mean(hist[-5:])
    assert final < factor * initial, f"loss did not drop enough: initial {initial:.3f}, final {final:.3f}"


def assert_summary_shape(summary: dict) -> None:
    assert set(summary) == SUMMARY_KEYS
    assert set(summary["artifacts"]) == {"adapter", "merged", "model", "metrics"}
    assert set(summary["checkpoint"]) == {"step", "uri"}
    assert summary["version"] == 1


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def test_lora_learns_and_merged_weights_match_base_plus_adapter(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=60)
    plan["output"]["mergeAdapter"] = True
    code, summary = run_in_process(tmp_path, monkeypatch, plan)
    assert code == 0, summary
    assert summary["status"] == "Succeeded" and summary["reason"] == "Completed"
    assert_summary_shape(summary)
    raw = (tmp_path / "termination-log").read_bytes()
    assert len(raw) < 4096
    assert summary["step"] == summary["totalSteps"] == 60
    assert summary["artifacts"]["adapter"] == f"{out}/final/adapter"
    assert summary["evalLoss"] is not None and summary["perplexity"] > 1
    # The steps' own rate leaves out the warm-up step and the evaluations the loop's rate includes.
    assert summary["steadyTokensPerSecond"] > summary["tokensPerSecond"] > 0, summary
    adapter = out / "final" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert (adapter / "tokenizer.json").is_file() or (adapter / "tokenizer_config.json").is_file()
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["data"]["trainExamples"] > 0 and metrics["data"]["format"] == "messages"
    assert_loss_dropped(metrics)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(6, 500, (2, 24), generator=torch.Generator().manual_seed(1))
    # Evaluated in float64 so the comparison measures the merge (weights saved in fp32), not kernel order.
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64)
    base_logits = logits_of(base, ids)
    with_adapter = PeftModel.from_pretrained(base, str(adapter)).to(torch.float64).eval()
    adapted = logits_of(with_adapter, ids)
    merged = AutoModelForCausalLM.from_pretrained(str(out / "final" / "merged"), dtype=torch.float64).eval()
    assert not (adapted - base_logits).abs().max() < 1e-3, "the adapter changed nothing"
    torch.testing.assert_close(logits_of(merged, ids), adapted, atol=1e-5, rtol=1e-5)


def test_full_finetune_learns_and_writes_model(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    out = tmp_path / "out"
    code, summary = run_in_process(tmp_path, monkeypatch,
                                   make_plan(model_dir, data, out, "full", maxSteps=60, learningRate=2e-3))
    assert code == 0, summary
    assert summary["artifacts"]["model"].endswith("final/model") and summary["artifacts"]["adapter"] == ""
    assert (out / "final" / "model" / "config.json").is_file()
    assert list((out / "final" / "model").glob("*.safetensors"))
    assert_loss_dropped(json.loads((out / "final" / "metrics.json").read_text()))


def test_qlora_nf4_learns_on_cpu_and_merges_into_dequantized_base(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "qlora", maxSteps=60, gradientCheckpointing=True)
    plan["output"]["mergeAdapter"] = True
    code, summary = run_in_process(tmp_path, monkeypatch, plan)
    assert code == 0, summary
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["method"] == "qlora"
    assert_loss_dropped(metrics)
    merged_cfg = json.loads((out / "final" / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(out / "final" / "merged"), dtype=torch.float32)
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())


def test_nan_loss_fails_with_nonfinite_reason(assets, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir, data = assets
    # A learning rate that overflows the weights is refused by the plan's bounds (the CRD's (0, 1]); a checkpoint
    # with a NaN weight makes the loss NaN the same way.
    broken = tmp_path / "broken-model"
    shutil.copytree(model_dir, broken)
    weights = load_file(str(broken / "model.safetensors"))
    weights["lm_head.weight"][0, 0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    plan = make_plan(broken, data, tmp_path / "out", "lora", maxSteps=10, maxGradNorm=0.0, optimizer="sgd")
    code, summary = run_in_process(tmp_path, monkeypatch, plan)
    assert code == 4, "NonFiniteLoss is permanent: the pod failure policy fails the Job on exit code 4"
    assert summary["status"] == "Failed" and summary["reason"] == "NonFiniteLoss"
    assert "step" in summary["message"] and "learningRate" in summary["message"]
    assert_summary_shape(summary)
    assert not (tmp_path / "out" / "final" / "adapter").exists()


def test_invalid_plan_fails_with_invalid_plan_naming_the_field(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    plan = make_plan(model_dir, data, tmp_path / "out", "lora", learningRate="fast")
    code, summary = run_in_process(tmp_path, monkeypatch, plan)
    assert code == cli.PERMANENT_FAILURE_EXIT
    assert summary["reason"] == "InvalidPlan" and "training.learningRate" in summary["message"]


def test_early_stopping_stops_when_eval_loss_does_not_improve(assets, tmp_path, monkeypatch):
    model_dir, data = assets
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=60, evalEverySteps=5,
                     earlyStopping={"patience": 1, "threshold": 100.0})
    code, summary = run_in_process(tmp_path, monkeypatch, plan)
    assert code == 0, summary
    assert summary["step"] == 10 and summary["totalSteps"] == 60
    assert "early stopping" in summary["message"]
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["earlyStopped"] is True and [e["step"] for e in metrics["evalHistory"]] == [5, 10]
