"""Modules found and replaced by name, for LoRA (targets, modules_to_save) and quantization alike.

Names are matched as PEFT matches `target_modules`: a list of names matches a module whose full name
is one of them or ends with "." + one of them; one string is a regular expression over full names.
"""

from __future__ import annotations

import re

import torch.nn as nn

# A model that declares no output heads (a user's own nn.Module): the names PEFT treats as output layers.
USUAL_HEADS = ("lm_head", "classifier", "score")


def matches(name: str, patterns: list[str] | tuple[str, ...] | str) -> bool:
    """Does a full module name match name suffixes (a list) or a regex (one string)?"""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def output_heads(model: nn.Module) -> tuple[str, ...]:
    """Names of the layers that produce the model's output, as the model declares them: "all-linear"
    LoRA and quantization leave these alone."""
    return tuple(getattr(model, "output_heads", USUAL_HEADS))
