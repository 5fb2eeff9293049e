"""Datasets: read records, format them with a prompt template, tokenize, truncate, mask (batching.py pads).

A record is a dict of fields (one JSON object, one CSV row). A template turns it into a prompt and a
response; training text is prompt + response + EOS. Labels are the input ids, with -100 (ignored by
the loss) on padding and, unless `train_on_prompt`, on the prompt, so only the response is learned.
A record of `messages` (or ShareGPT `conversations`) needs no template: the model's chat template
writes it, and the assistant's turns are learned (chat.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, DataError
from ..formats.paths import resolve
from .chat import (
    conversation,
    is_conversation,
    template_source,
    tokenize_conversation,
    writes_assistant_content,
)

IGNORE = -100  # label value the loss skips


# ---------------------------------------------------------------------------------------------
# Reading records

def read_records(source: str | os.PathLike, revision: str | None = None) -> list[dict[str, Any]]:
    """Records of a .json (a list of objects), .jsonl or .csv file, a folder of them, or a Hub dataset id."""
    try:
        path = resolve(source, revision, repo_type="dataset")
    except CheckpointError as e:
        raise DataError(str(e)) from None
    kinds = (".json", ".jsonl", ".csv", ".parquet")
    if path.is_file() and path.suffix.lower() not in kinds:
        raise DataError(f"{path}: a {path.suffix or 'suffix-less'} file; datasets are read from .json, .jsonl, .csv "
                        "or .parquet files")
    files = [path] if path.is_file() else sorted(  # hidden folders (.ipynb_checkpoints, .git) are not data
        p for p in path.rglob("*") if p.suffix.lower() in kinds and not any(part.startswith(".")
                                                                              for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no .json, .jsonl, .csv or .parquet files")
    records = []
    for file in files:
        records.extend(_read_file(file))
    if not records:
        raise DataError(f"{source}: the dataset is empty")
    return records


class Record(dict):
    """One record's fields, and `where` it came from ("file.jsonl, line 7"), so that an error names the
    line of the file whatever shuffling and splitting did. A row that is not an object keeps its `kind`."""

    def __init__(self, fields: Any, where: str) -> None:
        super().__init__(fields if isinstance(fields, dict) else {})
        self.where = where
        self.kind = None if isinstance(fields, dict) else type(fields).__name__


def _read_file(file: Path) -> list[Record]:
    suffix = file.suffix.lower()  # DATA.JSONL too
    if suffix == ".parquet":  # many Hub datasets are stored so; pyarrow is optional
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise DataError(f"{file}: reading parquet needs pyarrow (pip install pyarrow), "
                            "or convert the dataset to JSONL/CSV") from None
        return [Record(row, f"{file}, row {n}") for n, row in enumerate(pq.read_table(file).to_pylist(), start=1)]
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e})") from None
    if suffix == ".csv":  # quoted fields may hold line breaks: the csv module reads them whole
        reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)  # strict: an unclosed quote is an error
        rows, line = [], 1  # the header's line
        try:
            header = reader.fieldnames or []
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise DataError(f"{file}, line 1: column {twice[0]!r} appears twice in the header")
            for row in reader:
                if None in row or None in row.values():
                    raise DataError(f"{file}, line {line + 1}: the record's fields do not match the header's "
                                    f"{len(reader.fieldnames)} columns")
                rows.append(Record(row, f"{file}, line {line + 1}"))
                line = reader.line_num
        except csv.Error as e:
            raise DataError(f"{file}, line {line + 1}: not valid CSV ({e})") from None
        return rows
    if suffix == ".json" and text.lstrip().startswith("{") and "\n" in text.strip():
        try:  # one object over several lines: a document, not JSON Lines
            json.loads(text)
            raise DataError(f"{file}: one JSON object; expected a list of records, or one record per line (JSONL)")
        except json.JSONDecodeError:
            pass  # JSON Lines after all
    if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith("[")):
        rows = []
        for n, line in enumerate(text.split("\n"), start=1):  # "\n" alone ends a line: JSON strings may hold U+2028
            if line.strip():
                try:
                    rows.append(Record(json.loads(line), f"{file}, line {n}"))
                except json.JSONDecodeError as e:
                    raise DataError(f"{file}: line {n} is not valid JSON ({e.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{file}: expected a JSON list of records, found {type(rows).__name__}")
    return [Record(row, f"{file}, item {n}") for n, row in enumerate(rows, start=1)]


def split(records: list, val_size: float | int, seed: int = 0, by: str | None = None) -> tuple[list, list]:
    """Shuffle with `seed`, then hold out val_size records (a fraction if < 1, else a count).

    With `by` (a field), records that share its value stay together: val_size then counts those groups,
    and every record of a held-out group is held out (preference pairs split by their instruction, so
    no held-out prompt was ever trained on)."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size < 0 \
            or isinstance(val_size, float) and not val_size < 1:
        raise DataError(f"val_size must be a fraction in [0, 1) or a count >= 0, got {val_size!r}")
    groups: dict[Any, list[int]] = {}
    for i, record in enumerate(records):
        if by is not None and (not isinstance(record, dict) or by not in record):
            raise DataError(f"record {i + 1} has no field {by!r} to split by (split_by)")
        key = i if by is None else json.dumps(record[by], sort_keys=True)
        groups.setdefault(key, []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    n_val = int(round(val_size * len(order))) if isinstance(val_size, float) else int(val_size)
    what = "records" if by is None else f"groups of {by!r}"
    if n_val >= len(order):
        raise DataError(f"val_size={val_size} leaves no training {what} out of {len(order)}")
    return [records[i] for g in order[n_val:] for i in g], [records[i] for g in order[:n_val] for i in g]


# ---------------------------------------------------------------------------------------------
# Templates

@dataclass
class Template:
    """prompt and response are str.format strings over record fields. When the record's `input` field
    is empty and `prompt_no_input` is set, that prompt is used instead (the Alpaca convention)."""
    prompt: str
    response: str
    prompt_no_input: str | None = None

    def __post_init__(self) -> None:
        for part in ("prompt", "response", "prompt_no_input"):
            fmt = getattr(self, part)
            if fmt is None and part == "prompt_no_input":
                continue
            if not isinstance(fmt, str):
                raise DataError(f"template {part}: expected text, got {type(fmt).__name__} {fmt!r}")
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(fmt) if f is not None]
            except ValueError as e:
                raise DataError(f"template {part} {fmt!r}: {e} (write {{{{ and }}}} for literal braces)") from None
            bad = next((f for f in fields if not f or f[0].isdigit() or "." in f or "[" in f), None)
            if bad is not None:
                raise DataError(f"template {part} {fmt!r}: {{{bad}}} is not a field name (fields look like {{quote}})")
            try:  # conversions and format specs, tried on text as every field will be
                fmt.format_map(_AnyText())
            except (ValueError, KeyError, IndexError) as e:
                raise DataError(f"template {part} {fmt!r}: {e} (fields are text: write {{quote}})") from None

    def format(self, record: dict[str, Any], where: str) -> tuple[str, str]:
        prompt = self.prompt
        if self.prompt_no_input is not None and not record.get("input"):
            prompt = self.prompt_no_input
        return _fill(prompt, record, where), _fill(self.response, record, where)


