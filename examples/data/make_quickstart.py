"""Regenerate quickstart.jsonl: a deterministic toy task a tiny model learns in ~100-200 CPU steps.

    python examples/data/make_quickstart.py > examples/data/quickstart.jsonl

Two inverse lookup tasks on 3-6 random digits, in OpenAI `messages` format:
"Spell out: 3 1 4" -> "three one four" and "Digits: three one four" -> "3 1 4".
"""

import json
import random

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def examples(count: int = 480, seed: int = 7):
    """Yield `count` distinct examples."""
    rng = random.Random(seed)
    seen = set()
    while len(seen) < count:
        digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
        spell = rng.random() < 0.5
        key = (spell, tuple(digits))
        if key in seen:
            continue
        seen.add(key)
        numbers = " ".join(str(d) for d in digits)
        words = " ".join(WORDS[d] for d in digits)
        prompt, answer = (f"Spell out: {numbers}", words) if spell else (f"Digits: {words}", numbers)
        yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


if __name__ == "__main__":
    for example in examples():
        print(json.dumps(example))
