"""Hot-swapping an adapter's weights in place, as PEFT's `hotswap_adapter` (peft.utils.hotswap):

    prepare_model_for_compiled_hotswap(model, target_rank=16)   # once, before torch.compile (optional)
    compiled = torch.compile(model)
    hotswap_adapter(model, "adapters/b", adapter_name="default")  # no re-injection, no recompile

Nothing is re-injected or re-allocated: the new A and B are copied into the tensors the layers already
hold, so a compiled model's graphs (which read those tensors, and whose guards check their shapes and
the layers' Python attributes) stay valid. What would change a guard is avoided: a smaller rank is
padded with zeros (A's extra rows and B's extra columns add nothing to B A), and a different scaling
s' is folded into B (s · (s'/s · B) A = s' · B A), so each layer keeps its own s. A larger rank than a
layer holds cannot fit its tensors: prepare_model_for_compiled_hotswap pads every adapter to a target
rank first (zeros again, the scaling kept), as PEFT's does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError
from .config import lora_state
from .embedding import LoRAEmbedding
from .inject import all_lora_layers
from .layers import a_and_b, scale
from .peft_files import CONFIG_FILE, PREFIX, lora_config_from_peft, read_adapter


def _layers_with(model: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    state = lora_state(model)
    if state is None or adapter_name not in state.adapters:
        raise ConfigError(f"no adapter {adapter_name!r} on the model to swap into"
                          + (f"; it has {', '.join(state.adapters)}" if state is not None else ": load one first"))
    layers = {n: m for n, m in all_lora_layers(model) if adapter_name in m.adapters}
    if any(m.merged_adapters for m in layers.values()):
        raise ConfigError("hotswap_adapter into a merged model: unmerge_lora(model) first")
    if any(getattr(m.adapters[adapter_name], "use_dora", False) for m in layers.values()):
        raise ConfigError(f"hotswap_adapter: adapter {adapter_name!r} is DoRA, whose magnitudes are not swapped here "
                          "(nor in PEFT)")
    return layers


@torch.no_grad()
def prepare_model_for_compiled_hotswap(model: nn.Module, target_rank: int, adapter_name: str = "default") -> None:
    """Pad the adapter's A and B with zeros to rank `target_rank` in every layer (its update unchanged,
    its scaling kept: alpha is restated for the new r), so that adapters up to that rank swap in later."""
    if isinstance(target_rank, bool) or not isinstance(target_rank, int) or target_rank <= 0:
        raise ConfigError(f"target_rank must be a positive integer, got {target_rank!r}")
    layers = _layers_with(model, adapter_name)
    small = [f"{n} (r={m.adapters[adapter_name].r})" for n, m in layers.items() if m.adapters[adapter_name].r > target_rank]
    if small:
        raise ConfigError(f"target_rank {target_rank} is below the rank the adapter has already: {small[0]}")
    for m in layers.values():
        a = m.adapters[adapter_name]
        A, B = a_and_b(a)
        grow = target_rank - a.r
        if not grow:
            continue
        A.data = torch.cat([A, A.new_zeros(grow, A.shape[1])])
        B.data = torch.cat([B, B.new_zeros(B.shape[0], grow)], dim=1)
        if not isinstance(m, LoRAEmbedding):
            a.lora_A.out_features = a.lora_B.in_features = target_rank
        a.r, a.alpha = target_rank, a.scaling * (target_rank ** 0.5 if a.use_rslora else target_rank)
    state = lora_state(model)
    config = state.adapters[adapter_name]
    config.r, config.rank_pattern, config.alpha_pattern = target_rank, {}, {
        re.escape(n): m.adapters[adapter_name].alpha for n, m in layers.items()}


@torch.no_grad()
def hotswap_adapter(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> nn.Module:
    """Replace the weights of `adapter_name` by those of the adapter saved in `folder`, in place. The
    file must adapt exactly the layers that adapter does, at a rank no higher than each layer holds.
    Checked in full before anything is copied: a refused swap leaves the model as it was."""
    layers = _layers_with(model, adapter_name)
    config, tensors = read_adapter(folder)
    file = Path(folder) / CONFIG_FILE
    settings = lora_config_from_peft(config, file, list(tensors))
    if settings.use_dora or settings.modules_to_save:
        raise CheckpointError(f"{file}: hotswap_adapter swaps LoRA's A and B only; this adapter has "
                              + ("DoRA magnitudes" if settings.use_dora else "modules_to_save"))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_(A|B|embedding_A|embedding_B)(?:\.weight)?", key.removeprefix(PREFIX))
        if match is None:
            raise CheckpointError(f"{file}: {key} is not a LoRA A or B tensor; hotswap_adapter swaps those only")
        found.setdefault(match[1], {})[match[2].removeprefix("embedding_")] = tensor
    extra, lacking = sorted(set(found) - set(layers)), sorted(set(layers) - set(found))
    if extra or lacking:
        raise CheckpointError(f"{file}: hotswap_adapter needs the same targets as adapter {adapter_name!r}; "
                              + "; ".join(part for part in (
                                  f"the file adapts {', '.join(extra[:3])} which it does not" if extra else "",
                                  f"the file lacks {', '.join(lacking[:3])}" if lacking else "") if part))
    plan = []
    for name, m in layers.items():
        a = m.adapters[adapter_name]
        A, B = a_and_b(a)
        new_a, new_b = found[name].get("A"), found[name].get("B")
        if new_a is None or new_b is None:
            raise CheckpointError(f"{file}: {name} has only one of lora_A and lora_B")
        r = new_a.shape[0]
        if new_a.shape[1:] != A.shape[1:] or new_b.shape[0] != B.shape[0] or new_b.shape[1] != r:
            raise CheckpointError(f"{file}: {name}: A {tuple(new_a.shape)} and B {tuple(new_b.shape)} do not fit the "
                                  f"layer's A {tuple(A.shape)} and B {tuple(B.shape)} (another base model?)")
        if r > a.r:
            raise CheckpointError(f"{file}: {name} has rank {r}, the layer holds {a.r}: call "
                                  f"prepare_model_for_compiled_hotswap(model, target_rank={r}) before compiling")
        rank, alpha = settings.settings_for(name)
        ratio = scale(rank, alpha, settings.use_rslora) / a.scaling  # the file's s over the layer's
        plan.append((A, B, new_a, new_b * ratio, r))
    for A, B, new_a, new_b, r in plan:
        A.zero_()[:r].copy_(new_a)
        B.zero_()[:, :r].copy_(new_b)
    return model