class _AnyText(dict):
    def __missing__(self, key: str) -> str:
        return "text"


def _fill(fmt: str, record: dict[str, Any], where: str) -> str:
    _fields(record, where)
    for _, field, _, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        if field not in record:
            raise DataError(f"{where}: missing field {field!r} (the record has: {', '.join(map(str, record)) or 'nothing'})")
        if not isinstance(record[field], str):
            kind = "null" if record[field] is None else type(record[field]).__name__
            raise DataError(f"{where}: field {field!r} is {kind}, expected text")
    return fmt.format_map(record)


TEMPLATES = {
    # tloen/alpaca-lora's templates, from the Stanford Alpaca repository.
    "alpaca": Template(
        prompt="Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.\n\n"
               "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        prompt_no_input="Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
        response="{output}"),
    "quotes": Template(prompt='Quote by {author}:', response=' "{quote}"'),
    "text": Template(prompt="", response="{text}"),
}


def get_template(template: str | Template | dict) -> Template:
    if isinstance(template, Template):
        return template
    if isinstance(template, dict):
        unknown = set(template) - {"prompt", "response", "prompt_no_input"}
        if unknown or not {"prompt", "response"} <= set(template):
            raise DataError(f"template {template!r}: expected the keys prompt and response (and prompt_no_input); "
                            + (f"unknown: {', '.join(sorted(unknown))}" if unknown else "missing one"))
        return Template(**template)
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; built in: {', '.join(TEMPLATES)}")
    return TEMPLATES[template]


