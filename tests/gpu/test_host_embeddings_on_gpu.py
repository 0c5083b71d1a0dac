"""On a CUDA GPU: a LoRA model whose frozen input-embedding table is in host memory
(kubetune_trainer.host_embeddings) gives the logits and adapter gradients it gives with the table on the GPU,
the table's bytes leave the GPU, and backward sends nothing back to the host. tests/trainer/test_host_embeddings.py
checks the same on CPU, where host and device are one memory.

Skipped without a GPU (tests/conftest.py: the reason starts with "needs a CUDA GPU").
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu]


def _lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=32768, hidden_size=1024, intermediate_size=2048,
                               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))


def _step(model, ids):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def test_table_in_host_memory_gives_the_same_step_and_frees_its_gpu_bytes():
    from kubetune_trainer.host_embeddings import HostEmbedding, move_input_embeddings_to_host

    model = _lora_model()
    ids = torch.randint(0, 32768, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref_logits, ref_grads = _step(model, ids)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    moved = move_input_embeddings_to_host(model, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved == 32768 * 1024 * 2
    assert before - torch.cuda.memory_allocated() >= moved  # the table left the GPU
    emb = model.get_input_embeddings()
    assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu"
    logits, grads = _step(model, ids)
    assert torch.equal(logits, ref_logits)  # the same rows, the same forward
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():  # attention backward may accumulate in another order from run to run
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[name], rtol=2e-2, atol=1e-2 * scale, msg=name)
    assert emb.weight.grad is None
