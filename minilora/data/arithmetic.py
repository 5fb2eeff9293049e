"""A verifiable task made here, with no download: arithmetic questions whose answer is checked exactly.

Each record is a GRPO prompt (a conversation: a system message asking for the final answer inside
<answer></answer>, and the question) with its `answer`, which the `exact_match` reward compares to
the text the model puts inside the tags. Two kinds, drawn evenly: three-digit addition (417 + 385)
and a two-digit number times a one-digit one (47 * 8). The questions come from a seeded generator,
so every machine writes the same files; a question in the test file never appears in the train file.

    asset:arithmetic/train.jsonl, asset:arithmetic/test.jsonl      (see assets.py)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from ..formats.atomic import write_file

SYSTEM = "Reply with the final answer inside <answer></answer>."


def question(rng: random.Random) -> tuple[str, int]:
    """One question and its answer: "What is 417 + 385?" or "What is 47 * 8?", evenly."""
    if rng.random() < 0.5:
        a, b = rng.randint(100, 999), rng.randint(100, 999)
        return f"What is {a} + {b}?", a + b
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"What is {a} * {b}?", a * b


def records(n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[dict]:
    """n prompt records {"prompt": [system, user], "answer": "802"}, distinct questions, none in `exclude`."""
    rng, seen, out = random.Random(seed), set(exclude), []
    while len(out) < n:
        text, answer = question(rng)
        if text in seen:
            continue
        seen.add(text)
        out.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                    "answer": str(answer)})
    return out


def write_task(folder: Path, train_size: int = 2000, test_size: int = 64) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl in `folder` (written once; the same on every machine)."""
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    if not (train.exists() and test.exists()):
        held_out = records(test_size, seed=1)
        questions = {r["prompt"][1]["content"] for r in held_out}
        for path, rows in ((test, held_out), (train, records(train_size, seed=0, exclude=questions))):
            data = "".join(json.dumps(r) + "\n" for r in rows).encode()
            write_file(path, lambda f, data=data: f.write(data))
    return train, test
