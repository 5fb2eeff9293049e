"""A trained PiSSA/OLoRA adapter as a plain LoRA on the original base (PEFT's
`save_pretrained(..., path_initial_model_for_weight_conversion=...)`).

PiSSA and OLoRA start an adapter at B0 A0 and take that out of the base, so the model trains beside the
residual W_res = W − s·B0 A0, not beside W. After training to B A, the layer computes

    W_res + s·B A = W + s·(B A − B0 A0) = W + s'·[B, −B0]·[A; A0]

a plain LoRA on the untouched W of rank 2r: A' = [A; A0] (A's rows, then A0's: 2r×k) and
B' = [B, −B0] (B's columns, then −B0's: d×2r), in PEFT's order. Its scale s' must equal s: r' = 2r and
alpha' = 2·alpha (s = alpha/r), or alpha' = √2·alpha under rsLoRA (s = alpha/√r); each rank_pattern
and alpha_pattern value the same way. The file says init_lora_weights = true, so a reader rebuilds
nothing: it loads on the original base in either library, exports to GGUF and sits beside other adapters.

PEFT doubles alpha_pattern's values under rsLoRA too (its scale would then be off by √2), and so
refuses rsLoRA with patterns; here they are scaled as alpha is. PiSSA/OLoRA leave embedding adapters
and modules_to_save alone (those are relative to W already): an embedding's A and B are padded with
zeros to rank 2r, modules_to_save travel as they are (PEFT's conversion leaves both out of its file).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .initialise import changes_the_base

SAME = ("init_lora_weights", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")  # the start's scale
_LORA = re.compile(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight)?")


def check_convertible(config: dict[str, Any]) -> None:
    """A ConfigError unless the adapter (its adapter_config.json) was started by PiSSA or OLoRA."""
    how = config.get("init_lora_weights")
    if not changes_the_base(how):
        plain = isinstance(how, bool) or how == "gaussian"
        if how == "loftq":
            raise ConfigError("path_initial_model_for_weight_conversion converts a PiSSA/OLoRA adapter; a LoftQ "
                              "adapter trains beside the quantized base Q LoftQ made, which no float LoRA of the "
                              "original base reproduces (PEFT's conversion refuses it too): merge it instead")
        raise ConfigError("path_initial_model_for_weight_conversion converts a PiSSA/OLoRA adapter (relative to the "
                          f"residual base it made); this one's init_lora_weights is {how!r}"
                          + (": a LoRA on the original base already, nothing to convert (save it without "
                             "path_initial_model_for_weight_conversion)" if plain else ""))


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """adapter_config.json of the converted adapter: twice the rank, the same scale, nothing to rebuild."""
    grow = math.sqrt(2) if config.get("use_rslora") else 2  # alpha/r, or alpha/√r, unchanged by r -> 2r
    return {**config, "init_lora_weights": True, "r": 2 * config["r"], "lora_alpha": config["lora_alpha"] * grow,
            "rank_pattern": {k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
            "alpha_pattern": {k: v * grow for k, v in (config.get("alpha_pattern") or {}).items()}}


def to_plain_lora(tensors: dict[str, torch.Tensor], config: dict[str, Any], initial: dict[str, torch.Tensor],
                  initial_config: dict[str, Any], initial_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, adapter_config) of the trained adapter `tensors`/`config` (PEFT's keys and fields) as a
    plain LoRA of rank 2r, from `initial`, its tensors at the start (read from `initial_file`'s folder).
    New tensors: nothing given is changed."""
    check_convertible(config)
    check_initial(config, initial_config, initial_file)
    check_same_layers(tensors, initial, initial_file)
    out = {}
    for key, t in tensors.items():
        part = _LORA.fullmatch(key)
        if part is None:  # modules_to_save: trained in full, relative to W already
            out[key] = t
        elif part[2] == "lora_A":
            out[key] = torch.cat([t, initial[key].to(t.dtype)], dim=0)   # [A; A0], (2r, k)
        elif part[2] == "lora_B":
            out[key] = torch.cat([t, -initial[key].to(t.dtype)], dim=1)  # [B, −B0], (d, 2r)
        else:  # an embedding's: zero rows of A and columns of B add nothing
            out[key] = torch.cat([t, torch.zeros_like(t)], dim=0 if part[2] == "lora_embedding_A" else 1)
    return out, plain_config(config)


def check_initial(config: dict[str, Any], initial_config: dict[str, Any], initial_file: Path) -> None:
    """A CheckpointError unless `initial_file` is the start of a PiSSA/OLoRA adapter with the trained
    adapter's method, ranks and scales (B0 A0 were divided by that scale when they were made)."""
    how = initial_config.get("init_lora_weights")
    if not changes_the_base(how):
        raise CheckpointError(f"{initial_file}: init_lora_weights is {how!r}, not the start of a PiSSA/OLoRA adapter: "
                              "give the folder save_adapter wrote right after apply_lora, before training"
                              + (" (PEFT's own conversion rewrites it to true: write back the method it was made with)"
                                 if how is True else ""))
    for key in SAME:
        theirs, ours = initial_config.get(key), config.get(key)
        if key.endswith("_pattern"):
            theirs, ours = theirs or {}, ours or {}
        if theirs != ours and not (key == "use_rslora" and bool(theirs) == bool(ours)):
            raise CheckpointError(f"{initial_file}: {key} is {theirs!r} where the trained adapter's is {ours!r}: "
                                  "not the start of this adapter")


def check_same_layers(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], initial_file: Path) -> None:
    """A CheckpointError naming the first module or tensor where the two adapters differ: LoRA on other
    modules, or A/B of other shapes."""
    def layers(state: dict) -> set[str]:
        return {m[1] for k in state if (m := _LORA.fullmatch(k))}
    ours, theirs = layers(tensors), layers(initial)
    only = [(n, "the trained adapter") for n in sorted(ours - theirs)] + [(n, "the initial adapter")
                                                                         for n in sorted(theirs - ours)]
    if only:
        name, where = only[0]
        raise CheckpointError(f"{initial_file}: only {where} has LoRA on {name.removeprefix('base_model.model.')}: "
                              "the two adapters target different modules")
    for key, t in tensors.items():
        if _LORA.fullmatch(key) and (key not in initial or tuple(initial[key].shape) != tuple(t.shape)):
            shape = tuple(initial[key].shape) if key in initial else "no tensor"
            raise CheckpointError(f"{initial_file}: {key.removeprefix('base_model.model.')} is {shape} in the initial "
                                  f"adapter, {tuple(t.shape)} in the trained one")
