"""GGUF f16 export and the Ollama Modelfile: the file read back with the gguf library holds every weight (in
llama.cpp's layout), the tokenizer and the chat template; the Modelfile follows Ollama's documented grammar and
its TEMPLATE renders the same prompt as the model's chat template; an unsupported family fails the export only.
With llama-cpp-python installed, llama.cpp's greedy tokens equal transformers' on the same prompts."""

from __future__ import annotations

import json
import re
import shlex

import pytest

pytestmark = pytest.mark.trainer

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")
transformers = pytest.importorskip("transformers")

from kubetune_trainer import cli, tiny  # noqa: E402
from kubetune_trainer.export import gguf_file  # noqa: E402
from kubetune_trainer.export.gguf_file import (UnsupportedArchitecture, gguf_architecture, permute_qk,  # noqa: E402
                                               unpermute_qk, write_gguf)
from kubetune_trainer.export.modelfile import ModelfileSpec, ollama_template, render_modelfile  # noqa: E402

from ._support import build_model, make_plan, read_summary, use_trainer_env, write_dataset, write_plan  # noqa: E402

# Ollama's Modelfile reference: "# comment" lines and "INSTRUCTION arguments"; instructions are case-insensitive;
# multi-line arguments are wrapped in triple quotes; PARAMETER takes a name and a value.
INSTRUCTIONS = {"FROM", "PARAMETER", "TEMPLATE", "SYSTEM", "ADAPTER", "LICENSE", "MESSAGE", "REQUIRES"}
PARAMETERS = {"mirostat": float, "mirostat_eta": float, "mirostat_tau": float, "num_ctx": int,
              "repeat_last_n": int, "repeat_penalty": float, "temperature": float, "seed": int, "stop": str,
              "num_predict": int, "top_k": int, "top_p": float, "min_p": float}


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) pairs; raises on anything the documented grammar does not allow."""
    out, i, lines = [], 0, text.splitlines()
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        word, _, arg = line.partition(" ")
        word = word.upper()
        assert word in INSTRUCTIONS, f"unknown instruction {word!r}"
        arg = arg.strip()
        if arg.startswith('"""'):
            body = arg[3:]
            while '"""' not in body:
                assert i < len(lines), "unterminated triple-quoted argument"
                body += "\n" + lines[i]
                i += 1
            body, _, rest = body.partition('"""')
            assert not rest.strip(), f"text after a closing triple quote: {rest!r}"
            arg = body
        out.append((word, arg))
    froms = [a for w, a in out if w == "FROM"]
    assert len(froms) == 1, "FROM is required (once here)"
    for word, arg in out:
        if word == "PARAMETER":
            name, value = arg.split(None, 1)
            assert name in PARAMETERS, f"unknown PARAMETER {name}"
            PARAMETERS[name](shlex.split(value)[0] if PARAMETERS[name] is str else value)
    return out


def go_render(template: str, system: str, prompt: str) -> str:
    """The two Go-template constructs the generated TEMPLATE uses: `{{ if .System }}...{{ end }}`, `{{ .X }}`."""
    def cond(m):
        return m.group(1) if system else ""

    text = re.sub(r"\{\{ if \.System \}\}(.*?)\{\{ end \}\}", cond, template, flags=re.S)
    assert "{{ if" not in text and "{{ end" not in text
    return text.replace("{{ .System }}", system).replace("{{ .Prompt }}", prompt)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def test_permutation_moves_rotary_halves_and_inverts():
    rows = np.arange(8, dtype=np.float32).reshape(8, 1)  # 2 heads x 4 rows: [h0: 0 1 2 3 | h1: 4 5 6 7]
    # per head: the first half [0 1] and second half [2 3] are interleaved -> 0 2 1 3
    assert permute_qk(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    w = np.random.default_rng(0).standard_normal((16, 6)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(w, 4, 2), 4, 2), w)


def test_unsupported_family_is_refused_by_name():
    with pytest.raises(UnsupportedArchitecture, match=r"not 'gpt2'.*adapter and merged weights are exported"):
        gguf_architecture("gpt2")


def _field(reader, key):
    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    return f.parts[f.data[0]][0]


