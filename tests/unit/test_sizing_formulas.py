"""Estimator formulas against hand-computed values for a tiny architecture, plus monotonicity properties."""

from __future__ import annotations

import dataclasses

import pytest

from kubetune.sizing.architecture import Architecture, architecture_from_config
from kubetune.sizing.catalog import load_catalog
from kubetune.sizing.estimator import (
    BNB_8BIT_BYTES, CUDA_CONTEXT_BYTES, NCCL_BYTES, Parallelism, TrainingSetup, activation_bytes, fused_loss_head,
    attention_mask_kind, chunk_tokens, estimate_memory, layer_activation_bytes_per_token, logits_bytes,
    nf4_bytes_per_param, optimizer_in_backward, step_moments, step_temporary_bytes,
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
    assert e.weights == 2 * p  # bf16 weights, no fp32 master copy (masterWeights auto with bf16)
    assert e.master_weights == 0
    assert e.optimizer_states == 6 * p  # Kahan AdamW: m, v and the compensation in bf16
    # per layer and token: norms 2 x aH (recomputed token-wise: their input), q/k/v after RoPE a(q + 2kv) (no
    # mask: flash keeps k/v narrow), attention out aq + lse 4 x heads, inputs of qkv and o_proj a(H + q), MLP
    # 3aI + inputs a(H + I)
    per_token_layer = 2 * 16 + 2 * (8 + 8) + (16 + 8) + (16 + 16) + (96 + 16 + 32)
    assert layer_activation_bytes_per_token(TINY, setup) == per_token_layer == 264
    tokens = 4
    moments = step_moments(TINY, setup, p, 2 * p)
    # the loss backward: every layer's saved tensors, the final norm's input, the gradient flowing into the
    # layers; the loss keeps the hidden states twice and one chunk's 12 x V fp32 buffers
    loss = moments["loss backward"]
    assert loss.activations == 2 * per_token_layer * tokens + 2 * 8 * tokens + 2 * 8 * tokens == 2240
    assert loss.logits == 2 * 2 * 8 * tokens + 12 * 32 * tokens == 1664
    # lm_head is a plain Linear: the fused loss allocates its one gradient buffer (V x H = 256) as its backward
    # starts (kubetune_trainer.loss.LinearCrossEntropy), beside the chunk's buffers
    assert fused_loss_head(TINY, setup)
    assert loss.gradients == 2 * 256
    # the optimizer step (every bf16 gradient plus optimi's temporary of the largest tensor, the embedding's 256)
    # is 496 bytes below it on this tiny model, so the loss backward is the peak
    assert moments["optimizer step"].total == 2 * p + 2 * 256 == loss.total - 496
    assert activation_bytes(TINY, setup) == e.activations == 2240
    assert logits_bytes(TINY, setup) == e.logits == 1664
    assert e.gradients == 2 * 256
    assert e.comm_buffers == 0
    assert e.cuda_context == CUDA_CONTEXT_BYTES
    persistent = e.weights + e.master_weights + e.optimizer_states
    transient = e.gradients + e.activations + e.logits
    assert e.fragmentation == int(0.15 * transient + 0.02 * persistent)
    assert e.total == persistent + transient + e.fragmentation + CUDA_CONTEXT_BYTES
    # first layer's backward: every gradient but its own (592) and the embedding's (256), its saved set,
    # the gradients of its intermediates 3a(H + I) per token and the incoming gradient
    assert moments["end of backward"].total == 2 * (p - 592 - 256) + 264 * 4 + 6 * 24 * 4 + 16 * 4
    assert max(m.total for m in moments.values()) == transient


def test_full_weight_dtype_follows_master_weights_and_strategy():
    p = 1704
    fp32 = estimate_memory(TINY, TrainingSetup(method="full", master_weights="fp32"))
    assert (fp32.weights, fp32.master_weights, fp32.optimizer_states) == (4 * p, 0, 8 * p)  # fp32 + torch AdamW
    fp16 = estimate_memory(TINY, TrainingSetup(method="full", precision="fp16"))
    assert fp16.weights == 4 * p  # fp16 loss scaling needs fp32 weights
    ds = estimate_memory(TINY, TrainingSetup(method="full"), Parallelism("deepspeed", 1, world_size=1))
    assert (ds.weights, ds.master_weights, ds.optimizer_states) == (2 * p, 4 * p, 8 * p)  # DeepSpeed's own master
    # fp32 weights: torch's foreach AdamW holds a 4 B/param temporary at the step
    n = 1704
    assert step_temporary_bytes(TINY, TrainingSetup(method="full", master_weights="fp32"), n) == 4 * n
    assert step_temporary_bytes(TINY, TrainingSetup(method="full", optimizer="adamw_8bit"), n) == 20 * 256
    big = load_catalog()["llama-3.1-8b"]  # the update slices keep the temporary at 20 B x 16M elements
    assert step_temporary_bytes(big, TrainingSetup(method="full", optimizer="adamw_8bit"), 1) == 20 * 2**24


def test_optimizer_in_backward_frees_gradients_only_where_the_trainer_applies_it():
    arch = load_catalog()["llama-3.1-8b"]
    base = dict(method="full", gradient_accumulation_steps=1, max_grad_norm=0.0)
    on = estimate_memory(arch, TrainingSetup(**base))
    assert optimizer_in_backward(TrainingSetup(**base))
    # at most lm_head's gradient being summed over loss chunks (3 x its bf16 size), never all of them
    largest = arch.largest_param_tensor()
    assert on.gradients <= 3 * 2 * largest < 2 * arch.total_params() // 5
    step = step_moments(arch, TrainingSetup(**base), arch.total_params(), 2 * arch.total_params())
    assert "optimizer step" not in step and step["parameter step in backward"].gradients == 2 * largest
    for other in (dict(gradient_accumulation_steps=2), dict(max_grad_norm=1.0), dict(precision="fp16"),
                  dict(optimizer_in_backward=False)):
        assert not optimizer_in_backward(TrainingSetup(**{**base, **other}))
    assert not optimizer_in_backward(TrainingSetup(**base), "ddp")
    off = estimate_memory(arch, TrainingSetup(**{**base, "optimizer_in_backward": False}))
    assert off.gradients == 2 * arch.total_params() and off.total > on.total


def test_tiny_lora_activation_terms_by_hand():
    setup = TrainingSetup(method="lora", lora_r=2, lora_dropout=0.05, target_modules=("all-linear",),
                          micro_batch_size=1, seq_length=4, gradient_checkpointing=False)
    # recomputed norms keep their bf16 input (aH); LoRA with dropout, per module: its dropped-out input and
    # the mask (3 x in) and the bf16 rank-r intermediate (2r)
    lora = sum(3 * fin + 2 * 2 for fin in (8, 8, 8, 8, 8, 8, 16))
    per = 2 * 16 + 2 * (8 + 8) + (16 + 8) + 3 * 2 * 16 + lora
    assert layer_activation_bytes_per_token(TINY, setup) == per == 404
    e = estimate_memory(TINY, setup)
    n = 512
    assert e.trainable_params == n
    # frozen bf16 base + fp32 adapters, less the frozen input-embedding table (32 x 8, bf16) kept in host memory
    assert e.weights == 2 * 1704 + 4 * n - 2 * 32 * 8
    assert e.host_offload == 2 * 32 * 8
    assert (e.master_weights, e.optimizer_states) == (0, 8 * n)
    zero = estimate_memory(TINY, setup, Parallelism(strategy="deepspeed", zero_stage=1, world_size=1))
    assert zero.weights == 2 * 1704 + 4 * n and zero.host_offload == 0  # DeepSpeed places every parameter itself
    kept = estimate_memory(TINY, dataclasses.replace(setup, embeddings_on_host=False))  # the plan turned it off
    assert kept.weights == 2 * 1704 + 4 * n and kept.host_offload == 0
    assert estimate_memory(TINY, TrainingSetup(method="lora", lora_r=2, optimizer="sgd")).optimizer_states == 4 * n


def test_lora_adapters_share_inputs_and_tiled_mlps_keep_their_input_only():
    plain = dict(method="lora", lora_r=2, lora_dropout=0.0, target_modules=("all-linear",), micro_batch_size=1,
                 seq_length=4)
    # without checkpointing (MLP untiled): rank intermediates 7 x 2r; inputs once per distinct tensor: q/k/v's
    # (aH), gate/up's (aH), down's (aI); o_proj reads the attention output the kernel keeps
    lora = 7 * 2 * 2 + 16 + 16 + 32
    untiled = TrainingSetup(**plain, gradient_checkpointing=False)
    assert layer_activation_bytes_per_token(TINY, untiled) == 2 * 16 + 2 * (8 + 8) + (16 + 8) + 3 * 2 * 16 + lora
    # checkpointed: the MLP runs in tiles and keeps its input (aH); its adapters save nothing at layer level
    tiled = TrainingSetup(**plain, gradient_checkpointing=True)
    # (rank intermediates of the 4 attention adapters, their shared input)
    assert layer_activation_bytes_per_token(TINY, tiled) == 2 * 16 + 2 * (8 + 8) + (16 + 8) + 16 + (4 * 2 * 2 + 16)
    # DeepSpeed runs the plain layers (fp32 norm inputs 4H, untiled MLP, adapters' inputs as above)
    assert layer_activation_bytes_per_token(TINY, tiled, "deepspeed") == 2 * 32 + 2 * (8 + 8) + (16 + 8) \
        + 3 * 2 * 16 + lora
    m = step_moments(TINY, tiled, 512, 4 * 512)
    # recompute moment: inputs, the layer (minus its shared input), the MLP input's gradient, one tile (here the
    # whole 4 tokens) of intermediates and their gradients 6aI, the tile's output gradient, the flow
    per = 2 * 16 + 2 * (8 + 8) + (16 + 8) + 16 + (4 * 2 * 2 + 16)
    assert m["layer recompute"].activations == 2 * 2 * 8 * 4 + (per - 16) * 4 + 16 * 4 + 6 * 2 * 16 * 4 + 16 * 4 \
        + 16 * 4


def test_masked_attention_repeats_kv_and_saves_the_mask():
    flash = TrainingSetup(method="full", seq_length=4)  # one unpadded row: no mask
    packed = TrainingSetup(method="full", seq_length=4, packing=True)
    padded = TrainingSetup(method="full", seq_length=4, micro_batch_size=2)
    assert attention_mask_kind(flash) == "flash" and attention_mask_kind(packed) == attention_mask_kind(padded) \
        == "masked"
    assert attention_mask_kind(TrainingSetup(packing=True, attention="flash")) == "flash"
    # k/v repeated to all heads (2 x a x (q - kv)) and the additive mask a x s per token
    assert layer_activation_bytes_per_token(TINY, packed) - layer_activation_bytes_per_token(TINY, flash) \
        == 2 * 2 * (8 - 4) + 2 * 4


def test_checkpointing_formula_by_hand():
    setup = TrainingSetup(method="full", seq_length=4, gradient_checkpointing=True)
    m = step_moments(TINY, setup, 1704, 2 * 1704)
    # layer inputs (L x aH x T) + the last layer recomputed + the gradients of its intermediates + flow
    # (the recomputed input norm saves the layer input, already among the checkpointed ones)
    assert m["layer recompute"].activations == 2 * 2 * 8 * 4 + 264 * 4 - 16 * 4 + 6 * 24 * 4 + 16 * 4
    assert m["loss backward"].activations == 2 * 2 * 8 * 4 + 16 * 4 + 16 * 4


def test_loss_never_holds_the_full_vocabulary_logits():
    arch = load_catalog()["qwen2.5-0.5b"]  # 151,936 vocabulary
    c = chunk_tokens(arch, TrainingSetup(seq_length=8192))
    assert c == 64 * 2**20 // (4 * 151936) == 110
    short, long = (step_moments(arch, TrainingSetup(method="lora", seq_length=s), 1, 4)["loss backward"].logits
                   for s in (2048, 8192))
    # one chunk's fp32 buffers, whatever the sequence: only the kept hidden states grow with it
    assert long - short == 2 * 2 * arch.hidden_size * (8192 - 2048)
    assert long < 12 * 151936 * 2048 // 4


def test_qlora_weight_storage():
    assert nf4_bytes_per_param(False) == 0.5 + 4 / 64
    assert nf4_bytes_per_param(True) == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256))
    arch = load_catalog()["llama-3.1-8b"]
    q = TrainingSetup(method="qlora", target_modules=("q_proj",), lora_r=1)
    e = estimate_memory(arch, q)
    quantized = arch.quantizable_params()
    other = arch.total_params() - quantized  # embeddings, lm_head, norms: kept in the bf16 compute dtype
    assert other == 2 * 128256 * 4096 + 65 * 4096
    table = 128256 * 4096  # the input embeddings: in host memory (training.embeddingsOnHost), not on the GPU
    assert e.weights == int(quantized * nf4_bytes_per_param(True)) + 2 * (other - table) + 4 * e.trainable_params
    assert e.host_offload == 2 * table


