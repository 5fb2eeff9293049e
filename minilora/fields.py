"""Dataclasses filled from a JSON or TOML table (config.json, a recipe's section), every value checked
against its field's annotation ("int | None", "float", "bool", "list[str] | str", ...), so that a wrong
type is an error naming the key, not a crash somewhere later.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, TypeVar

from .errors import ConfigError

C = TypeVar("C")
WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "dict": "a table",
         "list": "a list", "tuple": "a list"}


def from_table(cls: type[C], table: Any, where: str, unknown_keys_allowed: bool = False, ranges: bool = False) -> C:
    """cls(**table), after checking every key: unknown keys (refused unless `unknown_keys_allowed`, then
    left out), missing required ones, and each value's type; with `ranges`, sizes too (see `problem`).
    An error from cls itself (its __post_init__ checks) comes back prefixed with `where`."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of keys, found {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in table if k not in fields]
    if unknown and not unknown_keys_allowed:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if n not in table and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)} needed by {cls.__name__}")
    values = {k: v for k, v in table.items() if k in fields}
    for key, value in values.items():
        expected = problem(key, str(fields[key].type), value, ranges)
        if expected:
            raise ConfigError(f"{where}: {key} must be {expected}, got {value!r}")
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def problem(name: str, annotation: str, value: Any, ranges: bool = False) -> str | None:
    """What `value` should have been for a field annotated `annotation`; None when it is fine. With
    `ranges` (config.json's sizes): integers are > 0, but token ids >= 0; floats are > 0 and finite,
    but dropout probabilities are in [0, 1]."""
    kinds = {k.strip() for k in re.sub(r"\[[^\]]*\]", "", annotation).split("|")}
    items = dict(re.findall(r"(list|tuple)\[(\w+)", annotation))
    described = " or ".join(WORDS.get(k, k) for k in sorted(kinds - {"None"})) + (" or null" if "None" in kinds else "")
    probability = "drop" in name or "prob" in name
    if value is None:
        return None if "None" in kinds else "set (not null)"
    if isinstance(value, bool):
        return None if "bool" in kinds else described
    if isinstance(value, int) and ("int" in kinds or "float" in kinds):
        low = 0 if name.endswith("_id") or probability or name == "max_window_layers" else 1  # 0: every layer
        return None if not ranges or value >= low else ("an integer >= 0" if low == 0 else "a positive integer")
    if isinstance(value, float) and "float" in kinds:
        if not ranges:
            return None
        if probability:
            return None if 0 <= value <= 1 else "a probability in [0, 1]"
        return None if 0 < value < math.inf else "a positive finite number"
    if isinstance(value, str) and "str" in kinds or isinstance(value, dict) and "dict" in kinds:
        return None
    for kind in ("list", "tuple"):
        if kind in kinds and isinstance(value, (list, tuple)):
            item = {"int": int, "str": str}.get(items.get(kind, ""), object)
            ok = all(isinstance(x, item) and not (item is int and (isinstance(x, bool) or ranges and x < 0))
                     for x in value)
            noun = {"int": "integers", "str": "strings"}.get(items.get(kind, ""), "values")
            return None if ok else f"a list of {noun}" + (" (token ids)" if ranges and item is int else "")
    return described
