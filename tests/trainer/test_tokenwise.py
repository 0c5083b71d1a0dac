"""Token-wise recomputation (kubetune_trainer.tokenwise): decoder norms and tiled MLPs give the same loss and the
same gradients as the plain layers, with and without gradient checkpointing, and a LoRA run trains and resumes
as before; LoRA adapters read their input without peft's fp32 copy under autocast, bit for bit the same."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from kubetune_trainer import tokenwise  # noqa: E402
from kubetune_trainer.errors import PlanError  # noqa: E402
from kubetune_trainer.methods import share_adapter_inputs  # noqa: E402
from kubetune_trainer.tokenwise import TokenwiseRecompute, apply_tokenwise, tiled_mlp_problem  # noqa: E402

from .test_lean_memory import assert_resume_exact, assets, plan_for, run  # noqa: E402,F401 - module fixture

TOKENS = 24


def tiny_lora_model(dropout: float = 0.0, checkpointing: bool = False, seed: int = 0):
    """A 2-layer llama (random, seeded) with LoRA on every linear layer, so the MLPs have trainable adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for name, p in model.named_parameters():  # LoRA B starts at zero: give every adapter a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, TOKENS), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def loss_and_grads(model, inputs) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few tokens, so every norm and MLP runs in several tiles (the defaults are sized for GPUs)."""
    monkeypatch.setattr(tokenwise, "MIN_TILE_TOKENS", 1)
    monkeypatch.setattr(tokenwise, "MLP_TILE_BYTES", 7 * 80 * 4)  # 7 tokens per MLP tile
    monkeypatch.setattr(tokenwise, "NORM_TILE_BYTES", 5 * 32 * 4)  # 5 tokens per norm tile


@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiled_layers_give_the_plain_loss_and_gradients(small_tiles, checkpointing):
    plain = tiny_lora_model(checkpointing=checkpointing)
    tiled = tiny_lora_model(checkpointing=checkpointing)
    counts = apply_tokenwise(tiled, tiled_mlp=True, norms=True, intermediate_size=80, element_bytes=4)
    assert counts == {"norms": 5, "mlps": 2}  # two per layer plus the final norm; one MLP per layer
    inputs = batch()
    loss_a, grads_a = loss_and_grads(plain, inputs)
    loss_b, grads_b = loss_and_grads(tiled, inputs)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert grads_a.keys() == grads_b.keys()
    assert any("mlp" in n for n in grads_b)  # the MLP adapters get their gradient through the tiles
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_the_mlp_really_runs_in_tiles(small_tiles):
    model = tiny_lora_model()
    apply_tokenwise(model, tiled_mlp=True, norms=False, intermediate_size=80, element_bytes=4)
    mlp = model.base_model.model.model.layers[0].mlp
    rows = []
    mlp.gate_proj.register_forward_hook(lambda _m, args, _out: rows.append(args[0].reshape(-1, 32).shape[0]))
    loss_and_grads(model, batch())
    # forward without autograd + recomputation in backward, 48 tokens in tiles of 7
    assert rows == [7] * 6 + [6] + [7] * 6 + [6]


def test_a_checkpointed_layer_recompute_does_not_run_the_mlp_again(small_tiles):
    """Under gradient checkpointing the layer's recomputation rebuilds saved tensors only: the MLP's is its input,
    so the MLP runs twice per step (forward without autograd, tiles with autograd in backward), not three times;
    test_tiled_layers_give_the_plain_loss_and_gradients[True] shows the gradients stay the plain ones."""
    model = tiny_lora_model(checkpointing=True)
    apply_tokenwise(model, tiled_mlp=True, norms=False, intermediate_size=80, element_bytes=4)
    rows = []
    for layer in model.base_model.model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda _m, args, _out: rows.append(args[0].reshape(-1, 32).shape[0]))
    loss_and_grads(model, batch())
    assert rows == ([7] * 6 + [6]) * 4  # two layers, each: forward tiles, backward tiles
    # a layer that is not known to end in `residual + mlp` keeps the recomputation (Gemma's post-MLP norm)
    model = tiny_lora_model(checkpointing=True)
    for layer in model.base_model.model.model.layers:
        layer.__class__ = type("OtherDecoderLayer", (type(layer),), {})
    apply_tokenwise(model, tiled_mlp=True, norms=False, intermediate_size=80, element_bytes=4)
    rows.clear()
    for layer in model.base_model.model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(lambda _m, args, _out: rows.append(args[0].reshape(-1, 32).shape[0]))
    loss_and_grads(model, batch())
    assert rows == ([7] * 6 + [6]) * 6


