"""The sizer's QLoRA weight term assumes what the trainer really does to the parameters it does not quantize."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from kubetune_trainer.methods import apply_method, load_base_model  # noqa: E402
from kubetune_trainer.plan import parse_plan  # noqa: E402

from ._support import build_model, make_plan  # noqa: E402


def test_qlora_unquantized_parameters_are_fp32_as_the_estimator_counts(tmp_path):
    from kubetune.sizing.estimator import QLORA_UNQUANTIZED_BYTES

    model_dir = build_model(tmp_path / "model")
    raw = make_plan(model_dir, tmp_path / "d.jsonl", tmp_path / "out", "qlora")
    raw["quantization"]["computeDtype"] = "bfloat16"
    plan = parse_plan(raw)
    model = apply_method(load_base_model(str(model_dir), plan, "bf16", torch.device("cpu")), plan)
    unquantized = {n: p for n, p in model.named_parameters()
                   if "lora_" not in n and p.dtype in (torch.float32, torch.bfloat16, torch.float16)}
    assert any("embed_tokens" in n for n in unquantized) and any("lm_head" in n for n in unquantized)
    assert {p.element_size() for p in unquantized.values()} == {QLORA_UNQUANTIZED_BYTES}, \
        {n: p.dtype for n, p in unquantized.items()}
