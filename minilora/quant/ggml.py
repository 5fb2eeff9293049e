"""A frozen base kept in a GGUF file's own blocks (Q4_0 ... Q8_0, Q2_K ... Q6_K; their layouts and
dequantization are in formats/ggml_blocks.py): GGMLLinear for the linear layers (an untied output head
included), GGMLEmbedding for the token embedding (and a head tied to it), and GGMLKeeper, which puts them
in a model as it loads.
Every product dequantizes a block of rows at a time, so no float copy of a whole weight ever exists.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..formats.ggml_blocks import BLOCKS, NAMES, dequantize_blocks, dequantize_blocks_into
from ..names import kept_in_float, matches, output_heads, replace_module
from .base import LoadPlan, QuantizedLinear
from .blockwise import FORMATS, BlockwiseBase, blockwise_linear


def block_rows(layer: nn.Module, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0..r1 of a kept weight (`layer.weight` (rows, bytes per row) uint8 of `layer.kind`) in dtype."""
    return kept_rows([layer.weight], layer.kind, 0, r0, r1, dtype, out)


def kept_rows(stored: list[torch.Tensor], kind: int, k: int, r0: int, r1: int, dtype: torch.dtype,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0..r1 in dtype of the weight whose blocks of type `kind` are stored = [(rows, bytes per row)
    uint8], written into `out` if given (blockwise.py's rows function; k is implied by the row's bytes)."""
    per_block, block_bytes = BLOCKS[kind]
    blocks = stored[0][r0:r1].reshape(-1, block_bytes)
    if out is None:
        return dequantize_blocks(blocks, kind).to(dtype).view(r1 - r0, -1)
    return dequantize_blocks_into(blocks, kind, out.view(-1, per_block)).view(r1 - r0, -1)


FORMATS["ggml"] = kept_rows


class GGMLLinear(QuantizedLinear):
    """A frozen linear layer kept in a GGUF file's own blocks: `weight` is (out_features, bytes per row)
    uint8, each row whole blocks of `kind`. Forward and input gradient dequantize a block of rows at a
    time (blockwise.py), as NF4Linear does; `dequantize()` gives the fp32 weight."""

    state = ("kind",)

    def __init__(self, in_features: int, out_features: int, kind: int, raw: torch.Tensor,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        per_block, block_bytes = BLOCKS[kind]
        if in_features % per_block:
            raise ValueError(f"rows of {in_features} values are not whole {NAMES[kind]} blocks of {per_block}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.packed_elements = per_block / block_bytes  # logical weights per stored byte (the report's d·k)
        self.weight = nn.Parameter(raw.reshape(out_features, in_features // per_block * block_bytes), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return blockwise_linear(x, "ggml", [self.weight], self.out_features, self.bias, self.kind)

    def blockwise(self) -> BlockwiseBase:
        """The product's W and b as kernels.LoRAFunction takes them."""
        return BlockwiseBase("ggml", [self.weight], self.out_features, self.in_features, self.bias, self.kind)

    def rows(self, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows r0..r1 of the float weight (what the fused head loss reads of a quantized head)."""
        return block_rows(self, r0, r1, dtype, out)

    def dequantize(self) -> torch.Tensor:
        return block_rows(self, 0, self.out_features, torch.float32)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {NAMES[self.kind]}"


class GGMLEmbedding(nn.Module):
    """A frozen token embedding kept in a GGUF file's own blocks (`weight` as in GGMLLinear): a lookup
    dequantizes only the rows it reads. A head tied to it is a GGMLLinear over the same tensor."""

    def __init__(self, num_embeddings: int, embedding_dim: int, kind: int, raw: torch.Tensor) -> None:
        super().__init__()
        per_block, block_bytes = BLOCKS[kind]
        if embedding_dim % per_block:
            raise ValueError(f"rows of {embedding_dim} values are not whole {NAMES[kind]} blocks of {per_block}")
        self.num_embeddings, self.embedding_dim, self.kind, self.padding_idx = num_embeddings, embedding_dim, kind, None
        self.packed_elements = per_block / block_bytes
        self.weight = nn.Parameter(raw.reshape(num_embeddings, -1), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        blocks = self.weight.index_select(0, input_ids.reshape(-1)).reshape(-1, BLOCKS[self.kind][1])
        return dequantize_blocks(blocks, self.kind).view(*input_ids.shape, self.embedding_dim)

    def dequantize(self) -> torch.Tensor:
        return block_rows(self, 0, self.num_embeddings, torch.float32)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {NAMES[self.kind]}"


class GGMLKeeper:
    """Loading a GGUF file's weights as they are: each (meta) nn.Linear named in `blocks`
    ({"model.layers.0.self_attn.q_proj.weight": (type, (out, in))}) but `skip` (by default a task
    head's layers) becomes an empty GGMLLinear, and the token embedding a GGMLEmbedding (with the head
    tied to it, if any, a GGMLLinear the loader ties to the same blocks). The plan's `raw` names the
    weights so swapped, whose blocks the loader then puts in place as the file stores them.

    Unlike int8 and NF4, which keep the output heads in float (quantizing them costs accuracy), an
    untied head stays in its blocks too: it is quantized in the file already, so float would give back
    no precision and cost the most memory of any layer (Qwen2.5-0.5B's Q8_0 head: 545 MB in fp32)."""

    def __init__(self, blocks: dict[str, tuple[int, tuple[int, int]]]) -> None:
        self.blocks = blocks

    def prepare(self, model: nn.Module, skip: tuple[str, ...] | None, device: torch.device | str) -> LoadPlan:
        if skip is None:
            skip = tuple(name for name in kept_in_float(model) if name not in output_heads(model))
        swapped = []
        tied = {source: alias for alias, source in model.tied_weights.items()}
        for weight_name, (kind, (d, k)) in self.blocks.items():
            name = weight_name.removesuffix(".weight")
            try:
                module = model.get_submodule(name)
            except AttributeError:  # a tensor the model has no place for: the loader's key check names it
                continue
            raw = torch.empty(d, k // BLOCKS[kind][0] * BLOCKS[kind][1], dtype=torch.uint8, device="meta")
            if type(module) is nn.Embedding and (d, k) == (module.num_embeddings, module.embedding_dim):
                replace_module(model, name, GGMLEmbedding(d, k, kind, raw))
                if weight_name in tied:  # the tied head reads the same blocks (loading/weights.py ties them)
                    replace_module(model, tied[weight_name].removesuffix(".weight"), GGMLLinear(k, d, kind, raw))
                swapped.append(weight_name)
            elif type(module) is nn.Linear and not matches(name, skip) and (d, k) == (module.out_features,
                                                                                     module.in_features):
                bias = None if module.bias is None else torch.empty(d, device="meta")
                replace_module(model, name, GGMLLinear(k, d, kind, raw, bias))
                swapped.append(weight_name)
        return LoadPlan(raw=frozenset(swapped))
