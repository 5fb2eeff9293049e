"""int8 base weights: a frozen linear layer stored as int8 with one fp32 scale per output row.

Quantization (absmax, per row): s_i = max_j |W_ij| / 127, Wq_ij = round(W_ij / s_i) in [-127, 127].
The forward pass quantizes each activation row the same way on the fly and multiplies int8 by int8
into int32 (`torch._int_mm`: AMX/VNNI on CPU, tensor cores on CUDA; where the CPU has no int8 kernel,
the same integers come exactly from the fp32 product, see `int8_matmul_in_float`), then rescales:

    y_ti = (sum_j xq_tj · Wq_ij) · sx_t · s_i + b_i

LLM.int8() (Dettmers et al. 2022) adds an outlier decomposition: the few input columns where some
|x| exceeds `threshold` (6.0) are multiplied in floating point against the dequantized weight
columns, the rest in int8, so that one huge feature does not wash out a row's quantization grid.

The backward pass gives the input its gradient, dL/dx = dL/dy · W (computed in int8 too, the scales
folded into dL/dy first, as SwitchBack does); the int8 weight gets none. LoRA layers below it train.
"""

from __future__ import annotations

import threading

import torch
import torch.nn as nn

from .. import hardware
from ..names import swap_linears
from .base import LoadPlan, QuantizedLinear


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor, fp32 scale per row) with w ≈ q * scale[:, None]. Rows of zeros get scale 1.

    Done in blocks of about 1M elements, so quantizing a large fp16 weight needs a few MB of fp32
    scratch space, not several full-size copies."""
    w2 = w.reshape(-1, w.shape[-1])
    q = torch.empty(w2.shape, dtype=torch.int8, device=w.device)
    scale = torch.empty(w2.shape[0], dtype=torch.float32, device=w.device)
    step = max(1, (1 << 20) // max(1, w2.shape[1]))
    for i in range(0, w2.shape[0], step):
        block = w2[i:i + step].float()
        s = block.abs().amax(dim=-1) / 127.0
        s = torch.where(s == 0, torch.ones_like(s), s)
        q[i:i + step] = torch.round(block / s[:, None]).clamp_(-127, 127)
        scale[i:i + step] = s
    return q.reshape(w.shape), scale.reshape(w.shape[:-1])


def int8_matmul(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 product of int8 a (M, K) and int8 b_t (K, N): on the int8 units where torch has a fast
    kernel for this device and shape, else through the float product (the same integers, exactly)."""
    fast = hardware.matmul_is_fast(torch.int8, a.device.type) and not (a.is_cuda and a.shape[0] <= 16)  # cuBLASLt wants M > 16
    if fast:
        try:
            return torch._int_mm(a, b_t)
        except RuntimeError:  # no int8 kernel for this device or shape
            pass
    return int8_matmul_in_float(a, b_t)


EXACT_BLOCK = 1024  # 127² · 1024 < 2^24: a sum of 1024 products of int8 values is an exact fp32 integer
_scratch: dict[tuple, torch.Tensor] = {}  # (device, thread) -> a reused fp32 buffer for one block of weights


def int8_matmul_in_float(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """The int32 product of int8 matrices computed by the float matmul, exactly: K is cut into blocks of
    1024, each block's sums are integers below 2^24 (exact in fp32, whatever the summation order), and
    the blocks are added in int32. One block of b_t at a time is copied to fp32, into a buffer kept
    for the next call (a fresh 64 MB tensor per block costs more in page faults than the copy)."""
    (m, k), n = a.shape, b_t.shape[1]
    out = torch.zeros(m, n, dtype=torch.int32, device=a.device)
    part = torch.empty(m, n, device=a.device)
    key = (a.device, threading.get_ident())
    for start in range(0, k, EXACT_BLOCK):
        block = b_t[start:start + EXACT_BLOCK]
        rows = block.shape[0]
        if key not in _scratch or _scratch[key].numel() < rows * n:
            _scratch[key] = torch.empty(rows * n, device=a.device)
        w = _scratch[key][:rows * n]
        # b_t is usually a weight's transpose: keep its memory order, so the copy reads it in sequence
        w = w.view(n, rows).t() if b_t.stride(0) < b_t.stride(1) else w.view(rows, n)
        torch.mm(a[:, start:start + EXACT_BLOCK].float(), w.copy_(block), out=part)
        out += part.to(torch.int32)
    return out


# The product and the input gradient are operators of their own (torch.library.custom_op): LLM.int8()'s
# outlier columns are found from the data (nonzero), so torch.compile could not trace them without a
# graph break; as operators they are one opaque call in its graph, their output shapes known.

@torch.library.custom_op("minilora::int8_linear", mutates_args=())
def _int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 threshold: float, out_dtype: torch.dtype, autocast: bool) -> torch.Tensor:
    """y = x Wᵀ + b for int8 rows W with fp32 scales (see the module's docstring), in out_dtype; the
    outlier columns' float product in out_dtype under `autocast` (as autocast computes a matmul), else fp32."""
    x2 = x.reshape(-1, x.shape[-1])
    outliers = None
    with torch.autocast(x.device.type, enabled=False):  # the dtypes are explicit here, inside and outside compile
        if threshold > 0:
            cols = (x2.abs() > threshold).any(dim=0).nonzero().flatten()
            if cols.numel():
                # LLM.int8(): outlier columns in floating point, in the compute dtype
                mm = out_dtype if autocast else torch.float32
                w_cols = weight[:, cols].float() * scale[:, None]
                outliers = x2[:, cols].float().to(mm) @ w_cols.to(mm).t()
                x2 = x2.index_fill(1, cols, 0)
        xq, sx = quantize_rows(x2)
        y = int8_matmul(xq, weight.t()).float() * sx[:, None] * scale[None, :]
        if outliers is not None:
            y = y + outliers
        if bias is not None:
            y = y + bias.float()
    return y.to(out_dtype).reshape(*x.shape[:-1], weight.shape[0])


