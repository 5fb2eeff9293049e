"""LoRA on a model, by name: LoRAConfig, apply_lora, merge/unmerge/remove, and several named adapters.

This file knows nothing of model files: `apply_lora` swaps the targeted `nn.Linear` (and named
`nn.Embedding`) modules for the layers of lora.py, which keep the same `weight` and `bias`, so every
existing state-dict name stays; of a model it reads only the output heads it declares ("all-linear"
leaves those alone).

Several adapters live on one model as PEFT has them: one is active (its tensors are the layers' own,
under PEFT's names), the others wait inside each layer; `set_adapter` swaps them, `adapter_disabled`
runs the base alone, `add_weighted_adapter` makes a new adapter whose update is the weighted sum of
others' updates.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from ..errors import ConfigError
from .config import LoRAConfig
from .inject import _all_lora_layers, _put_lora, apply_lora, lora_modules
from .layers import LoRALinear


def add_adapter(model: nn.Module, name: str, config: LoRAConfig) -> nn.Module:
    """A second (third, ...) adapter beside those on the model, freshly initialised, made active. LoRA
    tensors only: modules_to_save belong to one adapter at most here."""
    adapters = getattr(model, "lora_adapters", None) or {}
    _check_name(name, adapters)
    if not adapters:
        apply_lora(model, config)
        model.lora_adapters, model.active_adapter = {name: config}, name
        return model
    if config.modules_to_save or any(c.modules_to_save for c in adapters.values()):
        raise ConfigError("several adapters with modules_to_save are not supported: only LoRA tensors can be swapped")
    _check_unmerged(model)
    _stash(model)
    try:
        _put_lora(model, config)
    except ConfigError:
        _stash(model, keep=False)  # whatever the failed attempt put on, then the active adapter back
        _unstash(model, model.active_adapter)
        raise
    for _, m in lora_modules(model):
        for p in m.parameters(recurse=True):
            p.requires_grad_(p is not m.weight and p is not getattr(m, "bias", None))
    adapters[name] = config
    model.active_adapter, model.lora_config = name, config
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make the named adapter the active one (its tensors the layers' own, trainable)."""
    adapters = getattr(model, "lora_adapters", {})
    if name not in adapters:
        raise ConfigError(f"no adapter named {name!r} on the model (it has {', '.join(adapters) or 'none'})")
    if name != model.active_adapter:
        _check_unmerged(model)
        _stash(model)
        _unstash(model, name)
        model.active_adapter, model.lora_config = name, adapters[name]
    return model


def delete_adapter(model: nn.Module, name: str) -> None:
    """Drop a named adapter that is not the active one."""
    if name == getattr(model, "active_adapter", None):
        raise ConfigError(f"adapter {name!r} is the active one: set_adapter another first")
    if name not in getattr(model, "lora_adapters", {}):
        raise ConfigError(f"no adapter named {name!r} on the model")
    for _, m in _all_lora_layers(model):
        m.stored.pop(name, None)
    del model.lora_adapters[name]


def _stash(model: nn.Module, keep: bool = True) -> None:
    """Every layer's active adapter into its store, under the active name (or dropped, without `keep`);
    the layers left empty."""
    for _, m in _all_lora_layers(model):
        if m.active and keep:
            m.stored[model.active_adapter] = {a: getattr(m, a) for a in m.slot}
        for a in m.slot:
            if isinstance(getattr(m, a), (nn.Module, nn.Parameter)):
                setattr(m, a, None)


def _unstash(model: nn.Module, name: str) -> None:
    """The named adapter's tensors back into the layers that have it, moved to the layer's device."""
    for _, m in _all_lora_layers(model):
        for a, value in m.stored.pop(name, {}).items():
            if isinstance(value, nn.Parameter) and value.device != m.weight.device:
                value = nn.Parameter(value.to(m.weight.device), requires_grad=value.requires_grad)
            elif isinstance(value, nn.Module):
                value = value.to(m.weight.device)
            setattr(m, a, value)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], name: str) -> nn.Module:
    """A new adapter whose update is Σ w_i ΔW_i exactly, from LoRA adapters on the model (PEFT's
    combination_type="cat"): A = [A_1; A_2; ...] stacked along the rank, B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]
    side by side, so B A = Σ w_i s_i B_i A_i; its rank is the sum of theirs and alpha equals it (s = 1).
    The new adapter is added, not made active. (PEFT's own "cat" copies use_rslora from the first
    adapter, so that its result is √r times the sum for rsLoRA adapters; here it is the sum.)"""
    known = getattr(model, "lora_adapters", {})
    if len(adapters) != len(weights) or not adapters or any(a not in known for a in adapters):
        raise ConfigError(f"add_weighted_adapter: adapters {adapters!r} (of {', '.join(known) or 'none'}) and weights "
                          f"{weights!r} must be as many, and name adapters on the model")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"add_weighted_adapter: weights must be finite numbers, got {weights!r}")
    if any(known[a].use_dora or known[a].modules_to_save for a in adapters):
        raise ConfigError("add_weighted_adapter: the adapters must be plain LoRA (no DoRA, no modules_to_save)")
    _check_name(name, known)
    _check_unmerged(model)
    active = model.active_adapter
    _stash(model)
    parts: dict[str, list] = {}  # layer name -> [(A, w·s·B)] over the adapters that adapt it
    for n, m in _all_lora_layers(model):
        for a, w in zip(adapters, weights):
            if a in m.stored:
                slot = m.stored[a]
                A, B = (slot["lora_A"].weight, slot["lora_B"].weight) if "lora_A" in slot else \
                    (slot["lora_embedding_A"], slot["lora_embedding_B"])
                parts.setdefault(n, []).append((A.detach(), B.detach() * (w * slot["scaling"])))
    ranks = {n: sum(A.shape[0] for A, _ in p) for n, p in parts.items()}
    r = max(ranks.values())
    config = LoRAConfig(sorted(parts), r=r, alpha=r, rank_pattern={re.escape(n): k for n, k in ranks.items() if k != r},
                        alpha_pattern={re.escape(n): k for n, k in ranks.items() if k != r})
    _put_lora(model, config)
    with torch.no_grad():
        for n, p in parts.items():
            m = model.get_submodule(n)
            A, B = torch.cat([a for a, _ in p]), torch.cat([b for _, b in p], dim=1)
            (m.lora_A.weight if isinstance(m, LoRALinear) else m.lora_embedding_A).copy_(A)
            (m.lora_B.weight if isinstance(m, LoRALinear) else m.lora_embedding_B).copy_(B)
    model.lora_adapters[name], model.active_adapter = config, name
    _stash(model)
    _unstash(model, active)
    model.active_adapter = active
    return model


def _check_name(name: object, adapters: dict) -> None:
    """A new adapter's name: not taken, and usable as a subfolder's name (PEFT's layout)."""
    if not isinstance(name, str) or not name or name in adapters or "." in name or "/" in name or name != name.strip():
        raise ConfigError(f"adapter name {name!r}: expected a new name without '.' or '/' "
                          f"(the model has {', '.join(adapters) or 'none'})")


def _check_unmerged(model: nn.Module) -> None:
    if any(m.merged for _, m in _all_lora_layers(model)):
        raise ConfigError("the active adapter is merged into the base weights: unmerge_lora(model) first")
