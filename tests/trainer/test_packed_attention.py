"""Variable-length attention for packed batches (kubetune_trainer.packed_attention).

PyTorch's `varlen_attn` runs on CUDA only. Here the kernel is replaced by a reference that computes what its
documentation specifies (causal attention within each example of the concatenated tokens, grouped k/v, optional
left window), so these tests check everything around it: the cumulative lengths, the reshapes, the window, the
grouping and the fallback, against transformers' own SDPA path on the same weights. tests/gpu runs the kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kubetune_trainer import packed_attention as pa
from kubetune_trainer.speedups import resolve_attention

POSITIONS = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4],
                          [0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2]])


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """What varlen_attn computes, per its documentation, on any device."""
    lengths = (cu_q[1:] - cu_q[:-1]).tolist()
    assert max_q == max_k == max(lengths), "the longest example is passed exactly"
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert enable_gqa == (k.shape[1] != q.shape[1])
    outs = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = b - a
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask = j <= i + (window_size[1] if window_size[1] >= 0 else n)
        if window_size[0] >= 0:
            mask = mask & (j >= i - window_size[0])
        out = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1),
                                             v[a:b].transpose(0, 1), attn_mask=mask, scale=scale,
                                             enable_gqa=enable_gqa)
        outs.append(out.transpose(0, 1))
    return torch.cat(outs)


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The varlen path taken on CPU tensors, with the reference kernel; counts kernel calls."""
    calls = []

    def segments(query, position_ids):
        return pa._SEGMENTS.get(position_ids, query.shape[0])

    def kernel(*args, **kwargs):
        calls.append(kwargs.get("window_size"))
        return reference_varlen(*args, **kwargs)

    monkeypatch.setattr(pa, "varlen_segments", segments)
    monkeypatch.setattr(pa, "_varlen_attn", kernel)
    return calls


def _tiny(model_type: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)


def _loss_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _packed_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 64, POSITIONS.shape)
    # use_cache=False as the trainer runs it: transformers looks for packed rows only without a KV cache
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": POSITIONS.clone(), "use_cache": False}


def test_cu_seqlens_follow_the_position_restarts():
    cu, longest = pa.cu_seqlens(POSITIONS)
    assert cu.tolist() == [0, 4, 7, 12, 19, 21, 24] and cu.dtype == torch.int32
    assert longest == 7


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 3}),
                                              ("qwen2", {})])
def test_packed_batch_through_the_kernel_equals_sdpa_with_the_block_mask(kernel_on_cpu, model_type, extra):
    model = _tiny(model_type, **extra)
    batch = _packed_batch()
    want_logits, want_grads = _loss_and_grads(model, batch)
    model.set_attn_implementation(pa.register())
    got_logits, got_grads = _loss_and_grads(model, batch)
    assert len(kernel_on_cpu) == 2  # both layers ran the kernel, none fell back
    if extra.get("sliding_window"):
        assert kernel_on_cpu[0] == (2, 0)
    else:
        assert kernel_on_cpu[0] == (-1, 0)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_examples_do_not_see_each_other(kernel_on_cpu):
    """Changing one example's tokens changes no other example's logits (the kernel path really separates them)."""
    model = _tiny("llama")
    model.set_attn_implementation(pa.register())
    batch = _packed_batch()
    before = model(**batch).logits.detach()
    batch["input_ids"][0, 4:7] = (batch["input_ids"][0, 4:7] + 1) % 64  # the second example of row 0
    after = model(**batch).logits.detach()
    changed = (before - after).abs().amax(-1) > 1e-6
    assert changed[0, 4:7].all() and not changed[0, :4].any() and not changed[0, 7:].any()
    assert not changed[1].any()