# ---------------------------------------------------------------------------------------------
# Tokenizing

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels for language modelling, one class id for classification
    segments: list[int] | None = None  # a packed row's example numbers, 1, 1, 2, ... (batching.pack)


def tokenize(tokenizer, prompt: str, response: str, cutoff: int, add_eos: bool = True,
             train_on_prompt: bool = True, truncation: str = "right", where: str = "") -> Example:
    """prompt + response (+ EOS), truncated to `cutoff` tokens from the `truncation` side ("right",
    "left", or "none" to refuse). Prompt and response are tokenized apart, so the prompt's tokens are
    the ones generation will see."""
    if add_eos and tokenizer.eos_token_id is None:
        raise DataError(f"{where}: the tokenizer has no end-of-sequence token to end the example with: give its "
                        "tokenizer_config.json an eos_token, or set add_eos = false")
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    response_ids = tokenizer.encode(response, add_special_tokens=not prompt_ids)
    ids = prompt_ids + response_ids + ([tokenizer.eos_token_id] if add_eos else [])
    labels = list(ids) if train_on_prompt else [IGNORE] * len(prompt_ids) + ids[len(prompt_ids):]
    return truncate(Example(ids, labels), cutoff, truncation, where)


def truncate(example: Example, cutoff: int, truncation: str, where: str) -> Example:
    """At most `cutoff` tokens, cut from the `truncation` side; "none" refuses a longer example."""
    ids, labels = example.input_ids, example.labels
    if len(ids) > cutoff:
        if truncation == "right":
            ids, labels = ids[:cutoff], labels[:cutoff]
        elif truncation == "left":
            ids, labels = ids[-cutoff:], labels[-cutoff:]
        else:
            raise DataError(f"{where}: {len(ids)} tokens, longer than the cutoff of {cutoff} (truncation is off)")
    return Example(ids, labels)


def build_examples(records: list[dict[str, Any]], tokenizer, template: str | Template | dict | None = None,
                   cutoff: int = 256, add_eos: bool = True, train_on_prompt: bool | None = None,
                   truncation: str = "right", skip_bad_rows: bool = False, source: str = "dataset") -> list[Example]:
    """Format and tokenize every record. A malformed record raises DataError naming the row (1-based),
    or, with skip_bad_rows, is skipped and counted in the returned list's `.skipped`.

    template None: conversations (records with `messages` or `conversations`) through the model's chat
    template, any other records through "text". train_on_prompt None: the prompt is learned with a
    template (the usual causal-LM fine-tune), only the assistant's turns in a conversation; True learns
    every token, False only the response (the assistant's turns)."""
    if truncation not in ("right", "left", "none"):
        raise DataError(f"truncation must be 'right', 'left' or 'none', got {truncation!r}")
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff <= 0:
        raise DataError(f"cutoff must be a positive number of tokens, got {cutoff!r}")
    chat = template is None  # conversations, or else the text template, record by record
    template = get_template("text" if template is None else template)

    def make(record: dict[str, Any], where: str) -> Example:
        if chat and is_conversation(record):
            messages = conversation(_fields(record, where), where)
            try:
                ids, learned = tokenize_conversation(tokenizer, messages, train_on_all=bool(train_on_prompt))
            except DataError as e:
                raise DataError(f"{where}: {e}") from None
            return truncate(Example(ids, [i if keep else IGNORE for i, keep in zip(ids, learned)]), cutoff,
                            truncation, where)
        if chat and isinstance(record, dict) and "text" not in record:
            raise DataError(f"{where}: neither a conversation (messages or conversations) nor a text field "
                            f"(the record has: {', '.join(map(str, record)) or 'nothing'})")
        prompt, response = template.format(record, where)
        return tokenize(tokenizer, prompt, response, cutoff, add_eos, train_on_prompt is not False, truncation, where)
    examples = _rows(records, make, skip_bad_rows, source)
    examples.without_targets = sum(target_count(e) == 0 for e in examples)
    if examples.without_targets == len(examples):
        unwritten = chat and _assistant_unwritten(records, tokenizer)
        if unwritten:
            raise DataError(f"{source}: the chat template ({template_source(tokenizer)}) does not write the "
                            f"assistant's content: its text for {unwritten} is the same whatever the assistant says, "
                            "so there is nothing to learn, whatever the cutoff. Give the tokenizer a chat template that "
                            "writes the assistant's turns")
        fields = [f for _, f, _, _ in string.Formatter().parse(template.response) if f]
        what = "the assistant's turns were" if chat and is_conversation(records[0]) else \
            f"the response ({', '.join(fields) or 'template text'}) was"
        raise DataError(f"{source}: no example has a token to learn after truncation to cutoff={cutoff} tokens"
                        + ("" if train_on_prompt is not False or chat else
                           " and masking of the prompt (train_on_prompt = false)")
                        + f": {what} cut off in every record. Raise the cutoff, shorten the prompt, or truncate from the left")
    return examples


