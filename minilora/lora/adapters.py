"""Several named adapters on one model, side by side, as PEFT has them: each LoRA layer holds every
adapter that targets it (layers.py), the model's LoRAState names them and says which are active.
`set_adapter` activates one (or several, whose updates add), `delete_adapter` drops one,
`add_weighted_adapter` makes a new adapter whose update is the weighted sum of others' updates, and
inject.adapter_disabled runs the base alone. Only the active adapters' tensors are trainable.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import LoRAConfig, lora_state
from .inject import all_lora_layers, put_first_adapter, put_lora


def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> nn.Module:
    """A second (third, ...) adapter beside those on the model, freshly initialised, made active. LoRA
    tensors only: modules_to_save belong to one adapter at most here."""
    state = lora_state(model)
    _check_name(name, state.adapters if state else {})
    if state is None:
        return put_first_adapter(model, config, name)
    if config.modules_to_save or any(c.modules_to_save for c in state.adapters.values()):
        raise ConfigError("several adapters with modules_to_save are not supported: only LoRA tensors can be swapped")
    _check_unmerged(model)
    try:
        put_lora(model, config, name)
    except ConfigError:
        _drop(model, name)  # whatever the failed attempt put on
        _activate(model, state.active)
        raise
    state.adapters[name] = config
    _activate(model, [name])
    return model


def set_adapter(model: nn.Module, name: str | list[str]) -> nn.Module:
    """Make the named adapter (or adapters: their updates add) the active one, and the only trainable one."""
    state = lora_state(model)
    names = [name] if isinstance(name, str) else list(name)
    known = state.adapters if state else {}
    wrong = [n for n in names if n not in known] or ([] if names else ["(none)"])
    if wrong:
        raise ConfigError(f"no adapter named {wrong[0]!r} on the model (it has {', '.join(known) or 'none'})")
    if names != state.active:
        _check_unmerged(model)
        _activate(model, names)
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop a named adapter that is not an active one."""
    state = lora_state(model)
    if state is not None and name in state.active:
        raise ConfigError(f"adapter {name!r} is the active one: set_adapter another first")
    if state is None or name not in state.adapters:
        raise ConfigError(f"no adapter named {name!r} on the model")
    _drop(model, name)
    del state.adapters[name]


def _activate(model: nn.Module, names: list[str]) -> None:
    """The named adapters compute, in every layer that has them, and only their tensors train."""
    lora_state(model).active = list(names)
    for _, m in all_lora_layers(model):
        m.active_adapters = [n for n in names if n in m.adapters]
        for n, adapter in m.adapters.items():
            adapter.requires_grad_(n in names)


def _drop(model: nn.Module, name: str) -> None:
    for _, m in all_lora_layers(model):
        if name in m.adapters:
            del m.adapters[name]
            m.active_adapters = [n for n in m.active_adapters if n != name]


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], name: str) -> nn.Module:
    """A new adapter whose update is Σ w_i ΔW_i exactly, from LoRA adapters on the model (PEFT's
    combination_type="cat"): A = [A_1; A_2; ...] stacked along the rank, B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
    side by side, so B A = Σ w_i s_i B_i A_i; its rank is the sum of theirs and alpha equals it (s = 1).
    The new adapter is added, not made active. (PEFT's own "cat" copies use_rslora from the first
    adapter, so that its result is √r times the sum for rsLoRA adapters; here it is the sum.)"""
    state = lora_state(model)
    known = state.adapters if state else {}
    if len(adapters) != len(weights) or not adapters or any(a not in known for a in adapters):
        raise ConfigError(f"add_weighted_adapter: adapters {adapters!r} (of {', '.join(known) or 'none'}) and weights "
                          f"{weights!r} must be as many, and name adapters on the model")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
    if any(known[a].use_dora or known[a].modules_to_save for a in adapters):
        raise ConfigError("add_weighted_adapter: the adapters must be plain LoRA (no DoRA, no modules_to_save)")
    _check_name(name, known)
    _check_unmerged(model)
    parts: dict[str, list] = {}  # layer name -> [(A, w·s·B)] over the adapters that adapt it
    for n, m in all_lora_layers(model):
        for a, w in zip(adapters, weights):
            if a in m.adapters:
                A, B = _factors(m.adapters[a])
                parts.setdefault(n, []).append((A.detach(), B.detach() * (w * m.adapters[a].scaling)))
    ranks = {n: sum(A.shape[0] for A, _ in p) for n, p in parts.items()}
    r = max(ranks.values())
    config = LoRAConfig(sorted(parts), r=r, alpha=r, rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r},
                        alpha_pattern={re.escape(n): k for n, k in ranks.items() if k != r})
    put_lora(model, config, name)
    with torch.no_grad():
        for n, p in parts.items():
            A, B = _factors(model.get_submodule(n).adapters[name])
            A.copy_(torch.cat([a for a, _ in p]))
            B.copy_(torch.cat([b for _, b in p], dim=1))
    state.adapters[name] = config
    _activate(model, state.active)  # the new adapter is added, not made active
    return model


def _factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a linear layer's or an embedding's adapter."""
    if hasattr(adapter, "lora_A"):
        return adapter.lora_A.weight, adapter.lora_B.weight
    return adapter.lora_embedding_A, adapter.lora_embedding_B


def _check_name(name: object, adapters: dict) -> None:
    """A new adapter's name: not taken, and usable as a subfolder's name (PEFT's layout)."""
    if not isinstance(name, str) or not name or name in adapters or "." in name or "/" in name or name != name.strip():
        raise ConfigError(f"adapter name {name!r}: expected a new name without '.' or '/' "
                          f"(the model has {', '.join(adapters) or 'none'})")


def _check_unmerged(model: nn.Module) -> None:
    if any(m.merged for _, m in all_lora_layers(model)):
        raise ConfigError("the active adapter is merged into the base weights: unmerge_lora(model) first")
