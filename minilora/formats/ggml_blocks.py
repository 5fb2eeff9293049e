"""ggml's block formats (llama.cpp, GGUF files): their dequantization in torch, and GGMLLinear and
GGMLEmbedding, a frozen base kept in its file's own blocks.

Every format cuts a row into blocks and stores small integers q with a scale per block (and, for the
"_1" and most K formats, a minimum). The simple ones have blocks of 32 and an fp16 scale d:

    Q8_0: d·q (q int8)   Q4_0: d·(q − 8)   Q4_1: d·q + m   Q5_0: d·(q − 16)   Q5_1: d·q + m  (q 4 or 5 bits)

The K formats ("k-quants") have super-blocks of 256 in 8 or 16 sub-blocks, each sub-block with its own
6-, 8- or 4-bit scale (and minimum) that the super-block's fp16 d (and dmin) scale in turn:

    Q4_K, Q5_K: (d·sc_j)·q − (dmin·m_j), 8 sub-blocks of 32, 6-bit sc_j and m_j, q of 4 (5) bits
    Q6_K: d·sc_j·(q − 32), 16 sub-blocks of 16, int8 sc_j, q of 6 bits
    Q3_K: d·(sc_j − 32)·(q − 4·[high bit clear]), 16 sub-blocks of 16, 6-bit sc_j, q of 2 + 1 bits
    Q2_K: (d·(sc_j & 15))·q − dmin·(sc_j >> 4), 16 sub-blocks of 16, q of 2 bits

The byte layouts follow ggml's reference `dequantize_row_*` (ggml-quants.c), which the tests hold
against the `gguf` package's own dequantization.
"""

from __future__ import annotations

import torch

from ..hardware import scratch

F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30


NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1",
         Q8_0: "Q8_0", Q2_K: "Q2_K", Q3_K: "Q3_K", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


# (values per block, bytes per block)
BLOCKS = {F32: (1, 4), F16: (1, 2), BF16: (1, 2), Q4_0: (32, 18), Q4_1: (32, 20), Q5_0: (32, 22), Q5_1: (32, 24),
          Q8_0: (32, 34), Q2_K: (256, 84), Q3_K: (256, 110), Q4_K: (256, 144), Q5_K: (256, 176), Q6_K: (256, 210)}


QUANTIZED = frozenset(BLOCKS) - {F32, F16, BF16}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes -> (n, 1) fp32 from little-endian fp16."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    """(n, m) bytes -> (n, len(shifts)·m): the same bit field of every byte, one shift after another."""
    return torch.cat([(b >> s) & mask for s in shifts], dim=1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> eight 6-bit scales and eight 6-bit minimums (get_scale_min_k4)."""
    s = s.int()
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc.float(), m.float()


