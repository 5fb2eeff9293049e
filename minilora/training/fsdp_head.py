"""Under FSDP (fsdp.py), the token embedding and the output head as units of their own, gathered only
while they are used. In the root unit they would stay whole from the first block's forward to the last
one's backward (for Qwen2.5-1.5B, 0.43 GiB of its 2.88 on every rank, however many ranks).

The fused head loss (objectives/causal_lm.py) reads the head's weight directly, not through its
forward, so FSDP's hooks would not gather it: the loss gathers it itself (`gathered`). The weight is
not needed again in the backward, which scales the input gradient the forward made. A head tied to the
embedding becomes a TiedHead: no weight of its own, it reads the embedding's, through that unit; after
the run (restore_heads) it is a plain tied nn.Linear again.

torch.distributed.fsdp is imported only where it shards (see fsdp.py).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import TYPE_CHECKING, Iterator

import torch
import torch.nn as nn

from ..kernels import release_prepared_head

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

_head_units: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()  # head -> its unit


class TiedHead(nn.Linear):
    """Under FSDP, an output head tied to the token embedding: no weight of its own, it reads the
    embedding's (this rank's slice, or the whole while the embedding's unit is gathered), and runs its
    product through a method of that unit which FSDP gathers for, forward and backward."""

    @property
    def weight(self) -> torch.Tensor:
        owner, name = self.unit.head_weight
        return owner._parameters[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit.tied_head(x, self.bias)


def _tied_head(unit: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    owner, name = unit.head_weight
    return torch.nn.functional.linear(x, owner._parameters[name], bias)


def shard_embedding_and_head(model: nn.Module, policy: MixedPrecisionPolicy) -> None:
    """The token embedding its own unit, and a plain output head too, or a TiedHead reading the embedding's
    unit; a head of another kind (LoRA on a tied head) stays in the root unit with the embedding."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    embed, head = getattr(model, "input_embeddings", None) if hasattr(model, "hidden_states") else None, \
        getattr(model, "lm_head", None)
    if not isinstance(embed, nn.Module) or not any(True for _ in embed.parameters()):
        return
    tied = [(m, name) for m in embed.modules() for name, p in m._parameters.items()
            if head is not None and p is getattr(head, "weight", None)]
    if tied and type(head) is not nn.Linear:
        return
    if tied:
        del head._parameters["weight"]  # before fully_shard: else the root would shard it again
        head.__class__, embed.head_weight = TiedHead, tied[0]
        object.__setattr__(head, "unit", embed)  # not a submodule of the head: the model's tree stays as it is
    fully_shard(embed, mp_policy=policy)
    if tied:
        embed.tied_head = types.MethodType(_tied_head, embed)
        register_fsdp_forward_method(embed, "tied_head")
        _head_units[head] = embed
    elif type(head) is nn.Linear:
        fully_shard(head, mp_policy=policy)
        _head_units[head] = head


@contextlib.contextmanager
def gathered(head: nn.Module) -> Iterator[None]:
    """While the block runs, the output head's weight whole (its unit gathered), then this rank's slice
    again; for the fused head loss, which reads head.weight without calling the head. Any other module,
    and a model not sharded, as it is."""
    unit = _head_units.get(head)
    if unit is None:
        yield
        return
    unit.unshard()
    try:
        yield
    finally:
        release_prepared_head(head.weight)  # the kernel's cast or padded copy of it, if it made one
        unit.reshard()


def restore_heads(model: nn.Module) -> None:
    """The heads made TiedHead plain nn.Linear again, tied to the (now whole) embedding weight."""
    for head in [m for m in model.modules() if m in _head_units]:
        del _head_units[head]
        if isinstance(head, TiedHead):
            weight = head.weight
            head.__class__ = nn.Linear
            del head.unit
            head._parameters["weight"] = weight
