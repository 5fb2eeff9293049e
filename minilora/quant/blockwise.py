"""The product every blockwise-stored base shares (NF4, ggml's blocks): y = x Wᵀ + b and dL/dx = g W
for a frozen W that exists only as its stored tensors, its float rows rebuilt a block at a time
(forward and backward alike), so no float copy of the whole weight is ever made.

Each stored format names a function rows(stored, kind, k, r0, r1, dtype, out) -> rows r0..r1 of W, written
into `out` where one is given (FORMATS: nf4.py and ggml.py put theirs here). The products rebuild rows
into one reused buffer (hardware.scratch) at every call, so on a CPU they allocate no fresh memory for
them: page faults on new memory cost as much as the dequantization. The product and the input gradient are operators of their own
(torch.library.custom_op) that take only tensors, numbers and names: torch.compile keeps each as one
opaque call in its graph, with no graph break, instead of tracing a loop over row blocks."""

from __future__ import annotations

from typing import Callable

import torch

from ..hardware import scratch
from ..kernels import row_blocks

Rows = Callable[..., torch.Tensor]  # (stored, kind, k, r0, r1, dtype, out=None) -> (r1 - r0, k) rows
FORMATS: dict[str, Rows] = {}  # format name -> its rows function


def product(x: torch.Tensor, stored: list[torch.Tensor], bias: torch.Tensor | None, fmt: str, kind: int, d: int,
            dtype: torch.dtype) -> torch.Tensor:
    """x Wᵀ + b in dtype, W's rows rebuilt a block at a time."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(dtype)
    blocks = row_blocks(d, k)
    if len(blocks) == 1:  # the whole weight at once: the product is the output itself
        out = x2 @ _rows(stored, fmt, kind, k, 0, d, dtype).t()
    else:
        out = torch.empty(x2.shape[0], d, dtype=dtype, device=x.device)
        for r0, r1 in blocks:
            torch.mm(x2, _rows(stored, fmt, kind, k, r0, r1, dtype).t(), out=out[:, r0:r1])
    if bias is not None:
        out += bias.to(dtype)
    return out.view(*x.shape[:-1], d)


def input_grad(g: torch.Tensor, stored: list[torch.Tensor], fmt: str, kind: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """dL/dx = g W in dtype (g's dtype while summing), W's rows rebuilt a block at a time."""
    d = g.shape[-1]
    g2 = g.reshape(-1, d)
    blocks = row_blocks(d, k)
    if len(blocks) == 1:
        grad_x = g2 @ _rows(stored, fmt, kind, k, 0, d, g.dtype)
    else:
        grad_x = torch.zeros(g2.shape[0], k, dtype=g.dtype, device=g.device)
        for r0, r1 in blocks:
            grad_x.addmm_(g2[:, r0:r1], _rows(stored, fmt, kind, k, r0, r1, g.dtype))
    return grad_x.to(dtype).view(*g.shape[:-1], k)


def _rows(stored: list[torch.Tensor], fmt: str, kind: int, k: int, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows r0..r1 of W in the products' reused buffer: valid until the next call."""
    out = scratch("blockwise.rows", (r1 - r0) * k, dtype, stored[0].device).view(r1 - r0, k)
    return FORMATS[fmt](stored, kind, k, r0, r1, dtype, out=out)


# The same two functions as operators, for torch.compile (see the module's docstring).
_forward = torch.library.custom_op("minilora::blockwise_linear", product, mutates_args=())
_input_grad = torch.library.custom_op("minilora::blockwise_linear_input_grad", input_grad, mutates_args=())


@_forward.register_fake
def _(x, stored, bias, fmt, kind, d, dtype):
    return x.new_empty((*x.shape[:-1], d), dtype=dtype)


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


class BlockwiseBase:
    """A blockwise-stored W0 (and b) as kernels.LoRAFunction computes with it: forward(x2, dtype) is
    x Wᵀ + b, input_grad(g) is g W. Eager only (a Python object is no operator's argument)."""

    def __init__(self, fmt: str, stored: list[torch.Tensor], d: int, k: int, bias: torch.Tensor | None,
                 kind: int = 0) -> None:
        self.fmt, self.stored, self.d, self.k, self.bias, self.kind = fmt, stored, d, k, bias, kind

    def forward(self, x2: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return product(x2, self.stored, self.bias, self.fmt, self.kind, self.d, dtype)

    def input_grad(self, g: torch.Tensor) -> torch.Tensor:
        return input_grad(g, self.stored, self.fmt, self.kind, self.k, g.dtype)


class _Blockwise(torch.autograd.Function):
    """The operators' autograd in eager mode without their dispatch (~0.15 ms a layer and step)."""

    @staticmethod
    def forward(ctx, x, bias, fmt, kind, d, dtype, *stored):
        ctx.save_for_backward(*stored)
        ctx.fmt, ctx.kind, ctx.k, ctx.in_dtype = fmt, kind, x.shape[-1], x.dtype
        return product(x, list(stored), bias, fmt, kind, d, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_x = input_grad(grad_out, list(ctx.saved_tensors), ctx.fmt, ctx.kind, ctx.k, ctx.in_dtype)
        return grad_x, None, None, None, None, None, *[None] * len(ctx.saved_tensors)


def blockwise_linear(x: torch.Tensor, fmt: str, stored: list[torch.Tensor], d: int, bias: torch.Tensor | None,
                     kind: int = 0) -> torch.Tensor:
    """x Wᵀ + b (d outputs) for a W held as `stored` in format `fmt` (a FORMATS name; `kind` a variant of
    it, ggml's block type), in autocast's dtype where it is on, else x's: the operator under
    torch.compile, the same functions through a plain autograd.Function in eager mode."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    if torch.compiler.is_compiling():
        return _forward(x, stored, bias, fmt, kind, d, dtype)
    return _Blockwise.apply(x, bias, fmt, kind, d, dtype, *stored)
