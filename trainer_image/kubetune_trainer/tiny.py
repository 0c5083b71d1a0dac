"""Tiny causal LMs and tokenizers built locally (no hub access) for tests, the demo and benchmarks.

    python -m kubetune_trainer.tiny --out DIR [--arch llama|qwen2|mistral] [--hidden 64 --layers 2]

The tokenizer is a byte-level BPE trained on a small built-in corpus (any text encodes, no
unknown tokens), with special tokens ``<s>`` (bos), ``</s>`` (eos, also ends every chat turn),
``<pad>`` and the role markers ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Its chat template
wraps each assistant turn in a ``{% generation %}`` block, so transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` works with it too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Sequence

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)  # ids 0..5 in this order
DEFAULT_VOCAB_SIZE = 768
ARCHITECTURES = ("llama", "qwen2", "mistral")

# Newlines are written as '\n' expressions: transformers renders templates with trim_blocks,
# which would eat a literal newline after a block tag.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' }}{{ message['content'] }}{{ eos_token }}{{ '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_BASE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "You are a helpful assistant. Answer the question briefly and correctly.",
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "What is the capital of France? The capital of France is Paris.",
    "Fine-tuning adapts a pretrained language model to a new task with a small dataset.",
    "Spell out the digits as words. Write the words as digits. Count the letters.",
    "Kubernetes schedules pods on nodes; a job runs until its pods complete.",
    "Hello world! How are you today? I am fine, thank you.",
    "Translate to French: good morning -> bonjour. Translate to Spanish: thank you -> gracias.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 2048. Letters: a b c d e f g h i j k l m n o p q r s t u v w x y z.",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
)


def default_corpus() -> list[str]:
    """A small deterministic corpus covering English, digits and the quickstart task words."""
    texts = list(_BASE_SENTENCES)
    for i, word in enumerate(_NUMBER_WORDS):
        texts.append(f"Spell out: {i} -> {word}. Digits: {word} -> {i}.")
        texts.append(" ".join(_NUMBER_WORDS[(i + k) % 10] for k in range(10)))
        texts.append(" ".join(str((i * 7 + k * 3) % 10) for k in range(12)))
    return texts


def build_tokenizer(out_dir: str | Path | None = None, corpus_texts: Iterable[str] | None = None,
                    vocab_size: int = DEFAULT_VOCAB_SIZE, model_max_length: int = 2048):
    """Train a small byte-level BPE tokenizer, wrap it as a transformers fast tokenizer and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(corpus_texts) if corpus_texts is not None else default_corpus()
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus a few times so merges of the task words win over rare pairs.
    core.train_from_iterator(texts * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def tiny_config(arch: str, vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, intermediate_size: int | None = None, max_positions: int = 2048,
                bos_token_id: int = 1, eos_token_id: int = 2, pad_token_id: int = 0):
    """A transformers config for a tiny decoder of the given family."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by heads {heads}")
    return classes[arch](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def build_tiny_model(out_dir: str | Path, arch: str = "llama", hidden_size: int = 64, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, intermediate_size: int | None = None,
                     max_positions: int = 2048, seed: int = 0, tokenizer=None,
                     corpus_texts: Sequence[str] | None = None) -> Path:
    """Save a randomly initialised (seeded) tiny causal LM + config + tokenizer to `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer(None, corpus_texts, model_max_length=max_positions)
    config = tiny_config(arch, len(tokenizer), hidden_size, layers, heads, kv_heads, intermediate_size,
                         max_positions, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # The default init (std 0.02) caps the logit range of a 64-wide model at ~1, so an adapter that
        # cannot touch lm_head (LoRA) could never make confident predictions. 1/sqrt(hidden) fixes that.
        with torch.no_grad():
            model.get_output_embeddings().weight.normal_(0.0, hidden_size ** -0.5)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=32, do_sample=False,
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (out / "kubetune-tiny.json").write_text(json.dumps(
        {"arch": arch, "hidden_size": hidden_size, "layers": layers, "heads": heads, "kv_heads": kv_heads,
         "seed": seed, "parameters": sum(p.numel() for p in model.parameters())}, indent=2) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build a tiny model directory."""
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--arch", default="llama", choices=ARCHITECTURES)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2 x hidden)")
    parser.add_argument("--max-positions", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-only", action="store_true", help="only build and save the tokenizer")
    args = parser.parse_args(argv)
    if args.tokenizer_only:
        build_tokenizer(args.out, model_max_length=args.max_positions)
    else:
        build_tiny_model(args.out, args.arch, args.hidden, args.layers, args.heads, args.kv_heads,
                         args.intermediate, args.max_positions, args.seed)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
