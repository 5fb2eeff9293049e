"""Prompts for online objectives (GRPO): records with a `prompt` (text, or a list of messages that the
model's chat template renders with the assistant's turn opened) and any further columns (an `answer`,
say), which the reward functions receive. TRL's "prompt-only" dataset form.

A prompt of text is tokenized as generation tokenizes it (the tokenizer's own special tokens, a BOS
where the model has one); a conversation as its rendered chat template, whose special tokens are in
the text already. `max_prompt_length` keeps a prompt's last tokens (cut from the left: the end of a
prompt is what the answer follows). A record without a prompt, or with an empty one, or a message
that is not {"role", "content"} text is refused by name with its row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError
from .records import _rows

ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass
class PromptRow:
    prompt_ids: list[int]
    prompt: str | list[dict[str, str]]          # as the record gave it: what the reward functions see
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other fields
    where: str = ""                             # "file.jsonl, line 7": for errors

    @property
    def input_ids(self) -> list[int]:  # what a run's fingerprint hashes, and the token checks read
        return self.prompt_ids

    @property
    def labels(self) -> list[int]:
        return self.prompt_ids


def is_prompt_only(record: Any) -> bool:
    return isinstance(record, dict) and "prompt" in record and "chosen" not in record and "completion" not in record


def build_prompts(records: list[dict[str, Any]], tokenizer, max_prompt_length: int | None = None,
                  skip_bad_rows: bool = False, source: str = "dataset") -> list[PromptRow]:
    """Every record as a PromptRow; a bad record raises DataError naming its row (or, with
    skip_bad_rows, is left out and counted in the list's `.skipped`)."""
    if max_prompt_length is not None and (isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int)
                                          or max_prompt_length <= 0):
        raise DataError(f"max_prompt_length must be a positive number of tokens, got {max_prompt_length!r}")

    def make(record: dict[str, Any], where: str) -> PromptRow:
        prompt = _checked(record, where)
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(prompt)
        if not ids:
            raise DataError(f"{where}: the prompt tokenizes to no tokens")
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        return PromptRow(ids, prompt, {k: v for k, v in record.items() if k != "prompt"}, where)
    return _rows(records, make, skip_bad_rows, source)


def _checked(record: Any, where: str) -> str | list[dict[str, str]]:
    kind = getattr(record, "kind", None) or (None if isinstance(record, dict) else type(record).__name__)
    if kind is not None:
        raise DataError(f"{where}: expected an object with a prompt, found {kind}")
    prompt = record.get("prompt")
    if prompt is None:
        raise DataError(f"{where}: a prompt-only record needs a \"prompt\" (the record has: "
                        f"{', '.join(map(str, record)) or 'nothing'})")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: the prompt is empty")
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: the prompt is {'empty' if prompt == [] else type(prompt).__name__}; expected "
                        "text or a list of messages")
    for n, message in enumerate(prompt, start=1):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: prompt message {n} is {message!r}; expected {{\"role\": one of "
                            f"{', '.join(ROLES)}, \"content\": text}}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def collate_prompts(rows: list[PromptRow]) -> dict[str, list[Any]]:
    """One batch as lists, a row each: prompt_ids, prompt, and every column the rows share."""
    shared = set(rows[0].columns).intersection(*(r.columns for r in rows[1:]))
    return {"prompt_ids": [r.prompt_ids for r in rows], "prompt": [r.prompt for r in rows],
            **{k: [r.columns[k] for r in rows] for k in rows[0].columns if k in shared}}
