"""The frozen input-embedding table in host memory (kubetune_trainer.host_embeddings, training.embeddingsOnHost):
the model computes exactly what it did, the table leaves the model's parameters (and the GPU), a LoRA run trains
and resumes as before, auto picks it only where it can run, and the memory trace and the estimator both take the
table off the GPU peak and put it in host memory."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubetune_trainer import host_embeddings, offload  # noqa: E402
from kubetune_trainer.errors import PlanError  # noqa: E402
from kubetune_trainer.host_embeddings import (HostEmbedding, embeddings_problem, host_parameter_count,  # noqa: E402
                                              model_problem, move_input_embeddings_to_host)
from kubetune_trainer.memtrace import plan_settings, trace_step  # noqa: E402

from .test_lean_memory import assert_resume_exact, assets, plan_for, run  # noqa: E402,F401 - module fixture

LLAMA_WIDE = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1024, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 4096}


def tiny_lora_model(tied: bool = False, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))


def _loss_and_grads(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_model_computes_the_same_with_the_table_in_host_memory(monkeypatch):
    model = tiny_lora_model()
    model.train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    table = model.get_input_embeddings().weight
    n_params = sum(p.numel() for p in model.parameters())

    moved = move_input_embeddings_to_host(model, torch.device("cpu"))
    assert moved == table.numel() * table.element_size()
    wrapper = model.get_input_embeddings()
    assert isinstance(wrapper, HostEmbedding) and torch.equal(wrapper.weight, table)
    # the table is no parameter of the model any more: DDP, the optimizer and model.to(...) leave it alone
    assert all(p is not wrapper.weight for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_params - table.numel()
    assert host_parameter_count(model) == table.numel()
    copies = []
    device_copy = offload.device_copy
    monkeypatch.setattr(offload, "device_copy", lambda t, d, pin_memory: copies.append(t.shape) or
                        device_copy(t, d, pin_memory))
    logits, grads = _loss_and_grads(model, ids)
    assert torch.equal(logits, ref_logits)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    assert copies == [torch.Size([2, 16, 32])]  # only the batch's rows travel, once per forward
    assert move_input_embeddings_to_host(model, torch.device("cpu")) == 0  # already there


def test_the_looked_up_rows_carry_no_gradient_back_to_the_host():
    model = tiny_lora_model()
    move_input_embeddings_to_host(model, torch.device("cpu"))
    rows = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
    assert not rows.requires_grad and rows.grad_fn is None


def test_tied_or_trained_tables_stay_where_they_are():
    tied = tiny_lora_model(tied=True)
    assert "tied" in model_problem(tied)
    with pytest.raises(ValueError, match="tied"):
        move_input_embeddings_to_host(tied, torch.device("cpu"))
    trained = tiny_lora_model()
    trained.get_input_embeddings().weight.requires_grad_(True)
    assert "trained" in model_problem(trained)
    assert model_problem(tiny_lora_model()) == ""


def test_auto_moves_the_table_for_adapters_on_a_gpu_only():
    assert embeddings_problem(method="lora", cuda=True, strategy="none") == ""
    assert embeddings_problem(method="qlora", cuda=True, strategy="ddp") == ""
    assert "trains the input embeddings" in embeddings_problem(method="full", cuda=True, strategy="none")
    assert "without a GPU" in embeddings_problem(method="lora", cuda=False, strategy="none")
    assert "DeepSpeed" in embeddings_problem(method="lora", cuda=True, strategy="deepspeed")


def test_lora_run_with_the_table_on_the_host_trains_like_the_plain_one(assets, tmp_path, monkeypatch):
    _, plain = run(tmp_path / "plain", monkeypatch, plan_for(assets, tmp_path / "plain" / "out", "lora",
                                                             gradientCheckpointing=True))
    _, hosted = run(tmp_path / "host", monkeypatch, plan_for(assets, tmp_path / "host" / "out", "lora",
                                                                  gradientCheckpointing=True, embeddingsOnHost=True))
    assert plain["speed"]["embeddingsOnHost"] is False  # auto on CPU: the table is in host memory already
    assert hosted["speed"]["embeddingsOnHost"] is True
    assert [h["loss"] for h in hosted["history"]] == [h["loss"] for h in plain["history"]]
    adapter = tmp_path / "host" / "out" / "final" / "adapter"
    assert any(adapter.glob("adapter_model.*")), sorted(p.name for p in adapter.parent.rglob("*"))


def test_lora_run_with_the_table_on_the_host_resumes_exactly(assets, tmp_path, monkeypatch):
    metrics = assert_resume_exact(assets, tmp_path, monkeypatch, method="lora", gradientCheckpointing=True,
                                  embeddingsOnHost=True)
    assert metrics["speed"]["embeddingsOnHost"] is True


def test_embeddings_on_host_true_is_refused_for_full_fine_tuning(assets, tmp_path, monkeypatch):
    with pytest.raises(PlanError, match="embeddingsOnHost"):
        run(tmp_path, monkeypatch, plan_for(assets, tmp_path / "out", "full", embeddingsOnHost=True))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_trace_and_estimate_take_the_table_off_the_gpu(method):
    from kubetune.sizing import TrainingSetup, architecture_from_config
    from kubetune.sizing.estimator import estimate_memory

    common = dict(micro_batch_size=2, seq_length=256, lora_r=8, packing=True)
    on_gpu = trace_step(plan_settings(method, embeddings_on_host=False, **common), LLAMA_WIDE)
    auto = trace_step(plan_settings(method, **common), LLAMA_WIDE)  # auto, as the operator leaves it
    table = LLAMA_WIDE["vocab_size"] * LLAMA_WIDE["hidden_size"] * 2  # bf16, also under QLoRA
    assert on_gpu.host_weight_bytes == 0 and auto.host_weight_bytes == table
    assert on_gpu.breakdown["weights"] - auto.breakdown["weights"] == table
    assert on_gpu.peak_bytes - auto.peak_bytes >= table
    assert auto.total_params == on_gpu.total_params  # the table still counts as a parameter of the model
    assert "input embeddings" in auto.format_text()

    arch = architecture_from_config(LLAMA_WIDE, name="wide")
    estimate = estimate_memory(arch, TrainingSetup(method=method, lora_r=8, micro_batch_size=2, seq_length=256,
                                                   packing=True, target_modules=("all-linear",)))
    assert estimate.host_offload == table
    assert any("input-embedding table" in note for note in estimate.notes)
    tied = architecture_from_config(dict(LLAMA_WIDE, tie_word_embeddings=True), name="tied")
    assert estimate_memory(tied, TrainingSetup(method=method)).host_offload == 0
    tied_trace = trace_step(plan_settings(method, **common), dict(LLAMA_WIDE, tie_word_embeddings=True))
    assert tied_trace.host_weight_bytes == 0  # auto found the tie on the model and kept the table




def test_a_compiled_decoder_runs_the_host_lookup_outside_its_graph():
    model = tiny_lora_model()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    move_input_embeddings_to_host(model, torch.device("cpu"), compiled=True)
    decoder = model.get_decoder()
    decoder.compile(backend="eager")  # dynamo only (no C++ toolchain needed): the lookup is a graph break
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, ref)
