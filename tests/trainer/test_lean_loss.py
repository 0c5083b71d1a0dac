"""The chunked loss (kubetune_trainer.loss) equals transformers' full-logits loss, value and gradients, and never
materialises a [tokens, vocab] logits tensor larger than one chunk; the recipe trains the same with it."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.trainer
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from kubetune_trainer import loss as loss_mod  # noqa: E402
from kubetune_trainer.loss import CausalLMLoss, chunked_ce_sum, shifted_labels  # noqa: E402
from kubetune_trainer.plan import parse_plan  # noqa: E402
from kubetune_trainer.recipe import FineTuneRecipe, RunEnv  # noqa: E402

from ._support import build_model, make_plan, use_trainer_env, write_dataset, write_plan  # noqa: E402

GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("loss-model") / "model")


def fresh_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def toy_batch(vocab: int):
    """Three rows: prompt tokens masked, one row padded at the end (masked and not attended)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, vocab, (3, 24), generator=gen)
    labels = ids.clone()
    labels[:, :9] = -100
    labels[2, 17:] = -100
    mask = torch.ones_like(ids)
    mask[2, 17:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads_of(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_loss_and_grads(model, wrapper, batch) -> None:
    ref = model(**batch).loss
    ref.backward()
    ref_grads = grads_of(model)
    out = wrapper(**batch)
    out.loss.backward()
    got = grads_of(model)
    assert wrapper.kind == "chunked"
    assert abs(out.loss.item() - ref.item()) < GRAD_TOL, (out.loss.item(), ref.item())
    assert int(out.tokens) == int((shifted_labels(batch["labels"]) != -100).sum())
    assert set(got) == set(ref_grads) and ref_grads
    worst = max((got[n] - ref_grads[n]).abs().max().item() for n in ref_grads)
    assert worst < GRAD_TOL, f"gradients differ by {worst}"


def test_chunked_loss_equals_full_logits_loss_with_gradients(model_dir):
    model = fresh_model(model_dir)
    assert_same_loss_and_grads(model, CausalLMLoss(model, chunk_tokens=7), toy_batch(model.config.vocab_size))


def test_chunked_loss_through_lora_and_gradient_checkpointing(model_dir):
    from peft import LoraConfig, get_peft_model

    model = fresh_model(model_dir)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # non-zero B so the adapters' gradients are not all trivially equal
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.train()
    assert_same_loss_and_grads(peft_model, CausalLMLoss(peft_model, chunk_tokens=5),
                               toy_batch(model.config.vocab_size))


def test_softcapped_chunks_equal_the_formula():
    gen = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(2, 9, 8, generator=gen)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[0, :3] = -100
    total, count = chunked_ce_sum(hidden, labels, head, chunk_tokens=4, softcap=5.0)
    logits = torch.tanh(head(hidden).float() / 5.0) * 5.0
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1), reduction="sum")
    assert int(count) == 15 and torch.allclose(total, expected, atol=1e-5)


class LargestVocabTensor(TorchDispatchMode):
    """Records the most token rows of any logits-shaped tensor ([..., vocab]) an op produces; lm_head's weight
    and its gradient, seen transposed as [hidden, vocab], are not logits."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.hidden, self.largest = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab
                    and tuple(t.shape) != (self.hidden, self.vocab)):
                rows = t.numel() // self.vocab
                self.largest = max(self.largest, rows)
        return out


def test_no_full_vocabulary_logits_in_forward_or_backward(model_dir):
    model = fresh_model(model_dir)
    vocab = model.config.vocab_size
    batch = toy_batch(vocab)
    tokens = batch["input_ids"].numel()
    with LargestVocabTensor(vocab, model.config.hidden_size) as spy:
        model(**batch).loss.backward()
    assert spy.largest >= tokens  # the reference path does build [tokens, vocab]: the spy sees it
    model.zero_grad(set_to_none=True)
    with LargestVocabTensor(vocab, model.config.hidden_size) as spy:
        CausalLMLoss(model, chunk_tokens=7)(**batch).loss.backward()
    assert 0 < spy.largest <= 7, f"a [{spy.largest}, vocab] tensor was materialised (chunk is 7 tokens)"


def test_chunk_size_follows_the_byte_budget():
    assert loss_mod.chunk_tokens_for(128256) == 130  # 64 MiB of fp32 logits at a 128k vocabulary
    assert loss_mod.chunk_tokens_for(128256) * 128256 * 4 <= loss_mod.CHUNK_LOGIT_BYTES
    assert loss_mod.chunk_tokens_for(10 ** 9) == loss_mod.MIN_CHUNK_TOKENS


def run_recipe(tmp_path, monkeypatch, plan: dict) -> tuple[FineTuneRecipe, dict]:
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    recipe = FineTuneRecipe(parse_plan(plan), RunEnv.from_env())
    try:
        recipe.setup()
        recipe.train()
        recipe.export()
    finally:
        recipe.cleanup()
    return recipe, json.loads((tmp_path / "out" / "final" / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_recipe_trains_the_same_with_the_chunked_loss(model_dir, tmp_path, monkeypatch, method):
    """Same first loss as transformers' loss (1e-5) and final loss within 1e-3 after 8 steps; eval too."""
    data = write_dataset(tmp_path / "d.jsonl", n=64)
    results = {}
    for kind in ("chunked", "transformers"):
        if kind == "transformers":
            monkeypatch.setattr(loss_mod, "chunked_loss_supported", lambda model: "reference run")
        run_dir = tmp_path / kind
        run_dir.mkdir()
        plan = make_plan(model_dir, data, run_dir / "out", method, maxSteps=8, learningRate=1e-3,
                         microBatchSize=4)
        recipe, metrics = run_recipe(run_dir, monkeypatch, plan)
        assert metrics["speed"]["loss"] == kind
        results[kind] = metrics
    a, b = results["chunked"], results["transformers"]
    first_a, first_b = a["history"][0]["loss"], b["history"][0]["loss"]
    assert abs(first_a - first_b) < 1e-5, (first_a, first_b)
    assert abs(a["trainLoss"] - b["trainLoss"]) < 1e-3, (a["trainLoss"], b["trainLoss"])
    assert abs(a["evalLoss"] - b["evalLoss"]) < 1e-3, (a["evalLoss"], b["evalLoss"])


