"""4-bit NormalFloat base weights with double quantization (QLoRA, Dettmers et al. 2023, §2-3).

NF4 stores each weight as one of 16 values, the quantiles of a normal distribution scaled to [-1, 1]
(with an exact 0): pretrained weights are roughly normal, so every code is about equally used. The
weight is cut, in row-major order, into blocks of 64; each block keeps its absmax, and stores
w / absmax rounded to the nearest of the 16 values, two codes a byte (the first in the high nibble):

    w ≈ NF4[code] · absmax_block

Double quantization (§3) then quantizes the absmaxes themselves: their mean is taken out, and the
rest is stored as 8-bit codes of bitsandbytes' "dynamic" map in blocks of 256, each with an fp32
absmax. That is 0.5 + 8/64 + 32/(64·256) ≈ 4.127 bits a weight instead of 4.5 with fp32 absmaxes.
The layout and the rounding are bitsandbytes' (`quantize_4bit(..., "nf4", blocksize=64,
compress_statistics=True)`), so that the tests can hold its dequantization against ours.

`NF4Linear` is a frozen base under the QuantizedLinear contract (base.py): LoRALinear wraps it. Its
product (blockwise.py) dequantizes a block of rows at a time and multiplies in the activations' dtype (bf16 under autocast), forward and input gradient
alike, so no full-size float copy of the weight ever exists.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..hardware import scratch
from ..names import swap_linears
from .base import LoadPlan, QuantizedLinear
from .blockwise import FORMATS, BlockwiseBase, blockwise_linear

# The 16 NF4 values (QLoRA, appendix E; bitsandbytes' table, to the last bit).
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
BLOCK, STATS_BLOCK = 64, 256
# Every byte's two values: BYTE_PAIRS[b] = (NF4[b >> 4], NF4[b & 15]), so that unpacking is one lookup.
BYTE_PAIRS = torch.stack([NF4[torch.arange(256) >> 4], NF4[torch.arange(256) & 15]], dim=1)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (Dettmers 2015): for exponents 10^-6 .. 10^0, the means
    of 2^e + 1 evenly spaced fractions in [0.1, 1], both signs, plus 0 and 1; sorted, 256 values."""
    values = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += (10.0 ** (e - 6) * means).tolist() + (-(10.0 ** (e - 6)) * means).tolist()  # fp32 products
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC = dynamic_map()


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` for each element (bounds at the midpoints)."""
    code = code.to(scaled.device)
    return torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)


def _blockwise(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values / their block's absmax, clamped to [-1, 1]; the absmaxes), blocks over a flat fp32 tensor."""
    n = flat.numel()
    padded = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    absmax = padded.abs().amax(dim=1)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).flatten()[:n]
    return scaled, absmax


def quantize_nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """NF4 with double quantization of a float tensor: packed codes (uint8, two a byte, n/2 bytes), the
    absmax codes (uint8, one per block of 64), their scales (fp32, one per 256 blocks) and offset."""
    flat = w.detach().reshape(-1)
    if flat.numel() % 2:
        raise ValueError("NF4 packs two codes a byte: the tensor needs an even number of elements")
    packed = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(-(-flat.numel() // BLOCK), device=flat.device)
    step = BLOCK << 14  # 1M weights at a time: a few MB of fp32 scratch, never a float copy of the tensor
    for start in range(0, flat.numel(), step):
        scaled, absmax[start // BLOCK:(start + step) // BLOCK] = _blockwise(flat[start:start + step].float(), BLOCK)
        codes = _nearest(scaled, NF4)
        packed[start // 2:(start + step) // 2] = (codes[0::2] << 4) | codes[1::2]
    offset = absmax.mean()
    scaled2, absmax2 = _blockwise(absmax - offset, STATS_BLOCK)
    return dict(packed=packed, absmax_code=_nearest(scaled2, DYNAMIC), absmax_scale=absmax2, absmax_offset=offset)


def block_absmax(absmax_code: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor,
                 first: int = 0) -> torch.Tensor:
    """The fp32 absmax of blocks of 64 from their 8-bit codes (double quantization undone): `absmax_code`
    holds those of blocks first, first + 1, ...; `absmax_scale` the scales of all the tensor's blocks."""
    codes = DYNAMIC.to(absmax_scale.device).index_select(0, absmax_code.reshape(-1).int())
    n, s0 = codes.numel(), first // STATS_BLOCK
    if first % STATS_BLOCK == 0 and n % STATS_BLOCK == 0:  # whole groups: each scale broadcast over its own
        return (codes.view(-1, STATS_BLOCK) * absmax_scale[s0:s0 + n // STATS_BLOCK, None]).view(-1) + absmax_offset
    stats = torch.arange(first, first + n, device=absmax_code.device) // STATS_BLOCK
    return codes * absmax_scale[stats] + absmax_offset


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flat float values of packed NF4 codes, given each block's absmax (n/64 of them). In fp32 the
    values are bitsandbytes' exactly; in bf16 or fp16 they are computed in that dtype (the product of
    an NF4 value and the absmax rounded once, the absmax rounded to it first), half the memory traffic."""
    values = _lookup(packed.reshape(-1).int(), dtype)
    n = values.numel()
    if n % BLOCK:  # a last block shorter than 64 (a tensor of d·k not a multiple of 64)
        values = torch.nn.functional.pad(values, (0, -n % BLOCK))
    return (values.view(-1, BLOCK) * absmax.to(dtype)[:, None]).flatten()[:n]


def _lookup(codes: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The flat values of packed bytes (as int32 indices), BYTE_PAIRS looked up in dtype, into `out` if
    given. Each byte's pair of values is read as one integer word (two bf16 values: one int32), a
    lookup in a flat table: 4-5x faster than gathering rows of two from a (256, 2) table."""
    word = torch.int32 if torch.empty((), dtype=dtype).element_size() == 2 else torch.int64
    table = _pairs(codes.device, dtype).view(word).view(-1)
    if out is None:
        return table.index_select(0, codes).view(dtype)
    torch.index_select(table, 0, codes, out=out.view(word).view(-1))
    return out


_PAIRS: dict[tuple, torch.Tensor] = {}


def _pairs(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype)
    if key not in _PAIRS:
        _PAIRS[key] = BYTE_PAIRS.to(device=device, dtype=dtype)
    return _PAIRS[key]


def nf4_rows(stored: list[torch.Tensor], kind: int, k: int, r0: int, r1: int, dtype: torch.dtype,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows r0..r1 of the float (d, k) weight that stored = [packed codes, absmax codes, their scales, their
    offset] stand for: the rows' absmaxes rebuilt from their 8-bit codes, then their weights (r0·k is a
    multiple of 64: kernels.row_blocks sees to it), written into `out` if given (the index step then in
    a reused buffer too, hardware.scratch). `kind` is unused (ggml's block type)."""
    packed, absmax_code, absmax_scale, absmax_offset = stored
    b0, b1 = r0 * k // BLOCK, -(-r1 * k // BLOCK)
    absmax = block_absmax(absmax_code[b0:b1], absmax_scale, absmax_offset, first=b0)
    codes = packed.reshape(-1)[r0 * k // 2:r1 * k // 2]
    if out is None or (r1 - r0) * k % BLOCK:
        rows = dequantize_nf4(codes, absmax, dtype).view(r1 - r0, k)
        return rows if out is None else out.copy_(rows)
    index = scratch("nf4.index", codes.numel(), torch.int32, codes.device).copy_(codes)
    _lookup(index, dtype, out)  # dequantize_nf4's steps
    out.view(-1, BLOCK).mul_(absmax.to(dtype)[:, None])
    return out


FORMATS["nf4"] = nf4_rows


def _stored(layer: nn.Module) -> list[torch.Tensor]:
    """What an NF4 layer's products read, in nf4_rows' order (`layer` may be a LoRALinear over NF4)."""
    return [layer.weight, layer.absmax_code, layer.absmax_scale, layer.absmax_offset]


class NF4Linear(QuantizedLinear):
    """A frozen linear layer stored in NF4 with double quantization; see the module's docstring.

    `weight` holds the packed codes, (out_features, in_features / 2) uint8: its name stays the float
    layer's, and the report counts it as d·k logical elements (`packed_elements`). The absmaxes stay
    8-bit codes in memory too (4.13 bits a weight in all) and are rebuilt a block of rows at a time."""

    state = ("absmax_code", "absmax_scale", "absmax_offset")
    packed_elements = 2  # two codes a byte
    quantized_on_load = True  # the loader hands it the float (d, k) weight, set_weight packs it

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        n = in_features * out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        for name, size, kind in (("absmax_code", -(-n // BLOCK), torch.uint8),
                                 ("absmax_scale", -(-n // (BLOCK * STATS_BLOCK)), torch.float32),
                                 ("absmax_offset", (), torch.float32)):
            self.register_buffer(name, torch.zeros(size, dtype=kind, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "NF4Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.set_weight(linear.weight.detach())
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def set_weight(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize a float (d, k) weight into this layer; returns the packed codes."""
        q = quantize_nf4(w)
        self.absmax_code, self.absmax_scale, self.absmax_offset = q["absmax_code"], q["absmax_scale"], q["absmax_offset"]
        self.weight = nn.Parameter(q["packed"].view(self.out_features, self.in_features // 2), requires_grad=False)
        return self.weight

    def product(self, x: torch.Tensor) -> torch.Tensor:  # self may be a LoRALinear over NF4: state only
        return blockwise_linear(x, "nf4", _stored(self), self.out_features, self.bias)

    def blockwise(self) -> BlockwiseBase:
        """The product's W and b as kernels.LoRAFunction takes them."""
        return BlockwiseBase("nf4", _stored(self), self.out_features, self.in_features, self.bias)

    def rows(self, r0: int, r1: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        return nf4_rows(_stored(self), 0, self.in_features, r0, r1, dtype, out)

    def dequantize(self) -> torch.Tensor:
        """The float (d, k) weight the codes stand for."""
        absmax = block_absmax(self.absmax_code, self.absmax_scale, self.absmax_offset)
        return dequantize_nf4(self.weight, absmax).view(self.out_features, self.in_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"


def nf4_round_trip(w: torch.Tensor) -> tuple[torch.Tensor, NF4Linear]:
    """(the fp32 weight the NF4 codes of `w` (d, k) stand for, the bias-free NF4Linear holding those
    codes): LoftQ's quantizer (lora/initialise.py), whose base must be exactly the Q it fitted to."""
    layer = NF4Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    layer.set_weight(w)
    return layer.dequantize(), layer


class NF4Quantizer:
    """Loading straight into NF4: the linear layers but the heads' (and any with an odd in_features:
    two codes a byte) are quantized as their weights stream in, so the float model never exists."""

    def prepare(self, model: nn.Module, skip: tuple[str, ...] | None, device: torch.device | str) -> LoadPlan:
        owners = swap_linears(model, skip, lambda m: NF4Linear(m.in_features, m.out_features, m.bias is not None,
                                                                device="meta") if m.in_features % 2 == 0 else None)

        def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
            layer = owners.get(name)
            if layer is None:
                return tensor
            packed = layer.set_weight(tensor)
            for buffer in NF4Linear.state:
                setattr(layer, buffer, getattr(layer, buffer).to(device))
            return packed.data
        return LoadPlan(transform)
