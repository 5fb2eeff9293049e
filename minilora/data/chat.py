"""Conversations: records of messages, the model's own chat template, and which tokens the loss learns.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": text}. A
record holds one under `messages` (OpenAI's form) or under `conversations` as ShareGPT writes it
({"from": "human" | "gpt" | "system", "value": text}).

The chat template is the Jinja program a model ships (chat_template.jinja beside tokenizer_config.json,
`chat_template` in tokenizer_config.json, or `tokenizer.chat_template` in a GGUF file), the one
transformers' `apply_chat_template` runs; it is rendered here the same way: jinja2's sandbox,
trim_blocks and lstrip_blocks on, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII
text. A model without one gets ChatML. A template is a program from the model's repository, so it runs
within a budget (time, loop iterations, the size of what it writes and builds), and whatever goes wrong
in it is a DataError naming the template's file and what failed.

Which tokens are learned is decided on token ids, never on character offsets: the whole conversation
is tokenized once, and each assistant turn's content is where those ids differ from the ids of the same
conversation with that content replaced by a letter. The content and the end-of-turn token after it are learned;
what the template puts around them (the role header, a newline after the end) is not.
"""

from __future__ import annotations

import functools
import warnings
from bisect import bisect_left, bisect_right
from itertools import chain
from typing import Any, Iterable

from ..errors import DataError
from .templates import render

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# ChatML, for a model that has no template of its own (SmolLM2's and Qwen2's format, without a default system prompt)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Tokens that end a turn in the common templates (ChatML, Llama 3, Gemma, Phi-3); the EOS token too
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")


def is_conversation(record: Any) -> bool:
    return isinstance(record, dict) and ("messages" in record or "conversations" in record)


