"""File access: find a checkpoint (a local path or a Hub repo id), read JSON, read safetensors one
tensor at a time, and write a folder atomically. Every error names the file at fault.
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CheckpointError
from .paths import read_json

Tensors = Iterator[tuple[str, torch.Tensor]]


def checkpoint_tensors(folder: Path, map_dtype: torch.dtype | None = None) -> Tensors:
    """Every tensor of a Hub-style checkpoint folder, read one at a time: sharded or single safetensors,
    or (with torch's weights_only loader, which refuses arbitrary pickled objects) pytorch_model.bin.
    Safetensors tensors already of `map_dtype` are memory-mapped rather than read (see below)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: expected a weight_map object of tensor name -> shard file name")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        outside = [f for f in files if not f.resolve().is_relative_to(folder.resolve())]
        if outside:
            raise CheckpointError(f"{index}: shard {outside[0].name!r} lies outside the checkpoint's folder")
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif (folder / "pytorch_model.bin").is_file():
        yield from pickle_tensors(folder / "pytorch_model.bin")
        return
    else:
        raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    for file in files:
        yield from safetensors_tensors(file, map_dtype)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_tensors(file: Path, map_dtype: torch.dtype | None = None) -> Tensors:
    """The tensors of one .safetensors file, one at a time.

    The format: 8 bytes of header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
    data. A tensor the model keeps as it is (its dtype is `map_dtype`) is a view of a private
    (copy-on-write) memory map of the file: no copy, the page cache's pages become the model's, as
    transformers does. Any other tensor is read into its own fresh buffer, so that memory is gone as
    soon as the model no longer needs it (a quantized or cast load drops each tensor after converting
    it) and nothing of the file stays resident: peak memory is the model plus one tensor."""
    if not file.is_file():
        raise CheckpointError(f"{file}: shard listed in the index is missing")
    size = file.stat().st_size
    corrupt = f"{file}: not a readable safetensors file, truncated or corrupt"
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= size - 8:
            raise CheckpointError(f"{corrupt} (header length {n} for a file of {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{corrupt} (the header is not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{corrupt} (the header is a JSON {type(header).__name__}, not an object)")
        header.pop("__metadata__", None)
        for name, info in header.items():
            if not _valid_entry(info):
                raise CheckpointError(f"{corrupt} (tensor {name}: expected dtype, shape (non-negative integers) and "
                                      f"data_offsets [begin, end], found {str(info)[:100]})")
        spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items())
        for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
            if begin < end:
                raise CheckpointError(f"{corrupt} (tensors {a} and {b} share bytes)")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if map_dtype is not None else None
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
            if dtype is None:
                raise CheckpointError(f"{file}: tensor {name} has dtype {info['dtype']}, which is not supported")
            numel = math.prod(shape)  # Python integers: a crafted shape cannot overflow
            if end - begin != numel * dtype.itemsize or 8 + n + end > size:
                raise CheckpointError(f"{corrupt} (tensor {name} runs past the end of the file or has the wrong size)")
            if mapped is not None and dtype == map_dtype and numel and (8 + n + begin) % dtype.itemsize == 0:
                yield name, torch.frombuffer(mapped, dtype=dtype, count=numel, offset=8 + n + begin).reshape(shape)
                continue
            f.seek(8 + n + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            yield name, (torch.frombuffer(buffer, dtype=dtype) if numel else torch.empty(0, dtype=dtype)).reshape(shape)


def _valid_entry(info: Any) -> bool:
    """A safetensors header entry: {"dtype": str, "shape": [n, ...], "data_offsets": [begin, end]}."""
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in xs)
    return isinstance(info, dict) and isinstance(info.get("dtype"), str) and ints(info.get("shape")) \
        and ints(info.get("data_offsets")) and len(info["data_offsets"]) == 2 \
        and info["data_offsets"][0] <= info["data_offsets"][1]


def pickle_tensors(file: Path) -> Tensors:
    """The tensors of a pytorch_model.bin-style file, with torch's weights_only loader (which refuses
    arbitrary pickled objects)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise CheckpointError(f"{file}: refused; loading it needs more than weights_only=True allows, "
                              f"or it is corrupt ({type(e).__name__}). Convert it to safetensors.") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: expected a dict of named tensors, found {type(state).__name__}")
    yield from state.items()


def check_tensor(where: str, name: str, tensor: torch.Tensor, floating: bool) -> None:
    """Refuse a tensor that cannot be the weight it stands for: not floating-point where a float weight
    belongs (`floating`), or holding NaN or infinite values."""
    if floating and not tensor.is_floating_point():
        raise CheckpointError(f"{where}: tensor {name} is {tensor.dtype}, where a floating-point weight belongs")
    if tensor.is_floating_point():  # 16M values at a time: isfinite's temporaries on a whole 50400 x 4096
        for part in tensor.reshape(-1).split(1 << 24):  # embedding came to 1 GB, a fifth of a 6B NF4 load
            if not bool(torch.isfinite(part).all()):
                raise CheckpointError(f"{where}: tensor {name} holds NaN or infinite values")
