"""Writing a GGUF file (version 3): "GGUF", the version, the tensor and key/value counts; the typed
key/values; one entry per tensor (name, dimensions fastest first, ggml type, offset); then the
tensors' bytes, each starting at a multiple of 32. Written to a temporary file of its own beside the
target and renamed, under a lock on the target's name (atomic.write_file). What goes into the file,
names and metadata for llama.cpp, is ship/gguf_export.py's.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConfigError
from .atomic import write_file
from .ggml_blocks import BLOCKS, F16, F32, NAMES, quantize_blocks

ALIGN = 32
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9
_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

Meta = list[tuple[str, int, Any, int | None]]  # (key, value type, value, array item type)
Tensor = tuple[str, tuple[int, ...], int, Callable[[], torch.Tensor]]  # (name, torch shape, ggml type, its bytes)


def _value(kind: int, value: Any, item: int | None = None) -> bytes:
    if kind == STRING:
        b = value.encode("utf-8")
        return struct.pack("<Q", len(b)) + b
    if kind == ARRAY:
        return struct.pack("<IQ", item, len(value)) + b"".join(_value(item, v) for v in value)
    return struct.pack(_FORMATS[kind], value)


def _nbytes(shape: tuple[int, ...], kind: int) -> int:
    per_block, block_bytes = BLOCKS[kind]
    n = 1
    for s in shape:
        n *= s
    return n // per_block * block_bytes


def write_gguf(path: str | os.PathLike, meta: Meta, tensors: list[Tensor]) -> Path:
    """Write a GGUF file: `meta` key/values, then each tensor's bytes (made one tensor at a time by its
    function, so the file's data never has to fit in memory at once)."""
    path = Path(path)
    header = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    header += b"".join(_value(STRING, key) + struct.pack("<I", kind) + _value(kind, value, item)
                       for key, kind, value, item in meta)
    offset = 0
    for name, shape, kind, _ in tensors:
        header += _value(STRING, name) + struct.pack("<I", len(shape)) + b"".join(
            struct.pack("<Q", d) for d in reversed(shape)) + struct.pack("<IQ", kind, offset)
        offset += -(-_nbytes(shape, kind) // ALIGN) * ALIGN

    def write(f) -> None:  # a refused tensor, a full disk, Ctrl-C: write_file leaves no half file behind
        f.write(header + b"\0" * (-len(header) % ALIGN))
        for name, shape, kind, make in tensors:
            data = make().detach().cpu().contiguous()
            _check_finite(name, data, kind)
            data = data.view(torch.uint8).reshape(-1).numpy().tobytes()
            if len(data) != _nbytes(shape, kind):
                raise AssertionError(f"{name}: {len(data)} bytes for {shape} in {NAMES[kind]}")
            f.write(data + b"\0" * (-len(data) % ALIGN))
    return write_file(path, write)


def _check_finite(name: str, data: torch.Tensor, kind: int) -> None:
    """A NaN or an infinity (a weight beyond fp16's 65504 in F16, a block scale beyond it in Q8_0/Q4_0)
    would be written as such and poison llama.cpp's output: refused, naming the tensor."""
    values = data if kind in (F32, F16) else data[:, :2].contiguous().view(torch.float16)  # the blocks' scales
    if not bool(torch.isfinite(values).all()):
        raise ConfigError(f"{name}: NaN or infinite values in {NAMES[kind]}"
                          + ("" if kind == F32 else f" (beyond {NAMES[kind]}'s range: try --type f32)"))


def encode(t: torch.Tensor, kind: int) -> torch.Tensor:
    """A float tensor as the bytes of a ggml type (quantized 1M values at a time)."""
    if kind == F32:
        return t.detach().float().contiguous()
    if kind == F16:
        return t.detach().half().contiguous()
    flat = t.detach().reshape(-1, 32)
    return torch.cat([quantize_blocks(flat[i:i + 32768], kind) for i in range(0, flat.shape[0], 32768)])
