"""The GPU-free memory trace (kubetune_trainer.memtrace): its storage counter agrees with torch.profiler on a real
CPU step, its bitsandbytes 4-bit emulation holds byte for byte what real bitsandbytes holds, a full-size
Llama-3.1-8B LoRA step traces within a minute with exactly the model's parameter bytes as weights, and
architectures it cannot build are refused with a message naming what is missing."""

from __future__ import annotations

import math
import time

import pytest

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")

from kubetune_trainer.memtrace import UnsupportedModel, plan_settings, trace_step  # noqa: E402
from kubetune_trainer.memtrace.counter import StorageCounter  # noqa: E402

# Llama-3.1-8B's config.json (architecture fields), written here: no hub access.
LLAMA_31_8B = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}
LLAMA_31_8B_PARAMS = 8_030_261_248  # published parameter count of Llama-3.1-8B
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
PROFILER_TOLERANCE = 0.01  # the counter sees tensor storages; the profiler every CPU allocation


def _profiler_peak_over_start(prof) -> int:
    """Highest running total of the CPU allocations the profiler recorded, relative to where it started."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def test_counter_peak_matches_torch_profiler_on_a_real_cpu_lora_step():
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 256, "vocab_size": 1000})
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(0, 1000, (2, 96))

    def step() -> None:  # two micro-batches of gradient accumulation, then the optimizer step
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss / 2
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on, as in every later step
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    profiled = _profiler_peak_over_start(prof)

    counter = StorageCounter()
    with counter:
        existing = [*model.parameters(), *model.buffers()]
        existing += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        for tensor in existing:
            counter.track(tensor)
        start = counter.allocated
        counter.reset_peak()
        step()
    traced = counter.peak_bytes - start
    assert profiled > 1_000_000
    assert abs(traced - profiled) <= PROFILER_TOLERANCE * profiled, (traced, profiled)
    assert counter.allocated == start  # everything the step allocated was freed again


def test_counter_frees_views_once_and_keeps_paged_storage_out_of_the_peak():
    counter = StorageCounter()
    with counter:
        a = torch.empty(1000, dtype=torch.float32)
        view = a[:10]
        assert counter.allocated == 4000
        with counter.paged_allocations():
            paged = torch.zeros(5000, dtype=torch.uint8)
        assert (counter.allocated, counter.paged_bytes, counter.peak_bytes) == (4000, 5000, 4000)
        del a
        assert counter.allocated == 4000  # the view keeps the storage alive
        del view
        assert counter.allocated == 0
        b = torch.empty(250, dtype=torch.float64)
    assert counter.peak_bytes == 4000 and counter.peak_breakdown()["activations"] == 4000
    assert counter.allocated == 2000 and counter.paged_bytes == 5000
    del b, paged


def _tiny_checkpoint(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{**TINY_LLAMA, "hidden_size": 128, "intermediate_size": 384})
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    return cfg


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_4bit_emulation_holds_what_real_bitsandbytes_holds_byte_for_byte(tmp_path, quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _disable_current_modes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kubetune_trainer.memtrace.build import BuildLog, build_model
    from kubetune_trainer.memtrace.quantized import isolated_qmaps, quantized_storage

    cfg = _tiny_checkpoint(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                               bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.bfloat16)
    real = AutoModelForCausalLM.from_pretrained(str(tmp_path), quantization_config=quant, dtype=torch.bfloat16,
                                                device_map={"": "cpu"})
    real_layers = {n: quantized_storage(m) for n, m in real.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with isolated_qmaps(), FakeTensorMode(allow_non_fake_inputs=True):
        fake = build_model(cfg, {"quantization_config": quant, "dtype": torch.bfloat16}, BuildLog(),
                           _disable_current_modes)
        fake_layers = {n: quantized_storage(m) for n, m in fake.named_modules()
                       if isinstance(m, bnb.nn.Linear4bit)}
    assert len(real_layers) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head stays unquantized
    assert fake_layers == real_layers
    sample = real_layers["model.layers.0.mlp.down_proj"]
    assert sample["weight"] == ("uint8", (384 * 128 // 2, 1), 384 * 128 // 2)  # two 4-bit values per byte
    assert ("state2.absmax" in sample) == double_quant


def test_emulated_4bit_matmul_counts_the_dequantize_temporaries_cuda_allocates():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kubetune_trainer.memtrace.fake_support import FakeExecutor
    from kubetune_trainer.memtrace.quantized import isolated_qmaps

    out_f, in_f, tokens = 1024, 512, 4096
    executor = FakeExecutor(bitsandbytes_4bit=True)
    counter = StorageCounter(run_op=executor)
    executor.counter = counter
    with isolated_qmaps(), FakeTensorMode(allow_non_fake_inputs=True), counter:
        packed, state = bnbf.quantize_4bit(torch.empty(out_f, in_f, dtype=torch.bfloat16), blocksize=64,
                                           compress_statistics=True, quant_type="nf4")
        x = torch.empty(tokens, in_f, dtype=torch.bfloat16)
        counter.reset_peak()
        start = counter.allocated
        import bitsandbytes as bnb

        y = bnb.matmul_4bit(x, packed.t(), quant_state=state)
    blocks = out_f * in_f // 64
    output, weight, absmax = tokens * out_f * 2, out_f * in_f * 2, blocks * 4
    assert tuple(y.shape) == (tokens, out_f)
    assert counter.peak_bytes - start == output + weight + 2 * absmax  # dequantized absmax, + offset, weight
    assert counter.allocated - start == output


def test_unknown_model_type_is_refused_naming_what_is_missing():
    settings = plan_settings("lora", micro_batch_size=1, seq_length=64)
    with pytest.raises(UnsupportedModel, match=r"unknown model_type 'no-such-arch'.*transformers"):
        trace_step(settings, {**TINY_LLAMA, "model_type": "no-such-arch"})
    custom = {**TINY_LLAMA, "model_type": "my-custom-lm", "auto_map": {"AutoModelForCausalLM": "modeling.MyLM"}}
    with pytest.raises(UnsupportedModel, match=r"'my-custom-lm' is custom code.*trust_remote_code"):
        trace_step(settings, custom)
    with pytest.raises(UnsupportedModel, match="no model_type"):
        trace_step(settings, {"hidden_size": 64})
    with pytest.raises(UnsupportedModel, match="pre-quantized.*quant_method gptq"):
        trace_step(settings, {**TINY_LLAMA, "quantization_config": {"quant_method": "gptq", "bits": 4}})


def test_tiny_trace_reports_a_consistent_peak_for_each_method():
    import torch.utils
    from transformers import AutoModelForCausalLM

    patched = (AutoModelForCausalLM.from_pretrained, torch.nn.functional.scaled_dot_product_attention,
               torch.utils.swap_tensors)
    for method in ("full", "lora", "qlora"):
        if method == "qlora":
            pytest.importorskip("bitsandbytes")
        report = trace_step(plan_settings(method, micro_batch_size=2, seq_length=64, gradient_accumulation_steps=4,
                                          lora_r=4), TINY_LLAMA)
        assert sum(report.breakdown.values()) == report.peak_bytes
        assert report.breakdown["weights"] == report.weights_bytes
        assert report.peak_bytes > report.weights_bytes
        assert report.micro_steps_traced == 2 and report.gradient_accumulation_steps == 4
        assert report.peak_phase.startswith("step 2")  # optimizer states are alive from the second step on
        assert report.breakdown["optimizerStates"] > 0
        assert report.to_dict()["peakBytes"] == report.peak_bytes
        assert report.padded_batch and report.attention.startswith("memory_efficient")  # a padded batch has a mask
    assert (AutoModelForCausalLM.from_pretrained, torch.nn.functional.scaled_dot_product_attention,
            torch.utils.swap_tensors) == patched  # everything the trace patches is restored


def test_attention_is_the_kernel_cuda_picks_not_the_cpu_math_kernel():
    """Without a mask (one unpadded row) CUDA runs flash attention: output + logsumexp are kept, never the
    [batch, heads, seq, seq] score matrix the math kernel stores."""
    config = {**TINY_LLAMA, "num_hidden_layers": 1}
    flags = {"micro_batch_size": 1, "seq_length": 512, "gradient_checkpointing": False}
    flash = trace_step(plan_settings("lora", **flags), config)
    eager = trace_step(plan_settings("lora", attention="eager", **flags), config)
    assert flash.attention.startswith("flash") and not flash.padded_batch
    scores = 1 * 4 * 512 * 512 * 2  # one layer's bf16 attention probabilities, kept by eager attention
    assert eager.peak_bytes - flash.peak_bytes >= scores


def test_packed_batches_trace_the_variable_length_kernel_without_mask_or_repeated_kv():
    """Packed rows under attention auto run PyTorch's varlen flash kernel (kubetune_trainer.packed_attention):
    against explicit SDPA (block mask, memory-efficient kernel) the trace keeps neither the mask's additive form
    nor k/v repeated to the query heads."""
    config = {**TINY_LLAMA, "num_hidden_layers": 1}
    flags = {"micro_batch_size": 2, "seq_length": 512, "gradient_checkpointing": False, "packing": True}
    varlen = trace_step(plan_settings("lora", **flags), config)
    sdpa = trace_step(plan_settings("lora", attention="sdpa", **flags), config)
    assert varlen.attention.startswith("varlen_flash") and sdpa.attention.startswith("memory_efficient")
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], 64 // 4
    tokens = 2 * 512
    repeated_kv = 2 * tokens * (heads - kv_heads) * head_dim * 2  # bf16 k and v widened to every query head
    additive_mask = 2 * 512 * 512 * 2  # the block mask as the kernel's bf16 bias, saved for backward
    assert sdpa.peak_bytes - varlen.peak_bytes >= repeated_kv + additive_mask


@pytest.mark.slow
def test_llama_31_8b_lora_traces_within_a_minute_with_exact_weight_bytes():
    import kubetune_trainer.recipe  # noqa: F401 - imports are not part of the trace time
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    settings = plan_settings("lora", micro_batch_size=2, seq_length=2048, packing=True, lora_r=8,
                             target_modules=["q_proj", "v_proj", "o_proj"])
    started = time.process_time()  # CPU time: what a shared machine's other tenants take is not the trace's
    report = trace_step(settings, LLAMA_31_8B, model_name="llama-3.1-8b")
    seconds = time.process_time() - started
    assert seconds < 60, f"8B LoRA trace took {seconds:.1f} CPU s"
    layers, hidden, kv = 32, 4096, 8 * 128
    lora = layers * 8 * ((hidden + hidden) + (hidden + kv) + (hidden + hidden))  # r=8 on q, v, o
    assert report.trainable_params == lora
    assert report.total_params == LLAMA_31_8B_PARAMS + lora
    rotary = 2 * (128 // 2) * 4  # inv_freq and original_inv_freq, fp32
    table = 128256 * hidden * 2  # the frozen input-embedding table: in host memory (training.embeddingsOnHost)
    assert report.weights_bytes == LLAMA_31_8B_PARAMS * 2 - table + lora * 4 + rotary
    assert report.host_weight_bytes == table
    assert report.breakdown["weights"] == report.weights_bytes
    assert math.isclose(sum(report.breakdown.values()), report.peak_bytes)
    assert report.peak_bytes > report.weights_bytes + report.breakdown["optimizerStates"]


def test_estimate_cli_shows_the_traced_peak_beside_the_estimate_or_says_why_not(tmp_path, capsys):
    import json

    from kubetune.sizing.cli import main

    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    flags = ["--config", str(config), "--method", "lora", "--seq", "64", "--batch", "2", "--r", "4"]
    assert main([*flags, "--trace", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["trace"]["peakBytes"] > out["trace"]["weightsBytes"] > 0
    assert sum(out["trace"]["breakdown"].values()) == out["trace"]["peakBytes"]

    config.write_text(json.dumps({**TINY_LLAMA, "model_type": "no-such-arch"}))
    main([*flags, "--trace"])
    text = capsys.readouterr().out
    assert "trace not available: unknown model_type 'no-such-arch'" in text
    assert "analytic estimate only" in text


def test_traced_attention_casts_fp32_inputs_as_cuda_autocast_does():
    """fp32 query/key/value under bf16 autocast reach the kernel as bf16 (as on CUDA), so grouped-query
    attention takes flash, not the math kernel that stores the whole attention matrix."""
    import torch

    from kubetune_trainer.memtrace.attention import KernelLog, cuda_attention

    q = torch.randn(1, 8, 64, 16, requires_grad=True)
    kv = torch.randn(1, 2, 64, 16, requires_grad=True)
    log = KernelLog()
    with cuda_attention(log), torch.autocast("cpu", dtype=torch.bfloat16):
        out = torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    assert out.dtype == torch.bfloat16
    assert "math" not in log.summary() and log.calls, log.summary()
