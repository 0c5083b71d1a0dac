"""Tiny local model and tokenizer builder (kubetune_trainer.tiny)."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kubetune_trainer import tiny  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Spell out: 3 1 4"},
    {"role": "assistant", "content": "three one four"},
    {"role": "user", "content": "Again: 2"},
    {"role": "assistant", "content": "two"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tiny.build_tokenizer(out)
    return transformers.AutoTokenizer.from_pretrained(str(out))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_roundtrip_and_special_tokens(tokenizer):
    assert 512 <= len(tokenizer) <= 1024
    assert tokenizer.bos_token == tiny.BOS and tokenizer.eos_token == tiny.EOS and tokenizer.pad_token == tiny.PAD
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    text = "Ünïcode and emoji 🙂 still encode: 12345 xyz"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    for marker in tiny.ROLE_TOKENS:
        assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1


def test_chat_template_renders_turns(tokenizer):
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert text == ("<s><|system|>\nBe brief.</s>\n<|user|>\nSpell out: 3 1 4</s>\n"
                    "<|assistant|>\nthree one four</s>\n<|user|>\nAgain: 2</s>\n<|assistant|>\ntwo</s>\n")
    prompt = tokenizer.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>\n")


def test_generation_blocks_give_assistant_mask(tokenizer):
    out = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(kept) == "three one four</s>two</s>"


def test_model_is_deterministic_small_and_fast(tmp_path):
    a = tiny.build_tiny_model(tmp_path / "a", arch="llama", seed=3)
    b = tiny.build_tiny_model(tmp_path / "b", arch="llama", seed=3)
    c = tiny.build_tiny_model(tmp_path / "c", arch="llama", seed=4, tokenizer=tiny.build_tokenizer())
    assert _sha(a / "model.safetensors") == _sha(b / "model.safetensors")
    assert _sha(a / "tokenizer.json") == _sha(b / "tokenizer.json")
    assert _sha(a / "model.safetensors") != _sha(c / "model.safetensors")
    meta = json.loads((a / "kubetune-tiny.json").read_text())
    assert meta["parameters"] < 500_000

    model = transformers.AutoModelForCausalLM.from_pretrained(str(a))
    tok = transformers.AutoTokenizer.from_pretrained(str(a))
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    ids = torch.tensor([tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]] * 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is 2 shared cores: 2 threads under load are slower than 1
    try:
        model(input_ids=ids, labels=ids).loss.backward()  # warm-up
        opt.step(); opt.zero_grad()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward(); opt.step(); opt.zero_grad()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(loss)
    # ~30 ms on an idle core; the bound leaves room for a heavily shared machine.
    assert min(times) < 0.5, f"a CPU training step took {min(times):.3f}s"


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_load(tmp_path, arch):
    out = tiny.build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, layers=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == arch and model.config.num_hidden_layers == 1


def test_unknown_arch_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        tiny.build_tiny_model(tmp_path, arch="gpt-nope")


def test_cli_builds_model(tmp_path):
    out = tmp_path / "cli"
    # In-process (a subprocess would spend ~20 s importing torch on the shared CI box).
    assert tiny.main(["--out", str(out), "--arch", "llama", "--hidden", "32", "--layers", "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 1
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
