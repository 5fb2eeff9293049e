"""The GRPO demo's task (data/arithmetic.py, asset:arithmetic): the same files on every machine, the
held-out questions never trained on, every answer right, and the built-in rewards scoring it as the
recipe expects; the packaged grpo-qwen2.5 recipe loads it."""

import json
import re

from minilora.data import arithmetic, assets
from minilora.recipe import load_recipe
from minilora.training.rewards import BUILTIN


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_task_is_seeded_disjoint_and_its_answers_right(tmp_path):
    train, test = arithmetic.write_task(tmp_path / "a", train_size=300, test_size=40)
    again = arithmetic.write_task(tmp_path / "b", train_size=300, test_size=40)
    assert train.read_bytes() == again[0].read_bytes() and test.read_bytes() == again[1].read_bytes()
    rows, held_out = read(train), read(test)
    assert (len(rows), len(held_out)) == (300, 40)
    questions = [r["prompt"][1]["content"] for r in rows]
    assert len(set(questions)) == 300 and not set(questions) & {r["prompt"][1]["content"] for r in held_out}
    kinds = {"+": 0, "*": 0}
    for r in rows + held_out:
        system, user = r["prompt"]
        assert system == {"role": "system", "content": arithmetic.SYSTEM} and user["role"] == "user"
        a, op, b = re.fullmatch(r"What is (\d+) ([+*]) (\d+)\?", user["content"]).groups()
        a, b = int(a), int(b)
        assert (100 <= a <= 999 and 100 <= b <= 999) if op == "+" else (10 <= a <= 99 and 2 <= b <= 9)
        assert r["answer"] == str(a + b if op == "+" else a * b)
        kinds[op] += 1
    assert min(kinds.values()) > 0.4 * len(rows + held_out)  # both kinds, about evenly


def test_the_built_in_rewards_score_the_tasks_answers(tmp_path):
    row = read(arithmetic.write_task(tmp_path, train_size=5, test_size=1)[1])[0]
    completions = [f"<answer>{row['answer']}</answer>", f"The answer is <answer>{row['answer']}</answer>.",
                   f"{row['answer']}", "<answer>0</answer>"]
    prompts, answers = [row["prompt"]] * 4, [row["answer"]] * 4
    assert BUILTIN["exact_match"](prompts, completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    assert BUILTIN["answer_format"](prompts, completions, answer=answers) == [1.0, 0.0, 0.0, 1.0]


def test_the_packaged_grpo_recipe_reads_the_task(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "CACHE", tmp_path)
    monkeypatch.setattr(assets, "qwen25_05b", lambda: tmp_path / "qwen.gguf")
    recipe = load_recipe("grpo-qwen2.5")
    assert (recipe.data.train, recipe.data.test) == (str(tmp_path / "arithmetic" / "train.jsonl"),
                                                     str(tmp_path / "arithmetic" / "test.jsonl"))
    assert len(read(tmp_path / "arithmetic" / "test.jsonl")) == 64
    t = recipe.train
    assert (t.objective, t.reward_funcs, t.batch_size % t.num_generations) == (
        "grpo", ["exact_match", "answer_format"], 0)
