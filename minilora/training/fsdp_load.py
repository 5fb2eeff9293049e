"""Sharded loading for FSDP (fsdp.py): each rank reads from the checkpoint only its own slice of each
weight, so that its memory is about 1/N of the model while loading too, not only while training.

The model comes from load_model(..., shard=True) (loading/weights.py): built, its quantized layers in
place, but every tensor a placeholder that holds no memory, so apply_lora makes the adapter exactly as
after a whole load (the same shapes, dtypes and random draws). `read_when_sharded(model, reader)` hands
over the reader (weights.slice_reader); fsdp.shard then puts the base on `meta`, shards it there (FSDP
allocates each rank's slices alone), and fills them: each float weight's rows r0..r1 are read alone;
a quantized weight is read whole (one tensor at a time), quantized as its loader would, and only this
rank's slices of its codes and scales are kept, since NF4's blocks and double quantization run over
the whole flattened weight. The adapter's values are kept through all of it.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..lora.config import lora_state
from ..lora.layers import LoRALinear, is_adapter_tensor
from ..quant.base import QuantizedLinear
from . import distributed

Reader = Callable[[str, tuple[int, ...], int, "int | None"], torch.Tensor]
_PENDING: "weakref.WeakKeyDictionary[nn.Module, Reader]" = weakref.WeakKeyDictionary()


def read_when_sharded(model: nn.Module, reader: Reader) -> None:
    """fsdp.shard (inside train()) fills `model`'s slices from `reader` once it has sharded it."""
    _PENDING[model] = reader


def plain_lora(lora) -> str | None:
    """Why an adapter of these settings cannot start from placeholders (None: it can): DoRA's magnitude,
    PiSSA's, OLoRA's and LoftQ's starts read W0, and modules_to_save copies a tied weight's values."""
    if lora.use_dora:
        return "use_dora (its magnitude starts as the row norms of W0)"
    if lora.init_lora_weights not in (True, False, "gaussian"):
        return f"init_lora_weights {lora.init_lora_weights!r} (it starts from W0)"
    if lora.modules_to_save:
        return "modules_to_save (a tied module's copy is made from its weights)"
    return None


def pending(model: nn.Module) -> Reader | None:
    """The reader for a model loaded in placeholders, after checking its adapter starts without W0."""
    reader = _PENDING.pop(model, None)
    state = lora_state(model)
    for config in state.adapters.values() if reader is not None and state is not None else ():
        why = plain_lora(config)
        if why is not None:
            raise ConfigError(f"fsdp = true with a model loaded with shard=True and {why}: load it whole "
                              "(load_model without shard), or leave that setting out")
    return reader


def to_meta(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every base tensor (placeholders) made `meta`, ties kept; returns the adapter's values by name."""
    made: dict[int, torch.Tensor] = {}
    names = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False)]}
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for key, t in store.items():
                if t is None or t.requires_grad or is_adapter_tensor(names[id(t)]):
                    continue
                if id(t) not in made:
                    empty = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    made[id(t)] = nn.Parameter(empty, requires_grad=False) if store is m._parameters else empty
                store[key] = made[id(t)]
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_meta}


def _rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this rank's slice of `p` to write into, the first row it holds): FSDP's Shard(0) chunks rows as
    torch.chunk does, ceil(d / N) each, the last ones shorter or empty."""
    if not distributed.sharded_type("DTensor", p):
        return p.data, 0
    rank, world = distributed.rank_and_world()
    return p.to_local(), rank * math.ceil(p.shape[0] / world)


@torch.no_grad()
def fill(model: nn.Module, reader: Reader, adapter: dict[str, torch.Tensor], device: torch.device) -> None:
    """After fully_shard on `meta`: allocate this rank's slices, put back the adapter's values, and read
    every base slice from the checkpoint (quantized layers: quantized from their whole weight)."""
    model.to_empty(device=device)
    tied = getattr(model, "tied_weights", {})
    done: set[str] = set()
    for prefix, m in model.named_modules():
        kind = type(m) if isinstance(m, QuantizedLinear) else m.quantized if isinstance(m, LoRALinear) else None
        if kind is not None:
            _fill_quantized(m, kind, f"{prefix}.weight", reader)
            done |= {f"{prefix}.{n}" for n in ("weight", *kind.state)}
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if name in done:
            continue
        local, first = _rows(p)
        if name in adapter:
            local.copy_(_rows_of(adapter[name], p, first, local))
        elif local.numel():
            local.copy_(reader(tied.get(name, name), tuple(p.shape), first, first + local.shape[0]))


def _rows_of(whole: torch.Tensor, p: torch.Tensor, first: int, local: torch.Tensor) -> torch.Tensor:
    return whole[first:first + local.shape[0]] if distributed.sharded_type("DTensor", p) else whole


def _fill_quantized(layer: nn.Module, kind: type[QuantizedLinear], name: str, reader: Reader) -> None:
    """A quantized layer's slices: its float weight read whole, quantized into a scratch layer of its
    class (set_weight, as its loader does), and this rank's rows of the codes and scales copied."""
    scratch = kind(layer.in_features, layer.out_features, bias=False, device="meta")
    scratch.set_weight(reader(name, (layer.out_features, layer.in_features), 0, None))
    for key in ("weight", *kind.state):
        value, target = getattr(scratch, key), getattr(layer, key)
        if not isinstance(target, torch.Tensor):
            continue
        local, first = _rows(target)
        if local.numel():
            local.copy_(value.reshape(target.shape)[first:first + local.shape[0]] if local.dim() else value)
