"""On a CUDA GPU: packed batches through PyTorch's variable-length flash kernel (kubetune_trainer.packed_attention)
give the logits and gradients transformers' SDPA path gives with the block-diagonal mask, in bf16, with grouped
k/v and with a sliding window. tests/trainer/test_packed_attention.py checks the same against a reference kernel
on CPU; this is the kernel itself.

Skipped without a GPU (tests/conftest.py: the reason starts with "needs a CUDA GPU").
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu]

POSITIONS = [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4] * 8, [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2] * 8]


def _model(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=256, hidden_size=256, intermediate_size=512,
                               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                               max_position_embeddings=256, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()


def _run(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 3})])
def test_varlen_kernel_equals_sdpa_with_the_block_mask(model_type, extra):
    from kubetune_trainer import packed_attention as pa

    assert pa.varlen_problem(cuda=True, precision="bf16", capability=pa.cuda_capability()) == ""
    model = _model(model_type, **extra)
    positions = torch.tensor(POSITIONS, device="cuda")
    ids = torch.randint(0, 256, positions.shape, device="cuda")
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": positions, "use_cache": False}
    want_logits, want_grads = _run(model, batch)
    model.set_attn_implementation(pa.register())
    calls = []
    real = pa._varlen_attn
    pa._varlen_attn = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got_logits, got_grads = _run(model, batch)
    finally:
        pa._varlen_attn = real
    assert len(calls) == 2
    # bf16 and two different kernels: compare relative norms (a mask or reshape error gives differences of the
    # order of the values themselves)
    assert _relative(got_logits, want_logits) < 2e-2
    for name, want in want_grads.items():
        rel = _relative(got_grads[name], want)
        assert rel < 5e-2, f"{name}: relative gradient difference {rel:.3g}"


def _relative(got, want) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))