@_int8_linear.register_fake
def _(x, weight, scale, bias, threshold, out_dtype, autocast):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


@torch.library.custom_op("minilora::int8_linear_input_grad", mutates_args=())
def _int8_input_grad(grad_out: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                     in_dtype: torch.dtype) -> torch.Tensor:
    """dL/dx = g W, in int8 too: the weight's scales folded into g first (SwitchBack)."""
    g = grad_out.reshape(-1, grad_out.shape[-1]).float() * scale[None, :]
    gq, sg = quantize_rows(g)
    grad_x = int8_matmul(gq, weight).float() * sg[:, None]
    return grad_x.to(in_dtype).reshape(*grad_out.shape[:-1], weight.shape[1])


@_int8_input_grad.register_fake
def _(grad_out, weight, scale, in_dtype):
    return grad_out.new_empty((*grad_out.shape[:-1], weight.shape[1]), dtype=in_dtype)


def _setup(ctx, inputs, output) -> None:
    x, weight, scale = inputs[:3]
    ctx.save_for_backward(weight, scale)
    ctx.in_dtype = x.dtype


def _backward(ctx, grad_out):  # only x gets a gradient: the int8 weight is frozen, the bias too
    weight, scale = ctx.saved_tensors
    return _int8_input_grad(grad_out, weight, scale, ctx.in_dtype), None, None, None, None, None, None


_int8_linear.register_autograd(_backward, setup_context=_setup)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                threshold: float | None) -> torch.Tensor:
    """x Wᵀ + b for int8 W with per-row scales, in autocast's dtype where it is on, else x's."""
    autocast = torch.is_autocast_enabled(x.device.type)
    out_dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    return _int8_linear(x, weight, scale, bias, float(threshold or 0.0), out_dtype, autocast)


class Int8Linear(QuantizedLinear):
    """A frozen linear layer with int8 weights (out_features, in_features) and per-row fp32 scales.

    `weight` keeps its name and shape, so state-dict names and parameter counts (d·k elements) are
    those of the float layer. `apply_lora` wraps it like an nn.Linear.
    """

    state = ("weight_scale", "threshold")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 device=None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.threshold = in_features, out_features, threshold
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, device="meta")
        layer.set_weight(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, w: torch.Tensor) -> None:
        q, s = quantize_rows(w)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = s

    def product(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias, self.threshold)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={self.threshold}")


def int8_round_trip(w: torch.Tensor, threshold: float = 6.0) -> tuple[torch.Tensor, Int8Linear]:
    """(the fp32 weight the int8 rows of `w` (d, k) stand for, the bias-free Int8Linear holding them):
    LoftQ's quantizer (lora/initialise.py), whose base must be exactly the Q it fitted to."""
    layer = Int8Linear(w.shape[1], w.shape[0], bias=False, threshold=threshold, device="meta")
    layer.set_weight(w)
    return layer.dequantize(), layer


def quantize_model(model: nn.Module, skip: tuple[str, ...] | None = None, threshold: float = 6.0) -> nn.Module:
    """Swap every nn.Linear but `skip` (by default names.kept_in_float: the output and task heads) for
    Int8Linear, in place."""
    swap_linears(model, skip, lambda m: Int8Linear.from_linear(m, threshold))
    return model


class Int8Quantizer:
    """Loading straight into int8: each linear weight but the heads' is quantized as it streams in from
    disk, so the full-precision model never exists in memory."""

    def __init__(self, threshold: float = 6.0, dtype: torch.dtype = torch.float32) -> None:
        self.threshold, self.dtype = threshold, dtype

    def prepare(self, model: nn.Module, skip: tuple[str, ...] | None, device: torch.device | str) -> LoadPlan:
        owners = swap_linears(model, skip, lambda m: Int8Linear(m.in_features, m.out_features, m.bias is not None,
                                                                 self.threshold, device="meta", dtype=self.dtype))

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            layer = owners.get(name)
            if layer is None:
                return tensor
            q, scale = quantize_rows(tensor)
            layer.weight_scale = scale.to(device)
            return q
        return LoadPlan(transform)