@pytest.mark.parametrize("model_type,extra", [("llama", {}), ("mistral", {"sliding_window": 3})])
def test_cpu_fallback_builds_the_same_mask_as_transformers(model_type, extra):
    """On CPU (no kernel) the packed batch runs SDPA with the mask built here: same results as transformers'."""
    model = _tiny(model_type, **extra)
    batch = _packed_batch()
    want_logits, want_grads = _loss_and_grads(model, batch)
    model.set_attn_implementation(pa.register())
    got_logits, got_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_padded_batches_and_generation_fall_back_to_sdpa(kernel_on_cpu):
    """A padding mask or a KV cache never reaches the kernel, and gives what SDPA gives."""
    model = _tiny("llama")
    ids = torch.randint(1, 64, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    want = model(input_ids=ids, attention_mask=mask).logits.detach()
    gen_want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                              pad_token_id=0)
    model.set_attn_implementation(pa.register())
    got = model(input_ids=ids, attention_mask=mask).logits.detach()
    gen_got = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen_got, gen_want)
    assert kernel_on_cpu == []


def test_segments_are_computed_once_per_forward(kernel_on_cpu, monkeypatch):
    model = _tiny("llama")
    model.set_attn_implementation(pa.register())
    counted = []
    real = pa.cu_seqlens
    monkeypatch.setattr(pa, "cu_seqlens", lambda p: counted.append(1) or real(p))
    model(**_packed_batch())
    assert len(kernel_on_cpu) == 2 and len(counted) == 1


def test_auto_takes_varlen_only_for_packed_batches_where_it_runs():
    kwargs = {"cuda": True, "precision": "bf16", "flash_attn_installed": False}
    assert resolve_attention("auto", packing=True, varlen_problem="", **kwargs) == pa.ATTENTION
    assert resolve_attention("auto", packing=False, varlen_problem="", **kwargs) is None
    assert resolve_attention("auto", packing=True, varlen_problem="no CUDA device", **kwargs) is None
    assert resolve_attention("sdpa", packing=True, varlen_problem="", **kwargs) == "sdpa"


@pytest.mark.parametrize("kwargs,reason", [
    ({"cuda": False, "precision": "bf16"}, "no CUDA device"),
    ({"cuda": True, "precision": "fp32"}, "precision fp32"),
    ({"cuda": True, "precision": "bf16", "capability": (7, 5)}, "compute capability 7.5"),
    ({"cuda": True, "precision": "bf16", "capability": (9, 0)}, ""),
])
def test_varlen_problem(kwargs, reason):
    problem = pa.varlen_problem(**kwargs)
    assert (reason in problem) if reason else problem == ""


def test_soft_capping_models_keep_sdpa():
    from types import SimpleNamespace

    assert "soft-caps" in pa.config_problem(SimpleNamespace(attn_logit_softcapping=50.0))
    assert "dropout" in pa.config_problem(SimpleNamespace(attention_dropout=0.1))
    assert pa.config_problem(SimpleNamespace(attention_dropout=0.0)) == ""


def test_the_trainers_loss_path_with_lora_and_checkpointing_reaches_the_kernel(kernel_on_cpu):
    """Through CausalLMLoss (the decoder body, then the chunked loss), a peft LoRA model with gradient
    checkpointing and the token-wise norms and tiled MLP, as the recipe builds it: position_ids reach every layer's attention, in forward and in the recomputation, and loss and
    adapter gradients equal the SDPA path's."""
    from peft import LoraConfig, get_peft_model

    from kubetune_trainer.loss import CausalLMLoss
    from kubetune_trainer.tokenwise import apply_tokenwise

    model = _tiny("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                                             init_lora_weights=False))
    apply_tokenwise(model, tiled_mlp=True, norms=True, intermediate_size=128, element_bytes=4)
    model.train()
    loss_module = CausalLMLoss(model)
    batch = {k: v for k, v in _packed_batch().items() if k != "use_cache"}

    def run():
        model.zero_grad()
        out = loss_module(**batch)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want_grads = run()
    model.base_model.model.set_attn_implementation(pa.register())
    got_loss, got_grads = run()
    assert len(kernel_on_cpu) == 4  # 2 layers in forward + 2 recomputed in backward
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and any("lora_A" in n for n in got_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
