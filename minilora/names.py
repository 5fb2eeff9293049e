"""Modules found and replaced by name, for LoRA (targets, modules_to_save) and quantization alike.

Names are matched as PEFT matches `target_modules`: a list of names matches a module whose full name
is one of them or ends with "." + one of them; one string is a regular expression over full names.
"""

from __future__ import annotations

import re

import torch.nn as nn

from .errors import ConfigError

# For a model that declares nothing (a user's own nn.Module): the usual names of output layers (a
# language model's lm_head; classification heads, which PEFT names score or classifier), and of the
# layer before a classifier that DistilBERT-like heads add.
USUAL_HEADS = ("lm_head", "classifier", "score")
USUAL_TASK_HEAD = ("pre_classifier", "classifier", "score")
# What PEFT adds to every SEQ_CLS adapter's modules_to_save, whatever the family: one of the two names
# the model's classifier, the other names nothing and is skipped (by PEFT, and so here).
CLASSIFIER_NAMES = ("classifier", "score")


def matches(name: str, patterns: list[str] | tuple[str, ...] | str) -> bool:
    """Does a full module name match name suffixes (a list) or a regex (one string)?"""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def check_regex(pattern: str, what: str = "regex") -> None:
    """A ConfigError for a pattern that does not compile, or that repeats a repetition (see below)."""
    try:
        nested = repeats_a_repetition(pattern)
    except re.error as e:
        raise ConfigError(f"{what} {pattern!r} is not a valid regular expression ({e})") from None
    if nested:
        raise ConfigError(f"{what} {pattern!r} repeats a repetition (as (a*)* does), which can take exponential "
                          "time on module names: use a flat regex or a list of module names")


def repeats_a_repetition(pattern: str) -> bool:
    """Does a regex quantify something that holds a quantifier, as (a+)+ or (.*)*x do? Such a pattern can
    backtrack for an exponential time on a name it does not match; flat ones stay polynomial."""
    try:
        from re import _parser as parser  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse as parser

    def walk(items, inside: bool) -> bool:
        for op, arg in items:
            if str(op) in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                many = high is parser.MAXREPEAT or high > 1
                if many and inside or walk(sub, inside or many):
                    return True
            elif str(op) in ("SUBPATTERN", "ATOMIC_GROUP", "ASSERT", "ASSERT_NOT"):
                if walk(arg[-1], inside):
                    return True
            elif str(op) == "BRANCH" and any(walk(branch, inside) for branch in arg[1]):
                return True
        return False
    return walk(parser.parse(pattern), False)


def find_modules(model: nn.Module, patterns: list[str] | tuple[str, ...] | str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every submodule whose name matches."""
    return [(n, m) for n, m in model.named_modules() if n and matches(n, patterns)]


def find_saved(model: nn.Module, names: list[str] | tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """The modules that modules_to_save names, matched as PEFT matches them: a full name that ends with
    one of the strings, dot or not ("classifier" takes DistilBERT's pre_classifier too, in PEFT and so
    here). A module inside one already taken is left to its parent."""
    found: list[tuple[str, nn.Module]] = []
    for n, m in model.named_modules():
        if n and any(n.endswith(t) for t in names) and not any(n.startswith(p + ".") for p, _ in found):
            found.append((n, m))
    return found


def owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> names of the modules holding it; two or more names: a tied parameter."""
    found: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            found.setdefault(id(p), []).append(name)
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def output_heads(model: nn.Module) -> tuple[str, ...]:
    """The layers that produce the model's output, as the model declares them: "all-linear" LoRA leaves
    these alone, and quantization keeps them in floating point."""
    return tuple(getattr(model, "output_heads", USUAL_HEADS))


def kept_in_float(model: nn.Module) -> tuple[str, ...]:
    """What quantization leaves in floating point: the output heads and every module of the task head
    (a classifier's layers, trained in full through modules_to_save, cannot be int8)."""
    return output_heads(model) + tuple(getattr(model, "task_head", USUAL_TASK_HEAD))


def swap_linears(model: nn.Module, skip: tuple[str, ...] | None, make) -> dict[str, nn.Module]:
    """Swap every plain nn.Linear but those `skip` names (by default kept_in_float) for make(linear), or
    leave it where make returns None; returns {"<name>.weight": new layer} (for quantizing on load)."""
    skip = kept_in_float(model) if skip is None else skip
    swapped = {}
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not matches(name, skip):
            layer = make(module)
            if layer is not None:
                replace_module(model, name, layer)
                swapped[name + ".weight"] = layer
    return swapped


def find_targets(model: nn.Module, targets: list[str] | str, linear: tuple[type, ...] = (nn.Linear,),
                 embedding: tuple[type, ...] = (nn.Embedding,)) -> list[str]:
    """Names of the `linear` modules that `targets` selects (module-name suffixes, a regex over full
    names, or "all-linear": all but the output heads; `embedding` tables too when named); a ConfigError
    if a target selects none, naming what the model's linear modules are called. (LoRA passes its
    own classes here too, and the quantized bases': names.py knows neither.)"""
    found = [n for n, m in model.named_modules() if isinstance(m, linear)]
    if targets != "all-linear":  # an embedding table is a target when named (as in PEFT), never in "all-linear"
        found += [n for n, m in model.named_modules() if isinstance(m, embedding)]
    linear = found
    if targets == "all-linear":
        heads = output_heads(model)
        chosen = [n for n in linear if not matches(n, heads)]
    elif isinstance(targets, str):
        chosen = [n for n in linear if matches(n, targets)]
        if not chosen:
            hint = f" (a regex must match the whole name, as '.*{targets}'; or give a list of name suffixes)" \
                if any(n.endswith(targets) for n in linear) else ""
            raise ConfigError(f"LoRA target regex {targets!r} matches no linear module{hint}; linear modules are "
                              f"named like: {_suffix_summary(linear)}")
    else:
        chosen = [n for n in linear if matches(n, targets)]
        for t in targets:
            if not any(matches(n, [t]) for n in chosen):
                others = [n for n, _ in find_modules(model, [t])]
                why = f"it names {others[0]!r}, which is {type(model.get_submodule(others[0])).__name__}, " \
                      "not a linear layer" if others else "no module has that name"
                raise ConfigError(f"LoRA target {t!r} matches no linear module ({why}); linear modules are "
                                  f"named like: {_suffix_summary(linear)}")
    if not chosen:
        raise ConfigError(f"LoRA targets {targets!r} select no linear module")
    return chosen


def _suffix_summary(names: list[str]) -> str:
    suffixes = sorted({n.split(".")[-1] for n in names})
    return ", ".join(suffixes) if suffixes else "(the model has no linear modules)"
