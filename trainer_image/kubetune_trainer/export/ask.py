"""Ask the exported GGUF one question through llama.cpp (llama-cpp-python): greedy decoding of the prompt rendered
with the model's own chat template, which is what a llama.cpp or Ollama server loading the file answers.

    python -m kubetune_trainer.export.ask --gguf final/gguf/model-f16.gguf --tokenizer final/adapter \\
        --prompt "Spell out: 4 0 2" [--base MODEL_DIR --adapter final/adapter] [--json]

llama-cpp-python has no wheel on PyPI (it builds from source). Where it is not importable and `--base` is given,
the answer comes from transformers instead (the base model plus `--adapter`, the weights the GGUF was made from),
and the output says so; without `--base` the command fails with that reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Sequence

LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers"


@dataclass(frozen=True)
class Answer:
    """What the model answered and which engine ran it (`note` says why when it is not llama.cpp)."""

    prompt: str
    answer: str
    engine: str
    note: str = ""


def llama_cpp_available() -> tuple[bool, str]:
    """(whether llama_cpp imports, the reason when it does not)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable here"
        return False, f"llama_cpp is not importable ({type(exc).__name__}: {exc})"
    return True, ""


def ask_gguf(gguf: str, tokenizer, prompt: str, max_new_tokens: int = 32, threads: int = 2) -> str:
    """Greedy answer of the GGUF model to one user prompt. The prompt's token ids come from the model's tokenizer
    and chat template, exactly as the trainer encodes a user turn; decoding stops at end-of-generation."""
    import llama_cpp

    from kubetune_trainer.generate import prompt_ids

    ids = prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=max(128, len(ids) + max_new_tokens + 8), n_threads=threads,
                          verbose=False)
    stop = {llm.token_eos()}
    if tokenizer.eos_token_id is not None:
        stop.add(int(tokenizer.eos_token_id))
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if int(token) in stop:
            break
        out.append(int(token))
        if len(out) >= max_new_tokens:
            break
    if hasattr(llm, "close"):
        llm.close()
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def ask_transformers(base: str, adapter: str | None, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy answer of the base model (plus the adapter) through transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.generate import generate_replies

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return generate_replies(model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens)[0]


def ask(prompt: str, *, gguf: str, tokenizer_dir: str, base: str | None = None, adapter: str | None = None,
        max_new_tokens: int = 32) -> Answer:
    """The GGUF's answer through llama.cpp, or (llama_cpp not importable, `base` given) transformers' answer with
    the reason in `note`. RuntimeError when neither can run."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    available, reason = llama_cpp_available()
    if available:
        return Answer(prompt, ask_gguf(gguf, tokenizer, prompt, max_new_tokens), LLAMA_CPP)
    if not base:
        raise RuntimeError(f"{reason}; pass --base (and --adapter) to answer through transformers instead")
    return Answer(prompt, ask_transformers(base, adapter, tokenizer, prompt, max_new_tokens), TRANSFORMERS,
                  note=f"{reason}: answered through transformers from the weights the GGUF was made from")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m kubetune_trainer.export.ask", description=__doc__.splitlines()[0])
    p.add_argument("--gguf", required=True, help="the exported GGUF file")
    p.add_argument("--tokenizer", required=True, help="directory with the tokenizer the model was trained with")
    p.add_argument("--prompt", required=True, help="the user prompt")
    p.add_argument("--base", help="base model directory (transformers fallback without llama_cpp)")
    p.add_argument("--adapter", help="adapter directory (transformers fallback)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        answer = ask(args.prompt, gguf=args.gguf, tokenizer_dir=args.tokenizer, base=args.base, adapter=args.adapter,
                     max_new_tokens=args.max_new_tokens)
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(answer)))
    else:
        if answer.note:
            print(answer.note)
        print(f"{answer.engine}: {answer.prompt!r} -> {answer.answer!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
