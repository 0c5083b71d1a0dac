"""Regenerate quickstart.jsonl: the quickstart's toy task, deterministic, in OpenAI `messages` format.

    python examples/data/make_quickstart.py > examples/data/quickstart.jsonl

"Spell out: 3 1 4" -> "three one four", for 600 distinct random strings of 3-5 digits. A randomly initialised
tiny model (kubetune_trainer.tiny) answers it with nonsense; the quickstart's LoRA learns it in a few hundred CPU
steps. Every digit and every number word is one token of the tiny tokenizer, so the answer is a position-by-
position lookup: something a two-layer model can learn, and something exact match checks without judgement. The
held-out prompts (evalSplit) are digit strings the model never saw in training, so exact match on them measures
the mapping it learned, not memorised answers.
"""

import json
import random

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def examples(count: int = 600, seed: int = 7):
    """Yield `count` examples with distinct prompts."""
    rng = random.Random(seed)
    seen = set()
    while len(seen) < count:
        digits = tuple(rng.randrange(10) for _ in range(rng.randint(3, 5)))
        if digits in seen:
            continue
        seen.add(digits)
        prompt = "Spell out: " + " ".join(str(d) for d in digits)
        answer = " ".join(WORDS[d] for d in digits)
        yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


if __name__ == "__main__":
    for example in examples():
        print(json.dumps(example))
