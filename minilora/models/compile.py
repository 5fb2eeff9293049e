"""Regional compilation: torch.compile on each transformer block, in place, not on the whole model.

Why per block: the blocks of a model run the same code, and torch.compile passes a module's parameters
to its graph as inputs (it inlines nn modules, torch >= 2.5), so one compiled block serves every layer
alike and compile time does not grow with depth. Between the blocks the model runs as it always does:
the embeddings, the head and the per-batch decisions (models/common.mask_form looks at the mask's values
once, before the first block), which would each be a graph break inside a compiled region.

`block.compile()` compiles in place: state-dict names stay the checkpoint's (a module returned by
torch.compile would prefix them with `_orig_mod.`), so saving, adapters and resume see no change.

Micro-batches of different lengths: with dynamic=True (the default here) the blocks are compiled with
symbolic shapes from their first call, so a new sequence length (or batch size) reuses the graph
rather than compiling again. torch's own default (dynamic=None) compiles for the first shape, then once
more, symbolically, at the second. Sizes of 1 are specialised either way: a micro-batch of one row
after larger ones compiles once more.

What else makes a block compile again, once each: the mask's form changing between "none" (no
padding: SDPA's causal path) and a mask tensor, train() / eval(), an adapter switched on or off or
merged, autocast turned on or off.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx.experimental._config as fx_config
import torch.nn as nn


def compile_blocks(model: nn.Module, dynamic: bool | None = True, backend: str | Callable = "inductor",
                   **options: Any) -> nn.Module:
    """Compile each of the model's transformer blocks (a PretrainedModel's transformer_blocks()) in place
    (`block.compile(...)`), after LoRA and any quantized base are on it; returns the model. `dynamic=True` marks every dimension symbolic from the
    first call, so micro-batches of other lengths do not recompile; `backend` and `options` go to
    torch.compile ("aot_eager" to trace without generating code)."""
    for block in model.transformer_blocks():
        block.compile(dynamic=dynamic, backend=backend, **options)
        block._compiled_call_impl = _traced_as_a_block(block._compiled_call_impl)
    return model


BLOCK_VARIANTS = 64  # graphs the blocks' one forward may have; torch's default of 8 counts every block's together


def _traced_as_a_block(compiled: Callable) -> Callable:
    """The compiled block, traced with three of torch's settings changed for these calls only (not for
    the process): no "duck shaping", which gives sizes equal at the first call one symbol, so that a
    first length of 8 and a head_dim of 8 (cos and sin are (B, 1, T, head_dim)) would tie T to 8 and the
    next length compile again; floats (eps, LoRA's scale, dropout's p) kept as constants from the start,
    as torch ends up keeping them anyway after tracing the block a second time to find that out; and
    room for BLOCK_VARIANTS graphs (the first block, whose input needs no gradient; Gemma's local and
    global layers; train and eval; with and without a mask), past which torch would run blocks eagerly."""
    def call(*args: Any, **kwargs: Any) -> Any:
        with fx_config.patch(use_duck_shape=False), \
                torch._dynamo.config.patch(specialize_float=True, recompile_limit=BLOCK_VARIANTS):
            return compiled(*args, **kwargs)
    return call
