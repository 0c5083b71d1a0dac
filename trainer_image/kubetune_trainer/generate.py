"""Greedy generations from a base model and from the same model with a trained adapter, side by side.

    python -m kubetune_trainer.generate --base MODEL_DIR --adapter ADAPTER_DIR --prompt "Spell out: 7"
    python -m kubetune_trainer.generate --base MODEL_DIR --adapter ADAPTER_DIR --dataset data.jsonl --num 3 --json

Prompts are user turns rendered with the tokenizer's chat template (the same template and the same
format conversion the trainer used, so `--dataset` takes any file the trainer accepts; the prompt is
the conversation up to its last assistant turn, and that turn is shown as the expected answer).
`--held-out` takes the examples the trainer held out for evaluation (same split: `--eval-split`, `--seed`).
Output: a readable block per prompt, or with `--json` one JSON list of
`{"prompt", "expected", "base", "adapter"}` objects. Used by the local demo and the e2e tests.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Sequence


@dataclass
class Sample:
    """One prompt and what each model answered."""

    prompt: str
    expected: str = ""
    base: str = ""
    adapter: str = ""


def prompts_from_dataset(path: str, num: int, held_out: bool = False, eval_split: float = 0.1,
                         seed: int = 42) -> list[Sample]:
    """The first `num` chat examples of a dataset (or of its held-out split) as prompts with expected answers."""
    from kubetune_trainer.data import load_examples
    from kubetune_trainer.data.split import split_by_hash

    examples = load_examples(path)
    if held_out:
        _, evals = split_by_hash(examples, eval_split, seed)
        examples = evals or examples
    samples = []
    for ex in examples:
        if ex.is_text or not ex.messages or ex.messages[-1].role != "assistant":
            continue
        users = [m.content for m in ex.messages[:-1] if m.role == "user"]
        if users:
            samples.append(Sample(prompt=users[-1], expected=ex.messages[-1].content))
        if len(samples) >= num:
            break
    return samples


def render_prompt(tokenizer, prompt: str) -> str:
    """The prompt as the trainer formats a user turn, followed by the assistant's generation prompt."""
    from kubetune_trainer.data import ensure_chat_template

    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def render_messages(tokenizer, messages: Sequence[dict]) -> str:
    """A conversation (role/content dicts, ending before the answer) as the trainer formats it, followed by the
    assistant's generation prompt."""
    from kubetune_trainer.data import ensure_chat_template

    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, item: Sequence[dict] | str) -> list[int]:
    """Token ids of a prompt as the trainer encodes it: a conversation through the chat template, or a plain-text
    prompt (dataset.promptTemplate) as BOS + text."""
    if isinstance(item, str):
        ids = list(tokenizer(item, add_special_tokens=False)["input_ids"])
        return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids
    return list(tokenizer(render_messages(tokenizer, item), add_special_tokens=False)["input_ids"])


def generate_replies(model, tokenizer, prompts: Sequence[Sequence[dict] | str], max_new_tokens: int,
                     temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The model's answer to each prompt (a conversation ending before the answer, or a plain-text prompt): greedy
    at temperature 0, else sampled after seeding with `seed` (the same draws for every model). Special tokens
    removed, whitespace trimmed."""
    import torch

    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    if temperature > 0:
        torch.manual_seed(seed)
    out = []
    for item in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, item)], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **sampling)
        out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return out


def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each user prompt (special tokens removed, whitespace trimmed)."""
    return generate_replies(model, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens)


def run(base: str, adapter: str | None, samples: list[Sample], max_new_tokens: int = 24) -> list[Sample]:
    """Fill in base (and, with an adapter, adapter) generations for every sample."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    prompts = [s.prompt for s in samples]
    for s, text in zip(samples, generate_texts(model, tokenizer, prompts, max_new_tokens)):
        s.base = text
    if adapter:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(model, adapter)
        tuned.eval()
        for s, text in zip(samples, generate_texts(tuned, tokenizer, prompts, max_new_tokens)):
            s.adapter = text
    return samples


def format_samples(samples: list[Sample], with_adapter: bool) -> str:
    """Readable before/after blocks."""
    lines = []
    for i, s in enumerate(samples, 1):
        lines.append(f"[{i}] prompt:   {s.prompt!r}")
        if s.expected:
            lines.append(f"    expected: {s.expected!r}")
        lines.append(f"    before:   {s.base!r}   (base model)")
        if with_adapter:
            lines.append(f"    after:    {s.adapter!r}   (base + adapter)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(prog="python -m kubetune_trainer.generate", description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="base model directory (config, weights, tokenizer)")
    p.add_argument("--adapter", help="adapter directory (adapter_config.json + weights); omit for the base only")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a user prompt (repeatable)")
    src.add_argument("--dataset", help="take prompts and expected answers from this dataset file")
    p.add_argument("--num", type=int, default=3, help="how many dataset prompts (default 3)")
    p.add_argument("--held-out", action="store_true", help="take the dataset's held-out eval examples")
    p.add_argument("--eval-split", type=float, default=0.1, help="evalSplit of the run (for --held-out)")
    p.add_argument("--seed", type=int, default=42, help="training.seed of the run (for --held-out)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    args = p.parse_args(argv)
    if args.dataset:
        samples = prompts_from_dataset(args.dataset, args.num, args.held_out, args.eval_split, args.seed)
        if not samples:
            print(f"no chat examples with an assistant answer in {args.dataset}", file=sys.stderr)
            return 2
    else:
        samples = [Sample(prompt=text) for text in args.prompt]
    samples = run(args.base, args.adapter, samples, args.max_new_tokens)
    if args.json:
        print(json.dumps([asdict(s) for s in samples], indent=1))
    else:
        print(format_samples(samples, bool(args.adapter)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