@pytest.mark.parametrize("arch,gguf_arch", [("llama", "llama"), ("mistral", "llama"), ("qwen2", "qwen2")])
def test_gguf_reads_back_with_every_weight_the_tokenizer_and_the_template(tmp_path, arch, gguf_arch):
    model_dir = tiny.build_tiny_model(tmp_path / arch, arch=arch, hidden_size=32, layers=2)
    result = write_gguf(model_dir, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(str(result.path))
    cfg = json.loads((model_dir / "config.json").read_text())
    assert _field(reader, "general.architecture") == gguf_arch
    assert _field(reader, f"{gguf_arch}.block_count") == 2
    assert _field(reader, f"{gguf_arch}.attention.head_count") == cfg["num_attention_heads"]
    assert _field(reader, f"{gguf_arch}.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    assert _field(reader, "tokenizer.chat_template") == tok.chat_template
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == cfg["vocab_size"] == len(tok)  # one entry per embedding row
    texts = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert texts == tok.convert_ids_to_tokens(list(range(len(tok))))

    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch.upper()), 2)
    hf = {names.get_name(k, try_suffixes=(".weight", ".bias")): (k, v.numpy()) for k, v in model.state_dict().items()}
    stored = {t.name: t for t in reader.tensors}
    assert set(stored) == set(hf) and result.tensors == len(hf)
    for name, (hf_name, value) in hf.items():
        t = stored[name]
        data = np.array(t.data).reshape(value.shape)
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if value.ndim == 1 else gguf.GGMLQuantizationType.F16)
        if gguf_arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = unpermute_qk(data, cfg["num_attention_heads"])
        elif gguf_arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = unpermute_qk(data, cfg["num_attention_heads"], cfg["num_key_value_heads"])
        np.testing.assert_allclose(data.astype(np.float32), value, rtol=1e-3, atol=1e-3, err_msg=hf_name)


def test_modelfile_follows_the_grammar_and_its_template_renders_the_chat_template(tokenizer):
    template = ollama_template(tokenizer)
    text = render_modelfile(ModelfileSpec("model-f16.gguf", template, "Be brief.", temperature=0.2, top_p=0.8,
                                          num_ctx=512, stop=[tokenizer.eos_token]))
    parsed = parse_modelfile(text)
    assert ("FROM", "./model-f16.gguf") in parsed and ("SYSTEM", "Be brief.") in parsed
    params = [a for w, a in parsed if w == "PARAMETER"]
    assert params == ["temperature 0.2", "top_p 0.8", "num_ctx 512", f'stop "{tokenizer.eos_token}"']
    (tmpl,) = [a for w, a in parsed if w == "TEMPLATE"]
    bos = tokenizer.bos_token
    for system in ("", "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": "Spell out: 4 2"}]
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert bos + go_render(tmpl, system, "Spell out: 4 2") == want