class _WrappedHead(torch.nn.Linear):
    """A head that is not a plain Linear: takes the per-chunk checkpointed path (as LoRA-wrapped heads do)."""


def _fused_and_checkpointed(hidden, labels, weight, bias, *, softcap, chunk, autocast):
    """Loss and gradients (hidden, weight, bias) of the fused path and of the checkpointed per-chunk path."""
    results = []
    for cls in (torch.nn.Linear, _WrappedHead):
        head = cls(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        with torch.no_grad():
            head.weight.copy_(weight)
            if bias is not None:
                head.bias.copy_(bias)
        h = hidden.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            total, count = chunked_ce_sum(h, labels, head, chunk_tokens=chunk, softcap=softcap)
        (total * 0.5).backward()
        results.append((total.detach(), h.grad, head.weight.grad, None if bias is None else head.bias.grad))
    return results


@pytest.mark.parametrize("dtype,autocast,softcap,bias,tol", [
    (torch.float32, False, None, False, 1e-5),
    (torch.float32, False, 7.0, True, 1e-5),
    (torch.float32, True, None, True, 2e-2),  # fp32 weights, bf16 matmuls under autocast
    (torch.bfloat16, False, 5.0, False, 2e-2),  # the lean trainer's bf16 weights
])
def test_fused_linear_cross_entropy_equals_the_checkpointed_chunks(dtype, autocast, softcap, bias, tol):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 21, 16, generator=gen).to(dtype)
    labels = torch.randint(0, 90, (2, 21), generator=gen)
    labels[0, :5] = -100
    weight = (torch.randn(90, 16, generator=gen) * 0.3).to(dtype)
    b = torch.randn(90, generator=gen).to(dtype) if bias else None
    fused, reference = _fused_and_checkpointed(hidden, labels, weight, b, softcap=softcap, chunk=6, autocast=autocast)
    for got, want in zip(fused, reference):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape
        scale = max(1.0, want.float().abs().max().item())
        assert (got.float() - want.float()).abs().max().item() <= tol * scale


class WeightShapedOutputs(TorchDispatchMode):
    """Counts the distinct storages of lm_head-weight-shaped tensors that ops produce."""

    def __init__(self, shape) -> None:
        super().__init__()
        self.shape, self.storages = tuple(shape), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) == self.shape:
                self.storages.add(t.untyped_storage().data_ptr())
        return out


def test_the_lm_head_gradient_is_one_buffer_summed_in_place_over_chunks():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 90, (40,), generator=gen)
    fused = torch.nn.Linear(16, 90, bias=False)
    wrapped = _WrappedHead(16, 90, bias=False)
    for head, at_most in ((fused, 1), (wrapped, None)):
        total, _ = chunked_ce_sum(hidden, labels, head, chunk_tokens=5)  # 8 chunks
        with WeightShapedOutputs(head.weight.shape) as spy:
            total.backward()
        if at_most is None:  # the per-chunk path forms a weight-sized part per chunk: the spy sees them
            assert len(spy.storages) > 1
        else:
            assert len(spy.storages) == at_most, f"{len(spy.storages)} weight-sized tensors in backward"