def _assistant_unwritten(records: list[dict[str, Any]], tokenizer) -> str | None:
    """Where the first good conversation among the records is, if the chat template writes none of its
    assistant's words (then no record has any to learn); None if it does, or there is no such record."""
    for n, record in enumerate(records, start=1):
        where = getattr(record, "where", None) or f"row {n}"
        if is_conversation(record) and not getattr(record, "kind", None):
            try:
                return None if writes_assistant_content(tokenizer, conversation(record, where)) else where
            except DataError:
                continue
    return None


def _fields(record: Any, where: str) -> dict[str, Any]:
    kind = getattr(record, "kind", None) or (None if isinstance(record, dict) else type(record).__name__)
    if kind is not None:
        raise DataError(f"{where}: expected an object with fields, found {kind}")
    return record


def target_count(example: Example) -> int:
    """How many tokens of an example the loss learns: a class, or each label after the first that is
    not IGNORE (token t predicts token t+1)."""
    if isinstance(example.labels, int):
        return 1
    return sum(label != IGNORE for label in example.labels[1:])


class ExampleList(list):
    skipped: int = 0           # malformed records left out (skip_bad_rows)
    without_targets: int = 0   # examples whose response truncation removed entirely: they teach nothing


def _rows(records: list[dict[str, Any]], make, skip_bad_rows: bool, source: str) -> ExampleList:
    """make(record, "<source>, row <n>") for every record; a DataError stops the lot, or with
    skip_bad_rows drops the row and is counted in `.skipped`."""
    examples, skipped = ExampleList(), 0
    for n, record in enumerate(records, start=1):
        try:
            examples.append(make(record, getattr(record, "where", None) or f"{source}, row {n}"))
        except DataError:
            if not skip_bad_rows:
                raise
            skipped += 1
    examples.skipped = skipped
    if not examples:
        raise DataError(f"{source}: no usable records ({skipped} skipped)" if skipped else f"{source}: the dataset is empty")
    return examples


def label_ids(records: list[dict[str, Any]], label_field: str = "label",
              labels: list[Any] | None = None) -> dict[str, int]:
    """label value (as text) -> class id: the given order, or the sorted values found (numbers numerically)."""
    if labels is None:
        found = {str(r.get(label_field)) for r in records if isinstance(r, dict) and r.get(label_field) is not None}
        numeric = all(re.fullmatch(r"-?[0-9]+", v) for v in found)
        labels = sorted(found, key=lambda v: (int(v) if numeric else v))
    if len({str(v) for v in labels}) != len(labels):
        raise DataError(f"labels {labels!r} name a class twice")
    return {str(v): i for i, v in enumerate(labels)}


def build_classification_examples(records: list[dict[str, Any]], tokenizer, label2id: dict[str, int],
                                  text_field: str = "text", label_field: str = "label", cutoff: int = 512,
                                  truncation: str = "right", skip_bad_rows: bool = False,
                                  source: str = "dataset") -> ExampleList:
    """(text, label) records -> Examples whose `labels` is the class id. truncation "left" keeps the
    end of a long text (the reference IMDB workflow's choice)."""
    def make(record: dict[str, Any], where: str) -> Example:
        text = _fill("{" + text_field + "}", record, where)
        value = record.get(label_field)
        if value is None or str(value) not in label2id:
            raise DataError(f"{where}: label {value!r} is not one of {', '.join(label2id)}")
        if truncation == "none" and len(tokenizer.encode(text)) > cutoff:
            raise DataError(f"{where}: longer than the cutoff of {cutoff} tokens (truncation is off)")
        ids = tokenizer.encode_truncated(text, cutoff, "left" if truncation == "left" else "right")
        return Example(ids, label2id[str(value)])
    return _rows(records, make, skip_bad_rows, source)