@pytest.mark.parametrize("optimizer,per_param", [("adamw", 6), ("paged_adamw_32bit", 8), ("adamw_8bit", BNB_8BIT_BYTES),
                                               ("paged_adamw_8bit", BNB_8BIT_BYTES), ("sgd", 4)])
def test_optimizer_state_bytes_full_bf16(optimizer, per_param):
    """bf16 full fine-tuning: Kahan AdamW 3 x bf16, Kahan SGD momentum + compensation 2 x bf16, bitsandbytes."""
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
    assert one.optimizer_states == 6 * p and one.master_weights == 0
    # DeepSpeed: bf16 module weights and gradients, fp32 master + AdamW partitions
    assert z1.optimizer_states == -(-8 * p // 8) and z1.master_weights == -(-4 * p // 8) and z1.weights == 2 * p
    assert z1.gradients == 2 * p  # the peak is the step, with every gradient alive
    assert z2.weights == 2 * p and z2.total < z1.total
    # ZeRO-2's gradient partition (the peak may be lm_head's gradient being formed, before it is reduced)
    assert step_moments(arch, setup, p, -(-2 * p // 8), "deepspeed")["end of backward"].gradients < 2 * p // 8
    working_set = (arch.embedding_params() + arch.layer_params()) * 2
    assert z3.weights == -(-2 * p // 8) + working_set
    assert z3.comm_buffers == NCCL_BYTES + 4 * 4096**2 * 2
    ddp = estimate_memory(arch, setup, Parallelism("ddp", world_size=2))
    assert ddp.comm_buffers == NCCL_BYTES + 2 * p  # DDP gradient buckets
    off = estimate_memory(arch, setup, Parallelism("deepspeed", 3, True, True, world_size=8))
    assert off.optimizer_states == off.master_weights == 0
    # no gradient partition stays on the GPU; only lm_head's gradient while the loss chunks sum it
    assert off.gradients == 3 * 2 * arch.lm_head_params()
    assert off.weights == working_set and off.host_offload > 0


# ---- monotonicity -----------------------------------------------------------------------------

MODELS = ["qwen2.5-0.5b", "llama-3.1-8b", "mixtral-8x7b-v0.1", "phi-3-mini-4k", "gemma-2-9b"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_more_tokens_more_memory(name, method):
    arch = load_catalog()[name]
    totals = [estimate_memory(arch, TrainingSetup(method=method, seq_length=seq)).total
              for seq in (256, 1024, 4096, 16384)]
    # short sequences may peak at the optimizer step, which does not depend on the tokens
    assert totals == sorted(totals)
    assert totals[-1] > totals[0] if method != "full" else True
    b1 = estimate_memory(arch, TrainingSetup(method=method, micro_batch_size=1))
    b4 = estimate_memory(arch, TrainingSetup(method=method, micro_batch_size=4))
    assert b4.total >= b1.total and (method == "full" or b4.activations > b1.activations)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_checkpointing_saves_activation_memory(name, method):
    arch = load_catalog()[name]
    on = estimate_memory(arch, TrainingSetup(method=method, gradient_checkpointing=True, seq_length=4096))
    off = estimate_memory(arch, TrainingSetup(method=method, gradient_checkpointing=False, seq_length=4096))
    assert on.total <= off.total  # equal when both peak at the optimizer step
    assert on.weights == off.weights
    if method != "full":
        assert on.total < off.total


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
    packed = layer_activation_bytes_per_token(arch, TrainingSetup(method="full", packing=True, seq_length=1024))
    assert per_token("flash", 1024) == per_token("sdpa", 1024) < packed  # a mask: k/v repeated for the kernel


def test_method_ordering_and_vocab_effect():
    arch = load_catalog()["llama-3.1-8b"]
    full, lora, qlora = (estimate_memory(arch, TrainingSetup(method=m)).total for m in ("full", "lora", "qlora"))
    assert full > lora > qlora
    # a big vocabulary costs one loss chunk (12 B x 110 tokens x 151936), not 12 B x V per token
    small = estimate_memory(load_catalog()["qwen2.5-0.5b"], TrainingSetup(method="lora"))
    assert small.logits == 2 * 2 * 896 * 2048 + 12 * 110 * 151936 and small.logits < small.weights


def test_gemma2_softcapping_and_four_norms():
    g = load_catalog()["gemma-2-2b"]
    assert isinstance(g, Architecture) and g.norms_per_layer == 4 and g.tie_word_embeddings
    s = TrainingSetup(method="lora")
    c = 64 * 2**20 // (4 * 256000)
    assert logits_bytes(g, s) == 2 * 2 * 2304 * 2048 + (12 + 2 * 2) * c * 256000
