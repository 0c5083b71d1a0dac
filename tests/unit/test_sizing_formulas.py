"""Estimator formulas against hand-computed values for a tiny architecture, plus monotonicity properties."""

from __future__ import annotations

import pytest

from kubetune.sizing.architecture import Architecture, architecture_from_config
from kubetune.sizing.catalog import load_catalog
from kubetune.sizing.estimator import (
    CUDA_CONTEXT_BYTES, NCCL_BYTES, Parallelism, TrainingSetup, activation_bytes, estimate_memory,
    layer_activation_bytes_per_token, logits_bytes, nf4_bytes_per_param,
)
from kubetune.sizing.params import lora_trainable_params

pytestmark = pytest.mark.unit

# H=8, I=16, 2 layers, 2 heads of dim 4, 1 kv head, vocab 32, untied lm_head, llama layout
TINY = architecture_from_config({
    "model_type": "llama", "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 32, "tie_word_embeddings": False,
}, name="tiny")


def test_tiny_parameter_counts_by_hand():
    embed = 32 * 8
    attn = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8  # q, k, v (1 kv head x 4), o
    mlp = 3 * 8 * 16
    norms = 2 * 8
    layer = attn + mlp + norms
    assert TINY.layer_params() == layer == 592
    assert TINY.total_params() == embed + 2 * layer + 8 + 32 * 8 == 1704
    # LoRA r=2: r x (in + out) per adapted linear, per layer
    per_layer_all = 2 * ((8 + 8) + (8 + 4) + (8 + 4) + (8 + 8) + (8 + 16) + (8 + 16) + (16 + 8))
    assert lora_trainable_params(TINY, ["all-linear"], 2) == 2 * per_layer_all == 512
    assert lora_trainable_params(TINY, ["q_proj", "v_proj"], 2) == 2 * 2 * ((8 + 8) + (8 + 4)) == 112


def test_tiny_full_finetune_terms_by_hand():
    setup = TrainingSetup(method="full", precision="bf16", optimizer="adamw", micro_batch_size=1, seq_length=4,
                          gradient_checkpointing=False, attention="sdpa")
    e = estimate_memory(TINY, setup, Parallelism())
    p = 1704
    assert e.weights == 2 * p  # bf16 weights
    assert e.master_weights == 4 * p  # fp32 master copy
    assert e.gradients == 2 * p  # bf16 grads
    assert e.optimizer_states == 8 * p  # Adam m, v in fp32
    # per layer and token: norms 2 x (4H + aH), q/k/v after RoPE a(q + 2 x repeated kv),
    # SDPA out aq + lse 4 x heads, inputs of qkv and o_proj a(H + q), MLP 3aI + inputs a(H + I)
    per_token_layer = 2 * (32 + 16) + 2 * (8 + 16) + (16 + 8) + (16 + 16) + (96 + 16 + 32)
    assert layer_activation_bytes_per_token(TINY, setup) == per_token_layer == 344
    tokens = 4
    expected_acts = (2 * per_token_layer * tokens  # layers
                     + (32 + 16) * tokens  # final norm
                     + 2 * 8 * tokens  # lm_head input
                     + 2 * 2 * 8 * tokens  # gradient flow buffers
                     + 4 * 4)  # bool padding mask b x s x s
    assert activation_bytes(TINY, setup) == e.activations == expected_acts == 3152
    assert logits_bytes(TINY, setup) == e.logits == 12 * 32 * tokens
    assert e.comm_buffers == 0
    assert e.cuda_context == CUDA_CONTEXT_BYTES
    persistent = e.weights + e.master_weights + e.gradients + e.optimizer_states
    assert e.fragmentation == int(0.15 * (e.activations + e.logits) + 0.02 * persistent)
    assert e.total == persistent + e.activations + e.logits + e.fragmentation + CUDA_CONTEXT_BYTES


def test_tiny_lora_activation_terms_by_hand():
    setup = TrainingSetup(method="lora", lora_r=2, lora_dropout=0.05, target_modules=("all-linear",),
                          micro_batch_size=1, seq_length=4, gradient_checkpointing=False)
    # frozen norms keep only the fp32 input (4H); LoRA per module: fp32 input copy + dropout mask (5 x in) + 4r
    lora = sum(5 * fin + 4 * 2 for fin in (8, 8, 8, 8, 8, 8, 16))
    per = 2 * 32 + 2 * (8 + 16) + (16 + 8) + 3 * 2 * 16 + lora
    assert layer_activation_bytes_per_token(TINY, setup) == per == 608
    e = estimate_memory(TINY, setup)
    n = 512
    assert e.trainable_params == n
    assert e.weights == 2 * 1704 + 4 * n  # frozen bf16 base + fp32 adapters
    assert (e.master_weights, e.gradients, e.optimizer_states) == (0, 4 * n, 8 * n)


def test_checkpointing_formula_by_hand():
    setup = TrainingSetup(method="full", seq_length=4, gradient_checkpointing=True)
    acts = activation_bytes(TINY, setup)
    # layer inputs (L x aH x T) + one recomputed layer + final norm + lm_head input + grad flow + mask
    assert acts == 2 * 2 * 8 * 4 + 344 * 4 + 48 * 4 + 64 + 128 + 16


