"""The contract every quantized base weight keeps: `QuantizedLinear`, and `Quantizer`, how one is built
from a stream of checkpoint tensors.

A quantized base is frozen: training never changes it, so it owes the rest of the package only

    product(x)      y = x Wᵀ + b, whose backward gives x its gradient dL/dx = g W (W gets none)
    dequantize()    W in fp32, (out_features, in_features)
    rows(r0, r1)    rows r0..r1 of W in a dtype (what the fused head loss reads of a quantized head),
                    written into `out` where the caller gives a buffer to reuse
    nbytes()        the bytes it holds: the stored weight, its scales or codes, the bias

`weight` keeps the float layer's name and holds the stored form (int8 values, packed 4-bit codes,
raw ggml blocks), so state-dict names stay the checkpoint's; `packed_elements` says how many logical
weights one stored element stands for, so parameter counts are d·k, not bytes.

LoRA wraps a quantized base as it wraps an nn.Linear: `LoRALinear` takes over `weight`, `bias` and
the attributes named in `state` (scales, codes, the block type) and calls the base class's methods on
itself. So each method below reads only `weight`, `bias`, `in_features`, `out_features` and `state`,
and one method reaches another through its class (`NF4Linear.rows(self, ...)`), never through `self`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn

Transform = Callable[[str, torch.Tensor], torch.Tensor]


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored in fewer bits; see the module's docstring."""

    state: tuple[str, ...] = ()    # what the product reads besides weight and bias
    packed_elements: float = 1     # logical weights per stored element of `weight`
    quantized_on_load = False      # the loader hands it the float (d, k) weight (not the stored form)

    in_features: int
    out_features: int

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.dequantize()[r0:r1].to(dtype)
        return rows if out is None else out.copy_(rows)

    def nbytes(self) -> int:
        tensors = [self.weight, self.bias, *(getattr(self, name) for name in self.state)]
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.product(x)


@dataclass
class LoadPlan:
    """What a quantizer asks of the loader: `transform(name, tensor)` turns each checkpoint tensor into
    what its layer stores (int8 rows, NF4 codes; the tensor itself for layers it did not swap), and
    `raw` names the tensors that must arrive as the file stores them (a GGUF's own blocks)."""
    transform: Transform | None = None
    raw: frozenset[str] = field(default_factory=frozenset)


class Quantizer(Protocol):
    """How a quantized base is built while its weights stream in: `prepare` swaps the linear layers of a
    model built on `meta` (all but `skip`, by default the output heads) for empty quantized ones."""

    def prepare(self, model: nn.Module, skip: tuple[str, ...] | None, device: torch.device | str) -> LoadPlan:
        ...