def dequantize_blocks(raw: torch.Tensor, kind: int) -> torch.Tensor:
    """fp32 values of raw ggml blocks: (n_blocks, bytes per block) uint8 -> (n_blocks, values per block)."""
    b = raw
    if kind == Q8_0:
        return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()
    if kind in (Q4_0, Q4_1):
        qs = b[:, 4:] if kind == Q4_1 else b[:, 2:]
        q = _bits(qs, (0, 4), 0xF).float()  # the 16 low nibbles are values 0-15, the high ones 16-31
        return _f16(b[:, :2]) * (q - 8) if kind == Q4_0 else _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    if kind in (Q5_0, Q5_1):
        start = 4 if kind == Q5_1 else 2
        high = b[:, start:start + 4].contiguous().view(torch.int32)  # (n, 1): bit j is value j's fifth bit
        fifth = (high >> torch.arange(32, dtype=torch.int32, device=b.device)) & 1
        q = (_bits(b[:, start + 4:], (0, 4), 0xF).int() | (fifth << 4)).float()
        return _f16(b[:, :2]) * (q - 16) if kind == Q5_0 else _f16(b[:, :2]) * q + _f16(b[:, 2:4])
    if kind in (Q4_K, Q5_K):
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
        sc, m = _scale_min_k4(b[:, 4:16])
        qs = b[:, 48:176] if kind == Q5_K else b[:, 16:144]  # 128 bytes: each 32 hold two sub-blocks
        low = qs.reshape(-1, 4, 32)
        q = torch.stack([low & 0xF, low >> 4], dim=2).reshape(-1, 8, 32).int()  # sub-block j = 2i + (high nibble)
        if kind == Q5_K:
            qh = b[:, 16:48].int()  # bit j of byte l: the fifth bit of sub-block j's value l
            q = q | (((qh[:, None, :] >> torch.arange(8, device=b.device)[None, :, None]) & 1) << 4)
        return ((d * sc)[:, :, None] * q - (dmin * m)[:, :, None]).reshape(-1, 256)
    if kind == Q6_K:
        ql, qh, sc, d = b[:, 0:128].int(), b[:, 128:192].int(), b[:, 192:208].contiguous().view(torch.int8).float(), _f16(b[:, 208:210])
        ql, qh = ql.reshape(-1, 2, 2, 32), qh.reshape(-1, 2, 1, 32)  # two halves of 128 values
        low = torch.stack([ql & 0xF, ql >> 4], dim=2)  # (n, half, nibble, 32-byte group, 32)
        high = torch.stack([(qh >> 0) & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], dim=2).reshape(-1, 2, 2, 2, 32)
        q = (low | (high << 4)).reshape(-1, 16, 16) - 32  # value order within a half: nibble, group, l
        return (d[:, :, None] * sc[:, :, None] * q).reshape(-1, 256)
    if kind == Q3_K:
        hmask, qs, d = b[:, 0:32].int(), b[:, 32:96].int(), _f16(b[:, 108:110])
        s = b[:, 96:108].int()
        low = torch.cat([s[:, 0:4] & 0xF, s[:, 4:8] & 0xF, s[:, 0:4] >> 4, s[:, 4:8] >> 4], dim=1)
        high = torch.cat([(s[:, 8:12] >> shift) & 3 for shift in (0, 2, 4, 6)], dim=1)
        sc = ((low | (high << 4)) - 32).float()  # 16 sub-blocks
        q2 = torch.stack([(qs.reshape(-1, 2, 32) >> shift) & 3 for shift in (0, 2, 4, 6)], dim=2)  # (n, half, shift, 32)
        hbit = torch.stack([(hmask >> j) & 1 for j in range(8)], dim=1).reshape(-1, 2, 4, 32)
        q = (q2 - 4 * (1 - hbit)).reshape(-1, 16, 16)
        return (d[:, :, None] * sc[:, :, None] * q).reshape(-1, 256)
    if kind == Q2_K:
        sc, qs, d, dmin = b[:, 0:16].int(), b[:, 16:80].int(), _f16(b[:, 80:82]), _f16(b[:, 82:84])
        q = torch.stack([(qs.reshape(-1, 2, 32) >> shift) & 3 for shift in (0, 2, 4, 6)], dim=2).reshape(-1, 16, 16)
        return ((d * (sc & 0xF))[:, :, None] * q - (dmin * (sc >> 4))[:, :, None]).reshape(-1, 256)
    raise ValueError(f"GGML type {kind} has no block dequantization here")