def test_qlora_weight_storage():
    assert nf4_bytes_per_param(False) == 0.5 + 4 / 64
    assert nf4_bytes_per_param(True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))
    arch = load_catalog()["llama-3.1-8b"]
    q = TrainingSetup(method="qlora", target_modules=("q_proj",), lora_r=1)
    e = estimate_memory(arch, q)
    quantized = arch.quantizable_params()
    other = arch.total_params() - quantized  # embeddings, lm_head, norms: kept in the bf16 compute dtype
    assert other == 2 * 128256 * 4096 + 65 * 4096
    assert e.weights == int(quantized * nf4_bytes_per_param(True)) + 2 * other + 4 * e.trainable_params


@pytest.mark.parametrize("optimizer,per_param", [("adamw", 8), ("paged_adamw_32bit", 8), ("adamw_8bit", 2), ("sgd", 0)])
def test_optimizer_state_bytes(optimizer, per_param):
    e = estimate_memory(TINY, TrainingSetup(method="full", optimizer=optimizer))
    assert e.optimizer_states == pytest.approx(per_param * 1704, abs=8)


def test_zero_partitioning_by_hand():
    arch = load_catalog()["llama-3.1-8b"]
    setup = TrainingSetup(method="full")
    p = arch.total_params()
    one = estimate_memory(arch, setup, Parallelism())
    z1 = estimate_memory(arch, setup, Parallelism("deepspeed", 1, world_size=8))
    z2 = estimate_memory(arch, setup, Parallelism("deepspeed", 2, world_size=8))
    z3 = estimate_memory(arch, setup, Parallelism("deepspeed", 3, world_size=8))
    assert one.optimizer_states == 8 * p and one.master_weights == 4 * p
    assert z1.optimizer_states == -(-8 * p // 8) and z1.gradients == 2 * p and z1.weights == 2 * p
    assert z2.gradients == -(-2 * p // 8) and z2.weights == 2 * p
    working_set = (arch.embedding_params() + arch.layer_params()) * 2
    assert z3.weights == -(-2 * p // 8) + working_set
    assert z3.comm_buffers == NCCL_BYTES + 4 * 4096**2 * 2
    ddp = estimate_memory(arch, setup, Parallelism("ddp", world_size=2))
    assert ddp.comm_buffers == NCCL_BYTES + 2 * p  # DDP gradient buckets
    off = estimate_memory(arch, setup, Parallelism("deepspeed", 3, True, True, world_size=8))
    assert off.optimizer_states == off.master_weights == off.gradients == 0
    assert off.weights == working_set and off.host_offload > 0


# ---- monotonicity -----------------------------------------------------------------------------

MODELS = ["qwen2.5-0.5b", "llama-3.1-8b", "mixtral-8x7b-v0.1", "phi-3-mini-4k", "gemma-2-9b"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_more_tokens_more_activations(name, method):
    arch = load_catalog()[name]
    prev = None
    for seq in (256, 1024, 4096):
        e = estimate_memory(arch, TrainingSetup(method=method, seq_length=seq))
        if prev:
            assert e.activations > prev.activations and e.logits > prev.logits and e.total > prev.total
        prev = e
    b1 = estimate_memory(arch, TrainingSetup(method=method, micro_batch_size=1))
    b4 = estimate_memory(arch, TrainingSetup(method=method, micro_batch_size=4))
    assert b4.activations > b1.activations


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointing_saves_activation_memory(name, method):
    arch = load_catalog()[name]
    on = estimate_memory(arch, TrainingSetup(method=method, gradient_checkpointing=True))
    off = estimate_memory(arch, TrainingSetup(method=method, gradient_checkpointing=False))
    assert on.activations < off.activations
    assert on.weights == off.weights and on.logits == off.logits


@pytest.mark.parametrize("name", MODELS)
def test_zero3_more_gpus_fewer_bytes(name):
    arch = load_catalog()[name]
    totals = [estimate_memory(arch, TrainingSetup(method="full"), Parallelism("deepspeed", 3, world_size=n)).total
              for n in (2, 4, 8, 16, 64)]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    stages = [estimate_memory(arch, TrainingSetup(method="full"), Parallelism("deepspeed", z, world_size=8)).total
              for z in (1, 2, 3)]
    assert stages == sorted(stages, reverse=True)


def test_eager_attention_has_quadratic_term_sdpa_does_not():
    arch = load_catalog()["llama-3.2-1b"]

    def per_token(attn, seq):
        return layer_activation_bytes_per_token(arch, TrainingSetup(method="full", attention=attn, seq_length=seq))

    assert per_token("sdpa", 1024) == per_token("sdpa", 8192)
    assert per_token("eager", 8192) - per_token("eager", 1024) == (4 + 2) * 32 * (8192 - 1024)
    assert per_token("flash", 1024) < per_token("sdpa", 1024)  # no repeat of k/v heads


def test_method_ordering_and_vocab_effect():
    arch = load_catalog()["llama-3.1-8b"]
    full, lora, qlora = (estimate_memory(arch, TrainingSetup(method=m)).total for m in ("full", "lora", "qlora"))
    assert full > lora > qlora
    # logits dominate small models with a big vocabulary: 12 B x 151936 x 2048 tokens
    small = estimate_memory(load_catalog()["qwen2.5-0.5b"], TrainingSetup(method="lora"))
    assert small.logits == 12 * 151936 * 2048 and small.logits > small.weights


def test_gemma2_softcapping_and_four_norms():
    g = load_catalog()["gemma-2-2b"]
    assert isinstance(g, Architecture) and g.norms_per_layer == 4 and g.tie_word_embeddings
    s = TrainingSetup(method="lora")
    assert logits_bytes(g, s) == (12 + 2 * 2) * 256000 * 2048
