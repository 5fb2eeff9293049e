"""Preference pairs: a prompt, the completion a judge preferred (chosen) and the one it did not
(rejected), in TRL's standard forms, tokenized, truncated and collated for DPO and its family.

A record is {"prompt", "chosen", "rejected"}, each text, or each a list of messages (the prompt the
turns before the answer, chosen and rejected the assistant's turn), rendered with the model's chat
template. A conversation may also leave the prompt out: then chosen and rejected are whole
conversations, and the prompt is the messages they share from the start (TRL's implicit prompt).

Tokenized as TRL does: prompt + completion is tokenized whole (text gets the EOS token at its end),
and the completion is what follows the longest run of ids it shares with the prompt tokenized alone
(with a chat template, the assistant's turn opened), so that tokens merging across the boundary are
not split. Only completion tokens are scored.

Truncation (`max_length`, `max_prompt_length`, in tokens): a prompt longer than max_prompt_length
keeps its last max_prompt_length tokens (cut from the left: the end of a prompt is what the answer
follows); then, where prompt + the longer completion exceed max_length, both completions are cut
from the right to max_length - len(prompt). A pair that would keep no token of a completion is
refused by name with its row, as are missing fields, an empty completion, chosen equal to rejected
and a conversation whose completion has no assistant turn.

Collation puts a micro-batch's chosen rows, then its rejected rows, in one batch of 2B rows, so that
both go through the model in one forward pass (labels -100 on the prompt and padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from .chat import conversation
from .records import IGNORE, Example, _rows

FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class PreferencePair:
    prompt_ids: list[int]
    chosen_ids: list[int]                  # the completions, without the prompt
    rejected_ids: list[int]
    where: str = ""                        # "file.jsonl, line 7": for errors
    reference_logps: tuple[float, float] | None = None  # (chosen, rejected) kept by precompute_ref_log_probs

    def rows(self) -> tuple[Example, Example]:
        """The two sequences the model reads: prompt + chosen and prompt + rejected, labels -100 on the prompt."""
        masked = [IGNORE] * len(self.prompt_ids)
        return (Example(self.prompt_ids + self.chosen_ids, masked + self.chosen_ids),
                Example(self.prompt_ids + self.rejected_ids, masked + self.rejected_ids))

    @property
    def input_ids(self) -> list[int]:  # the pair as one sequence of ids and labels: what a run's fingerprint hashes
        return self.prompt_ids + self.chosen_ids + [-1] + self.rejected_ids

    @property
    def labels(self) -> list[int]:
        return [IGNORE] * len(self.prompt_ids) + self.chosen_ids + [-1] + self.rejected_ids


def is_preference(record: Any) -> bool:
    return isinstance(record, dict) and "chosen" in record and "rejected" in record


def build_pairs(records: list[dict[str, Any]], tokenizer, max_length: int | None = None,
                max_prompt_length: int | None = None, skip_bad_rows: bool = False,
                source: str = "dataset") -> list[PreferencePair]:
    """Every record as a PreferencePair; a bad record raises DataError naming its row (or, with
    skip_bad_rows, is left out and counted in the list's `.skipped`)."""
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise DataError(f"{name} must be a positive number of tokens, got {value!r}")

    def make(record: dict[str, Any], where: str) -> PreferencePair:
        prompt, chosen, rejected = tokenize_pair(tokenizer, _checked(record, where), where)
        return truncate_pair(PreferencePair(prompt, chosen, rejected, where), max_length, max_prompt_length)
    return _rows(records, make, skip_bad_rows, source)


def _checked(record: Any, where: str) -> dict[str, Any]:
    """The record's prompt, chosen and rejected, each text or each a list of messages, checked."""
    kind = getattr(record, "kind", None) or (None if isinstance(record, dict) else type(record).__name__)
    if kind is not None:
        raise DataError(f"{where}: expected an object with prompt, chosen and rejected, found {kind}")
    chat = isinstance(record.get("chosen"), list)
    missing = [f for f in FIELDS if record.get(f) is None and not (f == "prompt" and chat)]
    if missing:
        raise DataError(f"{where}: a preference pair needs {', '.join(FIELDS)}; {', '.join(missing)} missing "
                        f"(the record has: {', '.join(map(str, record)) or 'nothing'})")
    fields = {f: record.get(f) for f in FIELDS}
    if chat and fields["prompt"] is None:  # implicit prompt: the messages both conversations start with
        c, r = fields["chosen"], fields["rejected"] if isinstance(fields["rejected"], list) else []
        n = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
        fields = {"prompt": c[:n], "chosen": c[n:], "rejected": r[n:] if isinstance(fields["rejected"], list)
                  else fields["rejected"]}
    want = list if chat else str
    for f in FIELDS:
        if not isinstance(fields[f], want):
            raise DataError(f"{where}: {f} is {type(fields[f]).__name__}, but chosen is "
                            f"{'a list of messages' if chat else 'text'}: the three must be of one kind")
    for f in ("chosen", "rejected"):
        if not fields[f] or (not chat and not fields[f].strip()):
            raise DataError(f"{where}: {f} is empty; a pair needs two completions to compare")
    if fields["chosen"] == fields["rejected"]:
        raise DataError(f"{where}: chosen and rejected are the same, so there is no preference to learn")
    if chat:
        for f in ("chosen", "rejected"):
            messages = conversation({"messages": fields["prompt"] + fields[f]}, where)
            if not any(m["role"] == "assistant" for m in messages[len(fields["prompt"]):]):
                raise DataError(f"{where}: {f} has no assistant message: the completion is the assistant's turn")
            fields[f] = messages[len(fields["prompt"]):]
        fields["prompt"] = messages[:len(fields["prompt"])]
    return fields


def tokenize_pair(tokenizer, fields: dict[str, Any], where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids as TRL's DPOTrainer makes them: prompt + completion tokenized
    whole, the completion being what follows the ids both share with the prompt tokenized alone."""
    if isinstance(fields["chosen"], list):
        def ids(messages: list[dict[str, str]], opened: bool) -> list[int]:
            return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=opened),
                                    add_special_tokens=False)
        prompt = ids(fields["prompt"], True)
        whole = [ids(fields["prompt"] + fields[f], False) for f in ("chosen", "rejected")]
    else:
        if tokenizer.eos_token_id is None:
            raise DataError(f"{where}: the tokenizer has no end-of-sequence token to end each completion with")
        prompt = tokenizer.encode(fields["prompt"]) if fields["prompt"] else []
        whole = [tokenizer.encode(fields["prompt"] + fields[f]) + [tokenizer.eos_token_id] for f in ("chosen", "rejected")]
    n = min(_common_prefix(prompt, w) for w in whole)
    chosen, rejected = whole[0][n:], whole[1][n:]
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected tokenize the same, so there is no preference to learn")
    return prompt[:n], chosen, rejected


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def truncate_pair(pair: PreferencePair, max_length: int | None, max_prompt_length: int | None) -> PreferencePair:
    """The module's policy: the prompt cut from the left to max_prompt_length, then both completions
    from the right so that prompt + completion fits max_length; refused if a completion would be lost."""
    prompt = pair.prompt_ids
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt = prompt[-max_prompt_length:]
    room = None if max_length is None else max_length - len(prompt)
    if room is not None and room <= 0:
        raise DataError(f"{pair.where}: the prompt's {len(prompt)} tokens fill max_length={max_length}, so no token "
                        "of either completion would be kept: raise max_length or set a smaller max_prompt_length")
    chosen, rejected = pair.chosen_ids[:room], pair.rejected_ids[:room]
    if chosen == rejected:
        raise DataError(f"{pair.where}: cut to max_length={max_length} tokens, chosen and rejected are the same (they "
                        "differ only after that): raise max_length")
    return PreferencePair(prompt, chosen, rejected, pair.where, pair.reference_logps)