def conversation(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The record's messages as [{"role", "content"}], checked: a DataError names the line and the turn
    for a missing or unknown role, content that is not text, or a conversation without an assistant turn."""
    key, role_key, content_key = ("messages", "role", "content") if "messages" in record else \
        ("conversations", "from", "value")
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: {key!r} is {'empty' if turns == [] else type(turns).__name__}; expected a list "
                        "of messages")
    known = ROLES if key == "messages" else tuple(SHAREGPT_ROLES)
    messages = []
    for n, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: message {n} is {type(turn).__name__}, expected an object with "
                            f"{role_key!r} and {content_key!r}")
        role, content = turn.get(role_key), turn.get(content_key)
        if role not in known:
            raise DataError(f"{where}: message {n} has {role_key} {role!r}; expected one of {', '.join(known)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {n} ({role}) has {content_key} "
                            f"{'missing' if content is None else type(content).__name__}, expected text")
        messages.append({"role": SHAREGPT_ROLES[role] if key == "conversations" else role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn")
    return messages


_PLACES = "chat_template.jinja, chat_template in tokenizer_config.json, chat_template.json or the GGUF metadata"


@functools.lru_cache(maxsize=None)
def _warn_chatml(name: str) -> None:
    warnings.warn(f"{name} has no chat template ({_PLACES}): using ChatML (<|im_start|>role ... <|im_end|>)",
                  stacklevel=4)


def template_of(tokenizer) -> str:
    """The tokenizer's own chat template, or ChatML (said once per tokenizer source) where the vocabulary
    has ChatML's tokens; without them, ChatML's markup would be ordinary text and no turn would end."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    name = str(getattr(tokenizer, "source", "the tokenizer"))
    if tokenizer.token_to_id("<|im_start|>") is None or tokenizer.token_to_id("<|im_end|>") is None:
        raise DataError(f"{name} has no chat template ({_PLACES}) and no ChatML tokens (<|im_start|>, <|im_end|>) "
                        "to fall back on: give it a template, or format the data with a prompt template instead")
    _warn_chatml(name)
    return CHATML


def template_source(tokenizer) -> str:
    """Where template_of's template comes from, for messages: its file (and key), as the loader recorded
    it in `chat_template_source`; a template set in code; or ChatML, the fallback."""
    if getattr(tokenizer, "chat_template", None):
        return getattr(tokenizer, "chat_template_source", None) or "the tokenizer's chat_template (set in code)"
    return f"ChatML, minilora's fallback: {getattr(tokenizer, 'source', 'the tokenizer')} has no chat template"


def special_tokens(tokenizer) -> dict[str, str]:
    """bos_token, eos_token, pad_token as the template reads them; an absent one stays undefined (renders
    as nothing), as in transformers."""
    ids = {"bos_token": tokenizer.bos_token_id, "eos_token": tokenizer.eos_token_id,
           "pad_token": tokenizer.pad_token_id if getattr(tokenizer, "has_pad_token", True) else None}
    return {k: tokenizer.tk.id_to_token(i) for k, i in ids.items() if i is not None and tokenizer.tk.id_to_token(i)}


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: EOS and the end-of-turn tokens of the usual templates that this
    vocabulary has (generation stops at any of them)."""
    ids = [tokenizer.eos_token_id] + [tokenizer.token_to_id(t) for t in END_OF_TURN]
    return sorted({i for i in ids if i is not None})


def writes_assistant_content(tokenizer, messages: list[dict[str, str]]) -> bool:
    """Whether the template's text depends on what the assistant says: not for a template that writes
    only the other turns, with which there is nothing to learn."""
    template, specials, source = template_of(tokenizer), special_tokens(tokenizer), template_source(tokenizer)
    text = render(template, messages, source=source, **specials)
    return any(render(template, [{**m, "content": _variants(m["content"])[k]} if m["role"] == "assistant" else m
                                 for m in messages], source=source, **specials) != text for k in range(3))


# ---------------------------------------------------------------------------------------------
# Tokens to learn

def tokenize_conversation(tokenizer, messages: list[dict[str, str]], train_on_all: bool = False
                          ) -> tuple[list[int], list[bool]]:
    """The conversation's token ids as the template renders it, and for each whether the loss learns it:
    every token with train_on_all, else the assistant turns' contents and their end-of-turn tokens.

    Assistant turn i is found on token ids: the conversation is rendered again with that turn's content
    replaced by one character (inside the content's own leading and trailing whitespace), and the ids
    where the two differ (between their common prefix and common suffix) are the content; then its
    end-of-turn token. A character rather than nothing, so that the text around it tokenizes as it does
    around the content (BPE joins "\n\n" into one token before a special token, not before a word);
    and three of them, a letter, a digit and a sign, each of which may split the text before it
    differently (a digit is its own pre-token in SmolLM2's tokenizer): a common prefix can only be too
    short, so the longest is the content's start. Nothing else changes between the two renderings, so a template that writes
    a turn differently by its place (a default system prompt before the first message, a reasoning block
    on the last answer only) finds every turn all the same.

    That is the definition (_learned_by_rendering); done so, it renders and tokenizes the whole
    conversation three times per turn, work that grows with the square of its length. Here the
    conversation is rendered four times in all: as it is, and with every assistant content replaced by
    its variant of each kind. Where those texts differ from the first exactly at the contents, in
    order, the template writes each content as it is, where it stands, and the text with one content
    replaced is the rendering of that turn's variant, with no rendering (otherwise each turn is rendered
    as defined). Its ids are the text's ids with only a window around the content tokenized again
    (_Splice: where that is known to give the ids of the whole; otherwise the whole is tokenized)."""
    return _tokenize(tokenizer, messages, train_on_all, quick=True)


def _learned_by_rendering(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
    """tokenize_conversation by its definition alone: each turn's variants rendered and tokenized whole."""
    return _tokenize(tokenizer, messages, False, quick=False)


def _variants(content: str) -> list[str]:
    """content with its text (inside its leading and trailing whitespace) replaced by a letter, a digit
    and a sign, each other than the text's first and last characters."""
    core = content.strip()
    lead = content[:len(content) - len(content.lstrip())]
    trail = content[len(content.rstrip()):] if core else ""
    return [lead + next(c for c in chars if not core or c not in (core[0], core[-1])) + trail
            for chars in ("xyz", "012", "!?#")]  # three each: the first and last characters leave one


def _tokenize(tokenizer, messages: list[dict[str, str]], train_on_all: bool, quick: bool
              ) -> tuple[list[int], list[bool]]:
    template, specials, source = template_of(tokenizer), special_tokens(tokenizer), template_source(tokenizer)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # as apply_chat_template tokenizes
    text = render(template, messages, source=source, **specials)
    ids = encode(text)
    if train_on_all:
        return ids, [True] * len(ids)
    starts = _content_starts(template, messages, specials, source, text) if quick else None
    if starts == "unwritten":  # the template writes none of the assistant's words: nothing to learn
        return ids, [False] * len(ids)
    splice = _Splice.of(tokenizer, text, ids) if starts is not None else None

    def differ(i: int, variant: str) -> tuple[int, int]:
        """The lengths of the common prefix and suffix of ids and the ids with turn i's content replaced."""
        if starts is None:
            other = encode(render(template, [*messages[:i], {**messages[i], "content": variant}, *messages[i + 1:]],
                                  source=source, **specials))
        else:
            p, q = starts[i], starts[i] + len(messages[i]["content"])
            found = splice(p, q, variant) if splice is not None else None
            if found is not None:
                return found
            other = encode(text[:p] + variant + text[q:])
        return _common_prefix(ids, other), _common_prefix(ids[::-1], other[::-1])

    learned = [False] * len(ids)
    ends = set(end_of_turn_ids(tokenizer))
    next_end: list[int | None] = [None] * (len(ids) + 1)  # where the first end-of-turn token at or after t is
    for t in range(len(ids) - 1, -1, -1):
        next_end[t] = t if ids[t] in ends else next_end[t + 1]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, stop = 0, len(ids)
        for variant in _variants(m["content"]):
            prefix, suffix = differ(i, variant)
            start, stop = max(start, prefix), min(stop, len(ids) - suffix)
        stop = start if not m["content"] else max(start, stop)  # the content's tokens: ids[start:stop]
        end = next_end[stop]
        for t in range(start, stop if end is None else end + 1):
            learned[t] = True
    return ids, learned


def _content_starts(template: str, messages: list[dict[str, str]], specials: dict[str, str], source: str,
                    text: str) -> dict[int, int] | str | None:
    """{turn: where its content starts in text}, if the template writes each assistant content as it is,
    where it stands: the conversation rendered with every content replaced by its variant (of each kind)
    is `text` with exactly those spans replaced, in order. "unwritten" where those renderings are `text`
    itself (no assistant content is written); None otherwise (the template changes contents, or writes
    them elsewhere too)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    found, unchanged = None, 0
    for k in range(3):
        variants = {i: _variants(messages[i]["content"])[k] for i in turns}
        replaced = [{**m, "content": variants[i]} if i in variants else m for i, m in enumerate(messages)]
        other = render(template, replaced, source=source, **specials)
        if other == text:
            unchanged += 1
            continue
        starts, t, o = {}, 0, 0  # positions in text and in other
        for i in turns:
            content, variant = messages[i]["content"], variants[i]
            shared = _same(content, 0, variant, 0)  # the whitespace before the replaced text
            n = _same(text, t, other, o)  # equal up to where the content and its variant differ
            if n < shared or not text.startswith(content, t + n - shared) \
                    or not other.startswith(variant, o + n - shared):
                return None
            starts[i], t, o = t + n - shared, t + n - shared + len(content), o + n - shared + len(variant)
        if text[t:] != other[o:] or found not in (None, starts):  # a variant of one kind matched by chance
            return None
        found = starts
    return "unwritten" if unchanged == 3 else None if unchanged else found


def _same(a: str, i: int, b: str, j: int) -> int:
    """The length of the common prefix of a[i:] and b[j:], compared a slice at a time (growing, then halving)."""
    n, k, limit = 0, 16, min(len(a) - i, len(b) - j)
    while True:
        k = min(k, limit - n)
        if k == 0 or a[i + n:i + n + k] != b[j + n:j + n + k]:
            break
        n, k = n + k, 2 * k
    while k > 1:  # the first difference is in [n, n + k)
        h = k // 2
        if a[i + n:i + n + h] == b[j + n:j + n + h]:
            n, k = n + h, k - h
        else:
            k = h
    return n


class _Splice:
    """The common prefix and suffix of a text's ids and the ids of that text with one span replaced,
    from the tokenization of a window around the span.

    `tokenizers` first splits a text at its added tokens matched on the raw text (those not
    `normalized`: the special tokens), leftmost-longest, and tokenizes each piece between them on its
    own. So a window [x, y) of the new text tokenizes as it does within the whole when x is the start of
    such a match at least the longest added token's length before the span (no match before x can reach
    into the change), and y is the end of a match that starts after the span and ends at least that
    length after it, with no match across the span's end in either text: from there on the two texts
    are equal and split alike. Tokens with lstrip, rstrip or single_word depend on their neighbours;
    with those, no window is used."""

    def __init__(self, tk, text: str, ids: list[int], raw: set[int], longest: int,
                 matches: list[tuple[int, int, int]]) -> None:
        self.tk, self.text, self.ids, self.raw, self.longest = tk, text, ids, raw, longest
        self.index, self.starts, self.ends = (list(column) for column in zip(*matches))

    @classmethod
    def of(cls, tokenizer, text: str, ids: list[int]) -> _Splice | None:
        tk = getattr(tokenizer, "tk", None)  # the `tokenizers` Tokenizer that tokenizer.encode runs
        if tk is None or not hasattr(tk, "get_added_tokens_decoder"):
            return None
        raw = {i: t for i, t in tk.get_added_tokens_decoder().items() if not t.normalized}
        if not raw or any(t.lstrip or t.rstrip or t.single_word for t in raw.values()):
            return None
        encoding = tk.encode(text, add_special_tokens=False)
        if encoding.ids != ids:
            return None
        matches = [(t, s, e) for t, (i, (s, e)) in enumerate(zip(encoding.ids, encoding.offsets)) if i in raw]
        if not matches or any(text[s:e] != raw[ids[t]].content for t, s, e in matches):
            return None
        return cls(tk, text, ids, set(raw), max(len(t.content) for t in raw.values()), matches)

    def __call__(self, p: int, q: int, variant: str) -> tuple[int, int] | None:
        """For text[p:q] replaced by variant; None where no window is known to tokenize as the whole does."""
        ids, n, longest = self.ids, len(self.ids), self.longest
        j = bisect_right(self.starts, p - longest) - 1
        a, x = (self.index[j], self.starts[j]) if j >= 0 else (0, 0)
        j = bisect_left(self.starts, q)
        if j > 0 and self.ends[j - 1] > q:  # a match across the span's end
            return None
        while j < len(self.starts) and self.ends[j] < q + longest:
            j += 1
        b, y = (self.index[j] + 1, self.ends[j]) if j < len(self.starts) else (n, len(self.text))
        encoding = self.tk.encode(self.text[x:p] + variant + self.text[q:y], add_special_tokens=False)
        window, cut = encoding.ids, p - x + len(variant)
        if a > 0 and window[:1] != [ids[a]] or b < n and window[-1:] != [ids[b - 1]] or b < n and any(
                i in self.raw and s < cut < e for i, (s, e) in zip(window, encoding.offsets)):
            return None
        # the other text's ids are ids[:a] + window + ids[b:]
        prefix = a + _common_prefix((ids[t] for t in range(a, n)), chain(window, (ids[t] for t in range(b, n))))
        suffix = n - b + _common_prefix((ids[t] for t in range(b - 1, -1, -1)),
                                        chain(reversed(window), (ids[t] for t in range(a - 1, -1, -1))))
        return prefix, suffix


def _common_prefix(a: Iterable[int], b: Iterable[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