def test_a_run_exports_gguf_and_modelfile_and_an_unsupported_family_fails_the_export_only(tmp_path, monkeypatch):
    model_dir, data = build_model(tmp_path / "model"), write_dataset(tmp_path / "data.jsonl", n=60)
    out = tmp_path / "out"
    plan = make_plan(model_dir, data, out, "lora", maxSteps=6)
    plan["output"]["mergeAdapter"] = True
    plan["output"]["export"] = {"gguf": "f16", "modelfile": True, "system": "", "temperature": 0.0, "topP": 0.9,
                                "numCtx": 0}
    use_trainer_env(monkeypatch, tmp_path, write_plan(tmp_path / "plan.json", plan))
    assert cli.run_worker() == 0
    summary = read_summary(tmp_path)
    assert summary["export"] == {"architecture": "llama", "type": "f16", "tensors": 21}
    path = out / "final" / "gguf" / "model-f16.gguf"
    assert summary["artifacts"]["gguf"] == str(path)
    assert summary["artifacts"]["modelfile"] == str(out / "final" / "gguf" / "Modelfile")
    parse_modelfile((out / "final" / "gguf" / "Modelfile").read_text())
    # The GGUF holds the merged (trained) weights, not the base ones.
    reader = gguf.GGUFReader(str(path))
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out / "final" / "merged"), dtype=torch.float32)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    want = merged.model.layers[0].mlp.down_proj.weight.detach().numpy()
    got = np.array(down.data).reshape(want.shape).astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert not np.allclose(want, base.model.layers[0].mlp.down_proj.weight.detach().numpy(), atol=1e-4)

    # Same run for a family the converter does not know (simulated by removing llama from its table).
    monkeypatch.setattr(gguf_file, "ARCHITECTURES", {"qwen2": "QWEN2"})
    out2 = tmp_path / "out2"
    plan["output"]["uri"] = str(out2)
    write_plan(tmp_path / "plan.json", plan)
    assert cli.run_worker() == 0
    summary = read_summary(tmp_path)
    assert summary["status"] == "Succeeded" and "not 'llama'" in summary["export"]["error"]
    assert "gguf" not in summary["artifacts"] and summary["artifacts"]["merged"]
    assert (out2 / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert (out2 / "final" / "merged" / "config.json").is_file()


# f16 weights move the tiny models' logits by well under this; llama.cpp's greedy token must be transformers'
# argmax wherever the top-2 margin is larger, and within it of the maximum at near-ties.
F16_TOLERANCE = 0.05


def _tiny_model(out, arch: str):
    """A tiny model of `arch` with the wide initialization of _support.build_model (distinct greedy choices)."""
    tok = tiny.build_tokenizer(None, model_max_length=256)
    cfg = tiny.tiny_config(arch, len(tok), 64, 2, 4, 2, None, 256, tok.bos_token_id, tok.eos_token_id,
                           tok.pad_token_id)
    cfg.initializer_range = 0.3
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_cpp_greedy_tokens_equal_transformers(tmp_path, arch):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (no wheel on PyPI; "
                                    "build it from source to run this check)")
    model_dir = _tiny_model(tmp_path / "model", arch)
    path = write_gguf(model_dir, tmp_path / "m.gguf").path
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)
    prompts = ["Spell out: 4 2", "Spell out: 9 1 7", "Digits: three five", "What is the capital of France?"]
    steps = exact = 0
    for prompt in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(int(token))
            if len(got) == 8:
                break
        # transformers' fp32 logits along llama.cpp's own continuation (teacher forcing)
        with torch.no_grad():
            logits = model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
        for step, token in enumerate(got):
            best = float(logits[step].max())
            assert float(logits[step, token]) >= best - F16_TOLERANCE, (prompt, step, got, best,
                                                                        float(logits[step, token]))
            steps += 1
            exact += int(token == int(logits[step].argmax()))
    assert exact >= 0.9 * steps, f"only {exact} of {steps} greedy tokens equal transformers' argmax"


def test_q8_0_quantizes_every_whole_block_matrix_within_its_scale(tmp_path):
    """spec.output.export.gguf q8_0: matrices whose rows are whole 32-blocks are stored Q8_0 by the gguf library's
    quantizer (about 0.53 of f16's bytes for them), the rest as before; dequantized, every weight is within half a
    quantization step (its block's absmax / 127 / 2) of the model's, plus what storing that step in f16 costs
    (up to 127 x its relative rounding, 2**-11)."""
    model_dir = tiny.build_tiny_model(tmp_path / "llama", arch="llama", hidden_size=64, layers=2)
    f16 = write_gguf(model_dir, tmp_path / "f16.gguf")
    q8 = write_gguf(model_dir, tmp_path / "q8.gguf", outtype="q8_0")
    reader = gguf.GGUFReader(str(q8.path))
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    hf = {names.get_name(k, try_suffixes=(".weight", ".bias")): (k, v.numpy()) for k, v in model.state_dict().items()}
    quantized = 0
    for t in reader.tensors:
        hf_name, value = hf[t.name]
        if value.ndim == 2 and value.shape[-1] % 32 == 0:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
            data = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(value.shape)
            if hf_name.endswith("q_proj.weight"):
                data = unpermute_qk(data, model.config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                data = unpermute_qk(data, model.config.num_attention_heads, model.config.num_key_value_heads)
            blocks = value.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127.0
            error = np.abs(data.reshape(-1, 32) - blocks)
            assert (error <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all(), (hf_name, float((error / step).max()))
            quantized += 1
        else:
            assert t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16), t.name
    assert quantized >= 2 * 7  # every attention and MLP projection of both layers
    assert q8.path.stat().st_size < 0.75 * f16.path.stat().st_size


PROMPTS = ["Spell out: 4 2", "Spell out: 9 1 7", "Digits: three five", "What is the capital of France?"]


def _llama_without_repack(llama_cpp, monkeypatch, path):
    """llama.cpp on a quantized file with use_extra_bufts off (a documented llama_model_params field): its CPU
    "extra buffer types" repack Q8_0/Q4_K weights for AVX-512/AMX kernels, and on these tiny models' shapes that
    path crashes the process (the f16 file, and the quantized files without repacking, give the same tokens)."""
    default_params = llama_cpp.llama_model_default_params

    def without_repack():
        params = default_params()
        params.use_extra_bufts = False
        return params
    monkeypatch.setattr(llama_cpp.llama.llama_cpp, "llama_model_default_params", without_repack)
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False)


