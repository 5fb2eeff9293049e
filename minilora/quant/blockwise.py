"""The product every blockwise-stored base shares (NF4, ggml's blocks): y = x Wᵀ + b and dL/dx = g W
for a frozen W that exists only as its stored tensors, its float rows rebuilt a block at a time
(forward and backward alike), so no float copy of the whole weight is ever made.

Each stored format names a function rows(stored, kind, k, r0, r1, dtype) -> rows r0..r1 of W (FORMATS:
nf4.py and ggml.py put theirs here). The product and the input gradient are operators of their own
(torch.library.custom_op) that take only tensors, numbers and names: torch.compile keeps each as one
opaque call in its graph, with no graph break, instead of tracing a loop over row blocks."""

from __future__ import annotations

from typing import Callable

import torch

from ..kernels import row_blocks

Rows = Callable[[list[torch.Tensor], int, int, int, int, torch.dtype], torch.Tensor]
FORMATS: dict[str, Rows] = {}  # format name -> its rows function


@torch.library.custom_op("minilora::blockwise_linear", mutates_args=())
def _forward(x: torch.Tensor, stored: list[torch.Tensor], bias: torch.Tensor | None, fmt: str, kind: int, d: int,
             dtype: torch.dtype) -> torch.Tensor:
    k, rows = x.shape[-1], FORMATS[fmt]
    x2 = x.reshape(-1, k).to(dtype)
    out = torch.empty(x2.shape[0], d, dtype=dtype, device=x.device)
    for r0, r1 in row_blocks(d, k):
        out[:, r0:r1] = x2 @ rows(stored, kind, k, r0, r1, dtype).t()
    if bias is not None:
        out += bias.to(dtype)
    return out.view(*x.shape[:-1], d)


@_forward.register_fake
def _(x, stored, bias, fmt, kind, d, dtype):
    return x.new_empty((*x.shape[:-1], d), dtype=dtype)


@torch.library.custom_op("minilora::blockwise_linear_input_grad", mutates_args=())
def _input_grad(g: torch.Tensor, stored: list[torch.Tensor], fmt: str, kind: int, k: int,
                dtype: torch.dtype) -> torch.Tensor:
    d, rows = g.shape[-1], FORMATS[fmt]
    g2 = g.reshape(-1, d)
    grad_x = torch.zeros(g2.shape[0], k, dtype=g.dtype, device=g.device)
    for r0, r1 in row_blocks(d, k):
        grad_x.addmm_(g2[:, r0:r1], rows(stored, kind, k, r0, r1, g.dtype))
    return grad_x.to(dtype).view(*g.shape[:-1], k)


@_input_grad.register_fake
def _(g, stored, fmt, kind, k, dtype):
    return g.new_empty((*g.shape[:-1], k), dtype=dtype)


def _setup(ctx, inputs, output) -> None:
    x, stored, _, fmt, kind, _, _ = inputs
    ctx.save_for_backward(*stored)
    ctx.fmt, ctx.kind, ctx.k, ctx.in_dtype = fmt, kind, x.shape[-1], x.dtype


def _backward(ctx, grad_out):  # only x gets a gradient: W is frozen, b too
    grad_x = _input_grad(grad_out, list(ctx.saved_tensors), ctx.fmt, ctx.kind, ctx.k, ctx.in_dtype)
    return grad_x, [None] * len(ctx.saved_tensors), None, None, None, None, None


_forward.register_autograd(_backward, setup_context=_setup)


def blockwise_linear(x: torch.Tensor, fmt: str, stored: list[torch.Tensor], d: int, bias: torch.Tensor | None,
                     kind: int = 0) -> torch.Tensor:
    """x Wᵀ + b (d outputs) for a W held as `stored` in format `fmt` (a FORMATS name; `kind` a variant of
    it, ggml's block type), in autocast's dtype where it is on, else x's."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return _forward(x, stored, bias, fmt, kind, d, dtype)
