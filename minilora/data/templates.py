"""Chat templates rendered as transformers renders them (jinja2's immutable sandbox, its settings,
`{% generation %}`, raise_exception, strftime_now), within a budget: a template's loops, ranges, numbers,
output and time are bounded, so a template can fail by name but never hang a run."""

from __future__ import annotations

import contextvars
import datetime
import functools
import json
import time
import traceback
from typing import Any, Callable, Iterable, Iterator

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import DataError


class _Generation(Extension):
    """{% generation %} ... {% endgeneration %} (transformers' assistant-mask tags): rendered as is."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


# What one rendering may do. jinja2's sandbox limits one range() to 100,000 items and nothing else, so
# two loops over such ranges, one inside the other, or a text doubled in a loop, run for hours or fill
# the memory.
RENDER_SECONDS = 10.0        # wall-clock time
LOOP_ITERATIONS = 2_000_000  # iterations of all its {% for %} loops together
MAX_RANGE = 100_000          # items of one range(), as in jinja2's sandbox
OUTPUT_CHARS = 1_000_000     # text written, or one value built: this plus 10 characters per character of content
INT_BITS = 100_000           # the size of a number computed


class _TooMuchWork(Exception):
    """A rendering over its budget; the message says which part of it."""


class _Budget:
    def __init__(self, messages: Any) -> None:
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.loops_left = LOOP_ITERATIONS
        contents = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        self.chars = OUTPUT_CHARS + 10 * sum(len(c) for c in contents if isinstance(c, str))
        self.written = self.shown = 0

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TooMuchWork(f"it ran for more than {RENDER_SECONDS:g} seconds")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _tick() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()


def _chars() -> int:
    """The size a value may have: the rendering's budget, or an empty conversation's while jinja2
    compiles (it computes constant expressions then)."""
    budget = _budget.get()
    return budget.chars if budget is not None else OUTPUT_CHARS


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > _chars():
        raise _TooMuchWork(f"it built a value of {len(value):,} characters or items (at most {_chars():,})")
    return value


def _before_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a +, * or ** whose result would be too large, before computing it: a number of billions
    of digits takes hours, a text of billions of characters fills the memory."""
    _tick()
    ints = isinstance(left, int) and isinstance(right, int)
    if ints and (operator == "**" and right > 0 and abs(left) > 1 and right * abs(left).bit_length() > INT_BITS
                 or operator == "*" and left.bit_length() + right.bit_length() > INT_BITS):
        raise _TooMuchWork(f"{operator} of numbers of {left.bit_length():,} and {right.bit_length():,} bits would be "
                           f"a number of more than {INT_BITS:,} bits")
    size = 0
    if operator == "*":
        size = max((len(s) * n for s, n in ((left, right), (right, left))
                    if isinstance(s, (str, list, tuple)) and isinstance(n, int)), default=0)
    elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        size = len(left) + len(right)
    if size > _chars():
        raise _TooMuchWork(f"it would build a value of {size:,} characters or items (at most {_chars():,})")


def _shown(value: Any) -> Any:
    """jinja2's finalize, of every {{ ... }}: counted also inside macros and {% set %} blocks, whose text
    is not output yet."""
    budget = _budget.get()
    if budget is not None:
        budget.tick()
        if isinstance(value, str):
            budget.shown += len(value)
            if budget.shown > budget.chars:
                raise _TooMuchWork(f"it wrote more than {budget.chars:,} characters")
    return value


def _loop(iterable: Iterable) -> Iterator:
    """What each {% for %} of a template iterates: its own iterable, each item counted against the budget."""
    budget = _budget.get()
    for item in iterable:
        if budget is not None:
            budget.loops_left -= 1
            if budget.loops_left < 0:
                raise _TooMuchWork(f"its {{% for %}} loops ran more than {LOOP_ITERATIONS:,} iterations")
            budget.tick()
        yield item


def _range(*args: int) -> range:
    items = range(*args)
    if len(items) > MAX_RANGE:
        raise _TooMuchWork(f"range() of {len(items):,} items (at most {MAX_RANGE:,})")
    return items


def _bounded(f: Callable) -> Callable:
    """A filter whose result is size-checked (functools.wraps keeps jinja2's pass_context marks)."""
    @functools.wraps(f)
    def bounded(*args, **kwargs):
        _tick()
        return _sized(f(*args, **kwargs))
    return bounded


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' environment, the immutable sandbox, with every call, +, * and ** checked against the budget."""
    intercepted_binops = frozenset({"+", "*", "**"})

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        return _sized(super().call(context, obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _before_binop(operator, left, right)
        return _sized(super().call_binop(context, operator, left, right))


@functools.lru_cache(maxsize=8)
def _compiled(template: str) -> jinja2.Template:
    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def lipsum(n=5, *args, **kwargs):  # jinja2's own global, which has no bound
        if n > 100:
            raise _TooMuchWork(f"lipsum() of {n:,} paragraphs (at most 100)")
        return jinja2.utils.generate_lorem_ipsum(n, *args, **kwargs)

    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols], finalize=_shown)
    env.filters["tojson"] = tojson
    env.filters = {name: _bounded(f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=raise_exception, range=_range, lipsum=lipsum, _minilora_loop=_loop,
                       strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
    tree = env.parse(template)
    for loop in list(tree.find_all(jinja2.nodes.For)):  # {% for x in xs %} iterates _minilora_loop(xs)
        loop.iter = jinja2.nodes.Call(jinja2.nodes.Name("_minilora_loop", "load"), [loop.iter], [], None, None)
        loop.iter.set_lineno(loop.lineno).set_environment(env)
    return env.from_string(tree)


def render(template: str, messages: list[dict[str, str]], add_generation_prompt: bool = False, *,
           source: str | None = None, **special_tokens: str | None) -> str:
    """The template's text for `messages`; special_tokens are bos_token, eos_token, ... as the template uses them.

    Whatever goes wrong is a DataError that says what, naming the template by `source` (its file): a
    template that is not Jinja, one that refuses the conversation (raise_exception), one that fails on
    it (any exception: a division by zero, text plus a number, a recursion without end), one that does
    more work than the budget above."""
    named = f"; template: {source}" if source else ""
    budget = _Budget(messages)
    outer = _budget.set(budget)
    try:
        parts = []
        for part in _compiled(template).generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **special_tokens):
            budget.written += len(part)
            if budget.written > budget.chars:
                raise _TooMuchWork(f"it wrote more than {budget.chars:,} characters")
            budget.tick()
            parts.append(part)
        return "".join(parts)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise DataError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}){named}") from None
    except _TooMuchWork as e:
        raise DataError(f"the chat template did too much work on the conversation: {e}{named}") from None
    except jinja2.exceptions.TemplateError as e:
        raise DataError(f"the chat template refused the conversation: {e}{named}") from None
    except Exception as e:  # the template's own failure, of any type: never a traceback from inside jinja2
        lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == "<template>"]
        at = f", at line {lines[-1]} of the template" if lines else ""
        raise DataError(f"the chat template failed on the conversation: {type(e).__name__}: {e}{at}{named}") from None
    finally:
        _budget.reset(outer)
