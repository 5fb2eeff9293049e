"""Mixed-adapter batches: each row of one batch through its own adapter, as PEFT's `adapter_names=`.

    model(input_ids, attention_mask=mask, adapter_names=["a", "b", "__base__", "a"])
    generate_ids(model, prompts, ..., adapter_names=[...])        (generate.py)

One base serves many small adapters, so requests for different adapters can share a forward pass: in
every LoRA layer the base product W0 x runs once for the whole batch, then for each adapter the rows
that asked for it are gathered and go through its A and B together (one pair of matmuls per adapter,
not per row), their term added back into those rows (index_add). "__base__" rows get W0 x alone, and
an adapter that does not target a layer adds nothing there, so each row equals its adapter run alone.
DoRA adapters work the same way (their term is computed from the same rows of W0 x); embedding
adapters too. Merged adapters cannot be told apart from W0, so a mixed batch over a merged model is
refused by name.

The keyword reaches the model through a forward pre-hook that apply_lora installs (the model files
know nothing of LoRA): it takes `adapter_names` out of the call and sets each LoRA layer's `rows`
for the length of that call.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import lora_state

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "adapters") and hasattr(m, "rows")]


@contextmanager
def mixed_adapters(model: nn.Module, adapter_names: list[str]):
    """Inside the block, row i of every batch goes through adapter adapter_names[i] (BASE: none)."""
    state = lora_state(model)
    if state is None:
        raise ConfigError("adapter_names needs a model with LoRA adapters: apply_lora or load_adapter first")
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names or not all(isinstance(n, str)
                                                                                    for n in adapter_names):
        raise ConfigError(f"adapter_names must be a list of adapter names, one per row, got {adapter_names!r}")
    unknown = sorted({n for n in adapter_names if n != BASE and n not in state.adapters})
    if unknown:
        raise ConfigError(f"adapter_names: no adapter {unknown[0]!r} on the model; it has "
                          f"{', '.join(state.adapters)} (and {BASE!r} for the base model alone)")
    layers = _layers(model)
    merged = [m for m in layers if m.merged_adapters]
    if merged:
        raise ConfigError("adapter_names on a merged model: the merged update is part of W0 for every row; "
                          "unmerge_lora(model) first")
    device = next(model.parameters()).device
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(adapter_names):
        if name != BASE:
            groups.setdefault(name, []).append(i)
    rows = {name: torch.tensor(idx, device=device) for name, idx in groups.items()}
    for m in layers:
        m.rows = (len(adapter_names), {n: idx for n, idx in rows.items() if n in m.adapters})
    try:
        yield model
    finally:
        for m in layers:
            m.rows = None


def _before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        block = mixed_adapters(module, names)
        block.__enter__()
        module.__dict__["_mixed_block"] = block
    return args, kwargs


def _after(module: nn.Module, args: tuple, kwargs: dict, output):
    block = module.__dict__.pop("_mixed_block", None)
    if block is not None:
        block.__exit__(None, None, None)


def install(model: nn.Module) -> None:
    """Let model(..., adapter_names=[...]) route rows (once per model; remove() undoes it)."""
    if "_mixed_hooks" not in model.__dict__:
        model.__dict__["_mixed_hooks"] = (model.register_forward_pre_hook(_before, with_kwargs=True),
                                          model.register_forward_hook(_after, with_kwargs=True, always_call=True))


def remove(model: nn.Module) -> None:
    for handle in model.__dict__.pop("_mixed_hooks", ()):
        handle.remove()