def test_recomputation_reuses_the_forward_dropout_mask():
    # f(x) = dropout(x) @ W is linear in x for a fixed mask, so <f(x), g> == <x, df/dx^T g> exactly when the
    # backward recomputation draws the forward's mask, and not when it draws a new one.
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(16, 8, bias=False)).train()
    x = torch.randn(40, 16, requires_grad=True)
    y = TokenwiseRecompute.apply(layer.forward, 6, True, x, layer[1].weight)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close((y * g).sum(), (x.detach() * gx).sum(), rtol=1e-5, atol=1e-5)
    torch.manual_seed(0)
    y2 = TokenwiseRecompute.apply(layer.forward, 6, False, x, layer[1].weight)  # RNG not restored
    (gx2,) = torch.autograd.grad(y2, x, g)
    assert not torch.allclose((y2 * g).sum(), (x.detach() * gx2).sum(), rtol=1e-3)


def test_adapters_without_the_fp32_input_copy_are_bit_identical():
    inputs = batch()
    results = []
    for share in (False, True):
        model = tiny_lora_model()
        if share:
            assert share_adapter_inputs(model, "bf16") == 14  # 7 linear layers x 2 decoder layers
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, inputs))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == loss_b
    for name, g in grads_a.items():
        assert torch.equal(grads_b[name], g), name
    assert share_adapter_inputs(tiny_lora_model(), "fp32") == 0  # no autocast: adapters need fp32 inputs


def test_auto_tiles_the_mlp_of_checkpointed_lora_only():
    assert tiled_mlp_problem(method="lora", gradient_checkpointing=True, strategy="none", torch_compile=False) == ""
    assert tiled_mlp_problem(method="qlora", gradient_checkpointing=True, strategy="ddp", torch_compile=False) == ""
    assert "fp32 buffer" in tiled_mlp_problem(method="full", gradient_checkpointing=True, strategy="none",
                                              torch_compile=False)
    assert tiled_mlp_problem(method="lora", gradient_checkpointing=False, strategy="none", torch_compile=False)
    assert "DeepSpeed" in tiled_mlp_problem(method="lora", gradient_checkpointing=True, strategy="deepspeed",
                                            torch_compile=False)
    assert "torch.compile" in tiled_mlp_problem(method="lora", gradient_checkpointing=True, strategy="none",
                                                torch_compile=True)


def test_tiled_lora_run_trains_like_the_plain_one(assets, tmp_path, monkeypatch, small_tiles):
    _, plain = run(tmp_path / "plain", monkeypatch, plan_for(assets, tmp_path / "plain" / "out", "lora",
                                                             gradientCheckpointing=True, tiledMlp=False))
    _, tiled = run(tmp_path / "tiled", monkeypatch, plan_for(assets, tmp_path / "tiled" / "out", "lora",
                                                             gradientCheckpointing=True))
    assert tiled["speed"]["tiledMlp"] is True and tiled["speed"]["recomputedNorms"] is True
    assert plain["speed"]["tiledMlp"] is False and plain["speed"]["recomputedNorms"] is True
    a = [h["loss"] for h in plain["history"]]
    b = [h["loss"] for h in tiled["history"]]
    assert b[0] == pytest.approx(a[0], rel=1e-6)  # same first loss
    assert b[-1] == pytest.approx(a[-1], rel=1e-3)  # final loss after 8 steps: float summation order only


def test_tiled_lora_resumes_exactly(assets, tmp_path, monkeypatch, small_tiles):
    metrics = assert_resume_exact(assets, tmp_path, monkeypatch, method="lora", gradientCheckpointing=True)
    assert metrics["speed"]["tiledMlp"] is True


def test_tiled_mlp_true_is_refused_where_it_cannot_run(assets, tmp_path, monkeypatch):
    plan = plan_for(assets, tmp_path / "out", "lora", gradientCheckpointing=True, tiledMlp=True, torchCompile=True)
    with pytest.raises(PlanError, match="tiledMlp"):
        run(tmp_path, monkeypatch, plan)
