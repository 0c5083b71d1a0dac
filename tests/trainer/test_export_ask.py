"""`python -m kubetune_trainer.export.ask`: one prompt answered from an exported GGUF by llama.cpp, the same
greedy answer transformers gives from the weights it was made from; without llama_cpp, transformers answers and
the result says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.trainer

pytest.importorskip("torch")
pytest.importorskip("gguf")

from kubetune_trainer.export import ask as ask_mod  # noqa: E402
from kubetune_trainer.export.gguf_file import write_gguf  # noqa: E402

from ._support import REPO, build_model  # noqa: E402

PROMPTS = ["Spell out: 4 2", "Spell out: 9 1 7"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask")
    model = build_model(root / "model")  # wide init: distinct greedy choices, no near-ties
    return model, write_gguf(model, root / "model-f16.gguf").path


def test_llama_cpp_answers_what_transformers_answers_from_the_same_weights(exported):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (no wheel on PyPI; build it from "
                        "source to run this check)")
    from transformers import AutoTokenizer

    model, gguf = exported
    tok = AutoTokenizer.from_pretrained(str(model))
    for prompt in PROMPTS:
        got = ask_mod.ask(prompt, gguf=str(gguf), tokenizer_dir=str(model), max_new_tokens=6)
        assert got.engine == "llama.cpp" and got.note == ""
        assert got.answer == ask_mod.ask_transformers(str(model), None, tok, prompt, 6) and got.answer


def test_without_llama_cpp_transformers_answers_and_says_so(exported, monkeypatch):
    model, gguf = exported
    monkeypatch.setattr(ask_mod, "llama_cpp_available", lambda: (False, "llama_cpp is not importable (test)"))
    got = ask_mod.ask(PROMPTS[0], gguf=str(gguf), tokenizer_dir=str(model), base=str(model), max_new_tokens=6)
    assert got.engine == "transformers" and got.note.startswith("llama_cpp is not importable (test)") and got.answer
    with pytest.raises(RuntimeError, match="pass --base"):
        ask_mod.ask(PROMPTS[0], gguf=str(gguf), tokenizer_dir=str(model), max_new_tokens=6)


def test_the_command_prints_one_json_object(exported):
    model, gguf = exported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "trainer_image"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-m", "kubetune_trainer.export.ask", "--gguf", str(gguf), "--tokenizer",
                             str(model), "--base", str(model), "--prompt", PROMPTS[1], "--max-new-tokens", "4",
                             "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["prompt"] == PROMPTS[1] and answer["engine"] in ("llama.cpp", "transformers")