def dequantize_blocks_into(raw: torch.Tensor, kind: int, out: torch.Tensor) -> torch.Tensor:
    """dequantize_blocks(raw, kind) written into `out` ((n_blocks, values per block), any float dtype)
    and returned: the same fp32 arithmetic, rounded once to out's dtype. For Q8_0, Q4_0 and Q4_1 (the
    formats a product reads most) every step runs in buffers kept for reuse (hardware.scratch), so a
    product that rebuilds its rows at every call allocates nothing; the others go through
    dequantize_blocks and a copy."""
    if kind not in (Q8_0, Q4_0, Q4_1):
        return out.copy_(dequantize_blocks(raw, kind))
    n = raw.shape[0]
    values = out if out.dtype == torch.float32 else scratch("ggml.fp32", n * 32, torch.float32, raw.device).view(n, 32)
    if kind == Q8_0:  # d·q
        values.copy_(raw[:, 2:].view(torch.int8)).mul_(raw[:, :2].view(torch.float16).float())
    else:
        start = 4 if kind == Q4_1 else 2
        values.copy_(_nibbles(raw, start))
        scales = raw[:, :start].view(torch.float16).float()  # d (and m)
        if kind == Q4_0:
            values.sub_(8).mul_(scales)  # d·(q − 8)
        else:
            values.mul_(scales[:, :1]).add_(scales[:, 1:])  # d·q + m
    return values if values is out else out.copy_(values)


def _nibbles(raw: torch.Tensor, start: int) -> torch.Tensor:
    """(n, 32) uint8 (a reused buffer): the 4-bit values of Q4_0/Q4_1 blocks whose 16 bytes start at byte
    `start`, byte j's low nibble value j and its high nibble value 16 + j; masked a word at a time (four
    bytes, or two where the bytes are not 4-aligned: Q4_0's 18-byte blocks)."""
    n = raw.shape[0]
    word, mask = (torch.int32, 0x0F0F0F0F) if raw.shape[1] % 4 == 0 and start % 4 == 0 else (torch.int16, 0x0F0F)
    size = torch.empty((), dtype=word).element_size()
    words = raw.view(word)[:, start // size:(start + 16) // size]
    q = scratch("ggml.nibbles", n * 32, torch.uint8, raw.device).view(word).view(n, 2, 16 // size)
    torch.bitwise_and(words, mask, out=q[:, 0])
    torch.bitwise_and(words >> 4, mask, out=q[:, 1])
    return q.view(torch.uint8).view(n, 32)


def _round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf, exactly: floor(a) + floor(2·(a − floor(a))) on a = |v| (a + 0.5 can round up in fp32)."""
    a = v.abs()
    floored = a.floor()
    return v.sign() * (floored + (2 * (a - floored)).floor())


def quantize_blocks(x: torch.Tensor, kind: int) -> torch.Tensor:
    """The raw blocks (n, bytes per block) uint8 of fp32 values x (n, 32), as ggml's reference
    quantize_row_q8_0 / q4_0 writes them (the tests hold them to the gguf package's byte for byte):
      Q8_0: d = max|x| / 127, q = roundf(x / d)
      Q4_0: d = m / −8 with m the value of largest magnitude (its sign kept), q = min(15, trunc(x / d + 8.5))
    Each block's d is stored as fp16; the codes are computed with the fp32 d, as ggml does."""
    x = x.float().reshape(-1, 32)
    if kind == Q8_0:
        d = x.abs().amax(1, keepdim=True) / 127
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = _round_half_away(x * inv).to(torch.int8).view(torch.uint8)
    elif kind == Q4_0:
        d = x.gather(1, x.abs().argmax(1, keepdim=True)) / -8
        inv = torch.where(d == 0, 0.0, 1 / d)
        q = (x * inv + 8.5).trunc().clamp(0, 15).to(torch.uint8)
        q = q[:, :16] | (q[:, 16:] << 4)  # value j in the low nibble of byte j, value 16 + j in its high one
    else:
        raise ValueError(f"GGML type {NAMES.get(kind, kind)} has no quantizer here (Q8_0 and Q4_0 have)")
    return torch.cat([d.half().view(torch.uint8), q], dim=1)


def dequantize(raw: torch.Tensor, kind: int, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 values of one tensor's raw bytes (a flat uint8 tensor) in `shape`."""
    if kind == F32:
        return raw.view(torch.float32).reshape(shape).clone()
    if kind in (F16, BF16):
        return raw.view(torch.float16 if kind == F16 else torch.bfloat16).float().reshape(shape)
    return dequantize_blocks(raw.reshape(-1, BLOCKS[kind][1]), kind).reshape(shape)
