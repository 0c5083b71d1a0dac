"""Model resolution: catalog names from hf:// URIs, config.json dicts, inline hints (which win); spec defaults."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune.sizing import resolve_architecture, setup_from_spec
from kubetune.sizing.architecture import ArchitectureError
from kubetune.sizing.catalog import catalog_names, load_catalog, lookup_catalog, normalize_model_name

pytestmark = pytest.mark.unit

REQUIRED = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-0.5b", "qwen2.5-1.5b",
            "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b", "mistral-7b-v0.3",
            "mixtral-8x7b-v0.1", "phi-3-mini-4k", "phi-3.5-mini", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b"]


def test_catalog_covers_the_required_models():
    assert set(REQUIRED) <= set(catalog_names())


@pytest.mark.parametrize("uri,name", [
    ("hf://meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
    ("hf://meta-llama/Llama-3.1-8B-Instruct@main", "llama-3.1-8b"),
    ("hf://meta-llama/Meta-Llama-3-8B", "llama-3.1-8b"),
    ("hf://meta-llama/Llama-3.3-70B-Instruct", "llama-3.1-70b"),
    ("hf://Qwen/Qwen2.5-7B-Instruct", "qwen2.5-7b"),
    ("hf://Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b"),
    ("hf://mistralai/Mistral-7B-Instruct-v0.3", "mistral-7b-v0.3"),
    ("hf://mistralai/Mixtral-8x7B-Instruct-v0.1", "mixtral-8x7b-v0.1"),
    ("hf://microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-4k"),
    ("hf://microsoft/Phi-3.5-mini-instruct", "phi-3.5-mini"),
    ("hf://google/gemma-2-9b-it", "gemma-2-9b"),
    ("pvc://models/llama-3.2-1b", "llama-3.2-1b"),
    ("s3://bucket/base/qwen2.5-14b", "qwen2.5-14b"),
    ("llama-3.2-3b", "llama-3.2-3b"),
])
def test_uri_resolves_to_catalog(uri, name):
    arch = lookup_catalog(uri)
    assert arch is not None and arch.name == name


def test_normalize_model_name():
    assert normalize_model_name("Qwen/Qwen2.5-7B-Instruct") == "qwen2.5-7b"
    assert normalize_model_name("meta-llama/Meta-Llama-3.1-8B-Instruct") == "llama-3.1-8b"
    assert lookup_catalog("hf://acme/unknown-13b") is None


def test_catalog_layout_facts():
    c = load_catalog()
    assert c["qwen2.5-7b"].qkv_bias and not c["qwen2.5-7b"].attention_bias
    assert c["qwen2.5-0.5b"].tie_word_embeddings and not c["qwen2.5-7b"].tie_word_embeddings
    assert c["phi-3-mini-4k"].fused_projections and c["phi-3-mini-4k"].lora_default_targets == ("qkv_proj", "o_proj")
    assert c["gemma-2-27b"].head_dim == 128 and c["gemma-2-9b"].head_dim == 256
    assert c["mixtral-8x7b-v0.1"].is_moe and c["mixtral-8x7b-v0.1"].num_experts_per_tok == 2
    assert c["llama-3.1-70b"].vocab_size == 128256 and c["gemma-2-2b"].vocab_size == 256000


def test_config_dict_is_used_and_hints_win():
    config = {"model_type": "qwen2", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 151936, "tie_word_embeddings": True}
    arch = resolve_architecture({"uri": "pvc://models/my-qwen"}, config)
    assert arch.source == "config" and arch.hidden_size == 1024 and arch.qkv_bias
    hinted = resolve_architecture({"uri": "pvc://models/my-qwen", "architecture": {"numHiddenLayers": 12}}, config)
    assert hinted.num_hidden_layers == 12 and hinted.hidden_size == 1024 and hinted.source == "config+hints"
    # hints also override the catalog
    cat = resolve_architecture({"uri": "hf://meta-llama/Llama-3.1-8B", "architecture": {"vocabSize": 32000, "headDim": 0}})
    assert cat.vocab_size == 32000 and cat.hidden_size == 4096 and cat.head_dim == 128


def test_hints_alone_and_missing_hints():
    arch = resolve_architecture({"uri": "pvc://m/x", "architecture": {
        "family": "mixtral", "hiddenSize": 512, "intermediateSize": 1024, "numHiddenLayers": 2, "numAttentionHeads": 8,
        "numKeyValueHeads": 2, "vocabSize": 1000, "numLocalExperts": 4, "numExpertsPerTok": 2}})
    assert arch.source == "hints" and arch.is_moe and arch.head_dim == 64
    with pytest.raises(ArchitectureError, match="numHiddenLayers"):
        resolve_architecture({"uri": "pvc://m/x", "architecture": {"family": "llama", "hiddenSize": 512,
                                                                    "intermediateSize": 1024, "numAttentionHeads": 8,
                                                                    "vocabSize": 1000}})
    with pytest.raises(ArchitectureError, match="not in the sizing catalog"):
        resolve_architecture({"uri": "hf://acme/secret"})


def _spec(**fields):
    return parse_spec({"model": {"uri": "hf://Qwen/Qwen2.5-7B"}, "dataset": {"uri": "pvc://d/x"},
                       "output": {"uri": "pvc://o/x"}, **fields})


def test_typed_spec_defaults_match_contract():
    spec = _spec(method="qlora", training={"maxSteps": 10})
    assert spec.training.max_seq_length == 2048 and spec.training.gradient_checkpointing is True
    assert spec.training.epochs == 0 and spec.training.max_steps == 10
    assert spec.effective_lora().dump() == {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]}
    assert spec.effective_quantization().dump() == {"bits": 4, "quantType": "nf4", "doubleQuant": True,
                                                    "computeDtype": "bfloat16"}
    assert spec.resources.gpus_per_pod == 0 and spec.distributed.strategy == "auto"
    lora = _spec(method="lora", lora={"r": 64})
    assert lora.effective_quantization() is None and lora.effective_lora().r == 64 and lora.effective_lora().alpha == 32
    full = _spec(method="full")
    assert full.effective_lora() is None and full.training.epochs == 1


def test_setup_from_spec():
    spec = _spec(method="qlora", quantization={"bits": 4, "computeDtype": "float16"},
                 training={"maxSeqLength": 4096, "microBatchSize": 2, "optimizer": "paged_adamw_8bit"})
    s = setup_from_spec(spec)
    assert (s.method, s.precision, s.seq_length, s.micro_batch_size, s.optimizer) == ("qlora", "fp16", 4096, 2,
                                                                                      "paged_adamw_8bit")
    assert setup_from_spec(_spec(method="full"), bf16_capable=False).precision == "fp16"
    assert setup_from_spec(_spec(method="qlora")).precision == "bf16"  # quantization block omitted: its default


def test_packed_rows_are_sized_for_the_kernel_the_gpu_generation_runs():
    """auto + packing: variable-length flash attention on Ampere and newer; older GPUs (no bf16) keep SDPA with
    the block mask, which saves k/v at all heads and the mask, so the estimate there is higher, never lower."""
    from kubetune.sizing import estimate_memory

    spec = _spec(method="lora", training={"maxSeqLength": 2048, "microBatchSize": 2, "packing": True})
    ampere, older = setup_from_spec(spec), setup_from_spec(spec, bf16_capable=False)
    assert (ampere.attention, older.attention) == ("flash", "sdpa")
    assert older.precision == "fp16"
    arch = load_catalog()["llama-3.1-8b"]
    assert estimate_memory(arch, older).activations > estimate_memory(arch, ampere).activations
    explicit = _spec(method="lora", training={"packing": True, "attentionImplementation": "sdpa"})
    assert setup_from_spec(explicit).attention == "sdpa"