def _greedy_agreement(llm, model_dir) -> tuple[int, int]:
    """(steps where llama.cpp's greedy token is transformers' fp32 argmax along llama.cpp's own continuation,
    steps): 8 tokens for each of PROMPTS."""
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    steps = exact = 0
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=True)["input_ids"]
        got = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got.append(int(token))
            if len(got) == 8:
                break
        with torch.no_grad():
            logits = model(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1]
        steps += len(got)
        exact += sum(int(token == int(logits[i].argmax())) for i, token in enumerate(got))
    return exact, steps


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_runs_the_q8_0_file_close_to_transformers(tmp_path, arch, monkeypatch):
    """The q8_0 file loads in llama.cpp, which then answers like the fp32 model: its greedy token is transformers'
    argmax at >= 75% of the steps (the stated q8_0 tolerance; f16 is held to 90% with a logit margin above)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (no wheel on PyPI; "
                                    "build it from source to run this check)")
    model_dir = _tiny_model(tmp_path / "model", arch)
    path = write_gguf(model_dir, tmp_path / "m.gguf", outtype="q8_0").path
    exact, steps = _greedy_agreement(_llama_without_repack(llama_cpp, monkeypatch, path), model_dir)
    assert steps == 32 and exact >= 0.75 * steps, f"{exact} of {steps} greedy tokens equal transformers' argmax"


def test_q4_k_m_without_llama_cpp_fails_the_export_with_the_reason(tmp_path, monkeypatch):
    """q4_k_m needs llama.cpp's quantizer: without llama-cpp-python the export (only) fails, saying what to do,
    and no half-written file or f16 intermediate is left."""
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    model_dir = tiny.build_tiny_model(tmp_path / "llama", arch="llama", hidden_size=32, layers=1)
    with pytest.raises(gguf_file.QuantizerUnavailable, match="llama-cpp-python.*use gguf: f16 or q8_0"):
        write_gguf(model_dir, tmp_path / "out" / "model-q4_k_m.gguf", outtype="q4_k_m")
    assert list((tmp_path / "out").iterdir()) == []


def test_q4_k_m_is_quantized_by_llama_cpp_and_answers_close_to_transformers(tmp_path, monkeypatch):
    """With llama-cpp-python: the file holds llama.cpp's Q4_K matrices (file type MOSTLY_Q4_K_M), is under 0.45 of
    the f16 file, and llama.cpp's greedy token is transformers' argmax on >= 60% of the steps (the stated q4_k_m
    tolerance on a random 256-wide model, whose logits are close together)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (no wheel on PyPI; "
                                    "build it from source to run this check)")
    model_dir = tiny.build_tiny_model(tmp_path / "llama", arch="llama", hidden_size=256, layers=2)
    f16 = write_gguf(model_dir, tmp_path / "m-f16.gguf")
    q4 = write_gguf(model_dir, tmp_path / "m-q4_k_m.gguf", outtype="q4_k_m")
    reader = gguf.GGUFReader(str(q4.path))
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert any(t.tensor_type == gguf.GGMLQuantizationType.Q4_K for t in reader.tensors)
    assert q4.path.stat().st_size < 0.45 * f16.path.stat().st_size
    assert not list(tmp_path.glob("*.f16-source.gguf"))
    exact, steps = _greedy_agreement(_llama_without_repack(llama_cpp, monkeypatch, q4.path), model_dir)
    assert steps == 32 and exact >= 0.6 * steps, f"{exact} of {steps} greedy tokens equal transformers' argmax"
