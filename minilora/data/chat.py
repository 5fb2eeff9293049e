"""Conversations: records of messages, the model's own chat template, and which tokens the loss learns.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": text}. A
record holds one under `messages` (OpenAI's form) or under `conversations` as ShareGPT writes it
({"from": "human" | "gpt" | "system", "value": text}).

The chat template is the Jinja program a model ships (`chat_template` in tokenizer_config.json, or
`tokenizer.chat_template` in a GGUF file), the one transformers' `apply_chat_template` runs; it is
rendered here the same way: jinja2's sandbox, trim_blocks and lstrip_blocks on, `raise_exception`,
`strftime_now` and a `tojson` that keeps non-ASCII text. A model without one gets ChatML.

Which tokens are learned is decided on token ids, never on character offsets: the whole conversation
is tokenized once, and each assistant turn's content is where those ids differ from the ids of the same
conversation with that content replaced by a letter. The content and the end-of-turn token after it are learned;
what the template puts around them (the role header, a newline after the end) is not.
"""

from __future__ import annotations

import datetime
import functools
import json
import warnings
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import DataError

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


# ---------------------------------------------------------------------------------------------
# Rendering

class _Generation(Extension):
    """{% generation %} ... {% endgeneration %} (transformers' assistant-mask tags): rendered as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = False,
           **special_tokens: str | None) -> str:
    """The template's text for `messages`; special_tokens are bos_token, eos_token, ... as the template uses them."""
    try:
        return _compiled(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                          **special_tokens)
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template refused the conversation: {e}") from None


@functools.lru_cache(maxsize=None)
def _warn_chatml(name: str) -> None:
    warnings.warn(f"{name} has no chat template (chat_template in tokenizer_config.json or the GGUF metadata): "
                  "using ChatML (<|im_start|>role ... <|im_end|>)", stacklevel=4)


def template_of(tokenizer) -> str:
    """The tokenizer's own chat template, or ChatML (said once per tokenizer source) where the vocabulary
    has ChatML's tokens; without them, ChatML's markup would be ordinary text and no turn would end."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    name = str(getattr(tokenizer, "source", "the tokenizer"))
    if tokenizer.token_to_id("<|im_start|>") is None or tokenizer.token_to_id("<|im_end|>") is None:
        raise DataError(f"{name} has no chat template (chat_template in tokenizer_config.json or the GGUF "
                        "metadata) and no ChatML tokens (<|im_start|>, <|im_end|>) to fall back on: give it a "
                        "template, or format the data with a prompt template instead")
    _warn_chatml(name)
    return CHATML


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
    on the last answer only) finds every turn all the same."""
    template, specials = template_of(tokenizer), special_tokens(tokenizer)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # as apply_chat_template tokenizes
    ids = encode(render(template, messages, **specials))
    if train_on_all:
        return ids, [True] * len(ids)
    learned = [False] * len(ids)
    ends = set(end_of_turn_ids(tokenizer))
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        content = m["content"]
        core = content.strip()
        lead, trail = content[:len(content) - len(content.lstrip())], content[len(content.rstrip()):] if core else ""
        start, stop = 0, len(ids)
        for chars in ("xy", "01", "!?"):  # a letter, a digit, a sign: what precedes the content may tokenize
            c = next(c for c in chars if not core or c not in (core[0], core[-1]))  # by the class of its first
            other = [*messages[:i], {**m, "content": lead + c + trail}, *messages[i + 1:]]  # character
            other_ids = encode(render(template, other, **specials))
            start = max(start, _common_prefix(ids, other_ids))
            stop = min(stop, len(ids) - _common_prefix(ids[::-1], other_ids[::-1]))
        stop = start if not content else max(start, stop)  # the content's tokens: ids[start:stop]
        end = next((t for t in range(stop, len(ids)) if ids[t] in ends), None)
        for t in range(start, stop if end is None else end + 1):
            learned[t] = True
    return ids, learned


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
