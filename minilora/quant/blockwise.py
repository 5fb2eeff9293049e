"""The product every blockwise-stored base shares (NF4, ggml's blocks): y = x Wᵀ + b and dL/dx = g W
for a frozen W that exists only as `rows(r0, r1, dtype)`, its float rows rebuilt a block at a time
(forward and backward alike), so no float copy of the whole weight is ever made."""

from __future__ import annotations

import torch

from ..kernels import row_blocks


class _BlockwiseLinear(torch.autograd.Function):
    """y = x Wᵀ + b and dL/dx = g W for a frozen W that exists only as `rows(r0, r1, dtype)`, the float
    rows r0..r1 rebuilt on demand (a quantized weight dequantized): a block of rows at a time, forward
    and backward, so no float copy of the whole weight is ever made."""

    @staticmethod
    def forward(ctx, x, rows, d, k, bias, *stored):
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x2 = x.reshape(-1, k).to(dtype)
        out = torch.empty(x2.shape[0], d, dtype=dtype, device=x.device)
        for r0, r1 in row_blocks(d, k):
            out[:, r0:r1] = x2 @ rows(r0, r1, dtype).t()
        if bias is not None:
            out += bias.to(dtype)
        ctx.rows, ctx.shape, ctx.in_dtype = rows, (d, k), x.dtype
        return out.view(*x.shape[:-1], d)

    @staticmethod
    def backward(ctx, grad_out):
        d, k = ctx.shape
        g = grad_out.reshape(-1, d)
        grad_x = torch.zeros(g.shape[0], k, dtype=g.dtype, device=g.device)
        for r0, r1 in row_blocks(d, k):
            grad_x.addmm_(g[:, r0:r1], ctx.rows(r0, r1, g.dtype))
        return (grad_x.to(ctx.in_dtype).view(*grad_out.shape[:-1], k), None, None, None, None,
                *[None] * len(ctx.needs_input_grad[5:]))


def blockwise_linear(x: torch.Tensor, rows, d: int, k: int, bias: torch.Tensor | None,
                     *stored: torch.Tensor) -> torch.Tensor:
    """x Wᵀ + b with W given as rows(r0, r1, dtype) (see _BlockwiseLinear); `stored` are the tensors
    `rows` reads, passed so that autograd sees them (they get no gradient)."""
    return _BlockwiseLinear.apply(x, rows, d, k, bias, *stored)
