"""Reward functions for GRPO: a few built-ins, the user's own by "module:function", and scoring a
batch of completions with all of them.

A reward function has TRL's signature: f(prompts, completions, **columns) -> one float per
completion, where prompts[i] is the prompt completions[i] answers (each prompt repeated once per
generation) and each column of the dataset other than the prompt arrives as a keyword argument, a
list aligned with the completions. Functions should take **kwargs, since every column is passed.

The built-ins: `exact_match` (the text inside the last <answer>...</answer> against the `answer`
column), `answer_format` (the completion is exactly one <answer>...</answer>, `regex_format` for any
pattern) and `length_reward` (closeness to a target length in characters).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError, TrainingError

RewardFn = Callable[..., list[float]]
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The text inside the last <answer>...</answer>, stripped; None where there is none."""
    found = ANSWER.findall(text)
    return found[-1].strip() if found else None


def text_of(completion: str | list[dict[str, str]]) -> str:
    """A completion's text: itself, or the content of its last message (TRL passes a conversation's
    completions as [{"role": "assistant", "content": text}])."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def exact_match(prompts: list[Any], completions: list[Any], answer: list[Any], **columns: Any) -> list[float]:
    """1.0 where the extracted answer equals the row's `answer` (both as stripped strings), else 0.0."""
    return [float(extract_answer(text_of(c)) == str(a).strip()) for c, a in zip(completions, answer)]


def regex_format(pattern: str, name: str = "regex_format") -> RewardFn:
    """A reward of 1.0 for each completion the whole of which matches `pattern` (re.DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [float(compiled.fullmatch(text_of(c)) is not None) for c in completions]
    reward.__name__ = name
    return reward


answer_format = regex_format(r"\s*<answer>[^<]*</answer>\s*", name="answer_format")


def length_reward(target: int, name: str = "length") -> RewardFn:
    """1 - |len(completion) - target| / target, floored at 0: 1.0 at `target` characters."""
    if target <= 0:
        raise ConfigError(f"length_reward: target must be a positive number of characters, got {target!r}")

    def reward(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
        return [max(0.0, 1.0 - abs(len(text_of(c)) - target) / target) for c in completions]
    reward.__name__ = name
    return reward


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match, "answer_format": answer_format}


def load_reward_function(spec: str, beside: str | Path | None = None) -> RewardFn:
    """A built-in by name, or "module:function": module.py in the folder `beside` (a recipe's) where it
    is there, else the module found on the Python path."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward function {spec!r}: expected a built-in ({', '.join(BUILTIN)}) or "
                          "'module:function'")
    path = Path(beside) / (module_name.replace(".", "/") + ".py") if beside is not None else None
    try:
        if path is not None and path.is_file():
            module = sys.modules.get(f"minilora_rewards.{module_name}")
            if module is None:
                loader = importlib.util.spec_from_file_location(f"minilora_rewards.{module_name}", path)
                module = importlib.util.module_from_spec(loader)
                loader.loader.exec_module(module)
                sys.modules[loader.name] = module
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        where = f" beside {beside} or" if beside is not None else ""
        raise ConfigError(f"reward function {spec!r}: no module {module_name!r}{where} on the Python path ({e})") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: module {module_name!r} has no function {attr!r}")
    return fn


def reward_name(fn: RewardFn) -> str:
    """The name a function's reward is logged under (rewards/<name>/mean, as TRL's)."""
    return getattr(fn, "__name__", None) or type(fn).__name__


def score(reward_funcs: list[RewardFn], prompts: list[str], completions: list[str],
          columns: dict[str, list[Any]]) -> torch.Tensor:
    """(completions, functions) float32 rewards. A function that raises is called again row by row, to
    name the prompt it fails on; one that returns the wrong number of values, or a value that is no
    finite number, stops the run with its name and the prompt (TrainingError)."""
    out = torch.zeros(len(completions), len(reward_funcs), dtype=torch.float32)
    for j, fn in enumerate(reward_funcs):
        name = reward_name(fn)
        try:
            values = list(fn(prompts=prompts, completions=completions, **columns))
        except Exception as e:  # the user's code: say whose and where, then stop
            row = failing_row(fn, prompts, completions, columns)
            raise TrainingError(f"reward function {name!r} raised {type(e).__name__}: {e} (on prompt "
                                f"{prompts[row]!r}, completion {completions[row]!r})") from e
        if len(values) != len(completions):
            raise TrainingError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                                f"completions (one per completion expected; first prompt {prompts[0]!r})")
        for i, v in enumerate(values):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TrainingError(f"reward function {name!r} returned {v!r} for prompt {prompts[i]!r}, "
                                    f"completion {completions[i]!r}: expected a finite number")
            out[i, j] = float(v)
    return out


def failing_row(fn: RewardFn, prompts: list[str], completions: list[str], columns: dict[str, list[Any]]) -> int:
    """The first row on which `fn`, called on that row alone, raises (0 when none does alone)."""
    for i in range(len(completions)):
        try:
            fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1],
               **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return 0
